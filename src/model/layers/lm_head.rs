//! LM head fused with the cross-entropy loss, in row chunks.
//!
//! Loss = Σ over trained positions of `−log softmax(h_i Wᵀ)[labels[i+1]]` (the transformers shift:
//! position `i` predicts `labels[i + 1]`; `-100` is ignored). The caller divides by `n_trained` for
//! the mean. Only the rows that have a trained target are gathered, and they are processed
//! `chunk_rows` at a time with forward and backward fused per chunk, so `[tokens × vocab]` logits
//! are never materialized whole.

use super::acc_dtype;
use crate::kernels::gemm::{gemm_into, GemmOut};
use candle_core::{bail, Result, Tensor, D};

/// Label value that marks a position as not trained (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// The trained positions of a shifted label row: `(rows, targets)` with `targets[j] = labels[rows[j] + 1]`.
/// Errors on a label that is neither `-100` nor a valid token id.
pub fn shifted_targets(labels: &[i32], vocab_size: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    trained_rows(labels, 1, vocab_size)
}

/// The trained positions of an already shifted row (`targets[i]` is what row `i` predicts, as
/// in a sequence-parallel piece): `(rows, targets)` of the entries that are not `-100`.
pub fn row_targets(targets: &[i32], vocab_size: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    trained_rows(targets, 0, vocab_size)
}

/// Row `i - shift` predicts `labels[i]`.
fn trained_rows(labels: &[i32], shift: usize, vocab_size: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, &t) in labels.iter().enumerate().skip(shift) {
        if t == IGNORE_INDEX {
            continue;
        }
        if t < 0 || t as usize >= vocab_size {
            bail!("labels[{i}] = {t}: a label must be -100 or a token id below vocab_size {vocab_size}");
        }
        rows.push((i - shift) as u32);
        targets.push(t as u32);
    }
    Ok((rows, targets))
}

/// What the backward pass wants from [`lm_head_ce`].
pub struct CeGradRequest<'a> {
    /// Multiplies every gradient: the gradient is that of `loss_scale · loss_sum`.
    pub loss_scale: f64,
    /// A trained head: where its gradient `[vocab, h]` goes (e.g. its slot of the flat f32
    /// gradient buffer) and the first chunk's `beta` (0 overwrites, 1 adds to what is there).
    /// Each chunk's `dlogitsᵀ · h` goes there by one GEMM, the later ones with `beta = 1`, so no
    /// `[vocab, h]` temporary, cast or sum over the chunks is ever made. None: frozen head.
    pub dw_into: Option<(GemmOut<'a>, f64)>,
}

/// Result of [`lm_head_ce`].
pub struct CeOutput {
    /// Σ of the token losses, on the device.
    pub loss_sum: DeviceSum,
    pub n_trained: usize,
    /// `[n, h]` in the hidden's dtype (zero for untrained rows); when gradients were requested.
    pub dhidden: Option<Tensor>,
}

/// A sum kept on the device until it is read: reading waits for the device to finish the work
/// queued so far, so a training step reads its loss after queueing its backward, not between
/// the two (the host then queues the backward while the device still runs the forward).
pub struct DeviceSum(Option<Tensor>);

impl DeviceSum {
    /// The value (0 for an empty sum); synchronizes with the device.
    pub fn read(&self) -> Result<f64> {
        match &self.0 {
            Some(t) => Ok(t.to_scalar::<f64>()?),
            None => Ok(0.0),
        }
    }
}

/// Chunked LM head + cross-entropy over `hidden [n, h]` (after the final norm) with head `w [vocab, h]`.
pub fn lm_head_ce(
    hidden: &Tensor,
    w: &Tensor,
    labels: &[i32],
    chunk_rows: usize,
    grad: Option<&CeGradRequest<'_>>,
) -> Result<CeOutput> {
    let n = hidden.dim(0)?;
    if labels.len() != n {
        bail!("labels has {} entries for {n} tokens", labels.len());
    }
    let (rows, targets) = shifted_targets(labels, w.dim(0)?)?;
    lm_head_ce_rows(hidden, w, &rows, &targets, chunk_rows, grad)
}

