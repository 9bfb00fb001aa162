//! A network as data: a table of layers (`Layer`, with `Layer::Seq` for PyTorch's nested
//! `nn.Sequential` blocks, and the book's two blocks whose branches join, `Inception` and
//! `Residual`) and the recipe it trains with. Everything else derives from the table: the output
//! shape of every layer, the `state_dict` names (PyTorch's, so a checkpoint loads into the peer's
//! model as is: `0.weight`, `2.0.weight` inside block 2, `1.0.bn1.running_mean` in a residual
//! block) and shapes, the book's `summary`, the memory a run needs, and the conv layers the tuner
//! measures. The forward pass (`nn::model`) walks the same table.
//!
//! `leaves()` expands the table into a graph in execution order: each leaf names the leaves (or
//! the network's input) it reads, so that a block's branches read the block's input and a join
//! (`Concat`, `Add`) reads the branches' ends.
//!
//! Shapes: an image layer maps (N, C, H, W) to (N, C', H', W'); `Flatten` maps (N, C, H, W) to
//! (N, C*H*W); `Linear` maps (N, F) to (N, F'); `Concat` maps inputs (N, C_i, H, W) to
//! (N, sum C_i, H, W).

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
    /// `nn.MaxPool2d(kernel, stride, pad)`: padding never wins a window.
    MaxPool2d {
        kernel: usize,
        stride: usize,
        pad: usize,
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
    /// `nn.BatchNorm2d(C)`, C from the input: per channel, normalised by the batch's statistics
    /// in training and by the running ones in evaluation (ops::batchnorm2d); a weight (gamma),
    /// a bias (beta), and the buffers `running_mean`, `running_var`, `num_batches_tracked`.
    BatchNorm2d,
    /// `nn.Sequential(...)`: a block whose layers are named `<block>.<i>`.
    Seq(&'static [Layer]),
    /// The book's Inception block (§8.4): four branches on the block's input, joined along the
    /// channels: `p1_1` 1x1 conv to `c1`; `p2_1` 1x1 to `c2.0`, `p2_2` 3x3 to `c2.1`; `p3_1` 1x1 to
    /// `c3.0`, `p3_2` 5x5 to `c3.1`; `p4_1` 3x3 max-pool (stride 1, pad 1), `p4_2` 1x1 to `c4`;
    /// every conv followed by a ReLU.
    Inception {
        c1: usize,
        c2: (usize, usize),
        c3: (usize, usize),
        c4: usize,
    },
    /// The book's residual block (§8.6): relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)),
    /// `conv1` 3x3 with `stride`, `conv2` 3x3, both to `out` channels with padding 1; the shortcut
    /// x itself, or with `conv1x1` the 1x1 conv `conv3` (to `out`, with `stride`).
    Residual {
        out: usize,
        conv1x1: bool,
        stride: usize,
    },
    /// The join of a block's branches along the channels (`torch.cat(.., dim=1)`); made by the
    /// expansion of `Inception` in `leaves()`, not written in a table.
    Concat,
    /// The sum of a residual block's two paths; made by the expansion of `Residual`, not written
    /// in a table.
    Add,
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
            Layer::BatchNorm2d => "BatchNorm2d",
            Layer::Seq(_) => "Sequential",
            Layer::Inception { .. } => "Inception",
            Layer::Residual { .. } => "Residual",
            Layer::Concat => "Concat",
            Layer::Add => "Add",
        }
    }
}

/// What a leaf reads: the network's input, or the output of an earlier leaf (its index in
/// `Network::leaves()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Input,
    Leaf(usize),
}

/// What a `state_dict` entry is: a trainable parameter (f32), a buffer the forward pass updates
/// (batch norm's running statistics, f32), or batch norm's `num_batches_tracked` (an int64
/// scalar).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    Param,
    Buffer,
    Count,
}

/// One `state_dict` entry: its name, shape and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: StateKind,
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

