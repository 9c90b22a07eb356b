//! `ftrun kernel-check` (hidden): runs every fused kernel on a CUDA device against its CPU
//! reference and times it against the candle-ops path on the same GPU. One line per check;
//! exits non-zero when any check fails.

use crate::kernels::{all_checks, CheckOutcome};
use anyhow::{bail, Result};
use candle_core::Device;

#[derive(clap::Args, Debug)]
pub struct KernelCheckArgs {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Only checks whose name contains this text.
    #[arg(long)]
    pub filter: Option<String>,
}

pub fn run(a: KernelCheckArgs) -> Result<()> {
    if !cfg!(feature = "cuda") {
        bail!("kernel-check needs a CUDA build (cargo build --features cuda) and a GPU");
    }
    let device = Device::new_cuda(a.gpu)?;
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
                println!("{}", line(check.name, width, &o));
                if !o.pass {
                    failed.push(check.name);
                }
            }
            Err(e) => {
                println!("{:width$}  ERROR: {e:#}", check.name);
                failed.push(check.name);
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
    format!(
        "{name:width$}  {:>10.3e}  {:>10.3e}  {:>8.1e}, {:>7.1e}  {}    {:>10.1}  {:>10.1}  {:>6.2}x  {}",
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
