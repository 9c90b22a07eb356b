//! `ftrun bench` on CPU with tiny shapes: the LLaVA finetune-stage mode (`--llava`: frozen CLIP
//! tower, trained projector, LLM by LoRA / QLoRA, one generated image per row) and the text mode
//! it shares its loop with. What the PyTorch peer replays (batches.json, pixels.safetensors,
//! init_adapter/, init_projector/) is checked against the shapes and masking it must have.

use candle_core::{Device, Tensor};
use ftrun::model::tiny_clip::{make_tiny_llava, TinyLlava};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn ftrun(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ftrun"))
        .args(args)
        .output()
        .expect("run ftrun");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn config_usize(dir: &Path, key: &str) -> usize {
    read_json(&dir.join("config.json"))[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {}", dir.display())) as usize
}

/// LoRA parameters of rank `r` on every linear of the LLM's blocks, counted from its config.
fn llm_lora_params(llm: &Path, r: usize) -> usize {
    let h = config_usize(llm, "hidden_size");
    let inter = config_usize(llm, "intermediate_size");
    let heads = config_usize(llm, "num_attention_heads");
    let kv = config_usize(llm, "num_key_value_heads") * (h / heads);
    let layers = config_usize(llm, "num_hidden_layers");
    // (in, out) of q, k, v, o, gate, up, down: an adapter holds r·(in + out).
    let linears = [
        (h, h),
        (h, kv),
        (h, kv),
        (h, h),
        (h, inter),
        (h, inter),
        (inter, h),
    ];
    layers * linears.iter().map(|(i, o)| r * (i + o)).sum::<usize>()
}

/// `ftrun bench` on the tiny model, on the CPU, writing to `out`: with `--llava` and the tiny
/// tower when `llava`, then `extra`.
fn bench(t: &TinyLlava, llava: bool, out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["bench", "--model", t.llm.to_str().unwrap()];
    if llava {
        args.extend(["--llava", "--visual-encoder", t.clip.to_str().unwrap()]);
    }
    args.extend(["--device", "cpu", "--out", out.to_str().unwrap()]);
    args.extend(extra);
    ftrun(&args)
}

fn bench_llava(t: &TinyLlava, method: &str, out: &Path, seq: usize, batch: usize) -> Value {
    let (seq, batch) = (seq.to_string(), batch.to_string());
    let (ok, err) = bench(
        t,
        true,
        out,
        &[
            "--method",
            method,
            "--r",
            "4",
            "--alpha",
            "8",
            "--seq-len",
            &seq,
            "--batch",
            &batch,
            "--steps",
            "3",
            "--warmup",
            "1",
        ],
    );
    assert!(ok, "bench --llava --method {method} failed:\n{err}");
    assert!(
        err.contains(&format!("ftrun llava_{method}:")),
        "summary line: {err}"
    );
    read_json(&out.join(format!("ftrun_llava_{method}.json")))
}

#[test]
fn llava_lora_bench_writes_what_the_peer_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let t = make_tiny_llava(&tmp.path().join("tiny"), 0).unwrap();
    let out = tmp.path().join("lora");
    let (seq, batch) = (40, 2);
    let res = bench_llava(&t, "lora", &out, seq, batch);

    // The tiny tower: 28 px / 14 px patches = 4 image tokens, 32 wide.
    let image_tokens = 4;
    assert_eq!(res["image_tokens"], image_tokens);
    assert_eq!(res["llava"], true);
    let rows = res["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        let (loss, gn) = (
            r["loss"].as_f64().unwrap(),
            r["grad_norm"].as_f64().unwrap(),
        );
        assert!(
            loss.is_finite() && loss > 0.0 && gn.is_finite() && gn > 0.0,
            "{r}"
        );
    }
    assert!(res["tokens_per_sec"].as_f64().unwrap() > 0.0);
    // Trained: the LLM's adapters and the projector (vision 32 -> LLM hidden), not the tower.
    let (v, h) = (32, config_usize(&t.llm, "hidden_size"));
    let projector = v * h + h + h * h + h;
    assert_eq!(
        res["trainable_params"].as_u64().unwrap() as usize,
        llm_lora_params(&t.llm, 4) + projector
    );

    // Rows of `seq` tokens; the image's rows at IMAGE_AT (5) are id 0 with label -100, every
    // other position holds a random token (>= 3) trained as itself (labels = ids, as
    // transformers shifts them), except a later row's first label (never a target).
    let batches = read_json(&out.join("batches.json"));
    assert_eq!(batches.as_array().unwrap().len(), 3);
    let vocab = config_usize(&t.llm, "vocab_size") as u64;
    for step in batches.as_array().unwrap() {
        let ids = step["input_ids"].as_array().unwrap();
        let labels = step["labels"].as_array().unwrap();
        assert_eq!(ids.len(), batch);
        for (row, (ids, labels)) in ids.iter().zip(labels).enumerate() {
            let ids: Vec<u64> = ids
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            let labels: Vec<i64> = labels
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            assert_eq!((ids.len(), labels.len()), (seq, seq));
            for (i, (&id, &label)) in ids.iter().zip(&labels).enumerate() {
                if (5..5 + image_tokens).contains(&i) {
                    assert_eq!((id, label), (0, -100), "image row {i}");
                } else if i == 0 && row > 0 {
                    assert_eq!(label, -100);
                } else {
                    assert!((3..vocab).contains(&id), "token {id} at {i}");
                    assert_eq!(label, id as i64, "label at {i}");
                }
            }
        }
    }

    // One preprocessed image per row: [steps, batch, 3, 28, 28]. The generated 480x360 images
    // are padded to a square with CLIP's mean colour (finetune stage), so the top rows hold
    // the mean: ~0 after normalization.
    let px = candle_core::safetensors::load(out.join("pixels.safetensors"), &Device::Cpu)
        .unwrap()
        .remove("pixel_values")
        .unwrap();
    assert_eq!(px.dims(), [3, batch, 3, 28, 28]);
    let top_row = px
        .narrow(3, 0, 1)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(top_row.to_scalar::<f32>().unwrap() < 0.02);
    let middle = px
        .narrow(3, 14, 1)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        middle.to_scalar::<f32>().unwrap() > 0.1,
        "the image itself is not mean-coloured"
    );

    // The initial adapter (PEFT) and projector the peer starts from.
    let adapter = read_json(&out.join("init_adapter/adapter_config.json"));
    assert_eq!(adapter["r"], 4);
    let proj =
        candle_core::safetensors::load(out.join("init_projector/model.safetensors"), &Device::Cpu)
            .unwrap();
    let dims = |n: &str| proj[n].dims().to_vec();
    assert_eq!(dims("model.0.weight"), [h, v]);
    assert_eq!(dims("model.0.bias"), [h]);
    assert_eq!(dims("model.2.weight"), [h, h]);
    assert_eq!(dims("model.2.bias"), [h]);
    // nn.Linear's init: uniform within ±1/sqrt(fan_in).
    let w1: &Tensor = &proj["model.0.weight"];
    let bound = w1
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(bound <= 1.0 / (v as f32).sqrt() && bound > 0.5 / (v as f32).sqrt());
}

