//! Getting a trained model out: PEFT adapter export, full-model export and merge, each checked
//! against the trained decoder's own logits.

mod train_support;

use candle_core::{DType, Device, Tensor};
use ftrun::model::decoder::{Batch, Decoder, LoraSpec, TrainMode};
use ftrun::model::weights::load_weights;
use ftrun::model::ModelConfig;
use ftrun::train::trainer::{run, Resume};
use std::collections::HashMap;
use std::path::Path;
use train_support::*;

const SHORT: &[&str] = &[
    "train.max_steps=3",
    "checkpoint.save_steps=0",
    "eval.every_steps=0",
    "log.plot=false",
];

/// A probe batch of the question, as ids.
fn probe(model_dir: &Path) -> Batch {
    let tok = ftrun::tokenizer::Tokenizer::from_path(model_dir).unwrap();
    let ids = tok.encode(&format!("{QUESTION}{ANSWER}"), false).unwrap();
    let labels = ids.iter().map(|&i| i as i32).collect();
    Batch::single(ids, labels)
}

fn frozen(dir: &Path) -> Decoder {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let mut w = load_weights(dir, DType::F32, &Device::Cpu, |_| true).unwrap();
    Decoder::new(&cfg, &mut w, TrainMode::Frozen, DType::F32, &Device::Cpu, 0).unwrap()
}

/// The base model with `mode` and the given trainable values, as the trainer holds it.
fn trained(base: &Path, mode: TrainMode, values: &HashMap<String, Tensor>) -> Decoder {
    let cfg = ModelConfig::from_dir(base).unwrap();
    let mut w = load_weights(base, DType::F32, &Device::Cpu, |_| true).unwrap();
    let mut d = Decoder::new(&cfg, &mut w, mode, DType::F32, &Device::Cpu, 0).unwrap();
    let v: Vec<Tensor> = d
        .trainable()
        .iter()
        .map(|t| values[&t.name].clone())
        .collect();
    d.set_trainable(&v).unwrap();
    d
}

#[test]
fn lora_checkpoint_exports_a_peft_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 8);
    let summary = run(&config(&s, SHORT), &tmp.path().join("work"), Resume::No).unwrap();
    let ckpt = summary.final_checkpoint.unwrap();
    let out = tmp.path().join("adapter");
    let (ok, _, err, _) = ftrun(&["export", ckpt.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(ok, "{err}");

    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "CAUSAL_LM");
    assert_eq!(c["r"], 16);
    assert_eq!(c["lora_alpha"].as_f64(), Some(32.0));
    assert_eq!(c["bias"], "none");
    assert_eq!(c["fan_in_fan_out"], false);
    assert_eq!(c["base_model_name_or_path"], s.model.display().to_string());
    let mut targets: Vec<&str> = c["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        [
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj"
        ]
    );

    // PEFT's names and shapes: lora_A [r, in], lora_B [out, r].
    let t = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let (h, kv, inter, r) = (128, 64, 352, 16);
    let modules = [
        ("self_attn.q_proj", h, h),
        ("self_attn.k_proj", kv, h),
        ("self_attn.v_proj", kv, h),
        ("self_attn.o_proj", h, h),
        ("mlp.gate_proj", inter, h),
        ("mlp.up_proj", inter, h),
        ("mlp.down_proj", h, inter),
    ];
    let mut expected = 0;
    for i in 0..4 {
        for (m, out_f, in_f) in modules {
            let a = &t[&format!("base_model.model.model.layers.{i}.{m}.lora_A.weight")];
            let b = &t[&format!("base_model.model.model.layers.{i}.{m}.lora_B.weight")];
            assert_eq!(a.dims(), [r, in_f], "{m}");
            assert_eq!(b.dims(), [out_f, r], "{m}");
            assert_eq!(a.dtype(), DType::F32);
            expected += 2;
        }
    }
    assert_eq!(t.len(), expected, "no other tensors");
    // The values are the checkpoint's fp32 masters.
    let ck = ftrun::train::checkpoint::load(&ckpt, &Device::Cpu).unwrap();
    for (name, v) in &ck.trainable {
        assert_eq!(
            max_abs_diff(v, &t[&format!("base_model.model.{name}")]),
            0.0,
            "{name}"
        );
    }
}

