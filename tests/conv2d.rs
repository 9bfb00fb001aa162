//! conv2d on every device against the direct sums (tests/common/kernels.rs: the textbook loops
//! in f64): awkward shapes, and AlexNet's five layers at batch 128 on a GPU, with the implicit
//! GEMM and with Winograd; the CPU reference's backward against finite differences; the
//! recorded op; NaN and infinities; the tiles the plans pick; shape errors; and every kernel of
//! the implicit GEMM launched one at a time on the emulator, by name, with the launches the
//! engine makes.
mod common;
use common::kernels::*;
use common::*;
use ptxgrad::device::{DeviceBuf, EMU_SMS};
use ptxgrad::ops::conv2d::implicit_gemm::plan;
use ptxgrad::ops::conv2d::winograd::{weight_grad_splits, Pass};
use ptxgrad::ops::conv2d::{
    conv2d, conv2d_bwd, conv2d_bwd_bias_cpu, conv2d_bwd_input_cpu, conv2d_bwd_weight_cpu, conv2d_fwd, conv2d_fwd_cpu,
    conv2d_out_size, Conv2d, Conv2dParams, ConvAlgo,
};
use ptxgrad::ops::gemm::math::GemmMath;
use ptxgrad::ops::gemm::plan::{Planner, Tile};
use ptxgrad::ops::gemm::GemmOpts;
use ptxgrad::ptx::Module;
use ptxgrad::{Device, Gpu, Tape, Tensor};

/// A convolution to test: x (n, c_in, h, w), w (c_out, c_in, kh, kw).
#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    relu: bool,
    need_gx: bool,
}

/// The case with the dims [n, c_in, h, w, c_out, kh, kw, stride, pad], a ReLU and an input grad.
const fn case(dims: [usize; 9]) -> Case {
    let [n, c_in, h, w, c_out, kh, kw, stride, pad] = dims;
    Case { n, c_in, h, w, c_out, kh, kw, stride, pad, relu: true, need_gx: true }
}

impl Case {
    fn params(&self) -> Conv2dParams {
        Conv2dParams::new(self.n, self.c_in, self.h, self.w, self.c_out, self.kh, self.kw, self.stride, self.pad)
            .expect("valid case")
    }

    fn x_shape(&self) -> [usize; 4] {
        [self.n, self.c_in, self.h, self.w]
    }

    fn w_shape(&self) -> [usize; 4] {
        [self.c_out, self.c_in, self.kh, self.kw]
    }

    fn y_shape(&self) -> [usize; 4] {
        let p = self.params();
        [self.n, self.c_out, p.oh as usize, p.ow as usize]
    }

    /// Elements of one image of x and of y.
    fn image_lens(&self) -> (usize, usize) {
        (self.c_in * self.h * self.w, self.c_out * self.params().ohw())
    }

    /// Seeded x, w, b and a tensor r of y's shape (the gradient a stand-in loss L = sum(y * r)
    /// hands to y), with values in [-1, 1).
    fn rand_tensors(&self, dev: &Device) -> [Tensor; 4] {
        [
            rand_tensor(&self.x_shape(), 1, dev),
            rand_tensor(&self.w_shape(), 2, dev),
            rand_tensor(&[self.c_out], 3, dev),
            rand_tensor(&self.y_shape(), 4, dev),
        ]
    }

    /// The plain convolution of this geometry (no ReLU, the implicit GEMM in fp32).
    fn conv(&self) -> Conv2d {
        Conv2d::new(self.stride, self.pad)
    }
}

/// AlexNet (d2l, Fashion-MNIST resized to 224) at batch 128.
const ALEXNET: &[Case] = &[
    Case { need_gx: false, ..case([128, 1, 224, 224, 96, 11, 11, 4, 1]) }, // conv1: no input grad
    case([128, 96, 26, 26, 256, 5, 5, 1, 2]),                              // conv2
    case([128, 256, 12, 12, 384, 3, 3, 1, 1]),                             // conv3
    case([128, 384, 12, 12, 384, 3, 3, 1, 1]),                             // conv4
    case([128, 384, 12, 12, 256, 3, 3, 1, 1]),                             // conv5
];

/// Shapes that are not multiples of the 128/64/8 tiles, small batches, strides 2 and 3 with padding.
const AWKWARD: &[Case] = &[
    Case { relu: false, ..case([1, 1, 7, 7, 5, 3, 3, 1, 0]) },
    case([3, 2, 7, 7, 5, 3, 3, 2, 1]),
    Case { relu: false, ..case([3, 3, 11, 9, 7, 3, 2, 3, 2]) }, // non-square kernel and input
    case([1, 5, 13, 13, 65, 5, 5, 2, 2]),
    case([2, 17, 9, 9, 129, 3, 3, 1, 1]), // K = 153, Cout just over 128
    Case { relu: false, ..case([3, 96, 26, 26, 256, 5, 5, 1, 2]) }, // conv2 at batch 3
    case([1, 1, 224, 224, 96, 11, 11, 4, 1]), // conv1 at batch 1
    case([8, 96, 26, 26, 256, 5, 5, 1, 2]), // conv2 at batch 8: a real (all-images) weight grad
    case([2, 3, 5, 5, 1, 5, 5, 1, 0]),    // a single output pixel and channel
    case([3, 4, 8, 8, 6, 1, 1, 2, 0]),    // 1x1 kernel with stride
];

