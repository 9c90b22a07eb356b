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
use crate::model::decoder::{Decoder, KvCache, TrainMode};
use crate::model::llava::Projector;
use crate::model::vision::{ClipVision, ClipVisionConfig};
use crate::model::weights::load_weights;
use crate::model::ModelConfig;
use crate::tokenizer::Tokenizer;
use crate::train::llava::load_projector;
use crate::train::trainer::{compute_dtype, select_device};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

impl LlavaPaths<'_> {
    /// The LLM to load and the adapter to merge into it: the LLaVA directory's full `llm/`,
    /// else the base LLM with the directory's `llm_adapter/`, else with the command line's.
    pub fn resolve_llm(&self) -> (PathBuf, Option<PathBuf>) {
        let full_llm = self.llava.join("llm");
        let llm_adapter = self.llava.join("llm_adapter");
        if full_llm.join("config.json").is_file() {
            (full_llm, None)
        } else if llm_adapter.join("adapter_config.json").is_file() {
            (self.llm.to_path_buf(), Some(llm_adapter))
        } else {
            (self.llm.to_path_buf(), self.adapter.map(Path::to_path_buf))
        }
    }

    /// The tower's PEFT adapter directory (used when it holds `adapter_config.json`).
    pub fn tower_adapter(&self) -> PathBuf {
        self.llava.join("visual_encoder_adapter")
    }
}

/// A LLaVA model ready for inference: the LLM (adapters merged), the CLIP tower (its adapter
/// merged) in the LLM's dtype on its device, and the projector. As a [`CausalLm`] every
/// sequence's cache carries its own image ([`LlavaParts::cache_with_image`]): the server's model.
pub struct LlavaParts {
    pub decoder: Decoder,
    pub tower: ClipVision,
    pub projector: Projector,
}

/// A sequence's KV cache and the image rows `[N, H]` its placeholder stands for.
pub struct LlavaCache {
    kv: KvCache,
    rows: Option<Tensor>,
}

impl LlavaParts {
    /// Loads the parts `paths` name, on `device`, the LLM in 4 bits with `bits`.
    pub fn load(paths: &LlavaPaths, device: &str, bits: Option<u32>) -> Result<(Self, Tokenizer)> {
        let (llm, adapter) = paths.resolve_llm();
        let (decoder, tokenizer) = load_for_inference_bits(&llm, adapter.as_deref(), device, bits)?;
        let projector = load_projector(&paths.llava.join("projector"), decoder.device())
            .with_context(|| format!("{}: the LLaVA directory", paths.llava.display()))?;
        let (dtype, dev) = (decoder.compute_dtype(), decoder.device().clone());
        let cfg = ClipVisionConfig::from_dir(paths.visual_encoder)?;
        let mut weights = tower_weights(paths.visual_encoder, &paths.tower_adapter(), dtype, &dev)?;
        let tower = ClipVision::new(&cfg, &mut weights, LLAVA_FEATURE_LAYER, dtype, &dev)
            .with_context(|| format!("vision tower {}", paths.visual_encoder.display()))?;
        Ok((
            LlavaParts {
                decoder,
                tower,
                projector,
            },
            tokenizer,
        ))
    }

