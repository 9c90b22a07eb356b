//! Causal self-attention with GQA over packed samples (varlen): the tokens of sample `i`
//! (`cu_seqlens[i]..cu_seqlens[i+1]`) attend only to earlier tokens of sample `i`. The
//! bidirectional variant (every token of a sample sees all of it: the CLIP vision tower) shares
//! the same code with the causal mask left out.
//!
//! This is the plain implementation: scores are materialized per sample for all heads of a KV
//! group at once. The function boundary `attention_forward/backward(q, k, v, cu_seqlens)` is the
//! one a flash kernel will replace; like flash attention it keeps only the output and the row
//! log-sum-exp for the backward, which recomputes the probabilities.
//!
//! Heads: query head `h` uses KV head `h / group` with `group = q_heads / kv_heads` (HF
//! `repeat_kv`). Matmuls run in the compute dtype, the softmax in [`acc_dtype`].

use super::acc_dtype;
use candle_core::{bail, DType, Result, Tensor, D};

/// Validates `cu_seqlens` against `n` tokens: starts at 0, strictly increasing, ends at `n`.
pub fn check_cu_seqlens(cu_seqlens: &[u32], n: usize) -> Result<()> {
    if cu_seqlens.len() < 2 || cu_seqlens[0] != 0 || *cu_seqlens.last().unwrap_or(&0) as usize != n
    {
        bail!("cu_seqlens {cu_seqlens:?} must start at 0 and end at the token count {n}");
    }
    if let Some(w) = cu_seqlens.windows(2).find(|w| w[1] <= w[0]) {
        bail!(
            "cu_seqlens {cu_seqlens:?} must be strictly increasing (found {} then {})",
            w[0],
            w[1]
        );
    }
    Ok(())
}

/// Bytes of f32 scores one chunk of KV heads may materialize: long samples are processed a few KV
/// heads at a time so a 2048-token sample of a 32-head model needs ~64 MiB, not 512 MiB, per
/// score-sized temporary (the backward holds several at once).
const SCORE_BUDGET_BYTES: usize = 64 << 20;

/// `(first KV head, count)` chunks covering `kv_heads` for a sample of `l` tokens.
fn kv_chunks(kv_heads: usize, group: usize, l: usize, budget: usize) -> Vec<(usize, usize)> {
    let per_kv = group * l * l * 4;
    let step = (budget / per_kv.max(1)).clamp(1, kv_heads);
    (0..kv_heads)
        .step_by(step)
        .map(|s| (s, step.min(kv_heads - s)))
        .collect()
}

/// `[L, heads, d]` -> `[kv_heads, group * L, d]` with rows ordered (group member, token).
fn group_queries(q: &Tensor, kv_heads: usize) -> Result<Tensor> {
    let (l, hq, d) = q.dims3()?;
    q.transpose(0, 1)? // [hq, L, d]
        .contiguous()?
        .reshape((kv_heads, (hq / kv_heads) * l, d))
}

/// Inverse of [`group_queries`]: `[kv_heads, group * L, d]` -> `[L, heads, d]`.
fn ungroup_queries(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (_, rows, d) = x.dims3()?;
    let kv_heads = x.dim(0)?;
    let l = rows * kv_heads / heads;
    x.reshape((heads, l, d))?.transpose(0, 1)?.contiguous()
}

/// `[L, kv_heads, d]` -> `[kv_heads, L, d]`.
fn heads_first(x: &Tensor) -> Result<Tensor> {
    x.transpose(0, 1)?.contiguous()
}

/// Boolean mask `[group * Lq, Lk]` (u8, 1 = may attend): query row `r` sits at absolute position
/// `q_offset + r % Lq` and attends to keys `j <= q_offset + r % Lq`.
fn causal_mask(
    group: usize,
    lq: usize,
    lk: usize,
    q_offset: usize,
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let qpos = Tensor::arange(q_offset as u32, (q_offset + lq) as u32, dev)?.reshape((lq, 1))?;
    let kpos = Tensor::arange(0u32, lk as u32, dev)?.reshape((1, lk))?;
    kpos.broadcast_le(&qpos)? // [Lq, Lk]
        .unsqueeze(0)?
        .broadcast_as((group, lq, lk))?
        .reshape((group * lq, lk))
}

