//! Criterion benches of AlexNet's layers on the GPU (batch 128, 224x224 shapes), so that the
//! slowest kernel is visible: `cargo bench --bench layers` (one group: `-- conv_algos`).
//!
//! - `layers`: every layer's forward and backward, the cases of `ptxgrad bench`'s per-layer
//!   table (`bench::layer_cases`); the convolutions run twice, as implicit GEMMs and with
//!   Winograd (`winograd_` names).
//! - `conv_algos`: each conv layer with each algorithm that applies to it (`gemm`, `winograd_M`
//!   for every output tile M with kernels), the implicit GEMM and default Winograd again without
//!   the 96-wide tiles (`_no96`: `GemmOpts::wide_96` false, what those tiles change on conv1's
//!   96 output and conv2's 96 input channels) and in 3xtf32 (`_3xtf32`). Each as `fwd`,
//!   `bwd_weight` (the weight and bias grads alone) and `bwd` (with the input grad, where the
//!   layer needs one: its time is `bwd` - `bwd_weight`). Throughput counts the direct method's
//!   FLOPs (2 per multiply-add: criterion's elements/s read as FLOP/s), Winograd's "effective"
//!   rate.
//! - `dense`: fc1-3 the same way (`fwd`, `bwd_weight`, `bwd`).
//! - `gemm_core`: the GEMM core on one large problem, x (4096, 4096) . w (4096, 4096)^T (137
//!   GFLOP a pass), per way it loads operands: the forward reads both along k (4-byte copies),
//!   the weight grad both along m / n (16-byte copies), the input grad one of each (`bwd` -
//!   `bwd_weight`); per GEMM arithmetic (fp32 FFMAs, 3xtf32, tf32, bf16). It separates the core
//!   from the conv loaders and from small grids.
//!
//! Every iteration ends with a device synchronisation inside the timed region. Without a GPU each
//! group prints why it skips (and fails under PTXGRAD_REQUIRE_GPU=1).

use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use ptxgrad::bench::layer_cases;
use ptxgrad::nn::models::ALEXNET;
use ptxgrad::nn::network::Layer;
use ptxgrad::ops::conv2d::{conv2d_bwd, conv2d_fwd, winograd_tiles, Conv2d, Conv2dParams, ConvAlgo};
use ptxgrad::ops::dense::{dense_bwd, dense_fwd};
use ptxgrad::ops::gemm::math::GemmMath;
use ptxgrad::ops::gemm::GemmOpts;
use ptxgrad::{Device, Tensor};

const BATCH: usize = 128;
const RES: usize = 224;

/// The GPU, or None with a printed reason (a panic under PTXGRAD_REQUIRE_GPU=1).
fn gpu_or_skip(group: &str) -> Option<Device> {
    match Device::parse("cuda") {
        Ok(d) => Some(d),
        Err(e) if std::env::var("PTXGRAD_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("PTXGRAD_REQUIRE_GPU=1 but no GPU: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED {group}: no GPU ({e})");
            None
        }
    }
}

/// Times `work` followed by a synchronisation of `device` (kernels are asynchronous: timing
/// their launch alone would overstate the speed).
fn bench_synced(
    group: &mut BenchmarkGroup<WallTime>,
    device: &Device,
    name: &str,
    mut work: impl FnMut() -> ptxgrad::Result<()>,
) {
    group.bench_function(name, |b| {
        b.iter(|| {
            work().unwrap_or_else(|e| panic!("{name}: {e}"));
            device.synchronize().expect("synchronize");
        })
    });
}

/// A seeded tensor with values in [-1, 1) on `device`.
fn rand_tensor(shape: &[usize], salt: u64, device: &Device) -> Tensor {
    Tensor::synthetic(shape, -1.0, 1.0, salt, device).expect("tensor")
}

fn layers(c: &mut Criterion) {
    let Some(device) = gpu_or_skip("layers") else { return };
    let mut group = c.benchmark_group("layers");
    // Every layer with the implicit-GEMM convolutions, then the convolutions again with Winograd.
    let opts = GemmOpts::default();
    let gemm = layer_cases(&ALEXNET, &device, BATCH, RES, opts, &|_| ConvAlgo::ImplicitGemm).expect("layer cases");
    let wino =
        layer_cases(&ALEXNET, &device, BATCH, RES, opts, &|_| ConvAlgo::Winograd { tile: None }).expect("layer cases");
    let wino = wino.into_iter().filter(|c| c.name.contains("Conv2d")).map(|c| ("winograd_", c));
    for (prefix, case) in gemm.into_iter().map(|c| ("", c)).chain(wino) {
        let name = format!("{prefix}{}", case.name.trim().replace(' ', "_"));
        bench_synced(&mut group, &device, &format!("{name}/fwd"), case.fwd);
        if let Some(bwd) = case.bwd {
            bench_synced(&mut group, &device, &format!("{name}/bwd"), bwd);
        }
    }
    group.finish();
}

/// One of AlexNet's layers at batch `BATCH`.
struct AlexLayer {
    /// Index in `ALEXNET.leaves()`.
    index: usize,
    layer: Layer,
    input: Vec<usize>,
    output: Vec<usize>,
    /// Whether a ReLU follows (fused into the layer).
    relu: bool,
}

