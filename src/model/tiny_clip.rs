//! A tiny CLIP vision tower generated offline, as [`super::demo`] does for the LLM: random
//! weights in the Hugging Face `CLIPVisionModel` safetensors layout with its `config.json` and a
//! `preprocessor_config.json` (CLIPImageProcessor), for tests and the tiny CPU LLaVA configs.
//!
//! Weights follow `CLIPPreTrainedModel._init_weights` (factor 1), then every LayerNorm and bias
//! gets N(0, 0.1) noise added, so tests exercise them (the init leaves them at 1 and 0).

use crate::model::demo::{gaussian, write_json};
use crate::model::weights::save_sharded;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// The shape of a generated tower.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyClipSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
}

impl Default for TinyClipSpec {
    /// 32 wide, 3 layers, 28 px images in 14 px patches: 4 image tokens.
    fn default() -> Self {
        TinyClipSpec {
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 3,
            num_heads: 4,
            image_size: 28,
            patch_size: 14,
        }
    }
}

/// `initializer_range` of transformers' CLIPVisionConfig.
const INIT_RANGE: f64 = 0.02;
/// Std of the noise added to LayerNorm weights/biases and linear biases.
const NORM_BIAS_NOISE: f64 = 0.1;

/// Writes `config.json`, `model.safetensors` and `preprocessor_config.json` into `out_dir`.
/// The same spec and seed give the same bytes.
pub fn make_tiny_clip(out_dir: &Path, spec: &TinyClipSpec, seed: u64) -> Result<()> {
    let s = spec;
    if s.hidden_size == 0 || s.num_heads == 0 || s.hidden_size % s.num_heads != 0 {
        bail!(
            "tiny CLIP: hidden_size {} must be a positive multiple of num_heads {}",
            s.hidden_size,
            s.num_heads
        );
    }
    if s.patch_size == 0 || s.image_size % s.patch_size != 0 {
        bail!(
            "tiny CLIP: image_size {} must be a multiple of patch_size {}",
            s.image_size,
            s.patch_size
        );
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("{}: cannot create the model directory", out_dir.display()))?;
    let config = serde_json::json!({
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_channels": 3,
        "image_size": s.image_size,
        "patch_size": s.patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": INIT_RANGE,
        "initializer_factor": 1.0,
        "projection_dim": s.hidden_size,
        "torch_dtype": "float32",
    });
    write_json(&out_dir.join("config.json"), &config)?;
    let size = s.image_size;
    let preprocessor = crate::data::image::hf_processor_config(size, false);
    write_json(&out_dir.join("preprocessor_config.json"), &preprocessor)?;
    save_sharded(out_dir, &init_weights(spec, seed)?, usize::MAX, DType::F32)
}

/// Named tensors drawn in order from one ChaCha8 stream.
struct Draw {
    rng: ChaCha8Rng,
    out: Vec<(String, Tensor)>,
}

impl Draw {
    /// `shape` values ~ N(mean, std²).
    fn normal(&mut self, name: String, shape: &[usize], mean: f64, std: f64) -> Result<()> {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| (mean + gaussian(&mut self.rng) * std) as f32)
            .collect();
        self.out
            .push((name, Tensor::from_vec(values, shape, &Device::Cpu)?));
        Ok(())
    }

    /// A LayerNorm `{name}.weight` ~ 1 + noise, `{name}.bias` ~ noise.
    fn norm(&mut self, name: &str, d: usize) -> Result<()> {
        self.normal(format!("{name}.weight"), &[d], 1.0, NORM_BIAS_NOISE)?;
        self.normal(format!("{name}.bias"), &[d], 0.0, NORM_BIAS_NOISE)
    }
}

/// The tensors, in a fixed order.
fn init_weights(s: &TinyClipSpec, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let (d, inter, p) = (s.hidden_size, s.intermediate_size, s.patch_size);
    let positions = (s.image_size / p).pow(2) + 1;
    let mut w = Draw {
        rng: ChaCha8Rng::seed_from_u64(seed),
        out: Vec::new(),
    };
    let e = "vision_model.embeddings";
    w.normal(
        format!("{e}.class_embedding"),
        &[d],
        0.0,
        (d as f64).powf(-0.5),
    )?;
    w.normal(
        format!("{e}.patch_embedding.weight"),
        &[d, 3, p, p],
        0.0,
        INIT_RANGE,
    )?;
    w.normal(
        format!("{e}.position_embedding.weight"),
        &[positions, d],
        0.0,
        INIT_RANGE,
    )?;
    w.norm("vision_model.pre_layrnorm", d)?;
    // CLIPAttention / CLIPMLP init stds.
    let in_proj_std = (d as f64).powf(-0.5) * (2.0 * s.num_layers as f64).powf(-0.5);
    let out_proj_std = (d as f64).powf(-0.5);
    let fc_std = (2.0 * d as f64).powf(-0.5);
    for l in 0..s.num_layers {
        let pre = format!("vision_model.encoder.layers.{l}");
        for (leaf, out_f, in_f, std) in [
            ("self_attn.q_proj", d, d, in_proj_std),
            ("self_attn.k_proj", d, d, in_proj_std),
            ("self_attn.v_proj", d, d, in_proj_std),
            ("self_attn.out_proj", d, d, out_proj_std),
            ("mlp.fc1", inter, d, fc_std),
            ("mlp.fc2", d, inter, in_proj_std),
        ] {
            w.normal(format!("{pre}.{leaf}.weight"), &[out_f, in_f], 0.0, std)?;
            w.normal(format!("{pre}.{leaf}.bias"), &[out_f], 0.0, NORM_BIAS_NOISE)?;
        }
        w.norm(&format!("{pre}.layer_norm1"), d)?;
        w.norm(&format!("{pre}.layer_norm2"), d)?;
    }
    w.norm("vision_model.post_layernorm", d)?;
    Ok(w.out)
}

