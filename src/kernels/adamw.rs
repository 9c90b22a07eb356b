//! Fused AdamW (`cuda/adamw.cu`): one kernel reads param, grad, both moments and the decay mask
//! and writes the new param and moments, bit-exact with [`crate::train::optim::adamw_update`]'s
//! candle-ops path on the CPU; and the gradient's sum of squares as one reduction kernel.

use super::{random_tensor, run_check, sized, KernelCheck, Tolerance};
use crate::train::optim::{adamw_update, sum_squares, AdamWStep};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// The f32 constants of one update, each rounded from f64 exactly where the candle-ops path
/// rounds it (an `affine`'s multiplier and addend are cast to f32).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AdamWArgs {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub neg_shrink: f32,
    pub one_minus_shrink: f32,
    pub inv_bias_correction2_sqrt: f32,
    pub eps: f32,
    pub step_size: f32,
    pub decay: i32,
    pub grad_scale: f32,
}

impl AdamWArgs {
    pub fn new(h: &AdamWStep) -> AdamWArgs {
        let shrink = h.lr * h.weight_decay;
        let t = h.step as f64;
        AdamWArgs {
            beta1: h.beta1 as f32,
            one_minus_beta1: (1.0 - h.beta1) as f32,
            beta2: h.beta2 as f32,
            one_minus_beta2: (1.0 - h.beta2) as f32,
            neg_shrink: -shrink as f32,
            one_minus_shrink: (1.0 - shrink) as f32,
            inv_bias_correction2_sqrt: (1.0 / (1.0 - h.beta2.powf(t)).sqrt()) as f32,
            eps: h.eps as f32,
            step_size: (h.lr / (1.0 - h.beta1.powf(t))) as f32,
            decay: i32::from(h.weight_decay > 0.0 && h.lr > 0.0),
            grad_scale: h.grad_scale as f32,
        }
    }
}

/// Fused [`adamw_update`] on CUDA: `Some((param, exp_avg, exp_avg_sq))`, or `None` off CUDA.
pub fn adamw_update_fused(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    decay_mask: Option<&Tensor>,
    h: &AdamWStep,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let all_f32 = [
        Some(param),
        Some(grad),
        Some(exp_avg),
        Some(exp_avg_sq),
        decay_mask,
    ]
    .into_iter()
    .flatten()
    .all(|t| t.dtype() == DType::F32);
    if !super::on_cuda(param) || !all_f32 {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        imp::adamw(
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            decay_mask,
            &AdamWArgs::new(h),
        )
        .map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (grad, exp_avg, exp_avg_sq, h);
        Ok(None)
    }
}

/// [`adamw_update_fused`] writing the new values over `param`, `exp_avg` and `exp_avg_sq` in
/// their own device buffers (each thread reads element i of every input before it writes element
/// i of the outputs, so aliasing them is safe): an optimizer step then allocates nothing, where
/// the out-of-place update needs three more parameter-sized buffers at once. `bf16_copy` (`[n]`
/// bf16, contiguous) also receives the new parameters rounded to bf16 in the same pass: the
/// model's weights, with no separate cast that reads the master again. `grad` may be f32 or bf16
/// (widened exactly in the kernel: the same bits as the f32 update of the widened gradient).
/// Returns false (and
/// changes nothing) off CUDA or for other dtypes. Callers must not hold other tensors sharing
/// these buffers and expect the old values.
pub fn adamw_update_in_place(
    param: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    decay_mask: Option<&Tensor>,
    h: &AdamWStep,
    bf16_copy: Option<&Tensor>,
) -> Result<bool> {
    let n = param.elem_count();
    let ok = param.dtype() == DType::F32
        && param.is_contiguous()
        && update_inputs_fit(grad, exp_avg, exp_avg_sq, decay_mask, n)
        && bf16_copy
            .is_none_or(|c| c.dtype() == DType::BF16 && c.is_contiguous() && c.elem_count() == n);
    if !super::on_cuda(param) || !ok || !super::enabled() {
        return Ok(false);
    }
    #[cfg(feature = "cuda")]
    {
        imp::adamw_in_place(
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            decay_mask,
            &AdamWArgs::new(h),
            bf16_copy,
        )?;
        Ok(true)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (grad, exp_avg, exp_avg_sq, h);
        Ok(false)
    }
}

