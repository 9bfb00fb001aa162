//! conv2d: the CPU reference against finite differences, CUDA against the CPU reference (the five
//! AlexNet layers at batch 128 and awkward shapes), the recorded op, and shape errors.
mod common;
use common::*;
use ptxgrad::ops::conv2d::{
    conv2d, conv2d_bwd, conv2d_bwd_bias_cpu, conv2d_bwd_input_cpu, conv2d_bwd_weight_cpu, conv2d_bwd_with, conv2d_fwd,
    conv2d_fwd_cpu, conv2d_fwd_with, conv2d_out_size, conv2d_with, plan, Conv2dParams, ConvAlgo,
};
use ptxgrad::ops::gemm_math::GemmMath;
use ptxgrad::ops::gemm_plan::{gemm_launch, Tile};
use ptxgrad::ops::relu::relu_bwd_cpu;
use ptxgrad::ops::winograd::{weight_grad_splits, Pass};
use ptxgrad::{Device, Tape, Tensor};

/// A convolution to test: x (n, cin, h, w), w (cout, cin, kh, kw).
#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    relu: bool,
    need_gx: bool,
}

#[allow(clippy::too_many_arguments)]
const fn case(
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
) -> Case {
    Case { n, cin, h, w, cout, kh, kw, stride, pad, relu: true, need_gx: true }
}

impl Case {
    fn params(&self) -> Conv2dParams {
        Conv2dParams::new(self.n, self.cin, self.h, self.w, self.cout, self.kh, self.kw, self.stride, self.pad)
            .expect("valid case")
    }
}

/// AlexNet (d2l, Fashion-MNIST resized to 224) at batch 128.
const ALEXNET: &[Case] = &[
    Case { need_gx: false, ..case(128, 1, 224, 224, 96, 11, 11, 4, 1) }, // conv1: no input grad
    case(128, 96, 26, 26, 256, 5, 5, 1, 2),                              // conv2
    case(128, 256, 12, 12, 384, 3, 3, 1, 1),                             // conv3
    case(128, 384, 12, 12, 384, 3, 3, 1, 1),                             // conv4
    case(128, 384, 12, 12, 256, 3, 3, 1, 1),                             // conv5
];

/// Shapes that are not multiples of the 128/64/8 tiles, small batches, strides 2 and 3 with padding.
const AWKWARD: &[Case] = &[
    Case { relu: false, ..case(1, 1, 7, 7, 5, 3, 3, 1, 0) },
    case(3, 2, 7, 7, 5, 3, 3, 2, 1),
    Case { relu: false, ..case(3, 3, 11, 9, 7, 3, 2, 3, 2) }, // non-square kernel and input
    case(1, 5, 13, 13, 65, 5, 5, 2, 2),
    case(2, 17, 9, 9, 129, 3, 3, 1, 1), // K = 153, Cout just over 128
    Case { relu: false, ..case(3, 96, 26, 26, 256, 5, 5, 1, 2) }, // conv2 at batch 3
    case(1, 1, 224, 224, 96, 11, 11, 4, 1), // conv1 at batch 1
    case(8, 96, 26, 26, 256, 5, 5, 1, 2), // conv2 at batch 8: a real (all-images) weight grad
    case(2, 3, 5, 5, 1, 5, 5, 1, 0),    // a single output pixel and channel
    case(3, 4, 8, 8, 6, 1, 1, 2, 0),    // 1x1 kernel with stride
];

/// Allowed |cuda - cpu| for a sum of `k` products of values in [-1, 1). Each fp32 addition errs by
/// up to eps/2 (eps = 1.2e-7) of the running sum, whose size is ~sqrt(k)/3, so the rounding error
/// of one long sum is a random walk of typical size ~eps*k/6 = 2e-8*k; over ~10^7 outputs the
/// extreme is ~6 sigma on each side. 5e-7*k leaves a 2x margin over both sides together, and is
/// still ~1e-3 of the typical output size sqrt(k)/3 for the longest sums, so an indexing error
/// (an O(1) wrong term) cannot hide behind it.
fn atol(k: usize) -> f32 {
    1e-5 + 5e-7 * k as f32
}

fn slice_images(v: &[f32], per: usize, imgs: &[usize]) -> Vec<f32> {
    imgs.iter().flat_map(|&i| v[i * per..][..per].iter().copied()).collect()
}

/// Runs forward and backward of `c` on `dev` and compares with the CPU reference on `imgs`
/// (forward and input grad are per image). The weight and bias grads sum over the batch: gy is
/// random on `imgs` and zero on every other image, so that their reference needs only `imgs`
/// while the device still sums over the whole batch.
fn check(dev: &Device, c: &Case, imgs: &[usize], seed: u64) {
    check_with(dev, c, imgs, seed, ConvAlgo::ImplicitGemm)
}

