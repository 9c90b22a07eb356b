//! Chat templates, with the exact strings of xtuner 0.2.0's `xtuner/utils/templates.py`.
//!
//! A conversation turn is laid out as XTuner's `template_map_fn` does it:
//! `[SYSTEM] INSTRUCTION` (not trained), `output + SUFFIX` (trained), then `SEP` (not trained);
//! the system part only where the turn carries a system prompt.

use crate::config::load::{did_you_mean, TEMPLATES};
use anyhow::{bail, Result};

/// A prompt template. `system` holds `{system}`, `instruction` holds `{input}` (and may hold
/// `{round}`, the 1-based turn number), as XTuner writes them with Python's `str.format`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Template {
    /// Wraps a turn's system prompt. Empty: system prompts are dropped (the `plain` template).
    pub system: String,
    /// Wraps every user input.
    pub instruction: String,
    /// Appended to every answer and trained with it; empty for none.
    pub suffix: String,
    /// The suffix ends an answer, so no EOS token follows it (and no BOS opens the next turn).
    pub suffix_as_eos: bool,
    /// Text after every turn, not trained; empty for none.
    pub sep: String,
    /// Strings that end a generated answer.
    pub stop_words: Vec<String>,
}

const CHATML_SYSTEM: &str = "<|im_start|>system\n{system}<|im_end|>\n";
const CHATML_INSTRUCTION: &str = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n";
const LLAMA2_SYSTEM: &str = "[INST] <<SYS>>\n You are a helpful, respectful and honest \
assistant. Always answer as helpfully as possible, while being safe. Your answers should not \
include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please \
ensure that your responses are socially unbiased and positive in nature.\n{system}\n<</SYS>>\n [/INST] ";

impl Template {
    /// The template of that name: internlm2_chat, qwen_chat, llama3_chat, llama2_chat or plain
    /// (no template: inputs and answers pass through as they are, system prompts are dropped,
    /// every answer ends with EOS, as XTuner without a `template_map_fn`).
    pub fn by_name(name: &str) -> Result<Template> {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let t = match name {
            "internlm2_chat" => Template {
                system: CHATML_SYSTEM.into(),
                instruction: CHATML_INSTRUCTION.into(),
                suffix: "<|im_end|>".into(),
                suffix_as_eos: true,
                sep: "\n".into(),
                stop_words: strings(&["<|im_end|>"]),
            },
            "qwen_chat" => Template {
                system: CHATML_SYSTEM.into(),
                instruction: CHATML_INSTRUCTION.into(),
                suffix: "<|im_end|>".into(),
                suffix_as_eos: true,
                sep: "\n".into(),
                stop_words: strings(&["<|im_end|>", "<|endoftext|>"]),
            },
            "llama3_chat" => Template {
                system: "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>".into(),
                instruction: "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>\
                              <|start_header_id|>assistant<|end_header_id|>\n\n"
                    .into(),
                suffix: "<|eot_id|>".into(),
                suffix_as_eos: true,
                sep: String::new(),
                stop_words: strings(&["<|eot_id|>"]),
            },
            "llama2_chat" => Template {
                system: LLAMA2_SYSTEM.into(),
                instruction: "[INST] {input} [/INST]".into(),
                suffix: String::new(),
                suffix_as_eos: false,
                sep: "\n".into(),
                stop_words: vec![],
            },
            "plain" => Template {
                system: String::new(),
                instruction: "{input}".into(),
                suffix: String::new(),
                suffix_as_eos: false,
                sep: String::new(),
                stop_words: vec![],
            },
            other => {
                let mut msg = format!(
                    "unknown chat template `{other}`; valid templates: {}",
                    TEMPLATES.join(", ")
                );
                if let Some(s) = did_you_mean(other, TEMPLATES) {
                    msg.push_str(&format!(" (did you mean `{s}`?)"));
                }
                bail!(msg)
            }
        };
        Ok(t)
    }

    /// Names accepted by `by_name`.
    pub fn names() -> &'static [&'static str] {
        TEMPLATES
    }

    /// The prompt part of a turn (never trained): the system block when `system` is non-empty,
    /// then the instruction around `input`. `round` is the 1-based turn number.
    pub fn render_input(&self, input: &str, system: Option<&str>, round: usize) -> String {
        let round = round.to_string();
        let instruction = fill(&self.instruction, &[("input", input), ("round", &round)]);
        match system {
            Some(s) if !s.is_empty() => fill(&self.system, &[("system", s)]) + &instruction,
            _ => instruction,
        }
    }

    /// The trained part of a turn: the answer followed by the suffix.
    pub fn render_output(&self, output: &str) -> String {
        format!("{output}{}", self.suffix)
    }
}

/// Python's `str.format` for named fields: `{name}` is replaced by its value (values are not
/// scanned again), `{{` / `}}` are literal braces, an unknown field stays as written.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(pos) = rest.find(['{', '}']) {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if let Some(end) = tail.find('}').filter(|_| tail.starts_with('{')) {
            let field = &tail[1..end];
            if let Some((_, value)) = values.iter().find(|(k, _)| *k == field) {
                out.push_str(value);
                rest = &tail[end + 1..];
                continue;
            }
        }
        out.push_str(&tail[..1]);
        rest = &tail[1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_replaces_fields_once_and_unescapes_braces() {
        assert_eq!(
            fill(
                "a{input}b{{x}}{round}",
                &[("input", "{round}"), ("round", "3")]
            ),
            "a{round}b{x}3"
        );
        assert_eq!(fill("{unknown} }", &[]), "{unknown} }");
    }

    #[test]
    fn internlm2_turn_layout() {
        let t = Template::by_name("internlm2_chat").unwrap();
        assert_eq!(
            t.render_input("hi", Some("sys"), 1),
            "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render_input("hi", Some(""), 1),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(t.render_output("ok"), "ok<|im_end|>");
    }

    #[test]
    fn plain_drops_system_and_passes_text() {
        let t = Template::by_name("plain").unwrap();
        assert_eq!(t.render_input("raw {input}", Some("sys"), 2), "raw {input}");
        assert_eq!(t.render_output("x"), "x");
        assert!(!t.suffix_as_eos);
    }

    #[test]
    fn every_listed_name_resolves() {
        for name in Template::names() {
            Template::by_name(name).unwrap();
        }
    }

    #[test]
    fn unknown_name_lists_valid_ones_and_suggests() {
        let e = Template::by_name("internlm2-chat").unwrap_err().to_string();
        assert!(e.contains("unknown chat template `internlm2-chat`"), "{e}");
        assert!(e.contains("llama3_chat, llama2_chat, plain"), "{e}");
        assert!(e.contains("did you mean `internlm2_chat`?"), "{e}");
    }
}
