// sgd: plain stochastic gradient descent, param -= lr * grad, in place.
// Design: memory-bound (two loads, one store per element), so each thread moves 16 bytes per
// load and store: where both arrays are 16-byte aligned (every buffer from the driver is; the
// test is uniform, made once per thread), float4 over the first n / 4 groups, then the last
// n % 4 elements one by one; otherwise every element one by one. Grid-stride loops: the host
// launches one thread per group of 4 (an element-by-element update took 0.21 ms for 46.8M
// parameters in the 2026-11-27 H200 profile, against the ~0.12 ms its 0.56 GB of traffic needs).
#include "common.cuh"

PTX_KERNEL void sgd_update_f32(float* __restrict__ param, const float* __restrict__ grad, float lr,
                               unsigned long long n) {
    const bool vec = (reinterpret_cast<unsigned long long>(param) | reinterpret_cast<unsigned long long>(grad)) % 16 == 0;
    const unsigned long long groups = vec ? n / 4 : 0, done = groups * 4;
    float4* __restrict__ p4 = reinterpret_cast<float4*>(param);
    const float4* __restrict__ g4 = reinterpret_cast<const float4*>(grad);
    FOR_EACH_INDEX(i, groups) {
        float4 p = p4[i];
        const float4 g = g4[i];
        p.x -= lr * g.x;
        p.y -= lr * g.y;
        p.z -= lr * g.z;
        p.w -= lr * g.w;
        p4[i] = p;
    }
    FOR_EACH_INDEX(i, n - done) param[done + i] -= lr * grad[done + i];
}
