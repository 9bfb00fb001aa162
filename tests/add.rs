//! The residual sum (y = a + b, recorded) and add_assign (dst += src in place, the tape's
//! gradient accumulator): every device against a naive elementwise sum, IEEE special values as
//! PyTorch's add gives them, the gradient of a tensor that feeds the sum and another op (as a
//! residual block's input), checked by finite differences, and the errors (shapes, devices, a
//! shared destination).
mod common;
use common::*;
use ptxgrad::ops::add::{add, add_fwd};
use ptxgrad::ops::relu::relu;
use ptxgrad::{Device, Tape, Tensor};

const SHAPES: &[&[usize]] = &[
    &[96, 1, 11, 11], // conv1 weight gradient
    &[4096, 6400],    // fc1 weight gradient (26M elements)
    &[128, 96, 54, 54],
    &[256],
    &[1],
    &[3, 5, 7],
    &[1, 1, 1, 1],
    &[10, 4096],
    &[1000003], // odd length, thousands of blocks
    &[2, 3, 4, 5],
];

/// The emulator runs the cases up to this many elements (all but the two AlexNet-sized ones).
const EMULATED_MAX: usize = 1 << 21;

/// The naive oracle: dst + src, one IEEE f32 addition per element.
fn naive_add(dst: &[f32], src: &[f32]) -> Vec<f32> {
    assert_eq!(dst.len(), src.len());
    let mut out = Vec::with_capacity(dst.len());
    for i in 0..dst.len() {
        out.push(dst[i] + src[i]);
    }
    out
}

test_device!(add_assign_matches_naive_sum, |dev| {
    for (k, shape, _) in cases_on(&dev, SHAPES, EMULATED_MAX) {
        let (dst_host, mut dst) = rand_host_and_tensor(shape, k as u64, &dev);
        let (src_host, src) = rand_host_and_tensor(shape, 50 + k as u64, &dev);
        let id = dst.id();
        dst.add_assign(&src).unwrap();
        // One correctly rounded f32 addition per element on every path: exact.
        let what = format!("add_assign {shape:?}");
        assert_close(&what, &naive_add(&dst_host, &src_host), &dst.to_vec().unwrap(), 0.0, 0.0);
        assert_eq!((dst.id(), dst.shape()), (id, shape), "{what}: in place, shape kept");
        assert_eq!(src.to_vec().unwrap(), src_host, "{what}: src untouched");
    }
});

test_device!(add_assign_propagates_nan_and_infinity, |dev| {
    // As PyTorch's add_: NaN + anything is NaN, inf + -inf is NaN, inf + finite is inf, the
    // largest finite values overflow to inf, and the signs of zeros follow IEEE (-0 + -0 = -0,
    // -0 + +0 = +0).
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    #[rustfmt::skip]
    let dst_host = vec![nan, 1.0, inf, inf, -inf, inf, f32::MAX, -f32::MAX, -0.0, -0.0, 0.0, 2.5, -nan];
    #[rustfmt::skip]
    let src_host = vec![1.0, nan, -inf, 1.0, -2.0, inf, f32::MAX, -f32::MAX, -0.0, 0.0, -0.0, -2.5, nan];
    #[rustfmt::skip]
    let want = vec![nan, nan, nan, inf, -inf, inf, inf, -inf, -0.0, 0.0, 0.0, 0.0, nan];
    let mut dst = Tensor::from_vec(&[13], dst_host.clone(), &dev).unwrap();
    dst.add_assign(&Tensor::from_vec(&[13], src_host.clone(), &dev).unwrap()).unwrap();
    assert_same_bits("add_assign", &want, &dst.to_vec().unwrap(), |i| format!("{} + {}", dst_host[i], src_host[i]));
});

#[test]
fn add_assign_rejects_mismatched_shapes() {
    let dev = Device::Cpu;
    let mut dst = rand_tensor(&[2, 3], 0, &dev);
    // The same number of elements in another shape is still a mismatch.
    for src_shape in [&[3, 2][..], &[6], &[2, 3, 1], &[2, 4]] {
        let msg = err_msg(dst.add_assign(&rand_tensor(src_shape, 1, &dev)));
        assert_mentions(&msg, &["add_assign", "src of shape [2, 3]", &format!("found {src_shape:?}")]);
    }
}

#[test]
fn add_assign_rejects_operands_on_different_devices() {
    let emu = Device::parse("emu").unwrap();
    for (dst_dev, src_dev) in [(Device::Cpu, emu.clone()), (emu, Device::Cpu)] {
        let mut dst = rand_tensor(&[4], 0, &dst_dev);
        let msg = err_msg(dst.add_assign(&rand_tensor(&[4], 1, &src_dev)));
        let found = format!("found {}, {}", dst_dev.label(), src_dev.label());
        assert_mentions(&msg, &["add_assign", "all operands must be on one device", &found]);
        assert_eq!(dst.to_vec().unwrap(), uniform(4, -1.0, 1.0, 0), "dst untouched");
    }
}

test_device!(add_assign_refuses_a_shared_destination, |dev| {
    // A destination whose storage a clone still holds (as a tape's closure may) cannot be updated
    // in place: the clone would change with it.
    let (dst_host, mut dst) = rand_host_and_tensor(&[2, 3], 0, &dev);
    let (src_host, src) = rand_host_and_tensor(&[2, 3], 1, &dev);
    let held = dst.clone();
    assert_mentions(&err_msg(dst.add_assign(&src)), &["shared", "in place"]);
    assert_eq!(held.to_vec().unwrap(), dst_host, "the clone is untouched");
    // Once the clone is gone, the same update goes through.
    drop(held);
    dst.add_assign(&src).unwrap();
    assert_close("after the clone is dropped", &naive_add(&dst_host, &src_host), &dst.to_vec().unwrap(), 0.0, 0.0);
});

