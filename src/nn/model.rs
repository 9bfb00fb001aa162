//! A network's parameters and how it runs: `Model` holds a `Network` (the layer table), its
//! parameters under their `state_dict` names, and the `Compute` it runs its GEMMs and
//! convolutions with. The forward pass walks the table's leaves, recording each op on the tape;
//! a ReLU right after a conv or linear layer runs inside that layer's kernel.

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::checkpoint::NamedTensor;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::conv_tune::{self, LayerTuning};
use crate::nn::network::{Layer, Network};
use crate::nn::{Compute, Param};
use crate::ops::adaptive_avgpool2d::global_avgpool2d;
use crate::ops::avgpool2d::{avgpool2d, AvgPool2d};
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
    /// How the GEMMs and convolutions run (a runtime choice, not saved in checkpoints; set
    /// with `with_compute`).
    compute: Compute,
    /// With `compute.conv` Auto: each conv layer's (index in `net.leaves()`) measured choice,
    /// filled by `tune_convs`.
    conv_tuned: Vec<(usize, ConvAlgo)>,
}

impl Model {
    /// Xavier-uniform weights (bound sqrt(6 / (fan_in + fan_out)), as torch's
    /// `xavier_uniform_`), zero biases, drawn from a generator seeded with `seed`.
    pub fn new(net: &'static Network, resolution: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = Vec::new();
        for (name, shape) in net.param_shapes(resolution)? {
            let n = crate::nn::network::elements(&shape)?;
            let data = if shape.len() == 1 {
                vec![0.0; n]
            } else {
                // fan_in = in * receptive field, fan_out = out * receptive field.
                let receptive: usize = shape[2..].iter().product();
                let (fan_in, fan_out) = (shape[1] * receptive, shape[0] * receptive);
                let bound = (6.0 / (fan_in + fan_out) as f64).sqrt() as f32;
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            params.push(Param { name, value: Tensor::from_vec(&shape, data, device)? });
        }
        Ok(Model { net, resolution, params, compute: Compute::default(), conv_tuned: Vec::new() })
    }

    /// Builds the model from named tensors (a checkpoint), checking every name and shape.
    pub fn from_named(
        net: &'static Network,
        resolution: usize,
        named: Vec<NamedTensor>,
        device: &Device,
    ) -> Result<Self> {
        let mut by_name: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> =
            named.into_iter().map(|t| (t.name, (t.shape, t.data))).collect();
        let title = net.title;
        let mut params = Vec::new();
        for (name, shape) in net.param_shapes(resolution)? {
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
            params.push(Param { name, value: Tensor::from_vec(&shape, data, device)? });
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(Error::Checkpoint(format!(
                "checkpoint has an unexpected tensor `{extra}` (not part of {title})"
            )));
        }
        Ok(Model { net, resolution, params, compute: Compute::default(), conv_tuned: Vec::new() })
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

    /// x: (N, C, R, R) -> logits (N, classes). In training mode dropout draws its masks from
    /// `dropout_seed` (a fresh value per step; each dropout layer adds its leaf index); in eval
    /// mode dropout is the identity.
    pub fn forward(&self, tape: &mut Tape, x: &Tensor, dropout_seed: u64) -> Result<Tensor> {
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
        let mut params = self.params.iter().map(|p| &p.value);
        let mut next = || params.next().expect("param_shapes gives two tensors per conv/linear layer");
        let leaves = net.leaves();
        let mut h = x.clone();
        let mut i = 0;
        while i < leaves.len() {
            let fuse_relu = net.fuses_relu(&leaves, i);
            h = match leaves[i].layer {
                Layer::Conv2d { stride, pad, .. } => {
                    let conv = Conv2d::new(stride, pad).relu(fuse_relu).algo(self.conv_algo_of(i));
                    conv2d(tape, &h, next(), next(), &conv.gemm(self.compute.gemm))?
                }
                Layer::Linear { .. } => dense(tape, &h, next(), next(), fuse_relu, self.compute.gemm)?,
                Layer::Relu => relu(tape, &h)?,
                Layer::Sigmoid => sigmoid(tape, &h)?,
                Layer::AvgPool2d { kernel, stride } => avgpool2d(tape, &h, &AvgPool2d::new(kernel, stride, 0))?,
                Layer::GlobalAvgPool2d => global_avgpool2d(tape, &h)?,
                Layer::MaxPool2d { kernel, stride } => maxpool2d(tape, &h, kernel, stride, 0)?,
                Layer::Flatten => {
                    let n = h.shape()[0];
                    let f = h.len() / n.max(1);
                    reshape(tape, &h, &[n, f])?
                }
                Layer::Dropout { p } => dropout(tape, &h, p, dropout_seed.wrapping_add(i as u64))?,
                Layer::Seq(_) => unreachable!("leaves() flattens blocks"),
            };
            i += if fuse_relu { 2 } else { 1 };
        }
        Ok(h)
    }

    /// The parameters copied to the host under their state_dict names, for checkpoints.
    pub fn to_named(&self) -> Result<Vec<NamedTensor>> {
        self.params
            .iter()
            .map(|p| Ok(NamedTensor { name: p.name.clone(), shape: p.value.shape().to_vec(), data: p.value.to_vec()? }))
            .collect()
    }
}
