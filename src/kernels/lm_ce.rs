//! Cross-entropy over one chunk of LM-head logits in one kernel (`cuda/lm_ce.cu`): logsumexp,
//! the token losses and, for training, `dlogits = scale·(softmax − onehot)` in the logits' dtype,
//! reading the bf16 logits directly (no f32 copy of the chunk). The matmuls stay in
//! [`crate::model::layers::lm_head`], which is also the CPU reference.

use super::{random_tensor, run_check, sized, KernelCheck, Tolerance};
use crate::model::layers::lm_head::chunk_loss;
use candle_core::{DType, Device, Result, Tensor};

/// For `logits [c, vocab]` (bf16 or f32) and `targets [c]` u32 on CUDA: `(loss [c] f32,
/// dlogits [c, vocab] in the logits' dtype when grad_scale is given)`; `None` off CUDA.
pub fn chunk(
    logits: &Tensor,
    targets: &Tensor,
    grad_scale: Option<f64>,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let ok = super::on_cuda(logits)
        && super::float_kernel_dtype(logits.dtype())
        && logits.rank() == 2
        && targets.dtype() == DType::U32
        && targets.dims() == [logits.dims()[0]];
    if !ok {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        imp::chunk(logits, targets, grad_scale)
            .map(Some)
            .map_err(candle_core::Error::wrap)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = grad_scale;
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::kernels::cuda::{alloc, device_of, func, grid_rows, stream, wrap, CudaInput};
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Tensor};
    use half::bf16;

    pub fn chunk(
        logits: &Tensor,
        targets: &Tensor,
        grad_scale: Option<f64>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match logits.dtype() {
            DType::BF16 => launch::<bf16>(logits, targets, grad_scale, "ce_chunk_bf16"),
            DType::F32 => launch::<f32>(logits, targets, grad_scale, "ce_chunk_f32"),
            other => bail!("cross-entropy kernel: no {other:?} version"),
        }
    }

    fn launch<T: CudaDType + DeviceRepr>(
        logits: &Tensor,
        targets: &Tensor,
        grad_scale: Option<f64>,
        kernel: &str,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dev = device_of(logits)?;
        let (rows, vocab) = logits.dims2()?;
        let (logits, targets) = (logits.contiguous()?, targets.contiguous()?);
        let (l_in, t_in) = (CudaInput::new(&logits)?, CudaInput::new(&targets)?);
        let (lv, tv) = (l_in.view::<T>()?, t_in.view::<u32>()?);
        let (rows_u, vocab_u) = (rows as u32, vocab as u32);
        let scale = grad_scale.unwrap_or(0.0) as f32;
        let grad = i32::from(grad_scale.is_some());
        let f = func(&dev, "lm_ce", kernel)?;
        let mut loss = alloc::<f32>(&dev, rows)?;
        let mut dlogits = if grad_scale.is_some() {
            Some(alloc::<T>(&dev, rows * vocab)?)
        } else {
            None
        };
        let null: u64 = 0;
        let stream = stream(&dev);
        let mut b = stream.launch_builder(&f);
        b.arg(&lv)
            .arg(&tv)
            .arg(&rows_u)
            .arg(&vocab_u)
            .arg(&scale)
            .arg(&grad)
            .arg(&mut loss);
        match dlogits.as_mut() {
            Some(d) => b.arg(d),
            None => b.arg(&null),
        };
        // SAFETY: arguments match `ce_chunk_*`; logits (and dlogits): rows x vocab, targets and
        // loss: rows; the kernel reads logits[target] only for target < vocab (else loss = NaN).
        unsafe { b.launch(grid_rows(rows, 1024, 0)) }?;
        drop(b);
        Ok((
            wrap(loss, &dev, rows),
            dlogits.map(|d| wrap(d, &dev, (rows, vocab))),
        ))
    }
}

/// One 1024-row chunk of InternLM2's 92544-token vocabulary (bf16 logits), loss and gradient,
/// against the CPU path in f32 from the same logits.
pub fn self_checks() -> Vec<KernelCheck> {
    vec![KernelCheck::new(
        "lm_head cross-entropy chunk",
        |device: &Device| {
            let (rows, vocab) = sized(device, (1024, 92544), (6, 50));
            let dtype = super::check_dtype(device);
            let logits = random_tensor(&[rows, vocab], 8.0, 41, dtype, device)?;
            let targets: Vec<u32> = (0..rows as u32)
                .map(|r| (r * 7919) % vocab as u32)
                .collect();
            let tgt = Tensor::from_slice(&targets, rows, device)?;
            let logits_cpu = logits.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let tgt_cpu = tgt.to_device(&Device::Cpu)?;
            let scale = 1.0 / 4096.0;
            run_check(
                device,
                format!("[{rows}, {vocab}] {dtype:?}"),
                // Gradients are scale·(p − onehot): absolute slack of a bf16 rounding at that scale.
                Tolerance {
                    atol: 1e-6,
                    rtol: 8e-3,
                },
                &|| {
                    let (loss, dl) = chunk_loss(&logits, &tgt, Some(scale))?;
                    Ok(vec![loss, dl.ok_or_else(|| anyhow::anyhow!("no dlogits"))?])
                },
                &|| {
                    let (loss, dl) = chunk_loss(&logits_cpu, &tgt_cpu, Some(scale))?;
                    Ok(vec![loss, dl.ok_or_else(|| anyhow::anyhow!("no dlogits"))?])
                },
            )
        },
    )]
}
