//! ZeRO-2 over the [`Collectives`] trait: the flat gradient (in `FlatParams` order) is reduced
//! in buckets into per-rank shards while the backward still runs, the global gradient norm for
//! clipping is summed from the shards, AdamW (fp32 moments) runs only on this rank's shard of
//! the fp32 master buffer, and the updated shards are all-gathered so every rank holds all
//! parameters.
//!
//! Layout: the flat buffer of N values is zero-padded to `padded_len(N, world)` and rank r owns
//! elements `r*S..(r+1)*S`, S = padded / world. The padding has zero gradient and no weight
//! decay, so it stays zero. On one rank (world 1) the shard is the whole buffer and every
//! collective is skipped: the update is the single-process AdamW update, bit for bit.
//!
//! Gradient reduction ([`GradReducer`]): buckets are contiguous ranges of ~`bucket_mb` MiB of
//! the flat gradient, issued from the end of the buffer down (the backward produces the last
//! layers' gradients first). The model's backward calls [`GradReady::ready_from`] whenever a
//! tail of the buffer is final (on the step's last micro-batch); every bucket inside that tail
//! is handed to [`Collectives::reduce_sum_pieces`], which sums each shard's piece of it into
//! its owner's persistent `[S]` shard-gradient buffer (NCCL: one `ncclReduce` per piece, queued
//! on the communication stream, overlapping the rest of the backward). `finish` issues what is
//! left and joins: the one host wait of the reduction, with the hang timeout.
//!
//! Memory (several ranks): besides the flat gradient `[N]` the reduction allocates nothing of
//! size N: no padded copy (the padding tail of the shard gradient is zero from the start and
//! never sent), no concatenation of pieces (they are written in place into the shard
//! gradient `[S]`, which lives as long as the optimizer). The bucket views are views; an f64
//! gradient (f64 compute) is cast bucket by bucket. The all-gather writes the updated shards
//! straight into the replica buffer (`[padded]` in the replica dtype, the model's views
//! narrow it), from a `[S]` cast of the shard master.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::ops::Range;

use crate::config::OptimConfig;
use crate::dist::collectives::{bucket_pieces, padded_len, sum_f64s, Collectives};
use crate::model::decoder::GradReady;
use crate::train::checkpoint::SHARD_MASTER;
use crate::train::optim::{clip_coef, sum_squares, AdamW, FlatParams, Slot};

/// The optimizer of a (data-parallel) run: replicated parameters, sharded gradients and
/// optimizer state.
pub struct ZeroOptimizer {
    /// All trainable values, replicated on every rank: the fp32 master on one rank; in
    /// `replica_dtype` on several, where the fp32 master exists only as this rank's `shard`.
    /// On several ranks `master` is the `[N]` head of `replica`. With a split master (one rank)
    /// `master` is the replica too, and the fp32 values are [`ZeroOptimizer::master_slots`].
    params: FlatParams,
    /// What the model reads ([`ZeroOptimizer::model_flat`]), kept current by every step.
    /// Several ranks: `[padded]` in `replica_dtype`, what the all-gather writes into. One rank:
    /// `[N]` in `replica_dtype` when that is not f32 (the AdamW kernel writes it in its own
    /// pass, where a cast per step would read the whole master again), else none.
    replica: Option<Tensor>,
    replica_dtype: DType,
    rank: usize,
    world: usize,
    /// N padded to a multiple of `world`.
    padded: usize,
    /// This rank's slice `[S]` of the padded master buffer, with the slots clipped to it.
    shard: FlatParams,
    /// Several ranks: this rank's `[S]` f32 shard of the summed gradient, written in place by
    /// the reduction every step (its padding tail stays zero).
    shard_grad: Option<Tensor>,
    /// AdamW over `shard` only: its moments are `[S]`.
    adamw: AdamW,
    /// Elements of the flat gradient per reduction bucket.
    bucket: usize,
    /// Keep a one-rank bf16 run's fp32 master split ([`ZeroOptimizer::with_split_master`]).
    split_wanted: bool,
    /// The split master's low halves `[N]` (i16): its high halves are `replica`, the model's
    /// bf16 weights; `params.master` and `shard.master` are the replica then.
    split_lo: Option<Tensor>,
}

