//! ftrun: a fine-tuning trainer for LLMs and multimodal LLMs in one binary.
//! docs/ARCHITECTURE.md maps the modules.

pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod export;
pub mod fsutil;
pub mod infer;
pub mod kernels;
pub mod model;
pub mod quant;
pub mod tokenizer;
pub mod train;
