//! `NcclComm`: the GPU collectives backend over cudarc's NCCL binding (feature `cuda`).
//!
//! NCCL's `Comm` is not `Send`: an `NcclComm` lives on the thread that made it. Ids travel
//! out of band through an [`IdExchange`] (the coordinator's blob store): the leader makes
//! `Id::new()`, ships its 128 bytes, the members rebuild it with `Id::uninit`.
//!
//! Timeouts: NCCL work is asynchronous on the device's stream. After enqueuing a collective,
//! the host polls an event recorded behind it; when it has not completed within the timeout,
//! the call fails and the communicator is marked broken (dropping it aborts the NCCL comm).
//! This makes each collective synchronous with the host, which the ZeRO-2 step (a few large
//! collectives per step) tolerates.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use cudarc::driver::CudaSlice;
use cudarc::nccl::safe::{group_end, group_start, Comm, Id, ReduceOp};

use super::collectives::{chunk_len, Collectives, IdExchange};

/// One NCCL communicator (the world or a sub-group). See the module docs.
pub struct NcclComm {
    comm: Comm,
    device: CudaDevice,
    exchange: Rc<dyn IdExchange>,
    timeout: Duration,
    /// The exchange key prefix of this communicator; children extend it.
    key: String,
    splits: Cell<u64>,
    /// Set when a collective timed out or failed: the comm's state is unknown afterwards.
    broken: Cell<bool>,
}

fn id_to_bytes(id: &Id) -> Vec<u8> {
    id.internal().iter().map(|&c| c as u8).collect()
}

fn id_from_bytes(bytes: &[u8]) -> Result<Id> {
    ensure!(
        bytes.len() == 128,
        "an NCCL unique id has 128 bytes, got {}",
        bytes.len()
    );
    let mut internal = [0 as std::ffi::c_char; 128];
    for (dst, &src) in internal.iter_mut().zip(bytes) {
        *dst = src as std::ffi::c_char;
    }
    Ok(Id::uninit(internal))
}

impl NcclComm {
    /// Joins the world communicator: rank 0 makes the id and shares it under `key` (unique per
    /// attempt of the job: a restarted job must not fetch the previous attempt's id).
    pub fn init_world(
        device: &CudaDevice,
        rank: usize,
        world: usize,
        exchange: Rc<dyn IdExchange>,
        key: &str,
        timeout: Duration,
    ) -> Result<Self> {
        Self::init(device, rank, world, exchange, key.to_string(), timeout)
    }

    fn init(
        device: &CudaDevice,
        rank: usize,
        world: usize,
        exchange: Rc<dyn IdExchange>,
        key: String,
        timeout: Duration,
    ) -> Result<Self> {
        let bytes = exchange.share(&key, rank == 0, &mut || {
            Ok(id_to_bytes(&Id::new().map_err(|e| {
                anyhow!("NCCL: cannot make a unique id: {e:?}")
            })?))
        })?;
        let id = id_from_bytes(&bytes).with_context(|| format!("NCCL id under {key:?}"))?;
        let comm = Comm::from_rank(device.cuda_stream(), rank, world, id).map_err(|e| {
            anyhow!("NCCL: rank {rank} of {world} could not join communicator {key:?}: {e:?}")
        })?;
        Ok(Self {
            comm,
            device: device.clone(),
            exchange,
            timeout,
            key,
            splits: Cell::new(0),
            broken: Cell::new(false),
        })
    }

    /// The f32 device slice and element range of a tensor, made contiguous first.
    fn input(&self, t: &Tensor, op: &str) -> Result<(Tensor, usize)> {
        ensure!(
            !self.broken.get(),
            "NCCL {op}: the communicator failed earlier and cannot be used"
        );
        ensure!(
            t.dtype() == DType::F32,
            "NCCL {op}: collectives take f32 tensors, got {:?}",
            t.dtype()
        );
        ensure!(
            matches!(t.device(), Device::Cuda(_)),
            "NCCL {op}: the tensor is not on a CUDA device"
        );
        let flat = t.flatten_all()?.contiguous()?;
        let n = flat.elem_count();
        Ok((flat, n))
    }

