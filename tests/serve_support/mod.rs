//! Shared by the serve tests: the tiny demo model with a random LoRA adapter, servers on
//! 127.0.0.1 port 0, and a minimal HTTP/1.1 client over std's TcpStream (so a test controls
//! exactly when a connection is read from or dropped).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use ftrun::config::LoraConfig;
use ftrun::data::template::Template;
use ftrun::infer::load::load_for_inference;
use ftrun::infer::{answer_once, ChatFormat, ChatOptions, ChatSession, GenConfig};
use ftrun::serve::{ModelInfo, ServeOptions, Server};
use serde_json::Value;

pub const TUNED_ID: &str = "tuned";
pub const BASE_ID: &str = "base";
/// The demo model's context length (DEMO_MAX_POSITIONS).
pub const CONTEXT: usize = 512;

/// The demo model and a random adapter for it, made once per test binary in
/// `$CARGO_TARGET_TMPDIR/<test binary>-fixture` (replaced on every run; a static is never
/// dropped, so a temporary directory would be left behind).
pub struct Fixture {
    pub model: PathBuf,
    pub adapter: PathBuf,
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let binary = exe.file_stem().unwrap().to_string_lossy();
        let binary = binary.split('-').next().unwrap();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{binary}-fixture"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        let model = dir.join("tiny-llama");
        let corpus: Vec<String> = [
            "Who are you? I am the assistant of ftrun.",
            "你好，请介绍一下你自己。我是ftrun的小助手。",
            "The quick brown fox jumps over the lazy dog.",
            "Fine-tuning adapts a pretrained model to your data.",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        ftrun::model::demo::make_demo_model(&model, &corpus, 0).unwrap();
        keep_to_readable_tokens(&model);
        let adapter = dir.join("adapter");
        write_random_adapter(&model, &adapter);
        Fixture { model, adapter }
    })
}

/// Zero the LM-head rows of every token that is not whole printable text on its own (byte
/// pieces of a multi-byte character, control bytes, special tokens). The untrained model's
/// greedy answers then are readable text of many tokens instead of stray bytes that decode
/// to U+FFFD, so streaming, stop strings and the page's text can be checked; the other
/// logits keep their random values, and a zero logit is below the largest of them.
fn keep_to_readable_tokens(model: &Path) {
    let tokenizer = ftrun::tokenizer::Tokenizer::from_path(model).unwrap();
    let file = model.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let head = &tensors["lm_head.weight"]; // [vocab, hidden]
    let (vocab, hidden) = head.dims2().unwrap();
    let mut rows: Vec<Vec<f32>> = head.to_vec2().unwrap();
    for (id, row) in rows.iter_mut().enumerate() {
        let text = tokenizer.decode(&[id as u32], false).unwrap();
        let readable = !tokenizer.is_special(id as u32)
            && !text.is_empty()
            && text.chars().all(|c| c != '\u{FFFD}' && !c.is_control());
        if !readable {
            row.iter_mut().for_each(|x| *x = 0.0);
        }
    }
    let flat: Vec<f32> = rows.into_iter().flatten().collect();
    let head = Tensor::from_vec(flat, (vocab, hidden), &Device::Cpu).unwrap();
    tensors.insert("lm_head.weight".into(), head);
    candle_core::safetensors::save(&tensors, &file).unwrap();
}

/// A LoRA adapter on every q_proj and v_proj with uniform random A and B (seeded), large
/// enough that greedy answers differ from the base model's.
fn write_random_adapter(model: &Path, out: &Path) {
    let (rank, hidden) = (4usize, ftrun::model::demo::DEMO_HIDDEN);
    let kv_out = ftrun::model::demo::DEMO_KV_HEADS * hidden / ftrun::model::demo::DEMO_HEADS;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut uniform = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                // xorshift64*: deterministic values in [-0.5, 0.5).
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let x = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
                x as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    };
    let mut tensors = Vec::new();
    for layer in 0..ftrun::model::demo::DEMO_LAYERS {
        for (module, out_features) in [("q_proj", hidden), ("v_proj", kv_out)] {
            let name = format!("model.layers.{layer}.self_attn.{module}");
            let a = Tensor::from_vec(uniform(rank * hidden), (rank, hidden), &Device::Cpu).unwrap();
            let b = Tensor::from_vec(
                uniform(out_features * rank),
                (out_features, rank),
                &Device::Cpu,
            )
            .unwrap();
            tensors.push((format!("{name}.lora_A.weight"), a));
            tensors.push((format!("{name}.lora_B.weight"), b));
        }
    }
    let lora = LoraConfig {
        r: rank,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
    };
    ftrun::export::write_peft_adapter(&lora, model, &tensors, out).unwrap();
}

