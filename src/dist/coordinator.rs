//! The job coordinator: a tonic gRPC service (proto/coordinator.proto) that assigns ranks,
//! checks that every worker runs the same config, binary and dataset, runs named barriers,
//! watches heartbeats (a silent worker stops the whole job), aggregates metrics into one line
//! per step, and commits checkpoints (MANIFEST.json only once every rank's shard is durable).
//!
//! Blocking RPCs (Register, Barrier, ShardDurable with `wait`, FetchBlob) long-poll: they
//! return when their condition holds, when the job is stopped (ABORTED, with the reason), or
//! after the coordinator's `wait_timeout` (DEADLINE_EXCEEDED).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tonic::{Request, Response, Status};

use super::collectives::WorldLayout;
use super::proto::coordinator_server::{Coordinator, CoordinatorServer};
use super::proto::*;

/// What the coordinator is told about the job.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub nnodes: usize,
    pub nproc: usize,
    /// Sequence-parallel group size (1 = plain data parallel).
    pub sp: usize,
    pub heartbeat_interval: Duration,
    /// A registered worker silent for this long is declared dead and the job is stopped.
    pub heartbeat_timeout: Duration,
    /// How long a blocking call (registration, barrier, commit wait) may wait.
    pub wait_timeout: Duration,
    /// The run's output directory; manifests go to `checkpoints/step-N/MANIFEST.json` in it.
    pub output_dir: PathBuf,
}

impl CoordinatorConfig {
    pub fn world(&self) -> usize {
        self.nnodes * self.nproc
    }
}

/// A running coordinator (its own thread and tokio runtime), stopped on drop.
pub struct CoordinatorHandle {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CoordinatorHandle {
    /// Binds `bind` (e.g. `0.0.0.0:29400`, or `127.0.0.1:0` for an ephemeral port) and serves.
    pub fn start(config: CoordinatorConfig, bind: &str) -> Result<Self> {
        let layout = WorldLayout::new(config.world(), config.sp)
            .context("coordinator: the job's world layout")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(bind))
            .with_context(|| format!("coordinator: cannot bind {bind}"))?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::new(config, layout));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let service = Service {
            state: state.clone(),
        };
        let monitor_state = state.clone();
        let thread = std::thread::Builder::new()
            .name("ftrun-coordinator".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let monitor = tokio::spawn(monitor_heartbeats(monitor_state));
                    let served = tonic::transport::Server::builder()
                        .add_service(CoordinatorServer::new(service))
                        .serve_with_incoming_shutdown(
                            tonic::transport::server::TcpIncoming::from(listener),
                            async {
                                let _ = rx.await;
                            },
                        )
                        .await;
                    monitor.abort();
                    if let Err(e) = served {
                        eprintln!("coordinator: server error: {e}");
                    }
                })
            })?;
        Ok(Self {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Why the job was stopped (a dead worker), if it was.
    pub fn stop_reason(&self) -> Option<String> {
        self.state.lock().stop.clone()
    }

    /// The aggregated metric lines so far, one per completed step.
    pub fn metric_lines(&self) -> Vec<String> {
        self.state.lock().metric_lines.clone()
    }

    /// The newest committed checkpoint step.
    pub fn last_committed_step(&self) -> Option<u64> {
        self.state.lock().committed.last().copied()
    }
}

impl Drop for CoordinatorHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct State {
    config: CoordinatorConfig,
    layout: WorldLayout,
    inner: Mutex<Inner>,
    /// Woken on every state change; long-polling calls re-check their condition.
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    /// Registered workers by rank.
    workers: BTreeMap<u32, Registered>,
    /// Set once every worker registered; heartbeats are watched from then on.
    complete: bool,
    stop: Option<String>,
    /// Barrier name -> (ranks arrived in the current round, rounds completed).
    barriers: HashMap<String, (BTreeSet<u32>, u64)>,
    metrics: BTreeMap<u64, BTreeMap<u32, (f64, u64)>>,
    metric_lines: Vec<String>,
    /// Step -> rank -> files of the rank's durable shard.
    shards: BTreeMap<u64, BTreeMap<u32, Vec<String>>>,
    committed: BTreeSet<u64>,
    commit_errors: HashMap<u64, String>,
    blobs: HashMap<String, Vec<u8>>,
}

struct Registered {
    info: WorkerInfo,
    last_seen: Instant,
    /// Said goodbye (finished its work): no longer expected to beat.
    finished: bool,
}

impl State {
    fn new(config: CoordinatorConfig, layout: WorldLayout) -> Self {
        Self {
            config,
            layout,
            inner: Mutex::new(Inner::default()),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent, so a poisoned lock is usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn world(&self) -> u32 {
        self.layout.world as u32
    }

    /// Long-polls until `check` returns `Some`, the job stops, or `timeout` passes.
    async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&mut Inner) -> Option<Result<T, Status>>,
    ) -> Result<T, Status> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Register interest before checking so a change in between is not missed.
            notified.as_mut().enable();
            {
                let mut inner = self.lock();
                if let Some(done) = check(&mut inner) {
                    return done;
                }
                if let Some(reason) = &inner.stop {
                    return Err(Status::aborted(format!(
                        "{what}: the job was stopped: {reason}"
                    )));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::deadline_exceeded(format!(
                    "{what}: still waiting after {timeout:?}"
                )));
            }
        }
    }

    fn check_rank(&self, inner: &Inner, rank: u32, what: &str) -> Result<(), Status> {
        if inner.workers.contains_key(&rank) {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "{what}: rank {rank} is not registered"
            )))
        }
    }
}

