//! `ftrun bench`: a fixed number of training steps on random tokens, for the GPU parity check
//! against PyTorch (scripts/parity_torch.py replays the same batches, weights and initial
//! adapter) and for tokens/s and memory figures. Not a test: a measurement tool.
//!
//! With `--llava` it runs the LLaVA finetune stage instead: the frozen CLIP tower of
//! `--visual-encoder`, a fresh projector (trained) and the LLM of `--model` by `--method`, one
//! generated image per row (its patches spliced in at [`IMAGE_AT`], labels masked) and random
//! text tokens around it; scripts/bench replays it with transformers' LlavaForConditionalGeneration.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::{gib_to_bytes, LoraConfig, OptimConfig};
use crate::data::image::ClipPreprocess;
use crate::data::llava::LlavaItem;
use crate::data::pack::PackedSeq;
use crate::data::IMAGE_TOKEN_ID;
use crate::dist::collectives::SoloComm;
use crate::model::decoder::{Decoder, QuantSpec};
use crate::model::layers::mix_seed;
use crate::model::llava::{init_projector, make_llava_batch, LlavaModel, Projector};
use crate::model::vision::{ClipVision, ClipVisionConfig};
use crate::model::{weights::LazyCheckpoint, ModelConfig};
use crate::train::metrics::{device_memory_mib, keep_memory_pool, pool_high_marks};
use crate::train::optim::FlatParams;
use crate::train::step::StepModel;
use crate::train::trainer::{
    compute_dtype, make_batch, select_device, train_mode_for, trained_targets, MicroBatch,
    TextModel,
};
use crate::train::zero::ZeroOptimizer;

/// Row position of each image's first patch in a LLaVA bench row: after a few template tokens,
/// as in `<s><|im_start|>user\n<image>\n...`.
pub const IMAGE_AT: usize = 5;
/// Seed stream of the bench's fresh projector (apart from the LLM adapters').
const PROJECTOR_SEED: u64 = 0x5052_4f4a; // "PROJ"
/// Side lengths of the generated bench images before preprocessing (not square, so the
/// finetune stage's pad-to-square runs).
const BENCH_IMAGE_WH: (u32, u32) = (480, 360);

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
    /// With checkpointing, GiB of activations kept anyway (`train.activation_budget_gib`).
    #[arg(long, default_value_t = 0.0)]
    pub activation_budget_gib: f64,
    /// The gradient buffer's dtype (`optim.grad_dtype`): `auto` (bf16 one-write gradients for
    /// full fine-tuning, as the trainer with one micro-batch on one rank) or `f32`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32"])]
    pub grad_dtype: String,
    /// Keep the fp32 master as an f32 buffer and a bf16 copy (the trainer splits it on a GPU;
    /// see `ZeroOptimizer::with_split_master`).
    #[arg(long)]
    pub no_split_master: bool,
    /// Keys per CTA of the flash-attention backward: 0 = the launcher's choice, 64 or 128
    /// forced (both kernels end to end in one session).
    #[arg(long, default_value_t = 0)]
    pub flash_bwd_keys: usize,
    /// Output directory: batches.json, init_adapter/ (LoRA), ftrun_<method>.json; with
    /// `--llava` also pixels.safetensors, init_projector/ and ftrun_llava_<method>.json.
    #[arg(long)]
    pub out: PathBuf,
    /// The LLaVA finetune stage: `--model` is the LLM, `--visual-encoder` the (frozen) CLIP
    /// tower; the projector trains with the LLM's adapters (or weights, for `full`).
    #[arg(long, requires = "visual_encoder")]
    pub llava: bool,
    /// A Hugging Face CLIPVisionModel directory (with `--llava`).
    #[arg(long, requires = "llava")]
    pub visual_encoder: Option<PathBuf>,
}

pub fn run(a: BenchArgs) -> Result<()> {
    if ![0, 64, 128].contains(&a.flash_bwd_keys) {
        bail!(
            "--flash-bwd-keys must be 0, 64 or 128, got {}",
            a.flash_bwd_keys
        );
    }
    crate::kernels::flash_attn::with_backward_keys(a.flash_bwd_keys, || run_bench(a))
}

