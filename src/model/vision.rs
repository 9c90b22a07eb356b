//! The CLIP vision tower of LLaVA (Hugging Face `CLIPVisionModel` layout): patch embedding,
//! class token, learned positions, pre-LayerNorm, pre-LN transformer layers with bias and
//! quick_gelu, and LLaVA's feature selection (the hidden states of layer `select_layer`, -2 by
//! default, with the class token dropped: 576 tokens for 336 px / patch 14).
//!
//! Weights load under their HF names (`vision_model.encoder.layers.{i}.self_attn.q_proj.weight`);
//! a `CLIPModel` checkpoint's `vision_config` is accepted too. Forward only for now: the tower is
//! frozen in both LLaVA stages unless a LoRA on the ViT is asked for.

use crate::model::weights::WeightSource;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_channels() -> usize {
    3
}
fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".into()
}

impl ClipVisionConfig {
    /// From a `config.json` text: a `CLIPVisionModel` config, or a `CLIPModel` one (its
    /// `vision_config`).
    pub fn from_json(text: &str) -> Result<ClipVisionConfig> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        let vision = v.get("vision_config").cloned().unwrap_or(v);
        let cfg: ClipVisionConfig =
            serde_json::from_value(vision).context("not a CLIP vision config")?;
        if cfg.hidden_size % cfg.num_attention_heads != 0 {
            bail!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                cfg.hidden_size,
                cfg.num_attention_heads
            );
        }
        if cfg.image_size % cfg.patch_size != 0 {
            bail!(
                "image_size {} is not a multiple of patch_size {}",
                cfg.image_size,
                cfg.patch_size
            );
        }
        if !matches!(cfg.hidden_act.as_str(), "quick_gelu" | "gelu") {
            bail!(
                "hidden_act `{}`: only quick_gelu and gelu are supported",
                cfg.hidden_act
            );
        }
        Ok(cfg)
    }

    pub fn from_dir(dir: &Path) -> Result<ClipVisionConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read the vision config", path.display()))?;
        Self::from_json(&text).with_context(|| format!("{}", path.display()))
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub fn num_patches(&self) -> usize {
        self.grid() * self.grid()
    }
}

/// `(weight [out, in], bias [out])`.
struct Affine {
    w: Tensor,
    b: Tensor,
}

impl Affine {
    /// `x [.., in] -> [.., out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_matmul(&self.w.t()?)?.broadcast_add(&self.b)?)
    }
}

struct Layer {
    ln1: Affine,
    q: Affine,
    k: Affine,
    v: Affine,
    o: Affine,
    ln2: Affine,
    fc1: Affine,
    fc2: Affine,
}

pub struct ClipVision {
    cfg: ClipVisionConfig,
    /// Conv weight flattened: `[D, C·P·P]` (no bias, as CLIP).
    patch: Tensor,
    /// `[D]`
    class: Tensor,
    /// `[N + 1, D]`
    pos: Tensor,
    pre_ln: Affine,
    layers: Vec<Layer>,
    /// Layers actually run: the selected hidden state needs no later layer.
    run_layers: usize,
}

/// LayerNorm over the last dimension, statistics in f32.
fn layer_norm(x: &Tensor, ln: &Affine, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed
        .to_dtype(dtype)?
        .broadcast_mul(&ln.w)?
        .broadcast_add(&ln.b)?)
}

