//! A network as data: a table of layers (`Layer`, with `Layer::Seq` for PyTorch's nested
//! `nn.Sequential` blocks) and the recipe it trains with. Everything else derives from the table:
//! the output shape of every layer, the parameters' names (PyTorch's `state_dict` names, so a
//! checkpoint loads into the peer's model as is: `0.weight`, or `2.0.weight` inside block 2) and
//! shapes, the book's `summary`, the memory a run needs, and the conv layers the tuner measures.
//! The forward pass (`nn::model`) walks the same table.
//!
//! Shapes: an image layer maps (N, C, H, W) to (N, C', H', W'); `Flatten` maps (N, C, H, W) to
//! (N, C*H*W); `Linear` maps (N, F) to (N, F').

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::nn::conv_tune::ConvLayer;
use crate::ops::conv2d::Conv2dParams;

/// One layer of a network, as PyTorch's `nn` module of the same name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Layer {
    /// `nn.Conv2d(in, out, kernel, stride, pad)`, `in` taken from the input.
    Conv2d {
        out: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    },
    /// `nn.Linear(in, out)`, `in` taken from the input.
    Linear {
        out: usize,
    },
    Relu,
    Sigmoid,
    /// `nn.MaxPool2d(kernel, stride)`, no padding.
    MaxPool2d {
        kernel: usize,
        stride: usize,
    },
    /// `nn.AvgPool2d(kernel, stride)`: no padding (so `count_include_pad` does not matter).
    AvgPool2d {
        kernel: usize,
        stride: usize,
    },
    /// `nn.AdaptiveAvgPool2d((1, 1))`: the mean of each channel's plane.
    GlobalAvgPool2d,
    Flatten,
    /// `nn.Dropout(p)`: the identity in evaluation.
    Dropout {
        p: f32,
    },
    /// `nn.Sequential(...)`: a block whose layers are named `<block>.<i>`.
    Seq(&'static [Layer]),
}

impl Layer {
    /// PyTorch's class name, as `summary` prints it.
    pub fn name(&self) -> &'static str {
        match self {
            Layer::Conv2d { .. } => "Conv2d",
            Layer::Linear { .. } => "Linear",
            Layer::Relu => "ReLU",
            Layer::Sigmoid => "Sigmoid",
            Layer::MaxPool2d { .. } => "MaxPool2d",
            Layer::AvgPool2d { .. } => "AvgPool2d",
            Layer::GlobalAvgPool2d => "AdaptiveAvgPool2d",
            Layer::Flatten => "Flatten",
            Layer::Dropout { .. } => "Dropout",
            Layer::Seq(_) => "Sequential",
        }
    }

    /// Whether the layer has a weight and a bias.
    pub fn has_params(&self) -> bool {
        matches!(self, Layer::Conv2d { .. } | Layer::Linear { .. })
    }
}

/// How the book trains a network: its defaults for `train`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recipe {
    pub lr: f32,
    pub batch_size: usize,
    /// Input height and width: the 28x28 images are resized to it (28: used as they are).
    pub resolution: usize,
}

/// A network: its layer table, the input and output it expects, and its recipe.
#[derive(Debug, PartialEq)]
pub struct Network {
    /// The name `--model` takes (`alexnet`).
    pub name: &'static str,
    /// The name people know it by (`AlexNet`), for messages.
    pub title: &'static str,
    pub layers: &'static [Layer],
    /// Input channels (Fashion-MNIST: 1).
    pub in_channels: usize,
    /// Outputs of the last layer (Fashion-MNIST: 10 classes).
    pub classes: usize,
    pub recipe: Recipe,
}

/// The largest input size [`Network::fitting_resolutions`] tries (a network that fits every
/// size, as one whose global pooling makes its parameters independent of the input, fits up to
/// here).
pub const MAX_FITTED_RESOLUTION: usize = 1024;

/// Sizes from [`Network::fitting_resolutions`] for messages: `224`, `224-227`, `63 up`, or
/// `64, 80-81`.
pub fn describe_sizes(sizes: &[usize]) -> String {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &r in sizes {
        match runs.last_mut() {
            Some((_, hi)) if *hi + 1 == r => *hi = r,
            _ => runs.push((r, r)),
        }
    }
    let runs: Vec<String> = runs
        .iter()
        .map(|&(lo, hi)| match hi - lo {
            _ if hi == MAX_FITTED_RESOLUTION => format!("{lo}x{lo} up"),
            0 => format!("{lo}x{lo}"),
            _ => format!("{lo}x{lo} to {hi}x{hi}"),
        })
        .collect();
    runs.join(", ")
}

