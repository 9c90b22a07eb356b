//! `ftrun serve`'s API against the tiny demo model on CPU: completions equal `ftrun chat`'s
//! answers, streaming chunks, stop words, seeds, the compare models, every error case, the
//! API key, the page's assets, and the command line.

mod serve_support;

use std::process::Command;
use std::sync::OnceLock;

use ftrun::serve::Server;
use serde_json::{json, Value};
use serve_support::*;

/// One compare-mode server for the tests of this file (no key).
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start_server(true, None, 32))
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

#[test]
fn a_greedy_completion_is_ftrun_chats_answer_with_openai_fields() {
    let addr = server().addr();
    let (system, prompt, max_tokens) = ("You are a helpful assistant.", "Who are you?", 24);
    let response = chat(
        addr,
        &json!({
            "model": TUNED_ID,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }),
    );
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("content-type"), Some("application/json"));
    let body = response.json();
    let expected = chat_answer(true, Some(system), prompt, max_tokens);
    assert_eq!(content(&response), expected);
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], TUNED_ID);
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    let usage = &body["usage"];
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert!(completion_tokens >= 1 && completion_tokens <= max_tokens as u64);
    // "length" exactly when the whole budget was used.
    let expected_reason = if completion_tokens == max_tokens as u64 {
        "length"
    } else {
        "stop"
    };
    assert_eq!(choice["finish_reason"], expected_reason);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion_tokens
    );
    // BOS + the templated system and user turn, as the chat template lays them out.
    let tokenizer = ftrun::tokenizer::Tokenizer::from_path(&fixture().model).unwrap();
    let text = internlm2_chat().turn_prompt(prompt, Some(system), 0);
    let prompt_ids = tokenizer.encode(&text, false).unwrap();
    assert_eq!(
        usage["prompt_tokens"].as_u64().unwrap() as usize,
        prompt_ids.len() + 1
    );
}

#[test]
fn streaming_sends_openai_chunks_that_add_up_to_the_answer() {
    let addr = server().addr();
    let request = json!({"messages": user("Tell me about fine-tuning."), "temperature": 0,
                         "max_tokens": 32});
    let whole = content(&chat(addr, &request));

    let mut streamed_request = request.clone();
    streamed_request["stream"] = json!(true);
    streamed_request["stream_options"] = json!({"include_usage": true});
    let response = chat(addr, &streamed_request);
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let data = response.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id, "every chunk of a completion has its id");
        assert_eq!(
            chunk["model"], TUNED_ID,
            "no model named: the first one answers"
        );
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let contents: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|s| !s.is_empty())
        .collect();
    assert!(
        contents.len() > 1,
        "the answer arrives in several chunks: {contents:?}"
    );
    assert_eq!(contents.concat(), whole);
    // The finish reason, then the usage chunk (no choices) last.
    let (usage, before) = chunks.split_last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["completion_tokens"].as_u64().unwrap() >= 1);
    let finish = before.last().unwrap();
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert!(["stop", "length"].contains(&finish["choices"][0]["finish_reason"].as_str().unwrap()));
    assert!(before[..before.len() - 1]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
}

#[test]
fn a_stop_word_ends_the_answer_before_it_streamed_or_not() {
    let addr = server().addr();
    let request = json!({"messages": user("Who are you?"), "temperature": 0, "max_tokens": 40});
    let whole = content(&chat(addr, &request));
    // A stop string from the middle of the answer: two characters (not a replacement char).
    let chars: Vec<char> = whole.chars().collect();
    let start = (chars.len() / 2..chars.len() - 2)
        .find(|&i| !chars[i..i + 2].contains(&'\u{FFFD}'))
        .expect("the answer is long enough to cut");
    let stop: String = chars[start..start + 2].iter().collect();
    let expected = &whole[..whole.find(&stop).unwrap()];

    for stream in [false, true] {
        let mut with_stop = request.clone();
        with_stop["stop"] = json!(["never-generated-stop", stop]);
        with_stop["stream"] = json!(stream);
        let response = chat(addr, &with_stop);
        let text = if stream {
            streamed_content(&response)
        } else {
            content(&response)
        };
        assert_eq!(text, expected, "stream = {stream}, stop = {stop:?}");
        let reason = if stream {
            let data = response.sse_data();
            let finish: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
            finish["choices"][0]["finish_reason"].clone()
        } else {
            response.json()["choices"][0]["finish_reason"].clone()
        };
        assert_eq!(reason, "stop");
    }
}

#[test]
fn a_seed_reproduces_a_sampled_answer() {
    let addr = server().addr();
    let request = |seed: u64| {
        json!({"messages": user("Who are you?"), "temperature": 1.0, "top_p": 0.95,
               "max_tokens": 24, "seed": seed})
    };
    let a = content(&chat(addr, &request(7)));
    assert_eq!(a, content(&chat(addr, &request(7))));
    let others: Vec<String> = (8..12).map(|s| content(&chat(addr, &request(s)))).collect();
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds never changed the sampled answer: {a:?}"
    );
}

