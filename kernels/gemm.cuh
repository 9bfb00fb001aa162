// The one SGEMM core behind conv2d (implicit GEMM and Winograd) and dense, forward and backward:
//
//     C[m][n] = sum_{k in [k_begin, k_end)} A(m, k) * B(k, n),     then epilogue(m, n, C[m][n])
//
// A and B are never materialised: they are *loader functors* `a(m, k)` and `b(k, n)` that read
// the operand straight from the tensor (conv: the im2col matrix is computed on the fly, so no
// (Cin*KH*KW) x (N*OH*OW) buffer exists). The epilogue functor stores C (adding the bias, applying
// ReLU, or writing a split-K partial). The core bounds-checks every row, column and k, so M, N
// and K may be anything (1, 5, 6400, ...): out-of-range operand elements load as 0 and
// out-of-range outputs are not stored.
//
// Design (classic register-blocked SGEMM):
// - 256 threads per block, viewed as a 16 x 16 grid (tx, ty); each warp is a 4 x 8 patch of it
//   (warp tiling: fewer distinct shared-memory reads per warp than a 2 x 16 row).
// - Block tile BM x BN (128 x 128; 128 x 64 or 64 x 64 where 128 x 128 blocks fill the GPU's
//   waves badly; 96 x 128 or 128 x 96 where M or N leaves a 128-wide tile a quarter empty, as
//   AlexNet's 96 channels do: see ops::gemm::plan::Planner::launch), k-tile BK = 8.
// - Each thread owns a TM x TN register micro-tile (8 x 8, 8 x 4, 6 x 8, 8 x 6 or 4 x 4): rows
//   ty*4 + {0..3} (+ 64 + ty*4 + {0..3}, or + 64 + ty*2 + {0, 1} when TM is 6), columns likewise
//   with tx, so that its operands are float4 (float2) reads from shared memory and the 8 threads
//   of a warp that share ty read the same A float4 (a broadcast).
// - Shared memory holds A transposed (As[k][m]) and B as Bs[k][n]: the inner loop reads a column
//   of A and a row of B per k. Rows are padded by 4 floats: stores from k-fast loaders then hit
//   32 distinct banks, and float4 alignment is kept (row pitch 4*(BM+4) bytes is a multiple of 16).
// - A 3-stage cp.async pipeline: while the block computes on k-tile i, tiles i+1 and i+2 are being
//   copied global -> shared by cp.async (sm_80+), which needs no registers for data in flight;
//   padding and out-of-range elements are zero-filled copies. One __syncthreads per tile.
// - Each loader says which index is contiguous in memory (K_FAST): the tile load maps consecutive
//   threads to consecutive k (K_FAST) or to consecutive m / n, so global reads coalesce.
// - 16-byte copies where the layout allows: an operand read along m (A) or n (B) whose rows are
//   whole, aligned groups of 4 (plain matrices: dense, Winograd) is copied one 16-byte cp.async
//   per group, a quarter of the copy instructions and their address math (Vec4Loads). The block
//   decides once, outside the k loop (gemm_block instantiates the pipeline both ways). A k-fast
//   operand cannot take them: its groups of 4 along k are a column of As[k][m].
// - The epilogue gets the results two columns at a time where its layout allows (Epilogue
//   concept below: one 8-byte store per pair), else one by one.
// - fp32 accumulation. The products: fp32 FFMAs (FfmaMicro, the default), or tensor-core
//   mma.sync in TF32, once or three times per product, or in BF16 (MmaMicro: GemmMath below).
//   Only the micro-kernel differs: loaders, pipeline and epilogues are the same code for all four.
// Indices are 32-bit: the host refuses tensors of 2^31 elements or more.
#pragma once
#include "common.cuh"

// The arithmetic of the inner loop. Every variant reads the same fp32 operands and accumulates in
// fp32; they differ in how each product a * b is formed:
// - Ffma: fp32 FFMAs on the CUDA cores (FfmaMicro), exact products: PyTorch's "strict fp32".
// - Tf32: one tensor-core mma.sync per product (MmaMicro), a and b first rounded to TF32 (10
//   mantissa bits, 2^-11 relative each): up to ~2^-10 per product, like PyTorch's default TF32
//   convolutions.
// - Tf32x3: three mma.sync, with a = ab + as split into a TF32 value and a TF32 remainder (and b
//   alike): a * b ~= ab*bb + ab*bs + as*bb. What is lost (as*bs, and as's own truncation) is
//   ~2^-21 of a * b, so the result is about as accurate as fp32 FFMAs (the "3xTF32" of CUTLASS),
//   at tensor-core throughput (tests/gemm_math.rs holds it to the FFMA kernels' tolerance).
// - Bf16: one tensor-core mma.sync per product, a and b rounded to bfloat16 (8 significant bits,
//   7 stored; to nearest even: 2^-8 relative each): up to ~2^-7 per product, as under PyTorch's
//   bf16 autocast (which also stores activations in bf16; here every tensor stays fp32).
enum class GemmMath { Ffma, Tf32, Tf32x3, Bf16 };

