//! The LLaVA data pipeline on generated PNGs: encoding with the image placeholder, text-only
//! records mixed in, the cache with its images, loading pixels, and the errors that name the
//! record (file:line) for missing, unreadable and misplaced images.

mod train_support;

use ftrun::config::Config;
use ftrun::data::image::ClipPreprocess;
use ftrun::data::llava::build_llava_dataset;
use ftrun::data::{IGNORE_INDEX, IMAGE_TOKEN_ID};
use std::path::Path;

fn png(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 9) as u8, (y * 5) as u8, 77]))
        .save(path)
        .unwrap();
}

fn write_lines(path: &Path, records: &[serde_json::Value]) {
    let lines: Vec<String> = records.iter().map(|r| r.to_string()).collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn rec(image: Option<&str>, human: &str) -> serde_json::Value {
    let mut r = serde_json::json!({"conversations": [
        {"from": "human", "value": human},
        {"from": "gpt", "value": "a picture of a gradient"},
    ]});
    if let Some(i) = image {
        r["image"] = serde_json::json!(i);
    }
    r
}

/// The demo config pointed at `data` (format llava, unpacked) with images under `images`.
fn config(s: &train_support::Setup, data: &Path, images: &Path) -> Config {
    train_support::config(
        s,
        &[
            &format!(
                "data.files=[{{path=\"{}\", format=\"llava\"}}]",
                data.display()
            ),
            &format!("data.image_folder=\"{}\"", images.display()),
            "data.pack=false",
        ],
    )
}

#[test]
fn records_encode_with_one_placeholder_and_images_load() {
    let tmp = tempfile::tempdir().unwrap();
    let s = train_support::setup(tmp.path(), 1);
    let images = tmp.path().join("images");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    png(&images.join("sub/a.png"), 40, 24);
    let data = tmp.path().join("llava.jsonl");
    write_lines(
        &data,
        &[
            rec(Some("sub/a.png"), "<image>\n你是谁"),
            rec(None, "介绍一下你自己"),
            rec(Some("sub/a.png"), "no marker here"),
        ],
    );
    let cfg = config(&s, &data, &images);
    let tok = ftrun::tokenizer::Tokenizer::from_path(&cfg.model.tokenizer_path()).unwrap();
    let work = tmp.path().join("work");
    let (ds, report, key) = build_llava_dataset(&cfg, &tok, &work, false).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.image_count(), 1);
    assert_eq!(
        report
            .dropped
            .get("images: record has `image` but no `<image>` in its text (image unused)"),
        Some(&1)
    );
    let first = ds.seq(0);
    let at: Vec<usize> = (0..first.len())
        .filter(|&i| first.input_ids[i] == IMAGE_TOKEN_ID)
        .collect();
    assert_eq!(at.len(), 1, "one placeholder");
    assert_eq!(first.labels[at[0]], IGNORE_INDEX);
    let img = ds.image(0).unwrap();
    assert_eq!(img.path, images.join("sub/a.png"));
    assert_eq!(img.record, format!("{}:1", data.display()));
    assert!(ds.image(1).is_none() && ds.image(2).is_none());
    assert!(!ds.seq(1).input_ids.contains(&IMAGE_TOKEN_ID));

    let pre = ClipPreprocess::clip(28, true);
    let item = ds.load(0, &pre).unwrap();
    assert_eq!(item.pixels.unwrap().dims(), [3, 28, 28]);
    assert!(ds.load(1, &pre).unwrap().pixels.is_none());

    // The cache (tokens and images) is reused.
    let (again, _, key2) = build_llava_dataset(&cfg, &tok, &work, false).unwrap();
    assert_eq!(key, key2);
    assert_eq!(again.image(0), ds.image(0));
    assert!(work
        .join("dataset_cache")
        .join(format!("pack-{key}.images.json"))
        .is_file());
}

#[test]
fn image_problems_name_the_record_and_are_listed_together() {
    let tmp = tempfile::tempdir().unwrap();
    let s = train_support::setup(tmp.path(), 1);
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    png(&images.join("ok.png"), 8, 8);
    std::fs::write(images.join("broken.png"), b"this is not a png").unwrap();
    let data = tmp.path().join("llava.jsonl");
    write_lines(
        &data,
        &[
            rec(Some("ok.png"), "<image>\nwhat is it"),
            rec(Some("missing.jpg"), "<image>\nwhat is it"),
            rec(Some("broken.png"), "what is it <image>"),
        ],
    );
    let cfg = config(&s, &data, &images);
    let tok = ftrun::tokenizer::Tokenizer::from_path(&cfg.model.tokenizer_path()).unwrap();
    let err = format!(
        "{:#}",
        build_llava_dataset(&cfg, &tok, &tmp.path().join("w"), false)
            .err()
            .unwrap()
    );
    assert!(err.contains("2 image(s) cannot be used"), "{err}");
    assert!(
        err.contains(&format!("{}:2: image file", data.display())) && err.contains("missing.jpg"),
        "{err}"
    );
    assert!(
        err.contains(&format!("{}:3: image", data.display()))
            && err.contains("broken.png")
            && err.contains("cannot be read"),
        "{err}"
    );
    // Nothing half-built is left to be reused.
    let cache = tmp.path().join("w/dataset_cache");
    let bins = std::fs::read_dir(&cache)
        .map(|d| {
            d.filter(|e| e.as_ref().unwrap().path().extension() == Some("bin".as_ref()))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(bins, 0);
}

#[test]
fn image_markers_are_checked_per_turn_and_per_record() {
    let tmp = tempfile::tempdir().unwrap();
    let s = train_support::setup(tmp.path(), 1);
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    png(&images.join("a.png"), 8, 8);
    let data = tmp.path().join("llava.jsonl");
    let two_turns = serde_json::json!({"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nfirst"},
        {"from": "gpt", "value": "one"},
        {"from": "human", "value": "<image>\nsecond"},
        {"from": "gpt", "value": "two"},
    ]});
    for (records, want) in [
        (
            vec![
                rec(Some("a.png"), "x"),
                rec(Some("a.png"), "<image> and <image>"),
            ],
            format!(
                "{}:2: conversations[0]: more than one `<image>` in one turn",
                data.display()
            ),
        ),
        (
            vec![two_turns],
            format!("{}:1: conversations[2]: a second `<image>`", data.display()),
        ),
        (
            vec![rec(None, "<image>\nwhere is it")],
            format!(
                "{}:1: conversations[0]: `<image>` in a record without `image`",
                data.display()
            ),
        ),
    ] {
        write_lines(&data, &records);
        let cfg = config(&s, &data, &images);
        let tok = ftrun::tokenizer::Tokenizer::from_path(&cfg.model.tokenizer_path()).unwrap();
        let err = format!(
            "{:#}",
            build_llava_dataset(&cfg, &tok, &tmp.path().join("w"), false)
                .err()
                .unwrap()
        );
        assert!(err.contains(&want), "{err}\n  wanted: {want}");
    }
}

