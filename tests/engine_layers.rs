//! Every engine module's hand-derived backward against candle autograd over composite ops and
//! against central finite differences (f64, CPU, small shapes).

mod engine_common;

use candle_core::{DType, Device, Tensor, Var, D};
use engine_common::{assert_close, attention_reference, ce_reference, check_fd, dot, flat, randn};
use ftrun::kernels::gemm::GemmOut;
use ftrun::model::layers::attention::{attention_backward, attention_forward};
use ftrun::model::layers::embedding::{embedding_backward, embedding_forward};
use ftrun::model::layers::linear::{linear_backward, linear_forward};
use ftrun::model::layers::lm_head::{lm_head_ce, shifted_targets, CeGradRequest};
use ftrun::model::layers::lora::{
    dropout_mask, lora_a_init, lora_backward, lora_forward, lora_group_backward,
    lora_group_forward, LoraGroupGrads,
};
use ftrun::model::layers::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use ftrun::model::layers::rope::{rope_backward, rope_forward, rope_table, RopeCache};
use ftrun::model::layers::swiglu::{swiglu_backward, swiglu_forward};

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

// ---- linear ----------------------------------------------------------------------------------

#[test]
fn linear_backward_matches_autograd_and_fd() {
    let x = randn(&[5, 4], 1.0, 1);
    let w = randn(&[3, 4], 1.0, 2);
    let b = randn(&[3], 1.0, 3);
    let r = randn(&[5, 3], 1.0, 4);
    let g = linear_backward(&x, &w, &r, true, true, true).unwrap();
    let (xv, wv, bv) = (var(&x), var(&w), var(&b));
    let y = xv
        .matmul(&wv.t().unwrap())
        .unwrap()
        .broadcast_add(&bv)
        .unwrap();
    assert_close(
        &linear_forward(&x, &w, Some(&b)).unwrap(),
        &y,
        1e-12,
        "linear forward",
    );
    let ag = autograd(&y, &r, &[&xv, &wv, &bv]);
    assert_close(g.dx.as_ref().unwrap(), &ag[0], 1e-12, "dx");
    assert_close(g.dw.as_ref().unwrap(), &ag[1], 1e-12, "dw");
    assert_close(g.db.as_ref().unwrap(), &ag[2], 1e-12, "db");
    check_fd(
        &|x| dot(&linear_forward(x, &w, Some(&b)).unwrap(), &r),
        &x,
        g.dx.as_ref().unwrap(),
        None,
        1e-7,
        "dx fd",
    );
    check_fd(
        &|w| dot(&linear_forward(&x, w, Some(&b)).unwrap(), &r),
        &w,
        g.dw.as_ref().unwrap(),
        None,
        1e-7,
        "dw fd",
    );
    check_fd(
        &|b| dot(&linear_forward(&x, &w, Some(b)).unwrap(), &r),
        &b,
        g.db.as_ref().unwrap(),
        None,
        1e-7,
        "db fd",
    );
}

#[test]
fn frozen_linear_computes_no_weight_gradient() {
    let x = randn(&[5, 4], 1.0, 1);
    let w = randn(&[3, 4], 1.0, 2);
    let r = randn(&[5, 3], 1.0, 4);
    let g = linear_backward(&x, &w, &r, true, false, false).unwrap();
    assert!(g.dw.is_none() && g.db.is_none());
    assert_close(g.dx.as_ref().unwrap(), &r.matmul(&w).unwrap(), 1e-12, "dx");
}

// ---- LoRA ------------------------------------------------------------------------------------