impl ClipVision {
    /// Builds the tower from HF weights (`vision_model.`-prefixed or not); `select_layer` as
    /// LLaVA's `visual_select_layer`.
    pub fn new(
        cfg: &ClipVisionConfig,
        weights: &mut dyn WeightSource,
        select_layer: i64,
        dtype: DType,
        device: &Device,
    ) -> Result<ClipVision> {
        let n_layers = cfg.num_hidden_layers as i64;
        // hidden_states = [embeddings, layer 1, ..., layer N]: index N + 1 + select for select < 0.
        let index = if select_layer < 0 {
            n_layers + 1 + select_layer
        } else {
            select_layer
        };
        if !(0..=n_layers).contains(&index) {
            bail!(
                "visual_select_layer {select_layer} is outside the {n_layers} layers of the vision tower"
            );
        }
        // `vision_model.` prefixes CLIPModel checkpoints (and older CLIPVisionModel saves);
        // transformers 5 saves a CLIPVisionModel without it.
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = match weights.take(&format!("vision_model.{name}"))? {
                Some(t) => t,
                None => weights
                    .take(name)?
                    .with_context(|| format!("vision weight `vision_model.{name}` is missing"))?,
            };
            if t.dims() != shape {
                bail!(
                    "vision weight `{name}` has shape {:?}, the config expects {shape:?}",
                    t.dims()
                );
            }
            Ok(t.to_device(device)?.to_dtype(dtype)?)
        };
        let (d, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let e = "embeddings";
        let patch =
            take(&format!("{e}.patch_embedding.weight"), &[d, c, p, p])?.reshape((d, c * p * p))?;
        let class = take(&format!("{e}.class_embedding"), &[d])?;
        let pos = take(
            &format!("{e}.position_embedding.weight"),
            &[cfg.num_patches() + 1, d],
        )?;
        let mut affine = |name: &str, out: usize, inp: Option<usize>| -> Result<Affine> {
            let w_shape = match inp {
                Some(i) => vec![out, i],
                None => vec![out],
            };
            Ok(Affine {
                w: take(&format!("{name}.weight"), &w_shape)?,
                b: take(&format!("{name}.bias"), &[out])?,
            })
        };
        let pre_ln = affine("pre_layrnorm", d, None)?;
        let mut layers = Vec::with_capacity(index as usize);
        for i in 0..index as usize {
            let l = format!("encoder.layers.{i}");
            layers.push(Layer {
                ln1: affine(&format!("{l}.layer_norm1"), d, None)?,
                q: affine(&format!("{l}.self_attn.q_proj"), d, Some(d))?,
                k: affine(&format!("{l}.self_attn.k_proj"), d, Some(d))?,
                v: affine(&format!("{l}.self_attn.v_proj"), d, Some(d))?,
                o: affine(&format!("{l}.self_attn.out_proj"), d, Some(d))?,
                ln2: affine(&format!("{l}.layer_norm2"), d, None)?,
                fc1: affine(&format!("{l}.mlp.fc1"), cfg.intermediate_size, Some(d))?,
                fc2: affine(&format!("{l}.mlp.fc2"), d, Some(cfg.intermediate_size))?,
            });
        }
        Ok(ClipVision {
            cfg: cfg.clone(),
            patch,
            class,
            pos,
            pre_ln,
            run_layers: index as usize,
            layers,
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// `pixels [B, C, S, S]` -> image features `[B, N, D]` (the selected hidden state without
    /// the class token).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, c, s, s2) = pixels.dims4()?;
        if c != cfg.num_channels || s != cfg.image_size || s2 != cfg.image_size {
            bail!(
                "pixel values have shape {:?}, the vision tower takes [B, {}, {}, {}]",
                pixels.dims(),
                cfg.num_channels,
                cfg.image_size,
                cfg.image_size
            );
        }
        let (g, p, d) = (cfg.grid(), cfg.patch_size, cfg.hidden_size);
        let dtype = self.patch.dtype();
        // Non-overlapping patches in row-major grid order, each flattened as (channel, y, x)
        // like the conv weight.
        let patches = pixels
            .to_dtype(dtype)?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))? // [B, g, g, C, P, P]
            .contiguous()?
            .reshape((b, g * g, c * p * p))?;
        let emb = patches.broadcast_matmul(&self.patch.t()?)?; // [B, N, D]
        let cls = self.class.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &emb], 1)?.broadcast_add(&self.pos)?; // [B, N+1, D]
        let mut x = layer_norm(&x, &self.pre_ln, cfg.layer_norm_eps)?;
        for layer in self.layers.iter().take(self.run_layers) {
            x = self.layer_forward(layer, &x)?;
        }
        Ok(x.narrow(1, 1, g * g)?.contiguous()?) // drop the class token
    }

    /// One pre-LN layer: `x + attn(ln1(x))`, then `+ mlp(ln2(.))`. `x [B, T, D]`.
    fn layer_forward(&self, l: &Layer, x: &Tensor) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t, d) = x.dims3()?;
        let (h, hd) = (cfg.num_attention_heads, d / cfg.num_attention_heads);
        let heads = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?) // [B, H, T, hd]
        };
        let h1 = layer_norm(x, &l.ln1, cfg.layer_norm_eps)?;
        let q = heads(l.q.forward(&h1)?)?;
        let k = heads(l.k.forward(&h1)?)?;
        let v = heads(l.v.forward(&h1)?)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?; // [B, H, T, T]
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let attn = probs.to_dtype(x.dtype())?.matmul(&v)?; // [B, H, T, hd]
        let attn = attn.transpose(1, 2)?.contiguous()?.reshape((b, t, d))?;
        let x = (x + l.o.forward(&attn)?)?;
        let h2 = layer_norm(&x, &l.ln2, cfg.layer_norm_eps)?;
        let f = l.fc1.forward(&h2)?;
        let f = match cfg.hidden_act.as_str() {
            // quick_gelu: x · sigmoid(1.702 x)
            "quick_gelu" => (&f * candle_nn::ops::sigmoid(&(&f * 1.702)?)?)?,
            _ => f.gelu_erf()?,
        };
        Ok((x + l.fc2.forward(&f)?)?)
    }
}
