//! Fused CUDA kernels and the machinery to build, load, launch and check them.
//!
//! # Dispatch rule
//! Every public kernel entry point takes candle `Tensor`s. When the tensors live on a CUDA device
//! with a dtype the kernel supports (and kernels are enabled, see [`enabled`]), it runs the CUDA
//! kernel and returns `Some(result)`; otherwise it returns `None` (or falls through to the same
//! candle-ops code that is the CPU reference). The layer functions (`model::layers::*`,
//! `train::optim`, `quant::device`) call the entry point first and fall back to their candle-ops
//! code, so callers never branch on the device and the CPU build is the reference of the CUDA one.
//!
//! # Build and load
//! `build.rs` compiles every `src/kernels/cuda/*.cu` with nvcc into a fatbin (sm_80, sm_90 and
//! compute_90 PTX) when the `cuda` feature is on; [`cuda::func`] loads a module once per device
//! from the embedded bytes and returns its functions. Kernels run on candle's stream of the device,
//! so they are ordered with candle's own ops.
//!
//! # Checks
//! Each kernel file exposes `self_checks()`; `ftrun kernel-check` (hidden) runs them all on a GPU
//! against the CPU reference, see [`KernelCheck`].

pub mod adamw;
pub mod dropout;
pub mod flash_attn;
pub mod gemm;
pub mod grad;
pub mod lm_ce;
pub mod nf4;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

#[cfg(feature = "cuda")]
pub mod cuda;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::cell::Cell;
use std::time::Instant;

thread_local! {
    static SUSPENDED: Cell<bool> = const { Cell::new(false) };
}

/// Kernels are on unless `FTRUN_KERNELS=0` (then every entry point answers `None` and the
/// candle-ops path runs on the GPU too: for A/B timing and for bisecting a numerical problem), and
/// not inside [`without_kernels`] on this thread.
pub fn enabled() -> bool {
    static ENV_ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let env =
        *ENV_ENABLED.get_or_init(|| std::env::var("FTRUN_KERNELS").map_or(true, |v| v != "0"));
    env && !SUSPENDED.with(Cell::get)
}

/// Runs `f` with the kernels off on this thread: the candle-ops path of every entry point (the
/// checks time it on the GPU this way).
pub fn without_kernels<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SUSPENDED.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SUSPENDED.with(|s| s.replace(true)));
    f()
}

/// Whether a kernel may run on `t`: CUDA storage, kernels enabled, and the `cuda` feature built.
pub fn on_cuda(t: &Tensor) -> bool {
    cfg!(feature = "cuda") && t.device().is_cuda() && enabled()
}

/// Whether `dtype` is one the elementwise/normalization kernels are built for.
pub fn float_kernel_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F32)
}

/// Element-wise acceptance: `|got − want| <= atol + rtol · |want|`.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub atol: f64,
    pub rtol: f64,
}

impl Tolerance {
    pub const EXACT: Tolerance = Tolerance {
        atol: 0.0,
        rtol: 0.0,
    };
    /// One bf16 rounding of the result (2^-8 relative) plus slack for f32 reduction order.
    pub const BF16: Tolerance = Tolerance {
        atol: 1e-5,
        rtol: 8e-3,
    };
}

/// The outcome of one kernel check.
#[derive(Debug, Clone)]
pub struct CheckOutcome {
    pub max_abs: f64,
    /// Largest `|got − want| / |want|` over elements with `|want| > atol` (or > 1e-30 when exact).
    pub max_rel: f64,
    pub tol: Tolerance,
    pub pass: bool,
    /// Median time of the fused path, microseconds.
    pub kernel_us: f64,
    /// Median time of the candle-ops path on the same device, microseconds.
    pub candle_us: f64,
    /// What was run (shapes, dtype).
    pub what: String,
    /// The element with the largest error: `(flat index, got, want)`.
    pub worst: Option<(usize, f64, f64)>,
}

type CheckFn = Box<dyn Fn(&Device) -> Result<CheckOutcome> + Send + Sync>;

