//! `ftrun logits`: the model's logits for a text, as JSON, so scripts/check_export_torch.py can
//! compare exported adapters, merged and full models with transformers / peft, and
//! scripts/check_llava_hf.py an exported LLaVA model with `LlavaForConditionalGeneration`.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

use crate::data::{IMAGE_TOKEN, IMAGE_TOKEN_ID};
use crate::infer::llava::{encode_around_image, LlavaParts, LlavaPaths};
use crate::infer::load::load_for_inference;
use crate::infer::CausalLm;
use crate::model::decoder::Batch;

#[derive(clap::Args, Debug)]
pub struct LogitsArgs {
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The text (BOS is prepended). With --llava it holds one `<image>` where the image goes.
    #[arg(long)]
    pub text: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub out: PathBuf,
    /// An exported LLaVA directory (as `ftrun chat --llava`): logits through the chat path,
    /// with the image's rows in place of `<image>`.
    #[arg(long, requires_all = ["visual_encoder", "image"])]
    pub llava: Option<PathBuf>,
    /// The CLIP tower of the LLaVA model.
    #[arg(long)]
    pub visual_encoder: Option<PathBuf>,
    /// The image (PNG or JPEG) for --llava.
    #[arg(long)]
    pub image: Option<PathBuf>,
}

pub fn run(a: LogitsArgs) -> Result<()> {
    let json = match &a.llava {
        Some(llava) => llava_logits(&a, llava)?,
        None => {
            let (model, tok) = load_for_inference(&a.model, a.adapter.as_deref(), &a.device)?;
            let mut ids: Vec<u32> = tok.bos_id().into_iter().collect();
            ids.extend(tok.encode(&a.text, false)?);
            let labels = vec![crate::data::IGNORE_INDEX; ids.len()];
            let logits = model.logits(&Batch::single(ids.clone(), labels))?; // [tokens, vocab] f32
            serde_json::json!({"input_ids": ids, "logits": logits.to_vec2::<f32>()?})
        }
    };
    std::fs::write(&a.out, serde_json::to_string(&json)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "logits [{} x {}] -> {}",
        json["logits"].as_array().map_or(0, |r| r.len()),
        json["logits"][0].as_array().map_or(0, |r| r.len()),
        a.out.display()
    );
    Ok(())
}

/// The LLaVA chat path's logits, fed as a chat feeds: the tokens before the image one at a
/// time, the image placeholder (all its rows at once), then each later token, through one KV
/// cache. Rows: every text position and the image's last row; `positions` gives each row's
/// position in the expanded sequence. Also writes the image's `pixel_values [3, S, S]`.
fn llava_logits(a: &LogitsArgs, llava: &std::path::Path) -> Result<serde_json::Value> {
    let (Some(visual_encoder), Some(image)) = (&a.visual_encoder, &a.image) else {
        bail!("--llava needs --visual-encoder and --image");
    };
    if a.text.matches(IMAGE_TOKEN).count() != 1 {
        bail!(
            "--text must hold exactly one `{IMAGE_TOKEN}` (where the image goes) with --llava, got {:?}",
            a.text
        );
    }
    let paths = LlavaPaths {
        llm: &a.model,
        visual_encoder,
        llava,
        adapter: a.adapter.as_deref(),
    };
    let (parts, tok) = LlavaParts::load(&paths, &a.device, None)?;
    let pixels = parts.preprocess().load(image, parts.decoder.device())?; // [3, S, S]
    let mut cache = parts.cache_with_image(Some(&pixels))?;
    let mut ids: Vec<u32> = tok.bos_id().into_iter().collect();
    ids.extend(encode_around_image(&tok, &a.text, false)?);
    let n = parts.image_tokens();
    let (mut rows, mut positions) = (Vec::new(), Vec::new());
    for &id in &ids {
        rows.push(parts.forward_infer(&[id], &mut cache)?);
        positions.push(<LlavaParts as CausalLm>::cache_len(&cache) - 1);
    }
    // The placeholder as -1, as JSON has no u32::MAX sentinel worth reading.
    let shown: Vec<i64> = ids
        .iter()
        .map(|&t| if t == IMAGE_TOKEN_ID { -1 } else { t as i64 })
        .collect();
    Ok(serde_json::json!({
        "input_ids": shown,
        "image_tokens": n,
        "positions": positions,
        "logits": rows,
        "pixel_values": pixels.to_dtype(candle_core::DType::F32)?.to_vec3::<f32>()?,
    }))
}
