// 2-D convolution (cross-correlation, as in PyTorch), forward and backward, as implicit GEMMs on
// the shared core in gemm.cuh. Shapes: x (N, Cin, H, W), w (Cout, Cin, KH, KW), b (Cout),
// y (N, Cout, OH, OW), OH = (H + 2*pad - KH) / stride + 1. Let KHW = KH*KW, K = Cin*KHW.
//
// Each pass is one GEMM whose operands are read in place (no im2col buffer):
// - forward  (conv2d_fwd_f32_*):      M = Cout, N = batch*OH*OW (column q = (n, oh, ow)), K = Cin*KHW
//       A(co, k) = w[co][k] = wt[k][co],  B(k, q) = x[n][ci][oh*s-pad+kh][ow*s-pad+kw] (0 in the padding),
//       epilogue y = A.B + b[co], optionally ReLU (relu_f32: max(., 0) with NaN kept NaN, as
//       PyTorch). The whole batch is one GEMM, so the small late layers (12 x 12 images) still
//       fill 128-wide tiles.
// - input grad (conv2d_bwd_input_f32_*): M = Cin, N = batch*H*W (column q = (n, ih, iw)), K = Cout*KHW
//       A(ci, (co,kh,kw)) = w[co][ci][kh][kw] = wt[(co,kh,kw)][ci],
//       B((co,kh,kw), q) = gy[n][co][oh][ow] where ih = oh*s - pad + kh (and the same for w), i.e.
//       oh = (ih + pad - kh) / s when that divides exactly and lands in [0, OH), else 0.
//       Each gx element is written once (a gather, no atomics).
// - weight grad (conv2d_bwd_weight_f32_*): M = Cout, N = K = Cin*KHW, and the reduction runs over
//       batch*OH*OW (373k for AlexNet's conv1): A(co, (n,p)) = gy[n][co][p], B((n,p), j) = the
//       forward's B transposed. The reduction is split over blockIdx.z (k_chunk each); every split
//       writes its partial (M x N) into a workspace and conv2d_splitk_sum_f32 adds them up in a
//       fixed order: deterministic, no atomics.
// - bias grad (conv2d_bwd_bias_f32): blocks (channel, image split), each a tree reduction over its
//       images' (oh, ow); the partials are added by conv2d_splitk_sum_f32 (deterministic).
// Index math: each thread computes its rows' and columns' offsets once (gemm.cuh's loader
// concept), and the per-k part of the im2col index comes from a small k-table built by
// conv2d_ktable_u32, so the inner loop has no integer division.
// The filters: the forward and input-grad GEMMs read A from wt, the filters permuted by
// conv2d_wperm_f32 so that A's rows along m are contiguous: with Cout (Cin) a multiple of 4,
// gemm.cuh then copies them 16 bytes at a time (w itself is read along k, which its shared-memory
// layout cannot take in 16-byte copies). The permutation costs one pass over the filters (at most
// a few MB) per GEMM.
// Every GEMM kernel comes in 128 x 128, 128 x 64, 64 x 64, 96 x 128 and 128 x 96-tile variants
// (suffix _t128 / _t128x64 / _t64 / _t96 / _t128x96); the host picks by how well each grid fills
// the GPU's waves and M and N the tile (ops::gemm::plan::Planner::launch).
#include "gemm.cuh"

// Mirrors ops::conv2d::Conv2dParams field for field.
struct Conv2dParams {
    unsigned n, c_in, h, w, c_out, kh, kw, stride, pad, oh, ow;
    unsigned relu;     // forward: 1 = fuse the ReLU (relu_f32)
    unsigned k_chunk;  // weight grad: reduction length per split (a multiple of 8)
    FastDiv ohw_div, ow_div;  // division by OH*OW and by OW
};

