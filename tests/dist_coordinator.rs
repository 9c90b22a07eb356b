//! The gRPC coordinator with real workers (one thread each, each with its own client and
//! runtime) over loopback: registration, refusal, barriers, heartbeat loss, metrics,
//! checkpoint commits, blob exchange, and the TcpRing built from published addresses.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftrun::dist::coordinator::{manifest_path, CoordinatorConfig, CoordinatorHandle};
use ftrun::dist::tcp_ring::RingListener;
use ftrun::dist::worker::{Worker, WorkerInfo};

fn config(nnodes: usize, nproc: usize, sp: usize, out: &Path) -> CoordinatorConfig {
    CoordinatorConfig {
        nnodes,
        nproc,
        sp,
        heartbeat_interval: Duration::from_millis(50),
        // Generous: a loaded CI machine must not fake a dead worker.
        heartbeat_timeout: Duration::from_secs(3),
        wait_timeout: Duration::from_secs(5),
        output_dir: out.to_path_buf(),
    }
}

fn info(node_rank: u32, local_rank: u32) -> WorkerInfo {
    WorkerInfo {
        node_rank,
        local_rank,
        host: format!("node{node_rank}"),
        config_hash: "cfg-abc".into(),
        binary_version: "ftrun 0.1.0".into(),
        dataset_fingerprint: "data-123".into(),
        ring_addr: String::new(),
    }
}

/// Registers one worker per (node, local) pair, each on its own thread, and runs `body`.
fn run_workers<T: Send + 'static>(
    addr: String,
    infos: Vec<WorkerInfo>,
    body: impl Fn(anyhow::Result<Worker>) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let body = Arc::new(body);
    let handles: Vec<_> = infos
        .into_iter()
        .map(|i| {
            let (addr, body) = (addr.clone(), body.clone());
            std::thread::spawn(move || body(Worker::register(&addr, i, Duration::from_secs(5))))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn ranks_are_node_major_and_the_published_ring_works() {
    let dir = tempfile::tempdir().unwrap();
    let coord = CoordinatorHandle::start(config(2, 2, 2, dir.path()), "127.0.0.1:0").unwrap();
    // Registration order is scrambled on purpose: ranks must not depend on it.
    let infos: Vec<_> = [(1, 1), (0, 1), (1, 0), (0, 0)]
        .iter()
        .map(|&(n, l)| {
            let mut i = info(n, l);
            i.ring_addr = "placeholder".into();
            i
        })
        .collect();
    let handles: Vec<_> = infos
        .into_iter()
        .enumerate()
        .map(|(k, mut i)| {
            let addr = coord.addr().to_string();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(40 * k as u64));
                let listener = RingListener::bind("127.0.0.1:0").unwrap();
                i.ring_addr = listener.local_addr().to_string();
                let (node, local) = (i.node_rank as usize, i.local_rank as usize);
                let w = Worker::register(&addr, i, Duration::from_secs(5)).unwrap();
                let a = w.assignment().clone();
                assert_eq!(a.ring_addrs[a.rank], listener.local_addr().to_string());
                let ring = w.tcp_ring(listener, Duration::from_secs(5)).unwrap();
                let mut v = vec![a.rank as f32 + 1.0; 3];
                ring.all_reduce_sum_in_place(&mut v).unwrap();
                (node, local, a, v)
            })
        })
        .collect();
    for h in handles {
        let (node, local, a, v) = h.join().unwrap();
        assert_eq!(a.rank, node * 2 + local);
        assert_eq!((a.world, a.nnodes, a.nproc, a.sp, a.dp), (4, 2, 2, 2, 2));
        assert_eq!(a.heartbeat_interval, Duration::from_millis(50));
        assert_eq!(v, vec![10.0; 3]); // 1 + 2 + 3 + 4
    }
}

