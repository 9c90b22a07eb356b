//! One file per decoder module, each with a hand-derived `forward` and `backward` side by side
//! (llm.c style), built only from candle tensor ops so the same code runs on CPU and CUDA.
//!
//! No candle autograd is used here: a backward computes exactly the gradients asked for (a frozen
//! weight's dW is never computed) and the caller decides what to keep for recomputation.
//! Conventions: activations are row-major `[tokens, features]`; "compute dtype" is the dtype of the
//! weights and activations (bf16 on GPU, f32/f64 on CPU); reductions, norms, softmax and the loss run
//! in [`acc_dtype`].

pub mod attention;
pub mod embedding;
pub mod linear;
pub mod lm_head;
pub mod lora;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

use candle_core::DType;

/// The dtype of numerically sensitive work (norm statistics, softmax, loss, gradients of trained
/// parameters): f32, or f64 when the compute dtype is already f64 (CPU reference tests).
pub fn acc_dtype(compute: DType) -> DType {
    if compute == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
