//! Training configuration: TOML sections mapped onto typed structs (torchtitan style).
//!
//! Every section denies unknown keys so that a typo is an error, not a silently ignored setting.
//! Loading (`load`) adds the file name, line and a "did you mean" suggestion to serde's messages,
//! and applies `--set section.key=value` overrides before the typed parse.

pub mod builtin;
pub mod load;

pub use load::{did_you_mean, load, load_str, ConfigError};

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The whole training config. Sections mirror the CLI's vocabulary and XTuner's config fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// One-line description shown by `ftrun list-cfg`.
    #[serde(default)]
    pub description: String,
    pub model: ModelConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub lora: LoraConfig,
    #[serde(default)]
    pub quant: QuantConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub parallel: ParallelConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// `[llava]`: train a LLaVA model (a CLIP tower and a projector in front of `[model]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llava: Option<LlavaConfig>,
}

/// `[llava]`: LLaVA-1.5 two-stage training (XTuner's `LLaVAModel`): the CLIP vision tower's
/// features (`select_layer`, class token dropped) go through the projector into the LLM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LlavaConfig {
    /// A Hugging Face CLIP directory (CLIPVisionModel, or a CLIPModel whose vision half is used).
    pub vision_tower: PathBuf,
    /// "pretrain": only the projector trains (LLM and tower frozen); "finetune": the projector
    /// and the LLM (`train.method`), optionally LoRA on the tower, from the pretrain checkpoint.
    pub stage: String,
    /// The tower's hidden state the features come from (XTuner's `visual_select_layer`).
    #[serde(default = "default_select_layer")]
    pub select_layer: i64,
    /// finetune: the pretrain stage's projector: a checkpoint directory, a work dir (its latest
    /// checkpoint) or an exported `projector/` directory.
    #[serde(default)]
    pub pretrain_checkpoint: Option<PathBuf>,
    /// Pad images to a square of the mean colour before resizing; default true for finetune and
    /// false for pretrain (LLaVA-1.5's `image_aspect_ratio`).
    #[serde(default)]
    pub pad_image_to_square: Option<bool>,
    /// pretrain: hold the frozen LLM in 4-bit NF4 (`[quant]` settings).
    #[serde(default)]
    pub llm_4bit: bool,
    /// finetune: LoRA adapters on the tower's linears (q_proj, k_proj, v_proj, out_proj, fc1,
    /// fc2; empty `target_modules` = all).
    #[serde(default)]
    pub vision_lora: Option<LoraConfig>,
    /// Image decoding threads.
    #[serde(default = "default_image_workers")]
    pub num_workers: usize,
    /// Micro-batches decoded ahead of the one being trained.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
}

fn default_select_layer() -> i64 {
    -2
}
fn default_image_workers() -> usize {
    4
}
fn default_prefetch() -> usize {
    2
}

impl LlavaConfig {
    pub fn is_pretrain(&self) -> bool {
        self.stage == "pretrain"
    }

    /// Whether images are padded to squares (explicit, else by stage).
    pub fn pad_to_square(&self) -> bool {
        self.pad_image_to_square.unwrap_or(!self.is_pretrain())
    }
}

/// `[model]`: a Hugging Face model directory (config.json + safetensors) and its tokenizer.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Directory holding config.json and model.safetensors (or a shard index).
    pub path: PathBuf,
    /// tokenizer.json or tokenizer.model, or a directory holding one; defaults to `path`.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Compute dtype: "auto" (bf16 on GPU, f32 on CPU), "bf16", "f16" or "f32".
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

impl ModelConfig {
    /// The tokenizer to load: `model.tokenizer`, else the model directory.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.tokenizer.clone().unwrap_or_else(|| self.path.clone())
    }
}

fn default_dtype() -> String {
    "auto".into()
}

/// One dataset file with its sampling weight.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    pub path: PathBuf,
    /// "auto" (detected from the first record), "messages", "conversation", "alpaca", "text", "llava".
    #[serde(default = "default_format")]
    pub format: String,
    /// Repeat factor: 2.0 reads the file twice, 0.5 keeps a deterministic half.
    #[serde(default = "default_weight")]
    pub weight: f64,
}

fn default_format() -> String {
    "auto".into()
}
fn default_weight() -> f64 {
    1.0
}

/// `[data]`: files, chat template, truncation and packing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub files: Vec<DataFile>,
    /// internlm2_chat, qwen_chat, llama3_chat, llama2_chat or plain.
    #[serde(default = "default_template")]
    pub template: String,
    /// System prompt applied to records that carry none.
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Concatenate samples into max_length sequences (varlen attention keeps them apart).
    #[serde(default = "default_true")]
    pub pack: bool,
    /// "split": XTuner's packing, a sample may continue in the next sequence;
    /// "whole": a sample is never split (longer samples are truncated to max_length).
    #[serde(default = "default_pack_mode")]
    pub pack_mode: String,
    #[serde(default = "default_true")]
    pub shuffle_before_pack: bool,
    /// Images for LLaVA records, relative paths resolve against this folder.
    #[serde(default)]
    pub image_folder: Option<PathBuf>,
    /// Tokenizer threads; 0 = all cores.
    #[serde(default)]
    pub num_workers: usize,
}

