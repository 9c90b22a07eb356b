//! Inference: sampling, generation with a KV cache, terminal chat.

use anyhow::Result;

pub mod chat;
pub mod generate;
pub mod llava;
pub mod load;
pub mod sampling;
pub mod stream;

pub use chat::{answer_once, run_repl, ChatFormat, ChatOptions, ChatReply, ChatSession};
pub use generate::{
    generate, generate_with_sampler, Decoding, FinishReason, Generation, StopCriteria,
};
pub use sampling::{GenConfig, Sampler};
pub use stream::{TextCodec, TextStream};

/// What generation needs from a model: feed tokens, get the next-token logits.
/// The decoder implements it; tests implement it with toy models.
pub trait CausalLm {
    /// Per-conversation key/value cache.
    type Cache;
    fn new_cache(&self) -> Self::Cache;
    /// Append `ids` at the cache's current position and return the logits (f32, length
    /// vocab_size) of the last of them.
    fn forward_infer(&self, ids: &[u32], cache: &mut Self::Cache) -> Result<Vec<f32>>;
    /// [`CausalLm::forward_infer`] for several independent sequences at once (a server's
    /// batch): returns each one's last-token logits. The default runs them one by one; a model
    /// overrides it to share its matmuls across the batch.
    fn forward_infer_batch(
        &self,
        items: &mut [(&[u32], &mut Self::Cache)],
    ) -> Result<Vec<Vec<f32>>> {
        items
            .iter_mut()
            .map(|(ids, cache)| self.forward_infer(ids, cache))
            .collect()
    }
    /// Number of tokens the cache already holds.
    fn cache_len(cache: &Self::Cache) -> usize;
    fn vocab_size(&self) -> usize;
}