/// A layer of the expanded table: what the forward pass runs, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Leaf {
    /// The `state_dict` prefix: `3`, `2.0` for layer 0 of block 2, `1.0.conv1` in a residual
    /// block (a layer without parameters has its block's, or the conv's it follows).
    pub path: String,
    /// Never a block (`Seq`, `Inception`, `Residual`): those are expanded.
    pub layer: Layer,
    /// The index of the top-level entry (block or layer) it belongs to.
    pub top: usize,
    /// What it reads: one source, or a join's several.
    pub inputs: Vec<Source>,
    /// Sorts the leaves into `state_dict` order: the module registration index at each level of
    /// the path (a residual block registers conv1, conv2, conv3, bn1, bn2, not the order they
    /// run in).
    order: Vec<usize>,
}

/// Appends a leaf and returns it as a source.
fn push(out: &mut Vec<Leaf>, path: String, layer: Layer, top: usize, inputs: Vec<Source>, order: Vec<usize>) -> Source {
    out.push(Leaf { path, layer, top, inputs, order });
    Source::Leaf(out.len() - 1)
}

/// `order` with `i` appended.
fn sub(order: &[usize], i: usize) -> Vec<usize> {
    order.iter().copied().chain([i]).collect()
}

/// Expands the layers of `layers` (under `prefix`, registration indices `order`, reading `input`)
/// into `out`; returns the source of their output.
fn walk(
    layers: &[Layer],
    prefix: &str,
    order: &[usize],
    top: Option<usize>,
    input: Source,
    out: &mut Vec<Leaf>,
) -> Source {
    let mut x = input;
    for (i, layer) in layers.iter().enumerate() {
        let path = if prefix.is_empty() { i.to_string() } else { format!("{prefix}.{i}") };
        let (top, order) = (top.unwrap_or(i), sub(order, i));
        x = match *layer {
            Layer::Seq(inner) => walk(inner, &path, &order, Some(top), x, out),
            Layer::Inception { c1, c2, c3, c4 } => {
                inception(&path, &order, top, x, [c1, c2.0, c2.1, c3.0, c3.1, c4], out)
            }
            Layer::Residual { out: c, conv1x1, stride } => residual(&path, &order, top, x, c, conv1x1, stride, out),
            leaf => push(out, path, leaf, top, vec![x], order),
        };
    }
    x
}

/// `conv` then its ReLU, both reading from `x`'s chain, under `path`; returns the ReLU.
fn conv_relu(out: &mut Vec<Leaf>, path: String, conv: Layer, top: usize, x: Source, order: Vec<usize>) -> Source {
    let c = push(out, path.clone(), conv, top, vec![x], order.clone());
    push(out, path, Layer::Relu, top, vec![c], order)
}

/// A k x k stride-1 convolution to `out` channels that keeps the size.
fn same_conv(out: usize, kernel: usize) -> Layer {
    Layer::Conv2d { out, kernel, stride: 1, pad: kernel / 2 }
}

/// Inception (see `Layer::Inception`): c = [c1, c2.0, c2.1, c3.0, c3.1, c4]. Registration order
/// is execution order (p1_1, p2_1, p2_2, p3_1, p3_2, p4_1, p4_2).
fn inception(path: &str, order: &[usize], top: usize, x: Source, c: [usize; 6], out: &mut Vec<Leaf>) -> Source {
    let at = |name: &str| format!("{path}.{name}");
    let b1 = conv_relu(out, at("p1_1"), same_conv(c[0], 1), top, x, sub(order, 0));
    let b2 = conv_relu(out, at("p2_1"), same_conv(c[1], 1), top, x, sub(order, 1));
    let b2 = conv_relu(out, at("p2_2"), same_conv(c[2], 3), top, b2, sub(order, 2));
    let b3 = conv_relu(out, at("p3_1"), same_conv(c[3], 1), top, x, sub(order, 3));
    let b3 = conv_relu(out, at("p3_2"), same_conv(c[4], 5), top, b3, sub(order, 4));
    let pool = Layer::MaxPool2d { kernel: 3, stride: 1, pad: 1 };
    let b4 = push(out, at("p4_1"), pool, top, vec![x], sub(order, 5));
    let b4 = conv_relu(out, at("p4_2"), same_conv(c[5], 1), top, b4, sub(order, 6));
    push(out, path.to_string(), Layer::Concat, top, vec![b1, b2, b3, b4], sub(order, 7))
}

