//! LoRA input dropout on the device (`cuda/dropout.cu`): `x · keep(i) · 1/(1−p)` in one pass,
//! with `keep` the counter-based hash of [`crate::model::layers::lora::DropoutMask`], so the mask is
//! never drawn on the host, never uploaded and never stored (the backward recomputes it).

use super::{random_tensor, run_check, sized, KernelCheck, Tolerance};
use crate::model::layers::lora::DropoutMask;
use candle_core::{Device, Tensor};

/// `x` (`[n, in]`, bf16 or f32, on CUDA) with `mask` applied; `None` off CUDA.
pub fn apply(x: &Tensor, mask: &DropoutMask) -> candle_core::Result<Option<Tensor>> {
    if !super::on_cuda(x) || !super::float_kernel_dtype(x.dtype()) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        imp::apply(x, mask)
            .map(Some)
            .map_err(candle_core::Error::wrap)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = mask;
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::kernels::cuda::{alloc, device_of, func, grid_1d, stream, wrap, CudaInput};
    use crate::model::layers::lora::DropoutMask;
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Tensor};
    use half::bf16;

    pub fn apply(x: &Tensor, mask: &DropoutMask) -> Result<Tensor> {
        match x.dtype() {
            DType::BF16 => launch::<bf16>(x, mask, "dropout_bf16"),
            DType::F32 => launch::<f32>(x, mask, "dropout_f32"),
            other => bail!("dropout kernel: no {other:?} version"),
        }
    }

    fn launch<T: CudaDType + DeviceRepr>(
        x: &Tensor,
        mask: &DropoutMask,
        kernel: &str,
    ) -> Result<Tensor> {
        let dev = device_of(x)?;
        let x = x.contiguous()?;
        let n = x.elem_count();
        let x_in = CudaInput::new(&x)?;
        let xv = x_in.view::<T>()?;
        let (n_u, seed, threshold, scale) =
            (n as u64, mask.seed, mask.threshold(), mask.scale() as f32);
        let f = func(&dev, "dropout", kernel)?;
        let mut out = alloc::<T>(&dev, n)?;
        let stream = stream(&dev);
        let mut b = stream.launch_builder(&f);
        b.arg(&xv)
            .arg(&n_u)
            .arg(&seed)
            .arg(&threshold)
            .arg(&scale)
            .arg(&mut out);
        // SAFETY: arguments match `dropout_*`; x and out hold n elements of T.
        unsafe { b.launch(grid_1d(n, 256)) }?;
        drop(b);
        Ok(wrap(out, &dev, x.shape().clone()))
    }
}

/// Bit-exact against the CPU's hash + multiply on a 2048 x 8192 activation (an MLP down-proj input).
pub fn self_checks() -> Vec<KernelCheck> {
    vec![KernelCheck::new(
        "lora dropout",
        |device: &Device| -> anyhow::Result<_> {
            let (n, cols) = sized(device, (2048, 8192), (16, 48));
            let dtype = super::check_dtype(device);
            let x = random_tensor(&[n, cols], 1.0, 7, dtype, device)?;
            let x_cpu = x.to_device(&Device::Cpu)?;
            let mask = DropoutMask::new((n, cols), 0.1, 0x5eed, dtype, device);
            let mask_cpu = DropoutMask::new((n, cols), 0.1, 0x5eed, dtype, &Device::Cpu);
            run_check(
                device,
                format!("[{n}, {cols}] {dtype:?} p=0.1"),
                Tolerance::EXACT,
                &|| Ok(vec![mask.apply(&x)?]),
                &|| Ok(vec![mask_cpu.apply(&x_cpu)?]),
            )
        },
    )]
}
