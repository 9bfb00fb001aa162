//! GEMM arithmetic (ops::gemm::math), a value each op is handed in its `GemmOpts`: the setting
//! itself (parsing, the refusal of tensor-core arithmetic on the CPU, a model's refusal of
//! settings it cannot run, two ops of one tape each keeping their own), then the tensor-core
//! kernels (3xTF32, TF32 and BF16, kernels/gemm.cuh's MmaMicro) on the emulator and on a GPU,
//! against error bounds that each arithmetic must meet and that tell them apart:
//! - 3xtf32 must be as accurate as the fp32 FFMA kernels (the same tolerance as tests/dense.rs);
//! - tf32 must stay within its rounding bound, |y - y_exact| <= 2^-10 * sum_k |a_k b_k| (each
//!   operand rounded to 10 mantissa bits: <= 2^-11 relative each) plus fp32's own error, and must
//!   be measurably worse than 3xtf32: a path that silently ran FFMAs, or that skipped the
//!   remainder products, fails one of the two;
//! - bf16 likewise within 2^-7 * sum_k |a_k b_k| (8 significant bits: <= 2^-8 relative each), and
//!   measurably worse than tf32 (a bf16 path that kept more bits, or ran TF32, fails that).
mod common;
use common::kernels::*;
use common::*;
use ptxgrad::nn::Compute;
use ptxgrad::nn::{model::Model, models::ALEXNET};
use ptxgrad::ops::conv2d::{conv2d_bwd, conv2d_fwd, Conv2d, Conv2dParams, ConvAlgo};
use ptxgrad::ops::dense::{dense, dense_bwd, dense_fwd};
use ptxgrad::ops::gemm::math::GemmMath;
use ptxgrad::ops::gemm::GemmOpts;
use ptxgrad::{Device, Tape, Tensor};

/// Tests `name::emulated` and `name::cuda` (skipped without a GPU, see `gpu_or_skip`) running
/// `body(dev)`: tensor-core arithmetic has no CPU path.
macro_rules! emulated_and_cuda {
    ($name:ident, $body:ident) => {
        mod $name {
            #[test]
            fn emulated() {
                super::$body(ptxgrad::Device::parse("emu").expect("the emulator is always there"))
            }
            #[test]
            fn cuda() {
                if let Some(dev) = crate::common::gpu_or_skip(concat!(stringify!($name), "::cuda")) {
                    super::$body(dev)
                }
            }
        }
    };
}

#[test]
fn gemm_math_parses_and_prints() {
    for m in GemmMath::ALL {
        assert_eq!(m.to_string().parse::<GemmMath>().unwrap(), m);
    }
    let err = "fp16".parse::<GemmMath>().unwrap_err().to_string();
    assert!(err.contains("expected fp32, 3xtf32, tf32 or bf16") && err.contains("fp16"), "{err}");
    assert_eq!(GemmOpts::default(), GemmOpts { math: GemmMath::Fp32, wide_96: true });
    assert_eq!(GemmOpts::math(GemmMath::Bf16), GemmOpts { math: GemmMath::Bf16, wide_96: true });
}

/// The CPU path computes in fp32 only: asking it for tensor-core arithmetic is an error that
/// names the flag and the device, not a setting silently ignored. The emulator runs them all.
#[test]
fn gemm_opts_refuse_tensor_core_math_on_the_cpu() {
    let emu = Device::parse("emu").unwrap();
    for math in GemmMath::ALL {
        let opts = GemmOpts::math(math);
        assert!(opts.check_device(&emu).is_ok(), "{math} on the emulator");
        if math == GemmMath::Fp32 {
            assert!(opts.check_device(&Device::Cpu).is_ok());
        } else {
            let msg = err_msg(opts.check_device(&Device::Cpu));
            assert_mentions(&msg, &[&format!("--math {math} needs a CUDA device"), "found cpu"]);
        }
    }
}

