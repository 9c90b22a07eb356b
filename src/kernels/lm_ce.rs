//! Cross-entropy over one chunk of LM-head logits in one kernel (`cuda/lm_ce.cu`): logsumexp,
//! the token losses and, for training, `dlogits = scale·(softmax − onehot)` in the logits' dtype,
//! written over the logits (no f32 copy of the chunk, no second chunk-sized buffer). The matmuls
//! stay in [`crate::model::layers::lm_head`], which is also the CPU reference.

use super::{random_tensor, run_check, sized, KernelCheck, Tolerance};
use crate::model::layers::lm_head::chunk_loss;
use candle_core::{DType, Device, Result, Tensor};

/// For `logits [c, vocab]` (bf16 or f32) and `targets [c]` u32 on CUDA: `(loss [c] f32,
/// dlogits [c, vocab] in the logits' dtype when grad_scale is given)`; `None` off CUDA. The
/// gradient overwrites `logits` (a contiguous tensor nothing else holds: a fresh matmul output)
/// and is returned as that same tensor.
pub fn chunk(
    logits: Tensor,
    targets: &Tensor,
    grad_scale: Option<f64>,
) -> Result<std::result::Result<(Tensor, Option<Tensor>), Tensor>> {
    let ok = super::on_cuda(&logits)
        && super::float_kernel_dtype(logits.dtype())
        && logits.rank() == 2
        && logits.is_contiguous()
        && targets.dtype() == DType::U32
        && targets.dims() == [logits.dims()[0]];
    if !ok {
        return Ok(Err(logits));
    }
    #[cfg(feature = "cuda")]
    {
        imp::chunk(logits, targets, grad_scale)
            .map(Ok)
            .map_err(candle_core::Error::wrap)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = grad_scale;
        Ok(Err(logits))
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::kernels::cuda::{
        aligned16, alloc, device_of, func, grid_rows, stream, variant_name, wrap, CudaInput,
    };
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Tensor};
    use half::bf16;

    pub fn chunk(
        logits: Tensor,
        targets: &Tensor,
        grad_scale: Option<f64>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match logits.dtype() {
            DType::BF16 => launch::<bf16>(logits, targets, grad_scale, "bf16"),
            DType::F32 => launch::<f32>(logits, targets, grad_scale, "f32"),
            other => bail!("cross-entropy kernel: no {other:?} version"),
        }
    }

    fn launch<T: CudaDType + DeviceRepr>(
        logits: Tensor,
        targets: &Tensor,
        grad_scale: Option<f64>,
        suffix: &str,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dev = device_of(&logits)?;
        let (rows, vocab) = logits.dims2()?;
        let targets = targets.contiguous()?;
        // The borrows of `logits` end with this block: it is returned as the gradient below.
        let loss = {
            let (l_in, t_in) = (CudaInput::new(&logits)?, CudaInput::new(&targets)?);
            let (lv, tv) = (l_in.view::<T>()?, t_in.view::<u32>()?);
            let (rows_u, vocab_u) = (rows as u32, vocab as u32);
            let scale = grad_scale.unwrap_or(0.0) as f32;
            let grad = i32::from(grad_scale.is_some());
            let stream = stream(&dev);
            // Every row starts 16-byte aligned when the first does and a row is a multiple of 8.
            let vectorized = aligned16(&lv, &stream) && vocab % 8 == 0;
            let name = variant_name(&format!("ce_chunk_{suffix}"), vectorized);
            let f = func(&dev, "lm_ce", &name)?;
            let mut loss = alloc::<f32>(&dev, rows)?;
            let mut b = stream.launch_builder(&f);
            b.arg(&lv)
                .arg(&tv)
                .arg(&rows_u)
                .arg(&vocab_u)
                .arg(&scale)
                .arg(&grad)
                .arg(&mut loss);
            // SAFETY: arguments match `ce_chunk_*`; logits: rows x vocab (16-byte aligned rows for
            // the 8-wide kernel), written in place only with `grad`, each element by the thread that
            // read it, after logit[target] was read; targets and loss: rows; logits[target] is read
            // only for target < vocab (else loss = NaN). 512 threads: four rows per SM at once, so a
            // chunk of a few hundred rows runs in one wave.
            unsafe { b.launch(grid_rows(rows, 512, 0)) }?;
            loss
        };
        let loss = wrap(loss, &dev, rows);
        Ok((loss, grad_scale.map(|_| logits)))
    }
}

/// One 1024-row chunk of InternLM2's 92544-token vocabulary (bf16 logits: the 8-wide kernel), and
/// one of a vocabulary that is not a multiple of 8 (its scalar variant), loss and gradient against
/// the CPU path in f32 from the same logits. The gradient overwrites the logits, so each run takes
/// a fresh copy of them (timed with the kernel).
pub fn self_checks() -> Vec<KernelCheck> {
    [
        ("lm_head cross-entropy chunk", 92544),
        ("lm_head cross-entropy chunk scalar", 32001),
    ]
    .into_iter()
    .map(|(name, full_vocab)| {
        KernelCheck::new(name, move |device: &Device| {
            let (rows, vocab) = sized(device, (1024, full_vocab), (6, 50));
            let dtype = super::check_dtype(device);
            let logits = random_tensor(&[rows, vocab], 8.0, 41, dtype, device)?;
            let targets: Vec<u32> = (0..rows as u32)
                .map(|r| (r * 7919) % vocab as u32)
                .collect();
            let tgt = Tensor::from_slice(&targets, rows, device)?;
            let logits_cpu = logits.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let tgt_cpu = tgt.to_device(&Device::Cpu)?;
            let scale = 1.0 / 4096.0;
            let run = |logits: &Tensor, tgt: &Tensor| -> anyhow::Result<Vec<Tensor>> {
                let (loss, dl) = chunk_loss(logits.copy()?, tgt, Some(scale))?;
                Ok(vec![loss, dl.ok_or_else(|| anyhow::anyhow!("no dlogits"))?])
            };
            run_check(
                device,
                format!("[{rows}, {vocab}] {dtype:?}"),
                // Gradients are scale·(p − onehot): absolute slack of a bf16 rounding at that scale.
                Tolerance {
                    atol: 1e-6,
                    rtol: 8e-3,
                },
                &|| run(&logits, &tgt),
                &|| run(&logits_cpu, &tgt_cpu),
            )
        })
    })
    .collect()
}