fn run_bench(a: BenchArgs) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let device = select_device(&a.device)?;
    // Freed memory stays in the pool, so the used memory sampled after a step is its high-water mark.
    keep_memory_pool(&device)?;
    let dtype = compute_dtype("auto", &device);
    let mcfg = ModelConfig::from_dir(&a.model)?;
    let vision = match (&a.visual_encoder, a.llava) {
        (Some(dir), true) => Some((dir.clone(), ClipVisionConfig::from_dir(dir)?)),
        _ => None,
    };
    // A LLaVA row holds the image's placeholder, expanded to its patches when batched.
    let text_len = match &vision {
        Some((dir, v)) => {
            let n = v.num_patches();
            if a.seq_len < IMAGE_AT + n + 2 {
                bail!(
                    "--seq-len {} cannot hold the {n} image tokens of {} at position {IMAGE_AT} and a target after them",
                    a.seq_len,
                    dir.display()
                );
            }
            a.seq_len - n + 1
        }
        None => a.seq_len,
    };

    // The token rows: random tokens, every text position trained (as transformers with
    // labels = ids); ids 0..3 stay free (0 marks image rows in batches.json).
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let token_rows: Vec<Vec<Vec<u32>>> = (0..a.steps)
        .map(|_| {
            (0..a.batch)
                .map(|_| {
                    (0..text_len)
                        .map(|_| rng.random_range(3..mcfg.vocab_size as u32))
                        .collect()
                })
                .collect()
        })
        .collect();

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
    let mut decoder =
        Decoder::new_quantized(&mcfg, &mut source, mode, quant, dtype, &device, a.seed)?;
    drop(source);
    decoder.set_activation_budget(
        gib_to_bytes(a.activation_budget_gib).context("--activation-budget-gib")?,
    );
    // One micro-batch per step on one rank, as the trainer's rule for `optim.grad_dtype`.
    let one_write_grads = decoder.set_one_write_grads(a.grad_dtype == "auto");
    let session = Session {
        a: &a,
        device: device.clone(),
        dtype,
        before,
        one_write_grads,
        t_load,
    };
    let write_adapter = |names: &[String], init: &[Tensor]| -> Result<()> {
        if a.method == "full" {
            return Ok(());
        }
        let pairs: Vec<_> = names.iter().cloned().zip(init.iter().cloned()).collect();
        crate::export::write_peft_adapter(&lora, &a.model, &pairs, &a.out.join("init_adapter"))
    };

    let Some((vision_dir, vcfg)) = vision else {
        let as_json: Vec<_> = token_rows
            .iter()
            .map(|rows| json!({"input_ids": rows, "labels": rows}))
            .collect();
        std::fs::write(a.out.join("batches.json"), serde_json::to_string(&as_json)?)?;
        let batches = token_rows
            .iter()
            .map(|rows| {
                let b = make_batch(&rows.iter().map(|r| whole_row(r)).collect::<Vec<_>>());
                (trained_targets(&b), MicroBatch::Whole(b))
            })
            .collect();
        let model = TextModel { decoder, sp: None };
        return session.train(model, batches, write_adapter, &a.method, json!({}));
    };

    // LLaVA: the frozen tower, a fresh projector, one generated image per row.
    let mut source = LazyCheckpoint::open(&vision_dir)?;
    let tower = ClipVision::new(&vcfg, &mut source, -2, dtype, &device)
        .with_context(|| format!("vision tower {}", vision_dir.display()))?;
    drop(source);
    let projector = init_projector(
        vcfg.hidden_size,
        mcfg.hidden_size,
        mix_seed(a.seed, PROJECTOR_SEED),
        DType::F32,
        &device,
    )?;
    let model = LlavaModel::new(decoder, tower, projector)?;
    let image_tokens = model.image_tokens();
    let preprocess = ClipPreprocess::clip(vcfg.image_size as u32, true);
    let mut batches = Vec::with_capacity(a.steps);
    let (mut as_json, mut all_pixels) = (vec![], vec![]);
    for rows in &token_rows {
        let items = rows
            .iter()
            .map(|r| {
                let mut ids = r.clone();
                ids[IMAGE_AT] = IMAGE_TOKEN_ID;
                let image = bench_image(&mut rng, BENCH_IMAGE_WH);
                Ok(LlavaItem {
                    seq: whole_row(&ids),
                    pixels: Some(preprocess.apply(&image, &Device::Cpu)?), // [3, S, S]
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let b = make_llava_batch(&items, image_tokens)?;
        // Rows as transformers takes them: image rows id 0 (the peer's image_token_id), label -100.
        let ids: Vec<&[u32]> = b.batch.input_ids.chunks(a.seq_len).collect();
        let labels: Vec<&[i32]> = b.batch.labels.chunks(a.seq_len).collect();
        as_json.push(json!({"input_ids": ids, "labels": labels}));
        all_pixels.push(
            b.pixels
                .clone()
                .context("a LLaVA bench batch without pixels")?,
        );
        batches.push((trained_targets(&b.batch), b));
    }
    std::fs::write(a.out.join("batches.json"), serde_json::to_string(&as_json)?)?;
    let pixels = Tensor::stack(&all_pixels, 0)?; // [steps, batch, 3, S, S]
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("pixel_values".to_string(), pixels)]),
        a.out.join("pixels.safetensors"),
    )?;
    let n_llm = model.decoder.trainable().len();
    let out = a.out.clone();
    let save_init = |names: &[String], init: &[Tensor]| -> Result<()> {
        write_adapter(&names[..n_llm], &init[..n_llm])?;
        write_projector(&out.join("init_projector"), &init[n_llm..n_llm + 4])
    };
    let extra = json!({
        "llava": true,
        "visual_encoder": vision_dir,
        "image_tokens": image_tokens,
        "image_at": IMAGE_AT,
        "image_token_id": 0,
        "images_per_step": a.batch,
        "vision_hidden_size": vcfg.hidden_size,
        "vision_layers": vcfg.num_hidden_layers,
        "image_size": vcfg.image_size,
    });
    session.train(
        model,
        batches,
        save_init,
        &format!("llava_{}", a.method),
        extra,
    )
}

