//! The user's path through the binary: `ftrun demo`, `ftrun chat` with the trained adapter, and
//! `ftrun check-data` on good and bad input.

mod train_support;

use std::path::Path;
use train_support::*;

#[test]
fn demo_trains_the_assistant_and_chat_answers_with_the_trained_sentence() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let (ok, out, err, code) =
        ftrun(&["demo", "--dir", dir.to_str().unwrap(), "--prompt", QUESTION]);
    assert!(ok && code == Some(0), "demo failed:\n{err}");
    assert!(out.contains(ANSWER), "demo answer:\n{out}\n{err}");

    let model = dir.join("tiny-llama");
    let adapter = dir.join("adapter");
    let (ok, out, err, _) = ftrun(&[
        "chat",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--template",
        "internlm2_chat",
        "--greedy",
        "--prompt",
        QUESTION,
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains(ANSWER), "chat answer:\n{out}\n{err}");
    // Without the adapter the random base model does not know the sentence.
    let (ok, out, err, _) = ftrun(&[
        "chat",
        model.to_str().unwrap(),
        "--template",
        "internlm2_chat",
        "--greedy",
        "--max-new-tokens",
        "40",
        "--prompt",
        QUESTION,
    ]);
    assert!(ok, "{err}");
    assert!(!out.contains(ANSWER), "{out}");
}

#[test]
fn check_data_shows_masks_ids_labels_and_the_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 6);
    // A question longer than max_length: truncation cuts the answer away, so the record has
    // nothing to train and is dropped (and counted).
    let mut text = std::fs::read_to_string(&s.data).unwrap();
    let long = "z".repeat(200);
    text.push_str(
        &serde_json::json!({"conversation": [{"input": long, "output": ANSWER}]}).to_string(),
    );
    text.push('\n');
    std::fs::write(&s.data, text).unwrap();
    let work = tmp.path().join("work");
    let (ok, out, err, _) = ftrun_cfg(
        "check-data",
        &s,
        &[],
        &[
            "--work-dir",
            work.to_str().unwrap(),
            "--show",
            "all",
            "-n",
            "1",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("━━ packed sequence 0"), "{out}");
    // The user turn is masked, the answer is not.
    assert!(
        out.contains(&format!(
            "⟦<s><|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n⟧{ANSWER}"
        )),
        "{out}"
    );
    assert!(
        out.contains("[input_ids]\n[1, ") && out.contains("[labels]\n[-100, "),
        "{out}"
    );
    assert!(out.contains("records read: 7"), "{out}");
    assert!(out.contains("samples kept: 6"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("dropped records: no trained token") && l.ends_with(": 1")),
        "{out}"
    );
    assert!(
        out.contains("tokens: ") && out.contains("(trained: "),
        "{out}"
    );
    assert!(
        out.contains("packed sequences: ") && out.contains("of max_length 96"),
        "{out}"
    );
    assert!(out.contains("packing efficiency: "), "{out}");
    // The cache it built is reused by the next call.
    let (ok, _, err, _) = ftrun_cfg(
        "check-data",
        &s,
        &[],
        &["--work-dir", work.to_str().unwrap(), "-n", "0"],
    );
    assert!(ok && err.contains("reused"), "{err}");
}

/// No file anywhere under the work dir's dataset cache.
fn cache_files(work: &Path) -> Vec<String> {
    let dir = work.join("dataset_cache");
    if !dir.exists() {
        return vec![];
    }
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect()
}

fn check_data_fails(s: &Setup, sets: &[&str], work: &Path) -> String {
    let (ok, out, err, code) = ftrun_cfg(
        "check-data",
        s,
        sets,
        &["--work-dir", work.to_str().unwrap()],
    );
    assert!(!ok && code == Some(1), "should fail: {sets:?}\n{out}");
    assert!(
        cache_files(work).is_empty(),
        "{sets:?} left {:?}",
        cache_files(work)
    );
    err
}

#[test]
fn check_data_rejects_bad_input_naming_it_and_leaves_no_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 4);
    let work = tmp.path().join("work");

    let err = check_data_fails(&s, &["data.template=\"internlm2_chatt\""], &work);
    assert!(
        err.contains("internlm2_chatt") && err.contains("internlm2_chat`"),
        "{err}"
    );

    let err = check_data_fails(
        &s,
        &["model.tokenizer=\"/nonexistent/tokenizer-dir\""],
        &work,
    );
    assert!(err.contains("/nonexistent/tokenizer-dir"), "{err}");

    // Below the config's floor: the key and value are named.
    let err = check_data_fails(&s, &["data.max_length=4"], &work);
    assert!(
        err.contains("data.max_length") && err.contains("4 is too small"),
        "{err}"
    );
    // Above the floor but not above the template's own tokens.
    let err = check_data_fails(&s, &["data.max_length=8"], &work);
    assert!(
        err.contains("data.max_length = 8") && err.contains("`internlm2_chat` template itself"),
        "{err}"
    );

    // A malformed third line.
    let good = std::fs::read_to_string(&s.data).unwrap();
    let mut lines: Vec<&str> = good.lines().collect();
    lines[2] = "{\"conversation\": [{\"input\": \"x\", ";
    std::fs::write(&s.data, lines.join("\n") + "\n").unwrap();
    let err = check_data_fails(&s, &[], &work);
    assert!(err.contains(&format!("{}:3", s.data.display())), "{err}");
}
