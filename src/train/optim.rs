//! The optimizer over one flat fp32 buffer (as llm.c does): every trainable tensor is a slot of
//! `FlatParams::master`, gradients are flattened the same way, and AdamW and clipping run over the
//! whole buffer in a handful of kernels. ZeRO can shard the buffer by ranges: `adamw_update`,
//! `sum_squares` and `clip_coef` work on any `[n]` slice.

use crate::config::OptimConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::ops::Range;

/// Where one trainable tensor lives in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub offset: usize,
    pub numel: usize,
    pub shape: Vec<usize>,
    /// Weight decay applies to this tensor (matrices; not norms or biases).
    pub decay: bool,
}

/// fp32 master copy of all trainable values, concatenated.
#[derive(Debug, Clone)]
pub struct FlatParams {
    /// `[N]` f32, N = sum of slot sizes.
    pub master: Tensor,
    pub slots: Vec<Slot>,
}

impl FlatParams {
    /// Concatenate `values` (any shapes and float dtypes, one device) into an f32 master buffer.
    pub fn from_values(values: &[Tensor], decay: &[bool]) -> Result<FlatParams> {
        if values.len() != decay.len() {
            bail!(
                "{} trainable tensors but {} decay flags",
                values.len(),
                decay.len()
            );
        }
        if values.is_empty() {
            bail!("nothing to train: no trainable tensors");
        }
        let mut slots = Vec::with_capacity(values.len());
        let mut flat = Vec::with_capacity(values.len());
        let mut offset = 0;
        for (i, (v, &d)) in values.iter().zip(decay).enumerate() {
            let numel = v.elem_count();
            slots.push(Slot {
                offset,
                numel,
                shape: v.dims().to_vec(),
                decay: d,
            });
            offset += numel;
            flat.push(
                v.to_dtype(DType::F32)
                    .and_then(|t| t.flatten_all())
                    .with_context(|| format!("trainable tensor #{i}"))?,
            );
        }
        let master = Tensor::cat(&flat, 0)?; // [N]
        Ok(FlatParams { master, slots })
    }

    /// Number of trainable values N.
    pub fn numel(&self) -> usize {
        self.slots.last().map_or(0, |s| s.offset + s.numel)
    }

    /// Per-slot tensors in their original shapes, in `dtype` (for `Decoder::set_trainable`):
    /// views of the master itself in its dtype, else views of one cast of the whole buffer (one
    /// kernel instead of one per slot; the model then reads its weights without a cast per use).
    pub fn views(&self, dtype: DType) -> Result<Vec<Tensor>> {
        self.views_of(&self.master.to_dtype(dtype)?) // [N], no copy when the dtype matches
    }

    /// Per-slot views, in their original shapes, of another `[N]` buffer laid out as the master
    /// (e.g. a copy of it in the compute dtype).
    pub fn views_of(&self, flat: &Tensor) -> Result<Vec<Tensor>> {
        if flat.dims() != [self.numel()] {
            bail!(
                "a flat buffer of shape {:?} for {} trainable values",
                flat.dims(),
                self.numel()
            );
        }
        // The slots lie one after another from 0 (see `from_values`).
        Ok(crate::model::flat_views(
            flat,
            self.slots.iter().map(|s| s.shape.as_slice()),
        )?)
    }

