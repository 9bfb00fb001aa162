// add: the residual sum (y = a + b) and the gradient accumulator (dst += src), used by the tape
// when a tensor feeds several ops.
// Design: one thread per element, grid-stride loop; memory-bound, nothing to tile.
#include "common.cuh"

PTX_KERNEL void add_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y,
                        unsigned long long n) {
    FOR_EACH_INDEX(i, n) y[i] = a[i] + b[i];
}

PTX_KERNEL void add_assign_f32(float* __restrict__ dst, const float* __restrict__ src, unsigned long long n) {
    FOR_EACH_INDEX(i, n) dst[i] += src[i];
}
