// Winograd convolution F(m x m, r x r), non-fused: tile transforms in, alpha^2 batched GEMMs,
// tile transform out. The math and the layouts are described in src/ops/winograd.rs; this file
// has the three kernel families that the host chains:
//
// - winograd_gather_f32_a{4,6,8}: planes (N, C, H, W) -> (alpha^2, C, P), or (alpha^2, P, C)
//   with tile_major. One thread per (c, tile): it loads its extent x extent tile (0 outside the
//   plane) into registers, computes L T L^T there and writes alpha^2 values, each to its own
//   (C, P) slab: consecutive threads take consecutive tiles (consecutive channels when
//   tile-major), so every one of those writes is coalesced.
// - winograd_gemm_f32_{t128, t128x64, t64, t96, t128x96}: C[z][xi] (M, N) = A[xi]^T . B[xi]
//   over the k range of split z, A[xi] (K, M) and B[xi] (K, N) row-major, on the shared core in gemm.cuh
//   (blockIdx.z = split * batch + xi). Both operands are read along their rows, so that the core
//   takes 16-byte loads whenever M and N are multiples of 4 (the host's layouts are chosen so).
// - winograd_scatter_f32_a{4,6,8}: (splits x) (alpha^2, C, P) -> planes. One thread per
//   (c, tile): it adds the split-K partials, computes L T L^T, adds the bias, applies the ReLU
//   (relu_f32: max(., 0) with NaN kept NaN, as PyTorch) and stores the in-plane part of its
//   extent x extent corner.
//
// Design rules: alpha is a template parameter (4, 6, 8; the host uses no other) so that the tile
// lives in registers; L arrives zero-padded in the parameter
// struct (constant bank, read uniformly by all threads), so one kernel serves every matrix; all
// reductions are in a fixed order: the results are deterministic.
#include "gemm.cuh"

constexpr int kMaxAlpha = 8;

// Mirrors ops::conv2d::winograd::TileParams field for field.
struct TileParams {
    unsigned n, c, h, w;       // the planes
    unsigned tiles_h, tiles_w;  // tiles per plane
    unsigned step, pad;        // tile (th, tw) starts at pixel (th*step - pad, tw*step - pad)
    unsigned extent;           // tile side in the planes
    unsigned relu;             // scatter: relu_f32
    unsigned splits, split_len;  // scatter: partials to add, split_len elements apart
    unsigned tile_major;         // gather: 1 = write (alpha^2, P, C), else (alpha^2, C, P)
    FastDiv c_div, tiles_div, per_plane_div, tiles_w_div;  // division by C, P, tiles per plane, tiles_w
    float l[kMaxAlpha * kMaxAlpha];  // L, row pitch kMaxAlpha, zero-padded
};

// Mirrors ops::conv2d::winograd::GemmParams field for field.
struct GemmParams {
    unsigned m, n, k, batch, k_chunk;
};

// out = L t L^T, alpha x alpha, all in registers (fully unrolled: every index is a constant).
template <int A>
__device__ __forceinline__ void sandwich(const float (&t)[A][A], float (&out)[A][A], const float* l) {
    float lt[A][A];
#pragma unroll
    for (int i = 0; i < A; ++i)
#pragma unroll
        for (int b = 0; b < A; ++b) {
            float s = 0.0f;
#pragma unroll
            for (int a = 0; a < A; ++a) s = fmaf(l[i * kMaxAlpha + a], t[a][b], s);
            lt[i][b] = s;
        }
#pragma unroll
    for (int i = 0; i < A; ++i)
#pragma unroll
        for (int j = 0; j < A; ++j) {
            float s = 0.0f;
#pragma unroll
            for (int b = 0; b < A; ++b) s = fmaf(lt[i][b], l[j * kMaxAlpha + b], s);
            out[i][j] = s;
        }
}

// Thread index -> (c, tile q) and the tile's first pixel (may be negative: padding). The index is
// the element's position on the alpha^2 side: c * P + q, or q * C + c when TILE_MAJOR. It is below
// 2^31 (the host refuses larger buffers), so FastDiv splits it: no division sequence per thread.
struct TileAt {
    unsigned c, q;
    int row0, col0;
    unsigned long long plane;  // offset of plane (n, c)
};
template <bool TILE_MAJOR>
__device__ __forceinline__ TileAt tile_at(unsigned idx, const TileParams& p) {
    const unsigned per = p.tiles_h * p.tiles_w, tiles = p.n * per;
    TileAt t;
    if (TILE_MAJOR) {
        t.q = fast_div(idx, p.c_div);
        t.c = idx - t.q * p.c;
    } else {
        t.c = fast_div(idx, p.tiles_div);
        t.q = idx - t.c * tiles;
    }
    const unsigned n = fast_div(t.q, p.per_plane_div), r = t.q - n * per;
    const unsigned th = fast_div(r, p.tiles_w_div), tw = r - th * p.tiles_w;
    t.row0 = (int)(th * p.step) - (int)p.pad;
    t.col0 = (int)(tw * p.step) - (int)p.pad;
    t.plane = ((unsigned long long)n * p.c + t.c) * p.h * p.w;
    return t;
}

