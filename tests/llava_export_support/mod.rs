//! Shared by the LLaVA export and serve tests: the tiny LLaVA (tiny CLIP + tiny demo LLM on
//! generated images) trained through both stages with the built-in tiny configs, then exported.

#![allow(dead_code)]

use ftrun::model::tiny_clip::{make_tiny_llava, TinyLlava};
use ftrun::train::trainer::{run, Resume};
use std::path::{Path, PathBuf};

pub struct Trained {
    /// Holds every file; removed when dropped.
    pub tmp: tempfile::TempDir,
    pub tiny: TinyLlava,
    /// The XTuner-layout export (`projector/`, `llm_adapter/`, `visual_encoder_adapter/`).
    pub export: PathBuf,
    /// The `LlavaForConditionalGeneration` export, when asked for.
    pub hf: Option<PathBuf>,
}

fn config(name: &str, t: &TinyLlava, data: &Path, extra: &[String]) -> ftrun::config::Config {
    let mut sets = vec![
        format!("model.path=\"{}\"", t.llm.display()),
        format!("llava.vision_tower=\"{}\"", t.clip.display()),
        format!("data.image_folder=\"{}\"", t.images.display()),
        format!(
            "data.files=[{{path=\"{}\", format=\"llava\"}}]",
            data.display()
        ),
    ];
    sets.extend(extra.iter().cloned());
    ftrun::config::load_str(ftrun::config::builtin::get(name).unwrap(), name, &sets).unwrap()
}

/// Pretrain (projector) then finetune (projector + LoRA on the LLM and on the tower), and
/// export the final checkpoint (and the HF layout with `hf`).
pub fn train_and_export(pretrain_steps: usize, finetune_steps: usize, hf: bool) -> Trained {
    let tmp = tempfile::tempdir().unwrap();
    let t = make_tiny_llava(&tmp.path().join("tiny"), 0).unwrap();
    let pre = tmp.path().join("pre");
    let steps = |n: usize| format!("train.max_steps={n}");
    run(
        &config(
            "tiny_llava_pretrain",
            &t,
            &t.pretrain_data,
            &[steps(pretrain_steps)],
        ),
        &pre,
        Resume::No,
    )
    .unwrap();
    let fin = run(
        &config(
            "tiny_llava_finetune",
            &t,
            &t.finetune_data,
            &[
                steps(finetune_steps),
                format!("llava.pretrain_checkpoint=\"{}\"", pre.display()),
            ],
        ),
        &tmp.path().join("ft"),
        Resume::No,
    )
    .unwrap();
    let export = tmp.path().join("export");
    let hf = hf.then(|| tmp.path().join("hf"));
    ftrun::export::export_checkpoint_with(&fin.final_checkpoint.unwrap(), &export, hf.as_deref())
        .unwrap();
    Trained {
        tmp,
        tiny: t,
        export,
        hf,
    }
}