#[test]
fn lora_backward_matches_autograd_and_fd_with_dropout() {
    let (n, fin, fout, rank, scale) = (6, 5, 4, 2, 1.5);
    let x = randn(&[n, fin], 1.0, 10);
    let a = randn(&[rank, fin], 1.0, 11);
    let b = randn(&[fout, rank], 1.0, 12);
    let r = randn(&[n, fout], 1.0, 13);
    let mask = dropout_mask(n, fin, 0.4, 99, DType::F64, &CPU)
        .unwrap()
        .unwrap();
    let mask_t = mask.to_tensor().unwrap(); // [n, fin] f64: 0 or 1/0.6
    let (y, saved) = lora_forward(&x, &a, &b, scale, Some(mask.clone())).unwrap();
    let g = lora_backward(&x, &a, &b, scale, &saved, &r).unwrap();
    let (xv, av, bv) = (var(&x), var(&a), var(&b));
    let yr = ((xv.mul(&mask_t).unwrap().matmul(&av.t().unwrap()).unwrap())
        .matmul(&bv.t().unwrap())
        .unwrap()
        * scale)
        .unwrap();
    assert_close(&y, &yr, 1e-12, "lora forward");
    let ag = autograd(&yr, &r, &[&xv, &av, &bv]);
    assert_close(&g.dx, &ag[0], 1e-12, "dx");
    assert_close(&g.da, &ag[1], 1e-12, "dA");
    assert_close(&g.db, &ag[2], 1e-12, "dB");
    let f = |x: &Tensor, a: &Tensor, b: &Tensor| {
        dot(
            &lora_forward(x, a, b, scale, Some(mask.clone())).unwrap().0,
            &r,
        )
    };
    check_fd(&|t| f(t, &a, &b), &x, &g.dx, None, 1e-7, "dx fd");
    check_fd(&|t| f(&x, t, &b), &a, &g.da, None, 1e-7, "dA fd");
    check_fd(&|t| f(&x, &a, t), &b, &g.db, None, 1e-7, "dB fd");
}

/// Three adapters that read one input (q/k/v: different output widths) with their A's stacked:
/// one GEMM group gives each adapter's delta, gradients and summed input gradient exactly as the
/// three run one at a time.
#[test]
fn stacked_lora_group_equals_its_adapters_one_by_one() {
    let (n, fin, rank, scale) = (7, 6, 2, 0.75);
    let outs = [5, 3, 4];
    let x = randn(&[n, fin], 1.0, 20);
    let a_s: Vec<Tensor> = (0..3).map(|i| randn(&[rank, fin], 1.0, 21 + i)).collect();
    let b_s: Vec<Tensor> = outs
        .iter()
        .zip(0..)
        .map(|(&o, i)| randn(&[o, rank], 1.0, 31 + i))
        .collect();
    let dys: Vec<Tensor> = outs
        .iter()
        .zip(0..)
        .map(|(&o, i)| randn(&[n, o], 1.0, 41 + i))
        .collect();
    let stacked = Tensor::cat(&a_s, 0).unwrap(); // [3r, in]
    let bs: Vec<&Tensor> = b_s.iter().collect();
    let (ys, saved) = lora_group_forward(&x, &stacked, &bs, scale, None).unwrap();
    // Gradient buffer: dA of the stack, then each dB, at offsets as in the flat gradient.
    let da_len = 3 * rank * fin;
    let db_offsets: Vec<usize> = outs
        .iter()
        .scan(da_len, |o, &out| {
            let here = *o;
            *o += out * rank;
            Some(here)
        })
        .collect();
    let total = db_offsets[2] + outs[2] * rank;
    let buf = Tensor::zeros(total, DType::F64, &CPU).unwrap();
    let out = LoraGroupGrads {
        da: GemmOut {
            buf: &buf,
            offset: 0,
        },
        dbs: db_offsets
            .iter()
            .map(|&offset| GemmOut { buf: &buf, offset })
            .collect(),
    };
    let dy_refs: Vec<&Tensor> = dys.iter().collect();
    let dx = lora_group_backward(&x, &stacked, &bs, scale, &saved, &dy_refs, out).unwrap();
    let mut dx_sum = x.zeros_like().unwrap();
    for i in 0..3 {
        let (y, s) = lora_forward(&x, &a_s[i], &b_s[i], scale, None).unwrap();
        assert_close(&ys[i], &y, 1e-12, "grouped delta");
        let g = lora_backward(&x, &a_s[i], &b_s[i], scale, &s, &dys[i]).unwrap();
        let da = buf.narrow(0, i * rank * fin, rank * fin).unwrap();
        assert_close(
            &da.reshape((rank, fin)).unwrap(),
            &g.da,
            1e-12,
            "grouped dA",
        );
        let db = buf.narrow(0, db_offsets[i], outs[i] * rank).unwrap();
        assert_close(
            &db.reshape((outs[i], rank)).unwrap(),
            &g.db,
            1e-12,
            "grouped dB",
        );
        dx_sum = (dx_sum + g.dx).unwrap();
    }
    assert_close(&dx, &dx_sum, 1e-12, "grouped dx");
    // A stack whose rows are not the B's rank is refused with the shapes named.
    let err = lora_group_forward(&x, &a_s[0], &bs, scale, None)
        .err()
        .expect("2 rows for three rank-2 adapters");
    assert!(err.to_string().contains("stacked A has 2 rows"), "{err}");
}