impl ZeroOptimizer {
    /// `bucket_mb`: MiB of f32 gradient per reduction bucket; 0 = one bucket for the whole
    /// buffer (reduced only after the backward).
    pub fn new(
        cfg: &OptimConfig,
        params: FlatParams,
        rank: usize,
        world: usize,
        bucket_mb: usize,
    ) -> Result<Self> {
        if world == 0 || rank >= world {
            bail!("ZeRO: rank {rank} outside a world of {world}");
        }
        let n = params.numel();
        let padded = padded_len(n, world);
        let shard_len = padded / world;
        let range = rank * shard_len..(rank + 1) * shard_len;
        let shard = shard_of(&params, range, padded)?;
        let adamw = AdamW::new(cfg, &shard)?;
        let bucket = if bucket_mb == 0 {
            n
        } else {
            (bucket_mb << 20) / 4
        };
        let shard_grad = (world > 1)
            .then(|| Tensor::zeros(shard_len, DType::F32, params.master.device()))
            .transpose()?;
        let mut z = Self {
            replica_dtype: params.master.dtype(),
            replica: None,
            params,
            rank,
            world,
            padded,
            shard,
            shard_grad,
            adamw,
            bucket: bucket.max(1),
            split_wanted: false,
            split_lo: None,
        };
        let master = z.params.master.clone();
        z.set_replica(&master)?;
        Ok(z)
    }

    /// Sets the reduction bucket to `elems` elements of the flat gradient (at least 1).
    pub fn with_bucket_elems(mut self, elems: usize) -> Self {
        self.bucket = elems.max(1);
        self
    }

    /// Keeps the replicated parameters in `dtype` (the compute dtype) when the run has more than
    /// one rank, so that fp32 master weights and AdamW moments exist only for the rank's shard,
    /// as ZeRO specifies; the updated shards are all-gathered (in `dtype`: a bf16 replica moves
    /// half the bytes) into the replica. With one rank the shard is the whole fp32 master and
    /// nothing changes.
    pub fn with_replica_dtype(mut self, dtype: DType) -> Result<Self> {
        let values = self.master_values()?;
        self.replica_dtype = dtype;
        self.set_replica(&values)?;
        Ok(self)
    }

    /// One rank with a bf16 replica: keeps the fp32 master as the replica (each value rounded
    /// to bf16, ties away from zero) and its low 16 bits, instead of an f32 buffer and a bf16
    /// copy. The values, their updates and checkpoints stay exactly fp32 (the pair joins to
    /// the f32 bits); 2 bytes a value fewer (3.5 GiB at 1.8B) and 2 fewer moved per step. The
    /// model's weights differ from a round-to-nearest-even copy only where a value lies exactly
    /// halfway between two bf16 values. Several ranks, or another replica dtype: no change.
    pub fn with_split_master(mut self, on: bool) -> Result<Self> {
        self.split_wanted = on;
        if self.world > 1 || self.replica_dtype != DType::BF16 || on == self.split_master() {
            return Ok(self);
        }
        let values = self.master_values()?;
        self.set_replica(&values)?;
        Ok(self)
    }

    /// Whether the master is kept split (see [`ZeroOptimizer::with_split_master`]).
    pub fn split_master(&self) -> bool {
        self.split_lo.is_some()
    }

