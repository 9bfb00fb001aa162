//! Recorded reshape (Flatten): the same elements in the same row-major order under a new shape.
//! The backward reshapes the output gradient back to the input's shape.

use crate::error::{Error, Result};
use crate::tape::Tape;
use crate::tensor::{Storage, Tensor};

/// The same data as `x` under `shape` (same element count), as a new tensor (fresh id) so that
/// the tape tells input and output apart.
///
/// The data is copied (host: a Vec clone; GPU: one device-to-device copy), because `Tensor`
/// offers no way to share storage under a fresh id yet. For AlexNet this is (128, 256*5*5) floats,
/// a 3 MB copy per step: negligible.
pub fn reshaped(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if shape.iter().product::<usize>() != x.len() {
        return Err(Error::shape(
            "reshape",
            format!("a shape of {} elements (input {:?})", x.len(), x.shape()),
            format!("{shape:?}"),
        ));
    }
    let storage = match x.storage() {
        Storage::Cpu(v) => Storage::Cpu(v.clone()),
        Storage::Cuda { gpu, buf } => Storage::Cuda { gpu: gpu.clone(), buf: gpu.duplicate(buf)? },
    };
    Ok(Tensor::from_storage(shape.to_vec(), storage))
}

/// Recorded reshape: y = x viewed as `shape`; gx = gy viewed as x's shape.
pub fn reshape(tape: &mut Tape, x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let y = reshaped(x, shape)?;
    let (x_id, x_shape) = (x.id(), x.shape().to_vec());
    // The gradient needs no copy: it is stored under x's id, so sharing gy's storage (a `view`,
    // which keeps gy's id) is fine; the tape drops gy once this closure returns, so a later
    // in-place accumulation into x's gradient finds the storage unshared.
    tape.record(&y, &[x], move |gy, grads| grads.accumulate(x_id, gy.view(&x_shape)?));
    Ok(y)
}
