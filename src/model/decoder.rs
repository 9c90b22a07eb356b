//! The Llama-family decoder (Llama, Qwen2, InternLM2) assembled from the hand-derived
//! forward/backward modules in [`super::layers`].
//!
//! Parameters live in one table (`params`, compute dtype) addressed by index; a parameter is
//! trainable iff it has a gradient slot. Frozen weights never get a slot, so their `dW` is never
//! computed nor allocated. With activation checkpointing a block keeps only its input during the
//! forward and is recomputed (same dropout seeds) right before its backward.

use crate::dist::collectives::Collectives;
use crate::dist::ulysses::{self, SeqPiece};
use crate::infer::CausalLm;
use crate::kernels::gemm::{gemm, gemm_into, GemmOut};
use crate::model::config::{Arch, ModelConfig};
use crate::model::layers::attention::{
    attend, attention_backward, attention_forward, check_cu_seqlens,
};
use crate::model::layers::embedding::{embedding_backward, embedding_forward};
use crate::model::layers::lm_head::{
    lm_head_ce, lm_head_ce_rows, row_targets, shifted_targets, CeGradRequest,
};
use crate::model::layers::lora::{
    dropout_mask, lora_a_init, lora_group_backward, lora_group_forward, LoraGroupGrads, LoraSaved,
};
use crate::model::layers::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use crate::model::layers::rope::{rope_backward, rope_forward, RopeCache};
use crate::model::layers::swiglu::{swiglu_backward, swiglu_forward};
use crate::model::layers::{acc_dtype, mix_seed};
use crate::model::weights::WeightSource;
use crate::profile::scope;
use crate::quant::Nf4Weight;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// Bytes of logits one LM head + cross-entropy chunk may hold (their gradient is written over them
/// on a GPU): the rows per chunk follow from the vocabulary and the compute dtype (bf16: InternLM2's
/// 92544 -> 362 rows, Llama-2's 32000 -> 1024), so the head never adds more than a few such
/// temporaries to the step's peak memory. Fewer, larger chunks re-read the head's weight fewer
/// times: each chunk's two GEMMs read all of it (379 MB at 1.8B).
pub const CE_CHUNK_BYTES: usize = 64 << 20;

/// `fresh + other` for a residual connection, written into `fresh` in place on a GPU (`fresh`
/// must be a new tensor nothing else holds, e.g. a projection's output).
fn residual_add(fresh: Tensor, other: &Tensor) -> Result<Tensor> {
    if crate::kernels::grad::add_assign(&fresh, other)? {
        return Ok(fresh);
    }
    Ok((other + fresh)?)
}

/// The one output of a one-projection group.
fn only(ys: Vec<Tensor>) -> Result<Tensor> {
    let [y]: [Tensor; 1] = ys.try_into().map_err(|ys: Vec<Tensor>| {
        anyhow::anyhow!("{} outputs from a one-projection group", ys.len())
    })?;
    Ok(y)
}

/// How many times [`ce_chunk_rows_for`]'s rows a chunk takes when the LM head is trained (full
/// fine-tuning): measured on an H100 at 1.8B, chunks of 181 rows spent ~8 ms per step of
/// 2048 tokens re-reading and re-writing the head's f32 gradient.
const TRAINED_HEAD_CHUNK_FACTOR: usize = 4;

/// Rows per LM-head chunk for `vocab` logits of `dtype` under [`CE_CHUNK_BYTES`] (at least 64, at
/// most 1024).
pub fn ce_chunk_rows_for(vocab: usize, dtype: DType) -> usize {
    (CE_CHUNK_BYTES / (vocab.max(1) * dtype.size_in_bytes())).clamp(64, 1024)
}

/// What is trained.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainMode {
    /// Nothing (evaluation, inference).
    Frozen,
    /// LoRA adapters on the targeted linears; every base weight frozen.
    Lora(LoraSpec),
    /// Every weight, bias, norm, embedding and the head.
    Full,
}

/// LoRA hyper-parameters (PEFT semantics: `scale = alpha / r`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Leaf module names (`q_proj`, `wqkv`, `w1`, ...). Empty = every linear but the LM head.
    pub targets: Vec<String>,
}

/// QLoRA base weights: every linear of every block stored as NF4 (bitsandbytes layout), the
/// embedding, norms and LM head kept in the compute dtype, as bitsandbytes QLoRA does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantSpec {
    /// Quantize the NF4 block scales too (4.127 instead of 4.5 bits per parameter).
    pub double_quant: bool,
}

/// Packed token batch: samples concatenated, `cu_seqlens` their boundaries (`[0, l0, l0+l1, ...]`),
/// `position_ids` restarting at 0 for every sample. Several packed sequences form a batch by
/// concatenation with merged `cu_seqlens`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub position_ids: Vec<u32>,
    pub cu_seqlens: Vec<u32>,
}

impl Batch {
    /// One unpacked sample: positions `0..n`, a single segment.
    pub fn single(input_ids: Vec<u32>, labels: Vec<i32>) -> Batch {
        let n = input_ids.len();
        Batch {
            input_ids,
            labels,
            position_ids: (0..n as u32).collect(),
            cu_seqlens: vec![0, n as u32],
        }
    }
}

/// One trainable tensor, in the order of [`Grads::slots`] and the optimizer's master buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainableInfo {
    /// HF / PEFT key, e.g. `model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    /// Weight decay applies (matrices only; not norms or biases).
    pub decay: bool,
}

/// The trainables' gradients in one flat buffer `[N]` (f32; f64 when the compute dtype is f64),
/// laid out as the optimizer's `FlatParams` lays out the master copy (trainable order, no gaps), so
/// the optimizer takes it as it is: no per-slot tensors, no gather, no cast. Zero-filled at the
/// first contribution; contributions accumulate (across micro-batches too) until the caller takes
/// the buffer with [`Grads::into_flat`].
#[derive(Debug, Clone)]
pub struct Grads {
    flat: Option<Tensor>,
    /// Per slot: offset into `flat` and shape.
    layout: Vec<(usize, Vec<usize>)>,
    /// Slots that received a contribution.
    touched: Vec<bool>,
    dtype: DType,
    device: Device,
}

impl Grads {
    /// Accumulators for trainables of these shapes.
    pub fn new(shapes: &[Vec<usize>], dtype: DType, device: &Device) -> Grads {
        let mut offset = 0;
        let layout = shapes
            .iter()
            .map(|s| {
                let here = offset;
                offset += s.iter().product::<usize>();
                (here, s.clone())
            })
            .collect();
        Grads {
            flat: None,
            layout,
            touched: vec![false; shapes.len()],
            dtype,
            device: device.clone(),
        }
    }

    /// Number of trainables.
    pub fn len(&self) -> usize {
        self.layout.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layout.is_empty()
    }

    /// Total number of gradient values `N`.
    pub fn numel(&self) -> usize {
        self.layout
            .last()
            .map_or(0, |(o, s)| o + s.iter().product::<usize>())
    }

    /// The buffer, zero-filled on first use.
    pub(crate) fn buffer(&mut self) -> Result<&Tensor> {
        if self.flat.is_none() {
            self.flat = Some(Tensor::zeros(self.numel(), self.dtype, &self.device)?);
        }
        Ok(self.flat.as_ref().expect("allocated above"))
    }

    /// Marks `slot` as receiving a contribution and returns its offset.
    fn mark(&mut self, slot: usize) -> usize {
        self.touched[slot] = true;
        self.layout[slot].0
    }

    /// `grad[slot] += g` (`g` of the slot's shape, any float dtype).
    pub fn add(&mut self, slot: usize, g: &Tensor) -> Result<()> {
        let shape = &self.layout[slot].1;
        if g.dims() != shape.as_slice() {
            bail!(
                "gradient of shape {:?} for trainable #{slot} of shape {shape:?}",
                g.dims()
            );
        }
        let offset = self.mark(slot);
        crate::kernels::grad::accumulate_into(self.buffer()?, offset, g)
    }

    /// Slot `slot`'s gradient (a view into the buffer), `None` before any contribution.
    pub fn slot(&self, slot: usize) -> Option<Tensor> {
        let flat = self.flat.as_ref().filter(|_| self.touched[slot])?;
        let (offset, shape) = &self.layout[slot];
        let n = shape.iter().product::<usize>();
        flat.narrow(0, *offset, n)
            .and_then(|t| t.reshape(shape.as_slice()))
            .ok()
    }

    /// Every slot's gradient, as [`Grads::slot`].
    pub fn slots(&self) -> Vec<Option<Tensor>> {
        (0..self.len()).map(|i| self.slot(i)).collect()
    }

    /// The flat `[N]` gradient (zeros when nothing contributed).
    pub fn into_flat(mut self) -> Result<Tensor> {
        self.buffer()?;
        Ok(self.flat.take().expect("allocated above"))
    }
}

/// Told during the backward which gradients are final, so that a data-parallel run reduces them
/// while the rest of the backward runs (ZeRO-2's bucketed reduction).
pub trait GradReady {
    /// Every value of the flat gradient buffer `grads` (`[N]`, the [`Grads`] buffer) at
    /// offsets `>= from` is final for this step. Called with decreasing `from`.
    fn ready_from(&mut self, from: usize, grads: &Tensor) -> Result<()>;
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    /// Σ of token losses (divide by `n_trained` for the mean).
    pub loss_sum: f64,
    pub n_trained: usize,
    /// Blocks whose forward ran again in the backward (activation checkpointing).
    pub recomputed_blocks: usize,
    /// Blocks that kept their attention half only: the backward ran their post-attention norm,
    /// gate/up projections and SwiGLU again (see `plan_blocks`).
    pub gate_up_recomputed_blocks: usize,
    /// Blocks kept but for their two norms and SwiGLU product, which the backward recomputes
    /// (see `BlockActs::slim`): all fully kept blocks unless the budget holds every block whole.
    pub slimmed_blocks: usize,
}

/// A linear projection: base weight (+ bias) and an optional LoRA adapter, as parameter indices.
struct Proj {
    weight: usize,
    bias: Option<usize>,
    /// `(A [r, in], B [out, r])`
    lora: Option<(usize, usize)>,
    /// Position among the block's linears: decorrelates the dropout masks of one block.
    ordinal: u64,
}

/// Projections that read the same input (q/k/v, gate/up, or one alone), so that their adapters
/// share GEMMs (see [`lora_group_forward`]).
struct ProjGroup {
    projs: Vec<Proj>,
    /// The group's LoRA A's are adjacent trainables (see `Builder::group`): `(first slot, rows
    /// G·r, in)` of their `[G·r, in]` stack in the flat trainables and the gradient buffer.
    a_stack: Option<(usize, usize, usize)>,
}

/// How the attention's q, k and v come out of its input projection group.
#[derive(Clone, Copy)]
enum QkvLayout {
    /// Llama / Qwen2: `q_proj`, `k_proj`, `v_proj`, the group's three projections.
    Separate,
    /// InternLM2 `wqkv`, the group's one projection: output rows grouped as
    /// `[kv_heads, group + 2, head_dim]` (`group` query heads, then the key, then the value of
    /// each KV head).
    Fused,
}

struct Block {
    attn_norm: usize,
    qkv: ProjGroup,
    qkv_layout: QkvLayout,
    o: ProjGroup,
    ffn_norm: usize,
    /// gate, then up.
    gate_up: ProjGroup,
    down: ProjGroup,
}

