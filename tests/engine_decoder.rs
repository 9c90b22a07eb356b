//! The whole decoder (tiny Llama with GQA, tiny Qwen2 with q/k/v bias and tied embeddings, tiny
//! InternLM2 with fused `wqkv`; LoRA and full fine-tuning) against an independent composite
//! reference model differentiated by candle autograd, and against finite differences.

mod engine_common;

use candle_core::{DType, Device, Tensor, Var};
use engine_common::{assert_close, attention_reference, ce_reference, flat, randn};
use ftrun::infer::CausalLm;
use ftrun::model::decoder::{Batch, Decoder, Grads, LoraSpec, TrainMode};
use ftrun::model::{Arch, ModelConfig};
use std::cell::RefCell;
use std::collections::HashMap;

const CPU: Device = Device::Cpu;

fn config(arch: Arch) -> ModelConfig {
    let (name, extra) = match arch {
        Arch::Llama => ("LlamaForCausalLM", r#""tie_word_embeddings": false"#),
        Arch::Qwen2 => ("Qwen2ForCausalLM", r#""tie_word_embeddings": true"#),
        Arch::InternLM2 => (
            "InternLM2ForCausalLM",
            r#""tie_word_embeddings": false, "bias": false"#,
        ),
    };
    ModelConfig::from_json(&format!(
        r#"{{"architectures": ["{name}"], "vocab_size": 17, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, {extra}}}"#
    ))
    .unwrap()
}

/// Linear leaves of a block: (HF prefix under `model.layers.{i}`, out, in, has bias).
fn linears(cfg: &ModelConfig) -> Vec<(String, usize, usize, bool)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let b = cfg.qkv_bias;
    match cfg.arch {
        Arch::InternLM2 => vec![
            ("attention.wqkv".into(), q + 2 * kv, h, b),
            ("attention.wo".into(), h, q, false),
            ("feed_forward.w1".into(), i, h, false),
            ("feed_forward.w3".into(), i, h, false),
            ("feed_forward.w2".into(), h, i, false),
        ],
        _ => vec![
            ("self_attn.q_proj".into(), q, h, b),
            ("self_attn.k_proj".into(), kv, h, b),
            ("self_attn.v_proj".into(), kv, h, b),
            ("self_attn.o_proj".into(), h, q, false),
            ("mlp.gate_proj".into(), i, h, false),
            ("mlp.up_proj".into(), i, h, false),
            ("mlp.down_proj".into(), h, i, false),
        ],
    }
}

fn norm_names(arch: Arch) -> (&'static str, &'static str, &'static str, &'static str) {
    match arch {
        Arch::InternLM2 => (
            "model.tok_embeddings.weight",
            "attention_norm",
            "ffn_norm",
            "output.weight",
        ),
        _ => (
            "model.embed_tokens.weight",
            "input_layernorm",
            "post_attention_layernorm",
            "lm_head.weight",
        ),
    }
}

/// Random f64 weights under the HF names.
fn tiny_weights(cfg: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
    let (embed, n1, n2, head) = norm_names(cfg.arch);
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut w = HashMap::new();
    let mut s = seed;
    let mut next = || {
        s += 1;
        s
    };
    w.insert(embed.to_string(), randn(&[v, h], 0.5, next()));
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        for n in [n1, n2] {
            w.insert(
                format!("{p}.{n}.weight"),
                (randn(&[h], 0.2, next()) + 1.0).unwrap(),
            );
        }
        for (name, o, i, bias) in linears(cfg) {
            w.insert(format!("{p}.{name}.weight"), randn(&[o, i], 0.3, next()));
            if bias {
                w.insert(format!("{p}.{name}.bias"), randn(&[o], 0.3, next()));
            }
        }
    }
    w.insert(
        "model.norm.weight".into(),
        (randn(&[h], 0.2, next()) + 1.0).unwrap(),
    );
    if !cfg.tie_word_embeddings {
        w.insert(head.into(), randn(&[v, h], 0.5, next()));
    }
    w
}

// ---- independent reference model (composite candle ops, autograd-differentiable) -----------

fn ref_rmsnorm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let ms = (x.sqr().unwrap().mean_keepdim(1).unwrap() + eps).unwrap();
    x.broadcast_div(&ms.sqrt().unwrap())
        .unwrap()
        .broadcast_mul(w)
        .unwrap()
}