/// Names of the fields that must agree across workers, with their values.
fn identity(info: &WorkerInfo) -> [(&'static str, &str); 3] {
    [
        ("config hash", &info.config_hash),
        ("binary version", &info.binary_version),
        ("dataset fingerprint", &info.dataset_fingerprint),
    ]
}

fn describe(info: &WorkerInfo) -> String {
    format!(
        "node {} local {} on host {:?}",
        info.node_rank, info.local_rank, info.host
    )
}

struct Service {
    state: Arc<State>,
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        let st = &self.state;
        let cfg = &st.config;
        let info = request
            .into_inner()
            .info
            .ok_or_else(|| Status::invalid_argument("Register: missing worker info"))?;
        if info.node_rank as usize >= cfg.nnodes || info.local_rank as usize >= cfg.nproc {
            return Err(Status::invalid_argument(format!(
                "Register: worker {} is outside the job's {} nodes x {} processes",
                describe(&info),
                cfg.nnodes,
                cfg.nproc
            )));
        }
        // Deterministic: the same (node, local) pair always gets the same rank.
        let rank = info.node_rank * cfg.nproc as u32 + info.local_rank;
        {
            let mut inner = st.lock();
            if let Some(reason) = &inner.stop {
                return Err(Status::aborted(format!(
                    "Register: the job was stopped: {reason}"
                )));
            }
            if let Some(existing) = inner.workers.get(&rank) {
                return Err(Status::already_exists(format!(
                    "Register: rank {rank} ({}) is already registered by {}",
                    describe(&info),
                    describe(&existing.info)
                )));
            }
            if let Some(reference) = inner.workers.values().next() {
                let differences: Vec<String> = identity(&info)
                    .iter()
                    .zip(identity(&reference.info))
                    .filter(|(mine, theirs)| mine.1 != theirs.1)
                    .map(|((field, mine), (_, theirs))| {
                        format!("{field} {mine:?} differs from {theirs:?}")
                    })
                    .collect();
                if !differences.is_empty() {
                    let msg = format!(
                        "Register: worker {} refused: {} (of {})",
                        describe(&info),
                        differences.join("; "),
                        describe(&reference.info)
                    );
                    // A job whose workers disagree cannot run: stop it, so that the waiting
                    // workers fail now with the reason instead of at the registration timeout.
                    inner.stop = Some(msg.clone());
                    drop(inner);
                    st.changed.notify_waiters();
                    return Err(Status::failed_precondition(msg));
                }
            }
            inner.workers.insert(
                rank,
                Registered {
                    info,
                    last_seen: Instant::now(),
                    finished: false,
                },
            );
            if inner.workers.len() == st.layout.world {
                inner.complete = true;
                // Heartbeat clocks start when the world is complete: until then workers
                // are blocked in Register and cannot beat.
                let now = Instant::now();
                inner.workers.values_mut().for_each(|w| w.last_seen = now);
            }
        }
        st.changed.notify_waiters();
        let what = format!("Register (rank {rank})");
        let ring_addrs = st
            .wait_for(&what, cfg.wait_timeout, |inner| {
                inner.complete.then(|| {
                    Ok(inner
                        .workers
                        .values()
                        .map(|w| w.info.ring_addr.clone())
                        .collect::<Vec<_>>())
                })
            })
            .await
            .map_err(|e| {
                if e.code() == tonic::Code::DeadlineExceeded {
                    let inner = st.lock();
                    let missing: Vec<u32> = (0..st.world())
                        .filter(|r| !inner.workers.contains_key(r))
                        .collect();
                    Status::deadline_exceeded(format!(
                        "{what}: ranks {missing:?} did not register within {:?}",
                        cfg.wait_timeout
                    ))
                } else {
                    e
                }
            })?;
        Ok(Response::new(RegisterReply {
            rank,
            world: st.world(),
            nproc: cfg.nproc as u32,
            nnodes: cfg.nnodes as u32,
            sp: st.layout.sp as u32,
            dp: st.layout.dp() as u32,
            ring_addrs,
            heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u64,
        }))
    }

    async fn barrier(
        &self,
        request: Request<BarrierRequest>,
    ) -> Result<Response<BarrierReply>, Status> {
        let st = &self.state;
        let BarrierRequest { name, rank } = request.into_inner();
        let round = {
            let mut inner = st.lock();
            st.check_rank(&inner, rank, "Barrier")?;
            let world = st.layout.world;
            let (arrived, rounds) = inner.barriers.entry(name.clone()).or_default();
            let round = *rounds;
            arrived.insert(rank);
            if arrived.len() == world {
                arrived.clear();
                *rounds += 1;
            }
            round
        };
        st.changed.notify_waiters();
        let what = format!("Barrier {name:?} (rank {rank})");
        st.wait_for(&what, st.config.wait_timeout, |inner| {
            let rounds = inner.barriers.get(&name).map_or(0, |b| b.1);
            (rounds > round).then_some(Ok(()))
        })
        .await?;
        Ok(Response::new(BarrierReply {}))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let HeartbeatRequest { rank, finished } = request.into_inner();
        let mut inner = self.state.lock();
        match inner.workers.get_mut(&rank) {
            Some(w) => {
                w.last_seen = Instant::now();
                w.finished |= finished;
            }
            None => {
                return Err(Status::not_found(format!(
                    "Heartbeat: rank {rank} is not registered"
                )))
            }
        }
        Ok(Response::new(HeartbeatReply {
            stop: inner.stop.is_some(),
            stop_reason: inner.stop.clone().unwrap_or_default(),
            last_committed_step: inner.committed.last().map_or(-1, |&s| s as i64),
        }))
    }

    async fn report_metrics(
        &self,
        request: Request<MetricsRequest>,
    ) -> Result<Response<MetricsReply>, Status> {
        let st = &self.state;
        let m = request.into_inner();
        let mut inner = st.lock();
        st.check_rank(&inner, m.rank, "ReportMetrics")?;
        if !m.loss.is_finite() {
            eprintln!(
                "coordinator: rank {} reported a non-finite loss {} at step {}",
                m.rank, m.loss, m.step
            );
        }
        let step = inner.metrics.entry(m.step).or_default();
        step.insert(m.rank, (m.loss, m.tokens));
        let mut line = String::new();
        if step.len() == st.layout.world {
            line = metrics_line(m.step, step);
            inner.metrics.remove(&m.step);
            eprintln!("{line}");
            inner.metric_lines.push(line.clone());
        }
        Ok(Response::new(MetricsReply { line }))
    }

    async fn shard_durable(
        &self,
        request: Request<ShardDurableRequest>,
    ) -> Result<Response<ShardDurableReply>, Status> {
        let st = &self.state;
        let ShardDurableRequest {
            rank,
            step,
            files,
            wait,
        } = request.into_inner();
        let mut committed = false;
        {
            let mut inner = st.lock();
            st.check_rank(&inner, rank, "ShardDurable")?;
            if inner.committed.contains(&step) {
                return Err(Status::failed_precondition(format!(
                    "ShardDurable: rank {rank} reported step {step}, which is already committed"
                )));
            }
            let shards = inner.shards.entry(step).or_default();
            shards.insert(rank, files);
            if shards.len() == st.layout.world {
                let shards = inner.shards.remove(&step).unwrap_or_default();
                match write_manifest(&st.config, &inner, step, &shards) {
                    Ok(()) => {
                        inner.committed.insert(step);
                        committed = true;
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        inner.commit_errors.insert(step, msg.clone());
                        st.changed.notify_waiters();
                        return Err(Status::internal(format!(
                            "ShardDurable: step {step}: {msg}"
                        )));
                    }
                }
            }
        }
        st.changed.notify_waiters();
        if wait && !committed {
            let what = format!("ShardDurable step {step} (rank {rank})");
            st.wait_for(&what, st.config.wait_timeout, |inner| {
                if inner.committed.contains(&step) {
                    Some(Ok(()))
                } else {
                    inner
                        .commit_errors
                        .get(&step)
                        .map(|e| Err(Status::internal(format!("ShardDurable: step {step}: {e}"))))
                }
            })
            .await?;
            committed = true;
        }
        Ok(Response::new(ShardDurableReply { committed }))
    }

    async fn publish_blob(
        &self,
        request: Request<PublishBlobRequest>,
    ) -> Result<Response<PublishBlobReply>, Status> {
        let PublishBlobRequest { key, value } = request.into_inner();
        {
            let mut inner = self.state.lock();
            if let Some(existing) = inner.blobs.get(&key) {
                if *existing != value {
                    return Err(Status::already_exists(format!(
                        "PublishBlob: key {key:?} was already published with another value"
                    )));
                }
            }
            inner.blobs.insert(key, value);
        }
        self.state.changed.notify_waiters();
        Ok(Response::new(PublishBlobReply {}))
    }

    async fn fetch_blob(
        &self,
        request: Request<FetchBlobRequest>,
    ) -> Result<Response<FetchBlobReply>, Status> {
        let FetchBlobRequest { key, timeout_ms } = request.into_inner();
        let timeout = Duration::from_millis(timeout_ms).min(self.state.config.wait_timeout);
        let value = self
            .state
            .wait_for(&format!("FetchBlob {key:?}"), timeout, |inner| {
                inner.blobs.get(&key).map(|v| Ok(v.clone()))
            })
            .await?;
        Ok(Response::new(FetchBlobReply { value }))
    }
}

