//! The web page of `ftrun serve --compare-base` in a real headless chromium, driven through
//! chromedriver's WebDriver protocol: a message typed and sent streams an answer into both
//! columns (fine-tuned and base), each equal to what the API answers for the same
//! conversation; a second turn carries the history; Clear history empties both columns.
//!
//! The browser comes from scripts/browser-test-setup.sh: in CI (`CI=true`) it installs
//! chromium and chromium-driver when missing; elsewhere the test is skipped, with the reason
//! printed, when they are not installed. A screenshot of the page is written to
//! `$CARGO_TARGET_TMPDIR/serve-page.png`.

mod serve_support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_support::*;

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
const SYSTEM: &str = "You are a helpful assistant.";
const MAX_TOKENS: usize = 24;

/// Child processes killed when the test ends, however it ends.
struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `CHROMIUM` and `CHROMEDRIVER` paths from the setup script; None (skip) when they are
/// missing outside CI.
fn browser() -> Option<(String, String)> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/browser-test-setup.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script);
    if ci {
        cmd.arg("--install");
    }
    let out = cmd.stderr(Stdio::inherit()).output().expect("running bash");
    if out.status.code() == Some(3) && !ci {
        println!(
            "SKIPPED serve_browser: chromium / chromedriver are not installed and CI is not set \
             (install them with `bash scripts/browser-test-setup.sh --install`)"
        );
        return None;
    }
    assert!(out.status.success(), "{script} failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{script} printed no {key}: {text}"))
            .to_string()
    };
    Some((get("CHROMIUM="), get("CHROMEDRIVER=")))
}

/// A WebDriver session.
struct Driver {
    addr: SocketAddr,
    session: String,
}

impl Driver {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        webdriver(self.addr, method, &path, body)
    }

    fn find(&self, css: &str) -> String {
        let found = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        found[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    fn type_text(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        );
    }

    fn script(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Run `script` until it returns true.
    fn wait_until(&self, what: &str, timeout: Duration, script: &str) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.script(script) == json!(true) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out waiting for {what}");
    }
}

impl Drop for Driver {
    /// End the session (chromium with it), also when an assertion failed.
    fn drop(&mut self) {
        let path = format!("/session/{}", self.session);
        let _ = std::panic::catch_unwind(|| request(self.addr, "DELETE", &path, &[], None));
    }
}

/// One WebDriver command; returns its `value`, panicking on a WebDriver error.
fn webdriver(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    let body = body.map(|b| b.to_string());
    let response = request(
        addr,
        method,
        path,
        &[("Content-Type", "application/json")],
        body.as_deref().map(str::as_bytes),
    );
    let value = response.json()["value"].clone();
    assert_eq!(response.status, 200, "{method} {path}: {value}");
    value
}

/// Standard base64 (the screenshot) without a dependency.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text
        .bytes()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .map(value)
        .collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for group in digits.chunks(4) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &d)| n | (d as u32) << (18 - 6 * i));
        out.extend(n.to_be_bytes()[1..group.len()].iter());
    }
    out
}

/// Start `ftrun serve --compare-base` on port 0; returns the process, its address and its
/// model ids (fine-tuned, base).
fn start_ftrun_serve() -> (Kill, SocketAddr, Vec<String>) {
    let f = fixture();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ftrun"))
        .arg("serve")
        .arg(&f.model)
        .arg("--adapter")
        .arg(&f.adapter)
        .args(["--compare-base", "--port", "0", "--device", "cpu"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let child = Kill(child);
    // "ftrun serve: listening on http://127.0.0.1:PORT (models: a, b)"
    let url = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
    let ids = line
        .split("(models: ")
        .nth(1)
        .unwrap()
        .trim_end()
        .trim_end_matches(')')
        .split(", ")
        .map(String::from)
        .collect();
    (child, url.parse().unwrap(), ids)
}

fn start_driver(chromium: &str, chromedriver: &str) -> (Kill, Driver) {
    // A free port for chromedriver (it has no port-0 mode that reports the port).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Kill(
        Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || {
            std::net::TcpStream::connect(addr).is_ok()
                && webdriver(addr, "GET", "/status", None)["ready"] == json!(true)
        }),
        "chromedriver did not start"
    );
    let capabilities = json!({"capabilities": {"alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,800"],
        },
    }}});
    let session = webdriver(addr, "POST", "/session", Some(capabilities));
    let session = session["sessionId"].as_str().unwrap().to_string();
    (child, Driver { addr, session })
}

