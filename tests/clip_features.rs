//! `ftrun clip-features` (what scripts/check_clip_gpu.py runs on the GPU) against transformers'
//! CLIPVisionModel and CLIPImageProcessor on the tiny CLIP fixture (tests/fixtures/clip, from
//! scripts/fixtures/make_clip_fixtures.py).

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip")
}

fn expected(name: &str) -> Tensor {
    let mut all =
        candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    all.remove(name).unwrap_or_else(|| panic!("fixture {name}"))
}

/// Runs `ftrun clip-features` on the fixture tower with `args`; the output's tensors, or stderr.
fn clip_features(out: &Path, args: &[&str]) -> Result<HashMap<String, Tensor>, String> {
    let model = fixtures().join("model");
    let o = Command::new(env!("CARGO_BIN_EXE_ftrun"))
        .args([
            "clip-features",
            "--visual-encoder",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "-o",
            out.to_str().unwrap(),
        ])
        .args(args)
        .output()
        .expect("run ftrun");
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into());
    }
    Ok(candle_core::safetensors::load(out, &Device::Cpu).unwrap())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn save_pixels(path: &Path, t: Tensor) {
    candle_core::safetensors::save(&HashMap::from([("pixel_values".to_string(), t)]), path)
        .unwrap();
}

#[test]
fn features_of_given_pixels_match_transformers_in_f32_and_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["landscape", "portrait"] {
        let px = tmp.path().join(format!("{name}_px.safetensors"));
        let want_px = expected(&format!("{name}.pixel_values")); // [3, 28, 28]
                                                                 // [1, 3, S, S] as transformers' processor returns it.
        save_pixels(&px, want_px.unsqueeze(0).unwrap());
        let out = tmp.path().join(format!("{name}.safetensors"));
        let got = clip_features(&out, &["--pixel-values", px.to_str().unwrap()]).unwrap();
        assert_eq!(max_abs_diff(&got["pixel_values"], &want_px), 0.0);
        let want = expected(&format!("{name}.features")); // [4, 32]
        let d = max_abs_diff(&got["features"], &want);
        assert!(d < 1e-4, "{name}: f32 features differ by {d}");

        let out = tmp.path().join(format!("{name}_bf16.safetensors"));
        let got = clip_features(
            &out,
            &["--pixel-values", px.to_str().unwrap(), "--dtype", "bf16"],
        )
        .unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = max_abs_diff(&got["features"], &want);
        assert!(
            d > 0.0 && d < 0.05 * scale,
            "{name}: bf16 features differ by {d} (scale {scale})"
        );
    }
}

#[test]
fn an_image_is_preprocessed_as_clip_image_processor_does() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("landscape.safetensors");
    let image = fixtures().join("landscape.png");
    let got = clip_features(&out, &["--image", image.to_str().unwrap()]).unwrap();
    // Bicubic rounding differs from PIL's by up to 3 grey levels (/ std ~0.26), as in
    // tests/clip_vision.rs.
    let d = max_abs_diff(&got["pixel_values"], &expected("landscape.pixel_values"));
    assert!(d < 3.0 / 255.0 / 0.26, "pixels differ by {d}");
    // Features of those pixels: close to transformers' (the pixels differ slightly).
    let want = expected("landscape.features");
    let d = max_abs_diff(&got["features"], &want);
    assert!(d < 0.05, "features differ by {d}");

    // Pad to square: the 20x36 portrait is centred between mean-colour columns (~0 once
    // normalized); unpadded, the crop fills the width with the image.
    let portrait = fixtures().join("portrait.png");
    let padded = clip_features(
        &tmp.path().join("padded.safetensors"),
        &["--image", portrait.to_str().unwrap(), "--pad-to-square"],
    )
    .unwrap();
    let plain = clip_features(
        &tmp.path().join("plain.safetensors"),
        &["--image", portrait.to_str().unwrap()],
    )
    .unwrap();
    let left_col = |t: &Tensor| -> f32 {
        let col = t.narrow(2, 0, 1).unwrap(); // [3, 28, 1]
        col.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(left_col(&padded["pixel_values"]) < 0.02);
    assert!(left_col(&plain["pixel_values"]) > 0.1);
}

#[test]
fn bad_inputs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    // Pixels of the wrong size for the tower.
    let px = tmp.path().join("px_wrong.safetensors");
    save_pixels(
        &px,
        Tensor::zeros((3, 30, 30), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let err = clip_features(&out, &["--pixel-values", px.to_str().unwrap()]).unwrap_err();
    assert!(
        err.contains("px_wrong.safetensors") && err.contains("[3, 30, 30]"),
        "{err}"
    );
    // A file without the tensor.
    let other = tmp.path().join("other.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([(
            "x".to_string(),
            Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap(),
        )]),
        &other,
    )
    .unwrap();
    let err = clip_features(&out, &["--pixel-values", other.to_str().unwrap()]).unwrap_err();
    assert!(
        err.contains("other.safetensors") && err.contains("pixel_values"),
        "{err}"
    );
    // A missing image, a bad dtype, neither input.
    let err = clip_features(&out, &["--image", "/nonexistent/cat.png"]).unwrap_err();
    assert!(err.contains("cat.png"), "{err}");
    let image = fixtures().join("landscape.png");
    let err =
        clip_features(&out, &["--image", image.to_str().unwrap(), "--dtype", "f8"]).unwrap_err();
    assert!(err.contains("--dtype `f8`"), "{err}");
    let err = clip_features(&out, &[]).unwrap_err();
    assert!(
        err.contains("--image") || err.contains("--pixel-values"),
        "{err}"
    );
    assert!(!out.exists());
}