/// Softmax statistics of one block: returns `(p [kv, group*Lq, Lk] acc dtype, lse [kv, group*Lq, 1])`.
/// `mask = None` lets every query see every key.
fn probs(
    qg: &Tensor,
    k: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    acc: DType,
) -> Result<(Tensor, Tensor)> {
    let scores = (qg.matmul(&k.transpose(1, 2)?)?.to_dtype(acc)? * scale)?; // [kv, gLq, Lk]
    let scores = match mask {
        Some(mask) => {
            let neg_inf = Tensor::full(f32::NEG_INFINITY, (), qg.device())?
                .to_dtype(acc)?
                .broadcast_as(scores.shape())?;
            mask.unsqueeze(0)?
                .broadcast_as(scores.shape())?
                .where_cond(&scores, &neg_inf)?
        }
        None => scores,
    };
    let max = scores.max_keepdim(D::Minus1)?; // [kv, gLq, 1]; finite: key 0 is always visible
    let e = scores.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let p = e.broadcast_div(&sum)?;
    let lse = (sum.log()? + max)?;
    Ok((p, lse))
}

/// Attention of the queries `q [Lq, heads, d]` at positions `q_offset..q_offset+Lq` over keys and
/// values `k, v [Lk, kv_heads, d]` at positions `0..Lk` of one sequence.
/// Returns `(out [Lq, heads, d], lse [heads, Lq] acc dtype)`. Used by the varlen forward
/// (`q_offset = 0`) and by incremental decoding with a KV cache.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, q_offset: usize) -> Result<(Tensor, Tensor)> {
    attend_masked(q, k, v, Some(q_offset))
}

/// [`attend`], causal with queries at `causal_offset..`, or bidirectional when `None`.
fn attend_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal_offset: Option<usize>,
) -> Result<(Tensor, Tensor)> {
    let (lq, heads, d) = q.dims3()?;
    let (lk, kv_heads, _) = k.dims3()?;
    let group = heads / kv_heads;
    let acc = acc_dtype(q.dtype());
    let scale = 1.0 / (d as f64).sqrt();
    let qg = group_queries(q, kv_heads)?; // [kv, group*Lq, d]
    let kh = heads_first(k)?; // [kv, Lk, d]
    let vh = heads_first(v)?;
    let mask = causal_offset
        .map(|offset| causal_mask(group, lq, lk, offset, q.device()))
        .transpose()?;
    let (p, lse) = probs(&qg, &kh, mask.as_ref(), scale, acc)?;
    let out = p.to_dtype(q.dtype())?.matmul(&vh)?; // [kv, group*Lq, d]
    let out = ungroup_queries(&out, heads)?;
    let lse = lse.reshape((heads, lq))?;
    Ok((out, lse))
}

/// Varlen causal GQA attention. `q [n, heads, d]`, `k, v [n, kv_heads, d]`.
/// Returns `(out [n, heads, d], lse [heads, n] acc dtype)`; keep both for the backward.
/// Runs the flash attention kernel where it applies (CUDA, bf16, head dim 64/128), else
/// [`attention_forward_ops`].
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[u32],
) -> Result<(Tensor, Tensor)> {
    if let Some(res) = crate::kernels::flash_attn::forward(q, k, v, cu_seqlens)? {
        return Ok(res);
    }
    attention_forward_ops(q, k, v, cu_seqlens)
}

/// [`attention_forward`] in candle ops: the reference of the kernel, and the path on the CPU.
pub fn attention_forward_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[u32],
) -> Result<(Tensor, Tensor)> {
    forward_chunked(q, k, v, cu_seqlens, SCORE_BUDGET_BYTES, true)
}

/// Varlen bidirectional (non-causal) attention: every token of a sample attends to all tokens
/// of that sample, as in a ViT. Shapes and outputs as [`attention_forward`]; candle ops only
/// (the flash kernels are causal).
pub fn bidirectional_attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[u32],
) -> Result<(Tensor, Tensor)> {
    forward_chunked(q, k, v, cu_seqlens, SCORE_BUDGET_BYTES, false)
}

