//! CPU-side tests of the kernel layer: the counter-based LoRA dropout rule the CUDA kernel shares
//! with the CPU, the kernel on/off switch, and the AdamW constants the fused kernel is given.
//! (The kernels themselves run in `ftrun kernel-check` on a GPU.)

use candle_core::{DType, Device, Tensor};
use ftrun::kernels::adamw::AdamWArgs;
use ftrun::kernels::{enabled, without_kernels};
use ftrun::model::layers::lora::{dropout_mask, DropoutMask};
use ftrun::model::layers::mix_seed;
use ftrun::train::optim::{adamw_update, AdamWStep};

const CPU: Device = Device::Cpu;

fn mask_values(rows: usize, cols: usize, p: f64, seed: u64) -> Vec<f32> {
    DropoutMask::new((rows, cols), p, seed, DType::F32, &CPU)
        .to_tensor()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn dropout_keeps_one_minus_p_and_scales_kept_values() {
    let (rows, cols) = (256, 1024);
    for p in [0.05, 0.1, 0.3, 0.5] {
        let m = mask_values(rows, cols, p, 42);
        let keep_scale = (1.0 / (1.0 - p)) as f32;
        assert!(
            m.iter().all(|&v| v == 0.0 || v == keep_scale),
            "p={p}: values other than 0 and 1/(1-p)"
        );
        let kept = m.iter().filter(|&&v| v != 0.0).count() as f64 / m.len() as f64;
        // 262144 Bernoulli draws: the standard deviation of the rate is below 0.001.
        assert!((kept - (1.0 - p)).abs() < 0.005, "p={p}: keep rate {kept}");
        // No structure along rows or columns: every row and column keeps about 1 - p.
        let row_rates: Vec<f64> = m
            .chunks(cols)
            .map(|r| r.iter().filter(|&&v| v != 0.0).count() as f64 / cols as f64)
            .collect();
        assert!(
            row_rates.iter().all(|r| (r - (1.0 - p)).abs() < 0.07),
            "p={p}: a row is off"
        );
        let col0 = (0..rows).filter(|r| m[r * cols] != 0.0).count() as f64 / rows as f64;
        assert!(
            (col0 - (1.0 - p)).abs() < 0.12,
            "p={p}: column 0 keeps {col0}"
        );
    }
}

#[test]
fn dropout_neighbours_are_independent() {
    // P(keep i and keep i+1) must be (1-p)^2: a counter-based hash with poor mixing fails this.
    let p = 0.5;
    let m = mask_values(512, 512, p, 9);
    let pairs = m.windows(2).filter(|w| w[0] != 0.0 && w[1] != 0.0).count() as f64;
    let rate = pairs / (m.len() - 1) as f64;
    assert!(
        (rate - 0.25).abs() < 0.005,
        "joint keep rate of neighbours {rate}"
    );
}

#[test]
fn dropout_mask_follows_the_documented_hash_rule() {
    // The rule the CUDA kernel implements: keep element i iff mix_seed(seed, i) >> 32 >= round(p 2^32).
    let (rows, cols, p, seed) = (7, 13, 0.3, 0xABCD);
    let m = mask_values(rows, cols, p, seed);
    let threshold = (p * 4_294_967_296.0f64).round() as u64;
    for (i, &v) in m.iter().enumerate() {
        let keep = (mix_seed(seed, i as u64) >> 32) >= threshold;
        assert_eq!(v != 0.0, keep, "element {i}");
    }
    // Reproducible, and another seed gives another mask.
    assert_eq!(m, mask_values(rows, cols, p, seed));
    assert_ne!(m, mask_values(rows, cols, p, seed + 1));
}

#[test]
fn dropout_apply_rounds_the_f32_product_once() {
    let (rows, cols, p) = (5, 40, 0.1);
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| (i as f32 * 0.37).sin() * 3.0)
        .collect();
    let x = Tensor::from_vec(data.clone(), (rows, cols), &CPU)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let mask = DropoutMask::new((rows, cols), p, 3, DType::BF16, &CPU);
    let got = mask.apply(&x).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    let got = got
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let xs = x
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let m = mask_values(rows, cols, p, 3);
    for i in 0..xs.len() {
        let want = half::bf16::from_f32(xs[i] * m[i]).to_f32();
        assert_eq!(got[i].to_bits(), want.to_bits(), "element {i}");
    }
    // A mask made for another shape is refused.
    let other = DropoutMask::new((rows, cols + 1), p, 3, DType::BF16, &CPU);
    let err = other.apply(&x).unwrap_err().to_string();
    assert!(err.contains("[5, 40]"), "{err}");
}