/// Σ g² of an `[n]` f32 or bf16 tensor in one kernel (f64 accumulation); `None` off CUDA.
pub fn sum_squares_fused(grad: &Tensor) -> Result<Option<f64>> {
    if !super::on_cuda(grad) || !super::float_kernel_dtype(grad.dtype()) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        imp::sum_squares(grad).map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(None)
    }
}

/// Whether the update kernels take these as their gradient (f32 or bf16), moments and decay
/// mask (f32): all contiguous, `n` values each.
fn update_inputs_fit(
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    decay_mask: Option<&Tensor>,
    n: usize,
) -> bool {
    let fits = |t: &Tensor| t.is_contiguous() && t.elem_count() == n;
    [Some(exp_avg), Some(exp_avg_sq), decay_mask]
        .into_iter()
        .flatten()
        .all(|t| t.dtype() == DType::F32 && fits(t))
        && super::float_kernel_dtype(grad.dtype())
        && fits(grad)
}

/// One value of a split fp32 master (`cuda/adamw.cu`): `(hi, lo)` bits, hi = p rounded to bf16
/// (to nearest, ties away from zero), lo = the low 16 bits of p's bits. [`join_master_bits`]
/// gives p back exactly.
pub fn split_master_bits(p: f32) -> (u16, u16) {
    let b = p.to_bits();
    ((b.wrapping_add(0x8000) >> 16) as u16, (b & 0xffff) as u16)
}

/// The f32 value of a split master's `(hi, lo)` bits: hi's top bits, less the rounding's carry.
pub fn join_master_bits(hi: u16, lo: u16) -> f32 {
    let top = u32::from(hi).wrapping_sub(u32::from(lo >= 0x8000));
    f32::from_bits((top << 16) | u32::from(lo))
}

/// `[n]` f32 values as a split master: `(hi [n] bf16, lo [n] i16)` (lo's bits are the values'
/// low halves). One kernel on CUDA.
pub fn split_master(values: &Tensor) -> Result<(Tensor, Tensor)> {
    if values.dtype() != DType::F32 || values.rank() != 1 {
        anyhow::bail!(
            "split master: values must be [n] f32, got {:?} {:?}",
            values.dims(),
            values.dtype()
        );
    }
    #[cfg(feature = "cuda")]
    if super::on_cuda(values) {
        return imp::split_master(&values.contiguous()?);
    }
    let (hi, lo): (Vec<half::bf16>, Vec<i16>) = values
        .to_vec1::<f32>()?
        .into_iter()
        .map(|p| {
            let (h, l) = split_master_bits(p);
            (half::bf16::from_bits(h), l as i16)
        })
        .unzip();
    let n = hi.len();
    Ok((
        Tensor::from_vec(hi, n, values.device())?,
        Tensor::from_vec(lo, n, values.device())?,
    ))
}

/// The `[n]` f32 values of a split master (`hi` bf16, `lo` i16).
pub fn join_master(hi: &Tensor, lo: &Tensor) -> Result<Tensor> {
    if hi.dtype() != DType::BF16
        || lo.dtype() != DType::I16
        || hi.dims() != lo.dims()
        || hi.rank() != 1
    {
        anyhow::bail!(
            "split master: hi must be [n] bf16 and lo [n] i16, got {:?} {:?} and {:?} {:?}",
            hi.dims(),
            hi.dtype(),
            lo.dims(),
            lo.dtype()
        );
    }
    #[cfg(feature = "cuda")]
    if super::on_cuda(hi) {
        return imp::join_master(&hi.contiguous()?, &lo.contiguous()?);
    }
    let values: Vec<f32> = hi
        .to_vec1::<half::bf16>()?
        .into_iter()
        .zip(lo.to_vec1::<i16>()?)
        .map(|(h, l)| join_master_bits(h.to_bits(), l as u16))
        .collect();
    let n = values.len();
    Ok(Tensor::from_vec(values, n, hi.device())?)
}