/// A layer of the flattened table: what the forward pass runs, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Leaf {
    /// The `state_dict` prefix: `3`, or `2.0` for layer 0 of block 2.
    pub path: String,
    pub layer: Layer,
    /// The index of the top-level entry (block or layer) it belongs to.
    pub top: usize,
}

/// The product of `dims`, or an error when it does not fit a usize (a huge --resize).
pub fn elements(dims: &[usize]) -> Result<usize> {
    elements_of("shape", dims)
}

/// `elements`, the error naming `op`.
fn elements_of(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| too_large(op, dims))
}

fn too_large(op: &'static str, shape: &[usize]) -> Error {
    Error::shape(op, "sizes that fit in 64 bits", format!("{shape:?} (the input is far too large)"))
}

/// The output of a `k`x`k` window with stride `s` and padding `p` over `input` (N, C, H, W):
/// Ok(None) where the window does not fit, an error where the sizes overflow.
fn windowed(op: &'static str, input: &[usize], k: usize, s: usize, p: usize) -> Result<Option<[usize; 4]>> {
    let [n, c, h, w] = <[usize; 4]>::try_from(input)
        .map_err(|_| Error::shape(op, "a 4-D (N, C, H, W) input to a spatial layer", format!("{input:?}")))?;
    let out = |x: usize| -> Result<Option<usize>> {
        let padded = x.checked_add(2 * p).ok_or_else(|| too_large(op, input))?;
        Ok(padded.checked_sub(k).map(|v| v / s.max(1) + 1))
    };
    Ok(match (out(h)?, out(w)?) {
        (Some(oh), Some(ow)) => Some([n, c, oh, ow]),
        _ => None,
    })
}

/// The output shape of the leaf `layer` of network `op` for `input`; Ok(None) where a window
/// does not fit.
fn leaf_output(op: &'static str, layer: &Layer, input: &[usize]) -> Result<Option<Vec<usize>>> {
    let flat = |what: &str| -> Result<[usize; 2]> {
        <[usize; 2]>::try_from(input)
            .map_err(|_| Error::shape(op, format!("a 2-D (N, F) input to {what}"), format!("{input:?}")))
    };
    Ok(match *layer {
        Layer::Conv2d { out, kernel, stride, pad } => {
            windowed(op, input, kernel, stride, pad)?.map(|[n, _, h, w]| vec![n, out, h, w])
        }
        Layer::MaxPool2d { kernel, stride } | Layer::AvgPool2d { kernel, stride } => {
            windowed(op, input, kernel, stride, 0)?.map(|s| s.to_vec())
        }
        Layer::GlobalAvgPool2d => windowed(op, input, 1, 1, 0)?.map(|[n, c, _, _]| vec![n, c, 1, 1]),
        Layer::Flatten => Some(vec![input[0], elements_of(op, &input[1..])?]),
        Layer::Linear { out } => Some(vec![flat("Linear")?[0], out]),
        Layer::Relu | Layer::Sigmoid | Layer::Dropout { .. } => Some(input.to_vec()),
        Layer::Seq(_) => unreachable!("leaves() flattens blocks"),
    })
}

impl Network {
    /// The layers the forward pass runs, in order, blocks flattened.
    pub fn leaves(&self) -> Vec<Leaf> {
        fn walk(layers: &[Layer], prefix: &str, top: Option<usize>, out: &mut Vec<Leaf>) {
            for (i, layer) in layers.iter().enumerate() {
                let path = if prefix.is_empty() { i.to_string() } else { format!("{prefix}.{i}") };
                let top = top.unwrap_or(i);
                match layer {
                    Layer::Seq(inner) => walk(inner, &path, Some(top), out),
                    _ => out.push(Leaf { path, layer: *layer, top }),
                }
            }
        }
        let mut out = Vec::new();
        walk(self.layers, "", None, &mut out);
        out
    }

    /// The input shape for `batch` images of `resolution`^2.
    pub fn input_shape(&self, batch: usize, resolution: usize) -> [usize; 4] {
        [batch, self.in_channels, resolution, resolution]
    }

    /// Each leaf's output shape for `input` (N, C, H, W), or None where a window does not fit.
    fn try_shapes(&self, input: &[usize]) -> Result<Option<Vec<Vec<usize>>>> {
        let mut shapes = Vec::new();
        let mut cur = input.to_vec();
        for leaf in self.leaves() {
            match leaf_output(self.title, &leaf.layer, &cur)? {
                Some(next) => cur = next,
                None => return Ok(None),
            }
            shapes.push(cur.clone());
        }
        Ok(Some(shapes))
    }

