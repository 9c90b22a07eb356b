//! Ulysses sequence parallelism on CPU: TcpRing ranks in threads. The head/sequence exchange
//! against a single-process slicing of the whole tensors, and the decoder's loss and
//! gradients with the sequence split over 2 and 4 ranks against the whole sequence on one.

mod engine_common;

use std::collections::HashMap;
use std::time::Duration;

mod dist_support;

use candle_core::{DType, Device, Tensor};
use engine_common::{flat, randn};
use ftrun::dist::collectives::{Collectives, SoloComm};
use ftrun::dist::tcp_ring::TcpRing;
use ftrun::dist::ulysses::{gather_heads, scatter_heads, SeqPiece};
use ftrun::model::decoder::{Batch, Decoder, LoraSpec, StepStats, TrainMode};
use ftrun::model::{Arch, ModelConfig};

const CPU: Device = Device::Cpu;

/// Every rank's `body` on its own thread, with its TcpRing.
fn run_world<T: Send + 'static>(
    world: usize,
    body: impl Fn(TcpRing) -> T + Send + Sync + 'static,
) -> Vec<T> {
    dist_support::run_world(world, Duration::from_secs(10), body)
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

// ---- the exchange --------------------------------------------------------------------------

/// What every rank checks after the exchanges, for one dtype.
fn exchange_on_rank(ring: &TcpRing, dtype: DType, n: usize) -> Vec<(String, f64)> {
    let (sp, r) = (ring.world(), ring.rank());
    let m = n / sp;
    // The whole sequence's q-like [n, 8, 3] and kv-like [n, 4, 3] tensors, known to all ranks.
    let q = randn(&[n, 8, 3], 1.0, 11).to_dtype(dtype).unwrap();
    let k = randn(&[n, 4, 3], 1.0, 12).to_dtype(dtype).unwrap();
    let (q_piece, k_piece) = (
        q.narrow(0, r * m, m).unwrap(),
        k.narrow(0, r * m, m).unwrap(),
    );
    let [qs, ks] = scatter_heads(ring, [&q_piece, &k_piece]).unwrap();
    // After the exchange: every token, this rank's contiguous group of heads.
    let (hq, hk) = (8 / sp, 4 / sp);
    assert_eq!(qs.dims(), [n, hq, 3]);
    assert_eq!(ks.dims(), [n, hk, 3]);
    let want_q = q.narrow(1, r * hq, hq).unwrap();
    let want_k = k.narrow(1, r * hk, hk).unwrap();
    let [q_back, k_back] = gather_heads(ring, [&qs, &ks]).unwrap();
    assert_eq!(q_back.dims(), [m, 8, 3]);
    assert_eq!(q_back.dtype(), dtype);
    let d = |a: &Tensor, b: &Tensor| max_rel_diff(&flat(a), &flat(b));
    vec![
        ("scatter q".into(), d(&qs, &want_q)),
        ("scatter k".into(), d(&ks, &want_k)),
        ("round trip q".into(), d(&q_back, &q_piece)),
        ("round trip k".into(), d(&k_back, &k_piece)),
    ]
}

#[test]
fn scatter_matches_the_whole_sequence_layout_and_gather_inverts_it() {
    for sp in [2, 4] {
        // f32 and bf16 travel as f32 (exact); f64 as two f32 words (about 48 bits).
        for (dtype, tol) in [(DType::F32, 0.0), (DType::BF16, 0.0), (DType::F64, 1e-14)] {
            let results = run_world(sp, move |ring| exchange_on_rank(&ring, dtype, 4 * sp));
            for (rank, checks) in results.iter().enumerate() {
                for (what, diff) in checks {
                    assert!(
                        *diff <= tol,
                        "sp {sp}, {dtype:?}, rank {rank}: {what} differs by {diff}"
                    );
                }
            }
        }
    }
    // One rank: both exchanges are the identity.
    let x = randn(&[5, 2, 3], 1.0, 3).to_dtype(DType::F32).unwrap();
    let [y] = scatter_heads(&SoloComm, [&x]).unwrap();
    assert_eq!(flat(&y), flat(&x));
}

#[test]
fn shapes_that_do_not_split_over_the_group_are_refused() {
    let errors = run_world(2, |ring| {
        let odd_heads = Tensor::zeros((4, 3, 2), DType::F32, &CPU).unwrap();
        let e1 = scatter_heads(&ring, [&odd_heads]).unwrap_err().to_string();
        let odd_tokens = Tensor::zeros((5, 2, 2), DType::F32, &CPU).unwrap();
        let e2 = gather_heads(&ring, [&odd_tokens]).unwrap_err().to_string();
        (e1, e2)
    });
    for (e1, e2) in errors {
        assert!(e1.contains("3 heads do not split over 2"), "{e1}");
        assert!(e2.contains("5 tokens do not split over 2"), "{e2}");
    }
}

// ---- the decoder ---------------------------------------------------------------------------

fn config(arch: Arch, heads: usize, kv_heads: usize) -> ModelConfig {
    let (name, extra) = match arch {
        Arch::Llama => ("LlamaForCausalLM", r#""tie_word_embeddings": false"#),
        Arch::Qwen2 => ("Qwen2ForCausalLM", r#""tie_word_embeddings": true"#),
        Arch::InternLM2 => (
            "InternLM2ForCausalLM",
            r#""tie_word_embeddings": false, "bias": false"#,
        ),
    };
    ModelConfig::from_json(&format!(
        r#"{{"architectures": ["{name}"], "vocab_size": 19, "hidden_size": 32,
            "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": {heads},
            "num_key_value_heads": {kv_heads}, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            {extra}}}"#
    ))
    .unwrap()
}

/// Random weights under the HF names of `cfg` (f64).
fn weights(cfg: &ModelConfig) -> HashMap<String, Tensor> {
    let (h, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let mut seed = 100;
    let mut w = HashMap::new();
    let mut put = |name: String, shape: &[usize], scale: f64, offset: f64| {
        seed += 1;
        w.insert(name, (randn(shape, scale, seed) + offset).unwrap());
    };
    let internlm = cfg.arch == Arch::InternLM2;
    let embed = if internlm {
        "model.tok_embeddings.weight"
    } else {
        "model.embed_tokens.weight"
    };
    put(embed.into(), &[v, h], 0.5, 0.0);
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let (norms, linears): ([&str; 2], Vec<(&str, usize, usize)>) = if internlm {
            (
                ["attention_norm", "ffn_norm"],
                vec![
                    ("attention.wqkv", q + 2 * kv, h),
                    ("attention.wo", h, q),
                    ("feed_forward.w1", i, h),
                    ("feed_forward.w3", i, h),
                    ("feed_forward.w2", h, i),
                ],
            )
        } else {
            (
                ["input_layernorm", "post_attention_layernorm"],
                vec![
                    ("self_attn.q_proj", q, h),
                    ("self_attn.k_proj", kv, h),
                    ("self_attn.v_proj", kv, h),
                    ("self_attn.o_proj", h, q),
                    ("mlp.gate_proj", i, h),
                    ("mlp.up_proj", i, h),
                    ("mlp.down_proj", h, i),
                ],
            )
        };
        for n in norms {
            put(format!("{p}.{n}.weight"), &[h], 0.2, 1.0);
        }
        for (name, o, inp) in linears {
            put(format!("{p}.{name}.weight"), &[o, inp], 0.3, 0.0);
            if cfg.qkv_bias
                && ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .any(|s| name.ends_with(s))
            {
                put(format!("{p}.{name}.bias"), &[o], 0.3, 0.0);
            }
        }
    }
    put("model.norm.weight".into(), &[h], 0.2, 1.0);
    if !cfg.tie_word_embeddings {
        let head = if internlm {
            "output.weight"
        } else {
            "lm_head.weight"
        };
        put(head.into(), &[v, h], 0.5, 0.0);
    }
    w
}

/// Two packed samples of 7 and 4 tokens (11: not a multiple of 2 or 4, so the pieces are
/// padded). The second sample's first label is masked, as `make_batch` does.
fn batch() -> Batch {
    Batch {
        input_ids: vec![3, 7, 1, 12, 5, 9, 18, 2, 14, 6, 11],
        labels: vec![-100, -100, 1, 12, 5, 9, 18, -100, 14, 6, 11],
        position_ids: vec![0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3],
        cu_seqlens: vec![0, 7, 11],
    }
}

#[derive(Clone)]
struct Case {
    arch: Arch,
    heads: usize,
    kv_heads: usize,
    full: bool,
    dtype: DType,
    checkpointing: bool,
}

impl Case {
    fn decoder(&self) -> Decoder {
        let cfg = config(self.arch, self.heads, self.kv_heads);
        let mode = if self.full {
            TrainMode::Full
        } else {
            TrainMode::Lora(LoraSpec {
                r: 2,
                alpha: 4.0,
                dropout: 0.0,
                targets: vec![],
            })
        };
        let mut dec = Decoder::new(&cfg, &mut weights(&cfg), mode, self.dtype, &CPU, 5).unwrap();
        if !self.full {
            // Random adapters (B is zero at init) so that every gradient is non-trivial.
            let vals: Vec<Tensor> = dec
                .trainable()
                .iter()
                .enumerate()
                .map(|(i, t)| randn(&t.shape, 0.3, 500 + i as u64))
                .collect();
            dec.set_trainable(&vals).unwrap();
        }
        dec
    }
}

/// Loss stats and gradients (f64, zeros for a slot that got none) of one forward+backward.
type Outcome = (StepStats, Vec<Vec<f64>>);

fn outcome(dec: &Decoder, grads: ftrun::model::decoder::Grads, stats: StepStats) -> Outcome {
    let g = grads
        .slots()
        .iter()
        .zip(dec.trainable())
        .map(|(s, info)| match s {
            Some(t) => flat(t),
            None => vec![0.0; info.shape.iter().product()],
        })
        .collect();
    (stats, g)
}

/// The sequence split over `sp` ranks, each rank's loss and gradients summed, against the whole
/// sequence on one rank.
fn check_sp_matches_whole_sequence(case: Case, sp: usize, tol: f64) {
    let b = batch();
    let scale = 1.0 / 8.0; // 1 / trained targets
    let whole = {
        let dec = case.decoder();
        let mut g = dec.new_grads();
        let s = dec
            .forward_backward(&b, scale, &mut g, 7, case.checkpointing)
            .unwrap();
        outcome(&dec, g, s)
    };
    assert_eq!(whole.0.n_trained, 8);
    let c = case.clone();
    let ranks = run_world(sp, move |ring| {
        let dec = c.decoder();
        let piece = SeqPiece::split(&batch(), ring.world(), ring.rank()).unwrap();
        let mut g = dec.new_grads();
        let s = dec
            .forward_backward_sp(&piece, &ring, scale, &mut g, 7, c.checkpointing)
            .unwrap();
        (piece, outcome(&dec, g, s))
    });
    // The target of each piece's last token lives in the next piece: none is lost.
    for (piece, _) in &ranks[..sp - 1] {
        assert_ne!(piece.targets.last(), Some(&-100), "boundary target kept");
    }
    let what = format!(
        "{:?} heads {}/{} full={} {:?} ckpt={} sp={sp}",
        case.arch, case.heads, case.kv_heads, case.full, case.dtype, case.checkpointing
    );
    let n_trained: usize = ranks.iter().map(|r| r.1 .0.n_trained).sum();
    assert_eq!(
        n_trained, whole.0.n_trained,
        "{what}: each target counted once"
    );
    let loss: f64 = ranks.iter().map(|r| r.1 .0.loss_sum).sum();
    assert!(
        (loss - whole.0.loss_sum).abs() <= tol * whole.0.loss_sum.abs(),
        "{what}: loss {loss} vs {}",
        whole.0.loss_sum
    );
    for (slot, want) in whole.1.iter().enumerate() {
        let mut sum = vec![0.0; want.len()];
        for (_, (_, g)) in &ranks {
            for (acc, x) in sum.iter_mut().zip(&g[slot]) {
                *acc += x;
            }
        }
        assert!(
            want.iter().any(|x| *x != 0.0),
            "{what}: slot {slot} has a gradient"
        );
        let diff = max_rel_diff(&sum, want);
        assert!(
            diff <= tol,
            "{what}: gradient slot {slot} differs by {diff}"
        );
    }
}

#[test]
fn decoder_with_the_sequence_split_over_two_ranks_matches_the_whole_sequence_f64() {
    let base = Case {
        arch: Arch::Llama,
        heads: 4,
        kv_heads: 2,
        full: false,
        dtype: DType::F64,
        checkpointing: false,
    };
    check_sp_matches_whole_sequence(base.clone(), 2, 1e-10);
    // InternLM2's fused wqkv, with activation checkpointing (blocks recomputed in backward).
    check_sp_matches_whole_sequence(
        Case {
            arch: Arch::InternLM2,
            checkpointing: true,
            ..base.clone()
        },
        2,
        1e-10,
    );
    // Full fine-tuning of Qwen2 (q/k/v biases, the embedding tied to the head).
    check_sp_matches_whole_sequence(
        Case {
            arch: Arch::Qwen2,
            full: true,
            ..base
        },
        2,
        1e-10,
    );
}

#[test]
fn decoder_with_the_sequence_split_over_four_ranks_matches_the_whole_sequence() {
    let case = Case {
        arch: Arch::Llama,
        heads: 8,
        kv_heads: 4,
        full: true,
        dtype: DType::F64,
        checkpointing: false,
    };
    check_sp_matches_whole_sequence(case.clone(), 4, 1e-10);
    // f32: the exchange is exact, only the summation order of the pieces differs.
    check_sp_matches_whole_sequence(
        Case {
            dtype: DType::F32,
            ..case
        },
        4,
        1e-4,
    );
}

#[test]
fn kv_heads_that_do_not_split_over_the_group_are_refused_naming_both_counts() {
    let errors = run_world(4, |ring| {
        let case = Case {
            arch: Arch::Llama,
            heads: 4,
            kv_heads: 2,
            full: false,
            dtype: DType::F32,
            checkpointing: false,
        };
        let dec = case.decoder();
        let piece = SeqPiece::split(&batch(), 4, ring.rank()).unwrap();
        let mut g = dec.new_grads();
        dec.forward_backward_sp(&piece, &ring, 1.0, &mut g, 0, false)
            .unwrap_err()
            .to_string()
    });
    for e in errors {
        assert!(
            e.contains("sequence_parallel_size = 4")
                && e.contains("attention heads (4)")
                && e.contains("key/value heads (2)"),
            "{e}"
        );
    }
}