    /// Several ranks: makes the `[padded]` replica buffer in the replica dtype from `values`
    /// `[N]` and points `params.master` at its head. One rank: keeps `values` as the master and
    /// its copy in the replica dtype, unless that is the master's own; or (split master) the
    /// replica and the low halves.
    fn set_replica(&mut self, values: &Tensor) -> Result<()> {
        self.split_lo = None;
        if self.world == 1
            && self.split_wanted
            && self.replica_dtype == DType::BF16
            && values.dtype() == DType::F32
        {
            let (hi, lo) = crate::kernels::adamw::split_master(values)?; // [N] bf16, [N] i16
            self.params.master = hi.clone();
            self.shard.master = hi.clone();
            self.replica = Some(hi);
            self.split_lo = Some(lo);
            return Ok(());
        }
        if self.world == 1 {
            self.params.master = values.clone();
            self.replica = (self.replica_dtype != values.dtype())
                .then(|| values.to_dtype(self.replica_dtype))
                .transpose()?;
            return Ok(());
        }
        let replica = pad(&values.to_dtype(self.replica_dtype)?, self.padded)?; // [padded]
        self.params.master = replica.narrow(0, 0, self.params.numel())?; // [N] view
        self.replica = Some(replica);
        Ok(())
    }

    /// All trainable values, current on every rank (fp32 on one rank, the replica dtype on
    /// several; the fp32 values of a distributed run are the shards).
    pub fn params(&self) -> &FlatParams {
        &self.params
    }

    /// The trainables as the model reads them, the flat `[N]` buffer in `dtype`: the replica when
    /// it has that dtype (the optimizer step keeps it current, so nothing is cast), else one cast
    /// of the values.
    pub fn model_flat(&self, dtype: DType) -> Result<Tensor> {
        Ok(match &self.replica {
            Some(r) if r.dtype() == dtype => r.narrow(0, 0, self.params.numel())?,
            _ => self.master_values()?.to_dtype(dtype)?,
        })
    }

    /// One rank: the `[N]` fp32 master (joined when split: a new `[N]` f32 buffer); several
    /// ranks: the replica's values.
    fn master_values(&self) -> Result<Tensor> {
        match (&self.split_lo, &self.replica) {
            (Some(lo), Some(hi)) => crate::kernels::adamw::join_master(hi, lo),
            _ => Ok(self.params.master.clone()),
        }
    }

    /// One rank: every trainable's fp32 master values in its shape, for a checkpoint: views of
    /// the master, or (split) each slot joined and moved to the host, one at a time, so no
    /// `[N]` f32 buffer is made on the device.
    pub fn master_slots(&self) -> Result<Vec<Tensor>> {
        let (Some(lo), Some(hi)) = (&self.split_lo, &self.replica) else {
            return self.params.views(DType::F32);
        };
        self.params
            .slots
            .iter()
            .map(|s| {
                let joined = crate::kernels::adamw::join_master(
                    &hi.narrow(0, s.offset, s.numel)?,
                    &lo.narrow(0, s.offset, s.numel)?,
                )?;
                Ok(joined
                    .to_device(&candle_core::Device::Cpu)?
                    .reshape(s.shape.as_slice())?)
            })
            .collect()
    }

    /// This rank's element range in the padded flat buffer.
    pub fn shard_range(&self) -> Range<usize> {
        let s = self.padded / self.world;
        self.rank * s..(self.rank + 1) * s
    }

    /// Bytes of optimizer state this rank holds: the fp32 master of its shard and the AdamW
    /// moments (`[S]` each, S = N / ranks padded): 1/N of one rank's figure.
    pub fn state_bytes(&self) -> Result<usize> {
        // A split master is its replica and low halves: 4 bytes a value, as an f32 one.
        let master_dtype = if self.split_master() {
            DType::F32
        } else {
            self.shard.master.dtype()
        };
        let mut bytes = self.shard.master.elem_count() * master_dtype.size_in_bytes();
        for (_, t) in self.adamw.state_tensors()? {
            bytes += t.elem_count() * t.dtype().size_in_bytes();
        }
        Ok(bytes)
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.adamw.step_count()
    }

