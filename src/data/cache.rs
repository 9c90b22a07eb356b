//! The packed dataset as one memory-mapped file, built once and shared by every rank.
//!
//! File layout (little endian; every array starts 8-byte aligned):
//!
//! | bytes             | content                                                        |
//! |-------------------|----------------------------------------------------------------|
//! | 0..8              | magic `FTRPACK\0`                                              |
//! | 8..12, 12..16     | format version (u32), reserved (u32, 0)                        |
//! | 16..48            | n_seqs, n_tokens, n_cu (total cu_seqlens entries), report_len (u64 each) |
//! | 48..80            | sha256 of the payload arrays                                   |
//! | 80..112           | sha256 of bytes 0..80 + report + offset tables                 |
//! | 112..             | build report JSON, zero-padded to a multiple of 8              |
//! |                   | token offsets: n_seqs+1 u64; cu_seqlens offsets: n_seqs+1 u64  |
//! |                   | payload: input_ids u32, labels i32, position_ids u32 (n_tokens each), cu_seqlens u32 (n_cu) |
//!
//! Next to `pack-<key>.bin` sits `pack-<key>.json`, a human-readable copy of the report.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fsutil::sync_dir;
use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::pack::PackedSeq;

const MAGIC: &[u8; 8] = b"FTRPACK\0";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 112;
/// Bytes 0..CHECKED_HEADER_LEN are covered by the header checksum.
const CHECKED_HEADER_LEN: usize = 80;
/// How long ranks wait for the rank that builds the cache (XTuner waits 60 minutes).
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// What building the dataset did, kept with the cache and printed at start-up.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DataReport {
    pub records_read: usize,
    /// Why records or tokens were dropped -> how many.
    pub dropped: BTreeMap<String, usize>,
    pub samples: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub sequences: usize,
    pub efficiency: f64,
    pub max_length: usize,
}

/// A packed sequence borrowed from the memory-mapped cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PackedSeqRef<'a> {
    pub input_ids: &'a [u32],
    pub labels: &'a [i32],
    pub position_ids: &'a [u32],
    pub cu_seqlens: &'a [u32],
}

impl PackedSeqRef<'_> {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// An owned copy.
    pub fn to_seq(&self) -> PackedSeq {
        PackedSeq {
            input_ids: self.input_ids.to_vec(),
            labels: self.labels.to_vec(),
            position_ids: self.position_ids.to_vec(),
            cu_seqlens: self.cu_seqlens.to_vec(),
        }
    }
}

/// Counts read from (or written into) the header, and where everything lies in the file.
#[derive(Debug, Clone, PartialEq)]
struct Layout {
    n_seqs: usize,
    n_tokens: usize,
    n_cu: usize,
    report: Range<usize>,
    tok_offsets: Range<usize>,
    cu_offsets: Range<usize>,
    input_ids: Range<usize>,
    labels: Range<usize>,
    position_ids: Range<usize>,
    cu_seqlens: Range<usize>,
}

impl Layout {
    /// None when the counts overflow (only a corrupt header does that).
    fn new(n_seqs: usize, n_tokens: usize, n_cu: usize, report_len: usize) -> Option<Layout> {
        let mut at = HEADER_LEN;
        let mut next = |bytes: usize| -> Option<Range<usize>> {
            let start = at;
            at = at.checked_add(bytes)?;
            Some(start..at)
        };
        let report = next(report_len)?;
        next(report_len.checked_next_multiple_of(8)? - report_len)?;
        let offsets_bytes = n_seqs.checked_add(1)?.checked_mul(8)?;
        let tok_offsets = next(offsets_bytes)?;
        let cu_offsets = next(offsets_bytes)?;
        let token_bytes = n_tokens.checked_mul(4)?;
        Some(Layout {
            n_seqs,
            n_tokens,
            n_cu,
            report,
            tok_offsets,
            cu_offsets,
            input_ids: next(token_bytes)?,
            labels: next(token_bytes)?,
            position_ids: next(token_bytes)?,
            cu_seqlens: next(n_cu.checked_mul(4)?)?,
        })
    }