template <int BM_, int BN_, int TM_, int TN_, GemmMath MATH_ = GemmMath::Ffma>
struct GemmTile {
    static constexpr int BM = BM_, BN = BN_, TM = TM_, TN = TN_, BK = 8, THREADS = 256, STAGES = 3;
    static constexpr GemmMath MATH = MATH_;
    // Row padding of the shared tiles, in floats: a row pitch of 4 mod 32 suits the FFMA loop's
    // float4 reads and the k-fast loaders' 4-byte stores (32 distinct banks); the TF32 fragment
    // reads (k = t or t + 4, m = g + const, for lane 4g + t) need 8 mod 32 to hit 32 distinct
    // banks, the BF16 ones (k = 2t or 2t + 1) 4 mod 32.
    static constexpr int PAD = MATH_ == GemmMath::Tf32 || MATH_ == GemmMath::Tf32x3 ? 8 : 4;
    // The 16 x 16 thread grid covers the tile with TM x TN micro-tiles made of a float4 chunk and,
    // 64 further, a float4 or float2 chunk (FfmaMicro: micro_at); MmaMicro keeps the same TM * TN
    // accumulators per thread.
    static_assert(BM == 16 * TM && BN == 16 * TN, "tile = 16 threads x micro-tile");
    static_assert((TM == 4 || TM == 6 || TM == 8) && (TN == 4 || TN == 6 || TN == 8), "chunks of 4 (+ 4 or 2)");
};
template <GemmMath M>
using Tile128Of = GemmTile<128, 128, 8, 8, M>;
template <GemmMath M>
using Tile128x64Of = GemmTile<128, 64, 8, 4, M>;  // for grids whose last 128 x 128 wave would be nearly empty
template <GemmMath M>
using Tile64Of = GemmTile<64, 64, 4, 4, M>;
// For a side of 96 (AlexNet's conv1 output and conv2 input channels), which 128-wide tiles leave a
// quarter empty: M = 96 rows, or N = 96 columns.
template <GemmMath M>
using Tile96Of = GemmTile<96, 128, 6, 8, M>;
template <GemmMath M>
using Tile128x96Of = GemmTile<128, 96, 8, 6, M>;
using Tile128 = Tile128Of<GemmMath::Ffma>;
using Tile128x64 = Tile128x64Of<GemmMath::Ffma>;
using Tile64 = Tile64Of<GemmMath::Ffma>;

// Instantiates KERNELS(tile, suffix) once per GemmMath: suffixes f32_<s>, tf32_<s>, 3xtf32_<s> and
// bf16_<s> (kernel names such as dense_fwd_3xtf32_t128; ops::gemm::math's gemm_kernel_names!
// mirrors them).
#define GEMM_FOR_EACH_MATH(KERNELS, TILE_OF, SUFFIX)    \
    KERNELS(TILE_OF<GemmMath::Ffma>, f32_##SUFFIX)      \
    KERNELS(TILE_OF<GemmMath::Tf32>, tf32_##SUFFIX)     \
    KERNELS(TILE_OF<GemmMath::Tf32x3>, 3xtf32_##SUFFIX) \
    KERNELS(TILE_OF<GemmMath::Bf16>, bf16_##SUFFIX)

// Instantiates KERNELS(tile, suffix) for every block tile (ops::gemm::plan::Tile: t128, t128x64,
// t64, t96, t128x96) and GemmMath: one list for every kernel family, so that they cannot drift.
#define GEMM_FOR_EACH_TILE(KERNELS)                    \
    GEMM_FOR_EACH_MATH(KERNELS, Tile128Of, t128)       \
    GEMM_FOR_EACH_MATH(KERNELS, Tile128x64Of, t128x64) \
    GEMM_FOR_EACH_MATH(KERNELS, Tile64Of, t64)         \
    GEMM_FOR_EACH_MATH(KERNELS, Tile96Of, t96)         \
    GEMM_FOR_EACH_MATH(KERNELS, Tile128x96Of, t128x96)

// cp.async (sm_80+): an asynchronous 4-byte global -> shared copy; with `full` false it copies
// nothing and writes 0 (src-size 0), which is how padding and out-of-range elements load.
// The host emulation (emu/, PTXGRAD_HOST_EMU) keeps a GPU's ordering: a copy lands only at the
// cp_async_wait that completes its group, so reading a stage too early reads stale data there too.
// cp_async_f32x4 is the 16-byte form, for 4 consecutive elements, both addresses 16-byte aligned;
// it bypasses L1 (.cg): each element of a plain matrix is read by one block once per k-tile.
// SmemPtr: a cp.async destination. On a GPU, its 32-bit shared-window address: converting a
// generic pointer reads the block's cluster id and costs a few instructions per copy, so
// Vec4Loads converts once, outside the k loop, and adds offsets (the 4-byte path still converts
// per copy). In the emulation, the pointer itself.
#ifdef PTXGRAD_HOST_EMU
using SmemPtr = float*;
__device__ __forceinline__ SmemPtr smem_ptr(float* p) { return p; }
__device__ __forceinline__ SmemPtr smem_add(SmemPtr p, int floats) { return p + floats; }
__device__ __forceinline__ void cp_async_f32(float* dst, const float* src, bool full) { emu_cp_async(dst, src, 1, full); }
__device__ __forceinline__ void cp_async_f32x4(float* dst, const float* src, bool full) {
    // A GPU faults on a 16-byte copy from or to an address that is not a multiple of 16.
    if (reinterpret_cast<unsigned long long>(src) % 16 || reinterpret_cast<unsigned long long>(dst) % 16)
        emu_fault("a 16-byte cp.async with an address that is not 16-byte aligned");
    emu_cp_async(dst, src, 4, full);
    emu_count_vec4_copy();
}
__device__ __forceinline__ void cp_async_commit() { emu_cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    emu_cp_async_wait(N);
}
#else
struct SmemPtr {
    unsigned addr;
};
__device__ __forceinline__ SmemPtr smem_ptr(float* p) { return SmemPtr{(unsigned)__cvta_generic_to_shared(p)}; }
__device__ __forceinline__ SmemPtr smem_add(SmemPtr p, int floats) { return SmemPtr{p.addr + 4u * floats}; }
__device__ __forceinline__ void cp_async_f32(float* dst, const float* src, bool full) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(full ? 4 : 0));
}
__device__ __forceinline__ void cp_async_f32x4(SmemPtr dst, const float* src, bool full) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst.addr), "l"(src), "r"(full ? 16 : 0));
}
__device__ __forceinline__ void cp_async_f32x4(float* dst, const float* src, bool full) {
    cp_async_f32x4(smem_ptr(dst), src, full);
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// An epilogue's paired store: v0, v1 at p, p + 1 in one 8-byte store. A GPU faults on a vector
// access whose address is not a multiple of its size; so does the emulation, which also counts the
// store (ptxgrad_emu::vec_stores), so that tests see which path ran.
__device__ __forceinline__ void store_f32x2(float* p, float v0, float v1) {
#ifdef PTXGRAD_HOST_EMU
    if (reinterpret_cast<unsigned long long>(p) % 8) {
        emu_fault("an 8-byte store to an address that is not a multiple of 8");
        return;
    }
    emu_count_vec_store();
#endif
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
}

// Whether the epilogue takes paired stores in this block (EP::VEC and its uniform vec()).
template <class EP>
__device__ __forceinline__ bool epilogue_vec(const EP& ep) {
    if constexpr (EP::VEC)
        return ep.vec();
    else
        return false;
}

// Whether p is 16-byte aligned (the epilogues' vec() tests).
__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<unsigned long long>(p) % 16 == 0; }

