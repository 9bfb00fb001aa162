//! The autograd tape.
//!
//! Ops record, as they run forward, a closure that maps the gradient of their output to the
//! gradients of their inputs. `Tape::backward` runs those closures in reverse order.
//!
//! Gradient convention (the one place it is stated): gradients **accumulate**. When a tensor
//! feeds several ops, each backward closure adds (`+=`) its contribution into that tensor's
//! entry in `Gradients`; nothing is overwritten. Parameters are ordinary tensors that were
//! `watch`ed: after `backward`, `Gradients` holds dL/dθ for each of them, and the optimiser
//! reads it from there. A tape lives for one step and is then dropped, together with the
//! activations its closures hold, so memory does not grow over an epoch.
//!
//! A tape made with `Tape::eval()` records nothing and tells ops that they run in inference
//! mode (dropout is then the identity).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::tensor::{ReluFact, Tensor, TensorId};

/// Maps the gradient of an op's output to gradients of its inputs (added into `Gradients`).
type BackwardFn = Box<dyn FnOnce(&Tensor, &mut Gradients) -> Result<()>>;

pub struct Tape {
    training: bool,
    /// Tensors whose gradient is wanted: watched parameters and everything computed from them.
    tracked: HashSet<TensorId>,
    /// (output id, backward closure), in forward order.
    nodes: Vec<(TensorId, BackwardFn)>,
}

impl Default for Tape {
    fn default() -> Self {
        Self::train()
    }
}

impl Tape {
    /// A recording tape: training mode.
    pub fn train() -> Self {
        Tape { training: true, tracked: HashSet::new(), nodes: Vec::new() }
    }

    /// A tape that records nothing: inference mode (no gradients, dropout off).
    pub fn eval() -> Self {
        Tape { training: false, tracked: HashSet::new(), nodes: Vec::new() }
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Asks for the gradient of `t` (a parameter).
    pub fn watch(&mut self, t: &Tensor) {
        if self.training {
            self.tracked.insert(t.id());
        }
    }

    /// Whether a gradient must flow to `t`.
    pub fn requires_grad(&self, t: &Tensor) -> bool {
        self.training && self.tracked.contains(&t.id())
    }

    /// Records `backward` for `output`, if any of `inputs` needs a gradient. The closure gets
    /// dL/d(output) and adds the inputs' gradients into `Gradients` (ask `requires_grad` at
    /// record time which ones are needed).
    pub fn record(
        &mut self,
        output: &Tensor,
        inputs: &[&Tensor],
        backward: impl FnOnce(&Tensor, &mut Gradients) -> Result<()> + 'static,
    ) {
        if inputs.iter().any(|t| self.requires_grad(t)) {
            self.tracked.insert(output.id());
            self.nodes.push((output.id(), Box::new(backward)));
        }
    }

    /// Number of recorded ops.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Back-propagates from the scalar `loss` (dL/dL = 1) and returns the gradients of every
    /// watched tensor. Consumes the tape: its closures and the activations they hold are freed
    /// as they run.
    pub fn backward(self, loss: &Tensor) -> Result<Gradients> {
        if loss.len() != 1 {
            return Err(Error::shape("backward", "a scalar loss (1 element)", format!("shape {:?}", loss.shape())));
        }
        let mut grads = Gradients::default();
        if !self.tracked.contains(&loss.id()) {
            return Ok(grads);
        }
        grads.map.insert(loss.id(), Tensor::full(loss.shape(), 1.0, &loss.device())?);
        for (out, backward) in self.nodes.into_iter().rev() {
            // An output no one used downstream has no gradient: nothing flows back from it.
            if let Some(gy) = grads.map.remove(&out) {
                backward(&gy, &mut grads)?;
            }
        }
        Ok(grads)
    }
}

/// Gradients by tensor id.
#[derive(Default)]
pub struct Gradients {
    map: HashMap<TensorId, Tensor>,
}

impl Gradients {
    /// Adds `g` into the gradient of tensor `id` (see the convention above). A sum keeps a
    /// `ReluFact` only where both terms have it (a masked term plus an unmasked one is unmasked).
    pub fn accumulate(&mut self, id: TensorId, g: Tensor) -> Result<()> {
        match self.map.entry(id) {
            Entry::Vacant(v) => {
                v.insert(g);
                Ok(())
            }
            Entry::Occupied(mut o) => {
                let sum = o.get_mut();
                let fact = if sum.relu_fact() == g.relu_fact() { g.relu_fact() } else { ReluFact::None };
                // A gradient an op passed on as it came (the residual sum hands gy to both its
                // inputs) shares its data with another entry: the sum goes to a copy of its own.
                if sum.is_shared() {
                    *sum = sum.to_device(&sum.device())?;
                }
                sum.add_assign(&g)?;
                sum.set_relu_fact(fact);
                Ok(())
            }
        }
    }

    /// dL/dt, if one was computed.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.map.get(&t.id())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
