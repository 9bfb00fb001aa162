// Host emulation of the CUDA C++ that kernels/*.cu use, so that the very same kernel source runs
// on the CPU (force-included before a .cu compiled as C++ with PTXGRAD_HOST_EMU defined).
//
// Model: a launch runs its blocks one after another; within a block every CUDA thread is a fiber
// (launch.cpp), so __syncthreads is a real barrier and a warp shuffle a real exchange among the
// 32 lanes of a warp (all 32 must take part). Shared arrays come from one buffer per launching
// thread (emu_shared), NaN at each block's start. cp.async lands at the wait that completes its
// group, not before (launch.cpp), as on a GPU. Threads run one at a time, each up to its next
// barrier, and blocks one after another, in ascending or (PTXGRAD_EMU_SCHEDULE=reverse)
// descending order: a race gives different results in the two orders, so it shows as a failure
// in one of them. What this does not model: timing, memory coalescing, bank conflicts, register
// limits, interleavings finer than barrier to barrier (two threads that both read a word before
// either writes it back: a lost update), and the relaxed ordering of global memory.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// No `__shared__` here: kernels declare shared arrays with PTX_SHARED_ARRAY (common.cuh), which
// the emulator serves from emu_shared, so a `__shared__` left in a kernel fails to compile.
#define __align__(n) __attribute__((aligned(n)))
// A kernel's launch bounds do nothing here, except in build.rs's scan of the kernels' signatures
// (PTXGRAD_EMU_PROBE), which records the most threads per block each kernel may be launched with:
// a launch with more fails on a GPU, and the emulator refuses it too.
#ifdef PTXGRAD_EMU_PROBE
#define __launch_bounds__(...) ptxgrad_launch_bounds(__VA_ARGS__)
#else
#define __launch_bounds__(...)
#endif

struct dim3 {
    unsigned x, y, z;
};
using uint3 = dim3;
extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(8) int2 {
    int x, y;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

template <class T>
inline T __ldg(const T* p) {
    return *p;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }

// The high 32 bits of a 32 x 32-bit product.
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }

// Round-to-nearest single operations (never fused into an FMA: the build passes -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline int __float_as_int(float f) {
    int v;
    std::memcpy(&v, &f, 4);
    return v;
}
inline float __uint_as_float(unsigned v) { return __int_as_float((int)v); }
inline unsigned __float_as_uint(float f) { return (unsigned)__float_as_int(f); }

// Block-wide barrier and warp exchange, implemented in launch.cpp.
void __syncthreads();
// cp.async of n <= 4 floats (zeros when !full), its commit and its wait_group, with a GPU's
// ordering: the copy lands in shared memory only at a wait that completes its group (launch.cpp).
void emu_cp_async(float* dst, const float* src, unsigned n, bool full);
void emu_cp_async_commit();
void emu_cp_async_wait(unsigned newest_pending);
// `bytes` of the running block's shared memory, 16-byte aligned: the thread's next shared array
// (PTX_SHARED_ARRAY in common.cuh, gemm.cuh's tiles), the same place for every thread of the
// block, NaN until written (launch.cpp). One buffer per OS thread, reused by every block it runs;
// `static thread_local` arrays would keep the last block's values and, for the hundred GEMM
// kernels' ~20 KB tiles, take over 2 MB of static TLS, which glibc carves out of the stack of
// every thread of a program that links the emulator. More than a GPU's 48 KB of static shared
// memory per block is a fault.
void* emu_shared(unsigned long long bytes);
// Counts one 16-byte cp.async (gemm.cuh's vector loads), so that tests can see the path taken.
void emu_count_vec4_copy();
// Counts one 8-byte store of 2 floats (gemm.cuh's paired epilogue stores), likewise.
void emu_count_vec_store();
// Records that the running kernel broke a rule a GPU enforces (a misaligned vector copy, say):
// the launch then returns this message as its error, as the GPU would fail it.
void emu_fault(const char* what);
// The threads of a launch run one at a time on the calling OS thread and switch only at barriers,
// so a plain read-modify-write is atomic here. A GPU faults on a misaligned 64-bit atomic.
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    if (reinterpret_cast<std::uintptr_t>(p) % 8 != 0) {
        emu_fault("a misaligned 64-bit atomicAdd");
        return 0;
    }
    const unsigned long long old = *p;
    *p = old + v;
    return old;
}
unsigned emu_shfl_xor_bits(unsigned bits, int lane_mask);
// mma.sync.m16n8k8 .tf32 for n fragments of B sharing one A (gemm.cuh's mma_tf32_row): d (n x 4
// floats) += A . B[j], the fragments in the PTX ISA's lane layout; an exchange among the warp's
// 32 lanes (launch.cpp).
void emu_mma_tf32_row(float* d, const unsigned* a, const unsigned* b, unsigned n);
// mma.sync.m16n8k8 .bf16 alike (gemm.cuh's mma_bf16_row): A two registers, each B[j] one, every
// register two bfloat16 values, the lower k in the low half.
void emu_mma_bf16_row(float* d, const unsigned* a, const unsigned* b, unsigned n);

// cvt.rna.tf32.f32: x rounded to 10 mantissa bits, to nearest with ties away from zero (adding
// half an ulp to the magnitude bits and truncating does exactly that, the carry included);
// infinities and NaNs pass unchanged.
inline unsigned emu_cvt_rna_tf32(float x) {
    unsigned bits;
    std::memcpy(&bits, &x, 4);
    if ((bits & 0x7f800000u) == 0x7f800000u) return bits;
    return (bits + 0x1000u) & 0xffffe000u;
}

// cvt.rn.bf16x2.f32: lo and hi rounded to bfloat16 (the upper 16 bits of an fp32), to nearest
// even, packed with lo in the low half; a NaN stays a (quiet) NaN, infinities stay infinite.
inline unsigned emu_cvt_rn_bf16(float x) {
    unsigned bits;
    std::memcpy(&bits, &x, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bits >> 16) | 0x40u;  // NaN: keep it quiet
    return (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
}
inline unsigned emu_cvt_rn_bf16x2(float lo, float hi) { return emu_cvt_rn_bf16(lo) | (emu_cvt_rn_bf16(hi) << 16); }

template <class T>
inline T __shfl_xor_sync(unsigned /*mask: all our shuffles are full-warp*/, T v, int lane_mask) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    unsigned bits;
    std::memcpy(&bits, &v, 4);
    bits = emu_shfl_xor_bits(bits, lane_mask);
    T out;
    std::memcpy(&out, &bits, 4);
    return out;
}