/// `check` with the algorithm `algo`. Winograd results are held to `wino_atol`: its transforms
/// round more than a direct sum does.
fn check_with(dev: &Device, c: &Case, imgs: &[usize], seed: u64, algo: ConvAlgo) {
    let p = c.params();
    let atol = |k| if algo.winograd_tile(&p).is_some() { wino_atol(k) } else { atol(k) };
    let (x_img, y_img) = (c.cin * c.h * c.w, c.cout * p.ohw());
    let xv = uniform(p.x_len(), -1.0, 1.0, seed);
    let wv = uniform(p.w_len(), -1.0, 1.0, seed + 1);
    let bv = uniform(c.cout, -1.0, 1.0, seed + 2);
    let mut gyv = vec![0.0f32; p.y_len()];
    for &i in imgs {
        gyv[i * y_img..][..y_img].copy_from_slice(&uniform(y_img, -1.0, 1.0, seed + 3 + i as u64));
    }
    let t = |shape: &[usize], v: &[f32]| Tensor::from_vec(shape, v.to_vec(), dev).unwrap();
    let x = t(&[c.n, c.cin, c.h, c.w], &xv);
    let w = t(&[c.cout, c.cin, c.kh, c.kw], &wv);
    let b = t(&[c.cout], &bv);
    let y = conv2d_fwd_with(&x, &w, &b, c.stride, c.pad, c.relu, algo).unwrap();
    assert_eq!(y.shape(), &[c.n, c.cout, p.oh as usize, p.ow as usize]);
    let gy = t(y.shape(), &gyv);
    let (gx, gw, gb) = conv2d_bwd_with(&x, &w, &gy, c.stride, c.pad, c.need_gx, algo).unwrap();
    assert_eq!(gx.is_some(), c.need_gx);

    let ps = p.with_batch(imgs.len());
    let xs = slice_images(&xv, x_img, imgs);
    let gys = slice_images(&gyv, y_img, imgs);
    let what = |s: &str| format!("{s} {c:?} ({algo}) on {}", dev.label());
    let k = p.k();
    let y_ref = conv2d_fwd_cpu(&xs, &wv, &bv, &ps, c.relu);
    // Forward: a sum of Cin*KH*KW products (+ bias).
    assert_close(&what("y"), &y_ref, &slice_images(&y.to_vec().unwrap(), y_img, imgs), atol(k), 1e-5);
    if let Some(gx) = gx {
        let gx_ref = conv2d_bwd_input_cpu(&wv, &gys, &ps);
        // Input grad: at most Cout*KH*KW products per element.
        let kx = c.cout * c.kh * c.kw;
        assert_close(&what("gx"), &gx_ref, &slice_images(&gx.to_vec().unwrap(), x_img, imgs), atol(kx), 1e-5);
    }
    // Weight grad: the device sums all N*OH*OW terms (the zero ones included).
    let kw = c.n * p.ohw();
    assert_close(&what("gw"), &conv2d_bwd_weight_cpu(&xs, &gys, &ps), &gw.to_vec().unwrap(), atol(kw), 1e-5);
    assert_close(&what("gb"), &conv2d_bwd_bias_cpu(&gys, &ps), &gb.to_vec().unwrap(), atol(kw), 1e-5);
}

/// The images compared against the CPU: all of a small batch, the first and last of a big one.
fn images(n: usize) -> Vec<usize> {
    if n <= 8 {
        (0..n).collect()
    } else {
        vec![0, n - 1]
    }
}

test_device!(conv2d_awkward_shapes_match_cpu, |dev| {
    for (i, c) in AWKWARD.iter().enumerate() {
        let p = c.params();
        if !dev.is_cuda() && p.y_len() * p.k() > 50_000_000 {
            continue; // CPU against itself: only worth it where it is cheap
        }
        check(&dev, c, &images(c.n), 10 * i as u64);
        check(&dev, &Case { relu: !c.relu, need_gx: false, ..*c }, &images(c.n), 10 * i as u64 + 5);
    }
});

#[test]
fn conv2d_cuda_alexnet_layers_match_cpu() {
    let Some(dev) = gpu_or_skip("conv2d_cuda_alexnet_layers_match_cpu") else { return };
    for (i, c) in ALEXNET.iter().enumerate() {
        check(&dev, c, &images(c.n), 1000 + 10 * i as u64);
    }
}

/// Stride-1 shapes for Winograd: partial edge tiles, channels just over a GEMM tile, conv2 at
/// small batches, padding 0 and r - 1.
const WINOGRAD_AWKWARD: &[Case] = &[
    Case { relu: false, ..case(1, 1, 7, 7, 5, 3, 3, 1, 0) },
    case(2, 17, 9, 9, 129, 3, 3, 1, 1),
    case(3, 5, 11, 13, 7, 3, 3, 1, 2),
    Case { relu: false, ..case(3, 96, 26, 26, 256, 5, 5, 1, 2) },
    case(2, 3, 9, 8, 4, 5, 5, 1, 4),
    case(2, 130, 12, 12, 65, 3, 3, 1, 1),
];

/// The Winograd algorithms worth checking for an r x r kernel: the default and the largest and
/// smallest tiles the kernels are built for (alpha = 4 and 8).
fn winograd_algos(r: usize) -> Vec<ConvAlgo> {
    let mut algos = vec![ConvAlgo::Winograd { tile: None }];
    algos.extend(
        [2, 9 - r].into_iter().filter(|&m| m >= 1 && m + r - 1 != 6).map(|m| ConvAlgo::Winograd { tile: Some(m) }),
    );
    algos
}

test_device!(conv2d_winograd_awkward_shapes_match_cpu, |dev| {
    for (i, c) in WINOGRAD_AWKWARD.iter().enumerate() {
        for (j, algo) in winograd_algos(c.kh).into_iter().enumerate() {
            assert!(algo.winograd_tile(&c.params()).is_some(), "{c:?} runs {algo}");
            check_with(&dev, c, &images(c.n), 2000 + 10 * i as u64 + j as u64, algo);
        }
    }
});

/// AlexNet's conv2-5 at batch 128 with Winograd (conv1's stride 4 keeps the implicit GEMM).
#[test]
fn conv2d_cuda_winograd_alexnet_layers_match_cpu() {
    let Some(dev) = gpu_or_skip("conv2d_cuda_winograd_alexnet_layers_match_cpu") else { return };
    for (i, c) in ALEXNET.iter().enumerate().skip(1) {
        for algo in winograd_algos(c.kh) {
            check_with(&dev, c, &images(c.n), 3000 + 10 * i as u64, algo);
        }
    }
}

