// FlashAttention-2 style causal GQA attention over packed samples (varlen), bf16 in/out, f32
// accumulation, tensor cores through mma.sync.m16n8k16 (sm_80+). Head dims 64 and 128.
//
// Layouts (all row-major, contiguous):
//   q, out, dout, dq : [n, heads, D]        k, v, dk, dv : [n, kv_heads, D]
//   lse, delta       : [heads, n] f32        cu_seqlens   : [batch + 1] u32
// Query head h reads KV head h / (heads / kv_heads). Token i of sample b (cu[b] <= i < cu[b+1])
// attends to tokens cu[b]..=i. Nothing of size n x n ever reaches global memory: the forward keeps
// the output and the natural-log row log-sum-exp; the backward recomputes P from them.
//
// Fragment conventions of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A 16x16: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8 : b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C 16x8 : c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// Two adjacent C tiles (n 0..7, 8..15) therefore form an A fragment with k 0..15 once packed to
// bf16: that is how P and dS go from one matmul's output to the next one's input in registers.

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

namespace {

constexpr int NUM_THREADS = 128;  // 4 warps
constexpr int BLOCK = 64;         // key rows per tile; also query rows per tile in the backward
constexpr int FWD_ROWS = 128;     // query rows of a forward CTA, 32 per warp
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; `valid == false` writes zeros (src-size 0), reading nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
// 4-byte global -> shared copy (through L1: cp.async.cg takes 16 bytes only); zeros when !valid.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], const bf16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// c += a * b for one 16x8 tile.
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// p[0] += a, p[1] += b for an 8-byte aligned `p` in global memory: one vector atomic on sm_90,
// two scalar ones before. The backward's dQ accumulation is bound by its atomics: the float2 form
// took a quarter off the backward on an H100 (a float4 form, lane pairs swapping halves first,
// measured 2.5% slower than this one).
__device__ __forceinline__ void atomic_add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// Two floats -> packed bf16x2 (lo in the low half: the lower column of a fragment pair).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// ---------------------------------------------------------------------------------------------
// Fragment loads from shared memory (row stride `ld` elements). Each loads 16x16 of A, or the
// B fragments of two adjacent n8 tiles over k16 (b[0], b[1] for tile 0; b[2], b[3] for tile 1).

// A stored as [m][k].
__device__ __forceinline__ void load_a(uint32_t a[4], const bf16* s, int ld, int lane) {
    ldsm_x4(a, s + (lane % 16) * ld + (lane / 16) * 8);
}
// A stored transposed, as [k][m].
__device__ __forceinline__ void load_a_t(uint32_t a[4], const bf16* s, int ld, int lane) {
    ldsm_x4_trans(a, s + ((lane / 16) * 8 + lane % 8) * ld + ((lane / 8) % 2) * 8);
}
// B stored as [n][k] (the usual "K" layout of Q Kᵀ).
__device__ __forceinline__ void load_b(uint32_t b[4], const bf16* s, int ld, int lane) {
    ldsm_x4(b, s + ((lane / 16) * 8 + lane % 8) * ld + ((lane / 8) % 2) * 8);
}
// B stored as [k][n] (the usual "V" layout of P V).
__device__ __forceinline__ void load_b_t(uint32_t b[4], const bf16* s, int ld, int lane) {
    ldsm_x4_trans(b, s + (((lane / 8) % 2) * 8 + lane % 8) * ld + (lane / 16) * 8);
}

// Copies rows `row0..row0+ROWS` of head `head` of a [n, num_heads, D] tensor (rows relative to
// the sample starting at token `seq_start` of length `seq_len`) into shared memory with row stride
// `ld`; rows past the sample are zero-filled.
template <int D, int ROWS = BLOCK, int THREADS = NUM_THREADS>
__device__ __forceinline__ void load_tile(bf16* s, int ld, const bf16* g, int seq_start, int seq_len,
                                          int row0, int num_heads, int head) {
    constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < ROWS * CHUNKS; c += THREADS) {
        int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        bool valid = row0 + r < seq_len;
        const bf16* src =
            valid ? g + ((size_t)(seq_start + row0 + r) * num_heads + head) * D + col : g;
        cp_async16(s + r * ld + col, src, valid);
    }
}

// ---------------------------------------------------------------------------------------------
// Work order. The grid is one-dimensional and ranks CTAs by their work: rank r covers, for every
// (head, sample), the sample's r-th heaviest row block (128 query rows in the forward, 64 key
// rows in the backward). The hardware starts CTAs roughly in index order, so the heaviest blocks
// of all heads start in the first wave and light ones fill the gaps at the end (longest-first
// scheduling). A grid of (blocks, heads, samples) instead starts head 0's light blocks before
// head 15's heavy ones: a causal 2048-token sample then leaves SMs idle for the last ~40% of the
// kernel.
struct WorkItem {
    int rank;   // 0 = the heaviest block of its (head, sample)
    int head;   // in 0..heads_in_grid
    int sample;
};
__device__ __forceinline__ WorkItem work_item(int heads_in_grid, int samples) {
    const int per_rank = heads_in_grid * samples;
    const int rest = blockIdx.x % per_rank;
    return {static_cast<int>(blockIdx.x / per_rank), rest % heads_in_grid, rest / heads_in_grid};
}