// The 16-byte tile loads of an operand whose mn index is contiguous (a loader with vec4()): the
// BK x BMN tile is BK * BMN / 4 groups of 4, group e = (k row e / (BMN/4), columns 4 * (e % (BMN/4))
// + 0..3), so a warp reads whole pieces of k rows (512 bytes for 128-wide tiles). Thread t copies group
// t (the tiles have at most one group per thread), the same group of every k-tile. The pipeline
// issues the k-tiles in order, one BK apart, so the group's source is a running pointer (BK rows
// further each tile) and its k a running count; its mn bounds test is computed once, and its place
// in stage 0 is converted to a shared address once (stage st adds st stage sizes). A group is
// wholly in or wholly out of the matrix (the extent is a multiple of 4); out-of-range groups are
// zero-filled.
template <int BMN, int BK, int THREADS, int PAD>
struct Vec4Loads {
    static constexpr int GROUPS = BMN * BK / 4, PER_ROW = BMN / 4, STAGE = BK * (BMN + PAD);
    static_assert(GROUPS <= THREADS, "at most one group per thread");
    const float* src;  // the group's element (mn, k) of the next k-tile
    const float* any;  // a valid address (the source of zero-fill copies)
    SmemPtr dst;       // the group's place in stage 0
    int k, step;       // k of the next tile's group; BK rows of the operand
    bool active, in_mn;  // has a group; the group is inside the matrix's mn extent

    // stages: the pipeline's tiles of this operand, [stage][k][mn]; the first issue copies the
    // k-tile that starts at k_begin.
    template <class L>
    __device__ __forceinline__ Vec4Loads(const L& l, int mn0, int MN, float (*stages)[BK][BMN + PAD], int k_begin) {
        const int e = threadIdx.x;
        active = GROUPS == THREADS || e < GROUPS;
        const int kk = e / PER_ROW, mn4 = (e % PER_ROW) * 4;
        in_mn = active && mn0 + mn4 < MN;
        k = k_begin + kk;
        src = l.ptr(l.at(in_mn ? mn0 + mn4 : 0), l.kat(0)) + k * l.k_stride;
        any = l.any();
        dst = smem_ptr(&stages[0][kk][mn4]);
        step = BK * l.k_stride;
    }
    // Copies the group of the next k-tile into stage st.
    __device__ __forceinline__ void issue(int st, int k_end) {
        if (!active) return;
        const bool in = in_mn && k < k_end;
        cp_async_f32x4(smem_add(dst, st * STAGE), in ? src : any, in);
        src += step;
        k += BK;
    }
};

// A Vec4Loads where the operand takes 16-byte loads, else nothing.
struct NoVec4Loads {};
template <bool ON, int BMN, int BK, int THREADS, int PAD, class L>
__device__ __forceinline__ auto vec4_loads(const L& l, int mn0, int MN, float (*stages)[BK][BMN + PAD], int k_begin) {
    if constexpr (ON)
        return Vec4Loads<BMN, BK, THREADS, PAD>(l, mn0, MN, stages, k_begin);
    else
        return NoVec4Loads{};
}

// The thread's place (tx, ty) in the 16 x 16 grid.
// - Warp tiling: a warp's 32 threads are a 4 (ty) x 8 (tx) patch, so that per k a warp reads 8
//   distinct B float4s (128 contiguous bytes) and 4 A float4s; a 2 x 16 row of threads would
//   read 16 B float4s.
// - Lanes paired for the shared-memory return path: an LDS.128 returns 4 registers per thread,
//   and the path carries one register per thread per cycle (128 bytes), so a warp's LDS.128 takes
//   4 cycles, or 2 when lanes n and n^1 (or n and n^2) read the same address and their returns
//   can be packed (NVIDIA's description for sm_70/75; the same halving was reported for an H100
//   by a profiled example, not measured here). Lane bit 0 therefore moves ty and lane bit 1 moves
//   tx: lanes n and n^1 share tx (the B read), lanes n and n^2 share ty (the A read). With the
//   row-of-8 layout that this replaces (tx = lane % 8) only the A reads paired: 12 return cycles
//   per k per warp for 64 FFMAs, now 8.
// - Bit fields of t < 256, with lane = t % 32 and warp = t / 32:
//     tx: bits 0-2 = lane bits 1-3, bit 3 = warp bit 2
//     ty: bit 0 = lane bit 0, bit 1 = lane bit 4, bits 2-3 = warp bits 0-1
//   Register pressure decides among the layouts that do this: with tx = lane bits (1, 3, 4) and
//   ty = lane bits (0, 2), ptxas gave the 128-tile dense kernels 130 registers (96 bytes of
//   spills when held to 128). (Likewise the other arrangement of the warps, tx bit 3 = warp
//   bit 0, made a 128-tile conv kernel spill on sm_80.)
__device__ __forceinline__ int grid_x(int t) { return ((t >> 4) & 8) | ((t >> 1) & 7); }
__device__ __forceinline__ int grid_y(int t) { return ((t >> 3) & 14) | (t & 1); }

