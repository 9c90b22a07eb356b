//! An NF4 weight resident on the compute device, dequantized on demand.
//!
//! QLoRA keeps only this form of a frozen linear alive: the packed codes and the (double-quantized)
//! block scales, ~4.13 bits per parameter. Each use (the forward matmul, the input-gradient matmul)
//! dequantizes into a temporary in the compute dtype that dies with the matmul.
//!
//! The dequantization here is built from candle ops (a 256-entry byte -> value-pair table, a
//! gather and a per-block scale), so it runs unchanged on CPU and CUDA; on CUDA a fused kernel
//! (`crate::kernels`) replaces it when one is available.

use super::nf4::{Absmax, Nf4Tensor, NESTED_BLOCKSIZE, NF4_CODE};
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

/// Per-block scales on the device.
pub enum DeviceAbsmax {
    /// `[blocks]` f32.
    Plain(Tensor),
    /// Block `i`'s absmax is `code[codes[i]] * scales[i / 256] + offset`.
    Double {
        /// `[groups * 256]` u8, zero-padded to a whole number of 256-block groups.
        codes: Tensor,
        /// `[groups]` f32.
        scales: Tensor,
        offset: f32,
        /// `[256]` f32, the signed dynamic map.
        code: Tensor,
        /// Number of real blocks (the rest of `codes` is padding).
        blocks: usize,
    },
}

/// A 2-D NF4 weight `[out, in]` on a device (bitsandbytes layout, blocksize 64).
pub struct Nf4Weight {
    /// `(out_features, in_features)`.
    pub shape: (usize, usize),
    /// `[ceil(numel / 2)]` u8: element `2i` in the high nibble, `2i + 1` in the low nibble.
    pub packed: Tensor,
    pub absmax: DeviceAbsmax,
    pub blocksize: usize,
}

/// `[256, 2]` f32: byte `b` -> `(NF4[b >> 4], NF4[b & 15])`.
fn byte_pair_table(device: &Device) -> Result<Tensor> {
    let mut table = Vec::with_capacity(512);
    for byte in 0..256usize {
        table.push(NF4_CODE[byte >> 4]);
        table.push(NF4_CODE[byte & 0x0F]);
    }
    Ok(Tensor::from_vec(table, (256, 2), device)?)
}

impl Nf4Weight {
    /// Uploads a host-quantized 2-D weight.
    pub fn from_host(t: &Nf4Tensor, device: &Device) -> Result<Nf4Weight> {
        t.validate()?;
        ensure!(
            t.shape.len() == 2,
            "an NF4 linear weight must be 2-D, got shape {:?}",
            t.shape
        );
        let packed = Tensor::from_slice(&t.packed, t.packed.len(), device)?;
        let absmax = match &t.absmax {
            Absmax::Plain(values) => {
                DeviceAbsmax::Plain(Tensor::from_slice(values, values.len(), device)?)
            }
            Absmax::Double {
                codes,
                scales,
                offset,
                code,
            } => {
                let mut padded = codes.clone();
                padded.resize(scales.len() * NESTED_BLOCKSIZE, 0);
                DeviceAbsmax::Double {
                    codes: Tensor::from_vec(padded, scales.len() * NESTED_BLOCKSIZE, device)?,
                    scales: Tensor::from_slice(scales, scales.len(), device)?,
                    offset: *offset,
                    code: Tensor::from_slice(code, 256, device)?,
                    blocks: codes.len(),
                }
            }
        };
        Ok(Nf4Weight {
            shape: (t.shape[0], t.shape[1]),
            packed,
            absmax,
            blocksize: t.blocksize,
        })
    }

    /// Quantizes an f32/bf16 weight `[out, in]` (any device) and keeps the result on `device`.
    pub fn quantize(w: &Tensor, double_quant: bool, device: &Device) -> Result<Nf4Weight> {
        let dims = w.dims().to_vec();
        let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let host = super::nf4::quantize_nf4(&values, &dims, double_quant)?;
        Nf4Weight::from_host(&host, device)
    }

