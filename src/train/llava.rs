//! The two LLaVA stages on the shared training loop: the LLaVA data (images decoded on loader
//! threads, a few micro-batches ahead), the model (CLIP tower, projector, LLM) built for the
//! stage, and the pretrain checkpoint's projector for the finetune stage.
//!
//! - pretrain: only the projector trains; the LLM (optionally 4-bit) and the tower are frozen.
//! - finetune: the projector and the LLM (`train.method`: qlora, lora or full) train, and LoRA
//!   adapters on the tower when `[llava.vision_lora]` is set; the projector starts from the
//!   pretrain stage's.

use crate::config::{gib_to_bytes, Config, LlavaConfig};
use crate::data::image::ClipPreprocess;
use crate::data::llava::{build_llava_dataset, LlavaDataset, LlavaItem};
use crate::data::loader::OrderedLoader;
use crate::data::sampler::{SamplerIter, SamplerState};
use crate::model::decoder::{
    Decoder, GradReady, LoraSpec, QuantSpec, StepStats, TrainMode, TrainableInfo,
};
use crate::model::layers::mix_seed;
use crate::model::llava::{
    init_projector, make_llava_batch, LlavaBatch, LlavaGrads, LlavaModel, Projector,
};
use crate::model::vision::{ClipVision, ClipVisionConfig};
use crate::model::weights::LazyCheckpoint;
use crate::model::ModelConfig;
use crate::train::checkpoint::{self, RunIdentity};
use crate::train::step::{StepData, StepModel};
use crate::train::trainer::{
    method_id, sha256_file, train_loop, train_mode, trained_targets, RunContext, RunSummary,
};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

/// Seed streams of the tower's adapters and the fresh projector (apart from the LLM's).
const VISION_SEED: u64 = 0x5649_5349_4f4e; // "VISION"
const PROJECTOR_SEED: u64 = 0x5052_4f4a; // "PROJ"

/// Trains one LLaVA stage of `ctx.cfg`.
pub(crate) fn run_stage(ctx: &RunContext, l: &LlavaConfig) -> Result<RunSummary> {
    let (cfg, par) = (ctx.cfg, ctx.par);
    let main = par.is_main();
    let (dataset, report, data_key) = par.main_first("dataset", || {
        build_llava_dataset(cfg, &ctx.tokenizer, ctx.work_dir, main)
    })?;
    if main {
        eprintln!(
            "{}\nimages: {} of {} samples",
            report.summary(),
            dataset.image_count(),
            dataset.len()
        );
    }
    let model = build_model(ctx, l)?;
    let preprocess =
        ClipPreprocess::clip(model.vision.config().image_size as u32, l.pad_to_square());
    let identity = RunIdentity {
        model: format!(
            "{}+{}",
            sha256_file(&cfg.model.path.join("config.json"))?,
            sha256_file(&l.vision_tower.join("config.json"))?
        ),
        data: data_key,
        method: format!("llava-{}: {}", l.stage, stage_method(cfg, l)),
    };
    let data = LlavaData::new(
        Arc::new(dataset),
        preprocess,
        model.image_tokens(),
        l.num_workers,
        l.prefetch,
    );
    let method = stage_method(cfg, l);
    train_loop(ctx, model, data, identity, &method)
}

/// What trains in this stage, for logs and the checkpoint identity.
fn stage_method(cfg: &Config, l: &LlavaConfig) -> String {
    let llm = if l.is_pretrain() {
        format!("LLM frozen{}", if l.llm_4bit { " (4-bit)" } else { "" })
    } else {
        format!("LLM {}", method_id(cfg))
    };
    let vision = match &l.vision_lora {
        Some(v) => format!(
            "tower lora(r={}, alpha={}, targets={:?})",
            v.r, v.alpha, v.target_modules
        ),
        None => "tower frozen".into(),
    };
    format!("projector + {llm}, {vision}")
}

