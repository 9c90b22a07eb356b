//! LLaVA-1.5 on top of the decoder: the projector (`Linear(vision, H)`, GELU, `Linear(H, H)`,
//! with biases, as XTuner's `ProjectorModel` with depth 2) with its forward and backward, the
//! batch layout (each image's placeholder expanded to its image rows), and [`LlavaModel`]: CLIP
//! tower -> projector -> image rows spliced into the token embeddings -> decoder, forward and
//! backward, with one list of trainables (decoder, projector, vision adapters) for the trainer.

use crate::data::llava::LlavaItem;
use crate::data::pack::PackedSeq;
use crate::data::{IGNORE_INDEX, IMAGE_TOKEN_ID};
use crate::model::decoder::{Batch, Decoder, Grads, StepStats, TrainableInfo};
use crate::model::layers::acc_dtype;
pub use crate::model::layers::gelu::{gelu_backward, gelu_forward};
use crate::model::layers::linear::{linear_backward, linear_forward};
use crate::model::layers::mix_seed;
use crate::model::vision::ClipVision;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// The projector's parameters (compute dtype): `w1 [H, V]`, `b1 [H]`, `w2 [H, H]`, `b2 [H]`,
/// HF/XTuner names `model.0.*` and `model.2.*`.
#[derive(Debug, Clone)]
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

/// Gradients of the projector (acc dtype), and of its input when asked for.
pub struct ProjectorGrads {
    pub w1: Tensor,
    pub b1: Tensor,
    pub w2: Tensor,
    pub b2: Tensor,
    /// `[n, V]` in the projector's dtype.
    pub dx: Option<Tensor>,
}

impl Projector {
    /// Names of the parameters as XTuner's projector saves them.
    pub const NAMES: [&'static str; 4] = [
        "model.0.weight",
        "model.0.bias",
        "model.2.weight",
        "model.2.bias",
    ];

    /// The parameters in [`Projector::NAMES`] order.
    pub fn tensors(&self) -> [&Tensor; 4] {
        [&self.w1, &self.b1, &self.w2, &self.b2]
    }

    /// From tensors in [`Projector::NAMES`] order, checked against `[H, V]`, `[H]`, `[H, H]`, `[H]`.
    pub fn from_tensors(t: [Tensor; 4]) -> Result<Projector> {
        let [w1, b1, w2, b2] = t;
        let (h, _) = w1.dims2()?;
        if b1.dims() != [h] || w2.dims() != [h, h] || b2.dims() != [h] {
            bail!(
                "projector shapes {:?} {:?} {:?} {:?} are not [H, V], [H], [H, H], [H]",
                w1.dims(),
                b1.dims(),
                w2.dims(),
                b2.dims()
            );
        }
        Ok(Projector { w1, b1, w2, b2 })
    }

    /// `features [n, V] -> [n, H]`.
    pub fn forward(&self, features: &Tensor) -> Result<(Tensor, ProjectorActs)> {
        let x = features.to_dtype(self.w1.dtype())?;
        let h = linear_forward(&x, &self.w1, Some(&self.b1))?; // [n, H]
        let g = gelu_forward(&h)?;
        let y = linear_forward(&g, &self.w2, Some(&self.b2))?; // [n, H]
        Ok((y, ProjectorActs { x, h, g }))
    }

    /// Backward for upstream `dy [n, H]`; the input's gradient only when `need_dx` (a vision
    /// tower with adapters below).
    pub fn backward(
        &self,
        acts: &ProjectorActs,
        dy: &Tensor,
        need_dx: bool,
    ) -> Result<ProjectorGrads> {
        let acc = acc_dtype(dy.dtype());
        let l2 = linear_backward(&acts.g, &self.w2, dy, true, true, true)?;
        let dg = l2.dx.context("projector: no dx")?;
        let dh = gelu_backward(&acts.h, &dg)?;
        let l1 = linear_backward(&acts.x, &self.w1, &dh, need_dx, true, true)?;
        let cast = |t: Option<Tensor>| -> Result<Tensor> {
            Ok(t.context("projector: missing gradient")?.to_dtype(acc)?)
        };
        Ok(ProjectorGrads {
            w1: cast(l1.dw)?,
            b1: cast(l1.db)?,
            w2: cast(l2.dw)?,
            b2: cast(l2.db)?,
            dx: l1.dx,
        })
    }
}

