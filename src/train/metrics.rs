//! What a run tells its user: XTuner-style log lines, a progress bar with ETA and tokens/s, a JSONL
//! of scalars in the work dir, and loss/lr curves as a PNG at the end.

use anyhow::{Context, Result};
use serde::Serialize;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// One optimizer step's scalars (one JSONL line).
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub total: usize,
    pub lr: f64,
    pub loss: f64,
    pub grad_norm: f64,
    /// Seconds for the whole step, and the part spent waiting for data.
    pub time: f64,
    pub data_time: f64,
    pub tokens: usize,
    pub tokens_per_sec: f64,
    /// Peak memory in MiB (GPU when training on one, else the process' resident set).
    pub memory_mib: f64,
    pub skipped: bool,
}

/// Appends one JSON object per step to `work_dir/scalars.jsonl`.
pub struct ScalarLog {
    file: File,
}

impl ScalarLog {
    pub fn open(work_dir: &Path) -> Result<ScalarLog> {
        let path = work_dir.join("scalars.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(ScalarLog { file })
    }

    pub fn write(&mut self, s: &StepLog) -> Result<()> {
        serde_json::to_writer(&mut self.file, s)?;
        self.file.write_all(b"\n")?;
        self.file.flush()?;
        Ok(())
    }
}

/// `h:mm:ss`
pub fn fmt_eta(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// XTuner's line: `Iter(train) [1020/2046] lr: 1.05e-04 eta: 0:56:17 time: 2.8955 data_time: 0.0172
/// memory: 15266 loss: 0.8473 grad_norm: 0.0009 tokens_per_sec: ...`
pub fn log_line(s: &StepLog, eta: Duration) -> String {
    format!(
        "Iter(train) [{}/{}] lr: {:.3e} eta: {} time: {:.4} data_time: {:.4} memory: {:.0} loss: {:.4} grad_norm: {:.4} tokens_per_sec: {:.1}{}",
        s.step,
        s.total,
        s.lr,
        fmt_eta(eta),
        s.time,
        s.data_time,
        s.memory_mib,
        s.loss,
        s.grad_norm,
        s.tokens_per_sec,
        if s.skipped { " (step skipped)" } else { "" }
    )
}

/// Peak resident memory of this process in MiB (Linux), 0 where unknown.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Memory in use (MiB): on a GPU what the driver reports as used on the device (everything the
/// process holds, allocator caches included); on CPU the process' peak resident set.
pub fn device_memory_mib(device: &candle_core::Device) -> f64 {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        if let Ok((free, total)) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
        {
            return (total - free) as f64 / (1u64 << 20) as f64;
        }
    }
    let _ = device;
    peak_rss_mib()
}

/// On a GPU, keeps memory freed by the engine in the stream-ordered pool instead of returning
/// it to the driver at every synchronization (the pool's release threshold to the maximum):
/// re-allocation is cheaper, and the driver's used memory becomes the pool's high-water mark, so
/// [`device_memory_mib`] sampled after a step reports its true peak. No-op on CPU.
pub fn keep_memory_pool(device: &candle_core::Device) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = cuda_pool::default_pool(device)? {
        cuda_pool::set(
            pool,
            cuda_pool::Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            u64::MAX,
        )?;
    }
    let _ = device;
    Ok(())
}

/// Gives the device memory that only the loading used back to the driver: the pool's free blocks
/// (loading's temporaries, which would otherwise stay reserved and fragmented for the whole run)
/// and the per-thread stack reservation beyond what the kernels launched so far needed (the
/// driver reserves `stack size x resident threads` up front and grows it again when a kernel
/// needs more). Call once the model and optimizer are in place. No-op on CPU.
pub fn release_load_memory(device: &candle_core::Device) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    if let (Some(pool), candle_core::Device::Cuda(dev)) = (cuda_pool::default_pool(device)?, device)
    {
        use candle_core::cuda_backend::cudarc::driver::sys;
        device.synchronize()?;
        dev.cuda_stream().context().bind_to_thread()?;
        // SAFETY: a valid pool and the current context; plain driver calls.
        unsafe {
            sys::cuMemPoolTrimTo(pool, 0).result()?;
            sys::cuCtxSetLimit(sys::CUlimit::CU_LIMIT_STACK_SIZE, 256).result()?;
        }
    }
    let _ = device;
    Ok(())
}

/// `FTRUN_POOL_TRACE=1`: at every block boundary of a training step on a GPU, prints the memory
/// pool's current and high-water used / reserved MiB since the previous boundary: where the
/// pool's reservation outgrows what is allocated (its fragmentation). No-op otherwise.
pub fn pool_checkpoint(
    device: &candle_core::Device,
    what: &str,
    index: usize,
) -> anyhow::Result<()> {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*TRACE.get_or_init(|| std::env::var("FTRUN_POOL_TRACE").is_ok_and(|v| v == "1")) {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        device.synchronize()?;
        if let (Some(high), Some((used, reserved))) =
            (pool_high_marks(device)?, pool_current_mib(device)?)
        {
            eprintln!(
                "pool {what} {index}: used {used:.0} (high {:.0}) reserved {reserved:.0} (high {:.0}) MiB",
                high.used, high.reserved
            );
        }
    }
    let _ = (device, what, index);
    Ok(())
}

