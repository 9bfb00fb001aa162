//! `ptxgrad bench`: the training-step throughput as `../shared/peer/torch_alexnet.py bench`
//! defines it (batch 128, a synthetic 1x224x224 batch already on the GPU, 10 warm-up steps,
//! 40 timed steps, synchronised before and after), then the GPU time of every layer's forward
//! and backward, measured with CUDA events.

use std::time::Instant;

use clap::Args;
use serde_json::json;

use crate::device::{Device, Gpu};
use crate::error::{Error, Result};
use crate::nn::alexnet::{layer_shapes, AlexNet, Layer, LAYERS};
use crate::nn::conv_tune;
use crate::nn::Compute;
use crate::ops::conv2d::ConvAlgo;
use crate::ops::gemm::math::GemmMath;
use crate::ops::gemm::GemmOpts;
use crate::ops::{conv2d, dense, dropout, maxpool2d, relu, resize, sgd, softmax_xent};
use crate::tensor::{Images, Labels, ReluFact, Tensor};
use crate::train::train_step;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// Input height and width
    #[arg(long, default_value_t = 224)]
    pub resize: usize,
    /// cuda, cuda:N, cpu, or emu (the CUDA path on the kernel emulator); cpu and emu are very
    /// slow at 224: use --resize 65, a small batch and few steps
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Skip the per-layer table
    #[arg(long)]
    pub no_layers: bool,
    /// After the timed steps, run this many more inside a profiler range (cuProfilerStart /
    /// cuProfilerStop), for a profiler started with `--profile-from-start off`, e.g.
    /// `ncu --profile-from-start off ptxgrad bench --profile-steps 1` (scripts/gpu-check.sh)
    #[arg(long, default_value_t = 0)]
    pub profile_steps: usize,
    /// Convolution algorithm: auto (each conv layer takes the fastest of the others as timed
    /// before the warm-up, among those that agree with gemm), gemm (implicit GEMM), winograd
    /// (F(4x4,3x3) and F(2x2,5x5) where they apply), or winograd:M (output tile M)
    #[arg(long, default_value = "auto")]
    pub conv_algo: ConvAlgo,
    /// GEMM arithmetic (CUDA): fp32 (FFMAs, exact products: PyTorch's strict fp32), 3xtf32
    /// (three TF32 tensor-core products per multiply-add: about fp32's accuracy), tf32 (one,
    /// of operands rounded to 10 mantissa bits: PyTorch's default convolutions), or bf16 (one,
    /// of operands rounded to bfloat16: the products of PyTorch's bf16 autocast)
    #[arg(long, default_value = "fp32")]
    pub math: GemmMath,
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

