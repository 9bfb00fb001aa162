//! Networks built from the ops: the layer tables (`network`, `models`), the model that runs one
//! (`model`), the per-layer choice of convolution algorithm (`conv_tune`), and the SGD step.

pub mod conv_tune;
pub mod model;
pub mod models;
pub mod network;
pub mod saved;

use crate::error::{Error, Result};
use crate::ops::conv2d::ConvAlgo;
use crate::ops::gemm::GemmOpts;
use crate::ops::sgd::sgd_update;
use crate::tape::Gradients;
use crate::tensor::Tensor;

/// How a model runs its GEMM-based layers: the GEMM options (arithmetic, tiles) of every conv
/// and dense layer, and the convolution algorithm. One value, held by the model and handed to
/// each op it runs; nothing about it lives in global or thread-local state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Compute {
    pub gemm: GemmOpts,
    pub conv: ConvAlgo,
}

/// A trainable tensor and its name in PyTorch's `state_dict` (e.g. `0.weight`).
pub struct Param {
    pub name: String,
    pub value: Tensor,
}

/// Plain minibatch SGD: θ ← θ − lr·∂L/∂θ for every parameter (no momentum, no weight decay,
/// as in the d2l book's `train_ch6`).
pub fn sgd_step(params: &mut [Param], grads: &Gradients, lr: f32) -> Result<()> {
    for p in params {
        let g = grads
            .get(&p.value)
            .ok_or_else(|| Error::Internal(format!("no gradient was computed for parameter `{}`", p.name)))?;
        sgd_update(&mut p.value, g, lr)?;
    }
    Ok(())
}