    /// The step's gradient reduction over `comm`: hand it to the backward of the step's last
    /// micro-batch as its [`GradReady`], then [`GradReducer::finish`] it with the flat gradient.
    pub fn reducer<'a>(&'a self, comm: &'a dyn Collectives) -> Result<GradReducer<'a>> {
        self.check_comm(comm)?;
        let n = self.params.numel();
        Ok(GradReducer {
            comm,
            shard_grad: self.shard_grad.as_ref(),
            n,
            shard_len: self.padded / self.world,
            bucket: self.bucket,
            unissued: n,
            issued_early: 0,
        })
    }

    /// Sums the ranks' flat gradients `[N]` and returns this rank's shard `[S]` of the sum
    /// (the whole reduction after the backward: [`ZeroOptimizer::reducer`] without a hook).
    pub fn reduce_gradients(&self, grad: &Tensor, comm: &dyn Collectives) -> Result<Tensor> {
        self.reducer(comm)?.finish(grad)
    }

    /// The 2-norm of the whole summed gradient, from every rank's shard `[S]`.
    pub fn global_grad_norm(&self, shard_grad: &Tensor, comm: &dyn Collectives) -> Result<f64> {
        let local = sum_squares(shard_grad)?;
        Ok(sum_f64s(comm, &[local], shard_grad.device())?[0].sqrt())
    }

    /// Clips the shard gradient by the global norm (torch `clip_grad_norm_`; `max_grad_norm`
    /// <= 0 disables it), runs AdamW on the shard and all-gathers the updated parameters.
    pub fn apply(
        &mut self,
        shard_grad: &Tensor,
        grad_norm: f64,
        max_grad_norm: f64,
        lr: f64,
        comm: &dyn Collectives,
    ) -> Result<()> {
        self.check_comm(comm)?;
        // Clipping folded into the update: the gradient is scaled inside the AdamW kernel.
        let coef = clip_coef(grad_norm, max_grad_norm);
        if let (Some(lo), Some(hi)) = (&self.split_lo, &self.replica) {
            // One rank, split master: the replica is updated in place with the low halves.
            return self.adamw.step_split(hi, lo, shard_grad, coef, lr);
        }
        if self.world == 1 {
            // The shard is the whole buffer; the step also refreshes the replica (if any).
            self.adamw
                .step_scaled(&mut self.shard, shard_grad, coef, lr, self.replica.as_ref())?;
            self.params.master = self.shard.master.clone();
            return Ok(());
        }
        let replica = self
            .replica
            .as_ref()
            .context("ZeRO: no replica on several ranks")?;
        // The updated shard [S] in the replica dtype (written by the update itself), gathered
        // in place into the replica [padded]; `params.master` is its head, the model's views
        // narrow it.
        let part = Tensor::zeros(
            self.shard.master.elem_count(),
            self.replica_dtype,
            replica.device(),
        )?;
        self.adamw
            .step_scaled(&mut self.shard, shard_grad, coef, lr, Some(&part))?;
        comm.all_gather_into(&part, replica)?;
        Ok(())
    }

    /// Resume: all parameter values (`[N]` master, same slots) and the optimizer state of the
    /// whole buffer as `AdamW::state_tensors` names it (`[N]` moments), e.g. consolidated from
    /// a checkpoint of any number of ranks. Keeps this rank's slice of it.
    pub fn load(&mut self, params: FlatParams, optimizer: &HashMap<String, Tensor>) -> Result<()> {
        let n = self.params.numel();
        if params.slots != self.params.slots {
            bail!("ZeRO: the loaded parameters have another layout than this model's");
        }
        let range = self.shard_range();
        let mut sliced = HashMap::new();
        for (name, t) in optimizer {
            let t = if t.dims() == [n] {
                pad(&t.to_dtype(DType::F32)?, self.padded)?.narrow(0, range.start, range.len())?
            } else {
                t.clone()
            };
            sliced.insert(name.clone(), t);
        }
        self.shard = shard_of(&params, range, self.padded)?;
        self.adamw.load_state(&sliced)?;
        let master = params.master.clone();
        self.params = params;
        self.set_replica(&master)
    }