/// One named check: runs the kernel on random inputs of realistic shapes on the given device,
/// compares with the CPU reference and times both paths.
pub struct KernelCheck {
    pub name: std::borrow::Cow<'static, str>,
    pub run: CheckFn,
}

impl KernelCheck {
    pub fn new(
        name: impl Into<std::borrow::Cow<'static, str>>,
        run: impl Fn(&Device) -> Result<CheckOutcome> + Send + Sync + 'static,
    ) -> KernelCheck {
        KernelCheck {
            name: name.into(),
            run: Box::new(run),
        }
    }
}

/// Every kernel's checks, in the order `ftrun kernel-check` prints them.
pub fn all_checks() -> Vec<KernelCheck> {
    let mut checks = Vec::new();
    checks.extend(nf4::self_checks());
    checks.extend(adamw::self_checks());
    checks.extend(grad::self_checks());
    checks.extend(gemm::self_checks());
    checks.extend(dropout::self_checks());
    checks.extend(rmsnorm::self_checks());
    checks.extend(swiglu::self_checks());
    checks.extend(rope::self_checks());
    checks.extend(lm_ce::self_checks());
    checks.extend(flash_attn::self_checks());
    checks
}

/// Errors of one output against its reference.
#[derive(Debug, Clone, Copy)]
pub struct Comparison {
    pub max_abs: f64,
    pub max_rel: f64,
    pub pass: bool,
    /// `(flat index, got, want)` of the largest absolute error (None when all are equal).
    pub worst: Option<(usize, f64, f64)>,
}

/// Compares `got` (any device/dtype) with `want` element by element in f64.
pub fn compare(got: &Tensor, want: &Tensor, tol: Tolerance) -> Result<Comparison> {
    if got.dims() != want.dims() {
        bail!(
            "shape {:?} differs from the reference {:?}",
            got.dims(),
            want.dims()
        );
    }
    let flat = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?)
    };
    let (g, w) = (flat(got)?, flat(want)?);
    let rel_floor = if tol.atol > 0.0 { tol.atol } else { 1e-30 };
    let mut c = Comparison {
        max_abs: 0.0,
        max_rel: 0.0,
        pass: true,
        worst: None,
    };
    let mut seen_nan = false;
    for (i, (&g, &w)) in g.iter().zip(&w).enumerate() {
        let err = (g - w).abs();
        // NaN never passes (and a NaN where the reference has one is still worth a look).
        if err.is_nan() || err > tol.atol + tol.rtol * w.abs() {
            c.pass = false;
        }
        if err.is_nan() {
            if !seen_nan {
                c.worst = Some((i, g, w));
            }
            seen_nan = true;
            continue;
        }
        if err > c.max_abs && !seen_nan {
            c.worst = Some((i, g, w));
        }
        c.max_abs = c.max_abs.max(err);
        if w.abs() > rel_floor {
            c.max_rel = c.max_rel.max(err / w.abs());
        }
    }
    if seen_nan {
        c.max_abs = f64::NAN;
    }
    Ok(c)
}