fn default_template() -> String {
    "internlm2_chat".into()
}
fn default_max_length() -> usize {
    2048
}
fn default_true() -> bool {
    true
}
fn default_pack_mode() -> String {
    "split".into()
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            files: vec![],
            template: default_template(),
            system: None,
            max_length: default_max_length(),
            pack: true,
            pack_mode: default_pack_mode(),
            shuffle_before_pack: true,
            image_folder: None,
            num_workers: 0,
        }
    }
}

/// `[lora]`: PEFT-style LoRA (used by `train.method` = "lora" and "qlora").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    #[serde(default = "default_r")]
    pub r: usize,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default = "default_lora_dropout")]
    pub dropout: f64,
    /// Module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or the
    /// InternLM2 names wqkv, wo, w1, w2, w3). Empty = every linear but the LM head.
    #[serde(default)]
    pub target_modules: Vec<String>,
}

fn default_r() -> usize {
    64
}
fn default_alpha() -> f64 {
    16.0
}
fn default_lora_dropout() -> f64 {
    0.1
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 64,
            alpha: 16.0,
            dropout: 0.1,
            target_modules: vec![],
        }
    }
}

/// `[quant]`: 4-bit NF4 base weights for QLoRA.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuantConfig {
    #[serde(default = "default_bits")]
    pub bits: u32,
    #[serde(default = "default_quant_type", rename = "type")]
    pub quant_type: String,
    #[serde(default = "default_true")]
    pub double_quant: bool,
    #[serde(default = "default_compute_dtype")]
    pub compute_dtype: String,
}

fn default_bits() -> u32 {
    4
}
fn default_quant_type() -> String {
    "nf4".into()
}
fn default_compute_dtype() -> String {
    "bf16".into()
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig {
            bits: 4,
            quant_type: default_quant_type(),
            double_quant: true,
            compute_dtype: default_compute_dtype(),
        }
    }
}

/// `[optim]`: AdamW with decoupled weight decay (applied to matrices only) and global-norm clipping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// The gradient buffer's dtype. "auto": the compute dtype where each gradient value is
    /// written once per step (full fine-tuning, one micro-batch, one rank: bf16 weight gradients
    /// as under PyTorch's autocast; see `Decoder::set_one_write_grads`), else f32. "f32": always.
    #[serde(default = "default_grad_dtype")]
    pub grad_dtype: String,
}

fn default_lr() -> f64 {
    2e-4
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> f64 {
    1.0
}
fn default_grad_dtype() -> String {
    "auto".into()
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: default_lr(),
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: 0.0,
            max_grad_norm: default_clip(),
            grad_dtype: default_grad_dtype(),
        }
    }
}

/// `[schedule]`: linear warm-up then cosine decay to `eta_min` (XTuner's LinearLR + CosineAnnealingLR).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Warm-up as a fraction of all optimizer steps (used when warmup_steps is not set).
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub warmup_steps: Option<usize>,
    /// "cosine" or "constant" after warm-up.
    #[serde(default = "default_decay")]
    pub decay: String,
    /// Final learning rate of the cosine, absolute.
    #[serde(default)]
    pub eta_min: f64,
}

fn default_warmup_ratio() -> f64 {
    0.03
}
fn default_decay() -> String {
    "cosine".into()
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            warmup_ratio: default_warmup_ratio(),
            warmup_steps: None,
            decay: default_decay(),
            eta_min: 0.0,
        }
    }
}

/// `[train]`: what is trained and for how long.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// "lora", "qlora" or "full".
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Optimizer steps; when set it wins over `epochs`.
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Packed sequences per micro-batch.
    #[serde(default = "default_one")]
    pub batch_size: usize,
    #[serde(default = "default_accum")]
    pub grad_accum: usize,
    #[serde(default)]
    pub seed: u64,
    /// "auto", "cpu", "cuda" or "cuda:N".
    #[serde(default = "default_device")]
    pub device: String,
    /// Recompute each decoder block's activations in backward.
    #[serde(default = "default_true")]
    pub activation_checkpointing: bool,
    /// With checkpointing: GiB of block activations to keep anyway (blocks skip their recompute,
    /// or rerun only their gate/up half; see `Decoder::set_activation_budget`). 0 = recompute
    /// every block.
    #[serde(default)]
    pub activation_budget_gib: f64,
    /// What a NaN/Inf loss or gradient norm does: "skip" the step or "stop" the run.
    #[serde(default = "default_on_nan")]
    pub on_nan: String,
    /// Consecutive skipped steps after which the run stops anyway.
    #[serde(default = "default_max_nan")]
    pub max_nan_steps: usize,
    /// Default work dir when `--work-dir` is not given.
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
}

