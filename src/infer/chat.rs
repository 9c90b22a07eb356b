//! Terminal chat as XTuner's `chat` does it: the template's SYSTEM on the first turn, its
//! INSTRUCTION each turn, the previous answers (with their stop token) and SEP in the history,
//! streamed output, EXIT / RESET commands. Unlike XTuner, the history is never re-encoded: the
//! KV cache keeps it and each turn feeds only its new tokens.

use std::io::{BufRead, Write};

use anyhow::{bail, Context, Result};

use super::generate::{generate_with_sampler, FinishReason, StopCriteria};
use super::sampling::{GenConfig, Sampler};
use super::stream::{TextCodec, TextStream};
use super::CausalLm;

/// The strings of a chat template that chat needs (the data module's `Template` converts to
/// it). `system` holds a `{system}` placeholder, `instruction` an `{input}` one; both may use
/// `{round}` (the 1-based turn number).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatFormat {
    pub system: String,
    pub instruction: String,
    /// What ends an answer in training data (e.g. `<|im_end|>`); chat stops on it too.
    pub suffix: String,
    /// What follows an answer before the next turn.
    pub sep: String,
    pub stop_words: Vec<String>,
}

impl ChatFormat {
    /// The text of turn `round` (0-based): SYSTEM (first turn, when a system text is given)
    /// followed by INSTRUCTION.
    pub fn turn_prompt(&self, input: &str, system: Option<&str>, round: usize) -> String {
        let round_text = (round + 1).to_string();
        let mut prompt = String::new();
        if round == 0 && !self.system.is_empty() {
            if let Some(system) = system {
                prompt += &self
                    .system
                    .replace("{system}", system)
                    .replace("{round}", &round_text);
            }
        }
        prompt += &self
            .instruction
            .replace("{input}", input)
            .replace("{round}", &round_text);
        prompt
    }

    /// Stop words plus the suffix (trimmed), without duplicates.
    pub fn all_stop_words(&self) -> Vec<String> {
        let mut words = self.stop_words.clone();
        let suffix = self.suffix.trim();
        if !suffix.is_empty() && !words.iter().any(|w| w == suffix) {
            words.push(suffix.to_string());
        }
        words
    }
}

/// Settings of a chat session.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatOptions {
    /// System text for the template's SYSTEM part (`--system`).
    pub system: Option<String>,
    /// Extra stop words (`--stop-words`), on top of the template's and the EOS token.
    pub stop_words: Vec<String>,
    /// The model's context length: a turn that would not fit (prompt plus max_new_tokens)
    /// drops the history first, as XTuner does.
    pub max_context: Option<usize>,
    pub gen: GenConfig,
}

/// What one turn produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatReply {
    /// The answer without its stop word.
    pub text: String,
    pub finish_reason: FinishReason,
    /// Tokens sampled (the stop token included).
    pub tokens: usize,
}

/// The warning printed when chatting without a template.
pub const NO_TEMPLATE_WARNING: &str = "Warning: no prompt template given (--prompt-template); \
the model will just continue your text instead of answering it.";

/// A multi-turn conversation with one model; the KV cache holds the whole history.
pub struct ChatSession<'a, M: CausalLm> {
    model: &'a M,
    codec: &'a dyn TextCodec,
    format: Option<ChatFormat>,
    options: ChatOptions,
    stop_words: Vec<String>,
    sampler: Sampler,
    cache: M::Cache,
    /// Every token fed to the cache, in order.
    history: Vec<u32>,
    /// The previous answer's last token: sampled, not fed yet (it opens the next turn).
    pending: Vec<u32>,
    round: usize,
}

