//! Sample generations during training (XTuner's EvaluateChatHook): answers to `eval.inputs`
//! before training, every `eval.every_steps`, at each save; written to `eval_outputs_iter_N.txt`.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::data::template::Template;
use crate::infer::{CausalLm, ChatFormat, ChatOptions, ChatSession, GenConfig};
use crate::tokenizer::Tokenizer;

pub struct EvalHook<'a> {
    inputs: Vec<String>,
    format: Option<ChatFormat>,
    options: ChatOptions,
    tokenizer: &'a Tokenizer,
    work_dir: PathBuf,
}

impl<'a> EvalHook<'a> {
    pub fn new(cfg: &Config, work_dir: &Path, tokenizer: &'a Tokenizer) -> Result<EvalHook<'a>> {
        let template = Template::by_name(&cfg.data.template)?;
        let format = (cfg.data.template != "plain").then(|| ChatFormat::from(&template));
        Ok(EvalHook {
            inputs: cfg.eval.inputs.clone(),
            format,
            options: ChatOptions {
                system: cfg.eval.system.clone().or_else(|| cfg.data.system.clone()),
                stop_words: vec![],
                max_context: None,
                gen: GenConfig {
                    max_new_tokens: cfg.eval.max_new_tokens,
                    temperature: cfg.eval.temperature as f32,
                    top_p: cfg.eval.top_p as f32,
                    seed: Some(cfg.train.seed),
                    ..GenConfig::default()
                },
            },
            tokenizer,
            work_dir: work_dir.to_path_buf(),
        })
    }

    /// Generate an answer for every input; print them and write `eval_outputs_iter_{step}.txt`.
    pub fn run<M: CausalLm>(&mut self, model: &M, step: usize) -> Result<Vec<String>> {
        if self.inputs.is_empty() {
            return Ok(vec![]);
        }
        let mut answers = vec![];
        let mut text = String::new();
        for input in &self.inputs {
            let mut session = ChatSession::new(
                model,
                self.tokenizer,
                self.format.clone(),
                self.options.clone(),
            )?;
            let mut sink = Vec::new();
            let reply = session.ask(input, &mut sink, &mut std::io::sink())?;
            let prompt = match &self.format {
                Some(f) => f.turn_prompt(input, self.options.system.as_deref(), 0),
                None => input.clone(),
            };
            text.push_str(&format!("{prompt}{}\n\n", reply.text));
            answers.push(reply.text);
        }
        eprintln!("── eval at step {step} ──\n{}", text.trim_end());
        let path = self.work_dir.join(format!("eval_outputs_iter_{step}.txt"));
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        Ok(answers)
    }
}
