//! The tiny demo assistant's base model, generated offline: a randomly initialized Llama in the
//! Hugging Face layout with a byte-level BPE tokenizer trained on the demo corpus and the
//! InternLM2 chat special tokens. Small enough (a few MB) to fine-tune on a CPU in seconds.

use crate::model::weights::{save_sharded, write_atomic};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::Write;
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

pub const DEMO_HIDDEN: usize = 128;
pub const DEMO_LAYERS: usize = 4;
pub const DEMO_HEADS: usize = 4;
pub const DEMO_KV_HEADS: usize = 2;
pub const DEMO_INTERMEDIATE: usize = 352;
pub const DEMO_MAX_POSITIONS: usize = 512;
/// Target size of the BPE vocabulary (the trainer stops earlier on a small corpus).
pub const DEMO_VOCAB_TARGET: usize = 2000;
/// Standard deviation of the random init (transformers' `initializer_range`).
const INIT_STD: f64 = 0.02;
/// The final RMSNorm's weight. A random head of std 0.02 over a unit-RMS hidden state caps the
/// logits near +-2.6, so even a perfectly fitted adapter could not push the loss much below
/// ln(vocab) - 3; trained models have much sharper heads. Scaling the final norm gives the
/// demo's LoRA the logit range a pretrained model has, and its loss curve a meaningful floor.
pub const DEMO_FINAL_NORM: f32 = 10.0;

/// Special tokens, in id order: InternLM2's `<unk>`=0, `<s>`=1, `</s>`=2, then the chat markers.
pub const DEMO_SPECIAL_TOKENS: [&str; 5] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"];

/// InternLM2-chat's chat template (chatml with a leading BOS), for transformers users.
const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + \
message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if \
add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Write the demo model to `out_dir`: config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json, special_tokens_map.json and generation_config.json. The same `corpus` and
/// `seed` give the same bytes.
pub fn make_demo_model(out_dir: &Path, corpus: &[String], seed: u64) -> Result<()> {
    if corpus.iter().all(|s| s.trim().is_empty()) {
        bail!("the demo model's tokenizer needs a non-empty corpus");
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create the model directory", out_dir.display()))?;

    let tokenizer = train_tokenizer(corpus)?;
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .ok_or_else(|| anyhow!("trained tokenizer lacks special token {t}"))
    };
    let (bos, eos, im_end) = (id("<s>")?, id("</s>")?, id("<|im_end|>")?);
    let vocab_size = tokenizer.get_vocab_size(true);
    let tokenizer_json = tokenizer
        .to_string(true)
        .map_err(|e| anyhow!("serializing the demo tokenizer: {e}"))?;
    write_text(&out_dir.join("tokenizer.json"), &tokenizer_json)?;

    let head_dim = DEMO_HIDDEN / DEMO_HEADS;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": DEMO_HIDDEN,
        "intermediate_size": DEMO_INTERMEDIATE,
        "num_hidden_layers": DEMO_LAYERS,
        "num_attention_heads": DEMO_HEADS,
        "num_key_value_heads": DEMO_KV_HEADS,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": DEMO_MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": null,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "initializer_range": INIT_STD,
        "pretraining_tp": 1,
        "tie_word_embeddings": false,
        "use_cache": true,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "torch_dtype": "float32",
    });
    write_json(&out_dir.join("config.json"), &config)?;

    let tokenizer_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": DEMO_MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    });
    write_json(&out_dir.join("tokenizer_config.json"), &tokenizer_config)?;
    let special_tokens_map = serde_json::json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
    });
    write_json(
        &out_dir.join("special_tokens_map.json"),
        &special_tokens_map,
    )?;
    // InternLM2-chat stops on </s> or <|im_end|>.
    let generation_config = serde_json::json!({
        "bos_token_id": bos,
        "eos_token_id": [eos, im_end],
        "pad_token_id": eos,
        "max_new_tokens": 128,
    });
    write_json(&out_dir.join("generation_config.json"), &generation_config)?;

    let tensors = init_weights(vocab_size, seed)?;
    save_sharded(out_dir, &tensors, usize::MAX, DType::F32)
}

