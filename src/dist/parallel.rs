//! `Parallel`: the one object through which the trainer sees the rest of the job. A
//! single-process run is world 1 with no coordinator ([`Parallel::single`]); a worker of a
//! distributed run registers with the coordinator, joins the collectives ring and beats in
//! the background ([`Parallel::join`]). The trainer asks it who does what (rank 0 tokenizes,
//! logs and writes the run's state), sums counts and losses, checks the stop flag every step
//! and commits checkpoints through it.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Device;

use super::collectives::{sum_counts, sum_f64s, Collectives, SoloComm};
use super::coordinator::{CoordinatorConfig, CoordinatorHandle};
use super::launch::LaunchSpec;
use super::tcp_ring::RingListener;
use super::worker::{local_hostname, Worker, WorkerInfo};
use crate::config::ParallelConfig;

/// Set by the `--nproc` launcher for its workers: it hosts the coordinator itself (without
/// it, rank 0 of a torchrun/SLURM job starts one in-process).
pub const ENV_SUPERVISED: &str = "FTRUN_SUPERVISED";
/// Which attempt of the job this is (0 = first; restarts resume from the last checkpoint).
pub const ENV_ATTEMPT: &str = "FTRUN_RESTART_ATTEMPT";
/// Test hook, right before optimizer step STEP+1 of the first attempt only: `exit:RANK:STEP`
/// makes that rank exit abruptly (code 137, as if killed), `hang:RANK:STEP` makes its training
/// thread stop (its heartbeats go on: the peers' collectives time out) and `freeze:RANK:STEP`
/// suspends the whole process with SIGSTOP (heartbeats stop: the coordinator notices).
pub const ENV_FAULT: &str = "FTRUN_FAULT";

/// What a worker tells the coordinator about itself (all workers must agree on it).
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Hash of the resolved config.
    pub config_hash: String,
    /// The packed dataset's key.
    pub dataset_fingerprint: String,
    /// The run's work dir (checkpoint manifests go there).
    pub work_dir: std::path::PathBuf,
    pub parallel: ParallelConfig,
}

