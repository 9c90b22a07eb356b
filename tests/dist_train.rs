//! `ftrun --nproc 2 train` of the tiny demo on CPU: two worker processes, a coordinator,
//! TcpRing collectives and ZeRO-2. Checked against a one-process run with the same global
//! batch, through a killed and a hung worker (restarts from the last committed checkpoint), a
//! resume of a 2-rank checkpoint on 1 rank, its export, and a refused mismatched worker.

mod train_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use candle_core::Device;
use ftrun::train::checkpoint::{self, MANIFEST};
use ftrun::train::trainer::{run, to_vec_f64, Resume};
use train_support::*;

/// 6 steps with a checkpoint every 2; the global batch is 2 packed sequences per step.
const RUN: &[&str] = &[
    "train.max_steps=6",
    "lora.dropout=0.0",
    "checkpoint.save_steps=2",
    "checkpoint.keep_last=0",
    "eval.every_steps=0",
    "eval.inputs=[]",
    "log.plot=false",
    "log.every_steps=1",
];

/// One rank takes both sequences of the global batch; two ranks take one each.
const ONE_RANK: &str = "train.batch_size=2";
const TWO_RANKS: &str = "train.batch_size=1";

struct Runs {
    _tmp: tempfile::TempDir,
    setup: Setup,
    /// `ftrun --nproc 2 train` undisturbed.
    two: PathBuf,
    /// The same global batch in this process.
    one: PathBuf,
}

/// The baseline runs, shared by the tests of this file (made once).
fn runs() -> &'static Runs {
    static RUNS: OnceLock<Runs> = OnceLock::new();
    RUNS.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let setup = train_support::setup(tmp.path(), 40);
        let two = tmp.path().join("two");
        let out = ftrun_nproc(2, &setup, &two, &[TWO_RANKS], &[], &[]);
        assert_success(&out, "the undisturbed 2-rank run");
        let one = tmp.path().join("one");
        let cfg = config(&setup, &[RUN, &[ONE_RANK]].concat());
        run(&cfg, &one, Resume::No).unwrap();
        Runs {
            _tmp: tmp,
            setup,
            two,
            one,
        }
    })
}

/// `ftrun --nproc N train tiny_demo_assistant --set (RUN + sets) --work-dir work extra`.
fn ftrun_nproc(
    nproc: usize,
    s: &Setup,
    work: &Path,
    sets_extra: &[&str],
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut args = vec![
        "--nproc".to_string(),
        nproc.to_string(),
        "train".into(),
        "tiny_demo_assistant".into(),
    ];
    for v in sets(s, &[RUN, sets_extra].concat()) {
        args.push("--set".into());
        args.push(v);
    }
    args.push("--work-dir".into());
    args.push(work.display().to_string());
    args.extend(extra.iter().map(|e| e.to_string()));
    Command::new(env!("CARGO_BIN_EXE_ftrun"))
        .args(&args)
        .envs(env.iter().copied())
        .output()
        .expect("run ftrun")
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Values of tensors, by name.
type Values = Vec<(String, Vec<f64>)>;

/// (history, trainable values by name) of a work dir's checkpoint at `step`.
fn final_state(work: &Path, step: usize) -> (Vec<(usize, f64)>, Values) {
    let ck = checkpoint::load(&checkpoint::step_dir(work, step), &Device::Cpu).unwrap();
    let tensors = ck
        .trainable
        .iter()
        .map(|(n, t)| (n.clone(), to_vec_f64(t).unwrap()))
        .collect();
    (ck.state.history, tensors)
}

fn assert_histories_close(a: &[(usize, f64)], b: &[(usize, f64)], rel: f64, what: &str) {
    assert_eq!(
        a.iter().map(|x| x.0).collect::<Vec<_>>(),
        b.iter().map(|x| x.0).collect::<Vec<_>>(),
        "{what}: steps"
    );
    for ((step, la), (_, lb)) in a.iter().zip(b) {
        assert!(
            (la - lb).abs() <= rel * la.abs().max(1.0),
            "{what}: step {step}: loss {la} vs {lb}"
        );
    }
}

fn assert_tensors_close(a: &Values, b: &Values, tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb, "{what}");
        let worst = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(worst <= tol, "{what}: `{na}` differs by {worst}");
    }
}

