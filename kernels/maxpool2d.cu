// maxpool2d: k x k windows, stride s, no padding. x: (N, C, H, W) -> y: (N, C, OH, OW),
// OH = (H - k) / s + 1. The forward also writes, per output, the flat index (h * W + w) of the
// chosen input inside its (n, c) plane: the backward routes gradients by it.
//
// Semantics (as PyTorch): the first maximum in row-major window order wins a tie; a NaN is taken
// as the maximum (once the running max is NaN only a later NaN replaces it, so y is NaN).
// With drop_nonpositive set (the host sets it when x is a ReLU's output), a window whose maximum
// is <= 0 stores NO_GRAD as its argmax, so the backward routes its gradient nowhere: the ReLU's
// backward would have zeroed it (its output was <= 0 there), and this way the gradient leaves
// max-pool already masked, with no pass of its own (ops::relu). The test is the ReLU backward's
// own (relu_passes_grad): a NaN maximum routes its gradient, as the ReLU passes it at a NaN
// output. y is unchanged.
//
// Design:
//  * launch: a 2-D grid, x over the N * C planes and y over the elements of one plane (outputs for
//    the forward, inputs for the backward), both grid-stride so the host may cap either. A
//    thread's plane is its block's x, its place in the plane 32-bit, and the row and column come
//    from FastDiv: no division of a 64-bit flat index. (Dividing one per element, the backward
//    took about 8x the time its memory traffic needs on the H200.)
//  * forward: one thread per OUTPUT element; it scans its k x k window.
//  * backward: one thread per INPUT element, gathering. With overlapping windows (AlexNet: 3x3,
//    stride 2) an input may be the argmax of up to ceil(k/s)^2 windows and must get the SUM of
//    their gradients. Instead of scattering with atomicAdd (whose summation order, hence result,
//    varies run to run), each input visits the windows that contain it, in ascending (oy, ox)
//    order, and adds gy where that window's argmax is itself. Deterministic, no atomics, and the
//    same summation order as the CPU reference's scatter loop, so the results are bit-identical.
//    An argmax index out of range (NO_GRAD, or a corrupt one) never matches any input, so it
//    routes nothing and cannot make the kernel read or write out of bounds.
// A plane has fewer than 2^31 elements and there are fewer than 2^32 planes (the host checks);
// planes are addressed with 64-bit offsets: N * C * H * W may exceed 2^32.
#include "common.cuh"

// The argmax of a window that routes no gradient: no input's index (a plane has < 2^31 elements).
#define NO_GRAD 0xffffffffu

// Mirrors `Maxpool2dParams` in src/ops/maxpool2d.rs, field for field.
struct Maxpool2dParams {
    unsigned n, c, h, w, oh, ow, k, stride;
    unsigned drop_nonpositive;          // 1: windows with max <= 0 (not NaN) route no gradient
    FastDiv w_div, ow_div, stride_div;  // division by W, by OW and by the stride
};

// Every (plane, element) pair of `planes` planes of `elems` elements, as described above.
#define FOR_EACH_PLANE_ELEMENT(plane, e, planes, elems)                           \
    for (unsigned plane = blockIdx.x; plane < (planes); plane += gridDim.x)      \
        for (unsigned e = blockIdx.y * blockDim.x + threadIdx.x; e < (elems); e += gridDim.y * blockDim.x)

PTX_KERNEL void maxpool2d_fwd_f32(const float* __restrict__ x, float* __restrict__ y, unsigned* __restrict__ argmax,
                                  Maxpool2dParams p) {
    const unsigned plane_in = p.h * p.w, plane_out = p.oh * p.ow;
    FOR_EACH_PLANE_ELEMENT(plane, o, p.n * p.c, plane_out) {
        const float* xp = x + (unsigned long long)plane * plane_in;
        const unsigned oy = fast_div(o, p.ow_div), ox = o - oy * p.ow;
        const unsigned y0 = oy * p.stride, x0 = ox * p.stride;
        float best = __int_as_float(0xff800000);  // -inf
        unsigned arg = y0 * p.w + x0;
        for (unsigned ky = 0; ky < p.k; ++ky) {
            for (unsigned kx = 0; kx < p.k; ++kx) {
                const unsigned idx = (y0 + ky) * p.w + (x0 + kx);
                const float v = xp[idx];
                if (v > best || v != v) {  // v != v: NaN
                    best = v;
                    arg = idx;
                }
            }
        }
        const unsigned long long out = (unsigned long long)plane * plane_out + o;
        y[out] = best;
        const bool routes = !p.drop_nonpositive || relu_passes_grad(best);  // NaN routes
        argmax[out] = routes ? arg : NO_GRAD;
    }
}

PTX_KERNEL void maxpool2d_bwd_f32(const unsigned* __restrict__ argmax, const float* __restrict__ gy,
                                  float* __restrict__ gx, Maxpool2dParams p) {
    const unsigned plane_in = p.h * p.w, plane_out = p.oh * p.ow;
    FOR_EACH_PLANE_ELEMENT(plane, me, p.n * p.c, plane_in) {  // me = iy * W + ix
        const unsigned iy = fast_div(me, p.w_div), ix = me - iy * p.w;
        // Windows containing row iy: oy * s <= iy <= oy * s + k - 1, and oy < OH.
        const unsigned oy_lo = iy < p.k ? 0 : fast_div(iy - p.k, p.stride_div) + 1;
        const unsigned oy_hi = min((unsigned)fast_div(iy, p.stride_div), p.oh - 1);
        const unsigned ox_lo = ix < p.k ? 0 : fast_div(ix - p.k, p.stride_div) + 1;
        const unsigned ox_hi = min((unsigned)fast_div(ix, p.stride_div), p.ow - 1);
        const unsigned* ap = argmax + (unsigned long long)plane * plane_out;
        const float* gp = gy + (unsigned long long)plane * plane_out;
        float acc = 0.0f;
        for (unsigned oy = oy_lo; oy <= oy_hi; ++oy) {
            for (unsigned ox = ox_lo; ox <= ox_hi; ++ox) {
                const unsigned o = oy * p.ow + ox;
                if (ap[o] == me) acc += gp[o];
            }
        }
        gx[(unsigned long long)plane * plane_in + me] = acc;
    }
}
