//! Loading a model for inference: HF directory + optional PEFT adapter, in the compute dtype or
//! with 4-bit NF4 block linears (`--bits 4`).

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::Path;

use crate::export::{merge_into, read_adapter};
use crate::model::decoder::{Decoder, LoraSpec, QuantSpec, TrainMode};
use crate::model::weights::{load_weights, LazyCheckpoint};
use crate::model::ModelConfig;
use crate::tokenizer::Tokenizer;
use crate::train::trainer::{compute_dtype, select_device};

/// A decoder with no trainable tensors and the model's tokenizer; the adapter is merged in memory.
pub fn load_for_inference(
    model_dir: &Path,
    adapter: Option<&Path>,
    device: &str,
) -> Result<(Decoder, Tokenizer)> {
    load_for_inference_bits(model_dir, adapter, device, None)
}

/// As [`load_for_inference`]; with `bits = Some(4)` every block linear is quantized to NF4 (double
/// quantization) while streaming the checkpoint in, and an adapter stays unmerged on top of the
/// quantized base, which is the model a QLoRA adapter was trained against.
pub fn load_for_inference_bits(
    model_dir: &Path,
    adapter: Option<&Path>,
    device: &str,
    bits: Option<u32>,
) -> Result<(Decoder, Tokenizer)> {
    let device = select_device(device)?;
    let dtype = compute_dtype("auto", &device);
    let cfg = ModelConfig::from_dir(model_dir)?;
    let tokenizer = Tokenizer::from_path(model_dir)?;
    match bits {
        None => {
            let mut weights = load_weights(model_dir, dtype, &device, |_| true)?;
            if let Some(dir) = adapter {
                let (acfg, lora) = read_adapter(dir)?;
                merge_into(&mut weights, &acfg, &lora)?;
            }
            let model = Decoder::new(&cfg, &mut weights, TrainMode::Frozen, dtype, &device, 0)?;
            Ok((model, tokenizer))
        }
        Some(4) => {
            let mut source = LazyCheckpoint::open(model_dir)?;
            let quant = Some(QuantSpec { double_quant: true });
            let Some(dir) = adapter else {
                let model = Decoder::new_quantized(
                    &cfg,
                    &mut source,
                    TrainMode::Frozen,
                    quant,
                    dtype,
                    &device,
                    0,
                )?;
                return Ok((model, tokenizer));
            };
            let (acfg, lora) = read_adapter(dir)?;
            // Targets: the leaf module names the adapter has tensors for.
            let targets: BTreeSet<String> = lora
                .keys()
                .filter_map(|k| k.strip_suffix(".lora_A.weight"))
                .filter_map(|m| m.rsplit('.').next())
                .map(String::from)
                .collect();
            let spec = LoraSpec {
                r: acfg.r,
                alpha: acfg.alpha,
                dropout: 0.0,
                targets: targets.into_iter().collect(),
            };
            let mut model = Decoder::new_quantized(
                &cfg,
                &mut source,
                TrainMode::Lora(spec),
                quant,
                dtype,
                &device,
                0,
            )?;
            let values = model
                .trainable()
                .iter()
                .map(|t| {
                    lora.get(&t.name).cloned().with_context(|| {
                        format!("{}: the adapter has no tensor `{}`", dir.display(), t.name)
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if values.len() != lora.len() {
                bail!(
                    "{}: the adapter has {} tensors, this model takes {} for its targets",
                    dir.display(),
                    lora.len(),
                    values.len()
                );
            }
            model.set_trainable(&values)?;
            Ok((model, tokenizer))
        }
        Some(b) => bail!("--bits {b}: only 4 (NF4, as bitsandbytes QLoRA) is supported"),
    }
}
