//! The generation worker: one thread owns the model(s) and runs every request. Queued
//! requests join the running batch as soon as there is room (up to `max_batch`), and each
//! round advances every sequence of the batch by one token, so clients share the model
//! fairly and a long answer does not hold up a short one. Each sequence has its own KV
//! cache, sampler and stop criteria: nothing is shared between requests but the weights.
//! A sequence whose client went away (its event receiver was dropped) is dropped at the
//! start of the next round.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};

use anyhow::{bail, Result};
use candle_core::Tensor;
use tokio::sync::mpsc::UnboundedSender;

use crate::infer::llava::{LlavaCache, LlavaParts};
use crate::infer::{
    CausalLm, Decoding, FinishReason, GenConfig, Sampler, StopCriteria, TextCodec, TextStream,
};
use crate::model::decoder::{Decoder, KvCache};

/// A model the server runs: a causal LM whose sequences may each carry an image.
pub trait ServedModel: CausalLm {
    /// The cache a new sequence starts from, holding the request's image (`pixels [3, S, S]`)
    /// when it sent one.
    fn sequence_cache(&self, image: Option<&Tensor>) -> Result<Self::Cache>;
}

impl ServedModel for Decoder {
    fn sequence_cache(&self, image: Option<&Tensor>) -> Result<KvCache> {
        if image.is_some() {
            bail!("this model takes no images");
        }
        Ok(self.new_cache())
    }
}

impl ServedModel for LlavaParts {
    fn sequence_cache(&self, image: Option<&Tensor>) -> Result<LlavaCache> {
        self.cache_with_image(image)
    }
}

/// One chat completion to run.
pub struct Job {
    /// Index into the worker's models (0: the served model, 1: the base model to compare).
    pub model: usize,
    /// The prompt, with [`crate::data::IMAGE_TOKEN_ID`] where the image goes when there is one.
    pub prompt: Vec<u32>,
    /// The request's preprocessed image `[3, S, S]`.
    pub image: Option<Tensor>,
    pub gen: GenConfig,
    /// Template stop words and the request's `stop`; EOS is always a stop.
    pub stop_words: Vec<String>,
    /// Where the answer goes; dropping the receiver cancels the job.
    pub events: UnboundedSender<Event>,
}

/// What a job reports, in order: text deltas, then one `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta(String),
    Done {
        finish_reason: FinishReason,
        completion_tokens: usize,
    },
    Failed(String),
}

/// Counters of the worker, for logs and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub started: AtomicUsize,
    pub finished: AtomicUsize,
    pub cancelled: AtomicUsize,
    pub failed: AtomicUsize,
    /// Tokens sampled, over all sequences.
    pub tokens: AtomicUsize,
    /// Sequences running now.
    pub active: AtomicUsize,
    /// The largest batch run so far.
    pub peak_batch: AtomicUsize,
}

/// A plain copy of `Stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub started: usize,
    pub finished: usize,
    pub cancelled: usize,
    pub failed: usize,
    pub tokens: usize,
    pub active: usize,
    pub peak_batch: usize,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicUsize| a.load(Ordering::SeqCst);
        StatsSnapshot {
            started: get(&self.started),
            finished: get(&self.finished),
            cancelled: get(&self.cancelled),
            failed: get(&self.failed),
            tokens: get(&self.tokens),
            active: get(&self.active),
            peak_batch: get(&self.peak_batch),
        }
    }
}

/// A running sequence of the batch.
struct Sequence<'a, M: CausalLm> {
    model: usize,
    cache: M::Cache,
    sampler: Sampler,
    decoding: Decoding<'a>,
    /// The text shown so far (a character split over tokens is held until complete).
    display: TextStream<'a>,
    events: UnboundedSender<Event>,
}

/// What one round did to a sequence.
enum Outcome {
    Running,
    Finished,
    /// The client is gone.
    Cancelled,
}