#[test]
fn the_compare_models_answer_as_the_adapter_and_the_base_do() {
    let addr = server().addr();
    let models = request(addr, "GET", "/v1/models", &[], None);
    assert_eq!(models.status, 200);
    let body = models.json();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![TUNED_ID, BASE_ID]);
    assert_eq!(
        request(addr, "GET", &format!("/v1/models/{BASE_ID}"), &[], None).json()["object"],
        "model"
    );

    let prompt = "Who are you?";
    let ask = |model: &str| {
        content(&chat(
            addr,
            &json!({"model": model, "messages": user(prompt), "temperature": 0, "max_tokens": 20}),
        ))
    };
    let (tuned, base) = (ask(TUNED_ID), ask(BASE_ID));
    assert_eq!(tuned, chat_answer(true, None, prompt, 20));
    assert_eq!(base, chat_answer(false, None, prompt, 20));
    assert_ne!(tuned, base, "the adapter changes the answer");

    let config = request(addr, "GET", "/ui/config", &[], None).json();
    assert_eq!(config["compare"], true);
    assert_eq!(config["auth_required"], false);
    assert_eq!(config["models"][1]["id"], BASE_ID);
}

#[test]
fn a_multi_turn_conversation_is_answered() {
    let addr = server().addr();
    let messages = json!([
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am the assistant of ftrun."},
        {"role": "user", "content": [{"type": "text", "text": "你好"}]},
    ]);
    let response = chat(
        addr,
        &json!({"messages": messages, "temperature": 0, "max_tokens": 8}),
    );
    let body = response.json();
    assert_eq!(response.status, 200, "{body}");
    // Two templated turns: longer than the last user message alone.
    let single = chat(
        addr,
        &json!({"messages": user("你好"), "temperature": 0, "max_tokens": 8}),
    )
    .json();
    assert!(
        body["usage"]["prompt_tokens"].as_u64().unwrap()
            > single["usage"]["prompt_tokens"].as_u64().unwrap() + 10
    );
}

/// A request body and the status, `param` and message fragment of the error it must get.
struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    body: String,
    status: u16,
    param: Option<&'static str>,
    code: Option<&'static str>,
    message: &'static str,
}

