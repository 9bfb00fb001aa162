//! GEMM arithmetic (ops::gemm_math): the setting itself, then the tensor-core kernels (3xTF32,
//! TF32 and BF16, kernels/gemm.cuh's MmaMicro) on the emulator and on a GPU, against error bounds
//! that each arithmetic must meet and that tell them apart:
//! - 3xtf32 must be as accurate as the fp32 FFMA kernels (the same tolerance as tests/dense.rs);
//! - tf32 must stay within its rounding bound, |y - y_exact| <= 2^-10 * sum_k |a_k b_k| (each
//!   operand rounded to 10 mantissa bits: <= 2^-11 relative each) plus fp32's own error, and must
//!   be measurably worse than 3xtf32: a path that silently ran FFMAs, or that skipped the
//!   remainder products, fails one of the two;
//! - bf16 likewise within 2^-7 * sum_k |a_k b_k| (8 significant bits: <= 2^-8 relative each), and
//!   measurably worse than tf32 (a bf16 path that kept more bits, or ran TF32, fails that).
mod common;
use common::*;
use ptxgrad::ops::conv2d::{
    conv2d_bwd_input_cpu, conv2d_bwd_weight_cpu, conv2d_bwd_with, conv2d_fwd_cpu, conv2d_fwd_with, Conv2dParams,
    ConvAlgo,
};
use ptxgrad::ops::dense::{dense_bwd, dense_fwd};
use ptxgrad::ops::gemm_math::GemmMath;
use ptxgrad::{Device, Tensor};

#[test]
fn gemm_math_parses_prints_and_scopes() {
    for m in GemmMath::ALL {
        assert_eq!(m.to_string().parse::<GemmMath>().unwrap(), m);
    }
    let err = "fp16".parse::<GemmMath>().unwrap_err().to_string();
    assert!(err.contains("expected fp32, 3xtf32, tf32 or bf16") && err.contains("fp16"), "{err}");
    assert_eq!(GemmMath::current(), GemmMath::Fp32);
    {
        let _outer = GemmMath::Tf32.scope();
        assert_eq!(GemmMath::current(), GemmMath::Tf32);
        {
            let _inner = GemmMath::Tf32x3.scope();
            assert_eq!(GemmMath::current(), GemmMath::Tf32x3);
        }
        assert_eq!(GemmMath::current(), GemmMath::Tf32);
        // Per thread: another thread still has the default.
        std::thread::spawn(|| assert_eq!(GemmMath::current(), GemmMath::Fp32)).join().unwrap();
    }
    assert_eq!(GemmMath::current(), GemmMath::Fp32);
    // The CPU path computes in fp32 only: asking it for tensor-core math is an error, not ignored.
    let err = GemmMath::Tf32.scope_on(&Device::Cpu).err().expect("refused on the CPU").to_string();
    assert!(err.contains("--math tf32 needs a CUDA device"), "{err}");
    assert!(GemmMath::Fp32.scope_on(&Device::Cpu).is_ok());
}

/// C (m x n) = A . B exactly (f64) and S = sum_k |A(i,k) B(k,j)|, for the error bounds.
fn exact(
    m: usize,
    n: usize,
    k: usize,
    a: impl Fn(usize, usize) -> f32,
    b: impl Fn(usize, usize) -> f32,
) -> (Vec<f64>, Vec<f64>) {
    let (mut c, mut s) = (vec![0.0; m * n], vec![0.0; m * n]);
    for i in 0..m {
        for j in 0..n {
            for kk in 0..k {
                let p = a(i, kk) as f64 * b(kk, j) as f64;
                c[i * n + j] += p;
                s[i * n + j] += p.abs();
            }
        }
    }
    (c, s)
}

/// The largest |got - c| and the largest (|got - c| - bound(k, s)), over all elements.
fn errors(got: &[f32], c: &[f64], s: &[f64], bound: impl Fn(f64) -> f64) -> (f64, f64) {
    assert_eq!(got.len(), c.len());
    let mut worst = (0.0f64, f64::NEG_INFINITY);
    for i in 0..c.len() {
        let e = (got[i] as f64 - c[i]).abs();
        worst.0 = worst.0.max(e);
        worst.1 = worst.1.max(e - bound(s[i]));
    }
    worst
}

/// fp32's tolerance of tests/dense.rs for a sum of k products of values in [-1, 1).
fn fp32_atol(k: usize) -> f64 {
    1e-5 + 5e-7 * k as f64
}