// ---------------------------------------------------------------------------------------------
// Pieces of the two forward kernels, per 16-row m tile of a warp (thread rows g and g+8).

// S·scale after the diagonal: keys after their query hidden. `qrow0` and `key0` are the tile's
// first query row and the key block's first key, on one axis.
__device__ __forceinline__ void hide_future_keys(float s[8][4], int qrow0, int key0, int g, int t) {
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            int qrow = qrow0 + g + (e / 2) * 8;
            int key = key0 + nt * 8 + 2 * t + (e % 2);
            if (key > qrow) s[nt][e] = -INFINITY;
        }
}

// Online softmax over one 64-key block: S becomes P = exp2(S·scale_log2 − max), the running
// maxima (log2 units) and this thread's partial sums move on, and O is rescaled. Every row must
// see at least one key of the block, so that the new maximum is finite.
template <int DTILES>
__device__ __forceinline__ void online_softmax(float s[8][4], float row_max[2], float row_sum[2],
                                               float o[DTILES][4], float scale_log2) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        float new_max = fmaxf(row_max[r], mx * scale_log2);
        float alpha = fast_exp2(row_max[r] - new_max);
        row_max[r] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            s[nt][2 * r] = fast_exp2(s[nt][2 * r] * scale_log2 - new_max);
            s[nt][2 * r + 1] = fast_exp2(s[nt][2 * r + 1] * scale_log2 - new_max);
            sum += s[nt][2 * r] + s[nt][2 * r + 1];
        }
        row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < DTILES; ++dt) {
            o[dt][2 * r] *= alpha;
            o[dt][2 * r + 1] *= alpha;
        }
    }
}