// A micro-tile side of T = TM or TN elements, for the thread at grid position pos (ty or tx): chunk
// c = i / 4 of element i starts at 64 c and gives each of the 16 threads W = min(4, T - 4c)
// consecutive elements (4; 2 in the 6-wide side's second chunk, which so covers 64..95).
template <int T>
__device__ __forceinline__ constexpr int micro_width(int c) {
    return T - 4 * c < 4 ? T - 4 * c : 4;
}
template <int T>
__device__ __forceinline__ int micro_at(int i, int pos) {
    return (i / 4) * 64 + pos * micro_width<T>(i / 4) + i % 4;
}
// Chunk c of the side from a shared-memory row: one 16-byte (or 8-byte) read into v[0..W).
template <int T>
__device__ __forceinline__ void micro_chunk(const float* row, int c, int pos, float (&v)[4]) {
    if (micro_width<T>(c) == 4) {
        const float4 q = *reinterpret_cast<const float4*>(row + c * 64 + pos * 4);
        v[0] = q.x;
        v[1] = q.y;
        v[2] = q.z;
        v[3] = q.w;
    } else {
        const float2 q = *reinterpret_cast<const float2*>(row + c * 64 + pos * 2);
        v[0] = q.x;
        v[1] = q.y;
        v[2] = v[3] = 0.0f;  // not part of the tile
    }
}

// The FFMA micro-kernel: thread (tx, ty) of the 16 x 16 grid owns a TM x TN register tile, rows
// micro_at<TM>(i, ty), columns micro_at<TN>(j, tx); per k it reads a column of As and a row of Bs
// in those chunks and does TM * TN FFMAs.
template <class T>
struct FfmaMicro {
    static constexpr int TM = T::TM, TN = T::TN;
    float acc[TM][TN];
    int tx, ty;

    __device__ __forceinline__ FfmaMicro() : tx(grid_x(threadIdx.x)), ty(grid_y(threadIdx.x)) {
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
    }

    // acc += (this thread's part of) As^T . Bs over one k-tile. As: (BK, BM + PAD), Bs: (BK, BN + PAD).
    __device__ __forceinline__ void tile(const float (&As)[T::BK][T::BM + T::PAD],
                                         const float (&Bs)[T::BK][T::BN + T::PAD]) {
#pragma unroll
        for (int kk = 0; kk < T::BK; ++kk) {
            float b[TN];
#pragma unroll
            for (int c = 0; c * 4 < TN; ++c) {
                float v[4];
                micro_chunk<TN>(Bs[kk], c, tx, v);
#pragma unroll
                for (int j = 0; j < micro_width<TN>(c); ++j) b[c * 4 + j] = v[j];
            }
            // A one chunk (4 rows) at a time: 4 fragment registers instead of TM.
#pragma unroll
            for (int c = 0; c * 4 < TM; ++c) {
                float a[4];
                micro_chunk<TM>(As[kk], c, ty, a);
#pragma unroll
                for (int i = 0; i < micro_width<TM>(c); ++i)
#pragma unroll
                    for (int j = 0; j < TN; ++j) acc[c * 4 + i][j] = fmaf(a[i], b[j], acc[c * 4 + i][j]);
            }
        }
    }

    // Hands every in-range element of the block tile (m0, n0) to the epilogue: where the
    // epilogue allows (EP::VEC, vec()), two columns per store (store_pairs), else element by
    // element. Two separate loops, chosen once per block: one loop holding both paths made ptxas
    // spill in the 128 x 128 kernels.
    template <class EP>
    __device__ __forceinline__ void store(const EP& ep, int M, int N, int m0, int n0) const {
        if constexpr (EP::VEC) {
            if (ep.vec()) {
                store_pairs(ep, M, N, m0, n0);
                return;
            }
        }
        typename EP::Col cols[TN];
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + micro_at<TN>(j, tx);
            cols[j] = ep.col(n < N ? n : 0);
        }
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int m = m0 + micro_at<TM>(i, ty);
            if (m >= M) continue;
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                const int n = n0 + micro_at<TN>(j, tx);
                if (n < N) ep(m, cols[j], acc[i][j]);
            }
        }
    }

    // The paired path of store: each pair of columns (2j, 2j + 1) of the micro-tile, consecutive
    // in memory, in one 8-byte store (16-byte stores of 4 columns would need each 4 accumulators
    // in an aligned register quad, which made the 128 x 128 kernels spill); a pair cut by the
    // matrix's last column (N odd) stores its first element alone.
    template <class EP>
    __device__ __forceinline__ void store_pairs(const EP& ep, int M, int N, int m0, int n0) const {
        constexpr int PAIRS = TN / 2;
        typename EP::Col cols[PAIRS];
        int ns[PAIRS];
#pragma unroll
        for (int j = 0; j < PAIRS; ++j) {
            ns[j] = n0 + micro_at<TN>(2 * j, tx);
            cols[j] = ep.col(ns[j] < N ? ns[j] : 0);
        }
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int m = m0 + micro_at<TM>(i, ty);
            if (m >= M) continue;
#pragma unroll
            for (int j = 0; j < PAIRS; ++j) {
                if (ns[j] + 1 < N)
                    ep.store2(m, cols[j], acc[i][2 * j], acc[i][2 * j + 1]);
                else if (ns[j] < N) {
                    ep(m, cols[j], acc[i][2 * j]);
                }
            }
        }
    }
};