pub fn internlm2_chat() -> ChatFormat {
    ChatFormat::from(&Template::by_name("internlm2_chat").unwrap())
}

/// Start a server on 127.0.0.1 port 0 with the adapter model (and the base with `compare`).
pub fn start_server(compare: bool, api_key: Option<&str>, max_batch: usize) -> Server {
    let f = fixture();
    let (tuned, tokenizer) = load_for_inference(&f.model, Some(&f.adapter), "cpu").unwrap();
    let mut models = vec![(
        ModelInfo {
            id: TUNED_ID.into(),
            label: "fine-tuned".into(),
        },
        tuned,
    )];
    if compare {
        let (base, _) = load_for_inference(&f.model, None, "cpu").unwrap();
        models.push((
            ModelInfo {
                id: BASE_ID.into(),
                label: "base".into(),
            },
            base,
        ));
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    Server::start(
        listener,
        models,
        tokenizer,
        ServeOptions {
            api_key: api_key.map(String::from),
            format: internlm2_chat(),
            max_context: CONTEXT,
            max_batch,
        },
    )
    .unwrap()
}

/// The answer `ftrun chat --prompt` gives (greedy), computed without the server.
pub fn chat_answer(adapter: bool, system: Option<&str>, prompt: &str, max_tokens: usize) -> String {
    let f = fixture();
    let adapter = adapter.then_some(f.adapter.as_path());
    let (model, tokenizer) = load_for_inference(&f.model, adapter, "cpu").unwrap();
    let options = ChatOptions {
        system: system.map(String::from),
        gen: GenConfig::greedy(max_tokens),
        ..ChatOptions::default()
    };
    let mut session =
        ChatSession::new(&model, &tokenizer, Some(internlm2_chat()), options).unwrap();
    let (mut out, mut log) = (Vec::new(), Vec::new());
    answer_once(&mut session, prompt, &mut out, &mut log)
        .unwrap()
        .text
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|event| event.strip_prefix("data: "))
            .map(String::from)
            .collect()
    }
}

/// Send one request (`Connection: close`) and read the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> HttpResponse {
    let stream = send_request(addr, method, path, headers, body);
    parse_response(&read_response(stream))
}

/// The raw bytes of one response: up to its Content-Length, its last chunk, or the end of
/// the connection (some servers, such as chromedriver, keep it open after answering).
fn read_response(stream: TcpStream) -> Vec<u8> {
    let mut reader = BufReader::new(stream);
    let mut raw = Vec::new();
    let mut content_length = None;
    let mut chunked = false;
    loop {
        let start = raw.len();
        if reader.read_until(b'\n', &mut raw).unwrap() == 0 {
            return raw;
        }
        let line = String::from_utf8_lossy(&raw[start..]).to_ascii_lowercase();
        if let Some(v) = line.strip_prefix("content-length:") {
            content_length = Some(v.trim().parse::<usize>().unwrap());
        }
        chunked |= line.starts_with("transfer-encoding:") && line.contains("chunked");
        if line == "\r\n" {
            break;
        }
    }
    if let Some(n) = content_length {
        let start = raw.len();
        raw.resize(start + n, 0);
        reader.read_exact(&mut raw[start..]).unwrap();
    } else if chunked {
        while !raw.ends_with(b"\r\n0\r\n\r\n") {
            if reader.read_until(b'\n', &mut raw).unwrap() == 0 {
                break;
            }
        }
    } else {
        reader.read_to_end(&mut raw).unwrap();
    }
    raw
}

/// POST a JSON body to /v1/chat/completions.
pub fn chat(addr: SocketAddr, body: &Value) -> HttpResponse {
    request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        Some(body.to_string().as_bytes()),
    )
}

/// Write a request and return the open connection.
pub fn send_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    if let Some(body) = body {
        head += &format!("Content-Length: {}\r\n", body.len());
    }
    head += "\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    if let Some(body) = body {
        stream.write_all(body).unwrap();
    }
    stream
}

/// Read from `stream` until `needle` has arrived (the response so far is returned).
pub fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    let mut reader = BufReader::new(stream);
    let mut seen = String::new();
    while !seen.contains(needle) {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("connection closed before {needle:?}; got {seen:?}");
        }
        seen += &line;
    }
    seen
}

fn parse_response(raw: &[u8]) -> HttpResponse {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// Decode a chunked transfer-encoded body.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = std::str::from_utf8(&data[..line_end]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Poll `check` until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

/// The text of a non-streamed completion.
pub fn content(response: &HttpResponse) -> String {
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The concatenated delta contents of a streamed completion.
pub fn streamed_content(response: &HttpResponse) -> String {
    assert_eq!(response.status, 200, "{}", response.text());
    response
        .sse_data()
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}
