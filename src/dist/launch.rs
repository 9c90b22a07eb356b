//! Launcher helpers: where this process sits in the job (`LaunchSpec`), from CLI values and
//! the environments of SLURM and torchrun-style launchers, and spawning the local workers.
//!
//! Precedence, field by field (the first source that sets a field wins):
//! 1. CLI values (`--nnodes`, `--node-rank`, `--nproc`, `--coordinator`);
//! 2. `FTRUN_LOCAL_RANK` and `FTRUN_COORDINATOR` (set by `ftrun --nproc` for its children:
//!    the local rank, and the coordinator it started, which beats a `--coordinator` value);
//! 3. torchrun-style variables, active when `RANK` and `WORLD_SIZE` are set: `LOCAL_RANK`,
//!    `LOCAL_WORLD_SIZE` (nproc; when missing, a single node is assumed: nproc = WORLD_SIZE),
//!    `GROUP_RANK` (node rank; else RANK / nproc), nnodes = WORLD_SIZE / nproc,
//!    coordinator `MASTER_ADDR:MASTER_PORT`. An inner launcher is more specific than the
//!    allocation around it, so torchrun beats SLURM;
//! 4. SLURM, active when `SLURM_JOB_ID` or `SLURM_NNODES` is set: `SLURM_NNODES`,
//!    `SLURM_NODEID`, `SLURM_NTASKS_PER_NODE` (nproc when > 1: each task is one worker with
//!    local rank `SLURM_LOCALID`; with one task per node, that task spawns `--nproc` workers),
//!    `SLURM_PROCID` (checked against node_rank * nproc + local_rank), coordinator = the first
//!    host of `SLURM_JOB_NODELIST` with port `MASTER_PORT` or 29400;
//! 5. defaults: one node, node rank 0, one process, coordinator 127.0.0.1:29400.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The coordinator's port when no source names one.
pub const DEFAULT_COORDINATOR_PORT: u16 = 29400;

/// Launch values given on the command line (None = not given).
#[derive(Debug, Clone, Default)]
pub struct LaunchArgs {
    pub nnodes: Option<usize>,
    pub node_rank: Option<usize>,
    pub nproc: Option<usize>,
    pub coordinator: Option<String>,
}

/// Where this process sits in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    pub nnodes: usize,
    pub node_rank: usize,
    /// Worker processes per node.
    pub nproc: usize,
    /// The coordinator's host:port.
    pub coordinator: String,
    /// `Some(i)` when this process is already worker i of its node (spawned by a launcher);
    /// `None` when it must spawn the node's `nproc` workers itself.
    pub local_rank: Option<usize>,
}

impl LaunchSpec {
    pub fn world(&self) -> usize {
        self.nnodes * self.nproc
    }

    /// This worker's global rank, when this process is one worker.
    pub fn rank(&self) -> Option<usize> {
        self.local_rank.map(|l| self.node_rank * self.nproc + l)
    }

    /// Resolves the spec from CLI values and the process environment.
    pub fn from_env(cli: &LaunchArgs) -> Result<Self> {
        Self::resolve(cli, &|k| std::env::var(k).ok())
    }

