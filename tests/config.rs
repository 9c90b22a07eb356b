//! Config loading: typed sections, located errors, suggestions, overrides, built-in configs.

use ftrun::config::{self, builtin};

const MIN: &str = "[model]\npath = \"m\"\n\n[[data.files]]\npath = \"d.jsonl\"\n";

fn err(text: &str, set: &[&str]) -> config::ConfigError {
    let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    config::load_str(text, "cfg.toml", &set).expect_err("config should be rejected")
}

#[test]
fn every_builtin_config_loads_and_has_a_description() {
    for (name, text) in builtin::BUILTIN {
        let c = config::load_str(text, name, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!c.description.is_empty(), "{name} has no description");
        assert!(!builtin::description(text).is_empty());
    }
    let q = config::load_str(
        builtin::get("internlm2_chat_1_8b_qlora_assistant_e3").unwrap(),
        "q",
        &[],
    )
    .unwrap();
    assert_eq!(q.train.method, "qlora");
    assert_eq!(
        (q.lora.r, q.lora.alpha, q.quant.quant_type.as_str()),
        (64, 16.0, "nf4")
    );
    let p = config::load_str(
        builtin::get("internlm2_1_8b_full_pretrain_text_e1").unwrap(),
        "p",
        &[],
    )
    .unwrap();
    assert_eq!(
        (
            p.train.method.as_str(),
            p.data.template.as_str(),
            p.optim.lr
        ),
        ("full", "plain", 2e-5)
    );
}

#[test]
fn defaults_follow_xtuner() {
    let c = config::load_str(MIN, "cfg.toml", &[]).unwrap();
    assert_eq!(c.data.max_length, 2048);
    assert!(c.data.pack && c.data.shuffle_before_pack && c.train.activation_checkpointing);
    assert_eq!((c.lora.r, c.lora.alpha, c.lora.dropout), (64, 16.0, 0.1));
    assert_eq!(
        (c.optim.lr, c.optim.weight_decay, c.optim.max_grad_norm),
        (2e-4, 0.0, 1.0)
    );
    assert_eq!(
        (c.train.batch_size, c.train.grad_accum, c.train.epochs),
        (1, 16, 3)
    );
    assert_eq!((c.checkpoint.save_steps, c.checkpoint.keep_last), (500, 2));
    assert_eq!(c.schedule.warmup_ratio, 0.03);
}

#[test]
fn unknown_key_names_file_line_key_and_suggests() {
    let text = format!("{MIN}\n[optim]\nlr = 1e-4\nweight_decy = 0.1\n");
    let e = err(&text, &[]);
    assert_eq!(e.file, "cfg.toml");
    assert_eq!(e.line, Some(9), "{e}");
    assert_eq!(e.key, "optim.weight_decy");
    assert!(e.message.contains("did you mean `weight_decay`"), "{e}");
}

#[test]
fn unknown_section_is_rejected_with_suggestion() {
    let e = err(&format!("{MIN}\n[optimizer]\nlr = 1\n"), &[]);
    assert!(e.message.contains("did you mean `optim`"), "{e}");
}

#[test]
fn xtuner_names_point_to_ours() {
    let e = err(
        &format!("{MIN}\n[train]\ngradient_accumulation_steps = 4\n"),
        &[],
    );
    assert!(e.message.contains("did you mean `grad_accum`"), "{e}");
}

#[test]
fn wrong_type_names_key_and_value() {
    let e = err(&format!("{MIN}\n[optim]\nlr = \"fast\"\n"), &[]);
    assert_eq!((e.key.as_str(), e.line), ("optim.lr", Some(8)));
    assert!(e.message.contains("\"fast\""), "{e}");
}

