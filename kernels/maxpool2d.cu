// maxpool2d: PyTorch's nn.MaxPool2d(k, stride=s, padding=p, ceil_mode=False), square k x k
// windows. x: (N, C, H, W) -> y: (N, C, OH, OW), OH = (H + 2p - k) / s + 1 (OW alike). Output
// (oy, ox) takes the maximum over the window rows [oy * s - p, oy * s - p + k) and columns alike,
// of the inputs that lie inside x: the padding acts as -inf and never wins. The host refuses
// p > k / 2 (as PyTorch), so every window holds at least one real input. The forward also writes,
// per output, the flat index (h * W + w) of the chosen input inside its (n, c) plane, always a
// real input: the backward routes gradients by it.
//
// Semantics (as PyTorch): the first maximum in row-major order over the window's real inputs wins
// a tie; a NaN is taken as the maximum (once the running max is NaN only a later NaN replaces it,
// so y is NaN). A window whose real inputs are all -inf gives -inf at its first real input.
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
//  * forward: one thread per OUTPUT element; it scans its k x k window clipped to the plane
//    (signed 32-bit bounds: the host checks H + 2p and W + 2p below 2^31).
//  * backward: one thread per INPUT element, gathering. With overlapping windows (AlexNet: 3x3,
//    stride 2) an input may be the argmax of up to ceil(k/s)^2 windows and must get the SUM of
//    their gradients. Instead of scattering with atomicAdd (whose summation order, hence result,
//    varies run to run), each input visits the windows that contain it, in ascending (oy, ox)
//    order, and adds gy where that window's argmax is itself. The windows are found in padded
//    coordinates (iy + p, never negative, so the unsigned math cannot wrap). Deterministic, no atomics, and the
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
    unsigned n, c, h, w, oh, ow, k, stride, pad;
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
        // The window's real rows [y0, y1) and columns [x0, x1): never empty (p <= k / 2, H >= 1).
        const int ys = (int)(oy * p.stride) - (int)p.pad, xs = (int)(ox * p.stride) - (int)p.pad;
        const int y0 = max(ys, 0), y1 = min(ys + (int)p.k, (int)p.h);
        const int x0 = max(xs, 0), x1 = min(xs + (int)p.k, (int)p.w);
        float best = __int_as_float(0xff800000);  // -inf
        unsigned arg = (unsigned)(y0 * (int)p.w + x0);  // the first real input: all -inf picks it
        for (int iy = y0; iy < y1; ++iy) {
            for (int ix = x0; ix < x1; ++ix) {
                const unsigned idx = (unsigned)(iy * (int)p.w + ix);
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
        // In padded coordinates (py = iy + p) the windows containing row py are those with
        // oy * s <= py <= oy * s + k - 1, and oy < OH (columns alike).
        const unsigned py = iy + p.pad, px = ix + p.pad;
        const unsigned oy_lo = py < p.k ? 0 : fast_div(py - p.k, p.stride_div) + 1;
        const unsigned oy_hi = min((unsigned)fast_div(py, p.stride_div), p.oh - 1);
        const unsigned ox_lo = px < p.k ? 0 : fast_div(px - p.k, p.stride_div) + 1;
        const unsigned ox_hi = min((unsigned)fast_div(px, p.stride_div), p.ow - 1);
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
