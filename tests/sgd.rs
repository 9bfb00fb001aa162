//! SGD update: CUDA vs the CPU reference on every AlexNet parameter shape and awkward ones, and
//! errors. (No finite-difference test: the update is not differentiated.)
mod common;
use common::*;
use ptxgrad::ops::sgd::{sgd_update, sgd_update_cpu};
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

test_device!(sgd_matches_cpu_reference, |dev| {
    for (k, shape) in SHAPES.iter().enumerate() {
        let lr = 0.01f32;
        let mut p = rand_tensor(shape, k as u64, &dev);
        let g = rand_tensor(shape, 100 + k as u64, &dev);
        let mut want = p.to_vec().unwrap();
        sgd_update_cpu(&mut want, &g.to_vec().unwrap(), lr);
        sgd_update(&mut p, &g, lr).unwrap();
        // The kernel may fuse p - lr * g into one FMA (one rounding instead of two): results may
        // differ by one rounding of a value of magnitude <= 1.01, i.e. 6e-8 absolute.
        assert_close("sgd", &want, &p.to_vec().unwrap(), 1.2e-7, 0.0);
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
    let pv: Vec<f32> = vec![1.0, 2.0, 3.0, nan, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, inf];
    let gv: Vec<f32> = vec![nan, 2.0, inf, 1.0, -inf, 0.0, 2.0, 4.0, nan, 1.0, 2.0];
    #[rustfmt::skip]
    let want: Vec<f32> = vec![nan, 1.0, -inf, nan, inf, 6.0, 6.0, 6.0, nan, 9.5, inf];
    let mut p = Tensor::from_vec(&[11], pv.clone(), &dev).unwrap();
    let g = Tensor::from_vec(&[11], gv.clone(), &dev).unwrap();
    sgd_update(&mut p, &g, lr).unwrap();
    let mut cpu = pv.clone();
    sgd_update_cpu(&mut cpu, &gv, lr);
    for (what, got) in [("sgd", p.to_vec().unwrap()), ("CPU reference", cpu)] {
        for i in 0..11 {
            let same = if want[i].is_nan() { got[i].is_nan() } else { got[i] == want[i] };
            assert!(same, "{what}: element {i} (p {}, g {}): {} instead of {}", pv[i], gv[i], got[i], want[i]);
        }
    }
});

#[test]
fn sgd_rejects_bad_arguments() {
    let dev = Device::Cpu;
    let mut p = rand_tensor(&[2, 3], 0, &dev);
    let err = sgd_update(&mut p, &rand_tensor(&[3, 2], 0, &dev), 0.1).unwrap_err().to_string();
    assert!(err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
    let g = rand_tensor(&[2, 3], 1, &dev);
    let err = sgd_update(&mut p, &g, f32::NAN).unwrap_err().to_string();
    assert!(err.contains("learning rate"), "{err}");
    // A parameter whose storage is shared (as when a live tape's closure holds a clone) cannot be
    // updated in place.
    let held = p.clone();
    let err = sgd_update(&mut p, &g, 0.1).unwrap_err().to_string();
    assert!(err.contains("shared"), "{err}");
    drop(held);
    sgd_update(&mut p, &g, 0.1).unwrap();
}

/// The kernel's element-by-element path, taken where an array is not 16-byte aligned (never
/// for driver buffers, so only reachable here): the emulated kernel on offset pointers.
#[test]
fn sgd_kernel_handles_unaligned_arrays_emulated() {
    use std::ffi::c_void;
    let (n, lr) = (37usize, 0.5f32);
    let p0 = uniform(n + 1, -1.0, 1.0, 1);
    let g0 = uniform(n + 1, -1.0, 1.0, 2);
    for (po, go) in [(1, 1), (1, 0), (0, 1), (0, 0)] {
        let mut p = p0.clone();
        let mut want = p0[po..po + n].to_vec();
        sgd_update_cpu(&mut want, &g0[go..go + n], lr);
        let (mut pp, mut gp) = (p[po..].as_mut_ptr() as u64, g0[go..].as_ptr() as u64);
        let (mut lr_arg, mut n_arg) = (lr, n as u64);
        let args = [&mut pp, &mut gp].map(|a| a as *mut u64 as *mut c_void);
        let args = [args[0], args[1], &mut lr_arg as *mut f32 as *mut c_void, &mut n_arg as *mut u64 as *mut c_void];
        // SAFETY: the argument list mirrors sgd_update_f32's; both arrays hold n elements from their offsets.
        unsafe { ptxgrad_emu::call("sgd", "sgd_update_f32", (2, 1, 1), 8, &args) }.unwrap();
        assert_close(&format!("sgd, offsets {po}, {go}"), &want, &p[po..po + n], 1.2e-7, 0.0);
        assert_eq!(p[..po], p0[..po], "wrote before the array");
    }
}