#[test]
fn dropout_mask_is_reproducible_and_inverted() {
    let m1 = flat(
        &dropout_mask(64, 32, 0.25, 7, DType::F32, &CPU)
            .unwrap()
            .unwrap()
            .to_tensor()
            .unwrap(),
    );
    let m2 = flat(
        &dropout_mask(64, 32, 0.25, 7, DType::F32, &CPU)
            .unwrap()
            .unwrap()
            .to_tensor()
            .unwrap(),
    );
    let m3 = flat(
        &dropout_mask(64, 32, 0.25, 8, DType::F32, &CPU)
            .unwrap()
            .unwrap()
            .to_tensor()
            .unwrap(),
    );
    assert_eq!(m1, m2, "same seed, same mask");
    assert_ne!(m1, m3, "different seed, different mask");
    let keep = 1.0 / 0.75;
    assert!(m1.iter().all(|&v| v == 0.0 || (v - keep).abs() < 1e-6));
    let dropped = m1.iter().filter(|&&v| v == 0.0).count() as f64 / m1.len() as f64;
    assert!((dropped - 0.25).abs() < 0.04, "drop rate {dropped}");
    assert!(dropout_mask(4, 4, 0.0, 7, DType::F32, &CPU)
        .unwrap()
        .is_none());
}

#[test]
fn lora_a_init_is_kaiming_uniform_sqrt5() {
    let fan_in = 256;
    let a = lora_a_init(16, fan_in, 3, &CPU).unwrap();
    let v = flat(&a);
    let bound = 1.0 / (fan_in as f64).sqrt();
    assert!(v.iter().all(|x| x.abs() <= bound));
    // uniform(-b, b) has variance b²/3
    let var = v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64;
    assert!(
        (var / (bound * bound / 3.0) - 1.0).abs() < 0.05,
        "variance {var}"
    );
    assert_eq!(v, flat(&lora_a_init(16, fan_in, 3, &CPU).unwrap()));
}

// ---- RMSNorm ---------------------------------------------------------------------------------

#[test]
fn rmsnorm_backward_matches_autograd_and_fd() {
    let eps = 1e-6;
    let x = randn(&[4, 8], 1.0, 20);
    let w = (randn(&[8], 0.3, 21) + 1.0).unwrap();
    let r = randn(&[4, 8], 1.0, 22);
    let (y, rstd) = rmsnorm_forward(&x, &w, eps).unwrap();
    let (dx, dw) = rmsnorm_backward(&x, &w, &rstd, &r, true).unwrap();
    let (xv, wv) = (var(&x), var(&w));
    let ms = (xv.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps).unwrap();
    let yr = xv
        .broadcast_div(&ms.sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&wv)
        .unwrap();
    assert_close(&y, &yr, 1e-12, "rmsnorm forward");
    let ag = autograd(&yr, &r, &[&xv, &wv]);
    assert_close(&dx, &ag[0], 1e-12, "dx");
    assert_close(dw.as_ref().unwrap(), &ag[1], 1e-12, "dw");
    let f = |x: &Tensor, w: &Tensor| dot(&rmsnorm_forward(x, w, eps).unwrap().0, &r);
    check_fd(&|t| f(t, &w), &x, &dx, None, 1e-7, "dx fd");
    check_fd(&|t| f(&x, t), &w, dw.as_ref().unwrap(), None, 1e-7, "dw fd");
    assert!(rmsnorm_backward(&x, &w, &rstd, &r, false)
        .unwrap()
        .1
        .is_none());
}