/// [`adamw_update_in_place`] over a split master (`hi` [n] bf16, the model's weights; `lo` [n]
/// i16): the same update of the joined f32 value, split back, in one kernel. Returns false (and
/// changes nothing) off CUDA or for other dtypes.
pub fn adamw_split_in_place(
    hi: &Tensor,
    lo: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    decay_mask: Option<&Tensor>,
    h: &AdamWStep,
) -> Result<bool> {
    let n = hi.elem_count();
    let ok = hi.dtype() == DType::BF16
        && lo.dtype() == DType::I16
        && [hi, lo]
            .iter()
            .all(|t| t.is_contiguous() && t.elem_count() == n)
        && update_inputs_fit(grad, exp_avg, exp_avg_sq, decay_mask, n);
    if !super::on_cuda(hi) || !ok || !super::enabled() {
        return Ok(false);
    }
    #[cfg(feature = "cuda")]
    {
        imp::adamw_split(
            hi,
            lo,
            grad,
            exp_avg,
            exp_avg_sq,
            decay_mask,
            &AdamWArgs::new(h),
        )?;
        Ok(true)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (grad, h);
        Ok(false)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::AdamWArgs;
    use crate::kernels::cuda::{
        aligned16, alloc, alloc_zeros, device_of, elementwise_launch, func, grid_1d, stream, wrap,
        CudaInput,
    };
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaStream, CudaView, DeviceRepr, LaunchArgs, PushKernelArg,
    };
    use candle_core::{DType, Tensor};
    use half::bf16;

    // SAFETY: #[repr(C)] plain-old-data, field for field the kernel's `struct AdamWArgs`.
    unsafe impl DeviceRepr for AdamWArgs {}

    /// A gradient's device view in its dtype (the kernels come in an f32 and a bf16 version).
    enum GradView<'a> {
        F32(CudaView<'a, f32>),
        Bf16(CudaView<'a, bf16>),
    }

    impl GradView<'_> {
        fn aligned(&self, stream: &CudaStream) -> bool {
            match self {
                GradView::F32(g) => aligned16(g, stream),
                GradView::Bf16(g) => aligned16(g, stream),
            }
        }
    }

    /// What both update kernels read after their parameters, in argument order: the gradient,
    /// both moments and the decay mask (null when absent).
    struct UpdateInputs<'t> {
        g: CudaInput<'t>,
        m: CudaInput<'t>,
        v: CudaInput<'t>,
        mask: Option<CudaInput<'t>>,
    }

    /// [`UpdateInputs`]' device views.
    struct UpdateViews<'a> {
        g: GradView<'a>,
        m: CudaView<'a, f32>,
        v: CudaView<'a, f32>,
        mask: Option<CudaView<'a, f32>>,
    }

    impl<'t> UpdateInputs<'t> {
        fn new(
            grad: &'t Tensor,
            m: &'t Tensor,
            v: &'t Tensor,
            mask: Option<&'t Tensor>,
        ) -> Result<Self> {
            Ok(UpdateInputs {
                g: CudaInput::new(grad)?,
                m: CudaInput::new(m)?,
                v: CudaInput::new(v)?,
                mask: mask.map(CudaInput::new).transpose()?,
            })
        }

        /// The views and the kernel name's gradient part ("" for f32, "gbf16" for bf16).
        fn views(&self, grad_dtype: DType) -> Result<(UpdateViews<'_>, &'static str)> {
            let (g, suffix) = match grad_dtype {
                DType::F32 => (GradView::F32(self.g.view::<f32>()?), ""),
                DType::BF16 => (GradView::Bf16(self.g.view::<bf16>()?), "gbf16"),
                other => bail!("AdamW kernel: no {other:?} gradient version"),
            };
            let views = UpdateViews {
                g,
                m: self.m.view::<f32>()?,
                v: self.v.view::<f32>()?,
                mask: self.mask.as_ref().map(|i| i.view::<f32>()).transpose()?,
            };
            Ok((views, suffix))
        }
    }

    impl<'a> UpdateViews<'a> {
        fn aligned(&self, stream: &CudaStream) -> bool {
            self.g.aligned(stream)
                && aligned16(&self.m, stream)
                && aligned16(&self.v, stream)
                && self.mask.as_ref().is_none_or(|k| aligned16(k, stream))
        }

        /// Pushes gradient, moments and mask (or `null`).
        fn push(&'a self, b: &mut LaunchArgs<'a>, null: &'a u64) {
            match &self.g {
                GradView::F32(g) => b.arg(g),
                GradView::Bf16(g) => b.arg(g),
            };
            b.arg(&self.m).arg(&self.v);
            match &self.mask {
                Some(k) => b.arg(k),
                None => b.arg(null),
            };
        }
    }

    /// Out of place: the update runs in place on fresh copies of the param and moments.
    pub fn adamw(
        param: &Tensor,
        grad: &Tensor,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        decay_mask: Option<&Tensor>,
        args: &AdamWArgs,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (p, m, v) = (param.copy()?, exp_avg.copy()?, exp_avg_sq.copy()?);
        adamw_in_place(&p, &grad.contiguous()?, &m, &v, decay_mask, args, None)?;
        Ok((p, m, v))
    }

    pub fn adamw_in_place(
        param: &Tensor,
        grad: &Tensor,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        decay_mask: Option<&Tensor>,
        args: &AdamWArgs,
        bf16_copy: Option<&Tensor>,
    ) -> Result<()> {
        let n = param.elem_count();
        for t in [
            Some(grad),
            Some(exp_avg),
            Some(exp_avg_sq),
            decay_mask,
            bf16_copy,
        ]
        .into_iter()
        .flatten()
        {
            if t.elem_count() != n {
                bail!("AdamW kernel: {} values for {n} parameters", t.elem_count());
            }
        }
        let dev = device_of(param)?;
        let p_in = CudaInput::new(param)?;
        let pv = p_in.view::<f32>()?;
        let inputs = UpdateInputs::new(grad, exp_avg, exp_avg_sq, decay_mask)?;
        let (views, g_suffix) = inputs.views(grad.dtype())?;
        let kernel = if g_suffix.is_empty() {
            "adamw_f32".to_string()
        } else {
            format!("adamw_f32_{g_suffix}")
        };
        let copy_in = bf16_copy.map(CudaInput::new).transpose()?;
        let copy_v = copy_in.as_ref().map(|i| i.view::<bf16>()).transpose()?;
        let null: u64 = 0;
        let n_u = n as u64;
        let stream = stream(&dev);
        let vectorized = aligned16(&pv, &stream)
            && views.aligned(&stream)
            && copy_v.as_ref().is_none_or(|v| aligned16(v, &stream));
        let (name, cfg) = elementwise_launch(&kernel, vectorized, n);
        let f = func(&dev, "adamw", &name)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&pv);
        views.push(&mut b, &null);
        b.arg(&n_u).arg(args);
        match &copy_v {
            Some(cv) => b.arg(cv),
            None => b.arg(&null),
        };
        // SAFETY: arguments match `adamw_f32{,_gbf16}{,_scalar}` (the gradient in the kernel's
        // type); every buffer holds n elements (checked
        // above), 16-byte aligned for the 8-wide variant; each
        // element is read and then written by the same thread only.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    pub fn split_master(values: &Tensor) -> Result<(Tensor, Tensor)> {
        let dev = device_of(values)?;
        let n = values.elem_count();
        let p_in = CudaInput::new(values)?;
        let pv = p_in.view::<f32>()?;
        let (hi, lo) = (alloc::<bf16>(&dev, n)?, alloc::<i16>(&dev, n)?);
        let stream = stream(&dev);
        let f = func(&dev, "adamw", "master_split_f32")?;
        let n_u = n as u64;
        let mut b = stream.launch_builder(&f);
        b.arg(&pv).arg(&hi).arg(&lo).arg(&n_u);
        // SAFETY: arguments match `master_split_f32`; p, hi and lo hold n elements.
        unsafe { b.launch(grid_1d(n, 256)) }?;
        drop(b);
        Ok((wrap(hi, &dev, n), wrap(lo, &dev, n)))
    }

    pub fn join_master(hi: &Tensor, lo: &Tensor) -> Result<Tensor> {
        let dev = device_of(hi)?;
        let n = hi.elem_count();
        let (h_in, l_in) = (CudaInput::new(hi)?, CudaInput::new(lo)?);
        let (hv, lv) = (h_in.view::<bf16>()?, l_in.view::<i16>()?);
        let p = alloc::<f32>(&dev, n)?;
        let stream = stream(&dev);
        let f = func(&dev, "adamw", "master_join_f32")?;
        let n_u = n as u64;
        let mut b = stream.launch_builder(&f);
        b.arg(&hv).arg(&lv).arg(&p).arg(&n_u);
        // SAFETY: arguments match `master_join_f32`; hi, lo and p hold n elements.
        unsafe { b.launch(grid_1d(n, 256)) }?;
        drop(b);
        Ok(wrap(p, &dev, n))
    }

    pub fn adamw_split(
        hi: &Tensor,
        lo: &Tensor,
        grad: &Tensor,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        decay_mask: Option<&Tensor>,
        args: &AdamWArgs,
    ) -> Result<()> {
        let dev = device_of(hi)?;
        let n = hi.elem_count();
        let (h_in, l_in) = (CudaInput::new(hi)?, CudaInput::new(lo)?);
        let (hv, lv) = (h_in.view::<bf16>()?, l_in.view::<i16>()?);
        let inputs = UpdateInputs::new(grad, exp_avg, exp_avg_sq, decay_mask)?;
        let (views, g_suffix) = inputs.views(grad.dtype())?;
        let kernel = format!(
            "adamw_split_{}",
            if g_suffix.is_empty() { "f32" } else { g_suffix }
        );
        let null: u64 = 0;
        let n_u = n as u64;
        let stream = stream(&dev);
        let vectorized =
            aligned16(&hv, &stream) && aligned16(&lv, &stream) && views.aligned(&stream);
        let (name, cfg) = elementwise_launch(&kernel, vectorized, n);
        let f = func(&dev, "adamw", &name)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&hv).arg(&lv);
        views.push(&mut b, &null);
        b.arg(&n_u).arg(args);
        // SAFETY: arguments match `adamw_split_{f32,gbf16}{,_scalar}`; every buffer holds n
        // elements (checked by the caller), 16-byte aligned for the 8-wide variant; each element
        // is read and then written by the same thread only.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    pub fn sum_squares(grad: &Tensor) -> Result<f64> {
        let dev = device_of(grad)?;
        let g = grad.contiguous()?;
        let g_in = CudaInput::new(&g)?;
        let (gv, kernel) = match g.dtype() {
            DType::F32 => (GradView::F32(g_in.view::<f32>()?), "sum_squares_f32"),
            DType::BF16 => (GradView::Bf16(g_in.view::<bf16>()?), "sum_squares_bf16"),
            other => bail!("sum of squares kernel: no {other:?} version"),
        };
        let n = g.elem_count();
        let n_u = n as u64;
        let f = func(&dev, "adamw", kernel)?;
        let mut out = alloc_zeros::<f64>(&dev, 1)?;
        let stream = stream(&dev);
        let mut b = stream.launch_builder(&f);
        match &gv {
            GradView::F32(g) => b.arg(g),
            GradView::Bf16(g) => b.arg(g),
        };
        b.arg(&n_u).arg(&mut out);
        // Enough blocks to fill the GPU; each thread loops over its strided share.
        let mut cfg = grid_1d(n, 256);
        cfg.grid_dim.0 = cfg.grid_dim.0.min(1024);
        // SAFETY: arguments match `sum_squares_{f32,bf16}`; it reads g[< n] and adds into out[0].
        unsafe { b.launch(cfg) }?;
        drop(b);
        Ok(wrap(out, &dev, 1).to_vec1::<f64>()?[0])
    }
}