/// The stage's model: tower (adapters in finetune when asked), LLM (frozen in pretrain), and a
/// fresh (pretrain) or pretrained (finetune) projector.
fn build_model(ctx: &RunContext, l: &LlavaConfig) -> Result<LlavaModel> {
    let cfg = ctx.cfg;
    let vcfg = ClipVisionConfig::from_dir(&l.vision_tower)?;
    let vision_lora = l.vision_lora.as_ref().map(|v| LoraSpec {
        r: v.r,
        alpha: v.alpha,
        dropout: v.dropout,
        targets: v.target_modules.clone(),
    });
    let mut source = LazyCheckpoint::open(&l.vision_tower)?;
    let vision = ClipVision::new_with_lora(
        &vcfg,
        &mut source,
        l.select_layer,
        vision_lora.as_ref(),
        ctx.dtype,
        &ctx.device,
        mix_seed(cfg.train.seed, VISION_SEED),
    )
    .with_context(|| format!("vision tower {}", l.vision_tower.display()))?;
    drop(source);

    let model_cfg = ModelConfig::from_dir(&cfg.model.path)?;
    let (mode, quant) = if l.is_pretrain() {
        let quant = l.llm_4bit.then_some(QuantSpec {
            double_quant: cfg.quant.double_quant,
        });
        (TrainMode::Frozen, quant)
    } else {
        (train_mode(cfg), ctx.quant)
    };
    let mut source = LazyCheckpoint::open(&cfg.model.path)?;
    let mut decoder = Decoder::new_quantized(
        &model_cfg,
        &mut source,
        mode,
        quant,
        ctx.dtype,
        &ctx.device,
        cfg.train.seed,
    )?;
    drop(source);
    decoder.set_activation_budget(gib_to_bytes(cfg.train.activation_budget_gib)?);

    let projector = match &l.pretrain_checkpoint {
        None => init_projector(
            vcfg.hidden_size,
            model_cfg.hidden_size,
            mix_seed(cfg.train.seed, PROJECTOR_SEED),
            DType::F32,
            &ctx.device,
        )?,
        Some(path) => load_projector(path, &ctx.device)?,
    };
    LlavaModel::new(decoder, vision, projector)
}

/// The projector of a pretrain run: a checkpoint directory (its `projector.*` trainables), a
/// work dir (its latest checkpoint), or an exported `projector/` directory (`model.0.weight`, ...
/// in `model.safetensors`, as XTuner's `pth_to_hf` writes it).
pub fn load_projector(path: &Path, device: &Device) -> Result<Projector> {
    let exported = path.join("model.safetensors");
    let (tensors, prefix) = if exported.is_file() {
        let t = candle_core::safetensors::load(&exported, device)
            .with_context(|| format!("reading {}", exported.display()))?;
        (t, "")
    } else {
        let dir = if path.join("state.json").is_file() {
            path.to_path_buf()
        } else {
            checkpoint::latest(path)?.with_context(|| {
                format!(
                    "{}: neither a checkpoint, a work dir with checkpoints, nor an exported projector directory",
                    path.display()
                )
            })?
        };
        let ck = checkpoint::load(&dir, device)?;
        (
            ck.trainable.into_iter().collect(),
            LlavaModel::PROJECTOR_PREFIX,
        )
    };
    let mut tensors = tensors;
    let mut take = |name: &str| -> Result<Tensor> {
        tensors.remove(&format!("{prefix}{name}")).with_context(|| {
            format!(
                "{}: no projector tensor `{prefix}{name}` (is it the LLaVA pretrain stage's output?)",
                path.display()
            )
        })
    };
    let [a, b, c, d] = Projector::NAMES;
    Projector::from_tensors([take(a)?, take(b)?, take(c)?, take(d)?])
        .with_context(|| format!("{}: projector", path.display()))
}

impl StepModel for LlavaModel {
    type Batch = LlavaBatch;
    type Grads = LlavaGrads;

