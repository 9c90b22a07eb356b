//! `ftrun --nproc 2 train` of the tiny LLaVA finetune stage (ZeRO-2 over the decoder, projector
//! and tower adapters) against one process with the same global batch.

mod train_support;

use candle_core::Device;
use ftrun::config::{builtin, load_str};
use ftrun::model::tiny_clip::make_tiny_llava;
use ftrun::train::checkpoint;
use ftrun::train::trainer::{run, to_vec_f64, Resume};
use std::process::Command;

#[test]
fn two_ranks_finetune_llava_like_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let t = make_tiny_llava(&tmp.path().join("tiny"), 2).unwrap();
    let mut sets = vec![
        format!("model.path=\"{}\"", t.llm.display()),
        format!("llava.vision_tower=\"{}\"", t.clip.display()),
        format!("data.image_folder=\"{}\"", t.images.display()),
    ];
    let pre = tmp.path().join("pre");
    let mut p = sets.clone();
    p.push(format!(
        "data.files=[{{path=\"{}\", format=\"llava\"}}]",
        t.pretrain_data.display()
    ));
    p.push("train.max_steps=1".into());
    let name = "tiny_llava_pretrain";
    run(
        &load_str(builtin::get(name).unwrap(), name, &p).unwrap(),
        &pre,
        Resume::No,
    )
    .unwrap();

    // Dropout off: ranks draw different masks than one process would.
    sets.extend([
        format!(
            "data.files=[{{path=\"{}\", format=\"llava\"}}]",
            t.finetune_data.display()
        ),
        format!("llava.pretrain_checkpoint=\"{}\"", pre.display()),
        "train.max_steps=4".into(),
        "checkpoint.save_steps=4".into(),
        "lora.dropout=0.0".into(),
        "llava.vision_lora.dropout=0.0".into(),
    ]);
    let name = "tiny_llava_finetune";
    let one = tmp.path().join("one");
    let mut s1 = sets.clone();
    s1.push("train.batch_size=2".into());
    run(
        &load_str(builtin::get(name).unwrap(), name, &s1).unwrap(),
        &one,
        Resume::No,
    )
    .unwrap();

    let two = tmp.path().join("two");
    let mut args = vec![
        "--nproc".to_string(),
        "2".into(),
        "train".into(),
        name.into(),
    ];
    for s in sets.iter().chain([&"train.batch_size=1".to_string()]) {
        args.push("--set".into());
        args.push(s.clone());
    }
    args.push("--work-dir".into());
    args.push(two.display().to_string());
    let out = Command::new(env!("CARGO_BIN_EXE_ftrun"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "2 ranks failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let load = |work: &std::path::Path| {
        checkpoint::load(&checkpoint::step_dir(work, 4), &Device::Cpu).unwrap()
    };
    let (a, b) = (load(&one), load(&two));
    // The 2-rank checkpoint is sharded (ZeRO-2), consolidated on load.
    let dir = checkpoint::step_dir(&two, 4);
    assert!(dir.join("shard-00001-of-00002.safetensors").is_file());
    assert!(b.state.shards.is_some());
    assert_eq!(a.state.history.len(), 4);
    for ((s, la), (_, lb)) in a.state.history.iter().zip(&b.state.history) {
        assert!(
            (la - lb).abs() <= 1e-4 * la.abs().max(1.0),
            "step {s}: {la} vs {lb}"
        );
    }
    assert_eq!(a.trainable.len(), b.trainable.len());
    for ((na, ta), (nb, tb)) in a.trainable.iter().zip(&b.trainable) {
        assert_eq!(na, nb);
        let (va, vb) = (to_vec_f64(ta).unwrap(), to_vec_f64(tb).unwrap());
        let worst = va
            .iter()
            .zip(&vb)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 1e-4, "`{na}` differs by {worst}");
    }
}