// The k-tables (built by conv2d_ktable_u32 before each GEMM that needs one) hold, per reduction
// index k, the index math that would otherwise cost two integer divisions per loaded element.
// kh and kw are packed as (kh << 16) | kw to keep the entries (and the registers holding them) small.
//   forward / weight grad, k = (ci, kh, kw): int2 {ci*H*W + kh*W + kw, khkw}          (2K u32)
//   input grad,            k = (co, kh, kw): int2 {co*OH*OW, khkw}                    (2K u32)
// K <= 3456 for AlexNet: the tables stay in L1.
PTX_KERNEL void conv2d_ktable_u32(unsigned* __restrict__ tab_raw, Conv2dParams p, unsigned input_grad) {
    int2* tab = reinterpret_cast<int2*>(tab_raw);
    const int khw = p.kh * p.kw, len = (input_grad ? p.c_out : p.c_in) * khw;
    FOR_EACH_INDEX(k, (unsigned)len) {
        const int c = (int)k / khw, r = (int)k - c * khw;
        const int kh = r / (int)p.kw, kw = r - kh * (int)p.kw;
        const int khkw = (kh << 16) | kw;
        tab[k] = input_grad ? make_int2(c * p.oh * p.ow, khkw) : make_int2(c * p.h * p.w + kh * p.w + kw, khkw);
    }
}

// The filters w (Cout, Cin, KH, KW) as the GEMMs' A operand, m contiguous (see the top):
//   forward    (input_grad 0): wt[k][co]            = w[co][k],          k = (ci, kh, kw)
//   input grad (input_grad 1): wt[(co, kh, kw)][ci] = w[co][ci][kh][kw]
// One thread per element of w: coalesced reads, strided writes (a small tensor).
PTX_KERNEL void conv2d_wperm_f32(const float* __restrict__ w, float* __restrict__ wt, Conv2dParams p,
                                 unsigned input_grad) {
    const unsigned khw = p.kh * p.kw, k_len = p.c_in * khw;
    FOR_EACH_INDEX(i, (unsigned long long)p.c_out * k_len) {
        const unsigned co = (unsigned)(i / k_len), k = (unsigned)(i - (unsigned long long)co * k_len);
        if (input_grad) {
            const unsigned ci = k / khw, r = k - ci * khw;
            wt[((unsigned long long)co * khw + r) * p.c_in + ci] = w[i];
        } else {
            wt[(unsigned long long)k * p.c_out + co] = w[i];
        }
    }
}

// Where an output pixel's receptive field starts: x + base + tab.x is input pixel (ih0 + kh, iw0 + kw).
// (ih0, iw0) >= -pad are packed as ((ih0 + 2^14) << 16) | (iw0 + 2^14): one register fewer per
// window, which keeps the 128-tile kernels within 128 registers.
struct Window {
    int base, hw0;
};
constexpr int kWinBias = 1 << 14;
// The window of output pixel q = (n, oh, ow): per thread and column in the forward, per k-tile in
// the weight grad (whose reduction runs over q).
__device__ __forceinline__ Window window_of(int q, const Conv2dParams& p) {
    const int ohw = p.oh * p.ow;
    const int n = fast_div(q, p.ohw_div), pix = q - n * ohw;
    const int oh = fast_div(pix, p.ow_div), ow = pix - oh * (int)p.ow;
    const int ih0 = oh * (int)p.stride - (int)p.pad, iw0 = ow * (int)p.stride - (int)p.pad;
    return Window{n * (int)(p.c_in * p.h * p.w) + ih0 * (int)p.w + iw0, ((ih0 + kWinBias) << 16) | (iw0 + kWinBias)};
}
// The address of x at (window, table entry), or nullptr in the padding (loads as 0).
__device__ __forceinline__ const float* x_at(const float* __restrict__ x, const Window& win, const int2& e,
                                             const Conv2dParams& p) {
    // Adding the packed (kh, kw) to the packed (ih0, iw0) adds both halves at once (no carry: each
    // half stays below 2^16).
    const int hw = win.hw0 + e.y;
    const int ih = (hw >> 16) - kWinBias, iw = (hw & 0xffff) - kWinBias;
    return ((unsigned)ih < p.h && (unsigned)iw < p.w) ? x + win.base + e.x : nullptr;
}

