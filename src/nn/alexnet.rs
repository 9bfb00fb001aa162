//! AlexNet as in the d2l book (§8.1), for 1-channel input and 10 classes.
//!
//! The layer table `LAYERS` is the single description of the network: the forward pass, the
//! `summary` printout and the parameter names all derive from it. Parameter names follow the
//! indices of PyTorch's `nn.Sequential` for the same model (`0.weight`, `0.bias`, `3.weight`,
//! ...), so a checkpoint loads into PyTorch as is. A ReLU that directly follows a conv or dense
//! layer is fused into that layer's kernel (its output is the same tensor).

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::checkpoint::NamedTensor;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::conv_tune::{self, ConvLayer, LayerTuning};
use crate::nn::{Compute, Param};
use crate::ops::{
    conv2d::{conv2d, winograd_tiles, Conv2d, Conv2dParams, ConvAlgo},
    dense::dense,
    dropout::dropout,
    maxpool2d::maxpool2d,
    reshape::reshape,
};
use crate::tape::Tape;
use crate::tensor::Tensor;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Layer {
    Conv2d { out: usize, kernel: usize, stride: usize, pad: usize },
    Relu,
    MaxPool2d { kernel: usize, stride: usize },
    Flatten,
    Linear { out: usize },
    Dropout { p: f32 },
}

impl Layer {
    /// PyTorch's class name, as `summary` prints it.
    pub fn name(&self) -> &'static str {
        match self {
            Layer::Conv2d { .. } => "Conv2d",
            Layer::Relu => "ReLU",
            Layer::MaxPool2d { .. } => "MaxPool2d",
            Layer::Flatten => "Flatten",
            Layer::Linear { .. } => "Linear",
            Layer::Dropout { .. } => "Dropout",
        }
    }

    /// Output shape for `input` (N, C, H, W) or (N, F), or an error when the input is too small.
    pub fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        let spatial = |k: usize, s: usize, p: usize| -> Result<Vec<usize>> {
            let [n, c, h, w] = <[usize; 4]>::try_from(input)
                .map_err(|_| Error::shape("AlexNet", "a 4-D input", format!("{input:?}")))?;
            // Checked: a huge input must give an error, not a wrapped size.
            let padded = |x: usize| x.checked_add(2 * p).ok_or_else(|| too_large(input));
            let out = |x: usize| padded(x).map(|v| v.checked_sub(k).map(|v| v / s + 1));
            match (out(h)?, out(w)?) {
                (Some(oh), Some(ow)) => Ok(vec![n, c, oh, ow]),
                _ => Err(Error::shape(
                    "AlexNet",
                    format!(
                        "an input large enough for this layer's {k}x{k} window (the network takes inputs from \
                         {m}x{m} up)",
                        m = min_resolution()
                    ),
                    format!("{h}x{w} at this layer"),
                )),
            }
        };
        match *self {
            Layer::Conv2d { out, kernel, stride, pad } => {
                let mut s = spatial(kernel, stride, pad)?;
                s[1] = out;
                Ok(s)
            }
            Layer::MaxPool2d { kernel, stride } => spatial(kernel, stride, 0),
            Layer::Flatten => Ok(vec![input[0], elements(&input[1..])?]),
            Layer::Linear { out } => Ok(vec![input[0], out]),
            Layer::Relu | Layer::Dropout { .. } => Ok(input.to_vec()),
        }
    }
}

/// The product of `dims`, or an error when it does not fit a usize (a huge --resize).
pub fn elements(dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| too_large(dims))
}

fn too_large(shape: &[usize]) -> Error {
    Error::shape("AlexNet", "sizes that fit in 64 bits", format!("{shape:?} (the input is far too large)"))
}

/// The d2l AlexNet; index i is `nn.Sequential` index i.
pub const LAYERS: [Layer; 21] = [
    Layer::Conv2d { out: 96, kernel: 11, stride: 4, pad: 1 },
    Layer::Relu,
    Layer::MaxPool2d { kernel: 3, stride: 2 },
    Layer::Conv2d { out: 256, kernel: 5, stride: 1, pad: 2 },
    Layer::Relu,
    Layer::MaxPool2d { kernel: 3, stride: 2 },
    Layer::Conv2d { out: 384, kernel: 3, stride: 1, pad: 1 },
    Layer::Relu,
    Layer::Conv2d { out: 384, kernel: 3, stride: 1, pad: 1 },
    Layer::Relu,
    Layer::Conv2d { out: 256, kernel: 3, stride: 1, pad: 1 },
    Layer::Relu,
    Layer::MaxPool2d { kernel: 3, stride: 2 },
    Layer::Flatten,
    Layer::Linear { out: 4096 },
    Layer::Relu,
    Layer::Dropout { p: 0.5 },
    Layer::Linear { out: 4096 },
    Layer::Relu,
    Layer::Dropout { p: 0.5 },
    Layer::Linear { out: 10 },
];