/// One line for a step: token-weighted mean loss (plain mean when no tokens were counted),
/// the spread over ranks, and the total tokens.
fn metrics_line(step: u64, per_rank: &BTreeMap<u32, (f64, u64)>) -> String {
    let tokens: u64 = per_rank.values().map(|&(_, t)| t).sum();
    let mean = if tokens > 0 {
        per_rank.values().map(|&(l, t)| l * t as f64).sum::<f64>() / tokens as f64
    } else {
        per_rank.values().map(|&(l, _)| l).sum::<f64>() / per_rank.len() as f64
    };
    let by_loss = |a: &(&u32, &(f64, u64)), b: &(&u32, &(f64, u64))| a.1 .0.total_cmp(&b.1 .0);
    let (min_rank, min) = per_rank
        .iter()
        .min_by(by_loss)
        .map_or((0, 0.0), |(r, v)| (*r, v.0));
    let (max_rank, max) = per_rank
        .iter()
        .max_by(by_loss)
        .map_or((0, 0.0), |(r, v)| (*r, v.0));
    format!(
        "step {step} | loss {mean:.4} (min {min:.4} rank {min_rank}, max {max:.4} rank {max_rank}) | tokens {tokens} | ranks {}",
        per_rank.len()
    )
}

/// The manifest's path for `step` under the run's output directory (the trainer's step dir).
pub fn manifest_path(output_dir: &Path, step: u64) -> PathBuf {
    crate::train::checkpoint::step_dir(output_dir, step as usize).join(MANIFEST)
}