/// Allowed |got - exact| for a sum of `k` products of values in [-1, 1) computed in fp32. Each
/// fp32 addition errs by up to eps/2 (eps = 1.2e-7) of the running sum, whose size is
/// ~sqrt(k)/3, so the rounding error of one long sum is a random walk of typical size below
/// eps*k/6 = 2e-8*k; over ~10^7 outputs the extreme is ~6 sigma, 1.2e-7*k. 5e-7*k leaves a 4x
/// margin, and is still ~1e-3 of the typical output size sqrt(k)/3 for the longest sums, so an
/// indexing error (an O(1) wrong term) cannot hide behind it.
fn atol(k: usize) -> f32 {
    1e-5 + 5e-7 * k as f32
}

fn slice_images<T: Copy>(v: &[T], per: usize, imgs: &[usize]) -> Vec<T> {
    imgs.iter().flat_map(|&i| v[i * per..][..per].iter().copied()).collect()
}

/// The images compared with the direct sums: all of a small batch, the first and last of a big one.
fn images(n: usize) -> Vec<usize> {
    if n <= 8 {
        (0..n).collect()
    } else {
        vec![0, n - 1]
    }
}

/// Seeded inputs for a case and the direct sums of its results on the images `imgs` (forward
/// and input grad are per image). The weight and bias grads sum over the batch: gy is random on
/// `imgs` and zero on every other image, so that their sums need only `imgs` while the device
/// still sums over the whole batch. One problem serves every algorithm and both ReLU settings.
struct Problem {
    c: Case,
    imgs: Vec<usize>,
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    gy: Vec<f32>,
    /// On `imgs`: y before the ReLU, and the gradients (gx only if the case needs it).
    y_exact: Vec<f64>,
    gx_exact: Option<Vec<f32>>,
    gw_exact: Vec<f32>,
    gb_exact: Vec<f32>,
}

impl Problem {
    fn new(c: &Case, imgs: &[usize], seed: u64) -> Problem {
        let p = c.params();
        let (x_img, y_img) = c.image_lens();
        let x = uniform(p.x_len(), -1.0, 1.0, seed);
        let w = uniform(p.w_len(), -1.0, 1.0, seed + 1);
        let b = uniform(c.c_out, -1.0, 1.0, seed + 2);
        let mut gy = vec![0.0f32; p.y_len()];
        for &i in imgs {
            gy[i * y_img..][..y_img].copy_from_slice(&uniform(y_img, -1.0, 1.0, seed + 3 + i as u64));
        }
        let ps = p.with_batch(imgs.len());
        let (xs, gys) = (slice_images(&x, x_img, imgs), slice_images(&gy, y_img, imgs));
        Problem {
            c: *c,
            imgs: imgs.to_vec(),
            y_exact: conv_fwd_exact(&xs, &w, &b, &ps, false),
            gx_exact: c.need_gx.then(|| to_f32(&conv_input_grad_exact(&w, &gys, &ps))),
            gw_exact: to_f32(&conv_weight_grad_exact(&xs, &gys, &ps)),
            gb_exact: to_f32(&conv_bias_grad_exact(&gys, &ps)),
            x,
            w,
            b,
            gy,
        }
    }

