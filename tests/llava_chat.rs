//! Chat with an image: the inference prefill with the image rows spliced in agrees with the
//! training forward, the codec places the image once per conversation, and `ftrun chat --llava
//! --image` answers from an exported tiny LLaVA model.

mod engine_common;
mod train_support;

use candle_core::{DType, Device, Tensor, D};
use engine_common::randn;
use ftrun::data::{IGNORE_INDEX, IMAGE_TOKEN_ID};
use ftrun::infer::llava::LlavaChat;
use ftrun::infer::{CausalLm, ChatFormat, TextCodec};
use ftrun::model::decoder::{Batch, Decoder, TrainMode};
use ftrun::model::llava::spliced_forward_backward;
use ftrun::model::weights::load_weights;
use ftrun::model::ModelConfig;
use ftrun::tokenizer::Tokenizer;

const CPU: Device = Device::Cpu;

fn decoder(dir: &std::path::Path) -> Decoder {
    let cfg = ModelConfig::from_dir(dir).unwrap();
    let mut w = load_weights(dir, DType::F64, &CPU, |_| true).unwrap();
    Decoder::new(&cfg, &mut w, TrainMode::Frozen, DType::F64, &CPU, 0).unwrap()
}

#[test]
fn prefill_with_image_rows_matches_the_training_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let s = train_support::setup(tmp.path(), 1);
    let dec = decoder(&s.model);
    let hidden = dec.config().hidden_size;
    let (n_img, p) = (4, 3); // image rows, placeholder position
    let rows = randn(&[n_img, hidden], 1.0, 7);
    let prompt: Vec<u32> = vec![1, 20, 31, IMAGE_TOKEN_ID, 44, 52, 60];
    let target = 71u32;

    // Training: the expanded sequence with only the target trained.
    let mut ids: Vec<u32> = prompt[..p].to_vec();
    ids.extend(std::iter::repeat_n(0, n_img));
    ids.extend(&prompt[p + 1..]);
    ids.push(target);
    let mut labels = vec![IGNORE_INDEX; ids.len()];
    *labels.last_mut().unwrap() = target as i32;
    let batch = Batch::single(ids, labels);
    let mut g = dec.new_grads();
    let (stats, _) =
        spliced_forward_backward(&dec, &rows, &batch, &[p], 1.0, &mut g, 0, false).unwrap();
    assert_eq!(stats.n_trained, 1);

    // Inference: the prompt with its placeholder in one prefill, then the target's logit.
    let tok = Tokenizer::from_path(&s.model).unwrap();
    let chat = LlavaChat::new(decoder(&s.model), tok, Some(rows.clone()));
    let mut cache = chat.new_cache();
    let logits = chat.forward_infer(&prompt, &mut cache).unwrap();
    assert_eq!(
        <LlavaChat as CausalLm>::cache_len(&cache),
        prompt.len() - 1 + n_img
    );
    let l = Tensor::new(logits.as_slice(), &CPU)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let logp = candle_nn::ops::log_softmax(&l, D::Minus1)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let nll = -logp[target as usize];
    assert!(
        (nll - stats.loss_sum).abs() < 1e-5 * nll.abs().max(1.0),
        "inference {nll} vs training {}",
        stats.loss_sum
    );
}

#[test]
fn the_codec_places_the_image_once_per_conversation() {
    let tmp = tempfile::tempdir().unwrap();
    let s = train_support::setup(tmp.path(), 1);
    let tok = Tokenizer::from_path(&s.model).unwrap();
    let rows = Tensor::zeros((4, 128), DType::F64, &CPU).unwrap();
    let chat = LlavaChat::new(
        decoder(&s.model),
        Tokenizer::from_path(&s.model).unwrap(),
        Some(rows),
    );
    let format = chat.chat_format(ChatFormat {
        instruction: "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n".into(),
        ..ChatFormat::default()
    });
    let first = format.turn_prompt("你是谁", None, 0);
    assert!(
        first.starts_with("<|im_start|>user\n<image>\n你是谁"),
        "{first}"
    );
    let ids = chat.encode(&first, false).unwrap();
    // Chunks around the marker are tokenized apart, as the training data is.
    let (before, after) = first.split_once("<image>").unwrap();
    let mut want = tok.encode(before, false).unwrap();
    want.push(IMAGE_TOKEN_ID);
    want.extend(tok.encode(after, false).unwrap());
    assert_eq!(ids, want);
    // Later turns: the marker is dropped with its newline.
    let second = format.turn_prompt("你好", None, 1);
    assert_eq!(
        chat.encode(&second, false).unwrap(),
        tok.encode(
            "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
            false
        )
        .unwrap()
    );
    // A new conversation places the image again.
    let _ = chat.new_cache();
    assert!(chat
        .encode(&first, false)
        .unwrap()
        .contains(&IMAGE_TOKEN_ID));
    assert!(!chat.decode(&ids, false).unwrap().contains('\u{fffd}'));
}

#[test]
fn chat_answers_about_the_image_after_both_stages() {
    let tmp = tempfile::tempdir().unwrap();
    let t = ftrun::model::tiny_clip::make_tiny_llava(&tmp.path().join("tiny"), 0).unwrap();
    let sets = |data: &std::path::Path| {
        vec![
            format!("model.path=\"{}\"", t.llm.display()),
            format!("llava.vision_tower=\"{}\"", t.clip.display()),
            format!("data.image_folder=\"{}\"", t.images.display()),
            format!(
                "data.files=[{{path=\"{}\", format=\"llava\"}}]",
                data.display()
            ),
        ]
    };
    let load = |name: &str, extra: Vec<String>| {
        ftrun::config::load_str(ftrun::config::builtin::get(name).unwrap(), name, &extra).unwrap()
    };
    let pre = tmp.path().join("pre");
    let mut p = sets(&t.pretrain_data);
    p.push("train.max_steps=20".into());
    ftrun::train::trainer::run(
        &load("tiny_llava_pretrain", p),
        &pre,
        ftrun::train::trainer::Resume::No,
    )
    .unwrap();
    let mut f = sets(&t.finetune_data);
    f.push(format!("llava.pretrain_checkpoint=\"{}\"", pre.display()));
    f.push("train.max_steps=40".into());
    let fin = ftrun::train::trainer::run(
        &load("tiny_llava_finetune", f),
        &tmp.path().join("ft"),
        ftrun::train::trainer::Resume::No,
    )
    .unwrap();
    let export = tmp.path().join("export");
    ftrun::export::export_checkpoint(&fin.final_checkpoint.unwrap(), &export).unwrap();
    let ask = |image: &str| {
        let img = t.images.join(image);
        let args = [
            "chat",
            t.llm.to_str().unwrap(),
            "--llava",
            export.to_str().unwrap(),
            "--visual-encoder",
            t.clip.to_str().unwrap(),
            "--image",
            img.to_str().unwrap(),
            "--template",
            "internlm2_chat",
            "--prompt",
            "What colour is the shape?",
            "--greedy",
            "--max-new-tokens",
            "8",
            "--device",
            "cpu",
        ];
        let (ok, out, err, _) = train_support::ftrun(&args);
        assert!(ok, "{err}");
        out
    };
    let (red, blue) = (ask("red_square.png"), ask("blue_circle.png"));
    eprintln!("red: {red:?}\nblue: {blue:?}");
    assert!(red.contains("red"), "{red}");
    assert!(blue.contains("blue"), "{blue}");
}
