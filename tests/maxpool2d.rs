//! Max pooling: every device against a naive oracle (bit-exact), the CPU reference's backward
//! against finite differences, ties, NaN, overlapping windows, padding (which never wins), the
//! ReLU mask it applies after a ReLU, and argument errors.
mod common;
use common::*;
use ptxgrad::ops::maxpool2d::{
    maxpool2d, maxpool2d_bwd, maxpool2d_bwd_cpu, maxpool2d_fwd, maxpool2d_fwd_cpu, Maxpool2dParams, NO_GRAD,
};
use ptxgrad::ops::relu::{relu, relu_bwd, relu_fwd};
use ptxgrad::ops::reshape::reshape;
use ptxgrad::{Device, ReluFact, Tape, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

/// (x shape, k, stride, pad)
const CASES: &[(&[usize], usize, usize, usize)] = &[
    (&[128, 96, 54, 54], 3, 2, 0),  // AlexNet pool 1
    (&[128, 256, 26, 26], 3, 2, 0), // AlexNet pool 2
    (&[128, 256, 12, 12], 3, 2, 0), // AlexNet pool 3
    (&[1, 1, 3, 3], 3, 2, 0),       // a single window
    (&[3, 5, 7, 9], 3, 2, 0),       // odd sizes, batch 3
    (&[1, 96, 54, 54], 3, 2, 0),    // batch 1
    (&[3, 2, 8, 8], 2, 2, 0),       // non-overlapping; every input in exactly one window
    (&[2, 3, 11, 13], 3, 1, 0),     // stride 1: up to 9 windows per input
    (&[2, 4, 17, 17], 4, 3, 0),     // 17 = 4 + 3*4 + 1: the last row/column is in no window
    (&[1, 3, 10, 7], 3, 3, 0),      // k == s, trailing inputs in no window
    (&[1, 1, 1, 1], 1, 1, 0),       // identity
    (&[2, 2, 5, 6], 5, 1, 0),       // window as tall as the input
    (&[2, 3, 40, 41], 3, 2, 0),     // planes of 1640 inputs, 380 outputs: several blocks per plane
    (&[2, 3, 7, 9], 3, 1, 1),       // GoogLeNet's inception pool (3, 1, 1): same size out
    (&[2, 5, 12, 12], 3, 2, 1),     // GoogLeNet's (3, 2, 1) between stages, even size
    (&[2, 3, 7, 9], 3, 2, 1),       // (3, 2, 1) on odd sizes: windows clipped on both sides
    (&[1, 1, 1, 1], 3, 1, 1),       // one input, a window of 1 real and 8 padding
    (&[1, 2, 2, 3], 3, 2, 1),       // smaller than the window: padding makes it fit
    (&[2, 2, 9, 8], 4, 3, 2),       // pad == k / 2 for an even window
    (&[1, 2, 6, 5], 2, 1, 1),       // k = 2, p = 1: windows of a single real input at corners
    (&[1, 3, 5, 5], 5, 2, 2),       // pad 2: windows clipped by 2 on each side
    (&[8, 64, 28, 28], 3, 1, 1),    // GoogLeNet-sized (3, 1, 1), for GPUs
    (&[8, 192, 56, 56], 3, 2, 1),   // GoogLeNet's pool after conv2 (56 -> 28), for GPUs
];

/// The emulator runs the cases up to this many input elements (the AlexNet ones are for GPUs).
const EMULATED_MAX: usize = 20_000;

/// The CASES that run on `dev` (`case_runs_on`), with their index.
fn pool_cases_on(dev: &Device) -> impl Iterator<Item = (usize, &'static [usize], usize, usize, usize)> + '_ {
    let cases = CASES.iter().enumerate().map(|(i, &(shape, k, s, p))| (i, shape, k, s, p));
    cases.filter(move |&(_, shape, ..)| case_runs_on(dev, shape.iter().product(), EMULATED_MAX))
}

/// Distinct values (a shuffled ramp with spacing 1/len), so that no window has a tie.
fn distinct(n: usize, seed: u64) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n).map(|i| i as f32 / n as f32 - 0.5).collect();
    v.shuffle(&mut StdRng::seed_from_u64(seed));
    v
}

