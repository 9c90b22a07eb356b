//! Hugging Face safetensors checkpoints: loading (single file or sharded with an index, memory
//! mapped, tensor by tensor) and writing (sharded like `save_pretrained`, atomically).

use crate::fsutil::sync_dir;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, Metadata, SafeTensors, TensorInfo};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A checkpoint that fits in one file.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint: `{"metadata": {"total_size"}, "weight_map": {name: shard}}`.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Load the tensors of the Hugging Face checkpoint in `dir` whose name passes `filter`, keyed by
/// their exact safetensors names and cast to `dtype` on `device`.
///
/// Reads `model.safetensors`, else `model.safetensors.index.json` and its shards. Files are memory
/// mapped and converted one tensor at a time, so host memory beyond the result stays near one
/// tensor. Sources may be bf16, fp16 or fp32.
pub fn load_weights(
    dir: &Path,
    dtype: DType,
    device: &Device,
    filter: impl Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>> {
    let plan = weight_plan(dir)?;
    let mut out = HashMap::new();
    for (file, expected) in &plan {
        let mmap = map_file(file)?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| anyhow!("{}: corrupt or not a safetensors file: {e}", file.display()))?;
        let names: Vec<String> = match expected {
            // The index is the authority on which shard holds a tensor.
            Some(names) => names.clone(),
            None => {
                let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
                names.sort();
                names
            }
        };
        for name in names.iter().filter(|n| filter(n)) {
            let view = st.tensor(name).map_err(|e| {
                anyhow!(
                    "{}: tensor `{name}` listed in {INDEX_FILE} is not in this shard ({e})",
                    file.display()
                )
            })?;
            let src_dtype = float_dtype(view.dtype()).ok_or_else(|| {
                anyhow!(
                    "{}: tensor `{name}` has dtype {:?}; only bf16, fp16 and fp32 weights can be \
                     loaded",
                    file.display(),
                    view.dtype()
                )
            })?;
            let tensor = Tensor::from_raw_buffer(view.data(), src_dtype, view.shape(), device)
                .and_then(|t| t.to_dtype(dtype))
                .with_context(|| format!("{}: loading tensor `{name}`", file.display()))?;
            if out.insert(name.clone(), tensor).is_some() {
                bail!(
                    "{}: tensor `{name}` appears in more than one weight file",
                    file.display()
                );
            }
        }
    }
    Ok(out)
}

/// Where a model builder takes its weights from, one tensor at a time.
pub trait WeightSource {
    /// Removes `name` and returns it (any float dtype, on any device); `None` when absent.
    fn take(&mut self, name: &str) -> Result<Option<Tensor>>;
}

impl WeightSource for HashMap<String, Tensor> {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        Ok(self.remove(name))
    }
}

/// A Hugging Face checkpoint read lazily: files stay memory mapped and a tensor is copied out
/// (on the host, in its stored dtype) only when the model builder takes it. Building a
/// quantized model from it keeps host and device memory near the quantized size plus one tensor,
/// never the whole bf16 model.
pub struct LazyCheckpoint {
    files: Vec<(PathBuf, memmap2::Mmap)>,
    /// tensor name -> where it lies, read once from the headers at open.
    index: HashMap<String, LazyTensor>,
}

/// One tensor of a [`LazyCheckpoint`]: its file, dtype, shape and byte range in the map.
struct LazyTensor {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    bytes: std::ops::Range<usize>,
}

