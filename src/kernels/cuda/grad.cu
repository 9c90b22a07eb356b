// Gradient accumulation into the flat f32 gradient buffer: acc[i] += g[i], g in bf16 or f32.
// One rounding (the f32 add), as candle's `(acc + g.to_dtype(f32))` on the CPU.
#include "common.cuh"

#define ACCUMULATE_KERNEL(NAME, T)                                                        \
  extern "C" __global__ void NAME(const T* __restrict__ g, uint64_t n, float* __restrict__ acc) { \
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;             \
         i += (uint64_t)gridDim.x * blockDim.x) {                                         \
      acc[i] = __fadd_rn(acc[i], ftrun::to_f32(g[i]));                                    \
    }                                                                                     \
  }

ACCUMULATE_KERNEL(accumulate_f32, float)
ACCUMULATE_KERNEL(accumulate_bf16, __nv_bfloat16)
