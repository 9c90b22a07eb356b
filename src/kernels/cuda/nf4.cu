// NF4 dequantization (bitsandbytes layout), bit-exact with quant::nf4::dequantize_nf4:
//   absmax[b] = code[codes[b]] * scales[b / 256] + offset   (double quant: two roundings)
//   w[e]      = NF4[nibble(e)] * absmax[e / blocksize]      (f32 product, then one cast)
// __fmul_rn / __fadd_rn keep nvcc from contracting the absmax into an FMA (one rounding).
#include "common.cuh"

struct Nf4Table {
  float v[16];
};

// The block scale of block `block`: plain, or double-quantized (two roundings, no FMA).
__device__ __forceinline__ float block_absmax(const float* __restrict__ absmax_plain,
                                              const uint8_t* __restrict__ dq_codes,
                                              const float* __restrict__ dq_scales,
                                              float dq_offset, const float* __restrict__ dq_code,
                                              uint32_t block) {
  if (absmax_plain != nullptr) return absmax_plain[block];
  return __fadd_rn(__fmul_rn(dq_code[dq_codes[block]], dq_scales[block / 256]), dq_offset);
}

// Eight adjacent outputs in one 16-byte (bf16) or two 16-byte (f32) stores; `out + e` is aligned
// for them because e is a multiple of 8 and the output is a fresh allocation.
__device__ __forceinline__ void store8(float* out, uint32_t e, const float (&v)[8]) {
  float4* o = reinterpret_cast<float4*>(out + e);
  o[0] = make_float4(v[0], v[1], v[2], v[3]);
  o[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(__nv_bfloat16* out, uint32_t e, const float (&v)[8]) {
  __nv_bfloat162 h[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
  *reinterpret_cast<uint4*>(out + e) = *reinterpret_cast<const uint4*>(h);
}

// Grid-stride over 4-byte words of packed codes (8 values of one quantization block, when
// `vec_ok`: the block size is a multiple of 8 and the codes are 4-byte aligned): one 32-bit load,
// one block-scale lookup and 16 (bf16) or 32 (f32) bytes stored per thread. The bytes past the
// last whole word (and everything when !vec_ok) go one byte (two values) at a time. The code table
// sits in shared memory: indexing the by-value kernel argument with a data-dependent nibble would
// spill it to local memory in every thread. 32-bit indices: the host checks numel < 2^31.
template <typename T>
__device__ __forceinline__ void dequant(const uint8_t* __restrict__ packed, uint32_t n_bytes,
                                        const float* __restrict__ absmax_plain,
                                        const uint8_t* __restrict__ dq_codes,
                                        const float* __restrict__ dq_scales, float dq_offset,
                                        const float* __restrict__ dq_code, const Nf4Table& nf4,
                                        uint32_t numel, uint32_t blocksize, int vec_ok,
                                        T* __restrict__ out) {
  __shared__ float table[16];
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < 16; ++j) table[j] = nf4.v[j];
  }
  __syncthreads();
  const uint32_t stride = gridDim.x * blockDim.x;
  const uint32_t tid = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t n_words = vec_ok ? n_bytes / 4 : 0;
  for (uint32_t w = tid; w < n_words; w += stride) {
    const uint32_t word = reinterpret_cast<const uint32_t*>(packed)[w];
    const uint32_t e = 8 * w;
    const float absmax =
        block_absmax(absmax_plain, dq_codes, dq_scales, dq_offset, dq_code, e / blocksize);
    float v[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t byte = (word >> (8 * j)) & 0xFF;  // little endian: byte j is code pair j
      v[2 * j] = __fmul_rn(table[byte >> 4], absmax);
      v[2 * j + 1] = __fmul_rn(table[byte & 0x0F], absmax);
    }
    if (e + 8 <= numel) {
      store8(out, e, v);
    } else {
      for (uint32_t j = 0; e + j < numel; ++j) out[e + j] = ftrun::from_f32<T>(v[j]);
    }
  }
  for (uint32_t i = 4 * n_words + tid; i < n_bytes; i += stride) {
    const uint8_t byte = packed[i];
    const uint32_t e = 2 * i;  // both nibbles share a block: the block size is even
    const float absmax =
        block_absmax(absmax_plain, dq_codes, dq_scales, dq_offset, dq_code, e / blocksize);
    const float hi = __fmul_rn(table[byte >> 4], absmax);
    const float lo = __fmul_rn(table[byte & 0x0F], absmax);
    out[e] = ftrun::from_f32<T>(hi);
    if (e + 1 < numel) out[e + 1] = ftrun::from_f32<T>(lo);  // else: the padding nibble
  }
}

// `absmax_plain` is null for double quantization.
#define NF4_KERNEL(NAME, T)                                                                        \
  extern "C" __global__ void NAME(const uint8_t* __restrict__ packed, uint32_t n_bytes,            \
                                  const float* __restrict__ absmax_plain,                          \
                                  const uint8_t* __restrict__ dq_codes,                            \
                                  const float* __restrict__ dq_scales, float dq_offset,            \
                                  const float* __restrict__ dq_code, Nf4Table nf4, uint32_t numel, \
                                  uint32_t blocksize, int vec_ok, T* __restrict__ out) {           \
    dequant<T>(packed, n_bytes, absmax_plain, dq_codes, dq_scales, dq_offset, dq_code, nf4, numel, \
               blocksize, vec_ok, out);                                                            \
  }

NF4_KERNEL(nf4_dequant_f32, float)
NF4_KERNEL(nf4_dequant_bf16, __nv_bfloat16)
