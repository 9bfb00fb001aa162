// 2-D convolution (cross-correlation, as in PyTorch), forward and backward, as implicit GEMMs on
// the shared core in gemm.cuh. Shapes: x (N, Cin, H, W), w (Cout, Cin, KH, KW), b (Cout),
// y (N, Cout, OH, OW), OH = (H + 2*pad - KH) / stride + 1. Let KHW = KH*KW, K = Cin*KHW.
//
// Each pass is one GEMM whose operands are read in place (no im2col buffer):
// - forward  (conv2d_fwd_f32_*):      M = Cout, N = batch*OH*OW (column q = (n, oh, ow)), K = Cin*KHW
//       A(co, k) = w[co][k],  B(k, q) = x[n][ci][oh*s-pad+kh][ow*s-pad+kw] (0 in the padding),
//       epilogue y = A.B + b[co], optionally max(., 0). The whole batch is one GEMM, so the small
//       late layers (12 x 12 images) still fill 128-wide tiles.
// - input grad (conv2d_bwd_input_f32_*): M = Cin, N = batch*H*W (column q = (n, ih, iw)), K = Cout*KHW
//       A(ci, (co,kh,kw)) = w[co][ci][kh][kw],
//       B((co,kh,kw), q) = gy[n][co][oh][ow] where ih = oh*s - pad + kh (and the same for w), i.e.
//       oh = (ih + pad - kh) / s when that divides exactly and lands in [0, OH), else 0.
//       Each gx element is written once (a gather, no atomics).
// - weight grad (conv2d_bwd_weight_f32_*): M = Cout, N = K = Cin*KHW, and the reduction runs over
//       batch*OH*OW (373k for AlexNet's conv1): A(co, (n,p)) = gy[n][co][p], B((n,p), j) = the
//       forward's B transposed. The reduction is split over blockIdx.z (k_chunk each); every split
//       writes its partial (M x N) into a workspace and conv2d_splitk_sum_f32 adds them up in a
//       fixed order: deterministic, no atomics.
// - bias grad (conv2d_bwd_bias_f32): one block per output channel, a tree reduction over (n, oh, ow).
// Every kernel comes in a 128 x 128-tile and a 64 x 64-tile variant (suffix _t128 / _t64); the host
// takes the 64 one when the 128 grid would leave the GPU's SMs idle.
#include "gemm.cuh"

// Mirrors ops::conv2d::Conv2dParams field for field.
struct Conv2dParams {
    unsigned n, c_in, h, w, c_out, kh, kw, stride, pad, oh, ow;
    unsigned relu;     // forward: 1 = fuse max(., 0)
    unsigned k_chunk;  // weight grad: reduction length per split (a multiple of 8)
};

// ---- forward ----
struct FwdA {  // w viewed as (Cout, K), row-major
    const float* __restrict__ w;
    int K;
    static constexpr bool K_FAST = true;
    __device__ __forceinline__ float operator()(int m, int k) const { return __ldg(w + m * K + k); }
};
struct FwdB {  // the im2col matrix (K, batch*OH*OW), read from x
    const float* __restrict__ x;
    Conv2dParams p;
    static constexpr bool K_FAST = false;
    __device__ __forceinline__ float operator()(int k, int q) const {
        const int ohw = p.oh * p.ow, khw = p.kh * p.kw;
        const int n = q / ohw, pix = q - n * ohw;
        const int oh = pix / (int)p.ow, ow = pix - oh * (int)p.ow;
        const int ci = k / khw, r = k - ci * khw;
        const int kh = r / (int)p.kw, kw = r - kh * (int)p.kw;
        const int ih = oh * (int)p.stride - (int)p.pad + kh, iw = ow * (int)p.stride - (int)p.pad + kw;
        if ((unsigned)ih >= p.h || (unsigned)iw >= p.w) return 0.0f;
        return __ldg(x + ((n * (int)p.c_in + ci) * (int)p.h + ih) * (int)p.w + iw);
    }
};
struct FwdEpi {
    float* __restrict__ y;
    const float* __restrict__ b;
    Conv2dParams p;
    __device__ __forceinline__ void operator()(int co, int q, float v) const {
        const int ohw = p.oh * p.ow;
        const int n = q / ohw, pix = q - n * ohw;
        v += __ldg(b + co);
        if (p.relu) v = fmaxf(v, 0.0f);
        y[(n * (int)p.c_out + co) * ohw + pix] = v;
    }
};

template <class T>
__device__ __forceinline__ void conv_fwd(const float* x, const float* w, const float* b, float* y,
                                         const Conv2dParams& p) {
    const int M = p.c_out, N = p.n * p.oh * p.ow, K = p.c_in * p.kh * p.kw;
    gemm_block<T>(FwdA{w, K}, FwdB{x, p}, FwdEpi{y, b, p}, M, N, 0, K, blockIdx.y * T::BM, blockIdx.x * T::BN);
}

