//! dense: the CPU reference against finite differences, CUDA against the CPU reference (AlexNet's
//! three fully connected layers at batch 128 and awkward shapes), the recorded op, shape errors.
mod common;
use common::*;
use ptxgrad::ops::dense::{
    dense, dense_bwd, dense_bwd_bias_cpu, dense_bwd_input_cpu, dense_bwd_weight_cpu, dense_fwd, dense_fwd_cpu,
};
use ptxgrad::ops::gemm_math::GemmMath;
use ptxgrad::ops::relu::relu_bwd_cpu;
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

/// Allowed |cuda - cpu| for a sum of `k` products of values in [-1, 1): see tests/conv2d.rs
/// (typical fp32 rounding ~2e-8*k; 5e-7*k covers the extreme over millions of outputs on both sides).
fn atol(k: usize) -> f32 {
    1e-5 + 5e-7 * k as f32
}

fn rows(v: &[f32], width: usize, idx: &[usize]) -> Vec<f32> {
    idx.iter().flat_map(|&i| v[i * width..][..width].iter().copied()).collect()
}

/// Forward and backward on `dev` against the CPU reference. Forward and input grad are per row:
/// for big batches only the first and last rows are compared. The weight grad uses every row.
fn check(dev: &Device, (batch, in_f, out_f, relu): (usize, usize, usize, bool), seed: u64) {
    let xv = uniform(batch * in_f, -1.0, 1.0, seed);
    let wv = uniform(out_f * in_f, -1.0, 1.0, seed + 1);
    let bv = uniform(out_f, -1.0, 1.0, seed + 2);
    let gyv = uniform(batch * out_f, -1.0, 1.0, seed + 3);
    let t = |shape: &[usize], v: &[f32]| Tensor::from_vec(shape, v.to_vec(), dev).unwrap();
    let (x, w, b, gy) = (t(&[batch, in_f], &xv), t(&[out_f, in_f], &wv), t(&[out_f], &bv), t(&[batch, out_f], &gyv));
    let y = dense_fwd(&x, &w, &b, relu).unwrap();
    assert_eq!(y.shape(), &[batch, out_f]);
    let (gx, gw, gb) = dense_bwd(&x, &w, &gy, true).unwrap();
    let (_, gw2, _) = dense_bwd(&x, &w, &gy, false).unwrap();

    let idx: Vec<usize> = if batch <= 8 { (0..batch).collect() } else { vec![0, batch - 1] };
    let what = |s: &str| format!("{s} (batch {batch}, in {in_f}, out {out_f}, relu {relu}) on {}", dev.label());
    // Forward: sums of IN products; input grad: of OUT; weight and bias grad: of batch.
    let y_ref = dense_fwd_cpu(&rows(&xv, in_f, &idx), &wv, &bv, in_f, out_f, relu);
    assert_close(&what("y"), &y_ref, &rows(&y.to_vec().unwrap(), out_f, &idx), atol(in_f), 1e-5);
    let gx_ref = dense_bwd_input_cpu(&wv, &rows(&gyv, out_f, &idx), in_f, out_f);
    assert_close(&what("gx"), &gx_ref, &rows(&gx.unwrap().to_vec().unwrap(), in_f, &idx), atol(out_f), 1e-5);
    let gw_ref = dense_bwd_weight_cpu(&xv, &gyv, in_f, out_f);
    assert_close(&what("gw"), &gw_ref, &gw.to_vec().unwrap(), atol(batch), 1e-5);
    // The same kernels with and without the input grad: bitwise equal.
    assert_close(&what("gw (no gx)"), &gw_ref, &gw2.to_vec().unwrap(), atol(batch), 1e-5);
    assert_close(&what("gb"), &dense_bwd_bias_cpu(&gyv, out_f), &gb.to_vec().unwrap(), atol(batch), 1e-5);
}

test_device!(dense_awkward_shapes_match_cpu, |dev| {
    for (i, &c) in AWKWARD.iter().enumerate() {
        check(&dev, c, 10 * i as u64);
    }
});

