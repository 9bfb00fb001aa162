// dropout (inverted): y = x * keep / (1 - p), keep ~ Bernoulli(1 - p), independently per element.
// As in PyTorch the mask multiplies (x * (keep ? scale : 0)), it does not select: a dropped NaN or
// +-inf gives NaN, forward and backward, so a diverged value is not hidden by the mask.
//
// The mask is never stored: keep(i) is a pure function of (seed, i), a counter-based RNG, so the
// backward regenerates exactly the forward's mask, and the CPU reference (`dropout_mask_keep` in
// src/ops/dropout.rs) computes bit-identical masks.
//
// RNG: splitmix64. The stream's start is mix(seed + GOLDEN); element i takes the (i+1)-th
// splitmix64 output, mix(start + (i + 1) * GOLDEN). Its top 24 bits give u = k / 2^24 in [0, 1),
// exact in f32; the element is kept iff u >= p. Integer ops and one exact float compare: nothing
// for the compiler to round differently from the CPU.
//
// Design: one thread per element, grid-stride loop; memory-bound (the hash is a few integer
// multiplies per element). The forward and backward kernels are the same map applied to x or to gy.
#include "common.cuh"

#define DROPOUT_GOLDEN 0x9E3779B97F4A7C15ull

__device__ __forceinline__ unsigned long long splitmix64_mix(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ bool dropout_keep(unsigned long long start, unsigned long long i, float p) {
    const unsigned long long h = splitmix64_mix(start + (i + 1) * DROPOUT_GOLDEN);
    const float u = (float)(unsigned)(h >> 40) * 5.9604644775390625e-8f;  // * 2^-24, exact
    return u >= p;
}

// out = in * (keep(i) ? scale : 0), scale = 1 / (1 - p) computed once on the host (a kept value is
// in * scale exactly; a dropped NaN or inf gives NaN, a dropped finite value +-0).
__device__ __forceinline__ void dropout_apply(const float* __restrict__ in, float* __restrict__ out, float p,
                                              float scale, unsigned long long seed, unsigned long long n) {
    const unsigned long long start = splitmix64_mix(seed + DROPOUT_GOLDEN);
    FOR_EACH_INDEX(i, n) out[i] = in[i] * (dropout_keep(start, i, p) ? scale : 0.0f);
}

PTX_KERNEL void dropout_fwd_f32(const float* __restrict__ x, float* __restrict__ y, float p, float scale,
                                unsigned long long seed, unsigned long long n) {
    dropout_apply(x, y, p, scale, seed, n);
}

PTX_KERNEL void dropout_bwd_f32(const float* __restrict__ gy, float* __restrict__ gx, float p, float scale,
                                unsigned long long seed, unsigned long long n) {
    dropout_apply(gy, gx, p, scale, seed, n);
}