    /// Resolves the spec from CLI values and an environment lookup (see the module docs).
    pub fn resolve(cli: &LaunchArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |key: &str| -> Result<Option<usize>> {
            match env(key) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).with_context(|| {
                    format!("environment variable {key}={v:?} is not a non-negative integer")
                }),
            }
        };
        let mut from_env = LaunchArgs::default();
        let mut env_local_rank = num("FTRUN_LOCAL_RANK")?;
        let launcher_coordinator = env("FTRUN_COORDINATOR").filter(|c| !c.is_empty());
        let mut global_rank_check: Option<(&str, usize)> = None;

        // torchrun-style.
        if let (Some(rank), Some(world)) = (num("RANK")?, num("WORLD_SIZE")?) {
            let nproc = num("LOCAL_WORLD_SIZE")?.unwrap_or(world);
            if nproc == 0 || world % nproc != 0 {
                bail!("WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={nproc}");
            }
            from_env.nproc = Some(nproc);
            from_env.nnodes = Some(world / nproc);
            from_env.node_rank = Some(num("GROUP_RANK")?.unwrap_or(rank / nproc));
            env_local_rank = env_local_rank.or(num("LOCAL_RANK")?.or(Some(rank % nproc)));
            global_rank_check = Some(("RANK", rank));
            if let Some(addr) = env("MASTER_ADDR") {
                let port = env("MASTER_PORT").unwrap_or(DEFAULT_COORDINATOR_PORT.to_string());
                from_env.coordinator = Some(format!("{addr}:{port}"));
            }
        }

        // SLURM fills what torchrun did not.
        if env("SLURM_JOB_ID").is_some() || env("SLURM_NNODES").is_some() {
            from_env.nnodes = from_env.nnodes.or(num("SLURM_NNODES")?);
            from_env.node_rank = from_env.node_rank.or(num("SLURM_NODEID")?);
            if let Some(tasks) = num("SLURM_NTASKS_PER_NODE")? {
                if tasks > 1 && from_env.nproc.is_none() {
                    from_env.nproc = Some(tasks);
                    env_local_rank = env_local_rank.or(num("SLURM_LOCALID")?);
                    if let Some(procid) = num("SLURM_PROCID")? {
                        global_rank_check = global_rank_check.or(Some(("SLURM_PROCID", procid)));
                    }
                }
            }
            if from_env.coordinator.is_none() {
                if let Some(list) = env("SLURM_JOB_NODELIST") {
                    let host = first_host(&list)
                        .with_context(|| format!("SLURM_JOB_NODELIST={list:?}"))?;
                    let port = env("MASTER_PORT").unwrap_or(DEFAULT_COORDINATOR_PORT.to_string());
                    from_env.coordinator = Some(format!("{host}:{port}"));
                }
            }
        }

        let spec = LaunchSpec {
            nnodes: cli.nnodes.or(from_env.nnodes).unwrap_or(1),
            node_rank: cli.node_rank.or(from_env.node_rank).unwrap_or(0),
            nproc: cli.nproc.or(from_env.nproc).unwrap_or(1),
            coordinator: launcher_coordinator
                .or(cli.coordinator.clone())
                .or(from_env.coordinator)
                .unwrap_or(format!("127.0.0.1:{DEFAULT_COORDINATOR_PORT}")),
            local_rank: env_local_rank,
        };
        if spec.nnodes == 0 || spec.nproc == 0 {
            bail!(
                "launch: nnodes ({}) and nproc ({}) must be at least 1",
                spec.nnodes,
                spec.nproc
            );
        }
        if spec.node_rank >= spec.nnodes {
            bail!(
                "launch: node rank {} is outside {} nodes",
                spec.node_rank,
                spec.nnodes
            );
        }
        if let Some(l) = spec.local_rank {
            if l >= spec.nproc {
                bail!(
                    "launch: local rank {l} is outside {} processes per node",
                    spec.nproc
                );
            }
        }
        if let (Some((var, global)), Some(rank)) = (global_rank_check, spec.rank()) {
            if global != rank {
                bail!(
                    "launch: {var}={global} but node rank {} * nproc {} + local rank {} = {rank}; \
                     ftrun needs ranks laid out node by node",
                    spec.node_rank,
                    spec.nproc,
                    spec.local_rank.unwrap_or(0)
                );
            }
        }
        Ok(spec)
    }
}

/// The first host of a SLURM node list: `a,b` -> `a`; `gpu[07-10,12],cpu1` -> `gpu07`.
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    let head_end = list.find([',', '[']).unwrap_or(list.len());
    let prefix = &list[..head_end];
    if !list[head_end..].starts_with('[') {
        if prefix.is_empty() {
            bail!("empty node list");
        }
        return Ok(prefix.to_string());
    }
    let close = list[head_end..]
        .find(']')
        .map(|i| head_end + i)
        .with_context(|| format!("unclosed '[' in node list {list:?}"))?;
    let inside = &list[head_end + 1..close];
    let first = inside
        .split([',', '-'])
        .next()
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .with_context(|| format!("node range [{inside}] does not start with a number"))?;
    // Text after ']' up to the next host belongs to this host name (e.g. `n[1-2]-ib`).
    let rest = &list[close + 1..];
    let suffix = &rest[..rest.find(',').unwrap_or(rest.len())];
    Ok(format!("{prefix}{first}{suffix}"))
}