#[test]
fn rmsnorm_computes_statistics_in_f32_for_bf16() {
    let x = randn(&[3, 64], 50.0, 23).to_dtype(DType::BF16).unwrap();
    let w = Tensor::ones(64, DType::BF16, &CPU).unwrap();
    let (y, rstd) = rmsnorm_forward(&x, &w, 1e-6).unwrap();
    assert_eq!(rstd.dtype(), DType::F32);
    assert_eq!(y.dtype(), DType::BF16);
    let (y64, _) = rmsnorm_forward(
        &x.to_dtype(DType::F64).unwrap(),
        &w.to_dtype(DType::F64).unwrap(),
        1e-6,
    )
    .unwrap();
    assert_close(&y, &y64, 1e-2, "bf16 rmsnorm");
}

// ---- RoPE ------------------------------------------------------------------------------------

/// Independent rotate-half reference: pairs (i, i + d/2) rotated by `pos · theta^(−2i/d)`.
fn rope_reference(x: &Tensor, positions: &[u32], theta: f64) -> Tensor {
    let (n, heads, d) = x.dims3().unwrap();
    let xv = flat(x);
    let mut out = vec![0.0; xv.len()];
    for (t, &pos) in positions.iter().enumerate().take(n) {
        for h in 0..heads {
            let base = (t * heads + h) * d;
            for i in 0..d / 2 {
                let ang = pos as f64 * (1.0 / theta.powf(2.0 * i as f64 / d as f64)) as f32 as f64;
                let (x1, x2) = (xv[base + i], xv[base + i + d / 2]);
                out[base + i] = x1 * ang.cos() - x2 * ang.sin();
                out[base + i + d / 2] = x2 * ang.cos() + x1 * ang.sin();
            }
        }
    }
    Tensor::from_vec(out, (n, heads, d), &CPU).unwrap()
}

#[test]
fn the_rope_cache_gathers_exactly_the_tables_rope_table_builds() {
    for dtype in [DType::F32, DType::BF16] {
        let cache = RopeCache::new(16, 500_000.0, dtype, &CPU);
        // Packed samples, then a batch that needs a longer table (the cache grows), then one
        // within it again, and no positions at all.
        for positions in [
            vec![0u32, 1, 2, 0, 1, 2, 3],
            vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 40, 41, 0],
            vec![3, 2, 1],
            vec![],
        ] {
            let (cos, sin) = cache.tables(&positions).unwrap();
            let (want_cos, want_sin) = rope_table(&positions, 16, 500_000.0, dtype, &CPU).unwrap();
            for (got, want) in [(cos, want_cos), (sin, want_sin)] {
                assert_eq!(got.dims(), want.dims());
                let values = |t: Tensor| {
                    let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                    t.to_vec1::<f64>().unwrap()
                };
                assert_eq!(values(got), values(want), "{dtype:?} {positions:?}");
            }
        }
    }
}

