//! The `ftrun` binary's own commands: exit codes and messages as a user sees them.

use std::process::Command;

fn ftrun(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ftrun"))
        .args(args)
        .output()
        .expect("run ftrun");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn list_cfg_lists_builtins_with_descriptions_and_filters() {
    let (ok, out, _) = ftrun(&["list-cfg"]);
    assert!(ok);
    assert!(out.lines().count() >= 5, "{out}");
    assert!(out.contains("internlm2_chat_1_8b_qlora_assistant_e3") && out.contains("QLoRA"));
    let (ok, out, _) = ftrun(&["list-cfg", "-p", "PRETRAIN_TEXT"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 1, "{out}");
    let (ok, _, err) = ftrun(&["list-cfg", "-p", "nothing-like-this"]);
    assert!(!ok && err.contains("no built-in config matches"));
}

#[test]
fn copy_cfg_writes_a_loadable_copy_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (ok, out, err) = ftrun(&["copy-cfg", "tiny_demo_assistant", d]);
    assert!(ok, "{err}");
    assert!(out.contains("tiny_demo_assistant_copy.toml"));
    let copy = dir.path().join("tiny_demo_assistant_copy.toml");
    ftrun::config::load(&copy, &[]).unwrap();
    let (ok, _, err) = ftrun(&["copy-cfg", "tiny_demo_assistant", d]);
    assert!(!ok && err.contains("already exists"), "{err}");
    let (ok, _, err) = ftrun(&["copy-cfg", "tiny_demo_asistant", d]);
    assert!(
        !ok && err.contains("did you mean `tiny_demo_assistant`"),
        "{err}"
    );
}

#[test]
fn data_assistant_writes_json_and_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let arr = dir.path().join("a.json");
    let (ok, _, err) = ftrun(&[
        "data",
        "assistant",
        "--name",
        "小明",
        "--n",
        "7",
        "-o",
        arr.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&arr).unwrap()).unwrap();
    let recs = v.as_array().unwrap();
    assert_eq!(recs.len(), 7);
    assert_eq!(recs[0]["conversation"][0]["input"], "请介绍一下你自己");
    assert_eq!(
        recs[0]["conversation"][0]["output"],
        "我是小明的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦"
    );
    let lines = dir.path().join("a.jsonl");
    let (ok, _, _) = ftrun(&[
        "data",
        "assistant",
        "--name",
        "x",
        "--n",
        "3",
        "-o",
        lines.to_str().unwrap(),
    ]);
    assert!(ok);
    let text = std::fs::read_to_string(&lines).unwrap();
    assert_eq!(text.lines().count(), 3);
    for l in text.lines() {
        serde_json::from_str::<serde_json::Value>(l).unwrap();
    }
    let (ok, _, err) = ftrun(&[
        "data",
        "assistant",
        "--name",
        " ",
        "-o",
        lines.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--name"));
}

#[test]
fn config_typo_fails_with_location_and_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[model]\npath = \"m\"\n[[data.files]]\npath = \"d\"\n[optim]\nlearning_rate = 1\n",
    )
    .unwrap();
    let (ok, _, err) = ftrun(&["train", cfg.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("c.toml:6")
            && err.contains("optim.learning_rate")
            && err.contains("did you mean `lr`"),
        "{err}"
    );
    let (ok, _, err) = ftrun(&["train", "no_such_config"]);
    assert!(
        !ok && err.contains("neither a file nor a built-in config"),
        "{err}"
    );
}

#[test]
fn version_and_completions() {
    let (ok, out, _) = ftrun(&["version"]);
    assert!(ok && out.starts_with("ftrun "));
    let (ok, out, _) = ftrun(&["completions", "bash"]);
    assert!(ok && out.contains("ftrun") && out.contains("list-cfg"));
}
