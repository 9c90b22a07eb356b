//! The OpenAI chat-completions wire format: the request as clients send it (parsed strictly,
//! every mistake named), the response and stream chunk objects, and OpenAI-style errors.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// An error as the OpenAI API returns it: an HTTP status and
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `not_found_error`, `server_error`.
    pub kind: &'static str,
    /// The request field at fault (e.g. `messages[0].content`).
    pub param: Option<String>,
    /// A machine-readable code (e.g. `context_length_exceeded`, `invalid_api_key`).
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 invalid request, naming the field at fault.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(String::from),
            code: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 401,
            message: message.into(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }

    pub fn not_found(message: impl Into<String>, code: Option<&'static str>) -> ApiError {
        ApiError {
            status: 404,
            message: message.into(),
            kind: "not_found_error",
            param: None,
            code,
        }
    }

    /// Any other 4xx status (405 wrong method, 413 body too large, ...).
    pub fn status(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub fn server(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 500,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// One message's content: a string, or OpenAI's list of content parts (only text parts).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
    /// Present on `image_url` parts, which are rejected with a clear error.
    #[serde(default)]
    pub image_url: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
    /// OpenAI allows a participant name; it does not change the prompt here.
    #[serde(default)]
    pub name: Option<String>,
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The body of `POST /v1/chat/completions`, with OpenAI's field names. Fields this server
/// cannot honour are still parsed, so that a value it cannot follow is refused by name
/// instead of being silently ignored.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// The newer name of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub tools: Option<Value>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
}

impl ChatRequest {
    /// Parse a request body; malformed JSON, a field of the wrong type or an unknown field is
    /// an invalid-request error naming the field (`messages[1].role`) and what was wrong.
    pub fn parse(body: &[u8]) -> Result<ChatRequest, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::invalid(None, format!("the request body is not valid JSON: {e}"))
        })?;
        if !value.is_object() {
            return Err(ApiError::invalid(
                None,
                format!(
                    "the request body must be a JSON object, not {}",
                    json_kind(&value)
                ),
            ));
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let param = (path != ".").then_some(path);
            let message = match &param {
                Some(p) => format!("{p}: {}", e.inner()),
                None => e.inner().to_string(),
            };
            ApiError::invalid(param.as_deref(), message)
        })
    }

    /// The stop strings, whichever form they came in.
    pub fn stop_words(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    /// `max_completion_tokens`, else `max_tokens`.
    pub fn token_limit(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Refuse settings outside OpenAI's ranges and features this server does not have.
    pub fn check_settings(&self) -> Result<(), ApiError> {
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid(
                    Some("temperature"),
                    format!("temperature = {t}: must be between 0 and 2"),
                ));
            }
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(ApiError::invalid(
                    Some("top_p"),
                    format!("top_p = {p}: must be between 0 and 1"),
                ));
            }
        }
        let limit_name = if self.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        if self.token_limit() == Some(0) {
            return Err(ApiError::invalid(
                Some(limit_name),
                format!("{limit_name} = 0: must be at least 1"),
            ));
        }
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(
                Some("n"),
                format!("n = {n}: this server returns one choice per request (n = 1)"),
            ));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = value.filter(|&v| v != 0.0) {
                return Err(ApiError::invalid(
                    Some(name),
                    format!("{name} = {v}: not supported by this server (only 0)"),
                ));
            }
        }
        if self.logprobs == Some(true) {
            return Err(ApiError::invalid(
                Some("logprobs"),
                "logprobs = true: not supported by this server",
            ));
        }
        if let Some(format) = &self.response_format {
            if format.get("type").and_then(Value::as_str) != Some("text") {
                return Err(ApiError::invalid(
                    Some("response_format"),
                    format!("response_format = {format}: only {{\"type\": \"text\"}} is supported"),
                ));
            }
        }
        if self.tools.is_some() || self.tool_choice.is_some() {
            let name = if self.tools.is_some() {
                "tools"
            } else {
                "tool_choice"
            };
            return Err(ApiError::invalid(
                Some(name),
                format!("{name}: tool calling is not supported by this server"),
            ));
        }
        for (i, word) in self.stop_words().iter().enumerate() {
            if word.is_empty() {
                return Err(ApiError::invalid(
                    Some(&format!("stop[{i}]")),
                    "stop: an empty stop string would end every answer at once",
                ));
            }
        }
        Ok(())
    }
}

