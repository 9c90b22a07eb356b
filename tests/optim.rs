//! AdamW, clipping and the LR schedule against reference numbers from
//! scripts/fixtures/optim_fixture.py (torch's documented AdamW and clip_grad_norm_ in numpy,
//! mmengine's chained LinearLR + CosineAnnealingLR).

use candle_core::{DType, Device, Tensor};
use ftrun::config::{OptimConfig, ScheduleConfig};
use ftrun::model::decoder::Grads;
use ftrun::train::optim::{adamw_update, clip_coef, sum_squares, AdamWStep};
use ftrun::train::{clip_grad_norm, AdamW, FlatParams, LrSchedule};
use std::collections::HashMap;
use std::path::Path;

fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/optim")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn vec1(v: &[f64]) -> Tensor {
    let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Tensor::new(f.as_slice(), &Device::Cpu).unwrap()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn assert_close(got: &[f64], want: &[f64], rtol: f64, atol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= atol + rtol * w.abs(),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

#[derive(serde::Deserialize)]
struct AdamCase {
    sizes: Vec<usize>,
    decay: Vec<bool>,
    lrs: Vec<f64>,
    betas: [f64; 2],
    eps: f64,
    weight_decay: f64,
    init: Vec<Vec<f64>>,
    grads: Vec<Vec<Vec<f64>>>,
    params_after_each_step: Vec<Vec<Vec<f64>>>,
    exp_avg: Vec<Vec<f64>>,
    exp_avg_sq: Vec<Vec<f64>>,
}

fn adam_setup(case: &AdamCase) -> (FlatParams, AdamW) {
    let values: Vec<Tensor> = case.init.iter().map(|v| vec1(v)).collect();
    let params = FlatParams::from_values(&values, &case.decay).unwrap();
    let cfg = OptimConfig {
        lr: case.lrs[0],
        betas: case.betas,
        eps: case.eps,
        weight_decay: case.weight_decay,
        max_grad_norm: 0.0,
        ..OptimConfig::default()
    };
    let opt = AdamW::new(&cfg, &params).unwrap();
    (params, opt)
}

#[test]
fn adamw_matches_torch_algorithm() {
    let cases: Vec<AdamCase> = fixture("adamw.json");
    for (c, case) in cases.iter().enumerate() {
        let (mut params, mut opt) = adam_setup(case);
        assert_eq!(params.numel(), case.sizes.iter().sum::<usize>());
        for (t, lr) in case.lrs.iter().enumerate() {
            let grads: Vec<Option<Tensor>> = case.grads[t].iter().map(|g| Some(vec1(g))).collect();
            let flat =
                Tensor::cat(&grads.iter().flatten().cloned().collect::<Vec<_>>(), 0).unwrap();
            opt.step(&mut params, &flat, *lr).unwrap();
            let views = params.views(DType::F32).unwrap();
            for (i, view) in views.iter().enumerate() {
                assert_close(
                    &to_f64(view),
                    &case.params_after_each_step[t][i],
                    2e-6,
                    2e-6,
                    &format!("case {c} step {} tensor {i}", t + 1),
                );
            }
        }
        assert_eq!(opt.step_count(), case.lrs.len() as u64);
        let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        let want_m: Vec<f64> = case.exp_avg.concat();
        let want_v: Vec<f64> = case.exp_avg_sq.concat();
        assert_close(
            &to_f64(&state["optimizer.exp_avg"]),
            &want_m,
            1e-5,
            1e-9,
            "exp_avg",
        );
        assert_close(
            &to_f64(&state["optimizer.exp_avg_sq"]),
            &want_v,
            1e-5,
            1e-12,
            "exp_avg_sq",
        );
    }
}

#[test]
fn adamw_state_round_trip_resumes_identically() {
    let cases: Vec<AdamCase> = fixture("adamw.json");
    let case = &cases[0];
    let grads = |t: usize| -> Tensor { vec1(&case.grads[t].concat()) };
    // Run 2 steps, save, restore into a fresh optimizer, run the rest: same as the reference.
    let (mut params, mut opt) = adam_setup(case);
    for t in 0..2 {
        opt.step(&mut params, &grads(t), case.lrs[t]).unwrap();
    }
    let saved: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    let (_, mut resumed) = adam_setup(case);
    resumed.load_state(&saved).unwrap();
    assert_eq!(resumed.step_count(), 2);
    for t in 2..case.lrs.len() {
        resumed.step(&mut params, &grads(t), case.lrs[t]).unwrap();
    }
    let want: Vec<f64> = case.params_after_each_step.last().unwrap().concat();
    assert_close(&to_f64(&params.master), &want, 2e-6, 2e-6, "resumed");

    // A state for other parameters is refused with the reason.
    let mut wrong = saved.clone();
    wrong.insert(
        "optimizer.exp_avg".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let msg = resumed.load_state(&wrong).unwrap_err().to_string();
    assert!(
        msg.contains("optimizer.exp_avg") && msg.contains("[3]"),
        "{msg}"
    );
    let mut missing = saved;
    missing.remove("optimizer.step");
    let msg = resumed.load_state(&missing).unwrap_err().to_string();
    assert!(msg.contains("optimizer.step"), "{msg}");
}

#[test]
fn adamw_update_on_a_range_equals_the_whole_buffer_update() {
    // ZeRO shards the flat buffer: updating two halves separately must equal one update.
    let cases: Vec<AdamCase> = fixture("adamw.json");
    let case = &cases[0];
    let (params, _) = adam_setup(case);
    let grad = vec1(&case.grads[0].concat());
    let n = params.numel();
    let zeros = Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap();
    let mask = params.decay_mask().unwrap();
    let h = AdamWStep {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
        grad_scale: 1.0,
    };
    let (whole, _, _) =
        adamw_update(&params.master, &grad, &zeros, &zeros, Some(&mask), &h).unwrap();
    let mut parts = vec![];
    for (start, len) in [(0, 4), (4, n - 4)] {
        let s = |t: &Tensor| t.narrow(0, start, len).unwrap();
        let (p, _, _) = adamw_update(
            &s(&params.master),
            &s(&grad),
            &s(&zeros),
            &s(&zeros),
            Some(&s(&mask)),
            &h,
        )
        .unwrap();
        parts.push(p);
    }
    let joined = Tensor::cat(&parts, 0).unwrap();
    assert_eq!(to_f64(&joined), to_f64(&whole));
    assert_eq!(to_f64(&mask), [1., 1., 1., 1., 1., 1., 0., 0., 0., 0.]);
}

#[test]
fn flat_params_views_and_grads_keep_shapes_and_order() {
    let dev = Device::Cpu;
    let a = Tensor::arange(0f32, 6., &dev)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    let b = Tensor::new(&[10f32, 11.], &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let p = FlatParams::from_values(&[a.clone(), b], &[true, false]).unwrap();
    assert_eq!(p.numel(), 8);
    assert_eq!(p.slots[1].offset, 6);
    assert_eq!(p.slots[0].shape, [2, 3]);
    assert_eq!(to_f64(&p.master), [0., 1., 2., 3., 4., 5., 10., 11.]);
    let views = p.views(DType::BF16).unwrap();
    assert_eq!(views[0].dims(), [2, 3]);
    assert_eq!(views[0].dtype(), DType::BF16);
    assert_eq!(to_f64(&views[1]), [10., 11.]);

    // The decoder's gradient buffer has the same layout: a slot's gradient lands at its offset.
    let shapes: Vec<Vec<usize>> = p.slots.iter().map(|s| s.shape.clone()).collect();
    let mut grads = Grads::new(&shapes, DType::F32, &dev);
    grads
        .add(1, &Tensor::new(&[1f32, -2.], &dev).unwrap())
        .unwrap();
    grads
        .add(
            1,
            &Tensor::new(&[0.5f32, 0.25], &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
    assert!(grads.slot(0).is_none() && grads.slot(1).is_some());
    let msg = grads
        .add(0, &Tensor::zeros(6, DType::F32, &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("[6]") && msg.contains("[2, 3]"), "{msg}");
    assert_eq!(
        to_f64(&grads.into_flat().unwrap()),
        [0., 0., 0., 0., 0., 0., 1.5, -1.75]
    );
    assert!(FlatParams::from_values(&[a], &[]).is_err());
}

#[derive(serde::Deserialize)]
struct ClipCase {
    grad: Vec<f64>,
    max_norm: f64,
    total_norm: f64,
    clipped: Vec<f64>,
}

#[test]
fn clip_matches_torch_clip_grad_norm() {
    let cases: Vec<ClipCase> = fixture("clip.json");
    let mut clipped_any = false;
    let mut unclipped_any = false;
    for (i, case) in cases.iter().enumerate() {
        let g = vec1(&case.grad);
        let (clipped, norm) = clip_grad_norm(&g, case.max_norm).unwrap();
        assert!(
            (norm - case.total_norm).abs() <= 1e-5 * case.total_norm,
            "case {i}: norm {norm} vs {}",
            case.total_norm
        );
        assert_close(
            &to_f64(&clipped),
            &case.clipped,
            1e-5,
            1e-8,
            &format!("case {i}"),
        );
        clipped_any |= case.total_norm > case.max_norm;
        unclipped_any |= case.total_norm < case.max_norm;
    }
    assert!(clipped_any && unclipped_any);

    // The sharded form: per-range sums of squares add up to the same total and coefficient.
    let g = vec1(&cases[0].grad);
    let total: f64 = [(0, 20), (20, 30)]
        .iter()
        .map(|&(s, l)| sum_squares(&g.narrow(0, s, l).unwrap()).unwrap())
        .sum();
    assert!((total.sqrt() - cases[0].total_norm).abs() < 1e-5 * cases[0].total_norm);
    assert_eq!(clip_coef(0.5, 1.0), 1.0);
    assert!((clip_coef(4.0, 1.0) - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);

    // max_norm 0 disables clipping but still reports the norm.
    let (same, norm) = clip_grad_norm(&g, 0.0).unwrap();
    assert_eq!(to_f64(&same), to_f64(&g));
    assert!(norm > 1.0);
}

/// Clipping folded into the update (`step_scaled` with the clip coefficient, as the trainer runs
/// it) equals clipping first and stepping with the clipped copy, bit for bit.
#[test]
fn folded_clip_equals_clip_then_step() {
    let cases: Vec<AdamCase> = fixture("adamw.json");
    let case = &cases[0];
    let grad = vec1(&case.grads[0].concat()).affine(50.0, 0.0).unwrap();
    let (clipped, norm) = clip_grad_norm(&grad, 1.0).unwrap();
    let coef = clip_coef(norm, 1.0);
    assert!(coef < 0.5, "the case must clip (norm {norm})");
    let (mut p1, mut o1) = adam_setup(case);
    let (mut p2, mut o2) = adam_setup(case);
    o1.step(&mut p1, &clipped, 1e-3).unwrap();
    o2.step_scaled(&mut p2, &grad, coef, 1e-3, None).unwrap();
    assert_eq!(to_f64(&p1.master), to_f64(&p2.master));
    assert_eq!(clip_coef(norm, 0.0), 1.0, "max_norm 0 disables clipping");
    assert!(clip_coef(f64::NAN, 1.0).is_nan());
}

#[derive(serde::Deserialize)]
struct ScheduleCase {
    base_lr: f64,
    warmup_ratio: f64,
    total: usize,
    eta_min: f64,
    warmup_steps: usize,
    lrs: Vec<f64>,
}

#[test]
fn schedule_matches_mmengine_linear_then_cosine() {
    let cases: Vec<ScheduleCase> = fixture("schedule.json");
    for case in &cases {
        let cfg = ScheduleConfig {
            warmup_ratio: case.warmup_ratio,
            warmup_steps: None,
            decay: "cosine".into(),
            eta_min: case.eta_min,
        };
        let s = LrSchedule::new(&cfg, case.base_lr, case.total).unwrap();
        assert_eq!(
            s.warmup_steps(),
            case.warmup_steps,
            "ratio {}",
            case.warmup_ratio
        );
        let got: Vec<f64> = (0..case.total).map(|k| s.lr_at(k)).collect();
        assert_close(
            &got,
            &case.lrs,
            1e-9,
            1e-15,
            &format!("ratio {}", case.warmup_ratio),
        );

        // Explicit warmup_steps gives the same curve as the ratio that produced them.
        let explicit = ScheduleConfig {
            warmup_steps: Some(case.warmup_steps),
            ..cfg
        };
        let s2 = LrSchedule::new(&explicit, case.base_lr, case.total).unwrap();
        assert_eq!(s2, s);
    }
}

/// Views in another dtype come from one cast of the whole master: each equals its own slot
/// cast alone, keeps the slot's shape, and views in the master's dtype share its values.
#[test]
fn views_in_compute_dtype_equal_per_slot_casts() {
    let a = Tensor::new(&[[0.1f32, -2.5, 3.3], [1e-3, 7.77, -0.004]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[1.0009765f32, -65504.0, 0.333], &Device::Cpu).unwrap();
    let params = FlatParams::from_values(&[a.clone(), b.clone()], &[true, false]).unwrap();
    let bf = params.views(DType::BF16).unwrap();
    for (view, orig) in bf.iter().zip([&a, &b]) {
        assert_eq!(view.dtype(), DType::BF16);
        assert_eq!(view.dims(), orig.dims());
        let want = orig.to_dtype(DType::BF16).unwrap().flatten_all().unwrap();
        let got = view.flatten_all().unwrap();
        assert_eq!(
            got.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            want.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
        );
    }
    let f = params.views(DType::F32).unwrap();
    assert_eq!(f[1].to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
}

/// A bf16 gradient (full fine-tuning's one-write buffer) updates as its exact f32 widening, and
/// its sum of squares is that of the widened values.
#[test]
fn bf16_gradient_steps_as_its_f32_widening() {
    let values = [vec1(&[0.5, -1.0, 2.0, 0.125]), vec1(&[3.0, 0.25, -0.75])];
    let params = FlatParams::from_values(&values, &[true, false]).unwrap();
    let cfg = OptimConfig {
        weight_decay: 0.1,
        ..OptimConfig::default()
    };
    let g32 = vec1(&[0.3, -0.7, 1.1, 0.01, -2.5, 0.6, 0.05]);
    let g16 = g32.to_dtype(DType::BF16).unwrap();
    let widened = g16.to_dtype(DType::F32).unwrap();
    assert_eq!(sum_squares(&g16).unwrap(), sum_squares(&widened).unwrap());
    let (mut pa, mut pb) = (params.clone(), params);
    let (mut a, mut b) = (
        AdamW::new(&cfg, &pa).unwrap(),
        AdamW::new(&cfg, &pb).unwrap(),
    );
    for _ in 0..3 {
        a.step_scaled(&mut pa, &g16, 0.5, 1e-2, None).unwrap();
        b.step_scaled(&mut pb, &widened, 0.5, 1e-2, None).unwrap();
    }
    assert_eq!(to_f64(&pa.master), to_f64(&pb.master));
    // and the update did move the values
    assert_ne!(
        to_f64(&pa.master),
        to_f64(&vec1(&[0.5, -1.0, 2.0, 0.125, 3.0, 0.25, -0.75]))
    );
    assert!(a
        .step_scaled(&mut pa, &g16.to_dtype(DType::F16).unwrap(), 1.0, 1e-2, None)
        .is_err());
}

/// Weight decay goes by runs of slots (no `[N]` mask): adjacent slots with the same flag merge,
/// and without weight decay the buffer is one run.
#[test]
fn decay_runs_merge_slots_and_decay_only_their_values() {
    let values: Vec<Tensor> = [2usize, 3, 1, 2]
        .iter()
        .map(|&k| vec1(&vec![1.0; k]))
        .collect();
    let mut params = FlatParams::from_values(&values, &[true, true, false, true]).unwrap();
    assert_eq!(params.numel(), 8);
    let cfg = |wd| OptimConfig {
        weight_decay: wd,
        ..OptimConfig::default()
    };
    let runs = |p: &FlatParams, wd| AdamW::new(&cfg(wd), p).unwrap().decay_runs().to_vec();
    assert_eq!(
        runs(&params, 0.1),
        vec![(0..5, true), (5..6, false), (6..8, true)]
    );
    assert_eq!(runs(&params, 0.0), vec![(0..8, false)]);
    // The update by runs: decayed values shrink, the others do not (zero gradient).
    let mut opt = AdamW::new(&cfg(0.5), &params).unwrap();
    opt.step(&mut params, &vec1(&[0.0; 8]), 0.1).unwrap();
    let after = to_f64(&params.master);
    let shrunk = (1.0f64 - 0.1 * 0.5) as f32 as f64;
    let want: Vec<f64> = [1, 1, 1, 1, 1, 0, 1, 1]
        .iter()
        .map(|&d| if d == 1 { shrunk } else { 1.0 })
        .collect();
    assert_eq!(after, want);
}