/// A micro-batch of LLaVA samples: the tokens with every image's rows in place (token id 0,
/// label ignored, replaced by the projected image features), where each image starts, and the
/// images' pixels `[images, 3, S, S]` (f32, host) in the same order.
#[derive(Debug, Clone)]
pub struct LlavaBatch {
    pub batch: Batch,
    pub image_starts: Vec<usize>,
    pub pixels: Option<Tensor>,
}

/// `seq` with its [`IMAGE_TOKEN_ID`] placeholder (if any) expanded to `image_tokens` rows;
/// returns the sequence and the first image row.
fn expand_placeholder(seq: &PackedSeq, image_tokens: usize) -> Result<(PackedSeq, Option<usize>)> {
    let mut at = seq
        .input_ids
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == IMAGE_TOKEN_ID);
    let Some((p, _)) = at.next() else {
        return Ok((seq.clone(), None));
    };
    if at.next().is_some() {
        bail!("a LLaVA sample holds more than one image placeholder");
    }
    let extra = image_tokens - 1;
    let splice = |ids: &[u32], fill: u32| -> Vec<u32> {
        let mut v = ids[..p].to_vec();
        v.extend(std::iter::repeat_n(fill, image_tokens));
        v.extend_from_slice(&ids[p + 1..]);
        v
    };
    let mut labels = seq.labels[..p].to_vec();
    labels.extend(std::iter::repeat_n(IGNORE_INDEX, image_tokens));
    labels.extend_from_slice(&seq.labels[p + 1..]);
    let cu_seqlens: Vec<u32> = seq
        .cu_seqlens
        .iter()
        .map(|&c| if c as usize > p { c + extra as u32 } else { c })
        .collect();
    // Positions restart at every piece, as the packer numbers them.
    let mut position_ids = Vec::with_capacity(seq.len() + extra);
    for w in cu_seqlens.windows(2) {
        position_ids.extend(0..w[1] - w[0]);
    }
    let out = PackedSeq {
        input_ids: splice(&seq.input_ids, 0),
        labels,
        position_ids,
        cu_seqlens,
    };
    Ok((out, Some(p)))
}

/// One micro-batch from loaded samples (varlen rows, as [`crate::train::trainer::make_batch`]),
/// each image's placeholder expanded to `image_tokens` rows.
pub fn make_llava_batch(items: &[LlavaItem], image_tokens: usize) -> Result<LlavaBatch> {
    if image_tokens == 0 {
        bail!("a vision tower with no image tokens");
    }
    let mut seqs = Vec::with_capacity(items.len());
    let mut image_starts = Vec::new();
    let mut pixels = Vec::new();
    let mut offset = 0;
    for (i, item) in items.iter().enumerate() {
        let (seq, start) = expand_placeholder(&item.seq, image_tokens)?;
        match (start, &item.pixels) {
            (Some(p), Some(px)) => {
                image_starts.push(offset + p);
                pixels.push(px.clone());
            }
            (None, None) => {}
            (Some(_), None) => bail!("sample {i} of the batch has `<image>` but no image"),
            (None, Some(_)) => bail!("sample {i} of the batch has an image but no `<image>`"),
        }
        offset += seq.len();
        seqs.push(seq);
    }
    let pixels = if pixels.is_empty() {
        None
    } else {
        Some(Tensor::stack(&pixels, 0)?)
    };
    Ok(LlavaBatch {
        batch: crate::train::trainer::make_batch(&seqs),
        image_starts,
        pixels,
    })
}

/// Checks that `image_starts` (each `n` rows) lie inside the batch, in order, without overlap,
/// on untrained rows.
fn check_image_rows(batch: &Batch, image_starts: &[usize], n: usize) -> Result<()> {
    let len = batch.input_ids.len();
    let mut end = 0;
    for &a in image_starts {
        if a < end || a + n > len {
            bail!(
                "image rows {a}..{} do not fit in order in a batch of {len} tokens",
                a + n
            );
        }
        if let Some(i) = (a..a + n).find(|&i| batch.labels[i] != IGNORE_INDEX) {
            bail!("label of image row {i} is trained; image rows must be ignored (-100)");
        }
        end = a + n;
    }
    Ok(())
}