/// Pooling geometry: an input (N, C, H, W) pooled by k x k windows at stride s with p rows and
/// columns of padding (which never wins) on each side.
#[derive(Clone, Copy)]
struct Pool {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    oh: usize,
    ow: usize,
}

impl Pool {
    /// OH = (H + 2p - k) / s + 1, OW alike (PyTorch, floor mode).
    fn new(shape: &[usize], k: usize, s: usize, p: usize) -> Pool {
        let &[n, c, h, w] = shape else { panic!("x (N, C, H, W), not {shape:?}") };
        Pool { n, c, h, w, k, s, p, oh: (h + 2 * p - k) / s + 1, ow: (w + 2 * p - k) / s + 1 }
    }

    /// The flat indices (iy * W + ix) of the REAL inputs in the window of output (oy, ox), in
    /// row-major order: padded positions (outside the plane) are skipped, so they never win.
    fn window(self, oy: usize, ox: usize) -> impl Iterator<Item = usize> + Clone {
        let Pool { h, w, k, s, p, .. } = self;
        let rows = (0..k).filter_map(move |ky| (oy * s + ky).checked_sub(p).filter(|&iy| iy < h));
        let cols = move || (0..k).filter_map(move |kx| (ox * s + kx).checked_sub(p).filter(|&ix| ix < w));
        rows.flat_map(move |iy| cols().map(move |ix| iy * w + ix))
    }
}

/// The naive oracle: PyTorch's max_pool2d (dilation 1, floor mode) with its indices. x (N, C, H,
/// W) -> (y, argmax), both (N, C, OH, OW), OH = (H + 2p - k) / s + 1, each argmax a flat h * W + w
/// index of a real input in its plane; the padding never wins (PyTorch skips it). A window's maximum is its largest value, the first of
/// equal ones in row-major order; a NaN is larger than everything, and of several NaNs the last
/// is taken (PyTorch's kernels update on `val > max || isnan(val)`). With `drop_nonpositive`, a
/// window whose maximum is <= 0 gets the argmax NO_GRAD: after a ReLU, its gradient is zeroed.
fn naive_maxpool(x: &[f32], pool: Pool, drop_nonpositive: bool) -> (Vec<f32>, Vec<u32>) {
    let (mut y, mut argmax) = (Vec::new(), Vec::new());
    for plane in x.chunks_exact(pool.h * pool.w) {
        for oy in 0..pool.oh {
            for ox in 0..pool.ow {
                let win = pool.window(oy, ox);
                let best = match win.clone().filter(|&i| plane[i].is_nan()).last() {
                    Some(last_nan) => last_nan,
                    None => {
                        let max = win.clone().map(|i| plane[i]).fold(f32::NEG_INFINITY, f32::max);
                        win.clone().find(|&i| plane[i] == max).expect("the maximum is in the window")
                    }
                };
                y.push(plane[best]);
                argmax.push(if drop_nonpositive && plane[best] <= 0.0 { NO_GRAD } else { best as u32 });
            }
        }
    }
    (y, argmax)
}

/// The naive backward: gx (N, C, H, W) starts at zero, and each output's gradient is added at
/// its window's argmax (NO_GRAD: nowhere), output by output in row-major order, so that where
/// windows overlap the sums come in that order.
fn naive_maxpool_bwd(argmax: &[u32], gy: &[f32], pool: Pool) -> Vec<f32> {
    let Pool { n, c, h, w, oh, ow, .. } = pool;
    let mut gx = vec![0.0f32; n * c * h * w];
    for plane in 0..n * c {
        for o in plane * oh * ow..(plane + 1) * oh * ow {
            if argmax[o] != NO_GRAD {
                gx[plane * h * w + argmax[o] as usize] += gy[o];
            }
        }
    }
    gx
}

/// The values of max pooling, in f64, for finite differences (no NaN).
fn maxpool_f64(x: &[f64], pool: Pool) -> Vec<f64> {
    let mut y = Vec::new();
    for plane in x.chunks_exact(pool.h * pool.w) {
        for oy in 0..pool.oh {
            for ox in 0..pool.ow {
                y.push(pool.window(oy, ox).map(|i| plane[i]).fold(f64::NEG_INFINITY, f64::max));
            }
        }
    }
    y
}