#[test]
fn packing_is_refused_and_images_resolve_next_to_the_data_without_a_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let s = train_support::setup(tmp.path(), 1);
    png(&tmp.path().join("next.png"), 10, 30);
    let data = tmp.path().join("llava.jsonl");
    write_lines(&data, &[rec(Some("next.png"), "<image>\nhm")]);
    let mut cfg = config(&s, &data, tmp.path());
    cfg.data.image_folder = None;
    let tok = ftrun::tokenizer::Tokenizer::from_path(&cfg.model.tokenizer_path()).unwrap();
    let (ds, _, _) = build_llava_dataset(&cfg, &tok, &tmp.path().join("w"), false).unwrap();
    assert_eq!(ds.image(0).unwrap().path, tmp.path().join("next.png"));
    cfg.data.pack = true;
    let err = build_llava_dataset(&cfg, &tok, &tmp.path().join("w2"), false)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("data.pack = true") && err.contains("data.pack = false"),
        "{err}"
    );
}

#[test]
fn check_data_shows_images_and_names_a_missing_one() {
    let tmp = tempfile::tempdir().unwrap();
    let t = ftrun::model::tiny_clip::make_tiny_llava(&tmp.path().join("tiny"), 0).unwrap();
    let work = tmp.path().join("work");
    let args = |data: &Path| {
        vec![
            "check-data".to_string(),
            "tiny_llava_finetune".into(),
            "--work-dir".into(),
            work.display().to_string(),
            "-n".into(),
            "1".into(),
            "--set".into(),
            format!("model.path=\"{}\"", t.llm.display()),
            "--set".into(),
            format!("llava.vision_tower=\"{}\"", t.clip.display()),
            "--set".into(),
            format!("data.image_folder=\"{}\"", t.images.display()),
            "--set".into(),
            format!(
                "data.files=[{{path=\"{}\", format=\"llava\"}}]",
                data.display()
            ),
        ]
    };
    let run = |data: &Path| {
        let a = args(data);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        train_support::ftrun(&refs)
    };
    let (ok, out, err, _) = run(&t.finetune_data);
    assert!(ok, "{err}");
    assert!(
        out.contains("image: ") && out.contains("red_square.png"),
        "{out}"
    );
    assert!(out.contains("⟦") && out.contains("<image>"), "{out}");
    assert!(out.contains("images: 8 of 9 samples"), "{out}");

    // A record whose image is gone: the error names the data file's line and the path.
    let broken = tmp.path().join("broken.jsonl");
    let mut text = std::fs::read_to_string(&t.finetune_data).unwrap();
    text = text.replacen("blue_circle.png", "blue_hexagon.png", 1);
    std::fs::write(&broken, text).unwrap();
    let (ok, _, err, _) = run(&broken);
    assert!(!ok);
    assert!(
        err.contains(&format!("{}:6: image file", broken.display()))
            && err.contains("blue_hexagon.png"),
        "{err}"
    );
}

#[test]
fn an_image_that_fails_to_decode_later_names_its_record() {
    let tmp = tempfile::tempdir().unwrap();
    let s = train_support::setup(tmp.path(), 1);
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    png(&images.join("cut.png"), 64, 64);
    // Keep the header (so the up-front check passes) and cut the pixel data.
    let bytes = std::fs::read(images.join("cut.png")).unwrap();
    std::fs::write(images.join("cut.png"), &bytes[..60]).unwrap();
    let data = tmp.path().join("llava.jsonl");
    write_lines(&data, &[rec(Some("cut.png"), "<image>\nwhat")]);
    let cfg = config(&s, &data, &images);
    let tok = ftrun::tokenizer::Tokenizer::from_path(&cfg.model.tokenizer_path()).unwrap();
    let (ds, _, _) = build_llava_dataset(&cfg, &tok, &tmp.path().join("w"), false).unwrap();
    let err = format!(
        "{:#}",
        ds.load(0, &ClipPreprocess::clip(28, false)).unwrap_err()
    );
    assert!(
        err.contains(&format!("{}:1", data.display())) && err.contains("cut.png"),
        "{err}"
    );
}
