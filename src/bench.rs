//! The training-step throughput as `../shared/peer/torch_alexnet.py bench` defines it (batch
//! 128, a synthetic 1x224x224 batch already on the GPU, 10 warm-up steps, 40 timed steps,
//! synchronised before and after), then the GPU time of every layer's forward and backward,
//! measured with CUDA events.
//!
//! Measurement only: [`run`] hands each figure to its caller as soon as it is known (the
//! `ptxgrad bench` command prints them as JSON lines and a table).

use std::time::Instant;

use crate::device::{Device, Gpu, HostTraffic};
use crate::error::{Error, Result};
use crate::nn::conv_tune::{self, LayerTuning};
use crate::nn::model::Model;
use crate::nn::network::{Layer, Network};
use crate::nn::Compute;
use crate::ops::conv2d::ConvAlgo;
use crate::ops::gemm::math::GemmMath;
use crate::ops::gemm::GemmOpts;
use crate::ops::{
    adaptive_avgpool2d, avgpool2d, conv2d, dense, dropout, maxpool2d, relu, resize, sgd, sigmoid, softmax_xent,
};
use crate::tensor::{Images, Labels, ReluFact, Tensor};
use crate::train::train_step;

/// What [`run`] measures, and how.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The network whose training step is timed (`nn::models`).
    pub net: &'static Network,
    pub device: Device,
    /// Examples per step (at least 1).
    pub batch_size: usize,
    /// Untimed steps first (module loads, the allocator's pool filling up).
    pub warmup: usize,
    /// Timed steps (at least 1).
    pub steps: usize,
    /// Input height and width.
    pub resolution: usize,
    /// After the timed steps, time each layer on its own ([`Measured::Layers`]; CUDA only).
    pub layers: bool,
    /// After the timed steps, run this many more inside a profiler range (cuProfilerStart /
    /// cuProfilerStop), for a profiler started with `--profile-from-start off`; CUDA only.
    pub profile_steps: usize,
    /// `auto`: each conv layer takes the fastest of the others as timed before the warm-up.
    pub conv_algo: ConvAlgo,
    pub math: GemmMath,
}

/// What runs the bench, said before any work.
#[derive(Debug, Clone)]
pub struct Env {
    /// `Device::label`: cpu, cuda:N or emu.
    pub device: String,
    /// `Device::hardware_name`: the GPU's name, or CPU.
    pub device_name: String,
    /// What compiled the kernels (`ptx::COMPILER`).
    pub kernels: &'static str,
}

/// What the timed steps did besides launching kernels (CUDA and emu; the goal is none of each).
#[derive(Debug, Clone, Copy)]
pub struct StepCounts {
    /// Device buffers allocated rather than taken from ptxgrad's cache (src/buffer_pool.rs).
    pub allocations: u64,
    /// Host <-> device copies and waits for the device.
    pub traffic: HostTraffic,
}

/// The timed training steps.
#[derive(Debug, Clone)]
pub struct StepTimes {
    /// The algorithm of each conv layer, in layer order (what `auto` chose, where asked).
    pub conv_algos: Vec<ConvAlgo>,
    /// Wall time per step (ms), synchronised before and after all of them.
    pub ms_per_step: f64,
    /// Wall time of all warm-up steps (s).
    pub warmup_s: f64,
    /// The driver pool's high-water mark (bytes): tensors, workspaces and the buffers held in
    /// ptxgrad's cache, not the CUDA context; closest to PyTorch's max_memory_reserved. None on
    /// the CPU and the emulator.
    pub peak_pool_bytes: Option<u64>,
    /// `Device::kernel_code`: machine code or PTX (None on the CPU).
    pub kernel_code: Option<String>,
    /// None on the CPU.
    pub counts: Option<StepCounts>,
}

impl StepTimes {
    /// Training examples per second at `batch_size` examples per step.
    pub fn examples_per_sec(&self, batch_size: usize) -> f64 {
        batch_size as f64 * 1e3 / self.ms_per_step
    }
}