#[test]
fn dense_cuda_alexnet_layers_match_cpu() {
    let Some(dev) = gpu_or_skip("dense_cuda_alexnet_layers_match_cpu") else { return };
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
        let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let (x64, w64, b64, r64) = (f64s(&x), f64s(&w), f64s(&b), f64s(&r));
        let fwd = |x: &[f64], w: &[f64], b: &[f64]| {
            let mut l = 0.0;
            for i in 0..batch {
                for o in 0..out_f {
                    let y = b[o] + (0..in_f).map(|k| x[i * in_f + k] * w[o * in_f + k]).sum::<f64>();
                    l += y * r64[i * out_f + o];
                }
            }
            l
        };
        let to32 = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect::<Vec<f32>>();
        let ngx = to32(numeric_grad(&x64, 1e-3, |x| fwd(x, &w64, &b64)));
        let ngw = to32(numeric_grad(&w64, 1e-3, |w| fwd(&x64, w, &b64)));
        let ngb = to32(numeric_grad(&b64, 1e-3, |b| fwd(&x64, &w64, b)));
        // L is linear in each of x, w, b: central differences are exact up to f64 rounding; the
        // analytic side sums <= 9 f32 products of size <= 1 (error < 1e-6).
        assert_close("gx vs finite differences", &ngx, &dense_bwd_input_cpu(&w, &r, in_f, out_f), 1e-5, 1e-5);
        assert_close("gw vs finite differences", &ngw, &dense_bwd_weight_cpu(&x, &r, in_f, out_f), 1e-5, 1e-5);
        assert_close("gb vs finite differences", &ngb, &dense_bwd_bias_cpu(&r, out_f), 1e-5, 1e-5);
    }
}

/// The backward GEMMs read w, gy and x along their rows (n or m contiguous): with those rows whole
/// groups of 4 they take gemm.cuh's 16-byte loads, else the 4-byte ones. Both paths are checked
/// against the CPU by `check`; this checks which one runs, with the emulator's copy counter.
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
    let y = dense(&mut tape, &x, &w, &b, true).unwrap();
    let grads = backward_from(tape, &y, &r);

    let (xv, wv, bv, rv) = (x.to_vec().unwrap(), w.to_vec().unwrap(), b.to_vec().unwrap(), r.to_vec().unwrap());
    let yv = dense_fwd_cpu(&xv, &wv, &bv, in_f, out_f, true);
    let m = relu_bwd_cpu(&yv, &rv);
    let got = |t: &Tensor| grads.get(t).unwrap().to_vec().unwrap();
    // Sums of <= 20 products of size <= 1: 1e-5.
    assert_close("y", &yv, &y.to_vec().unwrap(), 1e-5, 1e-5);
    assert_close("gx", &dense_bwd_input_cpu(&wv, &m, in_f, out_f), &got(&x), 1e-5, 1e-5);
    assert_close("gw", &dense_bwd_weight_cpu(&xv, &m, in_f, out_f), &got(&w), 1e-5, 1e-5);
    assert_close("gb", &dense_bwd_bias_cpu(&m, out_f), &got(&b), 1e-5, 1e-5);
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
        let y = dense(&mut tape, &x, &w, &b, true).unwrap();
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
        let k_atol = atol(in_f);
        assert_close_nonfinite(&what("y"), &dense_fwd_cpu(&xv, &wv, &bv, in_f, out_f, true), &yv, k_atol, 1e-5);

        let masked = relu_bwd_cpu(&yv, &rv);
        for (i, (&m, &r)) in masked.iter().zip(&rv).enumerate() {
            assert_eq!(m, if yv[i].is_nan() || yv[i] > 0.0 { r } else { 0.0 }, "masked gy at {i} (y {})", yv[i]);
        }
        let (gx, gw, gb) = (got(&x), got(&w), got(&b));
        assert!(gx.iter().all(|v| v.is_finite()), "{}: the NaN in x does not enter gx", what("gx"));
        assert_close_nonfinite(&what("gx"), &dense_bwd_input_cpu(&wv, &masked, in_f, out_f), &gx, 1e-5, 1e-5);
        // gw[o][j] sums gy[i][o] * x[i][j]: NaN in the NaN's column (its row passes every
        // output's gradient), finite elsewhere.
        for (i, &v) in gw.iter().enumerate() {
            assert_eq!(v.is_nan(), i % in_f == nan_col, "{}: gw[{i}] = {v}", what("gw"));
        }
        assert_close_nonfinite(&what("gw"), &dense_bwd_weight_cpu(&xv, &masked, in_f, out_f), &gw, 1e-5, 1e-5);
        // gb: all of the gradient for the NaN and +inf outputs, only the NaN row's for -inf.
        let col = |o: usize| -> Vec<f32> { (0..batch).map(|i| rv[i * out_f + o]).collect() };
        let want_gb = [col(0).iter().sum(), col(1).iter().sum(), col(2)[nan_row]];
        assert_close(&what("gb"), &want_gb, &gb[..3], 1e-5, 1e-5);
        assert_close_nonfinite(&what("gb"), &dense_bwd_bias_cpu(&masked, out_f), &gb, 1e-5, 1e-5);
    }
});