// ---- forward ----
struct FwdB {  // the im2col matrix (K, batch*OH*OW), read from x
    const float* __restrict__ x;
    const int2* __restrict__ tab;
    Conv2dParams p;
    static constexpr bool K_FAST = false;
    static constexpr bool CHEAP_AT = false;
    static constexpr bool VEC4 = false;
    using Pos = Window;
    using KPos = int2;
    __device__ __forceinline__ Window at(int q) const { return window_of(q, p); }
    __device__ __forceinline__ int2 kat(int k) const { return __ldg(tab + k); }
    __device__ __forceinline__ const float* ptr(const Window& w, const int2& e) const { return x_at(x, w, e, p); }
    __device__ __forceinline__ const float* any() const { return x; }
};
struct FwdEpi {  // y[n][co][pix] = v + b[co], optionally relu_f32 (NaN stays NaN)
    float* __restrict__ y;
    const float* __restrict__ b;
    Conv2dParams p;
    using Col = int;  // offset of (n, 0, pix) in y
    // Columns q .. q + 3 (q % 4 == 0) are one image's consecutive pixels when OH*OW % 4 == 0.
    static constexpr bool VEC = true;
    __device__ __forceinline__ bool vec() const { return (p.oh * p.ow) % 4 == 0 && aligned16(y); }
    __device__ __forceinline__ int col(int q) const {
        const int ohw = p.oh * p.ow;
        const int n = fast_div(q, p.ohw_div);
        return q + n * ((int)p.c_out - 1) * ohw;
    }
    __device__ __forceinline__ float value(int co, float v) const {
        v += __ldg(b + co);
        return p.relu ? relu_f32(v) : v;
    }
    __device__ __forceinline__ void operator()(int co, int c, float v) const {
        y[c + co * (int)(p.oh * p.ow)] = value(co, v);
    }
    __device__ __forceinline__ void store2(int co, int c, float v0, float v1) const {
        store_f32x2(y + c + co * (int)(p.oh * p.ow), value(co, v0), value(co, v1));
    }
};

template <class T>
__device__ __forceinline__ void conv_fwd(const float* x, const float* wt, const float* b, float* y, const int2* tab,
                                         const Conv2dParams& p) {
    const int M = p.c_out, N = p.n * p.oh * p.ow, K = p.c_in * p.kh * p.kw;
    // A(co, k) = wt[k][co]: read along m.
    gemm_block<T>(strided_loader<false>(wt, 1, M, M), FwdB{x, tab, p}, FwdEpi{y, b, p}, M, N, 0, K,
                  blockIdx.y * T::BM, blockIdx.x * T::BN);
}

// ---- input grad ----
struct GxPix {  // input pixel q = (n, ih, iw): gy's image offset and (ih + pad, iw + pad) packed as in Window
    int base, hw0;
};
template <bool UNIT_STRIDE>
struct BwdInB {  // B((co, kh, kw), (n, ih, iw)) = gy[n][co][oh][ow] with ih = oh*s - pad + kh
    const float* __restrict__ gy;
    const int2* __restrict__ tab;
    Conv2dParams p;
    static constexpr bool K_FAST = false;
    static constexpr bool CHEAP_AT = false;
    static constexpr bool VEC4 = false;
    using Pos = GxPix;
    using KPos = int2;
    __device__ __forceinline__ GxPix at(int q) const {
        const int hw = p.h * p.w;
        const int n = q / hw, pix = q - n * hw;
        const int ih = pix / (int)p.w, iw = pix - ih * (int)p.w;
        return GxPix{n * (int)(p.c_out * p.oh * p.ow),
                     ((ih + (int)p.pad + kWinBias) << 16) | (iw + (int)p.pad + kWinBias)};
    }
    __device__ __forceinline__ int2 kat(int k) const { return __ldg(tab + k); }
    __device__ __forceinline__ const float* any() const { return gy; }
    __device__ __forceinline__ const float* ptr(const GxPix& g, const int2& e) const {
        // (oh, ow) * stride, if on the output grid. Both halves stay positive: no borrow.
        const int hw = g.hw0 - e.y;
        int oh = (hw >> 16) - kWinBias, ow = (hw & 0xffff) - kWinBias;
        if (!UNIT_STRIDE) {  // AlexNet's layers that need gx all have stride 1: a kernel without this
            if (oh < 0 || ow < 0) return nullptr;
            const int s = p.stride, th = oh, tw = ow;
            oh = th / s;
            ow = tw / s;
            if (oh * s != th || ow * s != tw) return nullptr;
        }
        // One unsigned compare per axis checks both 0 <= oh and oh < OH.
        if ((unsigned)oh >= p.oh || (unsigned)ow >= p.ow) return nullptr;
        return gy + g.base + e.x + oh * (int)p.ow + ow;
    }
};
template <bool VEC_>  // vec_unless_ffma
struct BwdInEpi {  // gx[n][ci][pix]
    float* __restrict__ gx;
    Conv2dParams p;
    using Col = int;  // offset of (n, 0, pix) in gx
    // Columns q .. q + 3 (q % 4 == 0) are one image's consecutive pixels when H*W % 4 == 0.
    static constexpr bool VEC = VEC_;
    __device__ __forceinline__ bool vec() const { return (p.h * p.w) % 4 == 0 && aligned16(gx); }
    __device__ __forceinline__ int col(int q) const {
        const int hw = p.h * p.w;
        const int n = q / hw;
        return q + n * ((int)p.c_in - 1) * hw;
    }
    __device__ __forceinline__ void operator()(int ci, int c, float v) const { gx[c + ci * (int)(p.h * p.w)] = v; }
    __device__ __forceinline__ void store2(int ci, int c, float v0, float v1) const {
        store_f32x2(gx + c + ci * (int)(p.h * p.w), v0, v1);
    }
};

