//! Helpers for the op and kernel tests: the kernel emulator as a `Gpu` (to launch kernels by name
//! with `ptxgrad::launch!`, checked against the emulator's own kernel table), and the oracles the
//! ops are compared with on every device: convolution and dense layers computed by their
//! definition, in f64, with none of the engine's code.
//!
//! Each oracle is the textbook loop over the sum that defines the result, so that it is correct
//! by inspection; sums run in f64 over f32 inputs (exact products, ~1e-16 relative rounding), so
//! that what a test allows between an op and the oracle is the op's own fp32 error. Outputs are
//! split over the cores (rayon), one output element per sum, which changes nothing in the result.

use std::sync::Arc;

use ptxgrad::buffer::{DeviceBuf, Mem};
use ptxgrad::ops::conv2d::Conv2dParams;
use ptxgrad::{Device, Gpu};
use rayon::prelude::*;

/// The kernel emulator (`Device::parse("emu")`) as the `Gpu` that `ptxgrad::launch!`,
/// `Gpu::upload` and `Gpu::download` take.
pub fn emu_gpu() -> Arc<Gpu> {
    match Device::parse("emu") {
        Ok(Device::Cuda(gpu)) => gpu,
        Ok(_) => unreachable!("`emu` parses to the CUDA path"),
        Err(e) => panic!("the emulator is always there: {e}"),
    }
}

/// The address an emulated kernel sees for `buf` (its host memory): the 16-byte loads and
/// stores of kernels/gemm.cuh are taken only from aligned addresses.
pub fn emu_addr(buf: &DeviceBuf<f32>) -> usize {
    match buf.mem() {
        Mem::Host(h) => h.data().as_ptr() as usize,
        Mem::Cuda(_) => panic!("a GPU buffer has no host address"),
    }
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// The oracle's values rounded to f32 (0.5 ulp: ~6e-8 relative), as `assert_close` takes them.
pub fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&a| a as f32).collect()
}

/// ReLU as PyTorch computes it: max(v, 0), but NaN stays NaN.
pub fn relu_exact(v: f64) -> f64 {
    if v > 0.0 || v.is_nan() {
        v
    } else {
        0.0
    }
}

/// The gradient that a ReLU with output `y` passes back from `gy`: gy where y is positive or NaN
/// (PyTorch's threshold backward: y <= 0 blocks it, NaN <= 0 is false), 0 elsewhere.
pub fn relu_mask_exact(y: &[f32], gy: &[f32]) -> Vec<f32> {
    assert_eq!(y.len(), gy.len());
    y.iter().zip(gy).map(|(&y, &g)| if y > 0.0 || y.is_nan() { g } else { 0.0 }).collect()
}

// ---- convolution: x (N, Cin, H, W), w (Cout, Cin, KH, KW), b (Cout), y (N, Cout, OH, OW) ----

/// The geometry of the convolution, per filter tap t = dy*KW + dx (w's (KH, KW) order): the
/// pairs (out, input) of an output pixel out = oy*OW + ox of a plane and the input pixel
/// input = iy*W + ix it reads through tap t, with iy = oy*stride + dy - pad (ix alike), for
/// every tap that lands inside the input plane. Taps in the zero padding are left out: they add
/// nothing (and multiplying them by 0 would turn an infinite weight into NaN).
fn taps(p: &Conv2dParams) -> Vec<Vec<(usize, usize)>> {
    let u = |v: u32| v as usize;
    let (h, w, oh, ow, s, pad) = (u(p.h), u(p.w), u(p.oh), u(p.ow), u(p.stride), u(p.pad));
    let mut taps = Vec::new();
    for dy in 0..u(p.kh) {
        for dx in 0..u(p.kw) {
            let mut pairs = Vec::new();
            for oy in 0..oh {
                let Some(iy) = (oy * s + dy).checked_sub(pad).filter(|&iy| iy < h) else { continue };
                for ox in 0..ow {
                    let Some(ix) = (ox * s + dx).checked_sub(pad).filter(|&ix| ix < w) else { continue };
                    pairs.push((oy * ow + ox, iy * w + ix));
                }
            }
            taps.push(pairs);
        }
    }
    taps
}

