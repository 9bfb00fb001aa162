//! The logistic sigmoid, y = 1 / (1 + exp(-x)), as `torch.sigmoid`: stable for every x (no
//! overflow for large |x|, 0 and 1 at -inf and +inf), NaN propagated. The backward, from the
//! saved output, is gx = gy * (1 - y) * y (see kernels/sigmoid.cu).

use crate::device::grid_1d;
use crate::error::Result;
use crate::ops::parallel::map_elementwise;
use crate::ptx::Module;
use crate::tape::Tape;
use crate::tensor::{common_device, Storage, Tensor};

/// The sigmoid of one value as the kernel computes it (`sigmoid_f32` in kernels/sigmoid.cu):
/// e = exp(-|x|) never overflows, and 1 / (1 + e) for x >= 0, e / (1 + e) below (the same value
/// where both are finite). +inf gives 1, -inf gives 0, NaN stays NaN.
#[inline]
pub fn sigmoid_value(x: f32) -> f32 {
    let e = (-x.abs()).exp();
    let d = 1.0 + e;
    (if x >= 0.0 { 1.0 } else { e }) / d
}

/// The sigmoid's gradient at output `y` times `gy`, in PyTorch's order: gy * (1 - y) * y.
#[inline]
pub fn sigmoid_grad_value(y: f32, gy: f32) -> f32 {
    gy * (1.0 - y) * y
}

/// CPU reference, forward.
pub fn sigmoid_fwd_cpu(x: &[f32]) -> Vec<f32> {
    map_elementwise(x.len(), |i| sigmoid_value(x[i]))
}

/// CPU reference, backward: gx = gy * (1 - y) * y from the forward output y.
pub fn sigmoid_bwd_cpu(y: &[f32], gy: &[f32]) -> Vec<f32> {
    map_elementwise(y.len().min(gy.len()), |i| sigmoid_grad_value(y[i], gy[i]))
}

/// y = sigmoid(x), any shape.
pub fn sigmoid_fwd(x: &Tensor) -> Result<Tensor> {
    let n = x.len() as u64;
    let storage = match x.storage() {
        Storage::Cpu(v) => Storage::Cpu(sigmoid_fwd_cpu(v)),
        Storage::Cuda { gpu, buf } => {
            let mut y = gpu.uninit::<f32>(x.len())?;
            crate::launch!(gpu, Module::Sigmoid, "sigmoid_fwd_f32", grid_1d(x.len(), 256), buf, &mut y, &n)?;
            Storage::Cuda { gpu: gpu.clone(), buf: y }
        }
    };
    Ok(Tensor::from_storage(x.shape().to_vec(), storage))
}

/// gx from the forward output `y` and the output gradient `gy` (both of y's shape).
pub fn sigmoid_bwd(y: &Tensor, gy: &Tensor) -> Result<Tensor> {
    gy.expect_shape("sigmoid_bwd", "gy", y.shape())?;
    common_device("sigmoid_bwd", &[y.device(), gy.device()])?;
    let n = y.len() as u64;
    let storage = match (y.storage(), gy.storage()) {
        (Storage::Cpu(y), Storage::Cpu(g)) => Storage::Cpu(sigmoid_bwd_cpu(y, g)),
        (Storage::Cuda { gpu, buf: yb }, Storage::Cuda { buf: gb, .. }) => {
            let mut gx = gpu.uninit::<f32>(y.len())?;
            crate::launch!(gpu, Module::Sigmoid, "sigmoid_bwd_f32", grid_1d(y.len(), 256), yb, gb, &mut gx, &n)?;
            Storage::Cuda { gpu: gpu.clone(), buf: gx }
        }
        _ => unreachable!("checked by common_device"),
    };
    Ok(Tensor::from_storage(y.shape().to_vec(), storage))
}

/// Recorded sigmoid. The tape keeps the output y (the backward needs nothing else), not x.
pub fn sigmoid(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    let y = sigmoid_fwd(x)?;
    let (x_id, y_saved) = (x.id(), y.clone());
    tape.record(&y, &[x], move |gy, grads| grads.accumulate(x_id, sigmoid_bwd(&y_saved, gy)?));
    Ok(y)
}
