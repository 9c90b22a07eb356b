//! An optimizer step overlapped with the next step's forward.
//!
//! The AdamW update needs the global gradient norm (clipping), so none of it can start before
//! the backward ends; but nothing reads the updated values before the next forward, and that
//! forward reads them stage by stage: the embedding, block 0, block 1, ..., the final norm and
//! the head. So the update is cut at the model's stage boundaries ([`StepModel::update_stages`]:
//! flat offsets, the trainables being laid out in forward order) and each segment is made to
//! finish just before its stage runs:
//! - on a GPU (the fused kernel), every segment is queued at once on the device's side stream,
//!   behind an event of the compute stream (gradients and norm done), each followed by an event;
//!   the forward makes the compute stream wait for a stage's event (on the device, no host wait)
//!   right before it reads that stage, so the update of block i+1 runs beside the forward of
//!   block i;
//! - elsewhere (CPU, kernels off), a segment runs, with candle ops on the calling thread, when
//!   the forward first waits for it: the same arithmetic in the same order, so the CPU tests check
//!   the stage bookkeeping of the GPU path (a stage read before its wait sees old values).
//!
//! Either way the values are bit-identical to the plain step's. The update also writes 0 over the
//! gradient as it consumes it, so the buffer serves as the next step's gradient buffer (no
//! reallocation, no zero-fill on the compute stream); the backward writes it only after the
//! forward has waited for every segment ([`crate::model::decoder::Grads::recycle`]).
//!
//! Anything else that reads the values (checkpoints, evaluation, export) first waits for the
//! whole update (`ZeroOptimizer::finish_update`); dropping an update waits for it too.
//!
//! [`StepModel::update_stages`]: crate::train::step::StepModel::update_stages

use anyhow::{bail, Result};
use candle_core::Tensor;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::model::decoder::PendingUpdate;
use crate::train::optim::{adamw_update, AdamWStep};

/// The tensors of one AdamW update, each `[N]` (clones: they share the optimizer's storage).
#[derive(Clone)]
pub struct UpdateBuffers {
    pub param: Tensor,
    /// Consumed: zeroed segment by segment as the update reads it.
    pub grad: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub decay_mask: Option<Tensor>,
    /// The values in the model's dtype (the replica), written with the update.
    pub copy: Option<Tensor>,
}

impl UpdateBuffers {
    fn narrow(&self, r: &Range<usize>) -> Result<UpdateBuffers> {
        let s = |t: &Tensor| t.narrow(0, r.start, r.len());
        Ok(UpdateBuffers {
            param: s(&self.param)?,
            grad: s(&self.grad)?,
            exp_avg: s(&self.exp_avg)?,
            exp_avg_sq: s(&self.exp_avg_sq)?,
            decay_mask: self.decay_mask.as_ref().map(s).transpose()?,
            copy: self.copy.as_ref().map(s).transpose()?,
        })
    }
}

/// An AdamW update running (or waiting to run) segment by segment; see the module docs.
pub struct OverlappedUpdate {
    /// Segment `k` is `ends[k-1]..ends[k]` (from 0), increasing, the last = N.
    ends: Vec<usize>,
    /// Segments the compute stream waits for (GPU) or that ran (elsewhere).
    done: Mutex<usize>,
    work: Work,
}

enum Work {
    /// Queued on the side stream; one event behind each segment. The buffers stay alive (and
    /// so unfreed) until the compute stream waits for all of it.
    #[cfg(feature = "cuda")]
    Queued {
        events: Vec<candle_core::cuda_backend::cudarc::driver::CudaEvent>,
        _buffers: UpdateBuffers,
    },
    /// Run on the calling thread when first waited for.
    Deferred {
        buffers: UpdateBuffers,
        h: AdamWStep,
    },
}

/// Thread blocks an overlapped AdamW segment may use (`FTRUN_UPDATE_BLOCKS`, 0 = as many as its
/// size asks): fewer leave more of the GPU to the forward running beside it.
fn max_update_blocks() -> Option<u32> {
    static BLOCKS: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *BLOCKS.get_or_init(|| {
        std::env::var("FTRUN_UPDATE_BLOCKS")
            .ok()
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|&b| b > 0)
    })
}