/// The greedy answer of the API for this conversation (the page's settings).
fn api_answer(addr: SocketAddr, model: &str, turns: &[&str], answers: &[String]) -> String {
    let mut messages = vec![json!({"role": "system", "content": SYSTEM})];
    for (i, turn) in turns.iter().enumerate() {
        messages.push(json!({"role": "user", "content": turn}));
        if let Some(answer) = answers.get(i) {
            messages.push(json!({"role": "assistant", "content": answer}));
        }
    }
    content(&chat(
        addr,
        &json!({"model": model, "messages": messages, "temperature": 0,
                "max_tokens": MAX_TOKENS}),
    ))
}

/// Per column (in page order): its model id and the text of its assistant answers.
fn column_answers(driver: &Driver) -> Vec<(String, Vec<String>)> {
    let value = driver.script(
        "return [...document.querySelectorAll('.column')].map(c => [c.dataset.model, \
         [...c.querySelectorAll('.msg.assistant')].map(m => [...m.childNodes] \
         .filter(n => n.nodeType === 3).map(n => n.nodeValue).join(''))]);",
    );
    serde_json::from_value(value).unwrap()
}

/// Type `message`, send it, and wait until every column has finished answering.
fn send_and_wait(driver: &Driver, message: &str, answers_expected: usize) {
    driver.type_text("#input", message);
    driver.click("#send");
    driver.wait_until(
        "both columns to finish streaming",
        Duration::from_secs(30),
        &format!(
            "const m = [...document.querySelectorAll('.msg.assistant')]; \
             return m.length === {answers_expected} && m.every(e => e.dataset.state === 'done');"
        ),
    );
}

#[test]
fn the_chat_page_streams_answers_and_compares_fine_tuned_with_base() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let (_server, addr, ids) = start_ftrun_serve();
    assert_eq!(ids.len(), 2, "compare mode serves two models: {ids:?}");
    let (_driver_process, driver) = start_driver(&chromium, &chromedriver);

    driver.call(
        "POST",
        "/url",
        Some(json!({"url": format!("http://{addr}/")})),
    );
    driver.wait_until(
        "the page to load its settings",
        Duration::from_secs(10),
        "return document.body.dataset.ready === 'true';",
    );
    // Greedy answers, so the page's text can be checked against the API.
    driver.script(&format!(
        "const set = (id, v) => {{ const e = document.getElementById(id); e.value = v; \
         e.dispatchEvent(new Event('input')); }}; set('temperature', '0'); \
         set('max-tokens', '{MAX_TOKENS}'); set('system', {});",
        json!(SYSTEM)
    ));
    // Record every length the answers go through, to see them grow while streamed.
    driver.script(
        "window.lengths = {}; new MutationObserver(() => { \
         for (const c of document.querySelectorAll('.column')) { \
           const m = c.querySelector('.msg.assistant:last-child'); if (!m) continue; \
           const seen = (window.lengths[c.dataset.model] ||= []); const n = m.textContent.length; \
           if (seen[seen.length - 1] !== n) seen.push(n); } }) \
         .observe(document.getElementById('columns'), \
                  {subtree: true, childList: true, characterData: true});",
    );

    let first = "Who are you?";
    send_and_wait(&driver, first, 2);
    let columns = column_answers(&driver);
    let models: Vec<&str> = columns.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(models, ids, "one column per model, fine-tuned first");
    let mut first_answers = Vec::new();
    for (model, answers) in &columns {
        let expected = api_answer(addr, model, &[first], &[]);
        assert_eq!(answers, &vec![expected.clone()], "column {model}");
        first_answers.push(expected);
    }
    assert_ne!(
        first_answers[0], first_answers[1],
        "fine-tuned and base answer differently"
    );
    let lengths: std::collections::HashMap<String, Vec<usize>> =
        serde_json::from_value(driver.script("return window.lengths;")).unwrap();
    for model in &ids {
        let seen = &lengths[model];
        assert!(
            seen.len() >= 3 && seen.windows(2).all(|w| w[0] < w[1]),
            "{model}: the answer did not grow token by token: {seen:?}"
        );
    }

    // A second turn: each column sends its own history.
    let second = "Tell me more.";
    send_and_wait(&driver, second, 4);
    for (i, (model, answers)) in column_answers(&driver).iter().enumerate() {
        let expected = api_answer(addr, model, &[first, second], &first_answers[i..=i]);
        assert_eq!(answers[1], expected, "column {model}, second turn");
    }

    let screenshot = base64_decode(driver.call("GET", "/screenshot", None).as_str().unwrap());
    assert!(
        screenshot.starts_with(b"\x89PNG"),
        "the screenshot is a PNG"
    );
    let path = concat!(env!("CARGO_TARGET_TMPDIR"), "/serve-page.png");
    std::fs::write(path, &screenshot).unwrap();
    println!("screenshot: {path}");

    driver.click("#clear");
    assert_eq!(
        driver.script("return document.querySelectorAll('.msg').length;"),
        json!(0),
        "Clear history empties both columns"
    );
}
