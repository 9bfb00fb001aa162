//! Plain SGD: `param -= lr * grad`, in place on the parameter's own storage.

use crate::device::grid_1d;
use crate::error::{Error, Result};
use crate::ptx::Module;
use crate::tensor::{common_device, Storage, Tensor};

/// CPU reference. `p - lr * g` is computed as one product and one subtraction, as the kernel
/// does (NVRTC may fuse it into an FMA: results can then differ by one rounding).
pub fn sgd_update_cpu(param: &mut [f32], grad: &[f32], lr: f32) {
    param.iter_mut().zip(grad).for_each(|(p, &g)| *p -= lr * g);
}

/// `param -= lr * grad`; both of one shape and device. Fails if `param` is shared (a tape
/// still holds a clone of it): drop the tape before updating.
pub fn sgd_update(param: &mut Tensor, grad: &Tensor, lr: f32) -> Result<()> {
    if param.shape() != grad.shape() {
        return Err(Error::shape(
            "sgd_update",
            format!("grad of the param's shape {:?}", param.shape()),
            format!("{:?}", grad.shape()),
        ));
    }
    if !lr.is_finite() {
        return Err(Error::Invalid(format!("sgd_update: the learning rate must be finite, found {lr}")));
    }
    common_device("sgd_update", &[param.device(), grad.device()])?;
    let n = grad.len() as u64;
    match (param.storage_mut()?, grad.storage()) {
        (Storage::Cpu(p), Storage::Cpu(g)) => sgd_update_cpu(p, g, lr),
        (Storage::Cuda { gpu, buf }, Storage::Cuda { buf: g, .. }) => {
            let gpu = gpu.clone();
            // One thread per group of 4 elements (see kernels/sgd.cu).
            let cfg = grid_1d((n as usize).div_ceil(4), 256);
            crate::launch!(&gpu, Module::Sgd, "sgd_update_f32", cfg, buf, g, &lr, &n)?;
        }
        _ => unreachable!("checked by common_device"),
    }
    Ok(())
}
