//! Next-token selection: transformers' logits processing (repetition penalty, temperature,
//! top-k, top-p) followed by greedy argmax or a seeded draw.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Generation settings (XTuner's `chat` flags and EvaluateChatHook settings).
#[derive(Debug, Clone, PartialEq)]
pub struct GenConfig {
    /// Most tokens sampled per call; reaching it ends with `FinishReason::Length`.
    pub max_new_tokens: usize,
    /// Divides the logits before top-k/top-p; 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability sums to at least this;
    /// 1.0 disables it.
    pub top_p: f32,
    /// Keep the k most likely tokens (ties with the k-th are kept too); 0 disables it.
    pub top_k: usize,
    /// transformers' CTRL-style penalty on tokens already in the context; 1.0 disables it.
    pub repetition_penalty: f32,
    /// Seed of the sampling RNG; `None` seeds from the OS.
    pub seed: Option<u64>,
    /// false (or temperature 0) picks the argmax after the repetition penalty.
    pub do_sample: bool,
}

impl Default for GenConfig {
    /// XTuner's `chat` defaults.
    fn default() -> Self {
        GenConfig {
            max_new_tokens: 2048,
            temperature: 0.1,
            top_p: 0.75,
            top_k: 40,
            repetition_penalty: 1.0,
            seed: None,
            do_sample: true,
        }
    }
}

impl GenConfig {
    /// Greedy decoding with the given token budget.
    pub fn greedy(max_new_tokens: usize) -> GenConfig {
        GenConfig {
            max_new_tokens,
            do_sample: false,
            ..GenConfig::default()
        }
    }

    /// true when no random draw happens (do_sample off or temperature 0).
    pub fn is_greedy(&self) -> bool {
        !self.do_sample || self.temperature == 0.0
    }

    /// Reject settings transformers rejects, naming the setting and its value.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!(
                "generation setting temperature = {}: must be a finite number >= 0",
                self.temperature
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!(
                "generation setting top_p = {}: must be in (0, 1]",
                self.top_p
            );
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            bail!(
                "generation setting repetition_penalty = {}: must be a finite number > 0",
                self.repetition_penalty
            );
        }
        Ok(())
    }
}

/// Picks next tokens from logits as `GenConfig` says; owns the seeded RNG so that a seed
/// reproduces a whole generation.
pub struct Sampler {
    cfg: GenConfig,
    rng: ChaCha20Rng,
}

impl Sampler {
    pub fn new(cfg: &GenConfig) -> Result<Sampler> {
        cfg.validate()?;
        let rng = match cfg.seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed),
            None => ChaCha20Rng::from_os_rng(),
        };
        Ok(Sampler {
            cfg: cfg.clone(),
            rng,
        })
    }

    /// The settings this sampler follows.
    pub fn config(&self) -> &GenConfig {
        &self.cfg
    }

    /// The processed scores transformers would sample from, in its order: repetition penalty,
    /// then (when sampling) temperature, top-k, top-p. Removed tokens are `-inf`.
    pub fn process_logits(&self, logits: &[f32], context: &[u32]) -> Vec<f32> {
        let mut scores = logits.to_vec(); // [vocab]
        apply_repetition_penalty(&mut scores, context, self.cfg.repetition_penalty);
        if self.cfg.is_greedy() {
            return scores;
        }
        if self.cfg.temperature != 1.0 {
            for s in &mut scores {
                *s /= self.cfg.temperature;
            }
        }
        apply_top_k(&mut scores, self.cfg.top_k);
        apply_top_p(&mut scores, self.cfg.top_p);
        scores
    }

    /// The next token for `logits` (length vocab), given the tokens already in the context
    /// (prompt and generated so far; only the repetition penalty reads them).
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            bail!("the model returned empty logits");
        }
        if let Some(i) = logits.iter().position(|x| x.is_nan()) {
            bail!("the model returned NaN logits (first at token id {i}); the weights or the forward pass are broken");
        }
        let scores = self.process_logits(logits, context);
        if self.cfg.is_greedy() {
            return Ok(argmax(&scores));
        }
        let probs = softmax(&scores); // [vocab], zeros where removed
        let draw: f64 = self.rng.random::<f64>();
        let mut cumulative = 0.0;
        let mut last_kept = 0;
        for (id, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                cumulative += p;
                last_kept = id;
                if draw < cumulative {
                    return Ok(id as u32);
                }
            }
        }
        // Rounding left the cumulative sum just under the draw.
        Ok(last_kept as u32)
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each distinct token of `context` has its
/// logit divided by `penalty` when positive and multiplied by it when negative.
pub fn apply_repetition_penalty(scores: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; scores.len()];
    for &id in context {
        let id = id as usize;
        if id >= scores.len() || seen[id] {
            continue;
        }
        seen[id] = true;
        let s = scores[id];
        scores[id] = if s < 0.0 { s * penalty } else { s / penalty };
    }
}

/// transformers' `TopKLogitsWarper`: tokens scoring below the k-th largest score become -inf
/// (so ties with the k-th survive). 0 or k >= vocab keeps everything.
pub fn apply_top_k(scores: &mut [f32], top_k: usize) {
    if top_k == 0 || top_k >= scores.len() {
        return;
    }
    let mut sorted = scores.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let kth = sorted[top_k - 1];
    for s in scores.iter_mut() {
        if *s < kth {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// transformers' `TopPLogitsWarper`: keeps the smallest set of most likely tokens whose
/// probabilities sum to at least `top_p` (always at least one token); 1.0 keeps everything.
pub fn apply_top_p(scores: &mut [f32], top_p: f32) {
    if top_p >= 1.0 {
        return;
    }
    let probs = softmax(scores);
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Most likely first; equal probabilities keep id order so the result is deterministic.
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    let mut kept_mass = 0.0f64;
    for (rank, &id) in order.iter().enumerate() {
        // A token is kept while the mass of the more likely ones is still below top_p.
        if rank > 0 && kept_mass >= top_p as f64 {
            scores[id] = f32::NEG_INFINITY;
        }
        kept_mass += probs[id];
    }
}

/// Softmax in f64 (removed `-inf` scores get probability 0).
pub fn softmax(scores: &[f32]) -> Vec<f64> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if max == f64::NEG_INFINITY {
        return vec![0.0; scores.len()];
    }
    let exps: Vec<f64> = scores.iter().map(|&s| (s as f64 - max).exp()).collect();
    let total: f64 = exps.iter().sum();
    exps.into_iter().map(|e| e / total).collect()
}

/// Index of the largest score (the first one on ties, as torch.argmax).
pub fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}