/// Run jobs until every sender of `jobs` is dropped. `models` are indexed by `Job::model`.
pub fn run<M: ServedModel>(
    models: &[M],
    codec: &dyn TextCodec,
    jobs: Receiver<Job>,
    max_batch: usize,
    stats: &Stats,
) {
    let mut batch: Vec<Sequence<'_, M>> = Vec::new();
    let mut open = true;
    while open || !batch.is_empty() {
        // Admit queued jobs: wait for one when idle, take what is there when busy.
        while open && batch.len() < max_batch.max(1) {
            let job = if batch.is_empty() {
                jobs.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                jobs.try_recv()
            };
            match job {
                Ok(job) => {
                    if let Some(seq) = start(models, codec, job, stats) {
                        batch.push(seq);
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        stats.active.store(batch.len(), Ordering::SeqCst);
        stats.peak_batch.fetch_max(batch.len(), Ordering::SeqCst);
        // Feed every sequence's last token, one batched forward per model.
        let failed = feed_round(models, &mut batch);
        // One token for every sequence; finished and cancelled ones leave the batch.
        for (i, mut seq) in std::mem::take(&mut batch).into_iter().enumerate() {
            if let Some(e) = &failed[i] {
                stats.failed.fetch_add(1, Ordering::SeqCst);
                let _ = seq.events.send(Event::Failed(e.clone()));
                continue;
            }
            match advance(&mut seq, stats) {
                Ok(Outcome::Running) => batch.push(seq),
                Ok(Outcome::Finished) => {
                    let events = seq.events.clone();
                    if let Err(e) = finish(seq, stats) {
                        stats.failed.fetch_add(1, Ordering::SeqCst);
                        let _ = events.send(Event::Failed(format!("{e:#}")));
                    }
                }
                Ok(Outcome::Cancelled) => {
                    stats.cancelled.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    stats.failed.fetch_add(1, Ordering::SeqCst);
                    let _ = seq.events.send(Event::Failed(format!("{e:#}")));
                }
            }
        }
        stats.active.store(batch.len(), Ordering::SeqCst);
    }
}

/// Prefill a job's prompt; None when its client is already gone or it failed (reported).
fn start<'a, M: ServedModel>(
    models: &[M],
    codec: &'a dyn TextCodec,
    job: Job,
    stats: &Stats,
) -> Option<Sequence<'a, M>> {
    if job.events.is_closed() {
        stats.cancelled.fetch_add(1, Ordering::SeqCst);
        return None;
    }
    stats.started.fetch_add(1, Ordering::SeqCst);
    let prepared = (|| -> Result<Sequence<'a, M>> {
        let model = models
            .get(job.model)
            .ok_or_else(|| anyhow::anyhow!("no model with index {}", job.model))?;
        let sampler = Sampler::new(&job.gen)?;
        let stop = StopCriteria::for_chat(codec, &job.stop_words);
        let mut cache = model.sequence_cache(job.image.as_ref())?;
        let decoding = Decoding::new(
            model,
            &mut cache,
            &[],
            &job.prompt,
            stop,
            job.gen.max_new_tokens,
        )?;
        Ok(Sequence {
            model: job.model,
            cache,
            sampler,
            decoding,
            display: TextStream::new(codec, false),
            events: job.events.clone(),
        })
    })();
    match prepared {
        Ok(seq) => Some(seq),
        Err(e) => {
            stats.failed.fetch_add(1, Ordering::SeqCst);
            let _ = job.events.send(Event::Failed(format!("{e:#}")));
            None
        }
    }
}

/// Feeds the pending token of every live sequence: the sequences of one model share one
/// [`CausalLm::forward_infer_batch`] (their matmuls run as one batch). Returns, per sequence, the
/// error that ended it, if any.
fn feed_round<M: CausalLm>(models: &[M], batch: &mut [Sequence<'_, M>]) -> Vec<Option<String>> {
    let mut failed = vec![None; batch.len()];
    for (mi, model) in models.iter().enumerate() {
        let mut fed: Vec<(usize, [u32; 1])> = Vec::new();
        for (i, seq) in batch.iter_mut().enumerate() {
            if seq.model == mi && !seq.events.is_closed() {
                if let Some(id) = seq.decoding.take_feed() {
                    fed.push((i, [id]));
                }
            }
        }
        if fed.is_empty() {
            continue;
        }
        let result = {
            let mut next = fed.iter().peekable();
            let mut items: Vec<(&[u32], &mut M::Cache)> = Vec::with_capacity(fed.len());
            for (i, seq) in batch.iter_mut().enumerate() {
                if let Some((_, token)) = next.next_if(|(j, _)| *j == i) {
                    items.push((&token[..], &mut seq.cache));
                }
            }
            model.forward_infer_batch(&mut items)
        };
        match result {
            Ok(logits) => {
                for ((i, _), l) in fed.iter().zip(logits) {
                    if let Err(e) = batch[*i].decoding.set_logits(l) {
                        failed[*i] = Some(format!("{e:#}"));
                    }
                }
            }
            Err(e) => {
                for (i, _) in &fed {
                    failed[*i] = Some(format!("{e:#}"));
                }
            }
        }
    }
    failed
}

/// Sample one token of `seq` (its pending token already fed) and send the text it released.
fn advance<M: CausalLm>(seq: &mut Sequence<'_, M>, stats: &Stats) -> Result<Outcome> {
    if seq.events.is_closed() {
        return Ok(Outcome::Cancelled);
    }
    let finished = seq.decoding.sample_next(&mut seq.sampler)?;
    stats.tokens.fetch_add(1, Ordering::SeqCst);
    let mut delta = String::new();
    while let Some(id) = seq.decoding.next_token() {
        delta += &seq.display.push(id)?;
    }
    if !delta.is_empty() && seq.events.send(Event::Delta(delta)).is_err() {
        return Ok(Outcome::Cancelled);
    }
    Ok(match finished {
        Some(_) => Outcome::Finished,
        None => Outcome::Running,
    })
}

/// Send the end of the answer the display still held, then `Done` (counted first, so a
/// client that has its answer sees it in the counters).
fn finish<M: CausalLm>(mut seq: Sequence<'_, M>, stats: &Stats) -> Result<()> {
    let generation = seq.decoding.into_generation(false)?;
    let text = generation.text.unwrap_or_default();
    // What the answer has beyond the text shown: a split character completed at the end,
    // or text in the same token as a stop string's start.
    let tail = match text.strip_prefix(seq.display.text()) {
        Some(rest) => rest.to_string(),
        None => seq.display.finish()?,
    };
    if !tail.is_empty() {
        let _ = seq.events.send(Event::Delta(tail));
    }
    stats.finished.fetch_add(1, Ordering::SeqCst);
    let _ = seq.events.send(Event::Done {
        finish_reason: generation.finish_reason,
        completion_tokens: generation.ids.len(),
    });
    Ok(())
}
