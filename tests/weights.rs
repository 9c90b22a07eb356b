//! Weight loading against a checkpoint written by the Python `safetensors` package
//! (scripts/fixtures/weights_fixture.py), and the sharded writer.

use candle_core::{DType, Device, Tensor};
use ftrun::model::weights::{load_weights, parse_size, save_sharded, INDEX_FILE, SINGLE_FILE};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weights")
}

#[derive(serde::Deserialize)]
struct Expected {
    shape: Vec<usize>,
    dtype: String,
    values: Vec<f64>,
}

fn expected() -> BTreeMap<String, Expected> {
    let text = std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A writable copy of the sharded fixture.
fn copy_fixture() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_dir().join("sharded")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

#[test]
fn loads_sharded_bf16_fp16_fp32_checkpoint() {
    let weights = load_weights(
        &fixture_dir().join("sharded"),
        DType::F32,
        &Device::Cpu,
        |_| true,
    )
    .unwrap();
    let expected = expected();
    assert_eq!(weights.len(), expected.len());
    let mut seen_dtypes = vec![];
    for (name, want) in &expected {
        let t = &weights[name];
        assert_eq!(t.dtype(), DType::F32, "{name}");
        assert_eq!(t.dims(), want.shape.as_slice(), "{name}");
        let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Every source value is exactly representable in its dtype, so the f32 cast is exact.
        let want_f32: Vec<f32> = want.values.iter().map(|&v| v as f32).collect();
        assert_eq!(got, want_f32, "{name}");
        seen_dtypes.push(want.dtype.clone());
    }
    for d in ["bf16", "f16", "f32"] {
        assert!(seen_dtypes.iter().any(|s| s == d), "fixture lacks {d}");
    }
}

#[test]
fn casts_to_requested_dtype_and_filters_names() {
    let weights = load_weights(
        &fixture_dir().join("sharded"),
        DType::BF16,
        &Device::Cpu,
        |name| name.starts_with("model.layers."),
    )
    .unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.self_attn.q_proj.weight"
        ]
    );
    let q = &weights["model.layers.0.self_attn.q_proj.weight"];
    assert_eq!(q.dtype(), DType::BF16);
    let want: Vec<f32> = expected()["model.layers.0.self_attn.q_proj.weight"]
        .values
        .iter()
        .map(|&v| v as f32)
        .collect();
    let got = q
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got, want);
}

#[test]
fn missing_shard_is_named() {
    let dir = copy_fixture();
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let err = load_weights(dir.path(), DType::F32, &Device::Cpu, |_| true).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("model-00002-of-00003.safetensors"), "{msg}");
    assert!(msg.contains("missing"), "{msg}");
    assert!(msg.contains(INDEX_FILE), "{msg}");
}

#[test]
fn corrupt_shard_is_named() {
    let dir = copy_fixture();
    let shard = dir.path().join("model-00003-of-00003.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let err = load_weights(dir.path(), DType::F32, &Device::Cpu, |_| true).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&shard.display().to_string()), "{msg}");
    assert!(msg.contains("corrupt"), "{msg}");

    std::fs::write(&shard, b"not a safetensors file at all").unwrap();
    let msg = format!(
        "{:#}",
        load_weights(dir.path(), DType::F32, &Device::Cpu, |_| true).unwrap_err()
    );
    assert!(msg.contains("model-00003-of-00003.safetensors"), "{msg}");
}

#[test]
fn index_entry_absent_from_its_shard_is_an_error() {
    let dir = copy_fixture();
    let index_path = dir.path().join(INDEX_FILE);
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    index["weight_map"]["model.extra.weight"] = "model-00003-of-00003.safetensors".into();
    std::fs::write(&index_path, index.to_string()).unwrap();
    let msg = format!(
        "{:#}",
        load_weights(dir.path(), DType::F32, &Device::Cpu, |_| true).unwrap_err()
    );
    assert!(msg.contains("model.extra.weight"), "{msg}");
    assert!(msg.contains("model-00003-of-00003.safetensors"), "{msg}");
    // Filtered out, the bad entry is never read.
    let ok = load_weights(dir.path(), DType::F32, &Device::Cpu, |n| {
        n != "model.extra.weight"
    })
    .unwrap();
    assert_eq!(ok.len(), 5);
}

#[test]
fn directory_without_weights_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let msg = format!(
        "{:#}",
        load_weights(dir.path(), DType::F32, &Device::Cpu, |_| true).unwrap_err()
    );
    assert!(msg.contains("no weights in"), "{msg}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");

    std::fs::write(dir.path().join("pytorch_model.bin"), b"x").unwrap();
    let msg = format!(
        "{:#}",
        load_weights(dir.path(), DType::F32, &Device::Cpu, |_| true).unwrap_err()
    );
    assert!(msg.contains("pytorch_model.bin"), "{msg}");

    let msg = format!(
        "{:#}",
        load_weights(&dir.path().join("nope"), DType::F32, &Device::Cpu, |_| true).unwrap_err()
    );
    assert!(msg.contains("does not exist"), "{msg}");
}

