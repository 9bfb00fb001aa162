//! The tape: gradients of a small multi-layer net (conv, ReLU, max-pool, flatten, dense,
//! dropout, softmax-cross-entropy) against finite differences of its forward, on every device;
//! and the tape's own rules (eval records nothing, accumulation, the ReLU mark of a sum).
mod common;
use common::*;

use ptxgrad::ops::gemm::GemmOpts;
use ptxgrad::ops::{
    conv2d::conv2d, conv2d::Conv2d, dense::dense, dropout::dropout, maxpool2d::maxpool2d, reshape::reshape,
};
use ptxgrad::ops::{relu::relu, softmax_xent::softmax_xent};
use ptxgrad::{Device, Gradients, Labels, ReluFact, Tape, Tensor};

/// Parameters of the small net, as host vectors: conv w (4,2,3,3), conv b (4), dense1 w (6, 16),
/// dense1 b (6), dense2 w (3, 6), dense2 b (3).
const SHAPES: [&[usize]; 6] = [&[4, 2, 3, 3], &[4], &[6, 16], &[6], &[3, 6], &[3]];

fn net_loss(tape: &mut Tape, x: &Tensor, y: &Labels, params: &[Tensor]) -> Tensor {
    for p in params {
        tape.watch(p);
    }
    // x: (2, 2, 9, 9) -> conv 3x3 s2 p1 + ReLU -> (2, 4, 5, 5) -> maxpool 3 s2 -> (2, 4, 2, 2)
    let h = conv2d(tape, x, &params[0], &params[1], &Conv2d::new(2, 1).relu(true)).unwrap();
    let h = maxpool2d(tape, &h, 3, 2, 0).unwrap();
    let h = reshape(tape, &h, &[2, 16]).unwrap();
    let h = dense(tape, &h, &params[2], &params[3], false, GemmOpts::default()).unwrap();
    let h = relu(tape, &h).unwrap();
    // A fixed seed: the same mask on every evaluation, so the loss is a smooth function.
    let h = dropout(tape, &h, 0.25, 1234).unwrap();
    let h = dense(tape, &h, &params[4], &params[5], false, GemmOpts::default()).unwrap();
    softmax_xent(tape, &h, y).unwrap()
}

fn setup(dev: &Device) -> (Tensor, Labels, Vec<Tensor>) {
    let x = Tensor::from_vec(&[2, 2, 9, 9], uniform(324, -1.0, 1.0, 7), dev).unwrap();
    let y = Labels::from_vec(&[2], vec![2, 0], dev).unwrap();
    let params = SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| Tensor::from_vec(s, uniform(s.iter().product(), -0.6, 0.6, 10 + i as u64), dev).unwrap())
        .collect();
    (x, y, params)
}

fn loss_value(x: &Tensor, y: &Labels, params: &[Tensor]) -> f64 {
    net_loss(&mut Tape::train(), x, y, params).to_vec().unwrap()[0] as f64
}

test_device!(tape_gradients_match_finite_differences, |dev| {
    let (x, y, params) = setup(&dev);
    let mut tape = Tape::train();
    let loss = net_loss(&mut tape, &x, &y, &params);
    let grads = tape.backward(&loss).unwrap();
    for (param_index, p) in params.iter().enumerate() {
        let analytic = grads.get(p).expect("every parameter gets a gradient").to_vec().unwrap();
        let base = p.to_vec().unwrap();
        // Every element of the small tensors, a stride of the larger ones.
        for element in (0..base.len()).step_by(if base.len() > 20 { 7 } else { 1 }) {
            let eps = 1e-3f32;
            let at = |v: f32| {
                let mut perturbed = base.clone();
                perturbed[element] = v;
                let mut perturbed_params = params.clone();
                perturbed_params[param_index] = Tensor::from_vec(p.shape(), perturbed, &dev).unwrap();
                loss_value(&x, &y, &perturbed_params)
            };
            let numeric = (at(base[element] + eps) - at(base[element] - eps)) / (2.0 * eps as f64);
            // The forward runs in f32 (loss ~1, rounding ~1e-7 -> ~1e-4 after dividing by 2 eps).
            // eps is small because a larger one (1e-2) can carry an input across a ReLU or
            // max-pool kink, where the difference quotient is not the derivative.
            // Bound: 2e-3 absolute + 5% relative.
            let tape_grad = analytic[element] as f64;
            assert!(
                (tape_grad - numeric).abs() <= 2e-3 + 0.05 * numeric.abs(),
                "param {param_index} element {element}: tape {tape_grad} vs finite difference {numeric}"
            );
        }
    }
});

test_device!(eval_tape_records_nothing_and_disables_dropout, |dev| {
    let (x_host, x) = rand_host_and_tensor(&[4, 8], 1, &dev);
    let mut tape = Tape::eval();
    tape.watch(&x);
    let y = dropout(&mut tape, &x, 0.5, 99).unwrap();
    let h = relu(&mut tape, &y).unwrap();
    assert!(tape.is_empty(), "an eval tape records nothing");
    assert_eq!(y.to_vec().unwrap(), x_host, "dropout is the identity in eval mode");
    assert_eq!(h.to_vec().unwrap(), naive::relu(&x_host), "the ops still compute");
});

