//! The CLIP vision tower and image preprocessing of LLaVA against transformers' CLIPVisionModel and
//! CLIPImageProcessor (fixtures from scripts/fixtures/make_clip_fixtures.py).

use candle_core::{DType, Device, Tensor};
use ftrun::data::image::ClipPreprocess;
use ftrun::model::vision::{ClipVision, ClipVisionConfig};
use ftrun::model::weights::LazyCheckpoint;
use std::path::{Path, PathBuf};

const CPU: Device = Device::Cpu;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip")
}

fn expected(name: &str) -> Tensor {
    let mut all =
        candle_core::safetensors::load(fixtures().join("expected.safetensors"), &CPU).unwrap();
    all.remove(name).unwrap_or_else(|| panic!("fixture {name}"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn tower(select: i64) -> ClipVision {
    let dir = fixtures().join("model");
    let cfg = ClipVisionConfig::from_dir(&dir).unwrap();
    let mut w = LazyCheckpoint::open(&dir).unwrap();
    ClipVision::new(&cfg, &mut w, select, DType::F32, &CPU).unwrap()
}

#[test]
fn features_match_transformers_hidden_states_minus_2_without_cls() {
    let t = tower(-2);
    for name in ["landscape", "portrait"] {
        let px = expected(&format!("{name}.pixel_values"))
            .unsqueeze(0)
            .unwrap(); // [1, 3, 28, 28]
        let got = t.forward(&px).unwrap().squeeze(0).unwrap();
        let want = expected(&format!("{name}.features"));
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-4, "{name}: features differ by {d}");
    }
    // Batched: the same two images at once give the same rows.
    let both = Tensor::stack(
        &[
            expected("landscape.pixel_values"),
            expected("portrait.pixel_values"),
        ],
        0,
    )
    .unwrap();
    let out = t.forward(&both).unwrap();
    assert!(max_abs_diff(&out.get(1).unwrap(), &expected("portrait.features")) < 1e-4);
}

#[test]
fn preprocessing_matches_clip_image_processor_within_a_grey_level() {
    let pre = ClipPreprocess::clip(28, false);
    for name in ["landscape", "portrait"] {
        let got = pre
            .load(&fixtures().join(format!("{name}.png")), &CPU)
            .unwrap();
        let want = expected(&format!("{name}.pixel_values"));
        // Bicubic resampling differs from PIL's in rounding: allow 3 grey levels (/ std ~0.26).
        let d = max_abs_diff(&got, &want);
        assert!(d < 3.0 / 255.0 / 0.26, "{name}: pixels differ by {d}");
        let mean = (&got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(mean < 0.01, "{name}: mean pixel difference {mean}");
    }
}

#[test]
fn pad_to_square_centres_the_image_on_the_mean_colour_and_bad_inputs_are_named() {
    let pre = ClipPreprocess::clip(28, true);
    // A 10x4 white image padded to 10x10: the top and bottom rows are the mean colour, which
    // normalizes to ~0.
    let img = image::RgbImage::from_pixel(10, 4, image::Rgb([255, 255, 255]));
    let px = pre.apply(&img, &CPU).unwrap(); // [3, 28, 28]
    let top = px
        .narrow(1, 0, 4)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(top < 0.02, "padding is not the mean colour: {top}");
    let mid = px
        .narrow(1, 14, 1)
        .unwrap()
        .min_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(mid > 1.5, "the white image is not in the middle: {mid}");

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("broken.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let err = format!("{:#}", pre.load(&bad, &CPU).unwrap_err());
    assert!(err.contains("broken.png"), "{err}");
    let err = format!(
        "{:#}",
        pre.load(&tmp.path().join("missing.jpg"), &CPU).unwrap_err()
    );
    assert!(err.contains("missing.jpg"), "{err}");
    // A select layer beyond the tower is refused.
    let dir = fixtures().join("model");
    let cfg = ClipVisionConfig::from_dir(&dir).unwrap();
    let mut w = LazyCheckpoint::open(&dir).unwrap();
    let err = ClipVision::new(&cfg, &mut w, -9, DType::F32, &CPU)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("visual_select_layer -9"), "{err}");
}
