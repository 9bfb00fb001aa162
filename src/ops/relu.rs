//! ReLU, y = max(x, 0), with NaN propagated as PyTorch does (`relu_value`); the backward, from
//! the saved output, zeroes the gradient where y <= 0 and passes it elsewhere, a NaN output
//! included (`relu_passes_grad`; see kernels/relu.cu).
//!
//! Its output is marked `ReluFact::Output` (so are the outputs of conv and linear layers with a
//! fused ReLU). A consumer that can zero its input gradient wherever the ReLU's gradient is zero,
//! at no cost of its own, does so and marks that gradient `ReluFact::MaskedFor(y)`: max-pool
//! (`ops::maxpool2d`), whose windows with a maximum <= 0 then route no gradient. The ReLU's
//! backward passes such a gradient through instead of masking it again (`through_fused_relu`),
//! which saves a pass that reads y and gy and writes gx: for AlexNet's three pooled convolutions,
//! 63M elements, 0.75 GB of traffic per training step at batch 128.

use crate::device::grid_1d;
use crate::error::Result;
use crate::ops::parallel::map_elementwise;
use crate::ptx::Module;
use crate::tape::Tape;
use crate::tensor::{common_device, ReluFact, Storage, Tensor};

/// ReLU of one value as PyTorch computes it, for every CPU reference that applies one (this op
/// and the fused ReLUs of conv2d, winograd and dense): NaN stays NaN (`f32::max` would give 0 and
/// hide a diverged run), v > 0 (+inf too) stays v, anything else (-0.0 included) gives +0.0. The
/// kernels' `relu_f32` (kernels/common.cuh), bit for bit.
#[inline]
pub fn relu_value(v: f32) -> f32 {
    if v > 0.0 || v.is_nan() {
        v
    } else {
        0.0
    }
}

/// Whether the ReLU whose output is `y` passes its gradient: PyTorch's threshold_backward, zero
/// where y <= 0 and the gradient elsewhere, so a NaN output passes it. Max-pool's mask after a
/// ReLU (`ops::maxpool2d`) uses the same test. The kernels' `relu_passes_grad`.
#[inline]
pub fn relu_passes_grad(y: f32) -> bool {
    y > 0.0 || y.is_nan()
}

/// CPU reference, forward.
pub fn relu_fwd_cpu(x: &[f32]) -> Vec<f32> {
    map_elementwise(x.len(), |i| relu_value(x[i]))
}

/// CPU reference, backward: gx = gy where the output y passes it (`relu_passes_grad`), else 0.
pub fn relu_bwd_cpu(y: &[f32], gy: &[f32]) -> Vec<f32> {
    map_elementwise(y.len().min(gy.len()), |i| if relu_passes_grad(y[i]) { gy[i] } else { 0.0 })
}

/// y = relu(x), any shape; y is marked `ReluFact::Output`.
pub fn relu_fwd(x: &Tensor) -> Result<Tensor> {
    let n = x.len() as u64;
    let storage = match x.storage() {
        Storage::Cpu(v) => Storage::Cpu(relu_fwd_cpu(v)),
        Storage::Cuda { gpu, buf } => {
            let mut y = gpu.uninit::<f32>(x.len())?;
            crate::launch!(gpu, Module::Relu, "relu_fwd_f32", grid_1d(x.len(), 256), buf, &mut y, &n)?;
            Storage::Cuda { gpu: gpu.clone(), buf: y }
        }
    };
    Ok(Tensor::from_storage(x.shape().to_vec(), storage).with_relu_fact(ReluFact::Output))
}

/// gx from the forward output `y` and the output gradient `gy`.
pub fn relu_bwd(y: &Tensor, gy: &Tensor) -> Result<Tensor> {
    gy.expect_shape("relu_bwd", "gy", y.shape())?;
    common_device("relu_bwd", &[y.device(), gy.device()])?;
    let n = y.len() as u64;
    let storage = match (y.storage(), gy.storage()) {
        (Storage::Cpu(y), Storage::Cpu(g)) => Storage::Cpu(relu_bwd_cpu(y, g)),
        (Storage::Cuda { gpu, buf: yb }, Storage::Cuda { buf: gb, .. }) => {
            let mut gx = gpu.uninit::<f32>(y.len())?;
            crate::launch!(gpu, Module::Relu, "relu_bwd_f32", grid_1d(y.len(), 256), yb, gb, &mut gx, &n)?;
            Storage::Cuda { gpu: gpu.clone(), buf: gx }
        }
        _ => unreachable!("checked by common_device"),
    };
    Ok(Tensor::from_storage(y.shape().to_vec(), storage))
}

/// The gradient entering a layer whose ReLU ran fused inside its kernel: `gy` masked by the
/// saved output `y`; `gy` itself (a cheap shared clone) when the layer had no ReLU, or when a
/// consumer of `y` has already masked it (`ReluFact::MaskedFor(y)`, see the module comment).
pub fn through_fused_relu(y: Option<&Tensor>, gy: &Tensor) -> Result<Tensor> {
    match y {
        Some(y) if gy.relu_fact() != ReluFact::MaskedFor(y.id()) => relu_bwd(y, gy),
        _ => Ok(gy.clone()),
    }
}

/// Recorded ReLU.
pub fn relu(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    let y = relu_fwd(x)?;
    let (x_id, y_saved) = (x.id(), y.clone());
    tape.record(&y, &[x], move |gy, grads| grads.accumulate(x_id, through_fused_relu(Some(&y_saved), gy)?));
    Ok(y)
}