/// "a string", "an array", ... for error messages.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Token counts of a completion.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// What every response object of one completion shares.
#[derive(Debug, Clone)]
pub struct CompletionMeta {
    /// `chatcmpl-...`
    pub id: String,
    /// Unix seconds.
    pub created: i64,
    pub model: String,
}

impl CompletionMeta {
    /// The `chat.completion` object of a finished, non-streamed answer.
    pub fn completion(&self, content: &str, finish_reason: &str, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
            "usage": usage,
        })
    }

    /// A `chat.completion.chunk` with this delta (`{"role": ...}`, `{"content": ...}` or `{}`).
    pub fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
        })
    }

    /// The last chunk when the client asked for `stream_options.include_usage`.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_and_unknown_fields_name_the_field() {
        let e =
            ChatRequest::parse(br#"{"messages": [{"role": "user", "content": 5}]}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));

        let e = ChatRequest::parse(br#"{"messages": [], "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        assert!(e.message.contains("invalid type"), "{}", e.message);

        let e = ChatRequest::parse(br#"{"messages": [], "frobnicate": 1}"#).unwrap_err();
        assert!(e.message.contains("frobnicate"), "{}", e.message);

        let e = ChatRequest::parse(b"{\"messages\": [").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);

        let e = ChatRequest::parse(b"[1, 2]").unwrap_err();
        assert!(e.message.contains("an array"), "{}", e.message);
    }

    #[test]
    fn stop_accepts_a_string_or_a_list_and_parts_content_parses() {
        let r = ChatRequest::parse(
            br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                 "stop": "END"}"#,
        )
        .unwrap();
        assert_eq!(r.stop_words(), vec!["END".to_string()]);
        assert_eq!(
            r.messages[0].content,
            Some(Content::Parts(vec![ContentPart {
                kind: "text".into(),
                text: Some("hi".into()),
                image_url: None
            }]))
        );
        let r = ChatRequest::parse(br#"{"messages": [], "stop": ["a", "b"]}"#).unwrap();
        assert_eq!(r.stop_words(), vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn settings_outside_openai_ranges_are_refused_by_name() {
        let check = |body: &str| {
            ChatRequest::parse(body.as_bytes())
                .unwrap()
                .check_settings()
                .map_err(|e| e.param.unwrap_or_default())
        };
        assert_eq!(
            check(r#"{"messages": [], "temperature": 2.5}"#),
            Err("temperature".into())
        );
        assert_eq!(
            check(r#"{"messages": [], "top_p": 1.5}"#),
            Err("top_p".into())
        );
        assert_eq!(
            check(r#"{"messages": [], "max_tokens": 0}"#),
            Err("max_tokens".into())
        );
        assert_eq!(check(r#"{"messages": [], "n": 2}"#), Err("n".into()));
        assert_eq!(
            check(r#"{"messages": [], "presence_penalty": 0.5}"#),
            Err("presence_penalty".into())
        );
        assert_eq!(
            check(r#"{"messages": [], "stop": ["x", ""]}"#),
            Err("stop[1]".into())
        );
        assert_eq!(
            check(r#"{"messages": [], "tools": []}"#),
            Err("tools".into())
        );
        assert_eq!(
            check(
                r#"{"messages": [], "temperature": 0, "top_p": 1, "n": 1, "presence_penalty": 0}"#
            ),
            Ok(())
        );
    }
}