#[test]
fn maxpool2d_cpu_backward_matches_finite_differences() {
    // (x shape, k, stride, pad): overlapping and disjoint windows, and padded ones (GoogLeNet's
    // (3, 1, 1) and (3, 2, 1) on odd sizes, and pad 2).
    let cases = [
        ([2usize, 3, 7, 7], 3usize, 2usize, 0usize),
        ([1, 2, 6, 5], 2, 2, 0),
        ([1, 1, 5, 6], 3, 1, 0),
        ([2, 2, 7, 9], 3, 1, 1),
        ([1, 3, 7, 5], 3, 2, 1),
        ([1, 2, 6, 7], 5, 2, 2),
    ];
    for (shape, k, s, pad) in cases {
        let p = Maxpool2dParams::new(&shape, k, s, pad).unwrap();
        let n: usize = shape.iter().product();
        let x = distinct(n, 7);
        let (y, argmax) = maxpool2d_fwd_cpu(&x, &p);
        let loss_weights = uniform(y.len(), -1.0, 1.0, 3);
        let analytic = maxpool2d_bwd_cpu(&argmax, &loss_weights, &p).unwrap();
        // eps = 0.1 / n is below half the spacing (1/n) between distinct values: no window's
        // argmax changes under the perturbation, so the max is locally linear.
        let numeric = numeric_grad_at(&x, 0.1 / n as f64, |x| {
            maxpool_f64(x, Pool::new(&shape, k, s, pad)).iter().zip(&loss_weights).map(|(&y, &r)| y * r as f64).sum()
        });
        // Locally linear: central differences are exact up to f64 rounding of the sums of the
        // loss weights (each below 1 in magnitude, at most 9 terms per input), far below 1e-5.
        assert_close(&format!("maxpool grad {shape:?} k {k} s {s} p {pad}"), &numeric, &analytic, 1e-5, 1e-5);
    }
}

test_device!(maxpool2d_matches_naive_oracle, |dev| {
    for (i, shape, k, s, p) in pool_cases_on(&dev) {
        let pool = Pool::new(shape, k, s, p);
        let x = rand_tensor(shape, i as u64, &dev);
        let (y, argmax) = maxpool2d_fwd(&x, k, s, p, false).unwrap();
        assert_eq!(y.shape(), &[pool.n, pool.c, pool.oh, pool.ow], "{shape:?} k {k} s {s} p {p}");
        let gy = rand_tensor(y.shape(), 50 + i as u64, &dev);
        let gx = maxpool2d_bwd(&argmax, &gy, shape, k, s, p).unwrap();
        let (want_y, want_argmax) = naive_maxpool(&x.to_vec().unwrap(), pool, false);
        // Max and selection are exact; the backward adds the same values in the same order as
        // the oracle (see kernels/maxpool2d.cu): all three bit-identical.
        assert_close(&format!("maxpool fwd {shape:?}"), &want_y, &y.to_vec().unwrap(), 0.0, 0.0);
        assert_eq!(argmax.to_vec().unwrap(), want_argmax, "maxpool argmax {shape:?}");
        let want_gx = naive_maxpool_bwd(&want_argmax, &gy.to_vec().unwrap(), pool);
        assert_close(&format!("maxpool bwd {shape:?}"), &want_gx, &gx.to_vec().unwrap(), 0.0, 0.0);
    }
});

