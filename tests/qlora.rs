//! QLoRA: NF4 block linears + LoRA adapters.
//! - One step's loss and adapter gradients equal the plain engine's on the dequantized weights.
//! - A QLoRA run of the tiny demo trains; its adapter loads with `--bits 4` (unmerged, on the
//!   quantized base) and merges into the ORIGINAL unquantized base, as PEFT does.
//! - Bad `[quant]` settings are refused naming the key.

mod train_support;

use candle_core::{DType, Device, Tensor};
use ftrun::infer::CausalLm;
use ftrun::model::decoder::{Batch, Decoder, LoraSpec, QuantSpec, TrainMode};
use ftrun::model::weights::{load_weights, LazyCheckpoint};
use ftrun::model::ModelConfig;
use ftrun::quant::{dequantize_nf4, quantize_nf4};
use ftrun::train::trainer::{run, Resume};
use std::collections::HashMap;
use std::path::Path;
use train_support::*;

const CPU: Device = Device::Cpu;
const DQ: Option<QuantSpec> = Some(QuantSpec { double_quant: true });

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-12);
    a.iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()))
        / scale
}

/// The demo model's weights with every LoRA-targeted linear replaced by its NF4 round trip
/// (bitsandbytes-exact host quantize + dequantize): what QLoRA computes with.
fn dequantized_copy(
    weights: &HashMap<String, Tensor>,
    linear_names: &[String],
    double_quant: bool,
) -> HashMap<String, Tensor> {
    let mut out = weights.clone();
    for name in linear_names {
        let w = &weights[name];
        let q = quantize_nf4(&values(w), w.dims(), double_quant).unwrap();
        let deq = Tensor::from_vec(dequantize_nf4(&q).unwrap(), w.dims(), &CPU).unwrap();
        out.insert(name.clone(), deq.to_dtype(w.dtype()).unwrap());
    }
    out
}

/// Base weight names (`X.weight`) of the linears that carry adapters.
fn adapted_linears(model: &Decoder) -> Vec<String> {
    model
        .trainable()
        .iter()
        .filter_map(|t| t.name.strip_suffix(".lora_A.weight"))
        .map(|m| format!("{m}.weight"))
        .collect()
}

fn demo_model(root: &Path) -> (ModelConfig, HashMap<String, Tensor>) {
    let s = setup(root, 4);
    let cfg = ModelConfig::from_dir(&s.model).unwrap();
    let w = load_weights(&s.model, DType::F32, &CPU, |_| true).unwrap();
    (cfg, w)
}

fn sample_batch(vocab: usize) -> Batch {
    // Two packed samples.
    let ids: Vec<u32> = (0..40).map(|i| ((i * 7 + 3) % vocab) as u32).collect();
    let labels: Vec<i32> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i % 5 == 0 { -100 } else { t as i32 })
        .collect();
    Batch {
        position_ids: (0..25).chain(0..15).collect(),
        cu_seqlens: vec![0, 25, 40],
        input_ids: ids,
        labels,
    }
}

