//! A network's parameters and how it runs: `Model` holds a `Network` (the layer table), its
//! parameters under their `state_dict` names, batch norm's running statistics (state that is
//! not a parameter: the forward pass updates it in training, SGD does not touch it), and the
//! `Compute` it runs its GEMMs and convolutions with. The forward pass walks the table's leaves,
//! recording each op on the tape; a ReLU right after a conv or linear layer runs inside that
//! layer's kernel.

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::checkpoint::{NamedTensor, Values};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::conv_tune::{self, LayerTuning};
use crate::nn::network::{Layer, Network, Source, StateKind};
use crate::nn::{Compute, Param};
use crate::ops::adaptive_avgpool2d::global_avgpool2d;
use crate::ops::add::add;
use crate::ops::avgpool2d::{avgpool2d, AvgPool2d};
use crate::ops::batchnorm2d::{batchnorm2d, update_running, BatchStats, BN_MOMENTUM};
use crate::ops::concat::concat_channels;
use crate::ops::conv2d::{conv2d, winograd_tiles, Conv2d, ConvAlgo};
use crate::ops::sigmoid::sigmoid;
use crate::ops::{dense::dense, dropout::dropout, maxpool2d::maxpool2d, relu::relu, reshape::reshape};
use crate::tape::Tape;
use crate::tensor::Tensor;

pub struct Model {
    pub net: &'static Network,
    /// Input height and width (the network works from `net.min_resolution()` up).
    pub resolution: usize,
    /// In state_dict order (`Network::param_shapes`).
    pub params: Vec<Param>,
    /// One per batch-norm layer, in state_dict order.
    pub running: Vec<RunningStats>,
    /// How the GEMMs and convolutions run (a runtime choice, not saved in checkpoints; set
    /// with `with_compute`).
    compute: Compute,
    /// With `compute.conv` Auto: each conv layer's (index in `net.leaves()`) measured choice,
    /// filled by `tune_convs`.
    conv_tuned: Vec<(usize, ConvAlgo)>,
}

/// A batch-norm layer's buffers, PyTorch's `running_mean`, `running_var` (C) and
/// `num_batches_tracked` under `<path>.`: what evaluation normalises with.
pub struct RunningStats {
    /// The layer's `state_dict` prefix (`0.1`, `1.0.bn1`).
    pub path: String,
    pub mean: Tensor,
    pub var: Tensor,
    /// Training batches seen (PyTorch counts it; with a fixed momentum it changes nothing else).
    pub batches: i64,
}

impl RunningStats {
    /// PyTorch's start: mean 0, variance 1, no batches.
    fn fresh(path: &str, c: usize, device: &Device) -> Result<Self> {
        let (mean, var) = (Tensor::zeros(&[c], device)?, Tensor::full(&[c], 1.0, device)?);
        Ok(RunningStats { path: path.to_string(), mean, var, batches: 0 })
    }
}

/// The prefix of a batch norm's `state_dict` entry `<path>.running_mean` (and the other two).
fn bn_path(name: &str) -> Option<&str> {
    name.strip_suffix(".running_mean")
}

