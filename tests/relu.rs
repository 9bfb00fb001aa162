//! ReLU: CPU reference against finite differences, CUDA against the CPU reference.
mod common;
use common::*;
use ptxgrad::ops::relu::{relu_bwd, relu_bwd_cpu, relu_fwd, relu_fwd_cpu, through_fused_relu};
use ptxgrad::{Device, ReluFact, Tensor};

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

#[test]
fn relu_cpu_backward_matches_finite_differences() {
    // Values kept away from the kink at 0, where the derivative is undefined.
    let x: Vec<f32> = uniform(257, -1.0, 1.0, 1).into_iter().map(|v| if v.abs() < 0.05 { 0.5 } else { v }).collect();
    let w = uniform(x.len(), -1.0, 1.0, 2);
    let y = relu_fwd_cpu(&x);
    let analytic = relu_bwd_cpu(&y, &w);
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let numeric = numeric_grad(&x64, 1e-3, |x| x.iter().zip(&w).map(|(&v, &w)| v.max(0.0) * w as f64).sum());
    let numeric: Vec<f32> = numeric.iter().map(|&v| v as f32).collect();
    // Piecewise linear: central differences are exact up to f64 rounding.
    assert_close("relu grad", &numeric, &analytic, 1e-6, 1e-6);
}

test_device!(relu_matches_cpu_reference, |dev| {
    for (k, shape) in SHAPES.iter().enumerate() {
        let x = rand_tensor(shape, k as u64, &dev);
        let gy = rand_tensor(shape, 100 + k as u64, &dev);
        let y = relu_fwd(&x).unwrap();
        let gx = relu_bwd(&y, &gy).unwrap();
        let xh = x.to_vec().unwrap();
        let yr = relu_fwd_cpu(&xh);
        // max and select are exact in fp32: no tolerance.
        assert_close("relu fwd", &yr, &y.to_vec().unwrap(), 0.0, 0.0);
        assert_close("relu bwd", &relu_bwd_cpu(&yr, &gy.to_vec().unwrap()), &gx.to_vec().unwrap(), 0.0, 0.0);
    }
});

#[test]
fn relu_bwd_rejects_mismatched_shapes() {
    let y = Tensor::from_vec(&[2, 3], vec![0.0; 6], &Device::Cpu).unwrap();
    let gy = Tensor::from_vec(&[3, 2], vec![0.0; 6], &Device::Cpu).unwrap();
    let err = relu_bwd(&y, &gy).unwrap_err().to_string();
    assert!(err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
}

test_device!(relu_backward_passes_through_a_gradient_already_masked_for_its_output, |dev| {
    let y = relu_fwd(&rand_tensor(&[3, 5, 7, 9], 5, &dev)).unwrap();
    assert_eq!(y.relu_fact(), ReluFact::Output);
    let gy = rand_tensor(y.shape(), 6, &dev);
    let want = relu_bwd_cpu(&y.to_vec().unwrap(), &gy.to_vec().unwrap());
    // Unmarked, or marked for another tensor: masked here.
    for fact in [ReluFact::None, ReluFact::Output, ReluFact::MaskedFor(gy.id())] {
        let g = through_fused_relu(Some(&y), &gy.clone().with_relu_fact(fact)).unwrap();
        assert_ne!(g.id(), gy.id(), "{fact:?}: a new, masked gradient");
        assert_close("masked here", &want, &g.to_vec().unwrap(), 0.0, 0.0);
    }
    // Marked as masked for y: the same tensor, untouched (no pass runs).
    let g = through_fused_relu(Some(&y), &gy.clone().with_relu_fact(ReluFact::MaskedFor(y.id()))).unwrap();
    assert_eq!(g.id(), gy.id());
    assert_close("passed through", &gy.to_vec().unwrap(), &g.to_vec().unwrap(), 0.0, 0.0);
    // No ReLU: passed through whatever the mark.
    assert_eq!(through_fused_relu(None, &gy).unwrap().id(), gy.id());
});

/// Equal bit for bit (so +0.0 is not -0.0), or both NaN (of any payload).
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

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
    let (xv, want) = specials();
    let x = Tensor::from_vec(&[xv.len()], xv.clone(), &dev).unwrap();
    let y = relu_fwd(&x).unwrap().to_vec().unwrap();
    let cpu = relu_fwd_cpu(&xv);
    for i in 0..xv.len() {
        assert!(same(want[i], y[i]), "relu({}) = {}, PyTorch gives {}", xv[i], y[i], want[i]);
        assert!(same(want[i], cpu[i]), "CPU reference: relu({}) = {}", xv[i], cpu[i]);
    }
});

test_device!(relu_backward_passes_the_gradient_at_a_nan_output, |dev| {
    // PyTorch's threshold_backward: gx = y <= 0 ? 0 : gy. A NaN output passes gy (finite or
    // NaN); y <= 0 zeroes it even when gy is NaN or infinite; y > 0 (+inf too) passes it.
    let (xv, yv) = specials();
    let n = xv.len();
    let y = relu_fwd(&Tensor::from_vec(&[n], xv.clone(), &dev).unwrap()).unwrap();
    for special in [f32::NAN, f32::INFINITY, 0.75] {
        // The special gradient at the even elements, an ordinary one at the odd.
        let gyv: Vec<f32> = (0..n).map(|i| if i % 2 == 0 { special } else { 0.5 + i as f32 }).collect();
        let gy = Tensor::from_vec(&[n], gyv.clone(), &dev).unwrap();
        let gx = relu_bwd(&y, &gy).unwrap().to_vec().unwrap();
        let cpu = relu_bwd_cpu(&yv, &gyv);
        for i in 0..n {
            let want = if yv[i].is_nan() || yv[i] > 0.0 { gyv[i] } else { 0.0 };
            assert!(same(want, gx[i]), "x {}, gy {}: gx {}, PyTorch gives {want}", xv[i], gyv[i], gx[i]);
            assert!(same(want, cpu[i]), "CPU reference: x {}, gy {}: gx {}", xv[i], gyv[i], cpu[i]);
        }
    }
});
