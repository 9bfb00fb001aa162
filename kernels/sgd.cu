// sgd: plain stochastic gradient descent, param -= lr * grad, in place.
// Design: one thread per element, grid-stride loop; memory-bound (two loads, one store).
#include "common.cuh"

PTX_KERNEL void sgd_update_f32(float* __restrict__ param, const float* __restrict__ grad, float lr,
                               unsigned long long n) {
    FOR_EACH_INDEX(i, n) param[i] -= lr * grad[i];
}
