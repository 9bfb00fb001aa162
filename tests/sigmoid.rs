//! Sigmoid: every device against the naive oracle (tests/common/naive.rs), the CPU reference's
//! backward against finite differences, the tails and non-finite inputs (against values from
//! PyTorch), the recorded op's backward, and argument errors.
mod common;
use common::*;
use ptxgrad::ops::sigmoid::{sigmoid, sigmoid_bwd, sigmoid_bwd_cpu, sigmoid_fwd, sigmoid_fwd_cpu};
use ptxgrad::{Device, Tape, Tensor};

const SHAPES: &[&[usize]] = &[
    &[128, 96, 54, 54], // an AlexNet-sized activation (batch 128): for a GPU's launch limits
    &[128, 4096],
    &[1],
    &[1, 1, 1, 1],
    &[7],
    &[3, 5, 7, 9], // odd sizes
    &[2, 13, 7, 9],
    &[31, 257], // 7967: a partial last block
    &[256],     // exactly one block
    &[2, 3, 1, 1],
    &[1, 97, 11, 13], // a prime channel count
];

/// The emulator runs the cases up to this many elements (all but the first two).
const EMULATED_MAX: usize = 1 << 16;

/// Allowed relative error of the fp32 sigmoid and its backward against the exact value: a few
/// ulp (exp's error on a GPU is up to 2 ulp, plus an addition and a division, each half an ulp).
const RTOL: f32 = 1e-6;

/// The smallest normal f32: below it an output is subnormal, and its rounding is absolute.
const TINY: f32 = f32::MIN_POSITIVE;

/// Seeded values of `shape` in [-12, 12): both halves of the kernel's formula, into the tails.
fn wide_input(shape: &[usize], seed: u64, dev: &Device) -> (Vec<f32>, Tensor) {
    let x = uniform(shape.iter().product(), -12.0, 12.0, seed);
    (x.clone(), Tensor::from_vec(shape, x, dev).unwrap())
}

#[test]
fn sigmoid_cpu_backward_matches_finite_differences() {
    let x = uniform(301, -8.0, 8.0, 1);
    let loss_weights = uniform(x.len(), -1.0, 1.0, 2);
    let analytic = sigmoid_bwd_cpu(&sigmoid_fwd_cpu(&x), &loss_weights);
    let numeric =
        numeric_grad_at(&x, 1e-4, |x| x.iter().zip(&loss_weights).map(|(&v, &r)| r as f64 / (1.0 + (-v).exp())).sum());
    // Central differences err by eps^2 / 6 * |sigmoid'''| <= 2e-10 here; the analytic gradient
    // by a few ulp of f32 (from y rounded to f32).
    assert_close("sigmoid grad", &numeric, &analytic, 1e-6, 1e-5);
}

test_device!(sigmoid_matches_naive_oracle, |dev| {
    for (k, shape, _) in cases_on(&dev, SHAPES, EMULATED_MAX) {
        let (x_host, x) = wide_input(shape, k as u64, &dev);
        let y = sigmoid_fwd(&x).unwrap();
        let want_y = naive::f32s(&naive::sigmoid(&x_host));
        assert_close(&format!("sigmoid fwd {shape:?}"), &want_y, &y.to_vec().unwrap(), 0.0, RTOL);
        // The backward from the exact output rounded to f32, so that it is checked on its own.
        let (gy_host, gy) = rand_host_and_tensor(shape, 100 + k as u64, &dev);
        let gx = sigmoid_bwd(&Tensor::from_vec(shape, want_y.clone(), &dev).unwrap(), &gy).unwrap();
        let want_gx = naive::f32s(&naive::sigmoid_backward(&want_y, &gy_host));
        assert_close(&format!("sigmoid bwd {shape:?}"), &want_gx, &gx.to_vec().unwrap(), 0.0, RTOL);
    }
});

/// Inputs where a naive formula breaks, and torch.sigmoid of each (torch 2.15, CPU:
/// `torch.sigmoid(torch.tensor(x, dtype=torch.float32))`). Below x = -88.72 exp(-x) overflows
/// and torch gives 0; the engine's exp(-|x|) form gives the true value, a subnormal (below
/// `TINY`, which is what the comparison with torch allows there).
#[rustfmt::skip]
const TORCH_SIGMOID: &[(f32, f32)] = &[
    (f32::INFINITY, 1.0), (f32::NEG_INFINITY, 0.0), (0.0, 0.5), (-0.0, 0.5),
    (1.5, 0.817_574_44), (-1.5, 0.182_425_53), (20.0, 1.0), (-20.0, 2.061_153_7e-9),
    (88.0, 1.0), (89.0, 1.0), (-88.0, 6.054_601e-39), (-89.0, 0.0), (-100.0, 0.0),
    (-103.0, 0.0), (-104.0, 0.0), (3.4e38, 1.0), (-3.4e38, 0.0),
];

