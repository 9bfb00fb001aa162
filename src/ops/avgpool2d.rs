//! 2-D average pooling as PyTorch's `nn.AvgPool2d(kernel, stride, padding, ceil_mode=False,
//! count_include_pad)`, square windows: x (N, C, H, W) -> y (N, C, OH, OW) with
//! OH = (H + 2 pad - kernel) / stride + 1 (OW alike). Each output is the sum of the real inputs in
//! its window divided by the window's size within the padded input (`count_include_pad`: k * k)
//! or by the number of real inputs in it; the backward spreads each output's gradient over its
//! window divided by the same divisor (see kernels/avgpool2d.cu).

use cudarc::driver::LaunchConfig;

use crate::device::grid_planes;
use crate::error::{Error, Result};
use crate::ops::fast_div::FastDiv;
use crate::ops::parallel::for_each_row;
use crate::ptx::Module;
use crate::tape::Tape;
use crate::tensor::{Storage, Tensor};

const OP: &str = "avgpool2d";

/// The pooling: `kernel` x `kernel` windows every `stride` inputs, `pad` zeros around each plane
/// (PyTorch's `padding`), and whether those zeros count in a window's divisor
/// (`count_include_pad`, PyTorch's default: true). Floor mode (`ceil_mode=False`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AvgPool2d {
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
    pub count_include_pad: bool,
}

impl AvgPool2d {
    /// `nn.AvgPool2d(kernel, stride, pad)`: the padding counts in the divisor, as PyTorch's default.
    pub fn new(kernel: usize, stride: usize, pad: usize) -> Self {
        AvgPool2d { kernel, stride, pad, count_include_pad: true }
    }

    pub fn count_include_pad(self, count_include_pad: bool) -> Self {
        AvgPool2d { count_include_pad, ..self }
    }
}

/// Mirrors `Avgpool2dParams` in kernels/avgpool2d.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Avgpool2dParams {
    pub n: u32,
    pub c: u32,
    pub h: u32,
    pub w: u32,
    pub oh: u32,
    pub ow: u32,
    pub k: u32,
    pub stride: u32,
    pub pad: u32,
    /// 1: a window's divisor is its size within the padded input; 0: its count of real inputs.
    pub count_include_pad: u32,
    /// Division by W, by OW and by the stride, for the kernels' index math.
    pub w_div: FastDiv,
    pub ow_div: FastDiv,
    pub stride_div: FastDiv,
}

// SAFETY: #[repr(C)] plain data, mirrored field for field by the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for Avgpool2dParams {}