fn ref_rope(x: &Tensor, positions: &[u32], theta: f64) -> Tensor {
    let (n, _, d) = x.dims3().unwrap();
    let mut cos = vec![0.0; n * d];
    let mut sin = vec![0.0; n * d];
    for (t, &pos) in positions.iter().enumerate().take(n) {
        for j in 0..d {
            let i = j % (d / 2);
            let ang = pos as f64 * (1.0 / theta.powf(2.0 * i as f64 / d as f64)) as f32 as f64;
            cos[t * d + j] = ang.cos();
            sin[t * d + j] = ang.sin();
        }
    }
    let cos = Tensor::from_vec(cos, (n, 1, d), &CPU).unwrap();
    let sin = Tensor::from_vec(sin, (n, 1, d), &CPU).unwrap();
    let rot = Tensor::cat(
        &[
            &x.narrow(2, d / 2, d / 2).unwrap().neg().unwrap(),
            &x.narrow(2, 0, d / 2).unwrap(),
        ],
        2,
    )
    .unwrap();
    (x.broadcast_mul(&cos).unwrap() + rot.broadcast_mul(&sin).unwrap()).unwrap()
}

/// `x Wᵀ + b + scale · (x Aᵀ) Bᵀ` using whatever of these `p` holds.
fn ref_linear(p: &HashMap<String, Tensor>, prefix: &str, x: &Tensor, lora_scale: f64) -> Tensor {
    let mut y = x
        .matmul(&p[&format!("{prefix}.weight")].t().unwrap())
        .unwrap();
    if let Some(b) = p.get(&format!("{prefix}.bias")) {
        y = y.broadcast_add(b).unwrap();
    }
    if let Some(a) = p.get(&format!("{prefix}.lora_A.weight")) {
        let b = &p[&format!("{prefix}.lora_B.weight")];
        let d = (x
            .matmul(&a.t().unwrap())
            .unwrap()
            .matmul(&b.t().unwrap())
            .unwrap()
            * lora_scale)
            .unwrap();
        y = (y + d).unwrap();
    }
    y
}

/// Loss sum of the reference model (no dropout).
fn ref_loss(
    cfg: &ModelConfig,
    p: &HashMap<String, Tensor>,
    batch: &Batch,
    lora_scale: f64,
) -> Tensor {
    let (embed, n1, n2, head) = norm_names(cfg.arch);
    let n = batch.input_ids.len();
    let (hq, hkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let ids = Tensor::new(batch.input_ids.as_slice(), &CPU).unwrap();
    let mut x = p[embed].index_select(&ids, 0).unwrap();
    let lin = |prefix: &str, x: &Tensor| ref_linear(p, prefix, x, lora_scale);
    for l in 0..cfg.num_layers {
        let pre = format!("model.layers.{l}");
        let h = ref_rmsnorm(&x, &p[&format!("{pre}.{n1}.weight")], cfg.rms_norm_eps);
        let (q, k, v, o_name, mlp) = match cfg.arch {
            Arch::InternLM2 => {
                // HF InternLM2: "b q (h gs d) -> b q h gs d", q = [..., :gs-2, :], k = [..., -2, :], v = [..., -1, :]
                let gs = hq / hkv + 2;
                let qkv = lin(&format!("{pre}.attention.wqkv"), &h)
                    .reshape((n, hkv, gs, d))
                    .unwrap();
                let q = qkv
                    .narrow(2, 0, gs - 2)
                    .unwrap()
                    .reshape((n, hq, d))
                    .unwrap();
                let k = qkv
                    .narrow(2, gs - 2, 1)
                    .unwrap()
                    .reshape((n, hkv, d))
                    .unwrap();
                let v = qkv
                    .narrow(2, gs - 1, 1)
                    .unwrap()
                    .reshape((n, hkv, d))
                    .unwrap();
                (
                    q,
                    k,
                    v,
                    "attention.wo",
                    ["feed_forward.w1", "feed_forward.w3", "feed_forward.w2"],
                )
            }
            _ => (
                lin(&format!("{pre}.self_attn.q_proj"), &h)
                    .reshape((n, hq, d))
                    .unwrap(),
                lin(&format!("{pre}.self_attn.k_proj"), &h)
                    .reshape((n, hkv, d))
                    .unwrap(),
                lin(&format!("{pre}.self_attn.v_proj"), &h)
                    .reshape((n, hkv, d))
                    .unwrap(),
                "self_attn.o_proj",
                ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
            ),
        };
        let q = ref_rope(&q, &batch.position_ids, cfg.rope_theta);
        let k = ref_rope(&k, &batch.position_ids, cfg.rope_theta);
        let a = attention_reference(&q, &k, &v, &batch.cu_seqlens)
            .reshape((n, hq * d))
            .unwrap();
        x = (x + lin(&format!("{pre}.{o_name}"), &a)).unwrap();
        let h2 = ref_rmsnorm(&x, &p[&format!("{pre}.{n2}.weight")], cfg.rms_norm_eps);
        let g = lin(&format!("{pre}.{}", mlp[0]), &h2);
        let u = lin(&format!("{pre}.{}", mlp[1]), &h2);
        let silu = g
            .broadcast_div(&(g.neg().unwrap().exp().unwrap() + 1.0).unwrap())
            .unwrap();
        x = (x + lin(&format!("{pre}.{}", mlp[2]), &(silu * u).unwrap())).unwrap();
    }
    let hf = ref_rmsnorm(&x, &p["model.norm.weight"], cfg.rms_norm_eps);
    let head_w = if cfg.tie_word_embeddings {
        &p[embed]
    } else {
        &p[head]
    };
    ce_reference(&hf, head_w, &batch.labels)
}

/// Two packed samples with restarting positions; the second sample's first label is -100 so
/// no target crosses the boundary.
fn packed_batch(vocab: u32) -> Batch {
    let ids: Vec<u32> = [1u32, 5, 9, 3, 14, 2, 7, 11, 4, 6]
        .iter()
        .map(|i| i % vocab)
        .collect();
    let labels = vec![-100, -100, 9, 3, 14, -100, -100, 11, 4, 6];
    Batch {
        input_ids: ids,
        labels,
        position_ids: vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4],
        cu_seqlens: vec![0, 5, 10],
    }
}

