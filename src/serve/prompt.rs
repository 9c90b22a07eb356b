//! OpenAI messages -> prompt tokens, laid out with the XTuner template the model was tuned
//! with, exactly as `ftrun chat` lays out a conversation: BOS, the system block on the first
//! turn, INSTRUCTION per user turn, each earlier answer followed by its stop (the suffix, or
//! EOS without one) and SEP.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use super::api::{ApiError, Content, Message};
use crate::infer::{ChatFormat, TextCodec};

/// One user turn and, for earlier turns, the answer it got.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub user: String,
    pub answer: Option<String>,
}

/// A conversation as the template needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// Every system (or `developer`) message, joined by newlines; the template puts it in the
    /// first turn, as XTuner does.
    pub system: Option<String>,
    /// The last turn has no answer: it is the one to answer.
    pub turns: Vec<Turn>,
}

impl Conversation {
    /// Group OpenAI messages into turns; every message that cannot be placed is an error
    /// naming it (`messages[2].role`).
    pub fn from_messages(messages: &[Message]) -> Result<Conversation, ApiError> {
        if messages.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "messages is empty: send at least one user message",
            ));
        }
        let mut system: Vec<String> = Vec::new();
        let mut turns: Vec<Turn> = Vec::new();
        for (i, message) in messages.iter().enumerate() {
            let text = message_text(message, i)?;
            match message.role.as_str() {
                "system" | "developer" => system.push(text),
                "user" => match turns.last_mut() {
                    // Consecutive user messages form one turn.
                    Some(turn) if turn.answer.is_none() => {
                        turn.user.push('\n');
                        turn.user.push_str(&text);
                    }
                    _ => turns.push(Turn {
                        user: text,
                        answer: None,
                    }),
                },
                "assistant" => match turns.last_mut() {
                    Some(turn) => match &mut turn.answer {
                        Some(answer) => {
                            answer.push('\n');
                            answer.push_str(&text);
                        }
                        None => turn.answer = Some(text),
                    },
                    None => {
                        return Err(ApiError::invalid(
                            Some(&format!("messages[{i}].role")),
                            format!(
                                "messages[{i}] is an assistant message before any user message; \
                                 the chat template has no place for it"
                            ),
                        ))
                    }
                },
                other => {
                    return Err(ApiError::invalid(
                        Some(&format!("messages[{i}].role")),
                        format!(
                            "messages[{i}].role = {other:?}: must be system, developer, user or \
                             assistant"
                        ),
                    ))
                }
            }
        }
        match turns.last() {
            None => Err(ApiError::invalid(
                Some("messages"),
                "messages has no user message: there is nothing to answer",
            )),
            Some(turn) if turn.answer.is_some() => Err(ApiError::invalid(
                Some("messages"),
                "the last message is an assistant message: the conversation must end with a \
                 user message",
            )),
            Some(_) => Ok(Conversation {
                system: (!system.is_empty()).then(|| system.join("\n")),
                turns,
            }),
        }
    }

    /// The prompt tokens: what `ftrun chat` would have fed after these turns. Each part is
    /// encoded without special tokens, as XTuner encodes training data.
    pub fn encode(&self, format: &ChatFormat, codec: &dyn TextCodec) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = codec.bos_id().into_iter().collect();
        for (round, turn) in self.turns.iter().enumerate() {
            let system = if round == 0 {
                self.system.as_deref()
            } else {
                None
            };
            let prompt = format.turn_prompt(&turn.user, system, round);
            if round == 0 {
                ids.extend(codec.encode(&prompt, false)?);
            } else {
                ids.extend(codec.encode(&format!("{}{prompt}", format.sep), false)?);
            }
            if let Some(answer) = &turn.answer {
                ids.extend(codec.encode(answer, false)?);
                // The token that ended the answer when the model wrote it.
                if format.suffix.is_empty() {
                    ids.extend(codec.eos_id());
                } else {
                    ids.extend(codec.encode(&format.suffix, false)?);
                }
            }
        }
        Ok(ids)
    }
}