impl Model {
    /// Xavier-uniform weights (bound sqrt(6 / (fan_in + fan_out)), as torch's
    /// `xavier_uniform_`), zero biases, drawn from a generator seeded with `seed`; batch norm
    /// as PyTorch starts it (gamma 1, beta 0, running mean 0 and variance 1).
    pub fn new(net: &'static Network, resolution: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = Vec::new();
        let mut running = Vec::new();
        for entry in net.state_shapes(resolution)? {
            let (name, shape) = (entry.name, entry.shape);
            if entry.kind != StateKind::Param {
                if let Some(path) = bn_path(&name) {
                    running.push(RunningStats::fresh(path, shape[0], device)?);
                }
                continue;
            }
            let n = crate::nn::network::elements(&shape)?;
            let data = if shape.len() == 1 {
                // Biases 0; batch norm's weight (gamma, the only 1-D weight) 1.
                vec![if name.ends_with(".weight") { 1.0 } else { 0.0 }; n]
            } else {
                // fan_in = in * receptive field, fan_out = out * receptive field.
                let receptive: usize = shape[2..].iter().product();
                let (fan_in, fan_out) = (shape[1] * receptive, shape[0] * receptive);
                let bound = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            params.push(Param { name, value: Tensor::from_vec(&shape, data, device)? });
        }
        Ok(Model { net, resolution, params, running, compute: Compute::default(), conv_tuned: Vec::new() })
    }

    /// Builds the model from named tensors (a checkpoint), checking every name, shape and dtype
    /// (f32, and int64 for `num_batches_tracked`).
    pub fn from_named(
        net: &'static Network,
        resolution: usize,
        named: Vec<NamedTensor>,
        device: &Device,
    ) -> Result<Self> {
        let mut by_name: std::collections::HashMap<String, (Vec<usize>, Values)> =
            named.into_iter().map(|t| (t.name, (t.shape, t.data))).collect();
        let title = net.title;
        let mut params = Vec::new();
        let mut running: Vec<RunningStats> = Vec::new();
        for entry in net.state_shapes(resolution)? {
            let (name, shape) = (entry.name, entry.shape);
            let (found_shape, data) = by_name.remove(&name).ok_or_else(|| {
                Error::Checkpoint(format!(
                    "checkpoint has no tensor `{name}` (expected {title} at {resolution}x{resolution})"
                ))
            })?;
            if found_shape != shape {
                return Err(Error::Checkpoint(format!(
                    "checkpoint tensor `{name}`: expected shape {shape:?} ({title} at {resolution}x{resolution}), found {found_shape:?}"
                )));
            }
            let dtype_error = |want: &str| {
                let found = if matches!(data, Values::F32(_)) { "F32" } else { "I64" };
                Error::Checkpoint(format!("checkpoint tensor `{name}`: expected dtype {want}, found {found}"))
            };
            match (entry.kind, &data) {
                (StateKind::Count, Values::I64(v)) => {
                    // `<path>.num_batches_tracked`, after its layer's running_mean and _var.
                    let stats =
                        running.last_mut().ok_or_else(|| Error::Internal(format!("`{name}` before its layer")))?;
                    stats.batches = v[0];
                }
                (StateKind::Count, _) => return Err(dtype_error("I64")),
                (_, Values::I64(_)) => return Err(dtype_error("F32")),
                (StateKind::Param, Values::F32(v)) => {
                    params.push(Param { name, value: Tensor::from_vec(&shape, v.clone(), device)? })
                }
                (StateKind::Buffer, Values::F32(v)) => {
                    let value = Tensor::from_vec(&shape, v.clone(), device)?;
                    match bn_path(&name) {
                        Some(path) => running.push(RunningStats {
                            path: path.to_string(),
                            var: value.clone(),
                            mean: value,
                            batches: 0,
                        }),
                        None => {
                            running
                                .last_mut()
                                .ok_or_else(|| Error::Internal(format!("`{name}` before its layer")))?
                                .var = value
                        }
                    }
                }
            }
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(Error::Checkpoint(format!(
                "checkpoint has an unexpected tensor `{extra}` (not part of {title})"
            )));
        }
        Ok(Model { net, resolution, params, running, compute: Compute::default(), conv_tuned: Vec::new() })
    }

    /// The model running its GEMMs and convolutions as `compute` says, checked against its
    /// device (tensor-core arithmetic needs CUDA) and its layers (`winograd:M` needs an M that
    /// some conv layer has kernels for). Forgets an earlier tuning.
    pub fn with_compute(mut self, compute: Compute) -> Result<Self> {
        compute.gemm.check_device(&self.device())?;
        if let ConvAlgo::Winograd { tile: Some(m) } = compute.conv {
            let convs = self.net.conv_layers(self.resolution, 1)?;
            let mut have: Vec<usize> = convs.iter().flat_map(|c| winograd_tiles(&c.params)).collect();
            have.sort_unstable();
            have.dedup();
            if !have.contains(&m) {
                let have: Vec<String> = have.iter().map(|m| format!("winograd:{m}")).collect();
                let expected = if have.is_empty() {
                    "gemm or auto (no layer has Winograd kernels)".into()
                } else {
                    have.join(", ")
                };
                return Err(Error::Invalid(format!(
                    "--conv-algo winograd:{m}: no conv layer of {} has Winograd kernels for {m}x{m} output \
                     tiles; expected one of {expected}",
                    self.net.title
                )));
            }
        }
        self.compute = compute;
        self.conv_tuned.clear();
        Ok(self)
    }

    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// The algorithm conv layer `layer` (index in `net.leaves()`) runs: its tuned choice when
    /// `compute.conv` is Auto (the implicit GEMM until `tune_convs` has run), else that choice.
    pub fn conv_algo_of(&self, layer: usize) -> ConvAlgo {
        match self.compute.conv {
            ConvAlgo::Auto => {
                self.conv_tuned.iter().find(|(l, _)| *l == layer).map_or(ConvAlgo::ImplicitGemm, |&(_, a)| a)
            }
            algo => algo,
        }
    }

    /// With `compute.conv` Auto, measures each conv layer's candidates at `batch` inputs and
    /// keeps the fastest that agree with the implicit GEMM (see nn::conv_tune); returns what was
    /// measured, for printing. Does nothing (and returns nothing) for the other choices.
    pub fn tune_convs(&mut self, batch: usize, reps: usize) -> Result<Vec<LayerTuning>> {
        if self.compute.conv != ConvAlgo::Auto {
            return Ok(Vec::new());
        }
        let convs = self.net.conv_layers(self.resolution, batch)?;
        let tunings = conv_tune::tune(&self.device(), &convs, self.compute.gemm, reps)?;
        self.conv_tuned = tunings.iter().map(|t| (t.layer, t.chosen)).collect();
        Ok(tunings)
    }

    pub fn device(&self) -> Device {
        self.params[0].value.device()
    }

    pub fn param_count(&self) -> usize {
        self.params.iter().map(|p| p.value.len()).sum()
    }

    /// The parameter `<path>.<what>`.
    fn param(&self, path: &str, what: &str) -> Result<&Tensor> {
        let name = format!("{path}.{what}");
        let p = self.params.iter().find(|p| p.name == name);
        p.map(|p| &p.value).ok_or_else(|| Error::Internal(format!("{}: no parameter `{name}`", self.net.title)))
    }

    /// x: (N, C, R, R) -> logits (N, classes). With a training tape, dropout draws its masks
    /// from `dropout_seed` (a fresh value per step; each dropout layer adds its leaf index) and
    /// batch norm normalises with the batch's statistics, which then update the running ones
    /// (PyTorch's momentum 0.1; `batches` counts the step). With an eval tape dropout is the
    /// identity and batch norm uses the running statistics: see `infer`.
    pub fn forward(&mut self, tape: &mut Tape, x: &Tensor, dropout_seed: u64) -> Result<Tensor> {
        let (logits, stats) = self.forward_stats(tape, x, dropout_seed)?;
        for (i, batch) in stats {
            let r = &mut self.running[i];
            update_running(&mut r.mean, &mut r.var, &batch, BN_MOMENTUM)?;
            r.batches += 1;
        }
        Ok(logits)
    }

    /// The logits in evaluation mode (dropout off, batch norm on its running statistics).
    pub fn infer(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_stats(&mut Tape::eval(), x, 0)?.0)
    }

