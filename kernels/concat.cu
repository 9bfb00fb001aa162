// concat: torch.cat(xs, dim=1) and its backward. xs[i]: (N, C_i, H, W) -> y: (N, C, H, W) with
// C = sum C_i; input i fills y's channels [c_offset, c_offset + C_i), c_offset = C_0 + ... +
// C_{i-1}. The backward is the inverse copy: gx_i = gy[:, c_offset : c_offset + C_i].
//
// In NCHW memory one sample of input i is a contiguous run of part = C_i * H * W floats, and it
// lands at one contiguous run of y's sample (whole = C * H * W floats, starting c_offset * H * W
// into it): the whole op is N row copies per input, no per-element index math beyond an add.
//
// Design:
//  * one launch per input (the host loops over them): the forward writes input i into its slice
//    of y, the backward reads gy's slice for input i into a fresh (N, C_i, H, W) buffer. One
//    launch per input keeps the kernel free of a table of pointers and sizes; GoogLeNet concats
//    4 inputs, so the extra launches cost little beside the bytes moved.
//  * launch: a 2-D grid (the host's grid_planes), x over the N samples and y over the elements
//    of one sample's run, both grid-stride so the host may cap either. A thread copies element e
//    of sample s: a division-free mapping, and consecutive threads touch consecutive addresses
//    on both sides (coalesced).
//  * 64-bit offsets everywhere: N * C * H * W, and even one sample's run C_i * H * W, may exceed
//    2^32 (the host checks only that the dims fit 32 bits and the total fits memory).
//  * every input has at least one element (the host refuses empty ones: CUDA cannot allocate a
//    zero-size buffer on every GPU), so no launch has an empty grid.
#include "common.cuh"

// Mirrors `ConcatParams` in src/ops/concat.rs, field for field.
struct ConcatParams {
    unsigned n;             // N, the samples
    unsigned c_in;          // C_i, this input's channels
    unsigned c_out;         // C, y's channels (sum over the inputs)
    unsigned c_offset;      // where this input's channels start in y
    unsigned long long plane;  // H * W
};

// Every (sample, element) pair of n samples of `part` elements each, as described above.
#define FOR_EACH_SAMPLE_ELEMENT(s, e, n, part)                                                       \
    for (unsigned long long s = blockIdx.x; s < (n); s += gridDim.x)                                  \
        for (unsigned long long e = (unsigned long long)blockIdx.y * blockDim.x + threadIdx.x; e < (part); \
             e += (unsigned long long)gridDim.y * blockDim.x)

// x: (N, C_i, H, W) -> y[:, c_offset : c_offset + C_i] of y: (N, C, H, W).
PTX_KERNEL void concat_fwd_f32(const float* __restrict__ x, float* __restrict__ y, ConcatParams p) {
    const unsigned long long part = p.c_in * p.plane, whole = p.c_out * p.plane, off = p.c_offset * p.plane;
    FOR_EACH_SAMPLE_ELEMENT(s, e, p.n, part) y[s * whole + off + e] = x[s * part + e];
}

// gy[:, c_offset : c_offset + C_i] of gy: (N, C, H, W) -> gx: (N, C_i, H, W).
PTX_KERNEL void concat_bwd_f32(const float* __restrict__ gy, float* __restrict__ gx, ConcatParams p) {
    const unsigned long long part = p.c_in * p.plane, whole = p.c_out * p.plane, off = p.c_offset * p.plane;
    FOR_EACH_SAMPLE_ELEMENT(s, e, p.n, part) gx[s * part + e] = gy[s * whole + off + e];
}
