//! Reading dataset files: every format, JSON vs JSONL, weights, and located errors for bad input.

use ftrun::config::DataFile;
use ftrun::data::format::{read_all, read_file, Format};
use ftrun::data::{Record, Turn};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data/records")
        .join(name)
}

fn data_file(path: &Path, format: &str, weight: f64) -> DataFile {
    DataFile {
        path: path.to_path_buf(),
        format: format.into(),
        weight,
    }
}

/// Write `text` to `name` in a temp dir and read it; the dir lives as long as the result is used.
fn read_text(name: &str, text: &str, format: &str) -> (TempDir, anyhow::Result<Vec<Record>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let r = read_file(&data_file(&path, format, 1.0));
    (dir, r)
}

fn err_of(name: &str, text: &str, format: &str) -> String {
    let (_dir, r) = read_text(name, text, format);
    format!("{:#}", r.expect_err("expected an error"))
}

fn turn(system: Option<&str>, input: &str, output: &str, loss: bool) -> Turn {
    Turn {
        system: system.map(String::from),
        input: input.into(),
        output: output.into(),
        loss,
    }
}

fn chat(turns: Vec<Turn>) -> Record {
    Record::Chat { turns, image: None }
}

// ---- formats ----

#[test]
fn messages_join_users_skip_leading_assistant_and_carry_loss() {
    let records = read_file(&data_file(&fixture("messages.jsonl"), "auto", 1.0)).unwrap();
    assert_eq!(records.len(), 6);
    assert_eq!(
        records[1],
        chat(vec![
            turn(
                Some("你是一个乐于助人的助手。"),
                "你好！请介绍一下你自己",
                "我是书生·浦语的小助手。",
                true
            ),
            turn(None, "Tell me a joke.", "No jokes today.", false),
            turn(None, "再见", "再见！", true),
        ])
    );
    // Leading assistant skipped, trailing user without an answer dropped.
    assert_eq!(
        records[2],
        chat(vec![turn(None, "Hi there", "Hi! How can I help?", true)])
    );
    // A system message in the middle applies to the next turn only.
    assert_eq!(
        records[5],
        chat(vec![
            turn(None, "First question", "First answer", true),
            turn(
                Some("Answer in French."),
                "Second question",
                "Deuxième réponse",
                true
            ),
        ])
    );
}

#[test]
fn conversation_json_array_with_null_input_and_masked_turn() {
    let records = read_file(&data_file(&fixture("conversation.json"), "auto", 1.0)).unwrap();
    assert_eq!(records.len(), 5);
    assert_eq!(
        records[1],
        chat(vec![
            turn(
                Some("You are a math tutor."),
                "What is 2+2?",
                "2+2 is 4.",
                true
            ),
            turn(Some("Be brief."), "And 3+3?", "6.", true),
        ])
    );
    assert_eq!(
        records[2],
        chat(vec![turn(None, "", "An answer with no question.", true)])
    );
    assert_eq!(
        records[4],
        chat(vec![
            turn(None, "Keep this one quiet", "quiet", false),
            turn(None, "Now train this", "trained", true),
        ])
    );
}

#[test]
fn alpaca_joins_instruction_and_input_and_drops_nooutput() {
    let records = read_file(&data_file(&fixture("alpaca.jsonl"), "alpaca", 1.0)).unwrap();
    assert_eq!(
        records[1],
        chat(vec![turn(
            None,
            "Translate to English.\n今天天气很好。",
            "The weather is nice today.",
            true
        )])
    );
    // An empty input still leaves the "\n" (alpaca_map_fn's f-string).
    assert_eq!(
        records[0],
        chat(vec![turn(
            None,
            "Give three tips for staying healthy.\n",
            "1. Eat well. 2. Sleep. 3. Exercise.",
            true
        )])
    );
    assert_eq!(records[2], chat(vec![]));
}

#[test]
fn text_is_stripped_like_pretrain_map_fn() {
    let records = read_file(&data_file(&fixture("text.jsonl"), "auto", 1.0)).unwrap();
    assert_eq!(
        records[0],
        Record::Text("Incremental pretraining text with spaces around.".into())
    );
    assert_eq!(records[2], Record::Text(String::new()));
}

#[test]
fn llava_moves_image_to_front_and_keeps_image_path() {
    let records = read_file(&data_file(&fixture("llava.jsonl"), "auto", 1.0)).unwrap();
    assert_eq!(
        records[1],
        Record::Chat {
            turns: vec![
                turn(
                    None,
                    "<image>\nDescribe the picture.",
                    "A dog on the grass.",
                    true
                ),
                turn(None, "What colour is it?", "Brown.", true),
            ],
            image: Some("images/dog.jpg".into()),
        }
    );
    assert_eq!(
        records[2],
        chat(vec![turn(
            None,
            "A text-only question.",
            "A text-only answer.",
            true
        )])
    );
}