template <class T, bool UNIT_STRIDE>
__device__ __forceinline__ void conv_bwd_input(const float* wt, const float* gy, float* gx, const int2* tab,
                                               const Conv2dParams& p) {
    const int M = p.c_in, N = p.n * p.h * p.w, K = p.c_out * p.kh * p.kw;
    // A(ci, (co, kh, kw)) = wt[(co, kh, kw)][ci]: read along m.
    gemm_block<T>(strided_loader<false>(wt, 1, M, M), BwdInB<UNIT_STRIDE>{gy, tab, p},
                  BwdInEpi<vec_unless_ffma<T>>{gx, p}, M, N, 0, K, blockIdx.y * T::BM, blockIdx.x * T::BN);
}

// ---- weight grad (split-K) ----
struct BwdWA {  // A(co, (n, pix)) = gy[n][co][pix] = gy[co*OHW + (n*Cout*OHW + pix)]
    const float* __restrict__ gy;
    Conv2dParams p;
    static constexpr bool K_FAST = true;
    static constexpr bool CHEAP_AT = true;
    static constexpr bool VEC4 = false;
    using Pos = int;
    using KPos = int;
    __device__ __forceinline__ int at(int co) const { return co * (int)(p.oh * p.ow); }
    __device__ __forceinline__ int kat(int k) const {
        const int ohw = p.oh * p.ow;
        const int n = fast_div(k, p.ohw_div);
        return k + n * ((int)p.c_out - 1) * ohw;
    }
    __device__ __forceinline__ const float* ptr(int a, int b) const { return gy + a + b; }
    __device__ __forceinline__ const float* any() const { return gy; }
};
struct BwdWB {  // B((n, oh, ow), (ci, kh, kw)) = x[n][ci][oh*s-pad+kh][ow*s-pad+kw]: the forward's B, transposed
    const float* __restrict__ x;
    const int2* __restrict__ tab;
    Conv2dParams p;
    static constexpr bool K_FAST = true;
    static constexpr bool CHEAP_AT = false;
    static constexpr bool VEC4 = false;
    using Pos = int2;
    using KPos = Window;
    __device__ __forceinline__ int2 at(int j) const { return __ldg(tab + j); }
    __device__ __forceinline__ Window kat(int k) const { return window_of(k, p); }
    __device__ __forceinline__ const float* ptr(const int2& e, const Window& w) const { return x_at(x, w, e, p); }
    __device__ __forceinline__ const float* any() const { return x; }
};

