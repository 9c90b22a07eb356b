// SwiGLU gate h = silu(g) * u and its backward, f32 math, one rounding per output.
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__device__ __forceinline__ void swiglu_fwd(const T* __restrict__ g, const T* __restrict__ u,
                                           uint64_t n, T* __restrict__ h) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const float gi = ftrun::to_f32(g[i]);
    h[i] = ftrun::from_f32<T>(gi * sigmoid(gi) * ftrun::to_f32(u[i]));
  }
}

// du = dh * silu(g); dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))).
template <typename T>
__device__ __forceinline__ void swiglu_bwd(const T* __restrict__ g, const T* __restrict__ u,
                                           const T* __restrict__ dh, uint64_t n,
                                           T* __restrict__ dg, T* __restrict__ du) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const float gi = ftrun::to_f32(g[i]), ui = ftrun::to_f32(u[i]), dhi = ftrun::to_f32(dh[i]);
    const float sig = sigmoid(gi);
    const float silu = gi * sig;
    du[i] = ftrun::from_f32<T>(dhi * silu);
    dg[i] = ftrun::from_f32<T>(dhi * ui * (sig + silu * (1.0f - sig)));
  }
}

#define SWIGLU(SUFFIX, T)                                                                        \
  extern "C" __global__ void swiglu_fwd_##SUFFIX(const T* g, const T* u, uint64_t n, T* h) {     \
    swiglu_fwd(g, u, n, h);                                                                      \
  }                                                                                              \
  extern "C" __global__ void swiglu_bwd_##SUFFIX(const T* g, const T* u, const T* dh, uint64_t n, \
                                                 T* dg, T* du) {                                 \
    swiglu_bwd(g, u, dh, n, dg, du);                                                             \
  }
SWIGLU(f32, float)
SWIGLU(bf16, __nv_bfloat16)
