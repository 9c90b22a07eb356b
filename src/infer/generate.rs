//! Token-by-token generation over a `CausalLm` with its KV cache: only tokens the cache does
//! not hold yet are fed, so a conversation costs one prefill per turn.

use anyhow::{bail, Result};

use super::sampling::{GenConfig, Sampler};
use super::stream::{TextCodec, TextStream};
use super::CausalLm;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was sampled or a stop string appeared in the text.
    Stop,
    /// `max_new_tokens` tokens were sampled.
    Length,
    /// The `on_token` callback returned false.
    Cancelled,
}

/// The result of one `generate` call.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Every sampled token in order, including a stop token and the tokens that spelled a stop
    /// string (the conversation history holds them, as XTuner's chat does). The cache holds
    /// all of them but the last: it was sampled, never fed.
    pub ids: Vec<u32>,
    /// How many of `ids` (a prefix) were handed to `on_token`.
    pub emitted: usize,
    /// The answer's text without the stop token or stop string and what follows it; `None`
    /// when the stop criteria carry no tokenizer.
    pub text: Option<String>,
    pub finish_reason: FinishReason,
}

/// When to stop: stop token ids, and stop strings matched on the decoded text.
pub struct StopCriteria<'a> {
    stop_ids: Vec<u32>,
    stop_strings: Vec<String>,
    codec: Option<&'a dyn TextCodec>,
}