/// AlexNet's layers of one kind, in order.
fn alexnet_layers(kind: fn(&Layer) -> bool) -> Vec<AlexLayer> {
    let input = ALEXNET.input_shape(BATCH, RES).to_vec();
    let shapes = ALEXNET.leaf_shapes(&input).expect("AlexNet's shapes");
    let leaves = ALEXNET.leaves();
    (0..leaves.len())
        .filter(|&i| kind(&leaves[i].layer))
        .map(|i| AlexLayer {
            index: i,
            layer: leaves[i].layer,
            input: if i == 0 { input.clone() } else { shapes[i - 1].clone() },
            output: shapes[i].clone(),
            relu: ALEXNET.fuses_relu(&leaves, i),
        })
        .collect()
}

/// A short group: these benches are many, and each runs for milliseconds.
fn quick_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(2));
    group
}

fn conv_algos(c: &mut Criterion) {
    let Some(device) = gpu_or_skip("conv_algos") else { return };
    let mut group = quick_group(c, "conv_algos");
    let convs = alexnet_layers(|l| matches!(l, Layer::Conv2d { .. }));
    for (n, AlexLayer { index: i, layer, input: xs, output: ys, relu }) in convs.into_iter().enumerate() {
        let Layer::Conv2d { out, kernel, stride, pad } = layer else { unreachable!("conv layers only") };
        let p = Conv2dParams::new(xs[0], xs[1], xs[2], xs[3], out, kernel, kernel, stride, pad).expect("conv shape");
        let salt = 10 * i as u64;
        let x = rand_tensor(&xs, salt, &device);
        let w = rand_tensor(&[out, xs[1], kernel, kernel], salt + 1, &device);
        let b = rand_tensor(&[out], salt + 2, &device);
        let gy = rand_tensor(&ys, salt + 3, &device);
        // The first layer's input needs no gradient (as in training).
        let need_gx = i > 0;
        let no96 = GemmOpts { wide_96: false, ..GemmOpts::default() };
        let tf32x3 = GemmOpts::math(GemmMath::Tf32x3);
        let wino = ConvAlgo::Winograd { tile: None };
        let winograd_applies = wino.winograd_tile(&p).is_some();
        let mut variants = vec![("gemm".to_string(), ConvAlgo::ImplicitGemm, GemmOpts::default())];
        for m in winograd_tiles(&p) {
            variants.push((format!("winograd_{m}"), ConvAlgo::Winograd { tile: Some(m) }, GemmOpts::default()));
        }
        for (suffix, opts) in [("no96", no96), ("3xtf32", tf32x3)] {
            variants.push((format!("gemm_{suffix}"), ConvAlgo::ImplicitGemm, opts));
            if winograd_applies {
                variants.push((format!("winograd_{suffix}"), wino, opts));
            }
        }
        group.throughput(Throughput::Elements(2 * (p.y_len() * p.k()) as u64));
        for (variant, algo, opts) in variants {
            let conv = Conv2d::new(stride, pad).relu(relu).algo(algo).gemm(opts);
            let name = format!("conv{}/{variant}", n + 1);
            bench_synced(&mut group, &device, &format!("{name}/fwd"), || conv2d_fwd(&x, &w, &b, &conv).map(drop));
            let bwd_weight = || conv2d_bwd(&x, &w, &gy, &conv, false).map(drop);
            bench_synced(&mut group, &device, &format!("{name}/bwd_weight"), bwd_weight);
            if need_gx {
                let bwd = || conv2d_bwd(&x, &w, &gy, &conv, true).map(drop);
                bench_synced(&mut group, &device, &format!("{name}/bwd"), bwd);
            }
        }
    }
    group.finish();
}

/// The forward, the weight and bias grads alone, and the whole backward of a dense layer x (B,
/// IN), w (OUT, IN) in `opts`.
fn bench_dense(
    group: &mut BenchmarkGroup<WallTime>,
    device: &Device,
    name: &str,
    (batch, in_f, out_f, relu): (usize, usize, usize, bool),
    opts: GemmOpts,
) {
    let x = rand_tensor(&[batch, in_f], 1, device);
    let w = rand_tensor(&[out_f, in_f], 2, device);
    let b = rand_tensor(&[out_f], 3, device);
    let gy = rand_tensor(&[batch, out_f], 4, device);
    group.throughput(Throughput::Elements(2 * (batch * in_f * out_f) as u64));
    bench_synced(group, device, &format!("{name}/fwd"), || dense_fwd(&x, &w, &b, relu, opts).map(drop));
    bench_synced(group, device, &format!("{name}/bwd_weight"), || dense_bwd(&x, &w, &gy, false, opts).map(drop));
    bench_synced(group, device, &format!("{name}/bwd"), || dense_bwd(&x, &w, &gy, true, opts).map(drop));
}

fn dense(c: &mut Criterion) {
    let Some(device) = gpu_or_skip("dense") else { return };
    let mut group = quick_group(c, "dense");
    for (n, fc) in alexnet_layers(|l| matches!(l, Layer::Linear { .. })).into_iter().enumerate() {
        let Layer::Linear { out } = fc.layer else { unreachable!("linear layers only") };
        let shape = (fc.input[0], fc.input[1], out, fc.relu);
        bench_dense(&mut group, &device, &format!("fc{}", n + 1), shape, GemmOpts::default());
    }
    group.finish();
}

fn gemm_core(c: &mut Criterion) {
    let Some(device) = gpu_or_skip("gemm_core") else { return };
    let mut group = c.benchmark_group("gemm_core");
    group.sample_size(10);
    let n = 4096;
    for math in GemmMath::ALL {
        bench_dense(&mut group, &device, &format!("{n}x{n}x{n}_{math}"), (n, n, n, false), GemmOpts::math(math));
    }
    group.finish();
}

criterion_group!(benches, layers, conv_algos, dense, gemm_core);
criterion_main!(benches);
