//! `ftrun --nproc 2 train` of the tiny demo with Ulysses sequence parallelism
//! (`parallel.sequence_parallel_size = 2`: both ranks train each packed sequence, one half
//! each) against the same run in one process, and a resume of its checkpoint in one process.

mod train_support;

use std::path::Path;
use std::process::Command;

use candle_core::Device;
use ftrun::train::checkpoint;
use ftrun::train::trainer::{run, to_vec_f64, Resume};
use train_support::*;

/// 6 steps of one packed sequence each, a checkpoint every 2.
const RUN: &[&str] = &[
    "train.max_steps=6",
    "train.batch_size=1",
    // Odd lengths: the pieces of some sequences end in padding.
    "data.max_length=95",
    "data.pack_mode=\"split\"",
    "lora.dropout=0.0",
    "checkpoint.save_steps=2",
    "checkpoint.keep_last=0",
    "eval.every_steps=0",
    "eval.inputs=[]",
    "log.plot=false",
    "log.every_steps=1",
];

const SP2: &str = "parallel.sequence_parallel_size=2";

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

/// The `tokens` of every step in a work dir's `scalars.jsonl`.
fn logged_tokens(work: &Path) -> Vec<u64> {
    std::fs::read_to_string(work.join("scalars.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["tokens"].as_u64().unwrap()
        })
        .collect()
}

#[test]
fn sequence_parallel_over_two_ranks_trains_like_one_process_and_resumes_on_one() {
    let tmp = tempfile::tempdir().unwrap();
    let setup = train_support::setup(tmp.path(), 40);

    // sp = 2 on 2 ranks: one data-parallel replica, each sequence split in two.
    let sp_work = tmp.path().join("sp2");
    let mut args = vec![
        "--nproc".to_string(),
        "2".into(),
        "train".into(),
        "tiny_demo_assistant".into(),
    ];
    for v in sets(&setup, &[RUN, &[SP2]].concat()) {
        args.push("--set".into());
        args.push(v);
    }
    args.push("--work-dir".into());
    args.push(sp_work.display().to_string());
    let out = Command::new(env!("CARGO_BIN_EXE_ftrun"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sp=2 run failed:\n{err}");
    assert!(
        err.contains("2 ranks (ZeRO-2, Ulysses sequence parallel over 2)"),
        "{err}"
    );

    // The same sequences in one process.
    let one = tmp.path().join("one");
    run(&config(&setup, RUN), &one, Resume::No).unwrap();

    let (sp_hist, sp_w) = final_state(&sp_work, 6);
    let (one_hist, one_w) = final_state(&one, 6);
    assert_eq!(sp_hist.len(), 6);
    assert_histories_close(&sp_hist, &one_hist, 1e-4, "sp=2 vs one process");
    assert!(
        sp_hist[5].1 < sp_hist[0].1,
        "the loss goes down: {sp_hist:?}"
    );
    assert_tensors_close(&sp_w, &one_w, 1e-4, "final weights, sp=2 vs one process");
    // Every token counted once (the padding of odd-length sequences not at all).
    assert_eq!(logged_tokens(&sp_work), logged_tokens(&one));

    // Its step-2 checkpoint resumes in one process (sp = 1) and ends where sp = 2 ended.
    let cut = tmp.path().join("cut");
    copy_dir(&sp_work, &cut);
    for step in [4, 6] {
        std::fs::remove_dir_all(checkpoint::step_dir(&cut, step)).unwrap();
    }
    let resumed = run(&config(&setup, RUN), &cut, Resume::Auto).unwrap();
    assert_histories_close(&resumed.losses, &sp_hist, 1e-4, "sp=2 -> sp=1 resume");
    let (_, w) = final_state(&cut, 6);
    assert_tensors_close(&w, &sp_w, 1e-4, "final weights after sp=2 -> sp=1 resume");
}

#[test]
fn sequence_parallel_larger_than_the_world_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let setup = train_support::setup(tmp.path(), 8);
    let err = run(
        &config(&setup, &[RUN, &[SP2]].concat()),
        &tmp.path().join("w"),
        Resume::No,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("parallel.sequence_parallel_size = 2")
            && err.contains("does not divide the world size 1"),
        "{err}"
    );
}