    fn trainable(&self) -> &[TrainableInfo] {
        LlavaModel::trainable(self)
    }
    fn initial_trainable_values(&self) -> Result<Vec<Tensor>> {
        LlavaModel::initial_trainable_values(self)
    }
    fn release_initial_values(&mut self) {
        LlavaModel::release_initial_values(self)
    }
    fn set_trainable(&mut self, flat: &Tensor) -> Result<()> {
        LlavaModel::set_trainable_flat(self, flat)
    }
    fn new_grads(&self) -> LlavaGrads {
        LlavaModel::new_grads(self)
    }
    fn flat_grads(grads: LlavaGrads) -> Result<Tensor> {
        grads.into_flat()
    }
    fn forward_backward(
        &self,
        batch: &LlavaBatch,
        loss_scale: f64,
        grads: &mut LlavaGrads,
        seed: u64,
        checkpointing: bool,
        _ready: Option<&mut dyn GradReady>,
    ) -> Result<StepStats> {
        // The flat gradient is the concatenation of the decoder's, the projector's and the
        // tower's buffers (`LlavaGrads::into_flat`): offsets in the decoder's buffer are not the
        // flat offsets, so the reduction waits for the whole backward.
        LlavaModel::forward_backward(self, batch, loss_scale, grads, seed, checkpointing)
    }
    fn decoder(&self) -> &Decoder {
        &self.decoder
    }
    fn describe(&self) -> String {
        let (c, v) = (self.decoder.config(), self.vision.config());
        format!(
            "LLaVA: {:?} {} layers ({:.1}M params) + CLIP {} layers x {} ({} image tokens)",
            c.arch,
            c.num_layers,
            c.num_params() as f64 / 1e6,
            v.num_hidden_layers,
            v.hidden_size,
            self.image_tokens()
        )
    }
}

/// LLaVA samples decoded on `workers` loader threads, `prefetch` micro-batches ahead.
struct LlavaData {
    dataset: Arc<LlavaDataset>,
    loader: OrderedLoader<usize, LlavaItem>,
    /// Sampler state after each submitted sample, oldest first.
    states: VecDeque<SamplerState>,
    prefetch: usize,
    image_tokens: usize,
}

impl LlavaData {
    fn new(
        dataset: Arc<LlavaDataset>,
        preprocess: ClipPreprocess,
        image_tokens: usize,
        workers: usize,
        prefetch: usize,
    ) -> LlavaData {
        let ds = dataset.clone();
        let loader = OrderedLoader::new(workers, move |i: usize| ds.load(i, &preprocess));
        LlavaData {
            dataset,
            loader,
            states: VecDeque::new(),
            prefetch,
            image_tokens,
        }
    }
}

impl StepData for LlavaData {
    type Batch = LlavaBatch;

    fn len(&self) -> usize {
        self.dataset.len()
    }
    fn next_batch(
        &mut self,
        indices: &mut SamplerIter<'_>,
        batch_size: usize,
    ) -> Result<(SamplerState, LlavaBatch)> {
        // Keep this batch and `prefetch` more queued on the loader threads.
        while self.states.len() < batch_size * (1 + self.prefetch) {
            let (st, idx) = indices.next().context("sampler ran dry")?;
            self.loader.submit(idx)?;
            self.states.push_back(st);
        }
        let mut items = Vec::with_capacity(batch_size);
        let mut state = SamplerState::default();
        for _ in 0..batch_size {
            items.push(self.loader.take()?);
            state = self
                .states
                .pop_front()
                .context("loader queue out of step")?;
        }
        Ok((state, make_llava_batch(&items, self.image_tokens)?))
    }
    fn targets(batch: &LlavaBatch) -> usize {
        trained_targets(&batch.batch)
    }
    fn tokens(batch: &LlavaBatch) -> usize {
        batch.batch.input_ids.len()
    }
}
