// batchnorm2d: PyTorch's BatchNorm2d over x: (N, C, H, W), per channel c over its N*H*W values
// ("count"): y = gamma * (x - mean) * rstd + beta, rstd = 1 / sqrt(var + eps).
//
// Semantics: training normalises with the batch's mean and biased variance (stats kernel) and
// folds them into the running statistics with momentum, the variance unbiased
// (running kernel); evaluation normalises with the running statistics (apply kernel alone).
//
// Design:
//  * reductions (stats, bwd_reduce): one block of BN_THREADS per channel, grid-stride over the
//    channels. Thread t sums the channel's elements t, t + BN_THREADS, ... in order; the block
//    then adds its partials in a fixed tree. No atomics: the result is the same run to run, and
//    the CPU reference (src/ops/batchnorm2d.rs) follows the same order.
//  * the variance is two passes, the mean first, then sum((x - mean)^2): never E[x^2] - E[x]^2,
//    which loses every digit when the mean is large against the spread (a channel at 1e4 with
//    std 1 would get a variance of rounding noise, even a negative one).
//  * elementwise kernels (apply, bwd_x): the per-plane grid of max-pool (grid x over the N*C
//    planes, grid y over a plane), the channel of a plane from one division per plane.
//  * an element's place in its channel, e in [0, count), splits as (n, hw) with FastDiv (count <
//    2^31, checked by the host); offsets are 64-bit: N*C*H*W may exceed 2^32.
#include "common.cuh"

#define BN_THREADS 256

// Mirrors `Batchnorm2dParams` in src/ops/batchnorm2d.rs, field for field.
struct Batchnorm2dParams {
    unsigned n, c, hw, count;  // count = n * hw, the values per channel
    float eps, momentum;
    FastDiv hw_div;            // division by hw
};

// The offset of element e (in [0, count)) of channel ch.
__device__ __forceinline__ unsigned long long bn_offset(unsigned e, unsigned ch, const Batchnorm2dParams& p) {
    const unsigned ni = fast_div(e, p.hw_div), i = e - ni * p.hw;
    return ((unsigned long long)ni * p.c + ch) * p.hw + i;
}

// The sum of every thread's `v` in the block, by the fixed tree; every thread gets it.
__device__ __forceinline__ float bn_block_sum(float v, float* sh) {
    const unsigned t = threadIdx.x;
    sh[t] = v;
    __syncthreads();
#pragma unroll
    for (unsigned s = BN_THREADS / 2; s > 0; s >>= 1) {
        if (t < s) sh[t] += sh[t + s];
        __syncthreads();
    }
    const float total = sh[0];
    __syncthreads();  // sh is reused by the next sum
    return total;
}

// mean[c], var[c] (biased) of the batch. Launch: blocks of BN_THREADS, any number.
PTX_KERNEL void batchnorm2d_stats_f32(const float* __restrict__ x, float* __restrict__ mean, float* __restrict__ var,
                                      Batchnorm2dParams p) {
    PTX_SHARED_ARRAY(float, sh, BN_THREADS);
    for (unsigned ch = blockIdx.x; ch < p.c; ch += gridDim.x) {
        float acc = 0.0f;
        for (unsigned e = threadIdx.x; e < p.count; e += BN_THREADS) acc += x[bn_offset(e, ch, p)];
        const float m = bn_block_sum(acc, sh) / (float)p.count;
        acc = 0.0f;
        for (unsigned e = threadIdx.x; e < p.count; e += BN_THREADS) {
            const float d = x[bn_offset(e, ch, p)] - m;
            acc += d * d;
        }
        const float v = bn_block_sum(acc, sh) / (float)p.count;
        if (threadIdx.x == 0) {
            mean[ch] = m;
            var[ch] = v;
        }
    }
}

