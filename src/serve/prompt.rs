//! OpenAI messages -> prompt tokens, laid out with the XTuner template the model was tuned
//! with, exactly as `ftrun chat` lays out a conversation: BOS, the system block on the first
//! turn, INSTRUCTION per user turn, each earlier answer followed by its stop (the suffix, or
//! EOS without one) and SEP. An image (one per request, in a user message) becomes `<image>\n`
//! before its turn's text, tokenized around as LLaVA training data is.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use super::api::{ApiError, Content, Message};
use crate::data::IMAGE_TOKEN;
use crate::infer::llava::encode_around_image;
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
    /// The request's image, if it sent one.
    pub image: Option<ImagePart>,
}

/// An `image_url` content part.
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePart {
    pub url: String,
    /// Where it is in the request (`messages[0].content[1]`).
    pub param: String,
    /// The turn whose user text it belongs to.
    pub turn: usize,
}

/// A message's text and its image parts (`param`, url).
struct MessageContent {
    text: String,
    images: Vec<(String, String)>,
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
        let mut image: Option<ImagePart> = None;
        for (i, message) in messages.iter().enumerate() {
            let MessageContent { text, images } = message_content(message, i)?;
            for (param, url) in images {
                if message.role != "user" {
                    return Err(ApiError::invalid(
                        Some(&param),
                        format!(
                            "{param} is an image in a {} message; images go in user messages",
                            message.role
                        ),
                    ));
                }
                if let Some(first) = &image {
                    return Err(ApiError::invalid(
                        Some(&param),
                        format!(
                            "{param} is a second image (the first is {}): the model takes one \
                             image per request",
                            first.param
                        ),
                    ));
                }
                // The turn this user message opens or continues.
                let turn = match turns.last() {
                    Some(t) if t.answer.is_none() => turns.len() - 1,
                    _ => turns.len(),
                };
                image = Some(ImagePart { url, param, turn });
            }
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
            Some(_) => {
                if image.is_some() {
                    // The marker placed for the image must be the only one in the prompt.
                    for (i, m) in messages.iter().enumerate() {
                        if message_content(m, i)?.text.contains(IMAGE_TOKEN) {
                            return Err(ApiError::invalid(
                                Some(&format!("messages[{i}].content")),
                                format!(
                                    "messages[{i}] holds the text {IMAGE_TOKEN:?}, which marks \
                                     where the image goes; send images as image_url parts only"
                                ),
                            ));
                        }
                    }
                }
                Ok(Conversation {
                    system: (!system.is_empty()).then(|| system.join("\n")),
                    turns,
                    image,
                })
            }
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
            let with_image = self.image.as_ref().is_some_and(|im| im.turn == round);
            let user = match with_image {
                true => format!("{IMAGE_TOKEN}\n{}", turn.user),
                false => turn.user.clone(),
            };
            let prompt = format.turn_prompt(&user, system, round);
            let text = match round {
                0 => prompt,
                _ => format!("{}{prompt}", format.sep),
            };
            match with_image {
                true => ids.extend(encode_around_image(codec, &text, false)?),
                false => ids.extend(codec.encode(&text, false)?),
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

/// A message's text (a string, or its text parts joined) and its `image_url` parts.
fn message_content(message: &Message, index: usize) -> Result<MessageContent, ApiError> {
    let text_only = |text: &str| MessageContent {
        text: text.to_string(),
        images: Vec::new(),
    };
    match &message.content {
        Some(Content::Text(text)) => Ok(text_only(text)),
        Some(Content::Parts(parts)) => {
            let mut content = text_only("");
            for (j, part) in parts.iter().enumerate() {
                let at = format!("messages[{index}].content[{j}]");
                match (part.kind.as_str(), &part.text) {
                    ("text", Some(t)) => content.text.push_str(t),
                    ("text", None) => {
                        return Err(ApiError::invalid(
                            Some(&format!("{at}.text")),
                            format!("{at} is a text part without text"),
                        ))
                    }
                    ("image_url", _) => {
                        let url = part
                            .image_url
                            .as_ref()
                            .and_then(|v| v.get("url"))
                            .and_then(|u| u.as_str())
                            .ok_or_else(|| {
                                ApiError::invalid(
                                    Some(&format!("{at}.image_url")),
                                    format!(
                                        "{at} is an image_url part without \
                                         {{\"image_url\": {{\"url\": \"data:image/png;base64,...\"}}}}"
                                    ),
                                )
                            })?;
                        content.images.push((at, url.to_string()));
                    }
                    (other, _) => {
                        return Err(ApiError::invalid(
                            Some(&format!("{at}.type")),
                            format!(
                                "{at}.type = {other:?}: only text and image_url parts are \
                                 supported"
                            ),
                        ))
                    }
                }
            }
            Ok(content)
        }
        // OpenAI sends null content on assistant messages that only called tools.
        None if message.role == "assistant" => Ok(text_only("")),
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
            param(r#"{"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}"#),
            "messages[0].content[0].type"
        );
        assert_eq!(
            param(r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#),
            "messages[0].content[0].image_url"
        );
        let image = r#"{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}"#;
        let two = format!(
            r#"{{"messages": [{{"role": "user", "content": [{image}]}},
                {{"role": "assistant", "content": "a"}},
                {{"role": "user", "content": [{{"type": "text", "text": "q"}}, {image}]}}]}}"#
        );
        let e = conversation(&two).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[2].content[1]"));
        assert!(
            e.message.contains("messages[0].content[0]"),
            "{}",
            e.message
        );
        let in_assistant = format!(
            r#"{{"messages": [{{"role": "user", "content": "q"}},
                {{"role": "assistant", "content": [{image}]}}, {{"role": "user", "content": "q"}}]}}"#
        );
        assert_eq!(param(&in_assistant), "messages[1].content[0]");
        let marker = format!(
            r#"{{"messages": [{{"role": "system", "content": "<image>"}},
                {{"role": "user", "content": [{image}]}}]}}"#
        );
        assert_eq!(param(&marker), "messages[0].content");
    }

    #[test]
    fn the_image_turn_gets_the_marker_and_the_placeholder() {
        let format =
            ChatFormat::from(&crate::data::template::Template::by_name("internlm2_chat").unwrap());
        let c = conversation(
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
                {"role": "user", "content": [{"type": "text", "text": "what?"},
                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]}"#,
        )
        .unwrap();
        let image = c.image.as_ref().unwrap();
        assert_eq!(
            (image.turn, image.param.as_str()),
            (1, "messages[2].content[1]")
        );
        let ids = c.encode(&format, &CharCodec).unwrap();
        let p = ids
            .iter()
            .position(|&t| t == crate::data::IMAGE_TOKEN_ID)
            .unwrap();
        assert_eq!(
            ids.iter()
                .filter(|&&t| t == crate::data::IMAGE_TOKEN_ID)
                .count(),
            1
        );
        assert_eq!(
            CharCodec.decode(&ids[..p], false).unwrap(),
            "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n\
             <|im_start|>user\n"
        );
        assert_eq!(
            CharCodec.decode(&ids[p + 1..], false).unwrap(),
            "\nwhat?<|im_end|>\n<|im_start|>assistant\n"
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
