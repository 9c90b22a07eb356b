//! Linear layer: `y = x W^T (+ b)` with `x [n, in]`, `W [out, in]`, `b [out]`.

use crate::kernels::gemm::gemm;
use anyhow::Result;
use candle_core::Tensor;

/// `y [n, out] = x [n, in] · W^T (+ b)`.
pub fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = gemm(x, false, w, true)?; // [n, out]
    match b {
        Some(b) => Ok(y.broadcast_add(b)?),
        None => Ok(y),
    }
}

/// Gradients of a linear layer. Fields are `None` when not requested.
pub struct LinearGrads {
    /// `[n, in]`, compute dtype.
    pub dx: Option<Tensor>,
    /// `[out, in]`, compute dtype (the caller casts to its gradient dtype).
    pub dw: Option<Tensor>,
    /// `[out]`, compute dtype.
    pub db: Option<Tensor>,
}

/// Backward of [`linear_forward`] for upstream `dy [n, out]`.
/// A frozen weight passes `need_dw = false`: its `dW = dy^T x` is then never computed, which is
/// what makes LoRA cost 4N instead of 6N FLOPs per token.
pub fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> Result<LinearGrads> {
    let dx = if need_dx {
        Some(gemm(dy, false, w, false)?) // [n, out] · [out, in] = [n, in]
    } else {
        None
    };
    let dw = if need_dw {
        Some(gemm(dy, true, x, false)?) // [out, n] · [n, in] = [out, in]
    } else {
        None
    };
    let db = if need_db {
        Some(dy.sum(0)?) // [out]
    } else {
        None
    };
    Ok(LinearGrads { dx, dw, db })
}
