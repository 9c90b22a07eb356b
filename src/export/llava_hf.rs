//! A LLaVA model in the Hugging Face `LlavaForConditionalGeneration` layout, the directory
//! `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained` load:
//! the LLM with its adapter merged, the CLIP tower with its adapter merged and the projector in
//! one set of safetensors under transformers' current key names (`model.language_model.*`,
//! `model.vision_tower.vision_model.*`, `model.multi_modal_projector.linear_{1,2}.*`,
//! `lm_head.*`); `config.json` (`model_type: llava` with the LLM's config as `text_config` and
//! the tower's as `vision_config`); the tokenizer with `<image>` added; a chat template that
//! lays conversations out as ftrun's chat and serve do; the image processor and processor
//! configs.
//!
//! Llama-architecture LLMs only: the text model is built by `AutoModel.from_config(text_config)`,
//! and InternLM2 (fused `wqkv`, remote code) or Qwen2 exports are refused by name.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::path::Path;

use super::{load_merged, storage_dtype};
use crate::data::IMAGE_TOKEN;
use crate::infer::llava::{tower_weights, LlavaPaths, LLAVA_FEATURE_LAYER};
use crate::infer::ChatFormat;
use crate::model::config::Arch;
use crate::model::llava::Projector;
use crate::model::vision::ClipVisionConfig;
use crate::model::weights::save_sharded;
use crate::model::ModelConfig;
use crate::train::llava::load_projector;

/// Prefix of the LLM's keys (its `model.*` keys without `model.`) in the current layout.
pub const HF_LLM_PREFIX: &str = "model.language_model.";
/// Prefix of the tower's `CLIPVisionModel` keys (`vision_model.*`) in the current layout.
pub const HF_TOWER_PREFIX: &str = "model.vision_tower.";
/// The projector's keys, in [`Projector::NAMES`] order.
pub const HF_PROJECTOR_NAMES: [&str; 4] = [
    "model.multi_modal_projector.linear_1.weight",
    "model.multi_modal_projector.linear_1.bias",
    "model.multi_modal_projector.linear_2.weight",
    "model.multi_modal_projector.linear_2.bias",
];

/// Which part of a LLaVA model a Hugging Face key belongs to, with the part's own name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HfLlavaKey {
    /// The LLM's causal-LM name (`model.layers.0...`, `lm_head.weight`).
    Llm(String),
    /// The tower's `CLIPVisionModel` name (`vision_model.encoder...`).
    Tower(String),
    /// The projector's slot in [`Projector::NAMES`] order.
    Projector(usize),
}