    /// The output shape of every leaf (in `leaves()` order) for an input of `input` (N, C, H, W).
    pub fn leaf_shapes(&self, input: &[usize]) -> Result<Vec<Vec<usize>>> {
        if input.len() != 4 || input[1] != self.in_channels {
            return Err(Error::shape(
                self.title,
                format!("an input (N, {}, H, W)", self.in_channels),
                format!("{input:?}"),
            ));
        }
        self.try_shapes(input)?.ok_or_else(|| {
            Error::shape(
                self.title,
                format!(
                    "an input large enough for every window ({} takes inputs from {m}x{m} up)",
                    self.title,
                    m = self.min_resolution()
                ),
                format!("{}x{}", input[2], input[3]),
            )
        })
    }

    /// The smallest input height/width every window fits (at most 4096: none is that large).
    pub fn min_resolution(&self) -> usize {
        (1..4096).find(|&r| matches!(self.try_shapes(&self.input_shape(1, r)), Ok(Some(_)))).unwrap_or(4096)
    }

    /// Parameter (`state_dict` name, shape) pairs for inputs of `resolution`^2, in state_dict
    /// order: per conv / linear layer `<path>.weight` (out, in, k, k) or (out, in), `<path>.bias`.
    pub fn param_shapes(&self, resolution: usize) -> Result<Vec<(String, Vec<usize>)>> {
        let input = self.input_shape(1, resolution);
        let shapes = self.leaf_shapes(&input)?;
        let mut out = Vec::new();
        for (i, leaf) in self.leaves().iter().enumerate() {
            let x = if i == 0 { input.to_vec() } else { shapes[i - 1].clone() };
            let weight = match leaf.layer {
                Layer::Conv2d { out, kernel, .. } => vec![out, x[1], kernel, kernel],
                Layer::Linear { out } => vec![out, x[1]],
                _ => continue,
            };
            let bias = vec![weight[0]];
            out.push((format!("{}.weight", leaf.path), weight));
            out.push((format!("{}.bias", leaf.path), bias));
        }
        Ok(out)
    }

    /// The input sizes (ascending, from `min_resolution()` up to [`MAX_FITTED_RESOLUTION`]) at
    /// which this network's parameters have exactly `params`' names and shapes: what a
    /// state_dict without metadata (a PyTorch `save_file`) says of the input it was made for.
    /// Empty when none does; see [`Network::misfit`] for why.
    pub fn fitting_resolutions(&self, params: &HashMap<String, Vec<usize>>) -> Vec<usize> {
        if !self.has_param_names(params) {
            return Vec::new();
        }
        (self.min_resolution()..=MAX_FITTED_RESOLUTION)
            .filter(|&r| {
                self.param_shapes(r).is_ok_and(|want| want.iter().all(|(name, shape)| params.get(name) == Some(shape)))
            })
            .collect()
    }

    /// Whether `params` holds exactly this network's parameter names (whatever their shapes).
    pub fn has_param_names(&self, params: &HashMap<String, Vec<usize>>) -> bool {
        match self.param_shapes(self.min_resolution()) {
            Ok(want) => want.len() == params.len() && want.iter().all(|(name, _)| params.contains_key(name)),
            Err(_) => false,
        }
    }

    /// Why `params` is not this network's at `resolution`: the first missing, unexpected or
    /// misshapen tensor (None when it fits).
    pub fn misfit(&self, params: &HashMap<String, Vec<usize>>, resolution: usize) -> Option<String> {
        let at = format!("{} at {resolution}x{resolution}", self.title);
        let want = match self.param_shapes(resolution) {
            Ok(want) => want,
            Err(e) => return Some(e.to_string()),
        };
        for (name, shape) in &want {
            match params.get(name) {
                None => return Some(format!("no tensor `{name}` (expected {at})")),
                Some(found) if found != shape => {
                    return Some(format!("tensor `{name}`: expected shape {shape:?} ({at}), found {found:?}"))
                }
                Some(_) => {}
            }
        }
        let mut extra: Vec<&String> = params.keys().filter(|k| !want.iter().any(|(n, _)| n == *k)).collect();
        extra.sort();
        extra.first().map(|e| format!("an unexpected tensor `{e}` (not part of {})", self.title))
    }

