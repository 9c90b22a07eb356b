// LoRA input dropout with a counter-based mask: element i of a contiguous [n, in] input is kept
// when the top 32 bits of mix_seed(seed, i) are >= threshold (= round(p * 2^32)). The same hash
// runs on the CPU (model::layers::lora), so both devices drop the same elements; the mask is never
// materialized: the backward recomputes it from the seed.
#include "common.cuh"

// model::layers::mix_seed: splitmix64's finalizer over a ^ ((b + golden) * c1).
__device__ __forceinline__ uint64_t mix_seed(uint64_t a, uint64_t b) {
  uint64_t z = a ^ ((b + 0x9E3779B97F4A7C15ull) * 0xBF58476D1CE4E5B9ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// out = x * keep(i) * scale, the product in f32 and rounded once.
template <typename T>
__device__ __forceinline__ void dropout_apply(const T* __restrict__ x, uint64_t n, uint64_t seed,
                                              uint64_t threshold, float scale, T* __restrict__ out) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const bool keep = (mix_seed(seed, i) >> 32) >= threshold;
    out[i] = ftrun::from_f32<T>(__fmul_rn(ftrun::to_f32(x[i]), keep ? scale : 0.0f));
  }
}

extern "C" __global__ void dropout_f32(const float* x, uint64_t n, uint64_t seed,
                                       uint64_t threshold, float scale, float* out) {
  dropout_apply(x, n, seed, threshold, scale, out);
}
extern "C" __global__ void dropout_bf16(const __nv_bfloat16* x, uint64_t n, uint64_t seed,
                                        uint64_t threshold, float scale, __nv_bfloat16* out) {
  dropout_apply(x, n, seed, threshold, scale, out);
}