// The A fragment of keys 16kk..16kk+15 of P (two adjacent n8 C tiles), packed to bf16.
__device__ __forceinline__ void pack_a(uint32_t a[4], const float c[8][4], int kk) {
    a[0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
    a[1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
    a[2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// acc [16 rows, D] += C · T: C a warp's 16x64 f32 accumulator, packed to bf16 as the A operand
// (k runs over its 64 columns), T a [64][D] tile in shared memory with row stride `ld`. This is
// O += P V in the forward and dV += Pᵀ dO, dK += dSᵀ Q in the backward.
template <int D>
__device__ __forceinline__ void mma_packed(float (&acc)[D / 8][4], const float (&c)[8][4],
                                           const bf16* t, int ld, int lane) {
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4];
        pack_a(a, c, kk);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
            uint32_t b[4];
            load_b_t(b, t + kk * 16 * ld + dp * 16, ld, lane);
            mma16816(acc[2 * dp], a, b[0], b[1]);
            mma16816(acc[2 * dp + 1], a, b[2], b[3]);
        }
    }
}

// out rows `row0 + g`, `row0 + g + 8` of the sample (those inside it) = O / sum, and their
// natural-log LSE.
template <int D>
__device__ __forceinline__ void store_rows(bf16* __restrict__ out, float* __restrict__ lse,
                                           const float o[D / 8][4], const float row_max[2],
                                           const float row_sum[2], int row0, int seq_start,
                                           int seq_len, int n_tokens, int heads, int head, int g,
                                           int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        int row = row0 + g + r * 8;
        if (row >= seq_len) continue;
        int tok = seq_start + row;
        float inv = 1.f / sum;
        bf16* dst = out + ((size_t)tok * heads + head) * D + 2 * t;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
            *reinterpret_cast<__nv_bfloat162*>(dst + dt * 8) =
                __floats2bfloat162_rn(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
        if (t == 0) lse[(size_t)head * n_tokens + tok] = row_max[r] * LN2 + logf(sum);
    }
}

// ---------------------------------------------------------------------------------------------
// Forward over 64-row query tiles, 16 rows per warp: twice the CTAs of the 128-row forward below,
// for grids where those would leave SMs idle (see `launch::forward`). Query block r of a sample
// attends to key blocks 0..=r, so the last block is the heaviest (rank 0). Shared: K tile and V
// tile (the Q tile is staged in the V buffer, then held in registers). V_j loads while
// S = Q K_jᵀ and the softmax run; K_{j+1} loads while O += P V_j.
template <int D>
__device__ void flash_fwd_rows64(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, bf16* __restrict__ out,
                          float* __restrict__ lse, const uint32_t* __restrict__ cu_seqlens,
                          int samples, int n_tokens, int heads, int kv_heads, float scale) {
    constexpr int LD = D + 8;     // padded row: ldmatrix rows land in distinct banks
    constexpr int KSTEPS = D / 16;
    constexpr int DTILES = D / 8;
    __shared__ __align__(16) bf16 sK[BLOCK * LD];
    __shared__ __align__(16) bf16 sV[BLOCK * LD];

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const WorkItem w = work_item(heads, samples);
    const int head = w.head;
    const int seq_start = cu_seqlens[w.sample];
    const int seq_len = cu_seqlens[w.sample + 1] - seq_start;
    const int sample_blocks = (seq_len + BLOCK - 1) / BLOCK;
    if (w.rank >= sample_blocks) return;
    const int m_block = sample_blocks - 1 - w.rank;
    const int kv_head = head / (heads / kv_heads);
    const int n_blocks = m_block + 1;  // causal: key blocks 0..=m_block
    const float scale_log2 = scale * LOG2E;

    load_tile<D>(sV, LD, q, seq_start, seq_len, m_block * BLOCK, heads, head);
    load_tile<D>(sK, LD, k, seq_start, seq_len, 0, kv_heads, kv_head);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    uint32_t qf[KSTEPS][4];  // this warp's 16 query rows x D
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) load_a(qf[ks], sV + warp * 16 * LD + ks * 16, LD, lane);
    __syncthreads();

    float o[DTILES][4];  // [16 rows, D] accumulator
#pragma unroll
    for (int i = 0; i < DTILES; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g+8, scaled to log2 units
    float row_sum[2] = {0.f, 0.f};              // this thread's partial sums

    for (int j = 0; j < n_blocks; ++j) {
        load_tile<D>(sV, LD, v, seq_start, seq_len, j * BLOCK, kv_heads, kv_head);
        cp_async_commit();

        float s[8][4];  // S = Q K_jᵀ: [16 rows, 64 keys]
#pragma unroll
        for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks) {
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                uint32_t b[4];
                load_b(b, sK + np * 16 * LD + ks * 16, LD, lane);
                mma16816(s[2 * np], qf[ks], b[0], b[1]);
                mma16816(s[2 * np + 1], qf[ks], b[2], b[3]);
            }
        }
        // The diagonal block: hide keys after the query (rows and keys relative to the block).
        if (j == m_block) hide_future_keys(s, warp * 16, 0, g, t);
        // Key 0 of every block up to the diagonal is visible to each row.
        online_softmax<DTILES>(s, row_max, row_sum, o, scale_log2);
        cp_async_wait_all();
        __syncthreads();  // V_j visible; every warp is done reading K_j
        if (j + 1 < n_blocks) {
            load_tile<D>(sK, LD, k, seq_start, seq_len, (j + 1) * BLOCK, kv_heads, kv_head);
            cp_async_commit();
        }
        // O += P V_j, P packed to bf16 straight from the S accumulators.
        mma_packed<D>(o, s, sV, LD, lane);
        cp_async_wait_all();
        __syncthreads();  // K_{j+1} visible; every warp is done reading V_j
    }

    store_rows<D>(out, lse, o, row_max, row_sum, m_block * BLOCK + warp * 16, seq_start, seq_len,
                  n_tokens, heads, head, g, t);
}

