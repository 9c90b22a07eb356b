//! Resuming: an interrupted run continued with `--resume auto` reproduces the uninterrupted run,
//! checkpoints are pruned and written atomically, and a checkpoint of another run is refused.

mod train_support;

use ftrun::train::checkpoint;
use ftrun::train::trainer::{run, Resume};
use train_support::*;

/// 6 steps of 2 micro-batches with LoRA dropout on, saving every 3 steps. The dataset packs into
/// fewer than 12 sequences, so the run crosses an epoch boundary of the sampler.
const RUN: &[&str] = &[
    "train.max_steps=6",
    "train.grad_accum=2",
    "lora.dropout=0.05",
    "checkpoint.save_steps=3",
    "checkpoint.keep_last=0",
    "eval.every_steps=0",
    "log.plot=false",
];

fn read_tensors(dir: &std::path::Path) -> Vec<(String, Vec<f64>)> {
    let ck = checkpoint::load(dir, &candle_core::Device::Cpu).unwrap();
    ck.trainable
        .iter()
        .map(|(n, t)| (n.clone(), ftrun::train::trainer::to_vec_f64(t).unwrap()))
        .collect()
}

#[test]
fn resumed_run_matches_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 20);
    let cfg = config(&s, RUN);
    let full_dir = tmp.path().join("full");
    let full = run(&cfg, &full_dir, Resume::No).unwrap();
    assert_eq!(
        full.losses.iter().map(|l| l.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    let ds_len = {
        let tok = ftrun::tokenizer::Tokenizer::from_path(&s.model).unwrap();
        ftrun::data::build_dataset(&cfg, &tok, &full_dir, false)
            .unwrap()
            .0
            .len()
    };
    assert!(
        ds_len < 12,
        "the run should cross an epoch: {ds_len} sequences"
    );

    // The interruption: a copy of the work dir as it was right after the step-3 checkpoint.
    let cut = tmp.path().join("cut");
    copy_dir(&full_dir, &cut);
    std::fs::remove_dir_all(checkpoint::checkpoints_dir(&cut).join("step-000006")).unwrap();
    assert_eq!(
        checkpoint::latest(&cut)
            .unwrap()
            .unwrap()
            .file_name()
            .unwrap(),
        "step-000003"
    );

    let resumed = run(&cfg, &cut, Resume::Auto).unwrap();
    assert_eq!(resumed.losses.len(), 6);
    for ((sa, la), (sb, lb)) in full.losses.iter().zip(&resumed.losses) {
        assert_eq!(sa, sb);
        assert!(
            (la - lb).abs() <= 1e-6,
            "step {sa}: uninterrupted loss {la} vs resumed {lb}"
        );
    }
    // Same final weights, not just the same losses.
    let a = read_tensors(&checkpoint::checkpoints_dir(&full_dir).join("step-000006"));
    let b = read_tensors(&checkpoint::checkpoints_dir(&cut).join("step-000006"));
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let d = va
            .iter()
            .zip(vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(d <= 1e-6, "{na}: final weights differ by {d}");
    }
}

#[test]
fn keep_last_prunes_and_a_half_written_checkpoint_is_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 12);
    let work = tmp.path().join("work");
    let cfg = config(
        &s,
        &[
            "train.max_steps=6",
            "checkpoint.save_steps=2",
            "checkpoint.keep_last=2",
            "eval.every_steps=0",
            "log.plot=false",
        ],
    );
    let first = run(&cfg, &work, Resume::No).unwrap();
    let kept: Vec<usize> = checkpoint::list(&work)
        .unwrap()
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, vec![4, 6], "keep_last=2 keeps the two newest");

    // A crash while writing step 8 leaves a temporary directory with partial files.
    let ckdir = checkpoint::checkpoints_dir(&work);
    let tmp_ck = ckdir.join(".tmp-step-000008-4242");
    std::fs::create_dir_all(&tmp_ck).unwrap();
    std::fs::write(tmp_ck.join("trainable.safetensors"), b"partial").unwrap();
    std::fs::write(tmp_ck.join("state.json"), b"{\"step\": 8").unwrap();
    let step6 = ckdir.join("step-000006");
    let before = std::fs::read(step6.join("trainable.safetensors")).unwrap();
    assert_eq!(checkpoint::latest(&work).unwrap().unwrap(), step6);

    // Continue to 8 steps: resumes from step 6 (not the partial 8), keeps its history.
    let cfg8 = config(
        &s,
        &[
            "train.max_steps=8",
            "checkpoint.save_steps=2",
            "checkpoint.keep_last=2",
            "eval.every_steps=0",
            "log.plot=false",
        ],
    );
    let cont = run(&cfg8, &work, Resume::Auto).unwrap();
    assert_eq!(cont.losses.len(), 8);
    assert_eq!(&cont.losses[..6], &first.losses[..]);
    assert_eq!(
        before,
        std::fs::read(step6.join("trainable.safetensors")).unwrap(),
        "step 6 untouched"
    );
    let kept: Vec<usize> = checkpoint::list(&work)
        .unwrap()
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, vec![6, 8]);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ckdir.join("step-000008/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 8);
}

