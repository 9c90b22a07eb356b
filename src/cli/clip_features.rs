//! `ftrun clip-features`: a CLIP vision tower's LLaVA features for one image, written to a
//! safetensors file, so scripts/check_clip_gpu.py can compare them (and the preprocessed pixels)
//! with transformers' CLIPVisionModel and CLIPImageProcessor on the same weights and image.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

use crate::data::image::ClipPreprocess;
use crate::model::vision::{ClipVision, ClipVisionConfig};
use crate::model::weights::LazyCheckpoint;
use crate::train::trainer::{compute_dtype, select_device};

#[derive(clap::Args, Debug)]
pub struct ClipFeaturesArgs {
    /// A Hugging Face CLIPVisionModel (or CLIPModel) directory.
    #[arg(long)]
    pub visual_encoder: PathBuf,
    /// An image (PNG or JPEG), preprocessed as LLaVA does (CLIP resize, centre crop, normalize).
    #[arg(
        long,
        required_unless_present = "pixel_values",
        conflicts_with = "pixel_values"
    )]
    pub image: Option<PathBuf>,
    /// Instead of an image: a safetensors file whose `pixel_values` tensor (`[3, S, S]` or
    /// `[1, 3, S, S]`) goes to the tower as it is.
    #[arg(long)]
    pub pixel_values: Option<PathBuf>,
    /// Pad the image to a square with the mean colour first (LLaVA finetuning).
    #[arg(long, requires = "image")]
    pub pad_to_square: bool,
    /// The hidden state the features come from (LLaVA's `visual_select_layer`).
    #[arg(long, default_value_t = -2, allow_hyphen_values = true)]
    pub select_layer: i64,
    /// Compute dtype: `auto` (bf16 on GPU, f32 on CPU), `f32`, `bf16` or `f16`.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Output safetensors: `features [N, D]` (f32; the class token dropped) and
    /// `pixel_values [3, S, S]` (f32) as the tower took them.
    #[arg(short, long)]
    pub out: PathBuf,
}

pub fn run(a: ClipFeaturesArgs) -> Result<()> {
    if !matches!(a.dtype.as_str(), "auto" | "f32" | "bf16" | "f16") {
        bail!("--dtype `{}`: expected auto, f32, bf16 or f16", a.dtype);
    }
    let device = select_device(&a.device)?;
    let dtype = compute_dtype(&a.dtype, &device);
    let cfg = ClipVisionConfig::from_dir(&a.visual_encoder)?;
    let s = cfg.image_size;
    let pixels = match (&a.image, &a.pixel_values) {
        (Some(image), _) => {
            ClipPreprocess::clip(s as u32, a.pad_to_square).load(image, &Device::Cpu)?
        }
        (None, Some(path)) => read_pixels(path, s)?,
        (None, None) => bail!("give --image or --pixel-values"),
    }; // [3, S, S] f32
    let mut weights = LazyCheckpoint::open(&a.visual_encoder)?;
    let tower = ClipVision::new(&cfg, &mut weights, a.select_layer, dtype, &device)
        .with_context(|| format!("vision tower {}", a.visual_encoder.display()))?;
    drop(weights);
    let input = pixels.to_device(&device)?.to_dtype(dtype)?.unsqueeze(0)?; // [1, 3, S, S]
    let features = tower.forward(&input)?.squeeze(0)?; // [N, D]
    let features = features.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    eprintln!(
        "features {:?} ({dtype:?} on {device:?}) -> {}",
        features.dims(),
        a.out.display()
    );
    let out = HashMap::from([
        ("features".to_string(), features),
        ("pixel_values".to_string(), pixels),
    ]);
    candle_core::safetensors::save(&out, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))
}

/// The `pixel_values` tensor of `path` as `[3, size, size]` f32.
fn read_pixels(path: &std::path::Path, size: usize) -> Result<Tensor> {
    let mut all = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))?;
    let t = all
        .remove("pixel_values")
        .with_context(|| format!("{}: no `pixel_values` tensor", path.display()))?;
    let t = match t.dims() {
        [1, 3, h, w] if (*h, *w) == (size, size) => t.squeeze(0)?,
        [3, h, w] if (*h, *w) == (size, size) => t,
        d => bail!(
            "{}: `pixel_values` has shape {d:?}; the tower takes [3, {size}, {size}] or [1, 3, {size}, {size}]",
            path.display()
        ),
    };
    Ok(t.to_dtype(DType::F32)?)
}