    fn file_len(&self) -> usize {
        self.cu_seqlens.end
    }

    fn payload(&self) -> Range<usize> {
        self.input_ids.start..self.cu_seqlens.end
    }
}

/// The packed dataset, memory-mapped read-only.
pub struct PackedDataset {
    path: PathBuf,
    mmap: Mmap,
    layout: Layout,
    report: DataReport,
}

impl std::fmt::Debug for PackedDataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedDataset")
            .field("path", &self.path)
            .field("sequences", &self.layout.n_seqs)
            .field("tokens", &self.layout.n_tokens)
            .finish()
    }
}

impl PackedDataset {
    /// Maps a cache file and checks its length, magic, version, header checksum and offset
    /// tables (not the payload: see [`PackedDataset::verify_payload`]).
    pub fn open(path: &Path) -> Result<PackedDataset> {
        ensure_little_endian()?;
        let file = File::open(path).with_context(|| format!("opening cache {}", path.display()))?;
        // SAFETY: cache files are never modified in place (they are replaced by rename), so
        // the mapping stays valid while we hold it.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("memory-mapping cache {}", path.display()))?;
        let (layout, report) =
            parse(&mmap).with_context(|| format!("invalid cache file {}", path.display()))?;
        Ok(PackedDataset {
            path: path.to_path_buf(),
            mmap,
            layout,
            report,
        })
    }

    /// Recomputes the payload checksum (reads the whole file).
    pub fn verify_payload(&self) -> Result<()> {
        let stored = &self.mmap[48..80];
        let actual = Sha256::digest(&self.mmap[self.layout.payload()]);
        ensure!(
            stored == actual.as_slice(),
            "cache {}: payload checksum mismatch (file corrupt)",
            self.path.display()
        );
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.layout.n_seqs
    }

    pub fn is_empty(&self) -> bool {
        self.layout.n_seqs == 0
    }

    /// Total tokens over all sequences.
    pub fn tokens(&self) -> usize {
        self.layout.n_tokens
    }

    /// The build report stored in the file.
    pub fn report(&self) -> &DataReport {
        &self.report
    }

    /// Token count of sequence `i`.
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn seq_len(&self, i: usize) -> usize {
        let tok = self.offsets(&self.layout.tok_offsets);
        (tok[i + 1] - tok[i]) as usize
    }

    /// Sequence `i`, borrowed from the mapping.
    ///
    /// # Panics
    /// If `i >= len()` (indices come from a sampler built with `len()`).
    pub fn get(&self, i: usize) -> PackedSeqRef<'_> {
        assert!(
            i < self.len(),
            "PackedDataset::get({i}) out of range: {} holds {} sequences",
            self.path.display(),
            self.len()
        );
        let tok = self.offsets(&self.layout.tok_offsets);
        let cu = self.offsets(&self.layout.cu_offsets);
        let tokens = tok[i] as usize..tok[i + 1] as usize;
        PackedSeqRef {
            input_ids: &self.u32s(&self.layout.input_ids)[tokens.clone()],
            labels: bytemuck::cast_slice(&self.u32s(&self.layout.labels)[tokens.clone()]),
            position_ids: &self.u32s(&self.layout.position_ids)[tokens],
            cu_seqlens: &self.u32s(&self.layout.cu_seqlens)[cu[i] as usize..cu[i + 1] as usize],
        }
    }

    /// Sequence `i` as an owned value.
    pub fn get_owned(&self, i: usize) -> PackedSeq {
        self.get(i).to_seq()
    }

    fn offsets(&self, range: &Range<usize>) -> &[u64] {
        // Alignment was checked in `parse`: the mapping is page aligned and ranges 8-aligned.
        bytemuck::cast_slice(&self.mmap[range.clone()])
    }

    fn u32s(&self, range: &Range<usize>) -> &[u32] {
        bytemuck::cast_slice(&self.mmap[range.clone()])
    }
}

fn ensure_little_endian() -> Result<()> {
    ensure!(
        cfg!(target_endian = "little"),
        "the packed dataset cache is only supported on little-endian machines"
    );
    Ok(())
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8-byte slice"))
}

