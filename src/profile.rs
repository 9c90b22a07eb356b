//! Opt-in wall-clock profile of the training step by phase (`FTRUN_PROFILE=1`).
//!
//! Each scope synchronizes the device before and after, so the times are exact per phase but the
//! run is slower than an unprofiled one: use it to find where a step goes, never for tokens/s.
//! Scopes must not nest (a nested scope's time would be counted twice).
//!
//! `FTRUN_PROFILE=host` times the same scopes without synchronizing: the host's own time per
//! phase (launches, allocations, library calls), which is what bounds a step whose kernels are
//! shorter than the work of issuing them.
//!
//! On a GPU each phase also gets the growth of the memory pool's reservation during its calls
//! (MiB the pool had to take from the driver because no free block fitted): where the pool's
//! fragmentation comes from.

use candle_core::Device;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Off,
    /// Device synchronized around each scope.
    Synced,
    /// Host time only.
    Host,
}

fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("FTRUN_PROFILE").as_deref() {
        Ok("1") => Mode::Synced,
        Ok("host") => Mode::Host,
        _ => Mode::Off,
    })
}

/// What the report's times are, for its heading.
pub fn description() -> &'static str {
    match mode() {
        Mode::Host => "FTRUN_PROFILE=host: host time per phase, the device not synchronized",
        _ => "FTRUN_PROFILE=1: synchronized per phase, so slower than a plain run",
    }
}

/// One phase's totals.
#[derive(Default, Clone, Copy)]
struct Phase {
    secs: f64,
    calls: u64,
    /// MiB the pool's reservation grew during the phase's calls.
    reserved_growth: f64,
}

fn table() -> &'static Mutex<BTreeMap<&'static str, Phase>> {
    static T: OnceLock<Mutex<BTreeMap<&'static str, Phase>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(BTreeMap::new()))
}

fn reserved_mib(device: &Device) -> f64 {
    match crate::train::metrics::pool_current_mib(device) {
        Ok(Some((_, reserved))) => reserved,
        _ => 0.0,
    }
}

/// Runs `f`, adding its synchronized wall time to `name` when profiling is on.
pub fn scope<T, E: From<candle_core::Error>>(
    device: &Device,
    name: &'static str,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let synced = match mode() {
        Mode::Off => return f(),
        Mode::Synced => true,
        Mode::Host => false,
    };
    if synced {
        device.synchronize()?;
    }
    // The pool query is a driver call: kept out of the host-time profile.
    let reserved = || if synced { reserved_mib(device) } else { 0.0 };
    let reserved_before = reserved();
    let t0 = Instant::now();
    let out = f();
    if synced {
        device.synchronize()?;
    }
    let dt = t0.elapsed().as_secs_f64();
    let growth = (reserved() - reserved_before).max(0.0);
    if let Ok(mut t) = table().lock() {
        let e = t.entry(name).or_default();
        e.secs += dt;
        e.calls += 1;
        e.reserved_growth += growth;
    }
    out
}

/// The table so far, largest first (empty when profiling is off), and resets it.
pub fn take_report() -> String {
    let Ok(mut t) = table().lock() else {
        return String::new();
    };
    let total: f64 = t.values().map(|v| v.secs).sum();
    let mut rows: Vec<_> = t.iter().map(|(k, v)| (*k, *v)).collect();
    rows.sort_by(|a, b| b.1.secs.total_cmp(&a.1.secs));
    let mut out = String::new();
    for (name, p) in rows {
        out += &format!(
            "{name:<16} {:>9.1} ms {:>5.1}% {:>7} calls {:>8.0} MiB pool growth\n",
            p.secs * 1e3,
            100.0 * p.secs / total.max(1e-12),
            p.calls,
            p.reserved_growth
        );
    }
    t.clear();
    out
}
