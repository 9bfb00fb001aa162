//! Average pooling (PyTorch's nn.AvgPool2d: kernel, stride, padding, count_include_pad, floor
//! mode): every device against the naive f64 oracle (tests/common/naive.rs) and bit for bit
//! against the CPU reference, the CPU reference's backward against finite differences, values
//! from PyTorch, the divisor at the padded border, non-finite inputs, the recorded op's backward,
//! and argument errors.
mod common;
use common::*;
use ptxgrad::ops::avgpool2d::{
    avgpool2d, avgpool2d_bwd, avgpool2d_bwd_cpu, avgpool2d_fwd, avgpool2d_fwd_cpu, AvgPool2d, Avgpool2dParams,
};
use ptxgrad::{Device, Tape, Tensor};

/// (x shape (N, C, H, W), kernel, stride, pad, count_include_pad)
type Case = (&'static [usize], usize, usize, usize, bool);

const CASES: &[Case] = &[
    (&[128, 96, 54, 54], 3, 2, 1, false), // AlexNet's first activation at batch 128: GPUs only
    (&[128, 192, 27, 27], 3, 1, 1, true), // its second, stride 1 (9 windows per input): GPUs only
    (&[1, 1, 1, 1], 1, 1, 0, true),       // identity on a 1x1 plane
    (&[2, 13, 1, 1], 3, 1, 1, false),     // 1x1 planes inside a 3x3 padded window: divisor 1
    (&[2, 3, 1, 1], 3, 1, 1, true),       // the same with the padding counted: divisor 9
    (&[3, 5, 7, 9], 3, 2, 1, true),       // odd sizes, padding counted
    (&[3, 5, 7, 9], 3, 2, 1, false),      // odd sizes, padding not counted
    (&[1, 7, 11, 13], 2, 2, 0, true),     // batch 1, 7 channels; the last row and column are in no window
    (&[2, 4, 17, 17], 4, 3, 0, true),     // 17 = 4 + 3*4 + 1: a trailing row/column in no window
    (&[2, 3, 11, 13], 3, 1, 1, false),    // stride 1, padded: overlapping windows, up to 9 per input
    (&[2, 2, 9, 9], 2, 1, 1, false),      // k = 2, pad 1: corner windows hold one real input
    (&[2, 3, 6, 6], 6, 1, 0, true),       // kernel == input size: one output per plane
    (&[1, 2, 3, 5], 5, 2, 2, false),      // kernel larger than the input, fitting only the padded 7x9
    (&[5, 3, 8, 8], 2, 2, 0, false),      // non-overlapping tiles, every input in exactly one window
    (&[1, 3, 40, 41], 3, 2, 1, true),     // planes of 1640 inputs, 420 outputs: several blocks per plane
    (&[1, 2, 64, 65], 2, 1, 1, true),     // 4290 outputs per plane: 17 blocks of 256
];

/// The emulator runs the cases up to this many input elements (all but the first two, which
/// are for GPUs only; the CPU skips them too, see `CPU_CASE_MAX`).
const EMULATED_MAX: usize = 20_000;

/// The CASES that run on `dev` (`case_runs_on`), with their index.
fn pool_cases_on(dev: &Device) -> impl Iterator<Item = (usize, Case)> + '_ {
    CASES.iter().copied().enumerate().filter(move |(_, c)| case_runs_on(dev, c.0.iter().product(), EMULATED_MAX))
}

fn pool_of(&(_, k, s, p, cip): &Case) -> AvgPool2d {
    AvgPool2d::new(k, s, p).count_include_pad(cip)
}

fn oracle_of(&(shape, k, s, p, cip): &Case) -> naive::AvgPool {
    naive::AvgPool::new(shape, k, s, p, cip)
}

/// Allowed |engine - exact| of the forward and of the backward for a kernel k and stride s, as
/// atol (the callers add rtol = f32::EPSILON for the rounding of the exact value to f32). Inputs
/// and gradients in [-1, 1), u = 2^-24 the unit roundoff.
///  * forward: a window's m <= k^2 real inputs summed in f32 (error <= (m - 1) u sum|x|), then
///    divided by d >= m (one more rounding): |error| <= (m - 1) u m / d + u <= k^2 u.
///  * backward: an input's gradient sums one term gy / d (|term| <= 1) from each of the at most
///    nw = ceil(k / s)^2 windows containing it, each term rounded: |error| <= nw * nw u.
///
/// Both are given as eps = 2u per step: twice the bound, for the second-order terms. A missing,
/// extra or wrongly divided term changes a value by at least 1/(k^2) * |x|, orders above these.
fn tolerances(k: usize, s: usize) -> (f32, f32) {
    let nw = k.div_ceil(s).pow(2) as f32;
    ((k * k) as f32 * f32::EPSILON, nw * nw * f32::EPSILON)
}

