//! 2-D convolution (cross-correlation, as in PyTorch's `nn.Conv2d`) with bias and an optional
//! fused ReLU. x: (N, Cin, H, W), w: (Cout, Cin, KH, KW), b: (Cout) -> y: (N, Cout, OH, OW) with
//! OH = (H + 2*pad - KH) / stride + 1 (same for OW).
//!
//! One entry point per direction, whatever the algorithm: `conv2d_fwd`, `conv2d_bwd`, and
//! `conv2d` (the forward, recording its backward on the tape), each taking a `Conv2d` that says
//! the geometry, the fused ReLU, the algorithm and the GEMM options. The code is split by
//! algorithm: `params` (what all share), `reference` (the CPU path: im2col + matmul),
//! `implicit_gemm` (the CUDA implicit GEMMs) and `winograd` (F(m x m, r x r), CPU and CUDA).

pub mod implicit_gemm;
pub mod params;
pub mod reference;
pub mod winograd;

pub use params::{conv2d_out_size, output_tile, winograd_tiles, Conv2dParams, ConvAlgo};
pub use reference::{conv2d_bwd_bias_cpu, conv2d_bwd_input_cpu, conv2d_bwd_weight_cpu, conv2d_fwd_cpu};

use crate::error::{Error, Result};
use crate::ops::gemm::GemmOpts;
use crate::ops::relu::through_fused_relu;
use crate::tape::Tape;
use crate::tensor::{common_device, ReluFact, Storage, Tensor};

/// A convolution's settings beyond its tensors: the geometry, the fused ReLU, and how it is
/// computed. `Conv2d::new(stride, pad)` is the plain convolution on the implicit GEMM in fp32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2d {
    pub stride: usize,
    pub pad: usize,
    /// Applies the ReLU (`ops::relu::relu_value`: NaN stays NaN) to the output, inside the
    /// kernel that writes it.
    pub relu: bool,
    /// Where `Winograd` does not apply to the shapes, and for `Auto` (which a model resolves per
    /// layer before it runs), the implicit GEMM.
    pub algo: ConvAlgo,
    pub gemm: GemmOpts,
}

impl Conv2d {
    pub fn new(stride: usize, pad: usize) -> Self {
        Conv2d { stride, pad, relu: false, algo: ConvAlgo::ImplicitGemm, gemm: GemmOpts::default() }
    }

    pub fn relu(self, relu: bool) -> Self {
        Conv2d { relu, ..self }
    }

    pub fn algo(self, algo: ConvAlgo) -> Self {
        Conv2d { algo, ..self }
    }

    pub fn gemm(self, gemm: GemmOpts) -> Self {
        Conv2d { gemm, ..self }
    }
}

const OP: &str = "conv2d";

/// Checks x (N, Cin, H, W) against w (Cout, Cin, KH, KW) and returns the dims.
fn params(x: &Tensor, w: &Tensor, conv: &Conv2d) -> Result<Conv2dParams> {
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
    Conv2dParams::new(n, c, h, wd, cout, kh, kw, conv.stride, conv.pad)
}

/// Forward: x (N, Cin, H, W), w (Cout, Cin, KH, KW), b (Cout) -> y (N, Cout, OH, OW).
pub fn conv2d_fwd(x: &Tensor, w: &Tensor, b: &Tensor, conv: &Conv2d) -> Result<Tensor> {
    let mut p = params(x, w, conv)?;
    b.expect_shape(OP, "b", &[p.c_out as usize])?;
    common_device(OP, &[x.device(), w.device(), b.device()])?;
    p.relu = conv.relu as u32;
    let shape = vec![p.n as usize, p.c_out as usize, p.oh as usize, p.ow as usize];
    let wino = conv.algo.winograd_tile(&p);
    let storage = match (x.storage(), w.storage(), b.storage()) {
        (Storage::Cpu(xv), Storage::Cpu(wv), Storage::Cpu(bv)) => Storage::Cpu(match wino {
            Some(m) => winograd::winograd_fwd_cpu(xv, wv, bv, &p, m)?,
            None => conv2d_fwd_cpu(xv, wv, bv, &p, conv.relu),
        }),
        (Storage::Cuda { gpu, buf: xb }, Storage::Cuda { buf: wb, .. }, Storage::Cuda { buf: bb, .. }) => {
            let y = match wino {
                Some(m) => winograd::winograd_fwd_cuda(gpu, (xb, wb, bb), &p, m, conv.gemm)?,
                None => implicit_gemm::forward(gpu, (xb, wb, bb), &p, conv.gemm)?,
            };
            Storage::Cuda { gpu: gpu.clone(), buf: y }
        }
        _ => unreachable!("checked by common_device"),
    };
    Ok(Tensor::from_storage(shape, storage).with_relu_fact(ReluFact::output_if(conv.relu)))
}