fn header_digest(bytes: &[u8], layout: &Layout) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&bytes[..CHECKED_HEADER_LEN]);
    h.update(&bytes[layout.report.start..layout.input_ids.start]);
    h.finalize().into()
}

/// Checks everything but the payload checksum.
fn parse(bytes: &[u8]) -> Result<(Layout, DataReport)> {
    ensure!(
        bytes.len() >= HEADER_LEN,
        "file is {} bytes, shorter than the {HEADER_LEN}-byte header (truncated)",
        bytes.len()
    );
    ensure!(
        &bytes[..8] == MAGIC,
        "bad magic {:?} (not an ftrun pack cache)",
        &bytes[..8]
    );
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4-byte slice"));
    ensure!(
        version == VERSION,
        "format version {version}, this ftrun reads version {VERSION}"
    );
    let count = |at: usize| usize::try_from(read_u64(bytes, at)).ok();
    let layout = match (count(16), count(24), count(32), count(40)) {
        (Some(s), Some(t), Some(c), Some(r)) => Layout::new(s, t, c, r),
        _ => None,
    };
    let Some(layout) = layout else {
        bail!("header counts overflow (corrupt header)");
    };
    ensure!(
        bytes.len() == layout.file_len(),
        "file is {} bytes but its header describes {} bytes (truncated or corrupt)",
        bytes.len(),
        layout.file_len()
    );
    ensure!(
        bytes[80..112] == header_digest(bytes, &layout),
        "header checksum mismatch (corrupt header)"
    );
    ensure!(
        bytes.as_ptr() as usize % 8 == 0,
        "mapping is not 8-byte aligned"
    );
    let offsets: &[u64] = bytemuck::cast_slice(&bytes[layout.tok_offsets.clone()]);
    check_offsets(offsets, layout.n_tokens, "token")?;
    let offsets: &[u64] = bytemuck::cast_slice(&bytes[layout.cu_offsets.clone()]);
    check_offsets(offsets, layout.n_cu, "cu_seqlens")?;
    let report = serde_json::from_slice(&bytes[layout.report.clone()])
        .context("build report JSON in the header")?;
    Ok((layout, report))
}

fn check_offsets(offsets: &[u64], total: usize, what: &str) -> Result<()> {
    ensure!(
        offsets.first() == Some(&0) && offsets.last() == Some(&(total as u64)),
        "{what} offsets must run from 0 to {total}"
    );
    if let Some(i) = offsets.windows(2).position(|w| w[0] > w[1]) {
        bail!(
            "{what} offsets decrease at sequence {i}: {} > {}",
            offsets[i],
            offsets[i + 1]
        );
    }
    Ok(())
}

/// Checks that a sequence is well formed before it is written.
fn check_seq(i: usize, seq: &PackedSeq) -> Result<()> {
    let n = seq.input_ids.len();
    ensure!(
        seq.labels.len() == n && seq.position_ids.len() == n,
        "sequence {i}: {n} input_ids but {} labels and {} position_ids",
        seq.labels.len(),
        seq.position_ids.len()
    );
    let cu = &seq.cu_seqlens;
    ensure!(
        cu.first() == Some(&0)
            && cu.last() == Some(&(n as u32))
            && cu.windows(2).all(|w| w[0] <= w[1]),
        "sequence {i}: cu_seqlens {cu:?} must rise from 0 to its length {n}"
    );
    Ok(())
}

