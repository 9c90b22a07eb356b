//! NcclComm on real GPUs (feature `cuda`, needs 2 GPUs): two worker processes started by
//! `spawn_local_workers`, NCCL ids shared through the coordinator, every collective and a
//! split checked against values computed on the host. Integer-valued inputs keep sums exact
//! whatever order NCCL adds in.
#![cfg(feature = "cuda")]

use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use ftrun::dist::collectives::{bucket_pieces, Collectives, IdExchange};
use ftrun::dist::coordinator::{CoordinatorConfig, CoordinatorHandle};
use ftrun::dist::launch::{spawn_local_workers_to, LaunchArgs, LaunchSpec, Sink, WorkerCommand};
use ftrun::dist::nccl::NcclComm;
use ftrun::dist::worker::{Worker, WorkerInfo};

const WORLD: usize = 2;

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
fn nccl_collectives_across_two_gpu_processes() {
    let dir = tempfile::tempdir().unwrap();
    let coord = CoordinatorHandle::start(
        CoordinatorConfig {
            nnodes: 1,
            nproc: WORLD,
            sp: 1,
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_secs(30),
            wait_timeout: Duration::from_secs(60),
            output_dir: dir.path().to_path_buf(),
        },
        "127.0.0.1:0",
    )
    .unwrap();
    let cmd = WorkerCommand {
        program: std::env::current_exe().unwrap(),
        args: ["nccl_rank_entry", "--exact", "--ignored", "--nocapture"]
            .map(String::from)
            .to_vec(),
        env: vec![
            ("FTRUN_TEST_COORDINATOR".into(), coord.addr().to_string()),
            ("NCCL_NVLS_ENABLE".into(), "0".into()),
        ],
    };
    let (out, err) = (Buffer::default(), Buffer::default());
    let workers = spawn_local_workers_to(
        WORLD,
        &cmd,
        0,
        Arc::new(Mutex::new(out.clone())) as Sink,
        Arc::new(Mutex::new(err.clone())) as Sink,
    )
    .unwrap();
    let code = workers.wait().unwrap();
    let out = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let err = String::from_utf8(err.0.lock().unwrap().clone()).unwrap();
    println!("{out}\n{err}");
    assert_eq!(code, 0);
    for rank in 0..WORLD {
        let line = format!("[rank {rank}] nccl rank {rank}: all collectives ok");
        assert!(out.lines().any(|l| l == line), "missing {line:?}");
    }
}

fn values(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| (rank * 1000 + i) as f32).collect()
}