/// The file whose presence commits a distributed checkpoint's step directory.
pub const MANIFEST: &str = "MANIFEST.json";

/// Writes the manifest atomically: a temporary file, fsync, rename, fsync of the directory.
fn write_manifest(
    config: &CoordinatorConfig,
    inner: &Inner,
    step: u64,
    shards: &BTreeMap<u32, Vec<String>>,
) -> Result<()> {
    use std::io::Write;
    let path = manifest_path(&config.output_dir, step);
    let dir = path.parent().expect("manifest path has a parent");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let first = inner.workers.values().next().map(|w| &w.info);
    let field = |f: fn(&WorkerInfo) -> &str| first.map_or("", f).to_string();
    let manifest = serde_json::json!({
        "step": step,
        "world": config.world(),
        "nnodes": config.nnodes,
        "nproc": config.nproc,
        "sp": config.sp,
        "config_hash": field(|w| &w.config_hash),
        "binary_version": field(|w| &w.binary_version),
        "dataset_fingerprint": field(|w| &w.dataset_fingerprint),
        "committed_at": chrono::Utc::now().to_rfc3339(),
        "shards": shards.iter().map(|(rank, files)| serde_json::json!({
            "rank": rank,
            "host": inner.workers.get(rank).map_or("", |w| w.info.host.as_str()),
            "files": files,
        })).collect::<Vec<_>>(),
    });
    let tmp = dir.join("MANIFEST.json.tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(serde_json::to_string_pretty(&manifest)?.as_bytes())
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))?;
    Ok(())
}