#[test]
fn dense_rejects_bad_shapes() {
    let z = |s: &[usize]| Tensor::zeros(s, &Device::Cpu).unwrap();
    let e = dense_fwd(&z(&[2, 6400]), &z(&[4096, 6399]), &z(&[4096]), false).unwrap_err().to_string();
    assert!(e.contains("(OUT, 6400)") && e.contains("[4096, 6399]"), "{e}");
    let e = dense_fwd(&z(&[2, 3, 4]), &z(&[5, 12]), &z(&[5]), false).unwrap_err().to_string();
    assert!(e.contains("2-D") && e.contains("[2, 3, 4]"), "{e}");
    let e = dense_fwd(&z(&[2, 4]), &z(&[5, 4]), &z(&[4]), false).unwrap_err().to_string();
    assert!(e.contains("b of shape [5]") && e.contains("[4]"), "{e}");
    let e = dense_fwd(&z(&[2, 4]), &z(&[5, 4, 1]), &z(&[5]), false).unwrap_err().to_string();
    assert!(e.contains("[5, 4, 1]"), "{e}");
    let e = dense_bwd(&z(&[2, 4]), &z(&[5, 4]), &z(&[2, 4]), true).unwrap_err().to_string();
    assert!(e.contains("gy of shape [2, 5]") && e.contains("[2, 4]"), "{e}");
}

/// Times the AlexNet layers on the GPU: `cargo test --test dense -- --ignored --nocapture`.
#[test]
#[ignore]
fn dense_cuda_alexnet_timing() {
    let Some(dev) = gpu_or_skip("dense_cuda_alexnet_timing") else { return };
    let time = |f: &dyn Fn()| time_on(&dev, f);
    let mut total = 0.0;
    for (i, &(batch, in_f, out_f, relu)) in ALEXNET.iter().enumerate() {
        let x = rand_tensor(&[batch, in_f], 1, &dev);
        let w = rand_tensor(&[out_f, in_f], 2, &dev);
        let b = rand_tensor(&[out_f], 3, &dev);
        let gy = rand_tensor(&[batch, out_f], 4, &dev);
        let gflop = 2.0 * (batch * in_f * out_f) as f64 / 1e9;
        let tf = time(&|| drop(dense_fwd(&x, &w, &b, relu).unwrap()));
        let tw = time(&|| drop(dense_bwd(&x, &w, &gy, false).unwrap()));
        let tx = time(&|| drop(dense_bwd(&x, &w, &gy, true).unwrap())) - tw;
        total += tf + tw + tx;
        println!(
            "fc{}: fwd {:.3} ms ({:.1} TFLOP/s), gw+gb {:.3} ms ({:.1}), gx {:.3} ms ({:.1})",
            i + 1,
            tf * 1e3,
            gflop / tf / 1e3,
            tw * 1e3,
            gflop / tw / 1e3,
            tx * 1e3,
            gflop / tx / 1e3
        );
    }
    println!("dense total (fwd + bwd, batch 128): {:.3} ms", total * 1e3);
}

/// The GEMM core's throughput on one large problem (M = N = K = 4096, 137 GFLOP a pass), for
/// each way it loads operands: the forward reads both along k (4-byte copies), the weight grad
/// reads both along m / n (16-byte copies), the input grad one of each; and each GEMM arithmetic
/// (fp32 FFMAs, 3xtf32, tf32, bf16). It separates the core from the conv loaders and from small grids:
/// `cargo test --test dense -- --ignored --nocapture dense_cuda_gemm_core_timing`.
#[test]
#[ignore]
fn dense_cuda_gemm_core_timing() {
    let Some(dev) = gpu_or_skip("dense_cuda_gemm_core_timing") else { return };
    let n = 4096;
    let x = rand_tensor(&[n, n], 1, &dev);
    let w = rand_tensor(&[n, n], 2, &dev);
    let b = rand_tensor(&[n], 3, &dev);
    let gy = rand_tensor(&[n, n], 4, &dev);
    let tflop = 2.0 * (n as f64).powi(3) / 1e12;
    // Each GEMM arithmetic (ops::gemm_math): the FFMA core and the tensor-core ones.
    for math in GemmMath::ALL {
        let _m = math.scope();
        let tf = time_on(&dev, &|| drop(dense_fwd(&x, &w, &b, false).unwrap()));
        let tw = time_on(&dev, &|| drop(dense_bwd(&x, &w, &gy, false).unwrap()));
        let tx = time_on(&dev, &|| drop(dense_bwd(&x, &w, &gy, true).unwrap())) - tw;
        println!(
            "GEMM core ({math}), {n}^3: both operands along k (4-byte copies) {:.1} TFLOP/s, both along m/n \
             (16-byte) {:.1}, one of each {:.1}",
            tflop / tf,
            tflop / tw,
            tflop / tx
        );
    }
}
