//! Checkpoints: trainable weights (fp32 master), optimizer moments, scheduler/sampler position,
//! RNG seed and the config, in `work_dir/checkpoints/step-NNNNNN/`.
//!
//! Written to a temporary sibling directory, every file fsynced, then renamed into place and the
//! parent directory fsynced: a crash mid-write leaves the previous checkpoint intact and the
//! half-written one is never picked by `--resume auto` (its name does not parse as a step).
//!
//! A distributed run (ZeRO-2) cannot rename one directory from many processes: every rank writes
//! its shard (`shard-RRRRR-of-WWWWW.safetensors`: its slice of the padded flat master buffer and
//! of the AdamW moments, plus a `.json` with its range and sampler position) into the step
//! directory itself, each file under a temporary name, fsynced, then renamed. Rank 0 adds
//! `state.json` and `config.toml`. The coordinator writes `MANIFEST.json` once every rank
//! reported its shard durable; a step directory holding shard files but no manifest is an
//! uncommitted one and is never listed. [`load`] consolidates the shards, so resume on any
//! number of ranks, `ftrun export` and `ftrun merge` read a sharded checkpoint like any other.

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
    /// Set when the tensors are in per-rank shard files (a distributed run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<ShardLayout>,
}

/// How a distributed checkpoint's flat buffers are split into per-rank shard files: the flat
/// buffer of `numel` values is zero-padded to a multiple of `world` and rank r holds the r-th
/// of `world` equal pieces.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardLayout {
    pub world: usize,
    /// Trainable values, unpadded.
    pub numel: usize,
    /// Shapes of the trainable tensors, in the order of `CheckpointState::trainable`.
    pub shapes: Vec<Vec<usize>>,
}

/// What each rank records beside its shard tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardInfo {
    pub rank: usize,
    pub world: usize,
    pub step: usize,
    /// The shard's element range in the padded flat buffer.
    pub start: usize,
    pub end: usize,
    pub sampler: SamplerState,
}

/// Name of a shard's slice of the fp32 master buffer; its other `[shard]` tensors are
/// optimizer state, and tensors of any other shape are replicated (e.g. the step count).
pub const SHARD_MASTER: &str = "master";

/// The file whose presence commits a distributed checkpoint (written by the coordinator).
pub const MANIFEST: &str = "MANIFEST.json";

pub const FORMAT: u32 = 1;

pub fn checkpoints_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("checkpoints")
}

fn step_dir_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// `work_dir/checkpoints/step-NNNNNN`.
pub fn step_dir(work_dir: &Path, step: usize) -> PathBuf {
    checkpoints_dir(work_dir).join(step_dir_name(step))
}

/// `shard-RRRRR-of-WWWWW`: the stem of rank `rank`'s files.
pub fn shard_stem(rank: usize, world: usize) -> String {
    format!("shard-{rank:05}-of-{world:05}")
}

/// A step directory is complete when the coordinator committed it (MANIFEST.json), or, for a
/// single-process checkpoint (no shard files), when its state.json exists.
fn is_complete(dir: &Path) -> Result<bool> {
    if dir.join(MANIFEST).is_file() {
        return Ok(true);
    }
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        if e?.file_name().to_string_lossy().starts_with("shard-") {
            return Ok(false);
        }
    }
    Ok(dir.join("state.json").is_file())
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
            if is_complete(&e.path())? {
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
    prune(work_dir, keep_last)?;
    Ok(final_dir)
}

/// Removes all but the newest `keep_last` complete checkpoints (0 = keep all).
pub fn prune(work_dir: &Path, keep_last: usize) -> Result<()> {
    if keep_last > 0 {
        let all = list(work_dir)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep_last)) {
            std::fs::remove_dir_all(old).with_context(|| format!("pruning {}", old.display()))?;
        }
    }
    Ok(())
}

/// Writes `bytes` to `dir/name` durably: a temporary name, fsync, rename. (The caller fsyncs
/// `dir` once after its last file.)
fn write_file_atomic(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    write(&tmp)?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    let dst = dir.join(name);
    std::fs::rename(&tmp, &dst)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))
}

/// Makes the step directory ready for a (re)write by every rank: creates it and removes a
/// manifest left by an earlier commit of the same step (rank 0 only, before the ranks write).
pub fn prepare_step_dir(work_dir: &Path, step: usize) -> Result<PathBuf> {
    let dir = step_dir(work_dir, step);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let manifest = dir.join(MANIFEST);
    if manifest.exists() {
        std::fs::remove_file(&manifest)
            .with_context(|| format!("removing the stale {}", manifest.display()))?;
    }
    Ok(dir)
}

