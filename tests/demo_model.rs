//! The generated demo model loads back through the project's own readers and is deterministic.

use candle_core::{DType, Device};
use ftrun::model::demo::{make_demo_model, DEMO_SPECIAL_TOKENS, DEMO_VOCAB_TARGET};
use ftrun::model::weights::load_weights;
use ftrun::model::{Arch, ModelConfig};
use ftrun::tokenizer::Tokenizer;
use std::path::Path;

fn corpus() -> Vec<String> {
    let lines = [
        "请介绍一下你自己",
        "我是小助手的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦",
        "你好，有什么可以帮你的吗？",
        "Hello! I am a tiny assistant. How can I help you today?",
        "The quick brown fox jumps over the lazy dog.",
        "fine-tuning with LoRA and QLoRA on one GPU",
    ];
    (0..50)
        .flat_map(|i| lines.iter().map(move |l| format!("{l} {i}")))
        .collect()
}

fn make(dir: &Path, seed: u64) {
    make_demo_model(dir, &corpus(), seed).unwrap();
}

#[test]
fn demo_model_loads_through_config_tokenizer_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 7);

    let cfg = ModelConfig::from_dir(dir.path()).unwrap();
    let tok = Tokenizer::from_path(dir.path()).unwrap();
    assert_eq!(cfg.arch, Arch::Llama);
    assert_eq!(cfg.hf_architecture, "LlamaForCausalLM");
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_layers,
            cfg.num_heads,
            cfg.num_kv_heads
        ),
        (128, 4, 4, 2)
    );
    assert_eq!(cfg.intermediate_size, 352);
    assert_eq!(cfg.head_dim, 32);
    assert_eq!(cfg.max_position_embeddings, 512);
    assert_eq!(cfg.rms_norm_eps, 1e-6);
    assert_eq!(cfg.torch_dtype, "float32");
    assert_eq!(cfg.vocab_size, tok.vocab_size());
    assert!(
        cfg.vocab_size > 256 + DEMO_SPECIAL_TOKENS.len() && cfg.vocab_size <= DEMO_VOCAB_TARGET
    );
    assert_eq!(cfg.bos_token_id, tok.bos_id());
    assert_eq!(cfg.eos_token_id, tok.eos_id());
    assert_eq!(tok.id_to_token(cfg.bos_token_id.unwrap()).unwrap(), "<s>");
    assert_eq!(tok.id_to_token(cfg.eos_token_id.unwrap()).unwrap(), "</s>");

    let weights = load_weights(dir.path(), DType::F32, &Device::Cpu, |_| true).unwrap();
    let numel: usize = weights.values().map(|t| t.elem_count()).sum();
    assert_eq!(numel, cfg.num_params());
    assert_eq!(weights.len(), 2 + cfg.num_layers * 9 + 1);
    let v = cfg.vocab_size;
    for (name, shape) in [
        ("model.embed_tokens.weight", vec![v, 128]),
        ("lm_head.weight", vec![v, 128]),
        ("model.layers.3.self_attn.q_proj.weight", vec![128, 128]),
        ("model.layers.3.self_attn.k_proj.weight", vec![64, 128]),
        ("model.layers.3.self_attn.v_proj.weight", vec![64, 128]),
        ("model.layers.3.self_attn.o_proj.weight", vec![128, 128]),
        ("model.layers.0.mlp.gate_proj.weight", vec![352, 128]),
        ("model.layers.0.mlp.up_proj.weight", vec![352, 128]),
        ("model.layers.0.mlp.down_proj.weight", vec![128, 352]),
    ] {
        assert_eq!(weights[name].dims(), shape.as_slice(), "{name}");
    }

    // Random init N(0, 0.02) on matrices (mean and std over the embedding's ~250k samples),
    // ones on norms.
    let emb = weights["model.embed_tokens.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let n = emb.len() as f64;
    let mean = emb.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (emb.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 5e-4, "mean {mean}");
    assert!((std - 0.02).abs() < 5e-4, "std {std}");
    let final_norm = weights["model.norm.weight"].to_vec1::<f32>().unwrap();
    assert_eq!(final_norm, vec![ftrun::model::demo::DEMO_FINAL_NORM; 128]);
    for name in [
        "model.layers.1.input_layernorm.weight",
        "model.layers.2.post_attention_layernorm.weight",
    ] {
        let w = weights[name].to_vec1::<f32>().unwrap();
        assert_eq!(w, vec![1.0f32; 128], "{name}");
    }
    // Different tensors are different draws.
    let q0 = weights["model.layers.0.self_attn.q_proj.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let q1 = weights["model.layers.1.self_attn.q_proj.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(q0, q1);

    let total: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(total < 8 << 20, "demo model is {total} bytes");
    for f in ["generation_config.json", "tokenizer_config.json"] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(f)).unwrap()).unwrap();
        assert!(v.is_object(), "{f}");
    }
}

#[test]
fn chinese_and_special_tokens_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    make(dir.path(), 1);
    let tok = Tokenizer::from_path(dir.path()).unwrap();

    // Each special token is one id, matched whole inside text.
    let mut special_ids = vec![];
    for s in DEMO_SPECIAL_TOKENS {
        let id = tok.token_to_id(s).unwrap();
        assert_eq!(tok.encode(s, false).unwrap(), vec![id], "{s}");
        special_ids.push(id);
    }
    assert_eq!(special_ids, vec![0, 1, 2, 3, 4]);

    let text = "<s><|im_start|>user\n请介绍一下你自己<|im_end|>\n<|im_start|>assistant\n\
                我是小助手，内在是书生·浦语的1.8B大模型哦<|im_end|></s>";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(ids[..2], [1, 3]);
    assert_eq!(*ids.last().unwrap(), 2);
    assert_eq!(ids.iter().filter(|&&i| i == 4).count(), 2);
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    // Merges learned from the corpus make its text shorter than its UTF-8 bytes.
    let seen = "请介绍一下你自己";
    assert!(tok.encode(seen, false).unwrap().len() < seen.len() / 2);

    // Text never seen in training (rare CJK, emoji, accents) still round-trips byte by byte.
    let unseen = "龘靐齉 🤖 naïve façade\ttabs  and  spaces";
    let ids = tok.encode(unseen, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), unseen);
    assert!(!ids.contains(&0), "no <unk> for byte-level BPE");
}

#[test]
fn same_seed_same_bytes() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    make(a.path(), 42);
    make(b.path(), 42);
    make(c.path(), 43);
    let mut names: Vec<String> = std::fs::read_dir(a.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    for name in &names {
        let bytes_a = std::fs::read(a.path().join(name)).unwrap();
        assert_eq!(
            bytes_a,
            std::fs::read(b.path().join(name)).unwrap(),
            "{name}"
        );
        let bytes_c = std::fs::read(c.path().join(name)).unwrap();
        // The seed drives the weights only; the tokenizer depends on the corpus alone.
        assert_eq!(bytes_a == bytes_c, name != "model.safetensors", "{name}");
    }
}

#[test]
fn empty_corpus_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let err = make_demo_model(dir.path(), &["  ".to_string()], 0).unwrap_err();
    assert!(err.to_string().contains("corpus"), "{err}");
}
