//! Gradient accumulation into the flat gradient buffer (`cuda/grad.cu`):
//! `acc[offset .. offset + n] += g` for a bf16 or f32 `g` into an f32 (or a one-write bf16)
//! buffer, in place, in one pass (the candle-ops path needs a slice copy, a cast, an add and a
//! copy back); and the in-place same-shape add
//! `acc += b` of two contiguous tensors ([`add_assign`]: the residual adds), bit-identical to
//! candle's CPU add (f32 add, one round to the dtype).

use super::{random_tensor, run_check, sized, KernelCheck, Tolerance};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// Adds `g` (any shape, `n` elements) into elements `offset .. offset + n` of the contiguous `[N]`
/// buffer `acc`, in place: the sum in f32 (f64 for an f64 buffer), rounded once to `acc`'s dtype.
/// One kernel on CUDA for an f32 or bf16 buffer; the candle-ops path otherwise.
pub fn accumulate_into(acc: &Tensor, offset: usize, g: &Tensor) -> Result<()> {
    let n = g.elem_count();
    if !acc.is_contiguous() || offset + n > acc.elem_count() {
        bail!(
            "gradient of {n} values at offset {offset} does not fit the buffer of {}",
            acc.elem_count()
        );
    }
    #[cfg(feature = "cuda")]
    if super::on_cuda(acc)
        && super::float_kernel_dtype(acc.dtype())
        && super::float_kernel_dtype(g.dtype())
    {
        return imp::accumulate(acc, offset, g);
    }
    let acc = acc.flatten_all()?;
    let wide = match acc.dtype() {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    };
    let sum = (acc.narrow(0, offset, n)?.to_dtype(wide)? + g.flatten_all()?.to_dtype(wide)?)?;
    acc.slice_set(&sum.to_dtype(acc.dtype())?, 0, offset)?;
    Ok(())
}

/// Whether the add kernel takes `a + b`: CUDA, a kernel dtype, same dtype and shape, both
/// contiguous (strided views stay with candle, which reads them in place).
fn add_supported(a: &Tensor, b: &Tensor) -> bool {
    super::on_cuda(a)
        && super::float_kernel_dtype(a.dtype())
        && b.dtype() == a.dtype()
        && b.dims() == a.dims()
        && b.device().same_device(a.device())
        && a.is_contiguous()
        && b.is_contiguous()
}

/// `acc += b` in place (same shape and dtype, both contiguous); `false` off CUDA or when
/// unsupported (nothing written: the caller computes `acc + b` with candle). The caller
/// guarantees that `acc`'s storage is not shared with a tensor that must keep its old values
/// (a clone or a view of `acc` sees the update).
pub fn add_assign(acc: &Tensor, b: &Tensor) -> candle_core::Result<bool> {
    if !add_supported(acc, b) {
        return Ok(false);
    }
    #[cfg(feature = "cuda")]
    {
        imp::add_assign(acc, b)
            .map(|_| true)
            .map_err(candle_core::Error::wrap)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(false)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::kernels::cuda::{aligned16, device_of, elementwise_launch, func, stream, CudaInput};
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Tensor};
    use half::bf16;

    pub fn accumulate(acc: &Tensor, offset: usize, g: &Tensor) -> Result<()> {
        match (g.dtype(), acc.dtype()) {
            (DType::F32, DType::F32) => accumulate_typed::<f32, f32>(acc, offset, g, "f32"),
            (DType::BF16, DType::F32) => accumulate_typed::<bf16, f32>(acc, offset, g, "bf16"),
            (DType::F32, DType::BF16) => {
                accumulate_typed::<f32, bf16>(acc, offset, g, "f32_to_bf16")
            }
            (DType::BF16, DType::BF16) => {
                accumulate_typed::<bf16, bf16>(acc, offset, g, "bf16_to_bf16")
            }
            (g, a) => bail!("gradient accumulation kernel: no {g:?} into {a:?} version"),
        }
    }

    /// `g` of T into a buffer of A.
    fn accumulate_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(
        acc: &Tensor,
        offset: usize,
        g: &Tensor,
        suffix: &str,
    ) -> Result<()> {
        let dev = device_of(acc)?;
        let g = g.contiguous()?;
        let n = g.elem_count();
        let (acc_in, g_in) = (CudaInput::new(acc)?, CudaInput::new(&g)?);
        let acc_v = acc_in.view::<A>()?.slice(offset..offset + n);
        let gv = g_in.view::<T>()?;
        let n_u = n as u64;
        let stream = stream(&dev);
        // Gradients at an offset of the flat buffer that is not a multiple of 4 floats (or a g
        // view at an odd offset) take the scalar kernel.
        let vectorized = aligned16(&acc_v, &stream) && aligned16(&gv, &stream);
        let (name, cfg) = elementwise_launch(&format!("accumulate_{suffix}"), vectorized, n);
        let f = func(&dev, "grad", &name)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&gv).arg(&n_u).arg(&acc_v);
        // SAFETY: arguments match `accumulate_*`; g and the acc slice hold n elements, 16-byte
        // aligned for the 8-wide kernel.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `acc += b` in place (the kernel `add_*` with y = a).
    pub fn add_assign(acc: &Tensor, b: &Tensor) -> Result<()> {
        match acc.dtype() {
            DType::BF16 => add_assign_typed::<bf16>(acc, b, "bf16"),
            DType::F32 => add_assign_typed::<f32>(acc, b, "f32"),
            other => bail!("add kernel: no {other:?} version"),
        }
    }

    fn add_assign_typed<T: CudaDType + DeviceRepr>(
        acc: &Tensor,
        b: &Tensor,
        suffix: &str,
    ) -> Result<()> {
        let dev = device_of(acc)?;
        let n = acc.elem_count();
        let (acc_in, b_in) = (CudaInput::new(acc)?, CudaInput::new(b)?);
        let (av, bv) = (acc_in.view::<T>()?, b_in.view::<T>()?);
        let n_u = n as u64;
        let stream = stream(&dev);
        let vectorized = aligned16(&av, &stream) && aligned16(&bv, &stream);
        let (name, cfg) = elementwise_launch(&format!("add_{suffix}"), vectorized, n);
        let f = func(&dev, "grad", &name)?;
        let mut l = stream.launch_builder(&f);
        l.arg(&av).arg(&bv).arg(&n_u).arg(&av);
        // SAFETY: arguments match `add_*` with y = a (the kernels read an element before writing
        // it, from the same thread); a and b hold n elements, 16-byte aligned for the 8-wide
        // kernel.
        unsafe { l.launch(cfg) }?;
        Ok(())
    }
}

