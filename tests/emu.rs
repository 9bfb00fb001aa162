//! The whole CUDA path on the kernel emulator (`Device::parse("emu")`: every kernel from its
//! CUDA source, on the CPU) against the CPU path: one AlexNet training step — resize,
//! every layer's forward and backward, dropout masks, the loss, SGD — must give the same loss
//! and the same updated parameters. This checks the launch glue (kernel names, argument order,
//! grids, buffer sizes) on machines without a GPU; the kernels' arithmetic is checked per op.
mod common;
use common::*;
use ptxgrad::nn::alexnet::AlexNet;
use ptxgrad::ops::conv2d::ConvAlgo;
use ptxgrad::train::{prepare_batch, train_step};
use ptxgrad::Device;

/// The loss of one step and each parameter's change (after - before).
fn one_step(dev: &Device, algo: ConvAlgo) -> (f32, Vec<Vec<f32>>) {
    let (b, r) = (2, 65);
    let mut model = AlexNet::new(r, 7, dev).unwrap();
    model.conv_algo = algo;
    let before: Vec<Vec<f32>> = model.params.iter().map(|p| p.value.to_vec().unwrap()).collect();
    let pixels: Vec<u8> = (0..b * 784).map(|p| ((p * 37) % 256) as u8).collect();
    let (x, y) = prepare_batch(pixels, vec![3, 8], (28, 28), r, dev).unwrap();
    let loss = train_step(&mut model, &x, &y, 11, 0.05, None).unwrap();
    let deltas = model
        .params
        .iter()
        .zip(before)
        .map(|(p, b)| p.value.to_vec().unwrap().iter().zip(b).map(|(a, b)| a - b).collect());
    (loss.to_vec().unwrap()[0], deltas.collect())
}

#[test]
fn emulated_training_step_matches_the_cpu() {
    let emu = Device::parse("emu").unwrap();
    assert_eq!(emu.label(), "emu");
    for algo in [ConvAlgo::ImplicitGemm, ConvAlgo::Winograd { tile: None }] {
        let (cpu_loss, cpu_deltas) = one_step(&Device::Cpu, algo);
        let (emu_loss, emu_deltas) = one_step(&emu, algo);
        assert!((cpu_loss - emu_loss).abs() <= 1e-4 * cpu_loss.abs().max(1.0), "{algo}: loss {cpu_loss} vs {emu_loss}");
        for (i, (c, e)) in cpu_deltas.iter().zip(&emu_deltas).enumerate() {
            // The SGD update (lr x gradient) of every parameter: the gradients' sums differ in
            // order only (1e-5 relative), the subtraction w - (w - update) rounds at the
            // weights' scale (|w| < 0.2: 1.5e-8), so 1e-3 relative + 2e-7 holds with room,
            // while a wrong or missing gradient term does not.
            assert!(c.iter().any(|&d| d != 0.0), "{algo}: parameter {i} did not change on the CPU");
            assert_close(&format!("{algo}: change of parameter {i} in one step"), c, e, 2e-7, 1e-3);
        }
    }
}
