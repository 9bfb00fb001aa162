// relu: y = max(x, 0); backward gx = gy where y > 0, else 0 (the gradient at 0 is taken as 0,
// as in PyTorch). The backward reads the output y, not x: y > 0 exactly where x > 0, and the
// tape then holds one tensor instead of two.
// Design: one thread per element, grid-stride loop; memory-bound.
#include "common.cuh"

PTX_KERNEL void relu_fwd_f32(const float* __restrict__ x, float* __restrict__ y, unsigned long long n) {
    FOR_EACH_INDEX(i, n) y[i] = fmaxf(x[i], 0.0f);
}

PTX_KERNEL void relu_bwd_f32(const float* __restrict__ y, const float* __restrict__ gy, float* __restrict__ gx,
                             unsigned long long n) {
    FOR_EACH_INDEX(i, n) gx[i] = y[i] > 0.0f ? gy[i] : 0.0f;
}
