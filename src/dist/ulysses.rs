//! Ulysses sequence parallelism (DeepSpeed-Ulysses) over one sequence-parallel (SP) group.
//!
//! Every rank of an SP group of `sp` ranks gets the same packed batch and keeps a contiguous
//! piece of `m = n / sp` of its tokens ([`SeqPiece::split`]). Everything but attention is
//! per token, so it runs on the piece alone. Attention needs the whole sequence: before it the
//! group exchanges q/k/v so that each rank holds every token for `heads / sp` of the heads
//! ([`scatter_heads`], `[m, heads, d] -> [n, heads/sp, d]`), runs varlen attention on those
//! heads with the full `cu_seqlens`, and exchanges the output back ([`gather_heads`],
//! `[n, heads/sp, d] -> [m, heads, d]`).
//!
//! Both exchanges are one `all_to_all` each, a fixed permutation of elements across the
//! group, so each one's backward is the other: the gradient of the attention output goes
//! through [`scatter_heads`] and the q/k/v gradients through [`gather_heads`].

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};

use super::collectives::Collectives;
use crate::data::IGNORE_INDEX;
use crate::model::decoder::Batch;

/// Token id of the padding that makes a packed batch's length a multiple of `sp`. Padding is
/// never a target and sits in a segment of its own, so its id does not matter.
const PAD_ID: u32 = 0;

/// Checks that `sp` divides both head counts (each rank attends with `heads / sp` query heads
/// and `kv_heads / sp` KV heads; KV heads are not repeated to make a smaller count fit).
pub fn check_heads(heads: usize, kv_heads: usize, sp: usize) -> Result<()> {
    if heads % sp != 0 || kv_heads % sp != 0 {
        bail!(
            "parallel.sequence_parallel_size = {sp} must divide both the attention heads \
             ({heads}) and the key/value heads ({kv_heads}) of the model (Ulysses splits heads \
             across the group)"
        );
    }
    Ok(())
}

/// One rank's piece of a packed batch under sequence parallelism.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqPiece {
    /// This piece's tokens `[m]`.
    pub input_ids: Vec<u32>,
    /// Their positions inside their samples, as in the whole sequence (RoPE is unchanged).
    pub position_ids: Vec<u32>,
    /// What each token of the piece is trained to predict, already shifted:
    /// `targets[i] = labels[start + i + 1]` of the whole batch (`IGNORE_INDEX` for none). The
    /// target of the piece's last token lives in the next piece's labels, so the shift has to
    /// happen before the split.
    pub targets: Vec<i32>,
    /// Segment boundaries of the whole padded sequence `[0, ..., m * sp]`: attention runs over
    /// the whole sequence after the exchange.
    pub cu_seqlens: Vec<u32>,
    /// Offset of the piece in the whole padded sequence (`rank * m`).
    pub start: usize,
    /// The group size the batch was split for.
    pub sp: usize,
    /// Tokens of the piece that are not padding.
    pub real_tokens: usize,
}

impl SeqPiece {
    /// Piece `rank` of `sp` of `batch` (a whole packed batch, labels unshifted as in
    /// [`Batch`]). The batch is first padded to a multiple of `sp` with ignored tokens in a
    /// segment of their own, then its labels are shifted, then it is cut in `sp` equal pieces.
    pub fn split(batch: &Batch, sp: usize, rank: usize) -> Result<SeqPiece> {
        ensure!(
            sp >= 1 && rank < sp,
            "sequence-parallel rank {rank} must be below the group size {sp}"
        );
        let n = batch.input_ids.len();
        ensure!(n > 0, "empty batch: input_ids has no tokens");
        ensure!(
            batch.labels.len() == n && batch.position_ids.len() == n,
            "batch lengths differ: input_ids {n}, labels {}, position_ids {}",
            batch.labels.len(),
            batch.position_ids.len()
        );
        ensure!(
            batch.cu_seqlens.first() == Some(&0) && batch.cu_seqlens.last() == Some(&(n as u32)),
            "cu_seqlens {:?} must start at 0 and end at the token count {n}",
            batch.cu_seqlens
        );
        let padded = n.div_ceil(sp) * sp;
        let pad = padded - n;
        let mut cu_seqlens = batch.cu_seqlens.clone();
        if pad > 0 {
            cu_seqlens.push(padded as u32);
        }
        // Shift over the whole padded row: position p predicts labels[p + 1]; the last
        // position (and every padding position) predicts nothing.
        let shifted: Vec<i32> = batch
            .labels
            .iter()
            .skip(1)
            .copied()
            .chain(std::iter::repeat_n(IGNORE_INDEX, pad + 1))
            .collect(); // [padded]
        let ids: Vec<u32> = batch
            .input_ids
            .iter()
            .copied()
            .chain(std::iter::repeat_n(PAD_ID, pad))
            .collect();
        let positions: Vec<u32> = batch
            .position_ids
            .iter()
            .copied()
            .chain(0..pad as u32)
            .collect();
        let m = padded / sp;
        let start = rank * m;
        let piece = start..start + m;
        Ok(SeqPiece {
            input_ids: ids[piece.clone()].to_vec(),
            position_ids: positions[piece.clone()].to_vec(),
            targets: shifted[piece].to_vec(),
            cu_seqlens,
            start,
            sp,
            real_tokens: n.saturating_sub(start).min(m),
        })
    }

