//! `C = alpha · op(A) · op(B) + beta · C` written into an existing buffer (cuBLAS `GemmEx` on a GPU):
//! the LoRA delta is added onto the base projection's output and the adapter's input gradient onto
//! the base one without an extra `[n, out]` scale and add pass, and the adapter's weight gradients
//! are accumulated in f32 straight into the flat gradient buffer (bf16 inputs, f32 output), with no
//! per-slot temporaries or casts. The candle-ops path (CPU, or kernels off) computes the same
//! expression and is the reference of the cuBLAS one.

use super::{random_tensor, run_check, sized, KernelCheck, Tolerance};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

/// The output of [`gemm_into`]: elements `offset .. offset + m·n` of the contiguous `buf`,
/// read and written as a row-major `[m, n]` matrix.
#[derive(Clone, Copy)]
pub struct GemmOut<'a> {
    pub buf: &'a Tensor,
    pub offset: usize,
}

impl<'a> GemmOut<'a> {
    /// The whole of a contiguous tensor.
    pub fn whole(t: &'a Tensor) -> GemmOut<'a> {
        GemmOut { buf: t, offset: 0 }
    }
}

/// `[rows, cols]` of `op(t)` for a 2-D `t`.
fn op_dims(t: &Tensor, trans: bool) -> Result<(usize, usize)> {
    let (r, c) = t.dims2()?;
    Ok(if trans { (c, r) } else { (r, c) })
}

/// `out[m, n] = alpha · op(a)[m, k] · op(b)[k, n] + beta · out` in place (`op` = transpose when
/// the flag is set). `a` and `b` share a dtype; `out.buf` has that dtype or f32 (then the product
/// is accumulated in f32 without an intermediate rounding on the GPU). `beta = 0` overwrites
/// (the buffer's old values are not read).
pub fn gemm_into(
    out: GemmOut,
    a: &Tensor,
    trans_a: bool,
    b: &Tensor,
    trans_b: bool,
    alpha: f64,
    beta: f64,
) -> Result<()> {
    let (m, k) = op_dims(a, trans_a)?;
    let (kb, n) = op_dims(b, trans_b)?;
    if k != kb {
        bail!("gemm: op(a) is [{m}, {k}] but op(b) is [{kb}, {n}] (inner dimensions differ)");
    }
    if a.dtype() != b.dtype() {
        bail!("gemm: a is {:?} but b is {:?}", a.dtype(), b.dtype());
    }
    let buf = out.buf;
    if !buf.is_contiguous() || out.offset + m * n > buf.elem_count() {
        bail!(
            "gemm: output [{m}, {n}] at offset {} does not fit a contiguous buffer of {} elements",
            out.offset,
            buf.elem_count()
        );
    }
    if buf.dtype() != a.dtype() && buf.dtype() != DType::F32 {
        bail!(
            "gemm: a {:?} output must be {:?} or F32, got {:?}",
            a.dtype(),
            a.dtype(),
            buf.dtype()
        );
    }
    #[cfg(feature = "cuda")]
    if super::on_cuda(buf) && matches!(a.dtype(), DType::BF16 | DType::F32) {
        return imp::gemm_ex(out, (m, n, k), a, trans_a, b, trans_b, alpha, beta);
    }
    // Reference: the product in the inputs' dtype, then into the buffer's dtype.
    let prod = matmul_ops(a, trans_a, b, trans_b)?.to_dtype(buf.dtype())?; // [m, n]
    let prod = if alpha == 1.0 {
        prod
    } else {
        prod.affine(alpha, 0.0)?
    };
    let flat = buf.flatten_all()?;
    if beta != 1.0 {
        // Scale the region (beta = 0 clears it without reading it), then accumulate into it.
        let cur = flat.narrow(0, out.offset, m * n)?;
        let scaled = if beta == 0.0 {
            cur.zeros_like()?
        } else {
            cur.affine(beta, 0.0)?
        };
        flat.slice_set(&scaled, 0, out.offset)?;
    }
    super::grad::accumulate_into(&flat, out.offset, &prod)
}

/// `op(a) · op(b)` with candle ops.
fn matmul_ops(a: &Tensor, trans_a: bool, b: &Tensor, trans_b: bool) -> Result<Tensor> {
    let opa = if trans_a { a.t()? } else { a.clone() };
    let opb = if trans_b { b.t()? } else { b.clone() };
    Ok(opa.matmul(&opb)?)
}

/// `op(a) · op(b)` as a new `[m, n]` tensor of a's dtype. On a GPU one cuBLAS `GemmEx` into an
/// uninitialized buffer (`beta = 0` never reads it); candle's matmul otherwise.
pub fn gemm(a: &Tensor, trans_a: bool, b: &Tensor, trans_b: bool) -> Result<Tensor> {
    gemm_scaled(a, trans_a, b, trans_b, 1.0)
}

/// `alpha · op(a) · op(b)` into a fresh tensor: on a GPU the scale rides on the GEMM (no extra
/// pass over the product).
pub fn gemm_scaled(
    a: &Tensor,
    trans_a: bool,
    b: &Tensor,
    trans_b: bool,
    alpha: f64,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::on_cuda(a) && matches!(a.dtype(), DType::BF16 | DType::F32) {
        let (m, _) = op_dims(a, trans_a)?;
        let (_, n) = op_dims(b, trans_b)?;
        let out = gemm_output(a, m, n)?;
        gemm_into(GemmOut::whole(&out), a, trans_a, b, trans_b, alpha, 0.0)?;
        return Ok(out);
    }
    let prod = matmul_ops(a, trans_a, b, trans_b)?;
    Ok(if alpha == 1.0 {
        prod
    } else {
        prod.affine(alpha, 0.0)?
    })
}

/// A `[rows, cols]` tensor of `like`'s dtype and device for GEMMs to write with `beta = 0`, which
/// never read it: uninitialized on a GPU (no fill pass), zeros elsewhere.
pub fn gemm_output(like: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::on_cuda(like) && matches!(like.dtype(), DType::BF16 | DType::F32) {
        return Ok(imp::uninit(like, rows * cols)?.reshape((rows, cols))?);
    }
    Ok(Tensor::zeros((rows, cols), like.dtype(), like.device())?)
}

#[cfg(feature = "cuda")]
mod imp {
    use super::GemmOut;
    use crate::kernels::cuda::{alloc, device_of, stream, wrap, CudaInput};
    use anyhow::{bail, Result};
    use candle_core::cuda_backend::cudarc::cublas::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    use candle_core::{DType, Tensor};
    use half::bf16;
    use std::ffi::c_void;