#[test]
fn a_worker_with_a_different_dataset_is_refused_naming_the_difference() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(1, 2, 1, dir.path());
    cfg.wait_timeout = Duration::from_millis(800);
    let coord = CoordinatorHandle::start(cfg, "127.0.0.1:0").unwrap();
    let addr = coord.addr().to_string();
    let first = {
        let addr = addr.clone();
        std::thread::spawn(move || Worker::register(&addr, info(0, 0), Duration::from_secs(5)))
    };
    std::thread::sleep(Duration::from_millis(200));
    let mut odd = info(0, 1);
    odd.dataset_fingerprint = "data-999".into();
    odd.binary_version = "ftrun 0.2.0".into();
    let err = format!(
        "{:#}",
        Worker::register(&addr, odd, Duration::from_secs(5))
            .err()
            .unwrap()
    );
    assert!(err.contains("FailedPrecondition"), "{err}");
    assert!(
        err.contains(r#"dataset fingerprint "data-999" differs from "data-123""#),
        "{err}"
    );
    assert!(
        err.contains(r#"binary version "ftrun 0.2.0" differs"#),
        "{err}"
    );
    assert!(
        !err.contains("config hash"),
        "the config hash matches: {err}"
    );
    // The refusal stops the job: the first worker fails at once with the same reason.
    let err = format!("{:#}", first.join().unwrap().err().unwrap());
    assert!(
        err.contains("the job was stopped") && err.contains("differs from"),
        "{err}"
    );
    assert!(coord.stop_reason().unwrap().contains("dataset fingerprint"));
}

#[test]
fn duplicate_and_out_of_range_workers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(1, 2, 1, dir.path());
    cfg.wait_timeout = Duration::from_millis(600);
    let coord = CoordinatorHandle::start(cfg, "127.0.0.1:0").unwrap();
    let addr = coord.addr().to_string();
    let err = Worker::register(&addr, info(1, 0), Duration::from_secs(5))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("outside the job's 1 nodes x 2 processes"),
        "{err}"
    );
    let first = {
        let addr = addr.clone();
        std::thread::spawn(move || Worker::register(&addr, info(0, 0), Duration::from_secs(5)))
    };
    std::thread::sleep(Duration::from_millis(150));
    let err = Worker::register(&addr, info(0, 0), Duration::from_secs(5))
        .err()
        .unwrap();
    assert!(err.to_string().contains("rank 0 (node 0 local 0"), "{err}");
    assert!(err.to_string().contains("already registered"), "{err}");
    assert!(first.join().unwrap().is_err());
}

#[test]
fn a_silent_worker_stops_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(1, 3, 1, dir.path());
    cfg.heartbeat_timeout = Duration::from_secs(1);
    let coord = CoordinatorHandle::start(cfg, "127.0.0.1:0").unwrap();
    let results = run_workers(
        coord.addr().to_string(),
        vec![info(0, 0), info(0, 1), info(0, 2)],
        |w| {
            let mut w = w.unwrap();
            // Beating keeps every rank alive well past the 1 s heartbeat timeout ...
            std::thread::sleep(Duration::from_millis(1800));
            assert_eq!(w.should_stop(), None, "rank {} stopped too early", w.rank());
            // ... until rank 2 goes silent.
            if w.rank() == 2 {
                w.stop_heartbeats();
                return (2, None, None);
            }
            let start = Instant::now();
            while w.should_stop().is_none() && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let barrier = w.barrier("after-death").err().map(|e| e.to_string());
            (w.rank(), w.should_stop(), barrier)
        },
    );
    for (rank, stop, barrier) in results {
        if rank == 2 {
            continue;
        }
        let stop = stop.unwrap_or_else(|| panic!("rank {rank} was never told to stop"));
        assert!(
            stop.contains("rank 2 (node 0 local 2") && stop.contains("heartbeat"),
            "{stop}"
        );
        let barrier = barrier.expect("a barrier after the stop must fail");
        assert!(barrier.contains("the job was stopped"), "{barrier}");
    }
    assert!(coord.stop_reason().unwrap().contains("rank 2"));
}

#[test]
fn barriers_release_together_and_can_be_reused() {
    let dir = tempfile::tempdir().unwrap();
    let coord = CoordinatorHandle::start(config(1, 3, 1, dir.path()), "127.0.0.1:0").unwrap();
    let start = Instant::now();
    let results = run_workers(
        coord.addr().to_string(),
        vec![info(0, 0), info(0, 1), info(0, 2)],
        move |w| {
            let w = w.unwrap();
            let mut rounds = Vec::new();
            for round in 0..2u64 {
                std::thread::sleep(Duration::from_millis(80 * w.rank() as u64));
                let entered = start.elapsed();
                w.barrier("epoch").unwrap();
                rounds.push((round, entered, start.elapsed()));
            }
            rounds
        },
    );
    for round in 0..2 {
        let entries: Vec<_> = results.iter().map(|r| r[round].1).collect();
        let last_entry = *entries.iter().max().unwrap();
        for r in &results {
            assert!(
                r[round].2 >= last_entry,
                "round {round}: left before the last entry"
            );
        }
    }
}