#[test]
fn bad_names_get_suggestions_and_the_valid_list() {
    let e = err(
        &format!("{MIN}\n[data]\ntemplate = \"internlm2_caht\"\n"),
        &[],
    );
    assert_eq!((e.key.as_str(), e.line), ("data.template", Some(8)));
    assert!(
        e.message.contains("did you mean `internlm2_chat`") && e.message.contains("qwen_chat"),
        "{e}"
    );
    let e = err(&format!("{MIN}\n[train]\nmethod = \"qlora4\"\n"), &[]);
    assert!(
        e.message.contains("`qlora4`") && e.message.contains("did you mean `qlora`"),
        "{e}"
    );
    let e = err(&format!("{MIN}format = \"sharegpt\"\n"), &[]);
    assert_eq!(e.key, "data.files.0.format");
    assert_eq!(e.line, Some(6), "{e}");
}

#[test]
fn toml_syntax_error_has_a_line() {
    let e = err("[model]\npath = \"m\n", &[]);
    assert_eq!(e.line, Some(2), "{e}");
    assert!(e.message.contains("invalid TOML"));
}

#[test]
fn set_overrides_any_key_and_errors_name_the_override() {
    let c = config::load_str(
        MIN,
        "cfg.toml",
        &[
            "optim.lr=1e-5".into(),
            "data.template=qwen_chat".into(),
            "train.method=full".into(),
            "eval.inputs=[\"hi\"]".into(),
        ],
    )
    .unwrap();
    assert_eq!(
        (
            c.optim.lr,
            c.data.template.as_str(),
            c.train.method.as_str()
        ),
        (1e-5, "qwen_chat", "full")
    );
    assert_eq!(c.eval.inputs, vec!["hi".to_string()]);
    let e = err(MIN, &["optim.lr=abc"]);
    assert_eq!((e.file.as_str(), e.key.as_str()), ("--set", "optim.lr"));
    let e = err(MIN, &["optim.lrr=1"]);
    assert_eq!(e.file, "--set");
    assert!(e.message.contains("did you mean `lr`"), "{e}");
    let e = err(MIN, &["optim.lr"]);
    assert!(e.message.contains("section.key=value"), "{e}");
}

#[test]
fn semantic_checks() {
    let e = err("[model]\npath = \"m\"\n[data]\nfiles = []\n", &[]);
    assert_eq!(e.key, "data.files");
    let e = err(MIN, &["lora.dropout=1.5"]);
    assert_eq!(e.key, "lora.dropout");
    let e = err(MIN, &["train.device=gpu"]);
    assert!(e.message.contains("`gpu`"), "{e}");
    let e = err(MIN, &["parallel.zero_stage=3"]);
    assert_eq!(e.key, "parallel.zero_stage");
    let e = err(MIN, &["train.activation_budget_gib=-1"]);
    assert_eq!(e.key, "train.activation_budget_gib");
    assert!(e.message.contains("-1"), "{e}");
    let ok = config::load_str(MIN, "cfg.toml", &["train.activation_budget_gib=2.5".into()]);
    assert_eq!(ok.unwrap().train.activation_budget_gib, 2.5);
}

#[test]
fn config_round_trips_through_toml() {
    let c = config::load_str(builtin::get("tiny_demo_assistant").unwrap(), "t", &[]).unwrap();
    let back = config::Config::from_toml(&c.to_toml()).unwrap();
    assert_eq!(c, back);
}

#[test]
fn grad_dtype_defaults_to_auto_and_rejects_other_values() {
    let c = config::load_str(MIN, "cfg.toml", &[]).unwrap();
    assert_eq!(c.optim.grad_dtype, "auto");
    let c = config::load_str(
        &format!("{MIN}\n[optim]\ngrad_dtype = \"f32\"\n"),
        "cfg.toml",
        &[],
    )
    .unwrap();
    assert_eq!(c.optim.grad_dtype, "f32");
    let e = err(&format!("{MIN}\n[optim]\ngrad_dtype = \"bf16\"\n"), &[]);
    assert_eq!(e.key, "optim.grad_dtype", "{e}");
    assert!(e.message.contains("`bf16` is not one of auto, f32"), "{e}");
}