#[test]
fn rope_matches_reference_and_backward_is_inverse_rotation() {
    let positions = [0u32, 1, 2, 0, 1, 7];
    let theta = 10000.0;
    let x = randn(&[6, 3, 8], 1.0, 30);
    let r = randn(&[6, 3, 8], 1.0, 31);
    let (cos, sin) = rope_table(&positions, 8, theta, DType::F64, &CPU).unwrap();
    let y = rope_forward(&x, &cos, &sin).unwrap();
    assert_close(
        &y,
        &rope_reference(&x, &positions, theta),
        1e-12,
        "rope forward",
    );
    // position 0 (each packed sample's first token) is not rotated
    assert_close(
        &y.narrow(0, 3, 1).unwrap(),
        &x.narrow(0, 3, 1).unwrap(),
        1e-15,
        "pos 0",
    );
    let dx = rope_backward(&r, &cos, &sin).unwrap();
    // autograd over the composite rotate-half formula
    let xv = var(&x);
    let half = 4;
    let rot = Tensor::cat(
        &[
            &xv.narrow(2, half, half).unwrap().neg().unwrap(),
            &xv.narrow(2, 0, half).unwrap(),
        ],
        2,
    )
    .unwrap();
    let yr = (xv.broadcast_mul(&cos.unsqueeze(1).unwrap()).unwrap()
        + rot.broadcast_mul(&sin.unsqueeze(1).unwrap()).unwrap())
    .unwrap();
    let ag = autograd(&yr, &r, &[&xv]);
    assert_close(&dx, &ag[0], 1e-12, "rope dx");
    check_fd(
        &|t| dot(&rope_forward(t, &cos, &sin).unwrap(), &r),
        &x,
        &dx,
        None,
        1e-7,
        "rope fd",
    );
    // inverse: backward(forward(x)) == x
    assert_close(
        &rope_backward(&y, &cos, &sin).unwrap(),
        &x,
        1e-12,
        "inverse",
    );
}

// ---- SwiGLU ----------------------------------------------------------------------------------

#[test]
fn swiglu_backward_matches_autograd_and_fd() {
    let g = randn(&[4, 6], 2.0, 40);
    let u = randn(&[4, 6], 1.0, 41);
    let r = randn(&[4, 6], 1.0, 42);
    let (dg, du) = swiglu_backward(&g, &u, &r).unwrap();
    let (gv, uv) = (var(&g), var(&u));
    let silu = gv
        .broadcast_div(&(gv.neg().unwrap().exp().unwrap() + 1.0).unwrap())
        .unwrap();
    let yr = (silu * uv.as_tensor()).unwrap();
    assert_close(
        &swiglu_forward(&g, &u).unwrap(),
        &yr,
        1e-12,
        "swiglu forward",
    );
    let ag = autograd(&yr, &r, &[&gv, &uv]);
    assert_close(&dg, &ag[0], 1e-12, "dg");
    assert_close(&du, &ag[1], 1e-12, "du");
    check_fd(
        &|t| dot(&swiglu_forward(t, &u).unwrap(), &r),
        &g,
        &dg,
        None,
        1e-7,
        "dg fd",
    );
    check_fd(
        &|t| dot(&swiglu_forward(&g, t).unwrap(), &r),
        &u,
        &du,
        None,
        1e-7,
        "du fd",
    );
}

// ---- embedding -------------------------------------------------------------------------------

#[test]
fn embedding_backward_accumulates_repeated_ids() {
    let w = randn(&[7, 3], 1.0, 50);
    let ids = Tensor::new(&[2u32, 5, 2, 0, 2], &CPU).unwrap();
    let r = randn(&[5, 3], 1.0, 51);
    let dw = embedding_backward(&ids, &r, 7).unwrap();
    let wv = var(&w);
    let yr = wv.index_select(&ids, 0).unwrap();
    assert_close(&embedding_forward(&ids, &w).unwrap(), &yr, 0.0, "gather");
    let ag = autograd(&yr, &r, &[&wv]);
    assert_close(&dw, &ag[0], 1e-12, "dW");
    check_fd(
        &|t| dot(&embedding_forward(&ids, t).unwrap(), &r),
        &w,
        &dw,
        None,
        1e-7,
        "dW fd",
    );
}

// ---- attention -------------------------------------------------------------------------------