#[test]
fn bad_requests_get_openai_error_bodies_and_the_server_keeps_serving() {
    let addr = server().addr();
    let long_prompt = "fine-tuning ".repeat(600);
    let case = |name, body: String, status, param, code, message| Case {
        name,
        method: "POST",
        path: "/v1/chat/completions",
        body,
        status,
        param,
        code,
        message,
    };
    let ok_messages = r#"[{"role": "user", "content": "hi"}]"#;
    let cases = vec![
        case(
            "malformed JSON",
            r#"{"messages": [}"#.into(),
            400,
            None,
            None,
            "not valid JSON",
        ),
        case(
            "not an object",
            "[1]".into(),
            400,
            None,
            None,
            "must be a JSON object",
        ),
        case(
            "wrong type",
            format!(r#"{{"messages": {ok_messages}, "temperature": "hot"}}"#),
            400,
            Some("temperature"),
            None,
            "invalid type",
        ),
        case(
            "wrong type deep inside",
            r#"{"messages": [{"role": "user", "content": 5}]}"#.into(),
            400,
            Some("messages[0].content"),
            None,
            "messages[0].content",
        ),
        case(
            "unknown field",
            format!(r#"{{"messages": {ok_messages}, "temprature": 0.5}}"#),
            400,
            None,
            None,
            "temprature",
        ),
        case("missing messages", "{}".into(), 400, None, None, "messages"),
        case(
            "empty messages",
            r#"{"messages": []}"#.into(),
            400,
            Some("messages"),
            None,
            "messages is empty",
        ),
        case(
            "only a system message",
            r#"{"messages": [{"role": "system", "content": "s"}]}"#.into(),
            400,
            Some("messages"),
            None,
            "no user message",
        ),
        case(
            "unknown role",
            r#"{"messages": [{"role": "robot", "content": "s"}]}"#.into(),
            400,
            Some("messages[0].role"),
            None,
            "robot",
        ),
        case(
            "prompt longer than the context",
            json!({"messages": user(&long_prompt)}).to_string(),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
            "maximum context length is 512",
        ),
        case(
            "prompt plus max_tokens longer than the context",
            json!({"messages": user("hi"), "max_tokens": 600}).to_string(),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
            "600 in the completion",
        ),
        case(
            "temperature out of range",
            format!(r#"{{"messages": {ok_messages}, "temperature": 3}}"#),
            400,
            Some("temperature"),
            None,
            "between 0 and 2",
        ),
        case(
            "max_tokens 0",
            format!(r#"{{"messages": {ok_messages}, "max_tokens": 0}}"#),
            400,
            Some("max_tokens"),
            None,
            "at least 1",
        ),
        case(
            "negative max_tokens",
            format!(r#"{{"messages": {ok_messages}, "max_tokens": -1}}"#),
            400,
            Some("max_tokens"),
            None,
            "invalid value",
        ),
        case(
            "n > 1",
            format!(r#"{{"messages": {ok_messages}, "n": 3}}"#),
            400,
            Some("n"),
            None,
            "one choice",
        ),
        case(
            "unknown model",
            format!(r#"{{"model": "gpt-4", "messages": {ok_messages}}}"#),
            404,
            None,
            Some("model_not_found"),
            "gpt-4",
        ),
        Case {
            name: "wrong method",
            method: "GET",
            path: "/v1/chat/completions",
            body: String::new(),
            status: 405,
            param: None,
            code: None,
            message: "GET is not allowed",
        },
        Case {
            name: "unknown route",
            method: "POST",
            path: "/v1/completions",
            body: "{}".into(),
            status: 404,
            param: None,
            code: None,
            message: "no route",
        },
        Case {
            name: "unknown model id",
            method: "GET",
            path: "/v1/models/nope",
            body: String::new(),
            status: 404,
            param: None,
            code: Some("model_not_found"),
            message: "nope",
        },
    ];
    for c in &cases {
        let body = (!c.body.is_empty()).then_some(c.body.as_bytes());
        let response = request(addr, c.method, c.path, &[], body);
        assert_eq!(response.status, c.status, "{}: {}", c.name, response.text());
        assert_eq!(
            response.header("content-type"),
            Some("application/json"),
            "{}",
            c.name
        );
        let error = &response.json()["error"];
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(c.message), "{}: {message}", c.name);
        assert!(error["type"].is_string(), "{}", c.name);
        if let Some(param) = c.param {
            assert_eq!(error["param"], param, "{}: {message}", c.name);
        }
        if let Some(code) = c.code {
            assert_eq!(error["code"], code, "{}", c.name);
        }
    }
    // Still serving.
    let ok = chat(addr, &json!({"messages": user("hi"), "max_tokens": 4}));
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[test]
fn with_an_api_key_every_api_request_needs_it() {
    let key = "sk-test-123";
    let server = start_server(false, Some(key), 4);
    let addr = server.addr();
    let body = json!({"messages": user("hi"), "max_tokens": 4}).to_string();
    let bearer = format!("Bearer {key}");
    for (path, method, body) in [
        ("/v1/models", "GET", None),
        ("/v1/chat/completions", "POST", Some(body.as_bytes())),
    ] {
        let none = request(addr, method, path, &[], body);
        assert_eq!(none.status, 401, "{path}");
        assert_eq!(none.json()["error"]["code"], "invalid_api_key");
        assert!(none.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer"));
        let wrong = request(
            addr,
            method,
            path,
            &[("Authorization", "Bearer sk-wrong")],
            body,
        );
        assert_eq!(wrong.status, 401, "{path}");
        let right = request(addr, method, path, &[("Authorization", &bearer)], body);
        assert_eq!(right.status, 200, "{path}: {}", right.text());
    }
    // The page loads without the key and knows it must ask for one.
    assert_eq!(request(addr, "GET", "/", &[], None).status, 200);
    let config = request(addr, "GET", "/ui/config", &[], None).json();
    assert_eq!(config["auth_required"], true);
    assert_eq!(config["compare"], false);
    server.shutdown().unwrap();
}

#[test]
fn the_page_and_its_assets_are_embedded() {
    let addr = server().addr();
    for (path, kind, marker) in [
        ("/", "text/html", "<script src=\"/app.js\">"),
        ("/app.js", "text/javascript", "/v1/chat/completions"),
        ("/style.css", "text/css", ".column"),
    ] {
        let response = request(addr, "GET", path, &[], None);
        assert_eq!(response.status, 200, "{path}");
        assert!(
            response.header("content-type").unwrap().starts_with(kind),
            "{path}"
        );
        assert!(response.text().contains(marker), "{path}");
        // No CDN: nothing is loaded from another host.
        assert!(!response.text().contains("https://"), "{path}");
    }
}

#[test]
fn bits_4_serves_an_nf4_model_and_other_bits_or_compare_base_without_an_adapter_are_refused() {
    let model = fixture().model.to_str().unwrap();
    let ftrun = env!("CARGO_BIN_EXE_ftrun");
    let out = Command::new(ftrun)
        .args(["serve", model, "--bits", "8", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--bits 8") && stderr.contains("only 4"),
        "{stderr}"
    );

    // --bits 4: the model is quantized while loading and the server comes up; ask it once.
    let mut child = Command::new(ftrun)
        .args([
            "serve", model, "--bits", "4", "--port", "0", "--device", "cpu",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .map(String::from);
    let answer = url.map(|u| {
        let addr = u.trim_start_matches("http://").to_string();
        let body = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4,"temperature":0}"#;
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        std::io::Write::write_all(&mut stream, req.as_bytes()).unwrap();
        let mut resp = String::new();
        std::io::Read::read_to_string(&mut stream, &mut resp).unwrap();
        resp
    });
    child.kill().ok();
    child.wait().ok();
    let answer = answer.unwrap_or_else(|| panic!("no listening line: {line}"));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("chat.completion"), "{answer}");

    let out = Command::new(ftrun)
        .args(["serve", model, "--compare-base", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--adapter"), "{stderr}");
}
