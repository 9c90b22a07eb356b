//! The training loop on one device. Reads top-down like llm.c's: next batch, forward+backward per
//! micro-batch, clip, optimizer step, schedule, log, evaluate, save.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{gib_to_bytes, Config};
use crate::data::cache::PackedDataset;
use crate::data::sampler::{DistributedSampler, SamplerIter, SamplerState};
use crate::data::IGNORE_INDEX;
use crate::dist::collectives::{Collectives, Groups, WorldLayout};
use crate::dist::parallel::Parallel;
use crate::dist::ulysses::{self, SeqPiece};
use crate::model::decoder::{
    Batch, Decoder, GradReady, Grads, LoraSpec, QuantSpec, StepStats, TrainMode, TrainableInfo,
};
use crate::model::{weights, ModelConfig};
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::{
    self, Checkpoint, CheckpointState, RunIdentity, ShardInfo, ShardLayout,
};
use crate::train::eval::EvalHook;
use crate::train::metrics::{self, ScalarLog, StepLog};
use crate::train::optim::FlatParams;
use crate::train::schedule::LrSchedule;
use crate::train::step::{StepData, StepModel};
use crate::train::zero::ZeroOptimizer;

/// How `ftrun train` was asked to resume.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    No,
    Auto,
    Path(PathBuf),
}

impl Resume {
    pub fn parse(arg: Option<&str>) -> Resume {
        match arg {
            None => Resume::No,
            Some("auto") => Resume::Auto,
            Some(p) => Resume::Path(PathBuf::from(p)),
        }
    }
}

/// Result of a run, for callers and tests.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// (step, loss) of every optimizer step of this run, resumed steps included.
    pub losses: Vec<(usize, f64)>,
    pub final_checkpoint: Option<PathBuf>,
    pub steps: usize,
}

/// GPU `idx`, without cudarc's per-allocation event tracking. cudarc creates two CUDA events for
/// every buffer it allocates (and destroys them when the buffer is freed) so that it can order
/// a buffer's uses across streams; it only ever records or waits on them once a second stream
/// exists. ftrun runs a step's work on the device's one stream, and the one second stream it
/// makes (NCCL's, `dist::nccl`) is ordered by explicit events, so the events are dead weight:
/// four driver calls per tensor, thousands per training step at batch 1.
pub fn new_cuda(idx: usize) -> Result<Device> {
    let device = Device::new_cuda(idx)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: see above: one compute stream per device, and the NCCL stream is ordered
        // against it with explicit events (it turns tracking off itself as well).
        unsafe { d.disable_event_tracking() };
    }
    Ok(device)
}

/// The device `train.device` names ("auto" = the first GPU when built with CUDA, else CPU).
pub fn select_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if cfg!(feature = "cuda") {
                new_cuda(0).or_else(|_| Ok(Device::Cpu))
            } else {
                Ok(Device::Cpu)
            }
        }
        d => {
            let idx = d
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()?
                .unwrap_or(0);
            if !cfg!(feature = "cuda") {
                bail!("train.device = `{d}` but this ftrun was built without CUDA (cargo feature `cuda`)");
            }
            new_cuda(idx)
        }
    }
}

/// The device of the worker with local rank `local_rank`: `auto` and `cuda` take GPU
/// `local_rank` when the node's workers see every GPU (`ftrun --nproc`, torchrun), GPU 0 when
/// each sees only its own (SLURM's per-task binding); an explicit `cuda:N` is taken as given.
pub fn worker_device(name: &str, local_rank: usize) -> Result<Device> {
    let gpu = (name == "auto" && cfg!(feature = "cuda")) || name == "cuda";
    if !gpu || local_rank == 0 {
        return select_device(name);
    }
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        let visible = CudaContext::device_count().map_err(|e| anyhow::anyhow!("{e:?}"))? as usize;
        let idx = if visible > local_rank { local_rank } else { 0 };
        new_cuda(idx)
    }
    #[cfg(not(feature = "cuda"))]
    select_device(name)
}