/// A check's AdamW inputs of `n` values drawn from `seed..seed + 5`: parameters, gradient, both
/// moments (the second non-negative) and a 0/1 decay mask.
fn adamw_inputs(device: &Device, n: usize, seed: u64) -> anyhow::Result<[Tensor; 5]> {
    let param = random_tensor(&[n], 0.1, seed, DType::F32, device)?;
    let grad = random_tensor(&[n], 1e-3, seed + 1, DType::F32, device)?;
    let m = random_tensor(&[n], 1e-4, seed + 2, DType::F32, device)?;
    let v = random_tensor(&[n], 1e-6, seed + 3, DType::F32, device)?.abs()?;
    let mask = random_tensor(&[n], 1.0, seed + 4, DType::F32, device)?
        .ge(0.0)?
        .to_dtype(DType::F32)?;
    Ok([param, grad, m, v, mask])
}

/// AdamW bit-exact against the CPU (with and without a decay mask), and the sum of squares
/// against an f64 CPU sum, on a LoRA-sized (7B, r 64, all linears: ~160M) or smaller buffer.
pub fn self_checks() -> Vec<KernelCheck> {
    let mut checks = Vec::new();
    for masked in [true, false] {
        let name = if masked {
            "adamw decay mask"
        } else {
            "adamw decay all"
        };
        checks.push(KernelCheck::new(name, move |device: &Device| {
            let n = sized(device, 40_000_000, 10_000);
            let [param, grad, m, v, mask] = adamw_inputs(device, n, 1)?;
            let mask = masked.then_some(mask);
            let h = AdamWStep {
                lr: 2e-4,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                step: 7,
                grad_scale: 0.75,
            };
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
            let (pc, gc, mc, vc) = (cpu(&param)?, cpu(&grad)?, cpu(&m)?, cpu(&v)?);
            let maskc = mask.as_ref().map(cpu).transpose()?;
            run_check(
                device,
                format!("[{n}] f32, step {}", h.step),
                Tolerance::EXACT,
                &|| {
                    let (p, m, v) = adamw_update(&param, &grad, &m, &v, mask.as_ref(), &h)?;
                    Ok(vec![p, m, v])
                },
                &|| {
                    let (p, m, v) = adamw_update(&pc, &gc, &mc, &vc, maskc.as_ref(), &h)?;
                    Ok(vec![p, m, v])
                },
            )
        }));
    }
    // In place with the bf16 copy, as the optimizer step runs it: 8-wide with a tail (n % 8 = 3),
    // and the one-element kernel on views at a 4-byte offset; with an f32 gradient and with a
    // bf16 one (full fine-tuning's one-write gradient), whose reference is the f32 update of the
    // same values widened.
    for (unaligned, bf16_grad) in [(false, false), (true, false), (false, true), (true, true)] {
        let name = match (unaligned, bf16_grad) {
            (false, false) => "adamw in place + bf16 copy",
            (true, false) => "adamw in place + bf16 copy, unaligned",
            (false, true) => "adamw in place + bf16 copy, bf16 gradient",
            (true, true) => "adamw in place + bf16 copy, bf16 gradient, unaligned",
        };
        checks.push(KernelCheck::new(name, move |device: &Device| {
            let n = sized(device, 40_000_003, 10_003);
            let ([param, grad, m, v, mask], h) = in_place_inputs(device, n, 11, bf16_grad)?;
            let fresh = |t: &Tensor| fresh_copy(t, unaligned);
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
            let (pc, gc, mc, vc, kc) = (cpu(&param)?, cpu(&grad)?, cpu(&m)?, cpu(&v)?, cpu(&mask)?);
            run_check(
                device,
                format!(
                    "[{n}] {:?} gradient -> bf16 copy, step {}",
                    grad.dtype(),
                    h.step
                ),
                Tolerance::EXACT,
                &|| {
                    let (p, mm, vv, g) = (fresh(&param)?, fresh(&m)?, fresh(&v)?, fresh(&grad)?);
                    let copy = fresh(&param.to_dtype(DType::BF16)?)?;
                    if adamw_update_in_place(&p, &g, &mm, &vv, Some(&mask), &h, Some(&copy))? {
                        return Ok(vec![p, mm, vv, copy]);
                    }
                    let (p, mm, vv) = adamw_update(&p, &g, &mm, &vv, Some(&mask), &h)?;
                    let copy = p.to_dtype(DType::BF16)?;
                    Ok(vec![p, mm, vv, copy])
                },
                &|| {
                    let gc = gc.to_dtype(DType::F32)?;
                    let (p, m, v) = adamw_update(&pc, &gc, &mc, &vc, Some(&kc), &h)?;
                    let copy = p.to_dtype(DType::BF16)?;
                    Ok(vec![p, m, v, copy])
                },
            )
        }));
    }
    // The split checks' candle column runs the split and join on the host (candle's CUDA
    // backend has no i16 casts or copies): at the other checks' 40M values its 103 timed calls
    // take minutes, so these use a tenth.
    const SPLIT_CHECK_LEN: usize = 4_000_003;
    checks.push(KernelCheck::new(
        "adamw split master round trip",
        |device: &Device| {
            let n = sized(device, SPLIT_CHECK_LEN, 10_003);
            let values = random_tensor(&[n], 0.1, 31, DType::F32, device)?;
            let cpu = values.to_device(&Device::Cpu)?;
            run_check(
                device,
                format!("[{n}] f32 -> bf16 + i16 -> f32"),
                Tolerance::EXACT,
                &|| {
                    let (hi, lo) = split_master(&values)?;
                    let back = join_master(&hi, &lo)?;
                    Ok([split_values(&hi, &lo)?, vec![back]].concat())
                },
                &|| {
                    let (hi, lo) = split_master(&cpu)?;
                    Ok([split_values(&hi, &lo)?, vec![cpu.clone()]].concat())
                },
            )
        },
    ));
    // AdamW over a split master against the CPU's join, f32 update and split: 8-wide with a tail
    // and the one-element kernel at a 2-byte offset; f32 and bf16 gradients.
    for (unaligned, bf16_grad) in [(false, false), (true, false), (false, true)] {
        let name = match (unaligned, bf16_grad) {
            (false, false) => "adamw split master",
            (true, false) => "adamw split master, unaligned",
            _ => "adamw split master, bf16 gradient",
        };
        checks.push(KernelCheck::new(name, move |device: &Device| {
            let n = sized(device, SPLIT_CHECK_LEN, 10_003);
            let ([param, grad, m, v, mask], h) = in_place_inputs(device, n, 41, bf16_grad)?;
            let fresh = |t: &Tensor| fresh_copy(t, unaligned);
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
            let (pc, gc, mc, vc, kc) = (cpu(&param)?, cpu(&grad)?, cpu(&m)?, cpu(&v)?, cpu(&mask)?);
            run_check(
                device,
                format!("[{n}] {:?} gradient, step {}", grad.dtype(), h.step),
                Tolerance::EXACT,
                &|| {
                    // hi and lo at the others' offset: split from an f32 buffer one longer
                    // when unaligned (candle's CUDA copies have no i16 version).
                    let (hi, lo) = if unaligned {
                        let longer = Tensor::cat(&[&param.narrow(0, 0, 1)?, &param], 0)?; // [n + 1]
                        let (h, l) = split_master(&longer)?;
                        (h.narrow(0, 1, n)?, l.narrow(0, 1, n)?)
                    } else {
                        split_master(&param)?
                    };
                    let (mm, vv, g) = (fresh(&m)?, fresh(&v)?, fresh(&grad)?);
                    if adamw_split_in_place(&hi, &lo, &g, &mm, &vv, Some(&mask), &h)? {
                        return split_outputs(&hi, &lo, mm, vv);
                    }
                    // Off CUDA: the reference itself (the harness agrees with itself).
                    split_reference(&param, &grad, &m, &v, &mask, &h)
                },
                &|| split_reference(&pc, &gc, &mc, &vc, &kc, &h),
            )
        }));
    }
    for dtype in [DType::F32, DType::BF16] {
        let name = if dtype == DType::F32 {
            "grad sum_squares"
        } else {
            "grad sum_squares bf16"
        };
        checks.push(KernelCheck::new(name, move |device: &Device| {
            sum_squares_check(device, dtype)
        }));
    }
    checks
}