    /// `[n]` of `like`'s dtype on its device, uninitialized.
    pub fn uninit(like: &Tensor, n: usize) -> Result<Tensor> {
        let dev = device_of(like)?;
        Ok(match like.dtype() {
            DType::BF16 => wrap(alloc::<bf16>(&dev, n)?, &dev, n),
            DType::F32 => wrap(alloc::<f32>(&dev, n)?, &dev, n),
            other => bail!("gemm: no cuBLAS path for {other:?}"),
        })
    }

    fn data_type(dtype: DType) -> Result<sys::cudaDataType> {
        Ok(match dtype {
            DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
            DType::F32 => sys::cudaDataType::CUDA_R_32F,
            other => bail!("gemm: no cuBLAS path for {other:?}"),
        })
    }

    /// Device address of element 0 of a contiguous CUDA tensor (its layout offset applied).
    fn address(
        input: &CudaInput,
        dtype: DType,
        stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
    ) -> Result<u64> {
        Ok(match dtype {
            DType::BF16 => input.view::<bf16>()?.device_ptr(stream).0,
            DType::F32 => input.view::<f32>()?.device_ptr(stream).0,
            other => bail!("gemm: no cuBLAS path for {other:?}"),
        })
    }

    /// Row-major `C = A·B` is column-major `Cᵀ = Bᵀ·Aᵀ`: cuBLAS gets (b, a) with the row-major
    /// leading dimensions, and an operand stored transposed is passed with `OP_T`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_ex(
        out: GemmOut,
        (m, n, k): (usize, usize, usize),
        a: &Tensor,
        trans_a: bool,
        b: &Tensor,
        trans_b: bool,
        alpha: f64,
        beta: f64,
    ) -> Result<()> {
        let dev = device_of(out.buf)?;
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        let (a_in, b_in, c_in) = (
            CudaInput::new(&a)?,
            CudaInput::new(&b)?,
            CudaInput::new(out.buf)?,
        );
        let stream = stream(&dev);
        let a_ptr = address(&a_in, a.dtype(), &stream)?;
        let b_ptr = address(&b_in, b.dtype(), &stream)?;
        let c_dtype = out.buf.dtype();
        let c_ptr =
            address(&c_in, c_dtype, &stream)? + (out.offset * c_dtype.size_in_bytes()) as u64;
        // Row-major storage widths: a is [m, k] (or [k, m] when transposed), b [k, n] (or [n, k]).
        let lda = if trans_a { m } else { k };
        let ldb = if trans_b { k } else { n };
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (alpha, beta) = (alpha as f32, beta as f32);
        let blas = dev.cublas_handle();
        // SAFETY: the pointers address live device buffers of the stated dtypes and sizes (a: m·k,
        // b: k·n, c: m·n from the offset, checked by the caller); cuBLAS runs on candle's stream.
        unsafe {
            result::gemm_ex(
                *blas.handle(),
                op(trans_b),
                op(trans_a),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                b_ptr as *const c_void,
                data_type(b.dtype())?,
                ldb as i32,
                a_ptr as *const c_void,
                data_type(a.dtype())?,
                lda as i32,
                &beta as *const f32 as *const c_void,
                c_ptr as *mut c_void,
                data_type(c_dtype)?,
                n as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }
}

/// cuBLAS against the candle-ops reference: every transpose combination, bf16 into f32 with
/// accumulation (a LoRA weight gradient) and bf16 into bf16 (the delta onto a base output).
pub fn self_checks() -> Vec<KernelCheck> {
    let mut checks = vec![];
    for (name, ta, tb, f32_out) in [
        ("gemm_into nn bf16->f32 beta 1", false, false, true),
        ("gemm_into tn bf16->f32 beta 1", true, false, true),
        ("gemm_into nt bf16 beta 1", false, true, false),
        ("gemm_into tt bf16 beta 1", true, true, false),
    ] {
        checks.push(KernelCheck::new(name, move |device: &Device| {
            let (m, n, k) = sized(device, (2048, 64, 4096), (7, 5, 9));
            let dtype = super::check_dtype(device);
            let a_shape = if ta { [k, m] } else { [m, k] };
            let b_shape = if tb { [n, k] } else { [k, n] };
            let a = random_tensor(&a_shape, 1.0, 11, dtype, device)?;
            let b = random_tensor(&b_shape, 1.0, 12, dtype, device)?;
            let out_dtype = if f32_out { DType::F32 } else { dtype };
            // The output sits at an offset inside a larger buffer, as a gradient slot does.
            let base = random_tensor(&[m * n + 3], 1.0, 13, out_dtype, device)?;
            let run = |buf: &Tensor, a: &Tensor, b: &Tensor| -> Result<Vec<Tensor>> {
                let buf = buf.copy()?;
                gemm_into(
                    GemmOut {
                        buf: &buf,
                        offset: 3,
                    },
                    a,
                    ta,
                    b,
                    tb,
                    0.25,
                    1.0,
                )?;
                Ok(vec![buf])
            };
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
            let (a32, b32, base32) = (cpu(&a)?, cpu(&b)?, cpu(&base)?);
            let tol = if f32_out {
                Tolerance {
                    atol: 1e-3,
                    rtol: 1e-3,
                }
            } else {
                Tolerance {
                    atol: 2e-2,
                    rtol: 1e-2,
                }
            };
            run_check(
                device,
                format!("op(a) [{m}, {k}] · op(b) [{k}, {n}] {dtype:?} into {out_dtype:?}"),
                tol,
                &|| run(&base, &a, &b),
                &|| run(&base32, &a32, &b32),
            )
        }));
    }
    // The base projections' shapes (a 1.8B MLP): forward x·Wᵀ and input gradient dy·W, cuBLAS
    // GemmEx against candle's matmul (strided-batched) on the same device.
    for (name, tb) in [
        ("gemm linear fwd x·Wᵀ", true),
        ("gemm linear bwd dy·W", false),
    ] {
        checks.push(KernelCheck::new(name, move |device: &Device| {
            let (n, k, o) = sized(device, (2048, 2048, 8192), (6, 5, 7));
            let dtype = super::check_dtype(device);
            let x = random_tensor(&[n, k], 1.0, 14, dtype, device)?;
            let w_shape = if tb { [o, k] } else { [k, o] };
            let w = random_tensor(&w_shape, 1.0, 15, dtype, device)?;
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
            let (xc, wc) = (cpu(&x)?, cpu(&w)?);
            run_check(
                device,
                format!("[{n}, {k}] · [{k}, {o}] {dtype:?}"),
                Tolerance {
                    atol: 2e-2,
                    rtol: 1e-2,
                },
                &|| Ok(vec![gemm(&x, false, &w, tb)?]),
                &|| Ok(vec![gemm(&xc, false, &wc, tb)?]),
            )
        }));
    }
    checks
}