fn lora(dropout: f64) -> TrainMode {
    lora_on(dropout, &[])
}

/// LoRA r 2, alpha 4 on the linears `targets` names (all of them when empty).
fn lora_on(dropout: f64, targets: &[&str]) -> TrainMode {
    TrainMode::Lora(LoraSpec {
        r: 2,
        alpha: 4.0,
        dropout,
        targets: targets.iter().map(|t| t.to_string()).collect(),
    })
}

fn build(arch: Arch, mode: TrainMode) -> (ModelConfig, HashMap<String, Tensor>, Decoder) {
    let cfg = config(arch);
    let w = tiny_weights(&cfg, 1000);
    let mut taken = w.clone();
    let dec = Decoder::new(&cfg, &mut taken, mode, DType::F64, &CPU, 5).unwrap();
    assert!(
        taken.is_empty(),
        "unused weights: {:?}",
        taken.keys().collect::<Vec<_>>()
    );
    (cfg, w, dec)
}

/// Gives every trainable a random value (so LoRA B is non-zero and A-gradients are non-trivial),
/// set as the trainer sets them: one flat buffer, so each projection group's adapters run as one
/// GEMM group over their stacked A's.
fn randomize_trainables(dec: &mut Decoder, seed: u64) -> Vec<Tensor> {
    let vals: Vec<Tensor> = dec
        .trainable()
        .iter()
        .enumerate()
        .map(|(i, t)| randn(&t.shape, 0.3, seed + i as u64))
        .collect();
    let flat: Vec<Tensor> = vals.iter().map(|v| v.flatten_all().unwrap()).collect();
    dec.set_trainable_flat(&Tensor::cat(&flat, 0).unwrap())
        .unwrap();
    vals
}

/// Loss and every gradient of the decoder vs the autograd reference; FD on sampled coordinates.
fn check_against_reference(arch: Arch, mode: TrainMode, lora_scale: f64) {
    let (cfg, w, mut dec) = build(arch, mode);
    let vals = randomize_trainables(&mut dec, 77);
    let batch = packed_batch(cfg.vocab_size as u32);
    let loss_scale = 0.5;
    let mut grads = dec.new_grads();
    let stats = dec
        .forward_backward(&batch, loss_scale, &mut grads, 3, false)
        .unwrap();
    // reference: frozen weights as constants, trainables as Vars
    let mut params: HashMap<String, Tensor> = w;
    let mut vars = Vec::new();
    for (info, v) in dec.trainable().iter().zip(&vals) {
        let var = Var::from_tensor(v).unwrap();
        params.insert(info.name.clone(), var.as_tensor().clone());
        vars.push(var);
    }
    let loss = ref_loss(&cfg, &params, &batch, lora_scale);
    assert_eq!(stats.n_trained, 6);
    let lref = loss.to_scalar::<f64>().unwrap();
    assert!(
        (stats.loss_sum - lref).abs() < 1e-10 * lref.abs(),
        "loss {} vs {lref}",
        stats.loss_sum
    );
    let g = loss.backward().unwrap();
    for ((info, var), slot) in dec.trainable().iter().zip(&vars).zip(&grads.slots()) {
        let expected = (g.get(var.as_tensor()).unwrap() * loss_scale).unwrap();
        assert_close(slot.as_ref().unwrap(), &expected, 1e-9, &info.name);
    }
    // finite differences of the decoder's own loss on a few coordinates of a few trainables
    let dec = RefCell::new(dec);
    let n_tr = vals.len();
    for slot in [0, n_tr / 2, n_tr - 1] {
        let f = |t: &Tensor| {
            let mut d = dec.borrow_mut();
            let mut v = vals.clone();
            v[slot] = t.clone();
            d.set_trainable(&v).unwrap();
            let l = d.loss(&batch).unwrap().loss_sum * loss_scale;
            d.set_trainable(&vals).unwrap();
            l
        };
        let numel = vals[slot].elem_count();
        let coords: Vec<usize> = [0, numel / 3, numel - 1].to_vec();
        let name = dec.borrow().trainable()[slot].name.clone();
        engine_common::check_fd(
            &f,
            &vals[slot],
            &grads.slot(slot).unwrap(),
            Some(&coords),
            1e-6,
            &name,
        );
    }
}

