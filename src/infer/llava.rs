//! Chat about an image, as XTuner's `chat MODEL --visual-encoder CLIP --llava DIR --image PATH`:
//! the image goes through the tower (its adapter merged) and the projector once, and the first
//! turn's prompt carries `<image>\n` before the question, tokenized in chunks around the marker
//! as in training; the marker's placeholder is replaced by the image rows when the prompt is fed.
//!
//! [`LlavaChat`] is both the model and the text codec of a [`super::ChatSession`]: the codec
//! turns the first `<image>` of a conversation into the placeholder (later turns' markers are
//! dropped), and a new conversation (`RESET`) places the image again.

use crate::data::image::ClipPreprocess;
use crate::data::{IMAGE_TOKEN, IMAGE_TOKEN_ID};
use crate::export::{merge_into, read_adapter};
use crate::infer::load::load_for_inference_bits;
use crate::infer::{CausalLm, ChatFormat, TextCodec};
use crate::model::decoder::{Decoder, KvCache};
use crate::model::llava::Projector;
use crate::model::vision::{ClipVision, ClipVisionConfig};
use crate::model::weights::load_weights;
use crate::tokenizer::Tokenizer;
use crate::train::llava::load_projector;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;

/// The LLM, the tokenizer and the image rows of one image.
pub struct LlavaChat {
    pub decoder: Decoder,
    tokenizer: Tokenizer,
    /// `[N, H]`: the projected features of the image (None: chat without an image).
    image_rows: Option<Tensor>,
    /// Whether this conversation's prompt already holds the image.
    placed: Cell<bool>,
}

/// Where a LLaVA model's parts are: the LLM, the CLIP tower, and the exported LLaVA directory
/// (`projector/`, and `llm_adapter/` or `llm/`, `visual_encoder_adapter/` when trained).
pub struct LlavaPaths<'a> {
    pub llm: &'a Path,
    pub visual_encoder: &'a Path,
    pub llava: &'a Path,
    /// An LLM adapter given on the command line (when the LLaVA directory has none).
    pub adapter: Option<&'a Path>,
}

impl LlavaChat {
    /// Loads the model and preprocesses `image` (padded to a square with the mean colour, as the
    /// finetune stage trains), all on `device` (`--device`), the LLM in 4 bits with `bits`.
    pub fn load(
        paths: &LlavaPaths,
        image: Option<&Path>,
        device: &str,
        bits: Option<u32>,
    ) -> Result<LlavaChat> {
        let full_llm = paths.llava.join("llm");
        let llm_adapter = paths.llava.join("llm_adapter");
        let (llm, adapter) = if full_llm.join("config.json").is_file() {
            (full_llm.as_path(), None)
        } else if llm_adapter.join("adapter_config.json").is_file() {
            (paths.llm, Some(llm_adapter.as_path()))
        } else {
            (paths.llm, paths.adapter)
        };
        let (decoder, tokenizer) = load_for_inference_bits(llm, adapter, device, bits)?;
        let projector = load_projector(&paths.llava.join("projector"), decoder.device())
            .with_context(|| format!("{}: the LLaVA directory", paths.llava.display()))?;
        let image_rows = match image {
            Some(path) => {
                let tower = load_tower(
                    paths.visual_encoder,
                    &paths.llava.join("visual_encoder_adapter"),
                    &decoder,
                )?;
                let pre = ClipPreprocess::clip(tower.config().image_size as u32, true);
                let pixels = pre.load(path, decoder.device())?.unsqueeze(0)?; // [1, 3, S, S]
                Some(image_rows(&tower, &projector, &pixels)?)
            }
            None => None,
        };
        Ok(LlavaChat {
            decoder,
            tokenizer,
            image_rows,
            placed: Cell::new(false),
        })
    }

    /// A chat over `decoder` with the given image rows `[N, H]` (tests, other front ends).
    pub fn new(decoder: Decoder, tokenizer: Tokenizer, image_rows: Option<Tensor>) -> Self {
        LlavaChat {
            decoder,
            tokenizer,
            image_rows,
            placed: Cell::new(false),
        }
    }

    /// `format` with `<image>\n` before each turn's input when there is an image (only the
    /// first turn's becomes the image; the codec drops the others).
    pub fn chat_format(&self, format: ChatFormat) -> ChatFormat {
        if self.image_rows.is_none() {
            return format;
        }
        ChatFormat {
            instruction: format
                .instruction
                .replace("{input}", &format!("{IMAGE_TOKEN}\n{{input}}")),
            ..format
        }
    }
}