/// Writes `seqs` and `report` as a cache file at `path` (not atomically: see
/// [`load_or_build`], which writes to a temporary name and renames).
pub fn write(path: &Path, seqs: &[PackedSeq], report: &DataReport) -> Result<()> {
    ensure_little_endian()?;
    for (i, seq) in seqs.iter().enumerate() {
        check_seq(i, seq)?;
    }
    let report_json = serde_json::to_vec(report)?;
    let n_tokens: usize = seqs.iter().map(PackedSeq::len).sum();
    let n_cu: usize = seqs.iter().map(|s| s.cu_seqlens.len()).sum();
    let layout = Layout::new(seqs.len(), n_tokens, n_cu, report_json.len())
        .context("dataset too large for the cache format")?;

    let mut header = vec![0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    for (at, value) in [
        (16, seqs.len()),
        (24, n_tokens),
        (32, n_cu),
        (40, report_json.len()),
    ] {
        header[at..at + 8].copy_from_slice(&(value as u64).to_le_bytes());
    }
    // Report, padding and offset tables: everything between the header and the payload.
    let mut middle = report_json;
    middle.resize(layout.tok_offsets.start - HEADER_LEN, 0);
    for lengths in [
        seqs.iter().map(PackedSeq::len).collect::<Vec<_>>(),
        seqs.iter().map(|s| s.cu_seqlens.len()).collect(),
    ] {
        middle.extend_from_slice(&0u64.to_le_bytes());
        let mut offset = 0u64;
        for len in lengths {
            offset += len as u64;
            middle.extend_from_slice(&offset.to_le_bytes());
        }
    }

    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = HashingWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        hash: Sha256::new(),
    };
    out.inner.write_all(&header)?;
    out.inner.write_all(&middle)?;
    for seq in seqs {
        out.write_all(bytemuck::cast_slice(&seq.input_ids))?;
    }
    for seq in seqs {
        out.write_all(bytemuck::cast_slice(&seq.labels))?;
    }
    for seq in seqs {
        out.write_all(bytemuck::cast_slice(&seq.position_ids))?;
    }
    for seq in seqs {
        out.write_all(bytemuck::cast_slice(&seq.cu_seqlens))?;
    }
    header[48..80].copy_from_slice(&out.hash.finalize());
    let mut file = out
        .inner
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", path.display()))?;
    // The header checksum covers the header fields and the middle section.
    let mut h = Sha256::new();
    h.update(&header[..CHECKED_HEADER_LEN]);
    h.update(&middle);
    header[80..112].copy_from_slice(&h.finalize());
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&header)?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    debug_assert_eq!(file.metadata()?.len() as usize, layout.file_len());
    Ok(())
}

/// Hashes the payload on its way to the file.
struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> HashingWriter<W> {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hash.update(bytes);
        self.inner.write_all(bytes)
    }
}

/// sha256 hex of the parts, each length-prefixed so that ("ab","c") != ("a","bc").
pub fn cache_key(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    hex::encode(h.finalize())
}

/// [`load_or_build_with_timeout`] with the 60-minute [`DEFAULT_LOCK_TIMEOUT`].
pub fn load_or_build(
    dir: &Path,
    key: &str,
    build: impl FnOnce() -> Result<(Vec<PackedSeq>, DataReport)>,
) -> Result<(PackedDataset, DataReport, bool)> {
    load_or_build_with_timeout(dir, key, DEFAULT_LOCK_TIMEOUT, build)
}