template <class T>
__device__ __forceinline__ void conv_bwd_weight(const float* x, const float* gy, float* ws, const int2* tab,
                                                const Conv2dParams& p) {
    const int M = p.c_out, N = p.c_in * p.kh * p.kw, K = p.n * p.oh * p.ow;
    const int k_begin = blockIdx.z * p.k_chunk;
    const int k_end = min(K, k_begin + (int)p.k_chunk);
    float* part = ws + (unsigned long long)blockIdx.z * M * N;
    gemm_block<T>(BwdWA{gy, p}, BwdWB{x, tab, p}, StoreEpi<vec_unless_ffma<T>>{part, N}, M, N, k_begin, k_end,
                  blockIdx.y * T::BM, blockIdx.x * T::BN);
}

// The tables arrive as unsigned* (the host's u32 buffers) and are read as int2 / int.
#define CONV_KERNELS(TILE, SUFFIX)                                                              \
    PTX_KERNEL void __launch_bounds__(256, 2) conv2d_fwd_##SUFFIX(                              \
        const float* __restrict__ x, const float* __restrict__ wt, const float* __restrict__ b, \
        float* __restrict__ y, const unsigned* __restrict__ tab, Conv2dParams p) {              \
        conv_fwd<TILE>(x, wt, b, y, reinterpret_cast<const int2*>(tab), p);                     \
    }                                                                                           \
    PTX_KERNEL void __launch_bounds__(256, 2) conv2d_bwd_input_##SUFFIX(                        \
        const float* __restrict__ wt, const float* __restrict__ gy, float* __restrict__ gx,     \
        const unsigned* __restrict__ tab, Conv2dParams p) {                                     \
        conv_bwd_input<TILE, true>(wt, gy, gx, reinterpret_cast<const int2*>(tab), p);          \
    }                                                                                           \
    PTX_KERNEL void __launch_bounds__(256, 2) conv2d_bwd_weight_##SUFFIX(                       \
        const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ ws,      \
        const unsigned* __restrict__ tab, Conv2dParams p) {                                     \
        conv_bwd_weight<TILE>(x, gy, ws, reinterpret_cast<const int2*>(tab), p);                \
    }

GEMM_FOR_EACH_TILE(CONV_KERNELS)

// The input grad for any stride (the tiled ones above, _t128 to _t128x96, require stride 1).
PTX_KERNEL void __launch_bounds__(256, 2)
    conv2d_bwd_input_f32_t64_strided(const float* __restrict__ wt, const float* __restrict__ gy, float* __restrict__ gx,
                                     const unsigned* __restrict__ tab, Conv2dParams p) {
    conv_bwd_input<Tile64, false>(wt, gy, gx, reinterpret_cast<const int2*>(tab), p);
}

// gw[i] = sum over splits of ws[z][i]; gw: (Cout, Cin, KH, KW) flattened, len elements.
PTX_KERNEL void conv2d_splitk_sum_f32(const float* __restrict__ ws, float* __restrict__ gw, unsigned len,
                                      unsigned splits) {
    splitk_sum(ws, gw, len, splits);
}

// Partial bias grads: block (co, z) sums gy[n][co][:, :] over the images n = z, z + gridDim.y, ...
// into part[z][co]; conv2d_splitk_sum_f32 then adds the gridDim.y partials (or, with one split,
// part is gb itself). Splitting over images gives conv1's 96 channels enough blocks to stream
// its 143 MB gy at full bandwidth.
PTX_KERNEL void __launch_bounds__(256) conv2d_bwd_bias_f32(const float* __restrict__ gy, float* __restrict__ part,
                                                           Conv2dParams p) {
    const unsigned co = blockIdx.x, ohw = p.oh * p.ow;
    float s = 0.0f;
    for (unsigned n = blockIdx.y; n < p.n; n += gridDim.y) {
        const float* row = gy + (unsigned long long)(n * p.c_out + co) * ohw;
        for (unsigned i = threadIdx.x; i < ohw; i += blockDim.x) s += row[i];
    }
    PTX_SHARED_ARRAY(float, warp_part, 8);
    s = warp_sum(s);
    if (threadIdx.x % 32 == 0) warp_part[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        s = threadIdx.x < blockDim.x / 32 ? warp_part[threadIdx.x] : 0.0f;
        s = warp_sum(s);
        if (threadIdx.x == 0) part[blockIdx.y * p.c_out + co] = s;
    }
}
