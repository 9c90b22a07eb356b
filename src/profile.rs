//! Opt-in wall-clock profile of the training step by phase (`FTRUN_PROFILE=1`).
//!
//! Each scope synchronizes the device before and after, so the times are exact per phase but the
//! run is slower than an unprofiled one: use it to find where a step goes, never for tokens/s.
//! Scopes must not nest (a nested scope's time would be counted twice).

use candle_core::Device;
use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FTRUN_PROFILE").is_ok_and(|v| v == "1"))
}

/// name -> (seconds, calls)
fn table() -> &'static Mutex<BTreeMap<&'static str, (f64, u64)>> {
    static T: OnceLock<Mutex<BTreeMap<&'static str, (f64, u64)>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Runs `f`, adding its synchronized wall time to `name` when profiling is on.
pub fn scope<T, E: From<candle_core::Error>>(
    device: &Device,
    name: &'static str,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    if !enabled() {
        return f();
    }
    device.synchronize()?;
    let t0 = Instant::now();
    let out = f();
    device.synchronize()?;
    let dt = t0.elapsed().as_secs_f64();
    if let Ok(mut t) = table().lock() {
        let e = t.entry(name).or_insert((0.0, 0));
        e.0 += dt;
        e.1 += 1;
    }
    out
}

/// The table so far, largest first (empty when profiling is off), and resets it.
pub fn take_report() -> String {
    let Ok(mut t) = table().lock() else {
        return String::new();
    };
    let total: f64 = t.values().map(|v| v.0).sum();
    let mut rows: Vec<_> = t.iter().map(|(k, v)| (*k, *v)).collect();
    rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let mut out = String::new();
    for (name, (secs, calls)) in rows {
        out += &format!(
            "{name:<16} {:>9.1} ms {:>5.1}% {calls:>7} calls\n",
            secs * 1e3,
            100.0 * secs / total.max(1e-12)
        );
    }
    t.clear();
    out
}
