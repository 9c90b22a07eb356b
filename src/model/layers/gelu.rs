//! The GELU activations of the multimodal parts: the exact (erf) GELU of `nn.GELU()` (LLaVA's
//! projector) and CLIP's `quick_gelu`, `x · σ(1.702 x)`. Derivatives are computed in
//! [`acc_dtype`].

use super::acc_dtype;
use candle_core::{Result, Tensor};
use std::f64::consts::PI;

/// `y = gelu(x)` with the exact (erf) GELU.
pub fn gelu_forward(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// `dx = dy · (Φ(x) + x φ(x))`.
pub fn gelu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let acc = acc_dtype(x.dtype());
    let xf = x.to_dtype(acc)?;
    let cdf = ((&xf / 2f64.sqrt())?.erf()? + 1.0)? * 0.5; // Φ(x)
    let pdf = ((xf.sqr()? * -0.5)?.exp()? / (2.0 * PI).sqrt())?; // φ(x)
    let local = (cdf? + (xf * pdf)?)?;
    (dy.to_dtype(acc)? * local)?.to_dtype(dy.dtype())
}

/// CLIP's quick_gelu coefficient.
const QUICK_GELU_ALPHA: f64 = 1.702;

/// `y = x · σ(1.702 x)`.
pub fn quick_gelu_forward(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * QUICK_GELU_ALPHA)?)?
}

/// `dx = dy · σ(a x) · (1 + a x · (1 − σ(a x)))` with `a = 1.702`.
pub fn quick_gelu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let acc = acc_dtype(x.dtype());
    let ax = (x.to_dtype(acc)? * QUICK_GELU_ALPHA)?;
    let sig = candle_nn::ops::sigmoid(&ax)?;
    let local = (&sig * (ax * sig.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)?;
    (dy.to_dtype(acc)? * local)?.to_dtype(dy.dtype())
}
