//! What a run leaves in its work dir (scalars.jsonl, eval outputs, curves.png), full fine-tuning,
//! and the methods that are refused.

mod train_support;

use ftrun::train::trainer::{run, Resume};
use train_support::*;

#[test]
fn scalars_eval_outputs_and_curves_are_written() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 12);
    let work = tmp.path().join("work");
    // eval every 2 steps, saves at 3 and at the end (5).
    let cfg = config(
        &s,
        &[
            "train.max_steps=5",
            "eval.every_steps=2",
            "checkpoint.save_steps=3",
        ],
    );
    let summary = run(&cfg, &work, Resume::No).unwrap();

    let text = std::fs::read_to_string(work.join("scalars.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "one line per step:\n{text}");
    let keys = [
        "step",
        "total",
        "lr",
        "loss",
        "grad_norm",
        "time",
        "data_time",
        "tokens",
        "tokens_per_sec",
        "memory_mib",
        "skipped",
    ];
    for (i, l) in lines.iter().enumerate() {
        let obj = l.as_object().unwrap();
        let mut got: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
        got.sort();
        let mut want = keys.to_vec();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(l["step"], i + 1);
        assert_eq!(l["total"], 5);
        assert_eq!(l["skipped"], false);
        assert!(l["tokens"].as_u64().unwrap() > 0 && l["tokens"].as_u64().unwrap() <= 96);
        assert!(l["grad_norm"].as_f64().unwrap() > 0.0);
        let loss = l["loss"].as_f64().unwrap();
        assert!(
            (loss - summary.losses[i].1).abs() < 1e-12,
            "jsonl loss = returned loss"
        );
    }
    // Warmup (5% of 5 steps) then cosine: the lr falls over the run.
    assert!(lines[4]["lr"].as_f64().unwrap() < lines[1]["lr"].as_f64().unwrap());

    // Before training, every 2 steps, and at each save; no others.
    let mut evals: Vec<usize> = std::fs::read_dir(&work)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().to_string();
            n.strip_prefix("eval_outputs_iter_")?
                .strip_suffix(".txt")?
                .parse()
                .ok()
        })
        .collect();
    evals.sort();
    assert_eq!(evals, vec![0, 2, 3, 4, 5]);
    let e0 = std::fs::read_to_string(work.join("eval_outputs_iter_0.txt")).unwrap();
    assert!(
        e0.contains(QUESTION) && e0.contains("<|im_start|>assistant"),
        "{e0}"
    );

    let png = std::fs::read(work.join("curves.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!((img.width(), img.height()), (800, 600));
    // Both panels carry their coloured curve.
    let has = |c: [u8; 3], top: u32| {
        (0..800).any(|x| (top..top + 300).any(|y| img.get_pixel(x, y).0 == c))
    };
    assert!(has([31, 119, 180], 0) && has([255, 127, 14], 300));
}

#[test]
fn full_fine_tuning_lowers_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 8);
    let work = tmp.path().join("work");
    let cfg = config(
        &s,
        &[
            "train.method=\"full\"",
            "train.max_steps=8",
            "optim.lr=1e-3",
            "checkpoint.save_steps=0",
            "eval.every_steps=0",
            "log.plot=false",
        ],
    );
    let summary = run(&cfg, &work, Resume::No).unwrap();
    let l: Vec<f64> = summary.losses.iter().map(|x| x.1).collect();
    assert_eq!(l.len(), 8);
    assert!(l.iter().all(|x| x.is_finite()));
    assert!(
        l[7] < 0.5 * l[0],
        "full fine-tuning should fit the repeated answer: {l:?}"
    );
    // Every weight was trainable: the checkpoint holds the whole model.
    let ck = ftrun::train::checkpoint::load(
        &summary.final_checkpoint.unwrap(),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let base = ftrun::model::weights::load_weights(
        &s.model,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        |_| true,
    )
    .unwrap();
    let mut names: Vec<&String> = ck.trainable.iter().map(|t| &t.0).collect();
    names.sort();
    let mut base_names: Vec<&String> = base.keys().collect();
    base_names.sort();
    assert_eq!(names, base_names);
}

#[test]
fn a_qlora_checkpoint_does_not_resume_as_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 4);
    let work = tmp.path().join("work");
    let steps = [
        "train.max_steps=2",
        "checkpoint.save_steps=2",
        "eval.every_steps=0",
        "log.plot=false",
    ];
    let q: Vec<&str> = steps
        .iter()
        .copied()
        .chain(["train.method=\"qlora\""])
        .collect();
    let done = run(&config(&s, &q), &work, Resume::No).unwrap();
    assert_eq!(done.steps, 2);
    assert!(done.final_checkpoint.is_some());
    let l: Vec<&str> = steps
        .iter()
        .copied()
        .chain(["train.method=\"lora\""])
        .collect();
    let err = format!(
        "{:#}",
        run(&config(&s, &l), &work, Resume::Auto).unwrap_err()
    );
    assert!(err.contains("qlora") && err.contains("lora"), "{err}");
}

#[test]
fn an_activation_budget_keeps_blocks_and_trains_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 8);
    let base = [
        "train.max_steps=3",
        "optim.lr=1e-3",
        "checkpoint.save_steps=0",
        "eval.every_steps=0",
        "log.plot=false",
        "log.every_steps=1",
    ];
    let mut losses = vec![];
    for budget in ["0", "1"] {
        let work = tmp.path().join(format!("work{budget}"));
        let mut sets = base.to_vec();
        let budget_set = format!("train.activation_budget_gib={budget}");
        sets.push(&budget_set);
        let (ok, _, err, _) =
            ftrun_cfg("train", &s, &sets, &["--work-dir", work.to_str().unwrap()]);
        assert!(ok, "{err}");
        // 1 GiB holds every block of the tiny model: none is recomputed, and the log says so.
        assert_eq!(
            err.contains("activation checkpointing: 0 of"),
            budget == "1",
            "{err}"
        );
        let scalars = std::fs::read_to_string(work.join("scalars.jsonl")).unwrap();
        let l: Vec<f64> = scalars
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        assert_eq!(l.len(), 3);
        losses.push(l);
    }
    assert_eq!(
        losses[0], losses[1],
        "keeping activations changes no number"
    );
}