#[test]
fn llava_qlora_bench_trains_the_same_trainables_on_a_4bit_llm() {
    let tmp = tempfile::tempdir().unwrap();
    let t = make_tiny_llava(&tmp.path().join("tiny"), 1).unwrap();
    let lora = bench_llava(&t, "lora", &tmp.path().join("lora"), 24, 1);
    let qlora = bench_llava(&t, "qlora", &tmp.path().join("qlora"), 24, 1);
    assert_eq!(lora["trainable_params"], qlora["trainable_params"]);
    // 4-bit blocks: a lighter LLM than the bf16/f32 one, and a different (quantized) loss.
    assert!(qlora["weight_mib"].as_f64().unwrap() < lora["weight_mib"].as_f64().unwrap());
    let (l, q) = (
        lora["rows"][0]["loss"].as_f64().unwrap(),
        qlora["rows"][0]["loss"].as_f64().unwrap(),
    );
    assert!(q.is_finite() && l != q, "lora {l} qlora {q}");
}

#[test]
fn llava_bench_rejects_rows_too_short_for_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let t = make_tiny_llava(&tmp.path().join("tiny"), 0).unwrap();
    let out = tmp.path().join("short");
    let (ok, err) = bench(&t, true, &out, &["--seq-len", "10"]);
    assert!(!ok);
    assert!(
        err.contains("--seq-len 10 cannot hold the 4 image tokens") && err.contains("tiny-clip"),
        "{err}"
    );
    // --llava needs the tower.
    let (ok, err) = ftrun(&[
        "bench",
        "--llava",
        "--model",
        t.llm.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("--visual-encoder"), "{err}");
}