/// Byte-level BPE trained on `corpus`: any UTF-8 text (Chinese included) round-trips, and the
/// chat markers are special tokens matched whole in text.
fn train_tokenizer(corpus: &[String]) -> Result<tokenizers::Tokenizer> {
    let specials: Vec<AddedToken> = DEMO_SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(DEMO_VOCAB_TARGET)
        .show_progress(false)
        .special_tokens(specials)
        // All 256 byte symbols, so text unseen in the corpus still encodes.
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tk = tokenizers::Tokenizer::new(BPE::default());
    let byte_level = ByteLevel::default().add_prefix_space(false);
    tk.with_pre_tokenizer(Some(byte_level));
    tk.with_decoder(Some(byte_level));
    tk.with_post_processor(Some(byte_level.trim_offsets(false)));
    tk.train(&mut trainer, corpus.iter())
        .map_err(|e| anyhow!("training the demo tokenizer: {e}"))?;
    Ok(tk)
}

/// Hugging Face Llama tensors initialized like `LlamaPreTrainedModel._init_weights`: every
/// linear and the embedding ~ N(0, 0.02), block RMSNorm weights = 1, the final norm
/// DEMO_FINAL_NORM. Drawn in a fixed order from one
/// ChaCha8 stream, so a seed determines every value.
fn init_weights(vocab: usize, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let h = DEMO_HIDDEN;
    let head_dim = h / DEMO_HEADS;
    let q_out = DEMO_HEADS * head_dim;
    let kv_out = DEMO_KV_HEADS * head_dim;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut normal = |name: String, shape: &[usize]| -> Result<(String, Tensor)> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| (gaussian(&mut rng) * INIT_STD) as f32)
            .collect();
        Ok((name, Tensor::from_vec(values, shape, &Device::Cpu)?))
    };
    let ones = |name: String| -> Result<(String, Tensor)> {
        Ok((name, Tensor::ones(h, DType::F32, &Device::Cpu)?))
    };

    let mut out = vec![normal("model.embed_tokens.weight".into(), &[vocab, h])?];
    for l in 0..DEMO_LAYERS {
        let p = format!("model.layers.{l}");
        // Linear weights are [out_features, in_features].
        out.push(normal(format!("{p}.self_attn.q_proj.weight"), &[q_out, h])?);
        out.push(normal(
            format!("{p}.self_attn.k_proj.weight"),
            &[kv_out, h],
        )?);
        out.push(normal(
            format!("{p}.self_attn.v_proj.weight"),
            &[kv_out, h],
        )?);
        out.push(normal(format!("{p}.self_attn.o_proj.weight"), &[h, q_out])?);
        out.push(normal(
            format!("{p}.mlp.gate_proj.weight"),
            &[DEMO_INTERMEDIATE, h],
        )?);
        out.push(normal(
            format!("{p}.mlp.up_proj.weight"),
            &[DEMO_INTERMEDIATE, h],
        )?);
        out.push(normal(
            format!("{p}.mlp.down_proj.weight"),
            &[h, DEMO_INTERMEDIATE],
        )?);
        out.push(ones(format!("{p}.input_layernorm.weight"))?);
        out.push(ones(format!("{p}.post_attention_layernorm.weight"))?);
    }
    out.push((
        "model.norm.weight".into(),
        Tensor::full(DEMO_FINAL_NORM, h, &Device::Cpu)?,
    ));
    out.push(normal("lm_head.weight".into(), &[vocab, h])?);
    Ok(out)
}

/// A standard normal sample (Box-Muller; `1 - u` keeps the log argument in (0, 1]).
pub(crate) fn gaussian(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random();
    let u2: f64 = rng.random();
    (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_text(path, &text)
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, |f| Ok(f.write_all(text.as_bytes())?))
}