    /// Runs `f` with the input's device view and a fresh output buffer of `out_len`, then
    /// waits (with the timeout) for the enqueued work and wraps the output as a tensor.
    fn run(
        &self,
        op: &str,
        t: &Tensor,
        out_len: usize,
        f: impl FnOnce(&Comm, &cudarc::driver::CudaView<'_, f32>, &mut CudaSlice<f32>) -> Result<()>,
    ) -> Result<Tensor> {
        let (flat, _) = self.input(t, op)?;
        // SAFETY: every element of `out` is written by the collective before it is read.
        let mut out = unsafe { self.device.alloc::<f32>(out_len)? };
        {
            let (storage, layout) = flat.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                bail!("NCCL {op}: the tensor's storage is not CUDA");
            };
            let (start, end) = layout
                .contiguous_offsets()
                .context("flattened tensor is contiguous")?;
            let slice = cs.as_cuda_slice::<f32>()?;
            let view = slice.slice(start..end);
            f(&self.comm, &view, &mut out).inspect_err(|_| self.broken.set(true))?;
        }
        self.wait(op)?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.device.clone()));
        Ok(Tensor::from_storage(
            storage,
            out_len,
            BackpropOp::none(),
            false,
        ))
    }

    /// Waits for the stream's work so far, failing after the timeout.
    fn wait(&self, op: &str) -> Result<()> {
        let stream = self.device.cuda_stream();
        let event = stream
            .record_event(None)
            .map_err(|e| anyhow!("NCCL {op}: cannot record an event: {e:?}"))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                Ok(false) => {
                    self.broken.set(true);
                    bail!(
                        "NCCL {op}: rank {} of {} timed out after {:?} (a peer did not join the collective)",
                        self.comm.rank(),
                        self.comm.world_size(),
                        self.timeout
                    );
                }
                Err(e) => {
                    self.broken.set(true);
                    bail!("NCCL {op}: CUDA error while waiting: {e:?}");
                }
            }
        }
    }
}

fn nccl_err(op: &str) -> impl Fn(cudarc::nccl::result::NcclError) -> anyhow::Error + '_ {
    move |e| anyhow!("NCCL {op} failed: {e:?}")
}

impl Collectives for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let n = t.elem_count();
        self.run("all_reduce_sum", t, n, |c, input, out| {
            c.all_reduce(input, out, &ReduceOp::Sum)
                .map_err(nccl_err("all_reduce_sum"))?;
            Ok(())
        })
    }

    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        // NCCL's count is the receive length (one shard).
        let n = chunk_len(t.elem_count(), self.world(), "NCCL reduce_scatter_sum")?;
        self.run("reduce_scatter_sum", t, n, |c, input, out| {
            c.reduce_scatter(input, out, &ReduceOp::Sum)
                .map_err(nccl_err("reduce_scatter_sum"))?;
            Ok(())
        })
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let n = t.elem_count() * self.world();
        self.run("all_gather", t, n, |c, input, out| {
            c.all_gather(input, out).map_err(nccl_err("all_gather"))?;
            Ok(())
        })
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        ensure!(
            root < self.world(),
            "NCCL broadcast: root {root} is outside a world of {}",
            self.world()
        );
        let is_root = self.rank() == root;
        self.run("broadcast", t, t.elem_count(), |c, input, out| {
            c.broadcast(is_root.then_some(input), out, root as i32)
                .map_err(nccl_err("broadcast"))?;
            Ok(())
        })
    }

    fn all_to_all(&self, t: &Tensor) -> Result<Tensor> {
        let w = self.world();
        let n = chunk_len(t.elem_count(), w, "NCCL all_to_all")?;
        self.run("all_to_all", t, n * w, |c, input, out| {
            group_start().map_err(nccl_err("all_to_all group_start"))?;
            let mut queued = Ok(());
            for peer in 0..w {
                queued = c
                    .send(&input.slice(peer * n..(peer + 1) * n), peer as i32)
                    .and_then(|_| {
                        c.recv(&mut out.slice_mut(peer * n..(peer + 1) * n), peer as i32)
                            .map(|_| ())
                    });
                if queued.is_err() {
                    break;
                }
            }
            // The group must be closed even when queuing failed.
            let ended = group_end();
            queued.map_err(nccl_err("all_to_all"))?;
            ended.map_err(nccl_err("all_to_all group_end"))?;
            Ok(())
        })
    }

    fn barrier(&self) -> Result<()> {
        let token = Tensor::zeros(1, DType::F32, &Device::Cuda(self.device.clone()))?;
        self.all_reduce_sum(&token).map(|_| ())
    }

    fn split(&self, color: u64) -> Result<Box<dyn Collectives>> {
        let w = self.world();
        let device = Device::Cuda(self.device.clone());
        // Colors travel as two exact f32 halves (16 bits each) through all_gather.
        ensure!(
            color < 1 << 32,
            "NCCL split: color {color} must be below 2^32"
        );
        let halves = Tensor::new(&[(color >> 16) as f32, (color & 0xffff) as f32], &device)?;
        let gathered = self.all_gather(&halves)?.to_vec1::<f32>()?;
        let colors: Vec<u64> = gathered
            .chunks_exact(2)
            .map(|h| ((h[0] as u64) << 16) | h[1] as u64)
            .collect();
        let members: Vec<usize> = (0..w).filter(|&q| colors[q] == color).collect();
        let group_rank = members
            .iter()
            .position(|&q| q == self.rank())
            .expect("this rank has its own color");
        let index = self.splits.get();
        self.splits.set(index + 1);
        let key = format!("{}/split{index}/color{color}", self.key);
        let child = Self::init(
            &self.device,
            group_rank,
            members.len(),
            self.exchange.clone(),
            key,
            self.timeout,
        )
        .with_context(|| format!("NCCL split: color {color}, members {members:?}"))?;
        Ok(Box::new(child))
    }
}