// ---------------------------------------------------------------------------------------------
// Forward. A CTA takes FWD_ROWS = 128 query rows of one head, warp w rows 32w..32w+31 as two
// m16 tiles, and walks 64-row (BLOCK) key/value tiles. Two row tiles per warp make every K or V
// fragment loaded from shared memory feed 4 MMAs instead of 2: with 16 rows per warp ldmatrix
// traffic bounded the loop (183 TFLOP/s on a causal 2048-token d128 forward on an H100, where
// FlashAttention-2's 32 rows per warp reaches ~300). Query block m (rows 128m..128m+127) attends
// to key blocks 0..=2m+1, clipped to the sample, so the last block is the heaviest (rank 0).
// Dynamic shared memory: Q [128][D+8], K and V [64][D+8] bf16 (36,864 bytes at D=64, 69,632 at
// D=128). Q's A-fragments stay in registers at D=64 (32 of them); at D=128 the O (128 floats a
// thread) and S (64) accumulators leave no room for its 64, so each k-step reloads them from
// shared memory, as FlashAttention-2 does at that head dim. ptxas (CUDA 13.0): D=64 232
// registers on sm_90, 228 on sm_80 (213 with Q reloaded: still 2 CTAs per SM, so holding Q
// costs no occupancy and saves a fifth of the ldmatrix traffic); D=128 254 on both; no spills.
// V_j loads while S = Q K_jᵀ and the softmax run; K_{j+1} loads while O += P V_j.
template <int D>
__device__ void flash_fwd_rows128(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, bf16* __restrict__ out,
                          float* __restrict__ lse, const uint32_t* __restrict__ cu_seqlens,
                          int samples, int n_tokens, int heads, int kv_heads, float scale) {
    constexpr int LD = D + 8;     // padded row: ldmatrix rows land in distinct banks
    constexpr int KSTEPS = D / 16;
    constexpr int DTILES = D / 8;
    constexpr int WARP_ROWS = FWD_ROWS / (NUM_THREADS / 32);  // 32: two m16 tiles
    constexpr bool Q_HELD = D == 64;  // Q's A-fragments in registers across the key loop
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sQ = reinterpret_cast<bf16*>(smem_raw);
    bf16* sK = sQ + FWD_ROWS * LD;
    bf16* sV = sK + BLOCK * LD;

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const WorkItem w = work_item(heads, samples);
    const int head = w.head;
    const int seq_start = cu_seqlens[w.sample];
    const int seq_len = cu_seqlens[w.sample + 1] - seq_start;
    const int sample_blocks = (seq_len + FWD_ROWS - 1) / FWD_ROWS;
    if (w.rank >= sample_blocks) return;
    const int row0 = (sample_blocks - 1 - w.rank) * FWD_ROWS;  // first query row, in the sample
    const int kv_head = head / (heads / kv_heads);
    // Causal: the key blocks holding a key at or before the CTA's last row in the sample.
    const int n_blocks = (min(row0 + FWD_ROWS, seq_len) + BLOCK - 1) / BLOCK;
    // Keys 0..warp_keys are those this warp's rows in the sample see. A key block from warp_keys
    // on is hidden from all of them, and the warp skips its matmuls and softmax: key block 2m+1
    // for warps 0 and 1, every block for a warp wholly past the sample's end.
    const int warp_row0 = row0 + warp * WARP_ROWS;
    const int warp_keys = warp_row0 < seq_len ? min(warp_row0 + WARP_ROWS, seq_len) : 0;
    const float scale_log2 = scale * LOG2E;

    load_tile<D, FWD_ROWS>(sQ, LD, q, seq_start, seq_len, row0, heads, head);
    load_tile<D>(sK, LD, k, seq_start, seq_len, 0, kv_heads, kv_head);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    const bf16* sQw = sQ + warp * WARP_ROWS * LD;  // this warp's 32 query rows
    // Q A-fragments [k-step][row tile]: all of them at D=64; at D=128 slot 0, per k-step.
    uint32_t qf[Q_HELD ? KSTEPS : 1][2][4];
    if constexpr (Q_HELD) {
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks)
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                load_a(qf[ks][mt], sQw + mt * 16 * LD + ks * 16, LD, lane);
    }

    float o[2][DTILES][4] = {};  // [2 row tiles][16 rows, D] accumulator
    // [row tile][rows g and g+8]: running maximum in log2 units, this thread's partial sums.
    float row_max[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
    float row_sum[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

    for (int j = 0; j < n_blocks; ++j) {
        load_tile<D>(sV, LD, v, seq_start, seq_len, j * BLOCK, kv_heads, kv_head);
        cp_async_commit();

        const bool active = j * BLOCK < warp_keys;  // warp-uniform
        float s[2][8][4];  // S = Q K_jᵀ: [2 row tiles][16 rows, 64 keys]
        if (active) {
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ++ks) {
                uint32_t(&a)[2][4] = qf[Q_HELD ? ks : 0];
                if constexpr (!Q_HELD) {
#pragma unroll
                    for (int mt = 0; mt < 2; ++mt)
                        load_a(a[mt], sQw + mt * 16 * LD + ks * 16, LD, lane);
                }
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    uint32_t b[4];
                    load_b(b, sK + np * 16 * LD + ks * 16, LD, lane);
#pragma unroll
                    for (int mt = 0; mt < 2; ++mt) {
                        mma16816(s[mt][2 * np], a[mt], b[0], b[1]);
                        mma16816(s[mt][2 * np + 1], a[mt], b[2], b[3]);
                    }
                }
            }
            // Hide keys after the query: only a block reaching past the warp's first row has any
            // (one of the CTA's last two; keys past the sample's end are only in such a block).
            if (j * BLOCK + BLOCK - 1 > warp_row0) {
#pragma unroll
                for (int mt = 0; mt < 2; ++mt)
                    hide_future_keys(s[mt], warp_row0 + mt * 16, j * BLOCK, g, t);
            }
            // The block's first key is at or before the warp's first row (both are multiples of
            // 32 and j * BLOCK < warp_row0 + 32), so every row sees it.
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
                online_softmax<DTILES>(s[mt], row_max[mt], row_sum[mt], o[mt], scale_log2);
        }
        cp_async_wait_all();
        __syncthreads();  // V_j visible; every warp is done reading K_j
        if (j + 1 < n_blocks) {
            load_tile<D>(sK, LD, k, seq_start, seq_len, (j + 1) * BLOCK, kv_heads, kv_head);
            cp_async_commit();
        }
        // O += P V_j, P packed to bf16 straight from the S accumulators.
        if (active) {
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                uint32_t a[2][4];
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) pack_a(a[mt], s[mt], kk);
#pragma unroll
                for (int dp = 0; dp < D / 16; ++dp) {
                    uint32_t b[4];
                    load_b_t(b, sV + kk * 16 * LD + dp * 16, LD, lane);
#pragma unroll
                    for (int mt = 0; mt < 2; ++mt) {
                        mma16816(o[mt][2 * dp], a[mt], b[0], b[1]);
                        mma16816(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
                    }
                }
            }
        }
        cp_async_wait_all();
        __syncthreads();  // K_{j+1} visible; every warp is done reading V_j
    }

