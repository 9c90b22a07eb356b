// Cross-entropy over one chunk of LM-head logits [rows, vocab] (bf16 or f32), one block per row:
// an online max/sum-exp pass gives lse; loss[row] = lse - logit[target] (f32); with `grad`, a
// second pass writes dlogits = scale * (softmax - onehot(target)) over the logits themselves (in
// place: the chunk needs no second [rows, vocab] buffer). Both passes are memory-bound: the
// kernels move 8 elements per 16-byte access (16-byte aligned rows: vocab a multiple of 8), their
// `_scalar` variants one.
#include "common.cuh"

namespace {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ void lse_combine(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty
  s = s * exp2f((m - mn) * kLog2e) + s2 * exp2f((m2 - mn) * kLog2e);
  m = mn;
}

// Folds 8 values into the running (max, sum of exp): one rescale per 8 instead of per value.
__device__ __forceinline__ void lse_push8(float& m, float& s, const float (&v)[8]) {
  float vm = v[0];
#pragma unroll
  for (int k = 1; k < 8; ++k) vm = fmaxf(vm, v[k]);
  if (vm > m) {
    s *= exp2f((m - vm) * kLog2e);
    m = vm;
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) s += exp2f((v[k] - m) * kLog2e);
}

template <typename T, bool VEC>
__device__ __forceinline__ void ce_chunk(T* logits, const uint32_t* __restrict__ targets,
                                         uint32_t rows, uint32_t vocab, float scale, int grad,
                                         float* __restrict__ loss) {
  __shared__ float sm_m[32], sm_s[32];
  for (uint32_t row = blockIdx.x; row < rows; row += gridDim.x) {
    T* lr = logits + (uint64_t)row * vocab;
    float m = -INFINITY, s = 0.0f;
    if (VEC) {
      for (uint32_t c = threadIdx.x * 8; c < vocab; c += blockDim.x * 8) {
        float v[8];
        ftrun::load8(lr + c, v);
        lse_push8(m, s, v);
      }
    } else {
      for (uint32_t c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float v = ftrun::to_f32(lr[c]);
        if (v > m) {
          s = s * exp2f((m - v) * kLog2e) + 1.0f;
          m = v;
        } else {
          s += exp2f((v - m) * kLog2e);
        }
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      lse_combine(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();  // the previous row's readers of sm_m / sm_s are done
    if (lane == 0) {
      sm_m[warp] = m;
      sm_s[warp] = s;
    }
    __syncthreads();
    m = lane < warps ? sm_m[lane] : -INFINITY;
    s = lane < warps ? sm_s[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
      lse_combine(m, s, m2, s2);
    }
    const uint32_t target = targets[row];
    // An out-of-range target (the caller validates them) poisons the loss instead of reading past the row.
    if (threadIdx.x == 0)
      loss[row] = target < vocab ? logf(s) - (ftrun::to_f32(lr[target]) - m) : NAN;
    if (grad) {
      __syncthreads();  // logit[target] is read above before the gradient overwrites it
      const float inv_s = 1.0f / s, mb = m * kLog2e;
      if (VEC) {
        for (uint32_t c = threadIdx.x * 8; c < vocab; c += blockDim.x * 8) {
          float v[8];
          ftrun::load8(lr + c, v);
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            const float p = exp2f(fmaf(v[k], kLog2e, -mb)) * inv_s;
            v[k] = (p - (c + k == target ? 1.0f : 0.0f)) * scale;
          }
          ftrun::store8(lr + c, v);
        }
      } else {
        for (uint32_t c = threadIdx.x; c < vocab; c += blockDim.x) {
          const float p = exp2f(fmaf(ftrun::to_f32(lr[c]), kLog2e, -mb)) * inv_s;
          lr[c] = ftrun::from_f32<T>((p - (c == target ? 1.0f : 0.0f)) * scale);
        }
      }
    }
  }
}

}  // namespace

#define CE_KERNEL(NAME, T, VEC)                                                                \
  extern "C" __global__ void NAME(T* logits, const uint32_t* targets, uint32_t rows,           \
                                  uint32_t vocab, float scale, int grad, float* loss) {        \
    ce_chunk<T, VEC>(logits, targets, rows, vocab, scale, grad, loss);                         \
  }
CE_KERNEL(ce_chunk_f32, float, true)
CE_KERNEL(ce_chunk_bf16, __nv_bfloat16, true)
CE_KERNEL(ce_chunk_f32_scalar, float, false)
CE_KERNEL(ce_chunk_bf16_scalar, __nv_bfloat16, false)