#[test]
fn llama_full_matches_reference() {
    check_against_reference(Arch::Llama, TrainMode::Full, 0.0);
}

#[test]
fn llama_lora_matches_reference() {
    check_against_reference(Arch::Llama, lora(0.0), 2.0);
}

#[test]
fn qwen2_bias_tied_full_matches_reference() {
    let (_, _, dec) = build(Arch::Qwen2, TrainMode::Full);
    let names: Vec<&str> = dec.trainable().iter().map(|t| t.name.as_str()).collect();
    assert!(names.contains(&"model.layers.0.self_attn.q_proj.bias"));
    assert!(
        !names.iter().any(|n| n.starts_with("lm_head")),
        "tied: no separate head"
    );
    check_against_reference(Arch::Qwen2, TrainMode::Full, 0.0);
}

#[test]
fn qwen2_lora_matches_reference() {
    check_against_reference(Arch::Qwen2, lora(0.0), 2.0);
}

#[test]
fn internlm2_wqkv_full_matches_reference() {
    check_against_reference(Arch::InternLM2, TrainMode::Full, 0.0);
}

#[test]
fn internlm2_wqkv_lora_matches_reference() {
    let (_, _, dec) = build(Arch::InternLM2, lora(0.0));
    let names: Vec<&str> = dec.trainable().iter().map(|t| t.name.as_str()).collect();
    assert!(names.contains(&"model.layers.1.attention.wqkv.lora_A.weight"));
    assert_eq!(names.len(), 2 * 5 * 2, "A and B for 5 linears in 2 layers");
    check_against_reference(Arch::InternLM2, lora(0.0), 2.0);
}

fn run_step(dec: &Decoder, batch: &Batch, checkpointing: bool) -> (f64, Grads) {
    let mut grads = dec.new_grads();
    let s = dec
        .forward_backward(batch, 1.0, &mut grads, 11, checkpointing)
        .unwrap();
    (s.loss_sum, grads)
}

/// The adapters of q/k/v and gate/up run as one GEMM group each when the trainables are set as
/// one flat buffer, and one at a time when set as separate tensors: the same loss and gradients
/// (every linear adapted, and a subset that leaves k and gate without adapters).
#[test]
fn grouped_adapters_equal_one_adapter_at_a_time() {
    for targets in [&[][..], &["q_proj", "v_proj", "up_proj", "down_proj"]] {
        let (cfg, _, mut dec) = build(Arch::Llama, lora_on(0.0, targets));
        let vals = randomize_trainables(&mut dec, 9);
        let batch = packed_batch(cfg.vocab_size as u32);
        let (l_grouped, g_grouped) = run_step(&dec, &batch, false);
        dec.set_trainable(&vals).unwrap();
        let (l_single, g_single) = run_step(&dec, &batch, false);
        assert!((l_grouped - l_single).abs() < 1e-12 * l_single.abs());
        for ((a, b), info) in g_grouped
            .slots()
            .iter()
            .zip(&g_single.slots())
            .zip(dec.trainable())
        {
            assert_close(a.as_ref().unwrap(), b.as_ref().unwrap(), 1e-12, &info.name);
        }
    }
}

#[test]
fn checkpointing_is_bit_identical_with_lora_dropout_and_full() {
    for (arch, mode) in [
        (Arch::Llama, lora(0.3)),
        (Arch::InternLM2, lora(0.3)),
        (Arch::Qwen2, TrainMode::Full),
    ] {
        let (cfg, _, mut dec) = build(arch, mode);
        randomize_trainables(&mut dec, 5);
        let batch = packed_batch(cfg.vocab_size as u32);
        let (l0, g0) = run_step(&dec, &batch, false);
        let (l1, g1) = run_step(&dec, &batch, true);
        assert_eq!(l0, l1);
        for (a, b) in g0.slots().iter().zip(&g1.slots()) {
            assert_eq!(flat(a.as_ref().unwrap()), flat(b.as_ref().unwrap()));
        }
    }
}

