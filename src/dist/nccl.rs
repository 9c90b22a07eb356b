//! `NcclComm`: the GPU collectives backend over cudarc's NCCL binding (feature `cuda`).
//!
//! NCCL's `Comm` is not `Send`: an `NcclComm` lives on the thread that made it. Ids travel
//! out of band through an [`IdExchange`] (the coordinator's blob store): the leader makes
//! `Id::new()`, ships its 128 bytes, the members rebuild it with `Id::uninit`.
//!
//! Streams: NCCL runs on its own CUDA stream (one per process, shared by the world communicator
//! and every split of it, so that all collectives run in issue order, the same on every rank),
//! not on candle's compute stream. Ordering is by events only, on the device:
//! - before every collective the communication stream waits on an event recorded on the
//!   compute stream (the inputs are written, the output buffers allocated);
//! - collectives whose results the compute stream uses next (all_reduce, all_gather,
//!   all_to_all, broadcast) make the compute stream wait on an event recorded on the
//!   communication stream behind them; the host does not wait;
//! - ZeRO-2's bucket reductions ([`Collectives::reduce_sum_pieces`]) are not waited for: they
//!   overlap the rest of the backward until [`Collectives::join`].
//!
//! cudarc's automatic per-allocation event tracking is turned off for the device's context
//! when the first communicator is made: it would make every compute kernel that writes the
//! flat gradient buffer wait for a bucket reduction still reading another part of it (the
//! tracking is per allocation, not per range), i.e. no overlap, and it records events on every
//! kernel launch. The rules that replace it: (1) a buffer a queued collective reads or writes
//! is not freed (freeing is ordered on the compute stream) before that collective completes:
//! either the compute stream waits on the collective right after it is queued, or the
//! communicator holds the tensor until the join; (2) buffers are allocated on the compute
//! stream before the event the communication stream waits on; (3) no kernel writes the part of
//! a buffer a queued collective reads (the backward never writes a bucket again once reported
//! final) and nothing reads a reduction's output before the join.
//!
//! Timeouts (the watchdog): [`Collectives::join`] and the host-valued sums
//! ([`Collectives::sum_to_host`]) poll an event recorded on the communication stream; when it
//! has not completed within the timeout the call fails and the communicator is marked broken
//! (dropping it aborts the NCCL comm). A collective that hangs while the compute stream waits
//! on it is caught at the next such wait (every step starts with one: the sum of its counts).

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};
use cudarc::nccl::safe::{group_end, group_start, Comm, Id, ReduceOp};

use super::collectives::{chunk_len, Collectives, IdExchange, Piece};

/// One NCCL communicator (the world or a sub-group). See the module docs.
pub struct NcclComm {
    comm: Comm,
    device: CudaDevice,
    /// The communication stream, shared with the communicators split from this one.
    stream: Arc<CudaStream>,
    /// Recorded on the compute stream before a collective; the communication stream waits on it.
    compute_done: CudaEvent,
    /// Recorded on the communication stream behind a collective (compute waits, join polls).
    comm_done: CudaEvent,
    /// Tensors that queued, not yet joined collectives read or write: dropped at the join.
    in_flight: RefCell<Vec<Tensor>>,
    exchange: Rc<dyn IdExchange>,
    timeout: Duration,
    /// The exchange key prefix of this communicator; children extend it.
    key: String,
    splits: Cell<u64>,
    /// Set when a collective timed out or failed: the comm's state is unknown afterwards.
    broken: Cell<bool>,
}

/// A range of device memory as NCCL's typed buffer arguments take it: a raw address into a
/// tensor's storage (which the caller keeps alive), no cudarc event bookkeeping.
struct DevBuf<T> {
    ptr: CUdeviceptr,
    len: usize,
    stream: Arc<CudaStream>,
    _elem: PhantomData<T>,
}

impl<T> DevBuf<T> {
    fn new(ptr: CUdeviceptr, len: usize, stream: &Arc<CudaStream>) -> Self {
        Self {
            ptr,
            len,
            stream: stream.clone(),
            _elem: PhantomData,
        }
    }
}

impl<T> DeviceSlice<T> for DevBuf<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T> DevicePtr<T> for DevBuf<T> {
    fn device_ptr<'a>(&'a self, _stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

impl<T> DevicePtrMut<T> for DevBuf<T> {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (CUdeviceptr, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Record(None))
    }
}