    /// The optimizer state of the shard (`[S]` moments and the step count), under
    /// `AdamW::state_tensors` names. On one rank this is the whole buffer's state.
    pub fn optimizer_state(&self) -> Result<Vec<(String, Tensor)>> {
        self.adamw.state_tensors()
    }

    /// This rank's checkpoint shard: the master slice under [`SHARD_MASTER`] and the
    /// optimizer state slices (all `[S]` but the step count).
    pub fn shard_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![(SHARD_MASTER.to_string(), self.shard.master.clone())];
        v.extend(self.optimizer_state()?);
        Ok(v)
    }

    fn check_comm(&self, comm: &dyn Collectives) -> Result<()> {
        if comm.world() != self.world || comm.rank() != self.rank {
            bail!(
                "ZeRO: built for rank {} of {} but given a communicator of rank {} of {}",
                self.rank,
                self.world,
                comm.rank(),
                comm.world()
            );
        }
        Ok(())
    }
}

/// One step's ZeRO-2 gradient reduction (see the module docs): the [`GradReady`] of the last
/// micro-batch's backward, then [`GradReducer::finish`].
pub struct GradReducer<'a> {
    comm: &'a dyn Collectives,
    /// Several ranks: the optimizer's `[S]` shard gradient the pieces are summed into.
    shard_grad: Option<&'a Tensor>,
    n: usize,
    shard_len: usize,
    bucket: usize,
    /// Buckets are issued from the end down: `unissued..n` has been issued.
    unissued: usize,
    /// Buckets issued from inside the backward (before `finish`).
    issued_early: usize,
}

impl GradReducer<'_> {
    /// Buckets handed to the communicator from inside the backward, before `finish` (what
    /// overlaps the backward; a test checks it).
    pub fn buckets_issued_early(&self) -> usize {
        self.issued_early
    }

    /// Issues every bucket lying entirely in `from..n` that is not issued yet, reading `grad`.
    fn issue_from(&mut self, from: usize, grad: &Tensor) -> Result<usize> {
        let Some(shard_grad) = self.shard_grad else {
            return Ok(0);
        };
        if grad.dims() != [self.n] {
            bail!("ZeRO: gradient must be [{}], got {:?}", self.n, grad.dims());
        }
        let mut issued = 0;
        while self.unissued > 0 {
            // Buckets are aligned to multiples of `bucket` from the buffer's start, so every
            // rank cuts the same buckets whatever its readiness points.
            let lo = (self.unissued - 1) / self.bucket * self.bucket;
            if lo < from {
                break;
            }
            let view = grad.narrow(0, lo, self.unissued - lo)?; // [b], a view
                                                                // f64 gradients (f64 compute) are cast one bucket at a time; the communicator
                                                                // holds the cast until the join.
            let view = view.to_dtype(DType::F32)?;
            let pieces = bucket_pieces(lo, self.unissued, self.shard_len);
            self.comm.reduce_sum_pieces(&view, &pieces, shard_grad)?;
            self.unissued = lo;
            issued += 1;
        }
        Ok(issued)
    }

    /// Issues the remaining buckets from the whole summed-over-micro-batches gradient `grad`
    /// `[N]` f32 (the same values the backward reported), waits for the reduction (the step's
    /// watchdog: fails after the communicator's timeout) and returns this rank's shard `[S]`
    /// of the sum over the ranks. One rank: `grad` itself (f32, or a one-write bf16 gradient).
    pub fn finish(mut self, grad: &Tensor) -> Result<Tensor> {
        let solo_bf16 = self.shard_grad.is_none() && grad.dtype() == DType::BF16;
        if grad.dims() != [self.n] || !(grad.dtype() == DType::F32 || solo_bf16) {
            bail!(
                "ZeRO: gradient must be [{}] f32, got {:?} {:?}",
                self.n,
                grad.dims(),
                grad.dtype()
            );
        }
        let Some(shard_grad) = self.shard_grad else {
            return Ok(grad.clone());
        };
        self.issue_from(0, grad)?;
        self.comm.join("ZeRO gradient reduction")?;
        Ok(shard_grad.clone())
    }
}