#[test]
fn attention_gqa_varlen_matches_autograd_and_fd() {
    let cu = [0u32, 3, 7];
    let (n, hq, hkv, d) = (7, 4, 2, 4);
    let q = randn(&[n, hq, d], 1.0, 60);
    let k = randn(&[n, hkv, d], 1.0, 61);
    let v = randn(&[n, hkv, d], 1.0, 62);
    let r = randn(&[n, hq, d], 1.0, 63);
    let (out, lse) = attention_forward(&q, &k, &v, &cu).unwrap();
    assert_eq!(lse.dims(), &[hq, n]);
    let (dq, dk, dv) = attention_backward(&q, &k, &v, &out, &lse, &r, &cu).unwrap();
    let (qv, kv, vv) = (var(&q), var(&k), var(&v));
    let yr = attention_reference(&qv, &kv, &vv, &cu);
    assert_close(&out, &yr, 1e-12, "attention forward");
    let ag = autograd(&yr, &r, &[&qv, &kv, &vv]);
    assert_close(&dq, &ag[0], 1e-11, "dq");
    assert_close(&dk, &ag[1], 1e-11, "dk");
    assert_close(&dv, &ag[2], 1e-11, "dv");
    let f =
        |q: &Tensor, k: &Tensor, v: &Tensor| dot(&attention_forward(q, k, v, &cu).unwrap().0, &r);
    check_fd(&|t| f(t, &k, &v), &q, &dq, None, 1e-7, "dq fd");
    check_fd(&|t| f(&q, t, &v), &k, &dk, None, 1e-7, "dk fd");
    check_fd(&|t| f(&q, &k, t), &v, &dv, None, 1e-7, "dv fd");
}

#[test]
fn attention_keeps_packed_samples_apart() {
    let (hq, hkv, d) = (4, 1, 4);
    let q = randn(&[9, hq, d], 1.0, 70);
    let k = randn(&[9, hkv, d], 1.0, 71);
    let v = randn(&[9, hkv, d], 1.0, 72);
    let packed = attention_forward(&q, &k, &v, &[0, 4, 9]).unwrap().0;
    for (a, l) in [(0usize, 4usize), (4, 5)] {
        let alone = attention_forward(
            &q.narrow(0, a, l).unwrap(),
            &k.narrow(0, a, l).unwrap(),
            &v.narrow(0, a, l).unwrap(),
            &[0, l as u32],
        )
        .unwrap()
        .0;
        assert_close(
            &packed.narrow(0, a, l).unwrap(),
            &alone,
            1e-14,
            "packed == alone",
        );
    }
    // an upstream gradient on sample 0 only gives exactly zero gradient on sample 1's q, k, v
    let (out, lse) = attention_forward(&q, &k, &v, &[0, 4, 9]).unwrap();
    let dout = Tensor::cat(
        &[
            randn(&[4, hq, d], 1.0, 73),
            Tensor::zeros((5, hq, d), DType::F64, &CPU).unwrap(),
        ],
        0,
    )
    .unwrap();
    let (dq, dk, dv) = attention_backward(&q, &k, &v, &out, &lse, &dout, &[0, 4, 9]).unwrap();
    for (t, name) in [(&dq, "dq"), (&dk, "dk"), (&dv, "dv")] {
        assert!(
            flat(&t.narrow(0, 4, 5).unwrap()).iter().all(|&x| x == 0.0),
            "{name} leaked across samples"
        );
        assert!(
            flat(&t.narrow(0, 0, 4).unwrap()).iter().any(|&x| x != 0.0),
            "{name} of sample 0 is zero"
        );
    }
    assert!(
        attention_forward(&q, &k, &v, &[0, 4, 8]).is_err(),
        "cu_seqlens must end at n"
    );
}

// ---- LM head + cross-entropy -----------------------------------------------------------------

/// Trained rows scattered over more runs than the in-place path takes (every other row), and
/// runs that end at a chunk's edge: dhidden by index-add and by in-place GEMMs both equal the
/// reference.
#[test]
fn ce_dhidden_in_place_runs_and_scattered_rows_match_reference() {
    let (n, h, vocab) = (13, 4, 9);
    let scattered = [1, -100, 3, -100, 5, -100, 7, -100, 0, -100, 2, -100, 4];
    let runs = [1, 2, 3, 4, -100, -100, 5, 6, 7, 8, 0, -100, 2];
    let hid = randn(&[n, h], 1.0, 90);
    let w = randn(&[vocab, h], 1.0, 91);
    let req = CeGradRequest {
        loss_scale: 0.5,
        dw_into: None,
    };
    for labels in [&scattered[..], &runs[..]] {
        let (hv, wv) = (var(&hid), var(&w));
        let g = ce_reference(&hv, &wv, labels).backward().unwrap();
        let dh_ref = (g.get(hv.as_tensor()).unwrap() * 0.5).unwrap();
        for chunk in [1, 3, 1024] {
            let out = lm_head_ce(&hid, &w, labels, chunk, Some(&req)).unwrap();
            assert_close(out.dhidden.as_ref().unwrap(), &dh_ref, 1e-12, "dhidden");
        }
    }
}