impl Avgpool2dParams {
    /// Checks a (N, C, H, W) input shape against the pooling, refusing what PyTorch refuses, and
    /// derives the output size.
    pub fn new(x_shape: &[usize], pool: &AvgPool2d) -> Result<Self> {
        let [n, c, h, w] = <[usize; 4]>::try_from(x_shape)
            .map_err(|_| Error::shape(OP, "a 4-D (N, C, H, W) input", format!("shape {x_shape:?}")))?;
        let AvgPool2d { kernel: k, stride, pad, count_include_pad } = *pool;
        if k == 0 || stride == 0 {
            return Err(Error::Invalid(format!(
                "{OP}: expected a kernel and a stride of at least 1, found kernel = {k}, stride = {stride}"
            )));
        }
        // PyTorch's int parameters: a larger stride would not fit the kernels' 32-bit index math.
        if stride >= 1 << 31 {
            return Err(Error::TooLarge(format!("{OP}: expected a stride below 2^31, found stride = {stride}")));
        }
        if pad > k / 2 {
            return Err(Error::Invalid(format!(
                "{OP}: expected a padding of at most half the kernel ({k} / 2 = {}), found pad = {pad}",
                k / 2
            )));
        }
        if c == 0 || h == 0 || w == 0 {
            return Err(Error::shape(OP, "C, H and W of at least 1 (N may be 0)", format!("shape {x_shape:?}")));
        }
        // The window must fit in the padded input: PyTorch's "output size is too small".
        let (ph, pw) = (h.saturating_add(2 * pad), w.saturating_add(2 * pad));
        if ph < k || pw < k {
            return Err(Error::shape(
                OP,
                format!("an input of at least {k}x{k} with padding {pad} (the window)"),
                format!("{h}x{w}, {ph}x{pw} padded (shape {x_shape:?})"),
            ));
        }
        // The kernels index a plane with 32 bits (FastDiv: below 2^31), their window bounds are
        // signed 32-bit, and they count planes in 64.
        let too_big = || {
            Error::TooLarge(format!(
                "{OP}: expected planes below 2^31 elements (padded too) and N * C below 2^32, found shape \
                 {x_shape:?} with padding {pad}"
            ))
        };
        let small = |v: usize| if v < 1 << 31 { Ok(v as u32) } else { Err(too_big()) };
        small(h.checked_mul(w).ok_or_else(too_big)?)?;
        small(ph.checked_mul(pw).ok_or_else(too_big)?)?;
        if n.checked_mul(c).is_none_or(|planes| planes >= 1 << 32) {
            return Err(too_big());
        }
        let stride32 = stride as u32; // checked above
        let (oh, ow) = ((ph - k) / stride + 1, (pw - k) / stride + 1);
        Ok(Avgpool2dParams {
            n: n as u32,
            c: c as u32,
            h: h as u32,
            w: w as u32,
            oh: oh as u32,
            ow: ow as u32,
            k: k as u32,     // k <= ph < 2^31
            pad: pad as u32, // pad <= k / 2
            stride: stride32,
            count_include_pad: count_include_pad as u32,
            w_div: FastDiv::new(w as u32),
            ow_div: FastDiv::new(ow as u32),
            stride_div: FastDiv::new(stride32),
        })
    }

    pub fn out_shape(&self) -> Vec<usize> {
        [self.n, self.c, self.oh, self.ow].iter().map(|&v| v as usize).collect()
    }

    fn planes(&self) -> usize {
        self.n as usize * self.c as usize
    }

    /// The real rows [lo, hi) of output row `o`'s window (columns alike, with `size` = W), and
    /// the divisor's factor for that dimension: the window's extent within the padded input
    /// (count_include_pad) or its count of real rows. The kernels' `window_span`.
    fn span(&self, o: usize, size: u32) -> (usize, usize, usize) {
        let (k, pad, size) = (self.k as i64, self.pad as i64, size as i64);
        let start = o as i64 * self.stride as i64 - pad;
        let (lo, hi) = (start.max(0), (start + k).min(size));
        let padded = (start + k).min(size + pad) - start;
        let factor = if self.count_include_pad != 0 { padded } else { hi - lo };
        (lo as usize, hi as usize, factor as usize)
    }

    /// The kernels' launch over `elems` elements per plane (`grid_planes`).
    fn launch(&self, elems: u32) -> LaunchConfig {
        grid_planes(self.planes(), elems)
    }
}

/// CPU reference, forward: each window's real inputs summed in row-major order in f32, divided
/// by the window's divisor, as the kernel does. x: (N, C, H, W) -> y: (N, C, OH, OW).
pub fn avgpool2d_fwd_cpu(x: &[f32], p: &Avgpool2dParams) -> Vec<f32> {
    let (w, oh, ow) = (p.w as usize, p.oh as usize, p.ow as usize);
    let plane_in = p.h as usize * w;
    let mut y = vec![0.0f32; p.planes() * oh * ow];
    // One plane of y per task.
    for_each_row(&mut y, oh * ow, |plane, yp| {
        let xp = &x[plane * plane_in..][..plane_in];
        for oy in 0..oh {
            let (r_lo, r_hi, r_div) = p.span(oy, p.h);
            for ox in 0..ow {
                let (c_lo, c_hi, c_div) = p.span(ox, p.w);
                let mut sum = 0.0f32;
                for iy in r_lo..r_hi {
                    for ix in c_lo..c_hi {
                        sum += xp[iy * w + ix];
                    }
                }
                yp[oy * ow + ox] = sum / (r_div * c_div) as f32;
            }
        }
    });
    y
}

