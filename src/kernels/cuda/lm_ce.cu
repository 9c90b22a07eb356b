// Cross-entropy over one chunk of LM-head logits [rows, vocab] (bf16 or f32), one block per row:
// an online max/sum-exp pass gives lse; loss[row] = lse - logit[target] (f32); with `grad`, a
// second pass writes dlogits = scale * (softmax - onehot(target)) in the logits' dtype.
#include "common.cuh"

__device__ __forceinline__ void lse_combine(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

template <typename T>
__device__ __forceinline__ void ce_chunk(const T* __restrict__ logits,
                                         const uint32_t* __restrict__ targets, uint32_t rows,
                                         uint32_t vocab, float scale, int grad,
                                         float* __restrict__ loss, T* __restrict__ dlogits) {
  __shared__ float sm_m[32], sm_s[32];
  for (uint32_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* lr = logits + (uint64_t)row * vocab;
    float m = -INFINITY, s = 0.0f;
    for (uint32_t c = threadIdx.x; c < vocab; c += blockDim.x) {
      const float v = ftrun::to_f32(lr[c]);
      if (v > m) {
        s = s * expf(m - v) + 1.0f;
        m = v;
      } else {
        s += expf(v - m);
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
      T* dr = dlogits + (uint64_t)row * vocab;
      const float inv_s = 1.0f / s;
      for (uint32_t c = threadIdx.x; c < vocab; c += blockDim.x) {
        const float p = expf(ftrun::to_f32(lr[c]) - m) * inv_s;
        dr[c] = ftrun::from_f32<T>((p - (c == target ? 1.0f : 0.0f)) * scale);
      }
    }
  }
}

extern "C" __global__ void ce_chunk_f32(const float* logits, const uint32_t* targets, uint32_t rows,
                                        uint32_t vocab, float scale, int grad, float* loss,
                                        float* dlogits) {
  ce_chunk(logits, targets, rows, vocab, scale, grad, loss, dlogits);
}
extern "C" __global__ void ce_chunk_bf16(const __nv_bfloat16* logits, const uint32_t* targets,
                                         uint32_t rows, uint32_t vocab, float scale, int grad,
                                         float* loss, __nv_bfloat16* dlogits) {
  ce_chunk(logits, targets, rows, vocab, scale, grad, loss, dlogits);
}