// Tensor-core operations (sm_80+). to_tf32: x rounded to TF32 (cvt.rna: to nearest, ties away
// from zero), as the bits of an fp32 value with the low 13 mantissa bits 0. to_bf16x2: lo and hi
// rounded to bfloat16 (cvt.rn: to nearest even) and packed, lo in the low half, as an mma operand
// register holds two consecutive k. mma_tf32_row / mma_bf16_row: d[j] += A . B[j] for NF
// fragments B[j] sharing one A, one mma.sync.m16n8k8 each. In the host emulation, the same
// operation as one exchange among the warp's 32 lanes (emu/launch.cpp).
#ifdef PTXGRAD_HOST_EMU
__device__ __forceinline__ unsigned to_tf32(float x) { return emu_cvt_rna_tf32(x); }
__device__ __forceinline__ unsigned to_bf16x2(float lo, float hi) { return emu_cvt_rn_bf16x2(lo, hi); }
template <int NF>
__device__ __forceinline__ void mma_tf32_row(float (&d)[NF][4], const unsigned (&a)[4], const unsigned (&b)[NF][2]) {
    emu_mma_tf32_row(&d[0][0], a, &b[0][0], NF);
}
template <int NF>
__device__ __forceinline__ void mma_bf16_row(float (&d)[NF][4], const unsigned (&a)[2], const unsigned (&b)[NF]) {
    emu_mma_bf16_row(&d[0][0], a, b, NF);
}
#else
__device__ __forceinline__ unsigned to_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}
template <int NF>
__device__ __forceinline__ void mma_tf32_row(float (&d)[NF][4], const unsigned (&a)[4], const unsigned (&b)[NF][2]) {
#pragma unroll
    for (int j = 0; j < NF; ++j)
        asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[j][0]), "r"(b[j][1]));
}
__device__ __forceinline__ unsigned to_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));  // the first source goes high
    return r;
}
template <int NF>
__device__ __forceinline__ void mma_bf16_row(float (&d)[NF][4], const unsigned (&a)[2], const unsigned (&b)[NF]) {
#pragma unroll
    for (int j = 0; j < NF; ++j)
        asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
            : "r"(a[0]), "r"(a[1]), "r"(b[j]));
}
#endif

// The tensor-core micro-kernel (GemmMath::Tf32, Tf32x3 and Bf16). The 8 warps tile the block
// WARPS_M x WARPS_N; a warp owns a WM x WN piece of C as MF x NF fragments of 16 x 8, and per
// k-tile (BK = 8 = the mma's k) issues MF x NF mma.sync (three times that for Tf32x3). Fragment
// layouts (PTX ISA, mma.m16n8k8; lane = 4 g + t):
//   .tf32, one value per register:
//   A (16 x 8):  a0 (row g, k t)   a1 (g + 8, t)   a2 (g, t + 4)   a3 (g + 8, t + 4)
//   B (8 x 8):   b0 (k t, col g)   b1 (t + 4, g)
//   .bf16, two per register, the lower k in the low half:
//   A (16 x 8):  a0 (row g, k 2t and 2t + 1)   a1 (g + 8, 2t and 2t + 1)
//   B (8 x 8):   b0 (k 2t and 2t + 1, col g)
//   C (16 x 8):  c0 (row g, col 2t)   c1 (g, 2t + 1)   c2 (g + 8, 2t)   c3 (g + 8, 2t + 1)
// Fragments are read from As[k][m] / Bs[k][n] one float each: with the rows' pitch 8 mod 32 for
// TF32, 4 mod 32 for BF16 (T::PAD), a warp's 32 reads of one register fall in 32 distinct banks.
// Tf32x3 splits each value as it is read (see split; x - big is exact in fp32) and issues the
// small products first; Bf16 rounds and packs two values per cvt.
// Registers: the B fragments of the k-tile (NF x 2, twice for Tf32x3; NF for Bf16) stay live
// while the A fragments are read one 16-row fragment at a time.
template <class T>
struct MmaMicro {
    static constexpr bool X3 = T::MATH == GemmMath::Tf32x3, BF16 = T::MATH == GemmMath::Bf16;
    static constexpr int WARPS_M = T::BM == 2 * T::BN ? 4 : 2, WARPS_N = T::THREADS / 32 / WARPS_M;
    static constexpr int WM = T::BM / WARPS_M, WN = T::BN / WARPS_N, MF = WM / 16, NF = WN / 8;
    static_assert(T::BK == 8, "one mma k-step per k-tile");
    static_assert(MF * 16 == WM && NF * 8 == WN && WARPS_M * WARPS_N * 32 == T::THREADS, "warps cover the tile");
    static_assert(MF * NF * 4 == T::TM * T::TN, "as many accumulators per thread as the FFMA tile");
    static constexpr int PITCH_MOD_32 = BF16 ? 4 : 8;
    static_assert((T::BM + T::PAD) % 32 == PITCH_MOD_32 && (T::BN + T::PAD) % 32 == PITCH_MOD_32,
                  "conflict-free fragment reads");
    float acc[MF][NF][4];
    int wm, wn, g, t;  // the warp's first row and column in the block tile; the lane's group and rank

    __device__ __forceinline__ MmaMicro() {
        const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
        wm = (warp % WARPS_M) * WM;
        wn = (warp / WARPS_M) * WN;
        g = lane >> 2;
        t = lane & 3;
#pragma unroll
        for (int f = 0; f < MF; ++f)
#pragma unroll
            for (int j = 0; j < NF; ++j)
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[f][j][i] = 0.0f;
    }