/// One unpacked sequence: positions from 0, one segment.
fn whole_row(ids: &[u32]) -> PackedSeq {
    PackedSeq {
        input_ids: ids.to_vec(),
        labels: ids.iter().map(|&t| t as i32).collect(),
        position_ids: (0..ids.len() as u32).collect(),
        cu_seqlens: vec![0, ids.len() as u32],
    }
}

/// A `w`x`h` image: a random colour gradient with pixel noise.
fn bench_image(rng: &mut impl Rng, (w, h): (u32, u32)) -> image::RgbImage {
    let base: [f32; 3] = std::array::from_fn(|_| rng.random_range(0.0..255.0));
    let slope: [f32; 3] = std::array::from_fn(|_| rng.random_range(-1.0..1.0));
    let mut img = image::RgbImage::new(w, h);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let ramp = (x + y) as f32 * 255.0 / (w + h) as f32;
        *px = image::Rgb(std::array::from_fn(|c| {
            (base[c] + slope[c] * ramp + rng.random_range(-20.0..20.0)).clamp(0.0, 255.0) as u8
        }));
    }
    img
}

/// The projector's initial values `[w1, b1, w2, b2]` as XTuner saves a projector
/// (`model.safetensors` with `model.0.weight`, ...).
fn write_projector(dir: &Path, values: &[Tensor]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tensors: std::collections::HashMap<String, Tensor> = Projector::NAMES
        .iter()
        .zip(values)
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)
        .with_context(|| format!("writing {}", path.display()))
}

/// What every bench run shares: its arguments, device and the memory / time before loading.
struct Session<'a> {
    a: &'a BenchArgs,
    device: Device,
    dtype: DType,
    /// Device memory before the model loaded (MiB).
    before: f64,
    /// The decoder keeps its gradients in the compute dtype (`Decoder::set_one_write_grads`).
    one_write_grads: bool,
    t_load: Instant,
}

