//! The CLIP vision tower's hand-derived backward (LayerNorm, quick_gelu, bidirectional attention,
//! encoder layers with LoRA) against candle autograd over composite ops and central finite
//! differences (f64, CPU, a generated tiny tower).

mod engine_common;

use candle_core::{DType, Device, Tensor, Var, D};
use engine_common::{assert_close, check_fd, dot, flat, randn};
use ftrun::model::decoder::LoraSpec;
use ftrun::model::layers::attention::{
    attention_forward, bidirectional_attention_backward, bidirectional_attention_forward,
};
use ftrun::model::layers::gelu::{quick_gelu_backward, quick_gelu_forward};
use ftrun::model::layers::layernorm::{layernorm_backward, layernorm_forward};
use ftrun::model::tiny_clip::{make_tiny_clip, TinyClipSpec};
use ftrun::model::vision::{ClipVision, ClipVisionConfig};
use ftrun::model::weights::load_weights;
use std::collections::HashMap;
use std::path::Path;

const CPU: Device = Device::Cpu;

fn var(t: &Tensor) -> Var {
    Var::from_tensor(t).unwrap()
}

/// Autograd gradient of `Σ out · r` for each of `vars`.
fn autograd(out: &Tensor, r: &Tensor, vars: &[&Var]) -> Vec<Tensor> {
    let g = (out * r).unwrap().sum_all().unwrap().backward().unwrap();
    vars.iter()
        .map(|v| g.get(v.as_tensor()).unwrap().clone())
        .collect()
}

/// LayerNorm in differentiable composite ops.
fn ref_layernorm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
    let mean = x.mean_keepdim(D::Minus1).unwrap();
    let c = x.broadcast_sub(&mean).unwrap();
    let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    c.broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(w)
        .unwrap()
        .broadcast_add(b)
        .unwrap()
}

fn ref_quick_gelu(x: &Tensor) -> Tensor {
    let sig = ((x * -1.702).unwrap().exp().unwrap() + 1.0)
        .unwrap()
        .recip()
        .unwrap();
    (x * sig).unwrap()
}

/// Softmax attention within each segment, no mask: `q, k, v [n, heads, d]`.
fn ref_attention(q: &Tensor, k: &Tensor, v: &Tensor, cu: &[u32]) -> Tensor {
    let d = q.dim(2).unwrap();
    let mut outs = vec![];
    for w in cu.windows(2) {
        let (a, l) = (w[0] as usize, (w[1] - w[0]) as usize);
        let heads = |t: &Tensor| t.narrow(0, a, l).unwrap().transpose(0, 1).unwrap(); // [H, L, d]
        let (qh, kh, vh) = (heads(q), heads(k), heads(v));
        let s = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let e = s.exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        outs.push(p.matmul(&vh).unwrap().transpose(0, 1).unwrap()); // [L, H, d]
    }
    Tensor::cat(&outs, 0).unwrap()
}

// ---- modules ---------------------------------------------------------------------------------

#[test]
fn layernorm_backward_matches_autograd_and_fd() {
    let eps = 1e-5;
    let x = (randn(&[5, 8], 2.0, 1) + 0.7).unwrap();
    let w = (randn(&[8], 0.3, 2) + 1.0).unwrap();
    let b = randn(&[8], 0.3, 3);
    let r = randn(&[5, 8], 1.0, 4);
    let (y, stats) = layernorm_forward(&x, &w, &b, eps).unwrap();
    let g = layernorm_backward(&x, &w, &stats, &r, true).unwrap();
    let (xv, wv, bv) = (var(&x), var(&w), var(&b));
    let yr = ref_layernorm(&xv, &wv, &bv, eps);
    assert_close(&y, &yr, 1e-12, "layernorm forward");
    let ag = autograd(&yr, &r, &[&xv, &wv, &bv]);
    let (dw, db) = g.dw_db.as_ref().unwrap();
    assert_close(&g.dx, &ag[0], 1e-12, "dx");
    assert_close(dw, &ag[1], 1e-12, "dw");
    assert_close(db, &ag[2], 1e-12, "db");
    let f =
        |x: &Tensor, w: &Tensor, b: &Tensor| dot(&layernorm_forward(x, w, b, eps).unwrap().0, &r);
    check_fd(&|t| f(t, &w, &b), &x, &g.dx, None, 1e-7, "dx fd");
    check_fd(&|t| f(&x, t, &b), &w, dw, None, 1e-7, "dw fd");
    check_fd(&|t| f(&x, &w, t), &b, db, None, 1e-7, "db fd");
    // A frozen norm: the same dx, no parameter gradients.
    let frozen = layernorm_backward(&x, &w, &stats, &r, false).unwrap();
    assert!(frozen.dw_db.is_none());
    assert_close(&frozen.dx, &g.dx, 0.0, "frozen dx");
}

