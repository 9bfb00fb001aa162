// resize: bilinear resampling of u8 images to f32 in [0, 1], exactly PyTorch's
//   F.interpolate(x.float() / 255, size=(OH, OW), mode="bilinear", align_corners=False)
// (no antialiasing). images: (N, C, H, W) u8 -> y: (N, C, OH, OW) f32. Per axis:
//   src = max((dst + 0.5) * (in / out) - 0.5, 0),  i0 = floor(src),  i1 = min(i0 + 1, in - 1),
//   l1 = src - i0,  l0 = 1 - l1
//   y = l0y * (l0x * v00 + l1x * v01) + l1y * (l0x * v10 + l1x * v11),  v = x / 255
// The coordinate and blend arithmetic uses explicit round-to-nearest intrinsics (__fmul_rn,
// __fadd_rn), which the compiler may not contract into FMAs: the kernel then rounds exactly as the
// CPU reference (src/ops/resize.rs) does, operation for operation.
// Design: one thread per output element, grid-stride loop, 64-bit plane offsets. Memory-bound;
// the four u8 reads per output hit the same few cache lines as the neighbouring threads'.
#include "common.cuh"

// Mirrors `ResizeParams` in src/ops/resize.rs, field for field.
struct ResizeParams {
    unsigned n, c, h, w, oh, ow;
    float scale_h, scale_w;  // in / out, computed on the host in f32 (as PyTorch does)
};

// Source index pair and weight of the upper one, along one axis.
__device__ __forceinline__ void source(unsigned dst, float scale, unsigned in, unsigned& i0, unsigned& i1, float& l1) {
    const float src = fmaxf(__fadd_rn(__fmul_rn(__fadd_rn((float)dst, 0.5f), scale), -0.5f), 0.0f);
    i0 = min((unsigned)src, in - 1);  // src >= 0: truncation is floor; min guards rounding at the edge
    i1 = min(i0 + 1, in - 1);
    l1 = __fadd_rn(src, -(float)i0);
}

PTX_KERNEL void resize_bilinear_u8_f32(const unsigned char* __restrict__ x, float* __restrict__ y, ResizeParams p) {
    const unsigned long long plane_out = (unsigned long long)p.oh * p.ow;
    const unsigned long long total = (unsigned long long)p.n * p.c * plane_out;
    FOR_EACH_INDEX(i, total) {
        const unsigned long long plane = i / plane_out;
        const unsigned r = (unsigned)(i - plane * plane_out);
        const unsigned oy = r / p.ow, ox = r - oy * p.ow;
        unsigned y0, y1, x0, x1;
        float ly, lx;
        source(oy, p.scale_h, p.h, y0, y1, ly);
        source(ox, p.scale_w, p.w, x0, x1, lx);
        const unsigned char* xp = x + plane * p.h * p.w;
        const float v00 = (float)xp[y0 * p.w + x0] / 255.0f, v01 = (float)xp[y0 * p.w + x1] / 255.0f;
        const float v10 = (float)xp[y1 * p.w + x0] / 255.0f, v11 = (float)xp[y1 * p.w + x1] / 255.0f;
        const float l0y = __fadd_rn(1.0f, -ly), l0x = __fadd_rn(1.0f, -lx);
        const float top = __fadd_rn(__fmul_rn(l0x, v00), __fmul_rn(lx, v01));
        const float bot = __fadd_rn(__fmul_rn(l0x, v10), __fmul_rn(lx, v11));
        y[i] = __fadd_rn(__fmul_rn(l0y, top), __fmul_rn(ly, bot));
    }
}