/// What the forward of one adapter GEMM group keeps: which of the projection group's members it
/// covers (all adapters at once, or one when dropout gives each its own input).
struct AdapterSaved {
    members: Vec<usize>,
    saved: LoraSaved,
}

/// One linear of a [`ProjGroup`] for `Builder::group`: `{prefix}.weight [out, in]`, with a LoRA
/// adapter when `leaf` is targeted; `ordinal` is its position among the block's linears.
struct ProjSpec<'s> {
    prefix: String,
    leaf: &'s str,
    ordinal: u64,
    out_f: usize,
    bias: bool,
}

/// Per-conversation key/value cache for incremental decoding.
pub struct KvCache {
    /// Per layer `(k, v)`, each `[len, kv_heads, head_dim]` (post-RoPE keys).
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

/// The decoder: parameters in compute dtype and the gradient-slot map.
pub struct Decoder {
    cfg: ModelConfig,
    dtype: DType,
    device: Device,
    params: Vec<Tensor>,
    /// Parameter index -> its NF4 form; `params` then holds an empty placeholder.
    nf4: Vec<Option<Nf4Weight>>,
    names: Vec<String>,
    /// Parameter index -> gradient slot (None = frozen).
    slot_of: Vec<Option<usize>>,
    /// Gradient slot -> parameter index.
    slot_param: Vec<usize>,
    trainable: Vec<TrainableInfo>,
    /// LoRA mode: the f32 initial value of every slot (exact, not a round trip through bf16).
    lora_init: Vec<Tensor>,
    lora_scale: f64,
    lora_dropout: f64,
    embed: usize,
    blocks: Vec<Block>,
    final_norm: usize,
    /// Equals `embed` with tied embeddings.
    head: usize,
    ce_chunk_rows: usize,
    /// The gradient buffer's dtype: f32 (`acc_dtype`), or the compute dtype when every value is
    /// written once per step (see [`Decoder::set_one_write_grads`]).
    grad_dtype: DType,
    /// Bytes of block activations a checkpointed forward keeps anyway: the last blocks whose
    /// activations fit skip their recompute in the backward (see [`Decoder::set_activation_budget`]).
    activation_budget: usize,
    /// One buffer the size of the largest NF4 weight that the training matmuls dequantize into,
    /// one weight at a time: no allocation per use, and no weight-sized holes left in the memory
    /// pool between the activations kept for the backward (its fragmentation is device memory).
    dequant_scratch: std::sync::Mutex<Option<Tensor>>,
    /// RoPE angles by position, gathered per batch.
    rope: RopeCache,
    /// The flat `[N]` trainables in the compute dtype that `params` holds views of (set with
    /// them): the stacked LoRA A's of a projection group are one view of it.
    trainable_flat: Option<Tensor>,
    /// Per trainable slot: its offset in the flat trainables (and the gradient buffer).
    slot_offsets: Vec<usize>,
}

/// A weight ready for a matmul (see `Decoder::matmul_weight`): derefs to the tensor and keeps the
/// dequantization scratch it may live in locked while alive.
struct MatmulWeight<'a> {
    weight: Tensor,
    _scratch: Option<std::sync::MutexGuard<'a, Option<Tensor>>>,
}

impl std::ops::Deref for MatmulWeight<'_> {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.weight
    }
}

/// Leaf names of the linears of a block, per architecture, in block order.
fn linear_leaves(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Llama | Arch::Qwen2 => &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        Arch::InternLM2 => &["wqkv", "wo", "w1", "w3", "w2"],
    }
}

/// Builds the parameter table while the decoder is assembled.
struct Builder<'a> {
    weights: &'a mut dyn WeightSource,
    dtype: DType,
    device: Device,
    full: bool,
    lora: Option<LoraSpec>,
    quant: Option<QuantSpec>,
    seed: u64,
    params: Vec<Tensor>,
    nf4: Vec<Option<Nf4Weight>>,
    names: Vec<String>,
    slot_of: Vec<Option<usize>>,
    slot_param: Vec<usize>,
    trainable: Vec<TrainableInfo>,
    /// LoRA initial values (host, f32) and the parameter index of each.
    lora_init: Vec<Tensor>,
    lora_param_idx: Vec<usize>,
}

impl Builder<'_> {
    fn push(&mut self, name: String, value: Tensor, trainable: bool) -> usize {
        let idx = self.params.len();
        if trainable {
            self.slot_of.push(Some(self.trainable.len()));
            self.slot_param.push(idx);
            self.trainable.push(TrainableInfo {
                name: name.clone(),
                shape: value.dims().to_vec(),
                decay: value.rank() >= 2,
            });
        } else {
            self.slot_of.push(None);
        }
        self.nf4.push(None);
        self.params.push(value);
        self.names.push(name);
        idx
    }

    /// Takes `name` out of the weight source and checks its shape.
    fn take_raw(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.weights.take(name)?.with_context(|| {
            format!("weight `{name}` (shape {shape:?}) is missing from the checkpoint")
        })?;
        if t.dims() != shape {
            bail!(
                "weight `{name}` has shape {:?}, the model config expects {shape:?}",
                t.dims()
            );
        }
        Ok(t)
    }

    /// Takes `name`, casts it to the compute dtype on the device.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<usize> {
        let device = self.device.clone();
        self.take_on(name, shape, &device)
    }

    /// [`Builder::take`] onto `device`.
    fn take_on(&mut self, name: &str, shape: &[usize], device: &Device) -> Result<usize> {
        let t = self.take_raw(name, shape)?;
        // Cast on the host: a device copy in the checkpoint's dtype would be freed at once and
        // leave a hole between the weights in the memory pool.
        let t = t.to_dtype(self.dtype)?.to_device(device)?;
        let full = self.full;
        Ok(self.push(name.to_string(), t, full))
    }

    /// A linear weight: NF4 under QLoRA (quantized on the host as it is streamed in, so only
    /// the packed form reaches the device), else as [`Builder::take`].
    fn take_linear(&mut self, name: &str, shape: &[usize]) -> Result<usize> {
        let Some(q) = self.quant else {
            return self.take(name, shape);
        };
        let t = self.take_raw(name, shape)?;
        let w = Nf4Weight::quantize(&t, q.double_quant, &self.device)
            .with_context(|| format!("quantizing `{name}` to NF4"))?;
        drop(t);
        let placeholder = Tensor::zeros(0, self.dtype, &self.device)?;
        let idx = self.push(name.to_string(), placeholder, false);
        self.nf4[idx] = Some(w);
        Ok(idx)
    }

    /// A trainable adapter weight `{prefix}.{which}.weight`, its host init kept for the upload.
    fn push_lora(&mut self, prefix: &str, which: &str, init: Tensor) -> usize {
        let idx = self.push(format!("{prefix}.{which}.weight"), init.clone(), true);
        self.lora_init.push(init);
        self.lora_param_idx.push(idx);
        idx
    }

    /// Projections that read the same input `[n, in_f]`: every base weight (+ bias) first, then
    /// the A of each targeted one, then their B's, so that the group's A's are adjacent trainables
    /// (one `[G·r, in]` view of the flat buffer and of its gradient).
    fn group(&mut self, in_f: usize, specs: &[ProjSpec]) -> Result<ProjGroup> {
        let mut projs = Vec::with_capacity(specs.len());
        for spec in specs {
            let prefix = &spec.prefix;
            let weight = self.take_linear(&format!("{prefix}.weight"), &[spec.out_f, in_f])?;
            let bias = if spec.bias {
                Some(self.take(&format!("{prefix}.bias"), &[spec.out_f])?)
            } else {
                None
            };
            projs.push(Proj {
                weight,
                bias,
                lora: None,
                ordinal: spec.ordinal,
            });
        }
        let Some((r, targets)) = self.lora.as_ref().map(|l| (l.r, l.targets.clone())) else {
            return Ok(ProjGroup {
                projs,
                a_stack: None,
            });
        };
        let targeted: Vec<usize> = (0..specs.len())
            .filter(|&i| targets.is_empty() || targets.iter().any(|t| t == specs[i].leaf))
            .collect();
        // The init stays on the host (f32) until the whole model is loaded: device copies made
        // here would sit between the base weights (see `upload_flat`).
        let mut a_params = Vec::with_capacity(targeted.len());
        for &i in &targeted {
            let a_seed = mix_seed(self.seed, self.params.len() as u64);
            let a = lora_a_init(r, in_f, a_seed, &Device::Cpu)?; // [r, in] f32
            a_params.push(self.push_lora(&specs[i].prefix, "lora_A", a));
        }
        for (&i, &ai) in targeted.iter().zip(&a_params) {
            let b = Tensor::zeros((specs[i].out_f, r), DType::F32, &Device::Cpu)?; // [out, r]
            projs[i].lora = Some((ai, self.push_lora(&specs[i].prefix, "lora_B", b)));
        }
        let a_stack = a_params
            .first()
            .and_then(|&ai| self.slot_of[ai])
            .map(|slot| (slot, r * targeted.len(), in_f));
        Ok(ProjGroup { projs, a_stack })
    }
}

/// `values` (host tensors) on `device` in `dtype`, uploaded as one flat buffer and returned with
/// views of it in their shapes: one device allocation instead of one per tensor, so that freeing
/// them together gives the memory pool back one contiguous block. No buffer for no values.
fn upload_flat(
    values: &[Tensor],
    device: &Device,
    dtype: DType,
) -> Result<(Option<Tensor>, Vec<Tensor>)> {
    if values.is_empty() {
        return Ok((None, vec![]));
    }
    let flat: Vec<Tensor> = values
        .iter()
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    let all = Tensor::cat(&flat, 0)?.to_dtype(dtype)?.to_device(device)?; // [N]
    let views = crate::model::flat_views(&all, values.iter().map(|t| t.dims()))?;
    Ok((Some(all), views))
}

/// Activations of the attention half of a block that its backward needs.
struct AttnActs {
    /// The normed input; `None` once [`BlockActs::slim`] dropped it (recomputed from `x`).
    h1: Option<Tensor>,
    rstd1: Tensor,
    qkv_saved: Vec<AdapterSaved>,
    /// Post-RoPE `[n, heads, d]` / `[n, kv_heads, d]` as attention saw them (under sequence
    /// parallelism: the whole sequence's `[n, heads/sp, d]` after the Ulysses exchange).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// `[n, heads, d]` (sequence parallel: `[n, heads/sp, d]`) and its row log-sum-exp.
    attn: Tensor,
    lse: Tensor,
}

/// Activations of the o-projection + MLP half of a block.
struct TailActs {
    /// Attention output flattened to `[n, heads·d]`.
    attn_flat: Tensor,
    o_saved: Vec<AdapterSaved>,
    /// Residual stream after attention `[n, h]`.
    x2: Tensor,
    rstd2: Tensor,
    /// The gate/up half; `None` once dropped ([`BlockActs::drop_mlp`]): the backward runs it
    /// again from `x2`.
    mlp: Option<MlpActs>,
    /// The block's dropout seed, for that rerun.
    seed: Option<u64>,
    down_saved: Vec<AdapterSaved>,
}

/// The post-attention norm and the gate/up projections of a block, and their SwiGLU product.
struct MlpActs {
    /// `None` once slimmed (recomputed from `x2`).
    h2: Option<Tensor>,
    /// `[n, inter]` each.
    g: Tensor,
    u: Tensor,
    gate_up_saved: Vec<AdapterSaved>,
    /// SwiGLU output `[n, inter]`; `None` once slimmed (recomputed from `g` and `u`).
    m: Option<Tensor>,
}

