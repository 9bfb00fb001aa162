// sigmoid: y = 1 / (1 + exp(-x)), as torch.sigmoid; backward from the saved output y:
// gx = gy * (1 - y) * y (PyTorch's sigmoid_backward, in its order of operations).
//
// Numerics: 1 / (1 + exp(-x)) as written overflows exp for x < -88.7 (exp(-x) = inf, y = 0 where
// the true value is a subnormal down to x = -103.3), and e^x / (1 + e^x) overflows for x > 88.7
// (inf / inf = NaN). Both are the same value; the kernel takes e = exp(-|x|), which is in (0, 1]
// for every finite x and never overflows, and returns 1 / (1 + e) for x >= 0 and e / (1 + e)
// otherwise: one exp and one division, and the select picks only the numerator (no divergent
// branch). x = +inf gives 1, x = -inf gives 0 (exp(-inf) = 0), a NaN gives NaN (x >= 0 is false
// and e is NaN). Accurate to a few ulp everywhere, subnormal outputs included (no flush to zero).
// Mirrored by ops::sigmoid::sigmoid_value, operation for operation.
//
// Design: one thread per element, grid-stride loop (the host caps the grid); memory-bound: one
// load and one store per element forward, two loads and one store backward.
#include "common.cuh"

__device__ __forceinline__ float sigmoid_f32(float x) {
    const float e = expf(-fabsf(x));
    const float d = 1.0f + e;
    return (x >= 0.0f ? 1.0f : e) / d;
}

PTX_KERNEL void sigmoid_fwd_f32(const float* __restrict__ x, float* __restrict__ y, unsigned long long n) {
    FOR_EACH_INDEX(i, n) y[i] = sigmoid_f32(x[i]);
}

PTX_KERNEL void sigmoid_bwd_f32(const float* __restrict__ y, const float* __restrict__ gy, float* __restrict__ gx,
                                unsigned long long n) {
    FOR_EACH_INDEX(i, n) {
        const float v = y[i];
        gx[i] = gy[i] * (1.0f - v) * v;
    }
}
