//! Criterion benches of every AlexNet layer's forward and backward on the GPU (batch 128,
//! 224x224 shapes), so that the slowest kernel is visible: `cargo bench --bench layers`.
//! The same cases feed `ptxgrad bench`'s per-layer table. Without a GPU this prints why it
//! skips (and fails under PTXGRAD_REQUIRE_GPU=1).

use criterion::{criterion_group, criterion_main, Criterion};
use ptxgrad::bench::layer_cases;
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
    for case in layer_cases(&device, 128, 224).expect("layer cases") {
        let name = case.name.trim().replace(' ', "_");
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