#[test]
#[ignore = "a worker process entry point started by nccl_collectives_across_two_gpu_processes"]
fn nccl_rank_entry() {
    let cli = LaunchArgs {
        nnodes: Some(1),
        node_rank: Some(0),
        nproc: Some(WORLD),
        coordinator: Some(std::env::var("FTRUN_TEST_COORDINATOR").unwrap()),
    };
    let spec = LaunchSpec::from_env(&cli).unwrap();
    let local = spec.local_rank.unwrap();
    let info = WorkerInfo {
        node_rank: 0,
        local_rank: local as u32,
        host: "localhost".into(),
        config_hash: "c".into(),
        binary_version: "v".into(),
        dataset_fingerprint: "d".into(),
        ring_addr: String::new(),
    };
    let worker =
        Rc::new(Worker::register(&spec.coordinator, info, Duration::from_secs(30)).unwrap());
    let (rank, w) = (worker.rank(), worker.world());
    let device = Device::new_cuda(local).unwrap();
    let Device::Cuda(cuda) = &device else {
        unreachable!()
    };
    let exchange: Rc<dyn IdExchange> = worker.clone();
    let comm = NcclComm::init_world(
        cuda,
        rank,
        w,
        exchange,
        "nccl-test/world",
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!((comm.rank(), comm.world()), (rank, w));
    let on_gpu = |v: Vec<f32>| {
        let n = v.len();
        Tensor::from_vec(v, n, &device).unwrap()
    };
    let host = |t: Tensor| t.to_vec1::<f32>().unwrap();

    // all_reduce
    let n = 1001;
    let got = host(comm.all_reduce_sum(&on_gpu(values(rank, n))).unwrap());
    let expected: Vec<f32> = (0..n)
        .map(|i| (0..w).map(|r| values(r, n)[i]).sum())
        .collect();
    assert_eq!(got, expected, "all_reduce");

    // reduce_scatter: shard `rank` of the sum
    let len = 6 * w;
    let got = host(comm.reduce_scatter_sum(&on_gpu(values(rank, len))).unwrap());
    let sum: Vec<f32> = (0..len)
        .map(|i| (0..w).map(|r| values(r, len)[i]).sum())
        .collect();
    assert_eq!(
        got,
        sum[rank * 6..(rank + 1) * 6].to_vec(),
        "reduce_scatter"
    );

    // all_gather
    let got = host(comm.all_gather(&on_gpu(values(rank, 5))).unwrap());
    let expected: Vec<f32> = (0..w).flat_map(|r| values(r, 5)).collect();
    assert_eq!(got, expected, "all_gather");

    // broadcast from the last rank
    let got = host(comm.broadcast(&on_gpu(values(rank, 7)), w - 1).unwrap());
    assert_eq!(got, values(w - 1, 7), "broadcast");

    // all_to_all: output chunk i = rank i's input chunk `rank`
    let c = 3;
    let got = host(comm.all_to_all(&on_gpu(values(rank, c * w))).unwrap());
    let expected: Vec<f32> = (0..w)
        .flat_map(|i| values(i, c * w)[rank * c..(rank + 1) * c].to_vec())
        .collect();
    assert_eq!(got, expected, "all_to_all");

    // ZeRO-2 bucket reduction: a bucket at flat offset 5 of 17 values crossing shard
    // boundaries (S = ceil(17 / w)), summed into each owner's shard in place, after a join.
    let (n_flat, lo, hi) = (17usize, 5, 16);
    let s = n_flat.div_ceil(w);
    let shard = on_gpu(vec![-1.0; s]);
    let bucket = on_gpu(values(rank, n_flat)).narrow(0, lo, hi - lo).unwrap();
    comm.reduce_sum_pieces(&bucket, &bucket_pieces(lo, hi, s), &shard)
        .unwrap();
    comm.join("test").unwrap();
    let mine = host(shard);
    for (k, got) in mine.iter().enumerate() {
        let i = rank * s + k;
        let expected = if (lo..hi).contains(&i) {
            (0..w).map(|r| values(r, n_flat)[i]).sum()
        } else {
            -1.0 // outside the bucket: untouched
        };
        assert_eq!(*got, expected, "reduce_sum_pieces element {i}");
    }

    // all_gather_into a bf16 buffer (the replica); small integers are exact in bf16
    let small = |r: usize| (0..3).map(|i| (4 * r + i) as f32).collect::<Vec<f32>>();
    let part = on_gpu(small(rank)).to_dtype(DType::BF16).unwrap();
    let out = Tensor::zeros(3 * w, DType::BF16, &device).unwrap();
    comm.all_gather_into(&part, &out).unwrap();
    let expected: Vec<f32> = (0..w).flat_map(small).collect();
    assert_eq!(
        host(out.to_dtype(DType::F32).unwrap()),
        expected,
        "all_gather_into bf16"
    );

    comm.barrier().unwrap();

    // split: singletons, then the whole world again
    let alone = comm.split(rank as u64).unwrap();
    assert_eq!((alone.rank(), alone.world()), (0, 1));
    assert_eq!(
        host(alone.all_reduce_sum(&on_gpu(values(rank, 4))).unwrap()),
        values(rank, 4)
    );
    let all = comm.split(7).unwrap();
    assert_eq!((all.rank(), all.world()), (rank, w));
    let got = host(all.all_reduce_sum(&on_gpu(values(rank, 4))).unwrap());
    let expected: Vec<f32> = (0..4)
        .map(|i| (0..w).map(|r| values(r, 4)[i]).sum())
        .collect();
    assert_eq!(got, expected, "split all_reduce");

    worker.barrier("nccl-done").unwrap();
    println!("nccl rank {rank}: all collectives ok");
}
