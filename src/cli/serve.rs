//! `ftrun serve`: load the model (and its base for the compare view), pick the chat template,
//! bind, and serve the OpenAI-compatible API and the web page until the process ends.

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::data::template::Template;
use crate::infer::llava::{LlavaParts, LlavaPaths};
use crate::infer::load::load_for_inference_bits;
use crate::infer::{ChatFormat, TextCodec};
use crate::model::decoder::Decoder;
use crate::serve::image::ImageInput;
use crate::serve::prompt::{detect_template, model_chat_template};
use crate::serve::{ModelInfo, ServeOptions, Server};
use crate::tokenizer::Tokenizer;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// A Hugging Face model directory.
    pub model: PathBuf,
    /// A PEFT LoRA adapter to apply (merged in memory).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Also load the model without the adapter; the web page shows both answers side by side.
    #[arg(long, requires = "adapter")]
    pub compare_base: bool,
    /// Load the block linears as 4-bit NF4 (as QLoRA trains them; the adapter stays unmerged
    /// on top); only 4 is supported.
    #[arg(long)]
    pub bits: Option<u32>,
    /// Address to bind; the default only accepts connections from this machine.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to bind (0: any free port).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every API request.
    #[arg(long, env = "FTRUN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Chat template (internlm2_chat, qwen_chat, llama3_chat, llama2_chat, plain); default:
    /// the one matching the model's tokenizer_config.json chat_template.
    #[arg(long, alias = "prompt-template")]
    pub template: Option<String>,
    /// The name the API and the page give the model (default: the adapter's or the model's
    /// directory name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Most requests generated together; more wait in the queue.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// `cpu`, `cuda` or `cuda:N` (default: auto).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// An exported LLaVA directory (as `ftrun chat --llava`): serve the LLaVA model; chat
    /// requests may carry one image as an `image_url` part with a data URL.
    #[arg(long, requires = "visual_encoder", conflicts_with = "compare_base")]
    pub llava: Option<PathBuf>,
    /// The CLIP vision tower of the LLaVA model.
    #[arg(long, requires = "llava")]
    pub visual_encoder: Option<PathBuf>,
}

/// Load the model with the adapter (or without), as `--bits` asks. The one place that knows
/// how a served model is loaded.
fn load_model(a: &ServeArgs, adapter: Option<&Path>) -> Result<(Decoder, Tokenizer)> {
    load_for_inference_bits(&a.model, adapter, &a.device, a.bits)
}

pub fn run(a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 {
        bail!("--max-batch 0: at least one request must be able to run");
    }
    if let (Some(llava), Some(visual_encoder)) = (&a.llava, &a.visual_encoder) {
        return run_llava(&a, llava, visual_encoder);
    }
    let (tuned, tokenizer) = load_model(&a, a.adapter.as_deref())?;
    let format = chat_format(&a, &tokenizer)?;
    let max_context = tuned.config().max_position_embeddings;

    let dir_name = |p: &Path| {
        p.canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "model".to_string())
    };
    let base_name = dir_name(&a.model);
    let tuned_name = a
        .served_model_name
        .clone()
        .unwrap_or_else(|| match &a.adapter {
            Some(adapter) => dir_name(adapter),
            None => base_name.clone(),
        });
    let tuned_label = if a.adapter.is_some() {
        "fine-tuned"
    } else {
        "model"
    };
    let mut models = vec![(
        ModelInfo {
            id: tuned_name.clone(),
            label: tuned_label.to_string(),
        },
        tuned,
    )];
    if a.compare_base {
        let (base, _) = load_model(&a, None)?;
        let id = if base_name == tuned_name {
            format!("{base_name}-base")
        } else {
            base_name
        };
        let label = "base".to_string();
        models.push((ModelInfo { id, label }, base));
    }

    let listener = bind(&a)?;
    let ids: Vec<String> = models.iter().map(|(m, _)| m.id.clone()).collect();
    let server = Server::start(
        listener,
        models,
        tokenizer,
        serve_options(&a, format, max_context),
    )?;
    announce(&a, &server, &ids);
    server.wait()
}

fn serve_options(a: &ServeArgs, format: ChatFormat, max_context: usize) -> ServeOptions {
    ServeOptions {
        api_key: a.api_key.clone(),
        format,
        max_context,
        max_batch: a.max_batch,
    }
}

/// `--llava DIR --visual-encoder CLIP`: the LLaVA model, which takes one image per request.
fn run_llava(a: &ServeArgs, llava: &Path, visual_encoder: &Path) -> Result<()> {
    let paths = LlavaPaths {
        llm: &a.model,
        visual_encoder,
        llava,
        adapter: a.adapter.as_deref(),
    };
    let (model, tokenizer) = LlavaParts::load(&paths, &a.device, a.bits)?;
    let format = chat_format(a, &tokenizer)?;
    let max_context = model.decoder.config().max_position_embeddings;
    let images = ImageInput {
        preprocess: model.preprocess(),
        tokens: model.image_tokens(),
    };
    let id = a.served_model_name.clone().unwrap_or_else(|| {
        llava
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "llava".to_string())
    });
    let listener = bind(a)?;
    let server = Server::start_with_images(
        listener,
        vec![(
            ModelInfo {
                id: id.clone(),
                label: "LLaVA".to_string(),
            },
            model,
        )],
        tokenizer,
        serve_options(a, format, max_context),
        Some(images),
    )?;
    announce(a, &server, &[id]);
    server.wait()
}

fn bind(a: &ServeArgs) -> Result<TcpListener> {
    let listener = TcpListener::bind((a.host, a.port))
        .with_context(|| format!("binding {}:{}", a.host, a.port))?;
    if !a.host.is_loopback() && a.api_key.is_none() {
        eprintln!(
            "Warning: listening on {} without --api-key: anyone who can reach this address can \
             use the model.",
            a.host
        );
    }
    Ok(listener)
}

/// The line scripts wait for, and where the page and the API are.
fn announce(a: &ServeArgs, server: &Server, ids: &[String]) {
    let url = format!("http://{}", server.addr());
    // One line scripts (and the browser test) can wait for: the address is known here.
    println!(
        "ftrun serve: listening on {url} (models: {})",
        ids.join(", ")
    );
    eprintln!(
        "  web chat: {url}/\n  API:      {url}/v1/chat/completions  (OpenAI-compatible){}",
        if a.api_key.is_some() {
            "\n  API key required: Authorization: Bearer <key>"
        } else {
            ""
        }
    );
}

/// `--template`, else the template matching the model's own chat template, else plain (with
/// a warning: the model will continue text instead of answering).
fn chat_format(a: &ServeArgs, tokenizer: &dyn TextCodec) -> Result<ChatFormat> {
    let name = match a.template.as_deref() {
        Some(name) => name.to_string(),
        None => {
            let detected =
                model_chat_template(&a.model)?.and_then(|t| detect_template(&t, tokenizer));
            match detected {
                Some(name) => {
                    eprintln!(
                        "Template: {name} (from {}/tokenizer_config.json; --template overrides)",
                        a.model.display()
                    );
                    name.to_string()
                }
                None => {
                    eprintln!(
                        "Warning: the model has no chat template ftrun recognises and --template \
                         was not given; serving with the plain template (the model continues the \
                         text instead of answering it)."
                    );
                    "plain".to_string()
                }
            }
        }
    };
    Ok(ChatFormat::from(&Template::by_name(&name)?))
}
