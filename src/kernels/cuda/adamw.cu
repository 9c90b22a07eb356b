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

// p, g, m, v: [n]; decay_mask: [n] of 1/0 or null (decay all when `decay`); outputs new p, m, v.
extern "C" __global__ void adamw_f32(const float* __restrict__ p, const float* __restrict__ g,
                                     const float* __restrict__ m, const float* __restrict__ v,
                                     const float* __restrict__ decay_mask, uint64_t n, AdamWArgs a,
                                     float* __restrict__ p_out, float* __restrict__ m_out,
                                     float* __restrict__ v_out) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    float pi = p[i];
    const float gi = __fmul_rn(g[i], a.grad_scale);  // torch: g.mul_(clip_coef) first
    if (a.decay) {
      if (decay_mask != nullptr) {
        // p * (mask * -shrink + 1)
        pi = __fmul_rn(pi, __fadd_rn(__fmul_rn(decay_mask[i], a.neg_shrink), 1.0f));
      } else {
        pi = __fadd_rn(__fmul_rn(pi, a.one_minus_shrink), 0.0f);
      }
    }
    const float mi = __fadd_rn(__fadd_rn(__fmul_rn(m[i], a.beta1), 0.0f),
                               __fadd_rn(__fmul_rn(gi, a.one_minus_beta1), 0.0f));
    const float vi = __fadd_rn(__fadd_rn(__fmul_rn(v[i], a.beta2), 0.0f),
                               __fadd_rn(__fmul_rn(__fmul_rn(gi, gi), a.one_minus_beta2), 0.0f));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), a.inv_bias_correction2_sqrt), a.eps);
    const float update = __fadd_rn(__fmul_rn(__fdiv_rn(mi, denom), a.step_size), 0.0f);
    p_out[i] = __fsub_rn(pi, update);
    m_out[i] = mi;
    v_out[i] = vi;
  }
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