/// Backward of [`bidirectional_attention_forward`]; the formulas of [`attention_backward`]
/// without the mask.
pub fn bidirectional_attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    cu_seqlens: &[u32],
) -> Result<(Tensor, Tensor, Tensor)> {
    backward_chunked(
        q,
        k,
        v,
        out,
        lse,
        dout,
        cu_seqlens,
        SCORE_BUDGET_BYTES,
        false,
    )
}

fn forward_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[u32],
    budget: usize,
    causal: bool,
) -> Result<(Tensor, Tensor)> {
    check_cu_seqlens(cu_seqlens, q.dim(0)?)?;
    let mut outs = Vec::with_capacity(cu_seqlens.len() - 1);
    let mut lses = Vec::with_capacity(cu_seqlens.len() - 1);
    for w in cu_seqlens.windows(2) {
        let (a, l) = (w[0] as usize, (w[1] - w[0]) as usize);
        let (q, k, v) = (q.narrow(0, a, l)?, k.narrow(0, a, l)?, v.narrow(0, a, l)?);
        let (kv_heads, group) = (k.dim(1)?, q.dim(1)? / k.dim(1)?);
        let mut parts = vec![];
        for (h0, hn) in kv_chunks(kv_heads, group, l, budget) {
            parts.push(attend_masked(
                &q.narrow(1, h0 * group, hn * group)?,
                &k.narrow(1, h0, hn)?,
                &v.narrow(1, h0, hn)?,
                causal.then_some(0),
            )?);
        }
        let (o, lse): (Vec<Tensor>, Vec<Tensor>) = parts.into_iter().unzip();
        outs.push(Tensor::cat(&o, 1)?); // [l, heads, d]
        lses.push(Tensor::cat(&lse, 0)?); // [heads, l]
    }
    Ok((Tensor::cat(&outs, 0)?, Tensor::cat(&lses, 1)?))
}

/// Backward of [`attention_forward`] for upstream `dout [n, heads, d]`.
/// Per sample: `P = exp(S − lse)`, `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − rowsum(dO ∘ O))`,
/// `dQ = scale · dS K`, `dK = scale · dSᵀ Q` (the GQA group sums fall out of the grouped layout).
/// Returns `(dq, dk, dv)` in the shapes of `q, k, v`. Runs the flash attention kernel where it
/// applies, else [`attention_backward_ops`].
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    cu_seqlens: &[u32],
) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some(res) = crate::kernels::flash_attn::backward(q, k, v, out, lse, dout, cu_seqlens)? {
        return Ok(res);
    }
    attention_backward_ops(q, k, v, out, lse, dout, cu_seqlens)
}

/// [`attention_backward`] in candle ops: the reference of the kernel, and the path on the CPU.
pub fn attention_backward_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    cu_seqlens: &[u32],
) -> Result<(Tensor, Tensor, Tensor)> {
    backward_chunked(
        q,
        k,
        v,
        out,
        lse,
        dout,
        cu_seqlens,
        SCORE_BUDGET_BYTES,
        true,
    )
}