    /// Number of tokens of the piece (`m`).
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Targets trained in this piece (summed over the group: the batch's, each once).
    pub fn trained_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }

    /// Checks the piece against the SP communicator it is trained with.
    pub fn check(&self, comm: &dyn Collectives) -> Result<()> {
        let m = self.len();
        ensure!(
            self.sp == comm.world(),
            "the batch piece was split for {} sequence-parallel ranks, the group has {}",
            self.sp,
            comm.world()
        );
        ensure!(
            self.start == comm.rank() * m,
            "the batch piece starts at token {} but rank {} of the group holds tokens from {}",
            self.start,
            comm.rank(),
            comm.rank() * m
        );
        ensure!(
            self.position_ids.len() == m && self.targets.len() == m,
            "batch piece lengths differ: input_ids {m}, position_ids {}, targets {}",
            self.position_ids.len(),
            self.targets.len()
        );
        ensure!(
            self.cu_seqlens.last().map(|&c| c as usize) == Some(m * self.sp),
            "the piece's cu_seqlens {:?} must end at the whole sequence's length {}",
            self.cu_seqlens,
            m * self.sp
        );
        Ok(())
    }
}

/// `all_to_all` of `x [sp, ...]` (chunk j goes to rank j, chunk i of the result came from rank
/// i) in `x`'s dtype. The collectives carry f32: exact for f32, bf16 and f16; f64 travels as
/// two f32 words (`hi + lo`, about 48 significant bits).
fn exchange(comm: &dyn Collectives, x: &Tensor) -> Result<Tensor> {
    let sp = comm.world();
    let flat = x.reshape((sp, ()))?; // [sp, chunk]
    let back = match x.dtype() {
        DType::F64 => {
            let hi = flat.to_dtype(DType::F32)?;
            let lo = (&flat - hi.to_dtype(DType::F64)?)?.to_dtype(DType::F32)?;
            let wire = Tensor::stack(&[hi, lo], 1)?; // [sp, 2, chunk]: each chunk whole
            let got = comm
                .all_to_all(&wire.flatten_all()?)?
                .reshape((sp, 2, ()))?;
            let hi = got.narrow(1, 0, 1)?.to_dtype(DType::F64)?;
            let lo = got.narrow(1, 1, 1)?.to_dtype(DType::F64)?;
            (hi + lo)?
        }
        dtype => comm
            .all_to_all(&flat.to_dtype(DType::F32)?.flatten_all()?)?
            .to_dtype(dtype)?,
    };
    Ok(back.reshape(x.shape())?)
}

/// `(tokens, head_dim)` shared by `xs`, checking each is `[tokens, h, d]` with `h % sp == 0`.
fn common_dims(xs: &[&Tensor], sp: usize, what: &str) -> Result<(usize, usize)> {
    let first = xs.first().with_context(|| format!("{what}: no tensors"))?;
    let (tokens, _, d) = first.dims3()?;
    for x in xs {
        let (t, h, dx) = x.dims3()?;
        ensure!(
            t == tokens && dx == d,
            "{what}: tensors of shapes {:?} and {:?} do not share tokens and head dim",
            first.dims(),
            x.dims()
        );
        ensure!(
            h % sp == 0,
            "{what}: {h} heads do not split over {sp} sequence-parallel ranks"
        );
    }
    Ok((tokens, d))
}

/// Heads scattered, sequence gathered: each `xs[t] [m, h_t, d]` (this rank's `m` tokens, all
/// heads) becomes `[n, h_t/sp, d]` (all `n = m·sp` tokens in sequence order, this rank's
/// heads `rank·h_t/sp ..`). One `all_to_all` for all tensors. Its backward is
/// [`gather_heads`].
pub fn scatter_heads<const N: usize>(
    comm: &dyn Collectives,
    xs: [&Tensor; N],
) -> Result<[Tensor; N]> {
    let sp = comm.world();
    let (m, d) = common_dims(&xs, sp, "scatter_heads")?;
    let local: Vec<usize> = xs
        .iter()
        .map(|x| x.dim(1).map(|h| h / sp))
        .collect::<Result<_, _>>()?;
    let parts = xs
        .iter()
        .zip(&local)
        .map(|(x, &hl)| x.reshape((m, sp, hl, d))) // [m, sp, h/sp, d]: head group j for rank j
        .collect::<Result<Vec<_>, _>>()?;
    let all_local: usize = local.iter().sum();
    let send = Tensor::cat(&parts, 2)? // [m, sp, Σh/sp, d]
        .transpose(0, 1)?
        .contiguous()?; // [sp, m, Σh/sp, d]: chunk j = our tokens, rank j's heads
                        // Chunk i = rank i's tokens (sequence piece i), our heads: in order, the whole sequence.
    let got = exchange(comm, &send)?.reshape((sp * m, all_local, d))?; // [n, Σh/sp, d]
    split_heads(&got, &local, |t| Ok(t.contiguous()?))
}