#[test]
fn qlora_step_equals_lora_on_dequantized_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, w) = demo_model(tmp.path());
    let spec = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: vec![],
    };
    let batch = sample_batch(cfg.vocab_size);
    for double_quant in [true, false] {
        let quant = Some(QuantSpec { double_quant });
        let q = Decoder::new_quantized(
            &cfg,
            &mut w.clone(),
            TrainMode::Lora(spec.clone()),
            quant,
            DType::F32,
            &CPU,
            7,
        )
        .unwrap();
        assert!(q.is_quantized());
        let linears = adapted_linears(&q);
        assert!(!linears.is_empty());
        let mut deq = dequantized_copy(&w, &linears, double_quant);
        let plain = Decoder::new(
            &cfg,
            &mut deq,
            TrainMode::Lora(spec.clone()),
            DType::F32,
            &CPU,
            7,
        )
        .unwrap();
        // B starts at zero, which would hide A's gradient: give both models the same nonzero B.
        let init: Vec<Tensor> = q
            .initial_trainable_values()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, t)| (t + 0.01 * (i as f64 + 1.0)).unwrap())
            .collect();
        let (mut q, mut plain) = (q, plain);
        q.set_trainable(&init).unwrap();
        plain.set_trainable(&init).unwrap();

        let (mut gq, mut gp) = (q.new_grads(), plain.new_grads());
        let sq = q.forward_backward(&batch, 1.0, &mut gq, 99, true).unwrap();
        let sp = plain
            .forward_backward(&batch, 1.0, &mut gp, 99, true)
            .unwrap();
        assert_eq!(sq.n_trained, sp.n_trained);
        let rel = (sq.loss_sum - sp.loss_sum).abs() / sp.loss_sum.abs();
        assert!(
            rel < 1e-6,
            "dq={double_quant}: loss {} vs {}",
            sq.loss_sum,
            sp.loss_sum
        );
        for (i, (a, b)) in gq.slots().iter().zip(&gp.slots()).enumerate() {
            let (a, b) = (values(a.as_ref().unwrap()), values(b.as_ref().unwrap()));
            let d = max_rel_diff(&a, &b);
            assert!(
                d < 1e-5,
                "dq={double_quant}: grad of {} differs by {d}",
                q.trainable()[i].name
            );
        }

        // And the quantization is real: the unquantized model's loss differs.
        let mut orig = w.clone();
        let mut full_prec = Decoder::new(
            &cfg,
            &mut orig,
            TrainMode::Lora(spec.clone()),
            DType::F32,
            &CPU,
            7,
        )
        .unwrap();
        full_prec.set_trainable(&init).unwrap();
        let logit_diff = max_rel_diff(
            &values(&q.logits(&batch).unwrap()),
            &values(&full_prec.logits(&batch).unwrap()),
        );
        assert!(logit_diff > 0.0, "NF4 changed no logit");
        let frozen: HashMap<String, Tensor> = q.frozen_weights().unwrap().into_iter().collect();
        for name in &linears {
            let d = max_rel_diff(&values(&frozen[name]), &values(&w[name]));
            // NF4 keeps ~1/16 of a block's range per step: errors of a few percent of the max.
            assert!((1e-3..0.2).contains(&d), "{name}: NF4 round-trip error {d}");
        }
        assert!(
            q.weight_bytes() < full_prec.weight_bytes(),
            "NF4 weights take {} bytes, f32 {}",
            q.weight_bytes(),
            full_prec.weight_bytes()
        );
    }
}

#[test]
fn lazy_checkpoint_streams_the_same_weights_and_full_training_of_nf4_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 4);
    let cfg = ModelConfig::from_dir(&s.model).unwrap();
    let mut eager = load_weights(&s.model, DType::F32, &CPU, |_| true).unwrap();
    let mut lazy = LazyCheckpoint::open(&s.model).unwrap();
    let a = Decoder::new(&cfg, &mut eager, TrainMode::Frozen, DType::F32, &CPU, 0).unwrap();
    let b = Decoder::new(&cfg, &mut lazy, TrainMode::Frozen, DType::F32, &CPU, 0).unwrap();
    let batch = sample_batch(cfg.vocab_size);
    assert_eq!(
        values(&a.logits(&batch).unwrap()),
        values(&b.logits(&batch).unwrap())
    );
    let mut lazy = LazyCheckpoint::open(&s.model).unwrap();
    let err = Decoder::new_quantized(&cfg, &mut lazy, TrainMode::Full, DQ, DType::F32, &CPU, 0)
        .err()
        .expect("full + NF4 must be refused")
        .to_string();
    assert!(err.contains("full fine-tuning cannot train 4-bit"), "{err}");
}