/// The Avgpool2dParams of a case (the geometry the CPU references take).
fn params_of(c: &Case) -> Avgpool2dParams {
    Avgpool2dParams::new(c.0, &pool_of(c)).expect("a valid case")
}

#[test]
fn avgpool2d_cpu_backward_matches_finite_differences() {
    let cases: &[Case] = &[
        (&[2, 3, 7, 6], 3, 2, 1, true),  // padded, the padding counted
        (&[2, 3, 7, 6], 3, 2, 1, false), // padded, only real inputs counted
        (&[1, 2, 5, 5], 2, 1, 1, false), // stride 1, corner windows of one real input
        (&[1, 1, 4, 7], 4, 3, 1, true),  // the last row and column are in no window
        (&[1, 1, 5, 5], 4, 2, 2, false), // pad = k / 2
    ];
    for (i, case) in cases.iter().enumerate() {
        let x = uniform(case.0.iter().product(), -1.0, 1.0, 10 + i as u64);
        let oracle = oracle_of(case);
        let loss_weights = uniform(oracle.out_shape().iter().product(), -1.0, 1.0, 20 + i as u64);
        let analytic = avgpool2d_bwd_cpu(&loss_weights, &params_of(case));
        // The loss sum(y * r) is linear in x: central differences are exact but for the f64
        // rounding of the loss (|loss| < 100: below 1e-13 / eps), whatever eps.
        let numeric = numeric_grad_at(&x, 1e-2, |x| {
            oracle.forward(x).iter().zip(&loss_weights).map(|(&y, &r)| y * r as f64).sum()
        });
        let (_, bwd_atol) = tolerances(case.1, case.2);
        assert_close(&format!("avgpool grad {case:?}"), &numeric, &analytic, bwd_atol, f32::EPSILON);
    }
}

test_device!(avgpool2d_matches_naive_oracle, |dev| {
    for (i, case) in pool_cases_on(&dev) {
        let (shape, pool, oracle) = (case.0, pool_of(&case), oracle_of(&case));
        let (x_host, x) = rand_host_and_tensor(shape, i as u64, &dev);
        let y = avgpool2d_fwd(&x, &pool).unwrap();
        assert_eq!(y.shape(), oracle.out_shape(), "{case:?}");
        let (gy_host, gy) = rand_host_and_tensor(y.shape(), 50 + i as u64, &dev);
        let gx = avgpool2d_bwd(&gy, shape, &pool).unwrap();
        assert_eq!(gx.shape(), shape);
        let (y, gx) = (y.to_vec().unwrap(), gx.to_vec().unwrap());

        let (fwd_atol, bwd_atol) = tolerances(case.1, case.2);
        let want_y = naive::f32s(&oracle.forward(&naive::f64s(&x_host)));
        assert_close(&format!("avgpool fwd {case:?}"), &want_y, &y, fwd_atol, f32::EPSILON);
        let want_gx = naive::f32s(&oracle.backward(&naive::f64s(&gy_host)));
        assert_close(&format!("avgpool bwd {case:?}"), &want_gx, &gx, bwd_atol, f32::EPSILON);

        // The kernels add the same terms in the same order as the CPU reference and divide
        // (not multiply by a reciprocal) as it does: bit-identical (see kernels/avgpool2d.cu).
        let p = params_of(&case);
        let what = |i: usize| format!("{case:?}, element {i}");
        assert_same_bits("avgpool fwd vs CPU reference", &avgpool2d_fwd_cpu(&x_host, &p), &y, what);
        assert_same_bits("avgpool bwd vs CPU reference", &avgpool2d_bwd_cpu(&gy_host, &p), &gx, what);
    }
});

/// x[i] = ((7 i) % 11 - 5) / 4 and r[j] = ((5 j) % 7 - 3) / 2 (exact in f32, the same in
/// Python): the fixtures' input and loss weights.
fn ramp_x(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((7 * i) % 11) as f32 / 4.0 - 1.25).collect()
}

fn ramp_r(n: usize) -> Vec<f32> {
    (0..n).map(|j| ((5 * j) % 7) as f32 / 2.0 - 1.5).collect()
}

