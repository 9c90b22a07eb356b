//! ChatSession and the REPL: XTuner's multi-turn prompt layout, KV-cache reuse, UTF-8-safe
//! streaming, EXIT / RESET, plain mode.

mod infer_support;

use std::io::{Cursor, Write};

use ftrun::infer::{
    answer_once, run_repl, ChatFormat, ChatOptions, ChatSession, FinishReason, GenConfig, TextCodec,
};
use infer_support::{ByteCodec, ScriptLm, IM_END};

fn internlm2_chat() -> ChatFormat {
    ChatFormat {
        system: "<|im_start|>system\n{system}<|im_end|>\n".into(),
        instruction: "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n".into(),
        suffix: "<|im_end|>".into(),
        sep: "\n".into(),
        stop_words: vec!["<|im_end|>".into()],
    }
}

fn options(system: Option<&str>) -> ChatOptions {
    ChatOptions {
        system: system.map(String::from),
        gen: GenConfig::greedy(64),
        ..ChatOptions::default()
    }
}

/// An answer of the script model: its bytes then `<|im_end|>`.
fn answer(text: &str) -> Vec<u32> {
    let mut ids = ByteCodec::bytes(text);
    ids.push(IM_END);
    ids
}

/// A writer that keeps each write separately.
#[derive(Default)]
struct Chunks(Vec<Vec<u8>>);
impl Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn multi_turn_history_matches_xtuner_and_the_cache_is_fed_only_new_tokens() {
    let codec = ByteCodec::new();
    let model = ScriptLm::new(codec.vocab_size(), &[answer("A1"), answer("B2")].concat());
    let mut session =
        ChatSession::new(&model, &codec, Some(internlm2_chat()), options(Some("SYS"))).unwrap();
    let (mut out, mut log) = (Vec::new(), Vec::new());
    let first = session.ask("hi", &mut out, &mut log).unwrap();
    assert_eq!(first.text, "A1");
    assert_eq!(first.finish_reason, FinishReason::Stop);
    let second = session.ask("q2", &mut out, &mut log).unwrap();
    assert_eq!(second.text, "B2");
    assert_eq!(String::from_utf8(out).unwrap(), "A1\nB2\n");

    // SYSTEM on the first turn only; the previous answer with its stop token, then SEP.
    let history = codec.decode(session.history(), false).unwrap();
    assert_eq!(
        history,
        "<s><|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
         <|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n\
         <|im_start|>assistant\nB2"
    );
    let calls = model.calls();
    // Turn 1: prefill, 'A', '1'. Turn 2: the unfed <|im_end|> + SEP + prompt, 'B', '2'.
    assert_eq!(calls.len(), 6);
    assert_eq!(calls[3][0], IM_END);
    assert_eq!(
        codec.decode(&calls[3], false).unwrap(),
        "<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n"
    );
    // Every token went to the model exactly once.
    assert_eq!(calls.concat(), session.history());
}

#[test]
fn streaming_never_writes_half_a_character() {
    let codec = ByteCodec::new();
    let model = ScriptLm::new(codec.vocab_size(), &answer("你好, ok é"));
    let mut session =
        ChatSession::new(&model, &codec, Some(internlm2_chat()), options(None)).unwrap();
    let mut out = Chunks::default();
    let reply = session.ask("hi", &mut out, &mut Vec::new()).unwrap();
    assert_eq!(reply.text, "你好, ok é");
    let mut all = String::new();
    for chunk in &out.0 {
        let piece = std::str::from_utf8(chunk).expect("each write is whole UTF-8");
        assert!(!piece.contains('\u{FFFD}'));
        all += piece;
    }
    assert_eq!(all, "你好, ok é\n");
    // Streamed, not written at once: one write per complete character at least.
    assert!(out.0.len() >= 8, "{} writes", out.0.len());
}

#[test]
fn a_stop_word_spelled_over_several_tokens_is_not_printed() {
    let codec = ByteCodec::with_pieces(&["!<|"]);
    let mut script = ByteCodec::bytes("ok");
    script.push(codec.piece("!<|"));
    script.extend(ByteCodec::bytes("im_end|>junk"));
    let model = ScriptLm::new(codec.vocab_size(), &script);
    let mut session =
        ChatSession::new(&model, &codec, Some(internlm2_chat()), options(None)).unwrap();
    let mut out = Vec::new();
    let reply = session.ask("hi", &mut out, &mut Vec::new()).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "ok!\n");
    assert_eq!(reply.text, "ok!");
    assert_eq!(reply.finish_reason, FinishReason::Stop);
}

