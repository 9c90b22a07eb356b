//! Non-finite steps through the binary: `on_nan = "skip"` reports the step and goes on until
//! `max_nan_steps` in a row; `on_nan = "stop"` exits non-zero naming the step.

mod train_support;

use train_support::*;

/// An absurd learning rate: the first update blows the adapter up and later steps are not finite.
const BLOW_UP: &[&str] = &[
    "optim.lr=1e30",
    "schedule.warmup_ratio=0.0",
    "optim.max_grad_norm=0.0",
    "eval.every_steps=0",
    "checkpoint.save_steps=0",
    "log.plot=false",
    "log.every_steps=1",
];

fn scalars(work: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(work.join("scalars.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn skip_reports_each_step_and_stops_after_max_nan_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 8);
    let work = tmp.path().join("work");
    let mut sets = BLOW_UP.to_vec();
    sets.extend([
        "train.on_nan=\"skip\"",
        "train.max_nan_steps=3",
        "train.max_steps=10",
    ]);
    let (ok, _, err, _) = ftrun_cfg("train", &s, &sets, &["--work-dir", work.to_str().unwrap()]);
    assert!(
        !ok,
        "three non-finite steps in a row must stop the run:\n{err}"
    );
    let rows = scalars(&work);
    let first_bad = rows
        .iter()
        .position(|r| r["skipped"] == true)
        .expect("a skipped step")
        + 1;
    assert!(first_bad >= 2, "step 1 starts from a finite model");
    // Each skipped step is reported with its number, the run went on after the first one, and
    // stopped at the third in a row.
    assert!(
        err.contains(&format!("step {first_bad}: loss")) && err.contains("update skipped"),
        "{err}"
    );
    assert_eq!(
        rows.len(),
        first_bad + 2,
        "went on for max_nan_steps, then stopped:\n{err}"
    );
    assert!(rows[first_bad - 1..].iter().all(|r| r["skipped"] == true));
    assert!(
        err.contains(&format!("step {}: loss NaN", first_bad + 2))
            && err
                .contains("stopping after 3 non-finite step(s) in a row (train.max_nan_steps = 3)"),
        "{err}"
    );
}

#[test]
fn stop_exits_non_zero_naming_the_step() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 8);
    let work = tmp.path().join("work");
    let mut sets = BLOW_UP.to_vec();
    sets.extend(["train.on_nan=\"stop\"", "train.max_steps=10"]);
    let (ok, _, err, code) = ftrun_cfg("train", &s, &sets, &["--work-dir", work.to_str().unwrap()]);
    assert!(!ok && code.is_some_and(|c| c != 0), "{err}");
    let rows = scalars(&work);
    let bad = rows.len();
    assert!(
        bad < 10 && rows[bad - 1]["skipped"] == true,
        "stopped at the first non-finite step"
    );
    assert!(
        err.contains(&format!("step {bad}: loss"))
            && err.contains("not finite (lr")
            && err.contains("stopping (train.on_nan = \"stop\")"),
        "{err}"
    );
}

#[test]
fn a_poisoned_weight_is_caught_at_step_one() {
    let tmp = tempfile::tempdir().unwrap();
    let s = setup(tmp.path(), 8);
    // NaN in one row of the embedding: every sequence that uses the token is poisoned.
    let path = s.model.join("model.safetensors");
    let mut w = ftrun::model::weights::load_weights(
        &s.model,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
        |_| true,
    )
    .unwrap();
    let emb = w["model.embed_tokens.weight"].clone();
    let mut v = emb.to_vec2::<f32>().unwrap();
    for row in v.iter_mut() {
        row[0] = f32::NAN;
    }
    w.insert(
        "model.embed_tokens.weight".into(),
        candle_core::Tensor::new(v, &candle_core::Device::Cpu).unwrap(),
    );
    std::fs::remove_file(&path).unwrap();
    candle_core::safetensors::save(&w, &path).unwrap();
    let work = tmp.path().join("work");
    let (ok, _, err, _) = ftrun_cfg(
        "train",
        &s,
        &[
            "train.on_nan=\"stop\"",
            "train.max_steps=3",
            "eval.every_steps=0",
            "log.plot=false",
            "eval.inputs=[]",
        ],
        &["--work-dir", work.to_str().unwrap()],
    );
    assert!(!ok);
    assert!(
        err.contains("error: step 1: loss NaN") && err.contains("stopping"),
        "{err}"
    );
}
