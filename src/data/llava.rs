//! LLaVA data: records with an optional image, encoded as XTuner's `LLaVADataset` does
//! (`llava_map_fn`, the chat template, `encode_fn`: the `<image>` marker becomes one
//! [`IMAGE_TOKEN_ID`] placeholder that the model replaces with the projected image tokens; the
//! text is cut to `data.max_length` before that expansion, as XTuner's LLaVA configs count it),
//! text-only records mixed in, never packed.
//!
//! Building checks every image up front (the file exists, its header decodes to a non-empty
//! size) and reports all problems at once with the record's `file:line`; the tokenized samples
//! are cached like the text pipeline's (`pack-<key>.bin`, one sample per sequence) with the
//! image of each sample in `pack-<key>.images.json`. Pixels are decoded and preprocessed
//! ([`ClipPreprocess`]) when a sample is loaded, on the data-loader threads
//! ([`super::loader::OrderedLoader`]).

use crate::config::Config;
use crate::data::cache::{self, DataReport, PackedDataset};
use crate::data::dataset::{check_max_length, dataset_key, encode_all, report_files};
use crate::data::format::{read_all_located, Origin};
use crate::data::image::ClipPreprocess;
use crate::data::pack::{efficiency, unpacked, PackedSeq};
use crate::data::template::Template;
use crate::data::{Record, IMAGE_TOKEN, IMAGE_TOKEN_ID};
use crate::model::weights::write_atomic;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bumped whenever what a LLaVA cache holds changes.
const LLAVA_PIPELINE_VERSION: &str = "ftrun-llava-v1";
/// At most this many image problems are listed in one error.
const MAX_LISTED_PROBLEMS: usize = 20;

/// A sample's image: where it is and which record asked for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRef {
    /// Resolved path (`data.image_folder` joined with the record's `image`).
    pub path: PathBuf,
    /// The record, as `file:line`.
    pub record: String,
}

/// The encoded LLaVA samples (one per sequence) and their images.
pub struct LlavaDataset {
    seqs: PackedDataset,
    images: Vec<Option<ImageRef>>,
}

/// One loaded sample: its tokens (one [`IMAGE_TOKEN_ID`] where the image goes, if any) and the
/// preprocessed pixels `[3, S, S]` (f32, host) of its image.
#[derive(Debug, Clone)]
pub struct LlavaItem {
    pub seq: PackedSeq,
    pub pixels: Option<Tensor>,
}

impl LlavaDataset {
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// The tokens of sample `i`.
    pub fn seq(&self, i: usize) -> PackedSeq {
        self.seqs.get_owned(i)
    }

    /// The image of sample `i` (None for a text-only sample).
    pub fn image(&self, i: usize) -> Option<&ImageRef> {
        self.images.get(i).and_then(Option::as_ref)
    }

    /// Samples with an image.
    pub fn image_count(&self) -> usize {
        self.images.iter().filter(|i| i.is_some()).count()
    }

    /// Sample `i` with its image decoded and preprocessed (the data loaders' job). Errors name
    /// the image file and the record.
    pub fn load(&self, i: usize, preprocess: &ClipPreprocess) -> Result<LlavaItem> {
        let pixels = match self.image(i) {
            Some(img) => Some(
                preprocess
                    .load(&img.path, &Device::Cpu)
                    .with_context(|| format!("{}: the record's image", img.record))?,
            ),
            None => None,
        };
        Ok(LlavaItem {
            seq: self.seq(i),
            pixels,
        })
    }
}

/// The cache key: the text pipeline's key, the image folder and the LLaVA pipeline version.
pub fn llava_dataset_key(cfg: &Config, tokenizer: &Tokenizer) -> Result<String> {
    let text_key = dataset_key(cfg, tokenizer)?;
    let folder = format!("{:?}", cfg.data.image_folder);
    Ok(cache::cache_key(&[
        LLAVA_PIPELINE_VERSION.as_bytes(),
        text_key.as_bytes(),
        folder.as_bytes(),
    ]))
}

fn images_file(cache_dir: &Path, key: &str) -> PathBuf {
    cache_dir.join(format!("pack-{key}.images.json"))
}

/// Build (or reuse) the LLaVA dataset of a config. Returns the dataset, its report and the key.
pub fn build_llava_dataset(
    cfg: &Config,
    tokenizer: &Tokenizer,
    work_dir: &Path,
    progress: bool,
) -> Result<(LlavaDataset, DataReport, String)> {
    if cfg.data.pack {
        bail!(
            "data.pack = true: LLaVA samples are not packed (as in XTuner's LLaVA configs); set data.pack = false"
        );
    }
    let template = Template::by_name(&cfg.data.template)?;
    check_max_length(cfg, &template, tokenizer)?;
    let key = llava_dataset_key(cfg, tokenizer)?;
    let cache_dir = work_dir.join("dataset_cache");
    let images_path = images_file(&cache_dir, &key);
    let (seqs, report, cached) = cache::load_or_build(&cache_dir, &key, || {
        let (seqs, images, report) = encode_llava(cfg, &template, tokenizer, progress)?;
        // Written before the cache file appears (under the build lock): a reader that finds
        // the cache finds its images.
        let json = serde_json::to_vec(&images)?;
        write_atomic(&images_path, |f| Ok(f.write_all(&json)?))?;
        Ok((seqs, report))
    })?;
    let text = std::fs::read(&images_path).with_context(|| {
        format!(
            "{}: the images of the cached dataset are missing; delete {} to rebuild it",
            images_path.display(),
            cache_dir.display()
        )
    })?;
    let images: Vec<Option<ImageRef>> = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a list of images", images_path.display()))?;
    if images.len() != seqs.len() {
        bail!(
            "{}: {} images for {} cached samples; delete {} to rebuild the cache",
            images_path.display(),
            images.len(),
            seqs.len(),
            cache_dir.display()
        );
    }
    if progress {
        eprintln!("{}", report_files(&cache_dir, cached));
    }
    Ok((LlavaDataset { seqs, images }, report, key))
}

