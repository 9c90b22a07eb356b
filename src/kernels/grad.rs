//! Gradient accumulation into the flat f32 gradient buffer (`cuda/grad.cu`):
//! `acc[offset .. offset + n] += g` for a bf16 or f32 `g`, in place, in one pass (the candle-ops
//! path needs a slice copy, a cast, an add and a copy back).

use super::{random_tensor, run_check, sized, KernelCheck, Tolerance};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// Adds `g` (any shape, `n` elements) into elements `offset .. offset + n` of the contiguous `[N]`
/// buffer `acc`, in place. One kernel on CUDA for an f32 buffer; the candle-ops path otherwise.
pub fn accumulate_into(acc: &Tensor, offset: usize, g: &Tensor) -> Result<()> {
    let n = g.elem_count();
    if !acc.is_contiguous() || offset + n > acc.elem_count() {
        bail!(
            "gradient of {n} values at offset {offset} does not fit the buffer of {}",
            acc.elem_count()
        );
    }
    #[cfg(feature = "cuda")]
    if super::on_cuda(acc) && acc.dtype() == DType::F32 && super::float_kernel_dtype(g.dtype()) {
        return imp::accumulate(acc, offset, g);
    }
    let acc = acc.flatten_all()?;
    let sum = (acc.narrow(0, offset, n)? + g.flatten_all()?.to_dtype(acc.dtype())?)?;
    acc.slice_set(&sum, 0, offset)?;
    Ok(())
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::kernels::cuda::{device_of, func, grid_1d, stream, CudaInput};
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::{DType, Tensor};
    use half::bf16;

    pub fn accumulate(acc: &Tensor, offset: usize, g: &Tensor) -> Result<()> {
        let dev = device_of(acc)?;
        let g = g.contiguous()?;
        let n = g.elem_count();
        let (acc_in, g_in) = (CudaInput::new(acc)?, CudaInput::new(&g)?);
        let acc_v = acc_in.view::<f32>()?.slice(offset..offset + n);
        let n_u = n as u64;
        let stream = stream(&dev);
        match g.dtype() {
            DType::F32 => {
                let gv = g_in.view::<f32>()?;
                let f = func(&dev, "grad", "accumulate_f32")?;
                let mut b = stream.launch_builder(&f);
                b.arg(&gv).arg(&n_u).arg(&acc_v);
                // SAFETY: arguments match `accumulate_f32`; g and the acc slice hold n elements.
                unsafe { b.launch(grid_1d(n, 256)) }?;
            }
            DType::BF16 => {
                let gv = g_in.view::<bf16>()?;
                let f = func(&dev, "grad", "accumulate_bf16")?;
                let mut b = stream.launch_builder(&f);
                b.arg(&gv).arg(&n_u).arg(&acc_v);
                // SAFETY: arguments match `accumulate_bf16`; g and the acc slice hold n elements.
                unsafe { b.launch(grid_1d(n, 256)) }?;
            }
            other => bail!("gradient accumulation kernel: no {other:?} version"),
        }
        Ok(())
    }
}

/// Exact against the CPU: a bf16 and an f32 gradient added at an offset of an f32 buffer.
pub fn self_checks() -> Vec<KernelCheck> {
    let mut checks = vec![];
    for (name, g_dtype) in [
        ("grad accumulate bf16", DType::BF16),
        ("grad accumulate f32", DType::F32),
    ] {
        checks.push(KernelCheck::new(name, move |device: &Device| {
            let (n, total) = sized(device, (4096 * 64, 4096 * 64 + 99), (37, 50));
            let acc = random_tensor(&[total], 1.0, 21, DType::F32, device)?;
            let g = random_tensor(&[n], 1.0, 22, g_dtype, device)?;
            let run = |acc: &Tensor, g: &Tensor| -> Result<Vec<Tensor>> {
                let acc = acc.copy()?;
                accumulate_into(&acc, 99.min(total - n), g)?;
                Ok(vec![acc])
            };
            let (acc_cpu, g_cpu) = (acc.to_device(&Device::Cpu)?, g.to_device(&Device::Cpu)?);
            run_check(
                device,
                format!("[{n}] {g_dtype:?} into f32 [{total}]"),
                Tolerance::EXACT,
                &|| run(&acc, &g),
                &|| run(&acc_cpu, &g_cpu),
            )
        }));
    }
    checks
}
