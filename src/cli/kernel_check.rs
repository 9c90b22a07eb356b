//! `ftrun kernel-check` (hidden): runs every fused kernel on a CUDA device against its CPU
//! reference and times it against the candle-ops path on the same GPU. One line per check;
//! exits non-zero when any check fails.

use crate::kernels::{all_checks, CheckOutcome};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct KernelCheckArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Only checks whose name contains this text.
    #[arg(long)]
    pub filter: Option<String>,
    /// Small shapes (for compute-sanitizer, which runs kernels ~100x slower).
    #[arg(long)]
    pub small: bool,
    /// Instead of the checks: the host's time per call of the operations a training step
    /// issues thousands of (allocations, launches, cuBLAS calls), the device never waited on
    /// inside a timed batch.
    #[arg(long)]
    pub host_costs: bool,
}

/// Host µs per call of `f`, over batches of `per_batch` calls with a device synchronization
/// between batches (outside the timing), so that the launch queue never fills.
fn host_us(device: &Device, per_batch: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    f()?; // first-use loading
    device.synchronize()?;
    let mut secs = 0.0;
    for _ in 0..8 {
        let t0 = Instant::now();
        for _ in 0..per_batch {
            f()?;
        }
        secs += t0.elapsed().as_secs_f64();
        device.synchronize()?;
    }
    Ok(secs * 1e6 / (8 * per_batch) as f64)
}

fn host_costs(device: &Device) -> Result<()> {
    use crate::kernels::gemm::{gemm, gemm_into, GemmOut};
    let bf = |shape: &[usize], seed| {
        crate::kernels::random_tensor(shape, 1.0, seed, DType::BF16, device)
    };
    let small = bf(&[1024], 1)?;
    // An f32 buffer, as the gradient buffer is: a bf16 one would take candle's fallback path.
    let acc = Tensor::zeros(1024, DType::F32, device)?;
    let x = bf(&[2048, 2048], 2)?;
    let a = bf(&[64, 2048], 3)?;
    let ax = bf(&[2048, 64], 4)?;
    let y = bf(&[2048, 2048], 5)?;
    let t = bf(&[64, 64], 6)?;
    // Each operation's result is dropped at once (an output freed as a step's temporaries are).
    fn discard<T, E: Into<anyhow::Error>>(r: std::result::Result<T, E>) -> Result<()> {
        r.map(drop).map_err(Into::into)
    }
    type Op<'a> = Box<dyn FnMut() -> Result<()> + 'a>;
    let mut ops: Vec<(&str, Op)> = vec![
        (
            "alloc 2 KiB + free",
            Box::new(|| discard(Tensor::zeros(1024, DType::BF16, device))),
        ),
        (
            "alloc 32 MiB + free (zeros)",
            Box::new(|| discard(Tensor::zeros(16 << 20, DType::BF16, device))),
        ),
        (
            "candle affine, 1024 elements",
            Box::new(|| discard(small.affine(2.0, 1.0))),
        ),
        (
            "own kernel: accumulate_into f32 += bf16, 1024",
            Box::new(|| crate::kernels::grad::accumulate_into(&acc, 0, &small)),
        ),
        (
            "gemm 64x64x64 (fresh output)",
            Box::new(|| discard(gemm(&t, false, &t, true))),
        ),
        (
            "gemm_into 64x64x64 beta 1",
            Box::new(|| gemm_into(GemmOut::whole(&t), &t, false, &t, true, 1.0, 1.0)),
        ),
        (
            "gemm [2048,2048]x[64,2048]ᵀ",
            Box::new(|| discard(gemm(&x, false, &a, true))),
        ),
        (
            "gemm_into y += [2048,64]x[64,2048]",
            Box::new(|| gemm_into(GemmOut::whole(&y), &ax, false, &a, false, 1.0, 1.0)),
        ),
    ];
    #[cfg(feature = "cuda")]
    let ctx = device.as_cuda_device()?.cuda_stream().context().clone();
    #[cfg(feature = "cuda")]
    ops.push((
        "CUDA event create + destroy",
        Box::new(move || discard(ctx.new_event(None))),
    ));
    let mut rows = vec![];
    for (what, op) in &mut ops {
        rows.push((*what, host_us(device, 200, op.as_mut())?));
    }
    // A large product the device needs longer for than the host does to issue it.
    let big = host_us(device, 20, &mut || discard(gemm(&x, false, &x, true)))?;
    rows.push(("gemm 2048³ (device-bound: the queue's pace)", big));
    for (what, us) in rows {
        println!("{what:<44} {us:>8.1} µs host per call");
    }
    Ok(())
}

pub fn run(a: KernelCheckArgs) -> Result<()> {
    if !cfg!(feature = "cuda") {
        bail!("kernel-check needs a CUDA build (cargo build --features cuda) and a GPU");
    }
    let device = crate::train::trainer::new_cuda(a.gpu)?;
    if a.host_costs {
        return host_costs(&device);
    }
    crate::kernels::set_small_checks(a.small);
    let checks: Vec<_> = all_checks()
        .into_iter()
        .filter(|c| {
            a.filter
                .as_ref()
                .is_none_or(|f| c.name.contains(f.as_str()))
        })
        .collect();
    if checks.is_empty() {
        bail!("no kernel check matches {:?}", a.filter);
    }
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    println!(
        "{:width$}  {:>10}  {:>10}  {:>18}  result  {:>10}  {:>10}  {:>7}  shapes",
        "check", "max_abs", "max_rel", "tol (abs, rel)", "fused µs", "candle µs", "speedup"
    );
    let mut failed = Vec::new();
    for check in &checks {
        match (check.run)(&device) {
            Ok(o) => {
                println!("{}", line(&check.name, width, &o));
                if !o.pass {
                    failed.push(check.name.clone());
                }
            }
            Err(e) => {
                println!("{:width$}  ERROR: {e:#}", check.name);
                failed.push(check.name.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} kernel checks failed: {}",
            failed.len(),
            checks.len(),
            failed.join(", ")
        );
    }
    println!("all {} kernel checks passed", checks.len());
    Ok(())
}

fn line(name: &str, width: usize, o: &CheckOutcome) -> String {
    let worst = match (o.pass, o.worst) {
        (false, Some((i, got, want))) => format!("  worst: [{i}] got {got:e}, want {want:e}"),
        _ => String::new(),
    };
    format!(
        "{name:width$}  {:>10.3e}  {:>10.3e}  {:>8.1e}, {:>7.1e}  {}    {:>10.1}  {:>10.1}  {:>6.2}x  {}{worst}",
        o.max_abs,
        o.max_rel,
        o.tol.atol,
        o.tol.rtol,
        if o.pass { "PASS" } else { "FAIL" },
        o.kernel_us,
        o.candle_us,
        o.candle_us / o.kernel_us.max(1e-9),
        o.what
    )
}
