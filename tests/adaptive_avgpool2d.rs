//! Global average pooling (PyTorch's nn.AdaptiveAvgPool2d((1, 1))): every device against the
//! naive f64 oracle (tests/common/naive.rs), the CPU reference's backward against finite
//! differences, values from PyTorch, non-finite inputs, the recorded op's backward (alone and
//! after an average pool, as a network's head), and argument errors.
mod common;
use common::*;
use ptxgrad::ops::adaptive_avgpool2d::{
    adaptive_avgpool2d_bwd, adaptive_avgpool2d_bwd_cpu, adaptive_avgpool2d_fwd, global_avgpool2d,
};
use ptxgrad::ops::avgpool2d::{avgpool2d, AvgPool2d};
use ptxgrad::{Device, Tape, Tensor};

/// x: (N, C, H, W)
const SHAPES: &[&[usize]] = &[
    &[128, 1000, 6, 6], // NiN's ImageNet head (batch 128, 1000 classes, 6x6): GPUs only
    &[128, 512, 7, 7],  // ResNet's head at batch 128: 65536 planes of 49
    &[1, 1, 1, 1],      // one value: its own mean
    &[2, 13, 1, 1],     // 1x1 planes, 13 channels
    &[3, 5, 7, 9],      // odd sizes: 63 values per plane, two warps, the second partial
    &[1, 97, 11, 13],   // batch 1, 97 channels, 143 per plane: a partial last warp
    &[2, 3, 1, 31],     // a single row, 31 values: fewer than one warp
    &[4, 2, 16, 16],    // 256 per plane: exactly one full block
    &[2, 3, 17, 17],    // 289: 33 values past a full block, which their threads add second
    &[1, 10, 5, 5],     // a 10-class NiN head (5x5 maps) at batch 1
    &[1, 2, 123, 77],   // 9471 per plane: 37 serial terms per thread, 37 backward blocks
    &[3, 1, 2, 3],      // one channel
];

/// The emulator runs the cases up to this many input elements (all but the first two).
const EMULATED_MAX: usize = 20_000;

/// Allowed |engine - exact| of the forward for planes of `hw` values in [-1, 1), as atol (the
/// callers add rtol = f32::EPSILON for the rounding of the exact value to f32). The CPU sums in
/// f64 and rounds once. The kernel's f32 sum is a tree: each thread adds ceil(hw / 256) values
/// in turn (one each below 256), then 5 shuffle levels reduce a warp and 3 more its block's 8
/// warps; a sum of depth D errs by at most D u sum|x| (u = 2^-24), and sum|x| / hw <= 1, so the
/// mean errs by below (ceil(hw / 256) + 8) u, plus u for the division. Given in eps = 2u: twice
/// that. A value lost or counted twice changes the mean by |x| / hw, orders above it for the
/// planes here (hw <= 10^4).
fn fwd_atol(hw: usize) -> f32 {
    (hw.div_ceil(256) + 9) as f32 * f32::EPSILON
}

/// The backward gy / hw is one f32 division on every path (the oracle's exact value rounded to
/// f32 is then the same, but for the rare double rounding): one rounding either way.
const BWD_RTOL: f32 = f32::EPSILON;

fn hw_of(shape: &[usize]) -> usize {
    shape[2] * shape[3]
}

#[test]
fn global_avgpool2d_cpu_backward_matches_finite_differences() {
    for (i, shape) in [[2usize, 3, 5, 7], [1, 2, 1, 1], [3, 1, 4, 4]].iter().enumerate() {
        let x = uniform(shape.iter().product(), -1.0, 1.0, 30 + i as u64);
        let loss_weights = uniform(shape[0] * shape[1], -1.0, 1.0, 40 + i as u64);
        let analytic = adaptive_avgpool2d_bwd_cpu(&loss_weights, hw_of(shape));
        // The loss sum(y * r) is linear in x: central differences are exact but for the f64
        // rounding of the loss (|loss| < 10: below 1e-14 / eps), whatever eps.
        let numeric = numeric_grad_at(&x, 1e-2, |x| {
            naive::global_avg_pool2d(x, shape).iter().zip(&loss_weights).map(|(&y, &r)| y * r as f64).sum()
        });
        // r / hw in f32: one rounding, u |gx|; |gx| <= 1 / hw, so 1e-9 covers the f64 noise.
        assert_close(&format!("global avgpool grad {shape:?}"), &numeric, &analytic, 1e-9, f32::EPSILON);
    }
}