    /// Runs forward (with the ReLU if `relu`) and backward (gx if `need_gx`) with `algo` on
    /// `dev` and compares them with the direct sums. Winograd results are held to `wino_atol`:
    /// its transforms round more than a direct sum does.
    fn check(&self, dev: &Device, algo: ConvAlgo, relu: bool, need_gx: bool) {
        let (c, imgs) = (&self.c, &self.imgs);
        let p = c.params();
        let atol = |k| if algo.winograd_tile(&p).is_some() { wino_atol(k) } else { atol(k) };
        let (x_img, y_img) = c.image_lens();
        let t = |shape: &[usize], v: &[f32]| Tensor::from_vec(shape, v.to_vec(), dev).unwrap();
        let (x, w, b, gy) =
            (t(&c.x_shape(), &self.x), t(&c.w_shape(), &self.w), t(&[c.c_out], &self.b), t(&c.y_shape(), &self.gy));
        let conv = c.conv().relu(relu).algo(algo);
        let y = conv2d_fwd(&x, &w, &b, &conv).unwrap();
        assert_eq!(y.shape(), &c.y_shape());
        let (gx, gw, gb) = conv2d_bwd(&x, &w, &gy, &conv, need_gx).unwrap();
        assert_eq!(gx.is_some(), need_gx);

        let what = |s: &str| format!("{s} {c:?}, relu {relu} ({algo}) on {}", dev.label());
        let y_exact: Vec<f32> = self.y_exact.iter().map(|&v| if relu { relu_exact(v) } else { v } as f32).collect();
        // Forward: a sum of Cin*KH*KW products (+ bias).
        assert_close(&what("y"), &y_exact, &slice_images(&y.to_vec().unwrap(), y_img, imgs), atol(p.k()), 1e-5);
        if let Some(gx) = gx {
            let gx_exact = self.gx_exact.as_ref().expect("the case has an input grad");
            // Input grad: at most Cout*KH*KW products per element.
            let k = c.c_out * c.kh * c.kw;
            assert_close(&what("gx"), gx_exact, &slice_images(&gx.to_vec().unwrap(), x_img, imgs), atol(k), 1e-5);
        }
        // Weight and bias grad: the device sums all N*OH*OW terms (the zero ones included).
        let k = c.n * p.ohw();
        assert_close(&what("gw"), &self.gw_exact, &gw.to_vec().unwrap(), atol(k), 1e-5);
        assert_close(&what("gb"), &self.gb_exact, &gb.to_vec().unwrap(), atol(k), 1e-5);
    }
}

test_device!(conv2d_awkward_shapes_match_direct_sums, |dev| {
    for (i, c) in AWKWARD.iter().enumerate() {
        let p = c.params();
        if !dev.is_cuda() && p.y_len() * p.k() > 50_000_000 {
            // The CPU path has no tiles or plans: the large shapes add nothing the small ones
            // do not reach, and their direct sums take seconds.
            continue;
        }
        let prob = Problem::new(c, &images(c.n), 10 * i as u64);
        prob.check(&dev, ConvAlgo::ImplicitGemm, c.relu, c.need_gx);
        prob.check(&dev, ConvAlgo::ImplicitGemm, !c.relu, false);
    }
});

#[test]
fn conv2d_cuda_alexnet_layers_match_direct_sums() {
    let Some(dev) = gpu_or_skip("conv2d_cuda_alexnet_layers_match_direct_sums") else { return };
    for (i, c) in ALEXNET.iter().enumerate() {
        Problem::new(c, &images(c.n), 1000 + 10 * i as u64).check(&dev, ConvAlgo::ImplicitGemm, c.relu, c.need_gx);
    }
}