/// Exact against the CPU: a bf16 and an f32 gradient added at an offset of an f32 buffer, and of
/// a bf16 one (one-write gradients); the plain names take an offset of 99 elements (the scalar
/// kernel: not 16-byte aligned), the "aligned" ones an offset of 96 and a length with a tail of 5
/// (the 8-wide kernel).
pub fn self_checks() -> Vec<KernelCheck> {
    let mut checks = vec![];
    for (name, g_dtype, acc_dtype, aligned) in [
        ("grad accumulate bf16", DType::BF16, DType::F32, false),
        ("grad accumulate f32", DType::F32, DType::F32, false),
        (
            "grad accumulate bf16 aligned",
            DType::BF16,
            DType::F32,
            true,
        ),
        ("grad accumulate f32 aligned", DType::F32, DType::F32, true),
        (
            "grad accumulate f32 into bf16",
            DType::F32,
            DType::BF16,
            false,
        ),
        (
            "grad accumulate f32 into bf16 aligned",
            DType::F32,
            DType::BF16,
            true,
        ),
        (
            "grad accumulate bf16 into bf16 aligned",
            DType::BF16,
            DType::BF16,
            true,
        ),
    ] {
        checks.push(KernelCheck::new(name, move |device: &Device| {
            let (n, total) = sized(device, (4096 * 64, 4096 * 64 + 99), (37, 50));
            let (n, offset) = if aligned {
                (n - 3, 96.min(total - n))
            } else {
                (n, 99.min(total - n))
            };
            let acc = random_tensor(&[total], 1.0, 21, acc_dtype, device)?;
            let g = random_tensor(&[n], 1.0, 22, g_dtype, device)?;
            let run = |acc: &Tensor, g: &Tensor| -> Result<Vec<Tensor>> {
                let acc = acc.copy()?;
                accumulate_into(&acc, offset, g)?;
                Ok(vec![acc])
            };
            let (acc_cpu, g_cpu) = (acc.to_device(&Device::Cpu)?, g.to_device(&Device::Cpu)?);
            run_check(
                device,
                format!("[{n}] {g_dtype:?} into {acc_dtype:?} [{total}] at {offset}"),
                Tolerance::EXACT,
                &|| run(&acc, &g),
                &|| run(&acc_cpu, &g_cpu),
            )
        }));
    }
    // The residual add: `add_assign` against candle's CPU add in the same dtype
    // (bit-exact). "add unaligned" reads both inputs at an offset of one element (the scalar
    // kernels); the shapes' element counts leave a tail of 5 for the 8-wide kernel.
    for (name, skip) in [("add", 0usize), ("add unaligned", 1)] {
        checks.push(KernelCheck::new(name, move |device: &Device| {
            let (rows, cols) = sized(device, (4096, 4099), (7, 13));
            let dtype = super::check_dtype(device);
            let n = rows * cols;
            // [n + skip] flat, viewed from element `skip` as [rows, cols] (contiguous either way).
            let view =
                |t: Tensor| -> Result<Tensor> { Ok(t.narrow(0, skip, n)?.reshape((rows, cols))?) };
            let a = view(random_tensor(&[n + skip], 4.0, 41, dtype, device)?)?;
            let b = view(random_tensor(&[n + skip], 4.0, 42, dtype, device)?)?;
            let fused = |a: &Tensor, b: &Tensor| -> Result<Vec<Tensor>> {
                let mut acc = a.copy()?;
                if !add_assign(&acc, b)? {
                    acc = (&acc + b)?;
                }
                Ok(vec![acc])
            };
            let (a_cpu, b_cpu) = (a.to_device(&Device::Cpu)?, b.to_device(&Device::Cpu)?);
            run_check(
                device,
                format!("[{rows}, {cols}] {dtype:?}, inputs at offset {skip}"),
                Tolerance::EXACT,
                &|| fused(&a, &b),
                &|| Ok(vec![(&a_cpu + &b_cpu)?]),
            )
        }));
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_assign_declines_off_cuda() {
        let a = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.5f32, -2.0], &Device::Cpu).unwrap();
        assert!(!add_assign(&a, &b).unwrap());
        assert_eq!(
            a.to_vec1::<f32>().unwrap(),
            [1.0, 2.0],
            "untouched when declined"
        );
    }
}