/// conv1's weight grad with a random gy on every image: the 373,248-term reduction (split over
/// blocks on the GPU) against the full CPU reference.
#[test]
fn conv2d_cuda_conv1_full_batch_weight_grad() {
    let Some(dev) = gpu_or_skip("conv2d_cuda_conv1_full_batch_weight_grad") else { return };
    let c = ALEXNET[0];
    let p = c.params();
    let xv = uniform(p.x_len(), -1.0, 1.0, 7);
    let gyv = uniform(p.y_len(), -1.0, 1.0, 8);
    let x = Tensor::from_vec(&[c.n, c.cin, c.h, c.w], xv.clone(), &dev).unwrap();
    let w = rand_tensor(&[c.cout, c.cin, c.kh, c.kw], 9, &dev);
    let gy = Tensor::from_vec(&[c.n, c.cout, p.oh as usize, p.ow as usize], gyv.clone(), &dev).unwrap();
    let (gx, gw, gb) = conv2d_bwd(&x, &w, &gy, c.stride, c.pad, false).unwrap();
    assert!(gx.is_none());
    let k = c.n * p.ohw();
    // K = 373,248 terms per element: see atol().
    assert_close("conv1 gw", &conv2d_bwd_weight_cpu(&xv, &gyv, &p), &gw.to_vec().unwrap(), atol(k), 1e-5);
    assert_close("conv1 gb", &conv2d_bwd_bias_cpu(&gyv, &p), &gb.to_vec().unwrap(), atol(k), 1e-5);
}

// ---- finite differences ----

/// Direct (no im2col) convolution in f64.
fn conv_f64(x: &[f64], w: &[f64], b: &[f64], p: &Conv2dParams) -> Vec<f64> {
    let u = |v: u32| v as usize;
    let (n, ci, h, wd, co, kh, kw, s, pad, oh, ow) =
        (u(p.n), u(p.c_in), u(p.h), u(p.w), u(p.c_out), u(p.kh), u(p.kw), u(p.stride), u(p.pad), u(p.oh), u(p.ow));
    let mut y = vec![0.0; n * co * oh * ow];
    for img in 0..n {
        for o in 0..co {
            for yy in 0..oh {
                for xx in 0..ow {
                    let mut acc = b[o];
                    for c in 0..ci {
                        for dy in 0..kh {
                            for dx in 0..kw {
                                let (ih, iw) =
                                    ((yy * s + dy) as isize - pad as isize, (xx * s + dx) as isize - pad as isize);
                                if ih >= 0 && iw >= 0 && (ih as usize) < h && (iw as usize) < wd {
                                    acc += x[((img * ci + c) * h + ih as usize) * wd + iw as usize]
                                        * w[((o * ci + c) * kh + dy) * kw + dx];
                                }
                            }
                        }
                    }
                    y[((img * co + o) * oh + yy) * ow + xx] = acc;
                }
            }
        }
    }
    y
}

#[test]
fn conv2d_cpu_backward_matches_finite_differences() {
    let cases = [
        case(2, 3, 7, 6, 4, 3, 2, 2, 1), // stride 2 with padding, non-square kernel and input
        case(1, 2, 5, 5, 3, 3, 3, 1, 0),
        case(2, 2, 9, 8, 2, 4, 4, 3, 2), // stride 3, padding 2
    ];
    for (i, c) in cases.iter().enumerate() {
        let p = c.params();
        let seed = 50 + 10 * i as u64;
        let (x, w, b) = (
            uniform(p.x_len(), -1.0, 1.0, seed),
            uniform(p.w_len(), -1.0, 1.0, seed + 1),
            uniform(c.cout, -1.0, 1.0, seed + 2),
        );
        // L = sum(y * r): dL/dy = r.
        let r = uniform(p.y_len(), -1.0, 1.0, seed + 3);
        let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
        let (x64, w64, b64, r64) = (f64s(&x), f64s(&w), f64s(&b), f64s(&r));
        let loss = |y: Vec<f64>| y.iter().zip(&r64).map(|(a, b)| a * b).sum::<f64>();
        let to32 = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect::<Vec<f32>>();
        let ngx = to32(numeric_grad(&x64, 1e-3, |x| loss(conv_f64(x, &w64, &b64, &p))));
        let ngw = to32(numeric_grad(&w64, 1e-3, |w| loss(conv_f64(&x64, w, &b64, &p))));
        let ngb = to32(numeric_grad(&b64, 1e-3, |b| loss(conv_f64(&x64, &w64, b, &p))));
        // L is linear in each of x, w and b, so central differences are exact up to f64 rounding
        // (~1e-13 here); the analytic side sums at most a few dozen f32 products of size <= 1,
        // erring by < 1e-5.
        assert_close("gx vs finite differences", &ngx, &conv2d_bwd_input_cpu(&w, &r, &p), 1e-4, 1e-5);
        assert_close("gw vs finite differences", &ngw, &conv2d_bwd_weight_cpu(&x, &r, &p), 1e-4, 1e-5);
        assert_close("gb vs finite differences", &ngb, &conv2d_bwd_bias_cpu(&r, &p), 1e-4, 1e-5);
        // And the f32 forward against the f64 one (sums of <= 48 products: 1e-5).
        let y32 = conv2d_fwd_cpu(&x, &w, &b, &p, false);
        assert_close("forward vs f64", &to32(conv_f64(&x64, &w64, &b64, &p)), &y32, 1e-5, 1e-5);
    }
}

// ---- the recorded op ----