/// What the oracles read: f32 (the ops' inputs) or f64 (finite differences).
pub trait Value: Into<f64> + Copy + Sync {}
impl<T: Into<f64> + Copy + Sync> Value for T {}

fn val<T: Value>(v: T) -> f64 {
    v.into()
}

/// Sizes of `p` as usize: (N, Cin, Cout, KH*KW, H*W, OH*OW).
fn dims(p: &Conv2dParams) -> [usize; 6] {
    let u = |v: u32| v as usize;
    [u(p.n), u(p.c_in), u(p.c_out), u(p.kh * p.kw), u(p.h * p.w), p.ohw()]
}

/// y[n][o][oy][ox] = b[o] + sum over (c, dy, dx) of x[n][c][iy][ix] * w[o][c][dy][dx]; then
/// `relu_exact` if `relu`.
pub fn conv_fwd_exact<T: Value>(x: &[T], w: &[T], b: &[T], p: &Conv2dParams, relu: bool) -> Vec<f64> {
    let ([_, c_in, c_out, khw, hw, ohw], taps) = (dims(p), taps(p));
    assert_eq!((x.len(), w.len(), b.len()), (p.x_len(), p.w_len(), c_out), "x, w, b of {p:?}");
    let mut y = vec![0.0f64; p.y_len()];
    // One (image, output channel) plane of y per task.
    y.par_chunks_mut(ohw).enumerate().for_each(|(plane, y)| {
        let (img, o) = (plane / c_out, plane % c_out);
        y.fill(val(b[o]));
        for c in 0..c_in {
            let x = &x[(img * c_in + c) * hw..][..hw];
            for (t, pairs) in taps.iter().enumerate() {
                let wv = val(w[(o * c_in + c) * khw + t]);
                for &(out, input) in pairs {
                    y[out] += val(x[input]) * wv;
                }
            }
        }
        if relu {
            y.iter_mut().for_each(|v| *v = relu_exact(*v));
        }
    });
    y
}

/// gx = dL/dx for gy = dL/dy: every term x[n][c][iy][ix] * w[o][c][dy][dx] of the forward sends
/// gy[n][o][oy][ox] * w[o][c][dy][dx] back to x[n][c][iy][ix].
pub fn conv_input_grad_exact<T: Value>(w: &[T], gy: &[T], p: &Conv2dParams) -> Vec<f64> {
    let ([_, c_in, c_out, khw, hw, ohw], taps) = (dims(p), taps(p));
    assert_eq!((w.len(), gy.len()), (p.w_len(), p.y_len()), "w, gy of {p:?}");
    let mut gx = vec![0.0f64; p.x_len()];
    // One (image, input channel) plane of gx per task.
    gx.par_chunks_mut(hw).enumerate().for_each(|(plane, gx)| {
        let (img, c) = (plane / c_in, plane % c_in);
        for o in 0..c_out {
            let gy = &gy[(img * c_out + o) * ohw..][..ohw];
            for (t, pairs) in taps.iter().enumerate() {
                let wv = val(w[(o * c_in + c) * khw + t]);
                for &(out, input) in pairs {
                    gx[input] += val(gy[out]) * wv;
                }
            }
        }
    });
    gx
}

/// gw[o][c][dy][dx] = sum over (n, oy, ox) of gy[n][o][oy][ox] * x[n][c][iy][ix].
pub fn conv_weight_grad_exact<T: Value>(x: &[T], gy: &[T], p: &Conv2dParams) -> Vec<f64> {
    let ([n, c_in, c_out, khw, hw, ohw], taps) = (dims(p), taps(p));
    assert_eq!((x.len(), gy.len()), (p.x_len(), p.y_len()), "x, gy of {p:?}");
    let mut gw = vec![0.0f64; p.w_len()];
    // One output channel's filters (Cin, KH, KW) per task.
    gw.par_chunks_mut(c_in * khw).enumerate().for_each(|(o, gw)| {
        for c in 0..c_in {
            for (t, pairs) in taps.iter().enumerate() {
                let mut acc = 0.0f64;
                for img in 0..n {
                    let gy = &gy[(img * c_out + o) * ohw..][..ohw];
                    let x = &x[(img * c_in + c) * hw..][..hw];
                    for &(out, input) in pairs {
                        acc += val(gy[out]) * val(x[input]);
                    }
                }
                gw[c * khw + t] = acc;
            }
        }
    });
    gw
}