template <int A, bool TILE_MAJOR>
__device__ __forceinline__ void gather(const float* __restrict__ src, float* __restrict__ out,
                                       const TileParams& p) {
    const unsigned long long len = (unsigned long long)p.c * p.n * p.tiles_h * p.tiles_w;
    FOR_EACH_INDEX(idx, len) {
        const TileAt at = tile_at<TILE_MAJOR>((unsigned)idx, p);
        float t[A][A];
#pragma unroll
        for (int a = 0; a < A; ++a)
#pragma unroll
            for (int b = 0; b < A; ++b) {
                const int r = at.row0 + a, c = at.col0 + b;
                const bool in = a < (int)p.extent && b < (int)p.extent && (unsigned)r < p.h && (unsigned)c < p.w;
                t[a][b] = in ? __ldg(src + at.plane + r * p.w + c) : 0.0f;
            }
        float o[A][A];
        sandwich<A>(t, o, p.l);
#pragma unroll
        for (int i = 0; i < A; ++i)
#pragma unroll
            for (int j = 0; j < A; ++j) out[(unsigned long long)(i * A + j) * len + idx] = o[i][j];
    }
}

template <int A>
__device__ __forceinline__ void scatter(const float* __restrict__ in, const float* __restrict__ bias,
                                        float* __restrict__ dst, const TileParams& p, unsigned has_bias) {
    const unsigned long long len = (unsigned long long)p.c * p.n * p.tiles_h * p.tiles_w;
    FOR_EACH_INDEX(idx, len) {
        const TileAt at = tile_at<false>((unsigned)idx, p);
        float t[A][A];
#pragma unroll
        for (int i = 0; i < A; ++i)
#pragma unroll
            for (int j = 0; j < A; ++j) {
                const float* src = in + (unsigned long long)(i * A + j) * len + idx;
                // The first partial outside the loop: with one split (forward, input grad) the
                // alpha^2 loads are independent and issue back to back. The loop over further
                // partials is not unrolled: unrolled inside the alpha^2 loop it made the a8 kernel
                // ~13k instructions for a loop that usually runs zero times.
                float s = src[0];
#pragma unroll 1
                for (unsigned z = 1; z < p.splits; ++z) s += src[(unsigned long long)z * p.split_len];
                t[i][j] = s;
            }
        float o[A][A];
        sandwich<A>(t, o, p.l);
        const float bv = has_bias ? __ldg(bias + at.c) : 0.0f;
#pragma unroll
        for (int a = 0; a < A; ++a)
#pragma unroll
            for (int b = 0; b < A; ++b) {
                const int r = at.row0 + a, c = at.col0 + b;
                if (a < (int)p.extent && b < (int)p.extent && (unsigned)r < p.h && (unsigned)c < p.w) {
                    const float v = o[a][b] + bv;
                    dst[at.plane + r * p.w + c] = p.relu ? relu_f32(v) : v;
                }
            }
    }
}

#define TILE_KERNELS(A)                                                                                      \
    PTX_KERNEL void __launch_bounds__(128) winograd_gather_f32_a##A(const float* __restrict__ src,           \
                                                                    float* __restrict__ out, TileParams p) { \
        if (p.tile_major)                                                                                    \
            gather<A, true>(src, out, p);                                                                    \
        else                                                                                                 \
            gather<A, false>(src, out, p);                                                                   \
    }                                                                                                        \
    PTX_KERNEL void __launch_bounds__(128)                                                                   \
        winograd_scatter_f32_a##A(const float* __restrict__ in, const float* __restrict__ bias,              \
                                  float* __restrict__ dst, TileParams p, unsigned has_bias) {                \
        scatter<A>(in, bias, dst, p, has_bias);                                                              \
    }

TILE_KERNELS(4)
TILE_KERNELS(6)
TILE_KERNELS(8)

template <class T>
__device__ __forceinline__ void batched_gemm(const float* a, const float* b, float* c, const GemmParams& p) {
    const unsigned xi = blockIdx.z % p.batch, split = blockIdx.z / p.batch;
    const int k_begin = split * p.k_chunk;
    const int k_end = min((int)p.k, k_begin + (int)p.k_chunk);
    const int M = p.m, N = p.n;
    const unsigned long long mn = (unsigned long long)M * N;
    // A(m, k) = a[xi][k][m], B(k, n) = b[xi][k][n]: m and n contiguous.
    gemm_block<T>(strided_loader<false>(a + (unsigned long long)xi * p.k * M, 1, M, M),
                  strided_loader<false>(b + (unsigned long long)xi * p.k * N, 1, N, N),
                  StoreEpi<>{c + ((unsigned long long)split * p.batch + xi) * mn, N}, M, N, k_begin, k_end,
                  blockIdx.y * T::BM, blockIdx.x * T::BN);
}

#define GEMM_KERNEL(TILE, SUFFIX)                                                                        \
    PTX_KERNEL void __launch_bounds__(256, 2) winograd_gemm_##SUFFIX(                                    \
        const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c, GemmParams p) { \
        batched_gemm<TILE>(a, b, c, p);                                                                  \
    }

GEMM_FOR_EACH_TILE(GEMM_KERNEL)
