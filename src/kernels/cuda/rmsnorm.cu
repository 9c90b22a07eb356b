// RMSNorm (HF Llama semantics) forward and backward, one block per row, statistics in f32.
// forward:  rstd = 1 / sqrt(mean(x²) + eps); y = cast(cast(x * rstd) * w)   (two roundings, as HF)
// backward: xhat = x * rstd, g = dy * w, dx = rstd * (g - xhat * mean(g * xhat)),
//           dw = Σ_rows dy * xhat (per-block partials in f32, then a column reduction).
// Two versions with the same per-element arithmetic:
// - `rmsnorm_fwd_<T>_k<K>`, `rmsnorm_bwd_<T>_k<K>` (dx only) and `rmsnorm_bwd_dw_<T>_k<K>` (dx and
//   dw partials), K = 1, 2, 4: a thread owns the 8-column groups threadIdx.x + k * blockDim.x
//   (k < K) of the row and keeps them in registers between the reduction and the output pass, so
//   x (and dy) are read once, with 16-byte loads; dw partials live in registers too. K is a
//   template parameter so that a kernel holds only the registers it needs.
//   Needs cols % 8 == 0, 16-byte aligned x, w, dy, y/dx (and dw_partial), cols / 8 <= K *
//   blockDim.x, blockDim.x a multiple of 32 and at most 512; no dynamic shared memory.
// - `rmsnorm_{fwd,bwd}_<T>_scalar`: one column per thread step, any cols and alignment; the bwd
//   needs cols floats of dynamic shared memory for dw.
// The two differ only in how the row's sums (Σx², Σ dy·w·xhat) are split over threads before
// the block reduction, i.e. in the f32 summation order.
#include "common.cuh"

// Most threads per row block of the vector kernels (their register budget assumes it).
constexpr int kRowVecMaxThreads = 512;

template <typename T>
__device__ __forceinline__ void rmsnorm_fwd_scalar(const T* __restrict__ x, const T* __restrict__ w,
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
__device__ __forceinline__ void rmsnorm_bwd_scalar(const T* __restrict__ x, const T* __restrict__ w,
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

template <typename T, int K>
__device__ __forceinline__ void rmsnorm_fwd_vec(const T* __restrict__ x, const T* __restrict__ w,
                                                uint32_t rows, uint32_t cols, float eps,
                                                float inv_cols, T* __restrict__ y,
                                                float* __restrict__ rstd_out) {
  __shared__ float scratch[32];
  const uint32_t groups = cols / 8;
  for (uint32_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + (uint64_t)row * cols;
    T* yr = y + (uint64_t)row * cols;
    ftrun::Pack8<T> xp[K];  // this thread's groups of the row, as stored
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const uint32_t g = threadIdx.x + k * blockDim.x;
      if (g < groups) {
        xp[k] = ftrun::load_pack(xr + 8 * g);
        float v[8];
        ftrun::unpack(xp[k], v);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss += v[e] * v[e];
      }
    }
    ss = ftrun::block_sum(ss, scratch);
    const float rstd = __frcp_rn(__fsqrt_rn(__fadd_rn(__fmul_rn(ss, inv_cols), eps)));
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const uint32_t g = threadIdx.x + k * blockDim.x;
      if (g < groups) {
        float v[8], wv[8], out[8];
        ftrun::unpack(xp[k], v);
        ftrun::load8(w + 8 * g, wv);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const T xhat = ftrun::from_f32<T>(v[e] * rstd);
          out[e] = ftrun::to_f32(xhat) * wv[e];  // rounded to T by store8
        }
        ftrun::store8(yr + 8 * g, out);
      }
    }
    if (threadIdx.x == 0) rstd_out[row] = rstd;
  }
}