    /// The forward pass without updating anything: the logits and, with a training tape, each
    /// batch norm's batch statistics (with its index in `running`), which `forward` then folds
    /// into the running ones.
    pub fn forward_stats(
        &self,
        tape: &mut Tape,
        x: &Tensor,
        dropout_seed: u64,
    ) -> Result<(Tensor, Vec<(usize, BatchStats)>)> {
        let net = self.net;
        let [_, c, h, w] = x.dims4(net.title)?;
        if c != net.in_channels || h != self.resolution || w != self.resolution {
            return Err(Error::shape(
                net.title,
                format!("input (N, {}, {r}, {r})", net.in_channels, r = self.resolution),
                format!("{:?}", x.shape()),
            ));
        }
        for p in &self.params {
            tape.watch(&p.value);
        }
        let leaves = net.leaves();
        // The last leaf that reads each leaf's output: the output is dropped after it (the tape
        // keeps what a backward needs).
        let mut last_read = vec![0; leaves.len()];
        for (i, leaf) in leaves.iter().enumerate() {
            for s in &leaf.inputs {
                if let Source::Leaf(j) = *s {
                    last_read[j] = i;
                }
            }
        }
        let mut outputs: Vec<Option<Tensor>> = vec![None; leaves.len()];
        let mut stats = Vec::new();
        let mut i = 0;
        while i < leaves.len() {
            let leaf = &leaves[i];
            let inputs = leaf
                .inputs
                .iter()
                .map(|s| match *s {
                    Source::Input => Ok(x),
                    Source::Leaf(j) => outputs[j]
                        .as_ref()
                        .ok_or_else(|| Error::Internal(format!("{}: leaf {i} reads leaf {j}, dropped", net.title))),
                })
                .collect::<Result<Vec<&Tensor>>>()?;
            let h = inputs[0];
            let fuse_relu = net.fuses_relu(&leaves, i);
            let path = leaf.path.as_str();
            let y = match leaf.layer {
                Layer::Conv2d { stride, pad, .. } => {
                    let conv = Conv2d::new(stride, pad).relu(fuse_relu).algo(self.conv_algo_of(i));
                    conv2d(
                        tape,
                        h,
                        self.param(path, "weight")?,
                        self.param(path, "bias")?,
                        &conv.gemm(self.compute.gemm),
                    )?
                }
                Layer::Linear { .. } => dense(
                    tape,
                    h,
                    self.param(path, "weight")?,
                    self.param(path, "bias")?,
                    fuse_relu,
                    self.compute.gemm,
                )?,
                Layer::Relu => relu(tape, h)?,
                Layer::Sigmoid => sigmoid(tape, h)?,
                Layer::AvgPool2d { kernel, stride } => avgpool2d(tape, h, &AvgPool2d::new(kernel, stride, 0))?,
                Layer::GlobalAvgPool2d => global_avgpool2d(tape, h)?,
                Layer::MaxPool2d { kernel, stride, pad } => maxpool2d(tape, h, kernel, stride, pad)?,
                Layer::Flatten => {
                    let n = h.shape()[0];
                    let f = h.len() / n.max(1);
                    reshape(tape, h, &[n, f])?
                }
                Layer::Dropout { p } => dropout(tape, h, p, dropout_seed.wrapping_add(i as u64))?,
                Layer::BatchNorm2d => {
                    let r =
                        self.running.iter().position(|r| r.path == path).ok_or_else(|| {
                            Error::Internal(format!("{}: no running statistics for `{path}`", net.title))
                        })?;
                    let (gamma, beta) = (self.param(path, "weight")?, self.param(path, "bias")?);
                    let (y, batch) = batchnorm2d(tape, h, gamma, beta, &self.running[r].mean, &self.running[r].var)?;
                    stats.extend(batch.map(|b| (r, b)));
                    y
                }
                Layer::Concat => concat_channels(tape, &inputs)?,
                Layer::Add => add(tape, inputs[0], inputs[1])?,
                Layer::Seq(_) | Layer::Inception { .. } | Layer::Residual { .. } => {
                    unreachable!("leaves() expands blocks")
                }
            };
            // Inputs no later leaf reads are done with.
            for s in &leaf.inputs {
                if let Source::Leaf(j) = *s {
                    if last_read[j] <= i {
                        outputs[j] = None;
                    }
                }
            }
            if fuse_relu {
                // The fused ReLU's output is the layer's.
                outputs[i + 1] = Some(y);
                i += 2;
            } else {
                outputs[i] = Some(y);
                i += 1;
            }
        }
        let logits = outputs.pop().flatten().ok_or_else(|| Error::Internal(format!("{}: no output", net.title)))?;
        Ok((logits, stats))
    }

    /// The parameters and batch norm's buffers copied to the host under their state_dict
    /// names, for checkpoints.
    pub fn to_named(&self) -> Result<Vec<NamedTensor>> {
        let mut out: Vec<NamedTensor> = self
            .params
            .iter()
            .map(|p| Ok(NamedTensor::f32(p.name.clone(), p.value.shape(), p.value.to_vec()?)))
            .collect::<Result<_>>()?;
        for r in &self.running {
            out.push(NamedTensor::f32(format!("{}.running_mean", r.path), r.mean.shape(), r.mean.to_vec()?));
            out.push(NamedTensor::f32(format!("{}.running_var", r.path), r.var.shape(), r.var.to_vec()?));
            let count = NamedTensor {
                name: format!("{}.num_batches_tracked", r.path),
                shape: vec![],
                data: Values::I64(vec![r.batches]),
            };
            out.push(count);
        }
        Ok(out)
    }
}
