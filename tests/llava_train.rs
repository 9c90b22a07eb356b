//! Both LLaVA stages end to end on CPU with the built-in tiny configs: a tiny CLIP + the tiny
//! demo LLM on generated images. Pretrain trains the projector only; finetune starts from its
//! projector and trains the projector, LoRA on the LLM and LoRA on the tower; runs resume.

use ftrun::config::{builtin, load_str, Config};
use ftrun::model::tiny_clip::{make_tiny_llava, TinyLlava};
use ftrun::train::checkpoint;
use ftrun::train::trainer::{run, Resume};
use std::path::Path;

fn config(name: &str, t: &TinyLlava, extra: &[String]) -> Config {
    let mut sets = vec![
        format!("model.path=\"{}\"", t.llm.display()),
        format!("llava.vision_tower=\"{}\"", t.clip.display()),
        format!("data.image_folder=\"{}\"", t.images.display()),
        format!(
            "data.files=[{{path=\"{}\", format=\"llava\"}}]",
            if name.contains("pretrain") {
                &t.pretrain_data
            } else {
                &t.finetune_data
            }
            .display()
        ),
    ];
    sets.extend(extra.iter().cloned());
    load_str(builtin::get(name).unwrap(), name, &sets).unwrap()
}

fn trainable_names(ckpt: &Path) -> Vec<String> {
    let ck = checkpoint::load(ckpt, &candle_core::Device::Cpu).unwrap();
    ck.trainable.into_iter().map(|(n, _)| n).collect()
}