test_device!(global_avgpool2d_matches_naive_oracle, |dev| {
    for (k, shape, _) in cases_on(&dev, SHAPES, EMULATED_MAX) {
        let (x_host, x) = rand_host_and_tensor(shape, k as u64, &dev);
        let y = adaptive_avgpool2d_fwd(&x).unwrap();
        assert_eq!(y.shape(), [shape[0], shape[1], 1, 1]);
        let want_y = naive::f32s(&naive::global_avg_pool2d(&naive::f64s(&x_host), shape));
        let what = format!("global avgpool fwd {shape:?}");
        assert_close(&what, &want_y, &y.to_vec().unwrap(), fwd_atol(hw_of(shape)), f32::EPSILON);

        let (gy_host, gy) = rand_host_and_tensor(y.shape(), 100 + k as u64, &dev);
        let gx = adaptive_avgpool2d_bwd(&gy, shape).unwrap();
        assert_eq!(gx.shape(), shape);
        let gx = gx.to_vec().unwrap();
        let want_gx = naive::f32s(&naive::global_avg_pool2d_backward(&naive::f64s(&gy_host), shape));
        assert_close(&format!("global avgpool bwd {shape:?}"), &want_gx, &gx, 0.0, BWD_RTOL);
        // Every path divides gy by hw in f32, as the CPU reference: bit-identical to it.
        let cpu = adaptive_avgpool2d_bwd_cpu(&gy_host, hw_of(shape));
        assert_same_bits("global avgpool bwd vs CPU reference", &cpu, &gx, |i| format!("{shape:?}, element {i}"));
    }
});

/// torch 2.15, CPU, float32, printed as the shortest f32 (`repr(numpy.float32(v))`):
/// ```python
/// ramp = lambda n, a, m, off, div: torch.tensor([((i * a) % m - off) / div for i in range(n)])
/// x = ramp(90, 7, 11, 5, 4).reshape(2, 3, 3, 5).requires_grad_()
/// y = torch.nn.AdaptiveAvgPool2d((1, 1))(x)
/// r = ramp(6, 5, 7, 3, 2).reshape(y.shape)
/// (y * r).sum().backward()  # y.flatten(); x.grad.reshape(6, 15)[:, 0] (each row is constant)
/// ```
/// (TORCH_GAP_Y, TORCH_GAP_GX): y (2, 3, 1, 1), and the gradient at each plane's every element.
#[rustfmt::skip]
const TORCH_GAP: (&[f32], &[f32]) = (
    &[0.0, 0.033333335, -0.11666667, 0.1, -0.05, -0.016666668],
    &[-0.1, 0.06666667, 0.0, -0.06666667, 0.1, 0.033333335],
);

test_device!(global_avgpool2d_matches_torch, |dev| {
    // x: (2, 3, 3, 5), x[i] = ((7 i) % 11 - 5) / 4; r: (2, 3, 1, 1), r[j] = ((5 j) % 7 - 3) / 2.
    let shape = [2, 3, 3, 5];
    let x_host: Vec<f32> = (0..90).map(|i| ((7 * i) % 11) as f32 / 4.0 - 1.25).collect();
    let r_host: Vec<f32> = (0..6).map(|j| ((5 * j) % 7) as f32 / 2.0 - 1.5).collect();
    let y = adaptive_avgpool2d_fwd(&Tensor::from_vec(&shape, x_host, &dev).unwrap()).unwrap();
    // A plane's 15 multiples of 1/4 sum exactly in any order; the division by 15 rounds once.
    assert_close("global avgpool vs torch", TORCH_GAP.0, &y.to_vec().unwrap(), 0.0, 0.0);
    let r = Tensor::from_vec(&[2, 3, 1, 1], r_host, &dev).unwrap();
    let gx = adaptive_avgpool2d_bwd(&r, &shape).unwrap().to_vec().unwrap();
    // torch's mean backward divides by the count as the kernel does: bit-exact.
    let want: Vec<f32> = TORCH_GAP.1.iter().flat_map(|&g| [g; 15]).collect();
    assert_close("global avgpool backward vs torch", &want, &gx, 0.0, 0.0);
});

test_device!(global_avgpool2d_propagates_nonfinite_inputs, |dev| {
    // x: (1, 4, 2, 2): plane 0 holds a NaN, plane 1 a +inf, plane 2 +inf and -inf, plane 3 is
    // finite. Each plane's mean carries them as PyTorch's (inf - inf is NaN).
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    #[rustfmt::skip]
    let x = vec![1.0, nan, 2.0, 3.0,  1.0, inf, 2.0, 3.0,  inf, -inf, 1.0, 1.0,  1.0, 2.0, 3.0, 6.0];
    let y = adaptive_avgpool2d_fwd(&Tensor::from_vec(&[1, 4, 2, 2], x, &dev).unwrap()).unwrap();
    assert_close_nonfinite(
        "global avgpool of non-finite inputs",
        &[nan, inf, nan, 3.0],
        &y.to_vec().unwrap(),
        0.0,
        0.0,
    );
});

