// Fused AdamW over flat f32 buffers, bit-exact with train::optim::adamw_update's candle-ops path
// on the CPU: every product and sum is rounded separately (__fmul_rn / __fadd_rn: no FMA), in
// the same order as the candle ops (affine = x * mul + add).
#include "common.cuh"

struct AdamWArgs {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
  float neg_shrink;         // -(lr * weight_decay), used with a decay mask
  float one_minus_shrink;   // 1 - lr * weight_decay, used without a mask
  float inv_bias_correction2_sqrt, eps, step_size;
  int decay;                // 0: no weight decay this step
  float grad_scale;         // the gradient clipping coefficient (1: no clipping)
};

// One element's update: p, m, v in place. Both kernel variants call this, so they agree bit for bit.
__device__ __forceinline__ void adamw1(float& p, float g, float& m, float& v, float mask,
                                       bool masked, const AdamWArgs& a) {
  const float gi = __fmul_rn(g, a.grad_scale);  // torch: g.mul_(clip_coef) first
  if (a.decay) {
    if (masked) {
      // p * (mask * -shrink + 1)
      p = __fmul_rn(p, __fadd_rn(__fmul_rn(mask, a.neg_shrink), 1.0f));
    } else {
      p = __fadd_rn(__fmul_rn(p, a.one_minus_shrink), 0.0f);
    }
  }
  m = __fadd_rn(__fadd_rn(__fmul_rn(m, a.beta1), 0.0f), __fadd_rn(__fmul_rn(gi, a.one_minus_beta1), 0.0f));
  v = __fadd_rn(__fadd_rn(__fmul_rn(v, a.beta2), 0.0f),
                __fadd_rn(__fmul_rn(__fmul_rn(gi, gi), a.one_minus_beta2), 0.0f));
  const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), a.inv_bias_correction2_sqrt), a.eps);
  const float update = __fadd_rn(__fmul_rn(__fdiv_rn(m, denom), a.step_size), 0.0f);
  p = __fsub_rn(p, update);
}

// Element i of the buffers below, read, updated and written back. G: the gradient's type (f32,
// or bf16 when each value of the step's gradient was written once, see `Decoder::set_grad_dtype`);
// a bf16 gradient widens to f32 exactly, so both give the f32 path's bits for the same values.
template <typename G>
__device__ __forceinline__ void adamw_at(uint64_t i, float* __restrict__ p, const G* __restrict__ g,
                                         float* __restrict__ m, float* __restrict__ v,
                                         const float* __restrict__ decay_mask, const AdamWArgs& a,
                                         __nv_bfloat16* __restrict__ copy) {
  const bool masked = decay_mask != nullptr;
  float pi = p[i], mi = m[i], vi = v[i];
  adamw1(pi, ftrun::to_f32(g[i]), mi, vi, masked ? decay_mask[i] : 1.0f, masked, a);
  p[i] = pi;
  m[i] = mi;
  v[i] = vi;
  if (copy != nullptr) copy[i] = ftrun::from_f32<__nv_bfloat16>(pi);
}

// In place over p, m, v: [n] f32 with gradient g [n] (f32 or bf16); decay_mask: [n] of 1/0, or
// null (decay all when `decay`). `copy`: null, or [n] that receives the new p rounded to bf16 (the
// model's compute-dtype weights, written here instead of by a separate cast pass over the master).
// Two variants, as grad.cu's: 8 elements per thread with 16-byte accesses (every pointer 16-byte
// aligned; the n % 8 tail goes one element each to the grid's first threads; launch at least
// ceil(n / 8) threads, never fewer than 8) and `_scalar` one element per thread at any alignment.
template <typename G>
__device__ __forceinline__ void adamw_scalar(float* __restrict__ p, const G* __restrict__ g,
                                             float* __restrict__ m, float* __restrict__ v,
                                             const float* __restrict__ decay_mask, uint64_t n,
                                             const AdamWArgs& a, __nv_bfloat16* __restrict__ copy) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    adamw_at(i, p, g, m, v, decay_mask, a, copy);
  }
}

template <typename G>
__device__ __forceinline__ void adamw_vec8(float* __restrict__ p, const G* __restrict__ g,
                                           float* __restrict__ m, float* __restrict__ v,
                                           const float* __restrict__ decay_mask, uint64_t n,
                                           const AdamWArgs& a, __nv_bfloat16* __restrict__ copy) {
  const bool masked = decay_mask != nullptr;
  const uint64_t groups = n / 8, tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  for (uint64_t i = tid; i < groups; i += (uint64_t)gridDim.x * blockDim.x) {
    float pv[8], gv[8], mv[8], vv[8], kv[8];
    ftrun::load8(p + 8 * i, pv);
    ftrun::load8(g + 8 * i, gv);
    ftrun::load8(m + 8 * i, mv);
    ftrun::load8(v + 8 * i, vv);
    if (masked) ftrun::load8(decay_mask + 8 * i, kv);
#pragma unroll
    for (int e = 0; e < 8; ++e) adamw1(pv[e], gv[e], mv[e], vv[e], masked ? kv[e] : 1.0f, masked, a);
    ftrun::store8(p + 8 * i, pv);
    ftrun::store8(m + 8 * i, mv);
    ftrun::store8(v + 8 * i, vv);
    if (copy != nullptr) ftrun::store8(copy + 8 * i, pv);
  }
  const uint64_t t = groups * 8 + tid;  // tail element of this thread, if any
  if (t < n) adamw_at(t, p, g, m, v, decay_mask, a, copy);
}