/// Stride-1 shapes for Winograd: partial edge tiles, channels just over a GEMM tile, conv2 at
/// small batches, padding 0 and r - 1.
const WINOGRAD_AWKWARD: &[Case] = &[
    Case { relu: false, ..case([1, 1, 7, 7, 5, 3, 3, 1, 0]) },
    case([2, 17, 9, 9, 129, 3, 3, 1, 1]),
    case([3, 5, 11, 13, 7, 3, 3, 1, 2]),
    Case { relu: false, ..case([3, 96, 26, 26, 256, 5, 5, 1, 2]) },
    case([2, 3, 9, 8, 4, 5, 5, 1, 4]),
    case([2, 130, 12, 12, 65, 3, 3, 1, 1]),
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

test_device!(conv2d_winograd_awkward_shapes_match_direct_sums, |dev| {
    for (i, c) in WINOGRAD_AWKWARD.iter().enumerate() {
        let prob = Problem::new(c, &images(c.n), 2000 + 10 * i as u64);
        for algo in winograd_algos(c.kh) {
            assert!(algo.winograd_tile(&c.params()).is_some(), "{c:?} runs {algo}");
            prob.check(&dev, algo, c.relu, c.need_gx);
        }
    }
});

/// AlexNet's conv2-5 at batch 128 with Winograd (conv1's stride 4 keeps the implicit GEMM).
#[test]
fn conv2d_cuda_winograd_alexnet_layers_match_direct_sums() {
    let Some(dev) = gpu_or_skip("conv2d_cuda_winograd_alexnet_layers_match_direct_sums") else { return };
    for (i, c) in ALEXNET.iter().enumerate().skip(1) {
        let prob = Problem::new(c, &images(c.n), 3000 + 10 * i as u64);
        for algo in winograd_algos(c.kh) {
            prob.check(&dev, algo, c.relu, c.need_gx);
        }
    }
}

/// conv1 with a random gy on every image: the weight grad's 373,248-term reduction (split over
/// blocks on the GPU) against the direct sums over the whole batch.
#[test]
fn conv2d_cuda_conv1_full_batch_weight_grad() {
    let Some(dev) = gpu_or_skip("conv2d_cuda_conv1_full_batch_weight_grad") else { return };
    let c = ALEXNET[0];
    let all: Vec<usize> = (0..c.n).collect();
    Problem::new(&c, &all, 7).check(&dev, ConvAlgo::ImplicitGemm, c.relu, c.need_gx);
}

// ---- finite differences ----

#[test]
fn conv2d_cpu_backward_matches_finite_differences() {
    let cases = [
        case([2, 3, 7, 6, 4, 3, 2, 2, 1]), // stride 2 with padding, non-square kernel and input
        case([1, 2, 5, 5, 3, 3, 3, 1, 0]),
        case([2, 2, 9, 8, 2, 4, 4, 3, 2]), // stride 3, padding 2
    ];
    for (i, c) in cases.iter().enumerate() {
        let p = c.params();
        let seed = 50 + 10 * i as u64;
        let (x, w, b) = (
            uniform(p.x_len(), -1.0, 1.0, seed),
            uniform(p.w_len(), -1.0, 1.0, seed + 1),
            uniform(c.c_out, -1.0, 1.0, seed + 2),
        );
        // L = sum(y * r): dL/dy = r.
        let r = uniform(p.y_len(), -1.0, 1.0, seed + 3);
        let (x64, w64, b64, r64) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&r));
        let loss = |y: Vec<f64>| y.iter().zip(&r64).map(|(a, b)| a * b).sum::<f64>();
        let ngx = to_f32(&numeric_grad(&x64, 1e-3, |x| loss(conv_fwd_exact(x, &w64, &b64, &p, false))));
        let ngw = to_f32(&numeric_grad(&w64, 1e-3, |w| loss(conv_fwd_exact(&x64, w, &b64, &p, false))));
        let ngb = to_f32(&numeric_grad(&b64, 1e-3, |b| loss(conv_fwd_exact(&x64, &w64, b, &p, false))));
        // L is linear in each of x, w and b, so central differences are exact up to f64 rounding
        // (~1e-13 here); the analytic side sums at most a few dozen f32 products of size <= 1,
        // erring by < 1e-5.
        assert_close("gx vs finite differences", &ngx, &conv2d_bwd_input_cpu(&w, &r, &p), 1e-4, 1e-5);
        assert_close("gw vs finite differences", &ngw, &conv2d_bwd_weight_cpu(&x, &r, &p), 1e-4, 1e-5);
        assert_close("gb vs finite differences", &ngb, &conv2d_bwd_bias_cpu(&r, &p), 1e-4, 1e-5);
        // And the f32 forward against the f64 one (sums of <= 48 products: 1e-5).
        let y32 = conv2d_fwd_cpu(&x, &w, &b, &p, false);
        assert_close("forward vs f64", &to_f32(&conv_fwd_exact(&x, &w, &b, &p, false)), &y32, 1e-5, 1e-5);
    }
}

// ---- the recorded op ----

test_device!(conv2d_recorded_op_applies_relu_mask_and_skips_unneeded_grads, |dev| {
    let c = case([2, 3, 9, 9, 4, 3, 3, 2, 1]);
    let p = c.params();
    let [x, w, b, r] = c.rand_tensors(&dev);
    let mut tape = Tape::train();
    tape.watch(&w);
    tape.watch(&b); // x is not watched: no gx
    let y = conv2d(&mut tape, &x, &w, &b, &c.conv().relu(true)).unwrap();
    let grads = backward_from(tape, &y, &r);
    assert!(grads.get(&x).is_none(), "x was not watched");

    let (xv, wv, bv, rv) = (x.to_vec().unwrap(), w.to_vec().unwrap(), b.to_vec().unwrap(), r.to_vec().unwrap());
    let yv = y.to_vec().unwrap();
    // max is exact, the sums are of 27 products: 1e-5.
    assert_close("y", &to_f32(&conv_fwd_exact(&xv, &wv, &bv, &p, true)), &yv, 1e-5, 1e-5);
    let masked = relu_mask_exact(&yv, &rv);
    let got = |t: &Tensor| grads.get(t).unwrap().to_vec().unwrap();
    assert_close("gw", &to_f32(&conv_weight_grad_exact(&xv, &masked, &p)), &got(&w), 1e-5, 1e-5);
    assert_close("gb", &to_f32(&conv_bias_grad_exact(&masked, &p)), &got(&b), 1e-5, 1e-5);
});