impl LazyCheckpoint {
    pub fn open(dir: &Path) -> Result<LazyCheckpoint> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for (file, expected) in weight_plan(dir)? {
            let mmap = map_file(&file)?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                anyhow!("{}: corrupt or not a safetensors file: {e}", file.display())
            })?;
            let names: Vec<String> = match expected {
                Some(names) => names,
                None => st.names().into_iter().map(String::from).collect(),
            };
            for name in names {
                let view = st.tensor(&name).map_err(|e| {
                    anyhow!(
                        "{}: tensor `{name}` listed in {INDEX_FILE} is not in this shard ({e})",
                        file.display()
                    )
                })?;
                let dtype = float_dtype(view.dtype()).ok_or_else(|| {
                    anyhow!(
                        "{}: tensor `{name}` has dtype {:?}; only bf16, fp16 and fp32 weights \
                         can be loaded",
                        file.display(),
                        view.dtype()
                    )
                })?;
                // The data is a slice of the map: keep its range, not the parsed header.
                let start = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
                let entry = LazyTensor {
                    file: files.len(),
                    dtype,
                    shape: view.shape().to_vec(),
                    bytes: start..start + view.data().len(),
                };
                if index.insert(name.clone(), entry).is_some() {
                    bail!(
                        "{}: tensor `{name}` appears in more than one weight file",
                        file.display()
                    );
                }
            }
            drop(st);
            files.push((file, mmap));
        }
        Ok(LazyCheckpoint { files, index })
    }
}

impl WeightSource for LazyCheckpoint {
    fn take(&mut self, name: &str) -> Result<Option<Tensor>> {
        let Some(t) = self.index.remove(name) else {
            return Ok(None);
        };
        let (file, mmap) = &self.files[t.file];
        let tensor = Tensor::from_raw_buffer(&mmap[t.bytes], t.dtype, &t.shape, &Device::Cpu)
            .with_context(|| format!("{}: loading tensor `{name}`", file.display()))?;
        Ok(Some(tensor))
    }
}

/// The weight files of the checkpoint in `dir`, each with the tensor names the index assigns to it
/// (None for a single `model.safetensors`: every tensor in it).
fn weight_plan(dir: &Path) -> Result<Vec<(PathBuf, Option<Vec<String>>)>> {
    if !dir.is_dir() {
        bail!("model directory {} does not exist", dir.display());
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![(single, None)]);
    }
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        let weight_map = read_index(&index_path)?;
        // shard file -> names, both sorted, so loading order is deterministic.
        let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, file) in weight_map {
            by_file.entry(file).or_default().push(name);
        }
        let mut plan = Vec::with_capacity(by_file.len());
        for (file, names) in by_file {
            let path = dir.join(&file);
            if !path.is_file() {
                bail!(
                    "{}: shard `{file}` (holding `{}` and {} more tensors) is missing from {}",
                    index_path.display(),
                    names[0],
                    names.len() - 1,
                    dir.display()
                );
            }
            plan.push((path, Some(names)));
        }
        return Ok(plan);
    }
    let mut hint = String::new();
    if dir.join("pytorch_model.bin").is_file() || dir.join("pytorch_model.bin.index.json").is_file()
    {
        hint = "; it holds pytorch_model.bin: convert it to safetensors first (transformers: \
                save_pretrained(..., safe_serialization=True))"
            .into();
    } else if dir.join("adapter_model.safetensors").is_file() {
        hint =
            "; it holds adapter_model.safetensors: that is a LoRA adapter, not a base model".into();
    }
    bail!(
        "no weights in {}: expected {SINGLE_FILE} or {INDEX_FILE}{hint}",
        dir.display()
    )
}

/// `weight_map` of a safetensors index file.
fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the index", path.display()))?;
    let index: Index = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: invalid safetensors index: {e}", path.display()))?;
    if index.weight_map.is_empty() {
        bail!("{}: weight_map is empty", path.display());
    }
    for (name, file) in &index.weight_map {
        // Shards live next to the index; anything else would read outside the model directory.
        if file.contains('/') || file.contains('\\') || file == ".." {
            bail!(
                "{}: tensor `{name}` maps to `{file}`, which is not a file name in this directory",
                path.display()
            );
        }
    }
    Ok(index.weight_map)
}

fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file =
        File::open(path).with_context(|| format!("{}: cannot open weights", path.display()))?;
    // SAFETY: the map is read-only and dropped before this function's caller returns; a checkpoint
    // being rewritten underneath a running load is outside what any loader can guard against.
    unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("{}: cannot memory-map weights", path.display()))
}

fn float_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::BF16 => Some(DType::BF16),
        StDtype::F16 => Some(DType::F16),
        StDtype::F32 => Some(DType::F32),
        _ => None,
    }
}