impl<'a> StopCriteria<'a> {
    /// Stop on any of these token ids only.
    pub fn ids(stop_ids: impl IntoIterator<Item = u32>) -> StopCriteria<'a> {
        StopCriteria {
            stop_ids: stop_ids.into_iter().collect(),
            stop_strings: Vec::new(),
            codec: None,
        }
    }

    /// Stop on these ids or when the decoded answer contains one of `stop_strings` (empty
    /// strings are ignored). The codec also fills `Generation::text`.
    pub fn with_strings(
        stop_ids: impl IntoIterator<Item = u32>,
        stop_strings: impl IntoIterator<Item = String>,
        codec: &'a dyn TextCodec,
    ) -> StopCriteria<'a> {
        let mut stop_strings: Vec<String> =
            stop_strings.into_iter().filter(|s| !s.is_empty()).collect();
        stop_strings.dedup();
        StopCriteria {
            stop_ids: stop_ids.into_iter().collect(),
            stop_strings,
            codec: Some(codec),
        }
    }

    /// What a chat needs: the tokenizer's EOS, every stop word that is a single token as an
    /// id, and every stop word as a string (a model may spell a special token piecewise).
    pub fn for_chat(codec: &'a dyn TextCodec, stop_words: &[String]) -> StopCriteria<'a> {
        let mut ids: Vec<u32> = codec.eos_id().into_iter().collect();
        for word in stop_words {
            if let Some(id) = codec.token_to_id(word) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        StopCriteria::with_strings(ids, stop_words.iter().cloned(), codec)
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn stop_strings(&self) -> &[String] {
        &self.stop_strings
    }

    /// The earliest match of a stop string in `text[from..]`, as a byte offset into `text`.
    fn find_stop(&self, text: &str, from: usize) -> Option<usize> {
        let tail = text.get(from..)?;
        self.stop_strings
            .iter()
            .filter_map(|s| tail.find(s.as_str()))
            .min()
            .map(|pos| from + pos)
    }

    /// The earliest offset from which the rest of `text` is a proper prefix of a stop string
    /// (text there may still become a stop string); `text.len()` when there is none.
    fn hold_from(&self, text: &str) -> usize {
        let longest = self.stop_strings.iter().map(String::len).max().unwrap_or(0);
        let first = text.len().saturating_sub(longest);
        (first..text.len())
            .filter(|&p| text.is_char_boundary(p))
            .find(|&p| {
                let rest = &text[p..];
                self.stop_strings
                    .iter()
                    .any(|s| s.len() > rest.len() && s.starts_with(rest))
            })
            .unwrap_or(text.len())
    }
}

/// Feed `new_ids`, then sample until a stop, `cfg.max_new_tokens`, or cancellation.
/// `on_token` receives each token once it is known not to belong to a stop token or stop
/// string (tokens that might start a stop string are held back until that is settled) and
/// returns false to cancel.
pub fn generate<M: CausalLm>(
    model: &M,
    cache: &mut M::Cache,
    new_ids: &[u32],
    cfg: &GenConfig,
    stop: &StopCriteria,
    on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Generation> {
    let mut sampler = Sampler::new(cfg)?;
    generate_with_sampler(model, cache, &mut sampler, &[], new_ids, stop, on_token)
}

/// `generate` with a caller-owned sampler (so one seeded RNG runs through a whole chat) and
/// the tokens the cache already holds (`history`: the repetition penalty reads them, as
/// transformers penalises every token of its input).
pub fn generate_with_sampler<M: CausalLm>(
    model: &M,
    cache: &mut M::Cache,
    sampler: &mut Sampler,
    history: &[u32],
    new_ids: &[u32],
    stop: &StopCriteria,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Generation> {
    if new_ids.is_empty() {
        bail!("generate needs at least one new token to feed (the prompt is empty)");
    }
    let max_new_tokens = sampler.config().max_new_tokens;
    let mut logits = forward(model, new_ids, cache)?; // [vocab]
    let mut context: Vec<u32> = history.iter().chain(new_ids).copied().collect();
    let mut stream = stop.codec.map(|c| TextStream::new(c, false));
    // text_end[i]: length of the stream's text once token i was pushed.
    let mut text_end: Vec<usize> = Vec::new();
    // Tokens whose text the stream has fully decoded (a split character is pending after).
    let mut decoded = 0usize;
    // Text before this offset cannot be part of a stop string.
    let mut hold_from = 0usize;
    let mut ids: Vec<u32> = Vec::new();
    let mut emitted = 0usize;
    let mut stop_text_at: Option<usize> = None;

    let finish_reason = loop {
        // Only reached with max_new_tokens = 0; later steps check before feeding.
        if ids.len() == max_new_tokens {
            break FinishReason::Length;
        }
        let id = sampler.sample(&logits, &context)?;
        ids.push(id);
        context.push(id);
        if stop.stop_ids.contains(&id) {
            break FinishReason::Stop;
        }
        let releasable = match stream.as_mut() {
            None => ids.len(),
            Some(stream) => {
                if !stream.push(id)?.is_empty() {
                    decoded = ids.len();
                }
                text_end.push(stream.text().len());
                if let Some(at) = stop.find_stop(stream.text(), hold_from) {
                    stop_text_at = Some(at);
                    break FinishReason::Stop;
                }
                hold_from = stop.hold_from(stream.text());
                (emitted..decoded)
                    .take_while(|&i| text_end[i] <= hold_from)
                    .last()
                    .map_or(emitted, |i| i + 1)
            }
        };
        if !emit(&ids, &mut emitted, releasable, &mut on_token)? {
            break FinishReason::Cancelled;
        }
        // The last token is never fed: nothing would read its logits.
        if ids.len() == max_new_tokens {
            break FinishReason::Length;
        }
        logits = forward(model, &[id], cache)?;
    };

    let mut finish_reason = finish_reason;
    let text = match stream.as_mut() {
        None => None,
        Some(stream) => match stop_text_at {
            Some(at) => Some(stream.text()[..at].to_string()),
            None => {
                stream.finish()?;
                Some(stream.text().to_string())
            }
        },
    };
    // Without a stop string, the tokens held back as a possible stop string's start are
    // part of the answer after all.
    if stop_text_at.is_none() && finish_reason != FinishReason::Cancelled {
        let answer_len = ids.len() - usize::from(finish_reason == FinishReason::Stop);
        if !emit(&ids, &mut emitted, answer_len, &mut on_token)? {
            finish_reason = FinishReason::Cancelled;
        }
    }
    Ok(Generation {
        ids,
        emitted,
        text,
        finish_reason,
    })
}

/// One forward step, checking the logits' length against the model's vocabulary.
fn forward<M: CausalLm>(model: &M, ids: &[u32], cache: &mut M::Cache) -> Result<Vec<f32>> {
    let logits = model.forward_infer(ids, cache)?; // [vocab]
    if logits.len() != model.vocab_size() {
        bail!(
            "the model returned {} logits, its vocab_size is {}",
            logits.len(),
            model.vocab_size()
        );
    }
    Ok(logits)
}

/// Hand `ids[*emitted..upto]` to the callback; false when it cancelled.
fn emit(
    ids: &[u32],
    emitted: &mut usize,
    upto: usize,
    on_token: &mut impl FnMut(u32) -> Result<bool>,
) -> Result<bool> {
    while *emitted < upto {
        let id = ids[*emitted];
        *emitted += 1;
        if !on_token(id)? {
            return Ok(false);
        }
    }
    Ok(true)
}