// DW: also write this block's dw partial row to dw_partial [gridDim.x, cols] f32 (else unused).
template <typename T, int K, bool DW>
__device__ __forceinline__ void rmsnorm_bwd_vec(const T* __restrict__ x, const T* __restrict__ w,
                                                const float* __restrict__ rstd_in,
                                                const T* __restrict__ dy, uint32_t rows,
                                                uint32_t cols, float inv_cols, T* __restrict__ dx,
                                                float* __restrict__ dw_partial) {
  __shared__ float scratch[32];
  const uint32_t groups = cols / 8;
  float dw_acc[K][8];  // Σ over this block's rows of dy * xhat, for this thread's columns
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int e = 0; e < 8; ++e) dw_acc[k][e] = 0.0f;
  for (uint32_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const uint64_t off = (uint64_t)row * cols;
    const float rstd = rstd_in[row];
    ftrun::Pack8<T> xp[K], dyp[K];
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const uint32_t g = threadIdx.x + k * blockDim.x;
      if (g < groups) {
        xp[k] = ftrun::load_pack(x + off + 8 * g);
        dyp[k] = ftrun::load_pack(dy + off + 8 * g);
        float xv[8], dyv[8], wv[8];
        ftrun::unpack(xp[k], xv);
        ftrun::unpack(dyp[k], dyv);
        ftrun::load8(w + 8 * g, wv);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float xhat = xv[e] * rstd;
          const float dyc = dyv[e];
          dot += dyc * wv[e] * xhat;
          if (DW) dw_acc[k][e] += dyc * xhat;
        }
      }
    }
    const float proj = ftrun::block_sum(dot, scratch) * inv_cols;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const uint32_t g = threadIdx.x + k * blockDim.x;
      if (g < groups) {
        float xv[8], dyv[8], wv[8], out[8];
        ftrun::unpack(xp[k], xv);
        ftrun::unpack(dyp[k], dyv);
        ftrun::load8(w + 8 * g, wv);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float xhat = xv[e] * rstd;
          const float gc = dyv[e] * wv[e];
          out[e] = (gc - xhat * proj) * rstd;  // rounded to T by store8
        }
        ftrun::store8(dx + off + 8 * g, out);
      }
    }
  }
  if (DW) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const uint32_t g = threadIdx.x + k * blockDim.x;
      if (g < groups) ftrun::store8(dw_partial + (uint64_t)blockIdx.x * cols + 8 * g, dw_acc[k]);
    }
  }
}

#define RMSNORM_VEC(SUFFIX, T, K)                                                                 \
  extern "C" __global__ void __launch_bounds__(kRowVecMaxThreads)                                 \
      rmsnorm_fwd_##SUFFIX##_k##K(const T* x, const T* w, uint32_t rows, uint32_t cols,           \
                                  float eps, float inv_cols, T* y, float* rstd) {                 \
    rmsnorm_fwd_vec<T, K>(x, w, rows, cols, eps, inv_cols, y, rstd);                              \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(kRowVecMaxThreads)                                 \
      rmsnorm_bwd_##SUFFIX##_k##K(const T* x, const T* w, const float* rstd, const T* dy,         \
                                  uint32_t rows, uint32_t cols, float inv_cols, T* dx,            \
                                  float* dw_partial) {                                            \
    rmsnorm_bwd_vec<T, K, false>(x, w, rstd, dy, rows, cols, inv_cols, dx, dw_partial);           \
  }                                                                                               \
  extern "C" __global__ void __launch_bounds__(kRowVecMaxThreads)                                 \
      rmsnorm_bwd_dw_##SUFFIX##_k##K(const T* x, const T* w, const float* rstd, const T* dy,      \
                                     uint32_t rows, uint32_t cols, float inv_cols, T* dx,         \
                                     float* dw_partial) {                                         \
    rmsnorm_bwd_vec<T, K, true>(x, w, rstd, dy, rows, cols, inv_cols, dx, dw_partial);            \
  }

#define RMSNORM(SUFFIX, T)                                                                        \
  RMSNORM_VEC(SUFFIX, T, 1)                                                                       \
  RMSNORM_VEC(SUFFIX, T, 2)                                                                       \
  RMSNORM_VEC(SUFFIX, T, 4)                                                                       \
  extern "C" __global__ void rmsnorm_fwd_##SUFFIX##_scalar(const T* x, const T* w, uint32_t rows, \
                                                           uint32_t cols, float eps,              \
                                                           float inv_cols, T* y, float* rstd) {   \
    rmsnorm_fwd_scalar(x, w, rows, cols, eps, inv_cols, y, rstd);                                 \
  }                                                                                               \
  extern "C" __global__ void rmsnorm_bwd_##SUFFIX##_scalar(                                       \
      const T* x, const T* w, const float* rstd, const T* dy, uint32_t rows, uint32_t cols,       \
      float inv_cols, T* dx, float* dw_partial) {                                                 \
    rmsnorm_bwd_scalar(x, w, rstd, dy, rows, cols, inv_cols, dx, dw_partial);                     \
  }
RMSNORM(f32, float)
RMSNORM(bf16, __nv_bfloat16)
