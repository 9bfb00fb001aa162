//! dense on every device against the direct sums (tests/common/kernels.rs: the textbook loops in
//! f64): awkward shapes, and AlexNet's three fully connected layers at batch 128 on a GPU; the
//! CPU reference's backward against finite differences; the recorded op; NaN and infinities;
//! shape errors. (Timings: benches/layers.rs.)
mod common;
use common::kernels::*;
use common::*;
use ptxgrad::ops::dense::{dense, dense_bwd, dense_bwd_bias_cpu, dense_bwd_input_cpu, dense_bwd_weight_cpu, dense_fwd};
use ptxgrad::ops::gemm::GemmOpts;
use ptxgrad::{Device, Tape, Tensor};

/// (batch, in, out, relu)
const ALEXNET: &[(usize, usize, usize, bool)] = &[
    (128, 6400, 4096, true), // fc1
    (128, 4096, 4096, true), // fc2
    (128, 4096, 10, false),  // fc3
];

/// Not multiples of the 128/64/8 tiles, batch 1 and 3.
const AWKWARD: &[(usize, usize, usize, bool)] = &[
    (1, 5, 3, false),
    (3, 7, 1, true),
    (3, 130, 67, true),
    (1, 6400, 4096, true), // fc1 at batch 1
    (3, 4096, 10, false),  // fc3 at batch 3
    (65, 129, 257, false),
    (2, 1, 1, true),
    (129, 200, 130, true),
    (5, 9, 1000, false),
    (300, 17, 64, true),
    (2048, 33, 2176, true), // a forward grid of 272 128-blocks: takes the 128 x 64 tile
];

/// Allowed |got - exact| for a sum of `k` products of values in [-1, 1) computed in fp32: see
/// tests/conv2d.rs (typical rounding below 2e-8*k; 5e-7*k is 4x the extreme over millions of
/// outputs).
fn atol(k: usize) -> f32 {
    1e-5 + 5e-7 * k as f32
}

fn rows(v: &[f32], width: usize, idx: &[usize]) -> Vec<f32> {
    idx.iter().flat_map(|&i| v[i * width..][..width].iter().copied()).collect()
}

/// Forward and backward on `dev` against the direct sums. Forward and input grad are per row:
/// for big batches only the first and last rows are compared. The weight grad uses every row.
fn check(dev: &Device, (batch, in_f, out_f, relu): (usize, usize, usize, bool), seed: u64) {
    let opts = GemmOpts::default();
    let xv = uniform(batch * in_f, -1.0, 1.0, seed);
    let wv = uniform(out_f * in_f, -1.0, 1.0, seed + 1);
    let bv = uniform(out_f, -1.0, 1.0, seed + 2);
    let gyv = uniform(batch * out_f, -1.0, 1.0, seed + 3);
    let t = |shape: &[usize], v: &[f32]| Tensor::from_vec(shape, v.to_vec(), dev).unwrap();
    let (x, w, b, gy) = (t(&[batch, in_f], &xv), t(&[out_f, in_f], &wv), t(&[out_f], &bv), t(&[batch, out_f], &gyv));
    let y = dense_fwd(&x, &w, &b, relu, opts).unwrap();
    assert_eq!(y.shape(), &[batch, out_f]);
    let (gx, gw, gb) = dense_bwd(&x, &w, &gy, true, opts).unwrap();
    let (_, gw_alone, _) = dense_bwd(&x, &w, &gy, false, opts).unwrap();

    let idx: Vec<usize> = if batch <= 8 { (0..batch).collect() } else { vec![0, batch - 1] };
    let what = |s: &str| format!("{s} (batch {batch}, in {in_f}, out {out_f}, relu {relu}) on {}", dev.label());
    // Forward: sums of IN products; input grad: of OUT; weight and bias grad: of batch.
    let dims = (in_f, out_f);
    let y_exact = to_f32(&dense_fwd_exact(&rows(&xv, in_f, &idx), &wv, &bv, dims, relu));
    assert_close(&what("y"), &y_exact, &rows(&y.to_vec().unwrap(), out_f, &idx), atol(in_f), 1e-5);
    let gx_exact = to_f32(&dense_input_grad_exact(&wv, &rows(&gyv, out_f, &idx), dims));
    assert_close(&what("gx"), &gx_exact, &rows(&gx.unwrap().to_vec().unwrap(), in_f, &idx), atol(out_f), 1e-5);
    let gw_exact = to_f32(&dense_weight_grad_exact(&xv, &gyv, dims));
    let gw = gw.to_vec().unwrap();
    assert_close(&what("gw"), &gw_exact, &gw, atol(batch), 1e-5);
    // The same kernel with and without the input grad: bitwise equal.
    assert_eq!(gw, gw_alone.to_vec().unwrap(), "{}", what("gw without gx"));
    assert_close(&what("gb"), &to_f32(&dense_bias_grad_exact(&gyv, out_f)), &gb.to_vec().unwrap(), atol(batch), 1e-5);
}

test_device!(dense_awkward_shapes_match_direct_sums, |dev| {
    for (i, &c) in AWKWARD.iter().enumerate() {
        check(&dev, c, 10 * i as u64);
    }
});