/// Sequence scattered, heads gathered: the inverse of [`scatter_heads`]. Each
/// `xs[t] [n, h_t/sp, d]` (all tokens, this rank's heads) becomes `[m, h_t, d]` (this rank's
/// piece `rank·m ..`, all heads). One `all_to_all`. Its backward is [`scatter_heads`].
pub fn gather_heads<const N: usize>(
    comm: &dyn Collectives,
    xs: [&Tensor; N],
) -> Result<[Tensor; N]> {
    let sp = comm.world();
    let (n, d) = common_dims(&xs, 1, "gather_heads")?;
    ensure!(
        n % sp == 0,
        "gather_heads: {n} tokens do not split over {sp} sequence-parallel ranks"
    );
    let m = n / sp;
    let local: Vec<usize> = xs.iter().map(|x| x.dim(1)).collect::<Result<_, _>>()?;
    let all_local: usize = local.iter().sum();
    let send = Tensor::cat(&xs, 1)?.reshape((sp, m, all_local, d))?; // chunk j = piece j's tokens
                                                                     // Chunk i = our tokens, rank i's head group.
    let got = exchange(comm, &send)?.transpose(0, 1)?; // [m, sp, Σh/sp, d]
    split_heads(&got, &local, |t| {
        let hl = t.dim(2)?;
        Ok(t.contiguous()?.reshape((m, sp * hl, d))?) // [m, h, d], head = i·h/sp + local
    })
}

/// Cuts `x` along its head axis (the second to last) into pieces of `local[t]` heads, each
/// finished by `finish`.
fn split_heads<const N: usize>(
    x: &Tensor,
    local: &[usize],
    finish: impl Fn(Tensor) -> Result<Tensor>,
) -> Result<[Tensor; N]> {
    let axis = x.rank() - 2;
    let mut out = Vec::with_capacity(N);
    let mut first = 0;
    for &hl in local {
        out.push(finish(x.narrow(axis, first, hl)?)?);
        first += hl;
    }
    out.try_into()
        .map_err(|_| anyhow::anyhow!("split_heads: expected {N} tensors"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        // Two samples (5 + 2 tokens); the second's first label is masked.
        Batch {
            input_ids: vec![1, 2, 3, 4, 5, 6, 7],
            labels: vec![-100, -100, 13, 14, 15, -100, 17],
            position_ids: vec![0, 1, 2, 3, 4, 0, 1],
            cu_seqlens: vec![0, 5, 7],
        }
    }

    #[test]
    fn pieces_keep_positions_shift_labels_before_the_cut_and_pad_in_their_own_segment() {
        let b = batch();
        let p0 = SeqPiece::split(&b, 2, 0).unwrap();
        let p1 = SeqPiece::split(&b, 2, 1).unwrap();
        assert_eq!(p0.input_ids, vec![1, 2, 3, 4]);
        assert_eq!(p1.input_ids, vec![5, 6, 7, PAD_ID]);
        assert_eq!(p1.position_ids, vec![4, 0, 1, 0]);
        assert_eq!(p0.cu_seqlens, vec![0, 5, 7, 8]);
        // Token 3 (the last of piece 0) predicts label 4, which sits in piece 1.
        assert_eq!(p0.targets, vec![-100, 13, 14, 15]);
        assert_eq!(p1.targets, vec![-100, 17, -100, -100]);
        assert_eq!(
            p0.trained_targets() + p1.trained_targets(),
            4,
            "each target once"
        );
        assert_eq!((p0.real_tokens, p1.real_tokens), (4, 3));
        assert_eq!((p0.start, p1.start), (0, 4));
        // No padding when the length already divides; sp = 1 is the whole batch shifted.
        let whole = SeqPiece::split(&b, 1, 0).unwrap();
        assert_eq!(whole.cu_seqlens, b.cu_seqlens);
        assert_eq!(whole.targets, vec![-100, 13, 14, 15, -100, 17, -100]);
        let err = SeqPiece::split(&b, 2, 2).unwrap_err().to_string();
        assert!(
            err.contains("rank 2 must be below the group size 2"),
            "{err}"
        );
    }

    #[test]
    fn heads_must_split_over_the_group() {
        check_heads(8, 4, 4).unwrap();
        let err = check_heads(8, 2, 4).unwrap_err().to_string();
        assert!(
            err.contains("= 4") && err.contains("(8)") && err.contains("(2)"),
            "{err}"
        );
    }
}
