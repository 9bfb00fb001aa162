//! add_assign, the tape's gradient accumulator: CUDA against the CPU reference, and errors.
mod common;
use common::*;
use ptxgrad::ops::add::{add_assign, add_assign_cpu};
use ptxgrad::{Device, Tensor};

const SHAPES: &[&[usize]] = &[
    &[96, 1, 11, 11], // conv1 weight gradient
    &[4096, 6400],    // fc1 weight gradient (26M elements)
    &[128, 96, 54, 54],
    &[256],
    &[1],
    &[3, 5, 7],
    &[1, 1, 1, 1],
    &[10, 4096],
    &[1000003],
    &[2, 3, 4, 5],
];

test_device!(add_assign_matches_cpu_reference, |dev| {
    for (k, shape) in SHAPES.iter().enumerate() {
        let mut dst = rand_tensor(shape, k as u64, &dev);
        let src = rand_tensor(shape, 50 + k as u64, &dev);
        let mut want = dst.to_vec().unwrap();
        add_assign_cpu(&mut want, &src.to_vec().unwrap());
        add_assign(&mut dst, &src).unwrap();
        // One fp32 addition per element, the same on both sides: exact.
        assert_close(&format!("add_assign {shape:?}"), &want, &dst.to_vec().unwrap(), 0.0, 0.0);
    }
});

#[test]
fn add_assign_rejects_mismatched_shapes_and_shared_destinations() {
    let mut a = Tensor::from_vec(&[2, 3], vec![0.0; 6], &Device::Cpu).unwrap();
    let b = Tensor::from_vec(&[3, 2], vec![0.0; 6], &Device::Cpu).unwrap();
    let err = add_assign(&mut a, &b).unwrap_err().to_string();
    assert!(err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
    let c = Tensor::from_vec(&[2, 3], vec![1.0; 6], &Device::Cpu).unwrap();
    let _shared = a.clone();
    let err = add_assign(&mut a, &c).unwrap_err().to_string();
    assert!(err.contains("shared"), "{err}");
}