/// A model takes only the compute it can run: no tensor-core arithmetic on the CPU, and no
/// `winograd:M` that none of its conv layers has kernels for, naming the M that exist (AlexNet's
/// 3x3 layers have F(2, 3), F(4, 3), F(6, 3); its 5x5 layer F(2, 5), F(4, 5); conv1 none).
#[test]
fn alexnet_with_compute_refuses_what_it_cannot_run() {
    const RES: usize = 65; // the smallest AlexNet: cheap to build
    let model = |dev: &Device| Model::new(&ALEXNET, RES, 0, dev).unwrap();
    let (cpu, emu) = (Device::Cpu, Device::parse("emu").unwrap());
    let tf32 = Compute { gemm: GemmOpts::math(GemmMath::Tf32), ..Compute::default() };
    assert_mentions(&err_msg(model(&cpu).with_compute(tf32).map(|m| m.compute())), &["--math tf32", "cpu"]);
    assert_eq!(model(&emu).with_compute(tf32).unwrap().compute(), tf32);
    let wino = |m| Compute { conv: ConvAlgo::Winograd { tile: Some(m) }, ..Compute::default() };
    for m in [1, 3, 5, 7] {
        let msg = err_msg(model(&cpu).with_compute(wino(m)).map(|m| m.compute()));
        assert_mentions(&msg, &[&format!("winograd:{m}"), "expected one of winograd:2, winograd:4, winograd:6"]);
    }
    for m in [2, 4, 6] {
        assert_eq!(model(&cpu).with_compute(wino(m)).unwrap().compute(), wino(m));
    }
}

/// Two dense layers recorded on one tape, one in TF32 and one in fp32, on one thread: each
/// forward and each weight grad (computed later, by the tape's backward) runs in its own op's
/// arithmetic. x (64, 64), w (8, 64): every sum has 64 terms, where TF32's rounding (~1e-3 at
/// the worst of 512 outputs) stands far above fp32's tolerance (4e-5).
#[test]
fn ops_on_one_tape_keep_their_own_math() {
    let dev = Device::parse("emu").unwrap();
    let (batch, in_f, out_f) = (64, 64, 8);
    let t = |shape: &[usize], v: &[f32]| Tensor::from_vec(shape, v.to_vec(), &dev).unwrap();
    let xv = uniform(batch * in_f, -1.0, 1.0, 1);
    let x = t(&[batch, in_f], &xv);
    let zero_b = t(&[out_f], &vec![0.0; out_f]);
    let mut tape = Tape::train();
    let mut layers = Vec::new();
    for (i, math) in [GemmMath::Tf32, GemmMath::Fp32].into_iter().enumerate() {
        let wv = uniform(out_f * in_f, -1.0, 1.0, 10 + i as u64);
        let gyv = uniform(batch * out_f, -1.0, 1.0, 20 + i as u64);
        let w = t(&[out_f, in_f], &wv);
        tape.watch(&w);
        let y = dense(&mut tape, &x, &w, &zero_b, false, GemmOpts::math(math)).unwrap();
        layers.push((math, wv, w, y, gyv));
    }
    // A loss whose gradient with respect to each y is that layer's gy.
    let loss = Tensor::from_vec(&[1], vec![0.0], &dev).unwrap();
    let ys: Vec<&Tensor> = layers.iter().map(|l| &l.3).collect();
    let seeds: Vec<_> = layers.iter().map(|l| (l.3.id(), t(&[batch, out_f], &l.4))).collect();
    tape.record(&loss, &ys, move |_, grads| seeds.iter().try_for_each(|(id, gy)| grads.accumulate(*id, gy.clone())));
    let grads = tape.backward(&loss).unwrap();
    for (math, wv, w, y, gyv) in &layers {
        let [y_exact, _, gw_exact] = exact_products(&xv, wv, gyv, (batch, in_f, out_f));
        let got = [(y.to_vec().unwrap(), y_exact), (grads.get(w).unwrap().to_vec().unwrap(), gw_exact)];
        for (what, (got, (c, s, k))) in ["y", "gw"].into_iter().zip(got) {
            let what = format!("{what} of the {math} layer");
            let (err, over) = errors(&got, &c, &s, |s| bound(*math, k, s));
            assert!(over <= 0.0, "{what}: an element is {over:e} past its bound (largest error {err:e})");
            if *math == GemmMath::Tf32 {
                assert!(err > fp32_atol(k), "{what}: largest error {err:e}, within fp32's: not TF32");
            }
        }
    }
}

