//! Image preprocessing for the CLIP vision tower, as Hugging Face's `CLIPImageProcessor` does it
//! for LLaVA: optional pad-to-square with the mean colour (LLaVA finetuning), resize of the
//! shortest side (bicubic), centre crop, `/255`, then per-channel `(x - mean) / std`.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::{imageops::FilterType, RgbImage};
use std::path::Path;

/// CLIP's normalization constants (OpenAI CLIP, as in every CLIP-L/336 preprocessor_config.json).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
// The published constants, digits beyond f32 included.
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_1];

/// The Hugging Face image-processor config (`preprocessor_config.json`) of CLIP's preprocessing
/// at `size` px: `CLIPImageProcessor`, or with `pad_to_square` the `LlavaImageProcessor` that
/// first pads to a square with the mean colour (as the LLaVA finetune stage does).
pub fn hf_processor_config(size: usize, pad_to_square: bool) -> serde_json::Value {
    let mut config = serde_json::json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true,
        "size": {"shortest_edge": size},
        "resample": 3,
        "do_center_crop": true,
        "crop_size": {"height": size, "width": size},
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": true,
    });
    if pad_to_square {
        config["image_processor_type"] = "LlavaImageProcessor".into();
        config["processor_class"] = "LlavaProcessor".into();
        config["do_pad"] = true.into();
    }
    config
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocess {
    /// Output side in pixels (336 for CLIP-L/336).
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Pad to a square with the mean colour before resizing (LLaVA's `image_aspect_ratio = pad`).
    pub pad_to_square: bool,
}

impl ClipPreprocess {
    pub fn clip(size: u32, pad_to_square: bool) -> ClipPreprocess {
        ClipPreprocess {
            size,
            mean: CLIP_MEAN,
            std: CLIP_STD,
            pad_to_square,
        }
    }

    /// Decodes `path` (PNG or JPEG) and preprocesses it; errors name the file.
    pub fn load(&self, path: &Path, device: &Device) -> Result<Tensor> {
        let img = image::open(path)
            .with_context(|| format!("{}: cannot read the image", path.display()))?
            .to_rgb8();
        self.apply(&img, device)
            .with_context(|| format!("{}: preprocessing", path.display()))
    }

    /// `[3, size, size]` f32 pixel values.
    pub fn apply(&self, img: &RgbImage, device: &Device) -> Result<Tensor> {
        anyhow::ensure!(
            img.width() > 0 && img.height() > 0,
            "the image is empty ({}x{})",
            img.width(),
            img.height()
        );
        let img = if self.pad_to_square {
            self.pad_square(img)
        } else {
            img.clone()
        };
        // Shortest side to `size`, the other scaled and truncated (transformers'
        // get_resize_output_image_size with default_to_square=False).
        let (w, h) = (img.width(), img.height());
        let s = self.size;
        let (nw, nh) = if w <= h {
            (s, ((s as u64 * h as u64) / w as u64) as u32)
        } else {
            (((s as u64 * w as u64) / h as u64) as u32, s)
        };
        let resized = image::imageops::resize(&img, nw, nh, FilterType::CatmullRom);
        // Centre crop; an odd remainder leaves the extra pixel at the end.
        let (left, top) = ((nw - s) / 2, (nh - s) / 2);
        let cropped = image::imageops::crop_imm(&resized, left, top, s, s).to_image();
        let n = (s * s) as usize;
        let mut chw = vec![0f32; 3 * n];
        for (i, px) in cropped.pixels().enumerate() {
            for c in 0..3 {
                chw[c * n + i] = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Ok(Tensor::from_vec(chw, (3, s as usize, s as usize), device)?)
    }

    /// The image centred on a square canvas of the mean colour (LLaVA's `expand2square`).
    fn pad_square(&self, img: &RgbImage) -> RgbImage {
        let (w, h) = (img.width(), img.height());
        if w == h {
            return img.clone();
        }
        let side = w.max(h);
        let fill = image::Rgb(self.mean.map(|m| (m * 255.0) as u8));
        let mut canvas = RgbImage::from_pixel(side, side, fill);
        let (x, y) = ((side - w) / 2, (side - h) / 2);
        image::imageops::replace(&mut canvas, img, x as i64, y as i64);
        canvas
    }
}
