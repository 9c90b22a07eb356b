//! LoRA adapter with PEFT semantics: `delta_y = scale · B(A(dropout(x)))`, `scale = alpha / r`,
//! `A [r, in]` kaiming-uniform(a = sqrt 5) like `nn.Linear`'s default, `B [out, r]` zero.
//! The base linear is computed separately (see [`super::linear`]); the adapter only adds its delta.

use super::mix_seed;
use candle_core::{DType, Device, Result, Tensor};
use rand::{Rng, RngCore, SeedableRng};
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

/// Elements per independently seeded RNG stream of a dropout mask: chunks are drawn in parallel
/// and the result does not depend on the thread count.
const MASK_CHUNK: usize = 1 << 16;

/// Inverted-dropout mask `[n, in]` (entries 0 or `1 / (1 - p)`), reproducible from `seed` so an
/// activation-checkpoint recompute draws the same mask. `None` when `p == 0`: no mask work at all.
/// Drawn on the host (16-bit uniforms, so the drop probability is `p` rounded to 1/65536) and
/// uploaded as bytes.
pub fn dropout_mask(
    n: usize,
    in_features: usize,
    p: f64,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    if p <= 0.0 {
        return Ok(None);
    }
    let threshold = (p * 65536.0).round() as u32;
    let mut keep = vec![0u8; n * in_features];
    keep.par_chunks_mut(MASK_CHUNK)
        .enumerate()
        .for_each(|(chunk_idx, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(seed, chunk_idx as u64));
            for quad in chunk.chunks_mut(4) {
                let bits = rng.next_u64();
                for (j, k) in quad.iter_mut().enumerate() {
                    let u = ((bits >> (16 * j)) & 0xFFFF) as u32;
                    *k = u8::from(u >= threshold);
                }
            }
        });
    let keep = Tensor::from_vec(keep, (n, in_features), device)?; // [n, in] u8
    (keep.to_dtype(dtype)? * (1.0 / (1.0 - p))).map(Some)
}

/// What [`lora_forward`] keeps for the backward.
pub struct LoraSaved {
    /// `A · dropout(x)` rows: `[n, r]` (small: r columns).
    pub ax: Tensor,
    /// The dropout mask `[n, in]`, `None` without dropout.
    pub mask: Option<Tensor>,
}

/// Returns `delta_y [n, out] = scale · (dropout(x) A^T) B^T` for `x [n, in]`.
pub fn lora_forward(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Tensor>,
) -> Result<(Tensor, LoraSaved)> {
    let xd = match &mask {
        Some(m) => x.mul(m)?,
        None => x.clone(),
    }; // [n, in]
    let ax = xd.matmul(&a.t()?)?; // [n, r]
    let dy = (ax.matmul(&b.t()?)? * scale)?; // [n, out]
    Ok((dy, LoraSaved { ax, mask }))
}

/// Gradients of the adapter (compute dtype).
pub struct LoraGrads {
    /// Contribution to the layer input's gradient, `[n, in]`.
    pub dx: Tensor,
    /// `[r, in]`
    pub da: Tensor,
    /// `[out, r]`
    pub db: Tensor,
}

/// Backward of [`lora_forward`] for upstream `dy [n, out]`.
pub fn lora_backward(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    saved: &LoraSaved,
    dy: &Tensor,
) -> Result<LoraGrads> {
    let xd = match &saved.mask {
        Some(m) => x.mul(m)?,
        None => x.clone(),
    }; // [n, in]
    let db = (dy.t()?.matmul(&saved.ax)? * scale)?; // [out, n] · [n, r] = [out, r]
    let dax = (dy.matmul(b)? * scale)?; // [n, out] · [out, r] = [n, r]
    let da = dax.t()?.matmul(&xd)?; // [r, n] · [n, in] = [r, in]
    let dxd = dax.matmul(a)?; // [n, r] · [r, in] = [n, in]
    let dx = match &saved.mask {
        Some(m) => dxd.mul(m)?,
        None => dxd,
    };
    Ok(LoraGrads { dx, da, db })
}