/// The in-place checks' inputs ([`adamw_inputs`] from `seed`, the gradient in bf16 when asked)
/// and their step.
fn in_place_inputs(
    device: &Device,
    n: usize,
    seed: u64,
    bf16_grad: bool,
) -> Result<([Tensor; 5], AdamWStep)> {
    let [param, grad, m, v, mask] = adamw_inputs(device, n, seed)?;
    let grad = if bf16_grad {
        grad.to_dtype(DType::BF16)?
    } else {
        grad
    };
    let h = AdamWStep {
        lr: 1e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.5,
    };
    Ok(([param, grad, m, v, mask], h))
}

/// A fresh copy of `t` `[n]` for an in-place update to overwrite: at offset 1 of an `[n + 1]`
/// buffer when `unaligned` (the one-element kernels).
fn fresh_copy(t: &Tensor, unaligned: bool) -> candle_core::Result<Tensor> {
    if unaligned {
        Tensor::cat(&[&t.narrow(0, 0, 1)?, t], 0)?.narrow(0, 1, t.elem_count())
    } else {
        t.copy()
    }
}

/// A split master's halves as f32 values to compare (lo's i16 cast on the host: candle's CUDA
/// casts have no i16 version).
fn split_values(hi: &Tensor, lo: &Tensor) -> Result<Vec<Tensor>> {
    Ok(vec![
        hi.to_dtype(DType::F32)?,
        lo.to_device(&Device::Cpu)?.to_dtype(DType::F32)?,
    ])
}