/// One rank's part of a distributed checkpoint of `info.step`: its shard tensors (the master
/// slice under [`SHARD_MASTER`] and the optimizer slices) and its `ShardInfo`; rank 0 also
/// passes the run's state and config. Every file is durable when this returns. Returns the
/// file names (relative to the step directory) for the commit report.
pub fn save_shard(
    work_dir: &Path,
    info: &ShardInfo,
    tensors: &[(String, Tensor)],
    run: Option<(&CheckpointState, &str)>,
) -> Result<Vec<String>> {
    let dir = step_dir(work_dir, info.step);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = shard_stem(info.rank, info.world);
    let mut files = vec![];
    let name = format!("{stem}.safetensors");
    write_file_atomic(&dir, &name, |p| save_tensors(p, tensors))?;
    files.push(name);
    let name = format!("{stem}.json");
    write_file_atomic(&dir, &name, |p| {
        write_synced(p, serde_json::to_string_pretty(info)?.as_bytes())
    })?;
    files.push(name);
    if let Some((state, config_toml)) = run {
        write_file_atomic(&dir, "config.toml", |p| {
            write_synced(p, config_toml.as_bytes())
        })?;
        write_file_atomic(&dir, "state.json", |p| {
            write_synced(p, serde_json::to_string_pretty(state)?.as_bytes())
        })?;
        files.extend(["config.toml".to_string(), "state.json".to_string()]);
    }
    sync_dir(&dir)?;
    Ok(files)
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
    let (trainable, optimizer) = match &state.shards {
        None => (
            load_tensors(&dir.join("trainable.safetensors"), device)?,
            load_tensors(&dir.join("optimizer.safetensors"), device)?,
        ),
        Some(layout) => load_shards(dir, &state, layout, device)?,
    };
    Ok(Checkpoint {
        trainable,
        optimizer,
        config_toml: std::fs::read_to_string(dir.join("config.toml")).unwrap_or_default(),
        state,
    })
}

/// Trainable and optimizer tensors of the shards, consolidated: every `[shard]` tensor is
/// concatenated over the ranks and unpadded to `[numel]`; the master buffer is split back into
/// the named trainable tensors; other tensors must agree across shards and are taken once.
type Named = Vec<(String, Tensor)>;
fn load_shards(
    dir: &Path,
    state: &CheckpointState,
    layout: &ShardLayout,
    device: &Device,
) -> Result<(Named, Named)> {
    if !dir.join(MANIFEST).is_file() {
        bail!(
            "{}: a distributed checkpoint without {MANIFEST}: it was never committed (a rank \
             failed while saving); resume from an earlier step",
            dir.display()
        );
    }
    if layout.shapes.len() != state.trainable.len() || layout.world == 0 {
        bail!(
            "{}: state.json lists {} trainable tensors but {} shapes over {} shards",
            dir.display(),
            state.trainable.len(),
            layout.shapes.len(),
            layout.world
        );
    }
    let shard_len = crate::dist::collectives::padded_len(layout.numel, layout.world) / layout.world;
    let mut sharded: Vec<(String, Vec<Tensor>)> = vec![];
    let mut replicated: Vec<(String, Tensor)> = vec![];
    for rank in 0..layout.world {
        let path = dir.join(format!("{}.safetensors", shard_stem(rank, layout.world)));
        let tensors = load_tensors(&path, device)?;
        if rank == 0 && !tensors.iter().any(|(n, _)| n == SHARD_MASTER) {
            bail!("{}: no `{SHARD_MASTER}` tensor", path.display());
        }
        for (name, t) in tensors {
            if t.dims() == [shard_len] {
                match sharded.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, parts)) => parts.push(t),
                    None if rank == 0 => sharded.push((name, vec![t])),
                    None => bail!("{}: `{name}` is not in shard 0", path.display()),
                }
            } else if rank == 0 {
                replicated.push((name, t));
            } else {
                let first = replicated.iter().find(|(n, _)| *n == name);
                let same = match first {
                    Some((_, f)) => {
                        f.dims() == t.dims()
                            && crate::train::trainer::to_vec_f64(f)?
                                == crate::train::trainer::to_vec_f64(&t)?
                    }
                    None => false,
                };
                if !same {
                    bail!(
                        "{}: `{name}` {:?} differs from shard 0's (shards of different steps?)",
                        path.display(),
                        t.dims()
                    );
                }
            }
        }
    }
    let mut trainable = vec![];
    let mut optimizer = replicated;
    for (name, parts) in sharded {
        if parts.len() != layout.world {
            bail!(
                "{}: `{name}` is in {} of {} shards",
                dir.display(),
                parts.len(),
                layout.world
            );
        }
        let full = Tensor::cat(&parts, 0)?.narrow(0, 0, layout.numel)?; // [numel]
        if name != SHARD_MASTER {
            optimizer.push((name, full));
            continue;
        }
        let mut offset = 0;
        for (tname, shape) in state.trainable.iter().zip(&layout.shapes) {
            let n: usize = shape.iter().product();
            if offset + n > layout.numel {
                bail!(
                    "{}: trainable shapes need more than the {} values of the shards",
                    dir.display(),
                    layout.numel
                );
            }
            trainable.push((
                tname.clone(),
                full.narrow(0, offset, n)?.reshape(shape.as_slice())?,
            ));
            offset += n;
        }
    }
    // Sorted by name, as a single-process checkpoint's tensors are.
    trainable.sort_by(|a, b| a.0.cmp(&b.0));
    optimizer.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((trainable, optimizer))
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