/// Opens `dir/pack-<key>.bin` if it is a valid cache, or builds it with `build` and writes it.
/// Returns the dataset, its report, and whether it came from an existing file.
///
/// Concurrent callers (ranks) serialize on an advisory lock on `dir/pack-<key>.lock`: one
/// builds, the others wait up to `timeout` and then read its file. The cache is written to a
/// temporary file in `dir`, fsynced and renamed, so a failed or killed build never leaves a
/// partial cache (temporary files of a killed build are removed by the next builder). A
/// corrupt or truncated cache is reported and rebuilt.
pub fn load_or_build_with_timeout(
    dir: &Path,
    key: &str,
    timeout: Duration,
    build: impl FnOnce() -> Result<(Vec<PackedSeq>, DataReport)>,
) -> Result<(PackedDataset, DataReport, bool)> {
    ensure!(
        !key.is_empty()
            && key.len() <= 128
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "cache key {key:?} must be 1 to 128 characters of [A-Za-z0-9_-]"
    );
    fs::create_dir_all(dir)
        .with_context(|| format!("creating cache directory {}", dir.display()))?;
    let bin = dir.join(format!("pack-{key}.bin"));

    // Fast path: a finished cache needs no lock (it only ever appears by rename).
    if bin.exists() {
        if let Ok(ds) = open_verified(&bin) {
            let report = ds.report.clone();
            return Ok((ds, report, true));
        }
    }

    let lock_path = dir.join(format!("pack-{key}.lock"));
    let _lock = acquire_lock(&lock_path, timeout)?;

    if bin.exists() {
        match open_verified(&bin) {
            // Another rank built it while we waited.
            Ok(ds) => {
                let report = ds.report.clone();
                return Ok((ds, report, true));
            }
            Err(e) => eprintln!("warning: rebuilding the dataset cache: {e:#}"),
        }
    }
    remove_stale_temps(dir, key)?;

    let (seqs, report) = match build() {
        Ok(built) => built,
        Err(e) => {
            // Bad input (a malformed line, ...) must leave nothing behind. We still hold the
            // lock; a rank waiting on this file would fail the same deterministic build.
            let _ = fs::remove_file(&lock_path);
            return Err(e.context("building the packed dataset"));
        }
    };
    let tmp_bin = TempFile(dir.join(format!("pack-{key}.bin.tmp-{}", std::process::id())));
    write(&tmp_bin.0, &seqs, &report)?;
    drop(seqs);
    let tmp_json = TempFile(dir.join(format!("pack-{key}.json.tmp-{}", std::process::id())));
    let mut json = serde_json::to_vec_pretty(&report)?;
    json.push(b'\n');
    fs::write(&tmp_json.0, json).with_context(|| format!("writing {}", tmp_json.0.display()))?;
    File::open(&tmp_json.0)?.sync_all()?;
    tmp_json.commit(&dir.join(format!("pack-{key}.json")))?;
    tmp_bin.commit(&bin)?;
    sync_dir(dir)?;

    let ds = open_verified(&bin)?;
    Ok((ds, report, false))
}

fn open_verified(path: &Path) -> Result<PackedDataset> {
    let ds = PackedDataset::open(path)?;
    ds.verify_payload()?;
    Ok(ds)
}

/// A file that is removed on drop unless renamed into place.
struct TempFile(PathBuf);

impl TempFile {
    fn commit(self, to: &Path) -> Result<()> {
        fs::rename(&self.0, to)
            .with_context(|| format!("renaming {} to {}", self.0.display(), to.display()))?;
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Removes temporary files left by a killed build of this key (we hold the lock).
fn remove_stale_temps(dir: &Path, key: &str) -> Result<()> {
    let prefixes = [
        format!("pack-{key}.bin.tmp-"),
        format!("pack-{key}.json.tmp-"),
    ];
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            fs::remove_file(entry.path())
                .with_context(|| format!("removing stale {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Holds an exclusive advisory lock until dropped (closing the file releases it).
struct LockGuard(#[allow(dead_code)] File);

fn acquire_lock(path: &Path, timeout: Duration) -> Result<LockGuard> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    let start = Instant::now();
    loop {
        match fs2::FileExt::try_lock_exclusive(&file) {
            Ok(()) => return Ok(LockGuard(file)),
            Err(e) if e.kind() == fs2::lock_contended_error().kind() => {}
            Err(e) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        if start.elapsed() >= timeout {
            bail!(
                "timed out after {:.0?} waiting for lock {}: another process (rank) is still \
                 building this dataset cache; raise the timeout or remove a stuck process",
                timeout,
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50).min(timeout));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_sized() {
        let layout = Layout::new(3, 10, 7, 5).expect("small counts");
        assert_eq!(layout.report, 112..117);
        assert_eq!(layout.tok_offsets, 120..152); // report padded to 8
        assert_eq!(layout.cu_offsets, 152..184);
        assert_eq!(layout.input_ids, 184..224);
        assert_eq!(layout.cu_seqlens, 304..332);
        assert_eq!(layout.file_len(), 332);
        assert!(Layout::new(usize::MAX, 1, 1, 1).is_none());
    }

    #[test]
    fn cache_key_separates_parts() {
        assert_ne!(cache_key(&[b"ab", b"c"]), cache_key(&[b"a", b"bc"]));
        assert_eq!(cache_key(&[b"x"]).len(), 64);
    }
}