/// Dense forward, input grad and weight grad under `math`; returns the largest error of each
/// against the exact products, after checking the bound of `math`.
fn dense_errors(dev: &Device, math: GemmMath, (batch, in_f, out_f): (usize, usize, usize), seed: u64) -> [f64; 3] {
    let _m = math.scope();
    let xv = uniform(batch * in_f, -1.0, 1.0, seed);
    let wv = uniform(out_f * in_f, -1.0, 1.0, seed + 1);
    let gyv = uniform(batch * out_f, -1.0, 1.0, seed + 2);
    let t = |shape: &[usize], v: &[f32]| Tensor::from_vec(shape, v.to_vec(), dev).unwrap();
    let (x, w, gy) = (t(&[batch, in_f], &xv), t(&[out_f, in_f], &wv), t(&[batch, out_f], &gyv));
    let b = t(&[out_f], &vec![0.0; out_f]);
    let y = dense_fwd(&x, &w, &b, false).unwrap().to_vec().unwrap();
    let (gx, gw, _) = dense_bwd(&x, &w, &gy, true).unwrap();
    let (gx, gw) = (gx.unwrap().to_vec().unwrap(), gw.to_vec().unwrap());
    // (got, exact, k) of y = x w^T, gx = gy w, gw = gy^T x.
    let cases = [
        (y, exact(batch, out_f, in_f, |i, k| xv[i * in_f + k], |k, o| wv[o * in_f + k]), in_f),
        (gx, exact(batch, in_f, out_f, |i, o| gyv[i * out_f + o], |o, j| wv[o * in_f + j]), out_f),
        (gw, exact(out_f, in_f, batch, |o, i| gyv[i * out_f + o], |i, j| xv[i * in_f + j]), batch),
    ];
    let mut worst = [0.0; 3];
    for (i, (got, (c, s), k)) in cases.into_iter().enumerate() {
        let what = format!(
            "{} with {math} GEMMs, (batch, in, out) = {:?}, on {}",
            ["y", "gx", "gw"][i],
            (batch, in_f, out_f),
            dev.label()
        );
        let bound = |s: f64| match math {
            GemmMath::Tf32 => s * 2f64.powi(-10) + fp32_atol(k),
            GemmMath::Bf16 => s * 2f64.powi(-7) + fp32_atol(k),
            _ => fp32_atol(k),
        };
        let (err, over) = errors(&got, &c, &s, bound);
        assert!(over <= 0.0, "{what}: an element is {over:e} past its bound (largest error {err:e})");
        worst[i] = err;
    }
    worst
}

/// Forward grids that take each tile (gemm_launch): 64 x 64, 128 x 64 (2048 x 2176: 272
/// 128-blocks), 128 x 128 (1536 x 2816: exactly one wave of 264 128-blocks), 96 x 128 (a batch
/// of 96: one wave of 264 blocks, each a quarter smaller than a 128 x 128 one) and 128 x 96 (96
/// outputs).
const DENSE_SHAPES: [(usize, usize, usize); 5] =
    [(65, 129, 257), (2048, 33, 2176), (1536, 8, 2816), (96, 8, 33792), (33792, 8, 96)];

fn dense_math_body(dev: Device) {
    for (i, &shape) in DENSE_SHAPES.iter().enumerate() {
        let seed = 70 + 10 * i as u64;
        let f32 = dense_errors(&dev, GemmMath::Fp32, shape, seed);
        let x3 = dense_errors(&dev, GemmMath::Tf32x3, shape, seed);
        let tf = dense_errors(&dev, GemmMath::Tf32, shape, seed);
        let bf = dense_errors(&dev, GemmMath::Bf16, shape, seed);
        let e = |v: [f64; 3]| format!("{:.1e} / {:.1e} / {:.1e}", v[0], v[1], v[2]);
        println!(
            "{shape:?} on {}: largest |error| of y / gx / gw: fp32 {}, 3xtf32 {}, tf32 {}, bf16 {}",
            dev.label(),
            e(f32),
            e(x3),
            e(tf),
            e(bf)
        );
        // Sums of >= 33 products: TF32's rounding shows well above 3xTF32's error, and BF16's
        // (4x coarser per operand) above TF32's.
        for j in 0..3 {
            let k = [shape.1, shape.2, shape.0][j];
            if k >= 33 {
                assert!(tf[j] > 8.0 * x3[j], "{shape:?} output {j}: tf32 error {:e} vs 3xtf32 {:e}", tf[j], x3[j]);
                assert!(bf[j] > 2.0 * tf[j], "{shape:?} output {j}: bf16 error {:e} vs tf32 {:e}", bf[j], tf[j]);
            }
        }
    }
}

