//! generate(): greedy/seeded sampling over toy models, stop tokens, stop strings, length,
//! cancellation, and feeding only new tokens.

mod infer_support;

use ftrun::infer::{generate, CausalLm, FinishReason, GenConfig, StopCriteria};
use infer_support::{BigramLm, ByteCodec, ScriptLm, EOS, IM_END};

#[test]
fn greedy_follows_the_argmax_of_each_step() {
    let model = BigramLm::pseudo_random(32, 1);
    let mut cache = model.new_cache();
    let cfg = GenConfig::greedy(12);
    let gen = generate(
        &model,
        &mut cache,
        &[3, 5],
        &cfg,
        &StopCriteria::ids([]),
        |_| Ok(true),
    )
    .unwrap();
    // Walk the table by hand.
    let mut expected = Vec::new();
    let mut last = 5usize;
    for _ in 0..12 {
        let row = &model.table[last];
        let best = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        expected.push(best as u32);
        last = best;
    }
    assert_eq!(gen.ids, expected);
    assert_eq!(gen.finish_reason, FinishReason::Length);
    assert_eq!(gen.emitted, 12);
    assert_eq!(gen.text, None);
}

#[test]
fn a_seed_reproduces_a_sampled_generation_and_top_k_one_is_greedy() {
    let model = BigramLm::pseudo_random(64, 2);
    let run = |cfg: &GenConfig| {
        let mut cache = model.new_cache();
        generate(
            &model,
            &mut cache,
            &[1],
            cfg,
            &StopCriteria::ids([]),
            |_| Ok(true),
        )
        .unwrap()
        .ids
    };
    let sampled = |seed, top_k| GenConfig {
        max_new_tokens: 30,
        temperature: 1.0,
        top_p: 1.0,
        top_k,
        repetition_penalty: 1.0,
        seed: Some(seed),
        do_sample: true,
    };
    assert_eq!(run(&sampled(9, 0)), run(&sampled(9, 0)));
    assert_ne!(run(&sampled(9, 0)), run(&sampled(10, 0)));
    assert_eq!(run(&sampled(9, 1)), run(&GenConfig::greedy(30)));
}

#[test]
fn the_cache_is_fed_the_prompt_once_then_one_token_per_step() {
    let model = BigramLm::pseudo_random(16, 3);
    let mut cache = model.new_cache();
    let gen = generate(
        &model,
        &mut cache,
        &[1, 2, 3],
        &GenConfig::greedy(4),
        &StopCriteria::ids([]),
        |_| Ok(true),
    )
    .unwrap();
    let calls = model.calls.borrow().clone();
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[0], vec![1, 2, 3]);
    // Each sampled token but the last is fed back.
    for (call, id) in calls[1..].iter().zip(&gen.ids) {
        assert_eq!(call, &vec![*id]);
    }
    assert_eq!(BigramLm::cache_len(&cache), 3 + 3);
}

#[test]
fn a_stop_token_ends_generation_and_is_not_emitted() {
    let model = ScriptLm::new(300, &[7, 8, EOS, 9]);
    let mut cache = model.new_cache();
    let mut emitted = Vec::new();
    let gen = generate(
        &model,
        &mut cache,
        &[1],
        &GenConfig::greedy(10),
        &StopCriteria::ids([EOS]),
        |id| {
            emitted.push(id);
            Ok(true)
        },
    )
    .unwrap();
    assert_eq!(gen.ids, vec![7, 8, EOS]);
    assert_eq!(emitted, vec![7, 8]);
    assert_eq!(gen.emitted, 2);
    assert_eq!(gen.finish_reason, FinishReason::Stop);
    // The stop token was never fed.
    assert_eq!(cache, vec![1, 7, 8]);
}

#[test]
fn a_stop_string_spanning_tokens_stops_and_is_held_back() {
    let codec = ByteCodec::new();
    let mut script = ByteCodec::bytes("ok<|im_end|>more");
    script.push(EOS);
    let model = ScriptLm::new(codec.vocab_size(), &script);
    let mut cache = model.new_cache();
    let stop = StopCriteria::with_strings([EOS], ["<|im_end|>".to_string()], &codec);
    let mut emitted = Vec::new();
    let gen = generate(
        &model,
        &mut cache,
        &[1],
        &GenConfig::greedy(50),
        &stop,
        |id| {
            emitted.push(id);
            Ok(true)
        },
    )
    .unwrap();
    assert_eq!(gen.finish_reason, FinishReason::Stop);
    assert_eq!(emitted, ByteCodec::bytes("ok"));
    assert_eq!(gen.text.as_deref(), Some("ok"));
    // The history keeps every sampled token, the stop string's included; nothing after it.
    assert_eq!(gen.ids, ByteCodec::bytes("ok<|im_end|>"));
    assert_eq!(model.calls().len(), "ok<|im_end|>".len());
}