/// Compute dtype from `model.dtype`: "auto" = bf16 on GPU, f32 on CPU.
pub fn compute_dtype(name: &str, device: &Device) -> DType {
    match name {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        _ if device.is_cuda() => DType::BF16,
        _ => DType::F32,
    }
}

/// The NF4 setting of `train.method = "qlora"` (None for other methods); `[quant]` itself is
/// validated when the config is loaded.
pub fn quant_spec(cfg: &Config) -> Option<QuantSpec> {
    (cfg.train.method == "qlora").then_some(QuantSpec {
        double_quant: cfg.quant.double_quant,
    })
}

/// The train mode the config asks for.
pub fn train_mode(cfg: &Config) -> TrainMode {
    train_mode_for(&cfg.train.method, &cfg.lora)
}

/// "full" trains every weight; "lora" / "qlora" train adapters of the given shape.
pub fn train_mode_for(method: &str, lora: &crate::config::LoraConfig) -> TrainMode {
    match method {
        "full" => TrainMode::Full,
        _ => TrainMode::Lora(LoraSpec {
            r: lora.r,
            alpha: lora.alpha,
            dropout: lora.dropout,
            targets: lora.target_modules.clone(),
        }),
    }
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

pub(crate) fn method_id(cfg: &Config) -> String {
    match cfg.train.method.as_str() {
        "full" => "full".into(),
        m => format!(
            "{m}(r={}, alpha={}, targets={:?})",
            cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules
        ),
    }
}

/// Concatenate packed sequences into one varlen batch. The first label of every sequence after the
/// first is masked: inside a row it is never a target (nothing precedes it), and across rows the
/// shift must not make one row's last token predict the next row's first.
pub fn make_batch(seqs: &[crate::data::pack::PackedSeq]) -> Batch {
    let mut b = Batch {
        input_ids: vec![],
        labels: vec![],
        position_ids: vec![],
        cu_seqlens: vec![0],
    };
    for s in seqs {
        let off = b.input_ids.len() as u32;
        let first_label = b.labels.len();
        b.input_ids.extend_from_slice(&s.input_ids);
        b.labels.extend_from_slice(&s.labels);
        if first_label > 0 {
            b.labels[first_label] = IGNORE_INDEX;
        }
        b.position_ids.extend_from_slice(&s.position_ids);
        b.cu_seqlens
            .extend(s.cu_seqlens.iter().skip(1).map(|c| c + off));
    }
    b
}

/// Tokens that are targets after the shift (labels[1..] that are trained).
pub fn trained_targets(b: &Batch) -> usize {
    b.labels
        .iter()
        .skip(1)
        .filter(|&&l| l != IGNORE_INDEX)
        .count()
}

/// One micro-batch as this rank trains it: the whole batch, or (sequence parallel) its piece.
pub(crate) enum MicroBatch {
    Whole(Batch),
    Piece(SeqPiece),
}

impl MicroBatch {
    /// This rank's share of the batch under `sp` (None: no sequence parallelism).
    fn new(batch: Batch, sp: Option<&dyn Collectives>) -> Result<MicroBatch> {
        Ok(match sp {
            Some(sp) => MicroBatch::Piece(SeqPiece::split(&batch, sp.world(), sp.rank())?),
            None => MicroBatch::Whole(batch),
        })
    }

    /// Trained targets of this rank's share (over the world, every target counted once).
    fn targets(&self) -> usize {
        match self {
            MicroBatch::Whole(b) => trained_targets(b),
            MicroBatch::Piece(p) => p.trained_targets(),
        }
    }

    /// Tokens of this rank's share, padding excluded.
    fn tokens(&self) -> usize {
        match self {
            MicroBatch::Whole(b) => b.input_ids.len(),
            MicroBatch::Piece(p) => p.real_tokens,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_backward(
        &self,
        model: &Decoder,
        sp: Option<&dyn Collectives>,
        loss_scale: f64,
        grads: &mut Grads,
        seed: u64,
        checkpointing: bool,
        ready: Option<&mut dyn GradReady>,
    ) -> Result<StepStats> {
        match (self, sp) {
            (MicroBatch::Piece(p), Some(sp)) => {
                let run = (loss_scale, seed, checkpointing);
                model.forward_backward_sp_ready(p, sp, run, grads, ready)
            }
            (MicroBatch::Whole(b), _) => {
                model.forward_backward_ready(b, loss_scale, grads, seed, checkpointing, ready)
            }
            (MicroBatch::Piece(_), None) => bail!("a sequence-parallel piece needs its SP group"),
        }
    }
}

/// What every run shares once the process is set up: the config, where it writes, the device
/// and dtype, the tokenizer and the sequence-parallel group size.
pub(crate) struct RunContext<'a> {
    pub cfg: &'a Config,
    pub work_dir: &'a Path,
    pub resume: Resume,
    pub par: &'a Parallel,
    pub device: Device,
    pub dtype: DType,
    /// NF4 settings of `train.method = "qlora"`.
    pub quant: Option<QuantSpec>,
    pub tokenizer: Tokenizer,
    pub sp: usize,
}

/// The text decoder as the loop's model (with its SP group when sequence parallel).
pub(crate) struct TextModel<'a> {
    pub(crate) decoder: Decoder,
    pub(crate) sp: Option<&'a dyn Collectives>,
}

impl StepModel for TextModel<'_> {
    type Batch = MicroBatch;
    type Grads = Grads;

    fn trainable(&self) -> &[TrainableInfo] {
        self.decoder.trainable()
    }
    fn initial_trainable_values(&self) -> Result<Vec<Tensor>> {
        self.decoder.initial_trainable_values()
    }
    fn release_initial_values(&mut self) {
        self.decoder.release_initial_values()
    }
    fn set_trainable(&mut self, flat: &Tensor) -> Result<()> {
        self.decoder.set_trainable_flat(flat)
    }
    fn new_grads(&self) -> Grads {
        self.decoder.new_grads()
    }
    fn flat_grads(grads: Grads) -> Result<Tensor> {
        // f64 compute's gradients reach the optimizer as f32; a one-write bf16 buffer as it is.
        let flat = grads.into_flat()?;
        Ok(match flat.dtype() {
            DType::BF16 => flat,
            _ => flat.to_dtype(DType::F32)?,
        })
    }
    fn forward_backward(
        &self,
        batch: &MicroBatch,
        loss_scale: f64,
        grads: &mut Grads,
        seed: u64,
        checkpointing: bool,
        ready: Option<&mut dyn GradReady>,
    ) -> Result<StepStats> {
        batch.forward_backward(
            &self.decoder,
            self.sp,
            loss_scale,
            grads,
            seed,
            checkpointing,
            ready,
        )
    }
    fn decoder(&self) -> &Decoder {
        &self.decoder
    }
    fn describe(&self) -> String {
        let c = self.decoder.config();
        format!(
            "{:?} {} layers, {:.1}M params",
            c.arch,
            c.num_layers,
            c.num_params() as f64 / 1e6
        )
    }
}

