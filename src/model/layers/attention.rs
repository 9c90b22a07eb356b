//! Causal self-attention with GQA over packed samples (varlen): the tokens of sample `i`
//! (`cu_seqlens[i]..cu_seqlens[i+1]`) attend only to earlier tokens of sample `i`.
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
fn probs(
    qg: &Tensor,
    k: &Tensor,
    mask: &Tensor,
    scale: f64,
    acc: DType,
) -> Result<(Tensor, Tensor)> {
    let scores = (qg.matmul(&k.transpose(1, 2)?)?.to_dtype(acc)? * scale)?; // [kv, gLq, Lk]
    let neg_inf = Tensor::full(f32::NEG_INFINITY, (), qg.device())?
        .to_dtype(acc)?
        .broadcast_as(scores.shape())?;
    let scores = mask
        .unsqueeze(0)?
        .broadcast_as(scores.shape())?
        .where_cond(&scores, &neg_inf)?;
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
    let (lq, heads, d) = q.dims3()?;
    let (lk, kv_heads, _) = k.dims3()?;
    let group = heads / kv_heads;
    let acc = acc_dtype(q.dtype());
    let scale = 1.0 / (d as f64).sqrt();
    let qg = group_queries(q, kv_heads)?; // [kv, group*Lq, d]
    let kh = heads_first(k)?; // [kv, Lk, d]
    let vh = heads_first(v)?;
    let mask = causal_mask(group, lq, lk, q_offset, q.device())?;
    let (p, lse) = probs(&qg, &kh, &mask, scale, acc)?;
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
    check_cu_seqlens(cu_seqlens, q.dim(0)?)?;
    let mut outs = Vec::with_capacity(cu_seqlens.len() - 1);
    let mut lses = Vec::with_capacity(cu_seqlens.len() - 1);
    for w in cu_seqlens.windows(2) {
        let (a, l) = (w[0] as usize, (w[1] - w[0]) as usize);
        let (o, lse) = attend(
            &q.narrow(0, a, l)?,
            &k.narrow(0, a, l)?,
            &v.narrow(0, a, l)?,
            0,
        )?;
        outs.push(o);
        lses.push(lse);
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
        let qg = group_queries(&q.narrow(0, a, l)?, kv_heads)?; // [kv, gL, d]
        let kh = heads_first(&k.narrow(0, a, l)?)?; // [kv, L, d]
        let vh = heads_first(&v.narrow(0, a, l)?)?;
        let og = group_queries(&out.narrow(0, a, l)?, kv_heads)?; // [kv, gL, d]
        let dog = group_queries(&dout.narrow(0, a, l)?, kv_heads)?;
        let lse_s = lse
            .narrow(1, a, l)?
            .contiguous()?
            .reshape((kv_heads, group * l, 1))?;
        let mask = causal_mask(group, l, l, 0, q.device())?;
        let scores = (qg.matmul(&kh.transpose(1, 2)?)?.to_dtype(acc)? * scale)?; // [kv, gL, L]
        let p = scores.broadcast_sub(&lse_s)?.exp()?;
        let p = mask
            .unsqueeze(0)?
            .broadcast_as(p.shape())?
            .where_cond(&p, &p.zeros_like()?)?; // exact zeros above the diagonal
        let p_c = p.to_dtype(dtype)?;
        let dv = p_c.transpose(1, 2)?.matmul(&dog)?; // [kv, L, gL]·[kv, gL, d] = [kv, L, d]
        let dp = dog.matmul(&vh.transpose(1, 2)?)?.to_dtype(acc)?; // [kv, gL, L]
        let delta = (dog.to_dtype(acc)? * og.to_dtype(acc)?)?.sum_keepdim(D::Minus1)?; // [kv, gL, 1]
        let ds = ((p * dp.broadcast_sub(&delta)?)? * scale)?.to_dtype(dtype)?; // [kv, gL, L]
        let dq = ds.matmul(&kh)?; // [kv, gL, d]
        let dk = ds.transpose(1, 2)?.matmul(&qg)?; // [kv, L, d]
        dqs.push(ungroup_queries(&dq, heads)?);
        dks.push(heads_first(&dk)?);
        dvs.push(heads_first(&dv)?);
    }
    Ok((
        Tensor::cat(&dqs, 0)?,
        Tensor::cat(&dks, 0)?,
        Tensor::cat(&dvs, 0)?,
    ))
}
