//! ZeRO-2 over real TcpRing sockets (one thread per rank) against the single-process reference:
//! clip the summed gradient by its global norm, then AdamW on the whole flat buffer.

use std::time::Duration;

mod dist_support;

use candle_core::{DType, Device, Tensor};
use ftrun::config::OptimConfig;
use ftrun::dist::collectives::{sum_counts, sum_f64s, Collectives};
use ftrun::dist::tcp_ring::TcpRing;
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
        let views_dtype = z.model_views().unwrap()[0].dtype();
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