impl<'a, M: CausalLm> ChatSession<'a, M> {
    /// `format` None chats without a template (the model continues the text).
    pub fn new(
        model: &'a M,
        codec: &'a dyn TextCodec,
        format: Option<ChatFormat>,
        options: ChatOptions,
    ) -> Result<ChatSession<'a, M>> {
        if options.gen.max_new_tokens == 0 {
            bail!("generation setting max_new_tokens = 0: a chat answer needs at least one token");
        }
        let sampler = Sampler::new(&options.gen)?;
        let mut stop_words = format
            .as_ref()
            .map(ChatFormat::all_stop_words)
            .unwrap_or_default();
        for word in &options.stop_words {
            if !word.is_empty() && !stop_words.contains(word) {
                stop_words.push(word.clone());
            }
        }
        Ok(ChatSession {
            model,
            codec,
            format,
            options,
            stop_words,
            sampler,
            cache: model.new_cache(),
            history: Vec::new(),
            pending: Vec::new(),
            round: 0,
        })
    }

    /// A warning for the user when the chat has no template.
    pub fn warning(&self) -> Option<&'static str> {
        self.format.is_none().then_some(NO_TEMPLATE_WARNING)
    }

    /// Every token the cache holds, in order (the conversation so far).
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// The 0-based number of the next turn.
    pub fn round(&self) -> usize {
        self.round
    }

    /// Forget the conversation (RESET): empty history and a fresh cache.
    pub fn reset(&mut self) {
        self.cache = self.model.new_cache();
        self.history.clear();
        self.pending.clear();
        self.round = 0;
    }

    /// The tokens this turn feeds: BOS and the first prompt on the first turn, else the
    /// previous answer's unfed token, SEP and the prompt (each part encoded without special
    /// tokens, as XTuner encodes training data).
    fn turn_ids(&self, input: &str) -> Result<Vec<u32>> {
        let system = self.options.system.as_deref();
        let (prompt, sep) = match &self.format {
            Some(f) => (f.turn_prompt(input, system, self.round), f.sep.as_str()),
            None => (input.to_string(), ""),
        };
        let mut ids = Vec::new();
        if self.round == 0 {
            ids.extend(self.codec.bos_id());
            ids.extend(self.codec.encode(&prompt, false)?);
        } else {
            ids.extend(&self.pending);
            ids.extend(self.codec.encode(&format!("{sep}{prompt}"), false)?);
        }
        Ok(ids)
    }

    /// Answer `input`, streaming the answer's text to `out`; notes go to `log`.
    pub fn ask(
        &mut self,
        input: &str,
        out: &mut dyn Write,
        log: &mut dyn Write,
    ) -> Result<ChatReply> {
        let mut new_ids = self.turn_ids(input)?;
        if let Some(limit) = self.options.max_context {
            let needed = self.history.len() + new_ids.len() + self.options.gen.max_new_tokens;
            if needed > limit && self.round > 0 {
                writeln!(
                    log,
                    "Log: history removed: this turn would need {needed} tokens, more than the \
                     context length {limit}"
                )?;
                self.reset();
                new_ids = self.turn_ids(input)?;
            }
        }
        let stop = StopCriteria::for_chat(self.codec, &self.stop_words);
        let mut display = TextStream::new(self.codec, false);
        let generation = generate_with_sampler(
            self.model,
            &mut self.cache,
            &mut self.sampler,
            &self.history,
            &new_ids,
            &stop,
            |id| {
                let delta = display.push(id)?;
                if !delta.is_empty() {
                    out.write_all(delta.as_bytes())?;
                    out.flush()?;
                }
                Ok(true)
            },
        )?;
        // The end of the answer that the display stream still held: a split character, or
        // text in the same token as the stop string.
        let text = generation.text.clone().unwrap_or_default();
        let tail = match text.strip_prefix(display.text()) {
            Some(rest) => rest.to_string(),
            None => display.finish()?,
        };
        out.write_all(tail.as_bytes())?;
        if !text.ends_with('\n') {
            out.write_all(b"\n")?;
        }
        out.flush()?;

        self.history.extend(&new_ids);
        let (last, fed) = generation
            .ids
            .split_last()
            .context("generation returned no token")?;
        self.history.extend(fed);
        self.pending = vec![*last];
        self.round += 1;
        Ok(ChatReply {
            text,
            finish_reason: generation.finish_reason,
            tokens: generation.ids.len(),
        })
    }
}

/// `--prompt` mode: print the warning (if any) to `log`, answer once to `out`.
pub fn answer_once<M: CausalLm>(
    session: &mut ChatSession<'_, M>,
    prompt: &str,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Result<ChatReply> {
    if prompt.trim().is_empty() {
        bail!("--prompt is empty");
    }
    if let Some(w) = session.warning() {
        writeln!(log, "{w}")?;
    }
    session.ask(prompt, out, log)
}

/// The interactive loop: one message per line; `EXIT` (or end of input) quits, `RESET` forgets
/// the conversation, empty lines are ignored. Answers go to `out`, prompts and notes to `log`.
pub fn run_repl<M: CausalLm>(
    session: &mut ChatSession<'_, M>,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    log: &mut dyn Write,
) -> Result<()> {
    if let Some(w) = session.warning() {
        writeln!(log, "{w}")?;
    }
    writeln!(
        log,
        "Type a message and press Enter (EXIT: quit, RESET: forget the conversation)."
    )?;
    let mut line = String::new();
    loop {
        write!(log, "\n>>> ")?;
        log.flush()?;
        line.clear();
        if input
            .read_line(&mut line)
            .context("reading the chat input")?
            == 0
        {
            return Ok(());
        }
        let message = line.trim_end_matches(['\n', '\r']);
        match message.trim() {
            "" => continue,
            "EXIT" => {
                writeln!(log, "Log: Exit!")?;
                return Ok(());
            }
            "RESET" => {
                session.reset();
                writeln!(log, "Log: History responses have been removed!")?;
            }
            _ => {
                let reply = session.ask(message, out, log)?;
                if reply.finish_reason == FinishReason::Length {
                    writeln!(
                        log,
                        "Log: the answer reached max_new_tokens ({}) and was cut.",
                        reply.tokens
                    )?;
                }
            }
        }
    }
}

impl From<&crate::data::template::Template> for ChatFormat {
    fn from(t: &crate::data::template::Template) -> Self {
        ChatFormat {
            system: t.system.clone(),
            instruction: t.instruction.clone(),
            suffix: t.suffix.clone(),
            sep: t.sep.clone(),
            stop_words: t.stop_words.clone(),
        }
    }
}