#[test]
fn text_bench_trains_random_rows_with_labels_equal_to_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let t = make_tiny_llava(&tmp.path().join("tiny"), 0).unwrap();
    let out = tmp.path().join("text");
    let (ok, err) = bench(
        &t,
        false,
        &out,
        &[
            "--method",
            "lora",
            "--r",
            "4",
            "--seq-len",
            "32",
            "--steps",
            "2",
            "--warmup",
            "1",
        ],
    );
    assert!(ok, "{err}");
    let res = read_json(&out.join("ftrun_lora.json"));
    assert_eq!(res["rows"].as_array().unwrap().len(), 2);
    assert_eq!(
        res["trainable_params"].as_u64().unwrap() as usize,
        llm_lora_params(&t.llm, 4)
    );
    assert!(res.get("llava").is_none());
    let batches = read_json(&out.join("batches.json"));
    for step in batches.as_array().unwrap() {
        assert_eq!(step["input_ids"], step["labels"]);
        assert_eq!(step["input_ids"][0].as_array().unwrap().len(), 32);
    }
    assert!(out.join("init_adapter/adapter_model.safetensors").is_file());
    assert!(!out.join("pixels.safetensors").exists());
}

/// sha256 of a file, hex.
fn sha256(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

#[test]
fn llava_bench_steps_match_transformers_llava_with_peft_on_cpu() {
    // tests/fixtures/llava_bench (scripts/fixtures/make_llava_bench_fixture.py): a tiny Llama and
    // the losses / grad norms scripts/llava_torch.py gets replaying this bench in f32 on CPU
    // (LlavaForConditionalGeneration with the tiny CLIP fixture; peft LoRA or the whole LLM).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let fixture = root.join("llava_bench");
    let expected = read_json(&fixture.join("expected.json"));
    let args: Vec<String> = expected["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    for method in ["lora", "full"] {
        let want = &expected["methods"][method];
        let out = tmp.path().join(method);
        let mut cmd = vec![
            "bench".to_string(),
            "--llava".into(),
            "--model".into(),
            fixture.join("llm").display().to_string(),
            "--visual-encoder".into(),
            root.join("clip/model").display().to_string(),
            "--method".into(),
            method.into(),
            "--out".into(),
            out.display().to_string(),
        ];
        cmd.extend(args.iter().cloned());
        let (ok, err) = ftrun(&cmd.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{err}");
        // The peer replayed exactly these inputs.
        for (file, hash) in want["inputs_sha256"].as_object().unwrap() {
            assert_eq!(
                sha256(&out.join(file)),
                hash.as_str().unwrap(),
                "{method}: the bench's {file} changed since the fixture was made; rerun \
                 scripts/fixtures/make_llava_bench_fixture.py"
            );
        }
        let got = read_json(&out.join(format!("ftrun_llava_{method}.json")));
        assert_eq!(got["trainable_params"], want["trainable_params"]);
        for (step, row) in got["rows"].as_array().unwrap().iter().enumerate() {
            for (key, tol) in [("loss", 1e-5), ("grad_norm", 1e-4)] {
                let (g, w) = (
                    row[key].as_f64().unwrap(),
                    want[key][step].as_f64().unwrap(),
                );
                assert!(
                    ((g - w) / w).abs() < tol,
                    "{method} step {}: {key} {g} vs transformers {w}",
                    step + 1
                );
            }
        }
    }
}
