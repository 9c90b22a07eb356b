//! Encoding equals XTuner 0.2.0's, for every template, every record format and both BOS rules.
//! Expected ids come from scripts/fixtures/make_xtuner_fixtures.py, which runs XTuner's own
//! template_map_fn / encode_fn / map functions on the records in tests/fixtures/data/records.

use ftrun::config::DataFile;
use ftrun::data::encode::{encode, template_overhead, DropReason};
use ftrun::data::format::read_file;
use ftrun::data::template::Template;
use ftrun::data::{Record, Turn, IGNORE_INDEX, IMAGE_TOKEN_ID};
use ftrun::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// XTuner's IMAGE_TOKEN_INDEX, which the fixtures hold where ftrun writes IMAGE_TOKEN_ID.
const XTUNER_IMAGE_INDEX: i64 = -200;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tokenizer(bos: Option<&str>, eos: Option<&str>) -> Tokenizer {
    let tk = tokenizers::Tokenizer::from_file(fixtures().join("tokenizer.json")).unwrap();
    Tokenizer::from_hf(tk, bos, eos)
}

/// The tokenizer flavour a fixture case was made with (BOS/EOS names from the fixture file).
fn flavour(exp: &Value, name: &str) -> Tokenizer {
    let s = &exp["special_tokens"][name];
    tokenizer(s["bos"].as_str(), s["eos"].as_str())
}

fn read(name: &str, format: &str) -> Vec<Record> {
    read_file(&DataFile {
        path: fixtures().join("records").join(name),
        format: format.into(),
        weight: 1.0,
    })
    .unwrap()
}

fn ids_as_xtuner(ids: &[u32]) -> Vec<i64> {
    ids.iter()
        .map(|&id| {
            if id == IMAGE_TOKEN_ID {
                XTUNER_IMAGE_INDEX
            } else {
                id as i64
            }
        })
        .collect()
}

