//! Fully connected layer y = x . W^T + b (PyTorch `nn.Linear` layout) with an optional fused
//! ReLU. x: (B, IN), w: (OUT, IN), b: (OUT) -> y: (B, OUT).
//!
//! CUDA: three GEMMs on the shared core in `kernels/gemm.cuh` (see the header of kernels/dense.cu).

use crate::device::{grid_1d, DeviceBuf, Gpu};
use crate::error::{Error, Result};
use crate::ops::gemm::cpu::{gemm_abt_acc, gemm_acc, transpose};
use crate::ops::gemm::math::gemm_kernel_names;
use crate::ops::gemm::plan::{split_chunk, Planner};
use crate::ops::gemm::GemmOpts;
use crate::ops::parallel::map_ranges;
use crate::ops::relu::{relu_value, through_fused_relu};
use crate::ptx::Module;
use crate::tape::Tape;
use crate::tensor::{common_device, ReluFact, Storage, Tensor};

/// Kernel parameters; mirrored field for field by `struct DenseParams` in kernels/dense.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenseParams {
    pub batch: u32,
    pub in_f: u32,
    pub out_f: u32,
    /// Forward only: 1 fuses the ReLU (`relu_value`: NaN stays NaN) into the epilogue.
    pub relu: u32,
    /// Forward and input grad: 0 = one pass over K, else the K range of each split (see
    /// kernels/dense.cu).
    pub k_chunk: u32,
}

// SAFETY: #[repr(C)] plain u32 fields, mirrored by the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for DenseParams {}

// ---------------------------------------------------------------------------------------------
// CPU reference (dims: batch, in_f, out_f)
// ---------------------------------------------------------------------------------------------

/// y (B, OUT) = x (B, IN) . w^T + b, then the ReLU (`relu_value`: NaN stays NaN) if `relu`.
/// Rows of x split over the cores; each core's product reads w once (`gemm_abt_acc`).
pub fn dense_fwd_cpu(x: &[f32], w: &[f32], b: &[f32], in_f: usize, out_f: usize, relu: bool) -> Vec<f32> {
    let batch = x.len() / in_f.max(1);
    let parts = map_ranges(batch, |rows| {
        let mut y: Vec<f32> = rows.clone().flat_map(|_| b[..out_f].iter().copied()).collect();
        gemm_abt_acc(rows.len(), out_f, in_f, &x[rows.start * in_f..], w, &mut y);
        if relu {
            y.iter_mut().for_each(|v| *v = relu_value(*v));
        }
        y
    });
    parts.concat()
}

/// gx (B, IN) = gy (B, OUT) . w (OUT, IN): rows of gx split over the cores.
pub fn dense_bwd_input_cpu(w: &[f32], gy: &[f32], in_f: usize, out_f: usize) -> Vec<f32> {
    let batch = gy.len() / out_f.max(1);
    let parts = map_ranges(batch, |rows| {
        let mut gx = vec![0.0f32; rows.len() * in_f];
        gemm_acc(rows.len(), in_f, out_f, &gy[rows.start * out_f..], w, &mut gx);
        gx
    });
    parts.concat()
}

/// gw (OUT, IN) = gy^T (OUT, B) . x (B, IN): rows of gw split over the cores.
pub fn dense_bwd_weight_cpu(x: &[f32], gy: &[f32], in_f: usize, out_f: usize) -> Vec<f32> {
    let batch = gy.len() / out_f.max(1);
    let gy_t = transpose(gy, batch, out_f); // (OUT, B)
    let parts = map_ranges(out_f, |os| {
        let mut gw = vec![0.0f32; os.len() * in_f];
        gemm_acc(os.len(), in_f, batch, &gy_t[os.start * batch..], x, &mut gw);
        gw
    });
    parts.concat()
}

/// gb (OUT) = sum over the batch of gy.
pub fn dense_bwd_bias_cpu(gy: &[f32], out_f: usize) -> Vec<f32> {
    let mut gb = vec![0.0f32; out_f];
    for r in gy.chunks_exact(out_f) {
        gb.iter_mut().zip(r).for_each(|(d, &v)| *d += v);
    }
    gb
}

// ---------------------------------------------------------------------------------------------
// Shape checks and dispatch
// ---------------------------------------------------------------------------------------------

const OP: &str = "dense";