    /// Loads a model in the Hugging Face `LlavaForConditionalGeneration` layout (as
    /// [`crate::export::llava_hf::export_llava_hf`] writes it, or the layout before
    /// transformers 4.52) on `device`: Llama-family text model, CLIP tower, GELU projector,
    /// features of layer -2 without the class token.
    pub fn load_hf(dir: &Path, device: &str) -> Result<(Self, Tokenizer)> {
        use crate::export::llava_hf::{projector_from_hf, split_hf_key, HfLlavaKey};
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("{}: cannot read", cfg_path.display()))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
        if config["model_type"] != "llava" {
            bail!(
                "{}: model_type {} is not \"llava\"",
                cfg_path.display(),
                config["model_type"]
            );
        }
        for (key, want) in [
            (
                "vision_feature_layer",
                serde_json::json!(LLAVA_FEATURE_LAYER),
            ),
            (
                "vision_feature_select_strategy",
                serde_json::json!("default"),
            ),
            ("projector_hidden_act", serde_json::json!("gelu")),
        ] {
            if !config[key].is_null() && config[key] != want {
                bail!(
                    "{}: {key} = {}; ftrun's LLaVA supports only {want}",
                    cfg_path.display(),
                    config[key]
                );
            }
        }
        let mcfg = ModelConfig::from_json(&config["text_config"].to_string())
            .with_context(|| format!("{}: text_config", cfg_path.display()))?;
        let vcfg = ClipVisionConfig::from_json(&text)
            .with_context(|| format!("{}: vision_config", cfg_path.display()))?;
        let dev = select_device(device)?;
        let dtype = compute_dtype("auto", &dev);
        let mut llm = HashMap::new();
        let mut tower = HashMap::new();
        let mut projector: [Option<Tensor>; 4] = Default::default();
        for (key, t) in load_weights(dir, dtype, &dev, |_| true)? {
            match split_hf_key(&key) {
                Some(HfLlavaKey::Llm(name)) => {
                    llm.insert(name, t);
                }
                Some(HfLlavaKey::Tower(name)) => {
                    tower.insert(name, t);
                }
                Some(HfLlavaKey::Projector(slot)) => projector[slot] = Some(t),
                None => bail!("{}: `{key}` is not a LLaVA tensor", dir.display()),
            }
        }
        let decoder = Decoder::new(&mcfg, &mut llm, TrainMode::Frozen, dtype, &dev, 0)
            .with_context(|| format!("{}: the language model", dir.display()))?;
        let tower = ClipVision::new(&vcfg, &mut tower, LLAVA_FEATURE_LAYER, dtype, &dev)
            .with_context(|| format!("{}: the vision tower", dir.display()))?;
        let parts = LlavaParts {
            decoder,
            tower,
            projector: projector_from_hf(projector, dir)?,
        };
        Ok((parts, Tokenizer::from_path(dir)?))
    }

    /// How images are preprocessed for this tower: padded to a square with the mean colour
    /// (as the finetune stage trains), resized and centre-cropped to the tower's size.
    pub fn preprocess(&self) -> ClipPreprocess {
        ClipPreprocess::clip(self.tower.config().image_size as u32, true)
    }

    /// Image rows per image.
    pub fn image_tokens(&self) -> usize {
        self.tower.config().num_patches()
    }

    /// The projected features `[N, H]` of one preprocessed image `pixels [3, S, S]`.
    pub fn image_rows(&self, pixels: &Tensor) -> Result<Tensor> {
        let pixels = pixels.to_device(self.decoder.device())?.unsqueeze(0)?; // [1, 3, S, S]
        image_rows(&self.tower, &self.projector, &pixels)
    }

    /// A new sequence's cache, holding the rows of `pixels [3, S, S]` when given.
    pub fn cache_with_image(&self, pixels: Option<&Tensor>) -> Result<LlavaCache> {
        Ok(LlavaCache {
            kv: self.decoder.new_cache(),
            rows: pixels.map(|p| self.image_rows(p)).transpose()?,
        })
    }
}

/// LLaVA-1.5 features: the hidden states of the tower's second-to-last layer.
pub const LLAVA_FEATURE_LAYER: i64 = -2;

