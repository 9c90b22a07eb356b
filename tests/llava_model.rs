//! The whole LLaVA model (CLIP tower with LoRA -> projector -> spliced into the decoder with LoRA)
//! against finite differences in f64, and the batch layout of loaded samples.

mod engine_common;
mod train_support;

use candle_core::{DType, Device, Tensor};
use engine_common::{flat, randn};
use ftrun::data::llava::LlavaItem;
use ftrun::data::pack::PackedSeq;
use ftrun::data::{IGNORE_INDEX, IMAGE_TOKEN_ID};
use ftrun::model::decoder::{Decoder, LoraSpec, TrainMode};
use ftrun::model::llava::{init_projector, make_llava_batch, LlavaBatch, LlavaModel};
use ftrun::model::tiny_clip::{make_tiny_clip, TinyClipSpec};
use ftrun::model::vision::{ClipVision, ClipVisionConfig};
use ftrun::model::weights::load_weights;
use ftrun::model::ModelConfig;

const CPU: Device = Device::Cpu;

/// One sample: `prompt` untrained tokens (an image placeholder at `image_at` if given), then
/// `answer` trained ones.
fn item(prompt: usize, answer: usize, image_at: Option<usize>, seed: u64) -> LlavaItem {
    let n = prompt + answer;
    let mut ids: Vec<u32> = (0..n as u32)
        .map(|i| (i * 7 + seed as u32) % 50 + 3)
        .collect();
    if let Some(p) = image_at {
        ids[p] = IMAGE_TOKEN_ID;
    }
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i < prompt { IGNORE_INDEX } else { t as i32 })
        .collect();
    LlavaItem {
        seq: PackedSeq {
            input_ids: ids,
            labels,
            position_ids: (0..n as u32).collect(),
            cu_seqlens: vec![0, n as u32],
        },
        pixels: image_at.map(|_| randn(&[3, 28, 28], 1.0, seed).to_dtype(DType::F32).unwrap()),
    }
}

#[test]
fn placeholders_expand_to_image_rows() {
    let items = [
        item(5, 4, Some(2), 1),
        item(3, 3, None, 2),
        item(4, 2, Some(1), 3),
    ];
    let b = make_llava_batch(&items, 4).unwrap();
    // 9 + 3 extra, 6, 6 + 3 extra
    assert_eq!(b.batch.input_ids.len(), 27);
    assert_eq!(b.batch.cu_seqlens, [0, 12, 18, 27]);
    assert_eq!(b.image_starts, [2, 19]);
    assert_eq!(b.pixels.as_ref().unwrap().dims(), [2, 3, 28, 28]);
    assert!(!b.batch.input_ids.contains(&IMAGE_TOKEN_ID));
    for &s in &b.image_starts {
        assert!(b.batch.labels[s..s + 4].iter().all(|&l| l == IGNORE_INDEX));
    }
    // Text after the image keeps its labels, shifted by the extra rows.
    assert_eq!(b.batch.labels[8..12], items[0].seq.labels[5..9]);
    assert_eq!(
        b.batch.position_ids[..14],
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 1]
    );
    // An image without a placeholder (or the reverse) is a data bug, not silently dropped.
    let mut bad = item(3, 3, Some(1), 4);
    bad.pixels = None;
    let err = make_llava_batch(&[bad], 4).unwrap_err().to_string();
    assert!(err.contains("no image"), "{err}");
    let mut bad = item(3, 3, None, 4);
    bad.pixels = Some(Tensor::zeros((3, 28, 28), DType::F32, &CPU).unwrap());
    let err = make_llava_batch(&[bad], 4).unwrap_err().to_string();
    assert!(err.contains("no `<image>`"), "{err}");
}

fn lora(dropout: f64) -> LoraSpec {
    LoraSpec {
        r: 2,
        alpha: 4.0,
        dropout,
        targets: vec![],
    }
}

