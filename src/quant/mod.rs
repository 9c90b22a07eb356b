//! Weight quantization for QLoRA base weights.
//!
//! `nf4` reproduces bitsandbytes' NF4 format (4-bit NormalFloat codes, blockwise fp32 absmax,
//! optional double quantization of the absmax) bit for bit, and reads/writes the tensors that
//! bitsandbytes / transformers save for a 4-bit model.

pub mod device;
pub mod nf4;

pub use device::{DeviceAbsmax, Nf4Weight};
pub use nf4::{dequantize_nf4, quantize_nf4, quantized_bytes, Absmax, Nf4Tensor};
