//! Flash attention (forward and backward) on CUDA: causal, GQA, packed samples via `cu_seqlens`,
//! bf16 in/out with f32 accumulation, head dims 64 and 128 (`cuda/flash_attn.cu`).
//!
//! Same contract as [`crate::model::layers::attention`]'s `attention_forward` /
//! `attention_backward`, which call these first and fall back to their candle-ops code (the CPU
//! reference) when they answer `None`: not on CUDA, not bf16, another head dim, kernels disabled.
//! Memory is O(n): the forward keeps `out` and the natural-log row log-sum-exp `lse [heads, n]`
//! (f32), the backward recomputes the probabilities from them, accumulates dQ in an f32 buffer
//! `[n, heads, d]` with atomics and keeps dK/dV of a key block (64 or 128 keys:
//! [`backward_keys`]) in registers over the GQA group (or over a share of it, when a grid of
//! under one wave is split: [`backward_splits`]). Both kernels start their CTAs heaviest first
//! across all heads and samples.

use super::{CheckOutcome, KernelCheck, Tolerance};
use crate::model::layers::attention::{
    attention_backward_ops, attention_forward_ops, check_cu_seqlens,
};
use candle_core::{DType, Device, Result, Tensor};

/// Head dims the kernels are compiled for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// Whether the kernels take these inputs: all on CUDA (kernels enabled) and [`kernel_shape`].
fn supported(q: &Tensor, k: &Tensor, v: &Tensor, others: &[&Tensor]) -> bool {
    super::on_cuda(q) && kernel_shape(q, k, v, others)
}

/// Shapes and dtypes the kernels are built for: all bf16 on one device, the same token count,
/// `k` and `v` of one shape, whole GQA groups and a compiled head dim.
fn kernel_shape(q: &Tensor, k: &Tensor, v: &Tensor, others: &[&Tensor]) -> bool {
    let (Ok((n, heads, d)), Ok((nk, kv_heads, dk))) = (q.dims3(), k.dims3()) else {
        return false;
    };
    [q, k, v]
        .iter()
        .chain(others)
        .all(|t| t.dtype() == DType::BF16 && t.device().same_device(q.device()))
        && v.dims() == k.dims()
        && nk == n
        && dk == d
        && kv_heads > 0
        && heads % kv_heads == 0
        && HEAD_DIMS.contains(&d)
}

/// Varlen causal GQA attention forward. `q [n, heads, d]`, `k, v [n, kv_heads, d]` bf16 on CUDA.
/// Returns `Some((out [n, heads, d] bf16, lse [heads, n] f32))`, or `None` where the kernel does
/// not apply (see the module doc).
pub fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[u32],
) -> Result<Option<(Tensor, Tensor)>> {
    if !supported(q, k, v, &[]) {
        return Ok(None);
    }
    check_cu_seqlens(cu_seqlens, q.dim(0)?)?;
    #[cfg(feature = "cuda")]
    {
        launch::forward(q, k, v, cu_seqlens).map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(None)
    }
}

/// Backward of [`forward`] for upstream `dout [n, heads, d]`, given its `out` and `lse`.
/// Returns `Some((dq, dk, dv))` in the shapes of `q, k, v` (bf16), or `None` where the kernel
/// does not apply.
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    cu_seqlens: &[u32],
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !supported(q, k, v, &[out, dout])
        || out.dims() != q.dims()
        || dout.dims() != q.dims()
        || lse.dims() != [q.dim(1)?, q.dim(0)?]
    {
        return Ok(None);
    }
    check_cu_seqlens(cu_seqlens, q.dim(0)?)?;
    #[cfg(feature = "cuda")]
    {
        launch::backward(q, k, v, out, lse, dout, cu_seqlens).map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(None)
    }
}

