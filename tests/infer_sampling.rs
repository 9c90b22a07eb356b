//! Sampler: transformers' logits processing order and math, greedy, seeding.

use ftrun::infer::sampling::{apply_repetition_penalty, apply_top_k, apply_top_p, softmax};
use ftrun::infer::{GenConfig, Sampler};

const NEG: f32 = f32::NEG_INFINITY;

fn sampling(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> GenConfig {
    GenConfig {
        max_new_tokens: 16,
        temperature,
        top_p,
        top_k,
        repetition_penalty: 1.0,
        seed: Some(seed),
        do_sample: true,
    }
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once_per_token() {
    let mut scores = vec![2.0, -1.0, 0.5, 3.0, 0.0];
    // Token 1 appears twice: penalised once, as transformers gathers unique positions.
    apply_repetition_penalty(&mut scores, &[0, 1, 1, 4], 2.0);
    assert_eq!(scores, vec![1.0, -2.0, 0.5, 3.0, 0.0]);
}

#[test]
fn processing_order_is_penalty_temperature_top_k_top_p() {
    let cfg = GenConfig {
        repetition_penalty: 1.5,
        ..sampling(0.5, 3, 0.9, 0)
    };
    let sampler = Sampler::new(&cfg).unwrap();
    // By hand: penalty -> [1, 2, 2, 0.5, -1.5]; /0.5 -> [2, 4, 4, 1, -3]; top-3 keeps >= 2;
    // softmax of (2, 4, 4) = (0.063, 0.468, 0.468): the two 4s reach 0.937 >= 0.9.
    let scores = sampler.process_logits(&[1.0, 2.0, 3.0, 0.5, -1.0], &[2, 4]);
    assert_eq!(scores, vec![NEG, 4.0, 4.0, NEG, NEG]);

    let wider = Sampler::new(&GenConfig {
        top_p: 0.95,
        ..cfg.clone()
    })
    .unwrap();
    let scores = wider.process_logits(&[1.0, 2.0, 3.0, 0.5, -1.0], &[2, 4]);
    assert_eq!(scores, vec![2.0, 4.0, 4.0, NEG, NEG]);
}

#[test]
fn greedy_ignores_warpers_but_applies_the_repetition_penalty() {
    let cfg = GenConfig {
        repetition_penalty: 4.0,
        ..GenConfig::greedy(8)
    };
    let mut sampler = Sampler::new(&cfg).unwrap();
    // Without context the argmax is 1; penalising it (3.0 / 4) makes token 2 win.
    assert_eq!(sampler.sample(&[0.1, 3.0, 1.0], &[]).unwrap(), 1);
    assert_eq!(sampler.sample(&[0.1, 3.0, 1.0], &[1]).unwrap(), 2);
    // Temperature 0 with do_sample on is greedy too.
    let mut t0 = Sampler::new(&sampling(0.0, 0, 1.0, 3)).unwrap();
    for _ in 0..20 {
        assert_eq!(t0.sample(&[0.1, 3.0, 2.9], &[]).unwrap(), 1);
    }
}

#[test]
fn top_k_keeps_ties_with_the_kth_score() {
    let mut scores = vec![1.0, 3.0, 2.0, 2.0, 0.0];
    apply_top_k(&mut scores, 2);
    assert_eq!(scores, vec![NEG, 3.0, 2.0, 2.0, NEG]);
    let mut all = vec![1.0, 3.0];
    apply_top_k(&mut all, 0);
    assert_eq!(all, vec![1.0, 3.0]);
}

#[test]
fn top_p_edge_cases() {
    // probabilities 0.5, 0.3, 0.2
    let logits: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
    let kept = |top_p: f32| {
        let mut s = logits.clone();
        apply_top_p(&mut s, top_p);
        s.iter().filter(|x| x.is_finite()).count()
    };
    assert_eq!(kept(0.79), 2);
    assert_eq!(kept(0.81), 3);
    assert_eq!(kept(0.45), 1);
    // A tiny top_p still keeps the most likely token.
    assert_eq!(kept(1e-6), 1);
    assert_eq!(kept(1.0), 3);
    // One dominant token: it alone carries more than top_p.
    let mut peaked = vec![10.0, 0.0, 0.0, 0.0];
    apply_top_p(&mut peaked, 0.9);
    assert_eq!(peaked, vec![10.0, NEG, NEG, NEG]);
}

#[test]
fn top_k_one_samples_the_argmax() {
    let mut sampler = Sampler::new(&sampling(1.5, 1, 1.0, 11)).unwrap();
    let logits = [0.3, 1.2, 1.1, -0.4];
    for _ in 0..50 {
        assert_eq!(sampler.sample(&logits, &[]).unwrap(), 1);
    }
}

#[test]
fn samples_follow_the_distribution_and_stay_in_the_nucleus() {
    let probs = [0.6f32, 0.25, 0.1, 0.05];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let mut sampler = Sampler::new(&sampling(1.0, 0, 1.0, 5)).unwrap();
    let mut counts = [0usize; 4];
    let n = 20_000;
    for _ in 0..n {
        counts[sampler.sample(&logits, &[]).unwrap() as usize] += 1;
    }
    for (c, p) in counts.iter().zip(probs) {
        let freq = *c as f32 / n as f32;
        assert!(
            (freq - p).abs() < 0.015,
            "frequency {freq} for probability {p}"
        );
    }
    // top_p 0.8 keeps {0.6, 0.25}: tokens 2 and 3 never appear.
    let mut nucleus = Sampler::new(&sampling(1.0, 0, 0.8, 5)).unwrap();
    let mut seen = [false; 4];
    for _ in 0..2000 {
        seen[nucleus.sample(&logits, &[]).unwrap() as usize] = true;
    }
    assert_eq!(seen, [true, true, false, false]);
}

#[test]
fn a_seed_reproduces_the_draws() {
    let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 * 0.2).collect();
    let draws = |seed| {
        let mut s = Sampler::new(&sampling(1.0, 0, 1.0, seed)).unwrap();
        (0..40)
            .map(|_| s.sample(&logits, &[]).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(draws(42), draws(42));
    assert_ne!(draws(42), draws(43));
}

#[test]
fn softmax_gives_zero_to_removed_tokens() {
    let p = softmax(&[0.0, NEG, 0.0]);
    assert_eq!(p, vec![0.5, 0.0, 0.5]);
}

#[test]
fn bad_settings_and_nan_logits_are_named() {
    let err = |cfg: GenConfig| Sampler::new(&cfg).err().unwrap().to_string();
    assert!(err(sampling(1.0, 0, 0.0, 0)).contains("top_p = 0"));
    assert!(err(sampling(1.0, 0, 1.5, 0)).contains("top_p = 1.5"));
    assert!(err(sampling(-1.0, 0, 1.0, 0)).contains("temperature = -1"));
    let bad_penalty = GenConfig {
        repetition_penalty: 0.0,
        ..GenConfig::default()
    };
    assert!(err(bad_penalty).contains("repetition_penalty = 0"));
    let mut s = Sampler::new(&GenConfig::greedy(1)).unwrap();
    let e = s.sample(&[0.0, f32::NAN], &[]).unwrap_err().to_string();
    assert!(e.contains("NaN") && e.contains("token id 1"), "{e}");
}