#[test]
fn layernorm_keeps_statistics_in_f32_for_bf16() {
    // bf16 inputs near 100 (spacing 0.5), the same values in f32 for the reference.
    let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    let x = bf((randn(&[3, 16], 4.0, 5) + 100.0).unwrap());
    let (w, b) = (
        bf((randn(&[16], 0.1, 6) + 1.0).unwrap()),
        bf(randn(&[16], 0.1, 7)),
    );
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let (y32, _) = layernorm_forward(&f32(&x), &f32(&w), &f32(&b), 1e-5).unwrap();
    let (yb, stats) = layernorm_forward(&x, &w, &b, 1e-5).unwrap();
    assert_eq!(yb.dtype(), DType::BF16);
    assert_eq!(stats.rstd.dtype(), DType::F32);
    // A bf16 mean of values near 100 would be off by up to 0.25 (~0.06 after normalizing);
    // f32 statistics leave only the output's bf16 rounding.
    assert_close(&yb, &y32, 1e-2, "bf16 layernorm");
}

#[test]
fn quick_gelu_backward_matches_autograd_and_fd() {
    let x = randn(&[4, 6], 2.0, 8);
    let r = randn(&[4, 6], 1.0, 9);
    let dx = quick_gelu_backward(&x, &r).unwrap();
    let xv = var(&x);
    let yr = ref_quick_gelu(&xv);
    assert_close(&quick_gelu_forward(&x).unwrap(), &yr, 1e-12, "forward");
    assert_close(&dx, &autograd(&yr, &r, &[&xv])[0], 1e-12, "dx");
    check_fd(
        &|t| dot(&quick_gelu_forward(t).unwrap(), &r),
        &x,
        &dx,
        None,
        1e-7,
        "dx fd",
    );
}

#[test]
fn bidirectional_attention_matches_autograd_and_fd() {
    let (n, heads, d) = (9, 2, 4);
    let cu = [0u32, 5, 9]; // two images of 5 and 4 tokens
    let (q, k, v) = (
        randn(&[n, heads, d], 1.0, 10),
        randn(&[n, heads, d], 1.0, 11),
        randn(&[n, heads, d], 1.0, 12),
    );
    let r = randn(&[n, heads, d], 1.0, 13);
    let (out, lse) = bidirectional_attention_forward(&q, &k, &v, &cu).unwrap();
    let (dq, dk, dv) = bidirectional_attention_backward(&q, &k, &v, &out, &lse, &r, &cu).unwrap();
    let (qv, kv, vv) = (var(&q), var(&k), var(&v));
    let yr = ref_attention(&qv, &kv, &vv, &cu);
    assert_close(&out, &yr, 1e-12, "forward");
    let ag = autograd(&yr, &r, &[&qv, &kv, &vv]);
    assert_close(&dq, &ag[0], 1e-12, "dq");
    assert_close(&dk, &ag[1], 1e-12, "dk");
    assert_close(&dv, &ag[2], 1e-12, "dv");
    let f = |q: &Tensor, k: &Tensor, v: &Tensor| {
        dot(
            &bidirectional_attention_forward(q, k, v, &cu).unwrap().0,
            &r,
        )
    };
    let some: Vec<usize> = (0..n * heads * d).step_by(5).collect();
    check_fd(&|t| f(t, &k, &v), &q, &dq, Some(&some), 1e-7, "dq fd");
    check_fd(&|t| f(&q, t, &v), &k, &dk, Some(&some), 1e-7, "dk fd");
    check_fd(&|t| f(&q, &k, t), &v, &dv, Some(&some), 1e-7, "dv fd");
    // The first token of each image sees the whole image here; causally it sees only itself.
    let (causal, _) = attention_forward(&q, &k, &v, &cu).unwrap();
    let first = |t: &Tensor| flat(&t.get(0).unwrap());
    assert_eq!(first(&causal), flat(&v.get(0).unwrap()));
    assert_ne!(first(&out), first(&causal));
}