#[test]
fn activation_budget_skips_recomputes_and_changes_no_gradient() {
    // LoRA with dropout: a rerun gate/up half must draw the forward's dropout masks again.
    for (arch, mode) in [(Arch::Llama, lora(0.3)), (Arch::Qwen2, TrainMode::Full)] {
        let (cfg, _, mut dec) = build(arch, mode);
        randomize_trainables(&mut dec, 5);
        let batch = packed_batch(cfg.vocab_size as u32);
        let layers = cfg.num_layers;
        let (l_ref, g_ref) = run_step(&dec, &batch, true);
        // (recomputed, gate/up recomputed, slimmed) blocks, budgets from 0 in steps of 256
        // bytes (a fraction of the smallest plan change here) until nothing is recomputed:
        // every plan on the way gives the same loss and gradients.
        let mut plans: Vec<(usize, usize, usize)> = vec![];
        let mut budget = 0;
        loop {
            dec.set_activation_budget(budget);
            let mut grads = dec.new_grads();
            let s = dec
                .forward_backward(&batch, 1.0, &mut grads, 11, true)
                .unwrap();
            assert_eq!(s.loss_sum, l_ref);
            for (a, b) in g_ref.slots().iter().zip(&grads.slots()) {
                assert_eq!(flat(a.as_ref().unwrap()), flat(b.as_ref().unwrap()));
            }
            let plan = (
                s.recomputed_blocks,
                s.gate_up_recomputed_blocks,
                s.slimmed_blocks,
            );
            if plans.last() != Some(&plan) {
                plans.push(plan);
            }
            if plan.0 + plan.1 == 0 {
                break;
            }
            // While any rerun is needed, every block is planned and the kept ones are slimmed.
            assert_eq!(plan.0 + plan.1 + plan.2, layers, "{plan:?}");
            budget += 256;
        }
        assert_eq!(
            plans.first(),
            Some(&(layers, 0, 0)),
            "budget 0 keeps no block"
        );
        for wanted in [
            |p: &(usize, usize, usize)| p.0 > 0 && p.1 > 0, // recomputed and gate/up reruns
            |p: &(usize, usize, usize)| p.0 > 0 && p.2 > 0, // recomputed and kept
            |p: &(usize, usize, usize)| p.0 == 0 && p.1 > 0, // gate/up reruns only
        ] {
            assert!(plans.iter().any(wanted), "{plans:?}");
        }
        // A budget that holds every block whole keeps them so (no recompute of any kind), with
        // the same loss and gradients.
        dec.set_activation_budget(usize::MAX / 2);
        let mut grads = dec.new_grads();
        let s = dec
            .forward_backward(&batch, 1.0, &mut grads, 11, true)
            .unwrap();
        assert_eq!((s.recomputed_blocks, s.slimmed_blocks), (0, 0));
        assert_eq!(s.loss_sum, l_ref);
        for (a, b) in g_ref.slots().iter().zip(&grads.slots()) {
            assert_eq!(flat(a.as_ref().unwrap()), flat(b.as_ref().unwrap()));
        }
        // Without checkpointing nothing is recomputed, whatever the budget.
        dec.set_activation_budget(0);
        let mut grads = dec.new_grads();
        let s = dec
            .forward_backward(&batch, 1.0, &mut grads, 11, false)
            .unwrap();
        assert_eq!(
            (
                s.recomputed_blocks,
                s.gate_up_recomputed_blocks,
                s.slimmed_blocks
            ),
            (0, 0, layers)
        );
    }
}

#[test]
fn lora_dropout_gradient_matches_fd_and_changes_with_seed() {
    let (cfg, _, mut dec) = build(Arch::Llama, lora(0.3));
    let vals = randomize_trainables(&mut dec, 9);
    let batch = packed_batch(cfg.vocab_size as u32);
    let (loss, grads) = run_step(&dec, &batch, true);
    // dropout is active in training and seeded: another step seed gives another loss; eval has none
    let mut other = dec.new_grads();
    let l_other = dec
        .forward_backward(&batch, 1.0, &mut other, 12, false)
        .unwrap()
        .loss_sum;
    assert_ne!(loss, l_other);
    assert_ne!(loss, dec.loss(&batch).unwrap().loss_sum);
    let dec = RefCell::new(dec);
    for slot in [0, 5, 13] {
        let f = |t: &Tensor| {
            let mut d = dec.borrow_mut();
            let mut v = vals.clone();
            v[slot] = t.clone();
            d.set_trainable(&v).unwrap();
            let l = run_step(&d, &batch, false).0;
            d.set_trainable(&vals).unwrap();
            l
        };
        let numel = vals[slot].elem_count();
        engine_common::check_fd(
            &f,
            &vals[slot],
            &grads.slot(slot).unwrap(),
            Some(&[0, numel - 1]),
            1e-6,
            "dropout fd",
        );
    }
}