thread_local! {
    /// Keys per backward CTA forced by [`with_backward_keys`] on this thread (0: chosen).
    static BACKWARD_KEYS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Runs `f` with the backward's CTAs holding `keys` (64 or [`WIDE_KEYS`]) keys on this thread
/// instead of [`backward_keys`]'s choice: kernel-check times both kernels this way.
pub fn with_backward_keys<R>(keys: usize, f: impl FnOnce() -> R) -> R {
    struct Restore(usize);
    impl Drop for Restore {
        fn drop(&mut self) {
            BACKWARD_KEYS.with(|k| k.set(self.0));
        }
    }
    let _restore = Restore(BACKWARD_KEYS.with(|k| k.replace(keys)));
    f()
}

/// Key rows per CTA of the backward's wide kernel (8 warps; `flash_bwd_keys128`).
const WIDE_KEYS: usize = 128;
/// Time of a backward step (64 queries over a CTA's keys) in a grid's bulk, where every SM holds
/// as many CTAs as fit, and alone (the heaviest CTAs' tail), for the 64-key and the
/// [`WIDE_KEYS`] kernel, in units of a 64-key step in the bulk. From kernel-check on an H100 at
/// d 128, the backward's µs being fwd+bwd less fwd: batch 4 x 2048 (bulk-bound: 128 narrow steps
/// per slot in 1,004 µs, 131.9 wide ones in 959) gives the wide bulk step; the packed samples
/// [1000, 637, 411] (both grids bound by their heaviest CTA, 32 steps: 227 µs narrow, 244 wide)
/// give the lone steps. A wide step does twice a narrow one's work with twice the warps and
/// half the dQ atomics and query-block loads.
const NARROW_STEP: StepTimes = StepTimes {
    bulk: 1.0,
    lone: 0.91,
};
/// The [`WIDE_KEYS`] kernel's step times (see [`NARROW_STEP`]).
const WIDE_STEP: StepTimes = StepTimes {
    bulk: 0.93,
    lone: 0.97,
};

/// A backward kernel's step time in a grid's bulk and for a CTA alone (see [`NARROW_STEP`]).
struct StepTimes {
    bulk: f64,
    lone: f64,
}

/// `keys`-row blocks over all samples: the backward's CTAs of one KV head that do work.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the launcher's, and the tests'
fn blocks_with_work(cu_seqlens: &[u32], keys: usize) -> usize {
    cu_seqlens
        .windows(2)
        .map(|w| ((w[1] - w[0]) as usize).div_ceil(keys))
        .sum()
}

/// The work of a backward grid of `keys`-key CTAs over `cu_seqlens` with `kv_heads` x `splits`
/// CTAs per key block, each walking `group / splits` query heads: (64-query steps of all CTAs,
/// the heaviest CTA's steps).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the launcher's, and the tests'
fn backward_steps(
    cu_seqlens: &[u32],
    keys: usize,
    kv_heads: usize,
    group: usize,
    splits: usize,
) -> (usize, usize) {
    let (mut steps, mut heaviest) = (0usize, 0usize);
    for len in cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize) {
        let m_blocks = len.div_ceil(BLOCK);
        for r in 0..len.div_ceil(keys) {
            // Key block r sees the query blocks from the one holding its first key on.
            let cta = (m_blocks - r * keys / BLOCK) * (group / splits);
            steps += cta * kv_heads * splits;
            heaviest = heaviest.max(cta);
        }
    }
    (steps, heaviest)
}

/// Keys per backward CTA (64 or [`WIDE_KEYS`]) for `cu_seqlens`, `kv_heads` and GQA `group`,
/// given each kernel's resident CTA slots: the one whose grid should finish first, by the larger
/// of its steps per slot at its bulk step time and its heaviest CTA's steps at its lone step time
/// ([`NARROW_STEP`], [`WIDE_STEP`]). Each takes its own [`backward_splits`]. Full-length samples
/// (batch 1 and 4 x 2048) are bulk-bound and take wide CTAs; short packed samples are bound by
/// their heaviest CTA, which the 64-key kernel runs faster alone.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the launcher's, and the tests'
fn backward_keys(
    cu_seqlens: &[u32],
    kv_heads: usize,
    group: usize,
    slots_narrow: usize,
    slots_wide: usize,
) -> usize {
    let time = |keys: usize, slots: usize, step: StepTimes| {
        let splits = backward_splits(kv_heads * blocks_with_work(cu_seqlens, keys), group, slots);
        let (steps, heaviest) = backward_steps(cu_seqlens, keys, kv_heads, group, splits);
        (steps as f64 / slots.max(1) as f64 * step.bulk).max(heaviest as f64 * step.lone)
    };
    if time(WIDE_KEYS, slots_wide, WIDE_STEP) < time(BLOCK, slots_narrow, NARROW_STEP) {
        WIDE_KEYS
    } else {
        BLOCK
    }
}

/// How many CTAs share the query heads of one GQA group in the backward, for a grid of `kv_ctas`
/// CTAs unsplit and `slots` resident CTA slots on the GPU: 1 (a CTA walks the whole group) unless
/// the grid would not fill the slots once, as at batch 1 x 2048 on an H100 (256 CTAs for 264
/// slots): then the few CTAs of key block 0 would walk `group` x 32 query blocks while the
/// average CTA walks half that. The smallest divisor of the group that fills the slots, or the
/// whole group.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the launcher's, and the tests'
fn backward_splits(kv_ctas: usize, group: usize, slots: usize) -> usize {
    (1..=group)
        .filter(|s| group % s == 0)
        .find(|s| kv_ctas * s >= slots)
        .unwrap_or(group)
}

/// Key rows per tile in the kernels, and query rows per tile in the backward.
const BLOCK: usize = 64;
/// Query rows per CTA of the forward's wide tiles (32 per warp; `flash_fwd_rows128`).
const WIDE_ROWS: usize = 128;
/// Time of a wide forward tile over 64 keys against a 64-row one, from kernel-check on an H100
/// at d 128 (batch 4 x 2048, 16 heads, both grids many waves deep: 283.6 µs over 17,408 wide
/// tile-steps, 375.1 µs over 33,792 narrow ones, per resident slot alike): twice the work for
/// 1.45x the time, as each K/V fragment from shared memory feeds twice the MMAs.
const WIDE_TILE_TIME: f64 = 1.45;

