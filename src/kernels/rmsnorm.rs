//! Fused RMSNorm forward (one kernel: statistics, normalization, weight) and backward (one kernel
//! for dx, plus one column reduction for dw when the weight is trained), `cuda/rmsnorm.cu`.
//! The CPU reference is [`crate::model::layers::rmsnorm`].

use super::{random_tensor, run_check, sized, KernelCheck, Tolerance};
use crate::model::layers::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use candle_core::{DType, Device, Result, Tensor};

/// The kernels keep one block's dw partial row in shared memory: at most this many columns.
const MAX_DW_COLS: usize = 12 * 1024;

fn supported(x: &Tensor, w: &Tensor) -> bool {
    super::on_cuda(x)
        && super::float_kernel_dtype(x.dtype())
        && w.dtype() == x.dtype()
        && x.rank() == 2
        && w.dims() == [x.dims()[1]]
}

/// `(y [n, h], rstd [n, 1] f32)` on CUDA; `None` off CUDA or for an unsupported dtype/shape.
pub fn forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<Option<(Tensor, Tensor)>> {
    if !supported(x, w) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        imp::forward(x, w, eps)
            .map(Some)
            .map_err(candle_core::Error::wrap)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = eps;
        Ok(None)
    }
}

/// `(dx [n, h], dw [h] f32 when need_dw)` on CUDA; `None` off CUDA or when unsupported.
pub fn backward(
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    need_dw: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let cols = x.dims().last().copied().unwrap_or(0);
    if !supported(x, w)
        || dy.dtype() != x.dtype()
        || dy.dims() != x.dims()
        || rstd.dtype() != DType::F32
        || rstd.elem_count() != x.dims()[0]
        || (need_dw && cols > MAX_DW_COLS)
    {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        imp::backward(x, w, rstd, dy, need_dw)
            .map(Some)
            .map_err(candle_core::Error::wrap)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use crate::kernels::cuda::{
        alloc, device_of, func, grid_1d, grid_rows, row_threads, stream, wrap, CudaInput,
    };
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{DType, Tensor};
    use half::bf16;

    fn suffix(dtype: DType) -> Result<&'static str> {
        Ok(match dtype {
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            other => bail!("rmsnorm kernel: no {other:?} version"),
        })
    }

    pub fn forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        match x.dtype() {
            DType::BF16 => fwd::<bf16>(x, w, eps),
            _ => fwd::<f32>(x, w, eps),
        }
    }

    fn fwd<T: CudaDType + DeviceRepr>(
        x: &Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        let dev = device_of(x)?;
        let (rows, cols) = x.dims2()?;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let (x_in, w_in) = (CudaInput::new(&x)?, CudaInput::new(&w)?);
        let (xv, wv) = (x_in.view::<T>()?, w_in.view::<T>()?);
        let (rows_u, cols_u, eps_f, inv_cols) = (
            rows as u32,
            cols as u32,
            eps as f32,
            (1.0 / cols as f64) as f32,
        );
        let f = func(
            &dev,
            "rmsnorm",
            &format!("rmsnorm_fwd_{}", suffix(x.dtype())?),
        )?;
        let mut y = alloc::<T>(&dev, rows * cols)?;
        let mut rstd = alloc::<f32>(&dev, rows)?;
        let stream = stream(&dev);
        let mut b = stream.launch_builder(&f);
        b.arg(&xv)
            .arg(&wv)
            .arg(&rows_u)
            .arg(&cols_u)
            .arg(&eps_f)
            .arg(&inv_cols);
        b.arg(&mut y).arg(&mut rstd);
        // SAFETY: arguments match `rmsnorm_fwd_*`; x, y: rows x cols, w: cols, rstd: rows.
        unsafe { b.launch(grid_rows(rows, row_threads(cols), 0)) }?;
        drop(b);
        Ok((wrap(y, &dev, (rows, cols)), wrap(rstd, &dev, (rows, 1))))
    }

    pub fn backward(
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        need_dw: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match x.dtype() {
            DType::BF16 => bwd::<bf16>(x, w, rstd, dy, need_dw),
            _ => bwd::<f32>(x, w, rstd, dy, need_dw),
        }
    }

    fn bwd<T: CudaDType + DeviceRepr>(
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        need_dw: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dev = device_of(x)?;
        let (rows, cols) = x.dims2()?;
        let (x, w, rstd, dy) = (
            x.contiguous()?,
            w.contiguous()?,
            rstd.contiguous()?,
            dy.contiguous()?,
        );
        let (x_in, w_in, r_in, dy_in) = (
            CudaInput::new(&x)?,
            CudaInput::new(&w)?,
            CudaInput::new(&rstd)?,
            CudaInput::new(&dy)?,
        );
        let (xv, wv, rv, dyv) = (
            x_in.view::<T>()?,
            w_in.view::<T>()?,
            r_in.view::<f32>()?,
            dy_in.view::<T>()?,
        );
        let (rows_u, cols_u, inv_cols) = (rows as u32, cols as u32, (1.0 / cols as f64) as f32);
        let threads = row_threads(cols);
        // With dw: a fixed number of blocks, each accumulating its rows' dw in shared memory.
        let (blocks, shared) = if need_dw {
            (rows.clamp(1, 256), (cols * 4) as u32)
        } else {
            (rows, 0)
        };
        let f = func(
            &dev,
            "rmsnorm",
            &format!("rmsnorm_bwd_{}", suffix(x.dtype())?),
        )?;
        let mut dx = alloc::<T>(&dev, rows * cols)?;
        let mut partial = if need_dw {
            Some(alloc::<f32>(&dev, blocks * cols)?)
        } else {
            None
        };
        let null: u64 = 0;
        let stream = stream(&dev);
        let mut b = stream.launch_builder(&f);
        b.arg(&xv)
            .arg(&wv)
            .arg(&rv)
            .arg(&dyv)
            .arg(&rows_u)
            .arg(&cols_u)
            .arg(&inv_cols);
        b.arg(&mut dx);
        match partial.as_mut() {
            Some(p) => b.arg(p),
            None => b.arg(&null),
        };
        let mut cfg = grid_rows(rows, threads, shared);
        cfg.grid_dim.0 = cfg.grid_dim.0.min(blocks as u32);
        // SAFETY: arguments match `rmsnorm_bwd_*`; x, dy, dx: rows x cols; w: cols; rstd: rows;
        // partial: grid x cols with cols floats of shared memory (cols <= MAX_DW_COLS).
        unsafe { b.launch(cfg) }?;
        drop(b);
        let dw = match partial {
            None => None,
            Some(partial) => {
                if cfg.grid_dim.0 as usize != blocks {
                    bail!(
                        "rmsnorm backward: grid {} != {blocks} partial rows",
                        cfg.grid_dim.0
                    );
                }
                let reduce = func(&dev, "rmsnorm", "rmsnorm_dw_reduce")?;
                let mut dw = alloc::<f32>(&dev, cols)?;
                let blocks_u = blocks as u32;
                let mut b = stream.launch_builder(&reduce);
                b.arg(&partial).arg(&blocks_u).arg(&cols_u).arg(&mut dw);
                // SAFETY: arguments match `rmsnorm_dw_reduce`; partial: blocks x cols, dw: cols.
                unsafe { b.launch(grid_1d(cols, 256)) }?;
                drop(b);
                Some(wrap(dw, &dev, cols))
            }
        };
        Ok((wrap(dx, &dev, (rows, cols)), dw))
    }
}

