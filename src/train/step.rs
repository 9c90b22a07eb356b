//! What the training loop (`trainer::train_loop`) needs of a model and of its data, so one loop
//! trains the text decoder and the LLaVA model alike.

use crate::data::sampler::{SamplerIter, SamplerState};
use crate::model::decoder::{Decoder, GradReady, StepStats, TrainableInfo};
use anyhow::Result;
use candle_core::Tensor;

/// A model the step runs forward and backward on.
pub trait StepModel {
    /// One micro-batch as the model takes it.
    type Batch;
    /// Its gradient accumulators.
    type Grads;

    /// The trainables, in the order of the optimizer's flat buffer.
    fn trainable(&self) -> &[TrainableInfo];
    /// f32 initial values of the trainables (the optimizer's master copy).
    fn initial_trainable_values(&self) -> Result<Vec<Tensor>>;
    /// Frees the initial values once the optimizer holds them.
    fn release_initial_values(&mut self);
    /// Replaces the trainables after an optimizer step: `flat` is all of them, `[N]` in the
    /// optimizer's layout (any dtype; the compute dtype is read without a copy).
    fn set_trainable(&mut self, flat: &Tensor) -> Result<()>;
    fn new_grads(&self) -> Self::Grads;
    /// The accumulated gradient as one `[N]` tensor in trainable order: f32, or bf16 when the
    /// decoder writes each value once (`Decoder::set_one_write_grads`).
    fn flat_grads(grads: Self::Grads) -> Result<Tensor>;
    /// `grads += d(loss_scale · loss_sum)/dθ` for one micro-batch; dropout from `seed`.
    /// `ready` (the step's last micro-batch of a data-parallel run) is told which part of the
    /// flat gradient is final as the backward goes; a model may ignore it (the reduction then
    /// happens after the backward).
    fn forward_backward(
        &self,
        batch: &Self::Batch,
        loss_scale: f64,
        grads: &mut Self::Grads,
        seed: u64,
        checkpointing: bool,
        ready: Option<&mut dyn GradReady>,
    ) -> Result<StepStats>;
    /// The language model, for the evaluation prompts.
    fn decoder(&self) -> &Decoder;
    /// One line for the start-up log (architecture, sizes).
    fn describe(&self) -> String;
}

/// Where a run's micro-batches come from.
pub trait StepData {
    type Batch;

    /// Samples the sampler draws from.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The next micro-batch of `batch_size` samples drawn from `indices` (always the same
    /// iterator), and the sampler state after its last sample (what a checkpoint resumes from).
    fn next_batch(
        &mut self,
        indices: &mut SamplerIter<'_>,
        batch_size: usize,
    ) -> Result<(SamplerState, Self::Batch)>;
    /// Trained targets of this rank's part of the batch.
    fn targets(batch: &Self::Batch) -> usize;
    /// Tokens of this rank's part of the batch (padding excluded).
    fn tokens(batch: &Self::Batch) -> usize;
}