#[test]
fn kv_cache_logits_match_full_forward() {
    for arch in [Arch::Llama, Arch::Qwen2, Arch::InternLM2] {
        let (_, _, mut dec) = build(arch, lora(0.0));
        randomize_trainables(&mut dec, 21);
        let ids = vec![3u32, 1, 4, 1, 5, 9, 2, 6];
        let full = dec
            .logits(&Batch::single(ids.clone(), vec![-100; 8]))
            .unwrap(); // [8, vocab]
        let mut cache = dec.new_cache();
        let mut got = vec![dec.forward_infer(&ids[..4], &mut cache).unwrap()];
        for &id in &ids[4..] {
            got.push(dec.forward_infer(&[id], &mut cache).unwrap());
        }
        assert_eq!(Decoder::cache_len(&cache), 8);
        for (j, row) in got.iter().enumerate() {
            let pos = if j == 0 { 3 } else { 3 + j };
            let want = full.narrow(0, pos, 1).unwrap().squeeze(0).unwrap();
            assert_close(
                &Tensor::new(row.as_slice(), &CPU).unwrap(),
                &want,
                1e-5,
                "kv cache logits",
            );
        }
    }
}

#[test]
fn batched_inference_equals_sequences_one_by_one() {
    for arch in [Arch::Llama, Arch::InternLM2] {
        let (_, _, mut dec) = build(arch, lora(0.0));
        randomize_trainables(&mut dec, 5);
        let prompts: [&[u32]; 3] = [&[3, 1, 4], &[1, 5, 9, 2, 6, 5], &[8]];
        // Reference: each sequence alone, a prefill then two single tokens.
        let mut alone = vec![];
        for p in prompts {
            let mut c = dec.new_cache();
            let mut rows = vec![dec.forward_infer(p, &mut c).unwrap()];
            rows.push(dec.forward_infer(&[2], &mut c).unwrap());
            rows.push(dec.forward_infer(&[7], &mut c).unwrap());
            alone.push(rows);
        }
        let mut caches: Vec<_> = (0..3).map(|_| dec.new_cache()).collect();
        let feeds: [[&[u32]; 3]; 3] = [prompts, [&[2], &[2], &[2]], [&[7], &[7], &[7]]];
        for (round, feed) in feeds.iter().enumerate() {
            let mut items: Vec<(&[u32], &mut _)> =
                feed.iter().copied().zip(caches.iter_mut()).collect();
            let got = dec.forward_infer_batch(&mut items).unwrap();
            for (i, row) in got.iter().enumerate() {
                assert_close(
                    &Tensor::new(row.as_slice(), &CPU).unwrap(),
                    &Tensor::new(alone[i][round].as_slice(), &CPU).unwrap(),
                    1e-6,
                    "batched logits",
                );
            }
        }
        assert_eq!(Decoder::cache_len(&caches[1]), 8);
    }
}

#[test]
fn packed_batch_equals_samples_alone() {
    let (cfg, _, mut dec) = build(Arch::Llama, TrainMode::Full);
    randomize_trainables(&mut dec, 31);
    let batch = packed_batch(cfg.vocab_size as u32);
    let (l, g) = run_step(&dec, &batch, false);
    let mut sum = dec.new_grads();
    let mut lsum = 0.0;
    for (a, b) in [(0usize, 5usize), (5, 10)] {
        let s = Batch::single(batch.input_ids[a..b].to_vec(), batch.labels[a..b].to_vec());
        lsum += dec
            .forward_backward(&s, 1.0, &mut sum, 11, false)
            .unwrap()
            .loss_sum;
    }
    assert!((l - lsum).abs() < 1e-12 * l.abs());
    for (info, (a, b)) in dec
        .trainable()
        .iter()
        .zip(g.slots().iter().zip(&sum.slots()))
    {
        assert_close(a.as_ref().unwrap(), b.as_ref().unwrap(), 1e-10, &info.name);
    }
}

#[test]
fn chunked_ce_in_decoder_equals_single_chunk() {
    let (cfg, _, mut dec) = build(Arch::Qwen2, TrainMode::Full);
    let batch = packed_batch(cfg.vocab_size as u32);
    let (l0, g0) = run_step(&dec, &batch, false);
    dec.set_ce_chunk_rows(2);
    let (l1, g1) = run_step(&dec, &batch, false);
    assert!((l0 - l1).abs() < 1e-12 * l0.abs());
    for (a, b) in g0.slots().iter().zip(&g1.slots()) {
        assert_close(
            a.as_ref().unwrap(),
            b.as_ref().unwrap(),
            1e-12,
            "chunked grads",
        );
    }
}

