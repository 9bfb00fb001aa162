//! The buffer cache (src/buffer_pool.rs) in use: after its first step, a training step allocates
//! nothing, on the kernel emulator (always: it runs the CUDA path's launches and buffers on the
//! CPU) and on a GPU when there is one. (The cache's bookkeeping is unit-tested in src/buffer_pool.rs.)
//! Nor does a step copy between host and device or wait for the device (`Gpu::host_traffic`):
//! the batch is uploaded before it, and nothing is read back.
//! No other test file's allocations can move the counters these read (a test binary each).
mod common;
use common::*;
use ptxgrad::device::HostTraffic;
use ptxgrad::nn::Compute;
use ptxgrad::nn::{model::Model, models::ALEXNET};
use ptxgrad::ops::conv2d::ConvAlgo;
use ptxgrad::train::{prepare_batch, train_step};
use ptxgrad::{Device, Tensor};

/// Steps `warm` times, then `more` times, and checks that the later steps took every buffer
/// from the cache, and that no step (train_step; the batch upload is before it) copied to or
/// from the host or waited for the device.
fn steady_state_allocates_nothing(dev: &Device, b: usize, r: usize, warm: u64, more: u64) {
    let Device::Cuda(gpu) = dev else { unreachable!("a CUDA or emulated device") };
    for algo in [ConvAlgo::ImplicitGemm, ConvAlgo::Winograd { tile: None }] {
        let compute = Compute { conv: algo, ..Compute::default() };
        let mut model = Model::new(&ALEXNET, r, 0, dev).unwrap().with_compute(compute).unwrap();
        let mut stats = Tensor::zeros(&[2], dev).unwrap();
        // As in train(): upload uint8 images and labels, resize on the device, step.
        let mut step = |i: u64| {
            let pixels: Vec<u8> = (0..b * 784).map(|p| ((p as u64 * 31 + i) % 251) as u8).collect();
            let labels: Vec<u32> = (0..b as u32).map(|l| (l + i as u32) % 10).collect();
            let (x, y) = prepare_batch(pixels, labels, (28, 28), r, dev).unwrap();
            let before = gpu.host_traffic();
            train_step(&mut model, &x, &y, i, 0.01, Some(&mut stats)).unwrap();
            let traffic = gpu.host_traffic() - before;
            assert_eq!(traffic, HostTraffic::default(), "{algo}: step {i} talked to the host");
        };
        (0..warm).for_each(&mut step);
        dev.synchronize().unwrap();
        let before = gpu.pool_stats();
        (warm..warm + more).for_each(&mut step);
        dev.synchronize().unwrap();
        let after = gpu.pool_stats();
        let tag = format!("{algo} on {}", dev.label());
        assert_eq!(after.fresh, before.fresh, "{tag}: steps after the warm-up allocated ({before:?} -> {after:?})");
        assert!(after.reused > before.reused, "{tag}: the steps took their buffers from the cache");
        println!("{tag}: {} buffers reused over {more} steps, none allocated", after.reused - before.reused);
    }
}

// Each device has its own cache: the two tests below do not disturb each other's counters.

#[test]
fn emulated_training_steps_allocate_nothing_after_the_first() {
    // AlexNet's smallest input, batch 2 (about 5 s a step on the emulator).
    steady_state_allocates_nothing(&Device::parse("emu").unwrap(), 2, 65, 1, 2);
}

#[test]
fn cuda_training_steps_allocate_nothing_after_the_first() {
    if let Some(dev) = gpu_or_skip("cuda_training_steps_allocate_nothing_after_the_first") {
        steady_state_allocates_nothing(&dev, 32, 224, 2, 3);
    }
}
