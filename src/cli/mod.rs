//! The `ftrun` command line: clap definitions and one function per subcommand.

mod assistant;
mod bench;
mod chat;
mod check_data;
mod clip_features;
mod demo;
mod kernel_check;
mod logits;
mod serve;

use crate::config::{self, builtin};
use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "ftrun",
    version,
    about = "Fine-tune LLMs: LoRA, QLoRA and full, on one GPU, many GPUs or a CPU"
)]
pub struct Cli {
    /// Worker processes on this node, one per GPU: `ftrun --nproc 2 train cfg.toml` runs a
    /// data-parallel (ZeRO-2) job with a coordinator. Also from torchrun/SLURM variables.
    #[arg(long)]
    pub nproc: Option<usize>,
    /// Number of nodes of the job.
    #[arg(long)]
    pub nnodes: Option<usize>,
    /// This node's index, 0..nnodes.
    #[arg(long)]
    pub node_rank: Option<usize>,
    /// The coordinator's HOST:PORT (node 0 runs it; default 127.0.0.1:29400).
    #[arg(long)]
    pub coordinator: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train with a config file (or the name of a built-in config).
    Train(TrainArgs),
    /// List the built-in configs.
    ListCfg {
        /// Only names containing this text (case-insensitive).
        #[arg(short, long)]
        pattern: Option<String>,
    },
    /// Copy a built-in config into DIR as NAME_copy.toml, to edit.
    CopyCfg { name: String, dir: PathBuf },
    /// Load, template, tokenize and pack the dataset exactly as training will; print samples and a summary.
    CheckData(CheckDataArgs),
    /// Dataset generators.
    #[command(subcommand)]
    Data(DataCommand),
    /// Checkpoint -> PEFT adapter (LoRA) or Hugging Face model directory (full fine-tuning).
    Export {
        /// A checkpoint directory (work_dir/checkpoints/step-N).
        checkpoint: PathBuf,
        out: PathBuf,
        /// LLaVA runs: also write the model (adapters merged) in the Hugging Face
        /// `LlavaForConditionalGeneration` layout to this directory (Llama-architecture LLMs).
        #[arg(long, value_name = "DIR")]
        hf_llava: Option<PathBuf>,
    },
    /// Merge a PEFT LoRA adapter into its base model: safetensors shards + index + config + tokenizer.
    Merge {
        base: PathBuf,
        adapter: PathBuf,
        out: PathBuf,
        #[arg(long, default_value = "2GB")]
        max_shard_size: String,
    },
    /// Chat with a model in the terminal (streamed; EXIT quits, RESET clears the history).
    Chat(ChatArgs),
    /// Serve an OpenAI-compatible chat API and a web chat page (fine-tuned vs base with --compare-base).
    Serve(serve::ServeArgs),
    /// The embedded demo: make a tiny model and dataset, train the assistant on CPU, then chat.
    Demo {
        /// Where the demo's model, data and work dir go.
        #[arg(long, default_value = "work_dirs/demo")]
        dir: PathBuf,
        /// Optimizer steps.
        #[arg(long, default_value_t = 60)]
        steps: usize,
        /// Answer this prompt and exit instead of starting an interactive chat.
        #[arg(long)]
        prompt: Option<String>,
    },
    /// Train a fixed number of steps on random tokens: GPU parity runs and tokens/s, memory figures.
    #[command(hide = true)]
    Bench(bench::BenchArgs),
    /// Dump a model's logits for a text as JSON (interop checks against transformers / peft).
    #[command(hide = true)]
    Logits(logits::LogitsArgs),
    /// A CLIP vision tower's LLaVA features for one image, as safetensors (parity checks
    /// against transformers' CLIPVisionModel).
    #[command(hide = true)]
    ClipFeatures(clip_features::ClipFeaturesArgs),
    /// Run every fused CUDA kernel against its CPU reference and time it (needs a GPU).
    #[command(hide = true)]
    KernelCheck(kernel_check::KernelCheckArgs),
    /// Print the version.
    Version,
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Config file, or a built-in config name (see `ftrun list-cfg`).
    pub config: String,
    /// Override a config key: `--set optim.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Where checkpoints, logs and the dataset cache go (default: train.work_dir or work_dirs/<config name>).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// `auto` resumes from the latest complete checkpoint in the work dir; or a checkpoint path.
    #[arg(long)]
    pub resume: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct CheckDataArgs {
    pub config: String,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// What to print for each shown sample.
    #[arg(long, value_enum, default_value = "masked")]
    pub show: Show,
    /// How many packed sequences to print.
    #[arg(short = 'n', long, default_value_t = 2)]
    pub n: usize,
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    /// A Hugging Face model directory.
    pub model: PathBuf,
    /// A PEFT LoRA adapter to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Load the block linears as 4-bit NF4 (as QLoRA trains them); only 4 is supported.
    #[arg(long)]
    pub bits: Option<u32>,
    /// Chat template (internlm2_chat, qwen_chat, llama3_chat, llama2_chat); none = plain continuation.
    #[arg(long, alias = "prompt-template")]
    pub template: Option<String>,
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 0.1)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.75)]
    pub top_p: f64,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Extra stop words, on top of the template's and EOS.
    #[arg(long, num_args = 1..)]
    pub stop_words: Vec<String>,
    /// Greedy decoding (same as --temperature 0).
    #[arg(long)]
    pub greedy: bool,
    /// Answer this prompt once and exit (for scripts and tests).
    #[arg(long)]
    pub prompt: Option<String>,
    /// `cpu`, `cuda` or `cuda:N` (default: auto).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// An exported LLaVA directory (`projector/`, and `llm_adapter/` or `llm/`,
    /// `visual_encoder_adapter/` when trained): chat with a LLaVA model.
    #[arg(long, requires = "visual_encoder")]
    pub llava: Option<PathBuf>,
    /// The CLIP vision tower of the LLaVA model.
    #[arg(long)]
    pub visual_encoder: Option<PathBuf>,
    /// An image to talk about (needs --llava); the first turn carries it.
    #[arg(long, requires = "llava")]
    pub image: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Show {
    /// The decoded text.
    Text,
    /// The decoded text with untrained spans shown as [MASKED ...].
    Masked,
    /// Token ids.
    Ids,
    /// Labels (-100 = not trained).
    Labels,
    All,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Write the self-cognition dataset users start with (XTuner's personal-assistant tutorial).
    Assistant {
        /// The assistant's owner, as in "我是<NAME>的小助手".
        #[arg(long)]
        name: String,
        /// Number of records.
        #[arg(long, default_value_t = 10000)]
        n: usize,
        /// Output file (.jsonl for JSON lines, anything else for a JSON array).
        #[arg(short, long, default_value = "assistant.json")]
        output: PathBuf,
    },
    /// Write the files the tiny_llava_* configs read: a tiny CLIP, the tiny demo LLM, generated
    /// images and their LLaVA json (for CPU tests and interop checks).
    TinyLlava {
        #[arg(long, default_value = "work_dirs/tiny_llava")]
        dir: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// Parse the command line and run it.
pub fn main() -> Result<()> {
    let cli = Cli::parse();
    run(cli)
}

pub fn run(cli: Cli) -> Result<()> {
    let launch = crate::dist::launch::LaunchArgs {
        nnodes: cli.nnodes,
        node_rank: cli.node_rank,
        nproc: cli.nproc,
        coordinator: cli.coordinator.clone(),
    };
    match cli.command {
        Command::Train(a) => train(a, &launch),
        Command::ListCfg { pattern } => list_cfg(pattern.as_deref()),
        Command::CopyCfg { name, dir } => copy_cfg(&name, &dir),
        Command::CheckData(a) => check_data(a),
        Command::Data(DataCommand::Assistant { name, n, output }) => {
            assistant::write(&name, n, &output)
        }
        Command::Data(DataCommand::TinyLlava { dir, seed }) => {
            let t = crate::model::tiny_clip::make_tiny_llava(&dir, seed)?;
            println!(
                "tiny LLaVA written to {}: llm {}, clip {}, images {}, pretrain {}, finetune {}",
                dir.display(),
                t.llm.display(),
                t.clip.display(),
                t.images.display(),
                t.pretrain_data.display(),
                t.finetune_data.display()
            );
            Ok(())
        }
        Command::Export {
            checkpoint,
            out,
            hf_llava,
        } => crate::export::export_checkpoint_with(&checkpoint, &out, hf_llava.as_deref()),
        Command::Merge {
            base,
            adapter,
            out,
            max_shard_size,
        } => crate::export::merge(
            &base,
            &adapter,
            &out,
            crate::model::weights::parse_size(&max_shard_size)?,
        ),
        Command::Chat(a) => chat::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Demo { dir, steps, prompt } => demo::run(&dir, steps, prompt.as_deref()),
        Command::Bench(a) => bench::run(a),
        Command::Logits(a) => logits::run(a),
        Command::ClipFeatures(a) => clip_features::run(a),
        Command::KernelCheck(a) => kernel_check::run(a),
        Command::Version => {
            println!("ftrun {} ({})", env!("CARGO_PKG_VERSION"), build_flavour());
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ftrun", &mut std::io::stdout());
            Ok(())
        }
    }
}

fn build_flavour() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else {
        "cpu"
    }
}

/// A config argument is a file path, or the name of a built-in config.
pub fn load_config(arg: &str, set: &[String]) -> Result<(config::Config, String)> {
    let path = Path::new(arg);
    if path.exists() {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("run")
            .to_string();
        return Ok((config::load(path, set)?, name));
    }
    if let Some(text) = builtin::get(arg) {
        return Ok((
            config::load_str(text, &format!("<built-in {arg}>"), set)?,
            arg.to_string(),
        ));
    }
    let names: Vec<&str> = builtin::BUILTIN.iter().map(|(n, _)| *n).collect();
    let hint = config::did_you_mean(arg, &names)
        .map(|n| format!(" (did you mean the built-in `{n}`?)"))
        .unwrap_or_default();
    bail!("config `{arg}` is neither a file nor a built-in config{hint}; `ftrun list-cfg` lists the built-in ones")
}

fn list_cfg(pattern: Option<&str>) -> Result<()> {
    let pat = pattern.map(|p| p.to_lowercase());
    let rows: Vec<_> = builtin::BUILTIN
        .iter()
        .filter(|(n, _)| pat.as_ref().is_none_or(|p| n.to_lowercase().contains(p)))
        .collect();
    if rows.is_empty() {
        bail!("no built-in config matches `{}`", pattern.unwrap_or(""));
    }
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (name, text) in rows {
        println!("{name:width$}  {}", builtin::description(text));
    }
    Ok(())
}

fn copy_cfg(name: &str, dir: &Path) -> Result<()> {
    let text = builtin::get(name).with_context(|| {
        let names: Vec<&str> = builtin::BUILTIN.iter().map(|(n, _)| *n).collect();
        match config::did_you_mean(name, &names) {
            Some(n) => format!("no built-in config `{name}` (did you mean `{n}`?)"),
            None => format!("no built-in config `{name}`; `ftrun list-cfg` lists them"),
        }
    })?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = dir.join(format!("{name}_copy.toml"));
    if out.exists() {
        bail!("{} already exists; not overwriting it", out.display());
    }
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    println!("Copied to {}", out.display());
    Ok(())
}

/// The work dir: `--work-dir`, else `train.work_dir`, else `work_dirs/<config name>`.
pub fn work_dir_for(cfg: &config::Config, name: &str, arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| cfg.train.work_dir.clone())
        .unwrap_or_else(|| PathBuf::from("work_dirs").join(name))
}

/// `ftrun train`: in this process (world 1), as the node's launcher of `--nproc` workers, or as
/// one worker of a distributed job (started by that launcher, torchrun or SLURM).
fn train(a: TrainArgs, launch: &crate::dist::launch::LaunchArgs) -> Result<()> {
    use crate::dist::{launch::LaunchSpec, parallel, supervise};
    use crate::train::trainer::{self, Resume};
    let (cfg, name) = load_config(&a.config, &a.set)?;
    let work_dir = work_dir_for(&cfg, &name, a.work_dir);
    let resume = Resume::parse(a.resume.as_deref());
    let spec = LaunchSpec::from_env(launch)?;
    if spec.world() == 1 {
        trainer::run(&cfg, &work_dir, resume)?;
        return Ok(());
    }
    if spec.local_rank.is_none() {
        // The launcher: the workers get our own arguments and find their rank in the env.
        let sup = supervise::Supervision {
            max_restarts: cfg.parallel.max_restarts,
            coordinator: parallel::coordinator_config(&spec, &cfg.parallel, &work_dir),
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let code = supervise::supervise(&spec, &sup, &args)?;
        if code != 0 {
            bail!("distributed training failed (a worker exited with code {code})");
        }
        return Ok(());
    }
    let (config_hash, dataset_fingerprint) = trainer::worker_identity(&cfg)?;
    let mut par = parallel::Parallel::join(
        &spec,
        &parallel::JoinOptions {
            config_hash,
            dataset_fingerprint,
            work_dir: work_dir.clone(),
            parallel: cfg.parallel.clone(),
        },
    )?;
    // A restarted job continues from its last committed checkpoint.
    let resume = if par.attempt() > 0 {
        Resume::Auto
    } else {
        resume
    };
    trainer::run_parallel(&cfg, &work_dir, resume, &mut par)?;
    par.finish()
}

fn check_data(a: CheckDataArgs) -> Result<()> {
    let (cfg, name) = load_config(&a.config, &a.set)?;
    let work_dir = work_dir_for(&cfg, &name, a.work_dir);
    check_data::run(&cfg, &work_dir, a.show, a.n)
}
