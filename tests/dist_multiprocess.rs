//! End to end over real processes: a coordinator, `spawn_local_workers` starting this test
//! binary again as three workers (each resolves its LaunchSpec from the environment,
//! registers, joins the TcpRing from the published addresses and all-reduces), and the
//! launcher collecting their `[rank i]`-prefixed output.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ftrun::dist::coordinator::{CoordinatorConfig, CoordinatorHandle};
use ftrun::dist::launch::{spawn_local_workers_to, LaunchArgs, LaunchSpec, Sink, WorkerCommand};
use ftrun::dist::tcp_ring::RingListener;
use ftrun::dist::worker::{Worker, WorkerInfo};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn three_worker_processes_register_and_all_reduce() {
    let dir = tempfile::tempdir().unwrap();
    let coord = CoordinatorHandle::start(
        CoordinatorConfig {
            nnodes: 1,
            nproc: 3,
            sp: 1,
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: Duration::from_secs(5),
            wait_timeout: Duration::from_secs(8),
            output_dir: dir.path().to_path_buf(),
        },
        "127.0.0.1:0",
    )
    .unwrap();
    let cmd = WorkerCommand {
        program: std::env::current_exe().unwrap(),
        args: [
            "worker_process_entry",
            "--exact",
            "--ignored",
            "--nocapture",
        ]
        .map(String::from)
        .to_vec(),
        env: vec![("FTRUN_TEST_COORDINATOR".into(), coord.addr().to_string())],
    };
    let out = Buffer::default();
    let workers = spawn_local_workers_to(
        3,
        &cmd,
        0,
        Arc::new(Mutex::new(out.clone())) as Sink,
        Arc::new(Mutex::new(Buffer::default())) as Sink,
    )
    .unwrap();
    assert_eq!(workers.wait().unwrap(), 0);
    let out = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    for rank in 0..3 {
        // 1 + 2 + 3, computed across three processes.
        let line = format!("[rank {rank}] worker rank {rank} of 3: sum [6.0, 6.0]");
        assert!(
            out.lines().any(|l| l == line),
            "missing {line:?} in:\n{out}"
        );
    }
    assert!(coord.metric_lines()[0].starts_with("step 1 | loss 2.0000"));
}

/// The worker process (run only by the test above, through `spawn_local_workers`).
#[test]
#[ignore = "a worker process entry point started by three_worker_processes_register_and_all_reduce"]
fn worker_process_entry() {
    let coordinator = std::env::var("FTRUN_TEST_COORDINATOR").expect("started by the launcher");
    let cli = LaunchArgs {
        nnodes: Some(1),
        node_rank: Some(0),
        nproc: Some(3),
        coordinator: Some(coordinator),
    };
    let spec = LaunchSpec::from_env(&cli).unwrap();
    let local_rank = spec
        .local_rank
        .expect("FTRUN_LOCAL_RANK is set by the launcher");
    let listener = RingListener::bind("127.0.0.1:0").unwrap();
    let info = WorkerInfo {
        node_rank: spec.node_rank as u32,
        local_rank: local_rank as u32,
        host: "localhost".into(),
        config_hash: "c".into(),
        binary_version: env!("CARGO_PKG_VERSION").into(),
        dataset_fingerprint: "d".into(),
        ring_addr: listener.local_addr().to_string(),
    };
    let worker = Worker::register(&spec.coordinator, info, Duration::from_secs(5)).unwrap();
    assert_eq!(Some(worker.rank()), spec.rank());
    let ring = worker.tcp_ring(listener, Duration::from_secs(5)).unwrap();
    let mut v = vec![worker.rank() as f32 + 1.0; 2];
    ring.all_reduce_sum_in_place(&mut v).unwrap();
    println!(
        "worker rank {} of {}: sum {v:?}",
        worker.rank(),
        worker.world()
    );
    worker.report_metrics(1, 2.0, 10).unwrap();
    worker.barrier("done").unwrap();
}
