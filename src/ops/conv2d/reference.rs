//! The CPU reference of the implicit-GEMM convolution: im2col + a matrix product per image
//! (`im2col_cpu`, `gemm::cpu`), images spread over the cores. The oracle the kernels are tested
//! against, and the CPU path. x: (N, Cin, H, W), w: (Cout, Cin, KH, KW), y: (N, Cout, OH, OW).

use std::ops::Range;

use crate::ops::conv2d::params::Conv2dParams;
use crate::ops::gemm::cpu::{gemm_abt_acc, gemm_acc, transpose};
use crate::ops::parallel::map_ranges;
use crate::ops::relu::relu_value;
use rayon::prelude::*;

/// The output columns x whose input column x*s - pad + kw lies in 0..w (the rest read padding).
fn in_bounds(w: isize, ow: usize, s: isize, pad: isize, kw: isize) -> Range<usize> {
    // x*s >= pad - kw, and x*s <= w - 1 + pad - kw.
    let lo = if pad - kw <= 0 { 0 } else { (pad - kw + s - 1) / s } as usize;
    let hi = if w - 1 + pad - kw < 0 { 0 } else { (w - 1 + pad - kw) / s + 1 } as usize;
    let lo = lo.min(ow);
    lo..hi.clamp(lo, ow)
}