#[test]
fn text_in_the_same_token_as_a_stop_string_start_stays_in_the_answer() {
    // "!<|" is one token: it is held (it may start "<|im_end|>"), then dropped from the
    // emitted tokens, but its "!" is part of the text.
    let codec = ByteCodec::with_pieces(&["!<|"]);
    let mut script = ByteCodec::bytes("ok");
    script.push(codec.piece("!<|"));
    script.extend(ByteCodec::bytes("im_end|>"));
    let model = ScriptLm::new(codec.vocab_size(), &script);
    let mut cache = model.new_cache();
    let stop = StopCriteria::with_strings([], ["<|im_end|>".to_string()], &codec);
    let mut emitted = Vec::new();
    let gen = generate(
        &model,
        &mut cache,
        &[1],
        &GenConfig::greedy(50),
        &stop,
        |id| {
            emitted.push(id);
            Ok(true)
        },
    )
    .unwrap();
    assert_eq!(emitted, ByteCodec::bytes("ok"));
    assert_eq!(gen.text.as_deref(), Some("ok!"));
    assert_eq!(gen.finish_reason, FinishReason::Stop);
}

#[test]
fn a_held_prefix_that_never_completes_is_emitted_at_the_end() {
    let codec = ByteCodec::new();
    let model = ScriptLm::new(codec.vocab_size(), &ByteCodec::bytes("a<|im"));
    let mut cache = model.new_cache();
    let stop = StopCriteria::with_strings([EOS], ["<|im_end|>".to_string()], &codec);
    let mut emitted_during = Vec::new();
    let gen = generate(
        &model,
        &mut cache,
        &[1],
        &GenConfig::greedy(5),
        &stop,
        |id| {
            emitted_during.push(id);
            Ok(true)
        },
    )
    .unwrap();
    assert_eq!(gen.finish_reason, FinishReason::Length);
    assert_eq!(emitted_during, ByteCodec::bytes("a<|im"));
    assert_eq!(gen.text.as_deref(), Some("a<|im"));
}

#[test]
fn stop_ids_from_chat_stop_words_catch_single_token_stop_words() {
    let codec = ByteCodec::new();
    let stop = StopCriteria::for_chat(&codec, &["<|im_end|>".to_string(), "###".to_string()]);
    assert_eq!(stop.stop_ids(), &[EOS, IM_END]);
    assert_eq!(
        stop.stop_strings(),
        &["<|im_end|>".to_string(), "###".to_string()]
    );
    let model = ScriptLm::new(codec.vocab_size(), &[b'h' as u32, IM_END, b'x' as u32]);
    let mut cache = model.new_cache();
    let gen = generate(
        &model,
        &mut cache,
        &[1],
        &GenConfig::greedy(10),
        &stop,
        |_| Ok(true),
    )
    .unwrap();
    assert_eq!(gen.ids, vec![b'h' as u32, IM_END]);
    assert_eq!(gen.text.as_deref(), Some("h"));
    assert_eq!(gen.finish_reason, FinishReason::Stop);
}

#[test]
fn max_new_tokens_ends_with_length_and_cancel_with_cancelled() {
    let model = ScriptLm::new(300, &[5; 20]);
    let mut cache = model.new_cache();
    let gen = generate(
        &model,
        &mut cache,
        &[1],
        &GenConfig::greedy(6),
        &StopCriteria::ids([EOS]),
        |_| Ok(true),
    )
    .unwrap();
    assert_eq!(gen.ids, vec![5; 6]);
    assert_eq!(gen.finish_reason, FinishReason::Length);

    let mut cache = model.new_cache();
    let mut seen = Vec::new();
    let gen = generate(
        &model,
        &mut cache,
        &[1],
        &GenConfig::greedy(10),
        &StopCriteria::ids([EOS]),
        |id| {
            seen.push(id);
            Ok(seen.len() < 3)
        },
    )
    .unwrap();
    assert_eq!(gen.finish_reason, FinishReason::Cancelled);
    assert_eq!(gen.ids.len(), 3);
    assert_eq!(seen.len(), 3);
}

#[test]
fn an_empty_prompt_is_an_error() {
    let model = ScriptLm::new(300, &[]);
    let mut cache = model.new_cache();
    let err = generate(
        &model,
        &mut cache,
        &[],
        &GenConfig::greedy(3),
        &StopCriteria::ids([]),
        |_| Ok(true),
    )
    .unwrap_err();
    assert!(err.to_string().contains("prompt is empty"), "{err}");
}
