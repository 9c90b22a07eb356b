//! The CLIP vision tower of LLaVA (Hugging Face `CLIPVisionModel` layout): patch embedding,
//! class token, learned positions, pre-LayerNorm, pre-LN transformer layers with bias and
//! quick_gelu, and LLaVA's feature selection (the hidden states of layer `select_layer`, -2 by
//! default, with the class token dropped: 576 tokens for 336 px / patch 14).
//!
//! Weights load under their HF names (`vision_model.encoder.layers.{i}.self_attn.q_proj.weight`);
//! a `CLIPModel` checkpoint's `vision_config` is accepted too.
//!
//! The tower is frozen in both LLaVA stages; the finetune stage may put LoRA adapters (PEFT
//! semantics, [`crate::model::layers::lora`]) on the layers' linears. Activations run as rows
//! `[images · tokens, hidden]` with one attention segment per image, through the hand-derived
//! modules of [`crate::model::layers`]: [`ClipVision::forward_train`] keeps what
//! [`ClipVision::backward`] needs (or only each layer's input with checkpointing), and the
//! backward computes the adapters' gradients only: no base weight gets a `dW`, and it stops at
//! the first layer that holds an adapter.

use crate::model::decoder::{Grads, LoraSpec, TrainableInfo};
use crate::model::layers::attention::{
    bidirectional_attention_backward, bidirectional_attention_forward,
};
use crate::model::layers::gelu::{
    gelu_backward, gelu_forward, quick_gelu_backward, quick_gelu_forward,
};
use crate::model::layers::layernorm::{layernorm_backward, layernorm_forward, LayerNormStats};
use crate::model::layers::linear::{linear_backward, linear_forward};
use crate::model::layers::lora::{
    dropout_mask, lora_a_init, lora_backward, lora_forward, LoraSaved,
};
use crate::model::layers::{acc_dtype, mix_seed};
use crate::model::weights::WeightSource;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
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

/// Leaf names of the linears of a CLIP encoder layer, in layer order: the valid ViT LoRA
/// targets (XTuner's `find_all_linear_names` on a CLIPVisionModel finds exactly these).
pub const VISION_LINEARS: [&str; 6] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];

/// A LayerNorm's `(weight [D], bias [D])`.
struct Norm {
    w: Tensor,
    b: Tensor,
}

/// A linear with bias, and its LoRA adapter when targeted.
struct VisionLinear {
    /// `[out, in]`
    w: Tensor,
    /// `[out]`
    b: Tensor,
    /// Trainable slot of the adapter's `A [r, in]`; its `B [out, r]` is the next slot.
    lora: Option<usize>,
    /// Position among the layer's linears: decorrelates the dropout masks of one layer.
    ordinal: u64,
}

struct Layer {
    ln1: Norm,
    q: VisionLinear,
    k: VisionLinear,
    v: VisionLinear,
    o: VisionLinear,
    ln2: Norm,
    fc1: VisionLinear,
    fc2: VisionLinear,
}

impl Layer {
    fn has_lora(&self) -> bool {
        [&self.q, &self.k, &self.v, &self.o, &self.fc1, &self.fc2]
            .iter()
            .any(|l| l.lora.is_some())
    }
}

pub struct ClipVision {
    cfg: ClipVisionConfig,
    dtype: DType,
    device: Device,
    /// Conv weight flattened: `[D, C·P·P]` (no bias, as CLIP).
    patch: Tensor,
    /// `[D]`
    class: Tensor,
    /// `[N + 1, D]`
    pos: Tensor,
    pre_ln: Norm,
    /// The layers that run: the selected hidden state needs no later layer.
    layers: Vec<Layer>,
    /// The adapters' tensors, in slot order (`A`, `B` per adapted linear).
    trainable: Vec<TrainableInfo>,
    /// Their current values in the compute dtype.
    lora_params: Vec<Tensor>,
    /// Their initial values in f32 (exact, not a round trip through the compute dtype).
    lora_init: Vec<Tensor>,
    lora_scale: f64,
    lora_dropout: f64,
}

