//! The residual sum y = a + b (ResNet's shortcut), elementwise over two tensors of one shape.
//! Its backward hands gy to both inputs unchanged; when a tensor feeds the sum and another op (a
//! residual block's input feeds its first convolution and the shortcut), the tape adds the two
//! gradients (`Gradients::accumulate`). The in-place `dst += src` the tape does that with is
//! `Tensor::add_assign`, in the same kernel file (kernels/add.cu).

use crate::device::grid_1d;
use crate::error::{Error, Result};
use crate::ops::parallel::map_elementwise;
use crate::ptx::Module;
use crate::tape::Tape;
use crate::tensor::{common_device, Storage, Tensor};

/// CPU reference: a + b, one IEEE f32 addition per element (the kernel's, bit for bit).
pub fn add_cpu(a: &[f32], b: &[f32]) -> Vec<f32> {
    map_elementwise(a.len().min(b.len()), |i| a[i] + b[i])
}

/// y = a + b: a and b of one shape and device.
pub fn add_fwd(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        return Err(Error::shape("add", format!("b of a's shape {:?}", a.shape()), format!("{:?}", b.shape())));
    }
    common_device("add", &[a.device(), b.device()])?;
    let n = a.len() as u64;
    let storage = match (a.storage(), b.storage()) {
        (Storage::Cpu(a), Storage::Cpu(b)) => Storage::Cpu(add_cpu(a, b)),
        (Storage::Cuda { gpu, buf: ab }, Storage::Cuda { buf: bb, .. }) => {
            let mut y = gpu.uninit::<f32>(a.len())?;
            crate::launch!(gpu, Module::Add, "add_f32", grid_1d(a.len(), 256), ab, bb, &mut y, &n)?;
            Storage::Cuda { gpu: gpu.clone(), buf: y }
        }
        _ => unreachable!("checked by common_device"),
    };
    Ok(Tensor::from_storage(a.shape().to_vec(), storage))
}

/// Recorded sum: dL/da = dL/db = dL/dy. Each input that needs a gradient gets gy itself (a
/// shared clone, no copy); `a` and `b` may be the same tensor (its gradient is then 2 gy).
pub fn add(tape: &mut Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let y = add_fwd(a, b)?;
    let (a_id, b_id) = (a.id(), b.id());
    let (ga, gb) = (tape.requires_grad(a), tape.requires_grad(b));
    tape.record(&y, &[a, b], move |gy, grads| {
        if ga {
            grads.accumulate(a_id, gy.clone())?;
        }
        if gb {
            grads.accumulate(b_id, gy.clone())?;
        }
        Ok(())
    });
    Ok(y)
}