#[test]
fn lora_freezes_base_weights_and_inits_like_peft() {
    let (cfg, w, dec) = build(Arch::Llama, lora(0.0));
    assert_eq!(dec.trainable().len(), 2 * 7 * cfg.num_layers);
    assert!(dec
        .trainable()
        .iter()
        .all(|t| t.name.contains(".lora_A.") || t.name.contains(".lora_B.")));
    assert!(dec.trainable().iter().all(|t| t.decay));
    assert_eq!(
        dec.new_grads().len(),
        dec.trainable().len(),
        "no slot for a frozen weight"
    );
    let frozen: Vec<String> = dec
        .frozen_weights()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut expected: Vec<String> = w.keys().cloned().collect();
    let mut frozen_sorted = frozen.clone();
    expected.sort();
    frozen_sorted.sort();
    assert_eq!(frozen_sorted, expected);
    let init = dec.initial_trainable_values().unwrap();
    for (info, t) in dec.trainable().iter().zip(&init) {
        assert_eq!(t.dtype(), DType::F32);
        let v = flat(t);
        if info.name.ends_with("lora_B.weight") {
            assert!(
                v.iter().all(|&x| x == 0.0),
                "{} must start at zero",
                info.name
            );
        } else {
            let bound = 1.0 / (info.shape[1] as f64).sqrt();
            assert!(v.iter().all(|x| x.abs() <= bound) && v.iter().any(|&x| x != 0.0));
        }
    }
    // B = 0: the adapted model equals the base model
    let (_, _, base) = build(Arch::Llama, TrainMode::Frozen);
    let batch = packed_batch(cfg.vocab_size as u32);
    assert_eq!(dec.loss(&batch).unwrap(), base.loss(&batch).unwrap());
    // targets restrict the adapted linears
    let (cfg2, _, d2) = build(Arch::Llama, lora_on(0.0, &["q_proj", "v_proj"]));
    assert_eq!(d2.trainable().len(), 2 * 2 * cfg2.num_layers);
}

#[test]
fn full_mode_decay_flags_and_values_round_trip() {
    let (_, w, mut dec) = build(Arch::Qwen2, TrainMode::Full);
    for t in dec.trainable() {
        let is_vector = t.shape.len() == 1;
        assert_eq!(t.decay, !is_vector, "{}", t.name);
        assert!(w.contains_key(&t.name), "{} is an HF name", t.name);
    }
    assert!(dec.frozen_weights().unwrap().is_empty());
    let init = dec.initial_trainable_values().unwrap();
    assert_close(
        &init[0],
        &w["model.embed_tokens.weight"],
        1e-6,
        "embed init",
    );
    dec.set_trainable(&init).unwrap();
    assert!(dec.set_trainable(&init[1..]).is_err());
}