#[test]
fn dense_cuda_alexnet_layers_match_direct_sums() {
    let Some(dev) = gpu_or_skip("dense_cuda_alexnet_layers_match_direct_sums") else { return };
    for (i, &c) in ALEXNET.iter().enumerate() {
        check(&dev, c, 1000 + 10 * i as u64);
    }
}

#[test]
fn dense_cpu_backward_matches_finite_differences() {
    for (i, &(batch, in_f, out_f)) in [(3usize, 7usize, 5usize), (1, 4, 9), (4, 16, 3)].iter().enumerate() {
        let seed = 40 + 10 * i as u64;
        let (x, w, b) = (
            uniform(batch * in_f, -1.0, 1.0, seed),
            uniform(out_f * in_f, -1.0, 1.0, seed + 1),
            uniform(out_f, -1.0, 1.0, seed + 2),
        );
        let r = uniform(batch * out_f, -1.0, 1.0, seed + 3); // L = sum(y * r)
        let (x64, w64, b64, r64) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&r));
        let loss = |x: &[f64], w: &[f64], b: &[f64]| {
            let y = dense_fwd_exact(x, w, b, (in_f, out_f), false);
            y.iter().zip(&r64).map(|(y, r)| y * r).sum::<f64>()
        };
        let ngx = to_f32(&numeric_grad(&x64, 1e-3, |x| loss(x, &w64, &b64)));
        let ngw = to_f32(&numeric_grad(&w64, 1e-3, |w| loss(&x64, w, &b64)));
        let ngb = to_f32(&numeric_grad(&b64, 1e-3, |b| loss(&x64, &w64, b)));
        // L is linear in each of x, w, b: central differences are exact up to f64 rounding; the
        // analytic side sums <= 9 f32 products of size <= 1 (error < 1e-6).
        assert_close("gx vs finite differences", &ngx, &dense_bwd_input_cpu(&w, &r, in_f, out_f), 1e-5, 1e-5);
        assert_close("gw vs finite differences", &ngw, &dense_bwd_weight_cpu(&x, &r, in_f, out_f), 1e-5, 1e-5);
        assert_close("gb vs finite differences", &ngb, &dense_bwd_bias_cpu(&r, out_f), 1e-5, 1e-5);
    }
}

/// The backward GEMMs read w, gy and x along their rows (n or m contiguous): with those rows whole
/// groups of 4 they take gemm.cuh's 16-byte loads, else the 4-byte ones. Both paths are checked
/// against the direct sums by `check`; this checks which one runs, with the emulator's copy counter.
#[test]
fn dense_emulated_backward_takes_16_byte_loads_on_whole_groups_of_4() {
    let dev = Device::parse("emu").unwrap();
    for (shape, vector) in [((12, 36, 20, true), true), ((3, 36, 21, false), true), ((3, 7, 5, false), false)] {
        let before = ptxgrad_emu::vec4_copies();
        check(&dev, shape, 77);
        let taken = ptxgrad_emu::vec4_copies() > before;
        assert_eq!(taken, vector, "16-byte loads for (batch, in, out, relu) {shape:?}");
    }
}

test_device!(dense_recorded_op_applies_relu_mask, |dev| {
    let (batch, in_f, out_f) = (3, 20, 7);
    let x = rand_tensor(&[batch, in_f], 1, &dev);
    let w = rand_tensor(&[out_f, in_f], 2, &dev);
    let b = rand_tensor(&[out_f], 3, &dev);
    let r = rand_tensor(&[batch, out_f], 4, &dev);
    let mut tape = Tape::train();
    tape.watch(&x);
    tape.watch(&w);
    tape.watch(&b);
    let y = dense(&mut tape, &x, &w, &b, true, GemmOpts::default()).unwrap();
    let grads = backward_from(tape, &y, &r);

    let (xv, wv, bv, rv) = (x.to_vec().unwrap(), w.to_vec().unwrap(), b.to_vec().unwrap(), r.to_vec().unwrap());
    let yv = y.to_vec().unwrap();
    let dims = (in_f, out_f);
    let masked = relu_mask_exact(&yv, &rv);
    let got = |t: &Tensor| grads.get(t).unwrap().to_vec().unwrap();
    // Sums of <= 20 products of size <= 1: 1e-5.
    assert_close("y", &to_f32(&dense_fwd_exact(&xv, &wv, &bv, dims, true)), &yv, 1e-5, 1e-5);
    assert_close("gx", &to_f32(&dense_input_grad_exact(&wv, &masked, dims)), &got(&x), 1e-5, 1e-5);
    assert_close("gw", &to_f32(&dense_weight_grad_exact(&xv, &masked, dims)), &got(&w), 1e-5, 1e-5);
    assert_close("gb", &to_f32(&dense_bias_grad_exact(&masked, out_f)), &got(&b), 1e-5, 1e-5);
});