test_device!(conv2d_recorded_op_applies_relu_mask_and_skips_unneeded_grads, |dev| {
    let c = case(2, 3, 9, 9, 4, 3, 3, 2, 1);
    let p = c.params();
    let x = rand_tensor(&[c.n, c.cin, c.h, c.w], 1, &dev);
    let w = rand_tensor(&[c.cout, c.cin, c.kh, c.kw], 2, &dev);
    let b = rand_tensor(&[c.cout], 3, &dev);
    let r = rand_tensor(&[c.n, c.cout, p.oh as usize, p.ow as usize], 4, &dev);
    let mut tape = Tape::train();
    tape.watch(&w);
    tape.watch(&b); // x is not watched: no gx
    let y = conv2d(&mut tape, &x, &w, &b, c.stride, c.pad, true).unwrap();
    // A stand-in loss L = sum(y * r), whose backward hands r to y.
    let grads = backward_from(tape, &y, &r);
    assert!(grads.get(&x).is_none(), "x was not watched");

    let (xv, wv, bv, rv) = (x.to_vec().unwrap(), w.to_vec().unwrap(), b.to_vec().unwrap(), r.to_vec().unwrap());
    let yv = conv2d_fwd_cpu(&xv, &wv, &bv, &p, true);
    // max is exact, the sums are of 27 products: 1e-5.
    assert_close("y", &yv, &y.to_vec().unwrap(), 1e-5, 1e-5);
    let masked = relu_bwd_cpu(&yv, &rv);
    assert_close("gw", &conv2d_bwd_weight_cpu(&xv, &masked, &p), &grads.get(&w).unwrap().to_vec().unwrap(), 1e-5, 1e-5);
    assert_close("gb", &conv2d_bwd_bias_cpu(&masked, &p), &grads.get(&b).unwrap().to_vec().unwrap(), 1e-5, 1e-5);
});

test_device!(conv2d_with_winograd_records_the_same_gradients_as_gemm, |dev| {
    // conv3's shape at batch 2: x (2, 256, 12, 12) is too much for a quick CPU run; 32 channels.
    let c = case(2, 32, 12, 12, 48, 3, 3, 1, 1);
    let p = c.params();
    let x = rand_tensor(&[c.n, c.cin, c.h, c.w], 1, &dev);
    let w = rand_tensor(&[c.cout, c.cin, c.kh, c.kw], 2, &dev);
    let b = rand_tensor(&[c.cout], 3, &dev);
    let r = rand_tensor(&[c.n, c.cout, p.oh as usize, p.ow as usize], 4, &dev);
    let run = |algo| {
        let mut tape = Tape::train();
        for t in [&x, &w, &b] {
            tape.watch(t);
        }
        let y = conv2d_with(&mut tape, &x, &w, &b, c.stride, c.pad, true, algo).unwrap();
        let grads = backward_from(tape, &y, &r);
        let get = |t: &Tensor| grads.get(t).unwrap().to_vec().unwrap();
        [y.to_vec().unwrap(), get(&x), get(&w), get(&b)]
    };
    let (gemm, wino) = (run(ConvAlgo::ImplicitGemm), run(ConvAlgo::Winograd { tile: None }));
    let ks = [p.k(), c.cout * 9, c.n * p.ohw(), c.n * p.ohw()];
    for (((name, a), bv), k) in ["y", "gx", "gw", "gb"].iter().zip(&gemm).zip(&wino).zip(ks) {
        assert_close(name, a, bv, wino_atol(k), 0.0);
    }
});

// ---- NaN and infinities ----

