//! Token embedding: a row gather; the backward scatters rows back with `index_add`.

use super::acc_dtype;
use candle_core::{Result, Tensor};

/// `y [n, h] = W[ids]` for `ids [n]` (u32) and `W [vocab, h]`, on `ids`' device. A table kept on
/// another device (a frozen one in host memory) is gathered there and only the rows move.
pub fn embedding_forward(ids: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.device().same_device(ids.device()) {
        return w.index_select(ids, 0);
    }
    w.index_select(&ids.to_device(w.device())?, 0)?
        .to_device(ids.device())
}

/// `dW [vocab, h]` (acc dtype) for upstream `dy [n, h]`; repeated ids accumulate.
/// Only called when the embedding is trainable.
pub fn embedding_backward(ids: &Tensor, dy: &Tensor, vocab_size: usize) -> Result<Tensor> {
    let acc = acc_dtype(dy.dtype());
    let h = dy.dim(1)?;
    Tensor::zeros((vocab_size, h), acc, dy.device())?.index_add(ids, &dy.to_dtype(acc)?, 0)
}
