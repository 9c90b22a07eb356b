//! LoRA adapter with PEFT semantics: `delta_y = scale · B(A(dropout(x)))`, `scale = alpha / r`,
//! `A [r, in]` kaiming-uniform(a = sqrt 5) like `nn.Linear`'s default, `B [out, r]` zero.
//! The base linear is computed separately (see [`super::linear`]); the adapter only adds its delta.

use super::{acc_dtype, mix_seed};
use crate::kernels::gemm::{gemm, gemm_into, gemm_scaled, GemmOut};
use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// `A [r, in]` drawn like PEFT's `nn.init.kaiming_uniform_(A, a=sqrt(5))`: with gain
/// `sqrt(2 / (1 + 5))` the bound `gain · sqrt(3 / fan_in)` is `1 / sqrt(in)`. f32, reproducible from `seed`.
pub fn lora_a_init(r: usize, in_features: usize, seed: u64, device: &Device) -> Result<Tensor> {
    let bound = 1.0 / (in_features as f64).sqrt();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let data: Vec<f32> = (0..r * in_features)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    Tensor::from_vec(data, (r, in_features), device)
}

/// The inverted-dropout mask of a LoRA input `[n, in]`, as a rule rather than data: element `i`
/// (row-major) is kept when the top 32 bits of [`mix_seed`]`(seed, i)` are at least
/// `round(p · 2^32)`, and kept values are scaled by `1 / (1 − p)`. The hash is counter-based, so
/// the CPU (rayon) and the CUDA kernel (`kernels::dropout`) drop the same elements, the mask is
/// never uploaded nor stored, and an activation-checkpoint recompute or the backward regenerates it
/// from the seed.
#[derive(Debug, Clone)]
pub struct DropoutMask {
    /// `(n, in)` of the input it applies to.
    pub shape: (usize, usize),
    pub p: f64,
    pub seed: u64,
    /// Compute dtype and device of the inputs (for [`DropoutMask::to_tensor`]).
    pub dtype: DType,
    pub device: Device,
}

impl DropoutMask {
    pub fn new(shape: (usize, usize), p: f64, seed: u64, dtype: DType, device: &Device) -> Self {
        DropoutMask {
            shape,
            p,
            seed,
            dtype,
            device: device.clone(),
        }
    }

    /// Elements whose 32-bit hash is below this are dropped (`p` rounded to 2^-32).
    pub fn threshold(&self) -> u64 {
        ((self.p * 4_294_967_296.0).round() as u64).min(u32::MAX as u64)
    }

    /// The factor of kept values, `1 / (1 − p)`.
    pub fn scale(&self) -> f64 {
        1.0 / (1.0 - self.p)
    }

    fn keeps(&self, index: u64, threshold: u64) -> bool {
        (mix_seed(self.seed, index) >> 32) >= threshold
    }

    /// The mask `[n, in]` (0 or `1/(1−p)`) in f32 (f64 for f64 inputs), on the mask's device;
    /// computed on the host in parallel. Only the CPU path and tests materialize it.
    pub fn to_tensor(&self) -> Result<Tensor> {
        let (n, cols) = self.shape;
        let threshold = self.threshold();
        let keep: Vec<u8> = (0..(n * cols) as u64)
            .into_par_iter()
            .map(|i| u8::from(self.keeps(i, threshold)))
            .collect();
        let acc = acc_dtype(self.dtype);
        let keep = Tensor::from_vec(keep, (n, cols), &self.device)?; // [n, in] u8
                                                                     // 0/1 then one multiply by the scale in the accumulation dtype: exact for both values.
        keep.to_dtype(acc)? * scale_in(acc, self.scale())
    }

    /// `x · mask` for `x [n, in]`: the product in f32 (f64 for f64 inputs), rounded once to x's
    /// dtype (as PyTorch's dropout). The CUDA kernel when `x` is on a GPU, else the host mask.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if x.dims2()? != self.shape {
            candle_core::bail!(
                "dropout mask for {:?} applied to an input of shape {:?}",
                self.shape,
                x.dims()
            );
        }
        if let Some(y) = crate::kernels::dropout::apply(x, self)? {
            return Ok(y);
        }
        let acc = acc_dtype(x.dtype());
        x.to_dtype(acc)?
            .mul(&self.to_tensor()?.to_dtype(acc)?)?
            .to_dtype(x.dtype())
    }
}

/// `scale` as the multiplier of an affine in `dtype`: f32 inputs get the f32-rounded scale (as
/// the CUDA kernel's f32 argument), f64 inputs the exact one.
fn scale_in(dtype: DType, scale: f64) -> f64 {
    if dtype == DType::F64 {
        scale
    } else {
        scale as f32 as f64
    }
}