test_device!(add_matches_naive_sum, |dev| {
    for (k, shape, _) in cases_on(&dev, SHAPES, EMULATED_MAX) {
        let (a_host, a) = rand_host_and_tensor(shape, k as u64, &dev);
        let (b_host, b) = rand_host_and_tensor(shape, 70 + k as u64, &dev);
        let y = add_fwd(&a, &b).unwrap();
        let what = format!("add {shape:?}");
        assert_eq!(y.shape(), shape, "{what}: shape");
        assert_close(&what, &naive_add(&a_host, &b_host), &y.to_vec().unwrap(), 0.0, 0.0);
        assert_ne!(y.id(), a.id(), "{what}: a new tensor");
        assert_eq!(a.to_vec().unwrap(), a_host, "{what}: a untouched");
    }
});

test_device!(add_propagates_nan_and_infinity, |dev| {
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let a_host = vec![nan, 1.0, inf, inf, f32::MAX, -0.0, -0.0];
    let b_host = vec![1.0, nan, -inf, 1.0, f32::MAX, -0.0, 0.0];
    let want = vec![nan, nan, nan, inf, inf, -0.0, 0.0];
    let a = Tensor::from_vec(&[7], a_host.clone(), &dev).unwrap();
    let b = Tensor::from_vec(&[7], b_host.clone(), &dev).unwrap();
    let y = add_fwd(&a, &b).unwrap().to_vec().unwrap();
    assert_same_bits("add", &want, &y, |i| format!("{} + {}", a_host[i], b_host[i]));
});

// The residual pattern: x feeds relu and the sum, y = relu(x) + x, loss = sum(w * y). The
// tape must add the two gradients of x: w * (1[x > 0] + 1).
test_device!(add_accumulates_the_gradient_of_a_tensor_feeding_two_ops, |dev| {
    for (k, shape) in [&[2, 3, 4, 5][..], &[1, 1, 1, 1], &[3, 7], &[2, 64, 3, 3]].iter().enumerate() {
        let n: usize = shape.iter().product();
        // Away from 0, where the ReLU has no derivative.
        let x_host: Vec<f32> =
            uniform(n, -1.0, 1.0, 10 + k as u64).iter().map(|v| if v.abs() < 0.05 { v + 0.1 } else { *v }).collect();
        let w_host = uniform(n, -1.0, 1.0, 20 + k as u64);
        let x = Tensor::from_vec(shape, x_host.clone(), &dev).unwrap();
        let w = Tensor::from_vec(shape, w_host.clone(), &dev).unwrap();
        let mut tape = Tape::train();
        tape.watch(&x);
        let r = relu(&mut tape, &x).unwrap();
        let y = add(&mut tape, &r, &x).unwrap();
        let grads = backward_from(tape, &y, &w);
        let got = grads.get(&x).expect("x's gradient").to_vec().unwrap();
        let loss = |x: &[f64]| -> f64 { x.iter().zip(&w_host).map(|(&v, &w)| w as f64 * (v.max(0.0) + v)).sum() };
        let numeric = numeric_grad_at(&x_host, 1e-3, loss);
        assert_close(&format!("d(relu(x) + x)/dx {shape:?}"), &numeric, &got, 1e-4, 1e-4);
    }
});

test_device!(add_of_a_tensor_with_itself_doubles_its_gradient, |dev| {
    let (_, x) = rand_host_and_tensor(&[2, 3, 5], 3, &dev);
    let (gy_host, gy) = rand_host_and_tensor(&[2, 3, 5], 4, &dev);
    let mut tape = Tape::train();
    tape.watch(&x);
    let y = add(&mut tape, &x, &x).unwrap();
    let grads = backward_from(tape, &y, &gy);
    let want: Vec<f32> = gy_host.iter().map(|g| g + g).collect();
    assert_close("d(x + x)/dx", &want, &grads.get(&x).unwrap().to_vec().unwrap(), 0.0, 0.0);
    // gy itself is left as it was (the sum went to a copy).
    assert_eq!(gy.to_vec().unwrap(), gy_host);
});

test_device!(add_gives_a_gradient_only_where_one_is_needed, |dev| {
    let (a, b) = (rand_tensor(&[4, 2], 0, &dev), rand_tensor(&[4, 2], 1, &dev));
    let mut tape = Tape::train();
    tape.watch(&a);
    let y = add(&mut tape, &a, &b).unwrap();
    let gy = rand_tensor(&[4, 2], 2, &dev);
    let grads = backward_from(tape, &y, &gy);
    assert_eq!(grads.get(&a).unwrap().to_vec().unwrap(), gy.to_vec().unwrap());
    assert!(grads.get(&b).is_none(), "b was not watched");
    // An eval tape records nothing.
    let mut tape = Tape::eval();
    add(&mut tape, &a, &b).unwrap();
    assert!(tape.is_empty());
});

#[test]
fn add_rejects_mismatched_shapes_and_devices() {
    let a = rand_tensor(&[2, 3], 0, &Device::Cpu);
    for b_shape in [&[3, 2][..], &[6], &[2, 3, 1]] {
        let msg = err_msg(add_fwd(&a, &rand_tensor(b_shape, 1, &Device::Cpu)));
        assert_mentions(&msg, &["add", "b of a's shape [2, 3]", &format!("found {b_shape:?}")]);
    }
    let emu = Device::parse("emu").unwrap();
    let msg = err_msg(add_fwd(&a, &rand_tensor(&[2, 3], 1, &emu)));
    assert_mentions(&msg, &["add", "all operands must be on one device"]);
}