pub fn run(a: &BenchArgs) -> Result<()> {
    let device = Device::parse(&a.device)?;
    let (b, r) = (a.batch_size, a.resize);
    if b == 0 || a.steps == 0 {
        return Err(Error::Data("--batch-size and --steps must be at least 1".into()));
    }
    if a.profile_steps > 0 && !device.is_cuda() {
        return Err(Error::Data(format!("--profile-steps needs a CUDA device (or emu), not {}", device.label())));
    }
    println!(
        "{}",
        json!({"kind": "env", "engine": "ptxgrad", "device": device.label(), "device_name": device.hardware_name(), "kernels": crate::ptx::COMPILER})
    );
    let compute = Compute { gemm: GemmOpts::math(a.math), conv: a.conv_algo };
    let mut model = AlexNet::new(r, 0, &device)?.with_compute(compute)?;
    // auto: one line per conv layer, what each candidate measured and which one runs.
    for t in model.tune_convs(b, conv_tune::REPS)? {
        println!("{}", conv_tune::to_json(&t));
    }
    let conv_layers: Vec<usize> = (0..LAYERS.len()).filter(|&i| matches!(LAYERS[i], Layer::Conv2d { .. })).collect();
    let conv_algos: Vec<String> = conv_layers.iter().map(|&i| model.conv_algo_of(i).to_string()).collect();
    let x = Tensor::synthetic(&[b, 1, r, r], 0.0, 1.0, 1, &device)?;
    let labels: Vec<u32> = (0..b as u32).map(|i| (i * 7 + 3) % 10).collect();
    let y = Labels::from_vec(&[b], labels, &device)?;
    let t0 = Instant::now();
    for step in 0..a.warmup {
        train_step(&mut model, &x, &y, step as u64, 0.01, None)?;
    }
    device.synchronize()?;
    let warmup_s = t0.elapsed().as_secs_f64();
    // What the timed steps do besides launching kernels: device buffers allocated (not taken
    // from the cache), host <-> device copies, waits for the device. The goal is none of each.
    let counters = || match &device {
        Device::Cuda(g) => Some((g.pool_stats().fresh, g.host_traffic())),
        Device::Cpu => None,
    };
    let mut counted = None;
    let ms = wall_ms(&device, || {
        let before = counters();
        for step in 0..a.steps {
            train_step(&mut model, &x, &y, (a.warmup + step) as u64, 0.01, None)?;
        }
        counted = counters().zip(before).map(|((fa, ta), (fb, tb))| (fa - fb, ta - tb));
        Ok(())
    })?;
    let ms_per_step = ms / a.steps as f64;
    // The driver pool's high-water mark: tensors, workspaces and the buffers held in ptxgrad's
    // cache (src/pool.rs), not the CUDA context; closest to PyTorch's max_memory_reserved.
    let peak_gib = match &device {
        Device::Cuda(g) => g.peak_pool_bytes().map(|b| b as f64 / (1u64 << 30) as f64),
        Device::Cpu => None,
    };
    println!(
        "{}",
        json!({
            "kind": "bench", "config": format!("ptxgrad-{}", a.math), "math": a.math.to_string(), "conv_algo": a.conv_algo.to_string(), "conv_algos": conv_algos, "batch": b, "resolution": r,
            "examples_per_sec": (b as f64 * 1e3 / ms_per_step * 10.0).round() / 10.0,
            "ms_per_step": (ms_per_step * 1e3).round() / 1e3, "warmup_s": (warmup_s * 100.0).round() / 100.0,
            "peak_mem_gib": peak_gib.map(|m| (m * 100.0).round() / 100.0),
            "kernel_code": device.kernel_code(),
            "allocations_in_timed_steps": counted.map(|(fresh, _)| fresh),
            "host_copies_in_timed_steps": counted.map(|(_, t)| t.uploads + t.downloads),
            "synchronizations_in_timed_steps": counted.map(|(_, t)| t.synchronizations),
        })
    );
    if let (Device::Cuda(gpu), true) = (&device, a.profile_steps > 0) {
        let first = a.warmup + a.steps;
        gpu.profiled(|| {
            for step in first..first + a.profile_steps {
                train_step(&mut model, &x, &y, step as u64, 0.01, None)?;
            }
            Ok(())
        })?;
        println!("{}", json!({"kind": "profiled", "steps": a.profile_steps, "first_step": first}));
    }
    if let (Device::Cuda(gpu), false) = (&device, a.no_layers) {
        layer_table(gpu, &device, b, r, compute.gemm, &|i| model.conv_algo_of(i))?;
    }
    Ok(())
}

/// A queued unit of GPU work (one layer's forward or backward); it returns once the kernels are
/// launched.
pub type Work = Box<dyn FnMut() -> Result<()>>;

/// One step of the network, run in isolation on synthetic data: the layers of `LAYERS` (a
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

