//! LoRA adapter with PEFT semantics: `delta_y = scale · B(A(dropout(x)))`, `scale = alpha / r`,
//! `A [r, in]` kaiming-uniform(a = sqrt 5) like `nn.Linear`'s default, `B [out, r]` zero.
//! The base linear is computed separately (see [`super::linear`]); the adapter only makes its delta,
//! for the projections that read one input at once (their `A`s stacked).

use super::{acc_dtype, mix_seed};
use crate::kernels::gemm::{gemm, gemm_into, gemm_output, gemm_scaled, GemmOut};
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

/// What [`lora_group_forward`] keeps for the backward.
pub struct LoraSaved {
    /// `A · dropout(x)ᵀ`: `[G·r, n]`, each adapter's `r` rows in turn (small: G·r rows). Stored
    /// transposed so that every adapter's part is a contiguous row block.
    pub axt: Tensor,
    /// The dropout rule (a seed, no data), `None` without dropout.
    pub mask: Option<DropoutMask>,
}

/// Rows of each adapter in a stacked `a [G·r, in]` for `bs.len() = G` adapters `B_i [out_i, r]`.
fn group_rank(a: &Tensor, bs: &[&Tensor]) -> Result<usize> {
    let rows = a.dim(0)?;
    let r = rows / bs.len().max(1);
    if bs.is_empty() || r * bs.len() != rows || bs.iter().any(|b| b.dim(1).ok() != Some(r)) {
        candle_core::bail!(
            "LoRA group: stacked A has {rows} rows for B's of shapes {:?}",
            bs.iter().map(|b| b.dims().to_vec()).collect::<Vec<_>>()
        );
    }
    Ok(r)
}

/// The adapters of the `G` projections that read the same input `x [n, in]` (q/k/v, gate/up, or
/// one alone), with their `A`s stacked as `a [G·r, in]` (adjacent trainables: one view):
/// returns each adapter's delta `y_i [n, out_i] = scale · (dropout(x) A_iᵀ) B_iᵀ` as a fresh
/// tensor. One GEMM reads `x` for the whole group; the base projections then add onto the
/// deltas (their GEMMs read the output in the epilogue, overlapped with their math, where a
/// delta added afterwards would be one more pass over each output).
pub fn lora_group_forward(
    x: &Tensor,
    a: &Tensor,
    bs: &[&Tensor],
    scale: f64,
    mask: Option<DropoutMask>,
) -> anyhow::Result<(Vec<Tensor>, LoraSaved)> {
    let r = group_rank(a, bs)?;
    let xd = match &mask {
        Some(m) => m.apply(x)?,
        None => x.clone(),
    }; // [n, in]
    let axt = gemm(a, false, &xd, true)?; // [G·r, in] · [in, n] = [G·r, n]
    let ys = bs
        .iter()
        .enumerate()
        .map(|(i, b)| gemm_scaled(&axt.narrow(0, i * r, r)?, true, b, true, scale)) // [n, out_i]
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((ys, LoraSaved { axt, mask }))
}

/// Where [`lora_group_backward`] adds the group's weight gradients (in the gradient buffer's
/// dtype, f32 for bf16 compute): `dA [G·r, in]` (the stacked A's adjacent slots) and each `dB_i`.
pub struct LoraGroupGrads<'a> {
    pub da: GemmOut<'a>,
    pub dbs: Vec<GemmOut<'a>>,
}

/// Backward of [`lora_group_forward`] for upstream `dys[i] [n, out_i]`: `dB_i += scale · dy_iᵀ
/// ax_i`, `dA += (scale · dy B)ᵀ dropout(x)` (one GEMM for the group), and returns the adapters'
/// part of the input gradient, `dropout'((scale · dy B) A)` `[n, in]`, as a fresh tensor (one
/// GEMM for the group; the base projections add theirs onto it).
pub fn lora_group_backward(
    x: &Tensor,
    a: &Tensor,
    bs: &[&Tensor],
    scale: f64,
    saved: &LoraSaved,
    dys: &[&Tensor],
    out: LoraGroupGrads,
) -> anyhow::Result<Tensor> {
    let r = group_rank(a, bs)?;
    if dys.len() != bs.len() || out.dbs.len() != bs.len() {
        anyhow::bail!(
            "LoRA group of {} adapters got {} upstream gradients and {} dB outputs",
            bs.len(),
            dys.len(),
            out.dbs.len()
        );
    }
    let n = x.dim(0)?;
    let daxt = gemm_output(x, a.dim(0)?, n)?; // [G·r, n], every row block written below
    for (i, (b, dy)) in bs.iter().zip(dys).enumerate() {
        let axt_i = saved.axt.narrow(0, i * r, r)?; // [r, n]
        gemm_into(out.dbs[i], dy, true, &axt_i, true, scale, 1.0)?; // [out, n] · [n, r]
        let daxt_i = GemmOut {
            buf: &daxt,
            offset: i * r * n,
        };
        gemm_into(daxt_i, b, true, dy, true, scale, 0.0)?; // scale · [r, out] · [out, n]
    }
    let xd = match &saved.mask {
        Some(m) => m.apply(x)?,
        None => x.clone(),
    }; // [n, in]
    gemm_into(out.da, &daxt, false, &xd, false, 1.0, 1.0)?; // [G·r, n] · [n, in]
    drop(xd);
    let dxd = gemm(&daxt, true, a, false)?; // [n, G·r] · [G·r, in] = [n, in]
    Ok(match &saved.mask {
        // d(x · mask)/dx = mask: the same rule applied to the adapter's part of the gradient.
        Some(m) => m.apply(&dxd)?,
        None => dxd,
    })
}

/// One adapter's delta alone, `scale · (dropout(x) Aᵀ) Bᵀ` `[n, out]` (vision tower, tests).
pub fn lora_forward(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<DropoutMask>,
) -> anyhow::Result<(Tensor, LoraSaved)> {
    let (mut ys, saved) = lora_group_forward(x, a, &[b], scale, mask)?;
    Ok((ys.remove(0), saved))
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

/// [`lora_forward`]'s backward into fresh zero buffers (vision tower, tests).
pub fn lora_backward(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    saved: &LoraSaved,
    dy: &Tensor,
) -> anyhow::Result<LoraGrads> {
    let acc = acc_dtype(x.dtype());
    let da = Tensor::zeros(a.dims(), acc, a.device())?;
    let db = Tensor::zeros(b.dims(), acc, b.device())?;
    let out = LoraGroupGrads {
        da: GemmOut::whole(&da),
        dbs: vec![GemmOut::whole(&db)],
    };
    let dx = lora_group_backward(x, a, &[b], scale, saved, &[dy], out)?;
    Ok(LoraGrads { dx, da, db })
}