/// Input channels and classes.
pub const IN_CHANNELS: usize = 1;
pub const CLASSES: usize = 10;

/// The smallest input height/width the layer table accepts.
pub fn min_resolution() -> usize {
    // Each layer only needs its input to be at least as large as its window, so walking
    // upward from 1 finds the bound in a few hundred shape computations.
    (1..1024).find(|&r| layer_shapes_unchecked(r)).unwrap_or(1024)
}

fn layer_shapes_unchecked(r: usize) -> bool {
    let mut cur = [1, IN_CHANNELS, r, r];
    for layer in &LAYERS {
        let (k, s, p) = match *layer {
            Layer::Conv2d { kernel, stride, pad, .. } => (kernel, stride, pad),
            Layer::MaxPool2d { kernel, stride } => (kernel, stride, 0),
            _ => continue,
        };
        if cur[2] + 2 * p < k {
            return false;
        }
        cur[2] = (cur[2] + 2 * p - k) / s + 1;
    }
    true
}

/// Output shape of every layer for an input of `input` (N, 1, H, W).
pub fn layer_shapes(input: &[usize]) -> Result<Vec<Vec<usize>>> {
    let mut shapes = Vec::with_capacity(LAYERS.len());
    let mut cur = input.to_vec();
    for layer in &LAYERS {
        cur = layer.output_shape(&cur)?;
        shapes.push(cur.clone());
    }
    Ok(shapes)
}

/// Parameter shapes `(name, shape)` for inputs of `resolution`² pixels, in state_dict order.
pub fn param_shapes(resolution: usize) -> Result<Vec<(String, Vec<usize>)>> {
    let shapes = layer_shapes(&[1, IN_CHANNELS, resolution, resolution])?;
    let mut out = Vec::new();
    for (i, layer) in LAYERS.iter().enumerate() {
        let input = if i == 0 { vec![1, IN_CHANNELS, resolution, resolution] } else { shapes[i - 1].clone() };
        match *layer {
            Layer::Conv2d { out: o, kernel: k, .. } => {
                out.push((format!("{i}.weight"), vec![o, input[1], k, k]));
                out.push((format!("{i}.bias"), vec![o]));
            }
            Layer::Linear { out: o } => {
                out.push((format!("{i}.weight"), vec![o, input[1]]));
                out.push((format!("{i}.bias"), vec![o]));
            }
            _ => {}
        }
    }
    Ok(out)
}

pub struct AlexNet {
    /// Input height and width (224 in the book; the graph works from 65 up, see `min_resolution`).
    pub resolution: usize,
    /// In state_dict order: 0.weight, 0.bias, 3.weight, ...
    pub params: Vec<Param>,
    /// How the GEMMs and convolutions run (a runtime choice, not saved in checkpoints; set
    /// with `with_compute`).
    compute: Compute,
    /// With `compute.conv` Auto: each conv layer's (index in LAYERS) measured choice, filled by
    /// `tune_convs`.
    conv_tuned: Vec<(usize, ConvAlgo)>,
}

