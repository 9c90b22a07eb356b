//! NF4 dequantization in one kernel (`cuda/nf4.cu`): packed codes + (double-quantized) block
//! scales -> the `[out, in]` weight in bf16 or f32, bit-exact with
//! [`crate::quant::Nf4Weight::dequantize`]'s candle-ops path (and so with bitsandbytes).

use super::{run_check, KernelCheck, Tolerance};
use crate::quant::device::Nf4Weight;
use anyhow::Result;
use candle_core::Tensor;
use candle_core::{DType, Device};

/// The weight `[out, in]` in `dtype` (bf16 or f32) from the CUDA kernel; `None` when `w` is not on
/// a CUDA device (or the dtype/kernels are not available): the caller runs the candle-ops path.
pub fn dequantize(w: &Nf4Weight, dtype: DType) -> Result<Option<Tensor>> {
    // The kernel indexes with 32 bits and decodes both nibbles of a byte with one block scale.
    let kernel_layout = w.numel() < (1 << 31) && w.blocksize % 2 == 0;
    if !super::on_cuda(&w.packed) || !super::float_kernel_dtype(dtype) || !kernel_layout {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        imp::dequantize(w, dtype).map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(None)
    }
}

/// [`dequantize`] into `out`, an existing contiguous bf16 or f32 tensor of the weight's element
/// count (a reused scratch buffer: no allocation per use). Returns false, writing nothing, where
/// [`dequantize`] would return `None`.
pub fn dequantize_into(w: &Nf4Weight, out: &Tensor) -> Result<bool> {
    let kernel_layout = w.numel() < (1 << 31) && w.blocksize % 2 == 0;
    if !super::on_cuda(&w.packed) || !super::float_kernel_dtype(out.dtype()) || !kernel_layout {
        return Ok(false);
    }
    if out.elem_count() != w.numel() || !out.is_contiguous() {
        anyhow::bail!(
            "NF4 weight {:?}: output of {} values (contiguous: {}) for {} values",
            w.shape,
            out.elem_count(),
            out.is_contiguous(),
            w.numel()
        );
    }
    #[cfg(feature = "cuda")]
    {
        imp::dequantize_into(w, out)?;
        Ok(true)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(false)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::kernels::cuda::{alloc, device_of, func, grid_1d, stream, wrap, CudaInput};
    use crate::quant::device::{DeviceAbsmax, Nf4Weight};
    use crate::quant::nf4::NF4_CODE;
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Tensor};
    use half::bf16;

    /// The 16 NF4 values, passed by value (single source: `quant::nf4::NF4_CODE`).
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Nf4Table([f32; 16]);
    // SAFETY: plain-old-data, layout identical to the kernel's `struct Nf4Table { float v[16]; }`.
    unsafe impl DeviceRepr for Nf4Table {}

    pub fn dequantize(w: &Nf4Weight, dtype: DType) -> Result<Tensor> {
        let dev = device_of(&w.packed)?;
        match dtype {
            DType::BF16 => {
                let out = alloc::<bf16>(&dev, w.numel())?;
                launch(w, "nf4_dequant_bf16", &out.slice(..))?;
                Ok(wrap(out, &dev, w.shape))
            }
            DType::F32 => {
                let out = alloc::<f32>(&dev, w.numel())?;
                launch(w, "nf4_dequant_f32", &out.slice(..))?;
                Ok(wrap(out, &dev, w.shape))
            }
            other => bail!("NF4 dequantization kernel: no {other:?} output"),
        }
    }

    pub fn dequantize_into(w: &Nf4Weight, out: &Tensor) -> Result<()> {
        let out_in = CudaInput::new(out)?;
        match out.dtype() {
            DType::BF16 => launch(w, "nf4_dequant_bf16", &out_in.view::<bf16>()?),
            DType::F32 => launch(w, "nf4_dequant_f32", &out_in.view::<f32>()?),
            other => bail!("NF4 dequantization kernel: no {other:?} output"),
        }
    }

    /// Runs the kernel writing `numel` values of `T` to `out` (a fresh slice or a tensor's view).
    fn launch<T: CudaDType + DeviceRepr>(
        w: &Nf4Weight,
        kernel: &str,
        out: &CudaView<'_, T>,
    ) -> Result<()> {
        let dev = device_of(&w.packed)?;
        let numel = w.numel();
        let packed = w.packed.contiguous()?; // [ceil(numel / 2)] u8
        let n_bytes = packed.elem_count();
        if n_bytes < numel.div_ceil(2) {
            bail!(
                "NF4 weight {:?}: {n_bytes} packed bytes for {numel} values",
                w.shape
            );
        }
        let blocks = numel.div_ceil(w.blocksize);
        // The scale arrays, in the kernel's argument order.
        let (scale_tensors, offset) = match &w.absmax {
            DeviceAbsmax::Plain(t) => {
                if t.elem_count() < blocks {
                    bail!(
                        "NF4 weight {:?}: {} block scales for {blocks} blocks",
                        w.shape,
                        t.elem_count()
                    );
                }
                (vec![t.contiguous()?], 0f32)
            }
            DeviceAbsmax::Double {
                codes,
                scales,
                offset,
                code,
                blocks: real_blocks,
            } => {
                if *real_blocks < blocks
                    || codes.elem_count() < blocks
                    || scales.elem_count() < blocks.div_ceil(256)
                {
                    bail!("NF4 weight {:?}: too few double-quantized block scales for {blocks} blocks", w.shape);
                }
                (
                    vec![
                        codes.contiguous()?,
                        scales.contiguous()?,
                        code.contiguous()?,
                    ],
                    *offset,
                )
            }
        };
        let packed_in = CudaInput::new(&packed)?;
        let scale_in = scale_tensors
            .iter()
            .map(CudaInput::new)
            .collect::<Result<Vec<_>>>()?;
        let packed_v = packed_in.view::<u8>()?;
        let plain_v = match scale_in.as_slice() {
            [plain] => Some(plain.view::<f32>()?),
            _ => None,
        };
        let double_v = match scale_in.as_slice() {
            [codes, scales, code] => Some((
                codes.view::<u8>()?,
                scales.view::<f32>()?,
                code.view::<f32>()?,
            )),
            _ => None,
        };
        let table = Nf4Table(NF4_CODE);
        // Bytes past ceil(numel / 2) (if any) hold no values.
        let (n_bytes_u, numel_u, blocksize) =
            (numel.div_ceil(2) as u32, numel as u32, w.blocksize as u32);
        // A null pointer for the scale arrays the chosen quantization does not use.
        let null: u64 = 0;
        let f = func(&dev, "nf4", kernel)?;
        let stream = stream(&dev);
        let mut b = stream.launch_builder(&f);
        b.arg(&packed_v).arg(&n_bytes_u);
        match (&plain_v, &double_v) {
            (Some(plain), _) => b.arg(plain).arg(&null).arg(&null).arg(&offset).arg(&null),
            (None, Some((codes, scales, code))) => {
                b.arg(&null).arg(codes).arg(scales).arg(&offset).arg(code)
            }
            (None, None) => bail!("NF4 weight {:?}: unknown scale layout", w.shape),
        };
        // Whole 32-bit words of codes when they hold 8 values of one block and are aligned.
        let vec_ok = i32::from(w.blocksize % 8 == 0 && packed.layout().start_offset() % 4 == 0);
        b.arg(&table)
            .arg(&numel_u)
            .arg(&blocksize)
            .arg(&vec_ok)
            .arg(out);
        // SAFETY: argument order and types match `nf4_dequant_*` in nf4.cu; the kernel reads
        // packed bytes < n_bytes and block scales < blocks (checked above) and writes out[< numel].
        unsafe { b.launch(grid_1d(numel.div_ceil(8), 256)) }?;
        Ok(())
    }
}

