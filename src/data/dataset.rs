//! The whole data pipeline in one call, exactly as training uses it: read records, template and
//! tokenize them in parallel (with a progress bar), pack, and cache the result in the work dir as a
//! memory-mapped file keyed by everything that shapes it. Every rank and every resume reuses it.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

use crate::config::Config;
use crate::data::cache::{self, DataReport, PackedDataset};
use crate::data::encode::{encode, template_overhead, DropReason};
use crate::data::format::read_all;
use crate::data::pack::{efficiency, pack_with_stats, unpacked, PackMode, PackedSeq};
use crate::data::template::Template;
use crate::data::{Encoded, Record};
use crate::tokenizer::Tokenizer;

/// Bumped whenever encoding or packing changes what a cache file holds.
const PIPELINE_VERSION: &[u8] = b"ftrun-data-v1";

/// The cache key: data file bytes, tokenizer, template, system, max_length, packing, seed.
pub fn dataset_key(cfg: &Config, tokenizer: &Tokenizer) -> Result<String> {
    let d = &cfg.data;
    let mut parts: Vec<Vec<u8>> = vec![PIPELINE_VERSION.to_vec()];
    for f in &d.files {
        let bytes = std::fs::read(&f.path)
            .with_context(|| format!("data file {} cannot be read", f.path.display()))?;
        parts.push(bytes);
        parts.push(format!("{}|{}", f.format, f.weight).into_bytes());
    }
    parts.push(tokenizer.fingerprint().as_bytes().to_vec());
    parts.push(
        format!(
            "{}|{:?}|{}|{}|{}|{}|{}",
            d.template,
            d.system,
            d.max_length,
            d.pack,
            d.pack_mode,
            d.shuffle_before_pack,
            cfg.train.seed
        )
        .into_bytes(),
    );
    let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    Ok(cache::cache_key(&refs))
}

/// Build (or reuse) the packed dataset for a config. Returns the dataset, its report and the key.
pub fn build_dataset(
    cfg: &Config,
    tokenizer: &Tokenizer,
    work_dir: &Path,
    progress: bool,
) -> Result<(PackedDataset, DataReport, String)> {
    let template = Template::by_name(&cfg.data.template)?;
    check_max_length(cfg, &template, tokenizer)?;
    let key = dataset_key(cfg, tokenizer)?;
    let cache_dir = work_dir.join("dataset_cache");
    let (ds, report, cached) = cache::load_or_build(&cache_dir, &key, || {
        let (seqs, report) = tokenize_and_pack(cfg, &template, tokenizer, progress)?;
        Ok((seqs, report))
    })?;
    if progress {
        eprintln!("{read_line}", read_line = report_files(&cache_dir, cached));
    }
    Ok((ds, report, key))
}

/// `data.max_length` must leave room for more than the template itself.
pub(crate) fn check_max_length(
    cfg: &Config,
    template: &Template,
    tokenizer: &Tokenizer,
) -> Result<()> {
    let overhead = template_overhead(template, tokenizer);
    if cfg.data.max_length <= overhead {
        bail!(
            "data.max_length = {} is not larger than the `{}` template itself ({overhead} tokens for an empty turn)",
            cfg.data.max_length,
            cfg.data.template
        );
    }
    Ok(())
}

pub(crate) fn report_files(cache_dir: &Path, cached: bool) -> String {
    format!(
        "dataset cache: {} ({})",
        cache_dir.display(),
        if cached { "reused" } else { "built" }
    )
}

impl DataReport {
    /// The summary `check-data` and `train` print.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "records read: {}\nsamples kept: {}\ntokens: {} (trained: {}, {:.1}%)\npacked sequences: {} of max_length {}\npacking efficiency: {:.1}%",
            self.records_read,
            self.samples,
            self.tokens,
            self.trained_tokens,
            100.0 * self.trained_tokens as f64 / self.tokens.max(1) as f64,
            self.sequences,
            self.max_length,
            100.0 * self.efficiency
        );
        if self.dropped.is_empty() {
            s.push_str("\ndropped: none");
        }
        for (why, n) in &self.dropped {
            s.push_str(&format!("\ndropped {why}: {n}"));
        }
        s
    }
}

/// Templates and tokenizes `records` on `data.num_workers` threads (with a progress bar), in
/// order. `Ok(Err(reason))` is a record XTuner would drop.
pub(crate) fn encode_all<'a>(
    records: impl IndexedParallelIterator<Item = &'a Record>,
    cfg: &Config,
    template: &Template,
    tokenizer: &Tokenizer,
    progress: bool,
) -> Result<Vec<Result<std::result::Result<Encoded, DropReason>>>> {
    let d = &cfg.data;
    let bar = if progress {
        ProgressBar::new(records.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} tokenizing [{bar:30}] {pos}/{len} records {per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(d.num_workers)
        .build()?;
    let encoded = pool.install(|| {
        records
            .map(|r| {
                let e = encode(r, template, tokenizer, d.max_length, d.system.as_deref());
                bar.inc(1);
                e
            })
            .collect()
    });
    bar.finish_and_clear();
    Ok(encoded)
}

fn tokenize_and_pack(
    cfg: &Config,
    template: &Template,
    tokenizer: &Tokenizer,
    progress: bool,
) -> Result<(Vec<PackedSeq>, DataReport)> {
    let d = &cfg.data;
    let (records, read) = read_all(&d.files, cfg.train.seed)?;
    let encoded = encode_all(records.par_iter(), cfg, template, tokenizer, progress)?;
    let mut dropped: BTreeMap<String, usize> = BTreeMap::new();
    let mut samples = Vec::with_capacity(encoded.len());
    for e in encoded {
        match e? {
            Ok(s) => samples.push(s),
            Err(reason) => *dropped.entry(format!("records: {reason}")).or_default() += 1,
        }
    }
    if samples.is_empty() {
        bail!(
            "no trainable samples: all {} records were dropped ({dropped:?}); check the data format and template",
            records.len()
        );
    }
    let tokens: usize = samples.iter().map(|s| s.input_ids.len()).sum();
    let trained: usize = samples.iter().map(|s| s.trained()).sum();
    let n_samples = samples.len();
    let mode = if d.pack_mode == "whole" {
        PackMode::Whole
    } else {
        PackMode::Split
    };
    let seqs = if d.pack {
        let (seqs, stats) = pack_with_stats(
            samples,
            d.max_length,
            mode,
            d.shuffle_before_pack,
            cfg.train.seed,
        );
        if stats.tail_tokens_dropped > 0 {
            // XTuner's split packing drops the last partial chunk; say how much.
            dropped.insert(
                "tokens: last partial packed chunk".into(),
                stats.tail_tokens_dropped,
            );
        }
        seqs
    } else {
        unpacked(samples)
    };
    let report = DataReport {
        records_read: read.used(),
        dropped,
        samples: n_samples,
        tokens,
        trained_tokens: trained,
        sequences: seqs.len(),
        efficiency: efficiency(&seqs, d.max_length),
        max_length: d.max_length,
    };
    Ok((seqs, report))
}