impl OverlappedUpdate {
    /// Starts the update `h` of `b` in segments ending at `ends` (increasing, the last = N;
    /// boundaries are rounded up to multiples of 8 values so that every GPU segment keeps the
    /// 16-byte alignment of the 8-wide kernel: a stage's wait then covers a few values of the
    /// next stage early, never a whole later segment).
    pub fn start(b: UpdateBuffers, h: AdamWStep, ends: &[usize]) -> Result<OverlappedUpdate> {
        let n = b.param.elem_count();
        let mut cut: Vec<usize> = ends
            .iter()
            .map(|&e| e.div_ceil(8) * 8)
            .map(|e| e.min(n))
            .collect();
        cut.push(n);
        cut.dedup();
        cut.retain(|&e| e > 0);
        if cut.windows(2).any(|w| w[1] < w[0]) {
            bail!("overlapped update: stage ends {ends:?} are not increasing");
        }
        let work = Self::queue(&b, &h, &cut)?.unwrap_or(Work::Deferred { buffers: b, h });
        Ok(OverlappedUpdate {
            ends: cut,
            done: Mutex::new(0),
            work,
        })
    }

    /// The GPU path: every segment queued on the side stream now (`None` where the fused kernel
    /// does not take the buffers).
    #[cfg(feature = "cuda")]
    fn queue(b: &UpdateBuffers, h: &AdamWStep, ends: &[usize]) -> Result<Option<Work>> {
        use crate::kernels::adamw::{adamw_update_queued, in_place_supported};
        use crate::kernels::cuda::{device_of, record_event, side_stream, stream};
        let whole = [&b.param, &b.grad, &b.exp_avg, &b.exp_avg_sq];
        if !in_place_supported(whole, b.decay_mask.as_ref(), b.copy.as_ref()) {
            return Ok(None);
        }
        let dev = device_of(&b.param)?;
        let side = side_stream(&dev)?;
        // The gradient and the norm's clipping coefficient are final on the compute stream.
        side.wait(&record_event(&stream(&dev))?)?;
        let mut events = Vec::with_capacity(ends.len());
        let mut lo = 0;
        for &hi in ends {
            let s = b.narrow(&(lo..hi))?;
            adamw_update_queued(
                &side,
                [&s.param, &s.grad, &s.exp_avg, &s.exp_avg_sq],
                s.decay_mask.as_ref(),
                h,
                s.copy.as_ref(),
                max_update_blocks(),
            )?;
            events.push(record_event(&side)?);
            lo = hi;
        }
        Ok(Some(Work::Queued {
            events,
            _buffers: b.clone(),
        }))
    }

    #[cfg(not(feature = "cuda"))]
    fn queue(_: &UpdateBuffers, _: &AdamWStep, _: &[usize]) -> Result<Option<Work>> {
        let _ = max_update_blocks;
        Ok(None)
    }

    /// Segments of the update.
    pub fn segments(&self) -> usize {
        self.ends.len()
    }

    /// Whether it runs on the GPU's side stream (else deferred to the calling thread).
    pub fn is_queued(&self) -> bool {
        !matches!(self.work, Work::Deferred { .. })
    }

    /// Segments already waited for (or run).
    pub fn segments_done(&self) -> usize {
        self.done.lock().map_or(0, |d| *d)
    }

    fn wait_segment(&self, k: usize) -> Result<()> {
        match &self.work {
            #[cfg(feature = "cuda")]
            Work::Queued { events, _buffers } => {
                let dev = crate::kernels::cuda::device_of(&_buffers.param)?;
                crate::kernels::cuda::stream(&dev).wait(&events[k])?;
                Ok(())
            }
            Work::Deferred { buffers, h } => {
                let lo = if k == 0 { 0 } else { self.ends[k - 1] };
                run_segment(&buffers.narrow(&(lo..self.ends[k]))?, buffers, lo, h)
            }
        }
    }
}

/// One segment `s` (narrowed from `whole`, at offset `lo`) with candle ops, written back in place.
fn run_segment(s: &UpdateBuffers, whole: &UpdateBuffers, lo: usize, h: &AdamWStep) -> Result<()> {
    let (p, m, v) = adamw_update(
        &s.param,
        &s.grad,
        &s.exp_avg,
        &s.exp_avg_sq,
        s.decay_mask.as_ref(),
        h,
    )?;
    whole.param.slice_set(&p, 0, lo)?;
    whole.exp_avg.slice_set(&m, 0, lo)?;
    whole.exp_avg_sq.slice_set(&v, 0, lo)?;
    if let Some(c) = &whole.copy {
        c.slice_set(&p.to_dtype(c.dtype())?, 0, lo)?;
    }
    whole.grad.slice_set(&s.grad.zeros_like()?, 0, lo)?;
    Ok(())
}

