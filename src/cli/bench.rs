//! `ftrun bench`: a fixed number of training steps on random tokens, for the GPU parity check
//! against PyTorch (scripts/parity_torch.py replays the same batches, weights and initial
//! adapter) and for tokens/s and memory figures. Not a test: a measurement tool.

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

use crate::config::{LoraConfig, OptimConfig};
use crate::data::pack::PackedSeq;
use crate::model::decoder::{Decoder, QuantSpec};
use crate::model::{weights::LazyCheckpoint, ModelConfig};
use crate::train::metrics::{device_memory_mib, keep_memory_pool, pool_high_marks};
use crate::train::optim::{clip_coef, sum_squares, AdamW, FlatParams};
use crate::train::trainer::{
    compute_dtype, make_batch, select_device, train_mode_for, trained_targets,
};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A Hugging Face model directory (e.g. made by scripts/parity_torch.py make-model).
    #[arg(long)]
    pub model: PathBuf,
    /// `lora`, `qlora` (NF4 base, double quantization) or `full`.
    #[arg(long, default_value = "lora")]
    pub method: String,
    #[arg(long, default_value_t = 64)]
    pub r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Rows per step (each row one packed sequence of seq_len tokens).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Steps left out of the tokens/s figure.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long)]
    pub no_checkpointing: bool,
    /// Output directory: batches.json, init_adapter/ (LoRA), ftrun_<method>.json.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: BenchArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let device = select_device(&a.device)?;
    // Freed memory stays in the pool, so the used memory sampled after a step is its high-water mark.
    keep_memory_pool(&device)?;
    let dtype = compute_dtype("auto", &device);
    let mcfg = ModelConfig::from_dir(&a.model)?;

    // The batches: random tokens, every position trained (as transformers with labels = ids).
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let batches: Vec<Vec<Vec<u32>>> = (0..a.steps)
        .map(|_| {
            (0..a.batch)
                .map(|_| {
                    (0..a.seq_len)
                        .map(|_| rng.random_range(3..mcfg.vocab_size as u32))
                        .collect()
                })
                .collect()
        })
        .collect();
    let as_json: Vec<_> = batches
        .iter()
        .map(|rows| json!({"input_ids": rows, "labels": rows}))
        .collect();
    std::fs::write(a.out.join("batches.json"), serde_json::to_string(&as_json)?)?;

    let before = device_memory_mib(&device);
    let t_load = Instant::now();
    let mut source = LazyCheckpoint::open(&a.model)?;
    let quant = (a.method == "qlora").then_some(QuantSpec { double_quant: true });
    let lora = LoraConfig {
        r: a.r,
        alpha: a.alpha,
        dropout: 0.0,
        target_modules: vec![],
    };
    let mode = train_mode_for(&a.method, &lora);
    let mut model =
        Decoder::new_quantized(&mcfg, &mut source, mode, quant, dtype, &device, a.seed)?;
    drop(source);
    let names: Vec<String> = model.trainable().iter().map(|t| t.name.clone()).collect();
    let decay: Vec<bool> = model.trainable().iter().map(|t| t.decay).collect();
    let init = model.initial_trainable_values()?;
    if a.method != "full" {
        let pairs: Vec<_> = names.iter().cloned().zip(init.iter().cloned()).collect();
        crate::export::write_peft_adapter(&lora, &a.model, &pairs, &a.out.join("init_adapter"))?;
    }
    let mut params = FlatParams::from_values(&init, &decay)?;
    drop(init);
    model.release_initial_values();
    let optim = OptimConfig {
        lr: a.lr,
        weight_decay: 0.0,
        ..OptimConfig::default()
    };
    let mut opt = AdamW::new(&optim, &params)?;
    crate::train::metrics::release_load_memory(&device)?;
    if let Some(mib) = std::env::var("FTRUN_POOL_PREWARM_MIB").ok().and_then(|v| v.parse().ok()) {
        crate::train::metrics::prewarm_pool(&device, mib)?;
    }
    device.synchronize()?;
    let load_s = t_load.elapsed().as_secs_f64();
    let after_load = device_memory_mib(&device);
    let load_high = pool_high_marks(&device)?;
    // Device memory outside the pool (CUDA context, module code, library workspaces): with the
    // pool's reservation high-water mark it gives the true peak even between the samples.
    let outside_pool = crate::train::metrics::pool_current_mib(&device)?.map(|(_, r)| after_load - r);

    let mut rows = vec![];
    let mut peak = after_load;
    let mut timed = 0.0;
    for (step, rows_tokens) in batches.iter().enumerate() {
        // Each row one sequence, every position trained (labels = ids, as transformers).
        let seqs: Vec<PackedSeq> = rows_tokens
            .iter()
            .map(|r| PackedSeq {
                input_ids: r.clone(),
                labels: r.iter().map(|&t| t as i32).collect(),
                position_ids: (0..r.len() as u32).collect(),
                cu_seqlens: vec![0, r.len() as u32],
            })
            .collect();
        let b = make_batch(&seqs);
        let n = trained_targets(&b);
        device.synchronize()?;
        let t0 = Instant::now();
        crate::profile::scope(&device, "set_trainable", || {
            model.set_trainable(&params.views(candle_core::DType::F32)?)
        })?;
        let mut grads = model.new_grads();
        let s = model.forward_backward(
            &b,
            1.0 / n as f64,
            &mut grads,
            a.seed + step as u64,
            !a.no_checkpointing,
        )?;
        let gn = crate::profile::scope(&device, "optimizer", || {
            let flat = grads.into_flat()?; // [N] f32
            let gn = sum_squares(&flat)?.sqrt();
            opt.step_scaled(&mut params, &flat, clip_coef(gn, 1.0), a.lr)?;
            model.recycle_grads(flat);
            anyhow::Ok(gn)
        })?;
        device.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        if step >= a.warmup {
            timed += dt;
        }
        peak = peak.max(device_memory_mib(&device));
        let loss = s.loss_sum / n as f64;
        let row = json!({"step": step + 1, "loss": loss, "grad_norm": gn, "time": dt});
        println!("{row}");
        rows.push(row);
    }
    let steps_high = pool_high_marks(&device)?;
    if let (Some(h), Some(outside)) = (steps_high, outside_pool) {
        peak = peak.max(h.reserved + outside);
    }
    let profile = crate::profile::take_report();
    if !profile.is_empty() {
        eprintln!("profile (FTRUN_PROFILE=1; synchronized per phase, so slower than a plain run):\n{profile}");
    }
    let tokens = (a.seq_len * a.batch) as f64;
    let measured = a.steps.saturating_sub(a.warmup).max(1) as f64;
    let res = json!({
        "method": a.method,
        "rows": rows,
        "tokens_per_sec": tokens * measured / timed.max(1e-9),
        "peak_mib": peak - before,
        // Everything on the device, the CUDA context included (the GPU is otherwise idle).
        "peak_abs_mib": peak,
        "before_mib": before,
        "weight_mib": model.weight_bytes() as f64 / (1u64 << 20) as f64,
        // Allocated-at-once peaks from the pool (no fragmentation, no context): loading, steps.
        "pool_used_high_load_mib": load_high.map(|h| h.used),
        "pool_used_high_steps_mib": steps_high.map(|h| h.used),
        // What the pool held at most (used + fragmentation): loading, steps.
        "pool_reserved_high_load_mib": load_high.map(|h| h.reserved),
        "pool_reserved_high_steps_mib": steps_high.map(|h| h.reserved),
        // Host memory high-water mark of the whole run (loading included).
        "peak_rss_mib": crate::train::metrics::peak_rss_mib(),
        "after_load_mib": after_load - before,
        "load_s": load_s,
        "device": format!("{device:?}"),
        "dtype": format!("{dtype:?}"),
        "trainable_params": params.numel(),
        "model_params": mcfg.num_params(),
        "checkpointing": !a.no_checkpointing,
    });
    std::fs::write(
        a.out.join(format!("ftrun_{}.json", a.method)),
        serde_json::to_string_pretty(&res)?,
    )?;
    eprintln!(
        "ftrun {}: {:.0} tokens/s, peak {:.0} MiB absolute, {:.0} MiB over the context ({:.0} after load), {} trainable",
        a.method,
        res["tokens_per_sec"].as_f64().unwrap_or(0.0),
        peak,
        peak - before,
        after_load - before,
        params.numel()
    );
    Ok(())
}