/// What a split-master update check compares: hi (as f32), the joined f32 values and the
/// moments, all where they are: no host copy inside the timed update. With hi equal, equal
/// joined values mean equal lo (the round-trip check compares lo's bits directly).
fn split_outputs(hi: &Tensor, lo: &Tensor, m: Tensor, v: Tensor) -> Result<Vec<Tensor>> {
    Ok(vec![hi.to_dtype(DType::F32)?, join_master(hi, lo)?, m, v])
}

/// The split-master update as the CPU runs it: the f32 update of the values, then their split.
fn split_reference(
    param: &Tensor,
    grad: &Tensor,
    m: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    h: &AdamWStep,
) -> Result<Vec<Tensor>> {
    let (p, m, v) = adamw_update(param, &grad.to_dtype(DType::F32)?, m, v, Some(mask), h)?;
    let (hi, lo) = split_master(&p)?;
    split_outputs(&hi, &lo, m, v)
}

/// Σ g² of a random `[n]` gradient in `dtype` against an f64 sum on the CPU.
fn sum_squares_check(device: &Device, dtype: DType) -> Result<super::CheckOutcome> {
    let n = sized(device, 40_000_000, 10_000);
    let grad = random_tensor(&[n], 1e-2, 6, dtype, device)?;
    let grad64 = grad.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    run_check(
        device,
        format!("[{n}] {dtype:?}"),
        Tolerance {
            atol: 0.0,
            rtol: 1e-5,
        },
        &|| Ok(vec![Tensor::new(&[sum_squares(&grad)?], &Device::Cpu)?]),
        &|| {
            Ok(vec![Tensor::new(
                &[grad64.sqr()?.sum_all()?.to_scalar::<f64>()?],
                &Device::Cpu,
            )?])
        },
    )
}
