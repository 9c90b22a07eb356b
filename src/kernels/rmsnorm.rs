//! Fused RMSNorm forward (one kernel: statistics, normalization, weight) and backward (one kernel
//! for dx, plus one column reduction for dw when the weight is trained), `cuda/rmsnorm.cu`.
//! The CPU reference is [`crate::model::layers::rmsnorm`].

use super::{random_tensor, run_check, sized, KernelCheck, Tolerance};
use crate::model::layers::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use candle_core::{DType, Device, Result, Tensor};

/// The kernels keep one block's dw partial row in shared memory: at most this many columns.
const MAX_DW_COLS: usize = 12 * 1024;

/// Most threads per row block of the vectorized kernels (`kRowVecMaxThreads` in rmsnorm.cu).
const VEC_MAX_THREADS: usize = 512;

/// How the vectorized kernels (`rmsnorm_*_k{K}`) split a row of `cols` columns: each thread holds
/// `groups_per_thread` (K) groups of 8 columns in registers, `threads` threads per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct RowVecPlan {
    groups_per_thread: usize,
    threads: u32,
}

/// The vectorized kernels' split of a row, or `None` when they cannot take it (cols not a
/// multiple of 8, or more than 4 x 512 groups of 8). The fewest groups per thread that fit 512
/// threads (K = 1, 2 or 4: the compiled variants), threads rounded up to a warp multiple.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn row_vec_plan(cols: usize) -> Option<RowVecPlan> {
    if cols % 8 != 0 || cols == 0 {
        return None;
    }
    let groups = cols / 8;
    let k = [1, 2, 4]
        .into_iter()
        .find(|k| groups.div_ceil(*k) <= VEC_MAX_THREADS)?;
    let threads = groups.div_ceil(k).next_multiple_of(32);
    Some(RowVecPlan {
        groups_per_thread: k,
        threads: threads as u32,
    })
}

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
    use super::{row_vec_plan, RowVecPlan};
    use crate::kernels::cuda::{
        aligned16, alloc, device_of, func, grid_1d, grid_rows, row_threads, stream, wrap, CudaInput,
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
        let stream = stream(&dev);
        let sfx = suffix(x.dtype())?;
        // The vectorized kernel needs 16-byte aligned x and w (y is a fresh allocation).
        let plan =
            row_vec_plan(cols).filter(|_| aligned16(&xv, &stream) && aligned16(&wv, &stream));
        let (name, threads) = match plan {
            Some(RowVecPlan {
                groups_per_thread,
                threads,
            }) => (format!("rmsnorm_fwd_{sfx}_k{groups_per_thread}"), threads),
            None => (format!("rmsnorm_fwd_{sfx}_scalar"), row_threads(cols)),
        };
        let f = func(&dev, "rmsnorm", &name)?;
        let mut y = alloc::<T>(&dev, rows * cols)?;
        let mut rstd = alloc::<f32>(&dev, rows)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&xv)
            .arg(&wv)
            .arg(&rows_u)
            .arg(&cols_u)
            .arg(&eps_f)
            .arg(&inv_cols);
        b.arg(&mut y).arg(&mut rstd);
        // SAFETY: arguments match `rmsnorm_fwd_*`; x, y: rows x cols, w: cols, rstd: rows; for the
        // vectorized kernel the plan's threads x K x 8 columns cover a row.
        unsafe { b.launch(grid_rows(rows, threads, 0)) }?;
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
        let stream = stream(&dev);
        let sfx = suffix(x.dtype())?;
        // The vectorized kernels need 16-byte aligned x, w and dy (dx and the partials are fresh).
        let plan = row_vec_plan(cols).filter(|_| {
            aligned16(&xv, &stream) && aligned16(&wv, &stream) && aligned16(&dyv, &stream)
        });
        // With dw: a fixed number of blocks, each accumulating its rows' dw (in registers for the
        // vectorized kernel, in cols floats of shared memory for the scalar one).
        let blocks = if need_dw { rows.clamp(1, 256) } else { rows };
        let (name, threads, shared) = match plan {
            Some(RowVecPlan {
                groups_per_thread: k,
                threads,
            }) => {
                let dw = if need_dw { "dw_" } else { "" };
                (format!("rmsnorm_bwd_{dw}{sfx}_k{k}"), threads, 0)
            }
            None => {
                let shared = if need_dw { (cols * 4) as u32 } else { 0 };
                (
                    format!("rmsnorm_bwd_{sfx}_scalar"),
                    row_threads(cols),
                    shared,
                )
            }
        };
        let f = func(&dev, "rmsnorm", &name)?;
        let mut dx = alloc::<T>(&dev, rows * cols)?;
        let mut partial = if need_dw {
            Some(alloc::<f32>(&dev, blocks * cols)?)
        } else {
            None
        };
        let null: u64 = 0;
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
        // partial: grid x cols (16-byte aligned rows: cols % 8 == 0 on the vectorized path); the
        // scalar kernel gets cols floats of shared memory for dw (cols <= MAX_DW_COLS).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_vec_plan_covers_the_row_within_the_compiled_variants() {
        // The model sizes this is tuned for: one 8-column group per thread up to 4096 columns.
        assert_eq!(
            row_vec_plan(2048),
            Some(RowVecPlan {
                groups_per_thread: 1,
                threads: 256
            })
        );
        assert_eq!(
            row_vec_plan(8192),
            Some(RowVecPlan {
                groups_per_thread: 2,
                threads: 512
            })
        );
        for cols in (8..=40_000).step_by(8) {
            let groups = cols / 8;
            match row_vec_plan(cols) {
                Some(p) => {
                    let t = p.threads as usize;
                    assert!([1, 2, 4].contains(&p.groups_per_thread), "{cols}: {p:?}");
                    assert!(
                        t % 32 == 0 && (32..=VEC_MAX_THREADS).contains(&t),
                        "{cols}: {p:?}"
                    );
                    assert!(
                        t * p.groups_per_thread >= groups,
                        "{cols}: {p:?} misses columns"
                    );
                    // No whole warp idle in every slot: the fewest K was taken.
                    assert!(
                        t - 32 < groups.div_ceil(p.groups_per_thread),
                        "{cols}: {p:?}"
                    );
                }
                None => assert!(groups > 4 * VEC_MAX_THREADS, "{cols} should fit"),
            }
        }
        assert_eq!(row_vec_plan(2047), None);
        assert_eq!(row_vec_plan(0), None);
    }
}
