//! Shared fixtures of the end-to-end tests: a tiny demo model, a small self-cognition dataset and
//! the built-in `tiny_demo_assistant` config pointed at them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub const QUESTION: &str = "请介绍一下你自己";
pub const ANSWER: &str = "我是ftrun的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦";
const OTHER_QUESTIONS: [&str; 3] = ["你是谁", "你好，请做个自我介绍", "介绍一下你自己"];

/// A tiny model (`model/`) and a JSONL dataset (`data.jsonl`, `n` records) under `root`.
pub struct Setup {
    pub root: PathBuf,
    pub model: PathBuf,
    pub data: PathBuf,
}

pub fn setup(root: &Path, n: usize) -> Setup {
    let model = root.join("model");
    let data = root.join("data.jsonl");
    let corpus: Vec<String> = std::iter::once(QUESTION)
        .chain(OTHER_QUESTIONS)
        .chain([ANSWER])
        .map(String::from)
        .collect();
    ftrun::model::demo::make_demo_model(&model, &corpus, 0).expect("demo model");
    write_data(&data, n);
    Setup {
        root: root.to_path_buf(),
        model,
        data,
    }
}

/// `n` conversation records cycling through the questions, all answered with [`ANSWER`].
pub fn write_data(path: &Path, n: usize) {
    let questions: Vec<&str> = std::iter::once(QUESTION).chain(OTHER_QUESTIONS).collect();
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({"conversation": [{"input": questions[i % questions.len()], "output": ANSWER}]})
                .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// `--set` overrides pointing the built-in demo config at `s`, plus `extra`.
pub fn sets(s: &Setup, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        format!("model.path=\"{}\"", s.model.display()),
        format!(
            "data.files=[{{path=\"{}\", format=\"conversation\"}}]",
            s.data.display()
        ),
        // Short sequences keep a step in the dev profile in the tens of milliseconds.
        "data.max_length=96".to_string(),
        "eval.max_new_tokens=8".to_string(),
    ];
    v.extend(extra.iter().map(|e| e.to_string()));
    v
}

pub fn config(s: &Setup, extra: &[&str]) -> ftrun::config::Config {
    let text = ftrun::config::builtin::get("tiny_demo_assistant").unwrap();
    ftrun::config::load_str(text, "<built-in tiny_demo_assistant>", &sets(s, extra))
        .expect("config")
}

/// Run the `ftrun` binary: (success, stdout, stderr, exit code).
pub fn ftrun(args: &[&str]) -> (bool, String, String, Option<i32>) {
    let out = Command::new(env!("CARGO_BIN_EXE_ftrun"))
        .args(args)
        .output()
        .expect("run ftrun");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
        out.status.code(),
    )
}

/// `ftrun <cmd> tiny_demo_assistant --set ...` for `s` with `extra` arguments after the sets.
pub fn ftrun_cfg(
    cmd: &str,
    s: &Setup,
    sets_extra: &[&str],
    extra: &[&str],
) -> (bool, String, String, Option<i32>) {
    let sets = sets(s, sets_extra);
    let mut args: Vec<String> = vec![cmd.into(), "tiny_demo_assistant".into()];
    for v in &sets {
        args.push("--set".into());
        args.push(v.clone());
    }
    args.extend(extra.iter().map(|e| e.to_string()));
    let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    ftrun(&refs)
}

/// Copy a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// Max |a - b| of two same-shaped tensors.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = ftrun::train::trainer::to_vec_f64(a).unwrap();
    let b = ftrun::train::trainer::to_vec_f64(b).unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}
