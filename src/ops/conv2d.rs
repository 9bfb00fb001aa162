//! 2-D convolution (cross-correlation, as in PyTorch's `nn.Conv2d`) with bias and an optional
//! fused ReLU. x: (N, Cin, H, W), w: (Cout, Cin, KH, KW), b: (Cout) -> y: (N, Cout, OH, OW) with
//! OH = (H + 2*pad - KH) / stride + 1 (same for OW).
//!
//! CPU reference: im2col + a plain matmul per image (see `im2col_cpu`). CUDA: implicit GEMMs on
//! the shared core in `kernels/gemm.cuh` (see the header of `kernels/conv2d.cu`).

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::ops::fast_div::FastDiv;
use crate::ops::gemm_plan::{gemm_launch, split_chunk, split_count, Tile};
use crate::ops::matmul_cpu::{gemm_acc, transpose};
use crate::ops::parallel::map_ranges;
use crate::ops::relu::{relu_value, through_fused_relu};
use crate::ops::winograd;
use crate::ptx::Module;
use crate::tape::Tape;
use crate::tensor::{common_device, ReluFact, Storage, Tensor};

/// Kernel parameters; mirrored field for field by `struct Conv2dParams` in kernels/conv2d.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    pub n: u32,
    pub c_in: u32,
    pub h: u32,
    pub w: u32,
    pub c_out: u32,
    pub kh: u32,
    pub kw: u32,
    pub stride: u32,
    pub pad: u32,
    pub oh: u32,
    pub ow: u32,
    /// Forward only: 1 fuses the ReLU (`relu_value`: NaN stays NaN) into the epilogue.
    pub relu: u32,
    /// Weight grad only: the length of the reduction (over N*OH*OW) that each split sums.
    pub k_chunk: u32,
    /// Division by OH*OW and by OW without a divide sequence (the weight grad splits its
    /// reduction index into (image, oh, ow) once per k-tile).
    pub ohw_div: FastDiv,
    pub ow_div: FastDiv,
}

// SAFETY: #[repr(C)] plain u32 fields, mirrored by the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for Conv2dParams {}

impl Conv2dParams {
    /// Dims for x (n, c_in, h, w) and w (c_out, c_in, kh, kw); computes the output size.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        n: usize,
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        kh: usize,
        kw: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        let oh = conv2d_out_size(h, kh, stride, pad)?;
        let ow = conv2d_out_size(w, kw, stride, pad)?;
        let dims = [n, c_in, h, w, c_out, kh, kw];
        if dims.contains(&0) {
            return Err(Error::shape("conv2d", "non-zero dims (N, Cin, H, W, Cout, KH, KW)", format!("{dims:?}")));
        }
        // The kernels index with 32-bit ints.
        let biggest = (n * c_in * h * w).max(n * c_out * oh * ow).max(c_out * c_in * kh * kw);
        if biggest >= 1 << 31 {
            return Err(Error::Data(format!("conv2d: a tensor of {biggest} elements exceeds the kernels' 2^31 limit")));
        }
        let u = |v: usize| v as u32;
        Ok(Conv2dParams {
            n: u(n),
            c_in: u(c_in),
            h: u(h),
            w: u(w),
            c_out: u(c_out),
            kh: u(kh),
            kw: u(kw),
            stride: u(stride),
            pad: u(pad),
            oh: u(oh),
            ow: u(ow),
            relu: 0,
            k_chunk: 0,
            ohw_div: FastDiv::new(u(oh * ow)),
            ow_div: FastDiv::new(u(ow)),
        })
    }

    fn us(v: u32) -> usize {
        v as usize
    }
    pub fn x_len(&self) -> usize {
        Self::us(self.n * self.c_in * self.h * self.w)
    }
    pub fn w_len(&self) -> usize {
        Self::us(self.c_out * self.c_in * self.kh * self.kw)
    }
    pub fn y_len(&self) -> usize {
        Self::us(self.n * self.c_out * self.oh * self.ow)
    }
    /// Rows of the im2col matrix: Cin*KH*KW.
    pub fn k(&self) -> usize {
        Self::us(self.c_in * self.kh * self.kw)
    }
    /// Output pixels per image: OH*OW.
    pub fn ohw(&self) -> usize {
        Self::us(self.oh * self.ow)
    }
    /// The same convolution over a batch of `n` images.
    pub fn with_batch(&self, n: usize) -> Self {
        Conv2dParams { n: n as u32, ..*self }
    }
}

