// Gradient accumulation into the flat gradient buffer: acc[i] += g[i], g in bf16 or f32, acc in
// f32 or (one-write gradients) bf16. The add is in f32, then one rounding to acc's type, as
// `accumulate_into`'s candle path on the CPU.
// Same-shape add y = a + b of two contiguous tensors of T: f32 add, then one round to T (round to
// nearest even), as candle's CPU `a + b` (half's bf16 add goes through f32 the same way). y may
// be a itself (in-place add): each thread reads its elements before it writes them, so a and y
// carry no __restrict__.
// Two versions of each kernel with the same per-element arithmetic (so the same bits):
// - `accumulate_<T>`, `add_<T>`: 8 elements per thread with 16-byte loads/stores; every pointer
//   must be 16-byte aligned. The n / 8 groups are grid-strided; the last n % 8 elements go one
//   each to the grid's first threads. Launch with at least ceil(n / 8) threads (and never fewer
//   than 8).
// - `accumulate_<T>_scalar`, `add_<T>_scalar`: one element per thread, any alignment.
#include "common.cuh"

template <typename T, typename A> __device__ __forceinline__ A acc1(A acc, T g) {
  return ftrun::from_f32<A>(__fadd_rn(ftrun::to_f32(acc), ftrun::to_f32(g)));
}

template <typename T, typename A>
__device__ __forceinline__ void accumulate_scalar(const T* __restrict__ g, uint64_t n,
                                                  A* __restrict__ acc) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    acc[i] = acc1(acc[i], g[i]);
  }
}

template <typename T, typename A>
__device__ __forceinline__ void accumulate_vec(const T* __restrict__ g, uint64_t n,
                                               A* __restrict__ acc) {
  const uint64_t groups = n / 8, tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  for (uint64_t i = tid; i < groups; i += (uint64_t)gridDim.x * blockDim.x) {
    float gv[8], av[8];
    ftrun::load8(g + 8 * i, gv);
    ftrun::load8(acc + 8 * i, av);
#pragma unroll
    for (int e = 0; e < 8; ++e) av[e] = __fadd_rn(av[e], gv[e]);
    ftrun::store8(acc + 8 * i, av);
  }
  const uint64_t t = groups * 8 + tid;  // tail element of this thread, if any
  if (t < n) acc[t] = acc1(acc[t], g[t]);
}

template <typename T> __device__ __forceinline__ T add1(T a, T b) {
  return ftrun::from_f32<T>(__fadd_rn(ftrun::to_f32(a), ftrun::to_f32(b)));
}

template <typename T>
__device__ __forceinline__ void add_scalar(const T* a, const T* __restrict__ b, uint64_t n, T* y) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    y[i] = add1(a[i], b[i]);
  }
}

template <typename T>
__device__ __forceinline__ void add_vec(const T* a, const T* __restrict__ b, uint64_t n, T* y) {
  const uint64_t groups = n / 8, tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  for (uint64_t i = tid; i < groups; i += (uint64_t)gridDim.x * blockDim.x) {
    float av[8], bv[8];
    ftrun::load8(a + 8 * i, av);
    ftrun::load8(b + 8 * i, bv);
#pragma unroll
    for (int e = 0; e < 8; ++e) av[e] = __fadd_rn(av[e], bv[e]);
    ftrun::store8(y + 8 * i, av);  // one round to T per element
  }
  const uint64_t t = groups * 8 + tid;
  if (t < n) y[t] = add1(a[t], b[t]);
}

#define GRAD_KERNELS(SUFFIX, T)                                                                  \
  extern "C" __global__ void accumulate_##SUFFIX(const T* g, uint64_t n, float* acc) {           \
    accumulate_vec(g, n, acc);                                                                   \
  }                                                                                              \
  extern "C" __global__ void accumulate_##SUFFIX##_scalar(const T* g, uint64_t n, float* acc) {  \
    accumulate_scalar(g, n, acc);                                                                \
  }                                                                                              \
  extern "C" __global__ void add_##SUFFIX(const T* a, const T* b, uint64_t n, T* y) {            \
    add_vec(a, b, n, y);                                                                         \
  }                                                                                              \
  extern "C" __global__ void add_##SUFFIX##_scalar(const T* a, const T* b, uint64_t n, T* y) {   \
    add_scalar(a, b, n, y);                                                                      \
  }

GRAD_KERNELS(f32, float)
GRAD_KERNELS(bf16, __nv_bfloat16)

// Into a bf16 buffer: accumulate_<g type>_to_bf16{,_scalar}.
#define ACC_BF16_KERNELS(SUFFIX, T)                                                                 \
  extern "C" __global__ void accumulate_##SUFFIX##_to_bf16(const T* g, uint64_t n,                  \
                                                           __nv_bfloat16* acc) {                    \
    accumulate_vec(g, n, acc);                                                                      \
  }                                                                                                 \
  extern "C" __global__ void accumulate_##SUFFIX##_to_bf16_scalar(const T* g, uint64_t n,           \
                                                                  __nv_bfloat16* acc) {             \
    accumulate_scalar(g, n, acc);                                                                   \
  }

ACC_BF16_KERNELS(f32, float)
ACC_BF16_KERNELS(bf16, __nv_bfloat16)