/// A message's text: a string, or its text parts joined.
fn message_text(message: &Message, index: usize) -> Result<String, ApiError> {
    match &message.content {
        Some(Content::Text(text)) => Ok(text.clone()),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part.kind.as_str(), &part.text) {
                    ("text", Some(t)) => text.push_str(t),
                    ("text", None) => {
                        return Err(ApiError::invalid(
                            Some(&format!("messages[{index}].content[{j}].text")),
                            format!("messages[{index}].content[{j}] is a text part without text"),
                        ))
                    }
                    (other, _) => {
                        return Err(ApiError::invalid(
                            Some(&format!("messages[{index}].content[{j}].type")),
                            format!(
                                "messages[{index}].content[{j}].type = {other:?}: only text \
                                 parts are supported"
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        // OpenAI sends null content on assistant messages that only called tools.
        None if message.role == "assistant" => Ok(String::new()),
        None => Err(ApiError::invalid(
            Some(&format!("messages[{index}].content")),
            format!("messages[{index}] has no content"),
        )),
    }
}

/// The model's own chat template (`chat_template` of tokenizer_config.json: a string, or
/// the `default` entry of a list of named templates); None when it has none.
pub fn model_chat_template(model_dir: &Path) -> Result<Option<String>> {
    let path = model_dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    Ok(match &config["chat_template"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(String::from),
        _ => None,
    })
}

/// The XTuner template whose markers a Hugging Face chat template uses, so that a model is
/// served with the layout it was trained with: chatml (`<|im_start|>`: qwen_chat when the
/// tokenizer has Qwen's `<|endoftext|>`, else internlm2_chat), llama3_chat, llama2_chat.
pub fn detect_template(chat_template: &str, codec: &dyn TextCodec) -> Option<&'static str> {
    if chat_template.contains("<|im_start|>") {
        Some(if codec.token_to_id("<|endoftext|>").is_some() {
            "qwen_chat"
        } else {
            "internlm2_chat"
        })
    } else if chat_template.contains("<|start_header_id|>") {
        Some("llama3_chat")
    } else if chat_template.contains("[INST]") {
        Some("llama2_chat")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::api::ChatRequest;

    fn conversation(body: &str) -> Result<Conversation, ApiError> {
        Conversation::from_messages(&ChatRequest::parse(body.as_bytes()).unwrap().messages)
    }

    #[test]
    fn messages_group_into_turns_with_the_system_text_first() {
        let c = conversation(
            r#"{"messages": [
                {"role": "system", "content": "S1"},
                {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"},
                {"role": "developer", "content": "S2"},
                {"role": "user", "content": "q2"},
                {"role": "user", "content": [{"type": "text", "text": "more"}]}
            ]}"#,
        )
        .unwrap();
        assert_eq!(c.system.as_deref(), Some("S1\nS2"));
        assert_eq!(
            c.turns,
            vec![
                Turn {
                    user: "q1".into(),
                    answer: Some("a1".into())
                },
                Turn {
                    user: "q2\nmore".into(),
                    answer: None
                },
            ]
        );
    }

    #[test]
    fn conversations_that_cannot_be_laid_out_are_refused_by_position() {
        let param = |body: &str| conversation(body).unwrap_err().param.unwrap();
        assert_eq!(param(r#"{"messages": []}"#), "messages");
        assert_eq!(
            param(r#"{"messages": [{"role": "system", "content": "s"}]}"#),
            "messages"
        );
        assert_eq!(
            param(
                r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}"#
            ),
            "messages"
        );
        assert_eq!(
            param(
                r#"{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}"#
            ),
            "messages[0].role"
        );
        assert_eq!(
            param(
                r#"{"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"}]}"#
            ),
            "messages[1].role"
        );
        assert_eq!(
            param(r#"{"messages": [{"role": "user", "content": null}]}"#),
            "messages[0].content"
        );
        assert_eq!(
            param(
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}"#
            ),
            "messages[0].content[0].type"
        );
    }

    /// Characters as token ids, with `<s>`, `</s>` and `<|im_end|>` as special ids.
    struct CharCodec;
    impl TextCodec for CharCodec {
        fn encode(&self, text: &str, _: bool) -> Result<Vec<u32>> {
            let mut ids = Vec::new();
            let mut rest = text;
            while let Some(c) = rest.chars().next() {
                if let Some(r) = rest.strip_prefix("<|im_end|>") {
                    ids.push(3);
                    rest = r;
                } else {
                    ids.push(c as u32 + 10);
                    rest = &rest[c.len_utf8()..];
                }
            }
            Ok(ids)
        }
        fn decode(&self, ids: &[u32], _: bool) -> Result<String> {
            Ok(ids
                .iter()
                .map(|&id| match id {
                    1 => "<s>".to_string(),
                    2 => "</s>".to_string(),
                    3 => "<|im_end|>".to_string(),
                    c => char::from_u32(c - 10).unwrap().to_string(),
                })
                .collect())
        }
        fn token_to_id(&self, token: &str) -> Option<u32> {
            ["<s>", "</s>", "<|im_end|>"]
                .iter()
                .position(|t| *t == token)
                .map(|i| i as u32 + 1)
        }
        fn bos_id(&self) -> Option<u32> {
            Some(1)
        }
        fn eos_id(&self) -> Option<u32> {
            Some(2)
        }
    }

    #[test]
    fn a_multi_turn_prompt_is_laid_out_as_xtuner_chat_history() {
        let format =
            ChatFormat::from(&crate::data::template::Template::by_name("internlm2_chat").unwrap());
        let c = conversation(
            r#"{"messages": [{"role": "system", "content": "SYS"},
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": "q2"}]}"#,
        )
        .unwrap();
        let ids = c.encode(&format, &CharCodec).unwrap();
        assert_eq!(ids[0], 1, "BOS opens the prompt");
        assert_eq!(
            CharCodec.decode(&ids, false).unwrap(),
            "<s><|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
             <|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        // Without a suffix (llama2_chat) an earlier answer ends with EOS, then SEP.
        let llama2 =
            ChatFormat::from(&crate::data::template::Template::by_name("llama2_chat").unwrap());
        let ids = c.encode(&llama2, &CharCodec).unwrap();
        let text = CharCodec.decode(&ids, false).unwrap();
        assert!(
            text.contains("[INST] hi [/INST]A1</s>\n[INST] q2 [/INST]"),
            "{text}"
        );
    }

    #[test]
    fn chat_templates_map_to_the_xtuner_template_with_their_markers() {
        assert_eq!(
            detect_template(
                "{{ bos_token }}{{'<|im_start|>' + message['role']}}",
                &CharCodec
            ),
            Some("internlm2_chat")
        );
        assert_eq!(
            detect_template("<|start_header_id|>{{ role }}<|end_header_id|>", &CharCodec),
            Some("llama3_chat")
        );
        assert_eq!(
            detect_template("[INST] {{ m }} [/INST]", &CharCodec),
            Some("llama2_chat")
        );
        assert_eq!(detect_template("{{ messages }}", &CharCodec), None);
    }
}
