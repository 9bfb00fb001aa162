// Shared by every kernel file: index helpers and reductions. Kept small on purpose; an op's
// own helpers live in its own .cu so that kernels do not drift apart through shared edits.
#pragma once

// Kernels are looked up by name from Rust: no C++ name mangling.
#define PTX_KERNEL extern "C" __global__

// A block's shared array `T name[n]`, 16-byte aligned. On a GPU a plain __shared__ array; on the
// emulator (emu/cuda_host.h) memory from the block's shared buffer that starts as NaN, as a GPU
// gives a block shared memory with unspecified contents. Declare it where every thread of the
// block passes once (the emulator gives each thread's k-th array the same place).
#ifdef PTXGRAD_HOST_EMU
#define PTX_SHARED_ARRAY(T, name, n) T* const name = static_cast<T*>(emu_shared(sizeof(T) * (n)))
#else
#define PTX_SHARED_ARRAY(T, name, n) __shared__ __align__(16) T name[n]
#endif

// ReLU as PyTorch computes it, for every kernel that applies one (relu.cu and the fused
// epilogues of conv2d.cu, winograd.cu and dense.cu): NaN stays NaN, so that a diverged run shows
// in its loss instead of being zeroed (fmaxf(NaN, 0) is 0); v > 0 (+inf too) stays v; anything
// else, -0.0 included, gives +0.0. fmaxf alone may return either zero for -0.0 (the emulator's
// gives -0.0): adding +0.0 turns -0.0 into +0.0 and changes nothing else. A NaN test around
// fmaxf, not the select `v > 0 ? v : 0` with a NaN case: in winograd.cu's scatter a select merges
// with the `relu` flag into one predicate and ptxas then spills registers (which tests/ptx.rs
// forbids); with this form every GEMM and scatter kernel keeps fmaxf's register allocation.
// Mirrored by ops::relu::relu_value.
__device__ __forceinline__ float relu_f32(float v) { return v != v ? v : fmaxf(v, 0.0f) + 0.0f; }

// Whether the ReLU whose output is y passes its gradient (PyTorch's threshold_backward: zero
// where y <= 0, else the gradient): everywhere but y <= 0, so a NaN output passes its gradient.
// Used by relu.cu's backward and by maxpool2d.cu's mask, which stands in for it. Mirrored by
// ops::relu::relu_passes_grad.
__device__ __forceinline__ bool relu_passes_grad(float y) { return !(y <= 0.0f); }

__device__ __forceinline__ unsigned ceil_div(unsigned a, unsigned b) { return (a + b - 1) / b; }

// Grid-stride loop over [0, n): correct for any grid size, so the host may cap the grid.
#define FOR_EACH_INDEX(i, n) \
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < (n); \
         i += (unsigned long long)gridDim.x * blockDim.x)

// n / d for 0 <= n < 2^31 as (umulhi(n, mul) + n) >> shift, with (mul, shift) made for d by the
// host (ops::fast_div::FastDiv, which also has the proof obligations in its tests): three
// instructions instead of a division sequence. Mirrors ops::fast_div::FastDiv.
struct FastDiv {
    unsigned mul, shift;
};
__device__ __forceinline__ int fast_div(int n, FastDiv d) {
    return (int)((__umulhi((unsigned)n, d.mul) + (unsigned)n) >> d.shift);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