/// Gradients given gy = dL/dy (of the pre-ReLU output: the caller has applied any ReLU mask).
/// `need_gx = false` skips dL/dx (the first layer's input needs none). Returns (gx, gw, gb).
/// The bias grad is the same sum whatever the algorithm.
pub fn conv2d_bwd(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    conv: &Conv2d,
    need_gx: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let (gx, gw, gb) = conv2d_grads(x, w, gy, conv, [need_gx, true, true])?;
    Ok((gx, gw.expect("asked for"), gb.expect("asked for")))
}

/// The gradients flagged in `need` = [gx, gw, gb].
fn conv2d_grads(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    conv: &Conv2d,
    need: [bool; 3],
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let p = params(x, w, conv)?;
    let c_out = p.c_out as usize;
    let y_shape = [p.n as usize, c_out, p.oh as usize, p.ow as usize];
    gy.expect_shape("conv2d_bwd", "gy", &y_shape)?;
    common_device("conv2d_bwd", &[x.device(), w.device(), gy.device()])?;
    let [need_gx, need_gw, need_gb] = need;
    let wino = conv.algo.winograd_tile(&p);
    let (gx, gw, gb) = match (x.storage(), w.storage(), gy.storage()) {
        (Storage::Cpu(xv), Storage::Cpu(wv), Storage::Cpu(gv)) => {
            let (gx, gw) = match wino {
                Some(m) => (
                    need_gx.then(|| winograd::winograd_bwd_input_cpu(wv, gv, &p, m)).transpose()?,
                    need_gw.then(|| winograd::winograd_bwd_weight_cpu(xv, gv, &p, m)).transpose()?,
                ),
                None => (
                    need_gx.then(|| conv2d_bwd_input_cpu(wv, gv, &p)),
                    need_gw.then(|| conv2d_bwd_weight_cpu(xv, gv, &p)),
                ),
            };
            let gb = need_gb.then(|| conv2d_bwd_bias_cpu(gv, &p));
            (gx.map(Storage::Cpu), gw.map(Storage::Cpu), gb.map(Storage::Cpu))
        }
        (Storage::Cuda { gpu, buf: xb }, Storage::Cuda { buf: wb, .. }, Storage::Cuda { buf: gyb, .. }) => {
            let opts = conv.gemm;
            let gx = match (need_gx, wino) {
                (false, _) => None,
                (true, Some(m)) => Some(winograd::winograd_bwd_input_cuda(gpu, (wb, gyb), &p, m, opts)?),
                (true, None) => Some(implicit_gemm::input_grad(gpu, (wb, gyb), &p, opts)?),
            };
            let gw = match (need_gw, wino) {
                (false, _) => None,
                (true, Some(m)) => Some(winograd::winograd_bwd_weight_cuda(gpu, (xb, gyb), &p, m, opts)?),
                (true, None) => Some(implicit_gemm::weight_grad(gpu, (xb, gyb), &p, opts)?),
            };
            let gb = need_gb.then(|| implicit_gemm::bias_grad(gpu, gyb, &p, opts)).transpose()?;
            let wrap = |buf| Storage::Cuda { gpu: gpu.clone(), buf };
            (gx.map(wrap), gw.map(wrap), gb.map(wrap))
        }
        _ => unreachable!("checked by common_device"),
    };
    Ok((
        gx.map(|s| Tensor::from_storage(x.shape().to_vec(), s)),
        gw.map(|s| Tensor::from_storage(w.shape().to_vec(), s)),
        gb.map(|s| Tensor::from_storage(vec![c_out], s)),
    ))
}

/// Recorded conv2d: the forward, and on the tape its backward, which applies the fused ReLU's
/// mask (from the saved output) and then computes only the gradients the tape needs.
pub fn conv2d(tape: &mut Tape, x: &Tensor, w: &Tensor, b: &Tensor, conv: &Conv2d) -> Result<Tensor> {
    let y = conv2d_fwd(x, w, b, conv)?;
    let need = [tape.requires_grad(x), tape.requires_grad(w), tape.requires_grad(b)];
    let ids = [x.id(), w.id(), b.id()];
    let (xs, ws, conv) = (x.clone(), w.clone(), *conv);
    let y_saved = conv.relu.then(|| y.clone());
    tape.record(&y, &[x, w, b], move |gy, grads| {
        let gy = &through_fused_relu(y_saved.as_ref(), gy)?;
        let (gx, gw, gb) = conv2d_grads(&xs, &ws, gy, &conv, need)?;
        for (id, g) in ids.into_iter().zip([gx, gw, gb]) {
            if let Some(g) = g {
                grads.accumulate(id, g)?;
            }
        }
        Ok(())
    });
    Ok(y)
}
