// Fully connected layer y = x . W^T + b (PyTorch nn.Linear layout), forward and backward, on the
// shared SGEMM core in gemm.cuh. Shapes: x (B, IN), w (OUT, IN), b (OUT), y (B, OUT).
//
// - forward (dense_fwd_f32_*):        M = B, N = OUT, K = IN; A(i, k) = x[i][k], B(k, o) = w[o][k]
//       (both read along k), epilogue y[i][o] = A.B + b[o], optionally ReLU (relu_f32: max(., 0)
//       with NaN kept NaN, as PyTorch).
// - input grad (dense_bwd_input_f32_*): gx = gy . W: M = B, N = IN, K = OUT;
//       A(i, o) = gy[i][o] (along k), B(o, j) = w[o][j] (along n).
// - weight grad (dense_bwd_weight_f32_*): gw = gy^T . x: M = OUT, N = IN, K = B;
//       A(o, i) = gy[i][o] (along m), B(i, j) = x[i][j] (along n).
// - bias grad (dense_bwd_bias_f32): gb[o] = sum_i gy[i][o], one thread per o (reads coalesce
//       across threads), summed in batch order.
// - split-K: at batch 128 the forward and input-grad grids are small (fc1: 128 blocks of 64 x 64
//       for 6400-long sums), so the host may split K over blockIdx.z (k_chunk each); each split
//       then writes its raw partial to a workspace, and dense_splitk_sum_f32 adds the partials in
//       a fixed order and applies the bias and ReLU: deterministic, no atomics.
// Each GEMM kernel comes in 128 x 128, 128 x 64, 64 x 64, 96 x 128 and 128 x 96-tile variants
// (suffix _t128 / _t128x64 / _t64 / _t96 / _t128x96), picked by ops::gemm::plan::Planner::launch.
// __launch_bounds__(256, 2): at most 128 registers, so that two blocks fit on an SM, as the split-K
// sizing in ops::dense assumes (with a bare (256), ptxas gave the t128 forward 130 registers: one block).
#include "gemm.cuh"

// Mirrors ops::dense::DenseParams field for field.
struct DenseParams {
    unsigned batch, in_f, out_f;
    unsigned relu;     // forward: 1 = fuse the ReLU (relu_f32)
    unsigned k_chunk;  // forward / input grad: 0 = one pass over K; else the K range of each split
};

// The K range of this block's split, and where its output goes (a workspace slice when split).
struct KRange {
    int begin, end;
    float* out;
};
// (One pointer expression, not a branch that returns `out` or an offset from it: through the branch
// the compiler lost track of `out` being global memory and stored through generic addresses.)
__device__ __forceinline__ KRange k_range(const DenseParams& p, int K, float* out, int M, int N) {
    const bool split = p.k_chunk != 0;
    const int begin = split ? blockIdx.z * p.k_chunk : 0;
    const int end = split ? min(K, begin + (int)p.k_chunk) : K;
    return KRange{begin, end, out + (split ? (unsigned long long)blockIdx.z * M * N : 0ull)};
}

template <bool VEC_>  // vec_unless_ffma
struct FwdEpi {
    float* __restrict__ y;
    const float* __restrict__ b;
    int out_f;
    bool relu;
    bool partial;  // split-K: store the raw partial sum (bias and ReLU come in the reduction)
    using Col = int;
    static constexpr bool VEC = VEC_;
    __device__ __forceinline__ bool vec() const { return out_f % 4 == 0 && aligned16(y); }
    __device__ __forceinline__ int col(int o) const { return o; }
    __device__ __forceinline__ float value(int o, float v) const {
        if (partial) return v;
        v += __ldg(b + o);
        return relu ? relu_f32(v) : v;
    }
    __device__ __forceinline__ void operator()(int i, int o, float v) const { y[i * out_f + o] = value(o, v); }
    __device__ __forceinline__ void store2(int i, int o, float v0, float v1) const {
        store_f32x2(y + i * out_f + o, value(o, v0), value(o + 1, v1));
    }
};

