// NF4 dequantization (bitsandbytes layout), bit-exact with quant::nf4::dequantize_nf4:
//   absmax[b] = code[codes[b]] * scales[b / 256] + offset   (double quant: two roundings)
//   w[e]      = NF4[nibble(e)] * absmax[e / blocksize]      (f32 product, then one cast)
// __fmul_rn / __fadd_rn keep nvcc from contracting the absmax into an FMA (one rounding).
#include "common.cuh"

struct Nf4Table {
  float v[16];
};

// Two adjacent outputs in one store (out + 2i is aligned for both: 2i is even).
__device__ __forceinline__ void store_pair(float* out, uint32_t e, float a, float b) {
  *reinterpret_cast<float2*>(out + e) = make_float2(a, b);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* out, uint32_t e, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(out + e) = __floats2bfloat162_rn(a, b);
}

// One thread per packed byte i: outputs 2i (high nibble) and 2i + 1 (low nibble), which share
// their block (the block size is even). 32-bit indices: the host checks numel < 2^31.
template <typename T>
__device__ __forceinline__ void dequant_byte(const uint8_t* __restrict__ packed,
                                             const float* __restrict__ absmax_plain,
                                             const uint8_t* __restrict__ dq_codes,
                                             const float* __restrict__ dq_scales, float dq_offset,
                                             const float* __restrict__ dq_code, const Nf4Table& nf4,
                                             uint32_t numel, uint32_t blocksize, uint32_t i,
                                             T* __restrict__ out) {
  const uint8_t byte = packed[i];
  const uint32_t e = 2 * i;
  const uint32_t block = e / blocksize;
  float absmax;
  if (absmax_plain != nullptr) {
    absmax = absmax_plain[block];
  } else {
    absmax = __fadd_rn(__fmul_rn(dq_code[dq_codes[block]], dq_scales[block / 256]), dq_offset);
  }
  const float hi = __fmul_rn(nf4.v[byte >> 4], absmax);
  const float lo = __fmul_rn(nf4.v[byte & 0x0F], absmax);
  if (e + 1 < numel) {
    store_pair(out, e, hi, lo);
  } else {
    out[e] = ftrun::from_f32<T>(hi);  // odd element count: the last byte's low nibble is padding
  }
}

// `absmax_plain` is null for double quantization.
#define NF4_KERNEL(NAME, T)                                                                        \
  extern "C" __global__ void NAME(const uint8_t* __restrict__ packed, uint32_t n_bytes,            \
                                  const float* __restrict__ absmax_plain,                          \
                                  const uint8_t* __restrict__ dq_codes,                            \
                                  const float* __restrict__ dq_scales, float dq_offset,            \
                                  const float* __restrict__ dq_code, Nf4Table nf4, uint32_t numel, \
                                  uint32_t blocksize, T* __restrict__ out) {                       \
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n_bytes;                          \
         i += gridDim.x * blockDim.x) {                                                            \
      dequant_byte<T>(packed, absmax_plain, dq_codes, dq_scales, dq_offset, dq_code, nf4, numel,  \
                      blocksize, i, out);                                                          \
    }                                                                                              \
  }

NF4_KERNEL(nf4_dequant_f32, float)
NF4_KERNEL(nf4_dequant_bf16, __nv_bfloat16)
