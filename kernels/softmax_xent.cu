// softmax_xent: softmax + cross-entropy over rows. logits: (N, C), labels: (N) u32.
//   probs[r, j] = exp(x[r, j] - m_r) / s_r,  s_r = sum_j exp(x[r, j] - m_r),  m_r = max_j x[r, j]
//   loss_r = log(s_r) - (x[r, label_r] - m_r)       (= -log probs[r, label_r], by log-sum-exp)
//   loss = mean_r loss_r;  backward: gx[r, j] = (probs[r, j] - [j == label_r]) * gloss / N
//
// Design:
//  * row kernels: one WARP per row (rows grid-strided over warps; blockDim a multiple of 32, so a
//    warp never straddles rows and the full-mask shuffles are safe). Lanes stride the columns
//    (coalesced), then reduce with shuffles: max, sum of exp, and argmax (first index wins ties).
//    Subtracting the row max keeps exp() in (0, 1]: no overflow for any finite logits.
//  * the batch mean / the statistics: a single block of exactly 256 threads sums the per-row values
//    in a fixed order (strided partial sums, then a shared-memory tree). Deterministic, no atomics.
//  * a label >= C is never used as an index: that row's loss is NaN (the CPU path reports an error).
//  * NaN and infinities as in PyTorch: the row max skips a NaN (fmaxf), but exp(NaN - m) enters
//    s, so a NaN logit makes its row's loss, probabilities and gradient NaN, and the batch mean
//    NaN; a +inf logit does too (inf - inf); a -inf logit off the label is a class of probability
//    0 (finite loss), at the label it makes the loss +inf.
#include "common.cuh"

#define SXE_BLOCK 256  // the reduction kernels' block size (the host launches exactly this)

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Total order for argmax: NaN above everything (as torch.argmax), then value, then lower index.
__device__ __forceinline__ bool argmax_better(float v, unsigned i, float bv, unsigned bi) {
    const bool vn = v != v, bn = bv != bv;
    if (vn || bn) return vn && (!bn || i < bi);
    return v > bv || (v == bv && i < bi);
}

// The argmax of row xr, reduced across the warp (every lane returns the same index).
__device__ __forceinline__ unsigned warp_row_argmax(const float* __restrict__ xr, unsigned c, unsigned lane) {
    float bv = neg_inf();
    unsigned bi = 0xffffffffu;  // loses to any real element, even -inf
    for (unsigned j = lane; j < c; j += 32) {
        const float v = xr[j];
        if (argmax_better(v, j, bv, bi)) bv = v, bi = j;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const unsigned oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (argmax_better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    return bi;
}

// One warp per row. Writes row_loss[r]; with PROBS the probabilities, with CORRECT whether the
// argmax equals the label (1.0 / 0.0).
template <bool PROBS, bool CORRECT>
__device__ __forceinline__ void rows(const float* __restrict__ logits, const unsigned* __restrict__ labels,
                                     float* __restrict__ probs, float* __restrict__ row_loss,
                                     float* __restrict__ row_correct, unsigned n, unsigned c) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warps = blockDim.x >> 5;
    for (unsigned long long r = (unsigned long long)blockIdx.x * warps + (threadIdx.x >> 5); r < n;
         r += (unsigned long long)gridDim.x * warps) {
        const float* xr = logits + r * c;
        float m = neg_inf();
        for (unsigned j = lane; j < c; j += 32) m = fmaxf(m, xr[j]);
        m = warp_max(m);
        float s = 0.0f;
        for (unsigned j = lane; j < c; j += 32) s += expf(xr[j] - m);
        s = warp_sum(s);
        if (PROBS) {
            float* pr = probs + r * c;
            for (unsigned j = lane; j < c; j += 32) pr[j] = expf(xr[j] - m) / s;
        }
        unsigned arg = 0;
        if (CORRECT) arg = warp_row_argmax(xr, c, lane);
        if (lane == 0) {
            const unsigned label = labels[r];
            const bool valid = label < c;
            row_loss[r] = valid ? logf(s) - (xr[label] - m) : __int_as_float(0x7fc00000);  // NaN
            if (CORRECT) row_correct[r] = (valid && arg == label) ? 1.0f : 0.0f;
        }
    }
}

PTX_KERNEL void softmax_xent_fwd_f32(const float* __restrict__ logits, const unsigned* __restrict__ labels,
                                     float* __restrict__ probs, float* __restrict__ row_loss, unsigned n, unsigned c) {
    rows<true, false>(logits, labels, probs, row_loss, nullptr, n, c);
}

PTX_KERNEL void softmax_xent_stats_rows_f32(const float* __restrict__ logits, const unsigned* __restrict__ labels,
                                            float* __restrict__ row_loss, float* __restrict__ row_correct, unsigned n,
                                            unsigned c) {
    rows<false, true>(logits, labels, nullptr, row_loss, row_correct, n, c);
}

// Sum of v[0..n) by one block of SXE_BLOCK threads, in a fixed order; thread 0 gets the result.
__device__ __forceinline__ float block_sum(const float* __restrict__ v, unsigned n, float* sh) {
    const unsigned t = threadIdx.x;
    float acc = 0.0f;
    for (unsigned i = t; i < n; i += SXE_BLOCK) acc += v[i];
    sh[t] = acc;
    __syncthreads();
#pragma unroll
    for (unsigned s = SXE_BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) sh[t] += sh[t + s];
        __syncthreads();
    }
    const float total = sh[0];
    __syncthreads();  // sh may be reused by the caller
    return total;
}

// loss[0] = mean of row_loss[0..n). Launch: 1 block of SXE_BLOCK threads.
PTX_KERNEL void softmax_xent_mean_f32(const float* __restrict__ row_loss, float* __restrict__ loss, unsigned n) {
    PTX_SHARED_ARRAY(float, sh, SXE_BLOCK);
    const float total = block_sum(row_loss, n, sh);
    if (threadIdx.x == 0) loss[0] = total / (float)n;
}

// stats[0] += sum of row_loss, stats[1] += number correct. Launch: 1 block of SXE_BLOCK threads.
PTX_KERNEL void softmax_xent_stats_add_f32(const float* __restrict__ row_loss, const float* __restrict__ row_correct,
                                           float* __restrict__ stats, unsigned n) {
    PTX_SHARED_ARRAY(float, sh, SXE_BLOCK);
    const float loss = block_sum(row_loss, n, sh);
    const float correct = block_sum(row_correct, n, sh);
    if (threadIdx.x == 0) {
        stats[0] += loss;
        stats[1] += correct;
    }
}

// gx[r, j] = (probs[r, j] - [j == label_r]) * (gloss[0] / N). One thread per element; gloss is read
// on the device (no host round trip). A label >= C matches no column: never an out-of-bounds access.
PTX_KERNEL void softmax_xent_bwd_f32(const float* __restrict__ probs, const unsigned* __restrict__ labels,
                                     const float* __restrict__ gloss, float* __restrict__ gx, unsigned n, unsigned c) {
    const float g = gloss[0] / (float)n;
    const unsigned long long total = (unsigned long long)n * c;
    FOR_EACH_INDEX(i, total) {
        const unsigned long long r = i / c;
        const unsigned j = (unsigned)(i - r * c);
        gx[i] = (probs[i] - (j == labels[r] ? 1.0f : 0.0f)) * g;
    }
}
