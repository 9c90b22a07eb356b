// Shared helpers of ftrun's kernels: dtype conversions with explicit rounding.
// Kernels are templated over the storage type T (float or __nv_bfloat16) and do their math in f32.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

namespace ftrun {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// Round to nearest even, as candle / half's f32 -> bf16 cast on the CPU.
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- 8-wide vector access (16-byte loads/stores) ----
// `Pack8<T>` holds 8 consecutive elements of T exactly as stored: one 16-byte word for bf16, two
// for f32. Its pointer must be 16-byte aligned (the Rust launchers check the addresses and pick
// a kernel's scalar variant otherwise). Unpacking is exact; packing rounds each element with
// `from_f32` (the same rounding as the scalar kernels), so vector and scalar paths agree bit for bit.
template <typename T> struct Pack8;
template <> struct alignas(16) Pack8<__nv_bfloat16> { uint4 r; };
template <> struct alignas(16) Pack8<float> { float4 lo, hi; };

template <typename T> __device__ __forceinline__ Pack8<T> load_pack(const T* p) {
  return *reinterpret_cast<const Pack8<T>*>(p);
}
template <typename T> __device__ __forceinline__ void store_pack(T* p, const Pack8<T>& v) {
  *reinterpret_cast<Pack8<T>*>(p) = v;
}

// bf16 is the top half of an f32: element 2k is the low 16 bits of word k (little endian).
__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ uint32_t bf16_pair(float lo, float hi) {
  return (uint32_t)__bfloat16_as_ushort(from_f32<__nv_bfloat16>(lo)) |
         ((uint32_t)__bfloat16_as_ushort(from_f32<__nv_bfloat16>(hi)) << 16);
}

__device__ __forceinline__ void unpack(const Pack8<__nv_bfloat16>& p, float (&v)[8]) {
  const uint32_t w[4] = {p.r.x, p.r.y, p.r.z, p.r.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[2 * k] = bf16_lo(w[k]);
    v[2 * k + 1] = bf16_hi(w[k]);
  }
}
__device__ __forceinline__ void unpack(const Pack8<float>& p, float (&v)[8]) {
  v[0] = p.lo.x, v[1] = p.lo.y, v[2] = p.lo.z, v[3] = p.lo.w;
  v[4] = p.hi.x, v[5] = p.hi.y, v[6] = p.hi.z, v[7] = p.hi.w;
}

template <typename T> __device__ __forceinline__ Pack8<T> pack(const float (&v)[8]);
template <> __device__ __forceinline__ Pack8<__nv_bfloat16> pack(const float (&v)[8]) {
  Pack8<__nv_bfloat16> p;
  p.r = make_uint4(bf16_pair(v[0], v[1]), bf16_pair(v[2], v[3]), bf16_pair(v[4], v[5]),
                   bf16_pair(v[6], v[7]));
  return p;
}
template <> __device__ __forceinline__ Pack8<float> pack(const float (&v)[8]) {
  Pack8<float> p;
  p.lo = make_float4(v[0], v[1], v[2], v[3]);
  p.hi = make_float4(v[4], v[5], v[6], v[7]);
  return p;
}

// 8 elements at p (16-byte aligned) as f32 / rounded from f32.
template <typename T> __device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  unpack(load_pack(p), v);
}
template <typename T> __device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  store_pack(p, pack<T>(v));
}

// Sum over a block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory; the function synchronizes before reusing it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // earlier readers of scratch are done
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace ftrun
