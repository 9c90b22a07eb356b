//! `ftrun chat`: a terminal chat with streamed tokens, or one answer with `--prompt`.

use anyhow::Result;

use super::ChatArgs;
use crate::data::template::Template;
use crate::infer::load::load_for_inference_bits;
use crate::infer::{answer_once, run_repl, ChatFormat, ChatOptions, ChatSession, GenConfig};

pub fn run(a: ChatArgs) -> Result<()> {
    let format = match a.template.as_deref() {
        Some("plain") | None => None,
        Some(name) => Some(ChatFormat::from(&Template::by_name(name)?)),
    };
    let greedy = a.greedy || a.temperature == 0.0;
    let options = ChatOptions {
        system: a.system.clone(),
        stop_words: a.stop_words.clone(),
        max_context: None,
        gen: GenConfig {
            max_new_tokens: a.max_new_tokens,
            temperature: if greedy { 0.0 } else { a.temperature as f32 },
            top_p: a.top_p as f32,
            top_k: a.top_k,
            repetition_penalty: a.repetition_penalty as f32,
            seed: Some(a.seed),
            do_sample: !greedy,
        },
    };
    let (model, tokenizer) =
        load_for_inference_bits(&a.model, a.adapter.as_deref(), &a.device, a.bits)?;
    let options = ChatOptions {
        max_context: Some(model.config().max_position_embeddings),
        ..options
    };
    let mut session = ChatSession::new(&model, &tokenizer, format, options)?;
    let (mut out, mut log) = (std::io::stdout(), std::io::stderr());
    match a.prompt {
        Some(p) => answer_once(&mut session, &p, &mut out, &mut log).map(|_| ()),
        None => run_repl(
            &mut session,
            &mut std::io::stdin().lock(),
            &mut out,
            &mut log,
        ),
    }
}