    /// `[N]` f32: 1 where the slot takes weight decay, else 0.
    pub fn decay_mask(&self) -> Result<Tensor> {
        let device = self.master.device();
        let parts = self
            .slots
            .iter()
            .map(|s| {
                let v = if s.decay { 1.0 } else { 0.0 };
                Ok(Tensor::full(v as f32, s.numel, device)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// AdamW as `torch.optim.AdamW` (amsgrad off, maximize off): with t the step count,
/// `p *= 1 - lr*wd` (only decayed slots), `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`,
/// `p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`. Moments are fp32 over the flat buffer.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    step: u64,
    /// `[N]` f32 first moment.
    exp_avg: Tensor,
    /// `[N]` f32 second moment.
    exp_avg_sq: Tensor,
    /// The buffer cut into runs of consecutive values that take weight decay or not (adjacent
    /// slots merged; values outside every slot, a shard's padding, take none): each run is one
    /// update, so no `[N]` decay mask is stored or read (4 bytes a value each). One run without
    /// decay when weight_decay is 0.
    decay_runs: Vec<(Range<usize>, bool)>,
}

/// Checkpoint names of the optimizer state.
const EXP_AVG: &str = "optimizer.exp_avg";
const EXP_AVG_SQ: &str = "optimizer.exp_avg_sq";
const STEP: &str = "optimizer.step";

impl AdamW {
    pub fn new(cfg: &OptimConfig, params: &FlatParams) -> Result<AdamW> {
        let [beta1, beta2] = cfg.betas;
        for (key, b) in [("optim.betas[0]", beta1), ("optim.betas[1]", beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("{key}: must be in [0, 1), got {b}");
            }
        }
        if cfg.eps.is_nan() || cfg.eps <= 0.0 {
            bail!("optim.eps: must be positive, got {}", cfg.eps);
        }
        if cfg.weight_decay.is_nan() || cfg.weight_decay < 0.0 {
            bail!("optim.weight_decay: must be >= 0, got {}", cfg.weight_decay);
        }
        let n = params.master.elem_count();
        let decay_runs = if cfg.weight_decay > 0.0 {
            decay_runs(&params.slots, n)
        } else {
            vec![(0..n, false)]
        };
        // Two buffers: the CUDA step updates each moment in place, so they must not share one.
        Ok(AdamW {
            beta1,
            beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            step: 0,
            exp_avg: params.master.zeros_like()?,
            exp_avg_sq: params.master.zeros_like()?,
            decay_runs,
        })
    }

    /// The decay runs (see the field): `(range, decayed)` in buffer order.
    pub fn decay_runs(&self) -> &[(Range<usize>, bool)] {
        &self.decay_runs
    }

    /// Step `h` for one run: its weight decay, or none.
    fn run_step(h: &AdamWStep, decayed: bool) -> AdamWStep {
        AdamWStep {
            weight_decay: if decayed { h.weight_decay } else { 0.0 },
            ..*h
        }
    }

    /// Runs `update(range, step)` on every decay run; `false` when the first run reports that it
    /// did not run (the kernel path is off), in which case nothing was updated.
    fn in_place_runs(
        &self,
        h: &AdamWStep,
        mut update: impl FnMut(&Range<usize>, &AdamWStep) -> Result<bool>,
    ) -> Result<bool> {
        for (i, (range, decayed)) in self.decay_runs.iter().enumerate() {
            if !update(range, &Self::run_step(h, *decayed))? {
                if i > 0 {
                    bail!("AdamW: the fused update ran on some runs of the buffer only");
                }
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The out-of-place update of the whole `[N]` `master` run by run: new (master, m, v).
    fn update_runs(
        &self,
        master: &Tensor,
        grad: &Tensor,
        h: &AdamWStep,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let mut parts = (vec![], vec![], vec![]);
        for (r, decayed) in &self.decay_runs {
            let s = |t: &Tensor| t.narrow(0, r.start, r.len());
            let (p, m, v) = adamw_update(
                &s(master)?,
                &s(grad)?,
                &s(&self.exp_avg)?,
                &s(&self.exp_avg_sq)?,
                None,
                &Self::run_step(h, *decayed),
            )?;
            parts.0.push(p);
            parts.1.push(m);
            parts.2.push(v);
        }
        let join = |ts: Vec<Tensor>| -> Result<Tensor> {
            Ok(match <[Tensor; 1]>::try_from(ts) {
                Ok([t]) => t,
                Err(ts) => Tensor::cat(&ts, 0)?,
            })
        };
        Ok((join(parts.0)?, join(parts.1)?, join(parts.2)?))
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update of `params.master` with the flat `[N]` f32 gradient `grad`.
    pub fn step(&mut self, params: &mut FlatParams, grad: &Tensor, lr: f64) -> Result<()> {
        self.step_scaled(params, grad, 1.0, lr, None)
    }

    /// [`AdamW::step`] with the gradient multiplied by `grad_scale` first (gradient clipping
    /// folded into the update: no clipped copy of the gradient is made). `copy_to` (`[N]`, any
    /// float dtype) receives the updated values in its dtype: in the update's own pass on CUDA
    /// for a bf16 copy, else by a cast afterwards.
    pub fn step_scaled(
        &mut self,
        params: &mut FlatParams,
        grad: &Tensor,
        grad_scale: f64,
        lr: f64,
        copy_to: Option<&Tensor>,
    ) -> Result<()> {
        let n = params.numel();
        self.check_grad(grad)?;
        if let Some(c) = copy_to.filter(|c| c.dims() != [n]) {
            bail!(
                "AdamW: the parameters' copy must be [{n}], got {:?}",
                c.dims()
            );
        }
        let h = self.next_step(grad_scale, lr);
        // On CUDA the fused kernel updates the master and moments in place (same arithmetic as
        // `adamw_update`), so a step allocates no parameter-sized buffers.
        let fused_copy = copy_to.filter(|c| c.dtype() == DType::BF16);
        let fused = self.in_place_runs(&h, |r, hr| {
            let s = |t: &Tensor| t.narrow(0, r.start, r.len());
            crate::kernels::adamw::adamw_update_in_place(
                &s(&params.master)?,
                &s(grad)?,
                &s(&self.exp_avg)?,
                &s(&self.exp_avg_sq)?,
                None,
                hr,
                fused_copy.map(s).transpose()?.as_ref(),
            )
        })?;
        if !fused {
            let (p, m, v) = self.update_runs(&params.master, grad, &h)?;
            params.master = p;
            self.exp_avg = m;
            self.exp_avg_sq = v;
        }
        // Any copy the kernel did not write: a cast of the updated master.
        if let Some(c) = copy_to.filter(|_| !(fused && fused_copy.is_some())) {
            c.slice_set(&params.master.to_dtype(c.dtype())?, 0, 0)?;
        }
        Ok(())
    }

    /// The step's gradient must be `[N]` (N = this optimizer's values), f32 or bf16.
    fn check_grad(&self, grad: &Tensor) -> Result<()> {
        let n = self.exp_avg.elem_count();
        if grad.dims() != [n] || !matches!(grad.dtype(), DType::F32 | DType::BF16) {
            bail!(
                "AdamW: gradient must be [{n}] f32 or bf16, got {:?} {:?}",
                grad.dims(),
                grad.dtype()
            );
        }
        Ok(())
    }

    /// Counts the step and returns its hyper-parameters.
    fn next_step(&mut self, grad_scale: f64, lr: f64) -> AdamWStep {
        self.step += 1;
        AdamWStep {
            lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            step: self.step,
            grad_scale,
        }
    }

    /// [`AdamW::step_scaled`] over a split master (see [`crate::kernels::adamw::split_master`]):
    /// `hi` `[N]` bf16 (the model's weights) and `lo` `[N]` i16, updated in place. The joined f32
    /// values take exactly the update an f32 master would (one kernel on CUDA; join, update and
    /// split elsewhere), and hi is their rounding to nearest with ties away from zero.
    pub fn step_split(
        &mut self,
        hi: &Tensor,
        lo: &Tensor,
        grad: &Tensor,
        grad_scale: f64,
        lr: f64,
    ) -> Result<()> {
        self.check_grad(grad)?;
        let h = self.next_step(grad_scale, lr);
        let fused = self.in_place_runs(&h, |r, hr| {
            let s = |t: &Tensor| t.narrow(0, r.start, r.len());
            let (m, v) = (s(&self.exp_avg)?, s(&self.exp_avg_sq)?);
            crate::kernels::adamw::adamw_split_in_place(
                &s(hi)?,
                &s(lo)?,
                &s(grad)?,
                &m,
                &v,
                None,
                hr,
            )
        })?;
        if fused {
            return Ok(());
        }
        let master = crate::kernels::adamw::join_master(hi, lo)?;
        let (p, m, v) = self.update_runs(&master, grad, &h)?;
        let (new_hi, new_lo) = crate::kernels::adamw::split_master(&p)?;
        hi.slice_set(&new_hi, 0, 0)?;
        lo.slice_set(&new_lo, 0, 0)?;
        self.exp_avg = m;
        self.exp_avg_sq = v;
        Ok(())
    }

    /// State for a checkpoint: both moments (`[N]` f32) and the step count (`[1]` i64).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            (EXP_AVG.into(), self.exp_avg.clone()),
            (EXP_AVG_SQ.into(), self.exp_avg_sq.clone()),
            (STEP.into(), Tensor::new(&[self.step as i64], &Device::Cpu)?),
        ])
    }

    /// Restore what `state_tensors` saved (moved to this optimizer's device).
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |name: &str| {
            state
                .get(name)
                .with_context(|| format!("optimizer state lacks `{name}`"))
        };
        let n = self.exp_avg.elem_count();
        let device = self.exp_avg.device().clone();
        let moment = |name: &str| -> Result<Tensor> {
            let t = get(name)?;
            if t.dims() != [n] {
                bail!(
                    "optimizer state `{name}` has shape {:?}, expected [{n}]: the checkpoint was \
                     made for different trainable parameters",
                    t.dims()
                );
            }
            Ok(t.to_dtype(DType::F32)?.to_device(&device)?)
        };
        let (m, v) = (moment(EXP_AVG)?, moment(EXP_AVG_SQ)?);
        let step = get(STEP)?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?;
        let step = match step.as_slice() {
            [s] if *s >= 0 => *s as u64,
            other => bail!("optimizer state `{STEP}` must hold one count >= 0, got {other:?}"),
        };
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.step = step;
        Ok(())
    }
}

/// `0..n` as runs of consecutive values with the same decay flag: the slots' (adjacent equal
/// ones merged), the values no slot covers taking none.
fn decay_runs(slots: &[Slot], n: usize) -> Vec<(Range<usize>, bool)> {
    let mut runs: Vec<(Range<usize>, bool)> = vec![];
    let mut push = |range: Range<usize>, decayed: bool| {
        if range.is_empty() {
            return;
        }
        match runs.last_mut() {
            Some((last, d)) if *d == decayed && last.end == range.start => last.end = range.end,
            _ => runs.push((range, decayed)),
        }
    };
    let mut at = 0; // slots lie one after another in offset order (`FlatParams`)
    for s in slots {
        let end = (s.offset + s.numel).min(n);
        push(at..s.offset.min(n), false);
        push(s.offset.min(n)..end, s.decay);
        at = end;
    }
    push(at..n, false);
    runs
}

/// Hyper-parameters of one AdamW update; `step` is the 1-based count after this update.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
    /// Multiplies the gradient first (the clipping coefficient; 1 = none), as torch's
    /// `clip_grad_norm_` scales the gradient in place before the step.
    pub grad_scale: f64,
}

/// One AdamW update of `[n]` f32 tensors: returns the new (param, exp_avg, exp_avg_sq).
/// `decay_mask` (`[n]`, 1/0) limits weight decay to some values; None decays all of them. A bf16
/// `grad` is widened to f32 first (exactly), so it updates as its f32 values would.
pub fn adamw_update(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    decay_mask: Option<&Tensor>,
    h: &AdamWStep,
) -> Result<(Tensor, Tensor, Tensor)> {
    // One fused kernel on CUDA (bit-exact with the candle ops below, which are its reference).
    if let Some(r) =
        crate::kernels::adamw::adamw_update_fused(param, grad, exp_avg, exp_avg_sq, decay_mask, h)?
    {
        return Ok(r);
    }
    let grad = &grad.to_dtype(DType::F32)?; // no copy when it is f32 already
    let scaled;
    let grad = if h.grad_scale == 1.0 {
        grad
    } else {
        // f32 multiply, as torch's in-place `g.mul_(clip_coef)` with an f32 coefficient.
        scaled = grad.affine(h.grad_scale as f32 as f64, 0.0)?;
        &scaled
    };
    // Decoupled weight decay first, on the pre-update parameter (torch order).
    let mut p = param.clone();
    if h.weight_decay > 0.0 && h.lr > 0.0 {
        let shrink = h.lr * h.weight_decay;
        p = match decay_mask {
            // p * (1 - shrink * mask)
            Some(mask) => p.mul(&mask.affine(-shrink, 1.0)?)?,
            None => p.affine(1.0 - shrink, 0.0)?,
        };
    }
    let m = ((exp_avg * h.beta1)? + (grad * (1.0 - h.beta1))?)?;
    let v = ((exp_avg_sq * h.beta2)? + (grad.sqr()? * (1.0 - h.beta2))?)?;
    let t = h.step as f64;
    let bias_correction1 = 1.0 - h.beta1.powf(t);
    let bias_correction2_sqrt = (1.0 - h.beta2.powf(t)).sqrt();
    let step_size = h.lr / bias_correction1;
    // eps outside the square root, added after the bias correction (torch).
    let denom = v.sqrt()?.affine(1.0 / bias_correction2_sqrt, h.eps)?;
    let p = (p - (m.div(&denom)? * step_size)?)?;
    Ok((p, m, v))
}

/// Sum of squares of an `[n]` f32 or bf16 gradient (or a rank's range of it), as f64.
pub fn sum_squares(grad: &Tensor) -> Result<f64> {
    // One reduction kernel with f64 accumulation on CUDA.
    if let Some(s) = crate::kernels::adamw::sum_squares_fused(grad)? {
        return Ok(s);
    }
    Ok(grad
        .to_dtype(DType::F32)?
        .sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// torch `clip_grad_norm_`'s scale for a total norm: `max_norm / (norm + 1e-6)` clamped to 1;
/// 1 when clipping is off (`max_norm <= 0`). A non-finite norm gives a non-finite scale, which
/// propagates into the gradient as in torch (the caller decides whether to skip the step).
pub fn clip_coef(total_norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    let coef = (max_norm / (total_norm + 1e-6)).min(1.0);
    if total_norm.is_finite() {
        coef
    } else {
        f64::NAN
    }
}

/// Clip an `[n]` gradient to global 2-norm `max_norm` (torch `clip_grad_norm_`): returns the
/// scaled gradient and the norm before clipping. `max_norm <= 0` disables clipping (the norm is
/// still measured for logging). A non-finite norm propagates into the gradient, as in torch;
/// the caller decides whether to skip the step.
pub fn clip_grad_norm(grad: &Tensor, max_norm: f64) -> Result<(Tensor, f64)> {
    let norm = sum_squares(grad)?.sqrt();
    let coef = clip_coef(norm, max_norm);
    // torch multiplies even when coef is 1 (clamped); skipping that no-op changes nothing.
    let clipped = if coef == 1.0 {
        grad.clone()
    } else {
        grad.affine(coef as f32 as f64, 0.0)?
    };
    Ok((clipped, norm))
}
