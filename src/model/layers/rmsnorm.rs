//! RMSNorm (HF Llama semantics): `y = w · cast(x / sqrt(mean(x²) + eps))`, statistics computed in
//! [`acc_dtype`] even for bf16 inputs. On CUDA each direction is one fused kernel
//! (`kernels::rmsnorm`); the candle-ops code here is its reference.

use super::acc_dtype;
use candle_core::{Result, Tensor, D};

/// Returns `(y [n, h] in x's dtype, rstd [n, 1] in acc dtype)` for `x [n, h]`, `w [h]`.
pub fn rmsnorm_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    if let Some(r) = crate::kernels::rmsnorm::forward(x, w, eps)? {
        return Ok(r);
    }
    let dtype = x.dtype();
    let xf = x.to_dtype(acc_dtype(dtype))?; // [n, h]
    let rstd = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?; // [n, 1]
    let xhat = xf.broadcast_mul(&rstd)?.to_dtype(dtype)?; // [n, h]
    let y = xhat.broadcast_mul(w)?;
    Ok((y, rstd))
}

/// Backward of [`rmsnorm_forward`] for upstream `dy [n, h]`.
/// Returns `(dx [n, h] in x's dtype, dw [h] in acc dtype when `need_dw`)`.
/// With `xhat = x · rstd`, `g = dy · w`: `dx = rstd · (g − xhat · mean(g · xhat))`, `dw = Σ_n dy · xhat`.
pub fn rmsnorm_backward(
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    need_dw: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    if let Some(r) = crate::kernels::rmsnorm::backward(x, w, rstd, dy, need_dw)? {
        return Ok(r);
    }
    let dtype = x.dtype();
    let acc = acc_dtype(dtype);
    let xhat = x.to_dtype(acc)?.broadcast_mul(rstd)?; // [n, h]
    let dyf = dy.to_dtype(acc)?; // [n, h]
    let g = dyf.broadcast_mul(&w.to_dtype(acc)?)?; // [n, h]
    let proj = (&g * &xhat)?.mean_keepdim(D::Minus1)?; // [n, 1]
    let dx = (g - xhat.broadcast_mul(&proj)?)?
        .broadcast_mul(rstd)?
        .to_dtype(dtype)?;
    let dw = if need_dw {
        Some((dyf * xhat)?.sum(0)?) // [h]
    } else {
        None
    };
    Ok((dx, dw))
}