// y = gamma * (x - mean) * rstd + beta with the given statistics (the batch's or the running).
PTX_KERNEL void batchnorm2d_apply_f32(const float* __restrict__ x, const float* __restrict__ mean,
                                      const float* __restrict__ var, const float* __restrict__ gamma,
                                      const float* __restrict__ beta, float* __restrict__ y, Batchnorm2dParams p) {
    for (unsigned plane = blockIdx.x; plane < p.n * p.c; plane += gridDim.x) {
        const unsigned ch = plane % p.c;
        const float m = mean[ch], scale = gamma[ch] * (1.0f / sqrtf(var[ch] + p.eps)), shift = beta[ch];
        const unsigned long long base = (unsigned long long)plane * p.hw;
        for (unsigned i = blockIdx.y * blockDim.x + threadIdx.x; i < p.hw; i += gridDim.y * blockDim.x)
            y[base + i] = (x[base + i] - m) * scale + shift;
    }
}

// gbeta[c] = sum(gy), ggamma[c] = sum(gy * xhat), xhat = (x - mean) * rstd. Launch as stats.
PTX_KERNEL void batchnorm2d_bwd_reduce_f32(const float* __restrict__ x, const float* __restrict__ gy,
                                           const float* __restrict__ mean, const float* __restrict__ var,
                                           float* __restrict__ gbeta, float* __restrict__ ggamma, Batchnorm2dParams p) {
    PTX_SHARED_ARRAY(float, sh, BN_THREADS);
    for (unsigned ch = blockIdx.x; ch < p.c; ch += gridDim.x) {
        const float m = mean[ch], rstd = 1.0f / sqrtf(var[ch] + p.eps);
        float sum_g = 0.0f, sum_gx = 0.0f;
        for (unsigned e = threadIdx.x; e < p.count; e += BN_THREADS) {
            const unsigned long long o = bn_offset(e, ch, p);
            sum_g += gy[o];
            sum_gx += gy[o] * ((x[o] - m) * rstd);
        }
        const float gb = bn_block_sum(sum_g, sh);
        const float gg = bn_block_sum(sum_gx, sh);
        if (threadIdx.x == 0) {
            gbeta[ch] = gb;
            ggamma[ch] = gg;
        }
    }
}

// gx = gamma * rstd / count * (count * gy - gbeta - xhat * ggamma): the batch statistics depend
// on x, hence the two sums.
PTX_KERNEL void batchnorm2d_bwd_x_f32(const float* __restrict__ x, const float* __restrict__ gy,
                                      const float* __restrict__ mean, const float* __restrict__ var,
                                      const float* __restrict__ gamma, const float* __restrict__ gbeta,
                                      const float* __restrict__ ggamma, float* __restrict__ gx, Batchnorm2dParams p) {
    for (unsigned plane = blockIdx.x; plane < p.n * p.c; plane += gridDim.x) {
        const unsigned ch = plane % p.c;
        const float m = mean[ch], rstd = 1.0f / sqrtf(var[ch] + p.eps), cnt = (float)p.count;
        const float k = gamma[ch] * rstd / cnt, gb = gbeta[ch], gg = ggamma[ch];
        const unsigned long long base = (unsigned long long)plane * p.hw;
        for (unsigned i = blockIdx.y * blockDim.x + threadIdx.x; i < p.hw; i += gridDim.y * blockDim.x) {
            const float xhat = (x[base + i] - m) * rstd;
            gx[base + i] = k * (cnt * gy[base + i] - gb - xhat * gg);
        }
    }
}

// running = (1 - momentum) * running + momentum * batch, the variance unbiased (var * count /
// (count - 1)), as PyTorch. One thread per channel.
PTX_KERNEL void batchnorm2d_running_f32(float* __restrict__ running_mean, float* __restrict__ running_var,
                                        const float* __restrict__ mean, const float* __restrict__ var,
                                        Batchnorm2dParams p) {
    const float unbias = (float)p.count / (float)(p.count - 1);
    FOR_EACH_INDEX(ch, p.c) {
        running_mean[ch] = (1.0f - p.momentum) * running_mean[ch] + p.momentum * mean[ch];
        running_var[ch] = (1.0f - p.momentum) * running_var[ch] + p.momentum * (var[ch] * unbias);
    }
}