/// High-water marks of the device's memory pool since the last call, in MiB, resetting them:
/// `used` = the most the engine had allocated at once (no fragmentation, no CUDA context);
/// `reserved` = the most device memory the pool held (what the driver counts: `used` plus the
/// pool's fragmentation). None on CPU.
pub fn pool_high_marks(device: &candle_core::Device) -> anyhow::Result<Option<PoolHigh>> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = cuda_pool::default_pool(device)? {
        let mark = |attr| -> anyhow::Result<f64> {
            let bytes = cuda_pool::get(pool, attr)?;
            cuda_pool::set(pool, attr, 0)?;
            Ok(bytes as f64 / (1u64 << 20) as f64)
        };
        return Ok(Some(PoolHigh {
            used: mark(cuda_pool::Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved: mark(cuda_pool::Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        }));
    }
    let _ = device;
    Ok(None)
}

/// The device memory pool's current `(used, reserved)` bytes, in MiB; None on CPU.
pub fn pool_current_mib(device: &candle_core::Device) -> anyhow::Result<Option<(f64, f64)>> {
    #[cfg(feature = "cuda")]
    if let Some(pool) = cuda_pool::default_pool(device)? {
        let mib = |attr| -> anyhow::Result<f64> {
            Ok(cuda_pool::get(pool, attr)? as f64 / (1u64 << 20) as f64)
        };
        return Ok(Some((
            mib(cuda_pool::Attr::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            mib(cuda_pool::Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
        )));
    }
    let _ = device;
    Ok(None)
}

/// See [`pool_high_marks`].
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PoolHigh {
    pub used: f64,
    pub reserved: f64,
}

/// The device's default stream-ordered memory pool and its u64 attributes (driver calls).
#[cfg(feature = "cuda")]
mod cuda_pool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    pub use sys::CUmemPool_attribute as Attr;

    pub fn default_pool(device: &candle_core::Device) -> anyhow::Result<Option<sys::CUmemoryPool>> {
        let candle_core::Device::Cuda(dev) = device else {
            return Ok(None);
        };
        let ordinal = dev.cuda_stream().context().ordinal() as i32;
        // SAFETY: plain driver queries; the out-pointers outlive the calls.
        unsafe {
            let mut cu_dev = 0;
            sys::cuDeviceGet(&mut cu_dev, ordinal).result()?;
            let mut pool = std::ptr::null_mut();
            sys::cuDeviceGetDefaultMemPool(&mut pool, cu_dev).result()?;
            Ok(Some(pool))
        }
    }

    pub fn get(pool: sys::CUmemoryPool, attr: Attr) -> anyhow::Result<u64> {
        let mut value: u64 = 0;
        // SAFETY: the u64 attributes of a valid pool; `value` outlives the call.
        unsafe {
            sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut std::ffi::c_void)
                .result()?;
        }
        Ok(value)
    }

    pub fn set(pool: sys::CUmemoryPool, attr: Attr, mut value: u64) -> anyhow::Result<()> {
        // SAFETY: as `get`.
        unsafe {
            sys::cuMemPoolSetAttribute(pool, attr, &mut value as *mut u64 as *mut std::ffi::c_void)
                .result()?;
        }
        Ok(())
    }
}

/// Draw loss (top) and learning rate (bottom) against the step into a PNG.
pub fn plot_curves(path: &Path, loss: &[(usize, f64)], lr: &[(usize, f64)]) -> Result<()> {
    const W: u32 = 800;
    const PANEL: u32 = 300;
    let mut img = image::RgbImage::from_pixel(W, 2 * PANEL, image::Rgb([255, 255, 255]));
    draw_panel(&mut img, 0, loss, [31, 119, 180]);
    draw_panel(&mut img, PANEL, lr, [255, 127, 14]);
    img.save(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// One panel: a frame, light grid lines at quarters, and the series as a polyline.
fn draw_panel(img: &mut image::RgbImage, top: u32, pts: &[(usize, f64)], color: [u8; 3]) {
    let (w, h) = (img.width(), 300u32);
    let (x0, x1, y0, y1) = (
        40.0,
        w as f64 - 20.0,
        top as f64 + 20.0,
        (top + h) as f64 - 30.0,
    );
    let grey = image::Rgb([200, 200, 200]);
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        line(img, (x0, y), (x1, y), grey);
        let x = x0 + (x1 - x0) * i as f64 / 4.0;
        line(img, (x, y0), (x, y1), grey);
    }
    let pts: Vec<(f64, f64)> = pts
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(s, v)| (s as f64, v))
        .collect();
    if pts.len() < 2 {
        return;
    }
    let (smin, smax) = (pts[0].0, pts[pts.len() - 1].0.max(pts[0].0 + 1.0));
    let vmin = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let vmax = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let span = (vmax - vmin).max(1e-12);
    let map = |(s, v): (f64, f64)| {
        (
            x0 + (s - smin) / (smax - smin) * (x1 - x0),
            y1 - (v - vmin) / span * (y1 - y0),
        )
    };
    for p in pts.windows(2) {
        line(img, map(p[0]), map(p[1]), image::Rgb(color));
    }
}

fn line(img: &mut image::RgbImage, a: (f64, f64), b: (f64, f64), c: image::Rgb<u8>) {
    let n = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=n {
        let t = i as f64 / n as f64;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, c);
        }
    }
}