#[test]
fn qlora_run_trains_loads_with_bits_4_and_merges_into_the_unquantized_base() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 12);
    let cfg = config(
        &s,
        &[
            "train.method=\"qlora\"",
            "train.max_steps=8",
            "optim.lr=5e-3",
            "lora.dropout=0.05",
            "checkpoint.save_steps=8",
            "eval.every_steps=0",
            "log.plot=false",
        ],
    );
    let work = tmp.path().join("work");
    let summary = run(&cfg, &work, Resume::No).unwrap();
    let first = summary.losses.first().unwrap().1;
    let last = summary.losses.last().unwrap().1;
    assert!(last < first * 0.9, "QLoRA did not train: {first} -> {last}");

    // Export the adapter from the checkpoint.
    let adapter = tmp.path().join("adapter");
    ftrun::export::export_checkpoint(summary.final_checkpoint.as_ref().unwrap(), &adapter).unwrap();

    // `--bits 4` + adapter: the adapter unmerged on the NF4 base. Reference: the NF4 round trip of
    // the base with the adapter merged in (plain engine, no quantization code involved).
    let (q, _) =
        ftrun::infer::load::load_for_inference_bits(&s.model, Some(&adapter), "cpu", Some(4))
            .unwrap();
    assert!(q.is_quantized());
    let mcfg = ModelConfig::from_dir(&s.model).unwrap();
    let base = load_weights(&s.model, DType::F32, &CPU, |_| true).unwrap();
    let linears = adapted_linears(&q);
    let mut reference = dequantized_copy(&base, &linears, true);
    let (acfg, lora) = ftrun::export::read_adapter(&adapter).unwrap();
    ftrun::export::merge_into(&mut reference, &acfg, &lora).unwrap();
    let reference = Decoder::new(
        &mcfg,
        &mut reference,
        TrainMode::Frozen,
        DType::F32,
        &CPU,
        0,
    )
    .unwrap();
    let prompt: Vec<u32> = (0..12)
        .map(|i| ((i * 5 + 1) % mcfg.vocab_size) as u32)
        .collect();
    let lq = q.forward_infer(&prompt, &mut q.new_cache()).unwrap();
    let lr = reference
        .forward_infer(&prompt, &mut reference.new_cache())
        .unwrap();
    let d = max_rel_diff(&lq, &lr);
    assert!(d < 1e-4, "--bits 4 logits differ from the reference by {d}");

    // Merge into the ORIGINAL base: merged - base == scale * B A exactly where adapted, and
    // untouched (not NF4-rounded) elsewhere.
    let merged_dir = tmp.path().join("merged");
    ftrun::export::merge(&s.model, &adapter, &merged_dir, usize::MAX).unwrap();
    let merged = load_weights(&merged_dir, DType::F32, &CPU, |_| true).unwrap();
    let scale = acfg.alpha / acfg.r as f64;
    for name in &linears {
        let module = name.strip_suffix(".weight").unwrap();
        let a = &lora[&format!("{module}.lora_A.weight")];
        let b = &lora[&format!("{module}.lora_B.weight")];
        let delta = (b
            .to_dtype(DType::F32)
            .unwrap()
            .matmul(&a.to_dtype(DType::F32).unwrap()))
        .unwrap()
            * scale;
        let expect = (&base[name] + delta.unwrap()).unwrap();
        let d = max_rel_diff(&values(&merged[name]), &values(&expect));
        assert!(d < 1e-5, "{name}: merged != base + scale*B*A ({d})");
    }
    for (name, t) in &base {
        if !linears.contains(name) {
            assert_eq!(
                values(&merged[name]),
                values(t),
                "{name} changed by the merge"
            );
        }
    }

    let err = ftrun::infer::load::load_for_inference_bits(&s.model, None, "cpu", Some(8))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--bits 8"), "{err}");
}

#[test]
fn bad_quant_settings_are_refused_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 4);
    let text = ftrun::config::builtin::get("tiny_demo_assistant").unwrap();
    for (set, key) in [
        ("quant.bits=8", "quant.bits"),
        ("quant.type=\"fp4\"", "quant.type"),
        ("quant.compute_dtype=\"int8\"", "quant.compute_dtype"),
    ] {
        let err = ftrun::config::load_str(text, "<t>", &sets(&s, &["train.method=\"qlora\"", set]))
            .err()
            .unwrap_or_else(|| panic!("{set} accepted"))
            .to_string();
        assert!(err.contains(key), "{set}: {err}");
    }
}