/// Packed text sequences, `batch_size` of them per micro-batch (split for SP when asked).
struct TextData<'a> {
    dataset: PackedDataset,
    sp: Option<&'a dyn Collectives>,
}

impl StepData for TextData<'_> {
    type Batch = MicroBatch;

    fn len(&self) -> usize {
        self.dataset.len()
    }
    fn next_batch(
        &mut self,
        indices: &mut SamplerIter<'_>,
        batch_size: usize,
    ) -> Result<(SamplerState, MicroBatch)> {
        let mut seqs = Vec::with_capacity(batch_size);
        let mut state = SamplerState::default();
        for _ in 0..batch_size {
            let (st, idx) = indices.next().context("sampler ran dry")?;
            state = st;
            seqs.push(self.dataset.get_owned(idx));
        }
        Ok((state, MicroBatch::new(make_batch(&seqs), self.sp)?))
    }
    fn targets(batch: &MicroBatch) -> usize {
        batch.targets()
    }
    fn tokens(batch: &MicroBatch) -> usize {
        batch.tokens()
    }
}

/// Train a config to the end in this process. `work_dir` receives checkpoints, logs and the
/// dataset cache.
pub fn run(cfg: &Config, work_dir: &Path, resume: Resume) -> Result<RunSummary> {
    run_parallel(cfg, work_dir, resume, &mut Parallel::single())
}

