//! The worker's side of the coordinator: a blocking client (it owns a small tokio runtime, so
//! the synchronous trainer can call it) that registers, beats in the background, and exposes
//! barriers, the stop flag, metrics, checkpoint commits and the blob exchange.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tonic::transport::Channel;

use super::collectives::{IdExchange, WorldLayout};
use super::proto::coordinator_client::CoordinatorClient;
use super::proto::*;
use super::tcp_ring::{RingListener, TcpRing};

pub use super::proto::WorkerInfo;

/// What the coordinator assigned to this worker.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub rank: usize,
    pub world: usize,
    pub nnodes: usize,
    pub nproc: usize,
    pub sp: usize,
    pub dp: usize,
    /// Rank r's TcpRing listen address at index r.
    pub ring_addrs: Vec<String>,
    pub heartbeat_interval: Duration,
}

/// A registered worker. Dropping it stops the heartbeats.
pub struct Worker {
    runtime: tokio::runtime::Runtime,
    client: CoordinatorClient<Channel>,
    assignment: Assignment,
    stop: Arc<Mutex<Option<String>>>,
    last_committed: Arc<AtomicI64>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

/// Turns a gRPC status into an error that keeps the coordinator's message.
fn status_error(call: &str, s: tonic::Status) -> anyhow::Error {
    anyhow!(
        "coordinator {call} failed ({:?}): {}",
        s.code(),
        s.message()
    )
}

/// This machine's host name (for WorkerInfo.host and error messages).
pub fn local_hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl Worker {
    /// Connects to the coordinator at `addr` (host:port; retried until `connect_timeout`, as
    /// the coordinator may start after the workers), registers, and starts heartbeats.
    /// Blocks until every worker registered.
    pub fn register(addr: &str, info: WorkerInfo, connect_timeout: Duration) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let url = format!("http://{addr}");
        let endpoint = tonic::transport::Endpoint::from_shared(url.clone())
            .with_context(|| format!("coordinator address {addr:?} is not host:port"))?;
        let deadline = Instant::now() + connect_timeout;
        let channel = runtime.block_on(async {
            loop {
                match endpoint.connect().await {
                    Ok(c) => return Ok(c),
                    Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => {
                        return Err(anyhow!(
                            "cannot reach the coordinator at {url} within {connect_timeout:?}: {e}"
                        ))
                    }
                }
            }
        })?;
        let mut client = CoordinatorClient::new(channel);
        let reply = runtime
            .block_on(client.register(RegisterRequest { info: Some(info) }))
            .map_err(|s| status_error("Register", s))?
            .into_inner();
        let assignment = Assignment {
            rank: reply.rank as usize,
            world: reply.world as usize,
            nnodes: reply.nnodes as usize,
            nproc: reply.nproc as usize,
            sp: reply.sp as usize,
            dp: reply.dp as usize,
            ring_addrs: reply.ring_addrs,
            heartbeat_interval: Duration::from_millis(reply.heartbeat_interval_ms.max(1)),
        };
        let mut worker = Self {
            runtime,
            client,
            assignment,
            stop: Arc::new(Mutex::new(None)),
            last_committed: Arc::new(AtomicI64::new(-1)),
            heartbeat: None,
        };
        worker.heartbeat = Some(worker.spawn_heartbeats());
        Ok(worker)
    }

    fn spawn_heartbeats(&self) -> tokio::task::JoinHandle<()> {
        let mut client = self.client.clone();
        let rank = self.assignment.rank as u32;
        let interval = self.assignment.heartbeat_interval;
        let stop = self.stop.clone();
        let last_committed = self.last_committed.clone();
        // A coordinator that stays unreachable this long stops the worker too.
        let give_up_after = interval * 10;
        self.runtime.spawn(async move {
            let mut last_ok = Instant::now();
            loop {
                tokio::time::sleep(interval).await;
                let beat = HeartbeatRequest {
                    rank,
                    finished: false,
                };
                match client.heartbeat(beat).await {
                    Ok(reply) => {
                        last_ok = Instant::now();
                        let reply = reply.into_inner();
                        last_committed.store(reply.last_committed_step, Ordering::SeqCst);
                        if reply.stop {
                            set_stop(&stop, reply.stop_reason);
                            return;
                        }
                    }
                    Err(e) if last_ok.elapsed() > give_up_after => {
                        set_stop(
                            &stop,
                            format!(
                                "the coordinator did not answer heartbeats for {:.1} s: {}",
                                last_ok.elapsed().as_secs_f64(),
                                e.message()
                            ),
                        );
                        return;
                    }
                    Err(_) => {}
                }
            }
        })
    }

    pub fn assignment(&self) -> &Assignment {
        &self.assignment
    }

    pub fn rank(&self) -> usize {
        self.assignment.rank
    }

    pub fn world(&self) -> usize {
        self.assignment.world
    }

    pub fn layout(&self) -> Result<WorldLayout> {
        WorldLayout::new(self.assignment.world, self.assignment.sp)
    }