    // x as big (+ small, for Tf32x3), both TF32. Tf32: cvt.rna, which is up to four instructions
    // on sm_90 (a test for infinity and NaN, whose bits must not be rounded, the add, a select and
    // the mask below). Tf32x3 rounds big the same way with integer operations alone: adding half a
    // TF32 ulp (0x1000) to the bits rounds the magnitude to nearest, ties away, and since the mma
    // ignores the 13 low bits of its operands only the subtraction needs them cleared. small is
    // left for the mma to truncate: |small| <= 2^-11 |x|, so that costs < 2^-21 |x|, the order of
    // the product small*small that 3xTF32 drops anyway. 3 instructions per value instead of the 7
    // that two cvt.rna and the subtraction took, on 24 values per thread and k-tile (t128).
    // The one difference is at infinity: small = inf - inf is NaN, so an infinite operand gives
    // NaN instead of inf (a NaN operand stays NaN in small); either way the step has diverged.
    __device__ __forceinline__ static void split(float x, unsigned& big, unsigned& small) {
        if constexpr (X3) {
            big = __float_as_uint(x) + 0x1000u;
            small = __float_as_uint(x - __uint_as_float(big & 0xffffe000u));
        } else {
            big = to_tf32(x);
        }
    }

    // acc += (this warp's part of) As^T . Bs over one k-tile.
    __device__ __forceinline__ void tile(const float (&As)[T::BK][T::BM + T::PAD],
                                         const float (&Bs)[T::BK][T::BN + T::PAD]) {
        if constexpr (BF16)
            tile_bf16(As, Bs);
        else
            tile_tf32(As, Bs);
    }

    __device__ __forceinline__ void tile_tf32(const float (&As)[T::BK][T::BM + T::PAD],
                                              const float (&Bs)[T::BK][T::BN + T::PAD]) {
        unsigned bb[NF][2], bs[NF][2];
#pragma unroll
        for (int j = 0; j < NF; ++j)
#pragma unroll
            for (int r = 0; r < 2; ++r) split(Bs[t + 4 * r][wn + j * 8 + g], bb[j][r], bs[j][r]);
#pragma unroll
        for (int f = 0; f < MF; ++f) {
            unsigned ab[4], as[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) split(As[t + 4 * (r >> 1)][wm + f * 16 + g + 8 * (r & 1)], ab[r], as[r]);
            if constexpr (X3) {
                mma_tf32_row<NF>(acc[f], as, bb);
                mma_tf32_row<NF>(acc[f], ab, bs);
            }
            mma_tf32_row<NF>(acc[f], ab, bb);
        }
    }

    __device__ __forceinline__ void tile_bf16(const float (&As)[T::BK][T::BM + T::PAD],
                                              const float (&Bs)[T::BK][T::BN + T::PAD]) {
        unsigned b[NF];
#pragma unroll
        for (int j = 0; j < NF; ++j) {
            const int n = wn + j * 8 + g;
            b[j] = to_bf16x2(Bs[2 * t][n], Bs[2 * t + 1][n]);
        }
#pragma unroll
        for (int f = 0; f < MF; ++f) {
            unsigned a[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int m = wm + f * 16 + g + 8 * r;
                a[r] = to_bf16x2(As[2 * t][m], As[2 * t + 1][m]);
            }
            mma_bf16_row<NF>(acc[f], a, b);
        }
    }

    template <class EP>
    __device__ __forceinline__ void store(const EP& ep, int M, int N, int m0, int n0) const {
        typename EP::Col cols[NF][2];
#pragma unroll
        for (int j = 0; j < NF; ++j)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int n = n0 + wn + j * 8 + 2 * t + c;
                cols[j][c] = ep.col(n < N ? n : 0);
            }
        const bool vec = epilogue_vec(ep);
#pragma unroll
        for (int f = 0; f < MF; ++f)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int m = m0 + wm + f * 16 + g + 8 * h;
                if (m >= M) continue;
#pragma unroll
                for (int j = 0; j < NF; ++j) {
                    // The fragment's two columns 2t, 2t + 1: one 8-byte store where allowed.
                    const int n = n0 + wn + j * 8 + 2 * t;
                    if constexpr (EP::VEC) {
                        if (vec && n + 2 <= N) {
                            ep.store2(m, cols[j][0], acc[f][j][2 * h], acc[f][j][2 * h + 1]);
                            continue;
                        }
                    }
#pragma unroll
                    for (int c = 0; c < 2; ++c)
                        if (n + c < N) ep(m, cols[j][c], acc[f][j][2 * h + c]);
                }
            }
    }
};

// The micro-kernel of a tile's GemmMath.
template <class T, bool MMA = T::MATH != GemmMath::Ffma>
struct Micro {
    using type = FfmaMicro<T>;
};
template <class T>
struct Micro<T, true> {
    using type = MmaMicro<T>;
};

