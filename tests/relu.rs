//! ReLU: every device against the naive oracle (tests/common/naive.rs), the CPU reference's
//! backward against finite differences, NaN and signed zeros as PyTorch gives them, and the
//! backward's pass-through of a gradient that a consumer already masked.
mod common;
use common::*;
use ptxgrad::ops::relu::{relu, relu_bwd, relu_bwd_cpu, relu_fwd, relu_fwd_cpu, through_fused_relu};
use ptxgrad::{Device, ReluFact, Tape, Tensor};

const SHAPES: &[&[usize]] = &[
    &[128, 96, 54, 54], // after conv1 (AlexNet, batch 128)
    &[128, 256, 26, 26],
    &[128, 384, 12, 12],
    &[128, 4096],
    &[1, 1],
    &[3, 5, 7, 9],
    &[1, 96, 54, 54],
    &[3, 4096],
    &[2, 1000003],
    &[7],
];

/// The emulator runs the cases up to this many elements (all but the first three).
const EMULATED_MAX: usize = 1 << 22;

#[test]
fn relu_cpu_backward_matches_finite_differences() {
    // Values kept away from the kink at 0, where the derivative is undefined.
    let x: Vec<f32> = uniform(257, -1.0, 1.0, 1).into_iter().map(|v| if v.abs() < 0.05 { 0.5 } else { v }).collect();
    let loss_weights = uniform(x.len(), -1.0, 1.0, 2);
    let y = relu_fwd_cpu(&x);
    let analytic = relu_bwd_cpu(&y, &loss_weights);
    let numeric =
        numeric_grad_at(&x, 1e-3, |x| x.iter().zip(&loss_weights).map(|(&v, &r)| v.max(0.0) * r as f64).sum());
    // Piecewise linear: central differences are exact up to f64 rounding.
    assert_close("relu grad", &numeric, &analytic, 1e-6, 1e-6);
}

test_device!(relu_matches_naive_oracle, |dev| {
    for (k, shape, _) in cases_on(&dev, SHAPES, EMULATED_MAX) {
        let (x_host, x) = rand_host_and_tensor(shape, k as u64, &dev);
        let (gy_host, gy) = rand_host_and_tensor(shape, 100 + k as u64, &dev);
        let y = relu_fwd(&x).unwrap();
        let gx = relu_bwd(&y, &gy).unwrap();
        // A comparison and a select: exact in fp32.
        let want_y = naive::relu(&x_host);
        assert_close(&format!("relu fwd {shape:?}"), &want_y, &y.to_vec().unwrap(), 0.0, 0.0);
        let want_gx = naive::relu_backward(&want_y, &gy_host);
        assert_close(&format!("relu bwd {shape:?}"), &want_gx, &gx.to_vec().unwrap(), 0.0, 0.0);
    }
});

#[test]
fn relu_bwd_rejects_mismatched_shapes() {
    let y = rand_tensor(&[2, 3], 0, &Device::Cpu);
    let msg = err_msg(relu_bwd(&y, &rand_tensor(&[3, 2], 1, &Device::Cpu)));
    assert_mentions(&msg, &["relu_bwd", "gy", "[2, 3]", "found [3, 2]"]);
}

test_device!(relu_records_its_backward, |dev| {
    // x: (3, 5, 7, 9) through the recorded ReLU; gy is the gradient the tape hands it.
    let (x_host, x) = rand_host_and_tensor(&[3, 5, 7, 9], 7, &dev);
    let (gy_host, gy) = rand_host_and_tensor(&[3, 5, 7, 9], 8, &dev);
    let mut tape = Tape::train();
    tape.watch(&x);
    let y = relu(&mut tape, &x).unwrap();
    let want_y = naive::relu(&x_host);
    assert_close("recorded relu", &want_y, &y.to_vec().unwrap(), 0.0, 0.0);
    let grads = backward_from(tape, &y, &gy);
    let gx = grads.get(&x).expect("x has a gradient").to_vec().unwrap();
    assert_close("recorded relu backward", &naive::relu_backward(&want_y, &gy_host), &gx, 0.0, 0.0);
});

test_device!(relu_backward_passes_through_a_gradient_already_masked_for_its_output, |dev| {
    let y = relu_fwd(&rand_tensor(&[3, 5, 7, 9], 5, &dev)).unwrap();
    assert_eq!(y.relu_fact(), ReluFact::Output);
    let (gy_host, gy) = rand_host_and_tensor(y.shape(), 6, &dev);
    let want = naive::relu_backward(&y.to_vec().unwrap(), &gy_host);
    // Unmarked, or marked for another tensor: masked here.
    for fact in [ReluFact::None, ReluFact::Output, ReluFact::MaskedFor(gy.id())] {
        let g = through_fused_relu(Some(&y), &gy.clone().with_relu_fact(fact)).unwrap();
        assert_ne!(g.id(), gy.id(), "{fact:?}: a new, masked gradient");
        assert_close("masked here", &want, &g.to_vec().unwrap(), 0.0, 0.0);
    }
    // Marked as masked for y: the same tensor, untouched (no pass runs).
    let g = through_fused_relu(Some(&y), &gy.clone().with_relu_fact(ReluFact::MaskedFor(y.id()))).unwrap();
    assert_eq!(g.id(), gy.id());
    assert_close("passed through", &gy_host, &g.to_vec().unwrap(), 0.0, 0.0);
    // No ReLU: passed through whatever the mark.
    assert_eq!(through_fused_relu(None, &gy).unwrap().id(), gy.id());
});

/// x's special values and what PyTorch's relu makes of them (NaN stays NaN; -0.0 gives +0.0).
fn specials() -> (Vec<f32>, Vec<f32>) {
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let tiny = -f32::from_bits(1); // the negative subnormal closest to 0
    #[rustfmt::skip]
    let x = vec![nan, -nan, inf, -inf, -0.0, 0.0, -1.5, 2.5, tiny, f32::MIN, f32::MAX, f32::MIN_POSITIVE];
    #[rustfmt::skip]
    let y = vec![nan, nan, inf, 0.0, 0.0, 0.0, 0.0, 2.5, 0.0, 0.0, f32::MAX, f32::MIN_POSITIVE];
    (x, y)
}

test_device!(relu_propagates_nan_as_pytorch, |dev| {
    let (x_host, want) = specials();
    let x = Tensor::from_vec(&[x_host.len()], x_host.clone(), &dev).unwrap();
    assert_same_bits("relu", &want, &relu_fwd(&x).unwrap().to_vec().unwrap(), |i| format!("x {}", x_host[i]));
});

test_device!(relu_backward_passes_the_gradient_at_a_nan_output, |dev| {
    // PyTorch's threshold_backward: gx = y <= 0 ? 0 : gy. A NaN output passes gy (finite or
    // NaN); y <= 0 zeroes it even when gy is NaN or infinite; y > 0 (+inf too) passes it.
    let (x_host, y_host) = specials();
    let n = x_host.len();
    let y = relu_fwd(&Tensor::from_vec(&[n], x_host.clone(), &dev).unwrap()).unwrap();
    for special in [f32::NAN, f32::INFINITY, 0.75] {
        // The special gradient at the even elements, an ordinary one at the odd.
        let gy_host: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { special } else { 0.5 + i as f32 }).collect();
        let gy = Tensor::from_vec(&[n], gy_host.clone(), &dev).unwrap();
        let gx = relu_bwd(&y, &gy).unwrap().to_vec().unwrap();
        let want = naive::relu_backward(&y_host, &gy_host);
        assert_same_bits("relu backward", &want, &gx, |i| format!("x {}, gy {}", x_host[i], gy_host[i]));
    }
});