test_device!(sigmoid_is_stable_at_extremes_and_propagates_nan, |dev| {
    let (mut x_host, torch): (Vec<f32>, Vec<f32>) = TORCH_SIGMOID.iter().copied().unzip();
    let y = sigmoid_fwd(&Tensor::from_vec(&[x_host.len()], x_host.clone(), &dev).unwrap()).unwrap().to_vec().unwrap();
    assert_close("sigmoid vs torch", &torch, &y, TINY, RTOL);
    // Against the exact value, subnormals included: a few of their ulps (1.4e-45 each).
    let exact = naive::f32s(&naive::sigmoid(&x_host));
    assert_close("sigmoid tails", &exact, &y, 1e-44, RTOL);
    assert!(y[11] > 0.0 && y[12] > 0.0, "sigmoid(-89), sigmoid(-100): subnormal, not 0: {y:?}");
    // NaN in, NaN out; every other value finite and in [0, 1].
    x_host.extend([f32::NAN, -f32::NAN]);
    let y = sigmoid_fwd(&Tensor::from_vec(&[x_host.len()], x_host.clone(), &dev).unwrap()).unwrap().to_vec().unwrap();
    for (&x, &y) in x_host.iter().zip(&y) {
        assert!(if x.is_nan() { y.is_nan() } else { (0.0..=1.0).contains(&y) }, "sigmoid({x}) = {y}");
    }
});

test_device!(sigmoid_backward_at_saturated_and_nan_outputs, |dev| {
    // gx = gy * (1 - y) * y: 0 where the output saturated at 0 or 1, NaN from a NaN output or
    // gradient, as PyTorch's sigmoid_backward.
    let y_host = vec![0.0, 1.0, 0.5, f32::NAN, 0.25, 0.0];
    let gy_host = vec![3.0, -2.0, 1.0, 1.0, f32::NAN, f32::INFINITY];
    let y = Tensor::from_vec(&[6], y_host.clone(), &dev).unwrap();
    let gx = sigmoid_bwd(&y, &Tensor::from_vec(&[6], gy_host, &dev).unwrap()).unwrap().to_vec().unwrap();
    // -2 * (1 - 1) * 1 is -0.0, and inf * (1 - 0) * 0 is NaN, in PyTorch's order as here.
    let want = [0.0, -0.0, 0.25, f32::NAN, f32::NAN, f32::NAN];
    assert_same_bits("sigmoid backward", &want, &gx, |i| format!("y {}", y_host[i]));
});

test_device!(sigmoid_records_its_backward, |dev| {
    // x: (3, 5, 7, 9) through the recorded sigmoid; gy is the gradient the tape hands it.
    let (x_host, x) = wide_input(&[3, 5, 7, 9], 7, &dev);
    let (gy_host, gy) = rand_host_and_tensor(&[3, 5, 7, 9], 8, &dev);
    let mut tape = Tape::train();
    tape.watch(&x);
    let y = sigmoid(&mut tape, &x).unwrap();
    let want_y = naive::sigmoid(&x_host);
    assert_close("recorded sigmoid", &naive::f32s(&want_y), &y.to_vec().unwrap(), 0.0, RTOL);
    let grads = backward_from(tape, &y, &gy);
    let gx = grads.get(&x).expect("x has a gradient").to_vec().unwrap();
    // The exact gradient, from the exact y: the saved f32 y adds its rounding to the backward's.
    let want_gx: Vec<f64> = want_y.iter().zip(&gy_host).map(|(&y, &g)| g as f64 * y * (1.0 - y)).collect();
    // Near saturation (y within 1e-5 of 1) 1 - y has only a few significant bits in f32, so the
    // bound is absolute: |gy| (< 1) times y's error (a few ulp of 1, 6e-8 each).
    assert_close("recorded sigmoid backward", &naive::f32s(&want_gx), &gx, 5e-7, 1e-5);
});

#[test]
fn sigmoid_bwd_rejects_mismatched_operands() {
    let y = rand_tensor(&[2, 3], 0, &Device::Cpu);
    let msg = err_msg(sigmoid_bwd(&y, &rand_tensor(&[3, 2], 1, &Device::Cpu)));
    assert_mentions(&msg, &["sigmoid_bwd", "gy", "[2, 3]", "found [3, 2]"]);
    let on_emu = rand_tensor(&[2, 3], 1, &Device::parse("emu").unwrap());
    assert_mentions(&err_msg(sigmoid_bwd(&y, &on_emu)), &["sigmoid_bwd", "one device"]);
}