/// What one layer's backward needs.
struct LayerActs {
    /// Layer input `[n, D]`.
    x: Tensor,
    ln1: LayerNormStats,
    h1: Tensor,
    /// Adapter state of q, k, v, out_proj, fc1, fc2.
    saved: [Option<LoraSaved>; 6],
    /// `[n, heads, head_dim]`
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Attention output `[n, heads, head_dim]` and its row log-sum-exp `[heads, n]`.
    attn: Tensor,
    lse: Tensor,
    /// Residual stream after attention `[n, D]`.
    x2: Tensor,
    ln2: LayerNormStats,
    h2: Tensor,
    /// fc1 output (before the activation) and the activation `[n, I]`.
    f: Tensor,
    g: Tensor,
}

/// What the training forward keeps per layer: everything, or only the input (checkpointing).
enum Kept {
    Input(Tensor),
    Acts(Box<LayerActs>),
}

/// What [`ClipVision::forward_train`] keeps for [`ClipVision::backward`].
pub struct VisionActs {
    /// One entry per layer from the first adapted one on.
    kept: Vec<Kept>,
    /// Index of the layer `kept[0]` belongs to.
    first: usize,
    images: usize,
    cu_seqlens: Vec<u32>,
    step_seed: u64,
}

/// Builds the tower's tables while the weights are read.
struct VisionBuilder<'a> {
    weights: &'a mut dyn WeightSource,
    dtype: DType,
    device: Device,
    lora: Option<&'a LoraSpec>,
    seed: u64,
    trainable: Vec<TrainableInfo>,
    lora_params: Vec<Tensor>,
    lora_init: Vec<Tensor>,
}

impl VisionBuilder<'_> {
    /// `vision_model.{name}` (or `{name}`) with the expected shape, cast to the compute dtype.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        // `vision_model.` prefixes CLIPModel checkpoints (and older CLIPVisionModel saves);
        // transformers 5 saves a CLIPVisionModel without it.
        let t = match self.weights.take(&format!("vision_model.{name}"))? {
            Some(t) => t,
            None => self
                .weights
                .take(name)?
                .with_context(|| format!("vision weight `vision_model.{name}` is missing"))?,
        };
        if t.dims() != shape {
            bail!(
                "vision weight `{name}` has shape {:?}, the config expects {shape:?}",
                t.dims()
            );
        }
        Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    fn norm(&mut self, name: &str, d: usize) -> Result<Norm> {
        Ok(Norm {
            w: self.take(&format!("{name}.weight"), &[d])?,
            b: self.take(&format!("{name}.bias"), &[d])?,
        })
    }

    fn push_trainable(&mut self, name: String, init: Tensor) -> Result<usize> {
        let slot = self.trainable.len();
        self.trainable.push(TrainableInfo {
            name,
            shape: init.dims().to_vec(),
            decay: true,
        });
        self.lora_params.push(init.to_dtype(self.dtype)?);
        self.lora_init.push(init);
        Ok(slot)
    }

    /// `{prefix}.weight [out, in]` + `{prefix}.bias`, with an adapter when `leaf` is targeted.
    fn linear(
        &mut self,
        prefix: &str,
        leaf: &str,
        ordinal: u64,
        out_f: usize,
        in_f: usize,
    ) -> Result<VisionLinear> {
        let w = self.take(&format!("{prefix}.weight"), &[out_f, in_f])?;
        let b = self.take(&format!("{prefix}.bias"), &[out_f])?;
        let rank = self
            .lora
            .filter(|spec| spec.targets.is_empty() || spec.targets.iter().any(|t| t == leaf))
            .map(|spec| spec.r);
        let lora = match rank {
            Some(r) => {
                let a_seed = mix_seed(self.seed, self.trainable.len() as u64);
                let a = lora_a_init(r, in_f, a_seed, &self.device)?; // [r, in] f32
                let b = Tensor::zeros((out_f, r), DType::F32, &self.device)?; // [out, r]
                let name = format!("vision_model.{prefix}");
                let slot = self.push_trainable(format!("{name}.lora_A.weight"), a)?;
                self.push_trainable(format!("{name}.lora_B.weight"), b)?;
                Some(slot)
            }
            None => None,
        };
        Ok(VisionLinear {
            w,
            b,
            lora,
            ordinal,
        })
    }
}

impl ClipVision {
    /// Builds a frozen tower from HF weights (`vision_model.`-prefixed or not); `select_layer` as
    /// LLaVA's `visual_select_layer`.
    pub fn new(
        cfg: &ClipVisionConfig,
        weights: &mut dyn WeightSource,
        select_layer: i64,
        dtype: DType,
        device: &Device,
    ) -> Result<ClipVision> {
        Self::new_with_lora(cfg, weights, select_layer, None, dtype, device, 0)
    }