struct BlockActs {
    x: Tensor,
    attn: AttnActs,
    tail: TailActs,
}

/// How much of a block's activations the forward keeps for the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// Everything.
    Whole,
    /// All but the two norms' outputs and the SwiGLU product (elementwise passes to redo).
    Slim,
    /// The attention half, slimmed: the backward runs the gate/up projections again.
    Attention,
}

impl BlockActs {
    /// Drops what the backward recomputes cheaply (two norms and the SwiGLU product: elementwise
    /// passes, against the block's GEMMs and attention): a third less memory per kept block.
    fn slim(&mut self) {
        self.attn.h1 = None;
        if let Some(mlp) = &mut self.tail.mlp {
            mlp.h2 = None;
            mlp.m = None;
        }
    }

    /// Also drops the gate/up half (its `[n, inter]` outputs): the backward runs it again.
    fn drop_mlp(&mut self) {
        self.slim();
        self.tail.mlp = None;
    }

    /// Device bytes these activations would hold kept as `keep`; a storage several of them
    /// share (the attention output and its flattened view) counts once.
    fn bytes(&self, keep: Keep) -> usize {
        let (a, t) = (&self.attn, &self.tail);
        let mut tensors = vec![
            &self.x,
            &a.rstd1,
            &a.q,
            &a.k,
            &a.v,
            &a.attn,
            &a.lse,
            &t.attn_flat,
            &t.x2,
            &t.rstd2,
        ];
        let mut saved = vec![&a.qkv_saved, &t.o_saved, &t.down_saved];
        if keep == Keep::Whole {
            tensors.extend(a.h1.iter());
        }
        if let (Some(m), false) = (&t.mlp, keep == Keep::Attention) {
            tensors.extend([&m.g, &m.u]);
            if keep == Keep::Whole {
                tensors.extend(m.h2.iter().chain(m.m.iter()));
            }
            saved.push(&m.gate_up_saved);
        }
        tensors.extend(saved.into_iter().flatten().map(|s| &s.saved.axt));
        let mut seen: Vec<*const candle_core::Storage> = Vec::with_capacity(tensors.len());
        let mut bytes = 0;
        for t in tensors {
            let storage: *const candle_core::Storage = &*t.storage_and_layout().0;
            if !seen.contains(&storage) {
                seen.push(storage);
                bytes += t.elem_count() * t.dtype().size_in_bytes();
            }
        }
        bytes
    }
}

/// What the forward keeps per block: everything, or only the input (checkpointing).
enum Kept {
    Input(Tensor),
    Acts(Box<BlockActs>),
}

/// Which blocks the forward keeps how much of (see [`Decoder::set_activation_budget`]): blocks
/// `..recompute` keep only their input and run their forward again in the backward; the next
/// `attention_only` keep the attention half ([`Keep::Attention`]) and rerun the gate/up half;
/// the rest keep everything, slimmed when `slim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockPlan {
    recompute: usize,
    attention_only: usize,
    slim: bool,
}

impl BlockPlan {
    /// `recompute` blocks recomputed, the next `attention_only` attention-only, the rest slimmed.
    fn slimmed(recompute: usize, attention_only: usize) -> BlockPlan {
        BlockPlan {
            recompute,
            attention_only,
            slim: true,
        }
    }

    fn keep(&self, block: usize) -> Option<Keep> {
        if block < self.recompute {
            None
        } else if block < self.recompute + self.attention_only {
            Some(Keep::Attention)
        } else if self.slim {
            Some(Keep::Slim)
        } else {
            Some(Keep::Whole)
        }
    }
}

/// Bytes of one block's activations kept as each [`Keep`], and of its input alone.
#[derive(Debug, Clone, Copy)]
struct BlockBytes {
    whole: usize,
    slim: usize,
    attention: usize,
    input: usize,
}

/// The plan with the least recompute whose kept activations fit `budget`: every block whole
/// when they all fit so, else the mix of slimmed, attention-only and recomputed blocks (input
/// only) with the least rerun work, a rerun gate/up half costing `gate_up_share` of a block's
/// forward. Without checkpointing every block is kept, slimmed.
fn plan_blocks(
    layers: usize,
    checkpointing: bool,
    budget: usize,
    b: BlockBytes,
    gate_up_share: f64,
) -> BlockPlan {
    let all_slim = BlockPlan::slimmed(0, 0);
    if !checkpointing {
        return all_slim;
    }
    if b.whole.saturating_mul(layers) <= budget {
        return BlockPlan {
            slim: false,
            ..all_slim
        };
    }
    let mut best = BlockPlan::slimmed(layers, 0);
    let mut best_cost = layers as f64;
    for slim in 0..=layers {
        for attention_only in 0..=layers - slim {
            let recompute = layers - slim - attention_only;
            let bytes = [
                (slim, b.slim),
                (attention_only, b.attention),
                (recompute, b.input),
            ]
            .iter()
            .fold(0usize, |acc, &(count, each)| {
                acc.saturating_add(count.saturating_mul(each))
            });
            let cost = recompute as f64 + attention_only as f64 * gate_up_share;
            if bytes <= budget && cost < best_cost {
                (best, best_cost) = (BlockPlan::slimmed(recompute, attention_only), cost);
            }
        }
    }
    best
}

/// Batch tensors shared by all blocks.
struct BatchCtx<'a> {
    ids: Tensor,
    /// `[n, head_dim]` in compute dtype.
    cos: Tensor,
    sin: Tensor,
    /// Of the whole sequence (under sequence parallelism longer than this rank's tokens).
    cu_seqlens: &'a [u32],
    /// The sequence-parallel group when this rank holds one piece of the sequence.
    sp: Option<&'a dyn Collectives>,
}

impl BatchCtx<'_> {
    /// Before attention: this rank's tokens with all heads -> all tokens with this rank's heads
    /// (the identity without sequence parallelism).
    fn scatter_heads<const N: usize>(&self, xs: [Tensor; N]) -> Result<[Tensor; N]> {
        match self.sp {
            Some(sp) => scope(self.ids.device(), "ulysses_scatter", || {
                ulysses::scatter_heads(sp, xs.each_ref())
            }),
            None => Ok(xs),
        }
    }

    /// After attention: the inverse of [`BatchCtx::scatter_heads`].
    fn gather_heads<const N: usize>(&self, xs: [Tensor; N]) -> Result<[Tensor; N]> {
        match self.sp {
            Some(sp) => scope(self.ids.device(), "ulysses_gather", || {
                ulysses::gather_heads(sp, xs.each_ref())
            }),
            None => Ok(xs),
        }
    }
}

/// The trained rows of a batch and their target ids (see `lm_head::shifted_targets`).
type RowTargets = (Vec<u32>, Vec<u32>);