test_device!(dense_fused_relu_propagates_nan_as_pytorch, |dev| {
    // Bias NaN, +inf, -inf and finite for the four outputs, and one NaN input in row 1; in = 5
    // takes the one-pass kernel, in = 1024 at batch 3 the split-K one (one block, 4 splits),
    // whose reduction kernel applies the bias and the ReLU. As in PyTorch (linear then relu): NaN
    // wherever a NaN enters the sum, relu(+inf) = +inf, relu(-inf) = 0; the backward passes the
    // gradient wherever y is NaN or positive.
    for in_f in [5, 1024] {
        let (batch, out_f, nan_row, nan_col) = (3, 4, 1, 2);
        let mut xv = uniform(batch * in_f, -1.0, 1.0, 1);
        xv[nan_row * in_f + nan_col] = f32::NAN;
        let wv = uniform(out_f * in_f, -1.0, 1.0, 2);
        let bv = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.1];
        let rv = uniform(batch * out_f, -1.0, 1.0, 3);
        let t = |shape: &[usize], v: &[f32]| Tensor::from_vec(shape, v.to_vec(), &dev).unwrap();
        let (x, w, b, r) = (t(&[batch, in_f], &xv), t(&[out_f, in_f], &wv), t(&[out_f], &bv), t(&[batch, out_f], &rv));
        let mut tape = Tape::train();
        for v in [&x, &w, &b] {
            tape.watch(v);
        }
        let y = dense(&mut tape, &x, &w, &b, true, GemmOpts::default()).unwrap();
        let grads = backward_from(tape, &y, &r);
        let got = |v: &Tensor| grads.get(v).unwrap().to_vec().unwrap();
        let what = |s: &str| format!("{s} (in {in_f}) on {}", dev.label());

        let yv = y.to_vec().unwrap();
        for (i, &v) in yv.iter().enumerate() {
            let (row, o) = (i / out_f, i % out_f);
            let ok = match o {
                _ if o == 0 || row == nan_row => v.is_nan(),
                1 => v == f32::INFINITY,
                2 => v.to_bits() == 0, // +0.0
                _ => v.is_finite() && v >= 0.0,
            };
            assert!(ok, "{}: y[{row}][{o}] = {v}", what("pattern"));
        }
        let dims = (in_f, out_f);
        let y_exact = to_f32(&dense_fwd_exact(&xv, &wv, &bv, dims, true));
        assert_close_nonfinite(&what("y"), &y_exact, &yv, atol(in_f), 1e-5);

        let masked = relu_mask_exact(&yv, &rv);
        let (gx, gw, gb) = (got(&x), got(&w), got(&b));
        assert!(gx.iter().all(|v| v.is_finite()), "{}: the NaN in x does not enter gx", what("gx"));
        assert_close_nonfinite(&what("gx"), &to_f32(&dense_input_grad_exact(&wv, &masked, dims)), &gx, 1e-5, 1e-5);
        // gw[o][j] sums gy[i][o] * x[i][j]: NaN in the NaN's column (its row passes every
        // output's gradient), finite elsewhere.
        for (i, &v) in gw.iter().enumerate() {
            assert_eq!(v.is_nan(), i % in_f == nan_col, "{}: gw[{i}] = {v}", what("gw"));
        }
        assert_close_nonfinite(&what("gw"), &to_f32(&dense_weight_grad_exact(&xv, &masked, dims)), &gw, 1e-5, 1e-5);
        // gb: all of the gradient for the NaN and +inf outputs, only the NaN row's for -inf.
        let col = |o: usize| -> Vec<f32> { (0..batch).map(|i| rv[i * out_f + o]).collect() };
        let want_gb = [col(0).iter().sum(), col(1).iter().sum(), col(2)[nan_row]];
        assert_close(&what("gb"), &want_gb, &gb[..3], 1e-5, 1e-5);
        assert_close_nonfinite(&what("gb"), &to_f32(&dense_bias_grad_exact(&masked, out_f)), &gb, 1e-5, 1e-5);
    }
});

#[test]
fn dense_rejects_bad_shapes() {
    let z = |s: &[usize]| Tensor::zeros(s, &Device::Cpu).unwrap();
    let opts = GemmOpts::default();
    let e = dense_fwd(&z(&[2, 6400]), &z(&[4096, 6399]), &z(&[4096]), false, opts).unwrap_err().to_string();
    assert!(e.contains("(OUT, 6400)") && e.contains("[4096, 6399]"), "{e}");
    let e = dense_fwd(&z(&[2, 3, 4]), &z(&[5, 12]), &z(&[5]), false, opts).unwrap_err().to_string();
    assert!(e.contains("2-D") && e.contains("[2, 3, 4]"), "{e}");
    let e = dense_fwd(&z(&[2, 4]), &z(&[5, 4]), &z(&[4]), false, opts).unwrap_err().to_string();
    assert!(e.contains("b of shape [5]") && e.contains("[4]"), "{e}");
    let e = dense_fwd(&z(&[2, 4]), &z(&[5, 4, 1]), &z(&[5]), false, opts).unwrap_err().to_string();
    assert!(e.contains("[5, 4, 1]"), "{e}");
    let e = dense_bwd(&z(&[2, 4]), &z(&[5, 4]), &z(&[2, 4]), true, opts).unwrap_err().to_string();
    assert!(e.contains("gy of shape [2, 5]") && e.contains("[2, 4]"), "{e}");
}
