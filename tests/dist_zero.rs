//! ZeRO-2 over real TcpRing sockets (one thread per rank) against the single-process reference:
//! clip the summed gradient by its global norm, then AdamW on the whole flat buffer.

use std::time::Duration;

mod dist_support;

use candle_core::{DType, Device, Tensor};
use ftrun::config::OptimConfig;
use ftrun::dist::collectives::{sum_counts, sum_f64s, Collectives};
use ftrun::dist::tcp_ring::TcpRing;
use ftrun::model::decoder::{Batch, Decoder, GradReady, TrainMode};
use ftrun::model::weights::LazyCheckpoint;
use ftrun::model::ModelConfig;
use ftrun::train::optim::{clip_grad_norm, AdamW, FlatParams};
use ftrun::train::zero::ZeroOptimizer;
use rand::{Rng, SeedableRng};

/// Every rank's `body` on its own thread, with its TcpRing.
fn run_world<T: Send + 'static>(
    world: usize,
    body: impl Fn(TcpRing) -> T + Send + Sync + 'static,
) -> Vec<T> {
    dist_support::run_world(world, Duration::from_secs(10), body)
}

fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * scale)
        .collect()
}

/// Three tensors of 5, 6 and 2 values (13: not a multiple of 2 or 3), the first two decayed.
fn params() -> FlatParams {
    let shapes: [&[usize]; 3] = [&[5], &[2, 3], &[2]];
    let values: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            Tensor::from_vec(random(i as u64, n, 1.0), *s, &Device::Cpu).unwrap()
        })
        .collect();
    FlatParams::from_values(&values, &[true, true, false]).unwrap()
}

fn optim() -> OptimConfig {
    OptimConfig {
        lr: 1e-2,
        weight_decay: 0.05,
        max_grad_norm: 1.0,
        ..OptimConfig::default()
    }
}

/// Rank r's gradient at step t: large enough that clipping is active.
fn grad(rank: usize, step: usize, n: usize) -> Vec<f32> {
    random(100 + 10 * step as u64 + rank as u64, n, 3.0)
}

fn reference(world: usize, steps: usize) -> Vec<f32> {
    let mut p = params();
    let n = p.numel();
    let mut adamw = AdamW::new(&optim(), &p).unwrap();
    for t in 0..steps {
        let mut sum = vec![0f64; n];
        for r in 0..world {
            for (s, g) in sum.iter_mut().zip(grad(r, t, n)) {
                *s += g as f64;
            }
        }
        let sum: Vec<f32> = sum.into_iter().map(|x| x as f32).collect();
        let g = Tensor::new(sum.as_slice(), &Device::Cpu).unwrap();
        let (g, _) = clip_grad_norm(&g, 1.0).unwrap();
        adamw.step(&mut p, &g, 1e-2).unwrap();
    }
    p.master.to_vec1::<f32>().unwrap()
}

fn zero_run(world: usize, bucket: usize, steps: usize) -> Vec<(Vec<f32>, usize, usize)> {
    run_world(world, move |ring| {
        let rank = ring.rank();
        let mut z = ZeroOptimizer::new(&optim(), params(), rank, world, 25)
            .unwrap()
            .with_bucket_elems(bucket);
        let n = z.params().numel();
        for t in 0..steps {
            let g = Tensor::new(grad(rank, t, n).as_slice(), &Device::Cpu).unwrap();
            let shard = z.reduce_gradients(&g, &ring).unwrap();
            let norm = z.global_grad_norm(&shard, &ring).unwrap();
            z.apply(&shard, norm, 1.0, 1e-2, &ring).unwrap();
        }
        let state = z.optimizer_state().unwrap();
        (
            z.params().master.to_vec1::<f32>().unwrap(),
            z.shard_range().len(),
            state[0].1.elem_count(),
        )
    })
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}: element {i}: {x} vs {y}");
    }
}

