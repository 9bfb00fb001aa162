//! The CPU reference of the implicit-GEMM convolution: im2col + a plain matrix product per
//! group of images (`im2col_cpu`), spread over the cores. The oracle the kernels are tested
//! against, and the CPU path. x: (N, Cin, H, W), w: (Cout, Cin, KH, KW), y: (N, Cout, OH, OW).

use crate::ops::conv2d::params::Conv2dParams;
use crate::ops::gemm::cpu::{gemm_acc, transpose};
use crate::ops::parallel::map_ranges;
use crate::ops::relu::relu_value;

/// Writes the im2col columns of one image, x_img: (Cin, H, W), into `cols`, a matrix of K =
/// Cin*KH*KW rows of `ld` floats, at columns `col0..col0 + OH*OW`: row (ci, kh, kw), column
/// (oh, ow) holds `x[ci][oh*s-pad+kh][ow*s-pad+kw]`, 0 in the padding. Several images side by
/// side (`ld` = images * OH*OW) make one wide matrix product instead of many narrow ones.
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
                    for (x, o) in out.iter_mut().enumerate() {
                        let iw = x as isize * s - pad + kw;
                        *o = if iw >= 0 && iw < w { src[iw as usize] } else { 0.0 };
                    }
                }
                row += 1;
            }
        }
    }
}

/// The adjoint of `im2col_cpu`: adds each column entry back onto the pixel it came from.
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
                    for (x, &v) in src[y * ow..][..ow].iter().enumerate() {
                        let iw = x as isize * s - pad + kw;
                        if iw >= 0 && iw < w {
                            dst[iw as usize] += v;
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

/// Images per im2col matrix: as many as keep it under 4M floats (16 MB), at least one.
fn images_per_chunk(p: &Conv2dParams) -> usize {
    ((1usize << 22) / (p.k() * p.ohw()).max(1)).max(1)
}

/// The im2col matrix (K, g*OHW) of images `first..first + g`.
fn im2col_images(x: &[f32], p: &Conv2dParams, first: usize, g: usize) -> Vec<f32> {
    let (img_len, ohw) = (p.x_len() / p.n as usize, p.ohw());
    let mut cols = vec![0.0f32; p.k() * g * ohw];
    for i in 0..g {
        im2col_cpu(&x[(first + i) * img_len..][..img_len], p, &mut cols, g * ohw, i * ohw);
    }
    cols
}

/// gy of images `first..first + g`, (g, Cout, OHW), regrouped as the matrix (Cout, g*OHW).
fn gy_matrix(gy: &[f32], p: &Conv2dParams, first: usize, g: usize) -> Vec<f32> {
    let (ohw, cout) = (p.ohw(), p.c_out as usize);
    let np = g * ohw;
    let mut m = vec![0.0f32; cout * np];
    for i in 0..g {
        for co in 0..cout {
            m[co * np + i * ohw..][..ohw].copy_from_slice(&gy[((first + i) * cout + co) * ohw..][..ohw]);
        }
    }
    m
}

/// CPU reference forward: y = conv(x, w) + b, then the ReLU (`relu_value`: NaN stays NaN) if `relu`.
/// x: (N, Cin, H, W), w: (Cout, Cin*KH*KW), b: (Cout) -> (N, Cout, OH, OW).
/// Per chunk of images: Y (Cout, g*OHW) = W (Cout, K) . im2col (K, g*OHW); chunks of images
/// are split over the cores.
pub fn conv2d_fwd_cpu(x: &[f32], w: &[f32], b: &[f32], p: &Conv2dParams, relu: bool) -> Vec<f32> {
    let (k, ohw, cout, n) = (p.k(), p.ohw(), p.c_out as usize, p.n as usize);
    let chunk = images_per_chunk(p);
    let parts = map_ranges(n, |images| {
        let mut out = Vec::with_capacity(images.len() * cout * ohw);
        for first in images.clone().step_by(chunk) {
            let g = chunk.min(images.end - first);
            let np = g * ohw;
            let cols = im2col_images(x, p, first, g);
            let mut ym: Vec<f32> = (0..cout).flat_map(|co| std::iter::repeat_n(b[co], np)).collect();
            gemm_acc(cout, np, k, w, &cols, &mut ym);
            // (Cout, g*OHW) -> (g, Cout, OHW)
            for i in 0..g {
                for co in 0..cout {
                    let row = &ym[co * np + i * ohw..][..ohw];
                    out.extend(row.iter().map(|&v| if relu { relu_value(v) } else { v }));
                }
            }
        }
        out
    });
    parts.concat()
}

/// CPU reference input grad: gx (N, Cin, H, W) from w (Cout, Cin, KH, KW) and gy (N, Cout, OH, OW):
/// per chunk of images, gcols (K, g*OHW) = W^T (K, Cout) . gY (Cout, g*OHW), then col2im.
pub fn conv2d_bwd_input_cpu(w: &[f32], gy: &[f32], p: &Conv2dParams) -> Vec<f32> {
    let (k, ohw, cout, n) = (p.k(), p.ohw(), p.c_out as usize, p.n as usize);
    let img_len = p.x_len() / n;
    let wt = transpose(w, cout, k);
    let chunk = images_per_chunk(p);
    let parts = map_ranges(n, |images| {
        let mut out = vec![0.0f32; images.len() * img_len];
        for first in images.clone().step_by(chunk) {
            let g = chunk.min(images.end - first);
            let np = g * ohw;
            let gym = gy_matrix(gy, p, first, g);
            let mut gcols = vec![0.0f32; k * np];
            gemm_acc(k, np, cout, &wt, &gym, &mut gcols);
            for i in 0..g {
                let at = (first + i - images.start) * img_len;
                col2im_add_cpu(&gcols, p, np, i * ohw, &mut out[at..][..img_len]);
            }
        }
        out
    });
    parts.concat()
}

/// CPU reference weight grad: gw (Cout, Cin, KH, KW) = sum over chunks of images of
/// gY (Cout, g*OHW) . im2col^T (g*OHW, K). Each core sums its own run of images; the partial
/// sums are then added in image order.
pub fn conv2d_bwd_weight_cpu(x: &[f32], gy: &[f32], p: &Conv2dParams) -> Vec<f32> {
    let (k, ohw, cout, n) = (p.k(), p.ohw(), p.c_out as usize, p.n as usize);
    let chunk = images_per_chunk(p);
    let partials = map_ranges(n, |images| {
        let mut gw = vec![0.0f32; p.w_len()];
        for first in images.clone().step_by(chunk) {
            let g = chunk.min(images.end - first);
            let np = g * ohw;
            let cols_t = transpose(&im2col_images(x, p, first, g), k, np);
            gemm_acc(cout, k, np, &gy_matrix(gy, p, first, g), &cols_t, &mut gw);
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
