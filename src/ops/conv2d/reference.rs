//! The CPU reference of the implicit-GEMM convolution: im2col + a matrix product per group of
//! images (`im2col_cpu`, `gemm::cpu`), groups spread over the cores. A group is one image when
//! its output has `COLUMNS` pixels or more, else enough images side by side to make that many
//! columns: a small output (NiN's 3x3 and 1x1 layers) would leave most of a 16-column tile
//! idle. The oracle the kernels are tested against, and the CPU path.
//! x: (N, Cin, H, W), w: (Cout, Cin, KH, KW), y: (N, Cout, OH, OW).

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

/// Writes the im2col columns of one image, x_img: (Cin, H, W), into `cols`, a matrix of K =
/// Cin*KH*KW rows of `ld` floats, at columns `col0..col0 + OH*OW`: row (ci, kh, kw), column
/// (oh, ow) holds `x[ci][oh*s-pad+kh][ow*s-pad+kw]`, 0 in the padding.
pub fn im2col_cpu(x_img: &[f32], p: &Conv2dParams, cols: &mut [f32], ld: usize, col0: usize) {
    let (h, w, oh, ow, s, pad) =
        (p.h as isize, p.w as isize, p.oh as usize, p.ow as usize, p.stride as isize, p.pad as isize);
    let ohw = oh * ow;
    let mut row = 0;
    for ci in 0..p.c_in as usize {
        let plane = &x_img[ci * (h * w) as usize..][..(h * w) as usize];
        for kh in 0..p.kh as isize {
            for kw in 0..p.kw as isize {
                let dst = &mut cols[row * ld + col0..][..ohw];
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

/// The adjoint of `im2col_cpu`: adds each entry of the image's columns of `cols` back onto the
/// pixel of x_img (Cin, H, W) it came from.
pub fn col2im_add_cpu(cols: &[f32], p: &Conv2dParams, ld: usize, col0: usize, x_img: &mut [f32]) {
    let (h, w, oh, ow, s, pad) =
        (p.h as isize, p.w as isize, p.oh as usize, p.ow as usize, p.stride as isize, p.pad as isize);
    let ohw = oh * ow;
    let mut row = 0;
    for ci in 0..p.c_in as usize {
        let plane = &mut x_img[ci * (h * w) as usize..][..(h * w) as usize];
        for kh in 0..p.kh as isize {
            for kw in 0..p.kw as isize {
                let src = &cols[row * ld + col0..][..ohw];
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

/// Output pixels per matrix product at least (see the module's header).
const COLUMNS: usize = 256;

/// Images per group: enough for `COLUMNS` output pixels, at least one.
fn group_size(p: &Conv2dParams) -> usize {
    COLUMNS.div_ceil(p.ohw()).clamp(1, p.n as usize)
}

/// The im2col matrix (K, g*OHW) of the g images of `x_grp` (g, Cin, H, W), into `cols`.
fn im2col_group(x_grp: &[f32], p: &Conv2dParams, cols: &mut Vec<f32>) {
    let img_len = p.x_len() / p.n as usize;
    let np = x_grp.len() / img_len * p.ohw();
    cols.resize(p.k() * np, 0.0);
    for (i, x_img) in x_grp.chunks_exact(img_len).enumerate() {
        im2col_cpu(x_img, p, cols, np, i * p.ohw());
    }
}

/// gy of a group, (g, Cout, OHW), regrouped as the matrix (Cout, g*OHW) in `m`.
fn gy_matrix(gy_grp: &[f32], p: &Conv2dParams, m: &mut Vec<f32>) {
    let (ohw, cout) = (p.ohw(), p.c_out as usize);
    let np = gy_grp.len() / cout;
    m.resize(gy_grp.len(), 0.0);
    for (i, img) in gy_grp.chunks_exact(cout * ohw).enumerate() {
        for (co, plane) in img.chunks_exact(ohw).enumerate() {
            m[co * np + i * ohw..][..ohw].copy_from_slice(plane);
        }
    }
}

/// CPU reference forward: y = conv(x, w) + b, then the ReLU (`relu_value`: NaN stays NaN) if `relu`.
/// x: (N, Cin, H, W), w: (Cout, Cin*KH*KW), b: (Cout) -> (N, Cout, OH, OW).
/// Per group of g images: Y (Cout, g*OHW) = b + W (Cout, K) . im2col (K, g*OHW), then each
/// image's (Cout, OHW) block into its place in y.
pub fn conv2d_fwd_cpu(x: &[f32], w: &[f32], b: &[f32], p: &Conv2dParams, relu: bool) -> Vec<f32> {
    let (k, ohw, cout, g) = (p.k(), p.ohw(), p.c_out as usize, group_size(p));
    let img_len = p.x_len() / p.n as usize;
    let mut y = vec![0.0f32; p.y_len()];
    y.par_chunks_mut(g * cout * ohw).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(cols, ym), (gi, y_grp)| {
            let np = y_grp.len() / cout;
            im2col_group(&x[gi * g * img_len..][..np / ohw * img_len], p, cols);
            ym.clear();
            b.iter().for_each(|&bias| ym.extend(std::iter::repeat_n(bias, np)));
            gemm_acc(cout, np, k, w, cols, ym);
            for (i, y_img) in y_grp.chunks_exact_mut(cout * ohw).enumerate() {
                for (co, plane) in y_img.chunks_exact_mut(ohw).enumerate() {
                    let row = &ym[co * np + i * ohw..][..ohw];
                    plane.iter_mut().zip(row).for_each(|(o, &v)| *o = if relu { relu_value(v) } else { v });
                }
            }
        },
    );
    y
}

/// CPU reference input grad: gx (N, Cin, H, W) from w (Cout, Cin, KH, KW) and gy (N, Cout, OH, OW):
/// per group of images, gcols (K, g*OHW) = W^T (K, Cout) . gY (Cout, g*OHW), then col2im.
pub fn conv2d_bwd_input_cpu(w: &[f32], gy: &[f32], p: &Conv2dParams) -> Vec<f32> {
    let (k, ohw, cout, g) = (p.k(), p.ohw(), p.c_out as usize, group_size(p));
    let img_len = p.x_len() / p.n as usize;
    let wt = transpose(w, cout, k);
    let mut gx = vec![0.0f32; p.x_len()];
    gx.par_chunks_mut(g * img_len).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(gym, gcols), (gi, gx_grp)| {
            let np = gx_grp.len() / img_len * ohw;
            gy_matrix(&gy[gi * g * cout * ohw..][..cout * np], p, gym);
            gcols.clear();
            gcols.resize(k * np, 0.0);
            gemm_acc(k, np, cout, &wt, gym, gcols);
            for (i, gx_img) in gx_grp.chunks_exact_mut(img_len).enumerate() {
                col2im_add_cpu(gcols, p, np, i * ohw, gx_img);
            }
        },
    );
    gx
}

/// CPU reference weight grad: gw (Cout, Cin, KH, KW) = sum over groups of images of
/// gY (Cout, g*OHW) . im2col^T (g*OHW, K), as dot products of rows of gY and of im2col (both
/// laid out along g*OHW). Each core sums its own run of groups; the partial sums are then added
/// in image order.
pub fn conv2d_bwd_weight_cpu(x: &[f32], gy: &[f32], p: &Conv2dParams) -> Vec<f32> {
    let (k, ohw, cout, g) = (p.k(), p.ohw(), p.c_out as usize, group_size(p));
    let img_len = p.x_len() / p.n as usize;
    let partials = map_ranges((p.n as usize).div_ceil(g), |groups| {
        let (mut gw, mut cols, mut gym) = (vec![0.0f32; p.w_len()], Vec::new(), Vec::new());
        for gi in groups {
            let images = g.min(p.n as usize - gi * g);
            im2col_group(&x[gi * g * img_len..][..images * img_len], p, &mut cols);
            gy_matrix(&gy[gi * g * cout * ohw..][..images * cout * ohw], p, &mut gym);
            gemm_abt_acc(cout, k, images * ohw, &gym, &cols, &mut gw);
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
