//! `ftrun chat`: a terminal chat with streamed tokens, or one answer with `--prompt`.

use anyhow::{Context, Result};
use std::path::Path;

use super::ChatArgs;
use crate::data::template::Template;
use crate::infer::llava::{LlavaChat, LlavaPaths};
use crate::infer::load::load_for_inference_bits;
use crate::infer::{
    answer_once, run_repl, CausalLm, ChatFormat, ChatOptions, ChatSession, GenConfig,
};

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
    if let Some(llava) = &a.llava {
        return run_llava(&a, llava, format, options);
    }
    let (model, tokenizer) =
        load_for_inference_bits(&a.model, a.adapter.as_deref(), &a.device, a.bits)?;
    let options = ChatOptions {
        max_context: Some(model.config().max_position_embeddings),
        ..options
    };
    let session = ChatSession::new(&model, &tokenizer, format, options)?;
    talk(session, a.prompt)
}

/// `--llava DIR --visual-encoder CLIP [--image PATH]`: the LLaVA model is model and codec.
fn run_llava(
    a: &ChatArgs,
    llava: &Path,
    format: Option<ChatFormat>,
    options: ChatOptions,
) -> Result<()> {
    let visual_encoder = a
        .visual_encoder
        .as_deref()
        .context("--llava needs --visual-encoder (the CLIP tower)")?;
    let paths = LlavaPaths {
        llm: &a.model,
        visual_encoder,
        llava,
        adapter: a.adapter.as_deref(),
    };
    let chat = LlavaChat::load(&paths, a.image.as_deref(), &a.device, a.bits)?;
    let format = format.map(|f| chat.chat_format(f));
    let options = ChatOptions {
        max_context: Some(chat.decoder.config().max_position_embeddings),
        ..options
    };
    let session = ChatSession::new(&chat, &chat, format, options)?;
    talk(session, a.prompt.clone())
}

/// One answer to `prompt`, or the interactive loop.
fn talk<M: CausalLm>(mut session: ChatSession<'_, M>, prompt: Option<String>) -> Result<()> {
    let (mut out, mut log) = (std::io::stdout(), std::io::stderr());
    match prompt {
        Some(p) => answer_once(&mut session, &p, &mut out, &mut log).map(|_| ()),
        None => run_repl(
            &mut session,
            &mut std::io::stdin().lock(),
            &mut out,
            &mut log,
        ),
    }
}
