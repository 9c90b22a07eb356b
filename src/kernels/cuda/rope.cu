// Rotary embedding (HF rotate_half convention) over x [n, heads, d] with per-token cos/sin [n, d]:
// y[i] = x[i] * cos[i] + rot(x)[i] * sin[i] * sign, rot(x) = [-x2, x1]. sign = -1 is the backward
// (rotation by the opposite angle). f32 math, one rounding per output.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void rope(const T* __restrict__ x, const T* __restrict__ cos_t,
                                     const T* __restrict__ sin_t, uint32_t n, uint32_t heads,
                                     uint32_t d, float sign, T* __restrict__ y) {
  const uint64_t total = (uint64_t)n * heads * d;
  const uint32_t half = d / 2;
  for (uint64_t idx = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (uint64_t)gridDim.x * blockDim.x) {
    const uint32_t i = idx % d;
    const uint64_t token = idx / ((uint64_t)heads * d);
    const uint64_t base = idx - i;  // start of this (token, head) vector
    const float xi = ftrun::to_f32(x[idx]);
    const float rot = i < half ? -ftrun::to_f32(x[base + i + half]) : ftrun::to_f32(x[base + i - half]);
    const float c = ftrun::to_f32(cos_t[token * d + i]);
    const float s = ftrun::to_f32(sin_t[token * d + i]) * sign;
    y[idx] = ftrun::from_f32<T>(xi * c + rot * s);
  }
}

extern "C" __global__ void rope_f32(const float* x, const float* c, const float* s, uint32_t n,
                                    uint32_t heads, uint32_t d, float sign, float* y) {
  rope(x, c, s, n, heads, d, sign, y);
}
extern "C" __global__ void rope_bf16(const __nv_bfloat16* x, const __nv_bfloat16* c,
                                     const __nv_bfloat16* s, uint32_t n, uint32_t heads, uint32_t d,
                                     float sign, __nv_bfloat16* y) {
  rope(x, c, s, n, heads, d, sign, y);
}
