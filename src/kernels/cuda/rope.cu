// Rotary embedding (HF rotate_half convention) over x [n, heads, d] with per-token cos/sin [n, d]:
// y[i] = x[i] * cos[i] + rot(x)[i] * sin[i] * sign, rot(x) = [-x2, x1]. sign = -1 is the backward
// (rotation by the opposite angle). f32 math, one rounding per output; the per-element sequence is
// fixed with intrinsics: y = fma(x, cos, rot * (sin * sign)), then one round to T.
// Two versions with the same per-element arithmetic (so the same bits):
// - `rope_<T>`: a thread takes 8 consecutive elements j..j+8 of the first half of one (token, head)
//   vector AND the matching 8 of the second half (its rotation partners), so x, cos and sin are
//   each read once with 16-byte loads. Needs d % 16 == 0, 16-byte aligned pointers and
//   n * heads * d < 2^32; launch with n * heads * d / 16 threads (grid-strided beyond that).
// - `rope_<T>_scalar`: one output element per thread, any even d and alignment.
#include "common.cuh"

// One output: x * cos + rot * (sin * sign).
__device__ __forceinline__ float rope_elem(float x, float rot, float c, float s, float sign) {
  return __fmaf_rn(x, c, __fmul_rn(rot, __fmul_rn(s, sign)));
}

template <typename T>
__device__ __forceinline__ void rope_scalar(const T* __restrict__ x, const T* __restrict__ cos_t,
                                            const T* __restrict__ sin_t, uint32_t n,
                                            uint32_t heads, uint32_t d, float sign,
                                            T* __restrict__ y) {
  const uint64_t total = (uint64_t)n * heads * d;
  const uint32_t half = d / 2;
  for (uint64_t idx = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (uint64_t)gridDim.x * blockDim.x) {
    const uint32_t i = idx % d;
    const uint64_t token = idx / ((uint64_t)heads * d);
    const uint64_t base = idx - i;  // start of this (token, head) vector
    const float rot =
        i < half ? -ftrun::to_f32(x[base + i + half]) : ftrun::to_f32(x[base + i - half]);
    y[idx] = ftrun::from_f32<T>(rope_elem(ftrun::to_f32(x[idx]), rot,
                                          ftrun::to_f32(cos_t[token * d + i]),
                                          ftrun::to_f32(sin_t[token * d + i]), sign));
  }
}

template <typename T>
__device__ __forceinline__ void rope_vec(const T* __restrict__ x, const T* __restrict__ cos_t,
                                         const T* __restrict__ sin_t, uint32_t n, uint32_t heads,
                                         uint32_t d, float sign, T* __restrict__ y) {
  const uint32_t half = d / 2;
  const uint32_t per_half = half / 8;               // 8-element groups in one half
  const uint32_t groups = n * heads * per_half;     // < 2^32 / 16 (checked by the launcher)
  for (uint32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < groups; t += gridDim.x * blockDim.x) {
    const uint32_t vec = t / per_half;              // (token, head) vector index
    const uint32_t j = (t - vec * per_half) * 8;    // first element in the first half
    const uint32_t token = vec / heads;
    const uint32_t xo = vec * d + j, to = token * d + j;  // x/y and cos/sin offsets of element j
    float x1[8], x2[8], c1[8], c2[8], s1[8], s2[8], y1[8], y2[8];
    ftrun::load8(x + xo, x1);
    ftrun::load8(x + xo + half, x2);
    ftrun::load8(cos_t + to, c1);
    ftrun::load8(cos_t + to + half, c2);
    ftrun::load8(sin_t + to, s1);
    ftrun::load8(sin_t + to + half, s2);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      y1[e] = rope_elem(x1[e], -x2[e], c1[e], s1[e], sign);
      y2[e] = rope_elem(x2[e], x1[e], c2[e], s2[e], sign);
    }
    ftrun::store8(y + xo, y1);
    ftrun::store8(y + xo + half, y2);
  }
}

#define ROPE(SUFFIX, T)                                                                            \
  extern "C" __global__ void rope_##SUFFIX(const T* x, const T* c, const T* s, uint32_t n,         \
                                           uint32_t heads, uint32_t d, float sign, T* y) {         \
    rope_vec(x, c, s, n, heads, d, sign, y);                                                       \
  }                                                                                                \
  extern "C" __global__ void rope_##SUFFIX##_scalar(const T* x, const T* c, const T* s,            \
                                                    uint32_t n, uint32_t heads, uint32_t d,        \
                                                    float sign, T* y) {                            \
    rope_scalar(x, c, s, n, heads, d, sign, y);                                                    \
  }
ROPE(f32, float)
ROPE(bf16, __nv_bfloat16)