impl Decoder {
    /// Builds the decoder from HF-named weights, taking them out of `weights` and casting them to
    /// `compute_dtype` on `device`. LoRA `A` matrices are drawn from `seed`.
    pub fn new(
        cfg: &ModelConfig,
        weights: &mut dyn WeightSource,
        mode: TrainMode,
        compute_dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Decoder> {
        Self::new_quantized(cfg, weights, mode, None, compute_dtype, device, seed)
    }

    /// [`Decoder::new`] with the block linears stored as NF4 when `quant` is given (QLoRA, or a
    /// 4-bit model for inference). Full fine-tuning cannot train quantized weights.
    pub fn new_quantized(
        cfg: &ModelConfig,
        weights: &mut dyn WeightSource,
        mode: TrainMode,
        quant: Option<QuantSpec>,
        compute_dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Decoder> {
        if quant.is_some() && mode == TrainMode::Full {
            bail!(
                "full fine-tuning cannot train 4-bit weights: use method \"qlora\" or drop [quant]"
            );
        }
        let leaves = linear_leaves(cfg.arch);
        let (full, lora) = match mode {
            TrainMode::Frozen => (false, None),
            TrainMode::Full => (true, None),
            TrainMode::Lora(spec) => {
                if spec.r == 0 {
                    bail!("LoRA rank r must be at least 1");
                }
                if !(0.0..1.0).contains(&spec.dropout) {
                    bail!("LoRA dropout {} must be in [0, 1)", spec.dropout);
                }
                if let Some(bad) = spec.targets.iter().find(|t| !leaves.contains(&t.as_str())) {
                    bail!(
                        "LoRA target `{bad}` is not a linear of {:?}; valid targets: {}",
                        cfg.arch,
                        leaves.join(", ")
                    );
                }
                (false, Some(spec))
            }
        };
        if cfg.head_dim % 2 != 0 {
            bail!("head_dim {} must be even for RoPE", cfg.head_dim);
        }
        let (lora_scale, lora_dropout) = lora
            .as_ref()
            .map(|s| (s.alpha / s.r as f64, s.dropout))
            .unwrap_or((0.0, 0.0));
        let mut b = Builder {
            weights,
            dtype: compute_dtype,
            device: device.clone(),
            full,
            lora,
            quant,
            seed,
            params: Vec::new(),
            nf4: Vec::new(),
            names: Vec::new(),
            slot_of: Vec::new(),
            slot_param: Vec::new(),
            trainable: Vec::new(),
            lora_init: Vec::new(),
            lora_param_idx: Vec::new(),
        };
        let (h, v, inter) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let q_out = cfg.num_heads * cfg.head_dim;
        let kv_out = cfg.num_kv_heads * cfg.head_dim;
        // HF Llama's `attention_bias` covers o_proj too; Qwen2 has q/k/v bias only.
        let o_bias = cfg.out_bias || (cfg.arch == Arch::Llama && cfg.qkv_bias);
        let embed_name = match cfg.arch {
            Arch::InternLM2 => "model.tok_embeddings.weight",
            _ => "model.embed_tokens.weight",
        };
        // A frozen embedding table that is not also the LM head is only ever gathered from: it
        // stays in host memory and a batch's rows are copied up (a few MiB), which saves its
        // whole size in device memory (379 MiB for a 92544 x 2048 bf16 table). Loaded straight
        // there: a trip through the device would leave a table-sized hole in its memory pool.
        let embed = if device.is_cuda() && !b.full && !cfg.tie_word_embeddings {
            b.take_on(embed_name, &[v, h], &Device::Cpu)?
        } else {
            b.take(embed_name, &[v, h])?
        };
        // Each architecture's names for a block's tensors: norms, modules, input projections
        // (with their widths), output projection and MLP (gate, up, down).
        let wqkv_out = q_out + 2 * kv_out;
        let (norm1, norm2, attn, mlp, qkv_leaves, o_leaf, [gate, up, down], qkv_layout) =
            match cfg.arch {
                Arch::Llama | Arch::Qwen2 => (
                    "input_layernorm",
                    "post_attention_layernorm",
                    "self_attn",
                    "mlp",
                    vec![("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)],
                    "o_proj",
                    ["gate_proj", "up_proj", "down_proj"],
                    QkvLayout::Separate,
                ),
                Arch::InternLM2 => (
                    "attention_norm",
                    "ffn_norm",
                    "attention",
                    "feed_forward",
                    vec![("wqkv", wqkv_out)],
                    "wo",
                    ["w1", "w3", "w2"],
                    QkvLayout::Fused,
                ),
            };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            // Ordinals number the block's linears in order (they decorrelate dropout masks).
            let spec = |module: &str, leaf, ordinal: usize, out_f, bias| ProjSpec {
                prefix: format!("{p}.{module}.{leaf}"),
                leaf,
                ordinal: ordinal as u64,
                out_f,
                bias,
            };
            let attn_norm = b.take(&format!("{p}.{norm1}.weight"), &[h])?;
            let qkv_specs: Vec<ProjSpec> = qkv_leaves
                .iter()
                .enumerate()
                .map(|(j, &(leaf, out_f))| spec(attn, leaf, j, out_f, cfg.qkv_bias))
                .collect();
            let n = qkv_specs.len();
            let qkv = b.group(h, &qkv_specs)?;
            let o = b.group(q_out, &[spec(attn, o_leaf, n, h, o_bias)])?;
            let ffn_norm = b.take(&format!("{p}.{norm2}.weight"), &[h])?;
            let ob = cfg.out_bias;
            let gate_up = b.group(
                h,
                &[
                    spec(mlp, gate, n + 1, inter, ob),
                    spec(mlp, up, n + 2, inter, ob),
                ],
            )?;
            let down = b.group(inter, &[spec(mlp, down, n + 3, h, ob)])?;
            blocks.push(Block {
                attn_norm,
                qkv,
                qkv_layout,
                o,
                ffn_norm,
                gate_up,
                down,
            });
        }
        let final_norm = b.take("model.norm.weight", &[h])?;
        let head = if cfg.tie_word_embeddings {
            embed
        } else {
            let head_name = match cfg.arch {
                Arch::InternLM2 => "output.weight",
                _ => "lm_head.weight",
            };
            b.take(head_name, &[v, h])?
        };
        let mut params = b.params;
        // The LoRA weights in the compute dtype, made now from the host init in one upload: one
        // contiguous device block after the base weights, not holes between them once the
        // optimizer's master views replace these copies.
        let (lora_flat, lora_values) = upload_flat(&b.lora_init, device, compute_dtype)?;
        for (&idx, value) in b.lora_param_idx.iter().zip(lora_values) {
            params[idx] = value;
        }
        // The adapters are all the trainables, in their order: the flat upload is the flat
        // trainables the grouped adapter GEMMs take their stacked A's from.
        let trainable_flat = lora_flat.filter(|_| b.lora_param_idx == b.slot_param);
        let slot_offsets = b
            .trainable
            .iter()
            .scan(0, |offset, t| {
                let here = *offset;
                *offset += t.shape.iter().product::<usize>();
                Some(here)
            })
            .collect();
        Ok(Decoder {
            cfg: cfg.clone(),
            dtype: compute_dtype,
            device: device.clone(),
            params,
            nf4: b.nf4,
            names: b.names,
            slot_of: b.slot_of,
            slot_param: b.slot_param,
            trainable: b.trainable,
            lora_init: b.lora_init,
            lora_scale,
            lora_dropout,
            embed,
            blocks,
            final_norm,
            head,
            ce_chunk_rows: ce_chunk_rows_for(cfg.vocab_size, compute_dtype),
            grad_dtype: acc_dtype(compute_dtype),
            activation_budget: 0,
            dequant_scratch: std::sync::Mutex::new(None),
            rope: RopeCache::new(cfg.head_dim, cfg.rope_theta, compute_dtype, device),
            trainable_flat,
            slot_offsets,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn compute_dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Gradients in the compute dtype (bf16) instead of f32, for steps whose gradient is written
    /// once: one micro-batch on one rank (the caller's knowledge). Each weight gradient then
    /// leaves its GEMM's f32 accumulator rounded once, as under PyTorch's bf16 autocast, whose
    /// weight gradients are bf16 products cast to the f32 `.grad`; the norms' and the
    /// embedding's f32 sums are rounded once when added, and a trained head's chunks add up in an
    /// f32 scratch first. That halves the gradient buffer (3.5 GiB at 1.8B) and its traffic
    /// (the GEMMs' writes, the clipping norm, AdamW's read); master weights and moments stay f32.
    /// Only full fine-tuning of an untied model takes it (adapters' gradients are small and some
    /// take several contributions; a tied head also takes the embedding's). Returns whether the
    /// gradients are now in the compute dtype; `false` sets them back to f32.
    pub fn set_one_write_grads(&mut self, on: bool) -> bool {
        let full = self.slot_of.iter().all(Option::is_some);
        let applies = on && full && self.head != self.embed && self.dtype != DType::F32;
        self.grad_dtype = if applies {
            self.dtype
        } else {
            acc_dtype(self.dtype)
        };
        applies
    }

    /// Rows per LM-head/cross-entropy chunk (default [`ce_chunk_rows_for`] the vocabulary).
    pub fn set_ce_chunk_rows(&mut self, rows: usize) {
        self.ce_chunk_rows = rows.max(1);
    }

    /// With activation checkpointing, keep activations within `bytes` (measured on the step's
    /// first block) instead of recomputing them: blocks then skip their forward, or the gate/up
    /// half of it, in the backward (see [`plan_blocks`]). Gradients are the same either way;
    /// this trades device memory for the recompute. 0 = recompute every block.
    pub fn set_activation_budget(&mut self, bytes: usize) {
        self.activation_budget = bytes;
    }

    /// The cost of rerunning a block's gate/up half against its whole forward, from FLOPs per
    /// token: the linears' weights, and attention over the batch's mean causal context, counted
    /// at a quarter of the GEMMs' rate (flash attention runs at ~180 TFLOP/s on an H100, cuBLAS
    /// at ~680).
    fn gate_up_share(&self, cu_seqlens: &[u32]) -> f64 {
        let c = &self.cfg;
        let (h, inter, qd, kvd) = (
            c.hidden_size as f64,
            c.intermediate_size as f64,
            (c.num_heads * c.head_dim) as f64,
            (c.num_kv_heads * c.head_dim) as f64,
        );
        let (pairs, tokens) = cu_seqlens.windows(2).fold((0.0, 0.0), |(p, t), w| {
            let len = f64::from(w[1] - w[0]);
            (p + len * (len + 1.0) / 2.0, t + len)
        });
        let mean_keys = if tokens > 0.0 { pairs / tokens } else { 0.0 };
        const ATTENTION_RATE_FACTOR: f64 = 4.0;
        let gate_up = 2.0 * h * inter;
        let linears = h * (qd + 2.0 * kvd) + qd * h + 3.0 * h * inter;
        let attention = ATTENTION_RATE_FACTOR * 2.0 * mean_keys * qd;
        gate_up / (linears + attention)
    }

    pub fn trainable(&self) -> &[TrainableInfo] {
        &self.trainable
    }

    /// Number of trainable values `N` (the flat buffer's length).
    pub fn trainable_numel(&self) -> usize {
        self.trainable
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }

    /// f32 values of the trainables for the optimizer's master copy: the LoRA init, or the
    /// loaded weights (as cast to the compute dtype) in full fine-tuning.
    pub fn initial_trainable_values(&self) -> Result<Vec<Tensor>> {
        if !self.lora_init.is_empty() {
            return Ok(upload_flat(&self.lora_init, &self.device, DType::F32)?.1);
        }
        self.slot_param
            .iter()
            .map(|&p| Ok(self.params[p].to_dtype(DType::F32)?))
            .collect()
    }

    /// Frees the LoRA init kept for [`Decoder::initial_trainable_values`] (f32, as large as the
    /// optimizer's master copy) once the optimizer holds its own copy; afterwards that method
    /// returns the current values.
    pub fn release_initial_values(&mut self) {
        self.lora_init = Vec::new();
    }

    /// Replaces the trainables (any dtype, `trainable()` order) after an optimizer step. Pass
    /// views in the compute dtype (`FlatParams::views`: one cast of the whole master per step):
    /// then no weight is cast per use.
    pub fn set_trainable(&mut self, values: &[Tensor]) -> Result<()> {
        if values.len() != self.trainable.len() {
            bail!(
                "set_trainable got {} tensors for {} trainables",
                values.len(),
                self.trainable.len()
            );
        }
        for (slot, value) in values.iter().enumerate() {
            let info = &self.trainable[slot];
            if value.dims() != info.shape.as_slice() {
                bail!(
                    "set_trainable: `{}` expects shape {:?}, got {:?}",
                    info.name,
                    info.shape,
                    value.dims()
                );
            }
            // Views already in the compute dtype are kept as they are (no copy).
            let p = self.slot_param[slot];
            self.params[p] = value.to_device(&self.device)?.to_dtype(self.dtype)?;
        }
        // Separate tensors: no stacked view of the adapters (see `set_trainable_flat`).
        self.trainable_flat = None;
        Ok(())
    }

    /// [`Decoder::set_trainable`] from the flat `[N]` trainables (the optimizer's layout, any
    /// dtype): the parameters become views of it in the compute dtype (one cast of the whole
    /// buffer when it has another dtype), and so do the projection groups' stacked LoRA A's.
    pub fn set_trainable_flat(&mut self, flat: &Tensor) -> Result<()> {
        let n = self.trainable_numel();
        if flat.dims() != [n] {
            bail!(
                "set_trainable: a flat buffer of shape {:?} for {n} trainable values",
                flat.dims()
            );
        }
        let flat = flat.to_device(&self.device)?.to_dtype(self.dtype)?;
        let views =
            crate::model::flat_views(&flat, self.trainable.iter().map(|t| t.shape.as_slice()))?;
        self.set_trainable(&views)?;
        self.trainable_flat = Some(flat);
        Ok(())
    }

    /// Frozen parameters under their HF names, NF4 weights dequantized (for merging and export).
    pub fn frozen_weights(&self) -> Result<Vec<(String, Tensor)>> {
        (0..self.params.len())
            .filter(|&i| self.slot_of[i].is_none())
            .map(|i| Ok((self.names[i].clone(), self.weight(i)?)))
            .collect()
    }

    pub fn new_grads(&self) -> Grads {
        let shapes: Vec<Vec<usize>> = self.trainable.iter().map(|t| t.shape.clone()).collect();
        Grads::new(&shapes, self.grad_dtype(), &self.device)
    }

    /// Tells `ready` that the gradients of parameters `first_param..` are final.
    fn report_ready(
        &self,
        ready: &mut Option<&mut dyn GradReady>,
        first_param: usize,
        grads: &mut Grads,
    ) -> Result<()> {
        let Some(ready) = ready else { return Ok(()) };
        // The first trainable slot at or after `first_param` (slots follow parameter order).
        let from = self.slot_of[first_param..]
            .iter()
            .find_map(|s| *s)
            .map_or(grads.numel(), |slot| grads.layout[slot].0);
        ready.ready_from(from, grads.buffer()?)
    }

    fn check_grads(&self, grads: &Grads) -> Result<()> {
        if grads.len() != self.trainable.len() || grads.dtype != self.grad_dtype() {
            bail!(
                "grads has {} {:?} slots for {} trainables (use Decoder::new_grads)",
                grads.len(),
                grads.dtype,
                self.trainable.len()
            );
        }
        Ok(())
    }

    /// The gradient buffer's dtype (f32 unless [`Decoder::set_one_write_grads`] applied).
    pub fn grad_dtype(&self) -> DType {
        self.grad_dtype
    }

    fn accumulate(&self, grads: &mut Grads, param: usize, g: &Tensor) -> Result<()> {
        match self.slot_of[param] {
            Some(slot) => grads.add(slot, g),
            None => Ok(()),
        }
    }

    /// A trained parameter's slot of the gradient buffer as a GEMM output (marked as receiving
    /// a contribution) and the `beta` to write it with: its weight gradient goes there straight
    /// from `gemm_into` (f32 from bf16 inputs on a GPU: no temporary, cast or accumulate pass).
    /// `beta` is 0 for the slot's first contribution (the GEMM then only writes: a step with one
    /// micro-batch never reads the weight-sized f32 region back) and 1 after it. None when
    /// `param` is frozen.
    fn grad_out<'g>(
        &self,
        grads: &'g mut Grads,
        param: usize,
    ) -> Result<Option<(GemmOut<'g>, f64)>> {
        let Some(slot) = self.slot_of[param] else {
            return Ok(None);
        };
        let beta = if grads.touched[slot] { 1.0 } else { 0.0 };
        let offset = grads.mark(slot);
        let out = GemmOut {
            buf: grads.buffer()?,
            offset,
        };
        Ok(Some((out, beta)))
    }

    /// Parameter `idx` in the compute dtype: NF4 weights are dequantized into a temporary that
    /// lives only as long as the caller's matmul.
    fn weight(&self, idx: usize) -> Result<Tensor> {
        match &self.nf4[idx] {
            Some(w) => scope(&self.device, "nf4_dequant", || w.dequantize(self.dtype)),
            None => Ok(self.params[idx].clone()),
        }
    }

    /// Parameter `idx` for a matmul. On a GPU an NF4 weight is dequantized into the shared scratch
    /// buffer, which the returned value holds locked until it is dropped: drop it right after
    /// queueing its matmuls (the stream orders the next dequantization after them).
    fn matmul_weight(&self, idx: usize) -> Result<MatmulWeight<'_>> {
        let Some(w) = &self.nf4[idx] else {
            return Ok(MatmulWeight {
                weight: self.params[idx].clone(),
                _scratch: None,
            });
        };
        scope(&self.device, "nf4_dequant", || {
            if !self.device.is_cuda() {
                return Ok(MatmulWeight {
                    weight: w.dequantize(self.dtype)?,
                    _scratch: None,
                });
            }
            let mut scratch = self
                .dequant_scratch
                .lock()
                .map_err(|_| anyhow::anyhow!("dequantization scratch poisoned"))?;
            if scratch.is_none() {
                let largest = self.nf4.iter().flatten().map(Nf4Weight::numel).max();
                *scratch = Some(Tensor::zeros(
                    largest.unwrap_or(0),
                    self.dtype,
                    &self.device,
                )?);
            }
            let buf = scratch.as_ref().expect("allocated above");
            let out = buf.narrow(0, 0, w.numel())?.reshape(w.shape)?; // [out, in]
            let weight = if crate::kernels::nf4::dequantize_into(w, &out)? {
                out
            } else {
                w.dequantize(self.dtype)?
            };
            Ok(MatmulWeight {
                weight,
                _scratch: Some(scratch),
            })
        })
    }

    /// Whether the block linears are NF4.
    pub fn is_quantized(&self) -> bool {
        self.nf4.iter().any(Option::is_some)
    }

    /// Bytes of device memory held by the base weights (NF4 codes and scales counted as stored).
    pub fn weight_bytes(&self) -> usize {
        (0..self.params.len())
            .map(|i| match &self.nf4[i] {
                Some(w) => w.device_bytes(),
                None if !self.params[i].device().same_device(&self.device) => 0,
                None => self.params[i].elem_count() * self.params[i].dtype().size_in_bytes(),
            })
            .sum()
    }

    fn trains(&self, param: usize) -> bool {
        self.slot_of[param].is_some()
    }

    // ---- batch validation -------------------------------------------------------------------

    fn batch_ctx<'a>(&self, batch: &'a Batch) -> Result<BatchCtx<'a>> {
        let n = batch.input_ids.len();
        if n == 0 {
            bail!("empty batch: input_ids has no tokens");
        }
        if batch.labels.len() != n || batch.position_ids.len() != n {
            bail!(
                "batch lengths differ: input_ids {n}, labels {}, position_ids {}",
                batch.labels.len(),
                batch.position_ids.len()
            );
        }
        self.tokens_ctx(
            &batch.input_ids,
            &batch.position_ids,
            &batch.cu_seqlens,
            None,
        )
    }

    /// The context of `ids` at `positions` (equal lengths); `cu_seqlens` covers the whole
    /// sequence: `ids` times the sequence-parallel group's size.
    fn tokens_ctx<'a>(
        &self,
        ids: &[u32],
        positions: &[u32],
        cu_seqlens: &'a [u32],
        sp: Option<&'a dyn Collectives>,
    ) -> Result<BatchCtx<'a>> {
        let n = ids.len();
        if let Some((i, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.cfg.vocab_size)
        {
            bail!(
                "input_ids[{i}] = {id} is not below vocab_size {}",
                self.cfg.vocab_size
            );
        }
        check_cu_seqlens(cu_seqlens, n * sp.map_or(1, |c| c.world()))?;
        let ids = Tensor::from_slice(ids, n, &self.device)?;
        let (cos, sin) = self.rope.tables(positions)?;
        Ok(BatchCtx {
            ids,
            cos,
            sin,
            cu_seqlens,
            sp,
        })
    }

    // ---- projections ----------------------------------------------------------------------------

    /// The group's outputs `y_i = x W_iᵀ (+ b_i) (+ LoRA_i)` for its input `x [n, in]`; dropout
    /// (seeded) only when `dropout_seed` is given (training). The adapters' deltas come first, as
    /// fresh outputs, and each base GEMM adds onto its own (`beta = 1`).
    fn group_forward(
        &self,
        g: &ProjGroup,
        x: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<(Vec<Tensor>, Vec<AdapterSaved>)> {
        let mut deltas: Vec<Option<Tensor>> = vec![None; g.projs.len()];
        let saved = scope(&self.device, "lora_fwd", || {
            self.adapters_forward(g, x, dropout_seed, &mut deltas)
        })?;
        let ys = g
            .projs
            .iter()
            .zip(deltas)
            .map(|(p, delta)| {
                let w = self.matmul_weight(p.weight)?;
                let y = scope(&self.device, "linear_fwd", || match delta {
                    Some(y) => {
                        gemm_into(GemmOut::whole(&y), x, false, &w, true, 1.0, 1.0)?; // y += x·Wᵀ
                        anyhow::Ok(y)
                    }
                    None => gemm(x, false, &w, true), // [n, in]·[in, out]
                })?;
                match p.bias {
                    Some(b) => Ok(y.broadcast_add(&self.params[b])?),
                    None => Ok(y),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((ys, saved))
    }

    /// The group's stacked LoRA A's `[G·r, in]`: a view of the flat trainables (None when the
    /// trainables were set as separate tensors, or the group has no adapter).
    fn stacked_a(&self, g: &ProjGroup) -> Result<Option<Tensor>> {
        let (Some((slot, rows, in_f)), Some(flat)) = (g.a_stack, &self.trainable_flat) else {
            return Ok(None);
        };
        let stack = flat.narrow(0, self.slot_offsets[slot], rows * in_f)?;
        Ok(Some(stack.reshape((rows, in_f))?))
    }

    /// The A of adapter GEMM group `members` of `g`: the stack for several, the one A for one.
    fn members_a(&self, g: &ProjGroup, members: &[usize]) -> Result<Tensor> {
        match members {
            [i] => Ok(self.params[self.lora_of(&g.projs[*i])?.0].clone()),
            _ => self
                .stacked_a(g)?
                .context("grouped adapters without their stacked A's"),
        }
    }

    fn lora_of(&self, p: &Proj) -> Result<(usize, usize)> {
        p.lora
            .with_context(|| format!("`{}` has no LoRA adapter", self.names[p.weight]))
    }

    /// The adapters of `g` on input `x`, their deltas put in `deltas`: one GEMM group for all of
    /// them, unless dropout gives each its own input (or there is no stacked view of their A's).
    fn adapters_forward(
        &self,
        g: &ProjGroup,
        x: &Tensor,
        dropout_seed: Option<u64>,
        deltas: &mut [Option<Tensor>],
    ) -> Result<Vec<AdapterSaved>> {
        let adapted: Vec<usize> = (0..g.projs.len())
            .filter(|&i| g.projs[i].lora.is_some())
            .collect();
        if adapted.is_empty() {
            return Ok(vec![]);
        }
        let dropout = dropout_seed.filter(|_| self.lora_dropout > 0.0);
        let parts: Vec<Vec<usize>> = if dropout.is_none() && self.stacked_a(g)?.is_some() {
            vec![adapted]
        } else {
            adapted.into_iter().map(|i| vec![i]).collect()
        };
        let (n, in_f) = x.dims2()?;
        parts
            .into_iter()
            .map(|members| {
                let a = self.members_a(g, &members)?;
                let bs = members
                    .iter()
                    .map(|&i| Ok(&self.params[self.lora_of(&g.projs[i])?.1]))
                    .collect::<Result<Vec<_>>>()?;
                let mask = match (dropout, members.as_slice()) {
                    (Some(seed), [i]) => dropout_mask(
                        n,
                        in_f,
                        self.lora_dropout,
                        mix_seed(seed, g.projs[*i].ordinal),
                        self.dtype,
                        &self.device,
                    )?,
                    _ => None,
                };
                let (ys, saved) = lora_group_forward(x, &a, &bs, self.lora_scale, mask)?;
                for (&i, y) in members.iter().zip(ys) {
                    deltas[i] = Some(y);
                }
                Ok(AdapterSaved { members, saved })
            })
            .collect()
    }

    /// Returns the gradient of the group's input `x` for upstream `dys` (one per projection, each
    /// dropped once used) and accumulates the gradients of the group's trainables. The adapters'
    /// part of `dx` comes first, fresh; each base projection's GEMM adds onto it (`beta = 1`).
    fn group_backward(
        &self,
        g: &ProjGroup,
        x: &Tensor,
        saved: &[AdapterSaved],
        dys: Vec<Tensor>,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let mut dx: Option<Tensor> = None;
        for part in saved {
            let dxp = scope(&self.device, "lora_bwd", || {
                self.adapters_backward(g, x, part, &dys, grads)
            })?;
            dx = Some(match dx {
                Some(acc) => residual_add(dxp, &acc)?,
                None => dxp,
            });
        }
        for (p, dy) in g.projs.iter().zip(dys) {
            let w = self.matmul_weight(p.weight)?;
            let dw_into = self.grad_out(grads, p.weight)?;
            let db = scope(&self.device, "linear_bwd", || {
                dx = Some(match dx.take() {
                    Some(acc) => {
                        gemm_into(GemmOut::whole(&acc), &dy, false, &w, false, 1.0, 1.0)?; // += dy·W
                        acc
                    }
                    None => gemm(&dy, false, &w, false)?, // [n, out]·[out, in]
                });
                if let Some((out, beta)) = dw_into {
                    // dW = dyᵀ·x + beta·dW: [out, n]·[n, in]
                    gemm_into(out, &dy, true, x, false, 1.0, beta)?;
                }
                let trains_bias = p.bias.is_some_and(|b| self.trains(b));
                anyhow::Ok(if trains_bias { Some(dy.sum(0)?) } else { None }) // [out]
            })?;
            drop(w); // a dequantized NF4 weight dies here, before the next one is made
            if let (Some(db), Some(b)) = (db, p.bias) {
                self.accumulate(grads, b, &db)?;
            }
        }
        dx.context("a projection group without projections")
    }

    /// Backward of one adapter GEMM group (see [`Decoder::adapters_forward`]): accumulates its
    /// A and B gradients and returns its part of the input gradient `[n, in]`, fresh.
    fn adapters_backward(
        &self,
        g: &ProjGroup,
        x: &Tensor,
        part: &AdapterSaved,
        dys: &[Tensor],
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let mut a_offset = None;
        let mut db_offsets = Vec::with_capacity(part.members.len());
        let mut bs = Vec::with_capacity(part.members.len());
        for &i in &part.members {
            let (a, b) = self.lora_of(&g.projs[i])?;
            let (Some(slot_a), Some(slot_b)) = (self.slot_of[a], self.slot_of[b]) else {
                bail!(
                    "LoRA weights of `{}` are not trainable",
                    self.names[g.projs[i].weight]
                );
            };
            // The members' A slots are adjacent: dA of the stack starts at the first one.
            let offset = grads.mark(slot_a);
            a_offset.get_or_insert(offset);
            db_offsets.push(grads.mark(slot_b));
            bs.push(&self.params[b]);
        }
        let a = self.members_a(g, &part.members)?;
        let buf = grads.buffer()?;
        let out = LoraGroupGrads {
            da: GemmOut {
                buf,
                offset: a_offset.context("an adapter group without members")?,
            },
            dbs: db_offsets
                .into_iter()
                .map(|offset| GemmOut { buf, offset })
                .collect(),
        };
        let dys: Vec<&Tensor> = part.members.iter().map(|&i| &dys[i]).collect();
        lora_group_backward(x, &a, &bs, self.lora_scale, &part.saved, &dys, out)
    }

    // ---- block pieces -------------------------------------------------------------------------

    /// q, k, v before RoPE: `[n, heads, d]`, `[n, kv_heads, d]`, `[n, kv_heads, d]`.
    fn qkv_forward(
        &self,
        blk: &Block,
        h1: &Tensor,
        seed: Option<u64>,
    ) -> Result<(Tensor, Tensor, Tensor, Vec<AdapterSaved>)> {
        let n = h1.dim(0)?;
        let (hq, hkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let (ys, saved) = self.group_forward(&blk.qkv, h1, seed)?;
        match (blk.qkv_layout, ys.as_slice()) {
            (QkvLayout::Separate, [qy, ky, vy]) => Ok((
                qy.reshape((n, hq, d))?,
                ky.reshape((n, hkv, d))?,
                vy.reshape((n, hkv, d))?,
                saved,
            )),
            (QkvLayout::Fused, [y]) => {
                let group = hq / hkv;
                let y = y.reshape((n, hkv, group + 2, d))?; // InternLM2 grouped layout
                let q = y.narrow(2, 0, group)?.contiguous()?.reshape((n, hq, d))?;
                let k = y.narrow(2, group, 1)?.contiguous()?.reshape((n, hkv, d))?;
                let v = y
                    .narrow(2, group + 1, 1)?
                    .contiguous()?
                    .reshape((n, hkv, d))?;
                Ok((q, k, v, saved))
            }
            _ => bail!("q/k/v group of {} projections", ys.len()),
        }
    }

    /// Gradient of the block's normed input `h1` from the q/k/v gradients (pre-RoPE).
    fn qkv_backward(
        &self,
        blk: &Block,
        h1: &Tensor,
        saved: &[AdapterSaved],
        (dq, dk, dv): (Tensor, Tensor, Tensor),
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let n = h1.dim(0)?;
        let (hq, hkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let dys = match blk.qkv_layout {
            QkvLayout::Separate => vec![
                dq.reshape((n, hq * d))?,
                dk.reshape((n, hkv * d))?,
                dv.reshape((n, hkv * d))?,
            ],
            QkvLayout::Fused => {
                let group = hq / hkv;
                let dy = Tensor::cat(
                    &[
                        dq.reshape((n, hkv, group, d))?,
                        dk.reshape((n, hkv, 1, d))?,
                        dv.reshape((n, hkv, 1, d))?,
                    ],
                    2,
                )? // [n, kv, group + 2, d]
                .reshape((n, (hq + 2 * hkv) * d))?;
                vec![dy]
            }
        };
        self.group_backward(&blk.qkv, h1, saved, dys, grads)
    }

    /// o-projection, residual, post-attention norm, SwiGLU MLP, residual. `attn [n, heads, d]`.
    fn tail_forward(
        &self,
        blk: &Block,
        x: &Tensor,
        attn: &Tensor,
        seed: Option<u64>,
    ) -> Result<(Tensor, TailActs)> {
        let n = x.dim(0)?;
        let attn_flat = attn.reshape((n, self.cfg.num_heads * self.cfg.head_dim))?;
        let (o, o_saved) = self.group_forward(&blk.o, &attn_flat, seed)?;
        let x2 = residual_add(only(o)?, x)?; // [n, h]
        let (rstd2, mlp) = self.gate_up_forward(blk, &x2, seed)?;
        let m = mlp
            .m
            .as_ref()
            .context("gate_up_forward keeps the SwiGLU product")?;
        let (down, down_saved) = self.group_forward(&blk.down, m, seed)?;
        let out = residual_add(only(down)?, &x2)?; // [n, h]
        Ok((
            out,
            TailActs {
                attn_flat,
                o_saved,
                x2,
                rstd2,
                mlp: Some(mlp),
                seed,
                down_saved,
            },
        ))
    }

    /// Post-attention norm, gate/up projections and their SwiGLU product from the residual
    /// stream `x2 [n, h]`: in the forward, and again in the backward of a block whose MLP half
    /// was dropped (same `seed`, same values).
    fn gate_up_forward(
        &self,
        blk: &Block,
        x2: &Tensor,
        seed: Option<u64>,
    ) -> Result<(Tensor, MlpActs)> {
        let (h2, rstd2) = scope(&self.device, "rmsnorm_fwd", || {
            rmsnorm_forward(x2, &self.params[blk.ffn_norm], self.cfg.rms_norm_eps)
        })?;
        let (gu, gate_up_saved) = self.group_forward(&blk.gate_up, &h2, seed)?;
        let [g, u]: [Tensor; 2] = gu
            .try_into()
            .map_err(|_| anyhow::anyhow!("the gate/up group is not two projections"))?; // [n, inter]
        let m = scope(&self.device, "swiglu_fwd", || swiglu_forward(&g, &u))?;
        Ok((
            rstd2,
            MlpActs {
                h2: Some(h2),
                g,
                u,
                gate_up_saved,
                m: Some(m),
            },
        ))
    }

    /// Full block forward over a packed batch; `seed` = the block's dropout seed (training).
    fn block_forward(
        &self,
        blk: &Block,
        x: &Tensor,
        ctx: &BatchCtx,
        seed: Option<u64>,
    ) -> Result<(Tensor, BlockActs)> {
        let dev = &self.device;
        let (h1, rstd1) = scope(dev, "rmsnorm_fwd", || {
            rmsnorm_forward(x, &self.params[blk.attn_norm], self.cfg.rms_norm_eps)
        })?;
        let (q, k, v, qkv_saved) = self.qkv_forward(blk, &h1, seed)?;
        // `move`: the pre-RoPE q and k die here instead of living on, shadowed, to the end.
        let (q, k) = scope(dev, "rope_fwd", move || {
            Ok::<_, candle_core::Error>((
                rope_forward(&q, &ctx.cos, &ctx.sin)?,
                rope_forward(&k, &ctx.cos, &ctx.sin)?,
            ))
        })?;
        let [q, k, v] = ctx.scatter_heads([q, k, v])?;
        let (attn, lse) = scope(dev, "attn_fwd", || {
            attention_forward(&q, &k, &v, ctx.cu_seqlens)
        })?;
        let [attn_tokens] = ctx.gather_heads([attn.clone()])?; // [n, heads, d]
        let (out, tail) = self.tail_forward(blk, x, &attn_tokens, seed)?;
        let acts = BlockActs {
            x: x.clone(),
            attn: AttnActs {
                h1: Some(h1),
                rstd1,
                qkv_saved,
                q,
                k,
                v,
                attn,
                lse,
            },
            tail,
        };
        Ok((out, acts))
    }

    /// Block backward: returns the gradient of the block input for upstream `dout [n, h]`.
    fn block_backward(
        &self,
        blk: &Block,
        acts: BlockActs,
        dout: Tensor,
        ctx: &BatchCtx,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        // Every activation and gradient is dropped as soon as nothing reads it any more: the
        // step's peak memory is inside this function, and a tensor kept to the end of it (the
        // MLP's `[n, intermediate]` ones during the attention half) only raises it.
        let BlockActs {
            x,
            attn: a,
            tail: t,
        } = acts;
        // MLP half: out = x2 + down(swiglu(gate(h2), up(h2))), h2 = norm(x2)
        let eps = self.cfg.rms_norm_eps;
        let mlp = match t.mlp {
            Some(mlp) => mlp,
            None => self.gate_up_forward(blk, &t.x2, t.seed)?.1,
        };
        let m = match mlp.m {
            Some(m) => m,
            None => scope(&self.device, "swiglu_fwd", || {
                swiglu_forward(&mlp.g, &mlp.u)
            })?,
        };
        let dm = self.group_backward(&blk.down, &m, &t.down_saved, vec![dout.clone()], grads)?;
        drop((m, t.down_saved));
        let (dg, du) = scope(&self.device, "swiglu_bwd", || {
            swiglu_backward(&mlp.g, &mlp.u, &dm)
        })?;
        drop((dm, mlp.g, mlp.u));
        let ffn_w = &self.params[blk.ffn_norm];
        let h2 = match mlp.h2 {
            Some(h2) => h2,
            None => {
                scope(&self.device, "rmsnorm_fwd", || {
                    rmsnorm_forward(&t.x2, ffn_w, eps)
                })?
                .0
            }
        };
        let dh2 =
            self.group_backward(&blk.gate_up, &h2, &mlp.gate_up_saved, vec![dg, du], grads)?;
        drop((mlp.gate_up_saved, h2));
        let (dx2_norm, dw2) = scope(&self.device, "rmsnorm_bwd", || {
            rmsnorm_backward(&t.x2, ffn_w, &t.rstd2, &dh2, self.trains(blk.ffn_norm))
        })?;
        drop((dh2, t.x2, t.rstd2));
        if let Some(dw) = dw2 {
            self.accumulate(grads, blk.ffn_norm, &dw)?;
        }
        let dx2 = residual_add(dx2_norm, &dout)?;
        drop(dout);
        // attention half: x2 = x + o(attn(rope(q), rope(k), v)), q/k/v = proj(norm(x))
        let dattn_flat =
            self.group_backward(&blk.o, &t.attn_flat, &t.o_saved, vec![dx2.clone()], grads)?;
        drop((t.attn_flat, t.o_saved));
        let (n, heads, d) = (dx2.dim(0)?, self.cfg.num_heads, self.cfg.head_dim);
        let [dattn] = ctx.scatter_heads([dattn_flat.reshape((n, heads, d))?])?;
        drop(dattn_flat);
        let (dq, dk, dv) = scope(&self.device, "attn_bwd", || {
            attention_backward(&a.q, &a.k, &a.v, &a.attn, &a.lse, &dattn, ctx.cu_seqlens)
        })?;
        drop((dattn, a.q, a.k, a.v, a.attn, a.lse));
        let [dq, dk, dv] = ctx.gather_heads([dq, dk, dv])?;
        let (dq, dk) = scope(&self.device, "rope_bwd", move || {
            Ok::<_, candle_core::Error>((
                rope_backward(&dq, &ctx.cos, &ctx.sin)?,
                rope_backward(&dk, &ctx.cos, &ctx.sin)?,
            ))
        })?;
        let attn_w = &self.params[blk.attn_norm];
        let h1 = match a.h1 {
            Some(h1) => h1,
            None => {
                scope(&self.device, "rmsnorm_fwd", || {
                    rmsnorm_forward(&x, attn_w, eps)
                })?
                .0
            }
        };
        let dh1 = self.qkv_backward(blk, &h1, &a.qkv_saved, (dq, dk, dv), grads)?;
        drop((h1, a.qkv_saved));
        let (dx_norm, dw1) = scope(&self.device, "rmsnorm_bwd", || {
            rmsnorm_backward(&x, attn_w, &a.rstd1, &dh1, self.trains(blk.attn_norm))
        })?;
        if let Some(dw) = dw1 {
            self.accumulate(grads, blk.attn_norm, &dw)?;
        }
        residual_add(dx_norm, &dx2)
    }

    /// Final hidden states `[n, h]` before the final norm, without keeping activations.
    fn forward_hidden(&self, ctx: &BatchCtx) -> Result<Tensor> {
        let mut x = embedding_forward(&ctx.ids, &self.params[self.embed])?;
        for blk in &self.blocks {
            x = self.block_forward(blk, &x, ctx, None)?.0;
        }
        Ok(x)
    }

    fn block_seed(step_seed: u64, layer: usize) -> u64 {
        mix_seed(step_seed, layer as u64 + 1)
    }

    /// Forward and backward of one micro-batch: `grads += d(loss_scale · loss_sum)/dparam`.
    /// LoRA dropout is active, its masks derived from `step_seed`.
    pub fn forward_backward(
        &self,
        batch: &Batch,
        loss_scale: f64,
        grads: &mut Grads,
        step_seed: u64,
        checkpointing: bool,
    ) -> Result<StepStats> {
        self.forward_backward_ready(batch, loss_scale, grads, step_seed, checkpointing, None)
    }

    /// [`Decoder::forward_backward`] reporting to `ready` which gradients are final as the
    /// backward goes (after the head and final norm, then after each block).
    pub fn forward_backward_ready(
        &self,
        batch: &Batch,
        loss_scale: f64,
        grads: &mut Grads,
        step_seed: u64,
        checkpointing: bool,
        ready: Option<&mut dyn GradReady>,
    ) -> Result<StepStats> {
        self.check_grads(grads)?;
        if self.trainable.is_empty() {
            return self.loss(batch);
        }
        let ctx = self.batch_ctx(batch)?;
        let targets = shifted_targets(&batch.labels, self.cfg.vocab_size)?;
        let run = (loss_scale, step_seed, checkpointing);
        self.tokens_forward_backward(&ctx, &targets, run, grads, ready)
    }

    /// [`Decoder::forward_backward`] of one rank's piece of a packed batch under Ulysses
    /// sequence parallelism: every rank of the group `sp` calls it with its own piece of the
    /// same batch ([`SeqPiece::split`]); attention exchanges q/k/v and its output over `sp`.
    /// The returned stats and the gradients added to `grads` are this piece's share: summed
    /// over the group they are those of the whole batch.
    pub fn forward_backward_sp(
        &self,
        piece: &SeqPiece,
        sp: &dyn Collectives,
        loss_scale: f64,
        grads: &mut Grads,
        step_seed: u64,
        checkpointing: bool,
    ) -> Result<StepStats> {
        let run = (loss_scale, step_seed, checkpointing);
        self.forward_backward_sp_ready(piece, sp, run, grads, None)
    }

    /// [`Decoder::forward_backward_sp`] reporting final gradients to `ready` (see
    /// [`Decoder::forward_backward_ready`]); `run` is `(loss_scale, step_seed, checkpointing)`.
    pub fn forward_backward_sp_ready(
        &self,
        piece: &SeqPiece,
        sp: &dyn Collectives,
        run: (f64, u64, bool),
        grads: &mut Grads,
        ready: Option<&mut dyn GradReady>,
    ) -> Result<StepStats> {
        self.check_grads(grads)?;
        ulysses::check_heads(self.cfg.num_heads, self.cfg.num_kv_heads, sp.world())?;
        piece.check(sp)?;
        let ctx = self.tokens_ctx(
            &piece.input_ids,
            &piece.position_ids,
            &piece.cu_seqlens,
            Some(sp),
        )?;
        let targets = row_targets(&piece.targets, self.cfg.vocab_size)?;
        self.tokens_forward_backward(&ctx, &targets, run, grads, ready)
    }

    /// Embedding, blocks, head + loss and back, from the batch's token ids; `run` is
    /// `(loss_scale, step_seed, checkpointing)`.
    fn tokens_forward_backward(
        &self,
        ctx: &BatchCtx,
        targets: &RowTargets,
        (loss_scale, step_seed, checkpointing): (f64, u64, bool),
        grads: &mut Grads,
        ready: Option<&mut dyn GradReady>,
    ) -> Result<StepStats> {
        let x0 = embedding_forward(&ctx.ids, &self.params[self.embed])?; // [n, h]
        let (stats, dx0) = self.stack_forward_backward(
            ctx,
            x0,
            targets,
            loss_scale,
            grads,
            step_seed,
            checkpointing,
            ready,
        )?;
        if self.trains(self.embed) {
            let dw = embedding_backward(&ctx.ids, &dx0, self.cfg.vocab_size)?;
            self.accumulate(grads, self.embed, &dw)?;
        }
        Ok(stats)
    }

    /// Token embeddings `[n, h]` of `ids` (to splice other rows, e.g. image features, into).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let ids = Tensor::from_slice(ids, ids.len(), &self.device)?;
        Ok(embedding_forward(&ids, &self.params[self.embed])?)
    }

    /// Forward and backward from given input embeddings `x0 [n, h]` (compute dtype) instead of
    /// the token embeddings of `batch.input_ids` (which still give the length and are checked):
    /// adds the decoder's gradients into `grads` and returns the stats and
    /// `d(loss_scale · loss_sum) / d x0` for the caller's own backward (a multimodal projector).
    /// The embedding table gets no gradient here; [`Decoder::embedding_backward_into`] adds one
    /// for the rows the caller took from it.
    pub fn forward_backward_embeds(
        &self,
        x0: &Tensor,
        batch: &Batch,
        loss_scale: f64,
        grads: &mut Grads,
        step_seed: u64,
        checkpointing: bool,
    ) -> Result<(StepStats, Tensor)> {
        self.check_grads(grads)?;
        let ctx = self.batch_ctx(batch)?;
        let (n, h) = (batch.input_ids.len(), self.cfg.hidden_size);
        if x0.dims() != [n, h] {
            bail!(
                "input embeddings have shape {:?}, expected [{n}, {h}]",
                x0.dims()
            );
        }
        let x0 = x0.to_dtype(self.dtype)?;
        let targets = shifted_targets(&batch.labels, self.cfg.vocab_size)?;
        self.stack_forward_backward(
            &ctx,
            x0,
            &targets,
            loss_scale,
            grads,
            step_seed,
            checkpointing,
            None,
        )
    }

    /// Adds the embedding table's gradient for rows `ids` with upstream `dy [len(ids), h]`
    /// (no-op when the embedding is frozen).
    pub fn embedding_backward_into(
        &self,
        ids: &[u32],
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<()> {
        if !self.trains(self.embed) || ids.is_empty() {
            return Ok(());
        }
        let ids = Tensor::from_slice(ids, ids.len(), &self.device)?;
        let dw = embedding_backward(&ids, dy, self.cfg.vocab_size)?;
        self.accumulate(grads, self.embed, &dw)
    }

    /// Blocks, final norm and LM head + CE, forward then backward, from input rows `x0`.
    #[allow(clippy::too_many_arguments)]
    fn stack_forward_backward(
        &self,
        ctx: &BatchCtx,
        x0: Tensor,
        (rows, targets): &RowTargets,
        loss_scale: f64,
        grads: &mut Grads,
        step_seed: u64,
        checkpointing: bool,
        mut ready: Option<&mut dyn GradReady>,
    ) -> Result<(StepStats, Tensor)> {
        // The gradient buffer first: allocated before the activations, not between them.
        grads.buffer()?;
        let mut x = x0; // [n, h]
        let (n, h) = x.dims2()?;
        // What each block keeps is planned on block 0's measured activation bytes
        // (`plan_blocks`). The inputs of the recomputed blocks go into one arena `[blocks, n, h]`:
        // a kept tensor allocated between a block's temporaries would pin a hole in the memory
        // pool at every layer (device memory that is reserved but never usable again).
        let mut plan = None;
        let mut arena = None;
        let mut kept = Vec::with_capacity(self.blocks.len());
        for (li, blk) in self.blocks.iter().enumerate() {
            let (y, mut acts) =
                self.block_forward(blk, &x, ctx, Some(Self::block_seed(step_seed, li)))?;
            let plan = *plan.get_or_insert_with(|| {
                let bytes = BlockBytes {
                    whole: acts.bytes(Keep::Whole),
                    slim: acts.bytes(Keep::Slim),
                    attention: acts.bytes(Keep::Attention),
                    input: n * h * x.dtype().size_in_bytes(),
                };
                let share = self.gate_up_share(ctx.cu_seqlens);
                let layers = self.blocks.len();
                plan_blocks(layers, checkpointing, self.activation_budget, bytes, share)
            });
            match plan.keep(li) {
                Some(keep) => {
                    match keep {
                        Keep::Whole => {}
                        Keep::Slim => acts.slim(),
                        Keep::Attention => acts.drop_mlp(),
                    }
                    kept.push(Kept::Acts(Box::new(acts)));
                }
                None => {
                    drop(acts);
                    let arena = match &mut arena {
                        Some(arena) => arena,
                        None => arena.insert(Tensor::zeros(
                            (plan.recompute, n, h),
                            x.dtype(),
                            x.device(),
                        )?),
                    };
                    arena.slice_set(&x.unsqueeze(0)?.contiguous()?, 0, li)?;
                    kept.push(Kept::Input(arena.get(li)?)); // [n, h] view
                }
            }
            x = y;
            crate::train::metrics::pool_checkpoint(&self.device, "forward block", li)?;
        }
        let norm_w = &self.params[self.final_norm];
        let (hf, rstd) = rmsnorm_forward(&x, norm_w, self.cfg.rms_norm_eps)?;
        // A trained head adds every chunk's product into its f32 gradient `[vocab, h]` (757 MB
        // at InternLM2's vocabulary): a read-modify-write of all of it per chunk, which outweighs
        // the chunk's own work at the default size, so its chunks are 4x as large.
        let head_trained = self.trains(self.head);
        let chunk_rows = match (head_trained, self.grad_dtype == DType::F32) {
            (false, _) => self.ce_chunk_rows,
            (true, true) => TRAINED_HEAD_CHUNK_FACTOR * self.ce_chunk_rows,
            // One-write gradients: a chunk of up to 2·h rows holds no more logits than the f32
            // scratch a second chunk would need, so up to that many rows take one chunk and
            // write the head's gradient straight into its slot.
            (true, false) => {
                (TRAINED_HEAD_CHUNK_FACTOR * self.ce_chunk_rows).max(2 * self.cfg.hidden_size)
            }
        };
        // A bf16 gradient buffer takes each value once: several chunks add up in f32 first.
        let head_scratch =
            if head_trained && self.grad_dtype != DType::F32 && rows.len() > chunk_rows.max(1) {
                let (vocab, h) = self.params[self.head].dims2()?;
                let f32_like = Tensor::zeros(1, DType::F32, &self.device)?;
                Some(crate::kernels::gemm::gemm_output(&f32_like, vocab, h)?) // [vocab, h] f32
            } else {
                None
            };
        let req = CeGradRequest {
            loss_scale,
            dw_into: match &head_scratch {
                Some(s) => Some((GemmOut::whole(s), 0.0)),
                None => self.grad_out(grads, self.head)?,
            },
        };
        let ce = scope(&self.device, "lm_head_ce", || {
            lm_head_ce_rows(
                &hf,
                &self.params[self.head],
                rows,
                targets,
                chunk_rows,
                Some(&req),
            )
        })?;
        crate::train::metrics::pool_checkpoint(&self.device, "lm head", 0)?;
        if let Some(dw) = head_scratch {
            self.accumulate(grads, self.head, &dw)?; // one rounding of the summed chunks
        }
        let dhf = ce.dhidden.context("lm_head_ce returned no dhidden")?;
        drop(hf);
        let (mut dx, dwn) =
            rmsnorm_backward(&x, norm_w, &rstd, &dhf, self.trains(self.final_norm))?;
        drop((x, rstd, dhf)); // not read again: free before the blocks' backward
        if let Some(dw) = dwn {
            self.accumulate(grads, self.final_norm, &dw)?;
        }
        // Trainables are laid out in parameter order (embedding, blocks, final norm, head): the
        // final norm and an untied head are final now, each block once its backward is done.
        self.report_ready(&mut ready, self.final_norm, grads)?;
        for (li, blk) in self.blocks.iter().enumerate().rev() {
            let acts = match kept.pop().context("missing block activations")? {
                Kept::Acts(a) => *a,
                Kept::Input(xin) => {
                    self.block_forward(blk, &xin, ctx, Some(Self::block_seed(step_seed, li)))?
                        .1
                }
            };
            dx = self.block_backward(blk, acts, dx, ctx, grads)?;
            crate::train::metrics::pool_checkpoint(&self.device, "backward block", li)?;
            // A block's parameters start with its attention norm.
            self.report_ready(&mut ready, blk.attn_norm, grads)?;
        }
        let stats = StepStats {
            loss_sum: ce.loss_sum.read()?, // after the backward is queued
            n_trained: ce.n_trained,
            recomputed_blocks: plan.map_or(0, |p| p.recompute),
            gate_up_recomputed_blocks: plan.map_or(0, |p| p.attention_only),
            slimmed_blocks: plan.map_or(0, |p| {
                let kept = self.blocks.len() - p.recompute - p.attention_only;
                if p.slim {
                    kept
                } else {
                    0
                }
            }),
        };
        Ok((stats, dx))
    }

    /// The final norm's output `[tokens, hidden]` without gradients (no dropout).
    fn final_hidden(&self, batch: &Batch) -> Result<Tensor> {
        let ctx = self.batch_ctx(batch)?;
        let x = self.forward_hidden(&ctx)?;
        let (hf, _) = rmsnorm_forward(&x, &self.params[self.final_norm], self.cfg.rms_norm_eps)?;
        Ok(hf)
    }

    /// Loss without gradients (no dropout).
    pub fn loss(&self, batch: &Batch) -> Result<StepStats> {
        let hf = self.final_hidden(batch)?;
        let ce = lm_head_ce(
            &hf,
            &self.params[self.head],
            &batch.labels,
            self.ce_chunk_rows,
            None,
        )?;
        Ok(StepStats {
            loss_sum: ce.loss_sum.read()?,
            n_trained: ce.n_trained,
            recomputed_blocks: 0,
            gate_up_recomputed_blocks: 0,
            slimmed_blocks: 0,
        })
    }

    /// Full logits `[tokens, vocab]` f32 (no dropout). For parity checks on small inputs only.
    pub fn logits(&self, batch: &Batch) -> Result<Tensor> {
        let hf = self.final_hidden(batch)?;
        Ok(hf
            .matmul(&self.params[self.head].t()?)?
            .to_dtype(DType::F32)?)
    }
}

impl CausalLm for Decoder {
    type Cache = KvCache;

    fn new_cache(&self) -> KvCache {
        KvCache {
            layers: (0..self.blocks.len()).map(|_| None).collect(),
            len: 0,
        }
    }

    fn forward_infer(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let mut items = [(ids, cache)];
        Ok(self.forward_infer_batch(&mut items)?.remove(0))
    }

    /// All sequences' new tokens go through the linears, norms and head as one `[rows, h]`
    /// matrix; attention runs per sequence against its own cache.
    fn forward_infer_batch(&self, items: &mut [(&[u32], &mut KvCache)]) -> Result<Vec<Vec<f32>>> {
        if items.is_empty() {
            return Ok(vec![]);
        }
        let mut all_ids = Vec::new();
        let mut spans = Vec::with_capacity(items.len()); // (first row, rows, cache offset)
        for (ids, cache) in items.iter() {
            if ids.is_empty() {
                bail!("forward_infer needs at least one token");
            }
            if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
                bail!(
                    "token id {bad} is not below vocab_size {}",
                    self.cfg.vocab_size
                );
            }
            spans.push((all_ids.len(), ids.len(), cache.len));
            all_ids.extend_from_slice(ids);
        }
        let ids_t = Tensor::from_slice(&all_ids, all_ids.len(), &self.device)?;
        let x = embedding_forward(&ids_t, &self.params[self.embed])?; // [rows, h]
        let mut caches: Vec<&mut KvCache> = items.iter_mut().map(|(_, c)| &mut **c).collect();
        self.infer_rows(x, &mut caches, &spans)
    }

    fn cache_len(cache: &KvCache) -> usize {
        cache.len
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}

impl Decoder {
    /// [`CausalLm::forward_infer`] from input rows `x [m, h]` instead of token ids (a
    /// multimodal prompt: image features spliced into the token embeddings of [`Decoder::embed`]).
    pub fn forward_infer_embeds(&self, x: &Tensor, cache: &mut KvCache) -> Result<Vec<f32>> {
        let (m, h) = x.dims2()?;
        if m == 0 || h != self.cfg.hidden_size {
            bail!(
                "input rows have shape {:?}, expected [m >= 1, {}]",
                x.dims(),
                self.cfg.hidden_size
            );
        }
        let spans = [(0, m, cache.len)];
        let x = x.to_dtype(self.dtype)?;
        Ok(self.infer_rows(x, &mut [cache], &spans)?.remove(0))
    }

    /// The inference forward of input rows `x [rows, h]`: sequence `i` owns rows
    /// `spans[i] = (first row, rows, cache offset)` and appends them to `caches[i]`. Returns each
    /// sequence's last-row logits.
    fn infer_rows(
        &self,
        mut x: Tensor,
        caches: &mut [&mut KvCache],
        spans: &[(usize, usize, usize)],
    ) -> Result<Vec<Vec<f32>>> {
        let positions: Vec<u32> = spans
            .iter()
            .flat_map(|&(_, m, offset)| offset as u32..(offset + m) as u32)
            .collect();
        let (cos, sin) = self.rope.tables(&positions)?;
        for (li, blk) in self.blocks.iter().enumerate() {
            let (h1, _) = rmsnorm_forward(&x, &self.params[blk.attn_norm], self.cfg.rms_norm_eps)?;
            let (q, k, v, _) = self.qkv_forward(blk, &h1, None)?;
            let q = rope_forward(&q, &cos, &sin)?;
            let k = rope_forward(&k, &cos, &sin)?;
            let mut outs = Vec::with_capacity(spans.len());
            for (cache, &(row, m, offset)) in caches.iter_mut().zip(spans) {
                let (kn, vn) = (k.narrow(0, row, m)?, v.narrow(0, row, m)?);
                let (k_all, v_all) = match cache.layers[li].take() {
                    Some((kc, vc)) => (Tensor::cat(&[&kc, &kn], 0)?, Tensor::cat(&[&vc, &vn], 0)?),
                    None => (kn, vn),
                }; // [offset + m, kv_heads, d]
                let (attn, _) = attend(&q.narrow(0, row, m)?, &k_all, &v_all, offset)?;
                cache.layers[li] = Some((k_all, v_all));
                outs.push(attn); // [m, heads, d]
            }
            let attn = Tensor::cat(&outs, 0)?; // [rows, heads, d]
            x = self.tail_forward(blk, &x, &attn, None)?.0;
        }
        for (cache, &(_, m, _)) in caches.iter_mut().zip(spans) {
            cache.len += m;
        }
        // The last row of every sequence through the final norm and the head, at once.
        let last: Vec<u32> = spans
            .iter()
            .map(|&(row, m, _)| (row + m - 1) as u32)
            .collect();
        let last = Tensor::from_slice(&last, last.len(), &self.device)?;
        let x_last = x.index_select(&last, 0)?; // [items, h]
        let (hf, _) = rmsnorm_forward(
            &x_last,
            &self.params[self.final_norm],
            self.cfg.rms_norm_eps,
        )?;
        let logits = hf
            .matmul(&self.params[self.head].t()?)?
            .to_dtype(DType::F32)?; // [items, vocab]
        Ok(logits.to_vec2::<f32>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BYTES: BlockBytes = BlockBytes {
        whole: 10,
        slim: 8,
        attention: 4,
        input: 1,
    };

    #[test]
    fn plans_take_the_least_rerun_work_that_fits() {
        let slimmed = BlockPlan::slimmed;
        let whole = BlockPlan {
            slim: false,
            ..slimmed(0, 0)
        };
        // (checkpointing, budget, gate/up share, plan) for 4 blocks
        for (checkpointing, budget, share, want) in [
            (true, 40, 0.3, whole),
            (true, 0, 0.3, slimmed(4, 0)),
            // The inputs alone exceed the budget: still every block recomputed.
            (true, 3, 0.3, slimmed(4, 0)),
            (false, 0, 0.3, slimmed(0, 0)),
            // Cheap gate/up reruns: all four blocks keep their attention half (16 bytes, cost
            // 1.2) rather than one slimmed and three recomputed (11 bytes, cost 3).
            (true, 16, 0.3, slimmed(0, 4)),
            // Dear ones: one slimmed, one attention-only, two recomputed (14 bytes, cost 2.9)
            // beats four attention-only (16 bytes, cost 3.6) and three with one recomputed (13,
            // 3.7).
            (true, 16, 0.9, slimmed(2, 1)),
        ] {
            let got = plan_blocks(4, checkpointing, budget, BYTES, share);
            assert_eq!(got, want, "budget {budget}, share {share}");
        }
        // More budget never costs more rerun work.
        let cost = |p: BlockPlan| p.recompute as f64 + 0.5 * p.attention_only as f64;
        let costs: Vec<f64> = (0..=40)
            .map(|budget| cost(plan_blocks(4, true, budget, BYTES, 0.5)))
            .collect();
        assert!(costs.windows(2).all(|w| w[1] <= w[0]), "{costs:?}");
        assert_eq!(costs.last(), Some(&0.0));
    }

    #[test]
    fn a_plan_orders_recomputed_then_attention_only_then_kept_blocks() {
        let p = BlockPlan::slimmed(2, 1);
        let keeps: Vec<Option<Keep>> = (0..4).map(|b| p.keep(b)).collect();
        assert_eq!(keeps, [None, None, Some(Keep::Attention), Some(Keep::Slim)]);
        let whole = BlockPlan { slim: false, ..p };
        assert_eq!(whole.keep(3), Some(Keep::Whole));
    }
}
