//! `ftrun export --hf-llava`: the tiny LLaVA, trained through both stages with adapters on the
//! LLM and the tower, exported in the `LlavaForConditionalGeneration` layout; the directory's
//! config, key names and tokenizer are what transformers reads, and loaded back (ftrun's HF
//! LLaVA loader) it gives the chat path's logits for the same image and prompt.

mod llava_export_support;

use candle_core::{DType, Device, Tensor};
use ftrun::data::template::Template;
use ftrun::data::IMAGE_TOKEN_ID;
use ftrun::export::llava_hf::export_llava_hf;
use ftrun::infer::llava::{LlavaChat, LlavaParts, LlavaPaths};
use ftrun::infer::{CausalLm, ChatFormat, TextCodec};
use ftrun::tokenizer::Tokenizer;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn the_hf_export_has_transformers_layout_and_the_chat_path_logits() {
    let t = llava_export_support::train_and_export(4, 6, true);
    let hf = t.hf.as_deref().unwrap();
    let base_tok = Tokenizer::from_path(&t.tiny.llm).unwrap();
    assert_eq!(
        base_tok.token_to_id("<image>"),
        None,
        "the tiny LLM has no <image>"
    );
    let base_cfg = json(&t.tiny.llm.join("config.json"));
    let base_vocab = base_cfg["vocab_size"].as_u64().unwrap() as usize;

    // config.json: LLaVA-1.5's settings, the LLM's and the tower's configs.
    let cfg = json(&hf.join("config.json"));
    assert_eq!(cfg["model_type"], "llava");
    assert_eq!(cfg["architectures"][0], "LlavaForConditionalGeneration");
    let image_id = cfg["image_token_index"].as_u64().unwrap() as u32;
    assert_eq!(
        image_id as usize, base_vocab,
        "<image> is added after the vocabulary"
    );
    assert_eq!(cfg["image_seq_length"], 4, "(28 / 14)^2 patches");
    assert_eq!(cfg["projector_hidden_act"], "gelu");
    assert_eq!(cfg["vision_feature_layer"], -2);
    assert_eq!(cfg["vision_feature_select_strategy"], "default");
    assert_eq!(cfg["text_config"]["model_type"], "llama");
    assert_eq!(cfg["text_config"]["vocab_size"], base_vocab + 1);
    assert_eq!(cfg["text_config"]["hidden_size"], base_cfg["hidden_size"]);
    assert_eq!(cfg["vision_config"]["model_type"], "clip_vision_model");
    assert_eq!(cfg["vision_config"]["image_size"], 28);
    assert_eq!(cfg["vision_config"]["hidden_act"], "quick_gelu");
    let pre = json(&hf.join("preprocessor_config.json"));
    assert_eq!(pre["crop_size"]["height"], 28);
    assert_eq!(pre["size"]["shortest_edge"], 28);
    assert_eq!(pre["do_pad"], true);
    let proc = json(&hf.join("processor_config.json"));
    assert_eq!(proc["patch_size"], 14);
    assert_eq!(proc["image_token"], "<image>");
    assert_eq!(
        json(&hf.join("generation_config.json"))["suppress_tokens"],
        serde_json::json!([image_id])
    );
    // The tokenizer knows <image> by the id config.json names, and has the chat template.
    let tok = Tokenizer::from_path(hf).unwrap();
    assert_eq!(tok.token_to_id("<image>"), Some(image_id));
    let tcfg = json(&hf.join("tokenizer_config.json"));
    assert!(tcfg["chat_template"].as_str().unwrap().contains("<image>"));
    assert!(hf.join("chat_template.jinja").is_file());

    // Key names: transformers' current layout, nothing else; vocab rows grown by one.
    let w = tensors(&hf.join("model.safetensors"));
    let h = base_cfg["hidden_size"].as_u64().unwrap() as usize;
    for key in ["model.language_model.embed_tokens.weight", "lm_head.weight"] {
        assert_eq!(w[key].dims(), [base_vocab + 1, h], "{key}");
    }
    for key in [
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "model.language_model.layers.0.mlp.down_proj.weight",
        "model.language_model.norm.weight",
        "model.vision_tower.vision_model.embeddings.class_embedding",
        "model.vision_tower.vision_model.encoder.layers.2.mlp.fc2.bias",
        "model.vision_tower.vision_model.post_layernorm.weight",
        "model.multi_modal_projector.linear_1.weight",
        "model.multi_modal_projector.linear_1.bias",
        "model.multi_modal_projector.linear_2.weight",
        "model.multi_modal_projector.linear_2.bias",
    ] {
        assert!(w.contains_key(key), "missing {key}");
    }
    for key in w.keys() {
        assert!(
            [
                "model.language_model.",
                "model.vision_tower.vision_model.",
                "model.multi_modal_projector.",
                "lm_head."
            ]
            .iter()
            .any(|p| key.starts_with(p))
                && !key.contains("lora_"),
            "unexpected key {key}"
        );
    }
    assert_eq!(
        w["model.multi_modal_projector.linear_1.weight"].dims(),
        [h, 32]
    );
    // The image token's head row is zero; the others are the LLM's.
    let head = w["lm_head.weight"].to_dtype(DType::F32).unwrap();
    let extra = head.narrow(0, base_vocab, 1).unwrap().abs().unwrap();
    assert_eq!(extra.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    // Adapters are merged: the targeted weights moved away from the bases'.
    let base_llm = tensors(&t.tiny.llm.join("model.safetensors"));
    let base_clip = tensors(&t.tiny.clip.join("model.safetensors"));
    for (ours, base, base_key) in [
        (
            &w["model.language_model.layers.0.self_attn.q_proj.weight"],
            &base_llm,
            "model.layers.0.self_attn.q_proj.weight",
        ),
        (
            &w["model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"],
            &base_clip,
            "vision_model.encoder.layers.0.self_attn.q_proj.weight",
        ),
    ] {
        let d = (ours - &base[base_key])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(
            d.to_scalar::<f32>().unwrap() > 1e-6,
            "{base_key} is the base's"
        );
    }

    // Loaded back, the model answers the image + prompt with the chat path's logits.
    let image = t.tiny.images.join("red_square.png");
    let paths = LlavaPaths {
        llm: &t.tiny.llm,
        visual_encoder: &t.tiny.clip,
        llava: &t.export,
        adapter: None,
    };
    let chat = LlavaChat::load(&paths, Some(&image), "cpu", None).unwrap();
    let (parts, hf_tok) = LlavaParts::load_hf(hf, "cpu").unwrap();
    let pixels = parts.preprocess().load(&image, &Device::Cpu).unwrap();
    let rows = parts.image_rows(&pixels).unwrap();
    let reloaded = LlavaChat::new(parts.decoder, hf_tok, Some(rows));
    let format = ChatFormat::from(&Template::by_name("internlm2_chat").unwrap());
    let text = chat
        .chat_format(format.clone())
        .turn_prompt("What colour is the shape?", None, 0);
    let encode = |c: &LlavaChat| {
        let mut ids: Vec<u32> = c.bos_id().into_iter().collect();
        ids.extend(c.encode(&text, false).unwrap());
        ids
    };
    let ids = encode(&chat);
    assert_eq!(
        encode(&reloaded),
        ids,
        "the exported tokenizer encodes alike"
    );
    assert!(ids.contains(&IMAGE_TOKEN_ID));
    let (mut ca, mut cb) = (chat.new_cache(), reloaded.new_cache());
    let (mut la, mut lb) = (
        chat.forward_infer(&ids, &mut ca).unwrap(),
        reloaded.forward_infer(&ids, &mut cb).unwrap(),
    );
    let mut prompt_last = None;
    // The prompt's logits, then four greedy steps through the KV caches.
    for step in 0..5 {
        assert_eq!(lb.len(), la.len() + 1, "one more column: the image token");
        assert_eq!(lb[la.len()], 0.0, "the image token's logit (zero head row)");
        let scale = la.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = max_abs(&la, &lb[..la.len()]);
        assert!(
            d <= 1e-5 * scale.max(1.0),
            "step {step}: logits differ by {d}"
        );
        prompt_last.get_or_insert(la.clone());
        let next = la
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        la = chat.forward_infer(&[next], &mut ca).unwrap();
        lb = reloaded.forward_infer(&[next], &mut cb).unwrap();
    }

    // `ftrun logits --llava` (what scripts/check_llava_hf.py compares with transformers) gives
    // the chat path's logits at the prompt's end and its pixels.
    let out = t.tmp.path().join("logits.json");
    let bin = env!("CARGO_BIN_EXE_ftrun");
    let text_no_bos = text.clone();
    let status = std::process::Command::new(bin)
        .args(["logits", t.tiny.llm.to_str().unwrap(), "--llava"])
        .arg(&t.export)
        .arg("--visual-encoder")
        .arg(&t.tiny.clip)
        .arg("--image")
        .arg(&image)
        .args(["--text", &text_no_bos, "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let j = json(&out);
    let rows = j["logits"].as_array().unwrap();
    assert_eq!(rows.len(), ids.len());
    assert_eq!(j["image_tokens"], 4);
    let last: Vec<f32> = rows
        .last()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let want = prompt_last.unwrap();
    assert!(max_abs(&last, &want) <= 1e-5 * 10.0, "ftrun logits vs chat");
    let positions: Vec<u64> = j["positions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(*positions.last().unwrap() as usize, ids.len() - 1 + 4 - 1);
    assert_eq!(j["pixel_values"].as_array().unwrap().len(), 3);
}

/// Writes a config.json of `architecture` into `dir`.
fn llm_config(dir: &Path, architecture: &str, model_type: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        format!(
            r#"{{"architectures": ["{architecture}"], "model_type": "{model_type}",
                "vocab_size": 17, "hidden_size": 16, "intermediate_size": 24,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}}"#
        ),
    )
    .unwrap();
}

#[test]
fn internlm2_and_qwen2_llms_are_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let format = ChatFormat::from(&Template::by_name("internlm2_chat").unwrap());
    for (arch, model_type, says) in [
        ("InternLM2ForCausalLM", "internlm2", "no InternLM2"),
        ("Qwen2ForCausalLM", "qwen2", "Llama-architecture LLMs only"),
    ] {
        let llm = tmp.path().join(model_type);
        llm_config(&llm, arch, model_type);
        let paths = LlavaPaths {
            llm: &llm,
            visual_encoder: tmp.path(),
            llava: &tmp.path().join("llava"),
            adapter: None,
        };
        let e = export_llava_hf(&paths, &format, &tmp.path().join("out"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(says), "{e}");
        assert!(e.contains(llm.to_str().unwrap()), "names the LLM: {e}");
        assert!(!tmp.path().join("out").exists(), "nothing written");
    }
}