impl PendingUpdate for OverlappedUpdate {
    fn wait_upto(&self, upto: usize) -> Result<()> {
        let mut done = self
            .done
            .lock()
            .map_err(|_| anyhow::anyhow!("overlapped update poisoned"))?;
        // Segment k starts at ends[k-1]: wait for every segment that starts below `upto`.
        while *done < self.ends.len() && (*done == 0 || self.ends[*done - 1] < upto) {
            self.wait_segment(*done)?;
            *done += 1;
        }
        Ok(())
    }
}

impl Drop for OverlappedUpdate {
    /// The update completes (GPU: the compute stream waits for it, so the buffers it reads are
    /// not freed under it; elsewhere: the remaining segments run).
    fn drop(&mut self) {
        let _ = self.wait_upto(usize::MAX);
    }
}

/// What the next step gets of an update still running: the update (the model waits for its
/// stages) and, once per update, the gradient buffer it zeroes (the next step's).
#[derive(Clone)]
pub struct PendingStep {
    pub update: Arc<dyn PendingUpdate>,
    pub grad: Option<Tensor>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn buffers(n: usize) -> UpdateBuffers {
        let t = |seed: u64, scale: f32| {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i as u64 * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 * scale)
                .collect();
            Tensor::new(v.as_slice(), &Device::Cpu).unwrap()
        };
        UpdateBuffers {
            param: t(1, 1.0),
            grad: (t(2, 2.0) - 1.0).unwrap(),
            exp_avg: t(3, 0.01),
            exp_avg_sq: t(4, 0.001),
            decay_mask: Some(t(5, 1.0).ge(0.5).unwrap().to_dtype(DType::F32).unwrap()),
            copy: Some(t(1, 1.0).to_dtype(DType::BF16).unwrap()),
        }
    }

    fn step() -> AdamWStep {
        AdamWStep {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 3,
            grad_scale: 0.5,
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
    }

    /// Stage by stage, the values equal the whole update's, bit for bit; a stage not waited for
    /// keeps its old values; the gradient is zeroed as it is consumed.
    #[test]
    fn segments_run_in_order_as_waited_for_and_match_the_whole_update() {
        let n = 100;
        let want = {
            let b = buffers(n);
            adamw_update(
                &b.param,
                &b.grad,
                &b.exp_avg,
                &b.exp_avg_sq,
                b.decay_mask.as_ref(),
                &step(),
            )
            .unwrap()
        };
        let b = buffers(n);
        let before = values(&b.param);
        // Ends 30 and 61 round up to 32 and 64.
        let u = OverlappedUpdate::start(b.clone(), step(), &[30, 61, 100]).unwrap();
        assert!(!u.is_queued());
        assert_eq!(u.segments(), 3);
        assert_eq!(u.segments_done(), 0);
        assert_eq!(values(&b.param), before, "nothing runs before a wait");
        u.wait_upto(10).unwrap(); // inside the first segment
        assert_eq!(u.segments_done(), 1);
        let p = values(&b.param);
        assert_eq!(p[..32], values(&want.0)[..32]);
        assert_eq!(p[32..], before[32..], "later stages keep their old values");
        assert!(values(&b.grad)[..32].iter().all(|&g| g == 0.0));
        assert!(values(&b.grad)[32..].iter().any(|&g| g != 0.0));
        u.wait_upto(32).unwrap(); // the second segment starts at 32: not needed yet
        assert_eq!(u.segments_done(), 1);
        u.wait_upto(33).unwrap();
        assert_eq!(u.segments_done(), 2);
        drop(u); // completes the rest
        assert_eq!(values(&b.param), values(&want.0));
        assert_eq!(values(&b.exp_avg), values(&want.1));
        assert_eq!(values(&b.exp_avg_sq), values(&want.2));
        assert_eq!(
            values(b.copy.as_ref().unwrap()),
            values(&want.0.to_dtype(DType::BF16).unwrap())
        );
        assert!(values(&b.grad).iter().all(|&g| g == 0.0));
    }

    #[test]
    fn decreasing_stage_ends_are_refused() {
        assert!(OverlappedUpdate::start(buffers(64), step(), &[40, 16, 64]).is_err());
    }
}