/// The per-layer cases for a batch of `b` inputs of `r`x`r`, with the AlexNet shapes and conv
/// layer i (index in LAYERS) run by `algo_of(i)`; used by `ptxgrad bench` and the criterion
/// bench `layers`.
pub fn layer_cases(
    device: &Device,
    b: usize,
    r: usize,
    gemm: GemmOpts,
    algo_of: &dyn Fn(usize) -> ConvAlgo,
) -> Result<Vec<LayerCase>> {
    let shapes = layer_shapes(&[b, 1, r, r])?;
    let mut cases = Vec::new();
    // The input pipeline: uint8 28x28 -> f32 RxR.
    let images = Images::from_vec(&[b, 1, 28, 28], (0..b * 784).map(|i| (i * 31 % 251) as u8).collect(), device)?;
    let fwd: Work = Box::new(move || resize::resize_bilinear(&images, r, r).map(drop));
    cases.push(LayerCase { name: "resize 28->R".into(), output: vec![b, 1, r, r], fwd, bwd: None, algo: None });

    let mut i = 0;
    while i < LAYERS.len() {
        let input = if i == 0 { vec![b, 1, r, r] } else { shapes[i - 1].clone() };
        let fused = LAYERS.get(i + 1) == Some(&Layer::Relu);
        // As in training: a max-pool after a ReLU masks the gradient it returns, so the layer
        // before it gets gy already masked (ops::relu), and the pool's input is a ReLU's output.
        let pooled = fused && matches!(LAYERS.get(i + 2), Some(Layer::MaxPool2d { .. }));
        let after_relu = i > 0 && LAYERS[i - 1] == Layer::Relu;
        let x = rand_tensor(&input, i as u64, device)?;
        let x = if after_relu { relu::relu_fwd(&x)? } else { x };
        let gy = rand_tensor(&shapes[i], 100 + i as u64, device)?;
        let (fwd, bwd): (Work, Option<Work>) = match LAYERS[i] {
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
            Layer::MaxPool2d { kernel, stride } => {
                let (_, argmax) = maxpool2d::maxpool2d_fwd(&x, kernel, stride, after_relu)?;
                let shape = input.clone();
                (
                    Box::new(move || maxpool2d::maxpool2d_fwd(&x, kernel, stride, after_relu).map(drop)),
                    Some(Box::new(move || maxpool2d::maxpool2d_bwd(&argmax, &gy, &shape, kernel, stride).map(drop))),
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
        };
        let name = format!("{i:>2} {}{}", LAYERS[i].name(), if fused { "+ReLU" } else { "" });
        let algo = matches!(LAYERS[i], Layer::Conv2d { .. }).then(|| algo_of(i));
        cases.push(LayerCase { name, output: shapes[i].clone(), fwd, bwd, algo });
        i += if fused { 2 } else { 1 };
    }

    let logits = rand_tensor(&[b, 10], 300, device)?;
    let labels = Labels::from_vec(&[b], (0..b as u32).map(|i| i % 10).collect(), device)?;
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

    let model = AlexNet::new(r, 0, device)?;
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

/// GPU time of one case's forward and backward, averaged over reps.
struct LayerTime {
    name: String,
    algo: Option<ConvAlgo>,
    output: Vec<usize>,
    fwd_ms: f32,
    bwd_ms: f32,
}

fn time_avg(gpu: &Gpu, reps: usize, f: &mut Work) -> Result<f32> {
    f()?; // warm-up: loads the module, fills the allocator's pool
    let total = gpu.time_ms(|| (0..reps).try_for_each(|_| f()))?;
    Ok(total / reps as f32)
}

fn layer_table(
    gpu: &Gpu,
    device: &Device,
    b: usize,
    r: usize,
    gemm: GemmOpts,
    algo_of: &dyn Fn(usize) -> ConvAlgo,
) -> Result<()> {
    const REPS: usize = 5;
    let mut rows = Vec::new();
    for mut case in layer_cases(device, b, r, gemm, algo_of)? {
        let fwd_ms = time_avg(gpu, REPS, &mut case.fwd)?;
        let bwd_ms = match case.bwd.as_mut() {
            Some(bwd) => time_avg(gpu, REPS, bwd)?,
            None => 0.0,
        };
        rows.push(LayerTime { name: case.name, algo: case.algo, output: case.output, fwd_ms, bwd_ms });
    }

    let total: f32 = rows.iter().map(|r| r.fwd_ms + r.bwd_ms).sum();
    for row in &rows {
        println!(
            "{}",
            json!({"kind": "layer", "layer": row.name.trim(), "algo": row.algo.map(|a| a.to_string()),
                   "output": row.output, "fwd_ms": row.fwd_ms, "bwd_ms": row.bwd_ms})
        );
    }
    let clock = if gpu.is_emu() { "wall time on the kernel emulator" } else { "CUDA events" };
    println!("\nper-layer GPU time, batch {b} at {r}x{r} ({clock}, mean of {REPS}):");
    println!("{:<22} {:<11} {:>20} {:>9} {:>9} {:>7}", "layer", "algorithm", "output", "fwd ms", "bwd ms", "share");
    for row in &rows {
        println!(
            "{:<22} {:<11} {:>20} {:>9.3} {:>9.3} {:>6.1}%",
            row.name,
            row.algo.map_or(String::new(), |a| a.to_string()),
            format!("{:?}", row.output),
            row.fwd_ms,
            row.bwd_ms,
            100.0 * (row.fwd_ms + row.bwd_ms) / total
        );
    }
    println!("{:<22} {:<11} {:>20} {:>19.3}", "total", "", "", total);
    Ok(())
}
