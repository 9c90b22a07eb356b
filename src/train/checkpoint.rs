//! Checkpoints: trainable weights (fp32 master), optimizer moments, scheduler/sampler position,
//! RNG seed and the config, in `work_dir/checkpoints/step-NNNNNN/`.
//!
//! Written to a temporary sibling directory, every file fsynced, then renamed into place and the
//! parent directory fsynced: a crash mid-write leaves the previous checkpoint intact and the
//! half-written one is never picked by `--resume auto` (its name does not parse as a step).

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::data::sampler::SamplerState;
use crate::fsutil::{sync_dir, write_synced};

/// What a run must match to resume from a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunIdentity {
    /// sha256 of the base model's config.json.
    pub model: String,
    /// The packed dataset's cache key (data files, tokenizer, template, max_length, packing).
    pub data: String,
    /// "lora", "qlora" or "full", with the LoRA shape.
    pub method: String,
}

/// Scalars saved beside the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format: u32,
    pub ftrun_version: String,
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    pub sampler: SamplerState,
    pub seed: u64,
    pub identity: RunIdentity,
    /// Names of the trainable tensors, in the engine's order.
    pub trainable: Vec<String>,
    /// Loss history (step, loss) so a resumed run's curve is complete.
    pub history: Vec<(usize, f64)>,
}

pub const FORMAT: u32 = 1;

pub fn checkpoints_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("checkpoints")
}

fn step_dir_name(step: usize) -> String {
    format!("step-{step:06}")
}

fn parse_step(name: &str) -> Option<usize> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Committed checkpoints, oldest first.
pub fn list(work_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = checkpoints_dir(work_dir);
    if !dir.exists() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = parse_step(&name) {
            if e.path().join("state.json").is_file() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The latest committed checkpoint of a work dir.
pub fn latest(work_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(work_dir)?.pop().map(|(_, p)| p))
}

fn save_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, path)
        .with_context(|| format!("writing {}", path.display()))?;
    File::open(path)?.sync_all()?;
    Ok(())
}

/// Everything a checkpoint holds, in memory.
pub struct Checkpoint {
    pub state: CheckpointState,
    /// fp32 master values of the trainable tensors, by name.
    pub trainable: Vec<(String, Tensor)>,
    /// Optimizer tensors by name (flat moments and the like).
    pub optimizer: Vec<(String, Tensor)>,
    pub config_toml: String,
}

/// Write a checkpoint atomically and prune to the newest `keep_last` (0 = keep all).
pub fn save(work_dir: &Path, ck: &Checkpoint, keep_last: usize) -> Result<PathBuf> {
    let dir = checkpoints_dir(work_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let final_dir = dir.join(step_dir_name(ck.state.step));
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        step_dir_name(ck.state.step),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    save_tensors(&tmp.join("trainable.safetensors"), &ck.trainable)?;
    save_tensors(&tmp.join("optimizer.safetensors"), &ck.optimizer)?;
    write_synced(&tmp.join("config.toml"), ck.config_toml.as_bytes())?;
    // state.json last: its presence marks a complete directory.
    write_synced(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&ck.state)?.as_bytes(),
    )?;
    sync_dir(&tmp)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("committing {}", final_dir.display()))?;
    sync_dir(&dir)?;
    if keep_last > 0 {
        let all = list(work_dir)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep_last)) {
            std::fs::remove_dir_all(old).with_context(|| format!("pruning {}", old.display()))?;
        }
    }
    Ok(final_dir)
}

fn load_tensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let map = candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Read a checkpoint directory.
pub fn load(dir: &Path, device: &Device) -> Result<Checkpoint> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).with_context(|| {
        format!(
            "{}: not a checkpoint (no readable state.json)",
            dir.display()
        )
    })?;
    let state: CheckpointState = serde_json::from_str(&text)
        .with_context(|| format!("{}: corrupt state.json", state_path.display()))?;
    if state.format != FORMAT {
        bail!(
            "{}: checkpoint format {} is not supported (expected {FORMAT})",
            dir.display(),
            state.format
        );
    }
    Ok(Checkpoint {
        trainable: load_tensors(&dir.join("trainable.safetensors"), device)?,
        optimizer: load_tensors(&dir.join("optimizer.safetensors"), device)?,
        config_toml: std::fs::read_to_string(dir.join("config.toml")).unwrap_or_default(),
        state,
    })
}

/// Refuse to resume a checkpoint made by a different model, dataset or method, naming each
/// difference with the checkpoint's value and this run's.
pub fn check_identity(dir: &Path, saved: &RunIdentity, now: &RunIdentity) -> Result<()> {
    let short = |h: &str| h.chars().take(12).collect::<String>();
    let mut diffs = vec![];
    if saved.model != now.model {
        diffs.push(format!(
            "the base model (config.json sha256 {} in the checkpoint, {} now)",
            short(&saved.model),
            short(&now.model)
        ));
    }
    if saved.data != now.data {
        diffs.push(format!(
            "the dataset (data files, tokenizer, template, max_length or packing differ: key {} in the checkpoint, {} now)",
            short(&saved.data),
            short(&now.data)
        ));
    }
    if saved.method != now.method {
        diffs.push(format!(
            "the training method ({} in the checkpoint, {} now)",
            saved.method, now.method
        ));
    }
    if !diffs.is_empty() {
        bail!(
            "{} was made by another run: {}; start a new work dir or resume the matching config",
            dir.display(),
            diffs.join("; ")
        );
    }
    Ok(())
}