/// The command each local worker runs.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Extra environment for every worker (FTRUN_LOCAL_RANK is added per worker).
    pub env: Vec<(String, String)>,
}

/// Where the prefixed output lines go.
pub type Sink = Arc<Mutex<dyn Write + Send>>;

/// The spawned workers of this node.
pub struct LocalWorkers {
    children: Vec<(usize, Child)>,
    pumps: Vec<std::thread::JoinHandle<()>>,
}

/// Spawns `n` workers, worker i with `FTRUN_LOCAL_RANK=i`; every line they print goes to our
/// stdout/stderr prefixed with `[rank R]`, R = `first_rank + i` (the global rank).
pub fn spawn_local_workers(
    n: usize,
    cmd: &WorkerCommand,
    first_rank: usize,
) -> Result<LocalWorkers> {
    let out: Sink = Arc::new(Mutex::new(std::io::stdout()));
    let err: Sink = Arc::new(Mutex::new(std::io::stderr()));
    spawn_local_workers_to(n, cmd, first_rank, out, err)
}

/// [`spawn_local_workers`] with the prefixed stdout and stderr lines sent to the given sinks.
pub fn spawn_local_workers_to(
    n: usize,
    cmd: &WorkerCommand,
    first_rank: usize,
    out: Sink,
    err: Sink,
) -> Result<LocalWorkers> {
    let mut workers = LocalWorkers {
        children: Vec::with_capacity(n),
        pumps: Vec::new(),
    };
    for i in 0..n {
        let mut child = Command::new(&cmd.program)
            .args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .env("FTRUN_LOCAL_RANK", i.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start worker {i}: {}", cmd.program.display()))?;
        let prefix = format!("[rank {}] ", first_rank + i);
        if let Some(s) = child.stdout.take() {
            workers.pumps.push(pump(s, prefix.clone(), out.clone()));
        }
        if let Some(s) = child.stderr.take() {
            workers.pumps.push(pump(s, prefix, err.clone()));
        }
        workers.children.push((first_rank + i, child));
    }
    Ok(workers)
}

/// Copies `source` line by line into `sink`, each line prefixed; a whole line is written
/// under the lock so lines of different workers never interleave.
fn pump(
    source: impl Read + Send + 'static,
    prefix: String,
    sink: Sink,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(source);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = s
                        .write_all(prefix.as_bytes())
                        .and_then(|_| s.write_all(&line));
                    let _ = s.flush();
                }
            }
        }
    })
}

impl LocalWorkers {
    /// Waits for every worker. When one fails, the others are killed (they would otherwise
    /// wait on it until their collective timeout). Returns 0 when all succeeded, else the
    /// first failure's exit code (1 for a worker killed by a signal).
    pub fn wait(self) -> Result<i32> {
        self.wait_until(&|| None)
    }

    /// [`LocalWorkers::wait`], also killing every worker (and failing with code 1) once
    /// `stop` returns a reason: the coordinator stopped the job (a rank missed heartbeats).
    pub fn wait_until(mut self, stop: &dyn Fn() -> Option<String>) -> Result<i32> {
        let mut failure: Option<(usize, i32)> = None;
        let mut running: Vec<bool> = vec![true; self.children.len()];
        while running.iter().any(|&r| r) {
            for (i, (rank, child)) in self.children.iter_mut().enumerate() {
                if !running[i] {
                    continue;
                }
                if let Some(status) = child.try_wait()? {
                    running[i] = false;
                    if !status.success() && failure.is_none() {
                        let code = status.code().unwrap_or(1);
                        eprintln!(
                            "ftrun: worker rank {rank} failed ({status}); stopping the others"
                        );
                        failure = Some((*rank, if code == 0 { 1 } else { code }));
                    }
                }
            }
            if failure.is_none() && running.iter().any(|&r| r) {
                if let Some(reason) = stop() {
                    eprintln!(
                        "ftrun: the coordinator stopped the job: {reason}; stopping the workers"
                    );
                    failure = Some((usize::MAX, 1));
                }
            }
            if failure.is_some() {
                for (i, (_, child)) in self.children.iter_mut().enumerate() {
                    if running[i] {
                        let _ = child.kill();
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in self.pumps.drain(..) {
            let _ = p.join();
        }
        Ok(failure.map_or(0, |(_, code)| code))
    }
}