/// What every worker of a distributed run must agree on: the resolved config's hash and the
/// dataset's key (both cheap: no tokenizing).
pub fn worker_identity(cfg: &Config) -> Result<(String, String)> {
    let tokenizer = Tokenizer::from_path(&cfg.model.tokenizer_path())?;
    let config_hash = hex::encode(Sha256::digest(cfg.to_toml().as_bytes()));
    let data_key = match cfg.llava {
        Some(_) => crate::data::llava::llava_dataset_key(cfg, &tokenizer)?,
        None => crate::data::dataset::dataset_key(cfg, &tokenizer)?,
    };
    Ok((config_hash, data_key))
}

/// Train a config as one rank of `par`'s job (world 1 = a single process): data parallel over
/// its ranks with ZeRO-2 (gradients and optimizer state sharded, parameters all-gathered).
pub fn run_parallel(
    cfg: &Config,
    work_dir: &Path,
    resume: Resume,
    par: &mut Parallel,
) -> Result<RunSummary> {
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("creating work dir {}", work_dir.display()))?;
    let layout = check_parallel_config(cfg, par)?;
    let main = par.is_main();
    let device = worker_device(&cfg.train.device, par.local_rank())?;
    par.use_device(&device)?;
    let par = &*par;
    metrics::keep_memory_pool(&device)?;
    let quant = quant_spec(cfg);
    let dtype = match quant {
        // QLoRA computes in `quant.compute_dtype` on a GPU; on CPU `model.dtype` rules as usual.
        Some(_) if device.is_cuda() && cfg.model.dtype == "auto" => {
            compute_dtype(&cfg.quant.compute_dtype, &device)
        }
        _ => compute_dtype(&cfg.model.dtype, &device),
    };

    let tokenizer = Tokenizer::from_path(&cfg.model.tokenizer_path())?;
    let ctx = RunContext {
        cfg,
        work_dir,
        resume,
        par,
        device,
        dtype,
        quant,
        tokenizer,
        sp: layout.sp,
    };
    if let Some(llava) = &cfg.llava {
        return crate::train::llava::run_stage(&ctx, llava);
    }
    let (device, tokenizer) = (&ctx.device, &ctx.tokenizer);

    // Data: tokenized and packed once (by rank 0), cached in the work dir for every rank.
    let (dataset, report, data_key) = par.main_first("dataset", || {
        crate::data::build_dataset(cfg, tokenizer, work_dir, main)
    })?;
    if main {
        eprintln!("{}", report.summary());
    }

    // Model: HF config + safetensors, LoRA adapters or all weights trainable.
    let model_cfg = ModelConfig::from_dir(&cfg.model.path)?;
    // Ulysses: the SP group (a block of `sp` ranks) shares each sample, one piece per rank.
    let groups: Option<Groups> = if layout.sp > 1 {
        ulysses::check_heads(model_cfg.num_heads, model_cfg.num_kv_heads, layout.sp)?;
        Some(layout.split(par.comm())?)
    } else {
        None
    };
    let sp_comm = groups.as_ref().map(|g| g.sp.as_ref());
    let identity = RunIdentity {
        model: sha256_file(&cfg.model.path.join("config.json"))?,
        data: data_key,
        method: method_id(cfg),
    };
    // Streamed tensor by tensor (QLoRA quantizes each linear as it arrives).
    let mut source = weights::LazyCheckpoint::open(&cfg.model.path)?;
    let mut model = Decoder::new_quantized(
        &model_cfg,
        &mut source,
        train_mode(cfg),
        quant,
        dtype,
        device,
        cfg.train.seed,
    )?;
    drop(source);
    model.set_activation_budget(gib_to_bytes(cfg.train.activation_budget_gib)?);
    // One micro-batch on one rank writes each gradient value once (no sum to keep in f32).
    model.set_one_write_grads(
        cfg.optim.grad_dtype == "auto" && cfg.train.grad_accum == 1 && par.world() == 1,
    );
    let model = TextModel {
        decoder: model,
        sp: sp_comm,
    };
    let data = TextData {
        dataset,
        sp: sp_comm,
    };
    train_loop(&ctx, model, data, identity, &cfg.train.method)
}

