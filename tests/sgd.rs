//! SGD update: every device against a naive oracle on every AlexNet parameter shape and awkward
//! ones, NaN and infinity as PyTorch gives them, the kernel's unaligned path, and errors. (No
//! finite-difference test: the update is not differentiated.)
mod common;
use common::*;
use ptxgrad::ops::sgd::sgd_update;
use ptxgrad::{Device, Tensor};

const SHAPES: &[&[usize]] = &[
    &[96, 1, 11, 11], // AlexNet (d2l, 1 input channel) conv1 .. conv5, dense 1..3
    &[96],
    &[256, 96, 5, 5],
    &[384, 256, 3, 3],
    &[384, 384, 3, 3],
    &[256, 384, 3, 3],
    &[4096, 6400],
    &[4096, 4096],
    &[10, 4096],
    &[10],
    &[1],
    &[3, 5, 7],
    &[1000003],
];

/// The emulator runs the cases up to this many elements (all but fc1's and fc2's weights).
const EMULATED_MAX: usize = 1 << 22;

/// The naive oracle, PyTorch's p -= lr * g (torch.optim.SGD without momentum or weight decay):
/// computed in f64, where the product of two f32s is exact, then rounded once to f32.
fn naive_sgd(param: &[f32], grad: &[f32], lr: f32) -> Vec<f32> {
    assert_eq!(param.len(), grad.len());
    let mut out = Vec::with_capacity(param.len());
    for i in 0..param.len() {
        out.push((param[i] as f64 - lr as f64 * grad[i] as f64) as f32);
    }
    out
}

/// |naive - got| for parameters and gradients in [-1, 1) and lr <= 0.5. The kernel may round the
/// product before the subtraction (2 roundings) or fuse both into an FMA (1), the oracle rounds
/// once: they may differ by one ulp of a result below 2 in magnitude, 1.19e-7.
const SGD_ATOL: f32 = 1.2e-7;

test_device!(sgd_matches_naive_oracle, |dev| {
    for (k, shape, _) in cases_on(&dev, SHAPES, EMULATED_MAX) {
        // A large rate, so that the update is as large as the parameter and an error in it
        // shows at the parameter's precision (at 0.01 an error of 1e-5 of the update hides
        // below one rounding of the parameter).
        let lr = 0.5f32;
        let (param_host, mut param) = rand_host_and_tensor(shape, k as u64, &dev);
        let (grad_host, grad) = rand_host_and_tensor(shape, 100 + k as u64, &dev);
        sgd_update(&mut param, &grad, lr).unwrap();
        let want = naive_sgd(&param_host, &grad_host, lr);
        assert_close(&format!("sgd {shape:?}"), &want, &param.to_vec().unwrap(), SGD_ATOL, 0.0);
    }
});

test_device!(sgd_updates_in_place, |dev| {
    let mut p = Tensor::from_vec(&[3], vec![1.0, 2.0, 3.0], &dev).unwrap();
    let id = p.id();
    let g = Tensor::from_vec(&[3], vec![0.5, -1.0, 0.0], &dev).unwrap();
    sgd_update(&mut p, &g, 2.0).unwrap();
    assert_eq!(p.id(), id);
    assert_eq!(p.to_vec().unwrap(), vec![0.0, 4.0, 3.0]); // exact: small integers and halves
});