// ---- input grad ----
struct BwdInA {  // A(ci, (co, r)) = w[co][ci][r]
    const float* __restrict__ w;
    Conv2dParams p;
    static constexpr bool K_FAST = true;
    __device__ __forceinline__ float operator()(int ci, int k) const {
        const int khw = p.kh * p.kw;
        const int co = k / khw, r = k - co * khw;
        return __ldg(w + (co * (int)p.c_in + ci) * khw + r);
    }
};
struct BwdInB {  // B((co, kh, kw), (n, ih, iw)) = gy[n][co][oh][ow] with ih = oh*s - pad + kh
    const float* __restrict__ gy;
    Conv2dParams p;
    static constexpr bool K_FAST = false;
    __device__ __forceinline__ float operator()(int k, int q) const {
        const int hw = p.h * p.w, khw = p.kh * p.kw, s = p.stride;
        const int n = q / hw, pix = q - n * hw;
        const int ih = pix / (int)p.w, iw = pix - ih * (int)p.w;
        const int co = k / khw, r = k - co * khw;
        const int kh = r / (int)p.kw, kw = r - kh * (int)p.kw;
        const int th = ih + (int)p.pad - kh, tw = iw + (int)p.pad - kw;
        if (th < 0 || tw < 0) return 0.0f;
        const int oh = th / s, ow = tw / s;
        if (oh * s != th || ow * s != tw || oh >= (int)p.oh || ow >= (int)p.ow) return 0.0f;
        return __ldg(gy + ((n * (int)p.c_out + co) * (int)p.oh + oh) * (int)p.ow + ow);
    }
};
struct BwdInEpi {
    float* __restrict__ gx;
    Conv2dParams p;
    __device__ __forceinline__ void operator()(int ci, int q, float v) const {
        const int hw = p.h * p.w;
        const int n = q / hw, pix = q - n * hw;
        gx[(n * (int)p.c_in + ci) * hw + pix] = v;
    }
};

template <class T>
__device__ __forceinline__ void conv_bwd_input(const float* w, const float* gy, float* gx, const Conv2dParams& p) {
    const int M = p.c_in, N = p.n * p.h * p.w, K = p.c_out * p.kh * p.kw;
    gemm_block<T>(BwdInA{w, p}, BwdInB{gy, p}, BwdInEpi{gx, p}, M, N, 0, K, blockIdx.y * T::BM, blockIdx.x * T::BN);
}

// ---- weight grad (split-K) ----
struct BwdWA {  // A(co, (n, pix)) = gy[n][co][pix]
    const float* __restrict__ gy;
    Conv2dParams p;
    static constexpr bool K_FAST = true;
    __device__ __forceinline__ float operator()(int co, int k) const {
        const int ohw = p.oh * p.ow;
        const int n = k / ohw, pix = k - n * ohw;
        return __ldg(gy + (n * (int)p.c_out + co) * ohw + pix);
    }
};
struct BwdWB {  // B((n, oh, ow), (ci, kh, kw)) = x[n][ci][oh*s-pad+kh][ow*s-pad+kw]
    const float* __restrict__ x;
    Conv2dParams p;
    static constexpr bool K_FAST = true;
    __device__ __forceinline__ float operator()(int k, int j) const { return FwdB{x, p}(j, k); }
};
struct BwdWEpi {  // partial of split blockIdx.z into ws[z][co][j]
    float* __restrict__ ws;
    int N;
    __device__ __forceinline__ void operator()(int co, int j, float v) const { ws[co * N + j] = v; }
};

template <class T>
__device__ __forceinline__ void conv_bwd_weight(const float* x, const float* gy, float* ws, const Conv2dParams& p) {
    const int M = p.c_out, N = p.c_in * p.kh * p.kw, K = p.n * p.oh * p.ow;
    const int k_begin = blockIdx.z * p.k_chunk;
    const int k_end = min(K, k_begin + (int)p.k_chunk);
    float* part = ws + (unsigned long long)blockIdx.z * M * N;
    gemm_block<T>(BwdWA{gy, p}, BwdWB{x, p}, BwdWEpi{part, N}, M, N, k_begin, k_end, blockIdx.y * T::BM,
                  blockIdx.x * T::BN);
}

#define CONV_KERNELS(TILE, SUFFIX)                                                                         \
    PTX_KERNEL void __launch_bounds__(256)                                                                 \
        conv2d_fwd_f32_##SUFFIX(const float* __restrict__ x, const float* __restrict__ w,                   \
                                const float* __restrict__ b, float* __restrict__ y, Conv2dParams p) {      \
        conv_fwd<TILE>(x, w, b, y, p);                                                                     \
    }                                                                                                      \
    PTX_KERNEL void __launch_bounds__(256) conv2d_bwd_input_f32_##SUFFIX(                                  \
        const float* __restrict__ w, const float* __restrict__ gy, float* __restrict__ gx, Conv2dParams p) { \
        conv_bwd_input<TILE>(w, gy, gx, p);                                                                \
    }                                                                                                      \
    PTX_KERNEL void __launch_bounds__(256) conv2d_bwd_weight_f32_##SUFFIX(                                 \
        const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ ws, Conv2dParams p) { \
        conv_bwd_weight<TILE>(x, gy, ws, p);                                                               \
    }

CONV_KERNELS(Tile128, t128)
CONV_KERNELS(Tile64, t64)

// gw[i] = sum over splits of ws[z][i]; gw: (Cout, Cin, KH, KW) flattened, len elements.
PTX_KERNEL void conv2d_splitk_sum_f32(const float* __restrict__ ws, float* __restrict__ gw, unsigned len,
                                      unsigned splits) {
    splitk_sum(ws, gw, len, splits);
}

// gb[co] = sum over (n, oh, ow) of gy[n][co][oh][ow]. One 256-thread block per channel.
PTX_KERNEL void __launch_bounds__(256) conv2d_bwd_bias_f32(const float* __restrict__ gy, float* __restrict__ gb,
                                                           Conv2dParams p) {
    const unsigned co = blockIdx.x, ohw = p.oh * p.ow;
    float s = 0.0f;
    for (unsigned n = 0; n < p.n; ++n) {
        const float* row = gy + (n * p.c_out + co) * ohw;
        for (unsigned i = threadIdx.x; i < ohw; i += blockDim.x) s += row[i];
    }
    __shared__ float part[8];
    s = warp_sum(s);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        s = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.0f;
        s = warp_sum(s);
        if (threadIdx.x == 0) gb[co] = s;
    }
}