/// The device address of a contiguous CUDA tensor's first element and its size in bytes. The
/// address stays valid while the tensor (its storage) is alive.
fn raw_parts(t: &Tensor, op: &str) -> Result<(CUdeviceptr, usize)> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        bail!("NCCL {op}: the tensor's storage is not CUDA");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .with_context(|| format!("NCCL {op}: the tensor is not contiguous"))?;
    fn addr<T: candle_core::cuda_backend::CudaDType>(
        cs: &CudaStorage,
        range: std::ops::Range<usize>,
    ) -> Result<CUdeviceptr> {
        let slice = cs.as_cuda_slice::<T>()?;
        let view = slice.slice(range);
        let stream = view.stream().clone();
        let (ptr, _no_tracking) = view.device_ptr(&stream);
        Ok(ptr)
    }
    let ptr = match t.dtype() {
        DType::F32 => addr::<f32>(cs, start..end)?,
        DType::BF16 => addr::<half::bf16>(cs, start..end)?,
        DType::F16 => addr::<half::f16>(cs, start..end)?,
        other => bail!("NCCL {op}: tensors of {other:?} are not supported"),
    };
    Ok((ptr, (end - start) * t.dtype().size_in_bytes()))
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
        Self::init(
            device,
            None,
            rank,
            world,
            exchange,
            key.to_string(),
            timeout,
        )
    }

    /// `stream`: the parent's communication stream (a split), or `None` to make one.
    fn init(
        device: &CudaDevice,
        stream: Option<Arc<CudaStream>>,
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
        let stream = match stream {
            Some(s) => s,
            None => {
                let ctx = device.cuda_stream().context().clone();
                // SAFETY: the module docs' rules order the two streams by explicit events.
                unsafe { ctx.disable_event_tracking() };
                ctx.new_stream()
                    .map_err(|e| anyhow!("NCCL: cannot make a communication stream: {e:?}"))?
            }
        };
        let comm = Comm::from_rank(stream.clone(), rank, world, id).map_err(|e| {
            anyhow!("NCCL: rank {rank} of {world} could not join communicator {key:?}: {e:?}")
        })?;
        let ctx = stream.context().clone();
        let event = || {
            ctx.new_event(None)
                .map_err(|e| anyhow!("NCCL: cannot make an event: {e:?}"))
        };
        Ok(Self {
            comm,
            device: device.clone(),
            compute_done: event()?,
            comm_done: event()?,
            stream,
            in_flight: RefCell::new(vec![]),
            exchange,
            timeout,
            key,
            splits: Cell::new(0),
            broken: Cell::new(false),
        })
    }

    fn check_usable(&self, op: &str) -> Result<()> {
        ensure!(
            !self.broken.get(),
            "NCCL {op}: the communicator failed earlier and cannot be used"
        );
        Ok(())
    }

    /// A flat contiguous f32 CUDA input (a copy only when `t` is a strided view).
    fn input(&self, t: &Tensor, op: &str) -> Result<Tensor> {
        self.check_usable(op)?;
        ensure!(
            t.dtype() == DType::F32,
            "NCCL {op}: collectives take f32 tensors, got {:?}",
            t.dtype()
        );
        ensure!(
            matches!(t.device(), Device::Cuda(_)),
            "NCCL {op}: the tensor is not on a CUDA device"
        );
        Ok(t.flatten_all()?.contiguous()?)
    }

    /// The communication stream waits for the compute stream's work so far.
    fn comm_after_compute(&self, op: &str) -> Result<()> {
        self.compute_done
            .record(&self.device.cuda_stream())
            .and_then(|_| self.stream.wait(&self.compute_done))
            .map_err(|e| anyhow!("NCCL {op}: cannot order the streams: {e:?}"))
    }

    /// The compute stream waits (on the device) for the communication stream's work so far.
    fn compute_after_comm(&self, op: &str) -> Result<()> {
        self.comm_done
            .record(&self.stream)
            .and_then(|_| self.device.cuda_stream().wait(&self.comm_done))
            .map_err(|e| anyhow!("NCCL {op}: cannot order the streams: {e:?}"))
    }

    /// Queues `f` on the communication stream with the input's device buffer and a fresh
    /// output of `out_len` f32, then makes the compute stream wait for it (no host wait).
    fn run(
        &self,
        op: &str,
        t: &Tensor,
        out_len: usize,
        f: impl FnOnce(&Comm, &DevBuf<f32>, &mut DevBuf<f32>) -> Result<()>,
    ) -> Result<Tensor> {
        let flat = self.input(t, op)?;
        let (src, bytes) = raw_parts(&flat, op)?;
        // Allocated on the compute stream before the event the communication stream waits on.
        // SAFETY: every element of `out` is written by the collective before it is read.
        let out = unsafe { self.device.alloc::<f32>(out_len)? };
        let dst = {
            let (ptr, _no_tracking) = out.device_ptr(&self.stream);
            ptr
        };
        self.comm_after_compute(op)?;
        let input = DevBuf::new(src, bytes / 4, &self.stream);
        let mut output = DevBuf::new(dst, out_len, &self.stream);
        f(&self.comm, &input, &mut output).inspect_err(|_| self.broken.set(true))?;
        // `flat` and the caller's input may be freed (on the compute stream) only after this.
        self.compute_after_comm(op)?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, self.device.clone()));
        Ok(Tensor::from_storage(
            storage,
            out_len,
            BackpropOp::none(),
            false,
        ))
    }

    /// Waits on the host, at most the timeout, for the communication stream's work so far.
    fn wait(&self, op: &str) -> Result<()> {
        self.check_usable(op)?;
        self.comm_done
            .record(&self.stream)
            .map_err(|e| anyhow!("NCCL {op}: cannot record an event: {e:?}"))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.comm_done.try_is_complete() {
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

    /// Runs `queue` between `ncclGroupStart` and `ncclGroupEnd` (the group is closed even when
    /// queuing fails); a failure marks the communicator broken.
    fn group(&self, op: &str, queue: impl FnOnce() -> Result<()>) -> Result<()> {
        group_start().map_err(nccl_err(op))?;
        let queued = queue();
        let ended = group_end().map(|_| ()).map_err(nccl_err(op));
        queued.and(ended).inspect_err(|_| self.broken.set(true))
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
        let stream = self.stream.clone();
        self.run("all_to_all", t, n * w, |c, input, out| {
            self.group("all_to_all", || {
                for peer in 0..w {
                    let at = (peer * n * 4) as CUdeviceptr;
                    c.send(&DevBuf::<f32>::new(input.ptr + at, n, &stream), peer as i32)
                        .map_err(nccl_err("all_to_all send"))?;
                    c.recv(
                        &mut DevBuf::<f32>::new(out.ptr + at, n, &stream),
                        peer as i32,
                    )
                    .map_err(nccl_err("all_to_all recv"))?;
                }
                Ok(())
            })
        })
    }

    fn barrier(&self) -> Result<()> {
        let token = Tensor::zeros(1, DType::F32, &Device::Cuda(self.device.clone()))?;
        self.all_reduce_sum(&token)?;
        self.wait("barrier")
    }

    /// One `ncclReduce` per piece (root = the piece's owner) in one group, reading the bucket
    /// and writing the owner's shard gradient in place; not waited for until [`Self::join`].
    fn reduce_sum_pieces(&self, bucket: &Tensor, pieces: &[Piece], shard: &Tensor) -> Result<()> {
        const OP: &str = "reduce_sum_pieces";
        let bucket = self.input(bucket, OP)?; // [b]
        ensure!(
            shard.dtype() == DType::F32 && shard.is_contiguous(),
            "NCCL {OP}: the shard gradient must be contiguous f32, got {:?}",
            shard.dtype()
        );
        let (b, s) = (bucket.elem_count(), shard.elem_count());
        let rank = self.rank();
        for p in pieces {
            ensure!(
                p.owner < self.world()
                    && p.range.end <= b
                    && (p.owner != rank || p.shard_offset + p.range.len() <= s),
                "NCCL {OP}: piece {p:?} does not fit a bucket of {b} and shards of {s}"
            );
        }
        let (src, _) = raw_parts(&bucket, OP)?;
        let (dst, _) = raw_parts(shard, OP)?;
        self.comm_after_compute(OP)?;
        self.group(OP, || {
            for p in pieces {
                let len = p.range.len();
                let send =
                    DevBuf::<f32>::new(src + (p.range.start * 4) as CUdeviceptr, len, &self.stream);
                let mut recv = (p.owner == rank).then(|| {
                    DevBuf::<f32>::new(dst + (p.shard_offset * 4) as CUdeviceptr, len, &self.stream)
                });
                self.comm
                    .reduce(&send, recv.as_mut(), &ReduceOp::Sum, p.owner as i32)
                    .map_err(nccl_err(OP))?;
            }
            Ok(())
        })?;
        // Rule (1) of the module docs: both stay allocated until the join.
        self.in_flight.borrow_mut().extend([bucket, shard.clone()]);
        Ok(())
    }

    /// Gathers the parts' bytes (any dtype: a bf16 replica moves half the bytes of f32)
    /// straight into `out`; the compute stream waits for it on the device.
    fn all_gather_into(&self, part: &Tensor, out: &Tensor) -> Result<()> {
        const OP: &str = "all_gather_into";
        self.check_usable(OP)?;
        ensure!(
            part.dtype() == out.dtype()
                && out.elem_count() == part.elem_count() * self.world()
                && out.is_contiguous(),
            "NCCL {OP}: {:?} {:?} parts of {} ranks do not fill a contiguous {:?} {:?}",
            part.dims(),
            part.dtype(),
            self.world(),
            out.dims(),
            out.dtype()
        );
        let part = part.flatten_all()?.contiguous()?;
        let (src, bytes) = raw_parts(&part, OP)?;
        let (dst, out_bytes) = raw_parts(out, OP)?;
        self.comm_after_compute(OP)?;
        self.comm
            .all_gather(
                &DevBuf::<u8>::new(src, bytes, &self.stream),
                &mut DevBuf::<u8>::new(dst, out_bytes, &self.stream),
            )
            .map_err(nccl_err(OP))
            .inspect_err(|_| self.broken.set(true))?;
        // `part` may be freed and `out` read (compute stream) only after this.
        self.compute_after_comm(OP)
    }

    fn join(&self, what: &str) -> Result<()> {
        self.wait(what)?;
        self.in_flight.borrow_mut().clear();
        Ok(())
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
        let gathered = self.all_gather(&halves)?;
        self.wait("split")?;
        let gathered = gathered.to_vec1::<f32>()?;
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
            Some(self.stream.clone()),
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
