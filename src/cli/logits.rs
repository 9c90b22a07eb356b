//! `ftrun logits`: the model's logits for a text, as JSON, so scripts/check_export_torch.py can
//! compare exported adapters, merged and full models with transformers / peft.

use anyhow::{Context, Result};
use std::path::PathBuf;

use crate::infer::load::load_for_inference;
use crate::model::decoder::Batch;

#[derive(clap::Args, Debug)]
pub struct LogitsArgs {
    pub model: PathBuf,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub text: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: LogitsArgs) -> Result<()> {
    let (model, tok) = load_for_inference(&a.model, a.adapter.as_deref(), &a.device)?;
    let mut ids: Vec<u32> = tok.bos_id().into_iter().collect();
    ids.extend(tok.encode(&a.text, false)?);
    let labels = vec![crate::data::IGNORE_INDEX; ids.len()];
    let logits = model.logits(&Batch::single(ids.clone(), labels))?; // [tokens, vocab] f32
    let rows = logits.to_vec2::<f32>()?;
    let json = serde_json::json!({"input_ids": ids, "logits": rows});
    std::fs::write(&a.out, serde_json::to_string(&json)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "logits [{} x {}] -> {}",
        rows.len(),
        rows.first().map_or(0, |r| r.len()),
        a.out.display()
    );
    Ok(())
}
