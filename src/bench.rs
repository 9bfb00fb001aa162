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
use crate::ops::{conv2d, dense, dropout, maxpool2d, relu, resize, sgd, softmax_xent};
use crate::tensor::{Images, Labels, Tensor};
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
    /// cuda, cuda:N or cpu (the CPU is very slow at 224: use --resize 67 and few steps)
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Skip the per-layer table
    #[arg(long)]
    pub no_layers: bool,
}

/// Deterministic pseudo-random values in [lo, hi) (no RNG state to carry around).
fn synthetic(n: usize, lo: f32, hi: f32, salt: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = (i ^ salt.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            lo + (hi - lo) * ((z >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

fn rand_tensor(shape: &[usize], salt: u64, device: &Device) -> Result<Tensor> {
    Tensor::from_vec(shape, synthetic(shape.iter().product(), -1.0, 1.0, salt), device)
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
    println!(
        "{}",
        json!({"kind": "env", "engine": "ptxgrad", "device": device.label(), "device_name": device.hardware_name(), "kernels": crate::ptx::COMPILER})
    );
    let mut model = AlexNet::new(r, 0, &device)?;
    let x = Tensor::from_vec(&[b, 1, r, r], synthetic(b * r * r, 0.0, 1.0, 1), &device)?;
    let labels: Vec<u32> = (0..b as u32).map(|i| (i * 7 + 3) % 10).collect();
    let y = Labels::from_vec(&[b], labels, &device)?;
    let t0 = Instant::now();
    for step in 0..a.warmup {
        train_step(&mut model, &x, &y, step as u64, 0.01, None)?;
    }
    device.synchronize()?;
    let warmup_s = t0.elapsed().as_secs_f64();
    let ms = wall_ms(&device, || {
        for step in 0..a.steps {
            train_step(&mut model, &x, &y, (a.warmup + step) as u64, 0.01, None)?;
        }
        Ok(())
    })?;
    let ms_per_step = ms / a.steps as f64;
    // The allocation pool's high-water mark: like PyTorch's max_memory_allocated, it counts
    // tensors and workspaces, not the CUDA context.
    let peak_gib = match &device {
        Device::Cuda(g) => g.peak_pool_bytes().map(|b| b as f64 / (1u64 << 30) as f64),
        Device::Cpu => None,
    };
    println!(
        "{}",
        json!({
            "kind": "bench", "config": "ptxgrad-fp32", "batch": b, "resolution": r,
            "examples_per_sec": (b as f64 * 1e3 / ms_per_step * 10.0).round() / 10.0,
            "ms_per_step": (ms_per_step * 1e3).round() / 1e3, "warmup_s": (warmup_s * 100.0).round() / 100.0,
            "peak_mem_gib": peak_gib.map(|m| (m * 100.0).round() / 100.0),
        })
    );
    if let (Device::Cuda(gpu), false) = (&device, a.no_layers) {
        layer_table(gpu, &device, b, r)?;
    }
    Ok(())
}

/// GPU time of one layer's forward and backward (fused ReLU included), averaged over reps.
struct LayerTime {
    name: String,
    output: Vec<usize>,
    fwd_ms: f32,
    bwd_ms: f32,
}

fn time_avg(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f32> {
    f()?; // warm-up: loads the module, fills the allocator's pool
    let total = gpu.time_ms(|| (0..reps).try_for_each(|_| f()))?;
    Ok(total / reps as f32)
}

fn layer_table(gpu: &Gpu, device: &Device, b: usize, r: usize) -> Result<()> {
    const REPS: usize = 5;
    let shapes = layer_shapes(&[b, 1, r, r])?;
    let mut rows = Vec::new();
    // The input pipeline: uint8 28x28 -> f32 RxR.
    let images = Images::from_vec(&[b, 1, 28, 28], (0..b * 784).map(|i| (i * 31 % 251) as u8).collect(), device)?;
    let fwd = time_avg(gpu, REPS, || resize::resize_bilinear(&images, r, r).map(drop))?;
    rows.push(LayerTime { name: "resize 28->R".into(), output: vec![b, 1, r, r], fwd_ms: fwd, bwd_ms: 0.0 });

    let mut i = 0;
    while i < LAYERS.len() {
        let input = if i == 0 { vec![b, 1, r, r] } else { shapes[i - 1].clone() };
        let fused = LAYERS.get(i + 1) == Some(&Layer::Relu);
        let x = rand_tensor(&input, i as u64, device)?;
        let gy = rand_tensor(&shapes[i], 100 + i as u64, device)?;
        let mut name = LAYERS[i].name().to_string();
        let (fwd_ms, bwd_ms) = match LAYERS[i] {
            Layer::Conv2d { out, kernel, stride, pad } => {
                let w = rand_tensor(&[out, input[1], kernel, kernel], 200 + i as u64, device)?;
                let bias = Tensor::zeros(&[out], device)?;
                let y = conv2d::conv2d_fwd(&x, &w, &bias, stride, pad, fused)?;
                let f = time_avg(gpu, REPS, || conv2d::conv2d_fwd(&x, &w, &bias, stride, pad, fused).map(drop))?;
                let bw = time_avg(gpu, REPS, || {
                    let g = relu::through_fused_relu(fused.then_some(&y), &gy)?;
                    conv2d::conv2d_bwd(&x, &w, &g, stride, pad, i > 0).map(drop)
                })?;
                (f, bw)
            }
            Layer::Linear { out } => {
                let w = rand_tensor(&[out, input[1]], 200 + i as u64, device)?;
                let bias = Tensor::zeros(&[out], device)?;
                let y = dense::dense_fwd(&x, &w, &bias, fused)?;
                let f = time_avg(gpu, REPS, || dense::dense_fwd(&x, &w, &bias, fused).map(drop))?;
                let bw = time_avg(gpu, REPS, || {
                    let g = relu::through_fused_relu(fused.then_some(&y), &gy)?;
                    dense::dense_bwd(&x, &w, &g, true).map(drop)
                })?;
                (f, bw)
            }
            Layer::MaxPool2d { kernel, stride } => {
                let (_, argmax) = maxpool2d::maxpool2d_fwd(&x, kernel, stride)?;
                let f = time_avg(gpu, REPS, || maxpool2d::maxpool2d_fwd(&x, kernel, stride).map(drop))?;
                let bw =
                    time_avg(gpu, REPS, || maxpool2d::maxpool2d_bwd(&argmax, &gy, &input, kernel, stride).map(drop))?;
                (f, bw)
            }
            Layer::Dropout { p } => {
                let f = time_avg(gpu, REPS, || dropout::dropout_fwd(&x, p, 7).map(drop))?;
                let bw = time_avg(gpu, REPS, || dropout::dropout_bwd(&gy, p, 7).map(drop))?;
                (f, bw)
            }
            Layer::Relu => {
                let f = time_avg(gpu, REPS, || relu::relu_fwd(&x).map(drop))?;
                let bw = time_avg(gpu, REPS, || relu::relu_bwd(&x, &gy).map(drop))?;
                (f, bw)
            }
            Layer::Flatten => (0.0, 0.0), // a view: no kernel
        };
        if fused {
            name.push_str("+ReLU");
        }
        rows.push(LayerTime { name: format!("{i:>2} {name}"), output: shapes[i].clone(), fwd_ms, bwd_ms });
        i += if fused { 2 } else { 1 };
    }

    let logits = rand_tensor(&[b, 10], 300, device)?;
    let labels = Labels::from_vec(&[b], (0..b as u32).map(|i| i % 10).collect(), device)?;
    let (_, probs) = softmax_xent::softmax_xent_fwd(&logits, &labels)?;
    let one = Tensor::from_vec(&[1], vec![1.0], device)?;
    let f = time_avg(gpu, REPS, || softmax_xent::softmax_xent_fwd(&logits, &labels).map(drop))?;
    let bw = time_avg(gpu, REPS, || softmax_xent::softmax_xent_bwd(&probs, &labels, &one).map(drop))?;
    rows.push(LayerTime { name: "softmax-xent".into(), output: vec![1], fwd_ms: f, bwd_ms: bw });

    let model = AlexNet::new(r, 0, device)?;
    let mut params: Vec<Tensor> = model.params.iter().map(|p| p.value.to_device(device)).collect::<Result<_>>()?;
    let grads: Vec<Tensor> = params.iter().map(|p| Tensor::zeros(p.shape(), device)).collect::<Result<_>>()?;
    let f = time_avg(gpu, REPS, || params.iter_mut().zip(&grads).try_for_each(|(p, g)| sgd::sgd_update(p, g, 0.01)))?;
    rows.push(LayerTime { name: "sgd (all params)".into(), output: vec![model.param_count()], fwd_ms: f, bwd_ms: 0.0 });

    let total: f32 = rows.iter().map(|r| r.fwd_ms + r.bwd_ms).sum();
    for row in &rows {
        println!(
            "{}",
            json!({"kind": "layer", "layer": row.name.trim(), "output": row.output,
                   "fwd_ms": row.fwd_ms, "bwd_ms": row.bwd_ms})
        );
    }
    println!("\nper-layer GPU time, batch {b} at {r}x{r} (CUDA events, mean of {REPS}):");
    println!("{:<22} {:>20} {:>9} {:>9} {:>7}", "layer", "output", "fwd ms", "bwd ms", "share");
    for row in &rows {
        println!(
            "{:<22} {:>20} {:>9.3} {:>9.3} {:>6.1}%",
            row.name,
            format!("{:?}", row.output),
            row.fwd_ms,
            row.bwd_ms,
            100.0 * (row.fwd_ms + row.bwd_ms) / total
        );
    }
    println!("{:<22} {:>20} {:>19.3}", "total", "", total);
    Ok(())
}