/// The dropout mask of a LoRA input `[n, in]`, reproducible from `seed` so an activation-checkpoint
/// recompute draws the same mask. `None` when `p == 0`: no mask work at all.
pub fn dropout_mask(
    n: usize,
    in_features: usize,
    p: f64,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Option<DropoutMask>> {
    if p <= 0.0 {
        return Ok(None);
    }
    if p >= 1.0 || p.is_nan() {
        candle_core::bail!("LoRA dropout must be in [0, 1), got {p}");
    }
    Ok(Some(DropoutMask::new(
        (n, in_features),
        p,
        seed,
        dtype,
        device,
    )))
}

/// What [`lora_forward_into`] keeps for the backward.
pub struct LoraSaved {
    /// `A · dropout(x)` rows: `[n, r]` (small: r columns).
    pub ax: Tensor,
    /// The dropout rule (a seed, no data), `None` without dropout.
    pub mask: Option<DropoutMask>,
}

/// Adds the adapter's delta onto the base output in place: `y [n, out] += scale · (dropout(x) Aᵀ) Bᵀ`
/// for `x [n, in]`. On a GPU the second product is one cuBLAS call accumulating into `y` (no
/// `[n, out]` delta, scale or add pass). `y` must be a fresh contiguous tensor nothing else shares.
pub fn lora_forward_into(
    y: &Tensor,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<DropoutMask>,
) -> anyhow::Result<LoraSaved> {
    let xd = match &mask {
        Some(m) => m.apply(x)?,
        None => x.clone(),
    }; // [n, in]
    let ax = gemm(&xd, false, a, true)?; // [n, r]
    gemm_into(GemmOut::whole(y), &ax, false, b, true, scale, 1.0)?; // y += scale · ax Bᵀ
    Ok(LoraSaved { ax, mask })
}

/// The delta alone, `scale · (dropout(x) Aᵀ) Bᵀ` `[n, out]` (tests and references).
pub fn lora_forward(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<DropoutMask>,
) -> anyhow::Result<(Tensor, LoraSaved)> {
    let y = Tensor::zeros((x.dim(0)?, b.dim(0)?), x.dtype(), x.device())?; // [n, out]
    let saved = lora_forward_into(&y, x, a, b, scale, mask)?;
    Ok((y, saved))
}

/// Where [`lora_backward_into`] adds its results: the layer input's gradient `dx [n, in]` (the base
/// linear's, updated in place) and the regions of `dA [r, in]` and `dB [out, r]` in the gradient
/// buffer (accumulated there in its dtype, f32 for bf16 compute).
pub struct LoraGradsInto<'a> {
    pub dx: &'a Tensor,
    pub da: GemmOut<'a>,
    pub db: GemmOut<'a>,
}

/// Backward of [`lora_forward_into`] for upstream `dy [n, out]`: `dB += scale · dyᵀ ax`,
/// `dA += (scale · dy B)ᵀ dropout(x)`, `dx += dropout'((scale · dy B) A)`.
pub fn lora_backward_into(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    saved: &LoraSaved,
    dy: &Tensor,
    out: LoraGradsInto,
) -> anyhow::Result<()> {
    gemm_into(out.db, dy, true, &saved.ax, false, scale, 1.0)?; // [out, n] · [n, r]
    let dax = gemm_scaled(dy, false, b, false, scale)?; // scale · [n, out] · [out, r] = [n, r]
    let xd = match &saved.mask {
        Some(m) => m.apply(x)?,
        None => x.clone(),
    }; // [n, in]
    gemm_into(out.da, &dax, true, &xd, false, 1.0, 1.0)?; // [r, n] · [n, in]
    drop(xd);
    match &saved.mask {
        // d(x · mask)/dx = mask: the same rule applied to the adapter's part of the gradient.
        Some(m) => {
            let dxd = m.apply(&dax.matmul(a)?)?; // [n, in]
            crate::kernels::grad::accumulate_into(out.dx, 0, &dxd)?;
        }
        None => gemm_into(GemmOut::whole(out.dx), &dax, false, a, false, 1.0, 1.0)?, // [n, r] · [r, in]
    }
    Ok(())
}

/// Gradients of the adapter alone (`dx` its contribution only; `da`, `db` in the accumulation
/// dtype: f32, or f64 for f64 inputs).
pub struct LoraGrads {
    /// `[n, in]`
    pub dx: Tensor,
    /// `[r, in]`
    pub da: Tensor,
    /// `[out, r]`
    pub db: Tensor,
}

/// [`lora_backward_into`] into fresh zero buffers (tests and references).
pub fn lora_backward(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    saved: &LoraSaved,
    dy: &Tensor,
) -> anyhow::Result<LoraGrads> {
    let acc = acc_dtype(x.dtype());
    let dx = x.zeros_like()?;
    let da = Tensor::zeros(a.dims(), acc, a.device())?;
    let db = Tensor::zeros(b.dims(), acc, b.device())?;
    let out = LoraGradsInto {
        dx: &dx,
        da: GemmOut::whole(&da),
        db: GemmOut::whole(&db),
    };
    lora_backward_into(x, a, b, scale, saved, dy, out)?;
    Ok(LoraGrads { dx, da, db })
}