/// The coordinator settings of a job: heartbeats from `[parallel]`, manifests into `work_dir`.
pub fn coordinator_config(
    spec: &LaunchSpec,
    parallel: &ParallelConfig,
    work_dir: &std::path::Path,
) -> CoordinatorConfig {
    let heartbeat_timeout = Duration::from_secs_f64(parallel.heartbeat_timeout_s);
    CoordinatorConfig {
        nnodes: spec.nnodes,
        nproc: spec.nproc,
        sp: parallel.sequence_parallel_size,
        heartbeat_interval: (heartbeat_timeout / 5).min(Duration::from_secs(1)),
        heartbeat_timeout,
        // Rank 0 may tokenize a large dataset while the others wait at a barrier; dead ranks
        // are caught by heartbeats, not by this.
        wait_timeout: Duration::from_secs(6 * 3600),
        output_dir: work_dir.to_path_buf(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum FaultKind {
    Exit,
    Hang,
    Freeze,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Fault {
    kind: FaultKind,
    rank: usize,
    step: usize,
}

fn parse_fault(text: &str) -> Result<Fault> {
    let parts: Vec<&str> = text.split(':').collect();
    let bad = || format!("{ENV_FAULT}={text:?} is not `exit|hang|freeze:RANK:STEP`");
    let [kind, rank, step] = parts.as_slice() else {
        bail!(bad());
    };
    let kind = match *kind {
        "exit" => FaultKind::Exit,
        "hang" => FaultKind::Hang,
        "freeze" => FaultKind::Freeze,
        _ => bail!(bad()),
    };
    Ok(Fault {
        kind,
        rank: rank.parse().with_context(bad)?,
        step: step.parse().with_context(bad)?,
    })
}

/// This process's place in the job and its channels to the other ranks.
pub struct Parallel {
    comm: Box<dyn Collectives>,
    worker: Option<Worker>,
    /// This process's GPU index on its node (0 for a single process).
    local_rank: usize,
    /// How long a collective may wait for a peer (NCCL's, set up in `use_device`).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    collective_timeout: Duration,
    attempt: usize,
    fault: Option<Fault>,
    /// A coordinator this process hosts (rank 0 of a job not started by `ftrun --nproc`).
    _coordinator: Option<CoordinatorHandle>,
}

impl Parallel {
    /// One process, no coordinator: every collective is the identity.
    pub fn single() -> Self {
        Self {
            comm: Box::new(SoloComm),
            worker: None,
            local_rank: 0,
            collective_timeout: Duration::MAX,
            attempt: 0,
            fault: None,
            _coordinator: None,
        }
    }

    /// Registers this worker with the coordinator (starting it first when this is rank 0 of a
    /// job no `ftrun --nproc` launcher supervises), then joins the world's TcpRing.
    pub fn join(spec: &LaunchSpec, opts: &JoinOptions) -> Result<Self> {
        let local_rank = spec
            .local_rank
            .context("Parallel::join: this process is not a worker (no local rank)")?;
        let env = |k: &str| std::env::var(k).ok();
        let attempt = match env(ENV_ATTEMPT) {
            Some(a) => a
                .parse()
                .with_context(|| format!("{ENV_ATTEMPT}={a:?} is not a number"))?,
            None => 0,
        };
        let fault = match env(ENV_FAULT) {
            Some(f) if attempt == 0 => Some(parse_fault(&f)?),
            _ => None,
        };
        let coordinator = if spec.rank() == Some(0) && env(ENV_SUPERVISED).is_none() {
            let port = spec
                .coordinator
                .rsplit(':')
                .next()
                .unwrap_or_default()
                .to_string();
            let cfg = coordinator_config(spec, &opts.parallel, &opts.work_dir);
            Some(CoordinatorHandle::start(cfg, &format!("0.0.0.0:{port}"))?)
        } else {
            None
        };
        // One node: loopback. Many nodes: every interface, published under the host name.
        let (bind, host) = if spec.nnodes == 1 {
            ("127.0.0.1:0", "127.0.0.1".to_string())
        } else {
            ("0.0.0.0:0", local_hostname())
        };
        let listener = RingListener::bind(bind)?;
        let info = WorkerInfo {
            node_rank: spec.node_rank as u32,
            local_rank: local_rank as u32,
            host: local_hostname(),
            config_hash: opts.config_hash.clone(),
            binary_version: format!(
                "{} ({})",
                env!("CARGO_PKG_VERSION"),
                if cfg!(feature = "cuda") {
                    "cuda"
                } else {
                    "cpu"
                }
            ),
            dataset_fingerprint: opts.dataset_fingerprint.clone(),
            ring_addr: format!("{host}:{}", listener.local_addr().port()),
        };
        let worker = Worker::register(&spec.coordinator, info, Duration::from_secs(120))?;
        let timeout = Duration::from_secs_f64(opts.parallel.collective_timeout_s);
        let comm = worker.tcp_ring(listener, timeout)?;
        eprintln!(
            "joined the job as rank {} of {} (node {}, local rank {local_rank}, attempt {attempt})",
            worker.rank(),
            worker.world(),
            spec.node_rank
        );
        Ok(Self {
            comm: Box::new(comm),
            worker: Some(worker),
            local_rank,
            collective_timeout: timeout,
            attempt,
            fault,
            _coordinator: coordinator,
        })
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// This process's index among its node's workers (its GPU when each worker sees them all).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Moves the world's collectives onto the training device, once, before the first
    /// collective of the run: on a GPU of a distributed run (CUDA build) one NCCL communicator on
    /// candle's stream replaces the TcpRing, its id made by rank 0 and handed out through the
    /// coordinator; otherwise the TcpRing stays. `FTRUN_COLLECTIVES=tcp` keeps the TcpRing on
    /// GPUs too (a fallback where NCCL cannot run).
    pub fn use_device(&mut self, device: &Device) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let (Some(worker), Device::Cuda(cuda)) = (&self.worker, device) {
            if std::env::var("FTRUN_COLLECTIVES").as_deref() != Ok("tcp") {
                let key = format!("nccl/world/attempt-{}", self.attempt);
                let blobs: std::rc::Rc<dyn super::collectives::IdExchange> =
                    std::rc::Rc::new(worker.blobs());
                let comm = super::nccl::NcclComm::init_world(
                    cuda,
                    self.rank(),
                    self.world(),
                    blobs,
                    &key,
                    self.collective_timeout,
                )?;
                self.comm = Box::new(comm);
                if self.is_main() {
                    eprintln!("collectives: NCCL over {} GPUs", self.world());
                }
            }
        }
        let _ = device;
        Ok(())
    }

    pub fn world(&self) -> usize {
        self.comm.world()
    }

    /// Rank 0: tokenizes, logs, evaluates and writes the run's state.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// More than one process (checkpoints are sharded and committed by the coordinator).
    pub fn is_distributed(&self) -> bool {
        self.worker.is_some()
    }

    /// The restart attempt (0 = the first run).
    pub fn attempt(&self) -> usize {
        self.attempt
    }

    /// The world communicator (ZeRO shards over it).
    pub fn comm(&self) -> &dyn Collectives {
        self.comm.as_ref()
    }

    /// Runs `f` on rank 0 first, then (after a barrier) on the other ranks: rank 0 builds a
    /// shared cache (the tokenized dataset) that the others then only read.
    pub fn main_first<T>(&self, what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
        let Some(worker) = &self.worker else {
            return f();
        };
        if self.is_main() {
            let out = f()?;
            worker.barrier(what)?;
            Ok(out)
        } else {
            worker.barrier(what)?;
            f()
        }
    }

    /// Sums counts over the ranks, exactly.
    pub fn sum_counts(&self, counts: &[u64], device: &Device) -> Result<Vec<u64>> {
        sum_counts(self.comm(), counts, device)
    }

    /// Sums f64 values over the ranks (f32 precision across ranks).
    pub fn sum_f64s(&self, values: &[f64], device: &Device) -> Result<Vec<f64>> {
        sum_f64s(self.comm(), values, device)
    }

    /// Fails with the coordinator's reason once the job is being stopped (a dead rank).
    pub fn check_stop(&self) -> Result<()> {
        if let Some(reason) = self.worker.as_ref().and_then(|w| w.should_stop()) {
            bail!("the coordinator stopped the job: {reason}");
        }
        Ok(())
    }

    /// Sends this rank's loss and token count of `step` for the coordinator's per-step line.
    pub fn report_metrics(&self, step: usize, loss: f64, tokens: usize) -> Result<()> {
        if let Some(w) = &self.worker {
            w.report_metrics(step as u64, loss, tokens as u64)?;
        }
        Ok(())
    }

    /// A named barrier of all ranks (through the coordinator).
    pub fn barrier(&self, name: &str) -> Result<()> {
        match &self.worker {
            Some(w) => w.barrier(name),
            None => Ok(()),
        }
    }

    /// Reports this rank's checkpoint files of `step` durable and waits until the coordinator
    /// committed the step (wrote its manifest).
    pub fn commit_checkpoint(&self, step: usize, files: Vec<String>) -> Result<()> {
        let Some(w) = &self.worker else {
            return Ok(());
        };
        if !w.shard_durable(step as u64, files, true)? {
            bail!("checkpoint step {step} was not committed by the coordinator");
        }
        Ok(())
    }

    /// The test hook of [`ENV_FAULT`]; called before each optimizer step.
    pub fn fault_point(&self, step: usize) {
        let Some(f) = self.fault else { return };
        if f.rank != self.rank() || f.step != step {
            return;
        }
        match f.kind {
            FaultKind::Exit => {
                eprintln!(
                    "{ENV_FAULT}: rank {} exits before step {}",
                    f.rank,
                    step + 1
                );
                std::process::exit(137);
            }
            FaultKind::Hang => {
                eprintln!(
                    "{ENV_FAULT}: rank {} hangs before step {}",
                    f.rank,
                    step + 1
                );
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            FaultKind::Freeze => {
                eprintln!(
                    "{ENV_FAULT}: rank {} freezes before step {}",
                    f.rank,
                    step + 1
                );
                let _ = std::process::Command::new("kill")
                    .args(["-STOP", &std::process::id().to_string()])
                    .status();
            }
        }
    }

    /// Tells the coordinator this rank is done (call after the last checkpoint, on success).
    pub fn finish(&mut self) -> Result<()> {
        match &mut self.worker {
            Some(w) => w.finish(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_spec_parses_and_bad_ones_are_named() {
        assert_eq!(
            parse_fault("exit:1:3").unwrap(),
            Fault {
                kind: FaultKind::Exit,
                rank: 1,
                step: 3
            }
        );
        let err = parse_fault("boom:1").unwrap_err().to_string();
        assert!(err.contains("FTRUN_FAULT=\"boom:1\""), "{err}");
    }

    #[test]
    fn single_is_rank_zero_of_one() {
        let p = Parallel::single();
        assert!(p.is_main() && !p.is_distributed());
        assert_eq!(p.world(), 1);
        let v = p.sum_f64s(&[1.5, 2.25], &Device::Cpu).unwrap();
        assert_eq!(v, vec![1.5, 2.25]);
        assert_eq!(
            p.main_first("x", || Ok(7)).unwrap(),
            7,
            "runs the closure once"
        );
    }
}
