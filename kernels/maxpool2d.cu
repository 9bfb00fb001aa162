// maxpool2d: k x k windows, stride s, no padding. x: (N, C, H, W) -> y: (N, C, OH, OW),
// OH = (H - k) / s + 1. The forward also writes, per output, the flat index (h * W + w) of the
// chosen input inside its (n, c) plane: the backward routes gradients by it.
//
// Semantics (as PyTorch): the first maximum in row-major window order wins a tie; a NaN is taken
// as the maximum (once the running max is NaN only a later NaN replaces it, so y is NaN).
//
// Design:
//  * forward: one thread per OUTPUT element, grid-stride loop; it scans its k x k window.
//  * backward: one thread per INPUT element, gathering. With overlapping windows (AlexNet: 3x3,
//    stride 2) an input may be the argmax of up to ceil(k/s)^2 windows and must get the SUM of
//    their gradients. Instead of scattering with atomicAdd (whose summation order, hence result,
//    varies run to run), each input visits the windows that contain it, in ascending (oy, ox)
//    order, and adds gy where that window's argmax is itself. Deterministic, no atomics, and the
//    same summation order as the CPU reference's scatter loop, so the results are bit-identical.
//    An argmax index out of range can never match any input: a corrupt argmax cannot make the
//    kernel read or write out of bounds.
// Planes are addressed with 64-bit offsets: N * C * H * W may exceed 2^31.
#include "common.cuh"

// Mirrors `Maxpool2dParams` in src/ops/maxpool2d.rs, field for field.
struct Maxpool2dParams {
    unsigned n, c, h, w, oh, ow, k, stride;
};

PTX_KERNEL void maxpool2d_fwd_f32(const float* __restrict__ x, float* __restrict__ y, unsigned* __restrict__ argmax,
                                  Maxpool2dParams p) {
    const unsigned long long plane_out = (unsigned long long)p.oh * p.ow;
    const unsigned long long total = (unsigned long long)p.n * p.c * plane_out;
    FOR_EACH_INDEX(i, total) {
        const unsigned long long plane = i / plane_out;
        const unsigned r = (unsigned)(i - plane * plane_out);
        const unsigned oy = r / p.ow, ox = r - oy * p.ow;
        const float* xp = x + plane * p.h * p.w;
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
        y[i] = best;
        argmax[i] = arg;
    }
}

PTX_KERNEL void maxpool2d_bwd_f32(const unsigned* __restrict__ argmax, const float* __restrict__ gy,
                                  float* __restrict__ gx, Maxpool2dParams p) {
    const unsigned long long plane_in = (unsigned long long)p.h * p.w;
    const unsigned long long plane_out = (unsigned long long)p.oh * p.ow;
    const unsigned long long total = (unsigned long long)p.n * p.c * plane_in;
    FOR_EACH_INDEX(i, total) {
        const unsigned long long plane = i / plane_in;
        const unsigned me = (unsigned)(i - plane * plane_in);  // iy * W + ix
        const unsigned iy = me / p.w, ix = me - iy * p.w;
        // Windows containing row iy: oy * s <= iy <= oy * s + k - 1, and oy < OH.
        const unsigned oy_lo = iy < p.k ? 0 : (iy - p.k) / p.stride + 1;
        const unsigned oy_hi = min(iy / p.stride, p.oh - 1);
        const unsigned ox_lo = ix < p.k ? 0 : (ix - p.k) / p.stride + 1;
        const unsigned ox_hi = min(ix / p.stride, p.ow - 1);
        const unsigned* ap = argmax + plane * plane_out;
        const float* gp = gy + plane * plane_out;
        float acc = 0.0f;
        for (unsigned oy = oy_lo; oy <= oy_hi; ++oy) {
            for (unsigned ox = ox_lo; ox <= ox_hi; ++ox) {
                const unsigned o = oy * p.ow + ox;
                if (ap[o] == me) acc += gp[o];
            }
        }
        gx[i] = acc;
    }
}