test_device!(conv2d_recorded_op_matches_direct_sums_with_either_algorithm, |dev| {
    // conv3's shape at batch 2: x (2, 256, 12, 12) is too much for a quick CPU run; 32 channels.
    let c = case([2, 32, 12, 12, 48, 3, 3, 1, 1]);
    let p = c.params();
    let [x, w, b, r] = c.rand_tensors(&dev);
    let (xv, wv, bv, rv) = (x.to_vec().unwrap(), w.to_vec().unwrap(), b.to_vec().unwrap(), r.to_vec().unwrap());
    let y_exact = to_f32(&conv_fwd_exact(&xv, &wv, &bv, &p, true));
    for (algo, atol) in
        [(ConvAlgo::ImplicitGemm, atol as fn(usize) -> f32), (ConvAlgo::Winograd { tile: None }, wino_atol)]
    {
        let mut tape = Tape::train();
        for t in [&x, &w, &b] {
            tape.watch(t);
        }
        let y = conv2d(&mut tape, &x, &w, &b, &c.conv().relu(true).algo(algo)).unwrap();
        let grads = backward_from(tape, &y, &r);
        let got = |t: &Tensor| grads.get(t).unwrap().to_vec().unwrap();
        let what = |s: &str| format!("{s} ({algo}) on {}", dev.label());
        let yv = y.to_vec().unwrap();
        assert_close(&what("y"), &y_exact, &yv, atol(p.k()), 1e-5);
        // The backward masks r with this op's own output (an element of y near 0 may fall on
        // either side of it with either algorithm).
        let masked = relu_mask_exact(&yv, &rv);
        let gx_exact = to_f32(&conv_input_grad_exact(&wv, &masked, &p));
        assert_close(&what("gx"), &gx_exact, &got(&x), atol(c.c_out * c.kh * c.kw), 1e-5);
        let k = c.n * p.ohw();
        assert_close(&what("gw"), &to_f32(&conv_weight_grad_exact(&xv, &masked, &p)), &got(&w), atol(k), 1e-5);
        assert_close(&what("gb"), &to_f32(&conv_bias_grad_exact(&masked, &p)), &got(&b), atol(k), 1e-5);
    }
});

// ---- NaN and infinities ----

test_device!(conv2d_fused_relu_propagates_nan_as_pytorch, |dev| {
    // Bias NaN, +inf, -inf and finite for the four channels, and one NaN pixel in image 1: as in
    // PyTorch (conv2d then relu), NaN wherever a NaN enters the sum, relu(+inf) = +inf,
    // relu(-inf) = 0; the backward passes the gradient wherever y is NaN or positive.
    let c = case([2, 2, 5, 5, 4, 3, 3, 1, 1]);
    let p = c.params();
    let (oh, ow) = (p.oh as usize, p.ow as usize);
    let mut xv = uniform(p.x_len(), -1.0, 1.0, 1);
    let (nan_y, nan_x) = (2, 2);
    xv[c.c_in * c.h * c.w + nan_y * c.w + nan_x] = f32::NAN; // image 1, channel 0
    let wv = uniform(p.w_len(), -1.0, 1.0, 2);
    let bv = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.1];
    let rv = uniform(p.y_len(), -1.0, 1.0, 3);
    let t = |shape: &[usize], v: &[f32]| Tensor::from_vec(shape, v.to_vec(), &dev).unwrap();
    let (x, w, b, r) = (t(&c.x_shape(), &xv), t(&c.w_shape(), &wv), t(&[c.c_out], &bv), t(&c.y_shape(), &rv));
    let mut tape = Tape::train();
    for v in [&x, &w, &b] {
        tape.watch(v);
    }
    let y = conv2d(&mut tape, &x, &w, &b, &c.conv().relu(true)).unwrap();
    let grads = backward_from(tape, &y, &r);
    let got = |v: &Tensor| grads.get(v).unwrap().to_vec().unwrap();

    // Forward: the pattern PyTorch gives, then the values against the direct sums.
    let yv = y.to_vec().unwrap();
    for (i, &v) in yv.iter().enumerate() {
        let (n, co, pix) = (i / (c.c_out * oh * ow), i / (oh * ow) % c.c_out, i % (oh * ow));
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
    assert_close_nonfinite("y", &to_f32(&conv_fwd_exact(&xv, &wv, &bv, &p, true)), &yv, 1e-5, 1e-5);

    // Backward: gy masked as PyTorch's relu backward does (NaN and +inf outputs pass it).
    let masked = relu_mask_exact(&yv, &rv);
    let (gx, gw, gb) = (got(&x), got(&w), got(&b));
    // gx: finite (w and the gradient are); the NaN pixel of x does not enter it.
    assert!(gx.iter().all(|v| v.is_finite()), "gx {gx:?}");
    assert_close_nonfinite("gx", &to_f32(&conv_input_grad_exact(&wv, &masked, &p)), &gx, 1e-5, 1e-5);
    // gw: NaN for input channel 0, which holds the NaN pixel (every filter tap reaches it from
    // an output that passes its gradient), finite for channel 1.
    for (i, &v) in gw.iter().enumerate() {
        assert_eq!(v.is_nan(), i / 9 % c.c_in == 0, "gw[{i}] = {v}");
    }
    assert_close_nonfinite("gw", &to_f32(&conv_weight_grad_exact(&xv, &masked, &p)), &gw, 1e-5, 1e-5);
    // gb: the sum of the gradient the ReLU passes: all of it for the NaN and +inf channels,
    // none for -inf (y = 0 there, except around the NaN pixel).
    let per_channel = oh * ow;
    let sum = |co: usize, keep: &dyn Fn(f32) -> bool| -> f32 {
        (0..c.n)
            .flat_map(|n| (0..per_channel).map(move |j| (n * c.c_out + co) * per_channel + j))
            .filter(|&i| keep(yv[i]))
            .map(|i| rv[i])
            .sum()
    };
    assert_close("gb[0], gb[1]", &[sum(0, &|_| true), sum(1, &|_| true)], &gb[..2], 1e-5, 1e-5);
    assert_close("gb[2]", &[sum(2, &|v| v.is_nan())], &gb[2..3], 1e-5, 1e-5);
    assert_close_nonfinite("gb", &to_f32(&conv_bias_grad_exact(&masked, &p)), &gb, 1e-5, 1e-5);
});

