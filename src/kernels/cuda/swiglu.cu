// SwiGLU gate h = silu(g) * u and its backward, f32 math, one rounding per output.
// Two versions of each kernel with the same per-element arithmetic (so the same bits):
// - `swiglu_{fwd,bwd}_<T>`: 8 elements per thread with 16-byte loads/stores; every pointer must be
//   16-byte aligned. The n / 8 groups are grid-strided; the last n % 8 elements go one each to the
//   grid's first threads. Launch with at least ceil(n / 8) threads (and never fewer than 8).
// - `swiglu_{fwd,bwd}_<T>_scalar`: one element per thread, any alignment (tensor views at an
//   offset).
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// h = silu(g) * u.
__device__ __forceinline__ float swiglu_h(float g, float u) { return g * sigmoid(g) * u; }

// du = dh * silu(g); dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))).
__device__ __forceinline__ void swiglu_grad(float g, float u, float dh, float& dg, float& du) {
  const float sig = sigmoid(g);
  const float silu = g * sig;
  du = dh * silu;
  dg = dh * u * (sig + silu * (1.0f - sig));
}

template <typename T>
__device__ __forceinline__ void swiglu_fwd_scalar(const T* __restrict__ g, const T* __restrict__ u,
                                                  uint64_t n, T* __restrict__ h) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    h[i] = ftrun::from_f32<T>(swiglu_h(ftrun::to_f32(g[i]), ftrun::to_f32(u[i])));
  }
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_scalar(const T* __restrict__ g, const T* __restrict__ u,
                                                  const T* __restrict__ dh, uint64_t n,
                                                  T* __restrict__ dg, T* __restrict__ du) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    float dgi, dui;
    swiglu_grad(ftrun::to_f32(g[i]), ftrun::to_f32(u[i]), ftrun::to_f32(dh[i]), dgi, dui);
    du[i] = ftrun::from_f32<T>(dui);
    dg[i] = ftrun::from_f32<T>(dgi);
  }
}

template <typename T>
__device__ __forceinline__ void swiglu_fwd_vec(const T* __restrict__ g, const T* __restrict__ u,
                                               uint64_t n, T* __restrict__ h) {
  const uint64_t groups = n / 8, tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  for (uint64_t i = tid; i < groups; i += (uint64_t)gridDim.x * blockDim.x) {
    float gv[8], uv[8], hv[8];
    ftrun::load8(g + 8 * i, gv);
    ftrun::load8(u + 8 * i, uv);
#pragma unroll
    for (int e = 0; e < 8; ++e) hv[e] = swiglu_h(gv[e], uv[e]);
    ftrun::store8(h + 8 * i, hv);
  }
  const uint64_t t = groups * 8 + tid;  // tail element of this thread, if any
  if (t < n) h[t] = ftrun::from_f32<T>(swiglu_h(ftrun::to_f32(g[t]), ftrun::to_f32(u[t])));
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_vec(const T* __restrict__ g, const T* __restrict__ u,
                                               const T* __restrict__ dh, uint64_t n,
                                               T* __restrict__ dg, T* __restrict__ du) {
  const uint64_t groups = n / 8, tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  for (uint64_t i = tid; i < groups; i += (uint64_t)gridDim.x * blockDim.x) {
    float gv[8], uv[8], dhv[8], dgv[8], duv[8];
    ftrun::load8(g + 8 * i, gv);
    ftrun::load8(u + 8 * i, uv);
    ftrun::load8(dh + 8 * i, dhv);
#pragma unroll
    for (int e = 0; e < 8; ++e) swiglu_grad(gv[e], uv[e], dhv[e], dgv[e], duv[e]);
    ftrun::store8(du + 8 * i, duv);
    ftrun::store8(dg + 8 * i, dgv);
  }
  const uint64_t t = groups * 8 + tid;
  if (t < n) {
    float dgi, dui;
    swiglu_grad(ftrun::to_f32(g[t]), ftrun::to_f32(u[t]), ftrun::to_f32(dh[t]), dgi, dui);
    du[t] = ftrun::from_f32<T>(dui);
    dg[t] = ftrun::from_f32<T>(dgi);
  }
}

#define SWIGLU(SUFFIX, T)                                                                         \
  extern "C" __global__ void swiglu_fwd_##SUFFIX(const T* g, const T* u, uint64_t n, T* h) {      \
    swiglu_fwd_vec(g, u, n, h);                                                                   \
  }                                                                                               \
  extern "C" __global__ void swiglu_bwd_##SUFFIX(const T* g, const T* u, const T* dh, uint64_t n, \
                                                 T* dg, T* du) {                                  \
    swiglu_bwd_vec(g, u, dh, n, dg, du);                                                          \
  }                                                                                               \
  extern "C" __global__ void swiglu_fwd_##SUFFIX##_scalar(const T* g, const T* u, uint64_t n,     \
                                                          T* h) {                                 \
    swiglu_fwd_scalar(g, u, n, h);                                                                \
  }                                                                                               \
  extern "C" __global__ void swiglu_bwd_##SUFFIX##_scalar(const T* g, const T* u, const T* dh,    \
                                                          uint64_t n, T* dg, T* du) {             \
    swiglu_bwd_scalar(g, u, dh, n, dg, du);                                                       \
  }
SWIGLU(f32, float)
SWIGLU(bf16, __nv_bfloat16)
