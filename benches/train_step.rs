//! Criterion benches of training throughput (examples/sec).
//!
//! - `train_step/cuda`: the full AlexNet step (forward, backward, SGD) at batch 128, 224x224,
//!   synthetic input already on the GPU, as the PyTorch peer measures it. Skips with a printed
//!   reason when no GPU is present (fails under PTXGRAD_REQUIRE_GPU=1).
//! - `train_step/cpu`: the same step on the CPU reference at 67x67, batch 4, so that
//!   `cargo bench` measures something on machines without a GPU.
//! - `train_step/cuda_b128_224px_winograd`: the CUDA step with Winograd convolutions (conv2-5);
//!   `_auto`: with each conv layer's algorithm picked by timing (`--conv-algo auto`, tuned
//!   before the timed iterations); `_auto_3xtf32` / `_auto_tf32` / `_auto_bf16`: `_auto` with the
//!   tensor-core GEMMs (`--math 3xtf32`, fp32-accurate, `--math tf32` and `--math bf16`; see
//!   ops::gemm::math).
//!
//! Each iteration ends with a device synchronisation inside the timed region: kernels are
//! asynchronous, and timing only their launch would overstate the speed.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ptxgrad::nn::conv_tune;
use ptxgrad::nn::Compute;
use ptxgrad::nn::{model::Model, models::ALEXNET};
use ptxgrad::ops::conv2d::ConvAlgo;
use ptxgrad::ops::gemm::math::GemmMath;
use ptxgrad::ops::gemm::GemmOpts;
use ptxgrad::train::train_step;
use ptxgrad::{Device, Labels, Tensor};

/// The training step of AlexNet at `batch` inputs of `res` x `res` on `device`, its GEMMs and
/// convolutions run as `compute` says.
fn bench_step(c: &mut Criterion, name: &str, device: &Device, (batch, res): (usize, usize), compute: Compute) {
    let device = device.clone();
    let mut model = Model::new(&ALEXNET, res, 0, &device).and_then(|m| m.with_compute(compute)).expect("model");
    model.tune_convs(batch, conv_tune::REPS).expect("timing the convolution algorithms");
    let pixels: Vec<f32> = (0..batch * res * res).map(|i| (i % 255) as f32 / 255.0).collect();
    let x = Tensor::from_vec(&[batch, 1, res, res], pixels, &device).expect("input");
    let y = Labels::from_vec(&[batch], (0..batch as u32).map(|i| i % 10).collect(), &device).expect("labels");
    let mut group = c.benchmark_group("train_step");
    group.throughput(Throughput::Elements(batch as u64));
    if !device.is_cuda() {
        group.sample_size(10);
    }
    let mut step = 0u64;
    group.bench_function(name, |b| {
        b.iter(|| {
            step += 1;
            train_step(&mut model, &x, &y, step, 0.01, None).expect("train step");
            device.synchronize().expect("synchronize");
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let conv = |conv| Compute { conv, ..Compute::default() };
    bench_step(c, "cpu_b4_67px", &Device::Cpu, (4, 67), conv(ConvAlgo::ImplicitGemm));
    match Device::parse("cuda") {
        Ok(gpu) => {
            let full = (128, 224);
            bench_step(c, "cuda_b128_224px", &gpu, full, conv(ConvAlgo::ImplicitGemm));
            bench_step(c, "cuda_b128_224px_winograd", &gpu, full, conv(ConvAlgo::Winograd { tile: None }));
            bench_step(c, "cuda_b128_224px_auto", &gpu, full, conv(ConvAlgo::Auto));
            for math in [GemmMath::Tf32x3, GemmMath::Tf32, GemmMath::Bf16] {
                let compute = Compute { gemm: GemmOpts::math(math), conv: ConvAlgo::Auto };
                bench_step(c, &format!("cuda_b128_224px_auto_{math}"), &gpu, full, compute);
            }
        }
        Err(e) if std::env::var("PTXGRAD_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("PTXGRAD_REQUIRE_GPU=1 but no GPU: {e}")
        }
        Err(e) => eprintln!("SKIPPED train_step/cuda_b128_224px: no GPU ({e})"),
    }
}

criterion_group!(train, benches);
criterion_main!(train);
