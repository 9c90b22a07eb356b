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
