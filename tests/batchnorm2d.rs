//! Batch norm: every device against a naive f64 oracle (training forward, batch statistics,
//! backward; evaluation on the running statistics), the backward against finite differences,
//! stability at a large mean, PyTorch's running update, and the errors.
mod common;
use common::*;
use ptxgrad::ops::batchnorm2d::{batchnorm2d, update_running, BatchStats, BN_EPS};
use ptxgrad::{Device, Tape, Tensor};

/// (N, C, H, W): odd sizes, a batch of 1x1 images, a channel of more values than a block has
/// threads, ResNet-18's last stage (C = 512 at 3x3), one channel, two values per channel.
const SHAPES: &[[usize; 4]] = &[
    [1, 1, 1, 2],
    [2, 3, 5, 7],
    [3, 1, 1, 1],
    [1, 4, 9, 9],
    [4, 2, 17, 19],
    [2, 512, 3, 3],
    [5, 3, 1, 1],
    [1, 1, 33, 31],
    [2, 64, 12, 12],
    [2, 1, 1, 1],
    [3, 7, 4, 4],
];

/// The emulator runs the shapes up to this many elements.
const EMULATED_MAX: usize = 20_000;

/// The oracle, in f64: (y, mean, biased var) of training mode.
fn naive_train(x: &[f64], shape: [usize; 4], gamma: &[f64], beta: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let [n, c, h, w] = shape;
    let hw = h * w;
    let idx = |ni: usize, ci: usize, i: usize| (ni * c + ci) * hw + i;
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    for ci in 0..c {
        let vals: Vec<f64> =
            (0..n).flat_map(|ni| (0..hw).map(move |i| (ni, i))).map(|(ni, i)| x[idx(ni, ci, i)]).collect();
        mean[ci] = vals.iter().sum::<f64>() / vals.len() as f64;
        var[ci] = vals.iter().map(|v| (v - mean[ci]).powi(2)).sum::<f64>() / vals.len() as f64;
    }
    let y = naive_apply(x, shape, &mean, &var, gamma, beta);
    (y, mean, var)
}

fn naive_apply(x: &[f64], shape: [usize; 4], mean: &[f64], var: &[f64], gamma: &[f64], beta: &[f64]) -> Vec<f64> {
    let [_, c, h, w] = shape;
    x.iter()
        .enumerate()
        .map(|(k, &v)| {
            let ci = k / (h * w) % c;
            gamma[ci] * (v - mean[ci]) / (var[ci] + BN_EPS as f64).sqrt() + beta[ci]
        })
        .collect()
}

/// The loss sum(wgt * y) of training mode, as a function of (x, gamma, beta) in one vector.
fn weighted_loss(all: &[f64], shape: [usize; 4], wgt: &[f32]) -> f64 {
    let (len, c) = (shape.iter().product::<usize>(), shape[1]);
    let (y, _, _) = naive_train(&all[..len], shape, &all[len..len + c], &all[len + c..]);
    y.iter().zip(wgt).map(|(y, &w)| y * w as f64).sum()
}

fn tensors(shape: [usize; 4], seed: u64, dev: &Device) -> (Vec<f32>, Vec<f32>, Vec<f32>, Tensor, Tensor, Tensor) {
    let c = shape[1];
    let (xh, x) = rand_host_and_tensor(&shape, seed, dev);
    let gh: Vec<f32> = uniform(c, 0.5, 1.5, seed + 1);
    let bh: Vec<f32> = uniform(c, -0.5, 0.5, seed + 2);
    let g = Tensor::from_vec(&[c], gh.clone(), dev).unwrap();
    let b = Tensor::from_vec(&[c], bh.clone(), dev).unwrap();
    (xh, gh, bh, x, g, b)
}

fn fresh_running(c: usize, dev: &Device) -> (Tensor, Tensor) {
    (Tensor::zeros(&[c], dev).unwrap(), Tensor::full(&[c], 1.0, dev).unwrap())
}

