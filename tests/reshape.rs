//! Recorded reshape: same data, fresh id, gradient reshaped back; shape errors.
mod common;
use common::*;
use ptxgrad::ops::reshape::reshape;
use ptxgrad::ops::softmax_xent::softmax_xent;
use ptxgrad::{Device, Tape, Tensor};

test_device!(reshape_keeps_data_and_gets_a_fresh_id, |dev| {
    for (k, (from, to)) in [
        (&[128usize, 256, 5, 5][..], &[128usize, 6400][..]), // AlexNet's Flatten
        (&[1, 256, 5, 5], &[1, 6400]),
        (&[3, 2, 2], &[12]),
        (&[1], &[1, 1, 1]),
        (&[6], &[2, 3]),
    ]
    .into_iter()
    .enumerate()
    {
        let x = rand_tensor(from, k as u64, &dev);
        let y = reshape(&mut Tape::train(), &x, to).unwrap();
        assert_eq!(y.shape(), to);
        assert_ne!(y.id(), x.id(), "the tape must tell input and output apart");
        assert_eq!(y.to_vec().unwrap(), x.to_vec().unwrap());
    }
});

test_device!(reshape_backward_restores_the_shape, |dev| {
    let x = rand_tensor(&[2, 3, 2, 2], 1, &dev);
    let labels = Tensor::from_vec(&[2], vec![4u32, 11], &dev).unwrap();
    let mut tape = Tape::train();
    tape.watch(&x);
    let flat = reshape(&mut tape, &x, &[2, 12]).unwrap();
    let loss = softmax_xent(&mut tape, &flat, &labels).unwrap();
    let grads = tape.backward(&loss).unwrap();
    let gx = grads.get(&x).expect("x has a gradient");
    assert_eq!(gx.shape(), x.shape());
    // The gradient of the mean cross-entropy: (softmax - onehot) / N, row by row of the flat view.
    let xs = x.to_vec().unwrap();
    let mut want = Vec::new();
    for (r, row) in xs.chunks(12).enumerate() {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let s: f32 = row.iter().map(|v| (v - m).exp()).sum();
        want.extend(
            row.iter()
                .enumerate()
                .map(|(j, v)| ((v - m).exp() / s - if j as u32 == [4, 11][r] { 1.0 } else { 0.0 }) / 2.0),
        );
    }
    // f32 softmax here vs the op's f64/kernel one: a few ulp of probabilities <= 1.
    assert_close("reshape grad", &want, &gx.to_vec().unwrap(), 1e-6, 1e-5);
});

#[test]
fn reshape_rejects_a_different_element_count() {
    let x = rand_tensor(&[2, 3], 0, &Device::Cpu);
    let err = reshape(&mut Tape::train(), &x, &[7]).unwrap_err().to_string();
    assert!(err.contains("6 elements") && err.contains("[7]"), "{err}");
}