impl Session<'_> {
    /// Sets up the optimizer (`save_init` gets the trainables' names and initial values first),
    /// runs `batches` (each with its trained-target count) and writes `ftrun_<tag>.json` with
    /// `extra`'s fields added.
    fn train<M: StepModel>(
        &self,
        mut model: M,
        batches: Vec<(usize, M::Batch)>,
        save_init: impl FnOnce(&[String], &[Tensor]) -> Result<()>,
        tag: &str,
        extra: serde_json::Value,
    ) -> Result<()> {
        let (a, device) = (self.a, &self.device);
        let names: Vec<String> = model.trainable().iter().map(|t| t.name.clone()).collect();
        let decay: Vec<bool> = model.trainable().iter().map(|t| t.decay).collect();
        let init = model.initial_trainable_values()?;
        save_init(&names, &init)?;
        let params = FlatParams::from_values(&init, &decay)?;
        drop(init);
        model.release_initial_values();
        let optim = OptimConfig {
            lr: a.lr,
            weight_decay: 0.0,
            ..OptimConfig::default()
        };
        // The trainer's optimizer on one rank: the same update, clipping and model views.
        let mut opt = ZeroOptimizer::new(&optim, params, 0, 1, 0)?
            .with_replica_dtype(self.dtype)?
            .with_split_master(device.is_cuda() && !a.no_split_master)?;
        // As the trainer: the model's own copies of the trainables go before the pool is trimmed.
        model.set_trainable(&opt.model_flat(self.dtype)?)?;
        crate::train::metrics::release_load_memory(device)?;
        device.synchronize()?;
        let load_s = self.t_load.elapsed().as_secs_f64();
        let after_load = device_memory_mib(device);
        let load_high = pool_high_marks(device)?;
        // Device memory outside the pool (CUDA context, module code, library workspaces): with
        // the pool's reservation high-water mark it gives the peak between the samples too.
        let outside_pool =
            crate::train::metrics::pool_current_mib(device)?.map(|(_, r)| after_load - r);

        let mut rows = vec![];
        let mut peak = after_load;
        let mut timed = 0.0;
        let mut plan = (0, 0, 0); // recomputed, gate/up recomputed, slimmed blocks
        for (step, (n, b)) in batches.iter().enumerate() {
            if step == a.warmup {
                // The profile covers the timed steps only (warm-up holds one-time loads).
                drop(crate::profile::take_report());
            }
            device.synchronize()?;
            let t0 = Instant::now();
            crate::profile::scope(device, "set_trainable", || {
                model.set_trainable(&opt.model_flat(self.dtype)?)
            })?;
            let mut grads = model.new_grads();
            let s = model.forward_backward(
                b,
                1.0 / *n as f64,
                &mut grads,
                a.seed + step as u64,
                !a.no_checkpointing,
                None,
            )?;
            let gn = crate::profile::scope(device, "optimizer", || {
                let flat = M::flat_grads(grads)?; // [N] f32, or bf16 one-write gradients
                let gn = opt.global_grad_norm(&flat, &SoloComm)?;
                opt.apply(&flat, gn, 1.0, a.lr, &SoloComm)?;
                anyhow::Ok(gn)
            })?;
            device.synchronize()?;
            let dt = t0.elapsed().as_secs_f64();
            if step >= a.warmup {
                timed += dt;
            }
            peak = peak.max(device_memory_mib(device));
            let loss = s.loss_sum / *n as f64;
            plan = (
                s.recomputed_blocks,
                s.gate_up_recomputed_blocks,
                s.slimmed_blocks,
            );
            let row = json!({"step": step + 1, "loss": loss, "grad_norm": gn, "time": dt});
            println!("{row}");
            rows.push(row);
        }
        let steps_high = pool_high_marks(device)?;
        if let (Some(h), Some(outside)) = (steps_high, outside_pool) {
            peak = peak.max(h.reserved + outside);
        }
        let profile = crate::profile::take_report();
        if !profile.is_empty() {
            eprintln!("profile ({}):\n{profile}", crate::profile::description());
        }
        let tokens = (a.seq_len * a.batch) as f64;
        let measured = a.steps.saturating_sub(a.warmup).max(1) as f64;
        let mut res = json!({
            "method": a.method,
            "rows": rows,
            "tokens_per_sec": tokens * measured / timed.max(1e-9),
            "peak_mib": peak - self.before,
            // Everything on the device, the CUDA context included (the GPU is otherwise idle).
            "peak_abs_mib": peak,
            "before_mib": self.before,
            "weight_mib": model.decoder().weight_bytes() as f64 / (1u64 << 20) as f64,
            // Allocated-at-once peaks from the pool (no fragmentation, no context): loading, steps.
            "pool_used_high_load_mib": load_high.map(|h| h.used),
            "pool_used_high_steps_mib": steps_high.map(|h| h.used),
            // What the pool held at most (used + fragmentation): loading, steps.
            "pool_reserved_high_load_mib": load_high.map(|h| h.reserved),
            "pool_reserved_high_steps_mib": steps_high.map(|h| h.reserved),
            // Host memory high-water mark of the whole run (loading included).
            "peak_rss_mib": crate::train::metrics::peak_rss_mib(),
            "after_load_mib": after_load - self.before,
            "load_s": load_s,
            "device": format!("{device:?}"),
            "dtype": format!("{:?}", self.dtype),
            "trainable_params": opt.params().numel(),
            "model_params": model.decoder().config().num_params(),
            "checkpointing": !a.no_checkpointing,
            "activation_budget_gib": a.activation_budget_gib,
            "split_master": opt.split_master(),
            "grad_dtype": if self.one_write_grads { format!("{:?}", self.dtype) } else { "F32".into() },
            "recomputed_blocks": plan.0,
            "gate_up_recomputed_blocks": plan.1,
            "slimmed_blocks": plan.2,
            "seq_len": a.seq_len,
            "batch": a.batch,
        });
        if let (Some(res), Some(extra)) = (res.as_object_mut(), extra.as_object()) {
            res.extend(extra.clone());
        }
        std::fs::write(
            a.out.join(format!("ftrun_{tag}.json")),
            serde_json::to_string_pretty(&res)?,
        )?;
        eprintln!(
            "ftrun {tag}: {:.0} tokens/s, peak {:.0} MiB absolute, {:.0} MiB over the context ({:.0} after load), {} trainable",
            res["tokens_per_sec"].as_f64().unwrap_or(0.0),
            peak,
            peak - self.before,
            after_load - self.before,
            opt.params().numel()
        );
        Ok(())
    }
}