test_device!(training_matches_the_naive_oracle, |dev| {
    for (k, &shape) in SHAPES.iter().enumerate() {
        let len: usize = shape.iter().product();
        if !case_runs_on(&dev, len, EMULATED_MAX) {
            continue;
        }
        let c = shape[1];
        let (xh, gh, bh, x, g, b) = tensors(shape, 10 * k as u64, &dev);
        let (rm, rv) = fresh_running(c, &dev);
        let mut tape = Tape::train();
        tape.watch(&x);
        tape.watch(&g);
        tape.watch(&b);
        let (y, stats) = batchnorm2d(&mut tape, &x, &g, &b, &rm, &rv).unwrap();
        let stats = stats.expect("training returns the batch's statistics");
        let what = format!("{shape:?}");
        let (want_y, want_mean, want_var) = naive_train(&naive::f64s(&xh), shape, &naive::f64s(&gh), &naive::f64s(&bh));
        assert_eq!(stats.count, shape[0] * shape[2] * shape[3]);
        assert_close(&format!("{what} mean"), &naive::f32s(&want_mean), &stats.mean.to_vec().unwrap(), 1e-6, 1e-5);
        assert_close(&format!("{what} var"), &naive::f32s(&want_var), &stats.var.to_vec().unwrap(), 1e-6, 1e-4);
        // Two values per channel normalise to +-1: y is then gamma * (+-1) * (1 - tiny) + beta.
        assert_close(&format!("{what} y"), &naive::f32s(&want_y), &y.to_vec().unwrap(), 1e-4, 1e-4);

        // The backward against finite differences of the f64 oracle.
        let wgt = uniform(len, -1.0, 1.0, 99 + k as u64);
        let gy = Tensor::from_vec(&shape, wgt.clone(), &dev).unwrap();
        let grads = backward_from(tape, &y, &gy);
        let all: Vec<f32> = xh.iter().chain(&gh).chain(&bh).copied().collect();
        let numeric = numeric_grad_at(&all, 1e-4, |a| weighted_loss(a, shape, &wgt));
        let gx = grads.get(&x).unwrap().to_vec().unwrap();
        // gx is a difference of terms of about count * |gy|: its error scales with them.
        assert_close(&format!("{what} gx"), &numeric[..len], &gx, 2e-3, 2e-3);
        assert_close(
            &format!("{what} ggamma"),
            &numeric[len..len + c],
            &grads.get(&g).unwrap().to_vec().unwrap(),
            2e-3,
            1e-3,
        );
        assert_close(
            &format!("{what} gbeta"),
            &numeric[len + c..],
            &grads.get(&b).unwrap().to_vec().unwrap(),
            2e-3,
            1e-3,
        );
    }
});

test_device!(evaluation_uses_the_running_statistics_and_records_nothing, |dev| {
    for (k, &shape) in SHAPES.iter().enumerate() {
        let len: usize = shape.iter().product();
        if !case_runs_on(&dev, len, EMULATED_MAX) {
            continue;
        }
        let c = shape[1];
        let (xh, gh, bh, x, g, b) = tensors(shape, 7 + k as u64, &dev);
        let mh = uniform(c, -0.5, 0.5, 3);
        let vh = uniform(c, 0.1, 2.0, 4);
        let rm = Tensor::from_vec(&[c], mh.clone(), &dev).unwrap();
        let rv = Tensor::from_vec(&[c], vh.clone(), &dev).unwrap();
        let mut tape = Tape::eval();
        // One value per channel is fine in evaluation.
        let (y, stats) = batchnorm2d(&mut tape, &x, &g, &b, &rm, &rv).unwrap();
        assert!(stats.is_none() && tape.is_empty());
        let f = naive::f64s;
        let want = naive_apply(&f(&xh), shape, &f(&mh), &f(&vh), &f(&gh), &f(&bh));
        assert_close(&format!("eval {shape:?}"), &naive::f32s(&want), &y.to_vec().unwrap(), 1e-5, 1e-5);
    }
});

test_device!(the_variance_is_stable_at_a_large_mean, |dev| {
    // A channel at 1e4 with spread 1: E[x^2] - E[x]^2 in f32 would lose every digit (1e8
    // with 24-bit mantissas is rounded to 8), the two passes keep the variance to 1e-3.
    let shape = [4, 2, 16, 16];
    let len: usize = shape.iter().product();
    let noise = uniform(len, -1.7, 1.7, 5);
    let xh: Vec<f32> =
        noise.iter().enumerate().map(|(i, v)| if (i / 256) % 2 == 0 { 1e4 + v } else { -3e4 + v }).collect();
    let x = Tensor::from_vec(&shape, xh.clone(), &dev).unwrap();
    let (g, b) = (Tensor::full(&[2], 1.0, &dev).unwrap(), Tensor::zeros(&[2], &dev).unwrap());
    let (rm, rv) = fresh_running(2, &dev);
    let (y, stats) = batchnorm2d(&mut Tape::train(), &x, &g, &b, &rm, &rv).unwrap();
    let (_, mean, var) = naive_train(&naive::f64s(&xh), shape, &[1.0, 1.0], &[0.0, 0.0]);
    let stats = stats.unwrap();
    assert_close("mean at 1e4", &naive::f32s(&mean), &stats.mean.to_vec().unwrap(), 1e-3, 1e-6);
    assert_close("variance at 1e4", &naive::f32s(&var), &stats.var.to_vec().unwrap(), 0.0, 1e-3);
    let y = y.to_vec().unwrap();
    let (m, v) = (
        y.iter().map(|&v| v as f64).sum::<f64>() / len as f64,
        y.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / len as f64,
    );
    assert!(m.abs() < 1e-2 && (v - 1.0).abs() < 1e-2, "y normalised: mean {m}, mean square {v}");
});

