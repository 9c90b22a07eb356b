//! Fused SwiGLU gate forward (`h = silu(g)·u`) and backward (`dg`, `du` in one pass),
//! `cuda/swiglu.cu`. The CPU reference is [`crate::model::layers::swiglu`].

use super::{random_tensor, run_check, sized, KernelCheck, Tolerance};
use crate::model::layers::swiglu::{swiglu_backward, swiglu_forward};
use candle_core::{DType, Device, Result, Tensor};

fn supported(ts: &[&Tensor]) -> bool {
    let first = ts[0];
    super::on_cuda(first)
        && super::float_kernel_dtype(first.dtype())
        && ts
            .iter()
            .all(|t| t.dtype() == first.dtype() && t.dims() == first.dims())
}

/// `h = silu(g)·u` on CUDA; `None` off CUDA or when unsupported.
pub fn forward(g: &Tensor, u: &Tensor) -> Result<Option<Tensor>> {
    if !supported(&[g, u]) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        imp::run(&[g, u], "fwd")
            .map(|mut out| out.pop())
            .map_err(candle_core::Error::wrap)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(None)
    }
}

/// `(dg, du)` on CUDA; `None` off CUDA or when unsupported.
pub fn backward(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    if !supported(&[g, u, dh]) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        let mut out = imp::run(&[g, u, dh], "bwd").map_err(candle_core::Error::wrap)?;
        let du = out.pop();
        let dg = out.pop();
        Ok(dg.zip(du))
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::kernels::cuda::{
        aligned16, alloc, device_of, elementwise_launch, func, stream, wrap, CudaInput,
    };
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Tensor};
    use half::bf16;

    /// `fwd`: inputs (g, u) -> [h]; `bwd`: inputs (g, u, dh) -> [dg, du].
    pub fn run(inputs: &[&Tensor], pass: &str) -> Result<Vec<Tensor>> {
        match inputs[0].dtype() {
            DType::BF16 => launch::<bf16>(inputs, pass, "bf16"),
            DType::F32 => launch::<f32>(inputs, pass, "f32"),
            other => bail!("swiglu kernel: no {other:?} version"),
        }
    }

    fn launch<T: CudaDType + DeviceRepr>(
        inputs: &[&Tensor],
        pass: &str,
        suffix: &str,
    ) -> Result<Vec<Tensor>> {
        let dev = device_of(inputs[0])?;
        let shape = inputs[0].shape().clone();
        let n = shape.elem_count();
        let contiguous = inputs
            .iter()
            .map(|t| t.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let ins = contiguous
            .iter()
            .map(CudaInput::new)
            .collect::<Result<Vec<_>>>()?;
        let views = ins
            .iter()
            .map(|i| i.view::<T>())
            .collect::<Result<Vec<_>>>()?;
        let n_outputs = if pass == "fwd" { 1 } else { 2 };
        let mut outs = (0..n_outputs)
            .map(|_| alloc::<T>(&dev, n))
            .collect::<Result<Vec<_>>>()?;
        let n_u = n as u64;
        let stream = stream(&dev);
        // The 8-wide kernel needs 16-byte aligned inputs (outputs are fresh allocations); views
        // at an odd storage offset take the one-element-per-thread variant.
        let vectorized = views.iter().all(|v| aligned16(v, &stream));
        let (name, cfg) = elementwise_launch(&format!("swiglu_{pass}_{suffix}"), vectorized, n);
        let f = func(&dev, "swiglu", &name)?;
        let mut b = stream.launch_builder(&f);
        for v in &views {
            b.arg(v);
        }
        b.arg(&n_u);
        for o in outs.iter_mut() {
            b.arg(o);
        }
        // SAFETY: arguments match `swiglu_{fwd,bwd}_*`; every buffer holds n elements of T and,
        // for the 8-wide kernel, is 16-byte aligned; the grid has >= 256 threads (the tail's 7).
        unsafe { b.launch(cfg) }?;
        drop(b);
        Ok(outs
            .into_iter()
            .map(|o| wrap(o, &dev, shape.clone()))
            .collect())
    }
}

/// Forward and backward on a 7B MLP's gate/up activations (2 x 2048 tokens x 11008), against the
/// CPU path in f32 from the same bf16 inputs.
pub fn self_checks() -> Vec<KernelCheck> {
    let inputs = |device: &Device| -> anyhow::Result<(String, Vec<Tensor>, Vec<Tensor>)> {
        let (n, i) = sized(device, (4096, 11008), (10, 30));
        let dtype = super::check_dtype(device);
        let ts = (0..3)
            .map(|k| random_tensor(&[n, i], 4.0, 21 + k, dtype, device))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let cpu = ts
            .iter()
            .map(|t| Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((format!("[{n}, {i}] {dtype:?}"), ts, cpu))
    };
    vec![
        KernelCheck::new("swiglu forward", move |device: &Device| {
            let (what, t, c) = inputs(device)?;
            run_check(
                device,
                what,
                Tolerance::BF16,
                &|| Ok(vec![swiglu_forward(&t[0], &t[1])?]),
                &|| Ok(vec![swiglu_forward(&c[0], &c[1])?]),
            )
        }),
        KernelCheck::new("swiglu backward", move |device: &Device| {
            let (what, t, c) = inputs(device)?;
            run_check(
                device,
                what,
                Tolerance::BF16,
                &|| {
                    let (dg, du) = swiglu_backward(&t[0], &t[1], &t[2])?;
                    Ok(vec![dg, du])
                },
                &|| {
                    let (dg, du) = swiglu_backward(&c[0], &c[1], &c[2])?;
                    Ok(vec![dg, du])
                },
            )
        }),
    ]
}