    /// The number of parameters at `resolution`, checked (an error rather than a wrapped count).
    pub fn param_elements(&self, resolution: usize) -> Result<u64> {
        self.param_shapes(resolution)?.iter().try_fold(0u64, |acc, (_, shape)| {
            acc.checked_add(elements_of(self.title, shape)? as u64).ok_or_else(|| too_large(self.title, shape))
        })
    }

    /// The book's `summary`: each top-level layer's (or block's) output shape for one
    /// (1, C, R, R) input, then the parameter count.
    pub fn summary(&self, resolution: usize) -> Result<String> {
        let shapes = self.leaf_shapes(&self.input_shape(1, resolution))?;
        let leaves = self.leaves();
        let mut s = String::new();
        for (top, layer) in self.layers.iter().enumerate() {
            // A block's output is its last leaf's.
            let Some(last) = leaves.iter().rposition(|l| l.top == top) else { continue };
            let dims: Vec<String> = shapes[last].iter().map(|d| d.to_string()).collect();
            s.push_str(&format!("{:<10} output shape:\t torch.Size([{}])\n", layer.name(), dims.join(", ")));
        }
        s.push_str(&format!("parameters: {}\n", self.param_elements(resolution)?));
        Ok(s)
    }

    /// Whether leaf `i` is a conv or linear layer followed by a ReLU, which then runs inside its
    /// kernel (the ReLU's output is the same tensor).
    pub fn fuses_relu(&self, leaves: &[Leaf], i: usize) -> bool {
        leaves[i].layer.has_params() && leaves.get(i + 1).map(|l| l.layer) == Some(Layer::Relu)
    }

    /// The conv layers at `batch` inputs of `resolution`^2, as the tuner sees them (indexed by
    /// their place in `leaves()`).
    pub fn conv_layers(&self, resolution: usize, batch: usize) -> Result<Vec<ConvLayer>> {
        let input = self.input_shape(batch, resolution);
        let shapes = self.leaf_shapes(&input)?;
        let leaves = self.leaves();
        let mut out = Vec::new();
        for (i, leaf) in leaves.iter().enumerate() {
            let Layer::Conv2d { out: c_out, kernel, stride, pad } = leaf.layer else { continue };
            let x = if i == 0 { input.to_vec() } else { shapes[i - 1].clone() };
            let params = Conv2dParams::new(x[0], x[1], x[2], x[3], c_out, kernel, kernel, stride, pad)?;
            out.push(ConvLayer { layer: i, params, relu: self.fuses_relu(&leaves, i), input_grad: i > 0 });
        }
        Ok(out)
    }

    /// The [`Footprint`] of training (`training`: the tape keeps every layer's output and
    /// max-pool's argmax, and the parameters have gradients) or of inference at `batch` inputs
    /// of `resolution`^2.
    pub fn footprint(&self, resolution: usize, batch: usize, training: bool) -> Result<Footprint> {
        const F32: u64 = 4;
        let overflow = || too_large(self.title, &self.input_shape(batch, resolution));
        let mul = |a: u64, b: u64| a.checked_mul(b).ok_or_else(overflow);
        let shapes = self.leaf_shapes(&self.input_shape(1, resolution))?;
        let per_example: Vec<u64> =
            shapes.iter().map(|s| elements_of(self.title, &s[1..]).map(|e| e as u64)).collect::<Result<_>>()?;
        let input = elements_of(self.title, &[self.in_channels, resolution, resolution])? as u64;
        let widest = per_example.iter().copied().chain([input]).max().unwrap_or(0);
        let weights = mul(self.param_elements(resolution)?, F32)?;
        let leaves = self.leaves();
        let (params, kept) = if training {
            // Every distinct output stays on the tape, max-pool's argmax too (4 bytes an
            // element): not a fused ReLU's (the same tensor as its layer's), nor Flatten's (a
            // view). The backward holds a gradient and its successor of the widest layer at once.
            let mut kept = input;
            for (i, (leaf, &e)) in leaves.iter().zip(&per_example).enumerate() {
                let fused_relu = i > 0 && leaf.layer == Layer::Relu && self.fuses_relu(&leaves, i - 1);
                let e = match leaf.layer {
                    Layer::Flatten => 0,
                    _ if fused_relu => 0,
                    Layer::MaxPool2d { .. } => mul(e, 2)?,
                    _ => e,
                };
                kept = kept.checked_add(e).ok_or_else(overflow)?;
            }
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