#[test]
fn clear_errors_for_bad_inputs() {
    let cfg = config(Arch::Llama);
    let mut w = tiny_weights(&cfg, 1);
    w.remove("model.layers.1.mlp.up_proj.weight");
    let err = Decoder::new(&cfg, &mut w, TrainMode::Full, DType::F32, &CPU, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    let mut w = tiny_weights(&cfg, 1);
    let spec = LoraSpec {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec!["wqkv".into()],
    };
    let err = Decoder::new(&cfg, &mut w, TrainMode::Lora(spec), DType::F32, &CPU, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("wqkv") && err.contains("q_proj"), "{err}");
    let mut w = tiny_weights(&cfg, 1);
    w.insert("model.norm.weight".into(), randn(&[3], 1.0, 1));
    let err = Decoder::new(&cfg, &mut w, TrainMode::Full, DType::F32, &CPU, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.norm.weight") && err.contains("[3]"),
        "{err}"
    );
    let (_, _, dec) = build(Arch::Llama, TrainMode::Full);
    let mut bad = packed_batch(17);
    bad.input_ids[4] = 17;
    let err = dec.loss(&bad).unwrap_err().to_string();
    assert!(err.contains("input_ids[4] = 17"), "{err}");
    let mut bad = packed_batch(17);
    bad.cu_seqlens = vec![0, 5, 9];
    assert!(dec.loss(&bad).is_err());
}

#[test]
fn bf16_and_f32_agree_with_f64() {
    let cfg = config(Arch::Llama);
    let w = tiny_weights(&cfg, 1000);
    let batch = packed_batch(cfg.vocab_size as u32);
    let mut losses = Vec::new();
    for dt in [DType::F64, DType::F32, DType::BF16] {
        let dec = Decoder::new(&cfg, &mut w.clone(), lora(0.1), dt, &CPU, 5).unwrap();
        let mut g = dec.new_grads();
        let s = dec.forward_backward(&batch, 1.0, &mut g, 1, true).unwrap();
        assert!(g.slots().iter().all(|s| s.as_ref().unwrap().dtype()
            == if dt == DType::F64 {
                DType::F64
            } else {
                DType::F32
            }));
        losses.push(s.loss_sum);
    }
    assert!(
        (losses[1] - losses[0]).abs() < 1e-5 * losses[0],
        "{losses:?}"
    );
    assert!(
        (losses[2] - losses[0]).abs() < 3e-2 * losses[0],
        "{losses:?}"
    );
}

/// One sequence of `len` tokens, every token but the first a label (`len - 1` targets: enough
/// for several LM-head chunks).
fn long_batch(vocab: u32, len: usize) -> Batch {
    let ids: Vec<u32> = (0..len as u32).map(|i| (i * 7 + 3) % vocab).collect();
    let mut labels: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    labels[0] = -100;
    Batch::single(ids, labels)
}

/// Full fine-tuning in bf16 with one-write gradients: every slot holds the f32 buffer's value
/// rounded once to bf16, bit for bit. The head's three chunks sum in f32 before that one rounding
/// (summing them in bf16 would round at each chunk), and the norms' and embedding's f32 sums are
/// rounded once. Adapters, tied heads and f32 compute keep f32 gradients.
#[test]
fn one_write_bf16_grads_are_the_f32_grads_rounded_once() {
    for arch in [Arch::Llama, Arch::InternLM2] {
        let cfg = config(arch);
        let w = tiny_weights(&cfg, 1000);
        // 80 targets in chunks of 32 rows either way: a trained head takes 4x the set rows a
        // chunk, with one-write gradients at least 2·hidden = 32 (on the CPU each chunk's product
        // is rounded to bf16, so both runs must chunk alike to compare bit for bit).
        let batch = long_batch(cfg.vocab_size as u32, 81);
        let mut dec =
            Decoder::new(&cfg, &mut w.clone(), TrainMode::Full, DType::BF16, &CPU, 5).unwrap();
        dec.set_ce_chunk_rows(8);
        let (l32, g32) = run_step(&dec, &batch, true);
        assert!(dec.set_one_write_grads(true), "{arch:?}");
        let (l16, g16) = run_step(&dec, &batch, true);
        assert_eq!(
            l32, l16,
            "{arch:?}: the loss does not depend on the gradient dtype"
        );
        let names: Vec<String> = dec.trainable().iter().map(|t| t.name.clone()).collect();
        for ((a, b), name) in g32.slots().iter().zip(&g16.slots()).zip(&names) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            assert_eq!((a.dtype(), b.dtype()), (DType::F32, DType::BF16), "{name}");
            let want = a
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert_eq!(
                flat(&want),
                flat(&b.to_dtype(DType::F32).unwrap()),
                "{arch:?} {name}: not the f32 gradient rounded once"
            );
        }
        let flat16 = g16.into_flat().unwrap();
        assert_eq!(flat16.dtype(), DType::BF16);
        assert!(!dec.set_one_write_grads(false));
        assert_eq!(dec.new_grads().into_flat().unwrap().dtype(), DType::F32);
    }
    // Where a value can take several contributions, or nothing narrower than f32 exists.
    let cfg = config(Arch::Llama);
    let w = tiny_weights(&cfg, 1000);
    let mut lora_dec = Decoder::new(&cfg, &mut w.clone(), lora(0.0), DType::BF16, &CPU, 5).unwrap();
    assert!(!lora_dec.set_one_write_grads(true), "adapters keep f32");
    let mut f32_dec =
        Decoder::new(&cfg, &mut w.clone(), TrainMode::Full, DType::F32, &CPU, 5).unwrap();
    assert!(!f32_dec.set_one_write_grads(true), "f32 compute");
    let qcfg = config(Arch::Qwen2);
    let qw = tiny_weights(&qcfg, 1000);
    let mut tied = Decoder::new(
        &qcfg,
        &mut qw.clone(),
        TrainMode::Full,
        DType::BF16,
        &CPU,
        5,
    )
    .unwrap();
    assert!(
        !tied.set_one_write_grads(true),
        "a tied head also takes the embedding's gradient"
    );
    assert_eq!(tied.new_grads().into_flat().unwrap().dtype(), DType::F32);
}