/// Residual (see `Layer::Residual`), registered as conv1, conv2, conv3, bn1, bn2.
#[allow(clippy::too_many_arguments)]
fn residual(
    path: &str,
    order: &[usize],
    top: usize,
    x: Source,
    c: usize,
    conv1x1: bool,
    stride: usize,
    out: &mut Vec<Leaf>,
) -> Source {
    let at = |name: &str| format!("{path}.{name}");
    let conv1 = Layer::Conv2d { out: c, kernel: 3, stride, pad: 1 };
    let y = push(out, at("conv1"), conv1, top, vec![x], sub(order, 0));
    let y = push(out, at("bn1"), Layer::BatchNorm2d, top, vec![y], sub(order, 3));
    let y = push(out, at("bn1"), Layer::Relu, top, vec![y], sub(order, 3));
    let y = push(out, at("conv2"), same_conv(c, 3), top, vec![y], sub(order, 1));
    let y = push(out, at("bn2"), Layer::BatchNorm2d, top, vec![y], sub(order, 4));
    let shortcut = if conv1x1 {
        let conv3 = Layer::Conv2d { out: c, kernel: 1, stride, pad: 0 };
        push(out, at("conv3"), conv3, top, vec![x], sub(order, 2))
    } else {
        x
    };
    let sum = push(out, path.to_string(), Layer::Add, top, vec![y, shortcut], sub(order, 5));
    push(out, path.to_string(), Layer::Relu, top, vec![sum], sub(order, 5))
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

/// The output shape of the leaf `layer` of network `op` for `inputs` (one shape, or a join's
/// several); Ok(None) where a window does not fit.
fn leaf_output(op: &'static str, layer: &Layer, inputs: &[&[usize]]) -> Result<Option<Vec<usize>>> {
    let input = inputs[0];
    let flat = |what: &str| -> Result<[usize; 2]> {
        <[usize; 2]>::try_from(input)
            .map_err(|_| Error::shape(op, format!("a 2-D (N, F) input to {what}"), format!("{input:?}")))
    };
    Ok(match *layer {
        Layer::Conv2d { out, kernel, stride, pad } => {
            windowed(op, input, kernel, stride, pad)?.map(|[n, _, h, w]| vec![n, out, h, w])
        }
        Layer::MaxPool2d { kernel, stride, pad } => windowed(op, input, kernel, stride, pad)?.map(|s| s.to_vec()),
        Layer::AvgPool2d { kernel, stride } => windowed(op, input, kernel, stride, 0)?.map(|s| s.to_vec()),
        Layer::GlobalAvgPool2d => windowed(op, input, 1, 1, 0)?.map(|[n, c, _, _]| vec![n, c, 1, 1]),
        Layer::Flatten => Some(vec![input[0], elements_of(op, &input[1..])?]),
        Layer::Linear { out } => Some(vec![flat("Linear")?[0], out]),
        Layer::Relu | Layer::Sigmoid | Layer::Dropout { .. } => Some(input.to_vec()),
        // windowed(1, 1, 0): the 4-D check, the shape as it is.
        Layer::BatchNorm2d => windowed(op, input, 1, 1, 0)?.map(|s| s.to_vec()),
        Layer::Concat => {
            let Some(mut y) = windowed(op, input, 1, 1, 0)?.map(|s| s.to_vec()) else { return Ok(None) };
            for x in &inputs[1..] {
                if x.len() != 4 || x[0] != y[0] || x[2..] != y[2..] {
                    return Err(Error::shape(
                        op,
                        format!("branches of (N, C, {}, {}) to join", y[2], y[3]),
                        format!("{x:?}"),
                    ));
                }
                y[1] = y[1].checked_add(x[1]).ok_or_else(|| too_large(op, x))?;
            }
            Some(y)
        }
        Layer::Add => {
            if inputs.len() != 2 || inputs[0] != inputs[1] {
                return Err(Error::shape(op, format!("two paths of shape {input:?} to add"), format!("{inputs:?}")));
            }
            Some(input.to_vec())
        }
        Layer::Seq(_) | Layer::Inception { .. } | Layer::Residual { .. } => unreachable!("leaves() expands blocks"),
    })
}

impl Network {
    /// The layers the forward pass runs, in order, blocks expanded (see the module comment).
    pub fn leaves(&self) -> Vec<Leaf> {
        let mut out = Vec::new();
        walk(self.layers, "", &[], None, Source::Input, &mut out);
        out
    }

    /// Whether every leaf reads the one before it (no block whose branches join): the networks
    /// of chapter 7 and AlexNet, VGG, NiN.
    pub fn is_sequential(&self) -> bool {
        self.leaves()
            .iter()
            .enumerate()
            .all(|(i, l)| l.inputs == [if i == 0 { Source::Input } else { Source::Leaf(i - 1) }])
    }

    /// The input shape for `batch` images of `resolution`^2.
    pub fn input_shape(&self, batch: usize, resolution: usize) -> [usize; 4] {
        [batch, self.in_channels, resolution, resolution]
    }

    /// Each leaf's output shape for `input` (N, C, H, W), or None where a window does not fit.
    fn try_shapes(&self, input: &[usize]) -> Result<Option<Vec<Vec<usize>>>> {
        let mut shapes: Vec<Vec<usize>> = Vec::new();
        for leaf in self.leaves() {
            let inputs: Vec<&[usize]> = leaf.inputs.iter().map(|&s| source_shape(s, input, &shapes)).collect();
            match leaf_output(self.title, &leaf.layer, &inputs)? {
                Some(next) => shapes.push(next),
                None => return Ok(None),
            }
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

    /// The `state_dict` for inputs of `resolution`^2, in PyTorch's order: per conv / linear
    /// layer `<path>.weight` (out, in, k, k) or (out, in), `<path>.bias`; per batch norm
    /// `<path>.weight`, `.bias` (C), the buffers `.running_mean`, `.running_var` (C) and the
    /// count `.num_batches_tracked` ([]).
    pub fn state_shapes(&self, resolution: usize) -> Result<Vec<StateEntry>> {
        let input = self.input_shape(1, resolution);
        let shapes = self.leaf_shapes(&input)?;
        let mut leaves: Vec<(usize, Leaf)> = self.leaves().into_iter().enumerate().collect();
        leaves.sort_by(|a, b| a.1.order.cmp(&b.1.order)); // stable: a leaf's ReLU stays after it
        let mut out = Vec::new();
        let mut entry = |path: &str, name: &str, shape: Vec<usize>, kind: StateKind| {
            out.push(StateEntry { name: format!("{path}.{name}"), shape, kind })
        };
        for (i, leaf) in &leaves {
            let x = source_shape(leaf.inputs[0], &input, &shapes);
            let (weight, c) = match leaf.layer {
                Layer::Conv2d { out, kernel, .. } => (vec![out, x[1], kernel, kernel], out),
                Layer::Linear { out } => (vec![out, x[1]], out),
                Layer::BatchNorm2d => (vec![x[1]], x[1]),
                _ => continue,
            };
            debug_assert_eq!(shapes[*i][1], c);
            entry(&leaf.path, "weight", weight, StateKind::Param);
            entry(&leaf.path, "bias", vec![c], StateKind::Param);
            if leaf.layer == Layer::BatchNorm2d {
                entry(&leaf.path, "running_mean", vec![c], StateKind::Buffer);
                entry(&leaf.path, "running_var", vec![c], StateKind::Buffer);
                entry(&leaf.path, "num_batches_tracked", vec![], StateKind::Count);
            }
        }
        Ok(out)
    }

    /// The trainable parameters' (`state_dict` name, shape) pairs, in `state_dict` order (the
    /// `StateKind::Param` entries of `state_shapes`).
    pub fn param_shapes(&self, resolution: usize) -> Result<Vec<(String, Vec<usize>)>> {
        let entries = self.state_shapes(resolution)?;
        Ok(entries.into_iter().filter(|e| e.kind == StateKind::Param).map(|e| (e.name, e.shape)).collect())
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
                self.state_shapes(r).is_ok_and(|want| want.iter().all(|e| params.get(&e.name) == Some(&e.shape)))
            })
            .collect()
    }

    /// Whether `params` holds exactly this network's `state_dict` names (whatever their shapes).
    pub fn has_param_names(&self, params: &HashMap<String, Vec<usize>>) -> bool {
        match self.state_shapes(self.min_resolution()) {
            Ok(want) => want.len() == params.len() && want.iter().all(|e| params.contains_key(&e.name)),
            Err(_) => false,
        }
    }

    /// Why `params` is not this network's at `resolution`: the first missing, unexpected or
    /// misshapen tensor (None when it fits).
    pub fn misfit(&self, params: &HashMap<String, Vec<usize>>, resolution: usize) -> Option<String> {
        let at = format!("{} at {resolution}x{resolution}", self.title);
        let want = match self.state_shapes(resolution) {
            Ok(want) => want,
            Err(e) => return Some(e.to_string()),
        };
        for StateEntry { name, shape, .. } in &want {
            match params.get(name) {
                None => return Some(format!("no tensor `{name}` (expected {at})")),
                Some(found) if found != shape => {
                    return Some(format!("tensor `{name}`: expected shape {shape:?} ({at}), found {found:?}"))
                }
                Some(_) => {}
            }
        }
        let mut extra: Vec<&String> = params.keys().filter(|k| !want.iter().any(|e| &e.name == *k)).collect();
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

    /// Whether leaf `i` is a conv or linear layer followed by a ReLU that alone reads it, which
    /// then runs inside its kernel (the ReLU's output is the same tensor).
    pub fn fuses_relu(&self, leaves: &[Leaf], i: usize) -> bool {
        let readers = leaves.iter().filter(|l| l.inputs.contains(&Source::Leaf(i))).count();
        matches!(leaves[i].layer, Layer::Conv2d { .. } | Layer::Linear { .. })
            && leaves.get(i + 1).is_some_and(|l| l.layer == Layer::Relu && l.inputs == [Source::Leaf(i)])
            && readers == 1
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
            let x = source_shape(leaf.inputs[0], &input, &shapes);
            let params = Conv2dParams::new(x[0], x[1], x[2], x[3], c_out, kernel, kernel, stride, pad)?;
            let input_grad = leaf.inputs[0] != Source::Input;
            out.push(ConvLayer { layer: i, params, relu: self.fuses_relu(&leaves, i), input_grad });
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
            // view), nor the outputs of batch norm and of a residual sum, which only a ReLU or
            // a sum reads (and those keep their own output, not their input). The backward holds
            // a gradient and its successor of the widest layer at once.
            let mut kept = input;
            for (i, (leaf, &e)) in leaves.iter().zip(&per_example).enumerate() {
                let fused_relu = i > 0 && leaf.layer == Layer::Relu && self.fuses_relu(&leaves, i - 1);
                let e = match leaf.layer {
                    Layer::Flatten | Layer::BatchNorm2d | Layer::Add => 0,
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

/// The shape `source` gives: the network's `input`, or an earlier leaf's (`shapes`).
fn source_shape<'a>(source: Source, input: &'a [usize], shapes: &'a [Vec<usize>]) -> &'a [usize] {
    match source {
        Source::Input => input,
        Source::Leaf(j) => &shapes[j],
    }
}