/// CPU reference, backward: gy (N, C, OH, OW) -> gx (N, C, H, W). Each output's gy / divisor is
/// added to every real input of its window, outputs in ascending order: the order in which the
/// kernel's gather adds the terms, so the sums are bit-identical.
pub fn avgpool2d_bwd_cpu(gy: &[f32], p: &Avgpool2dParams) -> Vec<f32> {
    let (w, oh, ow) = (p.w as usize, p.oh as usize, p.ow as usize);
    let plane_out = oh * ow;
    let mut gx = vec![0.0f32; p.planes() * p.h as usize * w];
    // One plane of gx per task.
    for_each_row(&mut gx, p.h as usize * w, |plane, gxp| {
        let gp = &gy[plane * plane_out..][..plane_out];
        for oy in 0..oh {
            let (r_lo, r_hi, r_div) = p.span(oy, p.h);
            for ox in 0..ow {
                let (c_lo, c_hi, c_div) = p.span(ox, p.w);
                let share = gp[oy * ow + ox] / (r_div * c_div) as f32;
                for iy in r_lo..r_hi {
                    for ix in c_lo..c_hi {
                        gxp[iy * w + ix] += share;
                    }
                }
            }
        }
    });
    gx
}

/// y = avgpool(x): x (N, C, H, W) -> y (N, C, OH, OW).
pub fn avgpool2d_fwd(x: &Tensor, pool: &AvgPool2d) -> Result<Tensor> {
    let p = Avgpool2dParams::new(x.shape(), pool)?;
    let out_shape = p.out_shape();
    let storage = match x.storage() {
        Storage::Cpu(v) => Storage::Cpu(avgpool2d_fwd_cpu(v, &p)),
        Storage::Cuda { gpu, buf } => {
            let mut y = gpu.uninit::<f32>(out_shape.iter().product())?;
            crate::launch!(gpu, Module::Avgpool2d, "avgpool2d_fwd_f32", p.launch(p.oh * p.ow), buf, &mut y, &p)?;
            Storage::Cuda { gpu: gpu.clone(), buf: y }
        }
    };
    Ok(Tensor::from_storage(out_shape, storage))
}

/// gx (shape `x_shape`, the forward's input) from the output gradient gy (N, C, OH, OW).
pub fn avgpool2d_bwd(gy: &Tensor, x_shape: &[usize], pool: &AvgPool2d) -> Result<Tensor> {
    let p = Avgpool2dParams::new(x_shape, pool)?;
    gy.expect_shape("avgpool2d_bwd", "gy", &p.out_shape())?;
    let storage = match gy.storage() {
        Storage::Cpu(g) => Storage::Cpu(avgpool2d_bwd_cpu(g, &p)),
        Storage::Cuda { gpu, buf } => {
            let mut gx = gpu.uninit::<f32>(x_shape.iter().product())?;
            crate::launch!(gpu, Module::Avgpool2d, "avgpool2d_bwd_f32", p.launch(p.h * p.w), buf, &mut gx, &p)?;
            Storage::Cuda { gpu: gpu.clone(), buf: gx }
        }
    };
    Ok(Tensor::from_storage(x_shape.to_vec(), storage))
}

/// Recorded average pooling. The tape keeps nothing of x but its shape: the backward needs only
/// gy and the geometry.
pub fn avgpool2d(tape: &mut Tape, x: &Tensor, pool: &AvgPool2d) -> Result<Tensor> {
    let y = avgpool2d_fwd(x, pool)?;
    let (x_id, x_shape, pool) = (x.id(), x.shape().to_vec(), *pool);
    tape.record(&y, &[x], move |gy, grads| grads.accumulate(x_id, avgpool2d_bwd(gy, &x_shape, &pool)?));
    Ok(y)
}
