//! Helpers shared by the engine tests: seeded random tensors, finite differences, comparisons.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr_free::normal;

/// Seeded standard-normal f64 tensor times `scale`.
pub fn randn(shape: &[usize], scale: f64, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| normal(&mut rng) * scale).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Box-Muller normal samples without an extra crate.
mod rand_distr_free {
    use rand::Rng;
    pub fn normal<R: Rng>(rng: &mut R) -> f64 {
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Asserts `|a - b| <= tol * max(1, max|b|)` elementwise, with a message naming `what`.
pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let (a, b) = (flat(a), flat(b));
    let scale = b.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}: element {i}: {x} vs {y} (tol {tol} × {scale})"
        );
    }
}

/// Central finite difference of `f` at flat coordinate `i` of `x` (f64).
pub fn fd_at(f: &dyn Fn(&Tensor) -> f64, x: &Tensor, i: usize, eps: f64) -> f64 {
    let mut v = flat(x);
    let orig = v[i];
    v[i] = orig + eps;
    let plus = f(&Tensor::from_vec(v.clone(), x.dims(), &Device::Cpu).unwrap());
    v[i] = orig - eps;
    let minus = f(&Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap());
    (plus - minus) / (2.0 * eps)
}

/// Checks the analytic gradient `g` of `f` at `x` against central differences on `coords`
/// (every coordinate when `None`).
pub fn check_fd(
    f: &dyn Fn(&Tensor) -> f64,
    x: &Tensor,
    g: &Tensor,
    coords: Option<&[usize]>,
    tol: f64,
    what: &str,
) {
    let gv = flat(g);
    let all: Vec<usize> = (0..gv.len()).collect();
    let coords = coords.unwrap_or(&all);
    for &i in coords {
        let fd = fd_at(f, x, i, 1e-5);
        assert!(
            (fd - gv[i]).abs() <= tol * (1.0 + fd.abs()),
            "{what}: coordinate {i}: analytic {} vs finite difference {fd}",
            gv[i]
        );
    }
}

/// `Σ (t · r)` as f64: the scalar probe whose gradient w.r.t. `t` is `r`.
pub fn dot(t: &Tensor, r: &Tensor) -> f64 {
    (t.to_dtype(DType::F64).unwrap() * r.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Composite reference: per sample, repeat KV heads, full scores, additive causal mask, softmax.
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, cu: &[u32]) -> Tensor {
    let (_, hq, d) = q.dims3().unwrap();
    let hkv = k.dim(1).unwrap();
    let mut outs = Vec::new();
    for w in cu.windows(2) {
        let (a, l) = (w[0] as usize, (w[1] - w[0]) as usize);
        let mut heads = Vec::new();
        for h in 0..hq {
            let kvh = h / (hq / hkv);
            let qh = q
                .narrow(0, a, l)
                .unwrap()
                .narrow(1, h, 1)
                .unwrap()
                .squeeze(1)
                .unwrap(); // [l, d]
            let kh = k
                .narrow(0, a, l)
                .unwrap()
                .narrow(1, kvh, 1)
                .unwrap()
                .squeeze(1)
                .unwrap();
            let vh = v
                .narrow(0, a, l)
                .unwrap()
                .narrow(1, kvh, 1)
                .unwrap()
                .squeeze(1)
                .unwrap();
            let s = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
            let mask: Vec<f64> = (0..l * l)
                .map(|i| if i % l > i / l { -1e30 } else { 0.0 })
                .collect();
            let s = (s + Tensor::from_vec(mask, (l, l), &Device::Cpu).unwrap()).unwrap();
            let e = s
                .broadcast_sub(&s.max_keepdim(1).unwrap().detach())
                .unwrap()
                .exp()
                .unwrap();
            let p = e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap();
            heads.push(p.matmul(&vh).unwrap().unsqueeze(1).unwrap());
        }
        outs.push(Tensor::cat(&heads, 1).unwrap());
    }
    Tensor::cat(&outs, 0).unwrap()
}

/// Unchunked composite reference: Σ over shifted trained positions of −log softmax[target].
pub fn ce_reference(h: &Tensor, w: &Tensor, labels: &[i32]) -> Tensor {
    let vocab = w.dim(0).unwrap();
    let logits = h.matmul(&w.t().unwrap()).unwrap(); // [n, vocab]
    let lse = logits.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap();
    let logp = logits.broadcast_sub(&lse).unwrap();
    let n = labels.len();
    let mut sel = vec![0.0f64; n * vocab];
    for i in 0..n - 1 {
        if labels[i + 1] != -100 {
            sel[i * vocab + labels[i + 1] as usize] = 1.0;
        }
    }
    (logp * Tensor::from_vec(sel, (n, vocab), &Device::Cpu).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap()
}