/// Writes the im2col matrix of one image, x_img: (Cin, H, W), into `cols`: (K, OH*OW) with
/// K = Cin*KH*KW; row (ci, kh, kw), column (oh, ow) holds `x[ci][oh*s-pad+kh][ow*s-pad+kw]`, 0
/// in the padding.
pub fn im2col_cpu(x_img: &[f32], p: &Conv2dParams, cols: &mut [f32]) {
    let (h, w, oh, ow, s, pad) =
        (p.h as isize, p.w as isize, p.oh as usize, p.ow as usize, p.stride as isize, p.pad as isize);
    let ohw = oh * ow;
    let mut row = 0;
    for ci in 0..p.c_in as usize {
        let plane = &x_img[ci * (h * w) as usize..][..(h * w) as usize];
        for kh in 0..p.kh as isize {
            for kw in 0..p.kw as isize {
                let dst = &mut cols[row * ohw..][..ohw];
                for y in 0..oh {
                    let ih = y as isize * s - pad + kh;
                    let out = &mut dst[y * ow..][..ow];
                    if ih < 0 || ih >= h {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[(ih * w) as usize..][..w as usize];
                    let cols = in_bounds(w, ow, s, pad, kw);
                    out[..cols.start].fill(0.0);
                    out[cols.end..].fill(0.0);
                    if !cols.is_empty() {
                        let first = (cols.start as isize * s - pad + kw) as usize;
                        if s == 1 {
                            out[cols.clone()].copy_from_slice(&src[first..][..cols.len()]);
                        } else {
                            let taps = src[first..].iter().step_by(s as usize);
                            out[cols].iter_mut().zip(taps).for_each(|(o, &v)| *o = v);
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// The adjoint of `im2col_cpu`: adds each entry of `cols` (K, OH*OW) back onto the pixel of
/// x_img (Cin, H, W) it came from.
pub fn col2im_add_cpu(cols: &[f32], p: &Conv2dParams, x_img: &mut [f32]) {
    let (h, w, oh, ow, s, pad) =
        (p.h as isize, p.w as isize, p.oh as usize, p.ow as usize, p.stride as isize, p.pad as isize);
    let ohw = oh * ow;
    let mut row = 0;
    for ci in 0..p.c_in as usize {
        let plane = &mut x_img[ci * (h * w) as usize..][..(h * w) as usize];
        for kh in 0..p.kh as isize {
            for kw in 0..p.kw as isize {
                let src = &cols[row * ohw..][..ohw];
                for y in 0..oh {
                    let ih = y as isize * s - pad + kh;
                    if ih < 0 || ih >= h {
                        continue;
                    }
                    let dst = &mut plane[(ih * w) as usize..][..w as usize];
                    let cols = in_bounds(w, ow, s, pad, kw);
                    if !cols.is_empty() {
                        let first = (cols.start as isize * s - pad + kw) as usize;
                        let src = &src[y * ow..][cols];
                        if s == 1 {
                            dst[first..][..src.len()].iter_mut().zip(src).for_each(|(d, &v)| *d += v);
                        } else {
                            dst[first..].iter_mut().step_by(s as usize).zip(src).for_each(|(d, &v)| *d += v);
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// CPU reference forward: y = conv(x, w) + b, then the ReLU (`relu_value`: NaN stays NaN) if `relu`.
/// x: (N, Cin, H, W), w: (Cout, Cin*KH*KW), b: (Cout) -> (N, Cout, OH, OW).
/// Per image: Y_img (Cout, OH*OW) = W (Cout, K) . im2col (K, OH*OW), written in place.
pub fn conv2d_fwd_cpu(x: &[f32], w: &[f32], b: &[f32], p: &Conv2dParams, relu: bool) -> Vec<f32> {
    let (k, ohw, cout) = (p.k(), p.ohw(), p.c_out as usize);
    let img_len = p.x_len() / p.n as usize;
    let mut y = vec![0.0f32; p.y_len()];
    y.par_chunks_mut(cout * ohw).enumerate().for_each_init(
        || vec![0.0f32; k * ohw],
        |cols, (i, y_img)| {
            // Starts as the bias, which the product is added to.
            y_img.chunks_exact_mut(ohw).zip(b).for_each(|(plane, &bias)| plane.fill(bias));
            im2col_cpu(&x[i * img_len..][..img_len], p, cols);
            gemm_acc(cout, ohw, k, w, cols, y_img);
            if relu {
                y_img.iter_mut().for_each(|v| *v = relu_value(*v));
            }
        },
    );
    y
}

/// CPU reference input grad: gx (N, Cin, H, W) from w (Cout, Cin, KH, KW) and gy (N, Cout, OH, OW):
/// per image, gcols (K, OH*OW) = W^T (K, Cout) . gY_img (Cout, OH*OW), then col2im.
pub fn conv2d_bwd_input_cpu(w: &[f32], gy: &[f32], p: &Conv2dParams) -> Vec<f32> {
    let (k, ohw, cout) = (p.k(), p.ohw(), p.c_out as usize);
    let img_len = p.x_len() / p.n as usize;
    let wt = transpose(w, cout, k);
    let mut gx = vec![0.0f32; p.x_len()];
    gx.par_chunks_mut(img_len).enumerate().for_each_init(
        || vec![0.0f32; k * ohw],
        |gcols, (i, gx_img)| {
            gcols.fill(0.0);
            gemm_acc(k, ohw, cout, &wt, &gy[i * cout * ohw..][..cout * ohw], gcols);
            col2im_add_cpu(gcols, p, gx_img);
        },
    );
    gx
}

/// CPU reference weight grad: gw (Cout, Cin, KH, KW) = sum over images of
/// gY_img (Cout, OH*OW) . im2col^T (OH*OW, K), as dot products of rows of gY_img and of
/// im2col (both laid out along OH*OW). Each core sums its own run of images; the partial sums
/// are then added in image order.
pub fn conv2d_bwd_weight_cpu(x: &[f32], gy: &[f32], p: &Conv2dParams) -> Vec<f32> {
    let (k, ohw, cout) = (p.k(), p.ohw(), p.c_out as usize);
    let img_len = p.x_len() / p.n as usize;
    let partials = map_ranges(p.n as usize, |images| {
        let (mut gw, mut cols) = (vec![0.0f32; p.w_len()], vec![0.0f32; k * ohw]);
        for i in images {
            im2col_cpu(&x[i * img_len..][..img_len], p, &mut cols);
            gemm_abt_acc(cout, k, ohw, &gy[i * cout * ohw..][..cout * ohw], &cols, &mut gw);
        }
        gw
    });
    let mut parts = partials.into_iter();
    let mut gw = parts.next().unwrap_or_else(|| vec![0.0f32; p.w_len()]);
    for part in parts {
        gw.iter_mut().zip(part).for_each(|(d, v)| *d += v);
    }
    gw
}

/// CPU reference bias grad: `gb[co]` = sum over (n, oh, ow) of gy.
pub fn conv2d_bwd_bias_cpu(gy: &[f32], p: &Conv2dParams) -> Vec<f32> {
    let (ohw, cout) = (p.ohw(), p.c_out as usize);
    let mut gb = vec![0.0f32; cout];
    for img in gy.chunks_exact(cout * ohw) {
        for (co, g) in gb.iter_mut().enumerate() {
            *g += img[co * ohw..][..ohw].iter().sum::<f32>();
        }
    }
    gb
}
