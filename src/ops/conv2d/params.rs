//! What every convolution algorithm shares: the kernel parameter struct (`Conv2dParams`, the
//! dims of x (N, Cin, H, W), w (Cout, Cin, KH, KW) and y (N, Cout, OH, OW)), the output size, and
//! the choice of algorithm (`ConvAlgo`).

use crate::error::{Error, Result};
use crate::ops::fast_div::FastDiv;

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
            return Err(Error::TooLarge(format!(
                "conv2d: a tensor of {biggest} elements exceeds the kernels' 2^31 limit"
            )));
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
        return Err(Error::Invalid("conv2d: stride must be at least 1, found 0".into()));
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
    /// <= r - 1; see `ops::conv2d::winograd`), the implicit GEMM elsewhere. `tile` fixes the output tile
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
            ConvAlgo::Winograd { tile } => output_tile(p, tile),
        }
    }
}

impl std::str::FromStr for ConvAlgo {
    type Err = Error;
    /// "auto", "gemm", "winograd" or "winograd:M" (M an output tile some kernel size has
    /// kernels for: 1..=7; whether a model's layers have them is checked where the model is built).
    fn from_str(s: &str) -> Result<Self> {
        let max = MAX_TILE;
        let bad = || {
            Error::Invalid(format!(
                "conv algorithm: expected auto, gemm, winograd or winograd:M (M = 1..={max}), found `{s}`"
            ))
        };
        match s.split_once(':') {
            None if s == "auto" => Ok(ConvAlgo::Auto),
            None if s == "gemm" => Ok(ConvAlgo::ImplicitGemm),
            None if s == "winograd" => Ok(ConvAlgo::Winograd { tile: None }),
            Some(("winograd", m)) => match m.parse::<usize>() {
                Ok(m) if (1..=MAX_TILE).contains(&m) => Ok(ConvAlgo::Winograd { tile: Some(m) }),
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

/// The tile sides alpha = m + r - 1 the Winograd kernels are built for (`winograd_*_a4`, `_a6`,
/// `_a8`): each is a template parameter, so that a tile is held in registers.
pub const KERNEL_ALPHAS: [usize; 3] = [4, 6, 8];

/// The largest output tile m of any kernel: F(7, 2) in alpha = 8.
pub const MAX_TILE: usize = KERNEL_ALPHAS[KERNEL_ALPHAS.len() - 1] - 1;

/// Whether F(m x m, r x r) applies to the convolution `p`, and which m: stride 1, a square
/// kernel of side r >= 2, padding <= r - 1 (so that the input grad's padding r - 1 - pad is one),
/// and alpha = m + r - 1 one of the kernels' sizes (4, 6, 8). `tile` None picks alpha = 6
/// (F(4, 3), F(2, 5)) for r <= 5, else alpha = 8.
pub fn output_tile(p: &Conv2dParams, tile: Option<usize>) -> Option<usize> {
    let r = p.kh as usize;
    if p.stride != 1 || p.kh != p.kw || r < 2 || p.pad as usize > r - 1 {
        return None;
    }
    let m = tile.unwrap_or(if r <= 5 { 7 - r } else { 9usize.saturating_sub(r) });
    (m >= 1 && KERNEL_ALPHAS.contains(&(m + r - 1))).then_some(m)
}

/// Every output tile m that has kernels for `p`, smallest first (none for a strided or
/// non-square convolution).
pub fn winograd_tiles(p: &Conv2dParams) -> Vec<usize> {
    (1..=MAX_TILE).filter(|&m| output_tile(p, Some(m)) == Some(m)).collect()
}
