//! `ftrun check-data`: the dataset exactly as training sees it, with masked spans visible.

use anyhow::Result;
use std::path::Path;

use super::Show;
use crate::config::Config;
use crate::data::pack::PackedSeq;
use crate::data::{IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_ID};
use crate::tokenizer::Tokenizer;

/// Build (or reuse) the packed dataset, print `n` sequences and the summary. A `[llava]` config
/// builds the LLaVA dataset (every image checked) and shows each sample's image.
pub fn run(cfg: &Config, work_dir: &Path, show: Show, n: usize) -> Result<()> {
    let tokenizer = Tokenizer::from_path(&cfg.model.tokenizer_path())?;
    if cfg.llava.is_some() {
        return run_llava(cfg, &tokenizer, work_dir, show, n);
    }
    let (ds, report, _) = crate::data::build_dataset(cfg, &tokenizer, work_dir, true)?;
    for i in 0..n.min(ds.len()) {
        let seq = ds.get_owned(i);
        println!(
            "━━ packed sequence {i} ({} tokens, {} pieces) ━━",
            seq.input_ids.len(),
            seq.cu_seqlens.len() - 1
        );
        for (p, w) in seq.cu_seqlens.windows(2).enumerate() {
            let (a, b) = (w[0] as usize, w[1] as usize);
            println!("── piece {p}: tokens {a}..{b}");
            print_piece(&tokenizer, &seq, a, b, show)?;
        }
    }
    println!("{}", report.summary());
    Ok(())
}

fn run_llava(cfg: &Config, tok: &Tokenizer, work_dir: &Path, show: Show, n: usize) -> Result<()> {
    let (ds, report, _) = crate::data::llava::build_llava_dataset(cfg, tok, work_dir, true)?;
    for i in 0..n.min(ds.len()) {
        let seq = ds.seq(i);
        println!("━━ sample {i} ({} text tokens) ━━", seq.input_ids.len());
        match ds.image(i) {
            Some(img) => println!("image: {} ({})", img.path.display(), img.record),
            None => println!("image: none (text only)"),
        }
        print_piece(tok, &seq, 0, seq.input_ids.len(), show)?;
    }
    println!("{}", report.summary());
    println!(
        "images: {} of {} samples (all readable)",
        ds.image_count(),
        ds.len()
    );
    Ok(())
}

/// `ids` decoded, an image placeholder shown as `<image>`.
fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    let parts: Vec<String> = ids
        .split(|&t| t == IMAGE_TOKEN_ID)
        .map(|part| tok.decode(part, false))
        .collect::<Result<_>>()?;
    Ok(parts.join(IMAGE_TOKEN))
}

fn print_piece(tok: &Tokenizer, seq: &PackedSeq, a: usize, b: usize, show: Show) -> Result<()> {
    let ids = &seq.input_ids[a..b];
    let labels = &seq.labels[a..b];
    if matches!(show, Show::Text | Show::All) {
        println!("[text]\n{}", decode(tok, ids)?);
    }
    if matches!(show, Show::Masked | Show::All) {
        println!(
            "[masked] (⟦…⟧ = not trained)\n{}",
            render_masked(tok, ids, labels)?
        );
    }
    if matches!(show, Show::Ids | Show::All) {
        println!("[input_ids]\n{ids:?}");
    }
    if matches!(show, Show::Labels | Show::All) {
        println!("[labels]\n{labels:?}");
    }
    Ok(())
}

/// Decode runs of equal maskedness, wrapping the untrained runs in ⟦ ⟧.
pub fn render_masked(tok: &Tokenizer, ids: &[u32], labels: &[i32]) -> Result<String> {
    let mut out = String::new();
    let mut start = 0;
    while start < ids.len() {
        let masked = labels[start] == IGNORE_INDEX;
        let mut end = start;
        while end < ids.len() && (labels[end] == IGNORE_INDEX) == masked {
            end += 1;
        }
        let text = decode(tok, &ids[start..end])?;
        if masked {
            out.push_str(&format!("⟦{text}⟧"));
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    Ok(out)
}