    pub fn numel(&self) -> usize {
        self.shape.0 * self.shape.1
    }

    /// Bytes held on the device (codes + scales).
    pub fn device_bytes(&self) -> usize {
        let scales = match &self.absmax {
            DeviceAbsmax::Plain(t) => t.elem_count() * 4,
            DeviceAbsmax::Double { codes, scales, .. } => {
                codes.elem_count() + scales.elem_count() * 4 + 1024
            }
        };
        self.packed.elem_count() + scales
    }

    /// The fp32 absmax of every block `[blocks]`, with bitsandbytes' rounding (multiply, then add
    /// the offset as a separate rounding step).
    fn block_absmax(&self) -> Result<Tensor> {
        Ok(match &self.absmax {
            DeviceAbsmax::Plain(t) => t.clone(),
            DeviceAbsmax::Double {
                codes,
                scales,
                offset,
                code,
                blocks,
            } => {
                let groups = scales.elem_count();
                let centered = code
                    .index_select(codes, 0)? // [groups * 256]
                    .reshape((groups, NESTED_BLOCKSIZE))?
                    .broadcast_mul(&scales.reshape((groups, 1))?)?; // [groups, 256]
                (centered.flatten_all()?.narrow(0, 0, *blocks)? + *offset as f64)?
            }
        })
    }

    /// The weight `[out, in]` in `dtype` (f32 products cast once, as bitsandbytes does).
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(t) = crate::kernels::nf4::dequantize(self, dtype)? {
            return Ok(t);
        }
        let device = self.packed.device();
        let numel = self.numel();
        let values = byte_pair_table(device)?
            .index_select(&self.packed, 0)? // [bytes, 2]
            .flatten_all()?;
        let blocks = numel.div_ceil(self.blocksize);
        let padded = blocks * self.blocksize;
        let values = if values.elem_count() < padded {
            let pad = Tensor::zeros(padded - values.elem_count(), DType::F32, device)?;
            Tensor::cat(&[&values, &pad], 0)?
        } else {
            values.narrow(0, 0, padded)?
        };
        let scaled = values
            .reshape((blocks, self.blocksize))?
            .broadcast_mul(&self.block_absmax()?.reshape((blocks, 1))?)?; // [blocks, 64]
        Ok(scaled
            .flatten_all()?
            .narrow(0, 0, numel)?
            .reshape(self.shape)?
            .to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::nf4::{dequantize_nf4, quantize_nf4};

    fn weights(n: usize) -> Vec<f32> {
        // Deterministic, sign-mixed, with an outlier per 97 values.
        (0..n)
            .map(|i| {
                let x = ((i as f32 * 0.618_034).fract() - 0.5) * 0.2;
                if i % 97 == 0 {
                    x * 40.0
                } else {
                    x
                }
            })
            .collect()
    }

    #[test]
    fn device_dequant_equals_host_dequant_bit_for_bit() {
        // 96 x 200: 300 blocks (not a multiple of 256: a padded nested group).
        for (rows, cols) in [(96, 200), (64, 128), (3, 5)] {
            let w = weights(rows * cols);
            for dq in [false, true] {
                let host = quantize_nf4(&w, &[rows, cols], dq).unwrap();
                let expect = dequantize_nf4(&host).unwrap();
                let dev = Nf4Weight::from_host(&host, &Device::Cpu).unwrap();
                let got = dev.dequantize(DType::F32).unwrap();
                assert_eq!(got.dims(), &[rows, cols]);
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let same = got
                    .iter()
                    .zip(&expect)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{rows}x{cols} double_quant={dq}: device path differs");
            }
        }
    }

    #[test]
    fn device_bytes_is_about_4_13_bits_per_parameter() {
        let w = weights(256 * 1024);
        let t = Tensor::from_vec(w, (256, 1024), &Device::Cpu).unwrap();
        let q = Nf4Weight::quantize(&t, true, &Device::Cpu).unwrap();
        let bits = q.device_bytes() as f64 * 8.0 / q.numel() as f64;
        assert!((4.12..4.2).contains(&bits), "{bits} bits per parameter");
    }
}
