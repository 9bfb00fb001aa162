//! 2-D max pooling as PyTorch's `nn.MaxPool2d(k, stride, padding, ceil_mode=False)`, square
//! windows: x (N, C, H, W) -> y (N, C, OH, OW) with OH = (H + 2 pad - k) / stride + 1 (OW alike).
//! The padding acts as -inf: it never wins, and `pad <= k / 2` (PyTorch's rule) keeps a real
//! input in every window. The forward also returns the argmax of each window (a flat `h * W + w`
//! index of a real input inside its (n, c) plane); the backward sends each output gradient to
//! that one input and sums where windows overlap (see kernels/maxpool2d.cu).
//!
//! After a ReLU (x marked `ReluFact::Output`), the recorded op also applies the ReLU's gradient
//! mask for free: a window whose maximum is <= 0 routes no gradient (its argmax is `NO_GRAD`),
//! so x's gradient comes out already masked and is marked `ReluFact::MaskedFor(x)`: the ReLU's
//! backward then has nothing to do (see `ops::relu`). The test is the ReLU backward's own
//! (`relu_passes_grad`), so a NaN maximum routes its gradient, as the ReLU passes it there.

use cudarc::driver::LaunchConfig;

use crate::device::grid_planes;
use crate::error::{Error, Result};
use crate::ops::fast_div::FastDiv;
use crate::ops::relu::relu_passes_grad;
use crate::ptx::Module;
use crate::tape::Tape;
use crate::tensor::{common_device, ReluFact, Storage, Tensor};

/// The argmax of a window that routes no gradient (`drop_nonpositive`): no input's index.
pub const NO_GRAD: u32 = u32::MAX;

/// Mirrors `Maxpool2dParams` in kernels/maxpool2d.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Maxpool2dParams {
    pub n: u32,
    pub c: u32,
    pub h: u32,
    pub w: u32,
    pub oh: u32,
    pub ow: u32,
    pub k: u32,
    pub stride: u32,
    /// Rows (and columns) of -inf padding on each side of a plane; at most k / 2.
    pub pad: u32,
    /// 1: a window whose maximum is <= 0 routes no gradient (argmax `NO_GRAD`; a NaN maximum
    /// routes), which is the ReLU's mask when x is a ReLU's output. 0 (what `new` sets): every
    /// window routes.
    pub drop_nonpositive: u32,
    /// Division by W, by OW and by the stride, for the kernels' index math.
    pub w_div: FastDiv,
    pub ow_div: FastDiv,
    pub stride_div: FastDiv,
}

// SAFETY: #[repr(C)] plain data, mirrored field for field by the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for Maxpool2dParams {}

