//! Tensors on every device: round trips, fills, in-device copies, reshapes, and shape errors.
mod common;
use common::*;

use ptxgrad::{Device, Tensor};

test_device!(round_trip_and_fill, |dev| {
    let data: Vec<f32> = (0..12).map(|i| i as f32 - 3.5).collect();
    let t = Tensor::from_vec(&[3, 4], data.clone(), &dev).unwrap();
    assert_eq!(t.to_vec().unwrap(), data);
    assert_eq!(Tensor::full(&[5], 1.0, &dev).unwrap().to_vec().unwrap(), vec![1.0; 5]);
    assert_eq!(Tensor::full(&[2, 2], -0.25, &dev).unwrap().to_vec().unwrap(), vec![-0.25; 4]);
    assert_eq!(Tensor::<f32>::zeros(&[3], &dev).unwrap().to_vec().unwrap(), vec![0.0; 3]);
});

test_device!(write_at_copies_into_a_range, |dev| {
    let mut dst = Tensor::zeros(&[6], &dev).unwrap();
    let src = Tensor::from_vec(&[2], vec![7.0, 8.0], &dev).unwrap();
    dst.write_at(3, &src).unwrap();
    assert_eq!(dst.to_vec().unwrap(), vec![0.0, 0.0, 0.0, 7.0, 8.0, 0.0]);
    let err = dst.write_at(5, &src).unwrap_err().to_string();
    assert!(err.contains("write_at"), "{err}");
});

test_device!(reshaped_shares_data_under_a_fresh_id, |dev| {
    let t = rand_tensor(&[2, 3, 4], 1, &dev);
    let r = t.reshaped(&[2, 12]).unwrap();
    assert_ne!(r.id(), t.id());
    assert_eq!(r.shape(), &[2, 12]);
    assert_eq!(r.to_vec().unwrap(), t.to_vec().unwrap());
    let err = t.reshaped(&[5, 5]).unwrap_err().to_string();
    assert!(err.contains("24 elements") && err.contains("[5, 5]"), "{err}");
});

#[test]
fn from_vec_checks_the_length() {
    let err = Tensor::from_vec(&[2, 3], vec![0.0; 5], &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("6 elements") && err.contains("5"), "{err}");
}