/// Forward and backward (with and without dw) on a 2 x 2048-token batch of a 7B model's hidden
/// size, against the CPU path in f32 from the same bf16 inputs.
pub fn self_checks() -> Vec<KernelCheck> {
    let inputs = |device: &Device| -> anyhow::Result<(usize, usize, Vec<Tensor>)> {
        let (n, h) = sized(device, (4096, 4096), (12, 40));
        let dtype = super::check_dtype(device);
        let x = random_tensor(&[n, h], 2.0, 11, dtype, device)?;
        let w = (random_tensor(&[h], 0.5, 12, dtype, device)? + 1.0)?;
        let dy = random_tensor(&[n, h], 1.0, 13, dtype, device)?;
        Ok((n, h, vec![x, w, dy]))
    };
    let cpu32 = |t: &Tensor| -> anyhow::Result<Tensor> {
        Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
    };
    let eps = 1e-5;
    vec![
        KernelCheck::new("rmsnorm forward", move |device: &Device| {
            let (n, h, t) = inputs(device)?;
            let (xc, wc) = (cpu32(&t[0])?, cpu32(&t[1])?);
            run_check(
                device,
                format!("[{n}, {h}] {:?}", t[0].dtype()),
                Tolerance::BF16,
                &|| {
                    let (y, rstd) = rmsnorm_forward(&t[0], &t[1], eps)?;
                    Ok(vec![y, rstd])
                },
                &|| {
                    let (y, rstd) = rmsnorm_forward(&xc, &wc, eps)?;
                    Ok(vec![y, rstd])
                },
            )
        }),
        KernelCheck::new("rmsnorm backward dx+dw", move |device: &Device| {
            let (n, h, t) = inputs(device)?;
            let (xc, wc, dyc) = (cpu32(&t[0])?, cpu32(&t[1])?, cpu32(&t[2])?);
            let (_, rstd) = rmsnorm_forward(&xc, &wc, eps)?;
            let rstd_dev = rstd.to_device(device)?;
            run_check(
                device,
                format!("[{n}, {h}] {:?}", t[0].dtype()),
                // dw sums n rows: its f32 summation order differs from the CPU's.
                Tolerance {
                    atol: 1e-3,
                    rtol: 1e-2,
                },
                &|| {
                    let (dx, dw) = rmsnorm_backward(&t[0], &t[1], &rstd_dev, &t[2], true)?;
                    Ok(vec![dx, dw.ok_or_else(|| anyhow::anyhow!("no dw"))?])
                },
                &|| {
                    let (dx, dw) = rmsnorm_backward(&xc, &wc, &rstd, &dyc, true)?;
                    Ok(vec![dx, dw.ok_or_else(|| anyhow::anyhow!("no dw"))?])
                },
            )
        }),
        KernelCheck::new("rmsnorm backward dx", move |device: &Device| {
            let (n, h, t) = inputs(device)?;
            let (xc, wc, dyc) = (cpu32(&t[0])?, cpu32(&t[1])?, cpu32(&t[2])?);
            let (_, rstd) = rmsnorm_forward(&xc, &wc, eps)?;
            let rstd_dev = rstd.to_device(device)?;
            run_check(
                device,
                format!("[{n}, {h}] {:?}", t[0].dtype()),
                Tolerance::BF16,
                &|| {
                    Ok(vec![
                        rmsnorm_backward(&t[0], &t[1], &rstd_dev, &t[2], false)?.0,
                    ])
                },
                &|| Ok(vec![rmsnorm_backward(&xc, &wc, &rstd, &dyc, false)?.0]),
            )
        }),
    ]
}