    /// [`ClipVision::new`] with LoRA adapters on the targeted linears of the layers that run
    /// (`spec.targets` from [`VISION_LINEARS`]; empty = all), `A` drawn from `seed`, `B` zero.
    pub fn new_with_lora(
        cfg: &ClipVisionConfig,
        weights: &mut dyn WeightSource,
        select_layer: i64,
        lora: Option<&LoraSpec>,
        dtype: DType,
        device: &Device,
        seed: u64,
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
        if let Some(spec) = lora {
            if spec.r == 0 {
                bail!("vision LoRA rank r must be at least 1");
            }
            if !(0.0..1.0).contains(&spec.dropout) {
                bail!("vision LoRA dropout {} must be in [0, 1)", spec.dropout);
            }
            if let Some(bad) = spec
                .targets
                .iter()
                .find(|t| !VISION_LINEARS.contains(&t.as_str()))
            {
                bail!(
                    "vision LoRA target `{bad}` is not a linear of the CLIP vision tower; valid targets: {}",
                    VISION_LINEARS.join(", ")
                );
            }
        }
        let mut b = VisionBuilder {
            weights,
            dtype,
            device: device.clone(),
            lora,
            seed,
            trainable: Vec::new(),
            lora_params: Vec::new(),
            lora_init: Vec::new(),
        };
        let (d, c, p, inter) = (
            cfg.hidden_size,
            cfg.num_channels,
            cfg.patch_size,
            cfg.intermediate_size,
        );
        let e = "embeddings";
        let patch = b
            .take(&format!("{e}.patch_embedding.weight"), &[d, c, p, p])?
            .reshape((d, c * p * p))?;
        let class = b.take(&format!("{e}.class_embedding"), &[d])?;
        let pos = b.take(
            &format!("{e}.position_embedding.weight"),
            &[cfg.num_patches() + 1, d],
        )?;
        let pre_ln = b.norm("pre_layrnorm", d)?;
        let mut layers = Vec::with_capacity(index as usize);
        for i in 0..index as usize {
            let l = format!("encoder.layers.{i}");
            let a = format!("{l}.self_attn");
            layers.push(Layer {
                ln1: b.norm(&format!("{l}.layer_norm1"), d)?,
                q: b.linear(&format!("{a}.q_proj"), "q_proj", 0, d, d)?,
                k: b.linear(&format!("{a}.k_proj"), "k_proj", 1, d, d)?,
                v: b.linear(&format!("{a}.v_proj"), "v_proj", 2, d, d)?,
                o: b.linear(&format!("{a}.out_proj"), "out_proj", 3, d, d)?,
                ln2: b.norm(&format!("{l}.layer_norm2"), d)?,
                fc1: b.linear(&format!("{l}.mlp.fc1"), "fc1", 4, inter, d)?,
                fc2: b.linear(&format!("{l}.mlp.fc2"), "fc2", 5, d, inter)?,
            });
        }
        let (lora_scale, lora_dropout) = lora
            .map(|s| (s.alpha / s.r as f64, s.dropout))
            .unwrap_or((0.0, 0.0));
        Ok(ClipVision {
            cfg: cfg.clone(),
            dtype,
            device: device.clone(),
            patch,
            class,
            pos,
            pre_ln,
            layers,
            trainable: b.trainable,
            lora_params: b.lora_params,
            lora_init: b.lora_init,
            lora_scale,
            lora_dropout,
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    pub fn compute_dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The adapters' tensors (empty for a frozen tower), in gradient-slot order.
    pub fn trainable(&self) -> &[TrainableInfo] {
        &self.trainable
    }

    /// f32 initial values of the trainables (the optimizer's master copy).
    pub fn initial_trainable_values(&self) -> Vec<Tensor> {
        self.lora_init.clone()
    }

    /// Frees the initial values once the optimizer holds them (after this,
    /// [`ClipVision::initial_trainable_values`] is empty).
    pub fn release_initial_values(&mut self) {
        self.lora_init = Vec::new();
    }

    /// Replaces the trainables (any dtype, `trainable()` order) after an optimizer step.
    pub fn set_trainable(&mut self, values: &[Tensor]) -> Result<()> {
        if values.len() != self.trainable.len() {
            bail!(
                "vision set_trainable got {} tensors for {} trainables",
                values.len(),
                self.trainable.len()
            );
        }
        for (slot, value) in values.iter().enumerate() {
            let info = &self.trainable[slot];
            if value.dims() != info.shape.as_slice() {
                bail!(
                    "vision set_trainable: `{}` expects shape {:?}, got {:?}",
                    info.name,
                    info.shape,
                    value.dims()
                );
            }
            self.lora_params[slot] = value.to_device(&self.device)?.to_dtype(self.dtype)?;
        }
        Ok(())
    }

    /// Gradient accumulators of the trainables (f32; f64 for an f64 tower).
    pub fn new_grads(&self) -> Grads {
        let shapes: Vec<Vec<usize>> = self.trainable.iter().map(|t| t.shape.clone()).collect();
        Grads::new(&shapes, acc_dtype(self.dtype), &self.device)
    }

    /// `pixels [B, C, S, S]` -> image features `[B, N, D]` (the selected hidden state without
    /// the class token). No dropout, nothing kept.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (x, cu) = self.embed(pixels)?;
        let mut x = x;
        for layer in &self.layers {
            x = self.layer_forward(layer, &x, &cu, None)?.0;
        }
        self.features(&x, cu.len() - 1)
    }

    /// The training forward: [`ClipVision::forward`] with the adapters' dropout (masks drawn
    /// from `step_seed`), keeping what [`ClipVision::backward`] needs from the first adapted
    /// layer on (only each layer's input when `checkpointing`).
    pub fn forward_train(
        &self,
        pixels: &Tensor,
        step_seed: u64,
        checkpointing: bool,
    ) -> Result<(Tensor, VisionActs)> {
        let (mut x, cu) = self.embed(pixels)?;
        let first = self
            .layers
            .iter()
            .position(Layer::has_lora)
            .unwrap_or(self.layers.len());
        let mut kept = Vec::with_capacity(self.layers.len() - first);
        for (li, layer) in self.layers.iter().enumerate() {
            let seed = Self::layer_seed(step_seed, li);
            let (y, acts) = self.layer_forward(layer, &x, &cu, Some(seed))?;
            if li >= first {
                kept.push(if checkpointing {
                    drop(acts);
                    Kept::Input(x)
                } else {
                    Kept::Acts(Box::new(acts))
                });
            }
            x = y;
        }
        let images = cu.len() - 1;
        let features = self.features(&x, images)?;
        let acts = VisionActs {
            kept,
            first,
            images,
            cu_seqlens: cu,
            step_seed,
        };
        Ok((features, acts))
    }

    /// Backward of [`ClipVision::forward_train`] for upstream `dfeatures [B, N, D]`: adds the
    /// adapters' gradients into `grads`. Frozen weights get none, and layers before the first
    /// adapted one are not visited.
    pub fn backward(&self, acts: VisionActs, dfeatures: &Tensor, grads: &mut Grads) -> Result<()> {
        if grads.len() != self.trainable.len() {
            bail!(
                "vision grads have {} slots for {} trainables (use ClipVision::new_grads)",
                grads.len(),
                self.trainable.len()
            );
        }
        let (b, n, d) = (acts.images, self.cfg.num_patches(), self.cfg.hidden_size);
        if dfeatures.dims() != [b, n, d] {
            bail!(
                "feature gradient has shape {:?}, expected [{b}, {n}, {d}]",
                dfeatures.dims()
            );
        }
        // The class token's row gets no gradient: it was dropped from the features.
        let zeros = Tensor::zeros((b, 1, d), self.dtype, &self.device)?;
        let mut dx = Tensor::cat(&[&zeros, &dfeatures.to_dtype(self.dtype)?], 1)?
            .reshape((b * (n + 1), d))?; // [B·T, D]
        let first = acts.first;
        for (i, kept) in acts.kept.into_iter().enumerate().rev() {
            let li = first + i;
            let layer = &self.layers[li];
            let la = match kept {
                Kept::Acts(a) => *a,
                Kept::Input(x) => {
                    let seed = Self::layer_seed(acts.step_seed, li);
                    self.layer_forward(layer, &x, &acts.cu_seqlens, Some(seed))?
                        .1
                }
            };
            let need_dx = li > first;
            match self.layer_backward(layer, &la, &dx, &acts.cu_seqlens, need_dx, grads)? {
                Some(next) => dx = next,
                None => break,
            }
        }
        Ok(())
    }

    fn layer_seed(step_seed: u64, layer: usize) -> u64 {
        mix_seed(step_seed, layer as u64 + 1)
    }

    /// Patch + class + position embeddings and the pre-LayerNorm: rows `[B·(N+1), D]` (class
    /// token first in each image) and the images' `cu_seqlens`.
    fn embed(&self, pixels: &Tensor) -> Result<(Tensor, Vec<u32>)> {
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
        let t = g * g + 1;
        // Non-overlapping patches in row-major grid order, each flattened as (channel, y, x)
        // like the conv weight.
        let patches = pixels
            .to_dtype(self.dtype)?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))? // [B, g, g, C, P, P]
            .contiguous()?
            .reshape((b, g * g, c * p * p))?;
        let emb = patches.broadcast_matmul(&self.patch.t()?)?; // [B, N, D]
        let cls = self.class.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &emb], 1)?
            .broadcast_add(&self.pos)? // [B, T, D]
            .reshape((b * t, d))?;
        let (x, _) = layernorm_forward(&x, &self.pre_ln.w, &self.pre_ln.b, cfg.layer_norm_eps)?;
        let cu = (0..=b).map(|i| (i * t) as u32).collect();
        Ok((x, cu))
    }

    /// Rows `[B·T, D]` -> features `[B, N, D]` without the class token.
    fn features(&self, x: &Tensor, images: usize) -> Result<Tensor> {
        let (n, d) = (self.cfg.num_patches(), self.cfg.hidden_size);
        Ok(x.reshape((images, n + 1, d))?
            .narrow(1, 1, n)?
            .contiguous()?)
    }

    /// `y = x Wᵀ + b (+ LoRA)`; the adapter's dropout only with a `seed` (training).
    fn linear_fwd(
        &self,
        l: &VisionLinear,
        x: &Tensor,
        seed: Option<u64>,
    ) -> Result<(Tensor, Option<LoraSaved>)> {
        let y = linear_forward(x, &l.w, Some(&l.b))?;
        let Some(a) = l.lora else {
            return Ok((y, None));
        };
        let mask = match seed {
            Some(seed) => {
                let (n, in_f) = x.dims2()?;
                dropout_mask(
                    n,
                    in_f,
                    self.lora_dropout,
                    mix_seed(seed, l.ordinal),
                    self.dtype,
                    &self.device,
                )?
            }
            None => None,
        };
        let (delta, saved) = lora_forward(
            x,
            &self.lora_params[a],
            &self.lora_params[a + 1],
            self.lora_scale,
            mask,
        )?;
        Ok(((y + delta)?, Some(saved)))
    }

    /// Accumulates the adapter's gradients; returns `dx` when `need_dx`. The base weight and
    /// bias are frozen: their gradients are never computed.
    fn linear_bwd(
        &self,
        l: &VisionLinear,
        x: &Tensor,
        saved: Option<&LoraSaved>,
        dy: &Tensor,
        need_dx: bool,
        grads: &mut Grads,
    ) -> Result<Option<Tensor>> {
        let mut dx = if need_dx {
            linear_backward(x, &l.w, dy, true, false, false)?.dx
        } else {
            None
        };
        if let (Some(a), Some(saved)) = (l.lora, saved) {
            let g = lora_backward(
                x,
                &self.lora_params[a],
                &self.lora_params[a + 1],
                self.lora_scale,
                saved,
                dy,
            )?;
            grads.add(a, &g.da)?;
            grads.add(a + 1, &g.db)?;
            dx = dx.map(|d| d + g.dx).transpose()?;
        }
        Ok(dx)
    }

    fn act_forward(&self, f: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.hidden_act.as_str() {
            "quick_gelu" => quick_gelu_forward(f)?,
            _ => gelu_forward(f)?,
        })
    }

    fn act_backward(&self, f: &Tensor, dg: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.hidden_act.as_str() {
            "quick_gelu" => quick_gelu_backward(f, dg)?,
            _ => gelu_backward(f, dg)?,
        })
    }

    /// One pre-LN layer over rows `x [n, D]`: `x2 = x + o(attn(ln1(x)))`,
    /// `out = x2 + fc2(act(fc1(ln2(x2))))`; attention within each image (`cu_seqlens`).
    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        cu_seqlens: &[u32],
        seed: Option<u64>,
    ) -> Result<(Tensor, LayerActs)> {
        let cfg = &self.cfg;
        let (n, d) = x.dims2()?;
        let (h, hd) = (cfg.num_attention_heads, d / cfg.num_attention_heads);
        let eps = cfg.layer_norm_eps;
        let (h1, ln1) = layernorm_forward(x, &l.ln1.w, &l.ln1.b, eps)?;
        let (q, q_s) = self.linear_fwd(&l.q, &h1, seed)?;
        let (k, k_s) = self.linear_fwd(&l.k, &h1, seed)?;
        let (v, v_s) = self.linear_fwd(&l.v, &h1, seed)?;
        let (q, k, v) = (
            q.reshape((n, h, hd))?, // [n, heads, head_dim]
            k.reshape((n, h, hd))?,
            v.reshape((n, h, hd))?,
        );
        let (attn, lse) = bidirectional_attention_forward(&q, &k, &v, cu_seqlens)?;
        let (o, o_s) = self.linear_fwd(&l.o, &attn.reshape((n, d))?, seed)?;
        let x2 = (x + o)?;
        let (h2, ln2) = layernorm_forward(&x2, &l.ln2.w, &l.ln2.b, eps)?;
        let (f, f1_s) = self.linear_fwd(&l.fc1, &h2, seed)?; // [n, I]
        let g = self.act_forward(&f)?;
        let (m, f2_s) = self.linear_fwd(&l.fc2, &g, seed)?; // [n, D]
        let out = (&x2 + m)?;
        let acts = LayerActs {
            x: x.clone(),
            ln1,
            h1,
            saved: [q_s, k_s, v_s, o_s, f1_s, f2_s],
            q,
            k,
            v,
            attn,
            lse,
            x2,
            ln2,
            h2,
            f,
            g,
        };
        Ok((out, acts))
    }

    /// Backward of one layer for upstream `dout [n, D]`; returns the input's gradient when
    /// `need_dx` (not for the first adapted layer: nothing before it trains).
    fn layer_backward(
        &self,
        l: &Layer,
        a: &LayerActs,
        dout: &Tensor,
        cu_seqlens: &[u32],
        need_dx: bool,
        grads: &mut Grads,
    ) -> Result<Option<Tensor>> {
        let [q_s, k_s, v_s, o_s, f1_s, f2_s] = &a.saved;
        let n = dout.dim(0)?;
        // MLP half: out = x2 + fc2(act(fc1(ln2(x2))))
        let dg = self
            .linear_bwd(&l.fc2, &a.g, f2_s.as_ref(), dout, true, grads)?
            .context("fc2: no dx")?;
        let df = self.act_backward(&a.f, &dg)?;
        let dh2 = self
            .linear_bwd(&l.fc1, &a.h2, f1_s.as_ref(), &df, true, grads)?
            .context("fc1: no dx")?;
        let dx2 = (dout + layernorm_backward(&a.x2, &l.ln2.w, &a.ln2, &dh2, false)?.dx)?;
        // Attention half: x2 = x + o(attn(q, k, v)), q/k/v = proj(ln1(x))
        let attn_flat = a.attn.reshape((n, ()))?;
        let dattn = self
            .linear_bwd(&l.o, &attn_flat, o_s.as_ref(), &dx2, true, grads)?
            .context("out_proj: no dx")?
            .reshape(a.attn.shape())?;
        let (dq, dk, dv) = bidirectional_attention_backward(
            &a.q, &a.k, &a.v, &a.attn, &a.lse, &dattn, cu_seqlens,
        )?;
        let mut dh1: Option<Tensor> = None;
        for (lin, saved, dy) in [(&l.q, q_s, dq), (&l.k, k_s, dk), (&l.v, v_s, dv)] {
            let dy = dy.reshape((n, ()))?;
            if let Some(d) = self.linear_bwd(lin, &a.h1, saved.as_ref(), &dy, need_dx, grads)? {
                dh1 = Some(match dh1 {
                    Some(acc) => (acc + d)?,
                    None => d,
                });
            }
        }
        let Some(dh1) = dh1 else {
            return Ok(None);
        };
        let dx_norm = layernorm_backward(&a.x, &l.ln1.w, &a.ln1, &dh1, false)?.dx;
        Ok(Some((dx2 + dx_norm)?))
    }
}