/// Forward and backward of the decoder with `image_rows [images · n, H]` spliced into the token
/// embeddings at `image_starts` (each image `n` rows): adds the decoder's gradients (embedding
/// rows of the text included) into `grads` and returns the stats and the image rows' gradient
/// `[images · n, H]`.
#[allow(clippy::too_many_arguments)]
pub fn spliced_forward_backward(
    decoder: &Decoder,
    image_rows: &Tensor,
    batch: &Batch,
    image_starts: &[usize],
    loss_scale: f64,
    grads: &mut Grads,
    step_seed: u64,
    checkpointing: bool,
) -> Result<(StepStats, Tensor)> {
    let ids = &batch.input_ids;
    let len = ids.len();
    let images = image_starts.len();
    let total = image_rows.dim(0)?;
    if images == 0 || total % images != 0 {
        bail!("{total} image rows for {images} images");
    }
    let n = total / images;
    check_image_rows(batch, image_starts, n)?;
    let text = decoder.embed(ids)?; // [len, H]; image rows replaced below
    let image_rows = image_rows.to_dtype(text.dtype())?;
    // Alternating text spans and image blocks.
    let mut parts = Vec::with_capacity(2 * images + 1);
    let mut text_spans = Vec::with_capacity(images + 1);
    let mut at = 0;
    for (i, &a) in image_starts.iter().enumerate() {
        parts.push(text.narrow(0, at, a - at)?);
        text_spans.push((at, a - at));
        parts.push(image_rows.narrow(0, i * n, n)?);
        at = a + n;
    }
    parts.push(text.narrow(0, at, len - at)?);
    text_spans.push((at, len - at));
    let x0 = Tensor::cat(&parts, 0)?; // [len, H]
    let (stats, dx0) =
        decoder.forward_backward_embeds(&x0, batch, loss_scale, grads, step_seed, checkpointing)?;
    // Text rows train the embedding table when it is trainable; image rows go back to the caller.
    let text_ids: Vec<u32> = text_spans
        .iter()
        .flat_map(|&(a, l)| ids[a..a + l].iter().copied())
        .collect();
    let d_text: Vec<Tensor> = text_spans
        .iter()
        .map(|&(a, l)| dx0.narrow(0, a, l))
        .collect::<candle_core::Result<_>>()?;
    decoder.embedding_backward_into(&text_ids, &Tensor::cat(&d_text, 0)?, grads)?;
    let d_img: Vec<Tensor> = image_starts
        .iter()
        .map(|&a| dx0.narrow(0, a, n))
        .collect::<candle_core::Result<_>>()?;
    Ok((stats, Tensor::cat(&d_img, 0)?))
}

/// Forward and backward of a batch whose images are given as frozen features
/// `[images, N, V]`: projector, splice, decoder. Decoder gradients go into `grads`; the
/// projector's are returned.
#[allow(clippy::too_many_arguments)]
pub fn llava_forward_backward(
    decoder: &Decoder,
    projector: &Projector,
    features: &Tensor,
    batch: &Batch,
    image_starts: &[usize],
    loss_scale: f64,
    grads: &mut Grads,
    step_seed: u64,
    checkpointing: bool,
) -> Result<(StepStats, ProjectorGrads)> {
    let (images, n, v) = features.dims3()?;
    let (rows, acts) = projector.forward(&features.reshape((images * n, v))?)?; // [images·N, H]
    let (stats, d_rows) = spliced_forward_backward(
        decoder,
        &rows,
        batch,
        image_starts,
        loss_scale,
        grads,
        step_seed,
        checkpointing,
    )?;
    let pg = projector.backward(&acts, &d_rows.to_dtype(projector.w1.dtype())?, false)?;
    Ok((stats, pg))
}

/// Gradient accumulators of a [`LlavaModel`], one per part, in trainable order.
pub struct LlavaGrads {
    pub decoder: Grads,
    pub projector: Grads,
    pub vision: Grads,
}

