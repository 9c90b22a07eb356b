//! `ftrun --nproc N train ...`: the node's launcher. It starts the coordinator (node 0), runs
//! the node's N workers (this same binary, each told its local rank and the coordinator), and
//! when the run fails (a worker died, missed heartbeats, or a collective timed out) stops every
//! worker and starts them again from the last committed checkpoint, up to
//! `parallel.max_restarts` times.

use anyhow::Result;

use super::coordinator::{CoordinatorConfig, CoordinatorHandle};
use super::launch::{spawn_local_workers, LaunchSpec, WorkerCommand};
use super::parallel::{ENV_ATTEMPT, ENV_SUPERVISED};

/// What the launcher needs besides the launch spec.
#[derive(Debug, Clone)]
pub struct Supervision {
    pub max_restarts: usize,
    pub coordinator: CoordinatorConfig,
}

/// Runs the node's workers with `worker_args` (the launcher's own arguments: the workers
/// parse them again, in worker mode) until they succeed or the restarts are used up. Returns
/// the workers' exit code (0 = success).
pub fn supervise(spec: &LaunchSpec, sup: &Supervision, worker_args: &[String]) -> Result<i32> {
    let program = std::env::current_exe()?;
    let mut attempt = 0;
    loop {
        // A fresh coordinator per attempt: registration, barriers and commits start over.
        let coordinator = if spec.node_rank == 0 {
            let bind = if spec.nnodes == 1 {
                // One node: an ephemeral loopback port never collides with another job.
                "127.0.0.1:0".to_string()
            } else {
                let port = spec.coordinator.rsplit(':').next().unwrap_or_default();
                format!("0.0.0.0:{port}")
            };
            Some(CoordinatorHandle::start(sup.coordinator.clone(), &bind)?)
        } else {
            None
        };
        let address = match &coordinator {
            Some(c) if spec.nnodes == 1 => c.addr().to_string(),
            _ => spec.coordinator.clone(),
        };
        let cmd = WorkerCommand {
            program: program.clone(),
            args: worker_args.to_vec(),
            env: vec![
                ("FTRUN_COORDINATOR".into(), address),
                (ENV_SUPERVISED.into(), "1".into()),
                (ENV_ATTEMPT.into(), attempt.to_string()),
            ],
        };
        let workers = spawn_local_workers(spec.nproc, &cmd, spec.node_rank * spec.nproc)?;
        let code = workers.wait_until(&|| coordinator.as_ref().and_then(|c| c.stop_reason()))?;
        drop(coordinator);
        if code == 0 {
            return Ok(0);
        }
        if attempt >= sup.max_restarts {
            eprintln!(
                "ftrun: the run failed (exit code {code}) and parallel.max_restarts = {} restarts are used up",
                sup.max_restarts
            );
            return Ok(code);
        }
        attempt += 1;
        eprintln!(
            "ftrun: the run failed (exit code {code}); restarting from the last committed checkpoint (restart {attempt} of {})",
            sup.max_restarts
        );
    }
}
