// NF4 dequantization (bitsandbytes layout), bit-exact with quant::nf4::dequantize_nf4:
//   absmax[b] = code[codes[b]] * scales[b / 256] + offset   (double quant: two roundings)
//   w[e]      = NF4[nibble(e)] * absmax[e / blocksize]      (f32 product, then one cast)
// __fmul_rn / __fadd_rn keep nvcc from contracting the absmax into an FMA (one rounding).
#include "common.cuh"

struct Nf4Table {
  float v[16];
};

template <typename T>
__device__ __forceinline__ void dequant_byte(const uint8_t* __restrict__ packed,
                                             const float* __restrict__ absmax_plain,
                                             const uint8_t* __restrict__ dq_codes,
                                             const float* __restrict__ dq_scales, float dq_offset,
                                             const float* __restrict__ dq_code, const Nf4Table& nf4,
                                             uint64_t numel, uint32_t blocksize, uint64_t i,
                                             T* __restrict__ out) {
  const uint8_t byte = packed[i];
  // One output element per nibble: 2i (high nibble) and 2i + 1 (low nibble).
  for (int half = 0; half < 2; ++half) {
    const uint64_t e = 2 * i + half;
    if (e >= numel) return;
    const uint64_t block = e / blocksize;
    float absmax;
    if (absmax_plain != nullptr) {
      absmax = absmax_plain[block];
    } else {
      absmax = __fadd_rn(__fmul_rn(dq_code[dq_codes[block]], dq_scales[block / 256]), dq_offset);
    }
    const uint8_t nibble = half == 0 ? (byte >> 4) : (byte & 0x0F);
    out[e] = ftrun::from_f32<T>(__fmul_rn(nf4.v[nibble], absmax));
  }
}

// One thread per packed byte (two outputs). `absmax_plain` is null for double quantization.
#define NF4_KERNEL(NAME, T)                                                                        \
  extern "C" __global__ void NAME(const uint8_t* __restrict__ packed, uint64_t n_bytes,            \
                                  const float* __restrict__ absmax_plain,                          \
                                  const uint8_t* __restrict__ dq_codes,                            \
                                  const float* __restrict__ dq_scales, float dq_offset,            \
                                  const float* __restrict__ dq_code, Nf4Table nf4, uint64_t numel, \
                                  uint32_t blocksize, T* __restrict__ out) {                       \
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n_bytes;                \
         i += (uint64_t)gridDim.x * blockDim.x) {                                                  \
      dequant_byte<T>(packed, absmax_plain, dq_codes, dq_scales, dq_offset, dq_code, nf4, numel,  \
                      blocksize, i, out);                                                          \
    }                                                                                              \
  }

NF4_KERNEL(nf4_dequant_f32, float)
NF4_KERNEL(nf4_dequant_bf16, __nv_bfloat16)
