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
pub mod gelu;
pub mod layernorm;
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

/// splitmix64 finalizer over `a ^ f(b)`: independent, reproducible seeds for (step, layer,
/// linear, chunk) without any shared RNG state.
pub fn mix_seed(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