/// The exact products of a dense layer with x (B, IN), w (OUT, IN) and gy (B, OUT), each as
/// (values, the sums of |terms|, terms per sum) (`matmul_exact`): y = x w^T, gx = gy w,
/// gw = gy^T x.
fn exact_products(
    xv: &[f32],
    wv: &[f32],
    gyv: &[f32],
    (batch, in_f, out_f): (usize, usize, usize),
) -> [(Vec<f64>, Vec<f64>, usize); 3] {
    let (x, w, gy) = (|i, j| xv[i * in_f + j] as f64, |o, j| wv[o * in_f + j] as f64, |i, o| gyv[i * out_f + o] as f64);
    let with_k = |(c, s), k| (c, s, k);
    [
        with_k(matmul_exact((batch, out_f, in_f), x, |j, o| w(o, j)), in_f),
        with_k(matmul_exact((batch, in_f, out_f), gy, w), out_f),
        with_k(matmul_exact((out_f, in_f, batch), |o, i| gy(i, o), x), batch),
    ]
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

/// The error allowed to `math` on a sum of k products whose |terms| add up to s: fp32's, plus the
/// rounding of both operands for TF32 (2^-10 s) and BF16 (2^-7 s).
fn bound(math: GemmMath, k: usize, s: f64) -> f64 {
    let rounding = match math {
        GemmMath::Tf32 => 2f64.powi(-10),
        GemmMath::Bf16 => 2f64.powi(-7),
        GemmMath::Fp32 | GemmMath::Tf32x3 => 0.0,
    };
    fp32_atol(k) + rounding * s
}

/// Dense forward, input grad and weight grad in `math`; returns the largest error of each
/// against the exact products, after checking the bound of `math`.
fn dense_errors(dev: &Device, math: GemmMath, (batch, in_f, out_f): (usize, usize, usize), seed: u64) -> [f64; 3] {
    let opts = GemmOpts::math(math);
    let xv = uniform(batch * in_f, -1.0, 1.0, seed);
    let wv = uniform(out_f * in_f, -1.0, 1.0, seed + 1);
    let gyv = uniform(batch * out_f, -1.0, 1.0, seed + 2);
    let t = |shape: &[usize], v: &[f32]| Tensor::from_vec(shape, v.to_vec(), dev).unwrap();
    let (x, w, gy) = (t(&[batch, in_f], &xv), t(&[out_f, in_f], &wv), t(&[batch, out_f], &gyv));
    let b = t(&[out_f], &vec![0.0; out_f]);
    let y = dense_fwd(&x, &w, &b, false, opts).unwrap().to_vec().unwrap();
    let (gx, gw, _) = dense_bwd(&x, &w, &gy, true, opts).unwrap();
    let got = [y, gx.unwrap().to_vec().unwrap(), gw.to_vec().unwrap()];
    let mut worst = [0.0; 3];
    for (i, (got, (c, s, k))) in got.into_iter().zip(exact_products(&xv, &wv, &gyv, (batch, in_f, out_f))).enumerate() {
        let what = format!(
            "{} with {math} GEMMs, (batch, in, out) = {:?}, on {}",
            ["y", "gx", "gw"][i],
            (batch, in_f, out_f),
            dev.label()
        );
        let (err, over) = errors(&got, &c, &s, |s| bound(math, k, s));
        assert!(over <= 0.0, "{what}: an element is {over:e} past its bound (largest error {err:e})");
        worst[i] = err;
    }
    worst
}

/// Forward grids that take each tile (Planner::launch): 64 x 64, 128 x 64 (2048 x 2176: 272
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

emulated_and_cuda!(dense_tensor_core_math_meets_its_bounds, dense_math_body);

/// The convolutions (implicit GEMM and Winograd) in each tensor-core math against the direct
/// sums (tests/common/kernels.rs): 3xtf32 within the
/// fp32 kernels' tolerances of tests/conv2d.rs and tests/winograd.rs, tf32 within 1% of the
/// largest value (Winograd's transforms widen the range that TF32 rounds), bf16 within 1% with
/// the implicit GEMM (the emulator: ~2e-3) and 15% with Winograd's default tiles (~6e-2: 8
/// significant bits of transformed operands are few, which is why `--conv-algo auto` under bf16
/// rejects the larger Winograd tiles).
/// A wrong fragment layout costs O(1) of the largest value in any of them.
fn conv_math_body(dev: Device) {
    // (n, c_in, h, w, c_out, r, pad): conv2's 5x5 and conv3-5's 3x3, small.
    for (i, &(n, c_in, h, w, c_out, r, pad)) in [(2, 6, 13, 13, 7, 5, 2), (3, 4, 12, 12, 6, 3, 1)].iter().enumerate() {
        let p = Conv2dParams::new(n, c_in, h, w, c_out, r, r, 1, pad).unwrap();
        let seed = 900 + 10 * i as u64;
        let (xv, wv, bv, gyv) = (
            uniform(p.x_len(), -1.0, 1.0, seed),
            uniform(p.w_len(), -1.0, 1.0, seed + 1),
            uniform(c_out, -1.0, 1.0, seed + 2),
            uniform(p.y_len(), -1.0, 1.0, seed + 3),
        );
        let t = |shape: &[usize], v: &[f32]| Tensor::from_vec(shape, v.to_vec(), &dev).unwrap();
        let (x, filters, b, gy) = (
            t(&[n, c_in, h, w], &xv),
            t(&[c_out, c_in, r, r], &wv),
            t(&[c_out], &bv),
            t(&[n, c_out, p.oh as usize, p.ow as usize], &gyv),
        );
        let exact = [
            to_f32(&conv_fwd_exact(&xv, &wv, &bv, &p, false)),
            to_f32(&conv_input_grad_exact(&wv, &gyv, &p)),
            to_f32(&conv_weight_grad_exact(&xv, &gyv, &p)),
        ];
        let ks = [c_in * r * r, c_out * r * r, n * p.ohw()];
        for math in [GemmMath::Tf32x3, GemmMath::Tf32, GemmMath::Bf16] {
            for algo in [ConvAlgo::ImplicitGemm, ConvAlgo::Winograd { tile: None }] {
                let conv = Conv2d::new(1, pad).algo(algo).gemm(GemmOpts::math(math));
                let y = conv2d_fwd(&x, &filters, &b, &conv).unwrap();
                let (gx, gw, _) = conv2d_bwd(&x, &filters, &gy, &conv, true).unwrap();
                let got = [y.to_vec().unwrap(), gx.unwrap().to_vec().unwrap(), gw.to_vec().unwrap()];
                for j in 0..3 {
                    let what = format!(
                        "{} of x {:?}, {r}x{r}, {algo}, {math} GEMMs, on {}",
                        ["y", "gx", "gw"][j],
                        [n, c_in, h, w],
                        dev.label()
                    );
                    let largest = exact[j].iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    let tol = match (math, algo) {
                        (GemmMath::Tf32, _) => 1e-2 * largest,
                        (GemmMath::Bf16, ConvAlgo::ImplicitGemm) => 1e-2 * largest,
                        (GemmMath::Bf16, _) => 0.15 * largest,
                        (_, ConvAlgo::ImplicitGemm) => fp32_atol(ks[j]) as f32,
                        _ => wino_atol(ks[j]),
                    };
                    assert_close(&what, &exact[j], &got[j], tol, 0.0);
                }
            }
        }
    }
}

emulated_and_cuda!(conv2d_tensor_core_math_matches_direct_sums, conv_math_body);