test_device!(maxpool2d_ties_go_to_the_first_maximum, |dev| {
    // One 5x5 plane, 3x3 windows, stride 2 -> 2x2 outputs at window corners (0,0) (0,2) (2,0) (2,2).
    #[rustfmt::skip]
    let x = vec![
        0.0, 5.0, 1.0, 0.0, 0.0,
        5.0, 0.0, 0.0, 0.0, 0.0,
        1.0, 0.0, 0.0, 0.0, 0.0,
        0.0, 0.0, 0.0, 0.0, 0.0,
        0.0, 0.0, 0.0, 0.0, 0.0,
    ];
    let x = Tensor::from_vec(&[1, 1, 5, 5], x, &dev).unwrap();
    let (y, argmax) = maxpool2d_fwd(&x, 3, 2, 0, false).unwrap();
    assert_eq!(y.to_vec().unwrap(), vec![5.0, 1.0, 1.0, 0.0]);
    // Window (0,0): 5.0 at (0,1) and (1,0): row-major first is (0,1) = 1. Window (0,2): 1.0 at
    // (0,2) = 2. Window (2,0): 1.0 at (2,0) = 10. Window (2,2): all zero: its first, (2,2) = 12.
    assert_eq!(argmax.to_vec().unwrap(), vec![1, 2, 10, 12]);
    let gy = Tensor::from_vec(&[1, 1, 2, 2], vec![1.0, 2.0, 4.0, 8.0], &dev).unwrap();
    let gx = maxpool2d_bwd(&argmax, &gy, &[1, 1, 5, 5], 3, 2, 0).unwrap().to_vec().unwrap();
    let mut want = vec![0.0; 25];
    (want[1], want[2], want[10], want[12]) = (1.0, 2.0, 4.0, 8.0);
    assert_eq!(gx, want);
});

test_device!(maxpool2d_overlapping_windows_accumulate, |dev| {
    // The centre (2,2) of a 5x5 plane lies in all four 3x3/stride-2 windows; make it the max.
    let mut x = vec![0.0f32; 2 * 25];
    x[12] = 9.0;
    x[25 + 12] = -1.0; // second plane: the centre is the one value below 0, never chosen
    let x = Tensor::from_vec(&[1, 2, 5, 5], x, &dev).unwrap();
    let (y, argmax) = maxpool2d_fwd(&x, 3, 2, 0, false).unwrap();
    assert_eq!(y.to_vec().unwrap()[..4], [9.0; 4]);
    assert_eq!(argmax.to_vec().unwrap(), vec![12, 12, 12, 12, 0, 2, 10, 13]);
    let gy = Tensor::from_vec(&[1, 2, 2, 2], vec![1.0, 2.0, 4.0, 8.0, 1.0, 1.0, 1.0, 1.0], &dev).unwrap();
    let gx = maxpool2d_bwd(&argmax, &gy, &[1, 2, 5, 5], 3, 2, 0).unwrap().to_vec().unwrap();
    let mut want = vec![0.0; 50];
    // First plane: 1 + 2 + 4 + 8 at the centre, the sum over all four windows. Second plane: the
    // windows' first maxima (0,0) (0,2) (2,0), and (2,3) past the -1 centre.
    want[12] = 15.0;
    (want[25], want[27], want[35], want[38]) = (1.0, 1.0, 1.0, 1.0);
    assert_eq!(gx, want);
});

test_device!(maxpool2d_propagates_nan, |dev| {
    // Two 3x3 planes, one window each. First: a NaN, then a larger value (3.0) after it. Second:
    // two NaNs, at 2 and 6, around a 5.0.
    let mut x = vec![0.0f32; 18];
    (x[4], x[7]) = (f32::NAN, 3.0);
    (x[9 + 2], x[9 + 4], x[9 + 6]) = (f32::NAN, 5.0, f32::NAN);
    let (y, argmax) = maxpool2d_fwd(&Tensor::from_vec(&[1, 2, 3, 3], x, &dev).unwrap(), 3, 2, 0, false).unwrap();
    assert!(y.to_vec().unwrap().iter().all(|v| v.is_nan()), "{y:?}");
    // The NaN, not the later 3.0; of two NaNs the last, as PyTorch's max_pool2d indices.
    assert_eq!(argmax.to_vec().unwrap(), vec![4, 6]);
});