// strided_loader<K_FAST>(p, mn_stride, k_stride, mn_extent): element (mn, k) = p[mn * mn_stride + k * k_stride].
template <class T>
__device__ __forceinline__ void dense_fwd(const float* x, const float* w, const float* b, float* y,
                                          const DenseParams& p) {
    // A(i, k) = x[i][k], B(k, o) = w[o][k]: both read along k.
    const int in_f = p.in_f;
    const KRange r = k_range(p, in_f, y, p.batch, p.out_f);
    gemm_block<T>(strided_loader<true>(x, in_f, 1, p.batch), strided_loader<true>(w, in_f, 1, p.out_f),
                  FwdEpi<vec_unless_ffma<T>>{r.out, b, (int)p.out_f, p.relu != 0, p.k_chunk != 0}, p.batch, p.out_f,
                  r.begin, r.end, blockIdx.y * T::BM, blockIdx.x * T::BN);
}

template <class T>
__device__ __forceinline__ void dense_bwd_input(const float* w, const float* gy, float* gx, const DenseParams& p) {
    // A(i, o) = gy[i][o]: along k.  B(o, j) = w[o][j]: along n.
    const int in_f = p.in_f, out_f = p.out_f;
    const KRange r = k_range(p, out_f, gx, p.batch, in_f);
    gemm_block<T>(strided_loader<true>(gy, out_f, 1, p.batch), strided_loader<false>(w, 1, in_f, in_f),
                  StoreEpi<vec_unless_ffma<T>>{r.out, in_f}, p.batch, p.in_f, r.begin, r.end, blockIdx.y * T::BM,
                  blockIdx.x * T::BN);
}

template <class T>
__device__ __forceinline__ void dense_bwd_weight(const float* x, const float* gy, float* gw, const DenseParams& p) {
    // A(o, i) = gy[i][o]: along m.  B(i, j) = x[i][j]: along n.
    const int in_f = p.in_f, out_f = p.out_f;
    gemm_block<T>(strided_loader<false>(gy, 1, out_f, out_f), strided_loader<false>(x, 1, in_f, in_f), StoreEpi<>{gw, in_f}, p.out_f,
                  p.in_f, 0, p.batch, blockIdx.y * T::BM, blockIdx.x * T::BN);
}

#define DENSE_KERNELS(TILE, SUFFIX)                                                                         \
    PTX_KERNEL void __launch_bounds__(256, 2)                                                               \
        dense_fwd_##SUFFIX(const float* __restrict__ x, const float* __restrict__ w,                        \
                               const float* __restrict__ b, float* __restrict__ y, DenseParams p) {         \
        dense_fwd<TILE>(x, w, b, y, p);                                                                     \
    }                                                                                                       \
    PTX_KERNEL void __launch_bounds__(256, 2) dense_bwd_input_##SUFFIX(                                     \
        const float* __restrict__ w, const float* __restrict__ gy, float* __restrict__ gx, DenseParams p) { \
        dense_bwd_input<TILE>(w, gy, gx, p);                                                                \
    }                                                                                                       \
    PTX_KERNEL void __launch_bounds__(256, 2) dense_bwd_weight_##SUFFIX(                                    \
        const float* __restrict__ x, const float* __restrict__ gy, float* __restrict__ gw, DenseParams p) { \
        dense_bwd_weight<TILE>(x, gy, gw, p);                                                               \
    }

GEMM_FOR_EACH_TILE(DENSE_KERNELS)

// out[i][c] = sum_z ws[z][i][c] (+ b[c] if has_bias, then relu_f32 if p.relu); out: rows x cols.
PTX_KERNEL void dense_splitk_sum_f32(const float* __restrict__ ws, float* __restrict__ out,
                                     const float* __restrict__ b, unsigned rows, unsigned cols, unsigned splits,
                                     unsigned has_bias, DenseParams p) {
    const unsigned long long len = (unsigned long long)rows * cols;
    FOR_EACH_INDEX(i, len) {
        float s = 0.0f;
        for (unsigned z = 0; z < splits; ++z) s += ws[z * len + i];
        if (has_bias) s += b[i % cols];
        if (p.relu) s = relu_f32(s);
        out[i] = s;
    }
}

// gb[o] = sum_i gy[i][o].
PTX_KERNEL void dense_bwd_bias_f32(const float* __restrict__ gy, float* __restrict__ gb, DenseParams p) {
    FOR_EACH_INDEX(o, p.out_f) {
        float s = 0.0f;
        for (unsigned i = 0; i < p.batch; ++i) s += gy[(unsigned long long)i * p.out_f + o];
        gb[o] = s;
    }
}
