//! Record + template -> token ids and labels, equal to XTuner 0.2.0's `template_map_fn` followed
//! by `encode_fn` (with `input_ids_with_output=True`) and its filters.
//!
//! Per turn, every piece tokenized with special tokens off:
//! `BOS` (first turn, and after a turn that ended with EOS; not trained),
//! `[SYSTEM] INSTRUCTION` (not trained), `output + SUFFIX` (trained unless the turn's loss is
//! off), `EOS` (only when the suffix does not act as EOS; trained with the output), `SEP` (not
//! trained). The whole sample is then cut to max_length. Pretraining text gets BOS (not trained)
//! + the text, all trained, no EOS, and no template (XTuner's `pretrain_map_fn` configs).

use super::{Encoded, Record, Turn, IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_ID};
use crate::data::template::Template;
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use std::fmt;

/// Why a record yields no training sample (XTuner filters these out too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// No conversation turn: no assistant answer, or alpaca's `<nooutput>`.
    Empty,
    /// Nothing left to train on: every answer has `loss: false`, or truncation to max_length
    /// cut all of the answers away.
    NoTrainedTokens,
}

impl DropReason {
    /// A stable key for reports (`dropped` counts).
    pub fn key(self) -> &'static str {
        match self {
            DropReason::Empty => "empty",
            DropReason::NoTrainedTokens => "no_trained_tokens",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::Empty => "no conversation turn (no answer, or alpaca `<nooutput>`)",
            DropReason::NoTrainedTokens => {
                "no trained token (all answers masked, or cut away by max_length)"
            }
        })
    }
}

/// Encode one record. `Ok(Err(reason))` is a record XTuner would drop; `Err` is a real error
/// (tokenizer failure, a template that needs an EOS the tokenizer lacks, two images in a turn).
/// `default_system` goes on the first turn of a record none of whose turns has a system prompt.
pub fn encode(
    record: &Record,
    t: &Template,
    tok: &Tokenizer,
    max_length: usize,
    default_system: Option<&str>,
) -> Result<Result<Encoded, DropReason>> {
    let mut enc = match record {
        Record::Text(text) => encode_text(text, tok)?,
        Record::Chat { turns, .. } if turns.is_empty() => return Ok(Err(DropReason::Empty)),
        Record::Chat { turns, image } => {
            encode_turns(turns, image.is_some(), t, tok, default_system)?
        }
    };
    enc.input_ids.truncate(max_length);
    enc.labels.truncate(max_length);
    if enc.trained() == 0 {
        return Ok(Err(DropReason::NoTrainedTokens));
    }
    Ok(Ok(enc))
}

/// Tokens the template adds to a one-turn conversation with empty input and answer (BOS,
/// instruction, suffix or EOS, separator): a max_length at or below this trains nothing.
/// A tokenizer that cannot encode the template reports 0 here; `encode` reports its error.
pub fn template_overhead(t: &Template, tok: &Tokenizer) -> usize {
    let turn = [Turn {
        loss: true,
        ..Turn::default()
    }];
    encode_turns(&turn, false, t, tok, None)
        .map(|e| e.input_ids.len())
        .unwrap_or(0)
}

/// XTuner's `get_bos_eos_token_ids`: Qwen tokenizers have no BOS (their config says
/// `bos_token: null`, which the tokenizer loader reads as none), the others use theirs.
fn bos_ids(tok: &Tokenizer) -> Vec<u32> {
    tok.bos_id().into_iter().collect()
}

fn encode_text(text: &str, tok: &Tokenizer) -> Result<Encoded> {
    let mut enc = Encoded::default();
    push(&mut enc, &bos_ids(tok), false);
    push(&mut enc, &tok.encode(text.trim(), false)?, true);
    Ok(enc)
}

fn encode_turns(
    turns: &[Turn],
    with_image: bool,
    t: &Template,
    tok: &Tokenizer,
    default_system: Option<&str>,
) -> Result<Encoded> {
    let bos = bos_ids(tok);
    let has_system = turns
        .iter()
        .any(|turn| turn.system.as_deref().is_some_and(|s| !s.is_empty()));
    let mut enc = Encoded::default();
    let mut needs_bos = true;
    for (i, turn) in turns.iter().enumerate() {
        let system = match turn.system.as_deref() {
            Some(s) if !s.is_empty() => Some(s),
            _ if i == 0 && !has_system => default_system,
            _ => None,
        };
        let input = t.render_input(&turn.input, system, i + 1);
        if needs_bos {
            push(&mut enc, &bos, false);
        }
        let input_ids = if with_image {
            encode_with_image(&input, tok)?
        } else {
            tok.encode(&input, false)?
        };
        push(&mut enc, &input_ids, false);
        push(
            &mut enc,
            &tok.encode(&t.render_output(&turn.output), false)?,
            turn.loss,
        );
        needs_bos = !t.suffix_as_eos;
        if !t.suffix_as_eos {
            let Some(eos) = tok.eos_id() else {
                bail!(
                    "tokenizer {} has no EOS token; a template without an end-of-answer suffix \
                     (llama2_chat, plain) needs one after each answer",
                    tok.source.display()
                );
            };
            push(&mut enc, &[eos], turn.loss);
        }
        if !t.sep.is_empty() {
            push(&mut enc, &tok.encode(&t.sep, false)?, false);
        }
    }
    Ok(enc)
}

/// The text around one `<image>`, tokenized apart, with IMAGE_TOKEN_ID where the image goes.
fn encode_with_image(input: &str, tok: &Tokenizer) -> Result<Vec<u32>> {
    let chunks: Vec<&str> = input.split(IMAGE_TOKEN).collect();
    if chunks.len() > 2 {
        bail!(
            "a turn holds {} `{IMAGE_TOKEN}` markers; only one image per turn is supported",
            chunks.len() - 1
        );
    }
    let mut ids = Vec::new();
    for (k, chunk) in chunks.iter().enumerate() {
        if k > 0 {
            ids.push(IMAGE_TOKEN_ID);
        }
        ids.extend(tok.encode(chunk, false)?);
    }
    Ok(ids)
}

/// Append `ids`, trained (labels = ids) or not (IGNORE_INDEX).
fn push(enc: &mut Encoded, ids: &[u32], trained: bool) {
    enc.input_ids.extend_from_slice(ids);
    if trained {
        enc.labels.extend(ids.iter().map(|&id| id as i32));
    } else {
        enc.labels
            .extend(std::iter::repeat_n(IGNORE_INDEX, ids.len()));
    }
}