test_device!(maxpool2d_records_its_backward, |dev| {
    // (pad, pooled side): 6x6 planes, 3x3 windows, stride 2; with padding 1, (6 + 2 - 3) / 2 + 1.
    for (pad, side) in [(0, 2), (1, 3)] {
        let x = rand_tensor(&[2, 2, 6, 6], 11, &dev);
        let mut tape = Tape::train();
        tape.watch(&x);
        let y = maxpool2d(&mut tape, &x, 3, 2, pad).unwrap();
        assert_eq!(y.shape(), &[2, 2, side, side]);
        // Pool the 4 * side^2 values of y once more, as one square plane: the loss is the global
        // max of x.
        let y = reshape(&mut tape, &y, &[1, 1, 2 * side, 2 * side]).unwrap();
        let loss = maxpool2d(&mut tape, &y, 2 * side, 1, 0).unwrap();
        let grads = tape.backward(&loss).unwrap();
        only_the_global_max_gets_1(&grads.get(&x).expect("x has a gradient").to_vec().unwrap(), &x);
    }
});

test_device!(maxpool2d_padding_never_wins, |dev| {
    // All inputs negative: had the padding counted as 0 (or any finite value above them), the
    // border windows would output it. Every output must be a real, negative input.
    for (shape, k, s, p) in [(&[2usize, 3, 7, 9][..], 3, 1, 1), (&[2, 5, 12, 12], 3, 2, 1), (&[1, 1, 1, 1], 3, 1, 1)] {
        let pool = Pool::new(shape, k, s, p);
        let x_host = uniform(shape.iter().product(), -2.0, -1.0, 5);
        let x = Tensor::from_vec(shape, x_host.clone(), &dev).unwrap();
        let (y, argmax) = maxpool2d_fwd(&x, k, s, p, false).unwrap();
        let (y, argmax) = (y.to_vec().unwrap(), argmax.to_vec().unwrap());
        assert!(y.iter().all(|&v| v < -0.5), "{shape:?}: a padded position won: {y:?}");
        assert!(argmax.iter().all(|&a| (a as usize) < pool.h * pool.w), "{shape:?}: {argmax:?}");
        let (want_y, want_argmax) = naive_maxpool(&x_host, pool, false);
        assert_eq!(y, want_y, "{shape:?}");
        assert_eq!(argmax, want_argmax, "{shape:?}");
    }
    // One input, one window of 1 real value and 8 of padding: the value itself, whatever it is.
    for v in [-3.0, f32::NEG_INFINITY, f32::NAN] {
        let x = Tensor::from_vec(&[1, 1, 1, 1], vec![v], &dev).unwrap();
        let (y, argmax) = maxpool2d_fwd(&x, 3, 1, 1, false).unwrap();
        assert_eq!(y.to_vec().unwrap()[0].to_bits(), v.to_bits(), "1x1 input {v}");
        assert_eq!(argmax.to_vec().unwrap(), vec![0]);
        let gx =
            maxpool2d_bwd(&argmax, &Tensor::from_vec(&[1, 1, 1, 1], vec![2.5], &dev).unwrap(), &[1, 1, 1, 1], 3, 1, 1);
        assert_eq!(gx.unwrap().to_vec().unwrap(), vec![2.5], "1x1 input {v}");
    }
});

test_device!(maxpool2d_padded_window_of_only_infinite_or_nan_inputs, |dev| {
    // Two 3x3 planes, 3x3 windows, stride 2, padding 1 -> 2x2 outputs; the real inputs of window
    // (0,0) are {0, 1, 3, 4}, of (0,1) {1, 2, 4, 5}, of (1,0) {3, 4, 6, 7}, of (1,1) {4, 5, 7, 8}.
    //   plane 0: window (0,0) is all -inf: y = -inf at its first real input (0), never padding.
    //   plane 1: window (0,0) is -inf, NaN, -inf, -inf: the NaN (1), and it stays, as in (0,1).
    let ninf = f32::NEG_INFINITY;
    #[rustfmt::skip]
    let x = vec![
        ninf, ninf, 5.0,  ninf, ninf, 6.0,  7.0, 8.0, 9.0,
        ninf, f32::NAN, 1.0,  ninf, ninf, 2.0,  3.0, 4.0, 5.0,
    ];
    let x = Tensor::from_vec(&[1, 2, 3, 3], x, &dev).unwrap();
    let (y, argmax) = maxpool2d_fwd(&x, 3, 2, 1, false).unwrap();
    let y = y.to_vec().unwrap();
    assert_eq!(y[0], ninf);
    assert_eq!(y[1..4], [6.0, 8.0, 9.0]);
    assert!(y[4].is_nan() && y[5].is_nan(), "{y:?}");
    assert_eq!(y[6..8], [4.0, 5.0]);
    assert_eq!(argmax.to_vec().unwrap(), vec![0, 5, 7, 8, 1, 1, 7, 8]);
    let gy = Tensor::from_vec(&[1, 2, 2, 2], vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0], &dev).unwrap();
    let gx = maxpool2d_bwd(&argmax, &gy, &[1, 2, 3, 3], 3, 2, 1).unwrap().to_vec().unwrap();
    let mut want = vec![0.0f32; 18];
    (want[0], want[5], want[7], want[8]) = (1.0, 2.0, 4.0, 8.0);
    (want[9 + 1], want[9 + 7], want[9 + 8]) = (16.0 + 32.0, 64.0, 128.0); // the NaN won twice
    assert_eq!(gx, want);
    // After a ReLU's mask: the -inf window (max <= 0) routes nothing; the NaN ones route.
    let (_, masked) = maxpool2d_fwd(&x, 3, 2, 1, true).unwrap();
    assert_eq!(masked.to_vec().unwrap(), vec![NO_GRAD, 5, 7, 8, 1, 1, 7, 8]);
});

