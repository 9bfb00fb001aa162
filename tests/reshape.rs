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
        let (x_host, x) = rand_host_and_tensor(from, k as u64, &dev);
        let y = reshape(&mut Tape::train(), &x, to).unwrap();
        assert_eq!(y.shape(), to);
        assert_ne!(y.id(), x.id(), "the tape must tell input and output apart");
        assert_eq!(y.to_vec().unwrap(), x_host, "{from:?} -> {to:?}: the same elements in the same order");
        assert_eq!((x.shape(), x.to_vec().unwrap()), (from, x_host), "x untouched");
    }
});

test_device!(reshape_backward_restores_the_shape, |dev| {
    // x: (2, 3, 2, 2), flattened to (2, 12) logits.
    let (x_host, x) = rand_host_and_tensor(&[2, 3, 2, 2], 1, &dev);
    let labels = Tensor::from_vec(&[2], vec![4u32, 11], &dev).unwrap();
    let mut tape = Tape::train();
    tape.watch(&x);
    let flat = reshape(&mut tape, &x, &[2, 12]).unwrap();
    let loss = softmax_xent(&mut tape, &flat, &labels).unwrap();
    let grads = tape.backward(&loss).unwrap();
    let gx = grads.get(&x).expect("x has a gradient");
    assert_eq!(gx.shape(), x.shape());
    // The gradient of the mean cross-entropy of the flat view, in x's shape: the same elements.
    let (_, probs) = naive::softmax_xent(&naive::f64s(&x_host), &[4, 11], 12);
    let want = naive::f32s(&naive::softmax_xent_grad(&probs, &[4, 11], 12, 1.0));
    // As in tests/softmax_xent.rs: a few ulp of probabilities <= 1.
    assert_close("reshape grad", &want, &gx.to_vec().unwrap(), 1e-7, 1e-5);
});

#[test]
fn reshape_rejects_a_different_element_count() {
    let x = rand_tensor(&[2, 3], 0, &Device::Cpu);
    assert_mentions(&err_msg(reshape(&mut Tape::train(), &x, &[7])), &["6 elements", "[7]"]);
}