impl LlavaGrads {
    /// The flat f32 gradient `[N]` in [`LlavaModel::trainable`] order.
    pub fn into_flat(self) -> Result<Tensor> {
        let parts: Vec<Tensor> = [self.decoder, self.projector, self.vision]
            .into_iter()
            .filter(|g| !g.is_empty())
            .map(|g| Ok(g.into_flat()?.to_dtype(DType::F32)?))
            .collect::<Result<_>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// The LLaVA model the trainer runs: the decoder (frozen, LoRA, QLoRA or full), the projector
/// (always trained) and the CLIP tower (frozen, or with LoRA adapters).
pub struct LlavaModel {
    pub decoder: Decoder,
    pub vision: ClipVision,
    projector: Projector,
    /// The projector's f32 initial values (the optimizer's master copy).
    projector_init: [Tensor; 4],
    /// All trainables: the decoder's, the projector's (`projector.model.*`), the tower's.
    trainable: Vec<TrainableInfo>,
}

impl LlavaModel {
    /// Prefix of the projector's trainable names.
    pub const PROJECTOR_PREFIX: &'static str = "projector.";

    /// `projector` holds the initial values (any float dtype; kept in f32 as the master copy).
    pub fn new(decoder: Decoder, vision: ClipVision, projector: Projector) -> Result<LlavaModel> {
        let (hidden, v) = projector.w1.dims2()?;
        if v != vision.config().hidden_size || hidden != decoder.config().hidden_size {
            bail!(
                "projector maps {v} -> {hidden}, the model needs {} (vision) -> {} (LLM)",
                vision.config().hidden_size,
                decoder.config().hidden_size
            );
        }
        let (dtype, device) = (decoder.compute_dtype(), vision.device().clone());
        let projector_init = map4(projector.tensors(), |t| t.to_dtype(DType::F32))?;
        let projector = Projector::from_tensors(map4(projector_init.each_ref(), |t| {
            t.to_device(&device)?.to_dtype(dtype)
        })?)?;
        let mut trainable = decoder.trainable().to_vec();
        for (name, t) in Projector::NAMES.iter().zip(projector.tensors()) {
            trainable.push(TrainableInfo {
                name: format!("{}{name}", Self::PROJECTOR_PREFIX),
                shape: t.dims().to_vec(),
                decay: t.rank() >= 2,
            });
        }
        trainable.extend(vision.trainable().iter().cloned());
        Ok(LlavaModel {
            decoder,
            vision,
            projector,
            projector_init,
            trainable,
        })
    }

    /// Image rows per image (patches of the tower).
    pub fn image_tokens(&self) -> usize {
        self.vision.config().num_patches()
    }

    pub fn projector(&self) -> &Projector {
        &self.projector
    }

    pub fn trainable(&self) -> &[TrainableInfo] {
        &self.trainable
    }

    /// f32 initial values of every trainable, in [`LlavaModel::trainable`] order.
    pub fn initial_trainable_values(&self) -> Result<Vec<Tensor>> {
        let mut v = self.decoder.initial_trainable_values()?;
        v.extend(self.projector_init.iter().cloned());
        v.extend(self.vision.initial_trainable_values());
        Ok(v)
    }

    /// Frees the decoder's and the tower's initial adapter values once the optimizer holds them.
    pub fn release_initial_values(&mut self) {
        self.decoder.release_initial_values();
        self.vision.release_initial_values();
    }

    /// Replaces every trainable (any dtype, [`LlavaModel::trainable`] order).
    pub fn set_trainable(&mut self, values: &[Tensor]) -> Result<()> {
        if values.len() != self.trainable.len() {
            bail!(
                "set_trainable got {} tensors for {} trainables",
                values.len(),
                self.trainable.len()
            );
        }
        let n_dec = self.decoder.trainable().len();
        let (dec, rest) = values.split_at(n_dec);
        self.decoder.set_trainable(dec)?;
        self.set_tower_and_projector(rest)
    }

    /// The trainables after the decoder's: the projector's four, then the tower's.
    fn set_tower_and_projector(&mut self, rest: &[Tensor]) -> Result<()> {
        let n_dec = self.decoder.trainable().len();
        let (proj, vis) = rest.split_at(4);
        self.vision.set_trainable(vis)?;
        for ((t, info), name) in proj
            .iter()
            .zip(&self.trainable[n_dec..])
            .zip(Projector::NAMES)
        {
            if t.dims() != info.shape.as_slice() {
                bail!(
                    "set_trainable: projector `{name}` expects shape {:?}, got {:?}",
                    info.shape,
                    t.dims()
                );
            }
        }
        let (dtype, device) = (self.decoder.compute_dtype(), self.vision.device().clone());
        let proj: [&Tensor; 4] = [&proj[0], &proj[1], &proj[2], &proj[3]];
        self.projector =
            Projector::from_tensors(map4(proj, |t| t.to_device(&device)?.to_dtype(dtype))?)?;
        Ok(())
    }

    /// [`LlavaModel::set_trainable`] from the flat `[N]` trainables (the optimizer's layout): the
    /// decoder's part, first, goes to [`Decoder::set_trainable_flat`].
    pub fn set_trainable_flat(&mut self, flat: &Tensor) -> Result<()> {
        let total: usize = self
            .trainable
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        if flat.dims() != [total] {
            bail!(
                "set_trainable: a flat buffer of shape {:?} for {total} trainable values",
                flat.dims()
            );
        }
        let n_dec = self.decoder.trainable_numel();
        self.decoder
            .set_trainable_flat(&flat.narrow(0, 0, n_dec)?)?;
        let rest = &self.trainable[self.decoder.trainable().len()..];
        let views = crate::model::flat_views(
            &flat.narrow(0, n_dec, total - n_dec)?,
            rest.iter().map(|t| t.shape.as_slice()),
        )?;
        self.set_tower_and_projector(&views)
    }

    pub fn new_grads(&self) -> LlavaGrads {
        let shapes: Vec<Vec<usize>> = self
            .projector
            .tensors()
            .iter()
            .map(|t| t.dims().to_vec())
            .collect();
        LlavaGrads {
            decoder: self.decoder.new_grads(),
            projector: Grads::new(
                &shapes,
                acc_dtype(self.decoder.compute_dtype()),
                self.vision.device(),
            ),
            vision: self.vision.new_grads(),
        }
    }

    /// Image rows `[images · N, H]` of `pixels [images, 3, S, S]` (inference: no dropout).
    pub fn image_rows(&self, pixels: &Tensor) -> Result<Tensor> {
        let feats = self
            .vision
            .forward(&pixels.to_device(self.vision.device())?)?;
        let (b, n, v) = feats.dims3()?;
        Ok(self.projector.forward(&feats.reshape((b * n, v))?)?.0)
    }

    /// Forward and backward of one micro-batch: `grads += d(loss_scale · loss_sum)/dθ` for the
    /// decoder's, the projector's and the tower's trainables. Dropout masks from `step_seed`.
    pub fn forward_backward(
        &self,
        b: &LlavaBatch,
        loss_scale: f64,
        grads: &mut LlavaGrads,
        step_seed: u64,
        checkpointing: bool,
    ) -> Result<StepStats> {
        let Some(pixels) = &b.pixels else {
            // Text only: the projector and the tower take no part.
            return self.decoder.forward_backward(
                &b.batch,
                loss_scale,
                &mut grads.decoder,
                step_seed,
                checkpointing,
            );
        };
        let pixels = pixels.to_device(self.vision.device())?;
        let vision_trains = !self.vision.trainable().is_empty();
        let vision_seed = mix_seed(step_seed, u64::MAX);
        let (feats, vision_acts) = if vision_trains {
            let (f, acts) = self
                .vision
                .forward_train(&pixels, vision_seed, checkpointing)?;
            (f, Some(acts))
        } else {
            (self.vision.forward(&pixels)?, None)
        };
        let (images, n, v) = feats.dims3()?; // [images, N, V]
        let (rows, acts) = self.projector.forward(&feats.reshape((images * n, v))?)?;
        let (stats, d_rows) = spliced_forward_backward(
            &self.decoder,
            &rows,
            &b.batch,
            &b.image_starts,
            loss_scale,
            &mut grads.decoder,
            step_seed,
            checkpointing,
        )?;
        let pg = self.projector.backward(
            &acts,
            &d_rows.to_dtype(self.projector.w1.dtype())?,
            vision_trains,
        )?;
        for (slot, g) in [&pg.w1, &pg.b1, &pg.w2, &pg.b2].into_iter().enumerate() {
            grads.projector.add(slot, g)?;
        }
        if let (Some(acts), Some(dx)) = (vision_acts, pg.dx) {
            self.vision
                .backward(acts, &dx.reshape((images, n, v))?, &mut grads.vision)?;
        }
        Ok(stats)
    }
}

/// `f` over four tensors (the projector's).
fn map4(
    t: [&Tensor; 4],
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<[Tensor; 4]> {
    let [a, b, c, d] = t;
    Ok([f(a)?, f(b)?, f(c)?, f(d)?])
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