/// gb[o] = sum over (n, oy, ox) of gy[n][o][oy][ox].
pub fn conv_bias_grad_exact<T: Value>(gy: &[T], p: &Conv2dParams) -> Vec<f64> {
    let [n, _, c_out, _, _, ohw] = dims(p);
    assert_eq!(gy.len(), p.y_len(), "gy of {p:?}");
    (0..c_out).map(|o| (0..n).flat_map(|img| &gy[(img * c_out + o) * ohw..][..ohw]).map(|&v| val(v)).sum()).collect()
}

// ---- matrix products and the dense layer: x (B, IN), w (OUT, IN), b (OUT), y (B, OUT) ----

/// C (m, n) = A (m, k) . B (k, n), given elementwise as `a(i, kk)` and `b(kk, j)`, in f64; and
/// S (m, n) = sum over kk of |A(i, kk) B(kk, j)|, the size that each sum's rounding scales with.
pub fn matmul_exact(
    (m, n, k): (usize, usize, usize),
    a: impl Fn(usize, usize) -> f64 + Sync,
    b: impl Fn(usize, usize) -> f64 + Sync,
) -> (Vec<f64>, Vec<f64>) {
    let (mut c, mut s) = (vec![0.0f64; m * n], vec![0.0f64; m * n]);
    // One row of C (and of S) per task.
    c.par_chunks_mut(n.max(1)).zip(s.par_chunks_mut(n.max(1))).enumerate().for_each(|(i, (c, s))| {
        for j in 0..n {
            for kk in 0..k {
                let prod = a(i, kk) * b(kk, j);
                c[j] += prod;
                s[j] += prod.abs();
            }
        }
    });
    (c, s)
}

/// y[i][o] = b[o] + sum over j of x[i][j] * w[o][j]; then `relu_exact` if `relu`.
pub fn dense_fwd_exact<T: Value>(x: &[T], w: &[T], b: &[T], (in_f, out_f): (usize, usize), relu: bool) -> Vec<f64> {
    let batch = x.len() / in_f;
    assert_eq!((x.len(), w.len(), b.len()), (batch * in_f, out_f * in_f, out_f), "x, w, b of ({in_f}, {out_f})");
    let (mut y, _) = matmul_exact((batch, out_f, in_f), |i, j| val(x[i * in_f + j]), |j, o| val(w[o * in_f + j]));
    for (i, v) in y.iter_mut().enumerate() {
        *v += val(b[i % out_f]);
        if relu {
            *v = relu_exact(*v);
        }
    }
    y
}

/// gx[i][j] = sum over o of gy[i][o] * w[o][j].
pub fn dense_input_grad_exact<T: Value>(w: &[T], gy: &[T], (in_f, out_f): (usize, usize)) -> Vec<f64> {
    let batch = gy.len() / out_f;
    matmul_exact((batch, in_f, out_f), |i, o| val(gy[i * out_f + o]), |o, j| val(w[o * in_f + j])).0
}

/// gw[o][j] = sum over i of gy[i][o] * x[i][j].
pub fn dense_weight_grad_exact<T: Value>(x: &[T], gy: &[T], (in_f, out_f): (usize, usize)) -> Vec<f64> {
    let batch = x.len() / in_f;
    matmul_exact((out_f, in_f, batch), |o, i| val(gy[i * out_f + o]), |i, j| val(x[i * in_f + j])).0
}

/// gb[o] = sum over i of gy[i][o].
pub fn dense_bias_grad_exact<T: Value>(gy: &[T], out_f: usize) -> Vec<f64> {
    (0..out_f).map(|o| gy.iter().skip(o).step_by(out_f).map(|&v| val(v)).sum()).collect()
}