/// Declares a registered worker dead when it has been silent for `heartbeat_timeout`, and
/// stops the job (every worker learns it from its next heartbeat reply; waiting calls abort).
async fn monitor_heartbeats(state: Arc<State>) {
    let tick = (state.config.heartbeat_timeout / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(tick).await;
        let stopped = {
            let mut inner = state.lock();
            if !inner.complete || inner.stop.is_some() {
                continue;
            }
            let dead = inner
                .workers
                .iter()
                .find(|(_, w)| {
                    !w.finished && w.last_seen.elapsed() > state.config.heartbeat_timeout
                })
                .map(|(rank, w)| (*rank, describe(&w.info), w.last_seen.elapsed()));
            match dead {
                Some((rank, who, silent)) => {
                    let reason = format!(
                        "rank {rank} ({who}) sent no heartbeat for {:.1} s (heartbeat_timeout_s = {})",
                        silent.as_secs_f64(),
                        state.config.heartbeat_timeout.as_secs_f64()
                    );
                    eprintln!("coordinator: stopping the job: {reason}");
                    inner.stop = Some(reason);
                    true
                }
                None => false,
            }
        };
        if stopped {
            state.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_line_weights_loss_by_tokens() {
        let mut m = BTreeMap::new();
        m.insert(0, (2.0, 300));
        m.insert(1, (1.0, 100));
        let line = metrics_line(7, &m);
        // (2*300 + 1*100) / 400 = 1.75
        assert_eq!(
            line,
            "step 7 | loss 1.7500 (min 1.0000 rank 1, max 2.0000 rank 0) | tokens 400 | ranks 2"
        );
    }
}
