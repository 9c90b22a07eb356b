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
#[derive(Clone)]
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
    let max_new_tokens = sampler.config().max_new_tokens;
    let mut decoding = Decoding::new(model, cache, history, new_ids, stop.clone(), max_new_tokens)?;
    loop {
        let finished = decoding.step(model, cache, sampler)?;
        while let Some(id) = decoding.next_token() {
            if !on_token(id)? {
                return decoding.into_generation(true);
            }
        }
        if finished.is_some() {
            return decoding.into_generation(false);
        }
    }
}

/// One generation advanced a token at a time by its caller, so that one thread can interleave
/// many of them (the server's batch): `step` samples the next token, `next_token` hands out
/// the tokens known not to belong to a stop token or stop string, `into_generation` ends it.
/// The sampler and the cache stay with the caller; pass the same ones to every step.
pub struct Decoding<'a> {
    stop: StopCriteria<'a>,
    max_new_tokens: usize,
    /// The next-token logits (`[vocab]`), once `pending` has been fed.
    logits: Vec<f32>,
    /// The last sampled token, not fed yet: the next step feeds it (the last token of a
    /// generation is never fed: nothing would read its logits).
    pending: Option<u32>,
    /// History, prompt and the sampled tokens (the repetition penalty reads them).
    context: Vec<u32>,
    stream: Option<TextStream<'a>>,
    /// text_end[i]: length of the stream's text once token i was pushed.
    text_end: Vec<usize>,
    /// Tokens whose text the stream has fully decoded (a split character is pending after).
    decoded: usize,
    /// Text before this offset cannot be part of a stop string.
    hold_from: usize,
    ids: Vec<u32>,
    /// `ids[..releasable]` may be handed out; `ids[..emitted]` have been.
    releasable: usize,
    emitted: usize,
    stop_text_at: Option<usize>,
    finished: Option<FinishReason>,
}

impl<'a> Decoding<'a> {
    /// Feed `new_ids` (the prefill) after the `history` the cache already holds.
    pub fn new<M: CausalLm>(
        model: &M,
        cache: &mut M::Cache,
        history: &[u32],
        new_ids: &[u32],
        stop: StopCriteria<'a>,
        max_new_tokens: usize,
    ) -> Result<Decoding<'a>> {
        if new_ids.is_empty() {
            bail!("generate needs at least one new token to feed (the prompt is empty)");
        }
        let logits = forward(model, new_ids, cache)?; // [vocab]
        let stream = stop.codec.map(|c| TextStream::new(c, false));
        Ok(Decoding {
            stop,
            max_new_tokens,
            logits,
            pending: None,
            context: history.iter().chain(new_ids).copied().collect(),
            stream,
            text_end: Vec::new(),
            decoded: 0,
            hold_from: 0,
            ids: Vec::new(),
            releasable: 0,
            emitted: 0,
            stop_text_at: None,
            finished: None,
        })
    }

    /// Sample one token (feeding the previous one first). Returns the finish reason once a
    /// stop or `max_new_tokens` ends the generation; later calls return it again.
    pub fn step<M: CausalLm>(
        &mut self,
        model: &M,
        cache: &mut M::Cache,
        sampler: &mut Sampler,
    ) -> Result<Option<FinishReason>> {
        if self.finished.is_some() {
            return Ok(self.finished);
        }
        if let Some(id) = self.pending.take() {
            self.logits = forward(model, &[id], cache)?;
        }
        self.sample_next(sampler)
    }

    /// The token this generation must feed before it samples again, taken (None when nothing is
    /// pending or it has finished). A caller that feeds many generations in one batched forward
    /// takes each one's token, runs the model, hands the logits back with
    /// [`Decoding::set_logits`], then calls [`Decoding::sample_next`].
    pub fn take_feed(&mut self) -> Option<u32> {
        if self.finished.is_some() {
            return None;
        }
        self.pending.take()
    }

    /// The logits (`[vocab]`) of the token [`Decoding::take_feed`] returned.
    pub fn set_logits(&mut self, logits: Vec<f32>) -> Result<()> {
        if logits.len() != self.logits.len() {
            bail!(
                "{} logits given, the model's vocabulary has {}",
                logits.len(),
                self.logits.len()
            );
        }
        self.logits = logits;
        Ok(())
    }

    /// [`Decoding::step`] once the pending token has been fed (or there was none).
    pub fn sample_next(&mut self, sampler: &mut Sampler) -> Result<Option<FinishReason>> {
        if self.finished.is_some() {
            return Ok(self.finished);
        }
        if self.pending.is_some() {
            bail!("sample_next: the pending token was not fed (take_feed, then set_logits)");
        }
        // Only reached with max_new_tokens = 0; later steps check after sampling.
        if self.ids.len() == self.max_new_tokens {
            return Ok(self.finish(FinishReason::Length));
        }
        let id = sampler.sample(&self.logits, &self.context)?;
        self.ids.push(id);
        self.context.push(id);
        if self.stop.stop_ids.contains(&id) {
            return Ok(self.finish(FinishReason::Stop));
        }
        match self.stream.as_mut() {
            None => self.releasable = self.ids.len(),
            Some(stream) => {
                if !stream.push(id)?.is_empty() {
                    self.decoded = self.ids.len();
                }
                self.text_end.push(stream.text().len());
                if let Some(at) = self.stop.find_stop(stream.text(), self.hold_from) {
                    self.stop_text_at = Some(at);
                    return Ok(self.finish(FinishReason::Stop));
                }
                self.hold_from = self.stop.hold_from(stream.text());
                let (text_end, hold_from) = (&self.text_end, self.hold_from);
                self.releasable = (self.releasable..self.decoded)
                    .take_while(|&i| text_end[i] <= hold_from)
                    .last()
                    .map_or(self.releasable, |i| i + 1);
            }
        }
        if self.ids.len() == self.max_new_tokens {
            return Ok(self.finish(FinishReason::Length));
        }
        self.pending = Some(id);
        Ok(None)
    }

    fn finish(&mut self, reason: FinishReason) -> Option<FinishReason> {
        // Without a stop string, the tokens held back as a possible stop string's start are
        // part of the answer after all (a stop token is not).
        if self.stop_text_at.is_none() {
            self.releasable = self.ids.len() - usize::from(reason == FinishReason::Stop);
        }
        self.finished = Some(reason);
        self.finished
    }

    /// The next token that may be shown, once; None until a later step releases more.
    pub fn next_token(&mut self) -> Option<u32> {
        let id = *self.ids[..self.releasable].get(self.emitted)?;
        self.emitted += 1;
        Some(id)
    }

    /// Every token sampled so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// End the generation: `cancelled` when the caller stopped it (before its finish, or
    /// while handing out its last tokens).
    pub fn into_generation(mut self, cancelled: bool) -> Result<Generation> {
        let finish_reason = match (cancelled, self.finished) {
            (false, Some(reason)) => reason,
            (false, None) => bail!("into_generation called before the generation finished"),
            (true, _) => FinishReason::Cancelled,
        };
        let text = match self.stream.as_mut() {
            None => None,
            Some(stream) => match self.stop_text_at {
                Some(at) => Some(stream.text()[..at].to_string()),
                None => {
                    stream.finish()?;
                    Some(stream.text().to_string())
                }
            },
        };
        Ok(Generation {
            ids: self.ids,
            emitted: self.emitted,
            text,
            finish_reason,
        })
    }
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