#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
        store_rows<D>(out, lse, o[mt], row_max[mt], row_sum[mt], warp_row0 + mt * 16, seq_start,
                      seq_len, n_tokens, heads, head, g, t);
}

// ---------------------------------------------------------------------------------------------
// Backward preprocess: delta[h, i] = sum_d dO[i, h, d] * O[i, h, d] in f32. One warp per row.
template <int D>
__device__ void flash_bwd_delta(const bf16* __restrict__ out, const bf16* __restrict__ dout,
                                float* __restrict__ delta, int n_tokens, int heads) {
    const int lane = threadIdx.x % 32;
    const size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // tok * heads + h
    if (row >= (size_t)n_tokens * heads) return;
    const bf16* o = out + row * D;
    const bf16* d = dout + row * D;
    float acc = 0.f;
#pragma unroll
    for (int c = lane * 2; c < D; c += 64) {
        float2 of = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(o + c));
        float2 df = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(d + c));
        acc += of.x * df.x + of.y * df.y;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffff, acc, off);
    if (lane == 0) {
        size_t tok = row / heads, h = row % heads;
        delta[h * n_tokens + tok] = acc;
    }
}

// Starts the copies of query block `m_block` of query head `head` for the backward: its Q and dO
// tiles and its lse and delta (threads 0..BLOCK-1, one row each, zero-filled past the sample; the
// consumer turns lse to log2 units, +inf past the sample, once the copies have landed).
template <int D, int THREADS>
__device__ __forceinline__ void load_query_block(bf16* sQ, bf16* sdO, float* sLse, float* sDelta,
                                                 const bf16* q, const bf16* dout,
                                                 const float* lse, const float* delta,
                                                 int seq_start, int seq_len, int m_block, int head,
                                                 int n_tokens, int heads) {
    load_tile<D, BLOCK, THREADS>(sQ, D + 8, q, seq_start, seq_len, m_block * BLOCK, heads, head);
    load_tile<D, BLOCK, THREADS>(sdO, D + 8, dout, seq_start, seq_len, m_block * BLOCK, heads, head);
    if (threadIdx.x < BLOCK) {
        const int row = m_block * BLOCK + threadIdx.x;
        const bool valid = row < seq_len;
        const size_t idx = valid ? (size_t)head * n_tokens + seq_start + row : 0;
        cp_async4(sLse + threadIdx.x, lse + idx, valid);
        cp_async4(sDelta + threadIdx.x, delta + idx, valid);
    }
}