#[test]
fn dropout_mask_is_none_at_p_zero_and_rejects_p_one() {
    assert!(dropout_mask(4, 4, 0.0, 1, DType::F32, &CPU)
        .unwrap()
        .is_none());
    let err = dropout_mask(4, 4, 1.0, 1, DType::F32, &CPU)
        .unwrap_err()
        .to_string();
    assert!(err.contains("[0, 1)"), "{err}");
}

#[test]
fn without_kernels_switches_off_on_this_thread_only_while_it_runs() {
    let before = enabled();
    let inside = without_kernels(|| {
        // Nested use restores the outer state, not "on".
        without_kernels(|| ());
        enabled()
    });
    assert!(!inside);
    assert_eq!(enabled(), before);
}

/// The fused kernel's arithmetic, written out in Rust with the same roundings (`adamw.cu`: each
/// product and sum rounded separately, affines as `x * mul + add`).
fn adamw_like_the_kernel(
    p: f32,
    g: f32,
    m: f32,
    v: f32,
    mask: Option<f32>,
    a: &AdamWArgs,
) -> [f32; 3] {
    let (mut p, g) = (p, g * a.grad_scale);
    if a.decay != 0 {
        p = match mask {
            Some(mk) => p * (mk * a.neg_shrink + 1.0),
            None => p * a.one_minus_shrink + 0.0,
        };
    }
    let m = (m * a.beta1 + 0.0) + (g * a.one_minus_beta1 + 0.0);
    let v = (v * a.beta2 + 0.0) + ((g * g) * a.one_minus_beta2 + 0.0);
    let denom = v.sqrt() * a.inv_bias_correction2_sqrt + a.eps;
    let update = (m / denom) * a.step_size + 0.0;
    [p - update, m, v]
}

#[test]
fn adamw_kernel_constants_reproduce_the_candle_update_bit_for_bit() {
    let n = 500;
    let vals = |k: f32, s: f32| -> Vec<f32> {
        (0..n).map(|i| ((i as f32 + k) * 0.731).sin() * s).collect()
    };
    let (p, g, m) = (vals(1.0, 0.1), vals(2.0, 1e-3), vals(3.0, 1e-4));
    let v: Vec<f32> = vals(4.0, 1e-6).iter().map(|x| x.abs()).collect();
    let mask: Vec<f32> = (0..n).map(|i| (i % 3 != 0) as u8 as f32).collect();
    let t = |d: &[f32]| Tensor::from_slice(d, n, &CPU).unwrap();
    for (step, wd, with_mask, grad_scale) in [
        (1, 0.01, true, 1.0),
        (7, 0.1, false, 0.37),
        (1000, 0.0, true, 0.9),
    ] {
        let h = AdamWStep {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: wd,
            step,
            grad_scale,
        };
        let mask_t = with_mask.then(|| t(&mask));
        let (pn, mn, vn) =
            adamw_update(&t(&p), &t(&g), &t(&m), &t(&v), mask_t.as_ref(), &h).unwrap();
        let (pn, mn, vn) = (
            pn.to_vec1::<f32>().unwrap(),
            mn.to_vec1::<f32>().unwrap(),
            vn.to_vec1::<f32>().unwrap(),
        );
        let a = AdamWArgs::new(&h);
        for i in 0..n {
            let want =
                adamw_like_the_kernel(p[i], g[i], m[i], v[i], with_mask.then_some(mask[i]), &a);
            assert_eq!(
                [pn[i].to_bits(), mn[i].to_bits(), vn[i].to_bits()],
                want.map(f32::to_bits),
                "step {step}, element {i}"
            );
        }
    }
}
