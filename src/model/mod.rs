//! Llama-family decoders (Llama 2/3, Qwen2, InternLM2): config, weights, and the per-module
//! forward/backward pairs the engine trains with.

pub mod config;
pub mod decoder;
pub mod demo;
pub mod layers;
pub mod llava;
pub mod tiny_clip;
pub mod vision;
pub mod weights;

pub use config::{Arch, ModelConfig, RopeScaling};

use candle_core::{Result, Tensor};

/// Views of a flat `[N]` buffer as tensors of `shapes`, laid out one after another from its start
/// (the optimizer's layout of the trainables). `flat` must hold at least their total size.
pub fn flat_views<'a>(
    flat: &Tensor,
    shapes: impl IntoIterator<Item = &'a [usize]>,
) -> Result<Vec<Tensor>> {
    let mut offset = 0;
    shapes
        .into_iter()
        .map(|shape| {
            let n = shape.iter().product::<usize>();
            let view = flat.narrow(0, offset, n)?.reshape(shape)?;
            offset += n;
            Ok(view)
        })
        .collect()
}