/// Query rows per forward CTA (64 or [`WIDE_ROWS`]) for heads x samples `cu_seqlens` and each
/// kernel's resident CTA slots: the one whose grid should finish first, by the larger of its
/// work per slot and its heaviest CTA (the last query block of the longest sample), counted in
/// 64-key tile-steps. Wide tiles do more per step but halve the CTAs: at batch 1 x 2048 with 16
/// heads their 256 CTAs fill one wave, and the heaviest ones set the time (113.5 µs against
/// 93.6 for 64-row tiles on an H100).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the launcher's, and the tests'
fn forward_rows(cu_seqlens: &[u32], heads: usize, slots_narrow: usize, slots_wide: usize) -> usize {
    let time = |rows: usize, slots: usize, tile_time: f64| {
        let (mut steps, mut heaviest) = (0usize, 0usize);
        for len in cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize) {
            // Query block m sees the key blocks up to its last row.
            for m in 0..len.div_ceil(rows) {
                steps += ((m + 1) * rows).min(len).div_ceil(BLOCK);
            }
            heaviest = heaviest.max(len.div_ceil(BLOCK));
        }
        let per_slot = (steps * heads) as f64 / slots.max(1) as f64;
        per_slot.max(heaviest as f64) * tile_time
    };
    if time(WIDE_ROWS, slots_wide, WIDE_TILE_TIME) < time(BLOCK, slots_narrow, 1.0) {
        WIDE_ROWS
    } else {
        BLOCK
    }
}

#[cfg(feature = "cuda")]
mod launch {
    use super::super::cuda as kc;
    use candle_core::cuda_backend::cudarc::driver::sys::{
        CUdevice_attribute, CUfunction_attribute,
    };
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{CudaDevice, DType, Result, Tensor};
    use half::bf16;

    use super::{backward_keys, forward_rows, BACKWARD_KEYS, BLOCK, WIDE_KEYS, WIDE_ROWS};

    const MODULE: &str = "flash_attn";
    const THREADS: u32 = 128;

    fn err(e: anyhow::Error) -> candle_core::Error {
        candle_core::Error::msg(format!("flash attention: {e:#}"))
    }

    /// A contiguous copy of `t` whose data starts 16-byte aligned (the kernels copy rows with
    /// 16-byte `cp.async`); a tensor that already is stays as it is.
    fn aligned(t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous()?;
        let start = t.layout().start_offset() * t.dtype().size_in_bytes();
        if start % 16 == 0 {
            Ok(t)
        } else {
            t.copy()
        }
    }

    /// Launch geometry shared by forward and backward: a one-dimensional grid of one CTA of
    /// `threads` per `rows`-row block of the longest sample (query rows in the forward, key rows
    /// in the backward), per head (`heads_in_grid`), per sample, ordered by work (the kernels'
    /// `work_item`: the heaviest blocks of every head and sample first).
    fn grid(
        cu_seqlens: &[u32],
        rows: usize,
        heads_in_grid: usize,
        threads: u32,
        shared_mem_bytes: u32,
    ) -> LaunchConfig {
        let longest = cu_seqlens
            .windows(2)
            .map(|w| (w[1] - w[0]) as usize)
            .max()
            .unwrap_or(1);
        let samples = cu_seqlens.len() - 1;
        LaunchConfig {
            grid_dim: (
                (longest.div_ceil(rows) * heads_in_grid * samples) as u32,
                1,
                1,
            ),
            block_dim: (threads, 1, 1),
            shared_mem_bytes,
        }
    }