/// [`lm_head_ce`] for given trained rows of `hidden` and their target ids (from
/// [`shifted_targets`] or [`row_targets`]).
pub fn lm_head_ce_rows(
    hidden: &Tensor,
    w: &Tensor,
    rows: &[u32],
    targets: &[u32],
    chunk_rows: usize,
    grad: Option<&CeGradRequest<'_>>,
) -> Result<CeOutput> {
    let (n, h) = hidden.dims2()?;
    if rows.len() != targets.len() {
        bail!("{} trained rows but {} targets", rows.len(), targets.len());
    }
    if let Some(&bad) = rows.iter().find(|&&r| r as usize >= n) {
        bail!("trained row {bad} is outside the {n} hidden rows");
    }
    let dtype = hidden.dtype();
    let dev = hidden.device();
    let n_trained = rows.len();
    let mut loss_sum: Option<Tensor> = None; // [] f64
    let mut dhidden = match grad {
        Some(_) => Some(Tensor::zeros((n, h), dtype, dev)?),
        None => None,
    };
    let chunk_rows = chunk_rows.max(1);
    let mut start = 0;
    while start < n_trained {
        let len = chunk_rows.min(n_trained - start);
        let rows_c = Tensor::from_slice(&rows[start..start + len], len, dev)?;
        let tgt_c = Tensor::from_slice(&targets[start..start + len], len, dev)?;
        let hc = hidden.index_select(&rows_c, 0)?; // [c, h]
        let logits = hc.matmul(&w.t()?)?; // [c, vocab] in the compute dtype
        let (token_loss, dlogits) = chunk_loss(logits, &tgt_c, grad.map(|r| r.loss_scale))?;
        // Summed on the device; read back once after the last chunk (no sync per chunk).
        let chunk_sum = token_loss.to_dtype(candle_core::DType::F64)?.sum_all()?;
        loss_sum = Some(match loss_sum {
            Some(prev) => (prev + chunk_sum)?,
            None => chunk_sum,
        });
        if let (Some(req), Some(dlogits)) = (grad, dlogits) {
            if let Some(dh) = dhidden.as_mut() {
                let runs = row_runs(&rows[start..start + len]);
                if runs.len() <= MAX_RUNS_IN_PLACE {
                    // Each trained row appears once: the rows' gradient is written straight
                    // into its place in dh (one GEMM per run of consecutive rows, no
                    // [c, h] temporary and no copy of dh).
                    for (at, row0, run) in runs {
                        let out = GemmOut {
                            buf: dh,
                            offset: row0 as usize * h,
                        };
                        let d = dlogits.narrow(0, at, run)?; // [run, vocab]
                                                             // [run, vocab]·[vocab, h]
                        gemm_into(out, &d, false, w, false, 1.0, 0.0)
                            .map_err(candle_core::Error::msg)?;
                    }
                } else {
                    let dhc = dlogits.matmul(w)?; // [c, vocab]·[vocab, h] = [c, h]
                    *dh = dh.index_add(&rows_c, &dhc, 0)?;
                }
            }
            if let Some((out, first_beta)) = req.dw_into {
                // dW = dlogitsᵀ · hc + beta·dW: [vocab, c]·[c, h]
                let beta = if start == 0 { first_beta } else { 1.0 };
                gemm_into(out, &dlogits, true, &hc, false, 1.0, beta)
                    .map_err(candle_core::Error::msg)?;
            }
        }
        start += len;
    }
    Ok(CeOutput {
        loss_sum: DeviceSum(loss_sum),
        n_trained,
        dhidden,
    })
}

/// A chunk's rows go into dh by GEMMs in place when they form at most this many runs of
/// consecutive rows (packed SFT rows: a few response spans per chunk), else by one index-add.
const MAX_RUNS_IN_PLACE: usize = 4;

/// Maximal runs of consecutive values in `rows`: `(position in rows, first row, length)`.
fn row_runs(rows: &[u32]) -> Vec<(usize, u32, usize)> {
    let mut runs: Vec<(usize, u32, usize)> = Vec::new();
    for (i, &r) in rows.iter().enumerate() {
        match runs.last_mut() {
            Some((_, first, len)) if *first as usize + *len == r as usize => *len += 1,
            _ => runs.push((i, r, 1)),
        }
    }
    runs
}

/// Cross-entropy of one chunk: `logits [c, vocab]` (compute dtype), `targets [c]` u32.
/// Returns the token losses `[c]` (acc dtype) and, with `grad_scale`, `dlogits [c, vocab] =
/// grad_scale · (softmax − onehot(target))` in the logits' dtype. One fused kernel on CUDA
/// (`kernels::lm_ce`), which writes the gradient over the logits it is given; this candle-ops code
/// elsewhere (the reference).
pub fn chunk_loss(
    logits: Tensor,
    targets: &Tensor,
    grad_scale: Option<f64>,
) -> Result<(Tensor, Option<Tensor>)> {
    let logits = match crate::kernels::lm_ce::chunk(logits, targets, grad_scale)? {
        Ok(r) => return Ok(r),
        Err(logits) => logits,
    };
    let dtype = logits.dtype();
    let acc = acc_dtype(dtype);
    let vocab = logits.dim(D::Minus1)?;
    let logits = logits.to_dtype(acc)?; // [c, vocab]
    let max = logits.max_keepdim(D::Minus1)?; // [c, 1]
    let shifted = logits.broadcast_sub(&max)?;
    let e = shifted.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?; // [c, 1]
    let tgt_logit = shifted.gather(&targets.unsqueeze(1)?, 1)?; // [c, 1]
                                                                // token loss = log Σ exp(shifted) − shifted[target]
    let token_loss = (sum.log()? - tgt_logit)?.squeeze(1)?; // [c]
    let dlogits = match grad_scale {
        None => None,
        Some(scale) => {
            let onehot = Tensor::arange(0u32, vocab as u32, logits.device())?
                .unsqueeze(0)?
                .broadcast_eq(&targets.unsqueeze(1)?)?
                .to_dtype(acc)?; // [c, vocab]
            Some(((e.broadcast_div(&sum)? - onehot)? * scale)?.to_dtype(dtype)?)
        }
    };
    Ok((token_loss, dlogits))
}
