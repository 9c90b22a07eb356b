//! TcpRing collectives over real loopback sockets, one thread per rank, checked against
//! serial computations for world sizes 1..=4.

use std::time::{Duration, Instant};

mod dist_support;
use dist_support::run_world;

use candle_core::{DType, Device, Tensor};
use ftrun::dist::collectives::{padded_len, Collectives, WorldLayout};
use ftrun::dist::tcp_ring::{RingListener, TcpRing};
use rand::{Rng, SeedableRng};

const TIMEOUT: Duration = Duration::from_secs(5);

/// Rank `rank`'s input: non-integer values so that summation order changes the bits.
fn input(rank: usize, len: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1000 + rank as u64);
    (0..len)
        .map(|_| rng.random_range(-1.0f32..1.0) * 1e3)
        .collect()
}

/// The documented ring order: chunk j (balanced bounds) is ((x[j+1] + x[j+2]) + ...) + x[j].
fn serial_ring_sum(inputs: &[Vec<f32>]) -> Vec<f32> {
    let w = inputs.len();
    let len = inputs[0].len();
    let mut out = vec![0f32; len];
    for j in 0..w {
        for e in (j * len / w)..((j + 1) * len / w) {
            let mut acc = inputs[(j + 1) % w][e];
            for k in 2..=w {
                acc += inputs[(j + k) % w][e];
            }
            out[e] = acc;
        }
    }
    out
}

#[test]
fn all_reduce_matches_serial_sum_bit_for_bit_on_every_rank() {
    for world in 1..=4 {
        for len in [0usize, 1, 3, 7, 1000, 4099] {
            let results = run_world(world, TIMEOUT, move |ring| {
                let mut v = input(ring.rank(), len);
                ring.all_reduce_sum_in_place(&mut v).unwrap();
                v
            });
            let inputs: Vec<_> = (0..world).map(|r| input(r, len)).collect();
            let expected = serial_ring_sum(&inputs);
            for (rank, got) in results.iter().enumerate() {
                let same_bits = got
                    .iter()
                    .zip(&expected)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same_bits && got.len() == len,
                    "world {world} len {len} rank {rank}"
                );
            }
            // Independent sanity check against an f64 sum.
            for e in 0..len {
                let exact: f64 = inputs.iter().map(|x| x[e] as f64).sum();
                assert!((expected[e] as f64 - exact).abs() < 1e-2, "element {e}");
            }
        }
    }
}

#[test]
fn reduce_scatter_gives_each_rank_its_shard_of_the_sum_with_padding() {
    for world in 1..=4 {
        // 10 elements do not split evenly over 3 or 4 ranks: pad with zeros, as ZeRO-2 does.
        let len = 10;
        let padded = padded_len(len, world);
        let results = run_world(world, TIMEOUT, move |ring| {
            let mut v = input(ring.rank(), len);
            v.resize(padded, 0.0);
            let t = Tensor::from_vec(v, padded, &Device::Cpu).unwrap();
            let shard = ring.reduce_scatter_sum(&t).unwrap();
            shard.to_vec1::<f32>().unwrap()
        });
        let inputs: Vec<_> = (0..world)
            .map(|r| {
                let mut v = input(r, len);
                v.resize(padded, 0.0);
                v
            })
            .collect();
        let expected = serial_ring_sum(&inputs);
        let n = padded / world;
        for (rank, shard) in results.iter().enumerate() {
            assert_eq!(shard.len(), n);
            assert_eq!(
                shard.as_slice(),
                &expected[rank * n..(rank + 1) * n],
                "world {world}"
            );
        }
        if world > 1 {
            assert!(padded > len || len % world == 0);
        }
    }
}

#[test]
fn reduce_scatter_refuses_a_length_not_divisible_by_world() {
    let errors = run_world(4, TIMEOUT, |ring| {
        let t = Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap();
        ring.reduce_scatter_sum(&t).unwrap_err().to_string()
    });
    for e in errors {
        assert!(
            e.contains("10 elements") && e.contains("pad it to 12"),
            "{e}"
        );
    }
}

#[test]
fn all_gather_concatenates_rank_inputs_in_rank_order() {
    for world in 1..=4 {
        let results = run_world(world, TIMEOUT, |ring| {
            let t = Tensor::from_vec(input(ring.rank(), 5), 5, &Device::Cpu).unwrap();
            ring.all_gather(&t).unwrap().to_vec1::<f32>().unwrap()
        });
        let expected: Vec<f32> = (0..world).flat_map(|r| input(r, 5)).collect();
        for got in results {
            assert_eq!(got, expected, "world {world}");
        }
    }
}

#[test]
fn broadcast_from_every_root_including_multi_piece_payloads() {
    for world in 1..=4 {
        for root in 0..world {
            let results = run_world(world, TIMEOUT, move |ring| {
                let mut v = input(ring.rank(), 37);
                ring.broadcast_in_place(&mut v, root).unwrap();
                v
            });
            for got in results {
                assert_eq!(got, input(root, 37), "world {world} root {root}");
            }
        }
    }
    // More than one 1 MiB pipeline piece.
    let len = 300_000;
    let results = run_world(3, TIMEOUT, move |ring| {
        let mut v = input(ring.rank(), len);
        ring.broadcast_in_place(&mut v, 2).unwrap();
        v
    });
    let expected = input(2, len);
    assert!(results.iter().all(|got| *got == expected));
}

