//! Tokenizer backends against ids and strings produced by the Python references
//! (sentencepiece, transformers' slow tokenizer with InternLM2Tokenizer semantics, tokenizers);
//! see scripts/fixtures/make_tokenizer_fixtures.py.

use ftrun::tokenizer::Tokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

const SPECIALS: [&str; 6] = [
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(name: &str) -> Tokenizer {
    Tokenizer::from_path(&fixtures().join(name)).unwrap_or_else(|e| panic!("loading {name}: {e:#}"))
}

fn cases() -> Vec<Value> {
    expected()["cases"].as_array().unwrap().clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Check `encode` (and optionally `decode`) of every fixture text against the reference.
fn check_backend(name: &str, ids_key: &str, decoded_key: Option<&str>) {
    let tok = load(name);
    let mut failures = Vec::new();
    for case in cases() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case[ids_key]);
        let got = tok.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("encode {text:?}:\n  got  {got:?}\n  want {want:?}"));
        }
        if let Some(key) = decoded_key {
            let want_text = case[key].as_str().unwrap();
            let got_text = tok.decode(&want, false).unwrap();
            if got_text != want_text {
                failures.push(format!(
                    "decode of {text:?}: got {got_text:?}, want {want_text:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

#[test]
fn sentencepiece_bpe_with_config_matches_transformers() {
    check_backend("sp_bpe", "sp_bpe", None);
    let tok = load("sp_bpe");
    for case in cases() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["sp_bpe_special"]),
            "with BOS: {text:?}"
        );
    }
}

#[test]
fn sentencepiece_bpe_alone_matches_sentencepiece() {
    check_backend(
        "sp_bpe_noconfig",
        "sp_bpe_noconfig",
        Some("sp_bpe_noconfig_decoded"),
    );
}

#[test]
fn sentencepiece_unigram_matches_sentencepiece() {
    check_backend("sp_unigram", "sp_unigram", Some("sp_unigram_decoded"));
}

#[test]
fn hf_bytelevel_bpe_matches_tokenizers() {
    check_backend("hf_bpe", "hf_bpe", Some("hf_bpe_decoded"));
    let tok = load("hf_bpe");
    for case in cases() {
        let got = tok.decode(&ids(&case["hf_bpe"]), true).unwrap();
        assert_eq!(got, case["hf_bpe_decoded_skip"].as_str().unwrap());
    }
}

#[test]
fn sentencepiece_decode_round_trips() {
    for name in ["sp_bpe", "sp_bpe_noconfig"] {
        let tok = load(name);
        for case in cases() {
            let text = case["text"].as_str().unwrap();
            // A literal '▁' in the input decodes as a space: not a round trip by design.
            if text.contains('\u{2581}') {
                continue;
            }
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids, false).unwrap(), text, "{name}: {text:?}");
        }
    }
    // Skipping specials (and the BOS) leaves the text around them untouched.
    let tok = load("sp_bpe");
    for case in cases() {
        let text = case["text"].as_str().unwrap();
        if text.contains('\u{2581}') {
            continue;
        }
        let mut plain = text.to_string();
        for s in SPECIALS.iter().chain(&["<s>", "</s>", "<unk>"]) {
            plain = plain.replace(s, "");
        }
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.decode(&ids, true).unwrap(), plain, "{text:?}");
    }
}

#[test]
fn sentencepiece_special_tokens_and_ids() {
    let meta = expected();
    let tok = load("sp_bpe");
    assert_eq!(
        tok.vocab_size() as u64,
        meta["sp_bpe_vocab_size"].as_u64().unwrap()
    );
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert!(tok.source.ends_with("sp_bpe/tokenizer.model"));
    for s in SPECIALS {
        let id = meta["sp_bpe_specials"][s].as_u64().unwrap() as u32;
        assert_eq!(tok.token_to_id(s), Some(id), "{s}");
        assert_eq!(tok.id_to_token(id).as_deref(), Some(s));
        assert!(tok.is_special(id), "{s} should be special");
        // Never split, wherever it sits in the text.
        let ids = tok.encode(&format!("x{s}y"), false).unwrap();
        assert!(ids.contains(&id), "{s} in text -> {ids:?}");
    }
    assert!(tok.is_special(1) && tok.is_special(2) && tok.is_special(0));
    let hello = tok.encode("hello", false).unwrap();
    assert!(!hello.is_empty());
    assert!(hello.iter().all(|&id| !tok.is_special(id)));
    assert_eq!(
        tok.id_to_token(tok.token_to_id("<0x0A>").unwrap())
            .as_deref(),
        Some("<0x0A>")
    );
    assert_eq!(tok.token_to_id("no-such-piece"), None);
    assert!(tok.decode(&[tok.vocab_size() as u32], false).is_err());
}