// ---- the tower -------------------------------------------------------------------------------

fn small_spec() -> TinyClipSpec {
    TinyClipSpec {
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 3,
        num_heads: 2,
        image_size: 28,
        patch_size: 14,
    }
}

fn lora(targets: &[&str], dropout: f64) -> LoraSpec {
    LoraSpec {
        r: 3,
        alpha: 6.0,
        dropout,
        targets: targets.iter().map(|s| s.to_string()).collect(),
    }
}

/// The tower in f64 with adapters whose B is random too (B = 0 would hide half the gradient),
/// its config, its weights and the adapters' values.
fn tower(
    dir: &Path,
    spec: Option<&LoraSpec>,
) -> (
    ClipVision,
    ClipVisionConfig,
    HashMap<String, Tensor>,
    Vec<Tensor>,
) {
    let cfg = ClipVisionConfig::from_dir(dir).unwrap();
    let weights = load_weights(dir, DType::F64, &CPU, |_| true).unwrap();
    let mut t =
        ClipVision::new_with_lora(&cfg, &mut weights.clone(), -2, spec, DType::F64, &CPU, 5)
            .unwrap();
    let values: Vec<Tensor> = t
        .trainable()
        .iter()
        .enumerate()
        .map(|(i, info)| randn(&info.shape, 0.3, 100 + i as u64))
        .collect();
    t.set_trainable(&values).unwrap();
    (t, cfg, weights, values)
}

/// The tower in composite ops with the adapters as autograd variables (no dropout).
fn ref_tower(
    cfg: &ClipVisionConfig,
    w: &HashMap<String, Tensor>,
    lora: &HashMap<String, Var>,
    scale: f64,
    pixels: &Tensor,
) -> Tensor {
    let get = |n: &str| w[&format!("vision_model.{n}")].clone();
    let (b, _, _, _) = pixels.dims4().unwrap();
    let (g, p, d) = (cfg.grid(), cfg.patch_size, cfg.hidden_size);
    let t = g * g + 1;
    let patches = pixels
        .reshape((b, 3, g, p, g, p))
        .unwrap()
        .permute((0, 2, 4, 1, 3, 5))
        .unwrap()
        .reshape((b * g * g, 3 * p * p))
        .unwrap();
    let conv = get("embeddings.patch_embedding.weight")
        .reshape((d, 3 * p * p))
        .unwrap();
    let emb = patches
        .matmul(&conv.t().unwrap())
        .unwrap()
        .reshape((b, g * g, d))
        .unwrap();
    let cls = get("embeddings.class_embedding")
        .reshape((1, 1, d))
        .unwrap()
        .repeat((b, 1, 1))
        .unwrap();
    let x = Tensor::cat(&[&cls, &emb], 1)
        .unwrap()
        .broadcast_add(&get("embeddings.position_embedding.weight"))
        .unwrap()
        .reshape((b * t, d))
        .unwrap();
    let eps = cfg.layer_norm_eps;
    let ln = |x: &Tensor, n: &str| {
        ref_layernorm(
            x,
            &get(&format!("{n}.weight")),
            &get(&format!("{n}.bias")),
            eps,
        )
    };
    let linear = |x: &Tensor, n: &str| {
        let y = x
            .matmul(&get(&format!("{n}.weight")).t().unwrap())
            .unwrap()
            .broadcast_add(&get(&format!("{n}.bias")))
            .unwrap();
        match lora.get(&format!("vision_model.{n}.lora_A.weight")) {
            Some(a) => {
                let bm = &lora[&format!("vision_model.{n}.lora_B.weight")];
                let delta = x
                    .matmul(&a.t().unwrap())
                    .unwrap()
                    .matmul(&bm.t().unwrap())
                    .unwrap();
                (y + (delta * scale).unwrap()).unwrap()
            }
            None => y,
        }
    };
    let cu: Vec<u32> = (0..=b).map(|i| (i * t) as u32).collect();
    let (heads, hd) = (cfg.num_attention_heads, d / cfg.num_attention_heads);
    let mut x = ln(&x, "pre_layrnorm");
    for l in 0..cfg.num_hidden_layers - 1 {
        let pre = format!("encoder.layers.{l}");
        let h1 = ln(&x, &format!("{pre}.layer_norm1"));
        let qkv = |leaf: &str| {
            linear(&h1, &format!("{pre}.self_attn.{leaf}"))
                .reshape((b * t, heads, hd))
                .unwrap()
        };
        let attn = ref_attention(&qkv("q_proj"), &qkv("k_proj"), &qkv("v_proj"), &cu)
            .reshape((b * t, d))
            .unwrap();
        let x2 = (&x + linear(&attn, &format!("{pre}.self_attn.out_proj"))).unwrap();
        let h2 = ln(&x2, &format!("{pre}.layer_norm2"));
        let f = ref_quick_gelu(&linear(&h2, &format!("{pre}.mlp.fc1")));
        x = (&x2 + linear(&f, &format!("{pre}.mlp.fc2"))).unwrap();
    }
    x.reshape((b, t, d)).unwrap().narrow(1, 1, t - 1).unwrap()
}