test_device!(gradients_accumulate_when_a_tensor_is_used_twice, |dev| {
    // x: (1, 3) is both the input and the weight of one dense layer: y = x·xᵀ + b = |x|² + b,
    // so dL/dx = 2x·dL/dy, which only comes out right if the two contributions are added.
    let x = Tensor::from_vec(&[1, 3], vec![0.5, -1.0, 2.0], &dev).unwrap();
    let b = Tensor::from_vec(&[1], vec![0.0], &dev).unwrap();
    let w2 = Tensor::from_vec(&[2, 1], vec![1.0, -1.0], &dev).unwrap();
    let b2 = Tensor::from_vec(&[2], vec![0.0, 0.0], &dev).unwrap();
    let labels = Labels::from_vec(&[1], vec![0], &dev).unwrap();
    let mut tape = Tape::train();
    tape.watch(&x);
    let y = dense(&mut tape, &x, &x, &b, false, GemmOpts::default()).unwrap(); // (1, 1): 5.25
    let logits = dense(&mut tape, &y, &w2, &b2, false, GemmOpts::default()).unwrap(); // (1, 2): [s, -s]
    let loss = softmax_xent(&mut tape, &logits, &labels).unwrap();
    let g = tape.backward(&loss).unwrap().get(&x).unwrap().to_vec().unwrap();
    // L = log(1 + e^{-2s}), dL/ds = -2 / (1 + e^{2s}), s = |x|² = 5.25.
    let s = 5.25f64;
    let dl_ds = -2.0 / (1.0 + (2.0 * s).exp());
    let want: Vec<f32> = [0.5f64, -1.0, 2.0].iter().map(|&v| (2.0 * v * dl_ds) as f32).collect();
    // Closed form vs fp32 kernels: a few ulps of a ~1e-4 value.
    assert_close("dL/dx with x used twice", &want, &g, 1e-8, 1e-4);
});

#[test]
fn backward_needs_a_scalar() {
    let x = Tensor::from_vec(&[2], vec![1.0, 2.0], &Device::Cpu).unwrap();
    let mut tape = Tape::train();
    tape.watch(&x);
    let y = relu(&mut tape, &x).unwrap();
    let err = tape.backward(&y).err().unwrap().to_string();
    assert!(err.contains("scalar") && err.contains("[2]"), "{err}");
}

test_device!(accumulated_gradients_keep_a_relu_mark_only_when_every_term_has_it, |dev| {
    // A gradient marked as already masked for a ReLU output (ops::relu) may skip that ReLU's
    // masking pass; a sum with any unmasked term must not.
    let relu_out = Tensor::from_vec(&[4], vec![0.0, 1.0, 0.0, 2.0], &dev).unwrap();
    let masked =
        |v: Vec<f32>| Tensor::from_vec(&[4], v, &dev).unwrap().with_relu_fact(ReluFact::MaskedFor(relu_out.id()));
    let id = relu_out.id();
    let mut grads = Gradients::default();
    grads.accumulate(id, masked(vec![0.0, 1.0, 0.0, 1.0])).unwrap();
    grads.accumulate(id, masked(vec![0.0, 2.0, 0.0, 3.0])).unwrap();
    let g = grads.get(&relu_out).unwrap();
    assert_eq!(g.relu_fact(), ReluFact::MaskedFor(id), "masked + masked is masked");
    assert_eq!(g.to_vec().unwrap(), vec![0.0, 3.0, 0.0, 4.0]);
    grads.accumulate(id, Tensor::from_vec(&[4], vec![1.0; 4], &dev).unwrap()).unwrap();
    let g = grads.get(&relu_out).unwrap();
    assert_eq!(g.relu_fact(), ReluFact::None, "masked + unmasked is not");
    assert_eq!(g.to_vec().unwrap(), vec![1.0, 4.0, 1.0, 5.0]);
});

#[test]
fn gradients_of_one_tensor_on_two_devices_are_an_error() {
    // x feeds two ops; the tape sums their gradients of x, one handed on the CPU, x and the other
    // on the emulator.
    let emu = Device::parse("emu").unwrap();
    let x = rand_tensor(&[2, 3, 4, 4], 1, &emu);
    let mut tape = Tape::train();
    tape.watch(&x);
    let y1 = relu(&mut tape, &x).unwrap();
    let y2 = relu(&mut tape, &x).unwrap();
    let loss = Tensor::from_vec(&[1], vec![0.0], &emu).unwrap();
    let (gy1, gy2) = (rand_tensor(y1.shape(), 2, &emu), rand_tensor(y2.shape(), 3, &Device::Cpu));
    let (id1, id2) = (y1.id(), y2.id());
    tape.record(&loss, &[&y1, &y2], move |_, grads| {
        grads.accumulate(id1, gy1)?;
        grads.accumulate(id2, gy2)
    });
    assert_mentions(&err_msg(tape.backward(&loss).map(|_| ())), &["all operands must be on one device", "emu", "cpu"]);
}