/// Colours and shapes of the tiny LLaVA images.
const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 30, 30]),
    ("green", [30, 200, 40]),
    ("blue", [30, 60, 230]),
    ("yellow", [240, 220, 20]),
];
const SHAPES: [&str; 2] = ["square", "circle"];

/// What [`make_tiny_llava`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyLlava {
    pub llm: std::path::PathBuf,
    pub clip: std::path::PathBuf,
    pub images: std::path::PathBuf,
    pub pretrain_data: std::path::PathBuf,
    pub finetune_data: std::path::PathBuf,
}

/// Everything the tiny LLaVA configs (`tiny_llava_pretrain`, `tiny_llava_finetune`) read, under
/// `dir`: the tiny demo LLM (`tiny-llama/`, its tokenizer trained on the captions), a tiny CLIP
/// (`tiny-clip/`), 8 generated 40x32 PNGs (a coloured square or circle on grey, `images/`),
/// captions for pretraining (`pretrain.jsonl`) and questions about colour and shape plus
/// text-only records for finetuning (`finetune.jsonl`).
pub fn make_tiny_llava(dir: &Path, seed: u64) -> Result<TinyLlava> {
    let out = TinyLlava {
        llm: dir.join("tiny-llama"),
        clip: dir.join("tiny-clip"),
        images: dir.join("images"),
        pretrain_data: dir.join("pretrain.jsonl"),
        finetune_data: dir.join("finetune.jsonl"),
    };
    std::fs::create_dir_all(&out.images)
        .with_context(|| format!("{}: cannot create", out.images.display()))?;
    let human = |q: &str| serde_json::json!({"from": "human", "value": format!("<image>\n{q}")});
    let gpt = |a: &str| serde_json::json!({"from": "gpt", "value": a});
    let (mut pretrain, mut finetune, mut corpus) = (vec![], vec![], vec![]);
    for (colour, rgb) in COLOURS {
        for shape in SHAPES {
            let file = format!("{colour}_{shape}.png");
            draw_shape(&out.images.join(&file), rgb, shape == "circle")?;
            let caption = format!("a {colour} {shape}");
            pretrain.push(serde_json::json!({"image": file, "conversations": [
                human("Describe the image."), gpt(&caption)]}));
            finetune.push(serde_json::json!({"image": file, "conversations": [
                human("What colour is the shape?"), gpt(&format!("It is {colour}.")),
                {"from": "human", "value": "And its shape?"}, gpt(&format!("A {shape}."))]}));
            corpus.extend([caption, format!("It is {colour}. A {shape}.")]);
        }
    }
    // Text-only samples are mixed into LLaVA finetuning.
    let text_only = serde_json::json!({"conversations": [
        {"from": "human", "value": "Which colours can the shapes have?"},
        gpt("Red, green, blue or yellow.")]});
    finetune.push(text_only);
    corpus.extend(
        [
            "Describe the image.",
            "What colour is the shape? And its shape?",
            "Which colours can the shapes have? Red, green, blue or yellow.",
        ]
        .map(String::from),
    );
    let write_lines = |path: &Path, records: &[serde_json::Value]| -> Result<()> {
        let text: String = records.iter().map(|r| format!("{r}\n")).collect();
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    };
    write_lines(&out.pretrain_data, &pretrain)?;
    write_lines(&out.finetune_data, &finetune)?;
    crate::model::demo::make_demo_model(&out.llm, &corpus, seed)?;
    make_tiny_clip(&out.clip, &TinyClipSpec::default(), seed)?;
    Ok(out)
}

/// A 40x32 grey PNG with a centred coloured square or circle of radius 10.
fn draw_shape(path: &Path, rgb: [u8; 3], circle: bool) -> Result<()> {
    let (w, h, r) = (40i32, 32i32, 10i32);
    let img = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let (dx, dy) = (x as i32 - w / 2, y as i32 - h / 2);
        let inside = if circle {
            dx * dx + dy * dy <= r * r
        } else {
            dx.abs() <= r && dy.abs() <= r
        };
        image::Rgb(if inside { rgb } else { [128, 128, 128] })
    });
    img.save(path)
        .with_context(|| format!("writing {}", path.display()))
}
