//! LayerNorm with weight and bias (PyTorch `nn.LayerNorm` semantics, as CLIP's vision tower uses
//! it): `y = w · cast((x − mean) / sqrt(var + eps)) + b`, biased variance, statistics in
//! [`acc_dtype`] even for bf16 inputs.

use super::acc_dtype;
use candle_core::{Result, Tensor, D};

/// What [`layernorm_backward`] needs besides the input: the row statistics `[n, 1]` (acc dtype).
pub struct LayerNormStats {
    pub mean: Tensor,
    pub rstd: Tensor,
}

/// Returns `(y [n, h] in x's dtype, stats)` for `x [n, h]`, `w, b [h]`.
pub fn layernorm_forward(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<(Tensor, LayerNormStats)> {
    let dtype = x.dtype();
    let xf = x.to_dtype(acc_dtype(dtype))?; // [n, h]
    let mean = xf.mean_keepdim(D::Minus1)?; // [n, 1]
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?; // [n, 1], biased as PyTorch
    let rstd = (var + eps)?.sqrt()?.recip()?;
    let xhat = centered.broadcast_mul(&rstd)?.to_dtype(dtype)?; // [n, h]
    let y = xhat.broadcast_mul(w)?.broadcast_add(b)?;
    Ok((y, LayerNormStats { mean, rstd }))
}

/// Gradients of a LayerNorm; `dw`/`db` only when asked for (a frozen norm computes none).
pub struct LayerNormGrads {
    /// `[n, h]` in x's dtype.
    pub dx: Tensor,
    /// `([h], [h])` in acc dtype.
    pub dw_db: Option<(Tensor, Tensor)>,
}

/// Backward of [`layernorm_forward`] for upstream `dy [n, h]`. With `xhat = (x − mean) · rstd`
/// and `g = dy · w`: `dx = rstd · (g − mean(g) − xhat · mean(g · xhat))`, `dw = Σ_n dy · xhat`,
/// `db = Σ_n dy`.
pub fn layernorm_backward(
    x: &Tensor,
    w: &Tensor,
    stats: &LayerNormStats,
    dy: &Tensor,
    need_dw: bool,
) -> Result<LayerNormGrads> {
    let dtype = x.dtype();
    let acc = acc_dtype(dtype);
    let xhat = x
        .to_dtype(acc)?
        .broadcast_sub(&stats.mean)?
        .broadcast_mul(&stats.rstd)?; // [n, h]
    let dyf = dy.to_dtype(acc)?; // [n, h]
    let g = dyf.broadcast_mul(&w.to_dtype(acc)?)?; // [n, h]
    let g_mean = g.mean_keepdim(D::Minus1)?; // [n, 1]
    let proj = (&g * &xhat)?.mean_keepdim(D::Minus1)?; // [n, 1]
    let dx = g
        .broadcast_sub(&g_mean)?
        .sub(&xhat.broadcast_mul(&proj)?)?
        .broadcast_mul(&stats.rstd)?
        .to_dtype(dtype)?;
    let dw_db = if need_dw {
        Some(((&dyf * &xhat)?.sum(0)?, dyf.sum(0)?)) // [h], [h]
    } else {
        None
    };
    Ok(LayerNormGrads { dx, dw_db })
}