/// Write `tensors` (cast to `dtype`) as a Hugging Face checkpoint in `dir`: one
/// `model.safetensors` when the total fits in `max_shard_bytes`, else
/// `model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`.
///
/// Tensors fill shards in the given order; a shard is closed when the next tensor would push it
/// past `max_shard_bytes` (a single larger tensor gets a shard of its own), as transformers does.
/// Every file is written to a temporary name, fsynced and renamed, and the index comes last, so
/// a crash never leaves a checkpoint that looks complete but is not. Weight files of an earlier
/// checkpoint in `dir` that this one does not overwrite are removed.
pub fn save_sharded(
    dir: &Path,
    tensors: &[(String, Tensor)],
    max_shard_bytes: usize,
    dtype: DType,
) -> Result<()> {
    if tensors.is_empty() {
        bail!("{}: no tensors to save", dir.display());
    }
    if max_shard_bytes == 0 {
        bail!("max shard size must be positive");
    }
    if float_dtype(dtype.into()).is_none() {
        bail!("weights are saved as bf16, fp16 or fp32, not {dtype:?}");
    }
    let mut seen = std::collections::HashSet::new();
    for (name, _) in tensors {
        if !seen.insert(name.as_str()) {
            bail!("{}: tensor `{name}` is given twice", dir.display());
        }
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create the output directory", dir.display()))?;

    let bytes_of = |t: &Tensor| t.elem_count() * dtype.size_in_bytes();
    let mut shards: Vec<Vec<usize>> = vec![];
    let mut current_bytes = 0usize;
    for (i, (_, t)) in tensors.iter().enumerate() {
        let n = bytes_of(t);
        match shards.last_mut() {
            Some(shard) if current_bytes + n <= max_shard_bytes => {
                shard.push(i);
                current_bytes += n;
            }
            _ => {
                shards.push(vec![i]);
                current_bytes = n;
            }
        }
    }

    let mut written: Vec<String> = vec![];
    if shards.len() == 1 {
        write_safetensors_atomic(&dir.join(SINGLE_FILE), tensors.iter(), dtype)?;
        written.push(SINGLE_FILE.into());
    } else {
        let count = shards.len();
        let mut weight_map = BTreeMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
            write_safetensors_atomic(&dir.join(&file), shard.iter().map(|&j| &tensors[j]), dtype)?;
            for &j in shard {
                weight_map.insert(tensors[j].0.clone(), file.clone());
            }
            written.push(file);
        }
        let total_size: usize = tensors.iter().map(|(_, t)| bytes_of(t)).sum();
        let index = serde_json::json!({
            "metadata": { "total_size": total_size },
            "weight_map": weight_map,
        });
        let mut text = serde_json::to_string_pretty(&index)?;
        text.push('\n');
        write_atomic(&dir.join(INDEX_FILE), |f| Ok(f.write_all(text.as_bytes())?))?;
        written.push(INDEX_FILE.into());
    }
    remove_stale_weights(dir, &written)?;
    sync_dir(dir)
}

/// Delete weight files in `dir` that look like ours (single file, index, numbered shards) but were
/// not written by this save: a loader would otherwise pick up a stale `model.safetensors`.
fn remove_stale_weights(dir: &Path, keep: &[String]) -> Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot list", dir.display()))?;
        let Some(name) = entry.file_name().to_str().map(String::from) else {
            continue;
        };
        let ours = name == SINGLE_FILE || name == INDEX_FILE || is_shard_name(&name);
        if ours && !keep.contains(&name) {
            std::fs::remove_file(entry.path()).with_context(|| {
                format!("{}: cannot remove stale weights", entry.path().display())
            })?;
        }
    }
    Ok(())
}

/// `model-00001-of-00003.safetensors`.
fn is_shard_name(name: &str) -> bool {
    let Some(middle) = name
        .strip_prefix("model-")
        .and_then(|s| s.strip_suffix(".safetensors"))
    else {
        return false;
    };
    match middle.split_once("-of-") {
        Some((a, b)) => {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        }
        None => false,
    }
}

