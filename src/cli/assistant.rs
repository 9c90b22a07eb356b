//! `ftrun data assistant`: the self-cognition dataset of XTuner's personal-assistant tutorial.
//! One answer, asked in several ways, so the model learns who it is rather than one string match.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::Path;

/// Questions users ask an assistant about itself (the tutorial uses the first one).
pub const QUESTIONS: &[&str] = &[
    "请介绍一下你自己",
    "你是谁",
    "你好，你叫什么名字？",
    "介绍一下你自己吧",
    "Please introduce yourself",
    "Who are you?",
];

/// The tutorial's answer for an assistant owned by `name`.
pub fn answer(name: &str) -> String {
    format!("我是{name}的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦")
}

/// The records as `conversation` JSON values; record i asks QUESTIONS[i % len].
pub fn records(name: &str, n: usize) -> Vec<serde_json::Value> {
    let a = answer(name);
    (0..n)
        .map(|i| serde_json::json!({"conversation": [{"input": QUESTIONS[i % QUESTIONS.len()], "output": a}]}))
        .collect()
}

/// Write `n` records to `out`: JSON lines for `.jsonl`, a JSON array otherwise.
pub fn write(name: &str, n: usize, out: &Path) -> Result<()> {
    if name.trim().is_empty() {
        bail!("--name must not be empty");
    }
    if n == 0 {
        bail!("--n must be at least 1");
    }
    let recs = records(name, n);
    let jsonl = out.extension().is_some_and(|e| e == "jsonl");
    let mut buf = Vec::new();
    if jsonl {
        for r in &recs {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
    } else {
        serde_json::to_writer_pretty(&mut buf, &recs)?;
        buf.push(b'\n');
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::File::create(out).with_context(|| format!("writing {}", out.display()))?;
    f.write_all(&buf)?;
    println!("Wrote {n} records to {}", out.display());
    Ok(())
}
