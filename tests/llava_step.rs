//! LLaVA training step: projector forward/backward and the splice of image rows into the
//! decoder's input, against finite differences in f64 on the tiny demo LLM.

mod train_support;

use candle_core::{DType, Device, Tensor};
use ftrun::model::decoder::{Batch, Decoder, LoraSpec, TrainMode};
use ftrun::model::llava::{
    gelu_backward, gelu_forward, init_projector, llava_forward_backward, Projector,
};
use ftrun::model::weights::load_weights;
use ftrun::model::ModelConfig;
use train_support::setup;

const CPU: Device = Device::Cpu;

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn gelu_backward_matches_finite_differences() {
    let x = Tensor::new(&[-3.0f64, -1.2, -0.3, 0.0, 0.4, 1.7, 4.0], &CPU).unwrap();
    let dy = Tensor::ones_like(&x).unwrap();
    let g = gelu_backward(&x, &dy).unwrap().to_vec1::<f64>().unwrap();
    let h = 1e-6;
    for (i, xi) in x.to_vec1::<f64>().unwrap().iter().enumerate() {
        let f = |v: f64| {
            scalar(
                &gelu_forward(&Tensor::new(&[v], &CPU).unwrap())
                    .unwrap()
                    .sum_all()
                    .unwrap(),
            )
        };
        let fd = (f(xi + h) - f(xi - h)) / (2.0 * h);
        assert!((fd - g[i]).abs() < 1e-7, "x={xi}: {fd} vs {}", g[i]);
    }
}

/// A 2-sample packed batch of 30 tokens with 4 image rows at 5..9 (labels ignored).
struct LlavaSample {
    batch: Batch,
    image_start: usize,
}

fn sample(vocab: usize) -> LlavaSample {
    let ids: Vec<u32> = (0..30).map(|i| ((i * 11 + 5) % vocab) as u32).collect();
    let labels: Vec<i32> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if (5..9).contains(&i) || i < 2 {
                -100
            } else {
                t as i32
            }
        })
        .collect();
    LlavaSample {
        batch: Batch {
            position_ids: (0..20).chain(0..10).collect(),
            cu_seqlens: vec![0, 20, 30],
            input_ids: ids,
            labels,
        },
        image_start: 5,
    }
}

fn projector_params(p: &Projector) -> [&Tensor; 4] {
    [&p.w1, &p.b1, &p.w2, &p.b2]
}

/// Loss with one projector parameter element moved by `delta`.
fn loss_with(
    dec: &Decoder,
    p: &Projector,
    feats: &Tensor,
    s: &LlavaSample,
    which: usize,
    idx: usize,
    delta: f64,
) -> f64 {
    let mut ps: Vec<Tensor> = projector_params(p).iter().map(|t| (*t).clone()).collect();
    let shape = ps[which].dims().to_vec();
    let mut flat = ps[which].flatten_all().unwrap().to_vec1::<f64>().unwrap();
    flat[idx] += delta;
    ps[which] = Tensor::from_vec(flat, shape, &CPU).unwrap();
    let moved = Projector {
        w1: ps[0].clone(),
        b1: ps[1].clone(),
        w2: ps[2].clone(),
        b2: ps[3].clone(),
    };
    let mut g = dec.new_grads();
    llava_forward_backward(
        dec,
        &moved,
        feats,
        &s.batch,
        &[s.image_start],
        1.0,
        &mut g,
        3,
        false,
    )
    .unwrap()
    .0
    .loss_sum
}

#[test]
fn projector_gradients_through_the_llm_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 4);
    let cfg = ModelConfig::from_dir(&s.model).unwrap();
    let lora = LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec![],
    };
    // Pretrain stage (LLM frozen) and finetune stage (LoRA on the LLM).
    for mode in [TrainMode::Frozen, TrainMode::Lora(lora)] {
        let mut w = load_weights(&s.model, DType::F64, &CPU, |_| true).unwrap();
        let dec = Decoder::new(&cfg, &mut w, mode.clone(), DType::F64, &CPU, 1).unwrap();
        let vision = 32;
        let proj = init_projector(vision, cfg.hidden_size, 9, DType::F64, &CPU).unwrap();
        let feats = Tensor::randn(0f64, 1.0, (1, 4, vision), &CPU).unwrap(); // one image of 4 rows
        let smp = sample(cfg.vocab_size);
        let mut grads = dec.new_grads();
        let (stats, pg) = llava_forward_backward(
            &dec,
            &proj,
            &feats,
            &smp.batch,
            &[smp.image_start],
            1.0,
            &mut grads,
            3,
            true,
        )
        .unwrap();
        assert_eq!(
            stats.n_trained,
            smp.batch
                .labels
                .iter()
                .skip(1)
                .filter(|&&l| l != -100)
                .count()
        );
        let analytic = [&pg.w1, &pg.b1, &pg.w2, &pg.b2];
        for (which, idxs) in [
            (0usize, [0usize, 77, 300]),
            (1, [0, 5, 100]),
            (2, [1, 999, 5000]),
            (3, [2, 64, 127]),
        ] {
            let a = analytic[which]
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for idx in idxs {
                let h = 1e-5;
                let fd = (loss_with(&dec, &proj, &feats, &smp, which, idx, h)
                    - loss_with(&dec, &proj, &feats, &smp, which, idx, -h))
                    / (2.0 * h);
                let tol = 1e-6 + 1e-4 * fd.abs();
                assert!(
                    (fd - a[idx]).abs() < tol,
                    "{mode:?} param {which}[{idx}]: fd {fd} vs {}",
                    a[idx]
                );
            }
        }
        if matches!(mode, TrainMode::Lora(_)) {
            assert!(
                grads.slots().iter().all(|g| g.is_some()),
                "LoRA slots got no gradient"
            );
        }
    }
}

#[test]
fn a_trained_label_on_an_image_row_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 4);
    let cfg = ModelConfig::from_dir(&s.model).unwrap();
    let mut w = load_weights(&s.model, DType::F32, &CPU, |_| true).unwrap();
    let dec = Decoder::new(&cfg, &mut w, TrainMode::Frozen, DType::F32, &CPU, 1).unwrap();
    let proj = init_projector(32, cfg.hidden_size, 9, DType::F32, &CPU).unwrap();
    let feats = Tensor::zeros((1, 4, 32), DType::F32, &CPU).unwrap();
    let mut smp = sample(cfg.vocab_size);
    smp.batch.labels[6] = 3;
    let err = llava_forward_backward(
        &dec,
        &proj,
        &feats,
        &smp.batch,
        &[smp.image_start],
        1.0,
        &mut dec.new_grads(),
        0,
        false,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("image row 6"), "{err}");
}