fn sample_tensors() -> Vec<(String, Tensor)> {
    let dev = Device::Cpu;
    let make = |n: usize, shape: &[usize], start: f32| {
        // Multiples of 1/8 are exact in bf16.
        let v: Vec<f32> = (0..n).map(|i| start + i as f32 / 8.0).collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    vec![
        ("model.embed_tokens.weight".into(), make(40, &[10, 4], -2.0)), // 80 B in bf16
        (
            "model.layers.0.mlp.up_proj.weight".into(),
            make(24, &[6, 4], 0.5),
        ), // 48 B
        ("model.norm.weight".into(), make(4, &[4], 1.0)),               // 8 B
        ("lm_head.weight".into(), make(40, &[10, 4], 3.0)),             // 80 B
    ]
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn assert_same(loaded: &std::collections::HashMap<String, Tensor>, given: &[(String, Tensor)]) {
    assert_eq!(loaded.len(), given.len());
    for (name, t) in given {
        let got = loaded[name].to_dtype(DType::F32).unwrap();
        assert_eq!(got.dims(), t.dims(), "{name}");
        let diff = (got - t)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
}

#[test]
fn save_sharded_splits_like_transformers_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = sample_tensors();
    // bf16 sizes in order: embed 80 + up 48 = 128 fits in 130; + norm 8 would not, so shard 2
    // starts with norm 8 + head 80.
    save_sharded(dir.path(), &tensors, 130, DType::BF16).unwrap();
    assert_eq!(
        files_in(dir.path()),
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            INDEX_FILE
        ]
    );
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(INDEX_FILE)).unwrap())
            .unwrap();
    assert_eq!(index["metadata"]["total_size"], 80 + 48 + 8 + 80);
    let map = &index["weight_map"];
    assert_eq!(
        map["model.embed_tokens.weight"],
        "model-00001-of-00002.safetensors"
    );
    assert_eq!(
        map["model.layers.0.mlp.up_proj.weight"],
        "model-00001-of-00002.safetensors"
    );
    assert_eq!(map["model.norm.weight"], "model-00002-of-00002.safetensors");
    assert_eq!(map["lm_head.weight"], "model-00002-of-00002.safetensors");

    // Each shard is a plain safetensors file with bf16 data and transformers' format metadata.
    let bytes = std::fs::read(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(header_len % 8, 0);
    assert_eq!(
        meta.metadata().as_ref().unwrap().get("format").unwrap(),
        "pt"
    );
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("lm_head.weight").unwrap().dtype(),
        safetensors::Dtype::BF16
    );

    let loaded = load_weights(dir.path(), DType::F32, &Device::Cpu, |_| true).unwrap();
    assert_same(&loaded, &tensors);
}

#[test]
fn save_single_file_when_it_fits_and_removes_stale_shards() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = sample_tensors();
    save_sharded(dir.path(), &tensors, 100, DType::F16).unwrap();
    // A single tensor over the limit gets a shard of its own: 80 | 48 | 8+80=88.
    assert_eq!(files_in(dir.path()).len(), 4);
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();

    save_sharded(dir.path(), &tensors, parse_size("1MB").unwrap(), DType::F32).unwrap();
    // Old shards and index are gone (a loader would otherwise see two checkpoints); other files
    // stay; no temp files are left behind.
    assert_eq!(files_in(dir.path()), ["config.json", SINGLE_FILE]);
    let loaded = load_weights(dir.path(), DType::F32, &Device::Cpu, |_| true).unwrap();
    assert_same(&loaded, &tensors);
    assert!(loaded.values().all(|t| t.dtype() == DType::F32));
}

#[test]
fn save_rejects_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = sample_tensors();
    assert!(save_sharded(dir.path(), &tensors, 0, DType::F32).is_err());
    assert!(save_sharded(dir.path(), &[], 100, DType::F32).is_err());
    tensors.push(tensors[0].clone());
    let msg = save_sharded(dir.path(), &tensors, 1000, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("model.embed_tokens.weight"), "{msg}");
    assert!(files_in(dir.path()).is_empty());
}