test_device!(conv2d_fused_relu_propagates_nan_as_pytorch, |dev| {
    // Bias NaN, +inf, -inf and finite for the four channels, and one NaN pixel in image 1: as in
    // PyTorch (conv2d then relu), NaN wherever a NaN enters the sum, relu(+inf) = +inf,
    // relu(-inf) = 0; the backward passes the gradient wherever y is NaN or positive.
    let c = case(2, 2, 5, 5, 4, 3, 3, 1, 1);
    let p = c.params();
    let (oh, ow) = (p.oh as usize, p.ow as usize);
    let mut xv = uniform(p.x_len(), -1.0, 1.0, 1);
    let (nan_y, nan_x) = (2, 2);
    xv[c.cin * c.h * c.w + nan_y * c.w + nan_x] = f32::NAN; // image 1, channel 0
    let wv = uniform(p.w_len(), -1.0, 1.0, 2);
    let bv = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.1];
    let rv = uniform(p.y_len(), -1.0, 1.0, 3);
    let t = |shape: &[usize], v: &[f32]| Tensor::from_vec(shape, v.to_vec(), &dev).unwrap();
    let (x, w, b) = (t(&[c.n, c.cin, c.h, c.w], &xv), t(&[c.cout, c.cin, 3, 3], &wv), t(&[c.cout], &bv));
    let r = t(&[c.n, c.cout, oh, ow], &rv);
    let mut tape = Tape::train();
    for v in [&x, &w, &b] {
        tape.watch(v);
    }
    let y = conv2d(&mut tape, &x, &w, &b, c.stride, c.pad, true).unwrap();
    let grads = backward_from(tape, &y, &r);
    let got = |v: &Tensor| grads.get(v).unwrap().to_vec().unwrap();

    // Forward: the pattern PyTorch gives, then the values against the CPU reference.
    let yv = y.to_vec().unwrap();
    let y_ref = conv2d_fwd_cpu(&xv, &wv, &bv, &p, true);
    for (i, &v) in yv.iter().enumerate() {
        let (n, co, pix) = (i / (c.cout * oh * ow), i / (oh * ow) % c.cout, i % (oh * ow));
        // Output (oy, ox) reads input rows oy - 1 ..= oy + 1 (pad 1, stride 1), columns alike.
        let sees_nan = n == 1 && (pix / ow).abs_diff(nan_y) <= 1 && (pix % ow).abs_diff(nan_x) <= 1;
        let ok = match co {
            _ if co == 0 || sees_nan => v.is_nan(),
            1 => v == f32::INFINITY,
            2 => v.to_bits() == 0, // +0.0
            _ => v.is_finite() && v >= 0.0,
        };
        assert!(ok, "y[{n}][{co}][{pix}] = {v}");
    }
    assert_close_nonfinite("y", &y_ref, &yv, 1e-5, 1e-5);

    // Backward: gy masked as PyTorch's relu backward does (NaN and +inf outputs pass it).
    let masked = relu_bwd_cpu(&yv, &rv);
    let per_channel = oh * ow;
    for (i, (&m, &r)) in masked.iter().zip(&rv).enumerate() {
        let want = if yv[i].is_nan() || yv[i] > 0.0 { r } else { 0.0 };
        assert_eq!(m, want, "masked gy at {i} (y {})", yv[i]);
    }
    let (gx, gw, gb) = (got(&x), got(&w), got(&b));
    // gx: finite (w and the gradient are); the NaN pixel of x does not enter it.
    assert!(gx.iter().all(|v| v.is_finite()), "gx {gx:?}");
    assert_close_nonfinite("gx", &conv2d_bwd_input_cpu(&wv, &masked, &p), &gx, 1e-5, 1e-5);
    // gw: NaN for input channel 0, which holds the NaN pixel (every filter tap reaches it from
    // an output that passes its gradient), finite for channel 1.
    for (i, &v) in gw.iter().enumerate() {
        assert_eq!(v.is_nan(), i / 9 % c.cin == 0, "gw[{i}] = {v}");
    }
    assert_close_nonfinite("gw", &conv2d_bwd_weight_cpu(&xv, &masked, &p), &gw, 1e-5, 1e-5);
    // gb: the sum of the gradient the ReLU passes: all of it for the NaN and +inf channels,
    // none for -inf (y = 0 there, except around the NaN pixel).
    let sum = |co: usize, keep: &dyn Fn(f32) -> bool| -> f32 {
        (0..c.n)
            .flat_map(|n| (0..per_channel).map(move |j| (n * c.cout + co) * per_channel + j))
            .filter(|&i| keep(yv[i]))
            .map(|i| rv[i])
            .sum()
    };
    assert_close("gb[0], gb[1]", &[sum(0, &|_| true), sum(1, &|_| true)], &gb[..2], 1e-5, 1e-5);
    assert_close("gb[2]", &[sum(2, &|v| v.is_nan())], &gb[2..3], 1e-5, 1e-5);
    assert_close_nonfinite("gb", &conv2d_bwd_bias_cpu(&masked, &p), &gb, 1e-5, 1e-5);
});

// ---- errors ----

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, &Device::Cpu).unwrap()
}

fn fwd_err(x: &[usize], w: &[usize], b: &[usize], stride: usize, pad: usize) -> String {
    conv2d_fwd(&zeros(x), &zeros(w), &zeros(b), stride, pad, false).unwrap_err().to_string()
}

#[test]
fn conv2d_out_size_matches_alexnet() {
    assert_eq!(conv2d_out_size(224, 11, 4, 1).unwrap(), 54);
    assert_eq!(conv2d_out_size(26, 5, 1, 2).unwrap(), 26);
    assert_eq!(conv2d_out_size(12, 3, 1, 1).unwrap(), 12);
    assert!(conv2d_out_size(4, 7, 1, 1).is_err());
    assert!(conv2d_out_size(4, 3, 0, 1).is_err());
}

/// The block tiles the plans pick for AlexNet at batch 128: 96 x 128 wherever M is 96 (conv1's
/// forward and weight grad, conv2's input grad, also through Winograd) and 128 x 96 where N is
/// (conv2's Winograd weight grad), where 128-wide tiles would compute a quarter of empty rows or
/// columns; elsewhere the tiles that the wave model picked before the 96-wide ones existed (128 x
/// 64 where a 128 x 128 grid's last wave is nearly empty).
#[test]
fn conv2d_plans_fit_alexnets_96_channels() {
    let tile = |name: &str| name.rsplit('_').next().unwrap_or("").to_string();
    let mut picked = Vec::new();
    for c in ALEXNET {
        let mut p = c.params();
        let fwd = tile(plan::forward(&p, None).unwrap().0);
        let gx = if c.need_gx { tile(plan::input_grad(&p, None).unwrap().0) } else { "-".into() };
        let gw = tile(plan::weight_grad(&mut p, None).0);
        picked.push([fwd, gx, gw]);
    }
    let s = |v: [&str; 3]| v.map(String::from);
    let expected = [
        s(["t96", "-", "t96"]),
        s(["t128", "t96", "t128"]),
        s(["t128", "t128x64", "t128"]),
        s(["t128", "t128", "t128"]),
        s(["t128x64", "t128", "t128"]),
    ];
    assert_eq!(picked, expected, "(forward, input grad, weight grad) tiles per layer");
    // conv2 through Winograd: the input grad's GEMMs are (Cin, tiles) = (96, .), the weight
    // grad's (Cout, Cin) = (256, 96).
    let p = ALEXNET[1].params();
    for m in [2, 3] {
        let (name, _) = Pass::input_grad(&p, m).unwrap().gemm_launch(None).unwrap();
        assert_eq!(tile(name), "t96", "conv2's Winograd F({m}x{m}, 5x5) input grad");
        let (name, _) = Pass::weight_grad(&p, m, weight_grad_splits(&p, m)).unwrap().gemm_launch(None).unwrap();
        assert_eq!(tile(name), "t128x96", "conv2's Winograd F({m}x{m}, 5x5) weight grad");
    }
    // tests/gemm_math.rs's dense shapes for the 96-wide tiles: y (96, 33792) and (33792, 96).
    assert_eq!(gemm_launch(96, 33792, 1, None).unwrap().1, Tile::T96);
    assert_eq!(gemm_launch(33792, 96, 1, None).unwrap().1, Tile::T128x96);
    // Without them (for timing what they change), the tiles of before.
    let _t = Tile::without_96();
    assert_eq!(tile(plan::forward(&ALEXNET[0].params(), None).unwrap().0), "t128");
    assert_eq!(tile(plan::weight_grad(&mut ALEXNET[0].params(), None).0), "t128");
    assert_eq!(gemm_launch(33792, 96, 1, None).unwrap().1, Tile::T128);
}