fn as_i64s(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn matches_xtuner_for_every_template_format_and_bos_rule() {
    let exp = expected();
    let max_length = exp["max_length"].as_u64().unwrap() as usize;
    let cases = exp["cases"].as_array().unwrap();
    let mut templates_seen = std::collections::BTreeSet::new();
    let (mut compared, mut dropped, mut truncated) = (0, 0, 0);
    for case in cases {
        let file = case["file"].as_str().unwrap();
        let template_name = case["template"].as_str().unwrap();
        templates_seen.insert(template_name.to_string());
        let t = Template::by_name(template_name).unwrap();
        let tok = flavour(&exp, case["tokenizer"].as_str().unwrap());
        // Format auto-detection is part of what is checked: the fixtures name it explicitly.
        let records = read(file, "auto");
        let results = case["results"].as_array().unwrap();
        assert_eq!(records.len(), results.len(), "{file}: record count");
        for (i, (record, want)) in records.iter().zip(results).enumerate() {
            let got = encode(
                record,
                &t,
                &tok,
                max_length,
                case["default_system"].as_str(),
            )
            .unwrap();
            let ctx = format!(
                "{file} record {i}, template {template_name}, tokenizer {}, default system {}",
                case["tokenizer"], case["default_system"]
            );
            match (got, want.get("dropped").and_then(Value::as_str)) {
                (Err(reason), Some(why)) => {
                    assert_eq!(reason.key(), why, "{ctx}");
                    dropped += 1;
                }
                (Ok(enc), None) => {
                    assert_eq!(
                        ids_as_xtuner(&enc.input_ids),
                        as_i64s(&want["input_ids"]),
                        "{ctx}: input_ids"
                    );
                    let labels: Vec<i64> = enc.labels.iter().map(|&l| l as i64).collect();
                    assert_eq!(labels, as_i64s(&want["labels"]), "{ctx}: labels");
                    if enc.input_ids.len() == max_length {
                        truncated += 1;
                    }
                    compared += 1;
                }
                (got, want) => panic!("{ctx}: got {got:?}, XTuner: {want:?}"),
            }
        }
    }
    // The fixture set really covers what it claims.
    assert_eq!(templates_seen.len(), Template::names().len());
    assert!(compared > 100, "{compared} samples compared");
    assert!(
        dropped > 10 && truncated > 5,
        "{dropped} dropped, {truncated} truncated"
    );
}

#[test]
fn text_record_trains_every_token_without_eos() {
    let tok = tokenizer(Some("<s>"), Some("</s>"));
    let t = Template::by_name("internlm2_chat").unwrap();
    let record = Record::Text("hello world".into());
    let enc = encode(&record, &t, &tok, 1000, Some("ignored system"))
        .unwrap()
        .unwrap();
    let body = tok.encode("hello world", false).unwrap();
    let bos = tok.bos_id().unwrap();
    assert_eq!(enc.input_ids, [vec![bos], body.clone()].concat());
    assert_eq!(enc.labels[0], IGNORE_INDEX);
    assert_eq!(
        enc.labels[1..],
        body.iter().map(|&x| x as i32).collect::<Vec<_>>()[..]
    );
    assert!(!enc.input_ids.contains(&tok.eos_id().unwrap()));
}

#[test]
fn empty_and_masked_records_are_dropped_with_reasons() {
    let tok = tokenizer(Some("<s>"), Some("</s>"));
    let t = Template::by_name("internlm2_chat").unwrap();
    let empty = Record::Chat {
        turns: vec![],
        image: None,
    };
    assert_eq!(
        encode(&empty, &t, &tok, 100, None).unwrap(),
        Err(DropReason::Empty)
    );
    let masked = Record::Chat {
        turns: vec![Turn {
            system: None,
            input: "q".into(),
            output: "a".into(),
            loss: false,
        }],
        image: None,
    };
    assert_eq!(
        encode(&masked, &t, &tok, 100, None).unwrap(),
        Err(DropReason::NoTrainedTokens)
    );
    assert!(DropReason::NoTrainedTokens
        .to_string()
        .contains("max_length"));
}

#[test]
fn template_overhead_counts_an_empty_turn() {
    let tok = tokenizer(Some("<s>"), Some("</s>"));
    let internlm2 = Template::by_name("internlm2_chat").unwrap();
    // BOS + "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n" + "<|im_end|>" + "\n".
    let prompt = tok
        .encode(
            "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n",
            false,
        )
        .unwrap();
    let tail =
        tok.encode("<|im_end|>", false).unwrap().len() + tok.encode("\n", false).unwrap().len();
    assert_eq!(template_overhead(&internlm2, &tok), 1 + prompt.len() + tail);
    // plain: BOS + EOS only.
    let plain = Template::by_name("plain").unwrap();
    assert_eq!(template_overhead(&plain, &tok), 2);
    // A max_length that only holds the prompt leaves nothing to train.
    let record = Record::Chat {
        turns: vec![Turn {
            system: None,
            input: String::new(),
            output: "yes".into(),
            loss: true,
        }],
        image: None,
    };
    let n = 1 + prompt.len(); // cut right before the answer: BOS + prompt only
    assert_eq!(
        encode(&record, &internlm2, &tok, n, None).unwrap(),
        Err(DropReason::NoTrainedTokens)
    );
}

#[test]
fn template_without_suffix_needs_an_eos() {
    let tok = tokenizer(Some("<s>"), None);
    let record = Record::Chat {
        turns: vec![Turn {
            system: None,
            input: "q".into(),
            output: "a".into(),
            loss: true,
        }],
        image: None,
    };
    let llama2 = Template::by_name("llama2_chat").unwrap();
    let e = encode(&record, &llama2, &tok, 100, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no EOS token"), "{e}");
    // The chatml suffix is the end of an answer, so no EOS is needed there.
    let internlm2 = Template::by_name("internlm2_chat").unwrap();
    assert!(encode(&record, &internlm2, &tok, 100, None)
        .unwrap()
        .is_ok());
}

#[test]
fn two_images_in_one_turn_is_an_error() {
    let tok = tokenizer(Some("<s>"), Some("</s>"));
    let t = Template::by_name("internlm2_chat").unwrap();
    let record = Record::Chat {
        turns: vec![Turn {
            system: None,
            input: "<image> and <image>".into(),
            output: "a".into(),
            loss: true,
        }],
        image: Some("a.jpg".into()),
    };
    let e = encode(&record, &t, &tok, 100, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 `<image>` markers"), "{e}");
}