impl GradReady for GradReducer<'_> {
    fn ready_from(&mut self, from: usize, grads: &Tensor) -> Result<()> {
        self.issued_early += self.issue_from(from, grads)?;
        Ok(())
    }
}

/// `t` `[n]` followed by zeros up to `[len]`.
fn pad(t: &Tensor, len: usize) -> Result<Tensor> {
    let n = t.elem_count();
    if n == len {
        return Ok(t.clone());
    }
    let zeros = Tensor::zeros(len - n, t.dtype(), t.device())?;
    Ok(Tensor::cat(&[t, &zeros], 0)?)
}

/// The `range` slice of the padded master buffer as a `FlatParams` whose slots are the
/// trainable tensors' overlaps with the range (flat shapes) plus the padding (no decay).
fn shard_of(params: &FlatParams, range: Range<usize>, padded: usize) -> Result<FlatParams> {
    let n = params.numel();
    let master = pad(&params.master, padded)?.narrow(0, range.start, range.len())?; // [S]
    let mut slots = vec![];
    let mut overlap = |lo: usize, hi: usize, decay: bool| {
        let (lo, hi) = (lo.max(range.start), hi.min(range.end));
        if lo < hi {
            slots.push(Slot {
                offset: lo - range.start,
                numel: hi - lo,
                shape: vec![hi - lo],
                decay,
            });
        }
    };
    for s in &params.slots {
        overlap(s.offset, s.offset + s.numel, s.decay);
    }
    overlap(n, padded, false);
    Ok(FlatParams { master, slots })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::collectives::SoloComm;
    use crate::train::optim::clip_grad_norm;
    use candle_core::Device;

    /// A tensor's values, flattened, as f32.
    fn f32_values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn params(values: &[Vec<f32>], decay: &[bool]) -> FlatParams {
        let ts: Vec<Tensor> = values
            .iter()
            .map(|v| Tensor::new(v.as_slice(), &Device::Cpu).unwrap())
            .collect();
        FlatParams::from_values(&ts, decay).unwrap()
    }

    #[test]
    fn shard_slots_cover_the_range_with_padding_undecayed() {
        let p = params(&[vec![1.0; 3], vec![2.0; 4]], &[true, false]); // N = 7
                                                                       // world 3: padded 9, shard 1 = [3, 6)
        let s = shard_of(&p, 3..6, 9).unwrap();
        assert_eq!(s.master.to_vec1::<f32>().unwrap(), vec![2.0, 2.0, 2.0]);
        assert_eq!(s.slots.len(), 1);
        assert!(!s.slots[0].decay);
        let last = shard_of(&p, 6..9, 9).unwrap();
        assert_eq!(last.master.to_vec1::<f32>().unwrap(), vec![2.0, 0.0, 0.0]);
        assert_eq!(
            last.slots
                .iter()
                .map(|s| (s.offset, s.numel))
                .collect::<Vec<_>>(),
            vec![(0, 1), (1, 2)]
        );
        let first = shard_of(&p, 0..3, 9).unwrap();
        assert!(first.slots[0].decay);
    }

    /// One rank with a bf16 compute dtype: the model's views are a bf16 copy the step keeps
    /// current (not a cast per step), equal to the master cast to bf16 after every update.
    #[test]
    fn one_rank_bf16_replica_follows_every_step() {
        let cfg = OptimConfig::default();
        let p = params(&[vec![0.5, -1.0, 2.0], vec![3.0, 0.25]], &[true, false]);
        let grad = Tensor::new(&[4.0f32, -3.0, 1.0, 0.5, -2.0], &Device::Cpu).unwrap();
        let mut zero = ZeroOptimizer::new(&cfg, p, 0, 1, 25)
            .unwrap()
            .with_replica_dtype(DType::BF16)
            .unwrap();
        let bits = |views: Vec<Tensor>| -> Vec<Vec<f32>> {
            views
                .iter()
                .map(|t| {
                    assert_eq!(t.dtype(), DType::BF16);
                    f32_values(t)
                })
                .collect()
        };
        let model_views = |zero: &ZeroOptimizer, dtype| {
            zero.params()
                .views_of(&zero.model_flat(dtype).unwrap())
                .unwrap()
        };
        let before = bits(model_views(&zero, DType::BF16));
        for _ in 0..3 {
            zero.apply(&grad, 10.0, 1.0, 1e-1, &SoloComm).unwrap();
            let views = bits(model_views(&zero, DType::BF16));
            assert_eq!(views, bits(zero.params().views(DType::BF16).unwrap()));
            assert_ne!(views, before, "the step must move the replica");
        }
        // The fp32 master is still what `params` holds, at full precision.
        assert_eq!(zero.params().master.dtype(), DType::F32);
        assert_eq!(model_views(&zero, DType::F32)[1].dims(), [2]);
    }

    #[test]
    fn optimizer_state_per_rank_is_one_nth() {
        let cfg = OptimConfig::default();
        let p = params(&[vec![0.5; 1000], vec![1.0; 24]], &[true, false]); // N = 1024
        let bytes = |rank, world| {
            ZeroOptimizer::new(&cfg, p.clone(), rank, world, 0)
                .unwrap()
                .state_bytes()
                .unwrap()
        };
        // master + 2 moments, f32, plus the 8-byte step count.
        let one = bytes(0, 1);
        assert_eq!(one, 3 * 4 * 1024 + 8);
        for world in [2, 4, 8] {
            for rank in 0..world {
                assert_eq!(
                    bytes(rank, world),
                    3 * 4 * 1024 / world + 8,
                    "rank {rank} of {world}"
                );
            }
        }
        // Padding: 1024 values over 3 ranks -> 342 per rank.
        assert_eq!(bytes(2, 3), 3 * 4 * 342 + 8);
    }

    #[test]
    fn one_rank_matches_plain_clip_and_adamw() {
        let cfg = OptimConfig {
            weight_decay: 0.1,
            ..OptimConfig::default()
        };
        let p = params(&[vec![0.5, -1.0, 2.0], vec![3.0, 0.25]], &[true, false]);
        let grad = Tensor::new(&[4.0f32, -3.0, 1.0, 0.5, -2.0], &Device::Cpu).unwrap();
        let mut reference = p.clone();
        let mut adamw = AdamW::new(&cfg, &reference).unwrap();
        let mut zero = ZeroOptimizer::new(&cfg, p, 0, 1, 25).unwrap();
        for _ in 0..3 {
            let (clipped, norm) = clip_grad_norm(&grad, 1.0).unwrap();
            adamw.step(&mut reference, &clipped, 1e-2).unwrap();
            let shard = zero.reduce_gradients(&grad, &SoloComm).unwrap();
            let zn = zero.global_grad_norm(&shard, &SoloComm).unwrap();
            assert_eq!(zn, norm);
            zero.apply(&shard, zn, 1.0, 1e-2, &SoloComm).unwrap();
        }
        assert_eq!(
            zero.params().master.to_vec1::<f32>().unwrap(),
            reference.master.to_vec1::<f32>().unwrap()
        );
    }
    /// A split master steps exactly as the f32 master (bf16 and f32 gradients, decay, clipping):
    /// the joined values are bit-identical after every step, the model's bf16 weights are the
    /// values rounded to nearest with ties away from zero, and a checkpoint of it (master slots
    /// and moments) resumes a fresh split optimizer onto the same values.
    #[test]
    fn split_master_steps_bit_for_bit_as_the_f32_master() {
        use crate::kernels::adamw::split_master_bits;
        let cfg = OptimConfig {
            weight_decay: 0.1,
            ..OptimConfig::default()
        };
        // 1 + 2^-8 lies halfway between two bf16 values: hi rounds it up (away from zero).
        let tie = 1.0f32 + 2f32.powi(-8);
        let values = vec![vec![0.5, -1.0, 2.0, tie], vec![3.0, 0.25, -tie]];
        let p = params(&values, &[true, false]);
        let f32_of = f32_values;
        let slots = |z: &ZeroOptimizer| -> Vec<Vec<f32>> {
            z.master_slots().unwrap().iter().map(f32_of).collect()
        };
        let new = |p: FlatParams, split: bool| {
            ZeroOptimizer::new(&cfg, p, 0, 1, 25)
                .unwrap()
                .with_replica_dtype(DType::BF16)
                .unwrap()
                .with_split_master(split)
                .unwrap()
        };
        let mut plain = new(p.clone(), false);
        let mut split = new(p.clone(), true);
        assert!(split.split_master() && !plain.split_master());
        assert_eq!(slots(&split), values, "the split holds the values exactly");
        let hi = f32_of(&split.model_flat(DType::BF16).unwrap());
        assert_eq!(hi[3], 1.0 + 2f32.powi(-7), "ties round away from zero");
        assert_eq!(hi[6], -(1.0 + 2f32.powi(-7)));
        assert_eq!(split.state_bytes().unwrap(), plain.state_bytes().unwrap());
        let grads = [
            Tensor::new(&[4.0f32, -3.0, 1.0, 0.5, -2.0, 0.125, 7.0], &Device::Cpu).unwrap(),
            Tensor::new(&[0.01f32, 0.2, -0.3, 1e-3, 0.5, -0.7, 0.05], &Device::Cpu).unwrap(),
        ];
        for step in 0..4 {
            let g32 = &grads[step % 2];
            let g = if step % 2 == 0 {
                g32.clone()
            } else {
                g32.to_dtype(DType::BF16).unwrap()
            };
            for z in [&mut plain, &mut split] {
                let norm = z.global_grad_norm(&g, &SoloComm).unwrap();
                z.apply(&g, norm, 1.0, 1e-2, &SoloComm).unwrap();
            }
            let want = slots(&plain);
            assert_eq!(slots(&split), want, "step {step}");
            let rounded: Vec<f32> = want
                .concat()
                .into_iter()
                .map(|v| f32::from_bits(u32::from(split_master_bits(v).0) << 16))
                .collect();
            assert_eq!(f32_of(&split.model_flat(DType::BF16).unwrap()), rounded);
            assert_eq!(
                f32_of(&split.model_flat(DType::F32).unwrap()),
                want.concat()
            );
        }
        // Resume from what a checkpoint holds.
        let saved: Vec<Tensor> = split.master_slots().unwrap();
        let state: HashMap<String, Tensor> = split.optimizer_state().unwrap().into_iter().collect();
        let mut resumed = new(p.clone(), true);
        let decay: Vec<bool> = p.slots.iter().map(|s| s.decay).collect();
        resumed
            .load(FlatParams::from_values(&saved, &decay).unwrap(), &state)
            .unwrap();
        assert!(resumed.split_master());
        assert_eq!(slots(&resumed), slots(&split));
        for z in [&mut resumed, &mut split] {
            z.apply(&grads[0], 1.0, 1.0, 1e-2, &SoloComm).unwrap();
        }
        assert_eq!(slots(&resumed), slots(&split));
        assert_eq!(resumed.step_count(), 5);
    }
}