test_device!(global_avgpool2d_records_its_backward, |dev| {
    // x: (3, 5, 7, 9) through the recorded pool; gy (3, 5, 1, 1) is the gradient the tape hands it.
    let shape = [3, 5, 7, 9];
    let (x_host, x) = rand_host_and_tensor(&shape, 7, &dev);
    let mut tape = Tape::train();
    tape.watch(&x);
    let y = global_avgpool2d(&mut tape, &x).unwrap();
    let want_y = naive::f32s(&naive::global_avg_pool2d(&naive::f64s(&x_host), &shape));
    assert_close("recorded global avgpool", &want_y, &y.to_vec().unwrap(), fwd_atol(63), f32::EPSILON);
    let (gy_host, gy) = rand_host_and_tensor(y.shape(), 8, &dev);
    let grads = backward_from(tape, &y, &gy);
    let gx = grads.get(&x).expect("x has a gradient");
    assert_eq!(gx.shape(), shape);
    let want_gx = naive::f32s(&naive::global_avg_pool2d_backward(&naive::f64s(&gy_host), &shape));
    assert_close("recorded global avgpool backward", &want_gx, &gx.to_vec().unwrap(), 0.0, BWD_RTOL);
});

test_device!(global_avgpool2d_after_avgpool_records_the_chain_rule, |dev| {
    // A network's head: x (2, 3, 9, 7) -> avgpool 3x3 stride 2 pad 1 (padding not counted) ->
    // (2, 3, 5, 4) -> global pool -> (2, 3, 1, 1). dL/dx is the average pool's backward of the
    // global pool's backward of gy.
    let (shape, pool) = ([2, 3, 9, 7], AvgPool2d::new(3, 2, 1).count_include_pad(false));
    let x = rand_tensor(&shape, 9, &dev);
    let mut tape = Tape::train();
    tape.watch(&x);
    let h = avgpool2d(&mut tape, &x, &pool).unwrap();
    assert_eq!(h.shape(), [2, 3, 5, 4]);
    let y = global_avgpool2d(&mut tape, &h).unwrap();
    let (gy_host, gy) = rand_host_and_tensor(y.shape(), 10, &dev);
    let grads = backward_from(tape, &y, &gy);
    let gx = grads.get(&x).expect("x has a gradient").to_vec().unwrap();
    let gh = naive::global_avg_pool2d_backward(&naive::f64s(&gy_host), h.shape());
    let want_gx = naive::f32s(&naive::AvgPool::new(&shape, 3, 2, 1, false).backward(&gh));
    // gh = gy / 20 (|gh| < 0.05, one rounding), then each input sums the shares gh / d of at
    // most 4 windows (d >= 4, another rounding each): |error| <= 5 u * 4 * 0.05 / 4 = 1.5e-8,
    // u = 2^-24, allowed twice that.
    assert_close("avgpool -> global avgpool backward", &want_gx, &gx, 3e-8, 0.0);
});

#[test]
fn global_avgpool2d_rejects_bad_arguments() {
    let dev = Device::Cpu;
    let x = |shape: &[usize]| rand_tensor(shape, 0, &dev);
    let fwd = |shape: &[usize]| err_msg(adaptive_avgpool2d_fwd(&x(shape)));
    assert_mentions(&fwd(&[4, 4, 4]), &["adaptive_avgpool2d", "4-D", "found shape [4, 4, 4]"]);
    assert_mentions(&fwd(&[2, 1, 4, 4, 1]), &["4-D", "[2, 1, 4, 4, 1]"]);
    assert_mentions(&fwd(&[2, 0, 4, 4]), &["C, H and W of at least 1", "found shape [2, 0, 4, 4]"]);
    assert_mentions(&fwd(&[2, 3, 0, 4]), &["C, H and W of at least 1", "[2, 3, 0, 4]"]);
    // Backward: gy must be (N, C, 1, 1) of x_shape (N, C, H, W).
    let msg = err_msg(adaptive_avgpool2d_bwd(&x(&[2, 3, 2, 2]), &[2, 3, 4, 4]));
    assert_mentions(&msg, &["adaptive_avgpool2d_bwd", "gy of shape [2, 3, 1, 1]", "found [2, 3, 2, 2]"]);
    let msg = err_msg(adaptive_avgpool2d_bwd(&x(&[3, 2, 1, 1]), &[2, 3, 4, 4]));
    assert_mentions(&msg, &["gy of shape [2, 3, 1, 1]", "found [3, 2, 1, 1]"]);
    let msg = err_msg(adaptive_avgpool2d_bwd(&x(&[2, 3, 1, 1]), &[2, 3, 16]));
    assert_mentions(&msg, &["adaptive_avgpool2d", "4-D", "found shape [2, 3, 16]"]);
}
