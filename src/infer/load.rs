//! Loading a model for inference: HF directory + optional PEFT adapter (merged in memory).

use anyhow::Result;
use std::path::Path;

use crate::export::{merge_into, read_adapter};
use crate::model::decoder::{Decoder, TrainMode};
use crate::model::{weights::load_weights, ModelConfig};
use crate::tokenizer::Tokenizer;
use crate::train::trainer::{compute_dtype, select_device};

/// A decoder with no trainable tensors and the model's tokenizer.
pub fn load_for_inference(
    model_dir: &Path,
    adapter: Option<&Path>,
    device: &str,
) -> Result<(Decoder, Tokenizer)> {
    let device = select_device(device)?;
    let dtype = compute_dtype("auto", &device);
    let cfg = ModelConfig::from_dir(model_dir)?;
    let tokenizer = Tokenizer::from_path(model_dir)?;
    let mut weights = load_weights(model_dir, dtype, &device, |_| true)?;
    if let Some(dir) = adapter {
        let (acfg, lora) = read_adapter(dir)?;
        merge_into(&mut weights, &acfg, &lora)?;
    }
    let model = Decoder::new(&cfg, &mut weights, TrainMode::Frozen, dtype, &device, 0)?;
    Ok((model, tokenizer))
}