#[test]
fn bos_null_in_config_means_no_bos() {
    let tok = load("hf_bpe");
    assert_eq!(tok.bos_id(), None);
    assert_eq!(tok.eos_id(), tok.token_to_id("<|im_end|>"));
    assert!(tok.eos_id().is_some());
    assert!(tok.is_special(tok.token_to_id("<|endoftext|>").unwrap()));
    assert!(!tok.is_special(tok.encode("the", false).unwrap()[0]));

    // The same SentencePiece model with `"bos_token": null` and another EOS.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("sp_bpe/tokenizer.model"),
        dir.path().join("tokenizer.model"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": null, "eos_token": {"content": "<|im_end|>"}}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_path(dir.path()).unwrap();
    assert_eq!(tok.bos_id(), None);
    assert_eq!(tok.eos_id(), tok.token_to_id("<|im_end|>"));
    // add_bos_token defaults to true, but there is no BOS to add.
    assert_eq!(
        tok.encode("hi", true).unwrap(),
        tok.encode("hi", false).unwrap()
    );
}

#[test]
fn decode_stream_matches_full_decode() {
    for name in ["sp_bpe", "sp_bpe_noconfig", "sp_unigram", "hf_bpe"] {
        let tok = load(name);
        for case in cases() {
            let text = case["text"].as_str().unwrap();
            let ids = tok.encode(text, false).unwrap();
            let mut stream = tok.decode_stream();
            let mut streamed = String::new();
            for &id in &ids {
                if let Some(piece) = stream.step(id).unwrap() {
                    assert!(
                        !piece.contains('\u{FFFD}') || text.contains('\u{FFFD}'),
                        "{name}: partial character streamed for {text:?}: {piece:?}"
                    );
                    streamed.push_str(&piece);
                }
            }
            assert_eq!(
                streamed,
                tok.decode(&ids, false).unwrap(),
                "{name}: {text:?}"
            );
        }
    }
}

#[test]
fn decode_stream_waits_for_complete_characters() {
    let tok = load("sp_bpe");
    // 🦀 is not a trained piece: four byte-fallback tokens.
    let ids = tok.encode("🦀", false).unwrap();
    let bytes: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&id| tok.id_to_token(id).is_some_and(|t| t.starts_with("<0x")))
        .collect();
    assert_eq!(bytes.len(), 4, "{ids:?}");
    let mut stream = tok.decode_stream();
    let out: Vec<Option<String>> = ids.iter().map(|&id| stream.step(id).unwrap()).collect();
    assert_eq!(out.last().unwrap().as_deref(), Some("🦀"));
    assert!(out[..out.len() - 1]
        .iter()
        .all(|o| o.as_deref().unwrap_or("").is_empty()));
    // The dummy-prefix space of the first word is dropped, later ones kept.
    let mut stream = tok.decode_stream();
    let words: Vec<String> = tok
        .encode("hello world", false)
        .unwrap()
        .into_iter()
        .filter_map(|id| stream.step(id).unwrap())
        .collect();
    assert_eq!(words.concat(), "hello world");
    assert!(words[0].starts_with('h'));
}

#[test]
fn fingerprint_covers_model_and_config() {
    let a = load("sp_bpe");
    let b = load("sp_bpe_noconfig");
    assert_eq!(a.fingerprint(), load("sp_bpe").fingerprint());
    // Same tokenizer.model, different added tokens -> different encodings and fingerprints.
    assert_ne!(a.fingerprint(), b.fingerprint());
    assert_ne!(load("hf_bpe").fingerprint(), a.fingerprint());
}