#[test]
fn conv2d_rejects_bad_shapes() {
    let e = fwd_err(&[2, 1, 224, 224], &[96, 3, 11, 11], &[96], 4, 1);
    assert!(e.contains("(Cout, 1, KH, KW)") && e.contains("1 channels") && e.contains("[96, 3, 11, 11]"), "{e}");
    let e = fwd_err(&[1, 224, 224], &[96, 1, 11, 11], &[96], 4, 1);
    assert!(e.contains("4-D") && e.contains("[1, 224, 224]"), "{e}");
    let e = fwd_err(&[1, 1, 8, 8], &[4, 1, 3], &[4], 1, 0);
    assert!(e.contains("[4, 1, 3]"), "{e}");
    let e = fwd_err(&[1, 1, 8, 8], &[4, 1, 3, 3], &[5], 1, 0);
    assert!(e.contains("b of shape [4]") && e.contains("[5]"), "{e}");
    let e = fwd_err(&[1, 1, 4, 4], &[4, 1, 7, 7], &[4], 1, 1);
    assert!(e.contains("kernel size 7"), "{e}");
    let e = fwd_err(&[1, 1, 8, 8], &[4, 1, 3, 3], &[4], 0, 0);
    assert!(e.contains("stride"), "{e}");
    let e = fwd_err(&[0, 1, 8, 8], &[4, 1, 3, 3], &[4], 1, 0);
    assert!(e.contains("non-zero"), "{e}");
    let e = conv2d_bwd(&zeros(&[2, 1, 8, 8]), &zeros(&[4, 1, 3, 3]), &zeros(&[2, 4, 5, 5]), 1, 0, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gy of shape [2, 4, 6, 6]") && e.contains("[2, 4, 5, 5]"), "{e}");
}

/// Times the AlexNet layers on the GPU: `cargo test --test conv2d -- --ignored --nocapture`.
#[test]
#[ignore]
fn conv2d_cuda_alexnet_timing() {
    let Some(dev) = gpu_or_skip("conv2d_cuda_alexnet_timing") else { return };
    // gemm; Winograd with alpha 6 (F(4,3), F(2,5)), 4 (F(2,3); F(2,5) again), 8 (F(4,5); F(6,3)).
    let algos = [None, Some(None), Some(Some(2)), Some(Some(4)), Some(Some(6))]
        .map(|w| w.map_or(ConvAlgo::ImplicitGemm, |tile| ConvAlgo::Winograd { tile }));
    for (i, algo) in algos.into_iter().enumerate() {
        println!("{algo}:");
        time_alexnet_convs(&dev, algo);
        if i == 1 {
            // What the 96-wide tiles change (conv1, conv2): gemm and Winograd without them.
            let _t = Tile::without_96();
            for algo in &algos[..2] {
                println!("{algo} (no 96-wide tiles):");
                time_alexnet_convs(&dev, *algo);
            }
        }
    }
    // The tensor-core GEMMs (ops::gemm_math), fp32-accurate 3xtf32, with gemm and Winograd.
    let _m = GemmMath::Tf32x3.scope();
    for algo in [ConvAlgo::ImplicitGemm, ConvAlgo::Winograd { tile: None }] {
        println!("{algo} (3xtf32):");
        time_alexnet_convs(&dev, algo);
    }
}

fn time_alexnet_convs(dev: &Device, algo: ConvAlgo) {
    let time = |f: &dyn Fn()| time_on(dev, f);
    let mut total = 0.0;
    for (i, c) in ALEXNET.iter().enumerate() {
        let p = c.params();
        let x = rand_tensor(&[c.n, c.cin, c.h, c.w], 1, dev);
        let w = rand_tensor(&[c.cout, c.cin, c.kh, c.kw], 2, dev);
        let b = rand_tensor(&[c.cout], 3, dev);
        let gy = rand_tensor(&[c.n, c.cout, p.oh as usize, p.ow as usize], 4, dev);
        let gflop = 2.0 * (p.y_len() * p.k()) as f64 / 1e9;
        // TFLOP/s count the direct method's operations (Winograd's "effective" rate).
        let tf = time(&|| drop(conv2d_fwd_with(&x, &w, &b, c.stride, c.pad, true, algo).unwrap()));
        let tw = time(&|| drop(conv2d_bwd_with(&x, &w, &gy, c.stride, c.pad, false, algo).unwrap()));
        let bwd_x = || drop(conv2d_bwd_with(&x, &w, &gy, c.stride, c.pad, true, algo).unwrap());
        let tx = if c.need_gx { time(&bwd_x) - tw } else { 0.0 };
        total += tf + tw + tx;
        println!(
            "conv{}: fwd {:.3} ms ({:.1} TFLOP/s), gw+gb {:.3} ms ({:.1}), gx {:.3} ms ({:.1})",
            i + 1,
            tf * 1e3,
            gflop / tf / 1e3,
            tw * 1e3,
            gflop / tw / 1e3,
            tx * 1e3,
            if tx > 0.0 { gflop / tx / 1e3 } else { 0.0 }
        );
    }
    println!("conv total (fwd + bwd, batch 128): {:.3} ms", total * 1e3);
}

// ---- the CUDA kernels, emulated on the CPU (ptxgrad-emu) ----

extern "C" {
    fn conv2d_ktable_u32(tab: *mut u32, p: Conv2dParams, input_grad: u32);
    fn conv2d_wperm_f32(w: *const f32, wt: *mut f32, p: Conv2dParams, input_grad: u32);
    fn conv2d_fwd_f32_t128(x: *const f32, w: *const f32, b: *const f32, y: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_fwd_f32_t128x64(
        x: *const f32,
        w: *const f32,
        b: *const f32,
        y: *mut f32,
        tab: *const u32,
        p: Conv2dParams,
    );
    fn conv2d_fwd_f32_t64(x: *const f32, w: *const f32, b: *const f32, y: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_fwd_f32_t96(x: *const f32, w: *const f32, b: *const f32, y: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_fwd_f32_t128x96(
        x: *const f32,
        w: *const f32,
        b: *const f32,
        y: *mut f32,
        tab: *const u32,
        p: Conv2dParams,
    );
    fn conv2d_bwd_input_f32_t128(w: *const f32, gy: *const f32, gx: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_bwd_input_f32_t128x64(w: *const f32, gy: *const f32, gx: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_bwd_input_f32_t64(w: *const f32, gy: *const f32, gx: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_bwd_input_f32_t96(w: *const f32, gy: *const f32, gx: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_bwd_input_f32_t128x96(w: *const f32, gy: *const f32, gx: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_bwd_input_f32_t64_strided(w: *const f32, gy: *const f32, gx: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_bwd_weight_f32_t128(x: *const f32, gy: *const f32, ws: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_bwd_weight_f32_t128x64(x: *const f32, gy: *const f32, ws: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_bwd_weight_f32_t64(x: *const f32, gy: *const f32, ws: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_bwd_weight_f32_t96(x: *const f32, gy: *const f32, ws: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_bwd_weight_f32_t128x96(x: *const f32, gy: *const f32, ws: *mut f32, tab: *const u32, p: Conv2dParams);
    fn conv2d_splitk_sum_f32(ws: *const f32, out: *mut f32, len: u32, splits: u32);
    fn conv2d_bwd_bias_f32(gy: *const f32, part: *mut f32, p: Conv2dParams);
}

type ConvFwd = unsafe extern "C" fn(*const f32, *const f32, *const f32, *mut f32, *const u32, Conv2dParams);
type ConvBwd = unsafe extern "C" fn(*const f32, *const f32, *mut f32, *const u32, Conv2dParams);

fn fwd_fn(name: &str) -> ConvFwd {
    emu_kernel!(
        name,
        conv2d_fwd_f32_t128,
        conv2d_fwd_f32_t128x64,
        conv2d_fwd_f32_t64,
        conv2d_fwd_f32_t96,
        conv2d_fwd_f32_t128x96,
    )
}

fn bwd_fn(name: &str) -> ConvBwd {
    emu_kernel!(
        name,
        conv2d_bwd_input_f32_t128,
        conv2d_bwd_input_f32_t128x64,
        conv2d_bwd_input_f32_t64,
        conv2d_bwd_input_f32_t96,
        conv2d_bwd_input_f32_t128x96,
        conv2d_bwd_input_f32_t64_strided,
        conv2d_bwd_weight_f32_t128,
        conv2d_bwd_weight_f32_t128x64,
        conv2d_bwd_weight_f32_t64,
        conv2d_bwd_weight_f32_t96,
        conv2d_bwd_weight_f32_t128x96,
    )
}

/// conv2d_ktable_u32 on the emulator.
fn ktable_emu(p: &Conv2dParams, input_grad: bool) -> Vec<u32> {
    let (cfg, words) = plan::ktable(p, input_grad);
    let mut tab = vec![u32::MAX; words];
    let (t, p) = (tab.as_mut_ptr() as usize, *p);
    emu_launch(cfg, &|| unsafe { conv2d_ktable_u32(t as *mut u32, p, input_grad as u32) });
    tab
}

/// conv2d_wperm_f32 on the emulator: the filters as the forward's or input grad's A operand.
fn wperm_emu(w: &[f32], p: &Conv2dParams, input_grad: bool) -> Vec<f32> {
    let mut wt = emu_uninit(w.len());
    let (pw, pt, p) = (w.as_ptr() as usize, wt.as_mut_ptr() as usize, *p);
    emu_launch(plan::wperm(&p), &|| unsafe {
        conv2d_wperm_f32(pw as *const f32, pt as *mut f32, p, input_grad as u32)
    });
    wt
}

/// Adds up `splits` partials of `len` (conv2d_splitk_sum_f32), or returns the one partial.
fn splitk_emu(ws: Vec<f32>, len: usize, splits: usize) -> Vec<f32> {
    if splits == 1 {
        return ws;
    }
    let mut out = emu_uninit(len);
    let (w, o) = (ws.as_ptr() as usize, out.as_mut_ptr() as usize);
    emu_launch(plan::splitk_sum(len), &|| unsafe {
        conv2d_splitk_sum_f32(w as *const f32, o as *mut f32, len as u32, splits as u32)
    });
    out
}

/// Every implicit-GEMM conv kernel through the launches conv2d.rs makes (plan::*), each GEMM in
/// all three block tiles, the weight grad also split many ways, on small awkward shapes (stride
/// 1, 2 and 3, padding, non-square, channels across a 64-row tile), against the CPU reference.
/// The forward and input grad read the permuted filters with 16-byte copies exactly when their M
/// (Cout, Cin) is a multiple of 4: the emulator's copy counter checks which path ran.
#[test]
fn conv2d_kernels_emulated_match_cpu() {
    let cases = [
        case(2, 5, 7, 9, 6, 3, 3, 1, 1),
        case(3, 2, 7, 7, 5, 3, 3, 2, 1),
        Case { relu: false, ..case(2, 3, 11, 9, 7, 3, 2, 3, 2) },
        case(1, 70, 6, 6, 66, 3, 3, 1, 1),
        case(2, 4, 9, 9, 3, 5, 5, 1, 2),
        case(2, 8, 7, 7, 12, 3, 3, 1, 1),
        case(1, 4, 6, 6, 132, 3, 3, 2, 1),
    ];
    for (i, c) in cases.iter().enumerate() {
        let mut p = c.params();
        p.relu = c.relu as u32;
        let seed = 4000 + 10 * i as u64;
        let (x, w) = (uniform(p.x_len(), -1.0, 1.0, seed), uniform(p.w_len(), -1.0, 1.0, seed + 1));
        let (b, gy) = (uniform(c.cout, -1.0, 1.0, seed + 2), uniform(p.y_len(), -1.0, 1.0, seed + 3));
        let (wt_f, wt_i) = (wperm_emu(&w, &p, false), wperm_emu(&w, &p, true));
        let (px, pb, pgy) = (x.as_ptr() as usize, b.as_ptr() as usize, gy.as_ptr() as usize);
        let (pwf, pwi) = (wt_f.as_ptr() as usize, wt_i.as_ptr() as usize);
        // 16-byte loads of A where its rows (Cout for the forward, Cin for the input grad) allow.
        let vec_taken = |before: u64| ptxgrad_emu::vec4_copies() > before;
        let (tab_f, tab_i) = (ktable_emu(&p, false), ktable_emu(&p, true));
        let (tf, ti) = (tab_f.as_ptr() as usize, tab_i.as_ptr() as usize);
        for tile in Tile::ALL {
            let what = |s: &str| format!("{s} {c:?}, {tile:?} (emulated)");
            let (name, cfg) = plan::forward(&p, Some(tile)).unwrap();
            let (f, mut y) = (fwd_fn(name), emu_uninit(p.y_len()));
            let py = y.as_mut_ptr() as usize;
            let (before, stores) = (ptxgrad_emu::vec4_copies(), ptxgrad_emu::vec_stores());
            emu_launch(cfg, &|| unsafe {
                f(px as *const f32, pwf as *const f32, pb as *const f32, py as *mut f32, tf as *const u32, p)
            });
            assert_close(&what("y"), &conv2d_fwd_cpu(&x, &w, &b, &p, c.relu), &y, atol(p.k()), 1e-5);
            assert_eq!(vec_taken(before), c.cout % 4 == 0 && pwf % 16 == 0, "{}", what("16-byte loads, y"));
            // y's pixels in paired stores where each image's OH*OW are whole groups of 4.
            let paired = ptxgrad_emu::vec_stores() > stores;
            assert_eq!(paired, p.ohw().is_multiple_of(4) && py.is_multiple_of(16), "{}", what("paired stores, y"));

            let (name, cfg) = plan::input_grad(&p, Some(tile)).unwrap();
            let (f, mut gx) = (bwd_fn(name), emu_uninit(p.x_len()));
            let pgx = gx.as_mut_ptr() as usize;
            let (before, stores) = (ptxgrad_emu::vec4_copies(), ptxgrad_emu::vec_stores());
            emu_launch(cfg, &|| unsafe {
                f(pwi as *const f32, pgy as *const f32, pgx as *mut f32, ti as *const u32, p)
            });
            assert_close(&what("gx"), &conv2d_bwd_input_cpu(&w, &gy, &p), &gx, atol(c.cout * c.kh * c.kw), 1e-5);
            assert_eq!(vec_taken(before), c.cin % 4 == 0 && pwi % 16 == 0, "{}", what("16-byte loads, gx"));
            // The FFMA input grad stores element by element (gemm.cuh's vec_unless_ffma).
            assert_eq!(ptxgrad_emu::vec_stores(), stores, "{}", what("paired stores, gx"));
        }
        // The weight grad as planned, then split into chunks of 8 and 24 terms; on every tile.
        let gw_ref = conv2d_bwd_weight_cpu(&x, &gy, &p);
        let runs = [None, Some(8), Some(24)].map(|chunk| (chunk, None)).into_iter();
        for (chunk, tile) in runs.chain(Tile::ALL.map(|t| (None, Some(t)))) {
            let mut pp = p;
            let (name, mut cfg, mut splits) = plan::weight_grad(&mut pp, tile);
            if let Some(k) = chunk {
                pp.k_chunk = k;
                splits = (c.n * p.ohw()).div_ceil(k as usize);
                cfg.grid_dim.2 = splits as u32;
            }
            let (f, mut ws) = (bwd_fn(name), emu_uninit(splits * p.w_len()));
            let pws = ws.as_mut_ptr() as usize;
            emu_launch(cfg, &|| unsafe {
                f(px as *const f32, pgy as *const f32, pws as *mut f32, tf as *const u32, pp)
            });
            let gw = splitk_emu(ws, p.w_len(), splits);
            let what = format!("gw {c:?}, {splits} splits, {name} (emulated)");
            assert_close(&what, &gw_ref, &gw, atol(c.n * p.ohw()), 1e-5);
        }
        let (cfg, splits) = plan::bias_grad(&p);
        let mut part = emu_uninit(splits * c.cout);
        let pp = part.as_mut_ptr() as usize;
        emu_launch(cfg, &|| unsafe { conv2d_bwd_bias_f32(pgy as *const f32, pp as *mut f32, p) });
        let gb = splitk_emu(part, c.cout, splits);
        assert_close(&format!("gb {c:?} (emulated)"), &conv2d_bwd_bias_cpu(&gy, &p), &gb, atol(c.n * p.ohw()), 1e-5);
    }
}