fn projector(ckpt: &Path) -> Vec<Vec<f32>> {
    let p = ftrun::train::llava::load_projector(ckpt, &candle_core::Device::Cpu).unwrap();
    p.tensors()
        .iter()
        .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn pretrain_then_finetune_from_its_projector() {
    let tmp = tempfile::tempdir().unwrap();
    let t = make_tiny_llava(&tmp.path().join("tiny"), 0).unwrap();
    let pre_dir = tmp.path().join("pre");
    let pre = run(
        &config(
            "tiny_llava_pretrain",
            &t,
            &[
                "train.max_steps=16".into(),
                "checkpoint.save_steps=8".into(),
            ],
        ),
        &pre_dir,
        Resume::No,
    )
    .unwrap();
    let (first, last) = (pre.losses[0].1, pre.losses.last().unwrap().1);
    assert!(
        last < first * 0.8,
        "pretrain loss did not fall: {first} -> {last}"
    );
    let pre_ckpt = pre.final_checkpoint.unwrap();
    let mut names = trainable_names(&pre_ckpt);
    names.sort();
    assert_eq!(
        names,
        [
            "projector.model.0.bias",
            "projector.model.0.weight",
            "projector.model.2.bias",
            "projector.model.2.weight"
        ],
        "pretrain trains the projector only"
    );

    // One finetune step with a negligible learning rate keeps the pretrain projector: the
    // finetune stage starts from it (found through the pretrain work dir).
    let ft = |dir: &Path, extra: &[String]| {
        let mut sets = vec![format!(
            "llava.pretrain_checkpoint=\"{}\"",
            pre_dir.display()
        )];
        sets.extend(extra.iter().cloned());
        run(&config("tiny_llava_finetune", &t, &sets), dir, Resume::No).unwrap()
    };
    let start = ft(
        &tmp.path().join("ft0"),
        &["train.max_steps=1".into(), "optim.lr=1e-12".into()],
    );
    let (p0, p1) = (
        projector(&pre_ckpt),
        projector(&start.final_checkpoint.unwrap()),
    );
    for (a, b) in p0.iter().zip(&p1) {
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            d < 1e-6,
            "finetune did not start from the pretrain projector ({d})"
        );
    }

    let fin = ft(&tmp.path().join("ft"), &["train.max_steps=16".into()]);
    let (first, last) = (fin.losses[0].1, fin.losses.last().unwrap().1);
    assert!(
        last < first * 0.8,
        "finetune loss did not fall: {first} -> {last}"
    );
    let fin_ckpt = fin.final_checkpoint.unwrap();
    let names = trainable_names(&fin_ckpt);
    let count = |p: &str| names.iter().filter(|n| n.starts_with(p)).count();
    // LLM: 4 layers x 7 linears x (A, B); projector: 4; tower: 2 of 3 layers run x 6 x 2.
    assert_eq!(count("model.layers."), 4 * 7 * 2);
    assert_eq!(count("projector."), 4);
    assert_eq!(count("vision_model.encoder.layers."), 2 * 6 * 2);
    assert_eq!(names.len(), 56 + 4 + 24);

    // Export in XTuner's layout: projector/, llm_adapter/, visual_encoder_adapter/.
    let out = tmp.path().join("export");
    ftrun::export::export_checkpoint(&fin_ckpt, &out).unwrap();
    let keys = |f: &Path| -> Vec<String> {
        let mut k: Vec<String> = candle_core::safetensors::load(f, &candle_core::Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
        k.sort();
        k
    };
    assert_eq!(
        keys(&out.join("projector/model.safetensors")),
        [
            "model.0.bias",
            "model.0.weight",
            "model.2.bias",
            "model.2.weight"
        ]
    );
    let pcfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("projector/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (pcfg["visual_hidden_size"].as_u64(), pcfg["depth"].as_u64()),
        (Some(32), Some(2))
    );
    // The exported projector is the checkpoint's, readable as a pretrain_checkpoint too.
    assert_eq!(projector(&out.join("projector")), projector(&fin_ckpt));
    let vis = keys(&out.join("visual_encoder_adapter/adapter_model.safetensors"));
    assert_eq!(vis.len(), 24);
    assert!(vis
        .iter()
        .all(|k| k.starts_with("base_model.model.vision_model.encoder.layers.")));
    let vcfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("visual_encoder_adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(vcfg["r"], 4);
    assert!(vcfg["task_type"].is_null());
    let llm = keys(&out.join("llm_adapter/adapter_model.safetensors"));
    assert_eq!(llm.len(), 56);
    assert!(llm
        .iter()
        .all(|k| k.starts_with("base_model.model.model.layers.")));

    // A pretrain checkpoint exports its projector only.
    let out = tmp.path().join("export_pre");
    ftrun::export::export_checkpoint(&pre_ckpt, &out).unwrap();
    assert!(out.join("projector/model.safetensors").is_file());
    assert!(!out.join("llm_adapter").exists() && !out.join("visual_encoder_adapter").exists());
}

#[test]
fn a_resumed_finetune_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let t = make_tiny_llava(&tmp.path().join("tiny"), 1).unwrap();
    // A pretrain stage of one step is enough to start from.
    let pre_dir = tmp.path().join("pre");
    run(
        &config("tiny_llava_pretrain", &t, &["train.max_steps=1".into()]),
        &pre_dir,
        Resume::No,
    )
    .unwrap();
    let cfg = |steps: usize| {
        config(
            "tiny_llava_finetune",
            &t,
            &[
                format!("llava.pretrain_checkpoint=\"{}\"", pre_dir.display()),
                format!("train.max_steps={steps}"),
                "checkpoint.save_steps=3".into(),
                "train.batch_size=3".into(),
                // The schedule depends on the total steps: keep the learning rate constant.
                "schedule.decay=\"constant\"".into(),
                "schedule.warmup_ratio=0.0".into(),
            ],
        )
    };
    let whole = run(&cfg(6), &tmp.path().join("whole"), Resume::No).unwrap();
    let part = tmp.path().join("part");
    run(&cfg(3), &part, Resume::No).unwrap();
    let resumed = run(&cfg(6), &part, Resume::Auto).unwrap();
    assert_eq!(resumed.losses.len(), 6);
    for ((s1, a), (s2, b)) in whole.losses.iter().zip(&resumed.losses) {
        assert_eq!(s1, s2);
        assert!(
            (a - b).abs() < 1e-9 * a.abs().max(1.0),
            "step {s1}: {a} vs resumed {b}"
        );
    }
}

#[test]
fn stage_settings_are_checked_with_their_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let t = TinyLlava {
        llm: tmp.path().join("m"),
        clip: tmp.path().join("c"),
        images: tmp.path().join("i"),
        pretrain_data: tmp.path().join("p.jsonl"),
        finetune_data: tmp.path().join("f.jsonl"),
    };
    let err = |name: &str, extra: &[&str]| {
        let mut sets = vec![
            format!("model.path=\"{}\"", t.llm.display()),
            format!("llava.vision_tower=\"{}\"", t.clip.display()),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        load_str(builtin::get(name).unwrap(), name, &sets)
            .unwrap_err()
            .to_string()
    };
    let e = err(
        "tiny_llava_finetune",
        &["llava.pretrain_checkpoint=\"\"", "data.pack=true"],
    );
    assert!(e.contains("data.pack") && e.contains("not packed"), "{e}");
    let e = err("tiny_llava_pretrain", &["llava.stage=\"pretrian\""]);
    assert!(
        e.contains("llava.stage") && e.contains("did you mean `pretrain`"),
        "{e}"
    );
    let e = err("tiny_llava_pretrain", &["llava.vision_lora={r=4}"]);
    assert!(
        e.contains("llava.vision_lora") && e.contains("frozen in the pretrain"),
        "{e}"
    );
    let e = err(
        "tiny_llava_finetune",
        &["llava.vision_lora={r=4, target_modules=[\"o_proj\"]}"],
    );
    assert!(
        e.contains("llava.vision_lora.target_modules.0") && e.contains("out_proj"),
        "{e}"
    );
    let text = builtin::get("tiny_llava_finetune").unwrap().replace(
        "pretrain_checkpoint = \"work_dirs/tiny_llava_pretrain\"\n",
        "",
    );
    let e = load_str(&text, "ft.toml", &[]).unwrap_err().to_string();
    assert!(e.contains("llava.pretrain_checkpoint"), "{e}");
}
