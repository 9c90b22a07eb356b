//! Fused rotary embedding (`cuda/rope.cu`): `x·cos + rotate_half(x)·sin` in one pass over
//! `[n, heads, head_dim]`; the backward is the same kernel rotating by the opposite angle.
//! The CPU reference is [`crate::model::layers::rope`].

use super::{random_tensor, run_check, sized, KernelCheck, Tolerance};
use crate::model::layers::rope::{rope_backward, rope_forward, rope_table};
use candle_core::{DType, Device, Result, Tensor};

/// `x [n, heads, d]` rotated by `cos`/`sin [n, d]` (`sign` = −1 rotates back: the backward) on
/// CUDA; `None` off CUDA or when unsupported.
pub fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, sign: f32) -> Result<Option<Tensor>> {
    let ok = super::on_cuda(x)
        && super::float_kernel_dtype(x.dtype())
        && cos.dtype() == x.dtype()
        && sin.dtype() == x.dtype()
        && x.rank() == 3
        && x.dims()[2] % 2 == 0
        && cos.dims() == [x.dims()[0], x.dims()[2]]
        && sin.dims() == cos.dims();
    if !ok {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        imp::rotate(x, cos, sin, sign)
            .map(Some)
            .map_err(candle_core::Error::wrap)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = sign;
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::kernels::cuda::{
        aligned16, alloc, device_of, func, grid_1d, stream, variant_name, wrap, CudaInput,
    };
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Tensor};
    use half::bf16;

    pub fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, sign: f32) -> Result<Tensor> {
        match x.dtype() {
            DType::BF16 => launch::<bf16>(x, cos, sin, sign, "bf16"),
            DType::F32 => launch::<f32>(x, cos, sin, sign, "f32"),
            other => bail!("rope kernel: no {other:?} version"),
        }
    }

    fn launch<T: CudaDType + DeviceRepr>(
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        sign: f32,
        suffix: &str,
    ) -> Result<Tensor> {
        let dev = device_of(x)?;
        let (n, heads, d) = x.dims3()?;
        let (x, cos, sin) = (x.contiguous()?, cos.contiguous()?, sin.contiguous()?);
        let (x_in, c_in, s_in) = (
            CudaInput::new(&x)?,
            CudaInput::new(&cos)?,
            CudaInput::new(&sin)?,
        );
        let (xv, cv, sv) = (x_in.view::<T>()?, c_in.view::<T>()?, s_in.view::<T>()?);
        let (n_u, h_u, d_u) = (n as u32, heads as u32, d as u32);
        let total = n * heads * d;
        let stream = stream(&dev);
        // The vectorized kernel: a thread rotates 8 elements of each half of a head vector
        // (d % 16 == 0), 16-byte aligned inputs, 32-bit indices.
        let vectorized = d % 16 == 0
            && u32::try_from(total).is_ok()
            && aligned16(&xv, &stream)
            && aligned16(&cv, &stream)
            && aligned16(&sv, &stream);
        let name = variant_name(&format!("rope_{suffix}"), vectorized);
        let threads_needed = if vectorized { total / 16 } else { total };
        let f = func(&dev, "rope", &name)?;
        let mut y = alloc::<T>(&dev, total)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&xv)
            .arg(&cv)
            .arg(&sv)
            .arg(&n_u)
            .arg(&h_u)
            .arg(&d_u)
            .arg(&sign)
            .arg(&mut y);
        // SAFETY: arguments match `rope_*`; x, y: n x heads x d; cos, sin: n x d; the 8-wide
        // kernel's conditions are checked above.
        unsafe { b.launch(grid_1d(threads_needed, 256)) }?;
        drop(b);
        Ok(wrap(y, &dev, (n, heads, d)))
    }
}

/// Forward and backward on 2 x 2048 tokens of 32 heads x 128 (7B q), positions restarting per
/// packed sample, against the CPU path in f32 from the same bf16 inputs and tables.
pub fn self_checks() -> Vec<KernelCheck> {
    let inputs = |device: &Device| -> anyhow::Result<(String, Vec<Tensor>, Vec<Tensor>)> {
        let (n, heads, d) = sized(device, (4096, 32, 128), (9, 3, 8));
        let dtype = super::check_dtype(device);
        let positions: Vec<u32> = (0..n as u32).map(|i| i % 2048).collect();
        let (cos, sin) = rope_table(&positions, d, 10_000.0, dtype, device)?;
        let x = random_tensor(&[n, heads, d], 2.0, 31, dtype, device)?;
        let dev = vec![x, cos, sin];
        let cpu = dev
            .iter()
            .map(|t| Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((format!("[{n}, {heads}, {d}] {dtype:?}"), dev, cpu))
    };
    vec![
        KernelCheck::new("rope forward", move |device: &Device| {
            let (what, t, c) = inputs(device)?;
            run_check(
                device,
                what,
                Tolerance::BF16,
                &|| Ok(vec![rope_forward(&t[0], &t[1], &t[2])?]),
                &|| Ok(vec![rope_forward(&c[0], &c[1], &c[2])?]),
            )
        }),
        KernelCheck::new("rope backward", move |device: &Device| {
            let (what, t, c) = inputs(device)?;
            run_check(
                device,
                what,
                Tolerance::BF16,
                &|| Ok(vec![rope_backward(&t[0], &t[1], &t[2])?]),
                &|| Ok(vec![rope_backward(&c[0], &c[1], &c[2])?]),
            )
        }),
    ]
}