/// Asserts that of `g`, dL/dx for a loss that is the global max of x, exactly one element, the
/// place of that max, is non-zero, and is 1.
fn only_the_global_max_gets_1(g: &[f32], x: &Tensor) {
    let x_host = x.to_vec().unwrap();
    let imax = (0..x_host.len()).fold(0, |b, i| if x_host[i] > x_host[b] { i } else { b });
    assert_eq!(g.iter().filter(|&&v| v != 0.0).count(), 1);
    assert_eq!(g[imax], 1.0);
}

/// A ReLU's output of `shape` (N, C, H, W): about half zeros, and in every plane a k x k corner
/// of zeros (clipped to the plane), so that every plane has a window (the first, whose real
/// inputs lie in that corner with or without padding) with no positive value.
fn relu_output(shape: &[usize], k: usize, seed: u64, dev: &Device) -> Tensor {
    let (h, w) = (shape[2], shape[3]);
    let mut pre = uniform(shape.iter().product(), -1.0, 1.0, seed);
    for plane in pre.chunks_exact_mut(h * w) {
        for r in 0..k.min(h) {
            plane[r * w..r * w + k.min(w)].fill(-0.5);
        }
    }
    relu_fwd(&Tensor::from_vec(shape, pre, dev).unwrap()).unwrap()
}

test_device!(maxpool2d_after_relu_routes_only_what_the_relu_passes, |dev| {
    for (i, shape, k, s, p) in pool_cases_on(&dev) {
        let pool = Pool::new(shape, k, s, p);
        let x = relu_output(shape, k, 70 + i as u64, &dev);
        assert_eq!(x.relu_fact(), ReluFact::Output);
        let x_host = x.to_vec().unwrap();
        let (y, argmax) = maxpool2d_fwd(&x, k, s, p, true).unwrap();
        // The values of plain pooling; NO_GRAD where the maximum is <= 0.
        let (want_y, want_argmax) = naive_maxpool(&x_host, pool, true);
        assert_close(&format!("pooled after relu {shape:?}"), &want_y, &y.to_vec().unwrap(), 0.0, 0.0);
        assert_eq!(argmax.to_vec().unwrap(), want_argmax, "argmax after relu {shape:?}");
        assert!(want_argmax.contains(&NO_GRAD), "{shape:?}: the zero corner makes windows with nothing to route");
        // The gradient is the ReLU-masked gradient of plain pooling, bit for bit.
        let (gy_host, gy) = rand_host_and_tensor(y.shape(), 80 + i as u64, &dev);
        let gx = maxpool2d_bwd(&argmax, &gy, shape, k, s, p).unwrap();
        let (_, plain_argmax) = naive_maxpool(&x_host, pool, false);
        let want_gx = naive::relu_backward(&x_host, &naive_maxpool_bwd(&plain_argmax, &gy_host, pool));
        assert_close(&format!("maxpool bwd after relu {shape:?}"), &want_gx, &gx.to_vec().unwrap(), 0.0, 0.0);
    }
});