impl Maxpool2dParams {
    /// Checks a (N, C, H, W) input shape against the window, refusing what PyTorch refuses, and
    /// derives the output size.
    pub fn new(x_shape: &[usize], k: usize, stride: usize, pad: usize) -> Result<Self> {
        let [n, c, h, w] = <[usize; 4]>::try_from(x_shape)
            .map_err(|_| Error::shape("maxpool2d", "a 4-D (N, C, H, W) input", format!("shape {x_shape:?}")))?;
        if k == 0 || stride == 0 {
            return Err(Error::Invalid(format!(
                "maxpool2d: window and stride must be at least 1, found k = {k}, stride = {stride}"
            )));
        }
        // PyTorch's rule; it keeps at least one real input in every window.
        if pad > k / 2 {
            return Err(Error::Invalid(format!(
                "maxpool2d: pad should be at most half of the kernel size (k / 2 = {}), found pad = {pad}, k = {k}",
                k / 2
            )));
        }
        // The window must fit in the padded input (OH >= 1), and a plane must hold a real input.
        let (ph, pw) = (h.saturating_add(2 * pad), w.saturating_add(2 * pad));
        if h == 0 || w == 0 || ph < k || pw < k {
            let want = match pad {
                0 => format!("an input of at least {k}x{k} (the window; no padding)"),
                _ => format!("an input of at least 1x1, and of at least {k}x{k} (the window) with padding {pad}"),
            };
            return Err(Error::shape("maxpool2d", want, format!("{h}x{w}, {ph}x{pw} padded (shape {x_shape:?})")));
        }
        // The kernels index a plane with 32 bits (FastDiv: below 2^31), their window bounds are
        // signed 32-bit (padded sizes below 2^31), and they count planes in 32.
        let too_big = || {
            Error::shape(
                "maxpool2d",
                "planes below 2^31 elements (padded too) and N * C below 2^32",
                format!("shape {x_shape:?} with padding {pad}"),
            )
        };
        let small = |v: Option<usize>, limit: usize| match v {
            Some(v) if v < limit => Ok(v as u32),
            _ => Err(too_big()),
        };
        small(h.checked_mul(w), 1 << 31)?;
        small(ph.checked_mul(pw), 1 << 31)?;
        small(n.checked_mul(c), 1 << 32)?;
        let stride32 = small(Some(stride), 1 << 31)?;
        let (oh, ow) = ((ph - k) / stride + 1, (pw - k) / stride + 1);
        Ok(Maxpool2dParams {
            n: n as u32,
            c: c as u32,
            h: h as u32,
            w: w as u32,
            oh: oh as u32,
            ow: ow as u32,
            k: k as u32, // k <= ph < 2^31
            stride: stride32,
            pad: pad as u32, // pad <= k / 2
            drop_nonpositive: 0,
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

    /// The kernels' launch over `elems` elements per plane (`grid_planes`).
    fn launch(&self, elems: u32) -> LaunchConfig {
        grid_planes(self.planes(), elems)
    }
}

/// CPU reference, forward: (y, argmax). The same scan as the kernel: row-major over the window's
/// real inputs (the padding never wins), `v > best || v.is_nan()` (the first maximum wins a tie;
/// NaN counts as the maximum); with `p.drop_nonpositive`, `NO_GRAD` for a window whose maximum is
/// <= 0 (not for a NaN one).
pub fn maxpool2d_fwd_cpu(x: &[f32], p: &Maxpool2dParams) -> (Vec<f32>, Vec<u32>) {
    let (h, w, oh, ow, k, s, pad) =
        (p.h as usize, p.w as usize, p.oh as usize, p.ow as usize, p.k as usize, p.stride as usize, p.pad as usize);
    // The real rows (or columns) [lo, hi) of window o in a dimension of `size` inputs.
    let span = |o: usize, size: usize| ((o * s).saturating_sub(pad), (o * s + k - pad).min(size));
    let mut y = Vec::with_capacity(p.planes() * oh * ow);
    let mut arg = Vec::with_capacity(y.capacity());
    for xp in x.chunks_exact(h * w) {
        for oy in 0..oh {
            let (y0, y1) = span(oy, h);
            for ox in 0..ow {
                let (x0, x1) = span(ox, w);
                let (mut best, mut best_i) = (f32::NEG_INFINITY, y0 * w + x0);
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        let idx = iy * w + ix;
                        let v = xp[idx];
                        if v > best || v.is_nan() {
                            (best, best_i) = (v, idx);
                        }
                    }
                }
                y.push(best);
                let routes = p.drop_nonpositive == 0 || relu_passes_grad(best); // NaN routes
                arg.push(if routes { best_i as u32 } else { NO_GRAD });
            }
        }
    }
    (y, arg)
}

/// CPU reference, backward: scatters each gy to its argmax, in ascending output order (the
/// order in which the kernel's gather adds them, so the sums are bit-identical). `NO_GRAD`
/// routes nothing; any other argmax outside the plane is an error.
pub fn maxpool2d_bwd_cpu(argmax: &[u32], gy: &[f32], p: &Maxpool2dParams) -> Result<Vec<f32>> {
    let (plane_in, plane_out) = (p.h as usize * p.w as usize, p.oh as usize * p.ow as usize);
    let mut gx = vec![0.0f32; p.planes() * plane_in];
    for ((gxp, ap), gp) in
        gx.chunks_exact_mut(plane_in).zip(argmax.chunks_exact(plane_out)).zip(gy.chunks_exact(plane_out))
    {
        for (&a, &g) in ap.iter().zip(gp).filter(|&(&a, _)| a != NO_GRAD) {
            let slot = gxp
                .get_mut(a as usize)
                .ok_or_else(|| Error::Invalid(format!("maxpool2d_bwd: argmax {a} outside a {}x{} plane", p.h, p.w)))?;
            *slot += g;
        }
    }
    Ok(gx)
}

/// y = maxpool(x) and the argmax of each window, both (N, C, OH, OW). `drop_nonpositive` gives
/// the windows whose maximum is <= 0 the argmax `NO_GRAD`: their gradient then goes nowhere (x a
/// ReLU's output: see the module comment).
pub fn maxpool2d_fwd(
    x: &Tensor,
    k: usize,
    stride: usize,
    pad: usize,
    drop_nonpositive: bool,
) -> Result<(Tensor, Tensor<u32>)> {
    let mut p = Maxpool2dParams::new(x.shape(), k, stride, pad)?;
    p.drop_nonpositive = drop_nonpositive as u32;
    let out_shape = p.out_shape();
    let n_out: usize = out_shape.iter().product();
    let (y, arg) = match x.storage() {
        Storage::Cpu(v) => {
            let (y, a) = maxpool2d_fwd_cpu(v, &p);
            (Storage::Cpu(y), Storage::Cpu(a))
        }
        Storage::Cuda { gpu, buf } => {
            let mut y = gpu.uninit::<f32>(n_out)?;
            let mut a = gpu.uninit::<u32>(n_out)?;
            let cfg = p.launch(p.oh * p.ow);
            crate::launch!(gpu, Module::Maxpool2d, "maxpool2d_fwd_f32", cfg, buf, &mut y, &mut a, &p)?;
            (Storage::Cuda { gpu: gpu.clone(), buf: y }, Storage::Cuda { gpu: gpu.clone(), buf: a })
        }
    };
    Ok((Tensor::from_storage(out_shape.clone(), y), Tensor::from_storage(out_shape, arg)))
}

/// gx (shape `x_shape`) from the forward's argmax and the output gradient gy.
///
/// Takes the window, stride and padding as well as `x_shape`: the kernel gathers, for each input,
/// from the windows that contain it, which it cannot find from the argmax alone.
pub fn maxpool2d_bwd(
    argmax: &Tensor<u32>,
    gy: &Tensor,
    x_shape: &[usize],
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let p = Maxpool2dParams::new(x_shape, k, stride, pad)?;
    let out_shape = p.out_shape();
    gy.expect_shape("maxpool2d_bwd", "gy", &out_shape)?;
    argmax.expect_shape("maxpool2d_bwd", "argmax", &out_shape)?;
    common_device("maxpool2d_bwd", &[argmax.device(), gy.device()])?;
    let n_in: usize = x_shape.iter().product();
    let storage = match (argmax.storage(), gy.storage()) {
        (Storage::Cpu(a), Storage::Cpu(g)) => Storage::Cpu(maxpool2d_bwd_cpu(a, g, &p)?),
        (Storage::Cuda { gpu, buf: a }, Storage::Cuda { buf: g, .. }) => {
            let mut gx = gpu.uninit::<f32>(n_in)?;
            let cfg = p.launch(p.h * p.w);
            crate::launch!(gpu, Module::Maxpool2d, "maxpool2d_bwd_f32", cfg, a, g, &mut gx, &p)?;
            Storage::Cuda { gpu: gpu.clone(), buf: gx }
        }
        _ => unreachable!("checked by common_device"),
    };
    Ok(Tensor::from_storage(x_shape.to_vec(), storage))
}

/// Recorded max pooling. The tape keeps only the argmax (u32, the size of y), not x. After a
/// ReLU, x's gradient comes out masked (see the module comment).
pub fn maxpool2d(tape: &mut Tape, x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let after_relu = x.relu_fact() == ReluFact::Output;
    let (y, argmax) = maxpool2d_fwd(x, k, stride, pad, after_relu)?;
    let (x_id, x_shape) = (x.id(), x.shape().to_vec());
    let fact = if after_relu { ReluFact::MaskedFor(x_id) } else { ReluFact::None };
    tape.record(&y, &[x], move |gy, grads| {
        let gx = maxpool2d_bwd(&argmax, gy, &x_shape, k, stride, pad)?;
        grads.accumulate(x_id, gx.with_relu_fact(fact))
    });
    Ok(y)
}
