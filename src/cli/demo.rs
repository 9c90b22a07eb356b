//! `ftrun demo`: the whole workflow offline on CPU in a few minutes. Writes the self-cognition
//! data, generates a tiny Llama-architecture model and tokenizer, trains it with LoRA using the
//! built-in `tiny_demo_assistant` config, exports the adapter, then chats with the result.

use anyhow::{Context, Result};
use std::io::IsTerminal;
use std::path::Path;

use super::assistant;
use crate::config::{self, builtin};
use crate::train::trainer::{run as train, Resume};

/// The demo assistant's owner.
pub const DEMO_NAME: &str = "ftrun";

pub fn run(dir: &Path, steps: usize, prompt: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let data = dir.join("assistant.jsonl");
    let model_dir = dir.join("tiny-llama");
    eprintln!("[1/4] data: {}", data.display());
    assistant::write(DEMO_NAME, 300, &data)?;
    eprintln!("[2/4] tiny model + tokenizer: {}", model_dir.display());
    let corpus: Vec<String> = assistant::QUESTIONS
        .iter()
        .map(|q| q.to_string())
        .chain([assistant::answer(DEMO_NAME)])
        .collect();
    crate::model::demo::make_demo_model(&model_dir, &corpus, 0)?;

    eprintln!("[3/4] training (LoRA, CPU)");
    let sets = vec![
        format!("model.path=\"{}\"", model_dir.display()),
        format!(
            "data.files=[{{path=\"{}\", format=\"conversation\"}}]",
            data.display()
        ),
        format!("train.max_steps={steps}"),
    ];
    let cfg = config::load_str(
        builtin::get("tiny_demo_assistant").expect("built-in demo config"),
        "<built-in tiny_demo_assistant>",
        &sets,
    )?;
    let work_dir = dir.join("work");
    if work_dir.exists() {
        std::fs::remove_dir_all(&work_dir)?;
    }
    let summary = train(&cfg, &work_dir, Resume::No)?;
    let ckpt = summary
        .final_checkpoint
        .context("training wrote no checkpoint")?;
    let adapter = dir.join("adapter");
    crate::export::export_checkpoint(&ckpt, &adapter)?;

    eprintln!(
        "[4/4] chat (greedy): ftrun chat {} --adapter {} --template internlm2_chat",
        model_dir.display(),
        adapter.display()
    );
    let question = prompt.unwrap_or(assistant::QUESTIONS[0]);
    let interactive = prompt.is_none() && std::io::stdin().is_terminal();
    let args = super::ChatArgs {
        model: model_dir.clone(),
        adapter: Some(adapter),
        bits: None,
        template: Some(cfg.data.template.clone()),
        system: None,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        max_new_tokens: 64,
        repetition_penalty: 1.0,
        seed: 0,
        stop_words: vec![],
        greedy: true,
        prompt: if interactive {
            None
        } else {
            Some(question.to_string())
        },
        device: "cpu".into(),
        llava: None,
        visual_encoder: None,
        image: None,
    };
    if !interactive {
        println!("> {question}");
    }
    super::chat::run(args)
}