#[test]
fn resuming_another_model_or_dataset_is_refused_naming_the_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 8);
    let work = tmp.path().join("work");
    let extra = [
        "train.max_steps=2",
        "checkpoint.save_steps=2",
        "eval.every_steps=0",
        "log.plot=false",
    ];
    run(&config(&s, &extra), &work, Resume::No).unwrap();

    // Another model: same weights, one config.json value changed.
    let other_model = tmp.path().join("model2");
    copy_dir(&s.model, &other_model);
    let cj = other_model.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cj).unwrap()).unwrap();
    v["rms_norm_eps"] = serde_json::json!(1e-5);
    std::fs::write(&cj, v.to_string()).unwrap();
    let mut cfg = config(&s, &extra);
    cfg.model.path = other_model;
    cfg.train.max_steps = Some(4);
    let err = format!("{:#}", run(&cfg, &work, Resume::Auto).unwrap_err());
    assert!(
        err.contains("step-000002") && err.contains("base model") && err.contains("config.json"),
        "{err}"
    );
    assert!(!err.contains("dataset"), "only the model differs: {err}");

    // Another dataset: one more record.
    write_data(&s.data, 9);
    let mut cfg = config(&s, &extra);
    cfg.train.max_steps = Some(4);
    let err = format!("{:#}", run(&cfg, &work, Resume::Auto).unwrap_err());
    assert!(
        err.contains("dataset") && !err.contains("base model"),
        "{err}"
    );

    // Another method (LoRA rank).
    write_data(&s.data, 8);
    let mut cfg = config(&s, &extra);
    cfg.train.max_steps = Some(4);
    cfg.lora.r = 8;
    let err = format!("{:#}", run(&cfg, &work, Resume::Auto).unwrap_err());
    assert!(
        err.contains("training method") && err.contains("r=16") && err.contains("r=8"),
        "{err}"
    );
    // Nothing was written over the checkpoint.
    let kept: Vec<usize> = checkpoint::list(&work)
        .unwrap()
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, vec![2]);
}

#[test]
fn a_checkpoint_missing_a_tensor_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 8);
    let work = tmp.path().join("work");
    let extra = [
        "train.max_steps=2",
        "checkpoint.save_steps=2",
        "eval.every_steps=0",
        "log.plot=false",
    ];
    run(&config(&s, &extra), &work, Resume::No).unwrap();
    let file = checkpoint::checkpoints_dir(&work).join("step-000002/trainable.safetensors");
    let mut t = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let gone = "model.layers.1.mlp.up_proj.lora_B.weight";
    assert!(t.remove(gone).is_some());
    candle_core::safetensors::save(&t, &file).unwrap();
    let mut cfg = config(&s, &extra);
    cfg.train.max_steps = Some(4);
    let err = format!("{:#}", run(&cfg, &work, Resume::Auto).unwrap_err());
    assert!(err.contains(gone) && err.contains("step-000002"), "{err}");
}