// Computes one BM x BN block of C, rows [m0, m0+BM), columns [n0, n0+BN), over k in [k_begin, k_end).
//
// Loader concept (A: rows m; B: columns n):
//   static constexpr bool K_FAST;          // is k the contiguous index in memory?
//   static constexpr bool CHEAP_AT;        // at() is a multiply: recompute it per k-tile instead
//                                          //   of holding one register per slot (saves registers)
//   Pos  at(int mn) const;                 // per-row (A) / per-column (B) state, computed once per
//                                          //   thread before the k loop (called only with mn < M / N)
//   KPos kat(int k) const;                 // per-k state (called with k_begin <= k < k_end)
//   const float* ptr(const Pos&, const KPos&) const;  // the element's address, nullptr = 0 (padding)
//   const float* any() const;              // some valid address (the source of zero-fill copies)
//   static constexpr bool VEC4;            // may the tile load use 16-byte copies? Then also:
//   bool vec4() const;                     //   (uniform) true when mn is the contiguous index
//                                          //   (stride 1), the extent is a multiple of 4 and every
//                                          //   group of 4 starting at mn % 4 == 0 is 16-byte aligned
//   int k_stride;                          //   ptr(at(mn), kat(k)) = ptr(at(mn), kat(0)) + k * k_stride
// Epilogue concept: Col col(int n) const; void operator()(int m, const Col&, float v) const;
//   static constexpr bool VEC;             // may the micro-kernel store two columns at once?
//                                          //   Then also:
//   bool vec() const;                      //   (uniform) true when, in every row, the columns
//                                          //   n .. n + 3 with n % 4 == 0 are consecutive in memory
//                                          //   from a 16-byte aligned address
//   void store2(int m, const Col& c, float v0, float v1) const;  // columns n, n + 1 (n even)
// A thread's columns come in pairs from an even n (FFMA: tx*4 + {0, 1}, + {2, 3}, ...; mma: a
// fragment's 2t, 2t + 1), so with vec() one 8-byte store replaces two 4-byte ones: half the store
// instructions and half the partial-sector writes (a warp's mma fragment row, 4 lanes x 2 columns,
// is then 32 contiguous bytes in one store instead of every other 4 bytes of them in two).
// Splitting the index math this way keeps divisions out of the inner loop: a thread's rows and
// columns never change across k-tiles, and kat() runs once per distinct k (slots that share a k
// share the result).
//
// VEC: 16-byte loads for the operands whose loader has VEC4 (gemm_block decides, once per block).
// As / Bs: the pipeline's stages, declared by gemm_block so that both instantiations share them.
template <class T, bool VEC, class LA, class LB, class EP>
__device__ __forceinline__ void gemm_block_with(const LA& la, const LB& lb, const EP& ep, int M, int N, int k_begin,
                                                int k_end, int m0, int n0,
                                                float (&As)[T::STAGES][T::BK][T::BM + T::PAD],
                                                float (&Bs)[T::STAGES][T::BK][T::BN + T::PAD]) {
    constexpr int BM = T::BM, BN = T::BN, BK = T::BK, STAGES = T::STAGES;
    constexpr int A_PER = BM * BK / T::THREADS;  // A elements each thread loads per k-tile
    constexpr int B_PER = BN * BK / T::THREADS;
    static_assert(A_PER * T::THREADS == BM * BK && B_PER * T::THREADS == BN * BK, "even tile load");
    constexpr bool VA = VEC && LA::VEC4, VB = VEC && LB::VEC4;

    const int t = threadIdx.x;

    // Element (slot) i of this thread's share of a tile: which (row, k) it is, for each loader's
    // contiguity. Consecutive threads take consecutive k (K_FAST) or consecutive rows / columns.
    auto a_pos = [&](int i, int& mm, int& kk) {
        const int e = t + i * T::THREADS;
        if (LA::K_FAST) {
            kk = e % BK;
            mm = e / BK;
        } else {
            mm = e % BM;
            kk = e / BM;
        }
    };
    auto b_pos = [&](int i, int& nn, int& kk) {
        const int e = t + i * T::THREADS;
        if (LB::K_FAST) {
            kk = e % BK;
            nn = e / BK;
        } else {
            nn = e % BN;
            kk = e / BN;
        }
    };

    typename LA::Pos pa[A_PER];
    typename LB::Pos pb[B_PER];
    if (!LA::CHEAP_AT) {
#pragma unroll
        for (int i = 0; i < A_PER; ++i) {
            int mm, kk;
            a_pos(i, mm, kk);
            pa[i] = la.at(m0 + mm < M ? m0 + mm : 0);
        }
    }
    if (!LB::CHEAP_AT) {
#pragma unroll
        for (int i = 0; i < B_PER; ++i) {
            int nn, kk;
            b_pos(i, nn, kk);
            pb[i] = lb.at(n0 + nn < N ? n0 + nn : 0);
        }
    }

    // Issue the copies of one k-tile's A (B) into stage `st`: one 4-byte cp.async per element,
    // zero-filled (src-size 0) outside the matrix and in the padding. The copies run in the
    // background, using no registers while in flight.
    auto issue_a = [&](int k0, int st) {
#pragma unroll
        for (int i = 0; i < A_PER; ++i) {
            int mm, kk;
            a_pos(i, mm, kk);
            const int k = k0 + kk, m = m0 + mm;
            const auto kp = la.kat(min(k, k_end - 1));
            const auto pos = LA::CHEAP_AT ? la.at(m) : pa[i];
            const float* src = (m < M && k < k_end) ? la.ptr(pos, kp) : nullptr;
            cp_async_f32(&As[st][kk][mm], src ? src : la.any(), src != nullptr);
        }
    };
    auto issue_b = [&](int k0, int st) {
#pragma unroll
        for (int i = 0; i < B_PER; ++i) {
            int nn, kk;
            b_pos(i, nn, kk);
            const int k = k0 + kk, n = n0 + nn;
            const auto kp = lb.kat(min(k, k_end - 1));
            const auto pos = LB::CHEAP_AT ? lb.at(n) : pb[i];
            const float* src = (n < N && k < k_end) ? lb.ptr(pos, kp) : nullptr;
            cp_async_f32(&Bs[st][kk][nn], src ? src : lb.any(), src != nullptr);
        }
    };

    typename Micro<T>::type micro;  // the accumulators and the inner loop (FFMA or mma)

    // With VA (VB), A's (B's) tiles come in 16-byte copies: a quarter of the copy instructions
    // and of their address math.
    // (Their issue() takes the k-tiles in order: the calls below ask for k_begin, k_begin + BK, ...)
    auto va = vec4_loads<VA, BM, BK, T::THREADS, T::PAD>(la, m0, M, As, k_begin);
    auto vb = vec4_loads<VB, BN, BK, T::THREADS, T::PAD>(lb, n0, N, Bs, k_begin);
    auto issue = [&](int k0, int st) {
        if constexpr (VA)
            va.issue(st, k_end);
        else
            issue_a(k0, st);
        if constexpr (VB)
            vb.issue(st, k_end);
        else
            issue_b(k0, st);
    };

    // STAGES-deep pipeline: tiles it+1 .. it+STAGES-1 are in flight while tile it is computed.
    const int n_tiles = k_end > k_begin ? (k_end - k_begin + BK - 1) / BK : 0;
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < n_tiles) issue(k_begin + st * BK, st);
        cp_async_commit();  // one group per tile, empty ones too, so that the counting below holds
    }
    // st: the stage of tile it; st_next: the stage of tile it + STAGES - 1 (the one before st,
    // cyclically). Both rotate by a compare instead of a modulo per tile.
    int st = 0, st_next = STAGES - 1;
    for (int it = 0; it < n_tiles; ++it) {
        cp_async_wait<STAGES - 2>();  // this thread's copies of tile it have landed
        // Everyone's copies of tile it are visible, and everyone is done with tile it-1, whose
        // stage the next issue overwrites.
        __syncthreads();
        const int next = it + STAGES - 1;
        if (next < n_tiles) issue(k_begin + next * BK, st_next);
        cp_async_commit();
        micro.tile(As[st], Bs[st]);
        st_next = st;
        st = st + 1 == STAGES ? 0 : st + 1;
    }
    cp_async_wait<0>();

    micro.store(ep, M, N, m0, n0);
}