#[test]
fn chunked_ce_matches_unchunked_reference_and_fd() {
    let (n, h, vocab) = (9, 5, 11);
    let labels = [3, -100, 4, 10, -100, -100, 0, 7, 2];
    let hid = randn(&[n, h], 1.0, 80);
    let w = randn(&[vocab, h], 1.0, 81);
    // The head gradient is accumulated into a caller's buffer, as into the flat gradient.
    // A fresh buffer holds garbage, which beta 0 must overwrite.
    let dw_buf = || Tensor::full(7.0, (vocab, h), &Device::Cpu).unwrap();
    let run_beta = |chunk: usize, dw: &Tensor, beta: f64| {
        let req = CeGradRequest {
            loss_scale: 0.25,
            dw_into: Some((GemmOut::whole(dw), beta)),
        };
        lm_head_ce(&hid, &w, &labels, chunk, Some(&req)).unwrap()
    };
    let run = |chunk: usize, dw: &Tensor| run_beta(chunk, dw, 0.0);
    let (hv, wv) = (var(&hid), var(&w));
    let lr = ce_reference(&hv, &wv, &labels);
    let g = lr.backward().unwrap();
    let (dh_ref, dw_ref) = (
        g.get(hv.as_tensor()).unwrap(),
        g.get(wv.as_tensor()).unwrap(),
    );
    for chunk in [1, 2, 3, 1024] {
        let dw = dw_buf();
        let out = run(chunk, &dw);
        assert_eq!(out.n_trained, 5);
        assert!(
            (out.loss_sum.read().unwrap() - lr.to_scalar::<f64>().unwrap()).abs() < 1e-12,
            "chunk {chunk}: loss"
        );
        assert_close(
            out.dhidden.as_ref().unwrap(),
            &(dh_ref * 0.25).unwrap(),
            1e-12,
            "dhidden",
        );
        assert_close(&dw, &(dw_ref * 0.25).unwrap(), 1e-12, "dw");
    }
    // A second call adds onto what the buffer holds (micro-batches accumulate).
    let dw = dw_buf();
    run(3, &dw);
    run_beta(2, &dw, 1.0);
    assert_close(&dw, &(dw_ref * 0.5).unwrap(), 1e-12, "dw accumulated twice");
    let dw = dw_buf();
    let out = run(2, &dw);
    let loss = |h: &Tensor, w: &Tensor| {
        0.25 * lm_head_ce(h, w, &labels, 2, None)
            .unwrap()
            .loss_sum
            .read()
            .unwrap()
    };
    check_fd(
        &|t| loss(t, &w),
        &hid,
        out.dhidden.as_ref().unwrap(),
        None,
        1e-7,
        "dhidden fd",
    );
    check_fd(&|t| loss(&hid, t), &w, &dw, None, 1e-7, "dw fd");
    // rows without a trained target get no gradient (row 0 predicts labels[1] = -100, the last row nothing)
    let dh = out.dhidden.unwrap();
    for row in [0usize, 3, 4, 8] {
        assert!(
            flat(&dh.narrow(0, row, 1).unwrap())
                .iter()
                .all(|&x| x == 0.0),
            "row {row}"
        );
    }
}

#[test]
fn ce_rejects_out_of_range_labels() {
    let err = shifted_targets(&[1, 2, 99], 11).unwrap_err().to_string();
    assert!(err.contains("labels[2] = 99"), "{err}");
    assert!(shifted_targets(&[1, -5], 11).is_err());
    let (rows, targets) = shifted_targets(&[-100, 4, -100, 6], 11).unwrap();
    assert_eq!((rows, targets), (vec![0, 2], vec![4, 6]));
}