#[test]
fn format_detection_by_keys() {
    for (line, want) in [
        (r#"{"messages": []}"#, Format::Messages),
        (r#"{"conversation": []}"#, Format::Conversation),
        (r#"{"instruction": "i", "output": "o"}"#, Format::Alpaca),
        (r#"{"text": "t"}"#, Format::Text),
        (r#"{"id": 1, "conversations": []}"#, Format::Llava),
    ] {
        let obj: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            Format::detect(obj.as_object().unwrap()),
            Some(want),
            "{line}"
        );
    }
}

#[test]
fn forced_format_overrides_detection() {
    // Read as text, a conversation record lacks `text`.
    let e = err_of("c.jsonl", "{\"conversation\": []}\n", "text");
    assert!(e.contains("c.jsonl:1: missing `text`"), "{e}");
}

// ---- weights ----

#[test]
fn weights_repeat_and_subsample_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.jsonl");
    let lines: String = (0..10)
        .map(|i| format!("{{\"text\": \"r{i}\"}}\n"))
        .collect();
    std::fs::write(&path, lines).unwrap();
    let files = [data_file(&path, "auto", 2.5)];
    let (records, report) = read_all(&files, 7).unwrap();
    assert_eq!(records.len(), 25);
    assert_eq!(report.files[0].records, 10);
    assert_eq!(report.files[0].used, 25);
    assert_eq!(report.files[0].format, Format::Text);
    // Two full copies in order, then 5 distinct records of the file.
    let names: Vec<String> = records
        .iter()
        .map(|r| match r {
            Record::Text(t) => t.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    let all: Vec<String> = (0..10).map(|i| format!("r{i}")).collect();
    assert_eq!(names[..10], all[..]);
    assert_eq!(names[10..20], all[..]);
    let mut subset = names[20..].to_vec();
    subset.dedup();
    assert_eq!(subset.len(), 5);
    // Same seed, same subset; another seed picks another one (10 choose 5 = 252 subsets).
    assert_eq!(read_all(&files, 7).unwrap().0, records);
    let other_seeds_differ = (8..12).any(|s| read_all(&files, s).unwrap().0 != records);
    assert!(other_seeds_differ);
    // A fractional weight alone keeps that share.
    let (half, _) = read_all(&[data_file(&path, "auto", 0.5)], 1).unwrap();
    assert_eq!(half.len(), 5);
}

#[test]
fn read_all_reports_each_file() {
    let files = [
        data_file(&fixture("alpaca.jsonl"), "auto", 1.0),
        data_file(&fixture("llava.jsonl"), "auto", 2.0),
    ];
    let (records, report) = read_all(&files, 0).unwrap();
    assert_eq!(records.len(), 4 + 6);
    assert_eq!(report.used(), 10);
    assert_eq!(report.files[1].format, Format::Llava);
    assert!(report
        .to_string()
        .contains("llava.jsonl: 3 records (llava), 6 used"));
}

// ---- bad input: each error names file:line and the problem ----

#[test]
fn malformed_jsonl_line() {
    let e = err_of(
        "bad.jsonl",
        "{\"text\": \"a\"}\n\n{\"text\": \"b\",}\n",
        "auto",
    );
    assert!(e.contains("bad.jsonl:3: malformed JSON at column"), "{e}");
}

#[test]
fn one_pretty_printed_object_is_not_json_lines() {
    let e = err_of("one.jsonl", "{\n  \"text\": \"a\"\n}\n", "auto");
    assert!(e.contains("one.jsonl:1: malformed JSON at column"), "{e}");
    assert!(e.contains("one record per line"), "{e}");
}

#[test]
fn malformed_json_array_names_the_line() {
    let e = err_of(
        "bad.json",
        "[\n  {\"text\": \"a\"},\n  {\"text\": b}\n]\n",
        "auto",
    );
    assert!(e.contains("bad.json:3: malformed JSON"), "{e}");
}

#[test]
fn json_array_error_names_the_line_where_the_element_starts() {
    let text = "[\n  {\"conversation\": [{\"input\": \"a\", \"output\": \"b\"}]},\n  {\n    \"conversation\": [\n      {\"input\": \"no answer\"}\n    ]\n  }\n]\n";
    let e = err_of("conv.json", text, "auto");
    assert!(
        e.contains("conv.json:3: conversation[0]: missing `output`"),
        "{e}"
    );
}

#[test]
fn missing_output_in_alpaca() {
    let e = err_of(
        "a.jsonl",
        "{\"instruction\": \"i\", \"input\": \"\", \"output\": \"o\"}\n{\"instruction\": \"i\"}\n",
        "auto",
    );
    assert!(e.contains("a.jsonl:2: missing `output`"), "{e}");
}

#[test]
fn unknown_role() {
    let e = err_of(
        "m.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"tool\", \"content\": \"x\"}]}\n",
        "auto",
    );
    assert!(
        e.contains(
            "m.jsonl:1: messages[1]: unknown role `tool` (expected system, user or assistant)"
        ),
        "{e}"
    );
}

#[test]
fn wrong_types() {
    let e = err_of(
        "m.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": [\"parts\"]}]}\n",
        "auto",
    );
    assert!(
        e.contains("m.jsonl:1: messages[0]: `content` must be a string, got an array"),
        "{e}"
    );
    let e = err_of(
        "m.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\", \"loss\": 0}]}\n",
        "auto",
    );
    assert!(
        e.contains("m.jsonl:1: messages[1]: `loss` must be true or false, got 0"),
        "{e}"
    );
    let e = err_of(
        "c.jsonl",
        "{\"conversation\": {\"input\": \"q\"}}\n",
        "auto",
    );
    assert!(
        e.contains("c.jsonl:1: `conversation` must be an array, got an object"),
        "{e}"
    );
    let e = err_of("t.jsonl", "{\"text\": \"a\"}\n[1, 2]\n", "auto");
    assert!(
        e.contains("t.jsonl:2: a record must be a JSON object, got an array"),
        "{e}"
    );
}

#[test]
fn undetectable_format_lists_keys() {
    let e = err_of(
        "x.jsonl",
        "{\"prompt\": \"p\", \"completion\": \"c\"}\n",
        "auto",
    );
    assert!(
        e.contains("x.jsonl:1: cannot detect the data format"),
        "{e}"
    );
    assert!(e.contains("keys seen: `prompt`, `completion`"), "{e}");
}

#[test]
fn empty_dataset() {
    for (name, text) in [("e.jsonl", "\n  \n"), ("e.json", "[ ]")] {
        let (dir, r) = read_text(name, text, "auto");
        let e = format!("{:#}", r.unwrap_err());
        let path = dir.path().join(name);
        assert_eq!(e, format!("no records in {}", path.display()));
    }
}

#[test]
fn missing_file_and_unknown_format_name() {
    let e = read_file(&data_file(Path::new("/nonexistent/d.jsonl"), "auto", 1.0)).unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("cannot read data file /nonexistent/d.jsonl"),
        "{e}"
    );
    let e = err_of("d.jsonl", "{\"text\": \"a\"}\n", "mesages");
    assert!(e.contains("unknown data format `mesages`"), "{e}");
    assert!(e.contains("did you mean `messages`?"), "{e}");
}

#[test]
fn llava_errors_name_the_record() {
    let two_images = "{\"image\": \"a.jpg\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image> <image>\"}, {\"from\": \"gpt\", \"value\": \"x\"}]}\n";
    let e = err_of(
        "l.jsonl",
        &format!("{{\"conversations\": []}}\n{two_images}"),
        "auto",
    );
    assert!(
        e.contains("l.jsonl:2: conversations[0]: more than one `<image>` in one turn"),
        "{e}"
    );
    // Two human messages of one turn, one image each.
    let joined = "{\"image\": \"a.jpg\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\"}, {\"from\": \"human\", \"value\": \"and <image>\"}, {\"from\": \"gpt\", \"value\": \"x\"}]}\n";
    let e = err_of("l.jsonl", joined, "llava");
    assert!(
        e.contains("l.jsonl:1: conversations[1]: more than one `<image>`"),
        "{e}"
    );
    let no_image = "{\"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\nhi\"}, {\"from\": \"gpt\", \"value\": \"x\"}]}\n";
    let e = err_of("l.jsonl", no_image, "auto");
    assert!(
        e.contains("l.jsonl:1: conversations[0]: `<image>` in a record without `image`"),
        "{e}"
    );
    let gpt_first =
        "{\"image\": \"a.jpg\", \"conversations\": [{\"from\": \"gpt\", \"value\": \"x\"}]}\n";
    let e = err_of("l.jsonl", gpt_first, "auto");
    assert!(
        e.contains("l.jsonl:1: conversations[0]: the conversation starts with a gpt message"),
        "{e}"
    );
    let bad_from = "{\"conversations\": [{\"from\": \"bot\", \"value\": \"x\"}]}\n";
    let e = err_of("l.jsonl", bad_from, "auto");
    assert!(e.contains("unknown `from` value `bot`"), "{e}");
}