// ---- errors ----

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, &Device::Cpu).unwrap()
}

fn fwd_err(x: &[usize], w: &[usize], b: &[usize], stride: usize, pad: usize) -> String {
    conv2d_fwd(&zeros(x), &zeros(w), &zeros(b), &Conv2d::new(stride, pad)).unwrap_err().to_string()
}

#[test]
fn conv2d_out_size_matches_alexnet() {
    assert_eq!(conv2d_out_size(224, 11, 4, 1).unwrap(), 54);
    assert_eq!(conv2d_out_size(26, 5, 1, 2).unwrap(), 26);
    assert_eq!(conv2d_out_size(12, 3, 1, 1).unwrap(), 12);
    assert!(conv2d_out_size(4, 7, 1, 1).is_err());
    assert!(conv2d_out_size(4, 3, 0, 1).is_err());
}

/// The block tiles the plans pick for AlexNet at batch 128 on an H100/H200 (132 SMs, what the
/// emulator reports): 96 x 128 wherever M is 96 (conv1's forward and weight grad, conv2's input
/// grad, also through Winograd) and 128 x 96 where N is (conv2's Winograd weight grad), where
/// 128-wide tiles would compute a quarter of empty rows or columns; elsewhere the tiles that the
/// wave model picks among the 128-wide ones (128 x 64 where a 128 x 128 grid's last wave is
/// nearly empty). Without the 96-wide tiles (`GemmOpts::wide_96` false), the 128-wide ones.
#[test]
fn conv2d_plans_fit_alexnets_96_channels() {
    let gpu = emu_gpu();
    assert_eq!(gpu.sm_count(), EMU_SMS);
    let planner = Planner::new(&gpu, GemmOpts::default());
    let fp32 = GemmMath::Fp32;
    let tile = |name: &str| name.rsplit('_').next().unwrap_or("").to_string();
    let mut picked = Vec::new();
    for c in ALEXNET {
        let mut p = c.params();
        let fwd = tile(plan::forward(&p, &planner, fp32, None).unwrap().0);
        let gx = if c.need_gx { tile(plan::input_grad(&p, &planner, fp32, None).unwrap().0) } else { "-".into() };
        let gw = tile(plan::weight_grad(&mut p, &planner, fp32, None).0);
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
    // The arithmetic picks the kernel family, not the tile.
    let conv1 = ALEXNET[0].params();
    assert_eq!(plan::forward(&conv1, &planner, GemmMath::Tf32x3, None).unwrap().0, "conv2d_fwd_3xtf32_t96");
    // conv2 through Winograd: the input grad's GEMMs are (Cin, tiles) = (96, .), the weight
    // grad's (Cout, Cin) = (256, 96).
    let p = ALEXNET[1].params();
    for m in [2, 3] {
        let (name, _) = Pass::input_grad(&p, m).unwrap().gemm_launch(&planner, fp32, None).unwrap();
        assert_eq!(tile(name), "t96", "conv2's Winograd F({m}x{m}, 5x5) input grad");
        let splits = weight_grad_splits(&p, m, &planner);
        let (name, _) = Pass::weight_grad(&p, m, splits).unwrap().gemm_launch(&planner, fp32, None).unwrap();
        assert_eq!(tile(name), "t128x96", "conv2's Winograd F({m}x{m}, 5x5) weight grad");
    }
    // tests/gemm_math.rs's dense shapes for the 96-wide tiles: y (96, 33792) and (33792, 96).
    assert_eq!(planner.launch(96, 33792, 1, None).unwrap().1, Tile::T96);
    assert_eq!(planner.launch(33792, 96, 1, None).unwrap().1, Tile::T128x96);
    let narrow = Planner::new(&gpu, GemmOpts { wide_96: false, ..GemmOpts::default() });
    assert_eq!(tile(plan::forward(&conv1, &narrow, fp32, None).unwrap().0), "t128");
    let mut conv1_gw = conv1;
    assert_eq!(tile(plan::weight_grad(&mut conv1_gw, &narrow, fp32, None).0), "t128");
    assert_eq!(narrow.launch(33792, 96, 1, None).unwrap().1, Tile::T128);
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
    let e = conv2d_bwd(&zeros(&[2, 1, 8, 8]), &zeros(&[4, 1, 3, 3]), &zeros(&[2, 4, 5, 5]), &Conv2d::new(1, 0), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("gy of shape [2, 4, 6, 6]") && e.contains("[2, 4, 5, 5]"), "{e}");
}

// ---- the CUDA kernels, emulated on the CPU (ptxgrad-emu), launched by name ----

type Buf = DeviceBuf<f32>;

/// conv2d_ktable_u32: the k-table of the forward and weight grad, or of the input grad.
fn ktable(gpu: &Gpu, p: &Conv2dParams, input_grad: bool) -> ptxgrad::Result<DeviceBuf<u32>> {
    let (cfg, words) = plan::ktable(p, input_grad);
    let mut tab = gpu.uninit::<u32>(words)?;
    let mode = input_grad as u32;
    ptxgrad::launch!(gpu, Module::Conv2d, "conv2d_ktable_u32", cfg, &mut tab, p, &mode)?;
    Ok(tab)
}

/// conv2d_wperm_f32: the filters as the forward's or input grad's A operand.
fn wperm(gpu: &Gpu, w: &Buf, p: &Conv2dParams, input_grad: bool) -> ptxgrad::Result<Buf> {
    let mut w_perm = gpu.uninit::<f32>(p.w_len())?;
    let mode = input_grad as u32;
    ptxgrad::launch!(gpu, Module::Conv2d, "conv2d_wperm_f32", plan::wperm(p), w, &mut w_perm, p, &mode)?;
    Ok(w_perm)
}

/// Adds up `splits` partials of `len` (conv2d_splitk_sum_f32), or returns the one partial.
fn sum_splits(gpu: &Gpu, parts: Buf, len: usize, splits: usize) -> ptxgrad::Result<Vec<f32>> {
    if splits == 1 {
        return gpu.download(&parts);
    }
    let mut out = gpu.uninit::<f32>(len)?;
    let (len32, splits32) = (len as u32, splits as u32);
    let cfg = plan::splitk_sum(len);
    ptxgrad::launch!(gpu, Module::Conv2d, "conv2d_splitk_sum_f32", cfg, &parts, &mut out, &len32, &splits32)?;
    gpu.download(&out)
}

/// Every implicit-GEMM conv kernel through the launches conv2d makes (implicit_gemm::plan), each
/// GEMM in all five block tiles, the weight grad also split many ways, on small awkward shapes
/// (stride 1, 2 and 3, padding, non-square, channels across a 64-row tile), against the direct
/// sums. Each launch goes by name through `launch!`, as the engine's do: the emulator's kernel
/// table checks the name, its module and the block size against the kernel's launch bounds, and
/// the arguments are the engine's buffers and #[repr(C)] parameter structs. The forward
/// and input grad read the permuted filters with 16-byte copies exactly when their M (Cout, Cin)
/// is a multiple of 4: the emulator's copy counter checks which path ran.
#[test]
fn conv2d_kernels_emulated_match_direct_sums() -> ptxgrad::Result<()> {
    let gpu = emu_gpu();
    let planner = Planner::new(&gpu, GemmOpts::default());
    let fp32 = GemmMath::Fp32;
    let cases = [
        case([2, 5, 7, 9, 6, 3, 3, 1, 1]),
        case([3, 2, 7, 7, 5, 3, 3, 2, 1]),
        Case { relu: false, ..case([2, 3, 11, 9, 7, 3, 2, 3, 2]) },
        case([1, 70, 6, 6, 66, 3, 3, 1, 1]),
        case([2, 4, 9, 9, 3, 5, 5, 1, 2]),
        case([2, 8, 7, 7, 12, 3, 3, 1, 1]),
        case([1, 4, 6, 6, 132, 3, 3, 2, 1]),
    ];
    for (i, c) in cases.iter().enumerate() {
        let mut p = c.params();
        p.relu = c.relu as u32;
        let seed = 4000 + 10 * i as u64;
        let (xv, wv) = (uniform(p.x_len(), -1.0, 1.0, seed), uniform(p.w_len(), -1.0, 1.0, seed + 1));
        let (bv, gyv) = (uniform(c.c_out, -1.0, 1.0, seed + 2), uniform(p.y_len(), -1.0, 1.0, seed + 3));
        let (x, w, b, gy) = (gpu.upload(&xv)?, gpu.upload(&wv)?, gpu.upload(&bv)?, gpu.upload(&gyv)?);
        let (w_perm_fwd, w_perm_in) = (wperm(&gpu, &w, &p, false)?, wperm(&gpu, &w, &p, true)?);
        let (tab_fwd, tab_in) = (ktable(&gpu, &p, false)?, ktable(&gpu, &p, true)?);
        let y_exact = to_f32(&conv_fwd_exact(&xv, &wv, &bv, &p, c.relu));
        let gx_exact = to_f32(&conv_input_grad_exact(&wv, &gyv, &p));
        // 16-byte loads of A where its rows (Cout for the forward, Cin for the input grad) allow.
        let vec_taken = |before: u64| ptxgrad_emu::vec4_copies() > before;
        for tile in Tile::ALL {
            let what = |s: &str| format!("{s} {c:?}, {tile:?} (emulated)");
            let (name, cfg) = plan::forward(&p, &planner, fp32, Some(tile))?;
            let mut y = gpu.uninit::<f32>(p.y_len())?;
            let (before, stores) = (ptxgrad_emu::vec4_copies(), ptxgrad_emu::vec_stores());
            ptxgrad::launch!(&gpu, Module::Conv2d, name, cfg, &x, &w_perm_fwd, &b, &mut y, &tab_fwd, &p)?;
            assert_close(&what("y"), &y_exact, &gpu.download(&y)?, atol(p.k()), 1e-5);
            let aligned = emu_addr(&w_perm_fwd).is_multiple_of(16);
            assert_eq!(vec_taken(before), c.c_out.is_multiple_of(4) && aligned, "{}", what("16-byte loads, y"));
            // y's pixels in paired stores where each image's OH*OW are whole groups of 4.
            let paired = ptxgrad_emu::vec_stores() > stores;
            let pairs = p.ohw().is_multiple_of(4) && emu_addr(&y).is_multiple_of(16);
            assert_eq!(paired, pairs, "{}", what("paired stores, y"));

            let (name, cfg) = plan::input_grad(&p, &planner, fp32, Some(tile))?;
            let mut gx = gpu.uninit::<f32>(p.x_len())?;
            let (before, stores) = (ptxgrad_emu::vec4_copies(), ptxgrad_emu::vec_stores());
            ptxgrad::launch!(&gpu, Module::Conv2d, name, cfg, &w_perm_in, &gy, &mut gx, &tab_in, &p)?;
            assert_close(&what("gx"), &gx_exact, &gpu.download(&gx)?, atol(c.c_out * c.kh * c.kw), 1e-5);
            let aligned = emu_addr(&w_perm_in).is_multiple_of(16);
            assert_eq!(vec_taken(before), c.c_in.is_multiple_of(4) && aligned, "{}", what("16-byte loads, gx"));
            // The FFMA input grad stores element by element (gemm.cuh's vec_unless_ffma).
            assert_eq!(ptxgrad_emu::vec_stores(), stores, "{}", what("paired stores, gx"));
        }
        // The weight grad as planned, then split into chunks of 8 and 24 terms; on every tile.
        let gw_exact = to_f32(&conv_weight_grad_exact(&xv, &gyv, &p));
        let runs = [None, Some(8), Some(24)].map(|chunk| (chunk, None)).into_iter();
        for (chunk, tile) in runs.chain(Tile::ALL.map(|t| (None, Some(t)))) {
            let mut pp = p;
            let (name, mut cfg, mut splits) = plan::weight_grad(&mut pp, &planner, fp32, tile);
            if let Some(k) = chunk {
                pp.k_chunk = k;
                splits = (c.n * p.ohw()).div_ceil(k as usize);
                cfg.grid_dim.2 = splits as u32;
            }
            let mut parts = gpu.uninit::<f32>(splits * p.w_len())?;
            ptxgrad::launch!(&gpu, Module::Conv2d, name, cfg, &x, &gy, &mut parts, &tab_fwd, &pp)?;
            let gw = sum_splits(&gpu, parts, p.w_len(), splits)?;
            let what = format!("gw {c:?}, {splits} splits, {name} (emulated)");
            assert_close(&what, &gw_exact, &gw, atol(c.n * p.ohw()), 1e-5);
        }
        let (cfg, splits) = plan::bias_grad(&p, &planner);
        let mut parts = gpu.uninit::<f32>(splits * c.c_out)?;
        ptxgrad::launch!(&gpu, Module::Conv2d, "conv2d_bwd_bias_f32", cfg, &gy, &mut parts, &p)?;
        let gb = sum_splits(&gpu, parts, c.c_out, splits)?;
        let gb_exact = to_f32(&conv_bias_grad_exact(&gyv, &p));
        assert_close(&format!("gb {c:?} (emulated)"), &gb_exact, &gb, atol(c.n * p.ohw()), 1e-5);
    }
    Ok(())
}