fn pixels(images: usize, seed: u64) -> Tensor {
    randn(&[images, 3, 28, 28], 1.0, seed)
}

#[test]
fn tower_lora_gradients_match_autograd() {
    let tmp = tempfile::tempdir().unwrap();
    make_tiny_clip(tmp.path(), &small_spec(), 1).unwrap();
    let spec = lora(&[], 0.0);
    let (t, cfg, weights, values) = tower(tmp.path(), Some(&spec));
    // select_layer -2 of 3 layers: 2 layers x 6 linears x (A, B).
    assert_eq!(t.trainable().len(), 24);
    let px = pixels(2, 20);
    let (feats, acts) = t.forward_train(&px, 7, false).unwrap();
    assert_eq!(feats.dims(), [2, 4, 16]);
    assert_close(
        &feats,
        &t.forward(&px).unwrap(),
        1e-12,
        "train = eval forward",
    );
    let r = randn(&[2, 4, 16], 1.0, 21);
    let mut grads = t.new_grads();
    t.backward(acts, &r, &mut grads).unwrap();

    let vars: HashMap<String, Var> = t
        .trainable()
        .iter()
        .zip(&values)
        .map(|(info, v)| (info.name.clone(), var(v)))
        .collect();
    let reference = ref_tower(&cfg, &weights, &vars, spec.alpha / spec.r as f64, &px);
    assert_close(&feats, &reference, 1e-12, "forward vs composite reference");
    let order: Vec<&Var> = t.trainable().iter().map(|i| &vars[&i.name]).collect();
    let ag = autograd(&reference, &r, &order);
    for (i, info) in t.trainable().iter().enumerate() {
        let g = grads.slot(i).unwrap_or_else(|| panic!("{}", info.name));
        assert_close(&g, &ag[i], 1e-10, &info.name);
    }
}