test_device!(maxpool2d_recorded_after_relu_marks_its_gradient_masked, |dev| {
    // pre -> relu -> maxpool -> global max (another pool): pre's gradient through the masked path
    // equals the plain chain rule, and the gradient max-pool hands the ReLU says it is masked.
    let pre = Tensor::from_vec(&[2, 2, 7, 7], uniform(196, -1.0, 1.0, 21), &dev).unwrap();
    let mut tape = Tape::train();
    tape.watch(&pre);
    let h = relu(&mut tape, &pre).unwrap();
    let y = maxpool2d(&mut tape, &h, 3, 2, 0).unwrap();
    let y = reshape(&mut tape, &y, &[1, 1, 6, 6]).unwrap();
    let loss = maxpool2d(&mut tape, &y, 6, 1, 0).unwrap();
    let grads = tape.backward(&loss).unwrap();
    // The global max is positive (uniform values in [-1, 1)), so the ReLU passes its gradient.
    only_the_global_max_gets_1(&grads.get(&pre).expect("pre has a gradient").to_vec().unwrap(), &pre);

    // What the producer of the pool's input receives: a stand-in op records h (a ReLU's output,
    // or not) and keeps the fact of the gradient handed to it.
    for relu_input in [true, false] {
        let h = if relu_input { relu_fwd(&pre) } else { Tensor::from_vec(pre.shape(), pre.to_vec().unwrap(), &dev) };
        let h = h.unwrap();
        let seen = std::rc::Rc::new(std::cell::Cell::new(None));
        let mut tape = Tape::train();
        tape.watch(&pre);
        let probe = seen.clone();
        tape.record(&h, &[&pre], move |gh, _| {
            probe.set(Some(gh.relu_fact()));
            Ok(())
        });
        let y = maxpool2d(&mut tape, &h, 3, 2, 0).unwrap();
        let y = reshape(&mut tape, &y, &[1, 1, 6, 6]).unwrap();
        let loss = maxpool2d(&mut tape, &y, 6, 1, 0).unwrap();
        tape.backward(&loss).unwrap();
        let want = if relu_input { ReluFact::MaskedFor(h.id()) } else { ReluFact::None };
        assert_eq!(seen.get(), Some(want), "relu input: {relu_input}");
    }
});

test_device!(maxpool2d_after_relu_routes_the_gradient_of_a_nan_maximum, |dev| {
    // x = relu(pre) in one 4 x 4 plane, four 2 x 2 windows (row-major within each):
    //   0: all negative before the ReLU: max 0, routes nothing (the ReLU would zero it)
    //   1: NaN, 0.5, -1, 2: max NaN (a NaN is the maximum), routed to the NaN, as the ReLU
    //      passes the gradient at a NaN output
    //   2: 0.25, -1, 0.5, -2: max 0.5
    //   3: +inf, 1, NaN, 3: the NaN after +inf takes over; a later value never displaces it
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let windows = [[-1.0, -2.0, -3.0, -4.0], [nan, 0.5, -1.0, 2.0], [0.25, -1.0, 0.5, -2.0], [inf, 1.0, nan, 3.0]];
    let mut pre = vec![0.0f32; 16];
    let at = |win: usize, j: usize| (win / 2 * 2 + j / 2) * 4 + win % 2 * 2 + j % 2;
    for (win, vals) in windows.iter().enumerate() {
        for (j, &v) in vals.iter().enumerate() {
            pre[at(win, j)] = v;
        }
    }
    let x = relu_fwd(&Tensor::from_vec(&[1, 1, 4, 4], pre, &dev).unwrap()).unwrap();
    let (y, argmax) = maxpool2d_fwd(&x, 2, 2, 0, true).unwrap();
    let y = y.to_vec().unwrap();
    assert!(y[0] == 0.0 && y[1].is_nan() && y[2] == 0.5 && y[3].is_nan(), "{y:?}");
    assert_eq!(argmax.to_vec().unwrap(), vec![NO_GRAD, at(1, 0) as u32, at(2, 2) as u32, at(3, 2) as u32]);

    // A NaN gradient for the window that routes nothing goes nowhere, as the ReLU's backward
    // would zero it there (y = 0); the others reach their argmax. The same as plain pooling
    // followed by the ReLU's backward.
    let gy = Tensor::from_vec(&[1, 1, 2, 2], vec![nan, 2.0, 3.0, 4.0], &dev).unwrap();
    let gx = maxpool2d_bwd(&argmax, &gy, &[1, 1, 4, 4], 2, 2, 0).unwrap().to_vec().unwrap();
    let mut want = vec![0.0f32; 16];
    (want[at(1, 0)], want[at(2, 2)], want[at(3, 2)]) = (2.0, 3.0, 4.0);
    assert_eq!(gx, want);
    let (_, plain_argmax) = maxpool2d_fwd(&x, 2, 2, 0, false).unwrap();
    let masked = relu_bwd(&x, &maxpool2d_bwd(&plain_argmax, &gy, &[1, 1, 4, 4], 2, 2, 0).unwrap()).unwrap();
    assert_eq!(masked.to_vec().unwrap(), want, "plain pooling, then the ReLU's backward");
});

