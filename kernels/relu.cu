// relu: y = max(x, 0), a NaN staying NaN (relu_f32 in common.cuh); backward gx = 0 where y <= 0,
// else gy (the gradient at 0 is taken as 0): PyTorch's threshold_backward, so a NaN output passes
// gy on, and a NaN gy is still zeroed where y <= 0 (relu_passes_grad). The backward reads the
// output y, not x: y <= 0 exactly where x <= 0 (y is NaN where x is), and the tape then holds
// one tensor instead of two.
// Design: one thread per element, grid-stride loop; memory-bound.
#include "common.cuh"

PTX_KERNEL void relu_fwd_f32(const float* __restrict__ x, float* __restrict__ y, unsigned long long n) {
    FOR_EACH_INDEX(i, n) y[i] = relu_f32(x[i]);
}

PTX_KERNEL void relu_bwd_f32(const float* __restrict__ y, const float* __restrict__ gy, float* __restrict__ gx,
                             unsigned long long n) {
    FOR_EACH_INDEX(i, n) gx[i] = relu_passes_grad(y[i]) ? gy[i] : 0.0f;
}