#[test]
fn dense_tensor_core_math_meets_its_bounds_emulated() {
    dense_math_body(Device::parse("emu").expect("the emulator is always there"));
}

#[test]
fn dense_tensor_core_math_meets_its_bounds_cuda() {
    if let Some(dev) = gpu_or_skip("dense_tensor_core_math_meets_its_bounds_cuda") {
        dense_math_body(dev);
    }
}

/// The convolutions (implicit GEMM and Winograd) under each tensor-core math: 3xtf32 within the
/// fp32 kernels' tolerances of tests/conv2d.rs and tests/winograd.rs, tf32 within 1% of the
/// largest value (Winograd's transforms widen the range that TF32 rounds), bf16 within 1% with
/// the implicit GEMM (the emulator: ~2e-3) and 15% with Winograd's default tiles (~6e-2: 8
/// significant bits of transformed operands are few, which is why `--conv-algo auto` under bf16
/// rejects the larger Winograd tiles).
/// A wrong fragment layout costs O(1) of the largest value in any of them.
fn conv_math_body(dev: Device) {
    // (n, cin, h, w, cout, r, pad): conv2's 5x5 and conv3-5's 3x3, small.
    for (i, &(n, cin, h, w, cout, r, pad)) in [(2, 6, 13, 13, 7, 5, 2), (3, 4, 12, 12, 6, 3, 1)].iter().enumerate() {
        let p = Conv2dParams::new(n, cin, h, w, cout, r, r, 1, pad).unwrap();
        let seed = 900 + 10 * i as u64;
        let (xv, wv, bv, gyv) = (
            uniform(p.x_len(), -1.0, 1.0, seed),
            uniform(p.w_len(), -1.0, 1.0, seed + 1),
            uniform(cout, -1.0, 1.0, seed + 2),
            uniform(p.y_len(), -1.0, 1.0, seed + 3),
        );
        let t = |shape: &[usize], v: &[f32]| Tensor::from_vec(shape, v.to_vec(), &dev).unwrap();
        let (x, wt, b, gy) = (
            t(&[n, cin, h, w], &xv),
            t(&[cout, cin, r, r], &wv),
            t(&[cout], &bv),
            t(&[n, cout, p.oh as usize, p.ow as usize], &gyv),
        );
        let refs = [
            conv2d_fwd_cpu(&xv, &wv, &bv, &p, false),
            conv2d_bwd_input_cpu(&wv, &gyv, &p),
            conv2d_bwd_weight_cpu(&xv, &gyv, &p),
        ];
        let ks = [cin * r * r, cout * r * r, n * p.ohw()];
        for math in [GemmMath::Tf32x3, GemmMath::Tf32, GemmMath::Bf16] {
            let _m = math.scope();
            for algo in [ConvAlgo::ImplicitGemm, ConvAlgo::Winograd { tile: None }] {
                let y = conv2d_fwd_with(&x, &wt, &b, 1, pad, false, algo).unwrap();
                let (gx, gw, _) = conv2d_bwd_with(&x, &wt, &gy, 1, pad, true, algo).unwrap();
                let got = [y.to_vec().unwrap(), gx.unwrap().to_vec().unwrap(), gw.to_vec().unwrap()];
                for j in 0..3 {
                    let what = format!(
                        "{} of x {:?}, {r}x{r}, {algo}, {math} GEMMs, on {}",
                        ["y", "gx", "gw"][j],
                        [n, cin, h, w],
                        dev.label()
                    );
                    let largest = refs[j].iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    let tol = match (math, algo) {
                        (GemmMath::Tf32, _) => 1e-2 * largest,
                        (GemmMath::Bf16, ConvAlgo::ImplicitGemm) => 1e-2 * largest,
                        (GemmMath::Bf16, _) => 0.15 * largest,
                        (_, ConvAlgo::ImplicitGemm) => 1e-5 + 5e-7 * ks[j] as f32,
                        _ => wino_atol(ks[j]),
                    };
                    assert_close(&what, &refs[j], &got[j], tol, 0.0);
                }
            }
        }
    }
}

#[test]
fn conv2d_tensor_core_math_matches_cpu_emulated() {
    conv_math_body(Device::parse("emu").expect("the emulator is always there"));
}

#[test]
fn conv2d_tensor_core_math_matches_cpu_cuda() {
    if let Some(dev) = gpu_or_skip("conv2d_tensor_core_math_matches_cpu_cuda") {
        conv_math_body(dev);
    }
}