#[test]
fn maxpool2d_rejects_bad_arguments() {
    let dev = Device::Cpu;
    let x = |shape: &[usize]| rand_tensor(shape, 0, &dev);
    assert_mentions(&err_msg(maxpool2d_fwd(&x(&[1, 1, 2, 5]), 3, 2, 0, false)), &["maxpool2d", "3x3", "2x5"]);
    assert_mentions(&err_msg(maxpool2d_fwd(&x(&[4, 4, 4]), 2, 2, 0, false)), &["4-D", "[4, 4, 4]"]);
    assert_mentions(&err_msg(maxpool2d_fwd(&x(&[1, 1, 4, 4]), 2, 0, 0, false)), &["stride = 0"]);
    assert_mentions(&err_msg(maxpool2d_fwd(&x(&[1, 1, 4, 4]), 0, 1, 0, false)), &["k = 0"]);
    // Padding: at most half the window (PyTorch's rule), and the padded input must fit a window.
    for (k, pad) in [(3, 2), (1, 1), (4, 3)] {
        let msg = err_msg(maxpool2d_fwd(&x(&[1, 1, 9, 9]), k, 1, pad, false));
        assert_mentions(&msg, &["pad should be at most half", &format!("pad = {pad}"), &format!("k = {k}")]);
    }
    let msg = err_msg(maxpool2d_fwd(&x(&[1, 1, 1, 2]), 5, 1, 1, false));
    assert_mentions(&msg, &["5x5", "padding 1", "1x2", "3x4 padded"]);
    assert_mentions(&err_msg(maxpool2d_fwd(&x(&[1, 1, 0, 4]), 3, 1, 1, false)), &["1x1", "0x4"]);
    let argmax = Tensor::from_vec(&[1, 1, 3, 3], vec![0u32; 9], &dev).unwrap();
    let msg = err_msg(maxpool2d_bwd(&argmax, &x(&[1, 1, 3, 3]), &[1, 1, 3, 3], 3, 1, 2));
    assert_mentions(&msg, &["pad should be at most half"]);
    // Backward: gy must have the pooled shape.
    let (_, argmax) = maxpool2d_fwd(&x(&[1, 1, 5, 5]), 3, 2, 0, false).unwrap();
    let msg = err_msg(maxpool2d_bwd(&argmax, &x(&[1, 1, 3, 3]), &[1, 1, 5, 5], 3, 2, 0));
    assert_mentions(&msg, &["maxpool2d_bwd", "[1, 1, 2, 2]", "found [1, 1, 3, 3]"]);
    // A corrupt argmax is an error on the CPU, not a panic.
    let bad = Tensor::from_vec(&[1, 1, 2, 2], vec![0u32, 1, 2, 99], &dev).unwrap();
    let msg = err_msg(maxpool2d_bwd(&bad, &x(&[1, 1, 2, 2]), &[1, 1, 5, 5], 3, 2, 0));
    assert_mentions(&msg, &["argmax 99", "5x5 plane"]);
}