/// Checks x (B, IN) against w (OUT, IN).
fn params(x: &Tensor, w: &Tensor) -> Result<DenseParams> {
    let [batch, in_f] = x.dims2(OP)?;
    let Ok([out_f, w_in]) = <[usize; 2]>::try_from(w.shape()) else {
        return Err(Error::shape(OP, format!("w of shape (OUT, {in_f})"), format!("{:?}", w.shape())));
    };
    if w_in != in_f {
        return Err(Error::shape(
            OP,
            format!("w of shape (OUT, {in_f}) matching x's {in_f} features"),
            format!("{:?}", w.shape()),
        ));
    }
    if batch == 0 || in_f == 0 || out_f == 0 {
        return Err(Error::shape(OP, "non-zero dims (B, IN, OUT)", format!("({batch}, {in_f}, {out_f})")));
    }
    let biggest = (batch * in_f).max(batch * out_f).max(out_f * in_f);
    if biggest >= 1 << 31 {
        return Err(Error::TooLarge(format!("dense: a tensor of {biggest} elements exceeds the kernels' 2^31 limit")));
    }
    Ok(DenseParams { batch: batch as u32, in_f: in_f as u32, out_f: out_f as u32, relu: 0, k_chunk: 0 })
}

/// C (m x n) = A . B over k on `gpu`, with the `kernels` (a `gemm_kernel_names!` table) taking
/// (in0, in1, out, params): split over K when the grid would leave the GPU's first wave (2
/// blocks per SM) under-filled, then reduced (adding `bias` and applying p.relu) by
/// dense_splitk_sum_f32.
#[allow(clippy::too_many_arguments)]
fn gemm_split(
    gpu: &Gpu,
    opts: GemmOpts,
    kernels: &[[&'static str; 5]; 4],
    in0: &DeviceBuf<f32>,
    in1: &DeviceBuf<f32>,
    bias: Option<&DeviceBuf<f32>>,
    mut p: DenseParams,
    (m, n, k): (usize, usize, usize),
) -> Result<DeviceBuf<f32>> {
    let plan = Planner::new(gpu, opts);
    let (mut cfg, tile) = plan.launch(m, n, 1, None)?;
    let name = opts.math.kernel(kernels, tile);
    let blocks = (cfg.grid_dim.0 * cfg.grid_dim.1) as usize;
    // ~2 blocks per SM, each split summing at least 256 terms.
    let splits = if blocks >= plan.wave() || k < 1024 { 1 } else { plan.split_count(blocks, k / 256) };
    let mut out = gpu.uninit::<f32>(m * n)?;
    if splits == 1 {
        p.k_chunk = 0;
        if let Some(b) = bias {
            crate::launch!(gpu, Module::Dense, name, cfg, in0, in1, b, &mut out, &p)?;
        } else {
            crate::launch!(gpu, Module::Dense, name, cfg, in0, in1, &mut out, &p)?;
        }
        return Ok(out);
    }
    let (splits, chunk) = split_chunk(k, splits);
    p.k_chunk = chunk as u32;
    cfg.grid_dim.2 = splits as u32;
    let mut ws = gpu.uninit::<f32>(splits * m * n)?;
    let has_bias = bias.is_some() as u32;
    if let Some(b) = bias {
        crate::launch!(gpu, Module::Dense, name, cfg, in0, in1, b, &mut ws, &p)?;
    } else {
        crate::launch!(gpu, Module::Dense, name, cfg, in0, in1, &mut ws, &p)?;
    }
    let b = bias.unwrap_or(&ws); // any valid buffer when there is no bias: it is not read
    let (rows, cols, nsplit) = (m as u32, n as u32, splits as u32);
    let reduce = grid_1d(m * n, 256);
    crate::launch!(
        gpu,
        Module::Dense,
        "dense_splitk_sum_f32",
        reduce,
        &ws,
        &mut out,
        b,
        &rows,
        &cols,
        &nsplit,
        &has_bias,
        &p
    )?;
    Ok(out)
}

/// Forward: x (B, IN), w (OUT, IN), b (OUT) -> (B, OUT); `relu` fuses the ReLU
/// (`ops::relu::relu_value`). `opts`: how the GEMM runs on CUDA (the CPU computes in fp32).
pub fn dense_fwd(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool, opts: GemmOpts) -> Result<Tensor> {
    let mut p = params(x, w)?;
    let (batch, in_f, out_f) = (p.batch as usize, p.in_f as usize, p.out_f as usize);
    b.expect_shape(OP, "b", &[out_f])?;
    common_device(OP, &[x.device(), w.device(), b.device()])?;
    p.relu = relu as u32;
    let storage = match (x.storage(), w.storage(), b.storage()) {
        (Storage::Cpu(xv), Storage::Cpu(wv), Storage::Cpu(bv)) => {
            Storage::Cpu(dense_fwd_cpu(xv, wv, bv, in_f, out_f, relu))
        }
        (Storage::Cuda { gpu, buf: xb }, Storage::Cuda { buf: wb, .. }, Storage::Cuda { buf: bb, .. }) => {
            let y = gemm_split(gpu, opts, &gemm_kernel_names!("dense_fwd"), xb, wb, Some(bb), p, (batch, out_f, in_f))?;
            Storage::Cuda { gpu: gpu.clone(), buf: y }
        }
        _ => unreachable!("checked by common_device"),
    };
    Ok(Tensor::from_storage(vec![batch, out_f], storage).with_relu_fact(ReluFact::output_if(relu)))
}

/// Gradients given gy = dL/dy (B, OUT) of the pre-ReLU output. Returns (gx if `need_gx`,
/// gw (OUT, IN), gb (OUT)).
pub fn dense_bwd(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    need_gx: bool,
    opts: GemmOpts,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let (gx, gw, gb) = dense_grads(x, w, gy, [need_gx, true, true], opts)?;
    Ok((gx, gw.expect("asked for"), gb.expect("asked for")))
}

/// The gradients flagged in `need` = [gx, gw, gb].
fn dense_grads(
    x: &Tensor,
    w: &Tensor,
    gy: &Tensor,
    need: [bool; 3],
    opts: GemmOpts,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let p = params(x, w)?;
    let (batch, in_f, out_f) = (p.batch as usize, p.in_f as usize, p.out_f as usize);
    gy.expect_shape("dense_bwd", "gy", &[batch, out_f])?;
    common_device("dense_bwd", &[x.device(), w.device(), gy.device()])?;
    let [need_gx, need_gw, need_gb] = need;
    let (gx, gw, gb) = match (x.storage(), w.storage(), gy.storage()) {
        (Storage::Cpu(xv), Storage::Cpu(wv), Storage::Cpu(gv)) => (
            need_gx.then(|| Storage::Cpu(dense_bwd_input_cpu(wv, gv, in_f, out_f))),
            need_gw.then(|| Storage::Cpu(dense_bwd_weight_cpu(xv, gv, in_f, out_f))),
            need_gb.then(|| Storage::Cpu(dense_bwd_bias_cpu(gv, out_f))),
        ),
        (Storage::Cuda { gpu, buf: xb }, Storage::Cuda { buf: wb, .. }, Storage::Cuda { buf: gyb, .. }) => {
            let wrap = |buf| Storage::Cuda { gpu: gpu.clone(), buf };
            let gx = if need_gx {
                let p = DenseParams { relu: 0, ..p };
                let names = gemm_kernel_names!("dense_bwd_input");
                Some(wrap(gemm_split(gpu, opts, &names, wb, gyb, None, p, (batch, in_f, out_f))?))
            } else {
                None
            };
            let gw = if need_gw {
                let mut gw = gpu.uninit::<f32>(out_f * in_f)?;
                let (cfg, tile) = Planner::new(gpu, opts).launch(out_f, in_f, 1, None)?;
                let name = opts.math.kernel(&gemm_kernel_names!("dense_bwd_weight"), tile);
                crate::launch!(gpu, Module::Dense, name, cfg, xb, gyb, &mut gw, &p)?;
                Some(wrap(gw))
            } else {
                None
            };
            let gbias = if need_gb {
                let mut g = gpu.uninit::<f32>(out_f)?;
                crate::launch!(gpu, Module::Dense, "dense_bwd_bias_f32", grid_1d(out_f, 256), gyb, &mut g, &p)?;
                Some(wrap(g))
            } else {
                None
            };
            (gx, gw, gbias)
        }
        _ => unreachable!("checked by common_device"),
    };
    Ok((
        gx.map(|s| Tensor::from_storage(vec![batch, in_f], s)),
        gw.map(|s| Tensor::from_storage(vec![out_f, in_f], s)),
        gb.map(|s| Tensor::from_storage(vec![out_f], s)),
    ))
}

/// Recorded dense layer (+ fused ReLU when `relu`). The backward applies the ReLU mask (from the
/// saved output) and then computes only the gradients the tape needs, with the same `opts`.
pub fn dense(tape: &mut Tape, x: &Tensor, w: &Tensor, b: &Tensor, relu: bool, opts: GemmOpts) -> Result<Tensor> {
    let y = dense_fwd(x, w, b, relu, opts)?;
    let need = [tape.requires_grad(x), tape.requires_grad(w), tape.requires_grad(b)];
    let ids = [x.id(), w.id(), b.id()];
    let (xs, ws) = (x.clone(), w.clone());
    let y_saved = relu.then(|| y.clone());
    tape.record(&y, &[x, w, b], move |gy, grads| {
        let gy = &through_fused_relu(y_saved.as_ref(), gy)?;
        let (gx, gw, gb) = dense_grads(&xs, &ws, gy, need, opts)?;
        for (id, g) in ids.into_iter().zip([gx, gw, gb]) {
            if let Some(g) = g {
                grads.accumulate(id, g)?;
            }
        }
        Ok(())
    });
    Ok(y)
}
