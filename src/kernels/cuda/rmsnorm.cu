// RMSNorm (HF Llama semantics) forward and backward, one block per row, statistics in f32.
// forward:  rstd = 1 / sqrt(mean(x²) + eps); y = cast(cast(x * rstd) * w)   (two roundings, as HF)
// backward: xhat = x * rstd, g = dy * w, dx = rstd * (g - xhat * mean(g * xhat)),
//           dw = Σ_rows dy * xhat (per-block partials in f32, then a column reduction).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void rmsnorm_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                            uint32_t rows, uint32_t cols, float eps,
                                            float inv_cols, T* __restrict__ y,
                                            float* __restrict__ rstd_out) {
  __shared__ float scratch[32];
  for (uint32_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + (uint64_t)row * cols;
    T* yr = y + (uint64_t)row * cols;
    float ss = 0.0f;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float v = ftrun::to_f32(xr[c]);
      ss += v * v;
    }
    ss = ftrun::block_sum(ss, scratch);
    const float rstd = __frcp_rn(__fsqrt_rn(__fadd_rn(__fmul_rn(ss, inv_cols), eps)));
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const T xhat = ftrun::from_f32<T>(ftrun::to_f32(xr[c]) * rstd);
      yr[c] = ftrun::from_f32<T>(ftrun::to_f32(xhat) * ftrun::to_f32(w[c]));
    }
    if (threadIdx.x == 0) rstd_out[row] = rstd;
  }
}

// dw_partial: null (no dw) or [gridDim.x, cols] f32; needs cols floats of dynamic shared memory.
template <typename T>
__device__ __forceinline__ void rmsnorm_bwd(const T* __restrict__ x, const T* __restrict__ w,
                                            const float* __restrict__ rstd_in,
                                            const T* __restrict__ dy, uint32_t rows, uint32_t cols,
                                            float inv_cols, T* __restrict__ dx,
                                            float* __restrict__ dw_partial) {
  __shared__ float scratch[32];
  extern __shared__ float dw_acc[];
  if (dw_partial != nullptr) {
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) dw_acc[c] = 0.0f;
  }
  for (uint32_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const uint64_t off = (uint64_t)row * cols;
    const float rstd = rstd_in[row];
    float dot = 0.0f;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float xhat = ftrun::to_f32(x[off + c]) * rstd;
      const float dyc = ftrun::to_f32(dy[off + c]);
      dot += dyc * ftrun::to_f32(w[c]) * xhat;
      if (dw_partial != nullptr) dw_acc[c] += dyc * xhat;  // column c is this thread's alone
    }
    const float proj = ftrun::block_sum(dot, scratch) * inv_cols;
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float xhat = ftrun::to_f32(x[off + c]) * rstd;
      const float g = ftrun::to_f32(dy[off + c]) * ftrun::to_f32(w[c]);
      dx[off + c] = ftrun::from_f32<T>((g - xhat * proj) * rstd);
    }
  }
  if (dw_partial != nullptr) {
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x)
      dw_partial[(uint64_t)blockIdx.x * cols + c] = dw_acc[c];
  }
}

// dw[c] = Σ_b partial[b, c] (one thread per column).
extern "C" __global__ void rmsnorm_dw_reduce(const float* __restrict__ partial, uint32_t blocks,
                                             uint32_t cols, float* __restrict__ dw) {
  for (uint32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
    float s = 0.0f;
    for (uint32_t b = 0; b < blocks; ++b) s += partial[(uint64_t)b * cols + c];
    dw[c] = s;
  }
}

#define RMSNORM(SUFFIX, T)                                                                       \
  extern "C" __global__ void rmsnorm_fwd_##SUFFIX(const T* x, const T* w, uint32_t rows,         \
                                                  uint32_t cols, float eps, float inv_cols, T* y, \
                                                  float* rstd) {                                 \
    rmsnorm_fwd(x, w, rows, cols, eps, inv_cols, y, rstd);                                       \
  }                                                                                              \
  extern "C" __global__ void rmsnorm_bwd_##SUFFIX(const T* x, const T* w, const float* rstd,     \
                                                  const T* dy, uint32_t rows, uint32_t cols,     \
                                                  float inv_cols, T* dx, float* dw_partial) {    \
    rmsnorm_bwd(x, w, rstd, dy, rows, cols, inv_cols, dx, dw_partial);                           \
  }
RMSNORM(f32, float)
RMSNORM(bf16, __nv_bfloat16)
