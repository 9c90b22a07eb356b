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

// Element i of the buffers below, read, updated and written back.
__device__ __forceinline__ void adamw_at(uint64_t i, float* __restrict__ p, const float* __restrict__ g,
                                         float* __restrict__ m, float* __restrict__ v,
                                         const float* __restrict__ decay_mask, const AdamWArgs& a,
                                         __nv_bfloat16* __restrict__ copy) {
  const bool masked = decay_mask != nullptr;
  float pi = p[i], mi = m[i], vi = v[i];
  adamw1(pi, g[i], mi, vi, masked ? decay_mask[i] : 1.0f, masked, a);
  p[i] = pi;
  m[i] = mi;
  v[i] = vi;
  if (copy != nullptr) copy[i] = ftrun::from_f32<__nv_bfloat16>(pi);
}

// In place over p, m, v: [n] f32 with gradient g [n]; decay_mask: [n] of 1/0, or null (decay all
// when `decay`). `copy`: null, or [n] that receives the new p rounded to bf16 (the model's
// compute-dtype weights, written here instead of by a separate cast pass over the master).
// Two variants, as grad.cu's: `adamw_f32` 8 elements per thread with 16-byte accesses (every
// pointer 16-byte aligned; the n % 8 tail goes one element each to the grid's first threads;
// launch at least ceil(n / 8) threads, never fewer than 8) and `adamw_f32_scalar` one element per
// thread at any alignment.
extern "C" __global__ void adamw_f32_scalar(float* __restrict__ p, const float* __restrict__ g,
                                            float* __restrict__ m, float* __restrict__ v,
                                            const float* __restrict__ decay_mask, uint64_t n,
                                            AdamWArgs a, __nv_bfloat16* __restrict__ copy) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    adamw_at(i, p, g, m, v, decay_mask, a, copy);
  }
}

extern "C" __global__ void adamw_f32(float* __restrict__ p, const float* __restrict__ g,
                                     float* __restrict__ m, float* __restrict__ v,
                                     const float* __restrict__ decay_mask, uint64_t n, AdamWArgs a,
                                     __nv_bfloat16* __restrict__ copy) {
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

// Σ g² of an [n] f32 buffer into out[0] (f64, zeroed by the caller): f64 per thread and per block.
extern "C" __global__ void sum_squares_f32(const float* __restrict__ g, uint64_t n,
                                           double* __restrict__ out) {
  double acc = 0.0;
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const double x = g[i];
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