/// Output size of a convolution window sliding over `h` (+ `pad` each side) with `stride`;
/// an error if the window does not fit or the stride is 0.
pub fn conv2d_out_size(h: usize, k: usize, stride: usize, pad: usize) -> Result<usize> {
    if stride == 0 {
        return Err(Error::Data("conv2d: stride must be at least 1, found 0".into()));
    }
    if k == 0 || h + 2 * pad < k {
        return Err(Error::shape(
            "conv2d",
            format!("a kernel of size 1..={} (input {h} + 2 * padding {pad})", h + 2 * pad),
            format!("kernel size {k}"),
        ));
    }
    Ok((h + 2 * pad - k) / stride + 1)
}

/// How a convolution is computed (on the CPU and on CUDA alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvAlgo {
    /// Direct convolution as an implicit GEMM, for every layer.
    #[default]
    ImplicitGemm,
    /// Winograd F(m x m, r x r) where it applies (stride 1, square r x r kernel, padding
    /// <= r - 1; see `ops::winograd`), the implicit GEMM elsewhere. `tile` fixes the output tile
    /// m; None picks alpha = m + r - 1 = 6 (F(4x4, 3x3), F(2x2, 5x5)).
    Winograd { tile: Option<usize> },
    /// Per layer, the fastest of the above as measured on the device (`nn::conv_tune`, which
    /// the model runs before its first step). Where it has not been resolved, the implicit GEMM.
    Auto,
}

impl ConvAlgo {
    /// The Winograd output tile m to use for `p`, or None for the implicit GEMM.
    pub fn winograd_tile(self, p: &Conv2dParams) -> Option<usize> {
        match self {
            ConvAlgo::ImplicitGemm | ConvAlgo::Auto => None,
            ConvAlgo::Winograd { tile } => crate::ops::winograd::output_tile(p, tile),
        }
    }
}