#[test]
fn two_ranks_train_like_one_rank_with_the_same_global_batch() {
    let r = runs();
    // The run stays inside the first epoch: both layouts see the same batches.
    let tok = ftrun::tokenizer::Tokenizer::from_path(&r.setup.model).unwrap();
    let cfg = config(&r.setup, RUN);
    let ds_len = ftrun::data::build_dataset(&cfg, &tok, &r.one, false)
        .unwrap()
        .0
        .len();
    assert!(ds_len >= 12, "only {ds_len} packed sequences");

    let (two_hist, two_w) = final_state(&r.two, 6);
    let (one_hist, one_w) = final_state(&r.one, 6);
    assert_eq!(two_hist.len(), 6);
    assert_histories_close(&two_hist, &one_hist, 1e-4, "2 ranks vs 1");
    assert!(
        two_hist[5].1 < two_hist[0].1,
        "the loss goes down: {two_hist:?}"
    );
    assert_tensors_close(&two_w, &one_w, 1e-4, "final weights, 2 ranks vs 1");

    // Each committed step directory holds both shards and the coordinator's manifest.
    for step in [2, 4, 6] {
        let dir = checkpoint::step_dir(&r.two, step);
        for f in [
            MANIFEST,
            "state.json",
            "config.toml",
            "shard-00000-of-00002.safetensors",
            "shard-00001-of-00002.safetensors",
            "shard-00001-of-00002.json",
        ] {
            assert!(dir.join(f).is_file(), "{} lacks {f}", dir.display());
        }
    }

    // `ftrun export` consolidates the shards: the adapter equals the one-rank run's.
    let tmp = tempfile::tempdir().unwrap();
    let (ea, eb) = (tmp.path().join("a"), tmp.path().join("b"));
    let (ok, _, err, _) = ftrun(&[
        "export",
        checkpoint::step_dir(&r.two, 6).to_str().unwrap(),
        ea.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    ftrun::export::export_checkpoint(&checkpoint::step_dir(&r.one, 6), &eb).unwrap();
    let load = |d: &Path| {
        let mut v: Values =
            candle_core::safetensors::load(d.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap()
                .into_iter()
                .map(|(n, t)| (n, to_vec_f64(&t).unwrap()))
                .collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    assert_tensors_close(&load(&ea), &load(&eb), 1e-4, "exported adapters");
}

#[test]
fn a_killed_worker_is_restarted_from_the_last_committed_checkpoint() {
    let r = runs();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("killed");
    // Rank 1 dies right before step 4 of the first attempt; step 2 is the last committed.
    let out = ftrun_nproc(
        2,
        &r.setup,
        &work,
        &[TWO_RANKS],
        &[],
        &[("FTRUN_FAULT", "exit:1:3")],
    );
    assert_success(&out, "the run with a killed worker");
    let err = stderr(&out);
    assert!(
        err.contains("[rank 1] FTRUN_FAULT: rank 1 exits before step 4"),
        "{err}"
    );
    assert!(
        err.contains("restarting from the last committed checkpoint (restart 1 of 3)"),
        "{err}"
    );
    assert!(
        err.contains("[rank 0] resumed from") && err.contains("step-000002 at step 2/6"),
        "{err}"
    );
    // Bit-identical collectives and an exact resume: the same run as the undisturbed one.
    let (hist, w) = final_state(&work, 6);
    let (base_hist, base_w) = final_state(&r.two, 6);
    assert_histories_close(
        &hist,
        &base_hist,
        1e-6,
        "killed-and-restarted vs undisturbed",
    );
    assert_tensors_close(&w, &base_w, 1e-6, "final weights");
}

#[test]
fn a_hung_worker_becomes_a_restart_through_the_collective_timeout() {
    let r = runs();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("hung");
    let out = ftrun_nproc(
        2,
        &r.setup,
        &work,
        &[TWO_RANKS, "parallel.collective_timeout_s=5"],
        &[],
        &[("FTRUN_FAULT", "hang:1:4")],
    );
    assert_success(&out, "the run with a hung worker");
    let err = stderr(&out);
    assert!(err.contains("timed out after 5s"), "{err}");
    assert!(err.contains("restart 1 of 3"), "{err}");
    let (hist, _) = final_state(&work, 6);
    let (base_hist, _) = final_state(&r.two, 6);
    assert_histories_close(&hist, &base_hist, 1e-6, "hung-and-restarted vs undisturbed");
}

#[test]
fn a_frozen_worker_is_caught_by_missed_heartbeats() {
    let r = runs();
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("frozen");
    // Collectives would wait 300 s: only the heartbeat watch can stop this run quickly.
    let out = ftrun_nproc(
        2,
        &r.setup,
        &work,
        &[TWO_RANKS, "parallel.heartbeat_timeout_s=2"],
        &[],
        &[("FTRUN_FAULT", "freeze:1:3")],
    );
    assert_success(&out, "the run with a frozen worker");
    let err = stderr(&out);
    assert!(
        err.contains("the coordinator stopped the job: rank 1")
            && err.contains("sent no heartbeat"),
        "{err}"
    );
    assert!(err.contains("restart 1 of 3"), "{err}");
    let (hist, _) = final_state(&work, 6);
    let (base_hist, _) = final_state(&r.two, 6);
    assert_histories_close(
        &hist,
        &base_hist,
        1e-6,
        "frozen-and-restarted vs undisturbed",
    );
}

#[test]
fn a_one_rank_checkpoint_resumes_on_two_ranks() {
    let r = runs();
    let tmp = tempfile::tempdir().unwrap();
    let cut = tmp.path().join("cut");
    copy_dir(&r.one, &cut);
    for step in [4, 6] {
        std::fs::remove_dir_all(checkpoint::step_dir(&cut, step)).unwrap();
    }
    let out = ftrun_nproc(2, &r.setup, &cut, &[TWO_RANKS], &["--resume", "auto"], &[]);
    assert_success(&out, "1 -> 2 rank resume");
    assert!(stderr(&out).contains("step-000002 at step 2/6"));
    let (hist, w) = final_state(&cut, 6);
    let (one_hist, one_w) = final_state(&r.one, 6);
    assert_histories_close(&hist, &one_hist, 1e-4, "1 -> 2 rank resume");
    assert_tensors_close(&w, &one_w, 1e-4, "final weights after 1 -> 2 resume");
}

#[test]
fn a_two_rank_checkpoint_resumes_on_one_rank() {
    let r = runs();
    let tmp = tempfile::tempdir().unwrap();
    let cut = tmp.path().join("cut");
    copy_dir(&r.two, &cut);
    for step in [4, 6] {
        std::fs::remove_dir_all(checkpoint::step_dir(&cut, step)).unwrap();
    }
    // A step directory whose shards were written but never committed is not resumed from.
    let partial = checkpoint::step_dir(&cut, 4);
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::copy(
        checkpoint::step_dir(&r.two, 4).join("shard-00000-of-00002.safetensors"),
        partial.join("shard-00000-of-00002.safetensors"),
    )
    .unwrap();
    assert_eq!(
        checkpoint::latest(&cut).unwrap(),
        Some(checkpoint::step_dir(&cut, 2))
    );
    let cfg = config(&r.setup, &[RUN, &[ONE_RANK]].concat());
    let resumed = run(&cfg, &cut, Resume::Auto).unwrap();
    let (base_hist, base_w) = final_state(&r.two, 6);
    assert_histories_close(&resumed.losses, &base_hist, 1e-4, "2 -> 1 rank resume");
    let (_, w) = final_state(&cut, 6);
    assert_tensors_close(&w, &base_w, 1e-4, "final weights after 2 -> 1 resume");
}

#[test]
fn workers_with_different_configs_are_refused_naming_the_difference() {
    let r = runs();
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let coordinator = format!("127.0.0.1:{port}");
    // Two one-process "nodes" of one job; node 1 was given another learning rate.
    let node = |rank: &str, lr: &str| {
        let lr = format!("optim.lr={lr}");
        let extra = [TWO_RANKS, "parallel.max_restarts=0", lr.as_str()];
        let mut args: Vec<String> = [
            "--nnodes",
            "2",
            "--node-rank",
            rank,
            "--nproc",
            "1",
            "--coordinator",
            &coordinator,
            "train",
            "tiny_demo_assistant",
        ]
        .map(String::from)
        .to_vec();
        for v in sets(&r.setup, &[RUN, &extra].concat()) {
            args.push("--set".into());
            args.push(v);
        }
        args.push("--work-dir".into());
        args.push(tmp.path().join("w").display().to_string());
        Command::new(env!("CARGO_BIN_EXE_ftrun"))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let node0 = node("0", "3e-3");
    let node1 = node("1", "1e-3");
    let out1 = node1.wait_with_output().unwrap();
    let out0 = node0.wait_with_output().unwrap();
    assert!(!out0.status.success() && !out1.status.success());
    // Whichever registered second is refused; the refusal stops the other node's worker too.
    for (node, out) in [(0, &out0), (1, &out1)] {
        let err = stderr(out);
        assert!(
            err.contains("refused: config hash") && err.contains("differs from"),
            "node {node}:\n{err}"
        );
        assert!(
            err.contains("max_restarts = 0 restarts are used up"),
            "node {node}:\n{err}"
        );
    }
}

/// `train.method = method` for 2 steps on 2 ranks and on 1: the same losses and weights.
/// Returns the number of trainable tensors.
fn method_parity(method: &str) -> usize {
    let r = runs();
    let tmp = tempfile::tempdir().unwrap();
    let method_set = format!("train.method=\"{method}\"");
    let sets: &[&str] = &[&method_set, "train.max_steps=2", "optim.lr=1e-3"];
    let two = tmp.path().join("two");
    let out = ftrun_nproc(2, &r.setup, &two, &[sets, &[TWO_RANKS]].concat(), &[], &[]);
    assert_success(&out, &format!("{method} on 2 ranks"));
    let one = tmp.path().join("one");
    let cfg = config(&r.setup, &[RUN, sets, &[ONE_RANK]].concat());
    run(&cfg, &one, Resume::No).unwrap();
    let (two_hist, two_w) = final_state(&two, 2);
    let (one_hist, one_w) = final_state(&one, 2);
    assert_histories_close(
        &two_hist,
        &one_hist,
        1e-4,
        &format!("{method}: 2 ranks vs 1"),
    );
    assert_tensors_close(&two_w, &one_w, 1e-4, &format!("{method}: final weights"));
    two_w.len()
}

#[test]
fn full_fine_tuning_on_two_ranks_matches_one_rank() {
    let n = method_parity("full");
    assert!(n > 10, "every weight is trainable: {n}");
}

#[test]
fn qlora_on_two_ranks_matches_one_rank() {
    let n = method_parity("qlora");
    assert!(n > 0, "the adapters are trainable");
}
