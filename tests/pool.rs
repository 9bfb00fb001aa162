//! The buffer cache (src/pool.rs) in use: after its first step, a CUDA training step allocates
//! nothing. (The cache's bookkeeping is unit-tested in src/pool.rs, which needs no GPU.)
//! This file holds the only test of its binary that touches the GPU, so no other test's
//! allocations can move the counters it reads.
mod common;
use common::*;
use ptxgrad::nn::alexnet::AlexNet;
use ptxgrad::ops::conv2d::ConvAlgo;
use ptxgrad::train::{prepare_batch, train_step};
use ptxgrad::{Device, Tensor};

#[test]
fn cuda_training_steps_allocate_nothing_after_the_first() {
    let Some(dev) = gpu_or_skip("cuda_training_steps_allocate_nothing_after_the_first") else { return };
    let Device::Cuda(gpu) = &dev else { unreachable!("gpu_or_skip gives a CUDA device") };
    let (b, r) = (32, 224);
    for algo in [ConvAlgo::ImplicitGemm, ConvAlgo::Winograd { tile: None }] {
        let mut model = AlexNet::new(r, 0, &dev).unwrap();
        model.conv_algo = algo;
        let mut stats = Tensor::zeros(&[2], &dev).unwrap();
        // As in train(): upload uint8 images and labels, resize on the device, step.
        let mut step = |i: u64| {
            let pixels: Vec<u8> = (0..b * 784).map(|p| ((p as u64 * 31 + i) % 251) as u8).collect();
            let labels: Vec<u32> = (0..b as u32).map(|l| (l + i as u32) % 10).collect();
            let (x, y) = prepare_batch(pixels, labels, (28, 28), r, &dev).unwrap();
            train_step(&mut model, &x, &y, i, 0.01, Some(&mut stats)).unwrap();
        };
        step(0);
        step(1);
        dev.synchronize().unwrap();
        let warm = gpu.pool_stats();
        for i in 2..5 {
            step(i);
        }
        dev.synchronize().unwrap();
        let after = gpu.pool_stats();
        assert_eq!(after.fresh, warm.fresh, "{algo}: steps 3-5 allocated (cache {warm:?} -> {after:?})");
        assert!(after.reused > warm.reused, "{algo}: steps 3-5 took their buffers from the cache");
        println!(
            "{algo}: {} buffers reused over 3 steps, none allocated; cache holds {} MiB",
            after.reused - warm.reused,
            after.cached_bytes >> 20
        );
    }
}