#[test]
fn two_and_three_ranks_match_the_single_process_update() {
    for (world, bucket) in [(2, 2), (3, 1), (3, 100)] {
        let expected = reference(world, 3);
        let ranks = zero_run(world, bucket, 3);
        for (rank, (params, shard_len, moment_len)) in ranks.iter().enumerate() {
            // 13 values padded to a multiple of the world, split evenly.
            assert_eq!(*shard_len, 13usize.div_ceil(world));
            assert_eq!(
                *moment_len, *shard_len,
                "AdamW state is sized for the shard"
            );
            assert_close(
                params,
                &expected,
                2e-6,
                &format!("world {world} bucket {bucket} rank {rank}"),
            );
        }
        // The all-gather gives every rank the same bits.
        assert!(ranks.iter().all(|r| r.0 == ranks[0].0));
    }
}

#[test]
fn sums_of_counts_are_exact_and_scalars_agree() {
    let out = run_world(3, |ring| {
        let r = ring.rank() as u64;
        let counts = sum_counts(&ring, &[(1 << 40) + r, 7], &Device::Cpu).unwrap();
        let f = sum_f64s(&ring, &[0.5 * r as f64], &Device::Cpu).unwrap();
        (counts, f)
    });
    for (counts, f) in out {
        // Beyond f32's 24-bit integers: 3 * 2^40 + 0 + 1 + 2.
        assert_eq!(counts, vec![3 * (1u64 << 40) + 3, 21]);
        assert_eq!(f, vec![1.5]);
    }
}

/// With a bf16 replica (GPU runs) the fp32 master exists only as the shards: every rank's
/// replicated parameters are bf16 and equal the fp32 update rounded once, and the checkpoint
/// shard still holds the exact fp32 values of the rank's range.
#[test]
fn bf16_replica_keeps_fp32_only_in_the_shard() {
    let world = 2;
    let expected = reference(world, 3);
    let ranks = run_world(world, move |ring| {
        let rank = ring.rank();
        let mut z = ZeroOptimizer::new(&optim(), params(), rank, world, 25)
            .unwrap()
            .with_replica_dtype(DType::BF16)
            .unwrap();
        assert_eq!(z.params().master.dtype(), DType::BF16);
        let n = z.params().numel();
        for t in 0..3 {
            let g = Tensor::new(grad(rank, t, n).as_slice(), &Device::Cpu).unwrap();
            let shard = z.reduce_gradients(&g, &ring).unwrap();
            let norm = z.global_grad_norm(&shard, &ring).unwrap();
            z.apply(&shard, norm, 1.0, 1e-2, &ring).unwrap();
        }
        let replica = z.params().master.clone();
        let views_dtype = z.params().views(DType::BF16).unwrap()[0].dtype();
        let shard = z.shard_tensors().unwrap()[0].1.clone();
        (
            replica.dtype(),
            views_dtype,
            replica
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            shard.to_vec1::<f32>().unwrap(),
            z.shard_range(),
        )
    });
    for (dtype, views_dtype, replica, shard, range) in ranks {
        assert_eq!((dtype, views_dtype), (DType::BF16, DType::BF16));
        // One bf16 rounding of the fp32 value: at most half an ulp (2^-9 relative), one ulp
        // where the fp32 values of the two computations straddle a rounding boundary.
        for (i, (r, e)) in replica.iter().zip(&expected).enumerate() {
            assert!(
                (r - e).abs() <= e.abs() * 2f32.powi(-8) + 1e-6,
                "bf16 replica element {i}: {r} vs {e}"
            );
        }
        assert!(
            replica.iter().zip(&expected).any(|(r, e)| r != e),
            "the replica is rounded to bf16"
        );
        let exact: Vec<f32> = range
            .clone()
            .map(|i| expected.get(i).copied().unwrap_or(0.0))
            .collect();
        assert_close(&shard, &exact, 2e-6, "fp32 shard");
    }
}

/// Sequence `i` of the global batch: 12 tokens drawn from the vocabulary, every label trained
/// but the first.
fn sequence(i: usize, vocab: usize) -> Batch {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(500 + i as u64);
    let ids: Vec<u32> = (0..12).map(|_| rng.random_range(0..vocab as u32)).collect();
    let mut labels: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    labels[0] = -100;
    Batch::single(ids, labels)
}

/// The tiny demo model, every weight trained, in f32 on the CPU.
fn demo_decoder(dir: &std::path::Path) -> Decoder {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let mut source = LazyCheckpoint::open(dir).unwrap();
    Decoder::new(
        &cfg,
        &mut source,
        TrainMode::Full,
        DType::F32,
        &Device::Cpu,
        0,
    )
    .unwrap()
}

