// adaptive_avgpool2d: PyTorch's nn.AdaptiveAvgPool2d((1, 1)), the global average pool.
// x: (N, C, H, W) -> y: (N, C, 1, 1), each (n, c) plane's mean: y = (sum of its H * W values) / (H * W).
// Backward: gx = gy / (H * W) at every element of the plane (PyTorch's mean backward divides too).
// NaN and infinities propagate through the sum as in PyTorch (a NaN, or +inf and -inf, in a plane
// make its mean NaN).
//
// Design:
//  * forward: one BLOCK per plane (planes grid-strided over blocks), blockDim a multiple of 32
//    from 32 to 256 that the host picks from H * W, so that a small plane does not leave most of
//    a block idle. Each thread sums the elements t, t + blockDim, ... in fp32 (coalesced loads),
//    each warp reduces with shuffles, warp 0 adds the warp sums from shared memory, and thread 0
//    divides by H * W and stores. The order of every addition is fixed by the plane size alone:
//    the result is the same on every run and every GPU, with no atomics.
//  * backward: a 2-D grid, x over the planes and y over the elements of one plane, both
//    grid-stride (as kernels/maxpool2d.cu), so that no thread divides a 64-bit flat index to find
//    its plane; each thread writes one element. Memory-bound: one broadcast load of gy per thread.
// A plane has fewer than 2^31 elements (the host checks); planes are counted and addressed in 64
// bits: N * C * H * W may exceed 2^32.
#include "common.cuh"

#define GAP_BLOCK 256  // the most threads per block the host launches the forward with

PTX_KERNEL void __launch_bounds__(GAP_BLOCK)
    adaptive_avgpool2d_fwd_f32(const float* __restrict__ x, float* __restrict__ y, unsigned long long planes,
                               unsigned hw) {
    PTX_SHARED_ARRAY(float, warp_part, GAP_BLOCK / 32);
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (unsigned long long plane = blockIdx.x; plane < planes; plane += gridDim.x) {
        const float* xp = x + plane * hw;
        float s = 0.0f;
        for (unsigned i = threadIdx.x; i < hw; i += blockDim.x) s += xp[i];
        s = warp_sum(s);
        if (lane == 0) warp_part[warp] = s;
        __syncthreads();
        if (warp == 0) {
            s = lane < warps ? warp_part[lane] : 0.0f;
            s = warp_sum(s);
            if (lane == 0) y[plane] = s / (float)hw;
        }
        __syncthreads();  // warp_part is rewritten for the next plane
    }
}

PTX_KERNEL void adaptive_avgpool2d_bwd_f32(const float* __restrict__ gy, float* __restrict__ gx,
                                           unsigned long long planes, unsigned hw) {
    for (unsigned long long plane = blockIdx.x; plane < planes; plane += gridDim.x) {
        const float g = gy[plane] / (float)hw;
        float* gp = gx + plane * hw;
        for (unsigned e = blockIdx.y * blockDim.x + threadIdx.x; e < hw; e += gridDim.y * blockDim.x) gp[e] = g;
    }
}
