//! The tiny CLIP generator: a loadable HF CLIPVisionModel directory, reproducible from its seed.

use candle_core::{DType, Device, Tensor};
use ftrun::model::tiny_clip::{make_tiny_clip, TinyClipSpec};
use ftrun::model::vision::{ClipVision, ClipVisionConfig};
use ftrun::model::weights::{load_weights, LazyCheckpoint};

#[test]
fn generated_tower_loads_and_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let spec = TinyClipSpec::default();
    make_tiny_clip(&a, &spec, 7).unwrap();
    make_tiny_clip(&b, &spec, 7).unwrap();
    make_tiny_clip(&c, &spec, 8).unwrap();
    let bytes = |d: &std::path::Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(bytes(&a), bytes(&b), "same seed, same weights");
    assert_ne!(bytes(&a), bytes(&c), "another seed, other weights");

    let cfg = ClipVisionConfig::from_dir(&a).unwrap();
    assert_eq!(
        (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_patches()),
        (32, 3, 4)
    );
    assert_eq!(cfg.hidden_act, "quick_gelu");
    let pre: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("preprocessor_config.json")).unwrap())
            .unwrap();
    assert_eq!(pre["crop_size"]["height"], 28);
    assert_eq!(pre["size"]["shortest_edge"], 28);

    // Every tensor is one the tower (or HF's post_layernorm, unused by LLaVA) reads.
    let names: Vec<String> = load_weights(&a, DType::F32, &Device::Cpu, |_| true)
        .unwrap()
        .into_keys()
        .collect();
    assert_eq!(names.len(), 3 + 2 + 3 * 16 + 2);
    let mut w = LazyCheckpoint::open(&a).unwrap();
    let tower = ClipVision::new(&cfg, &mut w, -1, DType::F32, &Device::Cpu).unwrap();
    let px = Tensor::randn(0f32, 1.0, (2, 3, 28, 28), &Device::Cpu).unwrap();
    let feats = tower.forward(&px).unwrap();
    assert_eq!(feats.dims(), [2, 4, 32]);
    // LayerNorm outputs of a random init: finite and of order one.
    let v: Vec<f32> = feats.flatten_all().unwrap().to_vec1().unwrap();
    let rms = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    assert!(
        v.iter().all(|x| x.is_finite()) && rms > 0.1 && rms < 10.0,
        "rms {rms}"
    );
}

#[test]
fn bad_shapes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TinyClipSpec {
        image_size: 30,
        ..TinyClipSpec::default()
    };
    let err = make_tiny_clip(tmp.path(), &spec, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("image_size 30") && err.contains("patch_size 14"),
        "{err}"
    );
    let spec = TinyClipSpec {
        num_heads: 5,
        ..TinyClipSpec::default()
    };
    let err = make_tiny_clip(tmp.path(), &spec, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("num_heads 5"), "{err}");
}
