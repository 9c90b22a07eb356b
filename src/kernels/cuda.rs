//! Loading and launching our own kernels on candle's CUDA devices.
//!
//! The fatbins `build.rs` made are embedded in the binary; a module is loaded the first time one
//! of its functions is asked for on a device and cached for the process. Inputs are read through
//! contiguous `CudaView`s of candle tensors ([`CudaInput`]); outputs are fresh `CudaSlice`s wrapped
//! back into tensors ([`wrap`]). Kernels launch on the device's candle stream.

use anyhow::{bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CudaDevice, CudaStorage, Shape, Storage, StorageRef, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// `(module name = .cu file stem, fatbin bytes)` for every `src/kernels/cuda/*.cu`.
const FATBINS: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/kernel_fatbins.rs"));

type ModuleCache = Mutex<HashMap<(DeviceId, &'static str), Arc<CudaModule>>>;
type FunctionCache = Mutex<HashMap<(DeviceId, String), CudaFunction>>;

fn modules() -> &'static ModuleCache {
    static CACHE: OnceLock<ModuleCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Functions already looked up, by device and `module/name`: a launch then costs no
/// `cuModuleGetFunction` (thousands of launches per training step).
fn functions() -> &'static FunctionCache {
    static CACHE: OnceLock<FunctionCache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The kernel `name` of module `module` (a `.cu` file stem), loaded on `dev` once.
pub fn func(dev: &CudaDevice, module: &str, name: &str) -> Result<CudaFunction> {
    let key = (dev.id(), format!("{module}/{name}"));
    let poisoned = || anyhow::anyhow!("kernel function cache poisoned");
    if let Some(f) = functions().lock().map_err(|_| poisoned())?.get(&key) {
        return Ok(f.clone());
    }
    let f = load_func(dev, module, name)?;
    functions()
        .lock()
        .map_err(|_| poisoned())?
        .insert(key, f.clone());
    Ok(f)
}

fn load_func(dev: &CudaDevice, module: &str, name: &str) -> Result<CudaFunction> {
    let (key, bytes) = FATBINS
        .iter()
        .find(|(m, _)| *m == module)
        .with_context(|| {
            format!("no kernel module `{module}` was built (src/kernels/cuda/{module}.cu)")
        })?;
    let mut cache = modules()
        .lock()
        .map_err(|_| anyhow::anyhow!("kernel module cache poisoned"))?;
    let module_handle = match cache.get(&(dev.id(), *key)) {
        Some(m) => m.clone(),
        None => {
            let ctx = dev.cuda_stream().context().clone();
            let ptx = candle_core::cuda_backend::cudarc::nvrtc::Ptx::from_binary(bytes.to_vec());
            let m = ctx
                .load_module(ptx)
                .with_context(|| format!("loading kernel module `{module}` on the GPU"))?;
            cache.insert((dev.id(), *key), m.clone());
            m
        }
    };
    module_handle
        .load_function(name)
        .with_context(|| format!("kernel `{name}` in module `{module}`"))
}

/// The CUDA device of a tensor (errors for a CPU tensor).
pub fn device_of(t: &Tensor) -> Result<CudaDevice> {
    Ok(t.device().as_cuda_device()?.clone())
}

/// The stream candle launches its own ops on for `dev`: ours go on it too.
pub fn stream(dev: &CudaDevice) -> Arc<CudaStream> {
    dev.cuda_stream()
}

/// Read access to a contiguous CUDA tensor's data; holds the storage's read lock while alive.
pub struct CudaInput<'a> {
    storage: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> CudaInput<'a> {
    /// `t` must be contiguous (call `.contiguous()` first where it may be a strided view).
    pub fn new(t: &'a Tensor) -> Result<CudaInput<'a>> {
        let (storage, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("kernel input of shape {:?} is not contiguous", t.dims());
        };
        if !matches!(&*storage, Storage::Cuda(_)) {
            bail!("kernel input is not on a CUDA device");
        }
        Ok(CudaInput {
            storage,
            start,
            end,
        })
    }

    /// The tensor's elements as `T` (which must be the tensor's dtype).
    pub fn view<T: CudaDType + DeviceRepr>(&self) -> Result<CudaView<'_, T>> {
        match &*self.storage {
            Storage::Cuda(s) => Ok(s.as_cuda_slice::<T>()?.slice(self.start..self.end)),
            _ => bail!("kernel input is not on a CUDA device"),
        }
    }
}

/// Whether the device address of `v` is a multiple of 16 bytes, as the vectorized kernels' 16-byte
/// loads and stores need. A tensor at a storage offset (a narrow, a slice of a flat buffer) may
/// not be; fresh allocations are (the driver aligns them to 256 bytes).
pub fn aligned16<T, V: DevicePtr<T>>(v: &V, stream: &CudaStream) -> bool {
    let (ptr, _sync) = v.device_ptr(stream);
    ptr % 16 == 0
}

/// A kernel's 16-byte-vectorized variant, `name` itself, or its `name_scalar` fallback.
pub fn variant_name(name: &str, vectorized: bool) -> String {
    if vectorized {
        name.to_string()
    } else {
        format!("{name}_scalar")
    }
}

/// An elementwise kernel's variant and grid for `n` elements: `name` itself (8 elements per
/// thread, every buffer 16-byte aligned; the grid is never below one 256-thread block, enough for
/// a tail of at most 7) or its one-element-per-thread `name_scalar`.
pub fn elementwise_launch(name: &str, vectorized: bool, n: usize) -> (String, LaunchConfig) {
    let per_thread = if vectorized { 8 } else { 1 };
    (
        variant_name(name, vectorized),
        grid_1d(n.div_ceil(per_thread), 256),
    )
}

/// A device allocation of `n` elements (uninitialized: the kernel must write every element).
pub fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the callers' kernels write all `n` elements before the tensor is read.
    Ok(unsafe { dev.alloc::<T>(n.max(1)) }?)
}

/// A zero-filled device allocation of `n` elements (for kernels that accumulate).
pub fn alloc_zeros<T: DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits>(
    dev: &CudaDevice,
    n: usize,
) -> Result<CudaSlice<T>> {
    Ok(dev.alloc_zeros::<T>(n.max(1))?)
}

/// Wraps a kernel's output slice into a tensor of `shape` on `dev`.
pub fn wrap<T: CudaDType>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(slice, dev.clone());
    Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// A 1-D launch covering `n` work items with `threads` per block (grid capped; kernels loop).
pub fn grid_1d(n: usize, threads: u32) -> LaunchConfig {
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row (`rows` blocks, grid capped at 2^31 − 1 by CUDA; kernels loop over rows).
pub fn grid_rows(rows: usize, threads: u32, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes,
    }
}

/// Threads per row-block for a row of `cols` elements: a multiple of 32 in [64, 1024].
pub fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(8).next_power_of_two()).clamp(64, 1024) as u32
}
