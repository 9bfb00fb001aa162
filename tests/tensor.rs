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
    // 2 elements from offset 5 of 6: one too many; nothing written.
    assert_mentions(&err_msg(dst.write_at(5, &src)), &["write_at", "at most 1 elements from offset 5", "found 2"]);
    assert_mentions(&err_msg(dst.write_at(7, &src)), &["at most 0 elements from offset 7"]);
    assert_eq!(dst.to_vec().unwrap(), vec![0.0, 0.0, 0.0, 7.0, 8.0, 0.0]);
    // Operands on two devices.
    let other = if dev.is_cuda() { Device::Cpu } else { Device::parse("emu").unwrap() };
    let msg = err_msg(dst.write_at(0, &Tensor::from_vec(&[2], vec![1.0, 2.0], &other).unwrap()));
    assert_mentions(&msg, &["write_at", "one device", &other.label()]);
});

test_device!(reshaped_shares_data_under_a_fresh_id, |dev| {
    let (data, t) = rand_host_and_tensor(&[2, 3, 4], 1, &dev);
    let reshaped_t = t.reshaped(&[2, 12]).unwrap();
    assert_ne!(reshaped_t.id(), t.id());
    assert_eq!((reshaped_t.shape(), reshaped_t.to_vec().unwrap()), (&[2, 12][..], data.clone()));
    assert_eq!((t.shape(), t.to_vec().unwrap()), (&[2, 3, 4][..], data));
    assert_mentions(&err_msg(t.reshaped(&[5, 5])), &["24 elements", "[5, 5]"]);
});

#[test]
fn from_vec_checks_the_length() {
    assert_mentions(
        &err_msg(Tensor::from_vec(&[2, 3], vec![0.0; 5], &Device::Cpu)),
        &["6 elements for shape [2, 3]", "found 5"],
    );
}