#[test]
fn tower_lora_gradients_with_dropout_match_fd_and_checkpointing() {
    let tmp = tempfile::tempdir().unwrap();
    make_tiny_clip(tmp.path(), &small_spec(), 2).unwrap();
    let spec = lora(&["q_proj", "out_proj", "fc2"], 0.3);
    let (mut t, _, _, values) = tower(tmp.path(), Some(&spec));
    assert_eq!(t.trainable().len(), 12);
    let px = pixels(2, 30);
    let r = randn(&[2, 4, 16], 1.0, 31);
    let grads_of = |t: &ClipVision, checkpointing: bool| {
        let (_, acts) = t.forward_train(&px, 11, checkpointing).unwrap();
        let mut g = t.new_grads();
        t.backward(acts, &r, &mut g).unwrap();
        g.slots()
            .into_iter()
            .map(|s| s.expect("every adapter gets a gradient"))
            .collect::<Vec<_>>()
    };
    let plain = grads_of(&t, false);
    let recomputed = grads_of(&t, true);
    for (a, b) in plain.iter().zip(&recomputed) {
        assert_close(a, b, 0.0, "checkpointed = kept activations");
    }
    // Dropout is active (a different seed changes the output) and reproducible from the seed.
    let f_seed = |t: &ClipVision, seed| flat(&t.forward_train(&px, seed, false).unwrap().0);
    assert_eq!(f_seed(&t, 11), f_seed(&t, 11));
    assert_ne!(f_seed(&t, 11), f_seed(&t, 12));

    for slot in [0usize, 3, 5, 8, 11] {
        let name = t.trainable()[slot].name.clone();
        let loss = |v: &Tensor| {
            let mut vs = values.clone();
            vs[slot] = v.clone();
            t.set_trainable(&vs).unwrap();
            dot(&t.forward_train(&px, 11, false).unwrap().0, &r)
        };
        check_fd_mut(loss, &values[slot], &plain[slot], &name);
    }
}

/// Central differences on every coordinate of `x` for a stateful `loss`.
fn check_fd_mut(mut loss: impl FnMut(&Tensor) -> f64, x: &Tensor, g: &Tensor, what: &str) {
    let (xv, gv) = (flat(x), flat(g));
    let h = 1e-5;
    for i in 0..xv.len() {
        let mut at = |delta: f64| {
            let mut v = xv.clone();
            v[i] += delta;
            loss(&Tensor::from_vec(v, x.dims(), &CPU).unwrap())
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (fd - gv[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "{what}[{i}]: analytic {} vs finite difference {fd}",
            gv[i]
        );
    }
}

#[test]
fn frozen_tower_and_lora_targets() {
    let tmp = tempfile::tempdir().unwrap();
    make_tiny_clip(tmp.path(), &small_spec(), 3).unwrap();
    let (t, _, weights, _) = tower(tmp.path(), None);
    assert!(t.trainable().is_empty());
    let px = pixels(1, 40);
    let (feats, acts) = t.forward_train(&px, 0, false).unwrap();
    assert_close(
        &feats,
        &t.forward(&px).unwrap(),
        0.0,
        "frozen train forward",
    );
    let mut g = t.new_grads();
    t.backward(acts, &feats.ones_like().unwrap(), &mut g)
        .unwrap();
    assert!(g.is_empty());

    // Only fc1 adapted: its names follow the HF module path; layer 2 (unused by -2) has none.
    let (t, _, _, _) = tower(tmp.path(), Some(&lora(&["fc1"], 0.0)));
    let names: Vec<&str> = t.trainable().iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "vision_model.encoder.layers.0.mlp.fc1.lora_A.weight",
            "vision_model.encoder.layers.0.mlp.fc1.lora_B.weight",
            "vision_model.encoder.layers.1.mlp.fc1.lora_A.weight",
            "vision_model.encoder.layers.1.mlp.fc1.lora_B.weight",
        ]
    );
    assert_eq!(t.trainable()[0].shape, [3, 16]);
    assert_eq!(t.trainable()[1].shape, [24, 3]);
    // Fresh adapters: B = 0, so the output equals the frozen tower's.
    let cfg = ClipVisionConfig::from_dir(tmp.path()).unwrap();
    let fresh = ClipVision::new_with_lora(
        &cfg,
        &mut weights.clone(),
        -2,
        Some(&lora(&[], 0.0)),
        DType::F64,
        &CPU,
        5,
    )
    .unwrap();
    assert_close(
        &fresh.forward(&px).unwrap(),
        &feats,
        1e-12,
        "B = 0 adapters",
    );

    let err = ClipVision::new_with_lora(
        &cfg,
        &mut weights.clone(),
        -2,
        Some(&lora(&["o_proj"], 0.0)),
        DType::F64,
        &CPU,
        5,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("`o_proj`") && err.contains("out_proj, fc1, fc2"),
        "{err}"
    );
}