/// The ZeRO-2 step of the trainer on 2 ranks with 2 micro-batches each and buckets far smaller
/// than a block: the last micro-batch's backward reduces buckets into the shards while it runs
/// (the hook issued some before the backward returned), and the shards of the summed gradient
/// equal the gradient of the whole global batch (4 sequences) in one process.
#[test]
fn buckets_reduced_during_the_backward_match_the_single_process_gradient() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let corpus = vec!["the quick brown fox jumps over the lazy dog".to_string()];
    ftrun::model::demo::make_demo_model(&dir, &corpus, 0).unwrap();

    // Reference: one process accumulates the 4 sequences' gradients.
    let reference = demo_decoder(&dir);
    let vocab = reference.config().vocab_size;
    let batches: Vec<Batch> = (0..4).map(|i| sequence(i, vocab)).collect();
    let scale = 1.0 / (4.0 * 11.0); // the mean over every trained token of the global batch
    let mut grads = reference.new_grads();
    for b in &batches {
        reference
            .forward_backward(b, scale, &mut grads, 0, false)
            .unwrap();
    }
    let expected = grads.into_flat().unwrap().to_vec1::<f32>().unwrap();
    let n = expected.len();
    // One block's parameters span about 200k values: buckets of 20k make several per block.
    let bucket = 20_000;
    assert!(n > 10 * bucket, "the demo model has {n} trainable values");

    let dir2 = dir.clone();
    let ranks = run_world(2, move |ring| {
        let rank = ring.rank();
        let model = demo_decoder(&dir2);
        let vocab = model.config().vocab_size;
        let params = FlatParams::from_values(
            &model.initial_trainable_values().unwrap(),
            &model
                .trainable()
                .iter()
                .map(|t| t.decay)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let mut z = ZeroOptimizer::new(&optim(), params, rank, 2, 25)
            .unwrap()
            .with_bucket_elems(bucket);
        let mut grads = model.new_grads();
        let mut reducer = z.reducer(&ring).unwrap();
        for micro in 0..2 {
            let b = sequence(2 * rank + micro, vocab);
            // grad_accum 2: only the last micro-batch's backward reports final gradients.
            let ready: Option<&mut dyn GradReady> = (micro == 1).then_some(&mut reducer as _);
            model
                .forward_backward_ready(&b, scale, &mut grads, 0, false, ready)
                .unwrap();
            if micro == 0 {
                assert_eq!(
                    reducer.buckets_issued_early(),
                    0,
                    "accumulating micro-batch"
                );
            }
        }
        let early = reducer.buckets_issued_early();
        let shard = reducer.finish(&grads.into_flat().unwrap()).unwrap();
        let shard_values = shard.to_vec1::<f32>().unwrap();
        // The step goes on as the trainer's: norm from the shards, update, all-gather.
        let norm = z.global_grad_norm(&shard, &ring).unwrap();
        z.apply(&shard, norm, 1.0, 1e-4, &ring).unwrap();
        (
            early,
            shard_values,
            z.params().master.to_vec1::<f32>().unwrap(),
        )
    });
    let total_buckets = n.div_ceil(bucket);
    let scale_max = expected.iter().fold(0f32, |m, g| m.max(g.abs()));
    let mut gathered = vec![];
    for (rank, (early, shard, _)) in ranks.iter().enumerate() {
        assert!(
            *early > 0 && *early < total_buckets,
            "rank {rank}: {early} of {total_buckets} buckets were issued during the backward"
        );
        gathered.extend_from_slice(shard);
    }
    // The padding tail of the last shard stays zero.
    assert!(gathered[n..].iter().all(|&g| g == 0.0));
    for (i, (g, e)) in gathered[..n].iter().zip(&expected).enumerate() {
        assert!(
            (g - e).abs() <= 1e-5 * scale_max,
            "gradient element {i}: {g} (2 ranks) vs {e} (1 process)"
        );
    }
    // The all-gathered update leaves every rank with the same parameters.
    assert_eq!(ranks[0].2, ranks[1].2);
}