#[test]
fn metrics_are_aggregated_into_one_line_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let coord = CoordinatorHandle::start(config(1, 2, 1, dir.path()), "127.0.0.1:0").unwrap();
    let results = run_workers(
        coord.addr().to_string(),
        vec![info(0, 0), info(0, 1)],
        |w| {
            let w = w.unwrap();
            // Rank 1 reports second, so its report completes the step.
            std::thread::sleep(Duration::from_millis(100 * w.rank() as u64));
            let (loss, tokens) = if w.rank() == 0 {
                (2.5, 100)
            } else {
                (1.5, 300)
            };
            w.report_metrics(4, loss, tokens).unwrap()
        },
    );
    assert_eq!(results[0], None);
    let line = results[1].clone().unwrap();
    // Token-weighted: (2.5*100 + 1.5*300) / 400 = 1.75.
    assert!(line.starts_with("step 4 | loss 1.7500"), "{line}");
    assert!(
        line.contains("tokens 400") && line.contains("ranks 2"),
        "{line}"
    );
    assert_eq!(coord.metric_lines(), vec![line]);
}

#[test]
fn manifest_is_written_only_after_every_shard_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_path_buf();
    let coord = CoordinatorHandle::start(config(1, 3, 1, &out), "127.0.0.1:0").unwrap();
    let manifest = manifest_path(&out, 10);
    let check_path = manifest.clone();
    let results = run_workers(
        coord.addr().to_string(),
        vec![info(0, 0), info(0, 1), info(0, 2)],
        move |w| {
            let w = w.unwrap();
            let rank = w.rank();
            let files = vec![format!("rank{rank}.safetensors")];
            // Ranks report one after another; before the last, no manifest may exist.
            std::thread::sleep(Duration::from_millis(150 * rank as u64));
            if rank < 2 {
                assert!(
                    !check_path.exists(),
                    "manifest written before rank 2 reported"
                );
                let committed = w.shard_durable(10, files, false).unwrap();
                assert!(!committed);
                assert!(!check_path.exists());
            } else {
                assert!(w.shard_durable(10, files, false).unwrap());
            }
            // Everyone then learns of the commit (from heartbeats) ...
            let start = Instant::now();
            while w.last_committed_step() != Some(10) && start.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let learned = w.last_committed_step();
            // ... and a second checkpoint with `wait` blocks until all ranks reported.
            let waited = w.shard_durable(20, vec![], true).unwrap();
            (learned, waited)
        },
    );
    for (learned, waited) in results {
        assert_eq!(learned, Some(10));
        assert!(waited);
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert_eq!(json["step"], 10);
    assert_eq!(json["world"], 3);
    assert_eq!(json["config_hash"], "cfg-abc");
    let shards = json["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 3);
    for (rank, shard) in shards.iter().enumerate() {
        assert_eq!(shard["rank"], rank);
        assert_eq!(shard["files"][0], format!("rank{rank}.safetensors"));
    }
    assert!(!manifest.with_file_name("MANIFEST.json.tmp").exists());
    assert!(manifest_path(&out, 20).exists());
    assert_eq!(coord.last_committed_step(), Some(20));
}

#[test]
fn blobs_are_shared_from_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let coord = CoordinatorHandle::start(config(1, 3, 1, dir.path()), "127.0.0.1:0").unwrap();
    let results = run_workers(
        coord.addr().to_string(),
        vec![info(0, 0), info(0, 1), info(0, 2)],
        |w| {
            let w = w.unwrap();
            let leader = w.rank() == 0;
            if leader {
                // Members ask before the leader publishes: the fetch waits.
                std::thread::sleep(Duration::from_millis(200));
            }
            let id = w
                .share_id(
                    "nccl/world",
                    leader,
                    || Ok(vec![7u8; 128]),
                    Duration::from_secs(3),
                )
                .unwrap();
            let clash = leader.then(|| w.publish_blob("nccl/world", vec![1u8]).unwrap_err());
            (id, clash.map(|e| e.to_string()))
        },
    );
    for (id, clash) in results {
        assert_eq!(id, vec![7u8; 128]);
        if let Some(e) = clash {
            assert!(e.contains("already published"), "{e}");
        }
    }
}