/// A case of `TORCH_AVGPOOL`: the pooling, y = AvgPool2d(x), and gx = d sum(y * r) / dx.
struct TorchCase {
    case: Case,
    y: &'static [f32],
    gx: &'static [f32],
}

/// torch 2.15, CPU, float32, printed as the shortest f32 (`repr(numpy.float32(v))`):
/// ```python
/// ramp = lambda n, a, m, off, div: torch.tensor([((i * a) % m - off) / div for i in range(n)])
/// x = ramp(math.prod(shape), 7, 11, 5, 4).reshape(shape).requires_grad_()
/// y = torch.nn.AvgPool2d(k, stride=s, padding=p, count_include_pad=cip)(x)
/// r = ramp(y.numel(), 5, 7, 3, 2).reshape(y.shape)
/// (y * r).sum().backward()  # y.flatten(), x.grad.flatten()
/// ```
#[rustfmt::skip]
const TORCH_AVGPOOL: &[TorchCase] = &[
    // x: (1, 2, 4, 5), k 3, stride 2, padding 1, count_include_pad=True -> y: (1, 2, 2, 3)
    TorchCase {
        case: (&[1, 2, 4, 5], 3, 2, 1, true),
        y: &[-0.055555556, 0.1388889, 0.1388889, -0.19444445, -0.11111111, -0.055555556,
             0.22222222, -0.055555556, 0.11111111, 0.22222222, 0.055555556, 0.055555556],
        gx: &[-0.16666667, -0.05555556, 0.11111111, 0.11111111, 0.0, -0.2777778, 0.0, 0.2777778, 0.33333334,
              0.055555556, -0.11111111, 0.05555556, 0.16666667, 0.22222222, 0.055555556, -0.11111111,
              0.05555556, 0.16666667, 0.22222222, 0.055555556, -0.055555556, -0.22222222, -0.16666667,
              -0.05555556, 0.11111111, -0.055555556, -0.33333334, -0.2777778, 0.0, 0.2777778, 0.0,
              -0.11111111, -0.11111111, 0.05555556, 0.16666667, 0.0, -0.11111111, -0.11111111, 0.05555556,
              0.16666667],
    },
    // The same with count_include_pad=False: border windows divide by their 4 or 6 real inputs.
    TorchCase {
        case: (&[1, 2, 4, 5], 3, 2, 1, false),
        y: &[-0.125, 0.20833333, 0.3125, -0.29166666, -0.11111111, -0.083333336, 0.5, -0.083333336, 0.25,
             0.33333334, 0.055555556, 0.083333336],
        gx: &[-0.375, -0.20833333, 0.16666667, 0.16666667, 0.0, -0.5416667, -0.20833333, 0.33333334, 0.4166667,
              0.083333336, -0.16666667, 0.0, 0.16666667, 0.25, 0.083333336, -0.16666667, 0.0, 0.16666667,
              0.25, 0.083333336, -0.125, -0.375, -0.25, 0.0, 0.25, -0.125, -0.4861111, -0.3611111, 0.1388889,
              0.5, 0.0, -0.11111111, -0.11111111, 0.1388889, 0.25, 0.0, -0.11111111, -0.11111111, 0.1388889,
              0.25],
    },
    // x: (2, 1, 5, 7), k 3, stride 3, no padding -> y: (2, 1, 1, 2) (ceil mode would give 2x3):
    // rows 3-4 and column 6 are in no window and get no gradient.
    TorchCase {
        case: (&[2, 1, 5, 7], 3, 3, 0, true),
        y: &[-0.083333336, -0.027777778, 0.055555556, 0.11111111],
        gx: &[-0.16666667, -0.16666667, -0.16666667, 0.11111111, 0.11111111, 0.11111111, 0.0, -0.16666667,
              -0.16666667, -0.16666667, 0.11111111, 0.11111111, 0.11111111, 0.0, -0.16666667, -0.16666667,
              -0.16666667, 0.11111111, 0.11111111, 0.11111111, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
              0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -0.11111111, -0.11111111, -0.11111111, 0.0, 0.0,
              0.0, 0.0, -0.11111111, -0.11111111, -0.11111111, 0.0, 0.0, 0.0, 0.0, -0.11111111, -0.11111111,
              -0.11111111, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    },
];

test_device!(avgpool2d_matches_torch, |dev| {
    for t in TORCH_AVGPOOL {
        let (shape, pool) = (t.case.0, pool_of(&t.case));
        let x = Tensor::from_vec(shape, ramp_x(shape.iter().product()), &dev).unwrap();
        let y = avgpool2d_fwd(&x, &pool).unwrap();
        let out_shape = y.shape().to_vec();
        let r = Tensor::from_vec(&out_shape, ramp_r(t.y.len()), &dev).unwrap();
        let gx = avgpool2d_bwd(&r, shape, &pool).unwrap().to_vec().unwrap();
        // The window sums of multiples of 1/4 are exact in f32 and the one division is correctly
        // rounded on both sides: the forward is bit-exact.
        assert_close(&format!("avgpool fwd vs torch {:?}", t.case), t.y, &y.to_vec().unwrap(), 0.0, 0.0);
        // gx sums up to 4 terms r / d, each rounded (|r / d| <= 0.375: by at most 1.5e-8), in
        // an order that may differ from torch's, each of the 3 additions rounding a partial sum
        // below 1.5 (by at most 6e-8): at most 2.4e-7 on either side. (Here they agree exactly.)
        assert_close(&format!("avgpool bwd vs torch {:?}", t.case), t.gx, &gx, 5e-7, 0.0);
    }
});

test_device!(avgpool2d_divides_by_the_padded_or_the_real_window, |dev| {
    // x: (1, 1, 4, 4) of ones, 3x3 windows at stride 2 with padding 1 -> y: (1, 1, 2, 2). The
    // windows start at rows/columns -1 and 1: the first holds 2 real rows (0, 1), the second 3
    // (1, 2, 3), so they hold 4, 6, 6 and 9 real inputs.
    let x = Tensor::from_vec(&[1, 1, 4, 4], vec![1.0; 16], &dev).unwrap();
    let counted = avgpool2d_fwd(&x, &AvgPool2d::new(3, 2, 1)).unwrap().to_vec().unwrap();
    assert_eq!(counted, [4.0 / 9.0, 6.0 / 9.0, 6.0 / 9.0, 1.0], "count_include_pad: divided by 9");
    let not_counted = AvgPool2d::new(3, 2, 1).count_include_pad(false);
    assert_eq!(avgpool2d_fwd(&x, &not_counted).unwrap().to_vec().unwrap(), [1.0; 4], "the mean of real ones");
    // Backward of gy = ones: each input collects 1 / d from every window holding it. Input (1, 1)
    // is in all four windows; (0, 0) only in the first.
    let gy = Tensor::from_vec(&[1, 1, 2, 2], vec![1.0; 4], &dev).unwrap();
    let gx = avgpool2d_bwd(&gy, &[1, 1, 4, 4], &AvgPool2d::new(3, 2, 1)).unwrap().to_vec().unwrap();
    assert_eq!((gx[0], gx[5]), (1.0 / 9.0, 1.0 / 9.0 + 1.0 / 9.0 + 1.0 / 9.0 + 1.0 / 9.0));
    let gx = avgpool2d_bwd(&gy, &[1, 1, 4, 4], &not_counted).unwrap().to_vec().unwrap();
    assert_eq!((gx[0], gx[5]), (0.25, 0.25 + 1.0 / 6.0 + 1.0 / 6.0 + 1.0 / 9.0));
});

test_device!(avgpool2d_propagates_nonfinite_inputs_within_their_windows, |dev| {
    // x: (1, 1, 4, 4), 2x2 windows at stride 2: one NaN in the first window, +inf in the second,
    // +inf and -inf in the third, the fourth finite. A window's sum carries them as PyTorch's.
    let mut x = vec![1.0f32; 16];
    (x[0], x[2], x[8], x[9]) = (f32::NAN, f32::INFINITY, f32::INFINITY, f32::NEG_INFINITY);
    let x = Tensor::from_vec(&[1, 1, 4, 4], x, &dev).unwrap();
    let y = avgpool2d_fwd(&x, &AvgPool2d::new(2, 2, 0)).unwrap().to_vec().unwrap();
    assert_close_nonfinite("avgpool of non-finite inputs", &[f32::NAN, f32::INFINITY, f32::NAN, 1.0], &y, 0.0, 0.0);
});

test_device!(avgpool2d_records_its_backward, |dev| {
    // x: (3, 5, 7, 9) through the recorded pooling; gy is the gradient the tape hands it.
    let case: Case = (&[3, 5, 7, 9], 3, 2, 1, false);
    let (x_host, x) = rand_host_and_tensor(case.0, 7, &dev);
    let mut tape = Tape::train();
    tape.watch(&x);
    let y = avgpool2d(&mut tape, &x, &pool_of(&case)).unwrap();
    let oracle = oracle_of(&case);
    let (fwd_atol, bwd_atol) = tolerances(case.1, case.2);
    let want_y = naive::f32s(&oracle.forward(&naive::f64s(&x_host)));
    assert_close("recorded avgpool", &want_y, &y.to_vec().unwrap(), fwd_atol, f32::EPSILON);
    let (gy_host, gy) = rand_host_and_tensor(y.shape(), 8, &dev);
    let grads = backward_from(tape, &y, &gy);
    let gx = grads.get(&x).expect("x has a gradient");
    assert_eq!(gx.shape(), case.0);
    let want_gx = naive::f32s(&oracle.backward(&naive::f64s(&gy_host)));
    assert_close("recorded avgpool backward", &want_gx, &gx.to_vec().unwrap(), bwd_atol, f32::EPSILON);
});

#[test]
fn avgpool2d_rejects_bad_arguments() {
    let dev = Device::Cpu;
    let x = |shape: &[usize]| rand_tensor(shape, 0, &dev);
    let fwd = |shape: &[usize], k, s, p| err_msg(avgpool2d_fwd(&x(shape), &AvgPool2d::new(k, s, p)));
    assert_mentions(&fwd(&[4, 4, 4], 2, 2, 0), &["avgpool2d", "4-D", "found shape [4, 4, 4]"]);
    assert_mentions(&fwd(&[1, 1, 4, 4, 1], 2, 2, 0), &["4-D", "[1, 1, 4, 4, 1]"]);
    // The window must fit in the padded input: 5x5 does not in 2x3 padded by 1 (4x5).
    assert_mentions(&fwd(&[1, 1, 2, 3], 5, 1, 1), &["at least 5x5 with padding 1", "found 2x3, 4x5 padded"]);
    // Padding above half the kernel would make windows of padding alone (PyTorch refuses it).
    assert_mentions(&fwd(&[1, 1, 8, 8], 3, 1, 2), &["at most half the kernel (3 / 2 = 1)", "found pad = 2"]);
    assert_mentions(&fwd(&[1, 1, 8, 8], 1, 1, 1), &["at most half the kernel (1 / 2 = 0)", "found pad = 1"]);
    assert_mentions(&fwd(&[1, 1, 4, 4], 2, 0, 0), &["stride of at least 1", "stride = 0"]);
    assert_mentions(&fwd(&[1, 1, 4, 4], 0, 1, 0), &["kernel and a stride of at least 1", "kernel = 0"]);
    assert_mentions(&fwd(&[1, 0, 4, 4], 2, 2, 0), &["C, H and W of at least 1", "[1, 0, 4, 4]"]);
    assert_mentions(&fwd(&[1, 1, 4, 0], 1, 1, 0), &["C, H and W of at least 1", "[1, 1, 4, 0]"]);
    // A stride beyond the kernels' 32-bit index math (PyTorch's int: the same limit) is named.
    assert_mentions(&fwd(&[1, 1, 4, 4], 2, 1 << 31, 0), &["stride below 2^31", "stride = 2147483648"]);

    // Backward: gy must have the pooled shape, x_shape the same checks as the forward's x.
    let pool = AvgPool2d::new(3, 2, 1);
    let msg = err_msg(avgpool2d_bwd(&x(&[1, 2, 3, 2]), &[1, 2, 5, 5], &pool));
    assert_mentions(&msg, &["avgpool2d_bwd", "gy of shape [1, 2, 3, 3]", "found [1, 2, 3, 2]"]);
    let msg = err_msg(avgpool2d_bwd(&x(&[2, 1, 3, 3]), &[1, 2, 5, 5], &pool));
    assert_mentions(&msg, &["avgpool2d_bwd", "gy of shape [1, 2, 3, 3]", "found [2, 1, 3, 3]"]);
    let msg = err_msg(avgpool2d_bwd(&x(&[1, 2, 3, 3]), &[2, 5, 5], &pool));
    assert_mentions(&msg, &["4-D", "found shape [2, 5, 5]"]);
    let msg = err_msg(avgpool2d_bwd(&x(&[1, 1, 1, 1]), &[1, 1, 1, 1], &AvgPool2d::new(2, 2, 0)));
    assert_mentions(&msg, &["at least 2x2 with padding 0", "found 1x1"]);
}