/// The CLIP tower in the LLM's dtype with its PEFT adapter merged (when the directory exists).
fn load_tower(dir: &Path, adapter: &Path, decoder: &Decoder) -> Result<ClipVision> {
    let cfg = ClipVisionConfig::from_dir(dir)?;
    let (dtype, device) = (decoder.compute_dtype(), decoder.device());
    let mut weights: HashMap<String, Tensor> = load_weights(dir, dtype, device, |_| true)?
        .into_iter()
        // One naming for the merge: CLIPModel / transformers 4 keys carry `vision_model.`.
        .map(|(k, t)| match k.starts_with("vision_model.") {
            true => (k, t),
            false => (format!("vision_model.{k}"), t),
        })
        .collect();
    if adapter.join("adapter_config.json").is_file() {
        let (acfg, lora) = read_adapter(adapter)?;
        merge_into(&mut weights, &acfg, &lora)
            .with_context(|| format!("merging {} into the tower", adapter.display()))?;
    }
    ClipVision::new(&cfg, &mut weights, -2, dtype, device)
        .with_context(|| format!("vision tower {}", dir.display()))
}

/// The projected features `[N, H]` of one image `pixels [1, 3, S, S]`.
pub fn image_rows(tower: &ClipVision, projector: &Projector, pixels: &Tensor) -> Result<Tensor> {
    let feats = tower.forward(pixels)?; // [1, N, V]
    let (_, n, v) = feats.dims3()?;
    Ok(projector.forward(&feats.reshape((n, v))?)?.0)
}

impl TextCodec for LlavaChat {
    /// The conversation's first `<image>` becomes [`IMAGE_TOKEN_ID`] between the separately
    /// tokenized text around it; other markers (later turns) are dropped with their newline.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        if self.image_rows.is_none() || !text.contains(IMAGE_TOKEN) {
            return self.tokenizer.encode(text, add_special_tokens);
        }
        let drop_markers = |s: &str| {
            s.replace(&format!("{IMAGE_TOKEN}\n"), "")
                .replace(IMAGE_TOKEN, "")
        };
        if self.placed.get() {
            return self
                .tokenizer
                .encode(&drop_markers(text), add_special_tokens);
        }
        self.placed.set(true);
        let (before, after) = text.split_once(IMAGE_TOKEN).expect("contains the marker");
        let mut ids = self.tokenizer.encode(before, add_special_tokens)?;
        ids.push(IMAGE_TOKEN_ID);
        ids.extend(self.tokenizer.encode(&drop_markers(after), false)?);
        Ok(ids)
    }
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&t| t != IMAGE_TOKEN_ID)
            .collect();
        self.tokenizer.decode(&ids, skip_special_tokens)
    }
    fn token_to_id(&self, token: &str) -> Option<u32> {
        TextCodec::token_to_id(&self.tokenizer, token)
    }
    fn bos_id(&self) -> Option<u32> {
        self.tokenizer.bos_id()
    }
    fn eos_id(&self) -> Option<u32> {
        self.tokenizer.eos_id()
    }
}

impl CausalLm for LlavaChat {
    type Cache = KvCache;

    /// A new conversation: its first `<image>` places the image again.
    fn new_cache(&self) -> KvCache {
        self.placed.set(false);
        self.decoder.new_cache()
    }

    /// Tokens with the image placeholder are fed as embeddings with the image rows in its place.
    fn forward_infer(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let Some(p) = ids.iter().position(|&t| t == IMAGE_TOKEN_ID) else {
            return self.decoder.forward_infer(ids, cache);
        };
        let rows = self
            .image_rows
            .as_ref()
            .context("an image placeholder without an image")?;
        if ids[p + 1..].contains(&IMAGE_TOKEN_ID) {
            bail!("a prompt with more than one image placeholder");
        }
        let mut parts = Vec::with_capacity(3);
        if p > 0 {
            parts.push(self.decoder.embed(&ids[..p])?);
        }
        parts.push(rows.to_dtype(self.decoder.compute_dtype())?);
        if p + 1 < ids.len() {
            parts.push(self.decoder.embed(&ids[p + 1..])?);
        }
        self.decoder
            .forward_infer_embeds(&Tensor::cat(&parts, 0)?, cache)
    }

    fn cache_len(cache: &KvCache) -> usize {
        <Decoder as CausalLm>::cache_len(cache)
    }

    fn vocab_size(&self) -> usize {
        CausalLm::vocab_size(&self.decoder)
    }
}