// The GEMM of one block (see gemm_block_with): with 16-byte loads when every operand that may
// take them can (a uniform test, decided once, outside the k loop), else with 4-byte loads.
template <class T, class LA, class LB, class EP>
__device__ __forceinline__ void gemm_block(const LA& la, const LB& lb, const EP& ep, int M, int N, int k_begin,
                                           int k_end, int m0, int n0) {
    using AsT = float[T::STAGES][T::BK][T::BM + T::PAD];
    using BsT = float[T::STAGES][T::BK][T::BN + T::PAD];
#ifdef PTXGRAD_HOST_EMU
    // The emulator's block buffer (PTX_SHARED_ARRAY's, for multi-dimensional arrays).
    AsT& As = *static_cast<AsT*>(emu_shared(sizeof(AsT)));
    BsT& Bs = *static_cast<BsT*>(emu_shared(sizeof(BsT)));
#else
    __shared__ __align__(16) AsT As;
    __shared__ __align__(16) BsT Bs;
#endif
    if constexpr (LA::VEC4 || LB::VEC4) {
        bool vec = true;
        if constexpr (LA::VEC4) vec = vec && la.vec4();
        if constexpr (LB::VEC4) vec = vec && lb.vec4();
        if (vec) {
            gemm_block_with<T, true>(la, lb, ep, M, N, k_begin, k_end, m0, n0, As, Bs);
            return;
        }
    }
    gemm_block_with<T, false>(la, lb, ep, M, N, k_begin, k_end, m0, n0, As, Bs);
}

// The plain-matrix loader: element (mn, k) at p[mn * mn_stride + k * k_stride] (mn is the row m
// for A, the column n for B), i.e. a row- or column-major matrix viewed either way round.
template <bool KF>
struct StridedLoader {
    const float* __restrict__ p;
    int mn_stride, k_stride;
    bool vec = false;  // 16-byte loads (see strided_loader)
    static constexpr bool K_FAST = KF;
    static constexpr bool CHEAP_AT = true;
    static constexpr bool VEC4 = !KF;
    __device__ __forceinline__ bool vec4() const { return vec; }
    using Pos = int;
    using KPos = int;
    __device__ __forceinline__ int at(int mn) const { return mn * mn_stride; }
    __device__ __forceinline__ int kat(int k) const { return k * k_stride; }
    __device__ __forceinline__ const float* ptr(int a, int b) const { return p + a + b; }
    __device__ __forceinline__ const float* any() const { return p; }
};

// A plain matrix with element (mn, k) at p[mn * mn_stride + k * k_stride], mn < mn_extent: the
// loader takes the 16-byte loads when mn is contiguous and every group of 4 along it is whole and
// aligned (a uniform test: p, the stride and the extent are the same for the whole block).
template <bool KF>
__device__ __forceinline__ StridedLoader<KF> strided_loader(const float* p, int mn_stride, int k_stride,
                                                            int mn_extent) {
    const bool vec = !KF && mn_stride == 1 && mn_extent % 4 == 0 && k_stride % 4 == 0 &&
                     reinterpret_cast<unsigned long long>(p) % 16 == 0;
    return StridedLoader<KF>{p, mn_stride, k_stride, vec};
}

// An epilogue's VEC for the kernel families whose FFMA kernels store element by element: their
// 128 x 128 tiles run at the 128-register limit, and the register pairs of 8-byte stores made
// ptxas spill there (sm_80: 16-292 bytes). The tensor-core kernels store their fragments' pairs.
template <class T>
constexpr bool vec_unless_ffma = T::MATH != GemmMath::Ffma;

// The plain epilogue: C[m][n] stored row-major with `ld` columns (VEC: see vec_unless_ffma).
template <bool VEC_ = true>
struct StoreEpi {
    float* __restrict__ c;
    int ld;
    using Col = int;
    static constexpr bool VEC = VEC_;
    __device__ __forceinline__ bool vec() const { return ld % 4 == 0 && aligned16(c); }
    __device__ __forceinline__ int col(int n) const { return n; }
    __device__ __forceinline__ void operator()(int m, int n, float v) const { c[m * ld + n] = v; }
    __device__ __forceinline__ void store2(int m, int n, float v0, float v1) const {
        store_f32x2(c + m * ld + n, v0, v1);
    }
};

// Deterministic split-K reduction: out[i] = sum_z ws[z * len + i].
__device__ __forceinline__ void splitk_sum(const float* __restrict__ ws, float* __restrict__ out, unsigned len,
                                           unsigned splits) {
    FOR_EACH_INDEX(i, len) {
        float s = 0.0f;
        for (unsigned z = 0; z < splits; ++z) s += ws[(unsigned long long)z * len + i];
        out[i] = s;
    }
}