#[test]
fn full_checkpoint_exports_a_loadable_hf_model_with_the_trained_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 8);
    let mut extra = SHORT.to_vec();
    extra.extend(["train.method=\"full\"", "optim.lr=1e-3"]);
    let summary = run(&config(&s, &extra), &tmp.path().join("work"), Resume::No).unwrap();
    let ckpt = summary.final_checkpoint.unwrap();
    let out = tmp.path().join("hf");
    let (ok, _, err, _) = ftrun(&["export", ckpt.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(ok, "{err}");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(
        ModelConfig::from_dir(&out).unwrap(),
        ModelConfig::from_dir(&s.model).unwrap()
    );

    let ck = ftrun::train::checkpoint::load(&ckpt, &Device::Cpu).unwrap();
    let values: HashMap<String, Tensor> = ck.trainable.into_iter().collect();
    let want = trained(&s.model, TrainMode::Full, &values);
    let got = frozen(&out);
    let batch = probe(&s.model);
    let (lw, lg) = (want.logits(&batch).unwrap(), got.logits(&batch).unwrap());
    assert!(
        max_abs_diff(&lw, &lg) <= 1e-6,
        "exported logits differ by {}",
        max_abs_diff(&lw, &lg)
    );
    // And training changed them (the check is not comparing the base with itself).
    assert!(max_abs_diff(&frozen(&s.model).logits(&batch).unwrap(), &lg) > 1e-3);
}

#[test]
fn merge_writes_shards_and_equals_base_plus_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 8);
    let summary = run(&config(&s, SHORT), &tmp.path().join("work"), Resume::No).unwrap();
    let adapter = tmp.path().join("adapter");
    ftrun::export::export_checkpoint(&summary.final_checkpoint.unwrap(), &adapter).unwrap();
    let out = tmp.path().join("merged");
    let (ok, _, err, _) = ftrun(&[
        "merge",
        s.model.to_str().unwrap(),
        adapter.to_str().unwrap(),
        out.to_str().unwrap(),
        "--max-shard-size",
        "1MB",
    ]);
    assert!(ok, "{err}");

    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let mut shards: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    shards.sort();
    shards.dedup();
    assert!(
        shards.len() > 1,
        "a model of a few MB in 1MB shards: {shards:?}"
    );
    for sh in &shards {
        assert!(out.join(sh).is_file(), "{sh} missing");
        assert!(
            sh.starts_with("model-")
                && sh.ends_with(&format!("-of-{:05}.safetensors", shards.len())),
            "{sh}"
        );
    }
    let base_names = load_weights(&s.model, DType::F32, &Device::Cpu, |_| true).unwrap();
    assert_eq!(
        map.len(),
        base_names.len(),
        "every base tensor, nothing else"
    );
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }

    // base + adapter as the trainer computes it (unmerged LoRA) vs the merged model.
    let (acfg, lora) = ftrun::export::read_adapter(&adapter).unwrap();
    assert_eq!((acfg.r, acfg.alpha), (16, 32.0));
    let spec = LoraSpec {
        r: acfg.r,
        alpha: acfg.alpha,
        dropout: 0.0,
        targets: vec![],
    };
    let want = trained(&s.model, TrainMode::Lora(spec), &lora);
    let (merged, _) = ftrun::infer::load::load_for_inference(&out, None, "cpu").unwrap();
    let batch = probe(&s.model);
    let (lw, lm) = (want.logits(&batch).unwrap(), merged.logits(&batch).unwrap());
    let d = max_abs_diff(&lw, &lm);
    assert!(d <= 1e-5, "merged logits differ from base + adapter by {d}");
    assert!(
        max_abs_diff(&frozen(&s.model).logits(&batch).unwrap(), &lm) > 1e-3,
        "the adapter changed the model"
    );
}