#[test]
fn all_to_all_delivers_chunk_j_to_rank_j() {
    for world in 1..=4 {
        let n = 3;
        let results = run_world(world, TIMEOUT, move |ring| {
            let t =
                Tensor::from_vec(input(ring.rank(), world * n), world * n, &Device::Cpu).unwrap();
            ring.all_to_all(&t).unwrap().to_vec1::<f32>().unwrap()
        });
        for (rank, got) in results.iter().enumerate() {
            // Output chunk i is rank i's input chunk `rank`.
            let expected: Vec<f32> = (0..world)
                .flat_map(|i| input(i, world * n)[rank * n..(rank + 1) * n].to_vec())
                .collect();
            assert_eq!(*got, expected, "world {world} rank {rank}");
        }
    }
}

#[test]
fn barrier_releases_no_rank_before_the_last_arrives() {
    let start = Instant::now();
    let times = run_world(4, TIMEOUT, move |ring| {
        std::thread::sleep(Duration::from_millis(60 * ring.rank() as u64));
        let entered = start.elapsed();
        ring.barrier().unwrap();
        (entered, start.elapsed())
    });
    let last_entry = times.iter().map(|t| t.0).max().unwrap();
    for (entered, left) in times {
        assert!(
            left >= last_entry,
            "left at {left:?} before the last entry {last_entry:?} (entered {entered:?})"
        );
    }
}

#[test]
fn dp_and_sp_groups_reduce_over_their_own_members() {
    for (world, sp) in [(4, 2), (4, 1), (4, 4), (3, 1)] {
        let layout = WorldLayout::new(world, sp).unwrap();
        let results = run_world(world, TIMEOUT, move |ring| {
            let rank = ring.rank();
            let groups = layout.split(&ring).unwrap();
            let x = Tensor::from_vec(input(rank, 6), 6, &Device::Cpu).unwrap();
            let sp_sum = groups
                .sp
                .all_reduce_sum(&x)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let dp_sum = groups
                .dp
                .all_reduce_sum(&x)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // The world ring still works after the splits.
            ring.barrier().unwrap();
            (
                (groups.sp.rank(), groups.sp.world(), sp_sum),
                (groups.dp.rank(), groups.dp.world(), dp_sum),
            )
        });
        for (rank, ((sp_rank, sp_world, sp_sum), (dp_rank, dp_world, dp_sum))) in
            results.into_iter().enumerate()
        {
            let sp_members = layout.sp_group(layout.sp_color(rank));
            let dp_members = layout.dp_group(layout.dp_color(rank));
            assert_eq!(sp_world, sp);
            assert_eq!(dp_world, world / sp);
            assert_eq!(sp_members[sp_rank], rank);
            assert_eq!(dp_members[dp_rank], rank);
            let sum_of = |members: &[usize]| {
                serial_ring_sum(&members.iter().map(|&r| input(r, 6)).collect::<Vec<_>>())
            };
            assert_eq!(
                sp_sum,
                sum_of(&sp_members),
                "world {world} sp {sp} rank {rank}"
            );
            assert_eq!(
                dp_sum,
                sum_of(&dp_members),
                "world {world} sp {sp} rank {rank}"
            );
        }
    }
}

#[test]
fn setup_times_out_when_a_rank_never_joins() {
    let timeout = Duration::from_millis(500);
    let listeners: Vec<_> = (0..3)
        .map(|_| RingListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().to_string())
        .collect();
    let start = Instant::now();
    // Rank 2 never joins; rank 0 waits for it as its predecessor.
    let handles: Vec<_> = listeners
        .into_iter()
        .take(2)
        .enumerate()
        .map(|(rank, l)| {
            let addrs = addrs.clone();
            std::thread::spawn(move || {
                let ring = TcpRing::connect(l, rank, &addrs, timeout)?;
                ring.barrier()
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(start.elapsed() < Duration::from_secs(3));
    let rank0 = format!("{:#}", results[0].as_ref().unwrap_err());
    assert!(
        rank0.contains("timed out") && rank0.contains("waiting for rank 2"),
        "{rank0}"
    );
    assert!(
        results[1].is_err(),
        "rank 1 cannot finish a barrier without rank 2"
    );
}

#[test]
fn collective_times_out_when_a_peer_never_calls_it() {
    let timeout = Duration::from_millis(400);
    let start = Instant::now();
    let results = run_world(2, timeout, |ring| {
        if ring.rank() == 0 {
            ring.all_reduce_sum(&Tensor::ones(8, DType::F32, &Device::Cpu).unwrap())
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            // Holds its ring open without calling the collective.
            std::thread::sleep(Duration::from_millis(1500));
            Ok(())
        }
    });
    let err = results[0].as_ref().unwrap_err();
    assert!(
        err.contains("timed out after 400ms") && err.contains("rank 1"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(4));
}

#[test]
fn mismatched_collectives_fail_with_a_clear_error() {
    let results = run_world(2, TIMEOUT, |ring| {
        let t = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        if ring.rank() == 0 {
            let sent = ring.broadcast(&t, 0).map(|_| ()).map_err(|e| e.to_string());
            // Keep the sockets open until rank 1 has read the header.
            std::thread::sleep(Duration::from_millis(300));
            sent
        } else {
            ring.all_to_all(&t).map(|_| ()).map_err(|e| e.to_string())
        }
    });
    let err = results[1].as_ref().unwrap_err();
    assert!(
        err.contains("expected all_to_all") && err.contains("got broadcast"),
        "{err}"
    );
}

#[test]
fn non_f32_tensors_are_refused() {
    let errors = run_world(1, TIMEOUT, |ring| {
        let t = Tensor::zeros(4, DType::F16, &Device::Cpu).unwrap();
        ring.all_reduce_sum(&t).unwrap_err().to_string()
    });
    assert!(
        errors[0].contains("f32") && errors[0].contains("F16"),
        "{}",
        errors[0]
    );
}