impl std::str::FromStr for ConvAlgo {
    type Err = Error;
    /// "auto", "gemm", "winograd" or "winograd:M" (M = 1..=7, the output tile).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::Data(format!("conv algorithm: expected auto, gemm, winograd or winograd:M (M = 1..=7), found `{s}`"))
        };
        match s.split_once(':') {
            None if s == "auto" => Ok(ConvAlgo::Auto),
            None if s == "gemm" => Ok(ConvAlgo::ImplicitGemm),
            None if s == "winograd" => Ok(ConvAlgo::Winograd { tile: None }),
            Some(("winograd", m)) => match m.parse::<usize>() {
                Ok(m @ 1..=7) => Ok(ConvAlgo::Winograd { tile: Some(m) }),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for ConvAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConvAlgo::ImplicitGemm => write!(f, "gemm"),
            ConvAlgo::Winograd { tile: None } => write!(f, "winograd"),
            ConvAlgo::Winograd { tile: Some(m) } => write!(f, "winograd:{m}"),
            ConvAlgo::Auto => write!(f, "auto"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CPU reference
// ---------------------------------------------------------------------------------------------

/// Writes the im2col columns of one image, x_img: (Cin, H, W), into `cols`, a matrix of K =
/// Cin*KH*KW rows of `ld` floats, at columns `col0..col0 + OH*OW`: row (ci, kh, kw), column
/// (oh, ow) holds x[ci][oh*s-pad+kh][ow*s-pad+kw], 0 in the padding. Several images side by
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

/// CPU reference bias grad: gb[co] = sum over (n, oh, ow) of gy.
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

// ---------------------------------------------------------------------------------------------
// Shape checks and dispatch
// ---------------------------------------------------------------------------------------------

const OP: &str = "conv2d";

/// Checks x (N, Cin, H, W) against w (Cout, Cin, KH, KW) and returns the dims.
fn params(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Conv2dParams> {
    let [n, c, h, wd] = x.dims4(OP)?;
    let Ok([cout, cin, kh, kw]) = <[usize; 4]>::try_from(w.shape()) else {
        return Err(Error::shape(OP, format!("w of shape (Cout, {c}, KH, KW)"), format!("{:?}", w.shape())));
    };
    if cin != c {
        return Err(Error::shape(
            OP,
            format!("w of shape (Cout, {c}, KH, KW) matching x's {c} channels"),
            format!("{:?}", w.shape()),
        ));
    }
    Conv2dParams::new(n, c, h, wd, cout, kh, kw, stride, pad)
}

fn gpu_pair<'a>(
    a: &'a Tensor,
    b: &'a Tensor,
) -> (&'a std::sync::Arc<Gpu>, &'a crate::device::DeviceBuf<f32>, &'a crate::device::DeviceBuf<f32>) {
    let (gpu, ab) = a.cuda().expect("checked by common_device");
    let (_, bb) = b.cuda().expect("checked by common_device");
    (gpu, ab, bb)
}

/// The k-table of kernels/conv2d.cu (per reduction index: the offsets and (kh, kw) that would
/// otherwise cost integer divisions in the GEMM's loads).
fn ktable(gpu: &Gpu, p: &Conv2dParams, input_grad: bool) -> Result<crate::device::DeviceBuf<u32>> {
    let (cfg, words) = plan::ktable(p, input_grad);
    let mut tab = gpu.uninit::<u32>(words)?;
    let mode = input_grad as u32;
    crate::launch!(gpu, Module::Conv2d, "conv2d_ktable_u32", cfg, &mut tab, p, &mode)?;
    Ok(tab)
}

/// The filters permuted for the forward (`input_grad` false) or input-grad GEMM's A operand
/// (conv2d_wperm_f32: rows along m contiguous, so that the GEMM copies them 16 bytes at a time).
fn filters_for_gemm(
    gpu: &Gpu,
    w: &crate::device::DeviceBuf<f32>,
    p: &Conv2dParams,
    input_grad: bool,
) -> Result<crate::device::DeviceBuf<f32>> {
    let mut wt = gpu.uninit::<f32>(p.w_len())?;
    let mode = input_grad as u32;
    crate::launch!(gpu, Module::Conv2d, "conv2d_wperm_f32", plan::wperm(p), w, &mut wt, p, &mode)?;
    Ok(wt)
}

/// Which kernel each pass launches, on which grid: one place for the CUDA path and the kernel
/// emulator's tests (tests/conv2d.rs), so that both run the same launches. `tile` None picks
/// by `gemm_launch`; tests pass a tile to reach every variant.
pub mod plan {
    use super::{gemm_launch, split_chunk, split_count, Conv2dParams, Tile};
    use crate::device::grid_1d;
    use crate::error::Result;
    use crate::ops::gemm_math::{gemm_kernel_names, GemmMath};
    use cudarc::driver::LaunchConfig;

    fn block_256(grid: (usize, usize, usize)) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// conv2d_ktable_u32's launch and the table's length in u32: 2K, K = Cin*KH*KW for the
    /// forward and weight grad, Cout*KH*KW for the input grad.
    pub fn ktable(p: &Conv2dParams, input_grad: bool) -> (LaunchConfig, usize) {
        let khw = (p.kh * p.kw) as usize;
        let k = if input_grad { p.c_out as usize } else { p.c_in as usize } * khw;
        (grid_1d(k, 256), 2 * k)
    }

    /// conv2d_wperm_f32's launch: one thread per filter element.
    pub fn wperm(p: &Conv2dParams) -> LaunchConfig {
        grid_1d(p.w_len(), 256)
    }

    /// The forward GEMM: M = Cout, N = batch*OH*OW.
    pub fn forward(p: &Conv2dParams, tile: Option<Tile>) -> Result<(&'static str, LaunchConfig)> {
        let (cfg, tile) = gemm_launch(p.c_out as usize, p.n as usize * p.ohw(), 1, tile)?;
        Ok((GemmMath::kernel(&gemm_kernel_names!("conv2d_fwd"), tile), cfg))
    }

    /// The input-grad GEMM: M = Cin, N = batch*H*W; strides above 1 take the 64-tile kernel that
    /// handles them (fp32 FFMAs only: AlexNet's one strided layer, conv1, needs no input grad).
    pub fn input_grad(p: &Conv2dParams, tile: Option<Tile>) -> Result<(&'static str, LaunchConfig)> {
        let (m, n) = (p.c_in as usize, p.n as usize * (p.h * p.w) as usize);
        if p.stride != 1 {
            return Ok(("conv2d_bwd_input_f32_t64_strided", block_256((n.div_ceil(64), m.div_ceil(64), 1))));
        }
        let (cfg, tile) = gemm_launch(m, n, 1, tile)?;
        Ok((GemmMath::kernel(&gemm_kernel_names!("conv2d_bwd_input"), tile), cfg))
    }

    /// The weight-grad GEMM (M = Cout, N = Cin*KH*KW) on the 128 x 128 tile (96 x 128 where
    /// that leaves fewer rows empty: `Tile::rows_for`; `tile` Some(t) uses t), its reduction over
    /// N*OH*OW split so that the grid has ~4 blocks per SM (H100: 132 SMs), each split summing at
    /// least 512 terms. Sets p.k_chunk; returns the number of splits (partials to add up).
    pub fn weight_grad(p: &mut Conv2dParams, tile: Option<Tile>) -> (&'static str, LaunchConfig, usize) {
        let (m, n, k_total) = (p.c_out as usize, p.k(), p.n as usize * p.ohw());
        let tile = tile.unwrap_or(Tile::rows_for(m));
        let (bm, bn) = tile.size();
        let tiles = m.div_ceil(bm) * n.div_ceil(bn);
        let (splits, chunk) = split_chunk(k_total, split_count(tiles, k_total.div_ceil(512)));
        p.k_chunk = chunk as u32;
        let name = GemmMath::kernel(&gemm_kernel_names!("conv2d_bwd_weight"), tile);
        (name, block_256((n.div_ceil(bn), m.div_ceil(bm), splits)), splits)
    }

    /// The bias grad: blocks (channel, image split), split over images until there are ~8
    /// blocks per SM (conv1: 96 channels x 11 splits). Returns the number of splits.
    pub fn bias_grad(p: &Conv2dParams) -> (LaunchConfig, usize) {
        let cout = p.c_out as usize;
        let splits = (p.n as usize).min(1056usize.div_ceil(cout)).max(1);
        (block_256((cout, splits, 1)), splits)
    }

    /// conv2d_splitk_sum_f32 over `len` outputs.
    pub fn splitk_sum(len: usize) -> LaunchConfig {
        grid_1d(len, 256)
    }
}

/// Forward: x (N, Cin, H, W), w (Cout, Cin, KH, KW), b (Cout) -> y (N, Cout, OH, OW);
/// `relu` fuses the ReLU (`ops::relu::relu_value`). The implicit GEMM; `conv2d_fwd_with` takes
/// the algorithm.
pub fn conv2d_fwd(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, pad: usize, relu: bool) -> Result<Tensor> {
    conv2d_fwd_with(x, w, b, stride, pad, relu, ConvAlgo::ImplicitGemm)
}

/// `conv2d_fwd` with the algorithm `algo`.
pub fn conv2d_fwd_with(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    pad: usize,
    relu: bool,
    algo: ConvAlgo,
) -> Result<Tensor> {
    let mut p = params(x, w, stride, pad)?;
    b.expect_shape(OP, "b", &[p.c_out as usize])?;
    common_device(OP, &[x.device(), w.device(), b.device()])?;
    p.relu = relu as u32;
    let shape = vec![p.n as usize, p.c_out as usize, p.oh as usize, p.ow as usize];
    let wino = algo.winograd_tile(&p);
    let storage = match (x.storage(), w.storage(), b.storage()) {
        (Storage::Cpu(xv), Storage::Cpu(wv), Storage::Cpu(bv)) => Storage::Cpu(match wino {
            Some(m) => winograd::winograd_fwd_cpu(xv, wv, bv, &p, m)?,
            None => conv2d_fwd_cpu(xv, wv, bv, &p, relu),
        }),
        (Storage::Cuda { gpu, buf: xb }, Storage::Cuda { buf: wb, .. }, Storage::Cuda { buf: bb, .. })
            if wino.is_some() =>
        {
            let m = wino.expect("matched");
            Storage::Cuda { gpu: gpu.clone(), buf: winograd::winograd_fwd_cuda(gpu, xb, wb, bb, &p, m)? }
        }
        (Storage::Cuda { gpu, buf: xb }, Storage::Cuda { buf: wb, .. }, Storage::Cuda { buf: bb, .. }) => {
            let mut y = gpu.uninit::<f32>(p.y_len())?;
            let tab = ktable(gpu, &p, false)?;
            let wt = filters_for_gemm(gpu, wb, &p, false)?;
            let (name, cfg) = plan::forward(&p, None)?;
            crate::launch!(gpu, Module::Conv2d, name, cfg, xb, &wt, bb, &mut y, &tab, &p)?;
            Storage::Cuda { gpu: gpu.clone(), buf: y }
        }
        _ => unreachable!("checked by common_device"),
    };
    Ok(Tensor::from_storage(shape, storage).with_relu_fact(ReluFact::output_if(relu)))
}

/// Gradients given gy = dL/dy (of the pre-ReLU output: the caller has applied any ReLU mask).
/// `need_gx = false` skips dL/dx (the first layer's input needs none). Returns (gx, gw, gb).
pub fn conv2d_bwd(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    stride: usize,
    pad: usize,
    need_gx: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    conv2d_bwd_with(x, w, gy, stride, pad, need_gx, ConvAlgo::ImplicitGemm)
}

/// `conv2d_bwd` with the algorithm `algo` (the bias grad is the same sum either way).
pub fn conv2d_bwd_with(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    stride: usize,
    pad: usize,
    need_gx: bool,
    algo: ConvAlgo,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let (gx, gw, gb) = conv2d_grads(x, w, gy, stride, pad, [need_gx, true, true], algo)?;
    Ok((gx, gw.expect("asked for"), gb.expect("asked for")))
}

/// The gradients flagged in `need` = [gx, gw, gb].
fn conv2d_grads(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    stride: usize,
    pad: usize,
    need: [bool; 3],
    algo: ConvAlgo,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let mut p = params(x, w, stride, pad)?;
    let y_shape = [p.n as usize, p.c_out as usize, p.oh as usize, p.ow as usize];
    gy.expect_shape("conv2d_bwd", "gy", &y_shape)?;
    common_device("conv2d_bwd", &[x.device(), w.device(), gy.device()])?;
    let [need_gx, need_gw, need_gb] = need;
    let m_b = p.c_out as usize;

    let wino = algo.winograd_tile(&p);
    if let (Storage::Cpu(xv), Storage::Cpu(wv), Storage::Cpu(gv)) = (x.storage(), w.storage(), gy.storage()) {
        let (gx, gw) = match wino {
            Some(m) => (
                need_gx.then(|| winograd::winograd_bwd_input_cpu(wv, gv, &p, m)).transpose()?,
                need_gw.then(|| winograd::winograd_bwd_weight_cpu(xv, gv, &p, m)).transpose()?,
            ),
            None => {
                (need_gx.then(|| conv2d_bwd_input_cpu(wv, gv, &p)), need_gw.then(|| conv2d_bwd_weight_cpu(xv, gv, &p)))
            }
        };
        let (gx, gw) = (gx.map(Storage::Cpu), gw.map(Storage::Cpu));
        let gb = need_gb.then(|| Storage::Cpu(conv2d_bwd_bias_cpu(gv, &p)));
        return Ok((
            gx.map(|s| Tensor::from_storage(x.shape().to_vec(), s)),
            gw.map(|s| Tensor::from_storage(w.shape().to_vec(), s)),
            gb.map(|s| Tensor::from_storage(vec![m_b], s)),
        ));
    }

    let (gpu, xb, wb) = gpu_pair(x, w);
    let (_, gb_buf) = gy.cuda().expect("checked by common_device");
    let wrap = |buf| Storage::Cuda { gpu: gpu.clone(), buf };

    let gx = if let (true, Some(m)) = (need_gx, wino) {
        let gx = winograd::winograd_bwd_input_cuda(gpu, wb, gb_buf, &p, m)?;
        Some(Tensor::from_storage(x.shape().to_vec(), wrap(gx)))
    } else if need_gx {
        let mut gx = gpu.uninit::<f32>(p.x_len())?;
        let tab = ktable(gpu, &p, true)?;
        let wt = filters_for_gemm(gpu, wb, &p, true)?;
        let (name, cfg) = plan::input_grad(&p, None)?;
        crate::launch!(gpu, Module::Conv2d, name, cfg, &wt, gb_buf, &mut gx, &tab, &p)?;
        Some(Tensor::from_storage(x.shape().to_vec(), wrap(gx)))
    } else {
        None
    };

    let gw = if let (true, Some(m)) = (need_gw, wino) {
        let gw = winograd::winograd_bwd_weight_cuda(gpu, xb, gb_buf, &p, m)?;
        Some(Tensor::from_storage(w.shape().to_vec(), wrap(gw)))
    } else if need_gw {
        let (name, cfg, splits) = plan::weight_grad(&mut p, None);
        let tab = ktable(gpu, &p, false)?;
        let mut gw = gpu.uninit::<f32>(p.w_len())?;
        if splits == 1 {
            crate::launch!(gpu, Module::Conv2d, name, cfg, xb, gb_buf, &mut gw, &tab, &p)?;
        } else {
            let mut ws = gpu.uninit::<f32>(splits * p.w_len())?;
            crate::launch!(gpu, Module::Conv2d, name, cfg, xb, gb_buf, &mut ws, &tab, &p)?;
            let (len, nsplit) = (p.w_len() as u32, splits as u32);
            let reduce = plan::splitk_sum(p.w_len());
            crate::launch!(gpu, Module::Conv2d, "conv2d_splitk_sum_f32", reduce, &ws, &mut gw, &len, &nsplit)?;
        }
        Some(Tensor::from_storage(w.shape().to_vec(), wrap(gw)))
    } else {
        None
    };

    let gb = if need_gb {
        let (cfg, splits) = plan::bias_grad(&p);
        let mut gb = gpu.uninit::<f32>(m_b)?;
        if splits == 1 {
            crate::launch!(gpu, Module::Conv2d, "conv2d_bwd_bias_f32", cfg, gb_buf, &mut gb, &p)?;
        } else {
            let mut part = gpu.uninit::<f32>(splits * m_b)?;
            crate::launch!(gpu, Module::Conv2d, "conv2d_bwd_bias_f32", cfg, gb_buf, &mut part, &p)?;
            let (len, nsplit) = (m_b as u32, splits as u32);
            let reduce = plan::splitk_sum(m_b);
            crate::launch!(gpu, Module::Conv2d, "conv2d_splitk_sum_f32", reduce, &part, &mut gb, &len, &nsplit)?;
        }
        Some(Tensor::from_storage(vec![m_b], wrap(gb)))
    } else {
        None
    };
    Ok((gx, gw, gb))
}

/// Recorded conv2d (+ fused ReLU when `relu`), the implicit GEMM. The backward applies the ReLU
/// mask (from the saved output) and then computes only the gradients the tape needs.
pub fn conv2d(
    tape: &mut Tape,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    pad: usize,
    relu: bool,
) -> Result<Tensor> {
    conv2d_with(tape, x, w, b, stride, pad, relu, ConvAlgo::ImplicitGemm)
}

/// `conv2d` with the algorithm `algo` for the forward and the backward.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_with(
    tape: &mut Tape,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    pad: usize,
    relu: bool,
    algo: ConvAlgo,
) -> Result<Tensor> {
    let y = conv2d_fwd_with(x, w, b, stride, pad, relu, algo)?;
    let need = [tape.requires_grad(x), tape.requires_grad(w), tape.requires_grad(b)];
    let ids = [x.id(), w.id(), b.id()];
    let (xs, ws) = (x.clone(), w.clone());
    let y_saved = relu.then(|| y.clone());
    tape.record(&y, &[x, w, b], move |gy, grads| {
        let gy = &through_fused_relu(y_saved.as_ref(), gy)?;
        let (gx, gw, gb) = conv2d_grads(&xs, &ws, gy, stride, pad, need, algo)?;
        for (id, g) in ids.into_iter().zip([gx, gw, gb]) {
            if let Some(g) = g {
                grads.accumulate(id, g)?;
            }
        }
        Ok(())
    });
    Ok(y)
}