#[test]
fn repl_handles_exit_reset_and_empty_lines() {
    let codec = ByteCodec::new();
    let mut script = [answer("A"), answer("B")].concat();
    script.extend(answer("C"));
    let model = ScriptLm::new(codec.vocab_size(), &script);
    let mut session =
        ChatSession::new(&model, &codec, Some(internlm2_chat()), options(Some("SYS"))).unwrap();
    let mut input = Cursor::new("hi\n\n   \nRESET\nhello\nEXIT\nafter\n");
    let (mut out, mut log) = (Vec::new(), Vec::new());
    run_repl(&mut session, &mut input, &mut out, &mut log).unwrap();
    let log = String::from_utf8(log).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "A\nB\n");
    assert!(
        log.contains("Log: History responses have been removed!"),
        "{log}"
    );
    assert!(log.ends_with("Log: Exit!\n"), "{log}");
    assert!(!log.contains("Warning"), "{log}");
    // After RESET the conversation starts over: BOS and SYSTEM again, only "hello" in it.
    assert_eq!(session.round(), 1);
    assert_eq!(
        codec.decode(session.history(), false).unwrap(),
        "<s><|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n\
         <|im_start|>assistant\nB"
    );
    // Two answers, so "after" (past EXIT) and the empty lines never reached the model.
    assert_eq!(model.calls().len(), 4);
}

#[test]
fn repl_ends_at_end_of_input() {
    let codec = ByteCodec::new();
    let model = ScriptLm::new(codec.vocab_size(), &answer("A"));
    let mut session =
        ChatSession::new(&model, &codec, Some(internlm2_chat()), options(None)).unwrap();
    let (mut out, mut log) = (Vec::new(), Vec::new());
    run_repl(&mut session, &mut Cursor::new("hi"), &mut out, &mut log).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "A\n");
}

#[test]
fn without_a_template_the_text_is_continued_and_a_warning_is_printed() {
    let codec = ByteCodec::new();
    let model = ScriptLm::new(
        codec.vocab_size(),
        &[ByteCodec::bytes(" world"), vec![infer_support::EOS]].concat(),
    );
    let mut session = ChatSession::new(&model, &codec, None, options(Some("ignored"))).unwrap();
    let (mut out, mut log) = (Vec::new(), Vec::new());
    let reply = answer_once(&mut session, "hello", &mut out, &mut log).unwrap();
    assert_eq!(reply.text, " world");
    assert!(String::from_utf8(log)
        .unwrap()
        .contains("will just continue your text"));
    assert_eq!(codec.decode(&model.calls()[0], false).unwrap(), "<s>hello");
}

#[test]
fn a_turn_that_would_overflow_the_context_drops_the_history() {
    let codec = ByteCodec::new();
    let model = ScriptLm::new(codec.vocab_size(), &[answer("A"), answer("B")].concat());
    let opts = ChatOptions {
        max_context: Some(80),
        gen: GenConfig::greedy(20),
        ..options(Some("SYS"))
    };
    let mut session = ChatSession::new(&model, &codec, Some(internlm2_chat()), opts).unwrap();
    let (mut out, mut log) = (Vec::new(), Vec::new());
    session.ask("hi", &mut out, &mut log).unwrap();
    // Turn 1 fills 36 tokens; turn 2 adds 32 and may generate 20: 88 > 80.
    session.ask("hello again", &mut out, &mut log).unwrap();
    let log = String::from_utf8(log).unwrap();
    assert!(
        log.contains("history removed") && log.contains("88") && log.contains("80"),
        "{log}"
    );
    assert!(codec
        .decode(session.history(), false)
        .unwrap()
        .starts_with("<s><|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nhello again"));
}

#[test]
fn zero_max_new_tokens_is_rejected() {
    let codec = ByteCodec::new();
    let model = ScriptLm::new(codec.vocab_size(), &[]);
    let opts = ChatOptions {
        gen: GenConfig::greedy(0),
        ..ChatOptions::default()
    };
    let err = ChatSession::new(&model, &codec, None, opts).err().unwrap();
    assert!(err.to_string().contains("max_new_tokens = 0"), "{err}");
}
