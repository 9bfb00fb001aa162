//! Criterion benches of every AlexNet layer's forward and backward on the GPU (batch 128,
//! 224x224 shapes), so that the slowest kernel is visible: `cargo bench --bench layers`.
//! The same cases feed `ptxgrad bench`'s per-layer table; the convolutions run twice, as implicit
//! GEMMs and with Winograd (`winograd_` names). Without a GPU this prints why it
//! skips (and fails under PTXGRAD_REQUIRE_GPU=1).

use criterion::{criterion_group, criterion_main, Criterion};
use ptxgrad::bench::layer_cases;
use ptxgrad::ops::conv2d::ConvAlgo;
use ptxgrad::Device;

fn layers(c: &mut Criterion) {
    let device = match Device::parse("cuda") {
        Ok(d) => d,
        Err(e) if std::env::var("PTXGRAD_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("PTXGRAD_REQUIRE_GPU=1 but no GPU: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED layers: no GPU ({e})");
            return;
        }
    };
    let mut group = c.benchmark_group("layers");
    // Every layer with the implicit-GEMM convolutions, then the convolutions again with Winograd.
    let gemm = layer_cases(&device, 128, 224, &|_| ConvAlgo::ImplicitGemm).expect("layer cases");
    let wino = layer_cases(&device, 128, 224, &|_| ConvAlgo::Winograd { tile: None }).expect("layer cases");
    let wino = wino.into_iter().filter(|c| c.name.contains("Conv2d")).map(|c| ("winograd_", c));
    for (prefix, case) in gemm.into_iter().map(|c| ("", c)).chain(wino) {
        let name = format!("{prefix}{}", case.name.trim().replace(' ', "_"));
        let mut fwd = case.fwd;
        group.bench_function(format!("{name}/fwd"), |b| {
            b.iter(|| {
                fwd().expect("forward");
                device.synchronize().expect("synchronize"); // inside the timed region
            })
        });
        if let Some(mut bwd) = case.bwd {
            group.bench_function(format!("{name}/bwd"), |b| {
                b.iter(|| {
                    bwd().expect("backward");
                    device.synchronize().expect("synchronize");
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, layers);
criterion_main!(benches);