test_device!(the_running_update_is_pytorchs, |dev| {
    // count 4 (N=2, 1x2): batch mean 2, biased var 1.25 (values 0.5, 1.5, 2.5, 3.5), unbiased
    // 5/3. From mean 1, var 1: 0.9 * 1 + 0.1 * 2 = 1.1, 0.9 * 1 + 0.1 * 5/3 = 1.0666..
    let mean = Tensor::from_vec(&[2], vec![2.0, -1.0], &dev).unwrap();
    let var = Tensor::from_vec(&[2], vec![1.25, 0.0], &dev).unwrap();
    let stats = BatchStats { mean, var, count: 4 };
    let mut rm = Tensor::from_vec(&[2], vec![1.0, 0.5], &dev).unwrap();
    let mut rv = Tensor::from_vec(&[2], vec![1.0, 2.0], &dev).unwrap();
    update_running(&mut rm, &mut rv, &stats, 0.1).unwrap();
    assert_close("running_mean", &[1.1, 0.35], &rm.to_vec().unwrap(), 1e-7, 1e-6);
    assert_close("running_var", &[0.9 + 0.1 * 5.0 / 3.0, 1.8], &rv.to_vec().unwrap(), 1e-7, 1e-6);
    // And the statistics a training forward returns feed it as they are.
    let x = Tensor::from_vec(&[2, 1, 1, 2], vec![0.5, 1.5, 2.5, 3.5], &dev).unwrap();
    let (g, b) = (Tensor::full(&[1], 1.0, &dev).unwrap(), Tensor::zeros(&[1], &dev).unwrap());
    let (mut rm, mut rv) = fresh_running(1, &dev);
    let (_, s) = batchnorm2d(&mut Tape::train(), &x, &g, &b, &rm, &rv).unwrap();
    update_running(&mut rm, &mut rv, &s.unwrap(), 0.1).unwrap();
    assert_close(
        "from a forward",
        &[0.2, 0.9 + 0.1 * 5.0 / 3.0],
        &[rm.to_vec().unwrap()[0], rv.to_vec().unwrap()[0]],
        1e-7,
        1e-6,
    );
});

test_device!(gradients_only_where_needed, |dev| {
    let shape = [2, 3, 4, 4];
    let (_, _, _, x, g, b) = tensors(shape, 1, &dev);
    let (rm, rv) = fresh_running(3, &dev);
    let mut tape = Tape::train();
    tape.watch(&g);
    let (y, _) = batchnorm2d(&mut tape, &x, &g, &b, &rm, &rv).unwrap();
    let grads = backward_from(tape, &y, &rand_tensor(&shape, 2, &dev));
    assert!(grads.get(&g).is_some());
    assert!(grads.get(&x).is_none() && grads.get(&b).is_none(), "x and beta were not watched");
});

#[test]
fn bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let (g, b) = (Tensor::full(&[3], 1.0, &dev).unwrap(), Tensor::zeros(&[3], &dev).unwrap());
    let (rm, rv) = fresh_running(3, &dev);
    // One value per channel in training, as PyTorch: "Expected more than 1 value per channel".
    let x = rand_tensor(&[1, 3, 1, 1], 0, &dev);
    let msg = err_msg(batchnorm2d(&mut Tape::train(), &x, &g, &b, &rm, &rv));
    assert_mentions(&msg, &["batchnorm2d", "more than 1 value per channel", "[1, 3, 1, 1]"]);
    // A 2-D input.
    let msg = err_msg(batchnorm2d(&mut Tape::train(), &rand_tensor(&[4, 3], 0, &dev), &g, &b, &rm, &rv));
    assert_mentions(&msg, &["batchnorm2d", "4-D (N, C, H, W)", "[4, 3]"]);
    // gamma of the wrong length.
    let x = rand_tensor(&[2, 3, 2, 2], 0, &dev);
    let g4 = Tensor::full(&[4], 1.0, &dev).unwrap();
    let msg = err_msg(batchnorm2d(&mut Tape::train(), &x, &g4, &b, &rm, &rv));
    assert_mentions(&msg, &["batchnorm2d", "gamma of shape [3]", "found [4]"]);
    // Operands on two devices.
    let emu = Device::parse("emu").unwrap();
    let msg = err_msg(batchnorm2d(&mut Tape::train(), &x, &g, &b, &rm, &Tensor::full(&[3], 1.0, &emu).unwrap()));
    assert_mentions(&msg, &["batchnorm2d", "one device"]);
}
