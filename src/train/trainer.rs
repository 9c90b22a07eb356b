//! The training loop on one device. Reads top-down like llm.c's: next batch, forward+backward per
//! micro-batch, clip, optimizer step, schedule, log, evaluate, save.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::data::sampler::{DistributedSampler, SamplerState};
use crate::data::IGNORE_INDEX;
use crate::model::decoder::{Batch, Decoder, LoraSpec, QuantSpec, TrainMode};
use crate::model::{weights, ModelConfig};
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::{self, Checkpoint, CheckpointState, RunIdentity};
use crate::train::eval::EvalHook;
use crate::train::metrics::{self, ScalarLog, StepLog};
use crate::train::optim::{clip_grad_norm, AdamW, FlatParams};
use crate::train::schedule::LrSchedule;

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

/// The device `train.device` names ("auto" = the first GPU when built with CUDA, else CPU).
pub fn select_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if cfg!(feature = "cuda") {
                Device::new_cuda(0).or_else(|_| Ok(Device::Cpu))
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
            Ok(Device::new_cuda(idx)?)
        }
    }
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

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn method_id(cfg: &Config) -> String {
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

/// Train a config to the end. `work_dir` receives checkpoints, logs and the dataset cache.
pub fn run(cfg: &Config, work_dir: &Path, resume: Resume) -> Result<RunSummary> {
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("creating work dir {}", work_dir.display()))?;
    let device = select_device(&cfg.train.device)?;
    metrics::keep_memory_pool(&device)?;
    let quant = quant_spec(cfg);
    let dtype = match quant {
        // QLoRA computes in `quant.compute_dtype` on a GPU; on CPU `model.dtype` rules as usual.
        Some(_) if device.is_cuda() && cfg.model.dtype == "auto" => {
            compute_dtype(&cfg.quant.compute_dtype, &device)
        }
        _ => compute_dtype(&cfg.model.dtype, &device),
    };

    // Data: tokenized and packed once, cached in the work dir.
    let tokenizer = Tokenizer::from_path(&cfg.model.tokenizer_path())?;
    let (dataset, report, data_key) = crate::data::build_dataset(cfg, &tokenizer, work_dir, true)?;
    eprintln!("{}", report.summary());

    // Model: HF config + safetensors, LoRA adapters or all weights trainable.
    let model_cfg = ModelConfig::from_dir(&cfg.model.path)?;
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
        &device,
        cfg.train.seed,
    )?;
    drop(source);
    let names: Vec<String> = model.trainable().iter().map(|t| t.name.clone()).collect();
    let decay: Vec<bool> = model.trainable().iter().map(|t| t.decay).collect();
    let mut params = FlatParams::from_values(&model.initial_trainable_values()?, &decay)?;
    let mut opt = AdamW::new(&cfg.optim, &params)?;
    eprintln!(
        "model: {:?} {} layers, {:.1}M params, {:.2}M trainable ({}), {dtype:?} on {device:?}",
        model_cfg.arch,
        model_cfg.num_layers,
        model_cfg.num_params() as f64 / 1e6,
        params.numel() as f64 / 1e6,
        cfg.train.method
    );

    // Schedule: optimizer steps from epochs (or max_steps).
    let per_step = cfg.train.batch_size * cfg.train.grad_accum;
    let sampler = DistributedSampler::new(dataset.len(), 0, 1, 1, cfg.train.seed, true, false)?;
    let steps_per_epoch = sampler.per_rank().div_ceil(per_step).max(1);
    let total_steps = cfg
        .train
        .max_steps
        .unwrap_or(cfg.train.epochs * steps_per_epoch);
    let schedule = LrSchedule::new(&cfg.schedule, cfg.optim.lr, total_steps)?;

    let mut sampler_state = SamplerState::default();
    let mut start_step = 0;
    let mut history: Vec<(usize, f64)> = vec![];
    let resume_dir = match &resume {
        Resume::No => None,
        Resume::Auto => checkpoint::latest(work_dir)?,
        Resume::Path(p) => Some(p.clone()),
    };
    if let Some(dir) = resume_dir {
        let ck = checkpoint::load(&dir, &device)?;
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
        params = FlatParams::from_values(&values, &decay)?;
        opt.load_state(&ck.optimizer.iter().cloned().collect())?;
        sampler_state = ck.state.sampler;
        start_step = ck.state.step;
        history = ck.state.history.clone();
        eprintln!(
            "resumed from {} at step {start_step}/{total_steps}",
            dir.display()
        );
    } else if resume == Resume::Auto {
        eprintln!(
            "--resume auto: no checkpoint in {}, starting from scratch",
            work_dir.display()
        );
    }

    let mut eval = EvalHook::new(cfg, work_dir, &tokenizer)?;
    if start_step == 0 {
        model.set_trainable(&params.views(dtype)?)?;
        eval.run(&model, 0)?;
    }
    let mut scalars = ScalarLog::open(work_dir)?;
    let mut indices = sampler.iter_from(sampler_state);
    let bar = progress_bar(total_steps as u64, start_step as u64);
    let started = Instant::now();
    let mut last_ckpt = None;
    let mut nan_streak = 0;
    let mut lr_points = vec![];

    for step in start_step..total_steps {
        let t0 = Instant::now();
        // Next global batch: grad_accum micro-batches of batch_size packed sequences.
        let mut micro = Vec::with_capacity(cfg.train.grad_accum);
        for _ in 0..cfg.train.grad_accum {
            let mut seqs = Vec::with_capacity(cfg.train.batch_size);
            for _ in 0..cfg.train.batch_size {
                let (st, idx) = indices.next().context("sampler ran dry")?;
                sampler_state = st;
                seqs.push(dataset.get_owned(idx));
            }
            micro.push(make_batch(&seqs));
        }
        let n_targets: usize = micro.iter().map(trained_targets).sum();
        let data_time = t0.elapsed().as_secs_f64();

        // Forward + backward: grads of the mean loss over every trained token of the step.
        model.set_trainable(&params.views(dtype)?)?;
        let mut grads = model.new_grads();
        let mut loss_sum = 0.0;
        for (i, b) in micro.iter().enumerate() {
            let seed = cfg.train.seed ^ ((step as u64) << 20) ^ i as u64;
            let s = model.forward_backward(
                b,
                1.0 / n_targets.max(1) as f64,
                &mut grads,
                seed,
                cfg.train.activation_checkpointing,
            )?;
            loss_sum += s.loss_sum;
        }
        let loss = loss_sum / n_targets.max(1) as f64;

        // Clip, check, update.
        let flat = params.flatten_grads(&grads.slots)?;
        let (flat, grad_norm) = clip_grad_norm(&flat, cfg.optim.max_grad_norm)?;
        let lr = schedule.lr_at(step);
        let finite = loss.is_finite() && grad_norm.is_finite();
        // Set when this step ends the run; raised after the step's scalars are logged.
        let mut stop_error = None;
        if finite {
            opt.step(&mut params, &flat, lr)?;
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
            } else {
                say(&bar, &format!("{what}; update skipped ({hint})"));
            }
        }
        let done = step + 1;
        let time = t0.elapsed().as_secs_f64();
        let tokens: usize = micro.iter().map(|b| b.input_ids.len()).sum();
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
            memory_mib: metrics::device_memory_mib(&device),
            skipped: !finite,
        };
        scalars.write(&log)?;
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
            say(&bar, &metrics::log_line(&log, eta));
        }

        let save_now = (cfg.checkpoint.save_steps > 0 && done % cfg.checkpoint.save_steps == 0)
            || done == total_steps;
        let eval_now = (cfg.eval.every_steps > 0 && done % cfg.eval.every_steps == 0) || save_now;
        if eval_now && !cfg.eval.inputs.is_empty() {
            model.set_trainable(&params.views(dtype)?)?;
            bar.suspend(|| eval.run(&model, done))?;
        }
        if save_now {
            let ck = Checkpoint {
                state: CheckpointState {
                    format: checkpoint::FORMAT,
                    ftrun_version: env!("CARGO_PKG_VERSION").into(),
                    step: done,
                    total_steps,
                    sampler: sampler_state,
                    seed: cfg.train.seed,
                    identity: identity.clone(),
                    trainable: names.clone(),
                    history: history.clone(),
                },
                trainable: names
                    .iter()
                    .cloned()
                    .zip(params.views(DType::F32)?)
                    .collect(),
                optimizer: opt.state_tensors()?,
                config_toml: cfg.to_toml(),
            };
            let dir = checkpoint::save(work_dir, &ck, cfg.checkpoint.keep_last)?;
            say(&bar, &format!("saved checkpoint {}", dir.display()));
            last_ckpt = Some(dir);
        }
    }
    bar.finish_and_clear();
    if cfg.log.plot && !history.is_empty() {
        metrics::plot_curves(&work_dir.join("curves.png"), &history, &lr_points)?;
    }
    eprintln!(
        "training done: {} steps in {:.1}s; work dir {}",
        total_steps - start_step,
        started.elapsed().as_secs_f64(),
        work_dir.display()
    );
    Ok(RunSummary {
        losses: history,
        final_checkpoint: last_ckpt,
        steps: total_steps,
    })
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