    /// Resident CTA slots of `func` (CTAs of `threads`) on the device: CTAs per SM times SMs.
    fn resident_slots(
        dev: &CudaDevice,
        func: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
        threads: u32,
        shared_mem_bytes: usize,
    ) -> Result<usize> {
        let per_sm = func
            .occupancy_max_active_blocks_per_multiprocessor(threads, shared_mem_bytes, None)
            .map_err(|e| err(e.into()))?;
        let sms = kc::stream(dev)
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| err(e.into()))?;
        Ok(per_sm.max(1) as usize * sms.max(1) as usize)
    }

    fn i32_arg(x: usize, what: &str) -> Result<i32> {
        i32::try_from(x).map_err(|_| {
            candle_core::Error::msg(format!("flash attention: {what} {x} exceeds i32"))
        })
    }

    pub(super) fn forward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cu_seqlens: &[u32],
    ) -> Result<(Tensor, Tensor)> {
        let (n, heads, d) = q.dims3()?;
        let kv_heads = k.dim(1)?;
        let dev: CudaDevice = kc::device_of(q).map_err(err)?;
        let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
        let (qi, ki, vi) = (
            kc::CudaInput::new(&q).map_err(err)?,
            kc::CudaInput::new(&k).map_err(err)?,
            kc::CudaInput::new(&v).map_err(err)?,
        );
        let (qv, kv, vv) = (
            qi.view::<bf16>().map_err(err)?,
            ki.view::<bf16>().map_err(err)?,
            vi.view::<bf16>().map_err(err)?,
        );
        let cu = dev.clone_htod(cu_seqlens)?;
        let mut out = kc::alloc::<bf16>(&dev, n * heads * d).map_err(err)?; // [n, heads, d]
        let mut lse = kc::alloc::<f32>(&dev, heads * n).map_err(err)?; // [heads, n]
                                                                       // Wide tiles: Q [128][d+8], K and V [64][d+8] bf16 (69,632 bytes at d 128, past the
                                                                       // 48 KB default: dynamic); 64-row ones hold K and V statically.
        let wide = kc::func(&dev, MODULE, &format!("flash_fwd_rows128_d{d}")).map_err(err)?;
        let narrow = kc::func(&dev, MODULE, &format!("flash_fwd_rows64_d{d}")).map_err(err)?;
        let wide_smem = (WIDE_ROWS + 2 * BLOCK) * (d + 8) * 2;
        wide.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            wide_smem as i32,
        )
        .map_err(|e| err(e.into()))?;
        let slots = (
            resident_slots(&dev, &narrow, THREADS, 0)?,
            resident_slots(&dev, &wide, THREADS, wide_smem)?,
        );
        let rows = forward_rows(cu_seqlens, heads, slots.0, slots.1);
        let (func, smem) = if rows == WIDE_ROWS {
            (wide, wide_smem)
        } else {
            (narrow, 0)
        };
        let stream = kc::stream(&dev);
        let (samples_i, n_i, heads_i, kv_i) = (
            i32_arg(cu_seqlens.len() - 1, "samples")?,
            i32_arg(n, "tokens")?,
            i32_arg(heads, "heads")?,
            i32_arg(kv_heads, "kv heads")?,
        );
        let scale = 1.0f32 / (d as f32).sqrt();
        let mut b = stream.launch_builder(&func);
        b.arg(&qv)
            .arg(&kv)
            .arg(&vv)
            .arg(&mut out)
            .arg(&mut lse)
            .arg(&cu);
        b.arg(&samples_i)
            .arg(&n_i)
            .arg(&heads_i)
            .arg(&kv_i)
            .arg(&scale);
        // SAFETY: argument list matches flash_fwd_rows{64,128}_d{64,128}; the kernel writes
        // every element of `out` and `lse` (each token belongs to one sample and each row block
        // to one CTA).
        unsafe { b.launch(grid(cu_seqlens, rows, heads, THREADS, smem as u32)) }
            .map_err(|e| err(e.into()))?;
        Ok((
            kc::wrap(out, &dev, (n, heads, d)),
            kc::wrap(lse, &dev, (heads, n)),
        ))
    }

    pub(super) fn backward(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
        cu_seqlens: &[u32],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, heads, d) = q.dims3()?;
        let kv_heads = k.dim(1)?;
        let dev: CudaDevice = kc::device_of(q).map_err(err)?;
        let (q, k, v, out, dout) = (
            aligned(q)?,
            aligned(k)?,
            aligned(v)?,
            aligned(out)?,
            aligned(dout)?,
        );
        let lse = lse.to_dtype(DType::F32)?.contiguous()?;
        let inputs = [&q, &k, &v, &out, &dout].map(|t| kc::CudaInput::new(t).map_err(err));
        let [qi, ki, vi, oi, doi] = inputs;
        let (qi, ki, vi, oi, doi) = (qi?, ki?, vi?, oi?, doi?);
        let lsei = kc::CudaInput::new(&lse).map_err(err)?;
        let qv = qi.view::<bf16>().map_err(err)?;
        let kv = ki.view::<bf16>().map_err(err)?;
        let vv = vi.view::<bf16>().map_err(err)?;
        let ov = oi.view::<bf16>().map_err(err)?;
        let dov = doi.view::<bf16>().map_err(err)?;
        let lsev = lsei.view::<f32>().map_err(err)?;
        let cu = dev.clone_htod(cu_seqlens)?;
        let (samples_i, n_i, heads_i, kv_i) = (
            i32_arg(cu_seqlens.len() - 1, "samples")?,
            i32_arg(n, "tokens")?,
            i32_arg(heads, "heads")?,
            i32_arg(kv_heads, "kv heads")?,
        );
        let scale = 1.0f32 / (d as f32).sqrt();
        let stream = kc::stream(&dev);

        // delta = rowsum(dO ∘ O): [heads, n] f32, one warp per (token, head).
        let mut delta = kc::alloc::<f32>(&dev, heads * n).map_err(err)?;
        let func = kc::func(&dev, MODULE, &format!("flash_bwd_delta_d{d}")).map_err(err)?;
        let warps_per_block = THREADS as usize / 32;
        let cfg = LaunchConfig {
            grid_dim: ((n * heads).div_ceil(warps_per_block) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&func);
        b.arg(&ov).arg(&dov).arg(&mut delta).arg(&n_i).arg(&heads_i);
        // SAFETY: matches flash_bwd_delta_d{d}; rows past n * heads return early.
        unsafe { b.launch(cfg) }.map_err(|e| err(e.into()))?;

        // [n, heads, d]
        let mut dq_accum = kc::alloc_zeros::<f32>(&dev, n * heads * d).map_err(err)?;
        // The two kernels: 64 keys a CTA of 4 warps, 128 of 8. Shared: K, V [keys][d+8] bf16,
        // Q, dO [64][d+8] bf16, dSᵀ [keys][72] bf16, lse and delta [64] f32.
        let kernel = |keys: usize| -> Result<_> {
            let name = if keys == WIDE_KEYS {
                format!("flash_bwd_keys128_d{d}")
            } else {
                format!("flash_bwd_d{d}")
            };
            let func = kc::func(&dev, MODULE, &name).map_err(err)?;
            let threads = (keys / 16 * 32) as u32;
            let smem = 2 * (keys + BLOCK) * (d + 8) * 2 + keys * (BLOCK + 8) * 2 + 2 * BLOCK * 4;
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| err(e.into()))?;
            let slots = resident_slots(&dev, &func, threads, smem)?;
            Ok((func, threads, smem, slots))
        };
        let (narrow, wide) = (kernel(BLOCK)?, kernel(WIDE_KEYS)?);
        let group = heads / kv_heads;
        let keys = match BACKWARD_KEYS.with(|k| k.get()) {
            0 => backward_keys(cu_seqlens, kv_heads, group, narrow.3, wide.3),
            forced => forced,
        };
        let (func, threads, smem, slots) = if keys == WIDE_KEYS { wide } else { narrow };
        let kv_ctas = kv_heads * super::blocks_with_work(cu_seqlens, keys);
        let splits = super::backward_splits(kv_ctas, group, slots);
        // dK and dV: [splits, n, kv_heads, d], one partial per share of each GQA group.
        let kv_len = n * kv_heads * d;
        let mut dk = kc::alloc::<bf16>(&dev, splits * kv_len).map_err(err)?;
        let mut dv = kc::alloc::<bf16>(&dev, splits * kv_len).map_err(err)?;
        let splits_i = i32_arg(splits, "splits")?;
        let mut b = stream.launch_builder(&func);
        b.arg(&qv)
            .arg(&kv)
            .arg(&vv)
            .arg(&dov)
            .arg(&lsev)
            .arg(&delta);
        b.arg(&mut dq_accum).arg(&mut dk).arg(&mut dv).arg(&cu);
        b.arg(&samples_i)
            .arg(&splits_i)
            .arg(&n_i)
            .arg(&heads_i)
            .arg(&kv_i)
            .arg(&scale);
        // SAFETY: matches flash_bwd_d{d}; every key row of a split's slice is owned by one CTA,
        // which writes its dK and dV; dq_accum is zeroed and only accumulated into.
        unsafe {
            b.launch(grid(
                cu_seqlens,
                keys,
                kv_heads * splits,
                threads,
                smem as u32,
            ))
        }
        .map_err(|e| err(e.into()))?;
        if splits > 1 {
            let (dk_parts, dv_parts) = (dk, dv);
            dk = kc::alloc::<bf16>(&dev, kv_len).map_err(err)?;
            dv = kc::alloc::<bf16>(&dev, kv_len).map_err(err)?;
            let func = kc::func(&dev, MODULE, "flash_sum_splits").map_err(err)?;
            let mut cfg = kc::grid_1d(kv_len / 8, THREADS);
            cfg.grid_dim.1 = 2; // dK and dV
            let count = kv_len as i64;
            let mut b = stream.launch_builder(&func);
            b.arg(&dk_parts).arg(&dv_parts).arg(&mut dk).arg(&mut dv);
            b.arg(&splits_i).arg(&count);
            // SAFETY: matches flash_sum_splits; kv_len is a multiple of 8 (d is 64 or 128), the
            // parts hold splits x kv_len elements and the outputs kv_len.
            unsafe { b.launch(cfg) }.map_err(|e| err(e.into()))?;
        }

        let dq = kc::wrap(dq_accum, &dev, (n, heads, d)).to_dtype(DType::BF16)?;
        Ok((
            dq,
            kc::wrap(dk, &dev, (n, kv_heads, d)),
            kc::wrap(dv, &dev, (n, kv_heads, d)),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Self checks (ftrun kernel-check)

/// Inputs of one check: bf16 `q, k, v, dout` on `device` from a fixed seed, packed samples.
struct Case {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    cu_seqlens: Vec<u32>,
}

impl Case {
    fn new(
        device: &Device,
        cu_seqlens: &[u32],
        heads: usize,
        kv_heads: usize,
        d: usize,
    ) -> anyhow::Result<Case> {
        let n = *cu_seqlens.last().unwrap_or(&0) as usize;
        // q and k of scale 2 give peaked softmax rows (score std ≈ 1.3 after the 1/√d scale).
        let rt = |shape: &[usize], scale: f32, seed: u64| {
            super::random_tensor(shape, scale, seed, DType::BF16, device)
        };
        Ok(Case {
            q: rt(&[n, heads, d], 2.0, 11)?,
            k: rt(&[n, kv_heads, d], 2.0, 12)?,
            v: rt(&[n, kv_heads, d], 1.0, 13)?,
            dout: rt(&[n, heads, d], 1.0, 14)?,
            cu_seqlens: cu_seqlens.to_vec(),
        })
    }

    fn to_cpu_f32(&self) -> anyhow::Result<Case> {
        let f = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
        Ok(Case {
            q: f(&self.q)?,
            k: f(&self.k)?,
            v: f(&self.v)?,
            dout: f(&self.dout)?,
            cu_seqlens: self.cu_seqlens.clone(),
        })
    }

    fn what(&self) -> String {
        let lens: Vec<u32> = self.cu_seqlens.windows(2).map(|w| w[1] - w[0]).collect();
        format!(
            "samples {lens:?}, heads {}, kv {}, d {}, bf16",
            self.q.dim(1).unwrap_or(0),
            self.k.dim(1).unwrap_or(0),
            self.q.dim(2).unwrap_or(0)
        )
    }
}

/// Compares each output with its reference after dividing both by the reference's largest
/// magnitude, so that one tolerance fits outputs of very different scales (dq vs lse).
fn compare_scaled(
    got: &[Tensor],
    want: &[Tensor],
    tol: Tolerance,
) -> anyhow::Result<(f64, f64, bool)> {
    let (mut max_abs, mut max_rel, mut pass) = (0.0f64, 0.0f64, true);
    for (g, w) in got.iter().zip(want) {
        let w = w.to_dtype(DType::F32)?;
        let peak = w.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-30) as f64;
        let g = (g.to_device(&Device::Cpu)?.to_dtype(DType::F32)? / peak)?;
        let c = super::compare(&g, &(w / peak)?, tol)?;
        let (a, r, p) = (c.max_abs, c.max_rel, c.pass);
        max_abs = if a.is_nan() { a } else { max_abs.max(a) };
        max_rel = max_rel.max(r);
        pass &= p;
    }
    Ok((max_abs, max_rel, pass))
}

/// Errors are relative to each output's largest reference magnitude: bf16 inputs and outputs,
/// bf16 P and dS in the tensor-core matmuls.
const TOL: Tolerance = Tolerance {
    atol: 1e-2,
    rtol: 2e-2,
};

/// The packing a check runs on the GPU (InternLM2-1.8B heads: 16, 8 KV heads).
#[derive(Clone, Copy)]
enum Rows {
    /// 2048 tokens in 3 samples: varlen, a partial wave.
    Packed,
    /// One sample of 2048 (batch 1 of the benchmark: the backward's grid is about one wave).
    One,
    /// 4 samples of 2048 (batch 4: a grid of several waves).
    Four,
    /// One sample of 2048 with Llama-2-7B's heads: 32, no GQA.
    OneMha,
}

/// `keys`: the backward's CTA width to force (see [`with_backward_keys`]), 0 = its choice.
fn check(
    device: &Device,
    d: usize,
    with_backward: bool,
    rows: Rows,
    keys: usize,
) -> anyhow::Result<CheckOutcome> {
    // A small instance on the CPU, where the "fused" path is the candle-ops code itself.
    let (cu, heads, kv_heads): (&[u32], usize, usize) = match (device.is_cuda(), rows) {
        (true, Rows::Packed) => (&[0, 1000, 1637, 2048], 16, 8),
        (true, Rows::One) => (&[0, 2048], 16, 8),
        (true, Rows::Four) => (&[0, 2048, 4096, 6144, 8192], 16, 8),
        (true, Rows::OneMha) => (&[0, 2048], 32, 32),
        (false, _) => (&[0, 37, 100, 130], 4, 2),
    };
    let case = Case::new(device, cu, heads, kv_heads, d)?;
    let cpu = case.to_cpu_f32()?;
    let cu = &case.cu_seqlens;
    let fused_once = || -> anyhow::Result<Vec<Tensor>> {
        let (q, k, v) = (&case.q, &case.k, &case.v);
        let (out, lse) = crate::model::layers::attention::attention_forward(q, k, v, cu)?;
        if !with_backward {
            return Ok(vec![out, lse]);
        }
        let (dq, dk, dv) = crate::model::layers::attention::attention_backward(
            q, k, v, &out, &lse, &case.dout, cu,
        )?;
        Ok(vec![out, lse, dq, dk, dv])
    };
    let fused = || -> anyhow::Result<Vec<Tensor>> { with_backward_keys(keys, fused_once) };
    let ops = |c: &Case| -> anyhow::Result<Vec<Tensor>> {
        let (out, lse) = attention_forward_ops(&c.q, &c.k, &c.v, &c.cu_seqlens)?;
        if !with_backward {
            return Ok(vec![out, lse]);
        }
        let (dq, dk, dv) =
            attention_backward_ops(&c.q, &c.k, &c.v, &out, &lse, &c.dout, &c.cu_seqlens)?;
        Ok(vec![out, lse, dq, dk, dv])
    };
    let got = fused()?;
    let want = ops(&cpu)?;
    let (max_abs, max_rel, pass) = compare_scaled(&got, &want, TOL)?;
    let iters = if device.is_cuda() { 20 } else { 1 };
    let kernel_us = super::time_us(device, iters, || fused().map(drop))?;
    let candle_us = super::time_us(device, iters, || ops(&case).map(drop))?;
    Ok(CheckOutcome {
        max_abs,
        max_rel,
        tol: TOL,
        pass,
        kernel_us,
        candle_us,
        what: format!(
            "{}{}{} (errors / max |ref|)",
            case.what(),
            if with_backward { ", fwd+bwd" } else { ", fwd" },
            match keys {
                0 => String::new(),
                k => format!(", {k}-key backward"),
            }
        ),
        worst: None,
    })
}

/// Forward alone and forward + backward: head dims 128 and 64 on the packed rows, and the
/// benchmark's rows at d 128: batch 1 (about one wave: set by how evenly the CTAs share the work),
/// batch 4 (throughput over several waves) and Llama-2-7B's 32 heads at batch 1. Each backward
/// also runs with each CTA width forced, so that both kernels are checked and timed.
pub fn self_checks() -> Vec<KernelCheck> {
    let cases: [(&'static str, usize, bool, Rows); 9] = [
        ("flash_attn_fwd_d128", 128, false, Rows::Packed),
        ("flash_attn_fwd_bwd_d128", 128, true, Rows::Packed),
        ("flash_attn_fwd_d64", 64, false, Rows::Packed),
        ("flash_attn_fwd_bwd_d64", 64, true, Rows::Packed),
        ("flash_attn_fwd_d128_batch1", 128, false, Rows::One),
        ("flash_attn_fwd_bwd_d128_batch1", 128, true, Rows::One),
        ("flash_attn_fwd_d128_batch4", 128, false, Rows::Four),
        ("flash_attn_fwd_bwd_d128_batch4", 128, true, Rows::Four),
        (
            "flash_attn_fwd_bwd_d128_batch1_h32",
            128,
            true,
            Rows::OneMha,
        ),
    ];
    let mut checks = vec![];
    for (name, d, with_backward, rows) in cases {
        let widths: &[usize] = if with_backward {
            &[0, BLOCK, WIDE_KEYS]
        } else {
            &[0]
        };
        for &keys in widths {
            let name = match keys {
                0 => name.to_string(),
                k => format!("{name}_keys{k}"),
            };
            checks.push(KernelCheck::new(name, move |dev| {
                check(dev, d, with_backward, rows, keys)
            }));
        }
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16(shape: &[usize], seed: u64) -> Tensor {
        super::super::random_tensor(shape, 1.0, seed, DType::BF16, &Device::Cpu).unwrap()
    }

    #[test]
    fn the_forward_takes_wide_tiles_only_where_their_grid_finishes_first() {
        let slots = 264; // 2 CTAs on each of an H100's 132 SMs, both kernels
                         // InternLM2-1.8B (16 heads) at batch 1 x 2048: 256 wide CTAs in one wave, the heaviest
                         // setting the time: 64-row tiles.
        assert_eq!(forward_rows(&[0, 2048], 16, slots, slots), BLOCK);
        // Batch 4, and Llama-2-7B's 32 heads at batch 1: wide tiles.
        assert_eq!(
            forward_rows(&[0, 2048, 4096, 6144, 8192], 16, slots, slots),
            WIDE_ROWS
        );
        assert_eq!(forward_rows(&[0, 2048], 32, slots, slots), WIDE_ROWS);
        // kernel-check's packed samples [1000, 637, 411]: 64-row tiles (51.0 µs against 65.0).
        assert_eq!(
            forward_rows(&[0, 1000, 1637, 2048], 16, slots, slots),
            BLOCK
        );
        // Fewer resident slots for the wide kernel count against it.
        assert_eq!(forward_rows(&[0, 2048], 32, slots, slots / 2), BLOCK);
    }

    #[test]
    fn the_backward_takes_wide_ctas_only_where_its_bulk_sets_the_time() {
        // An H100 at d 128 or 64: 2 narrow CTAs (4 warps, <= 255 registers) per SM, 1 wide.
        let (narrow, wide) = (264, 132);
        // kernel-check's packed samples [1000, 637, 411]: both grids wait on their heaviest
        // CTA, which the 64-key kernel runs faster (227 µs against 244).
        assert_eq!(
            backward_keys(&[0, 1000, 1637, 2048], 8, 2, narrow, wide),
            BLOCK
        );
        // Full-length samples are bulk-bound: batch 1 and 4 x 2048 with InternLM2's 8 KV heads
        // of 2 (287 against 274 µs, 1,004 against 959), Llama-2-7B's 32 heads.
        assert_eq!(backward_keys(&[0, 2048], 8, 2, narrow, wide), WIDE_KEYS);
        let batch4 = [0, 2048, 4096, 6144, 8192];
        assert_eq!(backward_keys(&batch4, 8, 2, narrow, wide), WIDE_KEYS);
        assert_eq!(backward_keys(&[0, 2048], 32, 1, narrow, wide), WIDE_KEYS);
        // Fewer resident slots for the wide kernel count against it.
        assert_eq!(backward_keys(&batch4, 8, 2, narrow, wide / 2), BLOCK);
    }

    #[test]
    fn backward_steps_count_the_query_blocks_each_key_block_sees() {
        // One sample of 2048, 8 KV heads x 2: 64-key block r sees query blocks r..32, a
        // 128-key block r the blocks 2r..32 (steps over twice the keys).
        assert_eq!(backward_steps(&[0, 2048], BLOCK, 8, 2, 1), (16 * 528, 64));
        assert_eq!(
            backward_steps(&[0, 2048], WIDE_KEYS, 8, 2, 1),
            (16 * 272, 64)
        );
        // Split in two, each CTA walks one head of its group.
        assert_eq!(
            backward_steps(&[0, 2048], WIDE_KEYS, 8, 2, 2),
            (16 * 272, 32)
        );
        // A sample shorter than a wide block: one CTA that sees both query blocks.
        assert_eq!(backward_steps(&[0, 100], WIDE_KEYS, 1, 1, 1), (2, 2));
        // Packed samples add up.
        let (a, _) = backward_steps(&[0, 1000], BLOCK, 2, 1, 1);
        let (b, _) = backward_steps(&[0, 637], BLOCK, 2, 1, 1);
        assert_eq!(backward_steps(&[0, 1000, 1637], BLOCK, 2, 1, 1).0, a + b);
    }

    #[test]
    fn the_backward_splits_gqa_groups_only_for_a_grid_under_one_wave() {
        // Batch 1 x 2048 on an H100 (32 key blocks x 8 KV heads, 2 x 132 slots): split in two.
        assert_eq!(backward_splits(256, 2, 264), 2);
        // Batch 2 and up fill the slots: whole groups.
        assert_eq!(backward_splits(512, 2, 264), 1);
        // The smallest divisor of the group that fills the slots...
        assert_eq!(backward_splits(100, 8, 264), 4);
        assert_eq!(backward_splits(100, 6, 264), 3);
        // ...or the whole group when none does; no GQA, no split.
        assert_eq!(backward_splits(10, 4, 264), 4);
        assert_eq!(backward_splits(10, 1, 264), 1);
    }

    #[test]
    fn cpu_tensors_fall_back_to_the_reference() {
        let (q, k, v) = (
            bf16(&[6, 4, 64], 1),
            bf16(&[6, 2, 64], 2),
            bf16(&[6, 2, 64], 3),
        );
        assert!(forward(&q, &k, &v, &[0, 2, 6]).unwrap().is_none());
        let (out, lse) = attention_forward_ops(&q, &k, &v, &[0, 2, 6]).unwrap();
        assert!(backward(&q, &k, &v, &out, &lse, &q, &[0, 2, 6])
            .unwrap()
            .is_none());
    }

    #[test]
    fn kernel_shapes_and_dtypes() {
        let (q, k, v) = (
            bf16(&[6, 4, 64], 1),
            bf16(&[6, 2, 64], 2),
            bf16(&[6, 2, 64], 3),
        );
        let none: [&Tensor; 0] = [];
        assert!(kernel_shape(&q, &k, &v, &none));
        assert!(kernel_shape(
            &bf16(&[6, 4, 128], 1),
            &bf16(&[6, 4, 128], 2),
            &bf16(&[6, 4, 128], 3),
            &none
        ));
        // Head dim 96 is not compiled; 3 query heads over 2 KV heads is no whole group; f32 is
        // not bf16 (also as dout); k and v disagree; q has another token count.
        let (q96, k96) = (bf16(&[6, 4, 96], 1), bf16(&[6, 2, 96], 2));
        assert!(!kernel_shape(&q96, &k96, &k96, &none));
        assert!(!kernel_shape(&bf16(&[6, 3, 64], 1), &k, &v, &none));
        let qf = q.to_dtype(DType::F32).unwrap();
        assert!(!kernel_shape(&qf, &k, &v, &none));
        assert!(!kernel_shape(&q, &k, &v, &[&qf]));
        assert!(!kernel_shape(&q, &k, &bf16(&[6, 1, 64], 3), &none));
        assert!(!kernel_shape(&bf16(&[5, 4, 64], 1), &k, &v, &none));
        // Never on the CPU, even for a shape the kernels take.
        assert!(!supported(&q, &k, &v, &none));
    }

    #[test]
    fn self_checks_run_on_the_cpu_reference() {
        for c in self_checks() {
            let out = (c.run)(&Device::Cpu).unwrap();
            // bf16 candle-ops against the f32 reference: the tolerance covers bf16 rounding.
            assert!(out.pass, "{}: {:?}", c.name, out);
            assert!(
                out.max_abs > 0.0,
                "{}: bf16 and f32 paths cannot agree exactly",
                c.name
            );
        }
    }
}