// Backward main pass. A CTA of WARPS warps holds one block of KEYS = 16·WARPS keys of K and V
// and walks, for the query heads of its share of a GQA group, over the 64-row query blocks that
// see any of its keys; warp w owns keys 16w..16w+15 and accumulates their dK and dV in
// registers. Key block r sees every query block from the one holding its first key on, so block
// 0 is the heaviest (rank 0, see `work_item`). The grid's "heads" are kv_heads x splits: with
// splits > 1 (a grid of about one wave, where the CTAs that walk a whole group would set the
// kernel's time) each CTA takes group / splits query heads and writes its partial dK and dV to
// its own slice `split` of dk / dv ([splits, n, kv_heads, D]), which `flash_sum_splits` then
// adds up. Per query block (all in transposed form, rows = keys):
//   Sᵀ = K Qᵀ, Pᵀ = exp(Sᵀ·scale − lse), dV += Pᵀ dO, dPᵀ = V dOᵀ, dSᵀ = Pᵀ∘(dPᵀ − delta)·scale,
//   dK += dSᵀ Q, then dSᵀ goes through shared memory so that the warps compute dQ = dS K over
//   the block's keys (warp w: rows 16(w%4).., of D all with 4 warps, half w/4 with 8) and add
//   it into the f32 dq_accum with atomics. Those atomics bound the kernel (the float2 form took
//   a quarter off it), and there is one per query row and dim for each key block that the row
//   sees: 128-key CTAs (WARPS 8) issue half as many as 64-key ones, and load each query block
//   half as often, for half the CTAs. A warp whose keys all come after the block's last query
//   skips the block's matmuls, and the dQ product stops at the last key that any query sees.
//   The next query block's Q, dO, lse and delta are copied in while the dQ part runs (the one
//   stretch that reads none of them): on an H100 that took the d64 backward from 167 to 142 µs
//   and the d128 one at batch 1 x 2048 from 380 to 371 µs (fwd+bwd, kernel-check).
// Dynamic shared memory: K, V tiles [KEYS][D+8], Q, dO tiles [64][D+8], dSᵀ [KEYS][72] bf16,
// lse and delta [64] f32.
template <int D, int WARPS>
__device__ void flash_bwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                          const bf16* __restrict__ v, const bf16* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ delta,
                          float* __restrict__ dq_accum, bf16* __restrict__ dk,
                          bf16* __restrict__ dv, const uint32_t* __restrict__ cu_seqlens,
                          int samples, int splits, int n_tokens, int heads, int kv_heads,
                          float scale) {
    static_assert(WARPS == 4 || WARPS == 8, "dQ splits its rows and dims over 4 or 8 warps");
    constexpr int THREADS = 32 * WARPS;
    constexpr int KEYS = 16 * WARPS;  // key rows per CTA
    constexpr int LD = D + 8;
    constexpr int LDS = BLOCK + 8;
    constexpr int KSTEPS = D / 16;
    constexpr int DTILES = D / 8;
    constexpr int DQ_HALVES = 8 / WARPS;  // halves of D a warp's dQ rows take: 2 or 1
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sK = reinterpret_cast<bf16*>(smem_raw);
    bf16* sV = sK + KEYS * LD;
    bf16* sQ = sV + KEYS * LD;
    bf16* sdO = sQ + BLOCK * LD;
    bf16* sdS = sdO + BLOCK * LD;                              // [key][query]
    float* sLse = reinterpret_cast<float*>(sdS + KEYS * LDS);  // lse · log2(e)
    float* sDelta = sLse + BLOCK;

    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const WorkItem w = work_item(kv_heads * splits, samples);
    const int kv_head = w.head / splits, split = w.head % splits;
    const int seq_start = cu_seqlens[w.sample];
    const int seq_len = cu_seqlens[w.sample + 1] - seq_start;
    const int key0 = w.rank * KEYS;  // the CTA's first key, in the sample
    if (key0 >= seq_len) return;
    const int group = heads / kv_heads;
    const int members = group / splits;  // query heads of this CTA's share of the group
    dk += (size_t)split * n_tokens * kv_heads * D;
    dv += (size_t)split * n_tokens * kv_heads * D;
    const int first_m_block = key0 / BLOCK;  // the first query block that sees a key here
    const int m_blocks = (seq_len + BLOCK - 1) / BLOCK;
    const float scale_log2 = scale * LOG2E;

    // The walk: for each query head of this CTA's share of the group, its query blocks from the
    // diagonal on.
    const int head_end = kv_head * group + (split + 1) * members;
    int head = kv_head * group + split * members, m_block = first_m_block;
    load_tile<D, KEYS, THREADS>(sK, LD, k, seq_start, seq_len, key0, kv_heads, kv_head);
    load_tile<D, KEYS, THREADS>(sV, LD, v, seq_start, seq_len, key0, kv_heads, kv_head);
    load_query_block<D, THREADS>(sQ, sdO, sLse, sDelta, q, dout, lse, delta, seq_start, seq_len,
                                 m_block, head, n_tokens, heads);
    cp_async_commit();

    float dk_acc[DTILES][4], dv_acc[DTILES][4];  // [16 keys, D] each
#pragma unroll
    for (int i = 0; i < DTILES; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk_acc[i][e] = dv_acc[i][e] = 0.f;

    const bf16* sKw = sK + warp * 16 * LD;  // this warp's keys
    const bf16* sVw = sV + warp * 16 * LD;

    while (head < head_end) {
        cp_async_wait_all();
        if (threadIdx.x < BLOCK) {
            // This thread's own copies have landed. A row past the sample gets lse = +inf, hence
            // P = 0 and no contribution (its delta was zero-filled).
            const bool valid = m_block * BLOCK + (int)threadIdx.x < seq_len;
            sLse[threadIdx.x] = valid ? sLse[threadIdx.x] * LOG2E : INFINITY;
        }
        __syncthreads();

        // Keys from `seen` on (relative to key0) come after every query of the block: their
        // warps skip it, and dQ stops there. Below `KEYS`, query and key ranges overlap and
        // keys after their query are hidden. Key offsets of the block's queries: q_off.
        const int q_off = m_block * BLOCK - key0;  // >= 1 - BLOCK
        const int seen = min(KEYS, q_off + BLOCK);
        const bool active = warp * 16 < seen;  // warp-uniform
        if (active) {
            // Sᵀ = K Qᵀ: [16 keys, 64 queries]
            float p[8][4];
#pragma unroll
            for (int i = 0; i < 8; ++i) p[i][0] = p[i][1] = p[i][2] = p[i][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ++ks) {
                uint32_t a[4];
                load_a(a, sKw + ks * 16, LD, lane);
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    uint32_t b[4];
                    load_b(b, sQ + np * 16 * LD + ks * 16, LD, lane);
                    mma16816(p[2 * np], a, b[0], b[1]);
                    mma16816(p[2 * np + 1], a, b[2], b[3]);
                }
            }
            // Pᵀ = exp(Sᵀ·scale − lse), zero where the key comes after the query.
            const bool diagonal = q_off < KEYS;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int key = warp * 16 + g + (e / 2) * 8;
                    int qcol = nt * 8 + 2 * t + (e % 2);
                    float val = fast_exp2(p[nt][e] * scale_log2 - sLse[qcol]);
                    p[nt][e] = (diagonal && key > q_off + qcol) ? 0.f : val;
                }
            // dV += Pᵀ dO: k runs over the 64 queries.
            mma_packed<D>(dv_acc, p, sdO, LD, lane);
            // dPᵀ = V dOᵀ: [16 keys, 64 queries]
            float ds[8][4];
#pragma unroll
            for (int i = 0; i < 8; ++i) ds[i][0] = ds[i][1] = ds[i][2] = ds[i][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ++ks) {
                uint32_t a[4];
                load_a(a, sVw + ks * 16, LD, lane);
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    uint32_t b[4];
                    load_b(b, sdO + np * 16 * LD + ks * 16, LD, lane);
                    mma16816(ds[2 * np], a, b[0], b[1]);
                    mma16816(ds[2 * np + 1], a, b[2], b[3]);
                }
            }
            // dSᵀ = Pᵀ ∘ (dPᵀ − delta) · scale, also stored to shared memory for dQ.
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    int qcol = nt * 8 + 2 * t + (e % 2);
                    ds[nt][e] = p[nt][e] * (ds[nt][e] - sDelta[qcol]) * scale;
                }
                int key = warp * 16 + g;
                *reinterpret_cast<uint32_t*>(sdS + key * LDS + nt * 8 + 2 * t) =
                    pack_bf16(ds[nt][0], ds[nt][1]);
                *reinterpret_cast<uint32_t*>(sdS + (key + 8) * LDS + nt * 8 + 2 * t) =
                    pack_bf16(ds[nt][2], ds[nt][3]);
            }
            // dK += dSᵀ Q: k runs over the 64 queries.
            mma_packed<D>(dk_acc, ds, sQ, LD, lane);
        }
        // dSᵀ complete, and every warp is done with Q, dO, lse and delta: the next step's
        // copies into them overlap this step's dQ.
        __syncthreads();
        const bool head_done = m_block + 1 == m_blocks;
        const int next_m_block = head_done ? first_m_block : m_block + 1;
        if (!head_done || head + 1 < head_end)
            load_query_block<D, THREADS>(sQ, sdO, sLse, sDelta, q, dout, lse, delta, seq_start,
                                         seq_len, next_m_block, head + head_done, n_tokens, heads);
        cp_async_commit();
        // dQ rows 16(w%4).. = dS K over the keys up to `seen` (in 16-key steps), D in halves
        // to keep the register count down.
        const int key_steps = (seen + 15) / 16;
        const int rows0 = (warp % 4) * 16;