/// A f64 LLaVA model: the demo LLM and a tiny tower, both with LoRA (dropout 0.1), every
/// trainable set to small random values (B = 0 would hide the A gradients).
fn model(root: &std::path::Path) -> (LlavaModel, Vec<Tensor>) {
    let s = train_support::setup(root, 2);
    let cfg = ModelConfig::from_dir(&s.model).unwrap();
    let mut w = load_weights(&s.model, DType::F64, &CPU, |_| true).unwrap();
    let dec = Decoder::new(
        &cfg,
        &mut w,
        TrainMode::Lora(lora(0.1)),
        DType::F64,
        &CPU,
        1,
    )
    .unwrap();
    let clip = root.join("clip");
    let spec = TinyClipSpec {
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 2,
        num_heads: 2,
        image_size: 28,
        patch_size: 14,
    };
    make_tiny_clip(&clip, &spec, 4).unwrap();
    let vcfg = ClipVisionConfig::from_dir(&clip).unwrap();
    let mut vw = load_weights(&clip, DType::F64, &CPU, |_| true).unwrap();
    let vision =
        ClipVision::new_with_lora(&vcfg, &mut vw, -1, Some(&lora(0.1)), DType::F64, &CPU, 2)
            .unwrap();
    let proj = init_projector(16, cfg.hidden_size, 3, DType::F64, &CPU).unwrap();
    let mut m = LlavaModel::new(dec, vision, proj).unwrap();
    let values: Vec<Tensor> = m
        .trainable()
        .iter()
        .enumerate()
        .map(|(i, t)| randn(&t.shape, 0.05, 500 + i as u64))
        .collect();
    m.set_trainable(&values).unwrap();
    (m, values)
}

fn loss(m: &LlavaModel, b: &LlavaBatch) -> f64 {
    let mut g = m.new_grads();
    m.forward_backward(b, 1.0, &mut g, 9, false)
        .unwrap()
        .loss_sum
}

#[test]
fn gradients_of_every_part_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut m, values) = model(tmp.path());
    let names: Vec<String> = m.trainable().iter().map(|t| t.name.clone()).collect();
    let n_dec = m.decoder.trainable().len();
    assert_eq!(names[n_dec], "projector.model.0.weight");
    assert_eq!(names[n_dec + 3], "projector.model.2.bias");
    assert!(names[n_dec + 4].starts_with("vision_model.encoder.layers.0.self_attn.q_proj.lora_A"));
    assert_eq!(names.len(), n_dec + 4 + 2 * 6 * 2);

    let items = [
        item(6, 5, Some(3), 1),
        item(4, 4, None, 2),
        item(5, 3, Some(0), 3),
    ];
    let b = make_llava_batch(&items, m.image_tokens()).unwrap();
    let mut grads = m.new_grads();
    let stats = m.forward_backward(&b, 1.0, &mut grads, 9, true).unwrap();
    assert_eq!(stats.n_trained, 5 + 4 + 3); // every answer token; rows open with prompt tokens
    let flat_grad = flat(&grads.into_flat().unwrap());
    let numel: usize = m
        .trainable()
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    assert_eq!(flat_grad.len(), numel);

    // Coordinates in a decoder adapter, every projector tensor, and vision adapters of both
    // layers (A and B).
    let pick = |name_part: &str| names.iter().position(|n| n.contains(name_part)).unwrap();
    let slots = [
        pick("layers.0.self_attn.q_proj.lora_A"),
        pick("layers.3.mlp.down_proj.lora_B"),
        n_dec,
        n_dec + 1,
        n_dec + 2,
        n_dec + 3,
        pick("vision_model.encoder.layers.0.self_attn.k_proj.lora_A"),
        pick("vision_model.encoder.layers.1.mlp.fc2.lora_B"),
        pick("vision_model.encoder.layers.1.self_attn.out_proj.lora_A"),
    ];
    let offsets: Vec<usize> = m
        .trainable()
        .iter()
        .scan(0, |o, t| {
            let here = *o;
            *o += t.shape.iter().product::<usize>();
            Some(here)
        })
        .collect();
    for slot in slots {
        let n = values[slot].elem_count();
        for idx in [0, n / 2, n - 1] {
            let h = 1e-5;
            let mut at = |delta: f64| {
                let mut vs = values.clone();
                let mut v = flat(&vs[slot]);
                v[idx] += delta;
                vs[slot] = Tensor::from_vec(v, vs[slot].dims(), &CPU).unwrap();
                m.set_trainable(&vs).unwrap();
                loss(&m, &b)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let got = flat_grad[offsets[slot] + idx];
            assert!(
                (fd - got).abs() <= 1e-6 * (1.0 + fd.abs()),
                "{}[{idx}]: analytic {got} vs finite difference {fd}",
                names[slot]
            );
        }
    }
}

#[test]
fn a_text_only_batch_trains_the_decoder_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, _) = model(tmp.path());
    let b = make_llava_batch(&[item(4, 4, None, 2)], m.image_tokens()).unwrap();
    assert!(b.pixels.is_none());
    let mut g = m.new_grads();
    m.forward_backward(&b, 1.0, &mut g, 1, false).unwrap();
    assert!(g.decoder.slots().iter().all(Option::is_some));
    assert!(g.projector.slots().iter().all(Option::is_none));
    assert!(g.vision.slots().iter().all(Option::is_none));
}