impl LlavaChat {
    /// Loads the model and preprocesses `image` (padded to a square with the mean colour, as the
    /// finetune stage trains), all on `device` (`--device`), the LLM in 4 bits with `bits`.
    pub fn load(
        paths: &LlavaPaths,
        image: Option<&Path>,
        device: &str,
        bits: Option<u32>,
    ) -> Result<LlavaChat> {
        let (parts, tokenizer) = LlavaParts::load(paths, device, bits)?;
        let image_rows = match image {
            Some(path) => {
                let pixels = parts.preprocess().load(path, parts.decoder.device())?;
                Some(parts.image_rows(&pixels)?)
            }
            None => None,
        };
        Ok(LlavaChat::new(parts.decoder, tokenizer, image_rows))
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

/// The CLIP tower's weights under their `vision_model.*` names, with its PEFT adapter merged
/// when `adapter` holds one. A `CLIPModel` checkpoint gives its vision part; a checkpoint
/// saved without the `vision_model.` prefix gets it.
pub fn tower_weights(
    dir: &Path,
    adapter: &Path,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let all = load_weights(dir, dtype, device, |_| true)?;
    let prefixed = all.keys().any(|k| k.starts_with("vision_model."));
    let mut weights: HashMap<String, Tensor> = all
        .into_iter()
        .filter_map(|(k, t)| match (prefixed, k.starts_with("vision_model.")) {
            (true, true) => Some((k, t)),
            (true, false) => None, // the text half of a CLIPModel
            (false, _) => Some((format!("vision_model.{k}"), t)),
        })
        .collect();
    if adapter.join("adapter_config.json").is_file() {
        let (acfg, lora) = read_adapter(adapter)?;
        merge_into(&mut weights, &acfg, &lora)
            .with_context(|| format!("merging {} into the tower", adapter.display()))?;
    }
    Ok(weights)
}

/// The projected features `[N, H]` of one image `pixels [1, 3, S, S]`.
pub fn image_rows(tower: &ClipVision, projector: &Projector, pixels: &Tensor) -> Result<Tensor> {
    let feats = tower.forward(pixels)?; // [1, N, V]
    let (_, n, v) = feats.dims3()?;
    Ok(projector.forward(&feats.reshape((n, v))?)?.0)
}

/// `text` tokenized as the training data is: the chunks before and after its first `<image>`
/// apart, with [`IMAGE_TOKEN_ID`] between them (special tokens only before the image).
pub fn encode_around_image(
    tokenizer: &dyn TextCodec,
    text: &str,
    add_special_tokens: bool,
) -> Result<Vec<u32>> {
    let Some((before, after)) = text.split_once(IMAGE_TOKEN) else {
        return tokenizer.encode(text, add_special_tokens);
    };
    let mut ids = tokenizer.encode(before, add_special_tokens)?;
    ids.push(IMAGE_TOKEN_ID);
    ids.extend(tokenizer.encode(after, false)?);
    Ok(ids)
}

/// Appends `ids` to `cache` and returns the last position's logits; the one
/// [`IMAGE_TOKEN_ID`] among them is fed as the image rows `[N, H]`.
pub fn forward_with_image(
    decoder: &Decoder,
    ids: &[u32],
    rows: Option<&Tensor>,
    cache: &mut KvCache,
) -> Result<Vec<f32>> {
    let Some(p) = ids.iter().position(|&t| t == IMAGE_TOKEN_ID) else {
        return decoder.forward_infer(ids, cache);
    };
    let rows = rows.context("an image placeholder without an image")?;
    if ids[p + 1..].contains(&IMAGE_TOKEN_ID) {
        bail!("a prompt with more than one image placeholder");
    }
    let mut parts = Vec::with_capacity(3);
    if p > 0 {
        parts.push(decoder.embed(&ids[..p])?);
    }
    parts.push(rows.to_dtype(decoder.compute_dtype())?);
    if p + 1 < ids.len() {
        parts.push(decoder.embed(&ids[p + 1..])?);
    }
    decoder.forward_infer_embeds(&Tensor::cat(&parts, 0)?, cache) // rows [p + N + rest, H]
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
        let text = format!("{before}{IMAGE_TOKEN}{}", drop_markers(after));
        encode_around_image(&self.tokenizer, &text, add_special_tokens)
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
        forward_with_image(&self.decoder, ids, self.image_rows.as_ref(), cache)
    }

    fn cache_len(cache: &KvCache) -> usize {
        <Decoder as CausalLm>::cache_len(cache)
    }

    fn vocab_size(&self) -> usize {
        CausalLm::vocab_size(&self.decoder)
    }
}

impl CausalLm for LlavaParts {
    type Cache = LlavaCache;

    /// A cache without an image; [`LlavaParts::cache_with_image`] gives one with.
    fn new_cache(&self) -> LlavaCache {
        LlavaCache {
            kv: self.decoder.new_cache(),
            rows: None,
        }
    }

    fn forward_infer(&self, ids: &[u32], cache: &mut LlavaCache) -> Result<Vec<f32>> {
        forward_with_image(&self.decoder, ids, cache.rows.as_ref(), &mut cache.kv)
    }

    /// Text-only steps share the decoder's batched forward; a batch with an image prefill runs
    /// its sequences one by one.
    fn forward_infer_batch(
        &self,
        items: &mut [(&[u32], &mut LlavaCache)],
    ) -> Result<Vec<Vec<f32>>> {
        if items.iter().any(|(ids, _)| ids.contains(&IMAGE_TOKEN_ID)) {
            return items
                .iter_mut()
                .map(|(ids, cache)| self.forward_infer(ids, cache))
                .collect();
        }
        let mut kv: Vec<(&[u32], &mut KvCache)> = items
            .iter_mut()
            .map(|(ids, cache)| (*ids, &mut cache.kv))
            .collect();
        self.decoder.forward_infer_batch(&mut kv)
    }

    fn cache_len(cache: &LlavaCache) -> usize {
        <Decoder as CausalLm>::cache_len(&cache.kv)
    }

    fn vocab_size(&self) -> usize {
        CausalLm::vocab_size(&self.decoder)
    }
}