#pragma unroll
        for (int hh = 0; hh < DQ_HALVES; ++hh) {
            const int half = WARPS == 8 ? warp / 4 : hh;
            float dq[DTILES / 2][4];
#pragma unroll
            for (int i = 0; i < DTILES / 2; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KEYS / 16; ++kk) {
                if (kk >= key_steps) break;
                uint32_t a[4];
                load_a_t(a, sdS + kk * 16 * LDS + rows0, LDS, lane);
#pragma unroll
                for (int dp = 0; dp < D / 32; ++dp) {
                    uint32_t b[4];
                    load_b_t(b, sK + kk * 16 * LD + half * (D / 2) + dp * 16, LD, lane);
                    mma16816(dq[2 * dp], a, b[0], b[1]);
                    mma16816(dq[2 * dp + 1], a, b[2], b[3]);
                }
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                int row = m_block * BLOCK + rows0 + g + r * 8;
                if (row >= seq_len) continue;
                float* dst = dq_accum + ((size_t)(seq_start + row) * heads + head) * D +
                             half * (D / 2) + 2 * t;
#pragma unroll
                for (int dt = 0; dt < DTILES / 2; ++dt)
                    atomic_add2(dst + dt * 8, dq[dt][2 * r], dq[dt][2 * r + 1]);
            }
        }
        // No barrier here: the next step writes dSᵀ only after its top barrier, which every
        // warp reaches after its dQ reads.
        head += head_done;
        m_block = next_m_block;
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        int row = key0 + warp * 16 + g + r * 8;
        if (row >= seq_len) continue;
        size_t base = ((size_t)(seq_start + row) * kv_heads + kv_head) * D + 2 * t;