fn err_text(path: &Path) -> String {
    match Tokenizer::from_path(path) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn missing_and_corrupt_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope/tokenizer.model");
    let e = err_text(&missing);
    assert!(
        e.contains("nope/tokenizer.model") && e.contains("does not exist"),
        "{e}"
    );

    let e = err_text(dir.path());
    assert!(e.contains("no tokenizer.json or tokenizer.model"), "{e}");

    let model = dir.path().join("tokenizer.model");
    std::fs::write(&model, b"\xff\xff\xff this is not a protobuf").unwrap();
    let e = err_text(&model);
    assert!(e.contains(&model.display().to_string()), "{e}");
    assert!(e.contains("not a valid SentencePiece"), "{e}");

    // A truncated real model.
    let bytes = std::fs::read(fixtures().join("sp_bpe/tokenizer.model")).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2 + 3]).unwrap();
    let e = err_text(&model);
    assert!(e.contains(&model.display().to_string()), "{e}");

    // A valid protobuf that is not a model (no pieces).
    std::fs::write(&model, b"").unwrap();
    let e = err_text(&model);
    assert!(e.contains("no pieces"), "{e}");

    // A good model with a broken tokenizer_config.json.
    std::fs::write(&model, &bytes).unwrap();
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(&config, "{\"bos_token\": ").unwrap();
    let e = err_text(&model);
    assert!(
        e.contains("tokenizer_config.json") && e.contains("invalid JSON"),
        "{e}"
    );

    std::fs::write(&config, r#"{"eos_token": "<|nope|>"}"#).unwrap();
    let e = err_text(&model);
    assert!(e.contains("eos_token") && e.contains("<|nope|>"), "{e}");

    std::fs::write(
        &config,
        r#"{"added_tokens_decoder": {"x1": {"content": "<a>"}}}"#,
    )
    .unwrap();
    let e = err_text(&model);
    assert!(e.contains("\"x1\"") && e.contains("not a token id"), "{e}");

    std::fs::write(&config, r#"{"add_bos_token": "yes"}"#).unwrap();
    let e = err_text(&model);
    assert!(e.contains("add_bos_token") && e.contains("\"yes\""), "{e}");

    let json = dir.path().join("tokenizer.json");
    std::fs::write(&json, "{}").unwrap();
    let e = err_text(&json);
    assert!(
        e.contains("tokenizer.json") && e.contains("not a valid"),
        "{e}"
    );
}

#[test]
fn added_token_strip_flags_trim_neighbouring_text() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("sp_bpe/tokenizer.model"),
        dir.path().join("tokenizer.model"),
    )
    .unwrap();
    let model = Tokenizer::from_path(&fixtures().join("sp_bpe_noconfig")).unwrap();
    let im_end = model.token_to_id("<|im_end|>").unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        format!(
            r#"{{"added_tokens_decoder": {{"{im_end}": {{"content": "<|im_end|>", "lstrip": true, "rstrip": true, "special": true}}}}}}"#
        ),
    )
    .unwrap();
    let tok = Tokenizer::from_path(dir.path()).unwrap();
    let mut want = model.encode("a", false).unwrap();
    want.push(im_end);
    want.extend(model.encode("b", false).unwrap());
    assert_eq!(tok.encode("a  <|im_end|> \n b", false).unwrap(), want);
}

/// Throughput of the SentencePiece BPE backend on ~1 MB of mixed text. Run with
/// `cargo test --release --test tokenizer -- --ignored --nocapture`.
#[test]
#[ignore]
fn sentencepiece_encode_speed() {
    let tok = load("sp_bpe");
    // The fixture texts (those without a literal '▁', so the decode check below holds).
    let samples: Vec<String> = cases()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .filter(|t| !t.contains('\u{2581}'))
        .collect();
    let mut text = String::new();
    for sample in samples.iter().cycle() {
        if text.len() >= 1 << 20 {
            break;
        }
        text.push_str(sample);
        text.push_str(" 请介绍一下你自己 the assistant model 🦀\n");
    }
    let start = std::time::Instant::now();
    let ids = tok.encode(&text, false).unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "encoded {} bytes -> {} ids in {:.3} s ({:.1} MB/s)",
        text.len(),
        ids.len(),
        secs,
        text.len() as f64 / secs / 1e6
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}