/// The training loop over any [`StepModel`] and its [`StepData`]: optimizer, schedule, resume,
/// micro-batches, reduce, clip, update, log, evaluate, save.
pub(crate) fn train_loop<M, D>(
    ctx: &RunContext,
    mut model: M,
    mut data: D,
    identity: RunIdentity,
    method: &str,
) -> Result<RunSummary>
where
    M: StepModel,
    D: StepData<Batch = M::Batch>,
{
    let RunContext {
        cfg,
        work_dir,
        par,
        device,
        dtype,
        tokenizer,
        ..
    } = ctx;
    let (cfg, work_dir, par, dtype) = (*cfg, *work_dir, *par, *dtype);
    let main = par.is_main();
    let names: Vec<String> = model.trainable().iter().map(|t| t.name.clone()).collect();
    let decay: Vec<bool> = model.trainable().iter().map(|t| t.decay).collect();
    let params = FlatParams::from_values(&model.initial_trainable_values()?, &decay)?;
    model.release_initial_values();
    let numel = params.numel();
    let mut opt = ZeroOptimizer::new(
        &cfg.optim,
        params,
        par.rank(),
        par.world(),
        cfg.parallel.bucket_mb,
    )?
    .with_replica_dtype(dtype)?
    // On a GPU one rank's bf16 run keeps its fp32 master as the model's weights + low halves.
    .with_split_master(device.is_cuda())?;
    // The model reads the optimizer's values from now on: its own copies of the trainables
    // are freed before the pool's free memory goes back to the driver.
    model.set_trainable(&opt.model_flat(dtype)?)?;
    metrics::release_load_memory(device)?;
    // Every rank: the sharded optimizer state (scripts/bench_dist reads this line).
    eprintln!(
        "optimizer state on rank {}: {:.1} MiB (fp32 master + AdamW moments of {} of {numel} values)",
        par.rank(),
        opt.state_bytes()? as f64 / (1u64 << 20) as f64,
        opt.shard_range().len()
    );
    if main {
        eprintln!(
            "model: {}, {:.2}M trainable ({method}), {dtype:?} on {device:?}, {:?} gradients{}",
            model.describe(),
            numel as f64 / 1e6,
            model.decoder().grad_dtype(),
            if par.world() > 1 {
                format!(
                    ", {} ranks (ZeRO-2{})",
                    par.world(),
                    if ctx.sp > 1 {
                        format!(", Ulysses sequence parallel over {}", ctx.sp)
                    } else {
                        String::new()
                    }
                )
            } else {
                String::new()
            }
        );
    }

    // Schedule: optimizer steps from epochs (or max_steps).
    let per_step = cfg.train.batch_size * cfg.train.grad_accum;
    let sampler = DistributedSampler::new(
        data.len(),
        par.rank(),
        par.world(),
        ctx.sp,
        cfg.train.seed,
        true,
        false,
    )?;
    let steps_per_epoch = sampler.per_rank().div_ceil(per_step).max(1);
    let total_steps = cfg
        .train
        .max_steps
        .unwrap_or(cfg.train.epochs * steps_per_epoch);
    let schedule = LrSchedule::new(&cfg.schedule, cfg.optim.lr, total_steps)?;

    let mut sampler_state = SamplerState::default();
    let mut start_step = 0;
    let mut history: Vec<(usize, f64)> = vec![];
    let resume_dir = match &ctx.resume {
        Resume::No => None,
        Resume::Auto => checkpoint::latest(work_dir)?,
        Resume::Path(p) => Some(p.clone()),
    };
    if let Some(dir) = resume_dir {
        let ck = checkpoint::load(&dir, device)?;
        checkpoint::check_identity(&dir, &ck.state.identity, &identity)?;
        if ck.state.trainable != names {
            bail!(
                "{}: its trainable tensors do not match this model's",
                dir.display()
            );
        }
        let by_name: std::collections::HashMap<_, _> = ck.trainable.into_iter().collect();
        let values = names
            .iter()
            .map(|n| {
                by_name.get(n).cloned().with_context(|| {
                    format!(
                        "{}: trainable.safetensors has no tensor `{n}` (incomplete checkpoint)",
                        dir.display()
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        opt.load(
            FlatParams::from_values(&values, &decay)?,
            &ck.optimizer.iter().cloned().collect(),
        )?;
        sampler_state = ck.state.sampler;
        start_step = ck.state.step;
        history = ck.state.history.clone();
        if main {
            eprintln!(
                "resumed from {} at step {start_step}/{total_steps}",
                dir.display()
            );
        }
    } else if ctx.resume == Resume::Auto && main {
        eprintln!(
            "--resume auto: no checkpoint in {}, starting from scratch",
            work_dir.display()
        );
    }

    // Rank 0 evaluates, logs and draws the progress bar.
    let mut eval = main
        .then(|| EvalHook::new(cfg, work_dir, tokenizer))
        .transpose()?;
    if let (0, Some(eval)) = (start_step, eval.as_mut()) {
        model.set_trainable(&opt.model_flat(dtype)?)?;
        eval.run(model.decoder(), 0)?;
    }
    let mut scalars = main.then(|| ScalarLog::open(work_dir)).transpose()?;
    let mut indices = sampler.iter_from(sampler_state);
    let bar = if main {
        progress_bar(total_steps as u64, start_step as u64)
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let mut last_ckpt = None;
    let mut nan_streak = 0;
    let mut lr_points = vec![];

    for step in start_step..total_steps {
        par.check_stop()?;
        par.fault_point(step);
        let t0 = Instant::now();
        // Next global batch: grad_accum micro-batches of batch_size packed sequences.
        let mut micro = Vec::with_capacity(cfg.train.grad_accum);
        for _ in 0..cfg.train.grad_accum {
            let (st, batch) = data.next_batch(&mut indices, cfg.train.batch_size)?;
            sampler_state = st;
            micro.push(batch);
        }
        let local_targets: usize = micro.iter().map(D::targets).sum();
        let local_tokens: usize = micro.iter().map(D::tokens).sum();
        let data_time = t0.elapsed().as_secs_f64();
        // The whole step's counts over all ranks: the loss is the mean over every trained token.
        let counts = par.sum_counts(&[local_targets as u64, local_tokens as u64], device)?;
        let (n_targets, tokens) = (counts[0] as usize, counts[1] as usize);

        // Forward + backward: grads of the mean loss over every trained token of the step.
        model.set_trainable(&opt.model_flat(dtype)?)?;
        let mut grads = model.new_grads();
        let mut local_loss_sum = 0.0;
        // ZeRO-2: on several ranks the last micro-batch's backward reduces each bucket of the
        // flat gradient into its owners' shards as soon as the bucket is final.
        let mut reducer = opt.reducer(par.comm())?;
        for (i, b) in micro.iter().enumerate() {
            // Ranks draw different dropout masks; rank 0's are the single-process ones.
            let seed =
                cfg.train.seed ^ ((step as u64) << 20) ^ i as u64 ^ ((par.rank() as u64) << 40);
            let last = i + 1 == micro.len();
            let ready: Option<&mut dyn GradReady> =
                (last && par.world() > 1).then_some(&mut reducer as &mut dyn GradReady);
            let s = model.forward_backward(
                b,
                1.0 / n_targets.max(1) as f64,
                &mut grads,
                seed,
                cfg.train.activation_checkpointing,
                ready,
            )?;
            local_loss_sum += s.loss_sum;
            if main && step == start_step && i == 0 && cfg.train.activation_budget_gib > 0.0 {
                say(
                    &bar,
                    &format!(
                        "activation checkpointing: {} of {} blocks recomputed, {} with their \
                         gate/up half recomputed, the rest kept ({} without their norms and \
                         SwiGLU product; train.activation_budget_gib = {})",
                        s.recomputed_blocks,
                        model.decoder().config().num_layers,
                        s.gate_up_recomputed_blocks,
                        s.slimmed_blocks,
                        cfg.train.activation_budget_gib
                    ),
                );
            }
        }

        // Reduce the rest (ZeRO-2: into this rank's shard) and wait for it, clip by the global
        // norm, check, update.
        let flat = M::flat_grads(grads)?; // [N] f32
        let shard_grad = reducer.finish(&flat)?; // [N / ranks]
        drop(flat);
        let loss = par.sum_f64s(&[local_loss_sum], device)?[0] / n_targets.max(1) as f64;
        let grad_norm = opt.global_grad_norm(&shard_grad, par.comm())?;
        let lr = schedule.lr_at(step);
        let finite = loss.is_finite() && grad_norm.is_finite();
        // Set when this step ends the run; raised after the step's scalars are logged.
        let mut stop_error = None;
        if finite {
            opt.apply(
                &shard_grad,
                grad_norm,
                cfg.optim.max_grad_norm,
                lr,
                par.comm(),
            )?;
            nan_streak = 0;
        } else {
            nan_streak += 1;
            let what = format!(
                "step {}: loss {loss} / grad_norm {grad_norm} is not finite (lr {lr:.3e})",
                step + 1
            );
            let hint = "check the learning rate, the data at this step, or use f32";
            if cfg.train.on_nan == "stop" {
                stop_error = Some(format!(
                    "{what}; stopping (train.on_nan = \"stop\"); {hint}"
                ));
            } else if nan_streak >= cfg.train.max_nan_steps {
                stop_error = Some(format!(
                    "{what}; stopping after {nan_streak} non-finite step(s) in a row (train.max_nan_steps = {}); {hint}",
                    cfg.train.max_nan_steps
                ));
            } else if main {
                say(&bar, &format!("{what}; update skipped ({hint})"));
            }
        }
        let done = step + 1;
        let time = t0.elapsed().as_secs_f64();
        let log = StepLog {
            step: done,
            total: total_steps,
            lr,
            loss,
            grad_norm,
            time,
            data_time,
            tokens,
            tokens_per_sec: tokens as f64 / time.max(1e-9),
            memory_mib: metrics::device_memory_mib(device),
            skipped: !finite,
        };
        if let Some(scalars) = scalars.as_mut() {
            scalars.write(&log)?;
        }
        if let Some(msg) = stop_error {
            bar.finish_and_clear();
            bail!("{msg}");
        }
        history.push((done, loss));
        lr_points.push((done, lr));
        let eta = eta(started, done - start_step, total_steps - done);
        bar.set_message(format!(
            "loss {loss:.4} | {:.0} tok/s | {:.0} MiB",
            log.tokens_per_sec, log.memory_mib
        ));
        bar.inc(1);
        if done % cfg.log.every_steps == 0 || done == total_steps {
            if main {
                say(&bar, &metrics::log_line(&log, eta));
            }
            // The coordinator's per-rank view: this rank's own mean loss and tokens.
            let local_loss = local_loss_sum / local_targets.max(1) as f64;
            par.report_metrics(done, local_loss, local_tokens)?;
        }

        let save_now = (cfg.checkpoint.save_steps > 0 && done % cfg.checkpoint.save_steps == 0)
            || (done == total_steps && cfg.checkpoint.save_final);
        let eval_now = (cfg.eval.every_steps > 0 && done % cfg.eval.every_steps == 0) || save_now;
        if let (true, false, Some(eval)) = (eval_now, cfg.eval.inputs.is_empty(), eval.as_mut()) {
            model.set_trainable(&opt.model_flat(dtype)?)?;
            bar.suspend(|| eval.run(model.decoder(), done))?;
        }
        if save_now {
            let state = CheckpointState {
                format: checkpoint::FORMAT,
                ftrun_version: env!("CARGO_PKG_VERSION").into(),
                step: done,
                total_steps,
                sampler: sampler_state,
                seed: cfg.train.seed,
                identity: identity.clone(),
                trainable: names.clone(),
                history: history.clone(),
                shards: None,
            };
            let dir = save_checkpoint(cfg, work_dir, par, &opt, state)?;
            if main {
                say(&bar, &format!("saved checkpoint {}", dir.display()));
            }
            last_ckpt = Some(dir);
        }
    }
    bar.finish_and_clear();
    if main && cfg.log.plot && !history.is_empty() {
        metrics::plot_curves(&work_dir.join("curves.png"), &history, &lr_points)?;
    }
    if main {
        eprintln!(
            "training done: {} steps in {:.1}s; work dir {}",
            total_steps - start_step,
            started.elapsed().as_secs_f64(),
            work_dir.display()
        );
    }
    Ok(RunSummary {
        losses: history,
        final_checkpoint: last_ckpt,
        steps: total_steps,
    })
}

/// What this build can run in parallel: data parallel with ZeRO-2, times Ulysses sequence
/// parallel groups. Returns the world's layout.
fn check_parallel_config(cfg: &Config, par: &Parallel) -> Result<WorldLayout> {
    let p = &cfg.parallel;
    let layout = WorldLayout::new(par.world(), p.sequence_parallel_size).map_err(|e| {
        anyhow::anyhow!(
            "parallel.sequence_parallel_size = {}: {e} (ranks: `ftrun --nproc N`)",
            p.sequence_parallel_size
        )
    })?;
    if par.world() > 1 && p.zero_stage != 2 {
        bail!(
            "parallel.zero_stage = {} on {} ranks: only ZeRO-2 (zero_stage = 2) is implemented",
            p.zero_stage,
            par.world()
        );
    }
    Ok(layout)
}

/// Writes the step's checkpoint. One process: one directory written under a temporary name and
/// renamed. Distributed: every rank writes its shard into the step directory, rank 0 adds the
/// run's state, and the coordinator commits the step once every shard is durable.
fn save_checkpoint(
    cfg: &Config,
    work_dir: &Path,
    par: &Parallel,
    opt: &ZeroOptimizer,
    mut state: CheckpointState,
) -> Result<PathBuf> {
    let keep_last = cfg.checkpoint.keep_last;
    if !par.is_distributed() {
        let ck = Checkpoint {
            trainable: state
                .trainable
                .iter()
                .cloned()
                .zip(opt.master_slots()?)
                .collect(),
            optimizer: opt.optimizer_state()?,
            config_toml: cfg.to_toml(),
            state,
        };
        return checkpoint::save(work_dir, &ck, keep_last);
    }
    let step = state.step;
    if par.is_main() {
        checkpoint::prepare_step_dir(work_dir, step)?;
    }
    par.barrier(&format!("checkpoint-{step}"))?;
    let range = opt.shard_range();
    let info = ShardInfo {
        rank: par.rank(),
        world: par.world(),
        step,
        start: range.start,
        end: range.end,
        sampler: state.sampler,
    };
    let params = opt.params();
    state.shards = Some(ShardLayout {
        world: par.world(),
        numel: params.numel(),
        shapes: params.slots.iter().map(|s| s.shape.clone()).collect(),
    });
    let config_toml = cfg.to_toml();
    let run = par.is_main().then_some((&state, config_toml.as_str()));
    let files = checkpoint::save_shard(work_dir, &info, &opt.shard_tensors()?, run)?;
    par.commit_checkpoint(step, files)?;
    if par.is_main() {
        checkpoint::prune(work_dir, keep_last)?;
    }
    Ok(checkpoint::step_dir(work_dir, step))
}

fn eta(started: Instant, done_here: usize, left: usize) -> Duration {
    if done_here == 0 {
        return Duration::ZERO;
    }
    started.elapsed().mul_f64(left as f64 / done_here as f64)
}

/// A line above the bar; plain stderr when the bar is hidden (not a terminal), where indicatif
/// would drop it.
fn say(bar: &ProgressBar, line: &str) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

fn progress_bar(total: u64, pos: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_position(pos);
    bar.set_style(
        ProgressStyle::with_template("{spinner} train [{bar:30}] {pos}/{len} eta {eta} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// A tensor's values as f64 (tests and logs).
pub fn to_vec_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}