/// One safetensors file; the header comes from the safetensors crate (sorted by name, 8-byte
/// aligned, `{"format": "pt"}` metadata as transformers writes), the data tensor by tensor.
fn write_safetensors_atomic<'a>(
    path: &Path,
    tensors: impl Iterator<Item = &'a (String, Tensor)>,
    dtype: DType,
) -> Result<()> {
    let mut tensors: Vec<&(String, Tensor)> = tensors.collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for (name, t) in &tensors {
        let n = t.elem_count() * dtype.size_in_bytes();
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: dtype.into(),
                shape: t.dims().to_vec(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let metadata = Metadata::new(Some(meta), infos)
        .map_err(|e| anyhow!("{}: cannot build the header: {e}", path.display()))?;
    let mut header = serde_json::to_vec(&metadata)?;
    header.resize(header.len().next_multiple_of(8), b' ');

    write_atomic(path, |f| {
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(&header)?;
        for (name, t) in &tensors {
            let bytes = tensor_bytes(t, dtype).with_context(|| format!("tensor `{name}`"))?;
            f.write_all(&bytes)?;
        }
        Ok(())
    })
}

/// The little-endian bytes of `t` cast to `dtype`, row-major.
fn tensor_bytes(t: &Tensor, dtype: DType) -> Result<Vec<u8>> {
    let flat = t.to_dtype(dtype)?.flatten_all()?;
    let bytes: Vec<u8> = match dtype {
        DType::BF16 => bytemuck::cast_slice(flat.to_vec1::<half::bf16>()?.as_slice()).to_vec(),
        DType::F16 => bytemuck::cast_slice(flat.to_vec1::<half::f16>()?.as_slice()).to_vec(),
        DType::F32 => bytemuck::cast_slice(flat.to_vec1::<f32>()?.as_slice()).to_vec(),
        other => bail!("cannot write {other:?} weights"),
    };
    Ok(bytes)
}

/// Write `path` through `<path>.tmp`: write, flush, fsync, rename. A failure removes the temp file.
pub(crate) fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&File>) -> Result<()>,
) -> Result<()> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let result = (|| -> Result<()> {
        let file = File::create(&tmp).context("cannot create")?;
        {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &file);
            write(&mut w)?;
            w.flush().context("cannot write")?;
        }
        file.sync_all().context("cannot fsync")?;
        std::fs::rename(&tmp, path).context("cannot rename into place")?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("{}: writing failed", path.display()))
}

/// A byte size as `--max-shard-size` takes it: `2GB`, `500MB`, `1.5GiB`, `4096` (bytes).
/// Decimal units (KB/MB/GB/TB = 10^3..10^12) and binary ones (KiB/MiB/GiB/TiB = 2^10..2^40)
/// follow transformers; units are case-insensitive.
pub fn parse_size(text: &str) -> Result<usize> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    let value: f64 = number
        .parse()
        .map_err(|_| anyhow!("invalid size `{text}`: expected a number then a unit, like 2GB"))?;
    let scale: f64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024f64,
        "MIB" => 1024f64.powi(2),
        "GIB" => 1024f64.powi(3),
        "TIB" => 1024f64.powi(4),
        _ => bail!("invalid size `{text}`: unknown unit `{unit}` (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"),
    };
    let bytes = (value * scale).round();
    if bytes < 1.0 || bytes > usize::MAX as f64 {
        bail!("invalid size `{text}`: must be at least one byte");
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_units() {
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size(" 500mb ").unwrap(), 500_000_000);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("10 KB").unwrap(), 10_000);
    }

    #[test]
    fn parse_size_rejects_garbage() {
        for bad in ["", "GB", "2XB", "-1GB", "0", "1.2.3MB"] {
            let err = parse_size(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
        }
    }

    #[test]
    fn shard_names() {
        assert!(is_shard_name("model-00001-of-00002.safetensors"));
        assert!(!is_shard_name("model.safetensors"));
        assert!(!is_shard_name("model-a-of-00002.safetensors"));
        assert!(!is_shard_name("adapter_model.safetensors"));
    }
}