fn default_method() -> String {
    "lora".into()
}
fn default_epochs() -> usize {
    3
}
fn default_one() -> usize {
    1
}
fn default_accum() -> usize {
    16
}
fn default_device() -> String {
    "auto".into()
}
fn default_on_nan() -> String {
    "skip".into()
}
fn default_max_nan() -> usize {
    20
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: default_method(),
            epochs: default_epochs(),
            max_steps: None,
            batch_size: 1,
            grad_accum: default_accum(),
            seed: 0,
            device: default_device(),
            activation_checkpointing: true,
            activation_budget_gib: 0.0,
            on_nan: default_on_nan(),
            max_nan_steps: default_max_nan(),
            work_dir: None,
        }
    }
}

/// An activation budget in GiB (`train.activation_budget_gib`, `--activation-budget-gib`) in
/// bytes; an error unless finite and >= 0.
pub fn gib_to_bytes(gib: f64) -> anyhow::Result<usize> {
    if !(gib >= 0.0 && gib.is_finite()) {
        anyhow::bail!("must be a number of GiB >= 0, got {gib}");
    }
    Ok((gib * (1u64 << 30) as f64) as usize)
}

/// `[parallel]`: data parallel with ZeRO and sequence parallel (Ulysses).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    #[serde(default = "default_one")]
    pub sequence_parallel_size: usize,
    /// 0 = replicated optimizer state, 2 = optimizer states and gradients sharded.
    #[serde(default = "default_zero")]
    pub zero_stage: u32,
    /// Gradient bucket size for reduce-scatter, in MiB.
    #[serde(default = "default_bucket")]
    pub bucket_mb: usize,
    /// Restarts from the last committed checkpoint after a worker failure.
    #[serde(default = "default_restarts")]
    pub max_restarts: usize,
    /// Seconds without a heartbeat before a worker counts as dead.
    #[serde(default = "default_hb")]
    pub heartbeat_timeout_s: f64,
    /// Seconds a collective (all-reduce, ...) may wait on a peer before the run fails and is
    /// restarted: a hung rank never stalls the job silently.
    #[serde(default = "default_collective_timeout")]
    pub collective_timeout_s: f64,
}

fn default_zero() -> u32 {
    2
}
fn default_bucket() -> usize {
    25
}
fn default_restarts() -> usize {
    3
}
fn default_hb() -> f64 {
    5.0
}
fn default_collective_timeout() -> f64 {
    300.0
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            sequence_parallel_size: 1,
            zero_stage: default_zero(),
            bucket_mb: default_bucket(),
            max_restarts: default_restarts(),
            heartbeat_timeout_s: default_hb(),
            collective_timeout_s: default_collective_timeout(),
        }
    }
}

/// `[checkpoint]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every N optimizer steps (0 = only at the end).
    #[serde(default = "default_save_steps")]
    pub save_steps: usize,
    /// Keep the last K checkpoints (0 = keep all).
    #[serde(default = "default_keep")]
    pub keep_last: usize,
    /// Save when training ends (false: only every `save_steps`; for throughput benchmarks,
    /// where a full fine-tune's final checkpoint would be ~12 bytes per parameter of disk I/O).
    #[serde(default = "default_true")]
    pub save_final: bool,
}

fn default_save_steps() -> usize {
    500
}
fn default_keep() -> usize {
    2
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            save_steps: default_save_steps(),
            keep_last: default_keep(),
            save_final: true,
        }
    }
}

/// `[eval]`: sample generations during training (XTuner's EvaluateChatHook).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    #[serde(default)]
    pub inputs: Vec<String>,
    /// Generate every N optimizer steps (0 = only before training, at saves and at the end).
    #[serde(default = "default_save_steps")]
    pub every_steps: usize,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default = "default_eval_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "default_eval_temp")]
    pub temperature: f64,
    #[serde(default = "default_eval_top_p")]
    pub top_p: f64,
}

fn default_eval_tokens() -> usize {
    128
}
fn default_eval_temp() -> f64 {
    0.1
}
fn default_eval_top_p() -> f64 {
    0.75
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            inputs: vec![],
            every_steps: default_save_steps(),
            system: None,
            max_new_tokens: default_eval_tokens(),
            temperature: default_eval_temp(),
            top_p: default_eval_top_p(),
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A log line every N optimizer steps.
    #[serde(default = "default_log_every")]
    pub every_steps: usize,
    /// Draw loss/lr curves to a PNG at the end of training.
    #[serde(default = "default_true")]
    pub plot: bool,
}

fn default_log_every() -> usize {
    10
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            every_steps: default_log_every(),
            plot: true,
        }
    }
}