/// Deterministic weights with outliers (every 97th value 40x), like real ones.
fn check_weights(n: usize, seed: u64) -> Vec<f32> {
    let scale = 0.05;
    (0..n)
        .map(|i| {
            let x = ((i as f64 * 0.618_034 + seed as f64 * 0.1).fract() - 0.5) as f32 * scale;
            if i % 97 == 0 {
                x * 40.0
            } else {
                x
            }
        })
        .collect()
}

/// Bit-exact checks against the CPU path: a 7B-MLP-sized weight and odd shapes (partial block,
/// padded nested group, odd element count), plain and double quantization, bf16 and f32.
pub fn self_checks() -> Vec<KernelCheck> {
    let cases: [(&'static str, usize, usize, bool, DType); 6] = [
        ("nf4_dequant bf16 dq", 4096, 11008, true, DType::BF16),
        ("nf4_dequant f32 plain", 2048, 2048, false, DType::F32),
        ("nf4_dequant f32 dq", 2048, 2048, true, DType::F32),
        ("nf4_dequant bf16 plain", 2048, 2048, false, DType::BF16),
        ("nf4_dequant bf16 odd shape dq", 3, 333, true, DType::BF16),
        ("nf4_dequant f32 odd shape plain", 7, 9, false, DType::F32),
    ];
    cases
        .into_iter()
        .map(|(name, rows, cols, dq, dtype)| {
            KernelCheck::new(name, move |device: &Device| {
                // The big case shrinks on the CPU (harness test), the odd ones keep their shape.
                let (rows, cols) =
                    super::sized(device, (rows, cols), (rows.min(64), cols.min(200)));
                let values = check_weights(rows * cols, 1);
                let host = crate::quant::nf4::quantize_nf4(&values, &[rows, cols], dq)?;
                let on_device = Nf4Weight::from_host(&host, device)?;
                let on_cpu = Nf4Weight::from_host(&host, &Device::Cpu)?;
                run_check(
                    device,
                    format!("[{rows}, {cols}] {dtype:?} double_quant={dq}"),
                    Tolerance::EXACT,
                    &|| Ok(vec![on_device.dequantize(dtype)?]),
                    &|| Ok(vec![on_cpu.dequantize(dtype)?]),
                )
            })
        })
        .collect()
}
