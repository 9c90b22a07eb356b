//! The SwiGLU gate of the MLP, `h = silu(g) · u`, between the gate/up and down projections
//! (the projections themselves are linears, see [`super::linear`]). On CUDA each direction is one
//! fused kernel (`kernels::swiglu`); the candle-ops code here is its reference.

use candle_core::{Result, Tensor};

/// `h [n, i] = silu(g) · u` for gate and up projections `g, u [n, i]`.
pub fn swiglu_forward(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if let Some(h) = crate::kernels::swiglu::forward(g, u)? {
        return Ok(h);
    }
    g.silu()? * u
}

/// Backward for upstream `dh [n, i]`: `du = dh · silu(g)`,
/// `dg = dh · u · σ(g) · (1 + g · (1 − σ(g)))`. Returns `(dg, du)`.
pub fn swiglu_backward(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    if let Some(r) = crate::kernels::swiglu::backward(g, u, dh)? {
        return Ok(r);
    }
    let sig = candle_nn::ops::sigmoid(g)?; // [n, i]
    let silu = (g * &sig)?;
    let du = (dh * &silu)?;
    // σ(g)·(1 + g·(1 − σ(g))) = σ(g) + silu(g)·(1 − σ(g))
    let dsilu = (&sig + silu * sig.affine(-1.0, 1.0)?)?;
    let dg = ((dh * u)? * dsilu)?;
    Ok((dg, du))
}