#define ADAMW_KERNELS(SUFFIX, G)                                                                  \
  extern "C" __global__ void adamw_##SUFFIX##_scalar(                                            \
      float* __restrict__ p, const G* __restrict__ g, float* __restrict__ m,                     \
      float* __restrict__ v, const float* __restrict__ decay_mask, uint64_t n, AdamWArgs a,      \
      __nv_bfloat16* __restrict__ copy) {                                                        \
    adamw_scalar(p, g, m, v, decay_mask, n, a, copy);                                            \
  }                                                                                              \
  extern "C" __global__ void adamw_##SUFFIX(float* __restrict__ p, const G* __restrict__ g,      \
                                            float* __restrict__ m, float* __restrict__ v,        \
                                            const float* __restrict__ decay_mask, uint64_t n,    \
                                            AdamWArgs a, __nv_bfloat16* __restrict__ copy) {     \
    adamw_vec8(p, g, m, v, decay_mask, n, a, copy);                                              \
  }

ADAMW_KERNELS(f32, float)          // adamw_f32, adamw_f32_scalar: f32 gradient
ADAMW_KERNELS(f32_gbf16, __nv_bfloat16)  // bf16 gradient

// Σ g² of an [n] buffer into out[0] (f64, zeroed by the caller): f64 per thread and per block.
template <typename G>
__device__ __forceinline__ void sum_squares(const G* __restrict__ g, uint64_t n, double* __restrict__ out) {
  double acc = 0.0;
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const double x = ftrun::to_f32(g[i]);
    acc += x * x;
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  __shared__ double warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < (int)(blockDim.x >> 5) ? warp_sums[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) atomicAdd(out, acc);
  }
}

extern "C" __global__ void sum_squares_f32(const float* __restrict__ g, uint64_t n, double* __restrict__ out) {
  sum_squares(g, n, out);
}
extern "C" __global__ void sum_squares_bf16(const __nv_bfloat16* __restrict__ g, uint64_t n,
                                            double* __restrict__ out) {
  sum_squares(g, n, out);
}

// ---- Split fp32 master (one rank, bf16 compute): the f32 master value p lives as `hi`, p
// rounded to bf16 (to nearest, ties away from zero: the top 16 bits of p's bits + 0x8000),
// which is the model's compute weight, and `lo`, the low 16 bits of p's bits. p's top 16 bits
// are hi's, less one where the rounding carried (lo >= 0x8000), so the pair is p exactly:
// 4 bytes a value where an f32 master and a bf16 copy take 6. The kernels see lo as uint16_t.
__device__ __forceinline__ float join_bits(uint32_t hi_bits, uint32_t lo) {
  const uint32_t top = hi_bits - (lo >= 0x8000u ? 1u : 0u);
  return __uint_as_float((top << 16) | lo);
}
__device__ __forceinline__ void split_bits(float p, uint32_t& hi_bits, uint32_t& lo) {
  const uint32_t b = __float_as_uint(p);
  lo = b & 0xffffu;
  hi_bits = (b + 0x8000u) >> 16;
}

extern "C" __global__ void master_split_f32(const float* __restrict__ p, __nv_bfloat16* __restrict__ hi,
                                            uint16_t* __restrict__ lo, uint64_t n) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    uint32_t h, l;
    split_bits(p[i], h, l);
    hi[i] = __ushort_as_bfloat16((unsigned short)h);
    lo[i] = (uint16_t)l;
  }
}

extern "C" __global__ void master_join_f32(const __nv_bfloat16* __restrict__ hi,
                                           const uint16_t* __restrict__ lo, float* __restrict__ p,
                                           uint64_t n) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    p[i] = join_bits(__bfloat16_as_ushort(hi[i]), lo[i]);
  }
}

