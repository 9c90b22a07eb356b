//! LaunchSpec resolution (CLI > FTRUN_LOCAL_RANK > torchrun > SLURM > defaults) and local
//! worker spawning with prefixed output.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ftrun::dist::launch::{
    first_host, spawn_local_workers_to, LaunchArgs, LaunchSpec, Sink, WorkerCommand,
};

fn resolve(cli: &LaunchArgs, vars: &[(&str, &str)]) -> anyhow::Result<LaunchSpec> {
    let env: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    LaunchSpec::resolve(cli, &|k| env.get(k).cloned())
}

#[test]
fn defaults_without_any_source() {
    let spec = resolve(&LaunchArgs::default(), &[]).unwrap();
    assert_eq!(
        spec,
        LaunchSpec {
            nnodes: 1,
            node_rank: 0,
            nproc: 1,
            coordinator: "127.0.0.1:29400".into(),
            local_rank: None,
        }
    );
}

#[test]
fn slurm_one_task_per_node_spawns_locally() {
    let vars = [
        ("SLURM_JOB_ID", "77"),
        ("SLURM_NNODES", "4"),
        ("SLURM_NODEID", "2"),
        ("SLURM_NTASKS_PER_NODE", "1"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_PROCID", "2"),
        ("SLURM_JOB_NODELIST", "gpu[07-10],cpu1"),
    ];
    let cli = LaunchArgs {
        nproc: Some(8),
        ..Default::default()
    };
    let spec = resolve(&cli, &vars).unwrap();
    assert_eq!((spec.nnodes, spec.node_rank, spec.nproc), (4, 2, 8));
    assert_eq!(spec.coordinator, "gpu07:29400");
    assert_eq!(
        spec.local_rank, None,
        "one task per node spawns its workers"
    );
}

#[test]
fn slurm_one_task_per_gpu_is_one_worker() {
    let vars = [
        ("SLURM_JOB_ID", "77"),
        ("SLURM_NNODES", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_NTASKS_PER_NODE", "4"),
        ("SLURM_LOCALID", "3"),
        ("SLURM_PROCID", "7"),
        ("SLURM_JOB_NODELIST", "a100-01,a100-02"),
        ("MASTER_PORT", "31000"),
    ];
    let spec = resolve(&LaunchArgs::default(), &vars).unwrap();
    assert_eq!((spec.nnodes, spec.node_rank, spec.nproc), (2, 1, 4));
    assert_eq!(spec.local_rank, Some(3));
    assert_eq!(spec.rank(), Some(7));
    assert_eq!(spec.coordinator, "a100-01:31000");
    // A SLURM_PROCID that disagrees with the node-major layout is an error.
    let mut bad = vars.to_vec();
    bad[5] = ("SLURM_PROCID", "5");
    let err = resolve(&LaunchArgs::default(), &bad)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("SLURM_PROCID=5") && err.contains("= 7"),
        "{err}"
    );
}

#[test]
fn torchrun_variables_beat_slurm_and_cli_beats_both() {
    let vars = [
        ("RANK", "5"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "4"),
        ("MASTER_ADDR", "10.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("SLURM_JOB_ID", "9"),
        ("SLURM_NNODES", "3"),
        ("SLURM_NODEID", "0"),
        ("SLURM_JOB_NODELIST", "other"),
    ];
    let spec = resolve(&LaunchArgs::default(), &vars).unwrap();
    assert_eq!((spec.nnodes, spec.node_rank, spec.nproc), (2, 1, 4));
    assert_eq!(spec.local_rank, Some(1));
    assert_eq!(spec.coordinator, "10.0.0.1:29500");

    let cli = LaunchArgs {
        coordinator: Some("head:1234".into()),
        ..Default::default()
    };
    let spec = resolve(&cli, &vars).unwrap();
    assert_eq!(spec.coordinator, "head:1234");
    assert_eq!(
        spec.nproc, 4,
        "fields the CLI leaves unset still come from the environment"
    );
}

#[test]
fn torchrun_without_local_world_size_is_one_node() {
    let vars = [("RANK", "2"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "2")];
    let spec = resolve(&LaunchArgs::default(), &vars).unwrap();
    assert_eq!((spec.nnodes, spec.node_rank, spec.nproc), (1, 0, 4));
    assert_eq!(spec.rank(), Some(2));
}

#[test]
fn ftrun_local_rank_marks_a_spawned_worker() {
    let cli = LaunchArgs {
        nnodes: Some(2),
        node_rank: Some(1),
        nproc: Some(2),
        coordinator: Some("n0:29400".into()),
    };
    let spec = resolve(&cli, &[("FTRUN_LOCAL_RANK", "1")]).unwrap();
    assert_eq!(spec.rank(), Some(3));
}

#[test]
fn bad_values_name_the_variable() {
    let err = resolve(&LaunchArgs::default(), &[("SLURM_NNODES", "four")])
        .unwrap_err()
        .to_string();
    assert!(err.contains(r#"SLURM_NNODES="four""#), "{err}");
    let cli = LaunchArgs {
        nnodes: Some(2),
        node_rank: Some(2),
        ..Default::default()
    };
    let err = resolve(&cli, &[]).unwrap_err().to_string();
    assert!(err.contains("node rank 2 is outside 2 nodes"), "{err}");
    let err = resolve(
        &LaunchArgs::default(),
        &[
            ("RANK", "1"),
            ("WORLD_SIZE", "6"),
            ("LOCAL_WORLD_SIZE", "4"),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("WORLD_SIZE=6") && err.contains("LOCAL_WORLD_SIZE=4"),
        "{err}"
    );
}

#[test]
fn slurm_node_lists() {
    assert_eq!(first_host("node1").unwrap(), "node1");
    assert_eq!(first_host("a,b,c").unwrap(), "a");
    assert_eq!(first_host("gpu[003-010,012]").unwrap(), "gpu003");
    assert_eq!(first_host("n[5,7-9]-ib,m1").unwrap(), "n5-ib");
    assert!(first_host("gpu[01-02").is_err());
    assert!(first_host("").is_err());
}

/// A sink the test can read back.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn sh(script: &str) -> WorkerCommand {
    WorkerCommand {
        program: PathBuf::from("/bin/sh"),
        args: vec!["-c".into(), script.into()],
        env: vec![("GREETING".into(), "hi".into())],
    }
}

#[test]
fn spawned_workers_output_is_prefixed_with_their_rank() {
    let (out, err) = (Buffer::default(), Buffer::default());
    let workers = spawn_local_workers_to(
        3,
        &sh(r#"echo "$GREETING from $FTRUN_LOCAL_RANK"; echo "line two"; echo oops >&2"#),
        4,
        Arc::new(Mutex::new(out.clone())) as Sink,
        Arc::new(Mutex::new(err.clone())) as Sink,
    )
    .unwrap();
    assert_eq!(workers.wait().unwrap(), 0);
    let out = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        vec![
            "[rank 4] hi from 0",
            "[rank 4] line two",
            "[rank 5] hi from 1",
            "[rank 5] line two",
            "[rank 6] hi from 2",
            "[rank 6] line two",
        ]
    );
    let err = String::from_utf8(err.0.lock().unwrap().clone()).unwrap();
    assert_eq!(err.lines().filter(|l| l.ends_with("] oops")).count(), 3);
}

#[test]
fn a_failing_worker_fails_the_launch_and_stops_the_rest() {
    let sink = || Arc::new(Mutex::new(Buffer::default())) as Sink;
    let start = std::time::Instant::now();
    // Worker 1 exits with 3 at once; the others would sleep for 30 s.
    let workers = spawn_local_workers_to(
        3,
        &sh(r#"if [ "$FTRUN_LOCAL_RANK" = 1 ]; then exit 3; fi; exec sleep 30"#),
        0,
        sink(),
        sink(),
    )
    .unwrap();
    assert_eq!(workers.wait().unwrap(), 3);
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
}