/// Time per call of `f` in microseconds: after warm-up calls, `BURSTS` bursts of `iters` calls
/// queued back to back with one device synchronization at the end of each, and the median
/// burst's time divided by `iters`. One synchronization per burst rather than per call keeps the
/// host's sync latency and the GPU's idle gaps out of the figure (a single synchronized call
/// varied by 10-40% between runs on the H100).
pub fn time_us(device: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    const BURSTS: usize = 5;
    let iters = iters.max(1);
    for _ in 0..iters.min(3) {
        f()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(BURSTS);
    for _ in 0..BURSTS {
        let start = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e6 / iters as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[BURSTS / 2])
}

/// Deterministic pseudo-random `[shape]` values in `[-scale, scale)` (f32, then cast to `dtype`),
/// generated on the host so CPU and GPU checks see the same inputs.
pub fn random_tensor(
    shape: &[usize],
    scale: f32,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
}

static SMALL_CHECKS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the checks use their small shapes on a GPU too (for compute-sanitizer runs).
pub fn set_small_checks(small: bool) {
    SMALL_CHECKS.store(small, std::sync::atomic::Ordering::Relaxed);
}

/// On a GPU a check uses realistic shapes and bf16; on the CPU (the harness's own test) small
/// shapes and f32, so the test stays fast and the comparison meaningful. With
/// [`set_small_checks`] a GPU run keeps bf16 but takes the small shapes.
pub fn sized<T>(device: &Device, gpu: T, cpu: T) -> T {
    if device.is_cuda() && !SMALL_CHECKS.load(std::sync::atomic::Ordering::Relaxed) {
        gpu
    } else {
        cpu
    }
}

/// The compute dtype of a check on `device`: bf16 on a GPU, f32 on the CPU.
pub fn check_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// The usual shape of a check: `fused` (the dispatching entry point, on `device`) is compared with
/// `reference` (the CPU path, usually in f32 from the same inputs), then timed against itself with
/// the kernels off ([`without_kernels`]: the candle-ops path on the same device).
pub fn run_check(
    device: &Device,
    what: String,
    tol: Tolerance,
    fused: &dyn Fn() -> Result<Vec<Tensor>>,
    reference: &dyn Fn() -> Result<Vec<Tensor>>,
) -> Result<CheckOutcome> {
    let got = fused()?;
    let want = reference()?;
    if got.len() != want.len() {
        bail!("{} outputs, the reference has {}", got.len(), want.len());
    }
    let (mut max_abs, mut max_rel, mut pass, mut worst) = (0.0f64, 0.0f64, true, None);
    for (g, w) in got.iter().zip(&want) {
        let c = compare(g, w, tol)?;
        if c.max_abs.is_nan() || c.max_abs > max_abs {
            worst = c.worst;
        }
        max_abs = if max_abs.is_nan() || c.max_abs.is_nan() {
            f64::NAN
        } else {
            max_abs.max(c.max_abs)
        };
        max_rel = max_rel.max(c.max_rel);
        pass &= c.pass;
    }
    let iters = sized(device, 20, 1);
    let kernel_us = time_us(device, iters, || fused().map(drop))?;
    let candle_us = time_us(device, iters, || without_kernels(|| fused().map(drop)))?;
    Ok(CheckOutcome {
        max_abs,
        max_rel,
        tol,
        pass,
        kernel_us,
        candle_us,
        what,
        worst,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_reports_errors_and_tolerance() {
        let dev = Device::Cpu;
        let want = Tensor::new(&[1.0f32, -2.0, 0.0, 4.0], &dev).unwrap();
        let got = Tensor::new(&[1.01f32, -2.0, 0.0, 4.0], &dev).unwrap();
        let c = compare(&got, &want, Tolerance::BF16).unwrap();
        assert!((c.max_abs - 0.01).abs() < 1e-6 && (c.max_rel - 0.01).abs() < 1e-6);
        assert!(!c.pass, "1% error is outside bf16 tolerance");
        assert_eq!(c.worst.map(|w| w.0), Some(0));
        let c = compare(&want, &want, Tolerance::EXACT).unwrap();
        assert!(c.pass && c.worst.is_none());
        let nan = Tensor::new(&[f32::NAN, -2.0, 0.0, 4.0], &dev).unwrap();
        let c = compare(&nan, &want, Tolerance::BF16).unwrap();
        assert!(c.max_abs.is_nan() && !c.pass, "NaN must fail");
        let short = Tensor::new(&[1.0f32], &dev).unwrap();
        assert!(compare(&short, &want, Tolerance::EXACT).is_err());
    }

    #[test]
    fn every_check_passes_on_cpu() {
        // On the CPU the entry points fall back to the candle-ops path: the harness itself (inputs,
        // reference, comparison) must agree with itself for every registered kernel.
        for check in all_checks() {
            let out = (check.run)(&Device::Cpu).unwrap();
            assert!(out.pass, "{}: {:?}", check.name, out);
        }
    }
}
