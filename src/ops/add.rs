//! Elementwise `dst += src`: the tape's gradient accumulator.

use crate::device::grid_1d;
use crate::error::{Error, Result};
use crate::ptx::Module;
use crate::tensor::{common_device, Storage, Tensor};

/// CPU reference.
pub fn add_assign_cpu(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

/// `dst += src` in place; both of one shape and device.
pub fn add_assign(dst: &mut Tensor, src: &Tensor) -> Result<()> {
    if dst.shape() != src.shape() {
        return Err(Error::shape(
            "add_assign",
            format!("src of shape {:?}", dst.shape()),
            format!("{:?}", src.shape()),
        ));
    }
    common_device("add_assign", &[dst.device(), src.device()])?;
    let n = src.len() as u64;
    match (dst.storage_mut()?, src.storage()) {
        (Storage::Cpu(d), Storage::Cpu(s)) => add_assign_cpu(d, s),
        (Storage::Cuda { gpu, buf }, Storage::Cuda { buf: s, .. }) => {
            let gpu = gpu.clone();
            crate::launch!(&gpu, Module::Add, "add_assign_f32", grid_1d(n as usize, 256), buf, s, &n)?;
        }
        _ => unreachable!("checked by common_device"),
    }
    Ok(())
}
