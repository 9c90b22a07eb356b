//! The optimizer update overlapped with the next step's forward (`optim.overlap_step`, on by
//! default) trains exactly as the plain step: the same losses, gradient norms, evaluation
//! outputs and checkpoints, bit for bit, with LoRA (dropout, weight decay, micro-batches) and
//! with full fine-tuning. On the CPU the update runs segment by segment as the forward first
//! waits for each stage, so a stage read before its wait would train on old values and differ.

mod train_support;

use ftrun::train::checkpoint;
use ftrun::train::trainer::{run, Resume};
use std::path::Path;
use train_support::*;

fn scalars(work: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(work.join("scalars.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Every tensor of a checkpoint (trainables and optimizer state) as raw values.
fn checkpoint_values(dir: &Path) -> Vec<(String, Vec<f64>)> {
    let ck = checkpoint::load(dir, &candle_core::Device::Cpu).unwrap();
    ck.trainable
        .iter()
        .chain(&ck.optimizer)
        .map(|(n, t)| (n.clone(), ftrun::train::trainer::to_vec_f64(t).unwrap()))
        .collect()
}

fn eval_outputs(work: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(work)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.starts_with("eval_outputs").then_some(name)
        })
        .collect();
    names.sort();
    names
        .iter()
        .map(|n| std::fs::read_to_string(work.join(n)).unwrap())
        .collect()
}

fn same_run_with_and_without_overlap(extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 16);
    let mut sets = vec![
        "train.max_steps=5",
        "train.grad_accum=2",
        "optim.weight_decay=0.1",
        "optim.lr=1e-3",
        "checkpoint.save_steps=2",
        "checkpoint.keep_last=0",
        // Evaluation (generation) between steps reads the values mid-run.
        "eval.every_steps=2",
        "log.plot=false",
    ];
    sets.extend_from_slice(extra);
    let mut works = vec![];
    for overlap in ["true", "false"] {
        let work = tmp.path().join(format!("overlap-{overlap}"));
        let set = format!("optim.overlap_step={overlap}");
        let cfg = config(&s, &[sets.as_slice(), &[set.as_str()]].concat());
        let summary = run(&cfg, &work, Resume::No).unwrap();
        assert_eq!(summary.losses.len(), 5);
        works.push(work);
    }
    let (on, off) = (&works[0], &works[1]);
    let (s_on, s_off) = (scalars(on), scalars(off));
    assert_eq!(s_on, s_off, "losses and gradient norms, step by step");
    assert!(
        s_on.windows(2).any(|w| w[0] != w[1]),
        "the steps must change the model: {s_on:?}"
    );
    let (e_on, e_off) = (eval_outputs(on), eval_outputs(off));
    assert!(!e_on.is_empty());
    assert_eq!(e_on, e_off, "sample answers between steps");
    for step in ["step-000002", "step-000004", "step-000005"] {
        let a = checkpoint_values(&checkpoint::checkpoints_dir(on).join(step));
        let b = checkpoint_values(&checkpoint::checkpoints_dir(off).join(step));
        assert!(a.iter().any(|(n, _)| n.contains("exp_avg")));
        assert_eq!(a, b, "{step}: weights and optimizer state");
    }
}

#[test]
fn lora_with_dropout_trains_identically_with_the_overlapped_update() {
    same_run_with_and_without_overlap(&["lora.dropout=0.1"]);
}

#[test]
fn full_fine_tuning_trains_identically_with_the_overlapped_update() {
    same_run_with_and_without_overlap(&["train.method=\"full\""]);
}