test_device!(sgd_propagates_nan_and_infinite_gradients, |dev| {
    // As PyTorch's p -= lr * g: a NaN gradient (or parameter) makes the parameter NaN, an
    // infinite gradient an infinite parameter. 11 elements: two groups of 4 for the kernel's
    // 16-byte path, then 3 it updates one by one; specials in both parts.
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let lr = 0.5f32;
    let param_host: Vec<f32> = vec![1.0, 2.0, 3.0, nan, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, inf];
    let grad_host: Vec<f32> = vec![nan, 2.0, inf, 1.0, -inf, 0.0, 2.0, 4.0, nan, 1.0, 2.0];
    #[rustfmt::skip]
    let want: Vec<f32> = vec![nan, 1.0, -inf, nan, inf, 6.0, 6.0, 6.0, nan, 9.5, inf];
    let mut p = Tensor::from_vec(&[11], param_host.clone(), &dev).unwrap();
    sgd_update(&mut p, &Tensor::from_vec(&[11], grad_host.clone(), &dev).unwrap(), lr).unwrap();
    assert_same_bits("sgd", &want, &p.to_vec().unwrap(), |i| format!("p {}, g {}", param_host[i], grad_host[i]));
});

#[test]
fn sgd_rejects_bad_arguments() {
    let dev = Device::Cpu;
    let mut p = rand_tensor(&[2, 3], 0, &dev);
    let msg = err_msg(sgd_update(&mut p, &rand_tensor(&[3, 2], 0, &dev), 0.1));
    assert_mentions(&msg, &["sgd_update", "grad of the param's shape [2, 3]", "found [3, 2]"]);
    let g = rand_tensor(&[2, 3], 1, &dev);
    for lr in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert_mentions(
            &err_msg(sgd_update(&mut p, &g, lr)),
            &["learning rate must be finite", &format!("found {lr}")],
        );
    }
    let emu = Device::parse("emu").unwrap();
    let msg = err_msg(sgd_update(&mut p, &rand_tensor(&[2, 3], 1, &emu), 0.1));
    assert_mentions(&msg, &["sgd_update", "one device", "found cpu, emu"]);
    assert_eq!(p.to_vec().unwrap(), uniform(6, -1.0, 1.0, 0), "no refused update changed p");
    // A parameter whose storage is shared (as when a live tape's closure holds a clone) cannot be
    // updated in place.
    let held = p.clone();
    assert_mentions(&err_msg(sgd_update(&mut p, &g, 0.1)), &["shared", "in place"]);
    drop(held);
    sgd_update(&mut p, &g, 0.1).unwrap();
}

/// The kernel's element-by-element path, taken where an array is not 16-byte aligned (never
/// for driver buffers, so only reachable here): the emulated kernel on offset pointers.
#[test]
fn sgd_kernel_handles_unaligned_arrays_emulated() {
    use std::ffi::c_void;
    let (n, lr) = (37usize, 0.5f32);
    let param_host = uniform(n + 1, -1.0, 1.0, 1);
    let grad_host = uniform(n + 1, -1.0, 1.0, 2);
    for (param_offset, grad_offset) in [(1, 1), (1, 0), (0, 1), (0, 0)] {
        let mut p = param_host.clone();
        let want = naive_sgd(&param_host[param_offset..param_offset + n], &grad_host[grad_offset..grad_offset + n], lr);
        let (mut param_ptr, mut grad_ptr) =
            (p[param_offset..].as_mut_ptr() as u64, grad_host[grad_offset..].as_ptr() as u64);
        let (mut lr_arg, mut n_arg) = (lr, n as u64);
        let args = [&mut param_ptr, &mut grad_ptr].map(|a| a as *mut u64 as *mut c_void);
        let args = [args[0], args[1], &mut lr_arg as *mut f32 as *mut c_void, &mut n_arg as *mut u64 as *mut c_void];
        // SAFETY: the argument list mirrors sgd_update_f32's; both arrays hold n elements from their offsets.
        unsafe { ptxgrad_emu::call("sgd", "sgd_update_f32", (2, 1, 1), 8, &args) }.unwrap();
        assert_close(
            &format!("sgd, offsets {param_offset}, {grad_offset}"),
            &want,
            &p[param_offset..param_offset + n],
            SGD_ATOL,
            0.0,
        );
        assert_eq!(
            (&p[..param_offset], &p[param_offset + n..]),
            (&param_host[..param_offset], &param_host[param_offset + n..]),
            "wrote outside the array"
        );
    }
}