// AdamW over a split master: the update of adamw_f32 on the joined value, split back. hi, lo,
// m, v: [n] in place; g [n] f32 or bf16; decay_mask as adamw_f32's.
template <typename G>
__device__ __forceinline__ void adamw_split_at(uint64_t i, __nv_bfloat16* __restrict__ hi,
                                               uint16_t* __restrict__ lo, const G* __restrict__ g,
                                               float* __restrict__ m, float* __restrict__ v,
                                               const float* __restrict__ decay_mask,
                                               const AdamWArgs& a) {
  const bool masked = decay_mask != nullptr;
  float pi = join_bits(__bfloat16_as_ushort(hi[i]), lo[i]), mi = m[i], vi = v[i];
  adamw1(pi, ftrun::to_f32(g[i]), mi, vi, masked ? decay_mask[i] : 1.0f, masked, a);
  uint32_t h, l;
  split_bits(pi, h, l);
  hi[i] = __ushort_as_bfloat16((unsigned short)h);
  lo[i] = (uint16_t)l;
  m[i] = mi;
  v[i] = vi;
}

template <typename G>
__device__ __forceinline__ void adamw_split_scalar(__nv_bfloat16* __restrict__ hi, uint16_t* __restrict__ lo,
                                                   const G* __restrict__ g, float* __restrict__ m,
                                                   float* __restrict__ v,
                                                   const float* __restrict__ decay_mask, uint64_t n,
                                                   const AdamWArgs& a) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    adamw_split_at(i, hi, lo, g, m, v, decay_mask, a);
  }
}

// 8 values per thread, 16-byte accesses (every pointer 16-byte aligned), tail as adamw_vec8's.
// hi goes through load8/store8 as floats: a bf16 value widens exactly and rounds back to itself.
template <typename G>
__device__ __forceinline__ void adamw_split_vec8(__nv_bfloat16* __restrict__ hi, uint16_t* __restrict__ lo,
                                                 const G* __restrict__ g, float* __restrict__ m,
                                                 float* __restrict__ v,
                                                 const float* __restrict__ decay_mask, uint64_t n,
                                                 const AdamWArgs& a) {
  const bool masked = decay_mask != nullptr;
  const uint64_t groups = n / 8, tid = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x;
  for (uint64_t i = tid; i < groups; i += (uint64_t)gridDim.x * blockDim.x) {
    float hv[8], gv[8], mv[8], vv[8], kv[8];
    ftrun::load8(hi + 8 * i, hv);
    uint4 lraw = *reinterpret_cast<const uint4*>(lo + 8 * i);
    uint32_t lw[4] = {lraw.x, lraw.y, lraw.z, lraw.w};
    ftrun::load8(g + 8 * i, gv);
    ftrun::load8(m + 8 * i, mv);
    ftrun::load8(v + 8 * i, vv);
    if (masked) ftrun::load8(decay_mask + 8 * i, kv);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const uint32_t l = (lw[e / 2] >> (16 * (e % 2))) & 0xffffu;  // little-endian halves
      float p = join_bits(__float_as_uint(hv[e]) >> 16, l);
      adamw1(p, gv[e], mv[e], vv[e], masked ? kv[e] : 1.0f, masked, a);
      uint32_t h, nl;
      split_bits(p, h, nl);
      hv[e] = __uint_as_float(h << 16);
      lw[e / 2] = (e % 2 == 0) ? ((lw[e / 2] & 0xffff0000u) | nl) : ((lw[e / 2] & 0xffffu) | (nl << 16));
    }
    ftrun::store8(hi + 8 * i, hv);
    *reinterpret_cast<uint4*>(lo + 8 * i) = make_uint4(lw[0], lw[1], lw[2], lw[3]);
    ftrun::store8(m + 8 * i, mv);
    ftrun::store8(v + 8 * i, vv);
  }
  const uint64_t t = groups * 8 + tid;
  if (t < n) adamw_split_at(t, hi, lo, g, m, v, decay_mask, a);
}

#define ADAMW_SPLIT_KERNELS(SUFFIX, G)                                                            \
  extern "C" __global__ void adamw_split_##SUFFIX##_scalar(                                      \
      __nv_bfloat16* __restrict__ hi, uint16_t* __restrict__ lo, const G* __restrict__ g,        \
      float* __restrict__ m, float* __restrict__ v, const float* __restrict__ decay_mask,        \
      uint64_t n, AdamWArgs a) {                                                                 \
    adamw_split_scalar(hi, lo, g, m, v, decay_mask, n, a);                                       \
  }                                                                                              \
  extern "C" __global__ void adamw_split_##SUFFIX(                                               \
      __nv_bfloat16* __restrict__ hi, uint16_t* __restrict__ lo, const G* __restrict__ g,        \
      float* __restrict__ m, float* __restrict__ v, const float* __restrict__ decay_mask,        \
      uint64_t n, AdamWArgs a) {                                                                 \
    adamw_split_vec8(hi, lo, g, m, v, decay_mask, n, a);                                         \
  }

ADAMW_SPLIT_KERNELS(f32, float)           // adamw_split_f32{,_scalar}: f32 gradient
ADAMW_SPLIT_KERNELS(gbf16, __nv_bfloat16) // adamw_split_gbf16{,_scalar}: bf16 gradient
