//! Recorded reshape (Flatten): the same elements in the same row-major order under a new shape.
//! The backward reshapes the output gradient back to the input's shape.

use crate::error::Result;
use crate::tape::Tape;
use crate::tensor::Tensor;

/// Recorded reshape: y = x viewed as `shape`; gx = gy viewed as x's shape.
pub fn reshape(tape: &mut Tape, x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    // Shares x's storage under a fresh id (no copy).
    let y = x.reshaped(shape)?;
    let (x_id, x_shape) = (x.id(), x.shape().to_vec());
    // The gradient needs no copy: it is stored under x's id, so sharing gy's storage (a `view`,
    // which keeps gy's id) is fine; the tape drops gy once this closure returns, so a later
    // in-place accumulation into x's gradient finds the storage unshared.
    tape.record(&y, &[x], move |gy, grads| grads.accumulate(x_id, gy.view(&x_shape)?));
    Ok(y)
}
