// avgpool2d: PyTorch's nn.AvgPool2d(k, stride=s, padding=p, ceil_mode=False, count_include_pad)
// with square k x k windows. x: (N, C, H, W) -> y: (N, C, OH, OW), OH = (H + 2p - k) / s + 1
// (OW alike). Output (oy, ox) averages the window rows [oy * s - p, oy * s - p + k) and columns
// alike, over the inputs of the window that lie inside x (the padding adds zeros):
//   y = sum / divisor, divisor = (window clipped to the padded input, rows [-p, H + p)) with
//   count_include_pad, which is k * k in floor mode; else the count of real inputs in the window.
// The host refuses p > k / 2 (as PyTorch), so every window holds at least one real input and
// no divisor is 0. The sum runs in fp32 in row-major window order and is divided (not multiplied
// by a reciprocal), as PyTorch's kernels do.
//
// Backward: gx at an input is the sum, over the windows that contain it, of gy / divisor of that
// window: gy spread evenly over its window (the padding's share goes nowhere).
//
// Design:
//  * launch: a 2-D grid, x over the N * C planes and y over the elements of one plane (outputs for
//    the forward, inputs for the backward), both grid-stride so the host may cap either; a
//    thread's plane is its block's x, its place in the plane 32-bit, its row and column from
//    FastDiv (no division of a 64-bit flat index), as kernels/maxpool2d.cu.
//  * forward: one thread per OUTPUT element; it sums its window's real inputs.
//  * backward: one thread per INPUT element, gathering: it visits the windows that contain it,
//    in ascending (oy, ox) order, and adds gy / divisor of each. No atomics (overlapping windows
//    would need them to scatter), so the result does not change from run to run, and the order
//    of the terms is the CPU reference's scatter loop's: the results are bit-identical.
//  * window bounds in signed 32-bit: the host checks H + 2p, W + 2p and a plane below 2^31.
// Planes are addressed with 64-bit offsets: N * C * H * W may exceed 2^32.
#include "common.cuh"

// Mirrors `Avgpool2dParams` in src/ops/avgpool2d.rs, field for field.
struct Avgpool2dParams {
    unsigned n, c, h, w, oh, ow, k, stride, pad;
    unsigned count_include_pad;         // 1: divide by the window within the padded input
    FastDiv w_div, ow_div, stride_div;  // division by W, by OW and by the stride
};

// Every (plane, element) pair of `planes` planes of `elems` elements, as described above.
#define FOR_EACH_PLANE_ELEMENT(plane, e, planes, elems)                                             \
    for (unsigned long long plane = blockIdx.x; plane < (planes); plane += gridDim.x)              \
        for (unsigned e = blockIdx.y * blockDim.x + threadIdx.x; e < (elems); e += gridDim.y * blockDim.x)

// The real rows (or columns) [lo, hi) of the window starting at `start` (= o * s - p) in a
// dimension of `size` inputs, and the window's extent within the padded input, [start, pad_end).
struct Span {
    int lo, hi, padded;
};
__device__ __forceinline__ Span window_span(int start, int k, int size, int pad) {
    const int pad_end = min(start + k, size + pad);
    return Span{max(start, 0), min(start + k, size), pad_end - start};
}

// The divisor of the window with row span r and column span c.
__device__ __forceinline__ float window_divisor(Span r, Span c, unsigned count_include_pad) {
    const int count = count_include_pad ? r.padded * c.padded : (r.hi - r.lo) * (c.hi - c.lo);
    return (float)count;
}

PTX_KERNEL void avgpool2d_fwd_f32(const float* __restrict__ x, float* __restrict__ y, Avgpool2dParams p) {
    const unsigned plane_in = p.h * p.w, plane_out = p.oh * p.ow;
    const int k = (int)p.k, pad = (int)p.pad, s = (int)p.stride;
    FOR_EACH_PLANE_ELEMENT(plane, o, (unsigned long long)p.n * p.c, plane_out) {
        const float* xp = x + plane * plane_in;
        const unsigned oy = fast_div(o, p.ow_div), ox = o - oy * p.ow;
        const Span r = window_span((int)oy * s - pad, k, (int)p.h, pad);
        const Span c = window_span((int)ox * s - pad, k, (int)p.w, pad);
        float sum = 0.0f;
        for (int iy = r.lo; iy < r.hi; ++iy)
            for (int ix = c.lo; ix < c.hi; ++ix) sum += xp[iy * (int)p.w + ix];
        y[plane * plane_out + o] = sum / window_divisor(r, c, p.count_include_pad);
    }
}

PTX_KERNEL void avgpool2d_bwd_f32(const float* __restrict__ gy, float* __restrict__ gx, Avgpool2dParams p) {
    const unsigned plane_in = p.h * p.w, plane_out = p.oh * p.ow;
    const int k = (int)p.k, pad = (int)p.pad, s = (int)p.stride;
    FOR_EACH_PLANE_ELEMENT(plane, me, (unsigned long long)p.n * p.c, plane_in) {  // me = iy * W + ix
        const unsigned iy = fast_div(me, p.w_div), ix = me - iy * p.w;
        // In padded coordinates (py = iy + p) the windows containing row py are those with
        // oy * s <= py <= oy * s + k - 1, and oy < OH.
        const unsigned py = iy + p.pad, px = ix + p.pad;
        const unsigned oy_lo = py < p.k ? 0 : fast_div(py - p.k, p.stride_div) + 1;
        const unsigned oy_hi = min((unsigned)fast_div(py, p.stride_div), p.oh - 1);
        const unsigned ox_lo = px < p.k ? 0 : fast_div(px - p.k, p.stride_div) + 1;
        const unsigned ox_hi = min((unsigned)fast_div(px, p.stride_div), p.ow - 1);
        const float* gp = gy + plane * plane_out;
        float acc = 0.0f;
        for (unsigned oy = oy_lo; oy <= oy_hi; ++oy) {
            const Span r = window_span((int)oy * s - pad, k, (int)p.h, pad);
            for (unsigned ox = ox_lo; ox <= ox_hi; ++ox) {
                const Span c = window_span((int)ox * s - pad, k, (int)p.w, pad);
                acc += gp[oy * p.ow + ox] / window_divisor(r, c, p.count_include_pad);
            }
        }
        gx[plane * plane_in + me] = acc;
    }
}