    /// Why the job must stop (a dead rank, an unreachable coordinator), once known. The
    /// trainer checks it every step.
    pub fn should_stop(&self) -> Option<String> {
        self.stop.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The newest committed checkpoint step the last heartbeat reported.
    pub fn last_committed_step(&self) -> Option<u64> {
        u64::try_from(self.last_committed.load(Ordering::SeqCst)).ok()
    }

    /// Stops sending heartbeats (the coordinator will declare this rank dead).
    pub fn stop_heartbeats(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }

    /// Tells the coordinator this rank finished cleanly (its silence from now on is not a
    /// failure) and stops the heartbeats. Call it last, right before a successful exit.
    pub fn finish(&mut self) -> Result<()> {
        self.stop_heartbeats();
        let mut c = self.client.clone();
        self.runtime
            .block_on(c.heartbeat(HeartbeatRequest {
                rank: self.assignment.rank as u32,
                finished: true,
            }))
            .map_err(|s| status_error("Heartbeat (finished)", s))?;
        Ok(())
    }

    pub fn barrier(&self, name: &str) -> Result<()> {
        let mut c = self.client.clone();
        self.runtime
            .block_on(c.barrier(BarrierRequest {
                name: name.to_string(),
                rank: self.assignment.rank as u32,
            }))
            .map_err(|s| status_error("Barrier", s))?;
        Ok(())
    }

    /// Reports this rank's loss and token count for `step`; returns the aggregated line when
    /// this report completed the step.
    pub fn report_metrics(&self, step: u64, loss: f64, tokens: u64) -> Result<Option<String>> {
        let mut c = self.client.clone();
        let line = self
            .runtime
            .block_on(c.report_metrics(MetricsRequest {
                rank: self.assignment.rank as u32,
                step,
                loss,
                tokens,
            }))
            .map_err(|s| status_error("ReportMetrics", s))?
            .into_inner()
            .line;
        Ok((!line.is_empty()).then_some(line))
    }

    /// Tells the coordinator this rank's shard of `step` is durable (written and fsynced);
    /// `files` are relative to `checkpoints/step-N/`. With `wait`, blocks until every rank
    /// reported and the manifest is written. Returns whether the step is committed.
    pub fn shard_durable(&self, step: u64, files: Vec<String>, wait: bool) -> Result<bool> {
        let mut c = self.client.clone();
        Ok(self
            .runtime
            .block_on(c.shard_durable(ShardDurableRequest {
                rank: self.assignment.rank as u32,
                step,
                files,
                wait,
            }))
            .map_err(|s| status_error("ShardDurable", s))?
            .into_inner()
            .committed)
    }

    pub fn publish_blob(&self, key: &str, value: Vec<u8>) -> Result<()> {
        self.blobs().publish(key, value)
    }

    pub fn fetch_blob(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.blobs().fetch(key, timeout)
    }

    /// The coordinator's blob store as an owned handle (the [`IdExchange`] NCCL communicators
    /// keep for their sub-group ids); valid while this worker lives.
    pub fn blobs(&self) -> BlobStore {
        BlobStore {
            runtime: self.runtime.handle().clone(),
            client: self.client.clone(),
        }
    }

    /// The leader makes a communicator id (e.g. NCCL's 128-byte unique id) and publishes it
    /// under `key`; the other members fetch it. Every member returns the same bytes.
    pub fn share_id(
        &self,
        key: &str,
        leader: bool,
        make: impl FnOnce() -> Result<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        self.blobs().share_id(key, leader, make, timeout)
    }

    /// Joins the world TcpRing at the addresses the coordinator published. `listener` must be
    /// the one whose address this worker registered.
    pub fn tcp_ring(&self, listener: Arc<RingListener>, timeout: Duration) -> Result<TcpRing> {
        if self.assignment.ring_addrs.iter().any(|a| a.is_empty()) {
            bail!("tcp_ring: some workers registered no ring address (an NCCL job?)");
        }
        TcpRing::connect(listener, self.rank(), &self.assignment.ring_addrs, timeout)
    }
}

/// The coordinator's key -> bytes store (communicator ids), reached through the worker's runtime.
#[derive(Clone)]
pub struct BlobStore {
    runtime: tokio::runtime::Handle,
    client: CoordinatorClient<Channel>,
}

impl BlobStore {
    pub fn publish(&self, key: &str, value: Vec<u8>) -> Result<()> {
        let mut c = self.client.clone();
        self.runtime
            .block_on(c.publish_blob(PublishBlobRequest {
                key: key.to_string(),
                value,
            }))
            .map_err(|s| status_error("PublishBlob", s))?;
        Ok(())
    }

    pub fn fetch(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let mut c = self.client.clone();
        Ok(self
            .runtime
            .block_on(c.fetch_blob(FetchBlobRequest {
                key: key.to_string(),
                timeout_ms: timeout.as_millis() as u64,
            }))
            .map_err(|s| status_error("FetchBlob", s))?
            .into_inner()
            .value)
    }

    fn share_id(
        &self,
        key: &str,
        leader: bool,
        make: impl FnOnce() -> Result<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Vec<u8>> {
        if leader {
            let id = make()?;
            self.publish(key, id.clone())?;
            Ok(id)
        } else {
            self.fetch(key, timeout)
        }
    }
}

impl IdExchange for BlobStore {
    fn share(
        &self,
        key: &str,
        leader: bool,
        make: &mut dyn FnMut() -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        // Members wait as long as a registration may take: the leader may still be starting.
        self.share_id(key, leader, make, Duration::from_secs(600))
    }
}

impl IdExchange for Worker {
    fn share(
        &self,
        key: &str,
        leader: bool,
        make: &mut dyn FnMut() -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        self.blobs().share(key, leader, make)
    }
}

fn set_stop(stop: &Mutex<Option<String>>, reason: String) {
    let mut s = stop.lock().unwrap_or_else(|p| p.into_inner());
    s.get_or_insert(reason);
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop_heartbeats();
    }
}
