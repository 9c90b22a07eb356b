//! LLaVA-1.5 pieces on top of the decoder: the projector (`Linear(vision, H)`, GELU,
//! `Linear(H, H)`, with biases, as XTuner's `ProjectorModel` with depth 2) with its forward and
//! backward, and one training step of "image features -> projector -> spliced into the text
//! embeddings -> decoder", which returns the projector's gradients.
//!
//! The vision tower (`super::vision`) is frozen here; its features come in as a tensor.

use crate::model::decoder::{Batch, Decoder, Grads, StepStats};
use crate::model::layers::acc_dtype;
pub use crate::model::layers::gelu::{gelu_backward, gelu_forward};
use crate::model::layers::linear::{linear_backward, linear_forward};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// The projector's parameters (compute dtype): `w1 [H, V]`, `b1 [H]`, `w2 [H, H]`, `b2 [H]`,
/// HF/XTuner names `model.0.*` and `model.2.*`.
pub struct Projector {
    pub w1: Tensor,
    pub b1: Tensor,
    pub w2: Tensor,
    pub b2: Tensor,
}

/// What the projector's backward needs.
pub struct ProjectorActs {
    x: Tensor,
    h: Tensor,
    g: Tensor,
}

/// Gradients of the projector (acc dtype), in the order `w1, b1, w2, b2`.
pub struct ProjectorGrads {
    pub w1: Tensor,
    pub b1: Tensor,
    pub w2: Tensor,
    pub b2: Tensor,
}

impl Projector {
    /// Names of the parameters as XTuner's projector saves them.
    pub const NAMES: [&'static str; 4] = [
        "model.0.weight",
        "model.0.bias",
        "model.2.weight",
        "model.2.bias",
    ];

    /// `features [n, V] -> [n, H]`.
    pub fn forward(&self, features: &Tensor) -> Result<(Tensor, ProjectorActs)> {
        let x = features.to_dtype(self.w1.dtype())?;
        let h = linear_forward(&x, &self.w1, Some(&self.b1))?; // [n, H]
        let g = gelu_forward(&h)?;
        let y = linear_forward(&g, &self.w2, Some(&self.b2))?; // [n, H]
        Ok((y, ProjectorActs { x, h, g }))
    }

    /// Backward for upstream `dy [n, H]`; the image features are frozen (no input gradient).
    pub fn backward(&self, acts: &ProjectorActs, dy: &Tensor) -> Result<ProjectorGrads> {
        let acc = acc_dtype(dy.dtype());
        let l2 = linear_backward(&acts.g, &self.w2, dy, true, true, true)?;
        let dg = l2.dx.context("projector: no dx")?;
        let dh = gelu_backward(&acts.h, &dg)?;
        let l1 = linear_backward(&acts.x, &self.w1, &dh, false, true, true)?;
        let cast = |t: Option<Tensor>| -> Result<Tensor> {
            Ok(t.context("projector: missing gradient")?.to_dtype(acc)?)
        };
        Ok(ProjectorGrads {
            w1: cast(l1.dw)?,
            b1: cast(l1.db)?,
            w2: cast(l2.dw)?,
            b2: cast(l2.db)?,
        })
    }
}

/// One sample's layout: the text ids with one placeholder row per image token, and where the
/// image rows start. Labels of image rows must be ignored (-100).
pub struct LlavaSample {
    pub batch: Batch,
    /// Index of the first image row in `batch.input_ids` (the image's rows are contiguous).
    pub image_start: usize,
}

/// Forward and backward of one LLaVA sample: `features [N, V]` (frozen vision tower output) are
/// projected, spliced into the token embeddings at `image_start..image_start+N`, and run through
/// the decoder. Decoder gradients go into `grads`; the projector's are returned.
#[allow(clippy::too_many_arguments)]
pub fn llava_forward_backward(
    decoder: &Decoder,
    projector: &Projector,
    features: &Tensor,
    sample: &LlavaSample,
    loss_scale: f64,
    grads: &mut Grads,
    step_seed: u64,
    checkpointing: bool,
) -> Result<(StepStats, ProjectorGrads)> {
    let ids = &sample.batch.input_ids;
    let n_img = features.dim(0)?;
    let (a, b) = (sample.image_start, sample.image_start + n_img);
    if b > ids.len() {
        bail!(
            "image rows {a}..{b} do not fit in a sample of {} tokens",
            ids.len()
        );
    }
    if let Some(i) = (a..b).find(|&i| sample.batch.labels[i] != crate::data::IGNORE_INDEX) {
        bail!("label of image row {i} is trained; image rows must be ignored (-100)");
    }
    let (img, acts) = projector.forward(features)?; // [N, H]
    let text = decoder.embed(ids)?; // [n, H]; the placeholder rows are replaced below
    let x0 = Tensor::cat(
        &[
            &text.narrow(0, 0, a)?,
            &img.to_dtype(text.dtype())?,
            &text.narrow(0, b, ids.len() - b)?,
        ],
        0,
    )?;
    let (stats, dx0) = decoder.forward_backward_embeds(
        &x0,
        &sample.batch,
        loss_scale,
        grads,
        step_seed,
        checkpointing,
    )?;
    // Text rows train the embedding table when it is trainable; image rows train the projector.
    let text_ids: Vec<u32> = ids[..a].iter().chain(&ids[b..]).copied().collect();
    let d_text = Tensor::cat(
        &[&dx0.narrow(0, 0, a)?, &dx0.narrow(0, b, ids.len() - b)?],
        0,
    )?;
    decoder.embedding_backward_into(&text_ids, &d_text, grads)?;
    let d_img = dx0.narrow(0, a, n_img)?.to_dtype(projector.w1.dtype())?;
    let pg = projector.backward(&acts, &d_img)?;
    Ok((stats, pg))
}

/// Projector weights drawn like `nn.Linear`'s default (uniform ±1/sqrt(fan_in)), reproducible.
pub fn init_projector(
    vision: usize,
    hidden: usize,
    seed: u64,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Projector> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut uniform = |n: usize, fan_in: usize| -> Vec<f32> {
        let bound = 1.0 / (fan_in as f64).sqrt();
        (0..n)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect()
    };
    let t = |v: Vec<f32>, shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
    };
    Ok(Projector {
        w1: t(uniform(hidden * vision, vision), &[hidden, vision])?,
        b1: t(uniform(hidden, vision), &[hidden])?,
        w2: t(uniform(hidden * hidden, hidden), &[hidden, hidden])?,
        b2: t(uniform(hidden, hidden), &[hidden])?,
    })
}