/// GPU time of one [`LayerCase`]'s forward and backward, each the mean of `LAYER_REPS` runs.
#[derive(Debug, Clone)]
pub struct LayerTime {
    pub name: String,
    /// The convolution algorithm (conv layers only).
    pub algo: Option<ConvAlgo>,
    pub output: Vec<usize>,
    pub fwd_ms: f32,
    /// 0 where the case has no backward.
    pub bwd_ms: f32,
}

/// Runs of each layer's forward and backward that a [`LayerTime`] averages.
pub const LAYER_REPS: usize = 5;

/// What [`run`] has measured, in this order: `Env`, `Tunings`, `Steps`, then `Profiled` and
/// `Layers` where asked for.
#[derive(Debug, Clone, Copy)]
pub enum Measured<'a> {
    Env(&'a Env),
    /// One per conv layer: what each candidate algorithm measured and which one runs (empty
    /// unless `conv_algo` is `auto`).
    Tunings(&'a [LayerTuning]),
    Steps(&'a StepTimes),
    /// `steps` more training steps ran inside the profiler range, from step `first_step` on
    /// (counting the warm-up's from 0).
    Profiled {
        steps: usize,
        first_step: usize,
    },
    /// Every [`LayerCase`] timed on its own.
    Layers(&'a [LayerTime]),
}

/// Pseudo-random values in [-1, 1) for a layer's inputs.
fn rand_tensor(shape: &[usize], salt: u64, device: &Device) -> Result<Tensor> {
    Tensor::synthetic(shape, -1.0, 1.0, salt, device)
}

/// Wall time of `f` in ms, synchronised before and after.
fn wall_ms(device: &Device, f: impl FnOnce() -> Result<()>) -> Result<f64> {
    device.synchronize()?;
    let t = Instant::now();
    f()?;
    device.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Runs the bench `cfg` describes on a freshly initialised `cfg.net` (seed 0) and a synthetic
/// batch, stepping with the net's recipe's learning rate, handing each result to `on` as soon as it is measured (see [`Measured`]).
pub fn run(cfg: &BenchConfig, mut on: impl FnMut(Measured<'_>)) -> Result<()> {
    let device = &cfg.device;
    let (b, r) = (cfg.batch_size, cfg.resolution);
    if b == 0 || cfg.steps == 0 {
        return Err(Error::Invalid(format!(
            "bench: expected a batch size and a number of steps of at least 1, found {b} and {}",
            cfg.steps
        )));
    }
    let compute = Compute { gemm: GemmOpts::math(cfg.math), conv: cfg.conv_algo };
    compute.gemm.check_device(device)?;
    if cfg.profile_steps > 0 && !device.is_cuda() {
        return Err(Error::Invalid(format!("bench: profiling needs a CUDA device (or emu), found {}", device.label())));
    }
    on(Measured::Env(&Env {
        device: device.label(),
        device_name: device.hardware_name(),
        kernels: crate::ptx::COMPILER,
    }));
    let net = cfg.net;
    let lr = net.recipe.lr;
    let mut model = Model::new(net, r, 0, device)?.with_compute(compute)?;
    on(Measured::Tunings(&model.tune_convs(b, conv_tune::REPS)?));
    let conv_algos: Vec<ConvAlgo> = (net.leaves().iter().enumerate())
        .filter(|(_, l)| matches!(l.layer, Layer::Conv2d { .. }))
        .map(|(i, _)| model.conv_algo_of(i))
        .collect();
    let x = Tensor::synthetic(&[b, 1, r, r], 0.0, 1.0, 1, device)?;
    let labels: Vec<u32> = (0..b as u32).map(|i| (i * 7 + 3) % net.classes as u32).collect();
    let y = Labels::from_vec(&[b], labels, device)?;
    let t0 = Instant::now();
    for step in 0..cfg.warmup {
        train_step(&mut model, &x, &y, step as u64, lr, None)?;
    }
    device.synchronize()?;
    let warmup_s = t0.elapsed().as_secs_f64();
    // Counted around the timed steps only: (fresh device buffers, host traffic).
    let counters = || match device {
        Device::Cuda(g) => Some((g.pool_stats().fresh, g.host_traffic())),
        Device::Cpu => None,
    };
    let mut counts = None;
    let ms = wall_ms(device, || {
        let before = counters();
        for step in 0..cfg.steps {
            train_step(&mut model, &x, &y, (cfg.warmup + step) as u64, lr, None)?;
        }
        counts =
            counters().zip(before).map(|((fa, ta), (fb, tb))| StepCounts { allocations: fa - fb, traffic: ta - tb });
        Ok(())
    })?;
    let peak_pool_bytes = match device {
        Device::Cuda(g) => g.peak_pool_bytes(),
        Device::Cpu => None,
    };
    on(Measured::Steps(&StepTimes {
        conv_algos,
        ms_per_step: ms / cfg.steps as f64,
        warmup_s,
        peak_pool_bytes,
        kernel_code: device.kernel_code(),
        counts,
    }));
    if let (Device::Cuda(gpu), true) = (device, cfg.profile_steps > 0) {
        let first = cfg.warmup + cfg.steps;
        gpu.profiled(|| {
            for step in first..first + cfg.profile_steps {
                train_step(&mut model, &x, &y, step as u64, lr, None)?;
            }
            Ok(())
        })?;
        on(Measured::Profiled { steps: cfg.profile_steps, first_step: first });
    }
    if let (Device::Cuda(gpu), true) = (device, cfg.layers) {
        on(Measured::Layers(&layer_times(net, gpu, device, b, r, compute.gemm, &|i| model.conv_algo_of(i))?));
    }
    Ok(())
}

/// A queued unit of GPU work (one layer's forward or backward); it returns once the kernels are
/// launched.
pub type Work = Box<dyn FnMut() -> Result<()>>;

/// One step of the network, run in isolation on synthetic data: the layers of its table (a
/// fused ReLU included in its conv/linear layer), the input resize, the loss and SGD.
pub struct LayerCase {
    pub name: String,
    pub output: Vec<usize>,
    pub fwd: Work,
    /// None where the step has no backward (resize, SGD, flatten).
    pub bwd: Option<Work>,
    /// The convolution algorithm (conv layers only).
    pub algo: Option<ConvAlgo>,
}

/// The per-layer cases of `net` for a batch of `b` inputs of `r`x`r`, conv layer i (index in
/// `net.leaves()`) run by `algo_of(i)`; used by `ptxgrad bench` and the criterion bench `layers`.
pub fn layer_cases(
    net: &'static Network,
    device: &Device,
    b: usize,
    r: usize,
    gemm: GemmOpts,
    algo_of: &dyn Fn(usize) -> ConvAlgo,
) -> Result<Vec<LayerCase>> {
    if !net.is_sequential() {
        return Err(Error::Invalid(format!(
            "--layers times the layers of a network whose layers run one after another; {}'s blocks have \
             branches (time its whole step without --layers)",
            net.title
        )));
    }
    let input0 = net.input_shape(b, r).to_vec();
    let shapes = net.leaf_shapes(&input0)?;
    let leaves = net.leaves();
    let mut cases = Vec::new();
    // The input pipeline: uint8 28x28 -> f32 RxR.
    let images = Images::from_vec(&[b, 1, 28, 28], (0..b * 784).map(|i| (i * 31 % 251) as u8).collect(), device)?;
    let fwd: Work = Box::new(move || resize::resize_bilinear(&images, r, r).map(drop));
    cases.push(LayerCase { name: "resize 28->R".into(), output: input0.clone(), fwd, bwd: None, algo: None });

    let mut i = 0;
    while i < leaves.len() {
        let input = if i == 0 { input0.clone() } else { shapes[i - 1].clone() };
        let fused = net.fuses_relu(&leaves, i);
        // As in training: a max-pool after a ReLU masks the gradient it returns, so the layer
        // before it gets gy already masked (ops::relu), and the pool's input is a ReLU's output.
        let pooled = fused && matches!(leaves.get(i + 2).map(|l| l.layer), Some(Layer::MaxPool2d { .. }));
        let after_relu = i > 0 && leaves[i - 1].layer == Layer::Relu;
        let x = rand_tensor(&input, i as u64, device)?;
        let x = if after_relu { relu::relu_fwd(&x)? } else { x };
        let gy = rand_tensor(&shapes[i], 100 + i as u64, device)?;
        let (fwd, bwd): (Work, Option<Work>) = match leaves[i].layer {
            Layer::Conv2d { out, kernel, stride, pad } => {
                let conv = conv2d::Conv2d::new(stride, pad).relu(fused).algo(algo_of(i)).gemm(gemm);
                let w = rand_tensor(&[out, input[1], kernel, kernel], 200 + i as u64, device)?;
                let bias = Tensor::zeros(&[out], device)?;
                let y = conv2d::conv2d_fwd(&x, &w, &bias, &conv)?;
                let gy = if pooled { gy.with_relu_fact(ReluFact::MaskedFor(y.id())) } else { gy };
                let (x2, w2) = (x.clone(), w.clone());
                // The first layer's input needs no gradient (as in training).
                let need_gx = i > 0;
                (
                    Box::new(move || conv2d::conv2d_fwd(&x, &w, &bias, &conv).map(drop)),
                    Some(Box::new(move || {
                        let g = relu::through_fused_relu(fused.then_some(&y), &gy)?;
                        conv2d::conv2d_bwd(&x2, &w2, &g, &conv, need_gx).map(drop)
                    })),
                )
            }
            Layer::Linear { out } => {
                let w = rand_tensor(&[out, input[1]], 200 + i as u64, device)?;
                let bias = Tensor::zeros(&[out], device)?;
                let y = dense::dense_fwd(&x, &w, &bias, fused, gemm)?;
                let (x2, w2) = (x.clone(), w.clone());
                (
                    Box::new(move || dense::dense_fwd(&x, &w, &bias, fused, gemm).map(drop)),
                    Some(Box::new(move || {
                        let g = relu::through_fused_relu(fused.then_some(&y), &gy)?;
                        dense::dense_bwd(&x2, &w2, &g, true, gemm).map(drop)
                    })),
                )
            }
            Layer::MaxPool2d { kernel, stride, pad } => {
                let (_, argmax) = maxpool2d::maxpool2d_fwd(&x, kernel, stride, pad, after_relu)?;
                let shape = input.clone();
                (
                    Box::new(move || maxpool2d::maxpool2d_fwd(&x, kernel, stride, pad, after_relu).map(drop)),
                    Some(Box::new(move || {
                        maxpool2d::maxpool2d_bwd(&argmax, &gy, &shape, kernel, stride, pad).map(drop)
                    })),
                )
            }
            Layer::Dropout { p } => (
                Box::new(move || dropout::dropout_fwd(&x, p, 7).map(drop)),
                Some(Box::new(move || dropout::dropout_bwd(&gy, p, 7).map(drop))),
            ),
            Layer::Relu => {
                let x2 = x.clone();
                (
                    Box::new(move || relu::relu_fwd(&x).map(drop)),
                    Some(Box::new(move || relu::relu_bwd(&x2, &gy).map(drop))),
                )
            }
            // A view: no kernel.
            Layer::Flatten => (Box::new(|| Ok(())), None),
            Layer::Sigmoid => {
                let y = sigmoid::sigmoid_fwd(&x)?;
                (
                    Box::new(move || sigmoid::sigmoid_fwd(&x).map(drop)),
                    Some(Box::new(move || sigmoid::sigmoid_bwd(&y, &gy).map(drop))),
                )
            }
            Layer::AvgPool2d { kernel, stride } => {
                let pool = avgpool2d::AvgPool2d::new(kernel, stride, 0);
                let shape = input.clone();
                (
                    Box::new(move || avgpool2d::avgpool2d_fwd(&x, &pool).map(drop)),
                    Some(Box::new(move || avgpool2d::avgpool2d_bwd(&gy, &shape, &pool).map(drop))),
                )
            }
            Layer::GlobalAvgPool2d => {
                let shape = input.clone();
                (
                    Box::new(move || adaptive_avgpool2d::adaptive_avgpool2d_fwd(&x).map(drop)),
                    Some(Box::new(move || adaptive_avgpool2d::adaptive_avgpool2d_bwd(&gy, &shape).map(drop))),
                )
            }
            Layer::BatchNorm2d => {
                return Err(Error::Invalid(format!("--layers: {} has batch norm, which it does not time", net.title)))
            }
            Layer::Seq(_) | Layer::Inception { .. } | Layer::Residual { .. } => unreachable!("leaves() expands blocks"),
            Layer::Concat | Layer::Add => unreachable!("checked above: the network is sequential"),
        };
        let name = format!("{i:>2} {}{}", leaves[i].layer.name(), if fused { "+ReLU" } else { "" });
        let algo = matches!(leaves[i].layer, Layer::Conv2d { .. }).then(|| algo_of(i));
        cases.push(LayerCase { name, output: shapes[i].clone(), fwd, bwd, algo });
        i += if fused { 2 } else { 1 };
    }

    let classes = net.classes;
    let logits = rand_tensor(&[b, classes], 300, device)?;
    let labels = Labels::from_vec(&[b], (0..b as u32).map(|i| i % classes as u32).collect(), device)?;
    let (_, probs) = softmax_xent::softmax_xent_fwd(&logits, &labels)?;
    let one = Tensor::full(&[1], 1.0, device)?;
    let labels2 = labels.clone();
    cases.push(LayerCase {
        name: "softmax-xent".into(),
        output: vec![1],
        fwd: Box::new(move || softmax_xent::softmax_xent_fwd(&logits, &labels).map(drop)),
        bwd: Some(Box::new(move || softmax_xent::softmax_xent_bwd(&probs, &labels2, &one).map(drop))),
        algo: None,
    });

    let model = Model::new(net, r, 0, device)?;
    let count = model.param_count();
    let mut params: Vec<Tensor> = model.params.into_iter().map(|p| p.value).collect();
    let grads: Vec<Tensor> = params.iter().map(|p| Tensor::zeros(p.shape(), device)).collect::<Result<_>>()?;
    cases.push(LayerCase {
        name: "sgd (all params)".into(),
        output: vec![count],
        fwd: Box::new(move || params.iter_mut().zip(&grads).try_for_each(|(p, g)| sgd::sgd_update(p, g, 0.01))),
        bwd: None,
        algo: None,
    });
    Ok(cases)
}

fn time_avg(gpu: &Gpu, reps: usize, f: &mut Work) -> Result<f32> {
    f()?; // warm-up: loads the module, fills the allocator's pool
    let total = gpu.time_ms(|| (0..reps).try_for_each(|_| f()))?;
    Ok(total / reps as f32)
}

/// Every case of [`layer_cases`] of `net` timed on `gpu` (CUDA events; wall time on the
/// emulator).
pub fn layer_times(
    net: &'static Network,
    gpu: &Gpu,
    device: &Device,
    b: usize,
    r: usize,
    gemm: GemmOpts,
    algo_of: &dyn Fn(usize) -> ConvAlgo,
) -> Result<Vec<LayerTime>> {
    let mut rows = Vec::new();
    for mut case in layer_cases(net, device, b, r, gemm, algo_of)? {
        let fwd_ms = time_avg(gpu, LAYER_REPS, &mut case.fwd)?;
        let bwd_ms = match case.bwd.as_mut() {
            Some(bwd) => time_avg(gpu, LAYER_REPS, bwd)?,
            None => 0.0,
        };
        rows.push(LayerTime { name: case.name, algo: case.algo, output: case.output, fwd_ms, bwd_ms });
    }
    Ok(rows)
}