impl AlexNet {
    /// Xavier-uniform weights (bound sqrt(6 / (fan_in + fan_out)), as torch's
    /// `xavier_uniform_`), zero biases, drawn from a generator seeded with `seed`.
    pub fn new(resolution: usize, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut params = Vec::new();
        for (name, shape) in param_shapes(resolution)? {
            let n = elements(&shape)?;
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
        Ok(AlexNet { resolution, params, compute: Compute::default(), conv_tuned: Vec::new() })
    }

    /// Builds the model from named tensors (a checkpoint), checking every name and shape.
    pub fn from_named(resolution: usize, named: Vec<NamedTensor>, device: &Device) -> Result<Self> {
        let mut by_name: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> =
            named.into_iter().map(|t| (t.name, (t.shape, t.data))).collect();
        let mut params = Vec::new();
        for (name, shape) in param_shapes(resolution)? {
            let (found_shape, data) = by_name.remove(&name).ok_or_else(|| {
                Error::Checkpoint(format!(
                    "checkpoint has no tensor `{name}` (expected AlexNet at {resolution}x{resolution})"
                ))
            })?;
            if found_shape != shape {
                return Err(Error::Checkpoint(format!(
                    "checkpoint tensor `{name}`: expected shape {shape:?} (AlexNet at {resolution}x{resolution}), found {found_shape:?}"
                )));
            }
            params.push(Param { name, value: Tensor::from_vec(&shape, data, device)? });
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(Error::Checkpoint(format!("checkpoint has an unexpected tensor `{extra}` (not part of AlexNet)")));
        }
        Ok(AlexNet { resolution, params, compute: Compute::default(), conv_tuned: Vec::new() })
    }

    /// The model running its GEMMs and convolutions as `compute` says, checked against its
    /// device (tensor-core arithmetic needs CUDA) and its layers (`winograd:M` needs an M that
    /// some conv layer has kernels for). Forgets an earlier tuning.
    pub fn with_compute(mut self, compute: Compute) -> Result<Self> {
        compute.gemm.check_device(&self.device())?;
        if let ConvAlgo::Winograd { tile: Some(m) } = compute.conv {
            let convs = self.conv_layers(1)?;
            let mut have: Vec<usize> = convs.iter().flat_map(|c| winograd_tiles(&c.params)).collect();
            have.sort_unstable();
            have.dedup();
            if !have.contains(&m) {
                let have: Vec<String> = have.iter().map(|m| format!("winograd:{m}")).collect();
                return Err(Error::Invalid(format!(
                    "--conv-algo winograd:{m}: no conv layer of AlexNet has Winograd kernels for {m}x{m} output \
                     tiles; expected one of {}",
                    have.join(", ")
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

    /// The conv layers at `batch` inputs, as the tuner sees them.
    fn conv_layers(&self, batch: usize) -> Result<Vec<ConvLayer>> {
        let input = [batch, IN_CHANNELS, self.resolution, self.resolution];
        let shapes = layer_shapes(&input)?;
        let mut out = Vec::new();
        for (i, layer) in LAYERS.iter().enumerate() {
            let Layer::Conv2d { out: c_out, kernel, stride, pad } = *layer else { continue };
            let x = if i == 0 { input.to_vec() } else { shapes[i - 1].clone() };
            let params = Conv2dParams::new(x[0], x[1], x[2], x[3], c_out, kernel, kernel, stride, pad)?;
            let relu = LAYERS.get(i + 1) == Some(&Layer::Relu);
            out.push(ConvLayer { layer: i, params, relu, input_grad: i > 0 });
        }
        Ok(out)
    }

    /// The algorithm conv layer `layer` (index in LAYERS) runs: its tuned choice when
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
        let convs = self.conv_layers(batch)?;
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

    /// x: (N, 1, R, R) -> logits (N, 10). In training mode dropout draws its masks from
    /// `dropout_seed` (a fresh value per step); in eval mode dropout is the identity.
    pub fn forward(&self, tape: &mut Tape, x: &Tensor, dropout_seed: u64) -> Result<Tensor> {
        let [_, c, h, w] = x.dims4("AlexNet")?;
        if c != IN_CHANNELS || h != self.resolution || w != self.resolution {
            return Err(Error::shape(
                "AlexNet",
                format!("input (N, {IN_CHANNELS}, {r}, {r})", r = self.resolution),
                format!("{:?}", x.shape()),
            ));
        }
        for p in &self.params {
            tape.watch(&p.value);
        }
        let mut params = self.params.iter().map(|p| &p.value);
        let mut next = || params.next().expect("param_shapes gives two tensors per conv/linear layer");
        let mut h = x.clone();
        let mut i = 0;
        while i < LAYERS.len() {
            // A ReLU right after a conv/linear layer runs inside that layer's kernel.
            let fuse_relu = LAYERS.get(i + 1) == Some(&Layer::Relu);
            h = match LAYERS[i] {
                Layer::Conv2d { stride, pad, .. } => {
                    let conv = Conv2d::new(stride, pad).relu(fuse_relu).algo(self.conv_algo_of(i));
                    conv2d(tape, &h, next(), next(), &conv.gemm(self.compute.gemm))?
                }
                Layer::Linear { .. } => dense(tape, &h, next(), next(), fuse_relu, self.compute.gemm)?,
                Layer::Relu => crate::ops::relu::relu(tape, &h)?,
                Layer::MaxPool2d { kernel, stride } => maxpool2d(tape, &h, kernel, stride)?,
                Layer::Flatten => {
                    let n = h.shape()[0];
                    let f = h.len() / n.max(1);
                    reshape(tape, &h, &[n, f])?
                }
                Layer::Dropout { p } => dropout(tape, &h, p, dropout_seed.wrapping_add(i as u64))?,
            };
            let fused = matches!(LAYERS[i], Layer::Conv2d { .. } | Layer::Linear { .. }) && fuse_relu;
            i += if fused { 2 } else { 1 };
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

/// The book's `summary`: each layer's output shape for one (1, 1, R, R) input.
pub fn summary(resolution: usize) -> Result<String> {
    let shapes = layer_shapes(&[1, IN_CHANNELS, resolution, resolution])?;
    let mut s = String::new();
    for (layer, shape) in LAYERS.iter().zip(&shapes) {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        s.push_str(&format!("{:<10} output shape:\t torch.Size([{}])\n", layer.name(), dims.join(", ")));
    }
    s.push_str(&format!("parameters: {}\n", param_elements(resolution)?));
    Ok(s)
}

/// The number of parameters at `resolution`, checked (an error rather than a wrapped count).
pub fn param_elements(resolution: usize) -> Result<u64> {
    param_shapes(resolution)?
        .iter()
        .try_fold(0u64, |acc, (_, shape)| acc.checked_add(elements(shape)? as u64).ok_or_else(|| too_large(shape)))
}

/// What a run needs in memory, in bytes, as derived from the layer table: a lower bound (the
/// allocator, the workspaces of some algorithms and the data set come on top), so that a size
/// it refuses can never have fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// Where the model runs (the GPU's memory, or the host's for the CPU): the parameters (and,
    /// training, their gradients) and the activations of one batch.
    pub device: u64,
    /// On the host besides (the model itself when it runs on the CPU): the parameters' copies a
    /// checkpoint is made of (training: the host copy, its bytes and the file; loading: the
    /// file and the tensors).
    pub host: u64,
    /// Of `device`: the parameters, with their gradients when training.
    pub params: u64,
    /// Of `device`: one batch's activations.
    pub activations: u64,
}

/// The [`Footprint`] of training (`training`: the tape keeps every layer's output and argmax,
/// and the parameters have gradients) or of inference at `batch` inputs of `resolution`^2.
pub fn footprint(resolution: usize, batch: usize, training: bool) -> Result<Footprint> {
    const F32: u64 = 4;
    let overflow = || too_large(&[batch, IN_CHANNELS, resolution, resolution]);
    let mul = |a: u64, b: u64| a.checked_mul(b).ok_or_else(overflow);
    let shapes = layer_shapes(&[1, IN_CHANNELS, resolution, resolution])?;
    let per_example: Vec<u64> = shapes.iter().map(|s| elements(&s[1..]).map(|e| e as u64)).collect::<Result<_>>()?;
    let input = elements(&[IN_CHANNELS, resolution, resolution])? as u64;
    let widest = per_example.iter().copied().chain([input]).max().unwrap_or(0);
    let weights = mul(param_elements(resolution)?, F32)?;
    let (params, kept) = if training {
        // Every distinct output stays on the tape, max-pool's argmax too (4 bytes an element):
        // not a ReLU's, which runs inside the conv or linear layer before it (the same tensor),
        // nor Flatten's, a view. The backward holds a gradient and its successor of the widest
        // layer at once.
        let kept = LAYERS.iter().zip(&per_example).try_fold(input, |acc, (layer, &e)| {
            let e = match layer {
                Layer::Relu | Layer::Flatten => 0,
                Layer::MaxPool2d { .. } => mul(e, 2)?,
                _ => e,
            };
            acc.checked_add(e).ok_or_else(overflow)
        })?;
        (mul(weights, 2)?, kept.checked_add(mul(widest, 2)?).ok_or_else(overflow)?)
    } else {
        // A layer's input and output at once.
        (weights, mul(widest, 2)?)
    };
    let activations = mul(mul(kept, batch as u64)?, F32)?;
    let device = params.checked_add(activations).ok_or_else(overflow)?;
    let host = mul(weights, if training { 3 } else { 2 })?;
    Ok(Footprint { device, host, params, activations })
}