#pragma unroll
        for (int dt = 0; dt < DTILES; ++dt) {
            *reinterpret_cast<__nv_bfloat162*>(dk + base + dt * 8) =
                __floats2bfloat162_rn(dk_acc[dt][2 * r], dk_acc[dt][2 * r + 1]);
            *reinterpret_cast<__nv_bfloat162*>(dv + base + dt * 8) =
                __floats2bfloat162_rn(dv_acc[dt][2 * r], dv_acc[dt][2 * r + 1]);
        }
    }
}

// out[i] = sum over s < splits of parts[s * count + i], f32 sums rounded once to bf16; 8
// elements per thread and step of a grid-stride loop (count is a multiple of 8: head dims are).
// blockIdx.y picks dK or dV.
__device__ void sum_splits(const bf16* __restrict__ dk_parts, const bf16* __restrict__ dv_parts,
                           bf16* __restrict__ dk, bf16* __restrict__ dv, int splits,
                           long long count) {
    const bf16* parts = blockIdx.y == 0 ? dk_parts : dv_parts;
    bf16* out = blockIdx.y == 0 ? dk : dv;
    const long long stride = (long long)gridDim.x * blockDim.x * 8;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < count;
         i += stride) {
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int s = 0; s < splits; ++s) {
            uint4 raw = *reinterpret_cast<const uint4*>(parts + (size_t)s * count + i);
            const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float2 f = __bfloat1622float2(h[e]);
                acc[2 * e] += f.x;
                acc[2 * e + 1] += f.y;
            }
        }
        uint4 packed;
        uint32_t* p = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
        for (int e = 0; e < 4; ++e) p[e] = pack_bf16(acc[2 * e], acc[2 * e + 1]);
        *reinterpret_cast<uint4*>(out + i) = packed;
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points (one per head dim).

#define FLASH_ENTRY_POINTS(D)                                                                   \
    extern "C" __global__ void __launch_bounds__(NUM_THREADS) flash_fwd_rows64_d##D(           \
        const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse,                     \
        const uint32_t* cu_seqlens, int samples, int n_tokens, int heads, int kv_heads,         \
        float scale) {                                                                          \
        flash_fwd_rows64<D>(q, k, v, out, lse, cu_seqlens, samples, n_tokens, heads, kv_heads,  \
                            scale);                                                             \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(NUM_THREADS) flash_fwd_rows128_d##D(          \
        const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse,                     \
        const uint32_t* cu_seqlens, int samples, int n_tokens, int heads, int kv_heads,         \
        float scale) {                                                                          \
        flash_fwd_rows128<D>(q, k, v, out, lse, cu_seqlens, samples, n_tokens, heads, kv_heads, \
                             scale);                                                            \
    }                                                                                           \
    extern "C" __global__ void flash_bwd_delta_d##D(const bf16* out, const bf16* dout,          \
                                                    float* delta, int n_tokens, int heads) {    \
        flash_bwd_delta<D>(out, dout, delta, n_tokens, heads);                                  \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(NUM_THREADS)                                   \
        flash_bwd_d##D(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,           \
                       const float* lse, const float* delta, float* dq_accum, bf16* dk,         \
                       bf16* dv, const uint32_t* cu_seqlens, int samples, int splits,           \
                       int n_tokens, int heads, int kv_heads, float scale) {                    \
        flash_bwd<D, 4>(q, k, v, dout, lse, delta, dq_accum, dk, dv, cu_seqlens, samples,       \
                        splits, n_tokens, heads, kv_heads, scale);                              \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(2 * NUM_THREADS)                               \
        flash_bwd_keys128_d##D(const bf16* q, const bf16* k, const bf16* v, const bf16* dout,   \
                               const float* lse, const float* delta, float* dq_accum, bf16* dk, \
                               bf16* dv, const uint32_t* cu_seqlens, int samples, int splits,   \
                               int n_tokens, int heads, int kv_heads, float scale) {            \
        flash_bwd<D, 8>(q, k, v, dout, lse, delta, dq_accum, dk, dv, cu_seqlens, samples,       \
                        splits, n_tokens, heads, kv_heads, scale);                              \
    }

FLASH_ENTRY_POINTS(64)
FLASH_ENTRY_POINTS(128)

extern "C" __global__ void flash_sum_splits(const bf16* dk_parts, const bf16* dv_parts, bf16* dk,
                                            bf16* dv, int splits, long long count) {
    sum_splits(dk_parts, dv_parts, dk, dv, splits, count);
}
