//! Rotary position embedding in the HF Llama `rotate_half` convention:
//! `y = x · cos + rotate_half(x) · sin` with `rotate_half([x1, x2]) = [−x2, x1]` and
//! `inv_freq[i] = theta^(−2i / head_dim)`, the angle table duplicated over both halves.
//! On CUDA forward and backward are one fused kernel each (`kernels::rope`); the candle-ops code
//! here is its reference.

use candle_core::{DType, Device, Result, Tensor, D};

/// `(cos, sin)`, each `[n, head_dim]` in `dtype`, for the given absolute positions (they restart at
/// 0 for every packed sample). Angles are computed in f64 on the host, then cast.
pub fn rope_table(
    positions: &[u32],
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    // HF computes inv_freq in f32; match that rounding so bf16/f32 runs agree with transformers.
    let inv_freq: Vec<f64> = (0..half)
        .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32 as f64)
        .collect();
    let mut cos = Vec::with_capacity(positions.len() * head_dim);
    let mut sin = Vec::with_capacity(positions.len() * head_dim);
    for &p in positions {
        // the same angles for both halves (HF `cat((freqs, freqs), -1)`)
        for _half in 0..2 {
            for f in &inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let n = positions.len();
    let cos = Tensor::from_vec(cos, (n, head_dim), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (n, head_dim), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// [`rope_table`] rows for positions `0..len`, built once on the host and grown when a batch
/// needs a later position; a batch's tables are gathered from it on the device. Building a
/// batch's table on the host costs ~0.5M f64 sines and cosines per 2048 tokens at head dim 128,
/// and the device waits for it at the start of every step. The rows are those `rope_table`
/// computes for the same positions, so the gathered tables are identical to it.
pub struct RopeCache {
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: Device,
    /// `(len, cos [len, head_dim], sin [len, head_dim])`
    table: std::sync::Mutex<Option<(usize, Tensor, Tensor)>>,
}

impl RopeCache {
    pub fn new(head_dim: usize, theta: f64, dtype: DType, device: &Device) -> Self {
        RopeCache {
            head_dim,
            theta,
            dtype,
            device: device.clone(),
            table: std::sync::Mutex::new(None),
        }
    }

    /// `(cos, sin)` for `positions`, as [`rope_table`].
    pub fn tables(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let Some(&last) = positions.iter().max() else {
            return rope_table(
                positions,
                self.head_dim,
                self.theta,
                self.dtype,
                &self.device,
            );
        };
        let need = last as usize + 1;
        let mut table = self
            .table
            .lock()
            .map_err(|_| candle_core::Error::msg("rope table cache poisoned"))?;
        if table.as_ref().is_none_or(|(len, _, _)| *len < need) {
            let len = need.next_power_of_two();
            let all: Vec<u32> = (0..len as u32).collect();
            let (cos, sin) = rope_table(&all, self.head_dim, self.theta, self.dtype, &self.device)?;
            *table = Some((len, cos, sin));
        }
        let (_, cos, sin) = table.as_ref().expect("built above");
        let idx = Tensor::from_slice(positions, positions.len(), &self.device)?;
        Ok((cos.index_select(&idx, 0)?, sin.index_select(&idx, 0)?))
    }
}

/// `[x1, x2] -> [−x2, x1]` on the last dimension.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotates `x [n, heads, head_dim]` by the per-token angles `cos`/`sin [n, head_dim]`.
pub fn rope_forward(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if let Some(y) = crate::kernels::rope::rotate(x, cos, sin, 1.0)? {
        return Ok(y);
    }
    let cos = cos.unsqueeze(1)?; // [n, 1, d]
    let sin = sin.unsqueeze(1)?;
    x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?
}

/// Backward of [`rope_forward`]: the rotation is orthogonal, so `dx` is `dy` rotated by the
/// opposite angle (the same formula with `−sin`).
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if let Some(dx) = crate::kernels::rope::rotate(dy, cos, sin, -1.0)? {
        return Ok(dx);
    }
    rope_forward(dy, cos, &sin.neg()?)
}