/// Where the images of records from `origin`'s file are looked up.
fn image_path(cfg: &Config, origin: &Origin, image: &str) -> PathBuf {
    match &cfg.data.image_folder {
        Some(folder) => folder.join(image),
        // No folder: relative to the data file, so a dataset directory can be moved whole.
        None => cfg.data.files[origin.file]
            .path
            .parent()
            .unwrap_or(Path::new(""))
            .join(image),
    }
}

/// Whether `path` is an image whose header decodes (without decoding the pixels).
fn check_image(path: &Path) -> Result<(), String> {
    if !path.is_file() {
        return Err(format!("image file {} not found", path.display()));
    }
    let dims = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| e.to_string())
        .and_then(|r| r.into_dimensions().map_err(|e| e.to_string()));
    match dims {
        Ok((w, h)) if w > 0 && h > 0 => Ok(()),
        Ok((w, h)) => Err(format!("image {} is empty ({w}x{h})", path.display())),
        Err(e) => Err(format!("image {} cannot be read: {e}", path.display())),
    }
}

/// Encoded samples, their images and the report.
type EncodedLlava = (Vec<PackedSeq>, Vec<Option<ImageRef>>, DataReport);

/// Records -> encoded samples with their images (checked), and the report.
fn encode_llava(
    cfg: &Config,
    template: &Template,
    tokenizer: &Tokenizer,
    progress: bool,
) -> Result<EncodedLlava> {
    let d = &cfg.data;
    let (located, read) = read_all_located(&d.files, cfg.train.seed)?;
    let encoded = encode_all(
        located.par_iter().map(|(r, _)| r),
        cfg,
        template,
        tokenizer,
        progress,
    )?;
    let mut dropped: BTreeMap<String, usize> = BTreeMap::new();
    let mut samples = Vec::with_capacity(encoded.len());
    let mut images = Vec::with_capacity(encoded.len());
    for ((record, origin), e) in located.iter().zip(encoded) {
        let where_ = origin.describe(&d.files);
        let enc = match e.with_context(|| where_.clone())? {
            Ok(enc) => enc,
            Err(reason) => {
                *dropped.entry(format!("records: {reason}")).or_default() += 1;
                continue;
            }
        };
        let placeholder = enc.input_ids.contains(&IMAGE_TOKEN_ID);
        let image = match record {
            Record::Chat {
                image: Some(image),
                turns,
            } => {
                if placeholder {
                    Some(ImageRef {
                        path: image_path(cfg, origin, image),
                        record: where_,
                    })
                } else {
                    // XTuner loads such an image and never uses it.
                    let why = if turns.iter().any(|t| t.input.contains(IMAGE_TOKEN)) {
                        "images: `<image>` cut away by max_length (image unused)"
                    } else {
                        "images: record has `image` but no `<image>` in its text (image unused)"
                    };
                    *dropped.entry(why.into()).or_default() += 1;
                    None
                }
            }
            _ => None,
        };
        samples.push(enc);
        images.push(image);
    }
    if samples.is_empty() {
        bail!(
            "no trainable samples: all {} records were dropped ({dropped:?}); check the data format and template",
            located.len()
        );
    }
    check_all_images(&images)?;
    let tokens: usize = samples.iter().map(|s| s.input_ids.len()).sum();
    let trained: usize = samples.iter().map(|s| s.trained()).sum();
    let n_samples = samples.len();
    let seqs = unpacked(samples);
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
    Ok((seqs, images, report))
}

/// Every distinct image checked in parallel; all problems in one error.
fn check_all_images(images: &[Option<ImageRef>]) -> Result<()> {
    let mut first_use: BTreeMap<&Path, &str> = BTreeMap::new();
    for img in images.iter().flatten() {
        first_use.entry(&img.path).or_insert(&img.record);
    }
    let distinct: Vec<(&Path, &str)> = first_use.into_iter().collect();
    let problems: Vec<String> = distinct
        .par_iter()
        .filter_map(|(path, record)| check_image(path).err().map(|e| format!("{record}: {e}")))
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    let mut msg = format!("{} image(s) cannot be used:", problems.len());
    for p in problems.iter().take(MAX_LISTED_PROBLEMS) {
        msg.push_str("\n  ");
        msg.push_str(p);
    }
    if problems.len() > MAX_LISTED_PROBLEMS {
        msg.push_str(&format!(
            "\n  ... and {} more",
            problems.len() - MAX_LISTED_PROBLEMS
        ));
    }
    bail!(msg)
}
