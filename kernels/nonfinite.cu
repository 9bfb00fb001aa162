// nonfinite: counts the non-finite values (NaN, +Inf, -Inf) of one f32 array of n elements into
// counts[slot], a 64-bit counter the host zeroed. The host gives every tensor of a list its own
// slot of one buffer, launches once per tensor, and reads the whole buffer back once (a training
// run checks its parameters so before each checkpoint, without copying them to the host).
// Design:
//  * memory-bound (one 4-byte load per element, nothing stored): where x is 16-byte aligned (every
//    buffer from the driver is; the test is uniform, made once per thread), float4 loads over the
//    first n / 4 groups, then the last n % 4 elements one by one; otherwise every element one by
//    one. Grid-stride loops: the host caps the grid at a few thousand blocks of 256 threads.
//  * a value is non-finite exactly when its exponent bits are all ones (0x7f800000 under the
//    mask): one AND and one compare, no float compare, and -0.0, subnormals and FLT_MAX count as
//    finite.
//  * each thread counts in 32 bits, then its warp sums with shuffles (blockDim a multiple of 32,
//    so every warp is full) and lane 0 adds the sum with one 64-bit atomicAdd, only where it is
//    not 0: an all-finite tensor (the usual case) issues no atomic at all. The sum of integers is
//    exact in any order, so the count does not depend on the grid. 32 bits suffice: a thread sees
//    at most 4 * ceil(n / 4 / threads) + 1 elements, and with the host's grid (min(ceil(n / 1024),
//    2048) blocks of 256 threads) a warp's sum stays under 2^32 for any n below 2^46.
#include "common.cuh"

#define NONFINITE_BLOCK 256  // the block size the host launches (at most this)

__device__ __forceinline__ unsigned nonfinite_of(float v) {
    return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u ? 1u : 0u;
}

PTX_KERNEL void __launch_bounds__(NONFINITE_BLOCK)
    nonfinite_count_f32(const float* __restrict__ x, unsigned long long* __restrict__ counts, unsigned long long slot,
                        unsigned long long n) {
    const bool vec = reinterpret_cast<unsigned long long>(x) % 16 == 0;
    const unsigned long long groups = vec ? n / 4 : 0, done = groups * 4;
    const float4* __restrict__ x4 = reinterpret_cast<const float4*>(x);
    unsigned count = 0;
    FOR_EACH_INDEX(i, groups) {
        const float4 v = x4[i];
        count += nonfinite_of(v.x) + nonfinite_of(v.y) + nonfinite_of(v.z) + nonfinite_of(v.w);
    }
    FOR_EACH_INDEX(i, n - done) count += nonfinite_of(x[done + i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) count += __shfl_xor_sync(0xffffffffu, count, o);
    if (threadIdx.x % 32 == 0 && count != 0) atomicAdd(counts + slot, (unsigned long long)count);
}