/// The part a key of a LLaVA checkpoint belongs to: the current layout, or the one before
/// transformers 4.52 (`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*`,
/// `multi_modal_projector.*`), which transformers still converts on load. None: not LLaVA's.
pub fn split_hf_key(key: &str) -> Option<HfLlavaKey> {
    let key = key
        .strip_prefix("model.")
        .filter(|k| {
            ["language_model.", "vision_tower.", "multi_modal_projector."]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .unwrap_or(key);
    if let Some(rest) = key.strip_prefix("language_model.") {
        // Old layout: `language_model.model.X` / `language_model.lm_head.X`.
        return Some(HfLlavaKey::Llm(
            if rest.starts_with("model.") || rest.starts_with("lm_head.") {
                rest.to_string()
            } else {
                format!("model.{rest}")
            },
        ));
    }
    if key.starts_with("lm_head.") {
        return Some(HfLlavaKey::Llm(key.to_string()));
    }
    if let Some(rest) = key.strip_prefix("vision_tower.") {
        return Some(HfLlavaKey::Tower(rest.to_string()));
    }
    let rest = key.strip_prefix("multi_modal_projector.")?;
    HF_PROJECTOR_NAMES
        .iter()
        .position(|n| n.ends_with(&format!(".multi_modal_projector.{rest}")))
        .map(HfLlavaKey::Projector)
}

/// The current-layout key of an LLM tensor (`model.X` -> `model.language_model.X`).
fn hf_llm_key(name: &str) -> Result<String> {
    if let Some(rest) = name.strip_prefix("model.") {
        Ok(format!("{HF_LLM_PREFIX}{rest}"))
    } else if name.starts_with("lm_head.") {
        Ok(name.to_string())
    } else {
        bail!("LLM tensor `{name}` is neither under `model.` nor `lm_head.`")
    }
}

/// Writes the LLaVA model `paths` name (as `ftrun chat --llava` loads it) to `out` in the
/// `LlavaForConditionalGeneration` layout; `format` is the chat template it was trained with.
pub fn export_llava_hf(paths: &LlavaPaths, format: &ChatFormat, out: &Path) -> Result<()> {
    let (llm, adapter) = paths.resolve_llm();
    let mcfg = ModelConfig::from_dir(&llm)?;
    match mcfg.arch {
        Arch::Llama => {}
        Arch::InternLM2 => bail!(
            "{}: an InternLM2 LLM cannot be exported in the LlavaForConditionalGeneration \
             layout: transformers builds the text model from `text_config` with its own classes, \
             and has no InternLM2 (its packed `wqkv` and tokenizer need the model's remote code); \
             use the XTuner layout ftrun export writes (`projector/`, `llm_adapter/`, \
             `visual_encoder_adapter/`) with `ftrun chat --llava`",
            llm.display()
        ),
        Arch::Qwen2 => bail!(
            "{}: the LlavaForConditionalGeneration export supports Llama-architecture LLMs \
             only (this one is {}); use the XTuner layout with `ftrun chat --llava`",
            llm.display(),
            mcfg.hf_architecture
        ),
    }
    let (mcfg, mut llm_weights) = load_merged(&llm, adapter.as_deref())?;
    let dtype = storage_dtype(&mcfg.torch_dtype);
    let cpu = Device::Cpu;
    let vision_cfg = ClipVisionConfig::from_dir(paths.visual_encoder)?;
    let tower = tower_weights(paths.visual_encoder, &paths.tower_adapter(), dtype, &cpu)?;
    let projector = load_projector(&paths.llava.join("projector"), &cpu)
        .with_context(|| format!("{}: the LLaVA directory", paths.llava.display()))?;
    let (hidden, visual) = projector.w1.dims2()?;
    if hidden != mcfg.hidden_size || visual != vision_cfg.hidden_size {
        bail!(
            "{}: the projector maps {visual} -> {hidden}, the tower has {} and the LLM {}",
            paths.llava.display(),
            vision_cfg.hidden_size,
            mcfg.hidden_size
        );
    }

    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let image_token_id = write_tokenizer(&llm, out, &llava_chat_template(format))?;
    // The embedding (and an untied head) need a row for the image token; its embedding is
    // replaced by image features and its head row is zero (generation suppresses it).
    let vocab = mcfg.vocab_size.max(image_token_id as usize + 1);
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        if let Some(w) = llm_weights.get(name) {
            let (rows, cols) = w.dims2()?;
            if rows < vocab {
                let pad = Tensor::zeros((vocab - rows, cols), w.dtype(), w.device())?;
                let padded = Tensor::cat(&[w, &pad], 0)?; // [vocab, hidden]
                llm_weights.insert(name.to_string(), padded);
            }
        }
    }

    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in llm_weights {
        tensors.push((hf_llm_key(&name)?, t));
    }
    for (name, t) in tower {
        tensors.push((format!("{HF_TOWER_PREFIX}{name}"), t));
    }
    for (name, t) in HF_PROJECTOR_NAMES.iter().zip(projector.tensors()) {
        tensors.push((name.to_string(), t.to_dtype(dtype)?));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    save_sharded(out, &tensors, 5 << 30, dtype)?;

    let config = llava_config(
        &llm,
        paths.visual_encoder,
        &vision_cfg,
        vocab,
        image_token_id,
    )?;
    write_json(&out.join("config.json"), &config)?;
    write_generation_config(&llm, out, image_token_id)?;
    let size = vision_cfg.image_size;
    // LlavaImageProcessor: CLIP's processing after padding to a square with the mean colour, as
    // the finetune stage trains and ftrun's chat feeds images.
    write_json(
        &out.join("preprocessor_config.json"),
        &crate::data::image::hf_processor_config(size, true),
    )?;
    write_json(
        &out.join("processor_config.json"),
        &json!({
            "processor_class": "LlavaProcessor",
            "image_token": IMAGE_TOKEN,
            "patch_size": vision_cfg.patch_size,
            "vision_feature_select_strategy": "default",
            // The class token, which the "default" strategy drops again.
            "num_additional_image_tokens": 1,
        }),
    )?;
    println!(
        "LlavaForConditionalGeneration model written to {} (image token `{IMAGE_TOKEN}` = {image_token_id}, {} image tokens)",
        out.display(),
        vision_cfg.num_patches()
    );
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// `config.json`: the LLM's config as `text_config` (vocabulary grown to `vocab`), the
/// tower's as `vision_config`, and LLaVA-1.5's settings (the features ftrun uses: layer -2,
/// class token dropped, GELU projector with biases).
fn llava_config(
    llm: &Path,
    vision_dir: &Path,
    vision_cfg: &ClipVisionConfig,
    vocab: usize,
    image_token_id: u32,
) -> Result<Value> {
    let mut text_config = read_json(&llm.join("config.json"))?;
    text_config["vocab_size"] = json!(vocab);
    let torch_dtype = text_config
        .get("torch_dtype")
        .or_else(|| text_config.get("dtype"))
        .cloned()
        .unwrap_or(json!("float32"));
    let tie = text_config
        .get("tie_word_embeddings")
        .cloned()
        .unwrap_or(json!(false));
    let raw = read_json(&vision_dir.join("config.json"))?;
    let mut vision_config = raw.get("vision_config").cloned().unwrap_or(raw);
    vision_config["model_type"] = json!("clip_vision_model");
    if let Some(o) = vision_config.as_object_mut() {
        o.remove("architectures");
    }
    Ok(json!({
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text_config,
        "vision_config": vision_config,
        "image_token_index": image_token_id,
        "image_seq_length": vision_cfg.num_patches(),
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": true,
        "vision_feature_layer": LLAVA_FEATURE_LAYER,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": tie,
        "torch_dtype": torch_dtype,
    }))
}

/// The LLM's generation config (or its token ids) with the image token suppressed.
fn write_generation_config(llm: &Path, out: &Path, image_token_id: u32) -> Result<()> {
    let path = llm.join("generation_config.json");
    let mut config = if path.is_file() {
        read_json(&path)?
    } else {
        let c = read_json(&llm.join("config.json"))?;
        json!({"bos_token_id": c.get("bos_token_id"), "eos_token_id": c.get("eos_token_id")})
    };
    config["suppress_tokens"] = json!([image_token_id]);
    write_json(&out.join("generation_config.json"), &config)
}

/// Copies the LLM's tokenizer into `out` with `<image>` added as a special token when it is
/// absent and `chat_template` set; returns the token's id.
fn write_tokenizer(llm: &Path, out: &Path, chat_template: &str) -> Result<u32> {
    let tk_path = llm.join("tokenizer.json");
    if !tk_path.is_file() {
        bail!(
            "{}: the LlavaForConditionalGeneration export needs the LLM's tokenizer.json (a \
             fast tokenizer) to add `{IMAGE_TOKEN}` to",
            llm.display()
        );
    }
    let mut tk = read_json(&tk_path)?;
    let added = tk["added_tokens"].as_array().cloned().unwrap_or_default();
    let existing = added
        .iter()
        .find(|t| t["content"] == IMAGE_TOKEN)
        .and_then(|t| t["id"].as_u64())
        .or_else(|| tk["model"]["vocab"][IMAGE_TOKEN].as_u64());
    let entry = |id: u32| {
        json!({"id": id, "content": IMAGE_TOKEN, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let id = match existing {
        Some(id) => id as u32,
        None => {
            let vocab_max = match &tk["model"]["vocab"] {
                Value::Object(m) => m.values().filter_map(Value::as_u64).max(),
                // Unigram: a list of [piece, score].
                Value::Array(a) => a.len().checked_sub(1).map(|n| n as u64),
                _ => None,
            };
            let added_max = added.iter().filter_map(|t| t["id"].as_u64()).max();
            let id = vocab_max
                .max(added_max)
                .map_or(0, |m| m + 1)
                .try_into()
                .context("token id overflow")?;
            let mut list = added;
            list.push(entry(id));
            tk["added_tokens"] = Value::Array(list);
            id
        }
    };
    write_json(&out.join("tokenizer.json"), &tk)?;

    let cfg_path = llm.join("tokenizer_config.json");
    let mut tcfg = if cfg_path.is_file() {
        read_json(&cfg_path)?
    } else {
        json!({})
    };
    if let Some(decoder) = tcfg
        .get_mut("added_tokens_decoder")
        .and_then(Value::as_object_mut)
    {
        let mut e = entry(id);
        e.as_object_mut().map(|o| o.remove("id"));
        decoder.insert(id.to_string(), e);
    }
    tcfg["chat_template"] = json!(chat_template);
    write_json(&out.join("tokenizer_config.json"), &tcfg)?;
    std::fs::write(out.join("chat_template.jinja"), chat_template)
        .with_context(|| format!("writing {}", out.join("chat_template.jinja").display()))?;

    let added_path = llm.join("added_tokens.json");
    if added_path.is_file() {
        let mut a = read_json(&added_path)?;
        a[IMAGE_TOKEN] = json!(id);
        write_json(&out.join("added_tokens.json"), &a)?;
    }
    for f in ["special_tokens_map.json", "tokenizer.model"] {
        let src = llm.join(f);
        if src.is_file() {
            std::fs::copy(&src, out.join(f))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    // The id ftrun's own tokenizer sees must be the one config.json names.
    let check = crate::tokenizer::Tokenizer::from_path(out)?;
    if check.token_to_id(IMAGE_TOKEN) != Some(id) {
        bail!(
            "{}: `{IMAGE_TOKEN}` was added as {id} but the tokenizer reads it as {:?}",
            out.display(),
            check.token_to_id(IMAGE_TOKEN)
        );
    }
    Ok(id)
}

/// A jinja string literal of `s`.
fn jinja_str(s: &str) -> String {
    // JSON's escapes (\n, \", \\, \uXXXX) are valid in jinja's Python-style literals.
    serde_json::to_string(s).expect("a string serializes")
}

/// `template` as jinja output: literal text, with each `{name}` replaced by the jinja
/// expression given for it.
fn jinja_fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut rest = template;
    loop {
        let next = vars
            .iter()
            .filter_map(|(name, expr)| {
                rest.find(&format!("{{{name}}}"))
                    .map(|at| (at, name.len() + 2, *expr))
            })
            .min_by_key(|(at, _, _)| *at);
        match next {
            Some((at, len, expr)) => {
                if at > 0 {
                    out += &format!("{{{{ {} }}}}", jinja_str(&rest[..at]));
                }
                out += &format!("{{{{ {expr} }}}}");
                rest = &rest[at + len..];
            }
            None => {
                if !rest.is_empty() {
                    out += &format!("{{{{ {} }}}}", jinja_str(rest));
                }
                return out;
            }
        }
    }
}

/// A chat template that lays a conversation out as `ftrun serve` does with `format`: BOS,
/// system messages (joined by newlines) in the first turn, consecutive user (and assistant)
/// messages joined by newlines, an image part as `<image>\n` before the turn's text, each
/// earlier answer followed by the suffix (or EOS) and the separator before the next turn. The
/// instruction already opens the answer, so `add_generation_prompt` changes nothing.
pub fn llava_chat_template(format: &ChatFormat) -> String {
    let turn = |user: &str| {
        let mut t = format!("{{%- if ns.round > 0 -%}}{}{{%- endif -%}}", {
            if format.sep.is_empty() {
                String::new()
            } else {
                jinja_fill(&format.sep, &[])
            }
        });
        if !format.system.is_empty() {
            t += &format!(
                "{{%- if ns.round == 0 and ns.has_system -%}}{}{{%- endif -%}}",
                jinja_fill(
                    &format.system,
                    &[
                        ("system", "ns.system"),
                        ("round", "(ns.round + 1) | string")
                    ]
                )
            );
        }
        t + &jinja_fill(
            &format.instruction,
            &[("input", user), ("round", "(ns.round + 1) | string")],
        )
    };
    let end = if format.suffix.is_empty() {
        "{{ eos_token }}".to_string()
    } else {
        jinja_fill(&format.suffix, &[])
    };
    let text_of = "{%- if m['content'] is string -%}{%- set text = m['content'] -%}\
        {%- elif m['content'] is none -%}{%- set text = '' -%}\
        {%- else -%}{%- set text = ('<image>\\n' * (m['content'] | selectattr('type', 'in', \
        ['image', 'image_url']) | list | length)) + (m['content'] | selectattr('type', 'equalto', \
        'text') | map(attribute='text') | join('')) -%}{%- endif -%}";
    let turn_user = turn("ns.user");
    format!(
        "{{%- set ns = namespace(system='', has_system=false, round=0, user='', has_user=false, \
         answer='', has_answer=false) -%}}\
         {{%- for m in messages if m['role'] == 'system' or m['role'] == 'developer' -%}}{text_of}\
         {{%- set ns.system = (ns.system + '\\n' + text) if ns.has_system else text -%}}\
         {{%- set ns.has_system = true -%}}{{%- endfor -%}}\
         {{{{ bos_token if bos_token else '' }}}}\
         {{%- for m in messages if m['role'] == 'user' or m['role'] == 'assistant' -%}}{text_of}\
         {{%- if m['role'] == 'user' -%}}\
         {{%- if ns.has_answer -%}}{turn_user}{{{{ ns.answer }}}}{end}\
         {{%- set ns.round = ns.round + 1 -%}}{{%- set ns.has_answer = false -%}}\
         {{%- set ns.has_user = false -%}}{{%- endif -%}}\
         {{%- set ns.user = (ns.user + '\\n' + text) if ns.has_user else text -%}}\
         {{%- set ns.has_user = true -%}}\
         {{%- else -%}}\
         {{%- set ns.answer = (ns.answer + '\\n' + text) if ns.has_answer else text -%}}\
         {{%- set ns.has_answer = true -%}}\
         {{%- endif -%}}{{%- endfor -%}}\
         {{%- if ns.has_user -%}}{turn_user}\
         {{%- if ns.has_answer -%}}{{{{ ns.answer }}}}{end}{{%- endif -%}}{{%- endif -%}}"
    )
}

/// The projector of an HF LLaVA checkpoint's tensors (`[H, V]`, `[H]`, `[H, H]`, `[H]`).
pub fn projector_from_hf(slots: [Option<Tensor>; 4], dir: &Path) -> Result<Projector> {
    let [a, b, c, d] =
        slots.map(|t| t.with_context(|| format!("{}: the projector is incomplete", dir.display())));
    Projector::from_tensors([a?, b?, c?, d?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_both_layouts_map_to_the_parts() {
        let llm = |s: &str| Some(HfLlavaKey::Llm(s.to_string()));
        let tower = |s: &str| Some(HfLlavaKey::Tower(s.to_string()));
        // Current layout, as written by the export.
        for (name, part) in [
            (
                "model.layers.0.self_attn.q_proj.weight",
                "model.language_model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "model.embed_tokens.weight",
                "model.language_model.embed_tokens.weight",
            ),
            ("lm_head.weight", "lm_head.weight"),
        ] {
            assert_eq!(hf_llm_key(name).unwrap(), part);
            assert_eq!(split_hf_key(part), llm(name));
        }
        assert_eq!(
            split_hf_key("model.vision_tower.vision_model.pre_layrnorm.weight"),
            tower("vision_model.pre_layrnorm.weight")
        );
        for (slot, name) in HF_PROJECTOR_NAMES.iter().enumerate() {
            assert_eq!(split_hf_key(name), Some(HfLlavaKey::Projector(slot)));
        }
        // The layout before transformers 4.52 (llava-hf checkpoints).
        assert_eq!(
            split_hf_key("language_model.model.norm.weight"),
            llm("model.norm.weight")
        );
        assert_eq!(
            split_hf_key("language_model.lm_head.weight"),
            llm("lm_head.weight")
        );
        assert_eq!(
            split_hf_key("vision_tower.vision_model.post_layernorm.bias"),
            tower("vision_model.post_layernorm.bias")
        );
        assert_eq!(
            split_hf_key("multi_modal_projector.linear_2.bias"),
            Some(HfLlavaKey::Projector(3))
        );
        assert_eq!(split_hf_key("text_model.embeddings.weight"), None);
        assert!(hf_llm_key("visual_projection.weight").is_err());
    }

    #[test]
    fn the_chat_template_fills_the_format_with_escaped_literals() {
        let format = ChatFormat {
            system: "S[{system}]\n".into(),
            instruction: "U\"{input}\"#{round}\n".into(),
            suffix: String::new(),
            sep: "\n".into(),
            stop_words: vec![],
        };
        let t = llava_chat_template(&format);
        assert!(t.contains(r#"{{ "S[" }}{{ ns.system }}{{ "]\n" }}"#), "{t}");
        assert!(
            t.contains(r##"{{ "U\"" }}{{ ns.user }}{{ "\"#" }}{{ (ns.round + 1) | string }}"##),
            "{t}"
        );
        // No suffix: an earlier answer ends with EOS.
        assert!(t.contains("{{ ns.answer }}{{ eos_token }}"), "{t}");
    }
}