#[allow(clippy::too_many_arguments)]
fn backward_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    cu_seqlens: &[u32],
    budget: usize,
    causal: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    check_cu_seqlens(cu_seqlens, q.dim(0)?)?;
    let (_, heads, d) = q.dims3()?;
    let kv_heads = k.dim(1)?;
    let group = heads / kv_heads;
    let dtype = q.dtype();
    let acc = acc_dtype(dtype);
    let scale = 1.0 / (d as f64).sqrt();
    let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
    for w in cu_seqlens.windows(2) {
        let (a, l) = (w[0] as usize, (w[1] - w[0]) as usize);
        let mask = causal
            .then(|| causal_mask(group, l, l, 0, q.device()))
            .transpose()?;
        let (mut dq_parts, mut dk_parts, mut dv_parts) = (vec![], vec![], vec![]);
        for (h0, hn) in kv_chunks(kv_heads, group, l, budget) {
            let (qh, qn) = (h0 * group, hn * group);
            let qg = group_queries(&q.narrow(0, a, l)?.narrow(1, qh, qn)?, hn)?; // [hn, gL, d]
            let kh = heads_first(&k.narrow(0, a, l)?.narrow(1, h0, hn)?)?; // [hn, L, d]
            let vh = heads_first(&v.narrow(0, a, l)?.narrow(1, h0, hn)?)?;
            let og = group_queries(&out.narrow(0, a, l)?.narrow(1, qh, qn)?, hn)?;
            let dog = group_queries(&dout.narrow(0, a, l)?.narrow(1, qh, qn)?, hn)?;
            let lse_s = lse
                .narrow(1, a, l)?
                .narrow(0, qh, qn)?
                .contiguous()?
                .reshape((hn, group * l, 1))?;
            let scores = (qg.matmul(&kh.transpose(1, 2)?)?.to_dtype(acc)? * scale)?; // [hn, gL, L]
            let p = scores.broadcast_sub(&lse_s)?.exp()?;
            drop(scores);
            let p = match &mask {
                // exact zeros above the diagonal
                Some(mask) => mask
                    .unsqueeze(0)?
                    .broadcast_as(p.shape())?
                    .where_cond(&p, &p.zeros_like()?)?,
                None => p,
            };
            let p_c = p.to_dtype(dtype)?;
            let dv = p_c.transpose(1, 2)?.matmul(&dog)?; // [hn, L, gL]·[hn, gL, d] = [hn, L, d]
            drop(p_c);
            let dp = dog.matmul(&vh.transpose(1, 2)?)?.to_dtype(acc)?; // [hn, gL, L]
            let delta = (dog.to_dtype(acc)? * og.to_dtype(acc)?)?.sum_keepdim(D::Minus1)?; // [hn, gL, 1]
            let ds = ((p * dp.broadcast_sub(&delta)?)? * scale)?.to_dtype(dtype)?; // [hn, gL, L]
            let dq = ds.matmul(&kh)?; // [hn, gL, d]
            let dk = ds.transpose(1, 2)?.matmul(&qg)?; // [hn, L, d]
            dq_parts.push(ungroup_queries(&dq, qn)?); // [L, qn, d]
            dk_parts.push(heads_first(&dk)?); // [L, hn, d]
            dv_parts.push(heads_first(&dv)?);
        }
        dqs.push(Tensor::cat(&dq_parts, 1)?);
        dks.push(Tensor::cat(&dk_parts, 1)?);
        dvs.push(Tensor::cat(&dv_parts, 1)?);
    }
    Ok((
        Tensor::cat(&dqs, 0)?,
        Tensor::cat(&dks, 0)?,
        Tensor::cat(&dvs, 0)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn randn(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f64> = (0..n)
            .map(|i| ((i as f64 * 0.7548776662 + seed as f64 * 0.5698402910).fract() - 0.5) * 2.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// One KV head per chunk (budget 1 byte) equals all heads at once, forward and backward.
    #[test]
    fn head_chunking_does_not_change_results() {
        let (n, heads, kv, d) = (19, 6, 3, 8);
        let (q, k, v) = (
            randn((n, heads, d), 1),
            randn((n, kv, d), 2),
            randn((n, kv, d), 3),
        );
        let dout = randn((n, heads, d), 4);
        let cu = [0u32, 7, 19];
        let (o1, l1) = forward_chunked(&q, &k, &v, &cu, usize::MAX, true).unwrap();
        let (o2, l2) = forward_chunked(&q, &k, &v, &cu, 1, true).unwrap();
        let same = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            d.to_scalar::<f64>().unwrap()
        };
        assert!(same(&o1, &o2) < 1e-12 && same(&l1, &l2) < 1e-12);
        let g1 = backward_chunked(&q, &k, &v, &o1, &l1, &dout, &cu, usize::MAX, true).unwrap();
        let g2 = backward_chunked(&q, &k, &v, &o1, &l1, &dout, &cu, 1, true).unwrap();
        assert!(same(&g1.0, &g2.0) < 1e-12);
        assert!(same(&g1.1, &g2.1) < 1e-12);
        assert!(same(&g1.2, &g2.2) < 1e-12);
        assert_eq!(kv_chunks(3, 2, 19, 1), vec![(0, 1), (1, 1), (2, 1)]);
        assert_eq!(
            kv_chunks(8, 2, 2048, 64 << 20),
            vec![(0, 2), (2, 2), (4, 2), (6, 2)]
        );
    }
}
