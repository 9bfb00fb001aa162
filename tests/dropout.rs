//! Dropout: every device against a naive oracle (its mask a splitmix64 stream, as
//! kernels/dropout.cu specifies it, bit for bit), the mask's statistics and independence, the
//! backward, eval-mode identity, NaN under the mask, and argument errors.
mod common;
use common::*;
use ptxgrad::ops::dropout::{dropout, dropout_bwd, dropout_cpu, dropout_fwd, dropout_mask_keep};
use ptxgrad::ops::softmax_xent::{softmax_xent, softmax_xent_bwd, softmax_xent_fwd};
use ptxgrad::{Device, Tape, Tensor};

const SHAPES: &[&[usize]] = &[
    &[128, 4096], // AlexNet's two dropout layers (batch 128)
    &[128, 9216],
    &[1, 4096], // batch 1
    &[3, 4096], // batch 3
    &[1],
    &[7],
    &[3, 5, 7, 9],
    &[2, 1000003], // odd length, several grid-stride rounds of blocks
    &[255],
    &[256],
    &[257],
];

/// The emulator runs the cases up to this many elements: all of them (the largest has 2M).
const EMULATED_MAX: usize = 1 << 22;

/// splitmix64 (Steele, Lea, Flood 2014) as a sequential generator: each output adds the golden
/// gamma to the state and mixes the sum.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The naive mask of `n` elements at rate p under `seed`, as kernels/dropout.cu specifies it: the
/// seed's stream is a splitmix64 generator started at the first output of one started at the
/// seed; element i takes the stream's (i + 1)-th output and is kept iff its top 24 bits, as a
/// fraction of 2^24, are >= p.
fn naive_mask(n: usize, p: f32, seed: u64) -> Vec<bool> {
    let mut stream = SplitMix64(SplitMix64(seed).next());
    (0..n).map(|_| (stream.next() >> 40) as f64 / (1u64 << 24) as f64 >= p as f64).collect()
}

/// The naive oracle, PyTorch's inverted dropout: v * mask * (1 / (1 - p)), the scale in f32. The
/// mask multiplies: a dropped NaN or infinity gives NaN, a dropped finite value a signed zero.
fn naive_dropout(v: &[f32], p: f32, seed: u64) -> Vec<f32> {
    let scale = 1.0f32 / (1.0 - p);
    let mask = naive_mask(v.len(), p, seed);
    let mut out = Vec::with_capacity(v.len());
    for i in 0..v.len() {
        out.push(if mask[i] { v[i] * scale } else { v[i] * 0.0 });
    }
    out
}

fn kept(n: usize, p: f32, seed: u64) -> usize {
    (0..n as u64).filter(|&i| dropout_mask_keep(seed, i, p)).count()
}

#[test]
fn dropout_mask_fraction_is_p() {
    let n = 1_000_000usize;
    for (k, p) in [0.1f32, 0.5, 0.9].into_iter().enumerate() {
        let dropped = n - kept(n, p, 1000 + k as u64);
        // Dropped ~ Binomial(n, p) (P(drop) = ceil(p * 2^24) / 2^24, within 2^-24 of p). Allow
        // 6 standard deviations, sqrt(n p (1 - p)) <= 500: a false failure has probability ~2e-9.
        let sd = (n as f64 * p as f64 * (1.0 - p as f64)).sqrt();
        let deviation = (dropped as f64 - n as f64 * p as f64).abs();
        assert!(
            deviation <= 6.0 * sd,
            "p = {p}: dropped {dropped} of {n}, {deviation} from the mean > 6 sd = {}",
            6.0 * sd
        );
    }
    // p = 0 keeps everything (u >= 0 always).
    assert_eq!(kept(10_000, 0.0, 3), 10_000);
}

#[test]
fn dropout_mask_is_the_splitmix64_stream() {
    for (seed, p, n) in [(0u64, 0.5f32, 1000usize), (42, 0.1, 1000), (7 + (1 << 32), 0.9, 1000), (u64::MAX, 0.3, 77)] {
        let want = naive_mask(n, p, seed);
        let got: Vec<bool> = (0..n as u64).map(|i| dropout_mask_keep(seed, i, p)).collect();
        assert_eq!(got, want, "seed {seed}, p {p}");
    }
}

#[test]
fn dropout_masks_depend_on_seed_and_index_only() {
    let n = 100_000u64;
    let mask = |seed| (0..n).map(|i| dropout_mask_keep(seed, i, 0.5)).collect::<Vec<_>>();
    // Masks of neighbouring seeds must be independent: they agree on ~half the elements
    // (Binomial(n, 1/2), sd = 158; 6 sd = 950).
    for (a, b) in [(42u64, 43u64), (0, 1), (7, 7 + (1 << 32))] {
        let (mask_a, mask_b) = (mask(a), mask(b));
        let agree = mask_a.iter().zip(&mask_b).filter(|(x, y)| x == y).count() as f64;
        assert!((agree - n as f64 / 2.0).abs() < 950.0, "seeds {a} and {b}: masks agree on {agree} of {n}");
    }
    // Nor may a mask be its neighbour's shifted by one index.
    let one_mask = mask(5);
    let shifted = one_mask.windows(2).filter(|w| w[0] == w[1]).count() as f64;
    assert!((shifted - (n - 1) as f64 / 2.0).abs() < 950.0, "adjacent elements agree {shifted} times");
}

#[test]
fn dropout_cpu_backward_matches_finite_differences() {
    let (p, seed) = (0.3f32, 99u64);
    let x = uniform(300, -1.0, 1.0, 1);
    let loss_weights = uniform(300, -1.0, 1.0, 2);
    // The backward is the same map as the forward, on gy = loss_weights.
    let analytic = dropout_cpu(&loss_weights, p, seed).unwrap();
    let scale = 1.0 / (1.0 - p as f64);
    let mask = naive_mask(x.len(), p, seed);
    let numeric = numeric_grad_at(&x, 1e-3, |x| {
        x.iter().enumerate().map(|(i, &v)| if mask[i] { v * scale * loss_weights[i] as f64 } else { 0.0 }).sum()
    });
    // Linear in x: central differences are exact up to f64 rounding (the sum of 300 terms < 1e-12)
    // plus the f32 rounding of the loss weights times scale in the analytic gradient (< 1 ulp,
    // 1.2e-7 relative).
    assert_close("dropout grad", &numeric, &analytic, 1e-6, 1e-6);
}

test_device!(dropout_matches_naive_oracle, |dev| {
    for (k, shape, _) in cases_on(&dev, SHAPES, EMULATED_MAX) {
        let (p, seed) = ([0.5f32, 0.1, 0.9][k % 3], 1234 + k as u64);
        let (x_host, x) = rand_host_and_tensor(shape, k as u64, &dev);
        let y = dropout_fwd(&x, p, seed).unwrap().to_vec().unwrap();
        let gx = dropout_bwd(&x, p, seed).unwrap().to_vec().unwrap();
        // The same integer hash and one IEEE multiply by the same f32 scale: bit-identical, the
        // mask (the zeros) included (x is never 0 here, so a zero in y is a dropped element).
        let want = naive_dropout(&x_host, p, seed);
        assert_close(&format!("dropout fwd {shape:?}, p {p}"), &want, &y, 0.0, 0.0);
        assert_close(&format!("dropout bwd {shape:?}, p {p}"), &want, &gx, 0.0, 0.0);
    }
});

test_device!(dropout_is_identity_in_eval_mode_and_at_p_zero, |dev| {
    let (x_host, x) = rand_host_and_tensor(&[3, 4096], 5, &dev);
    let y = dropout(&mut Tape::eval(), &x, 0.5, 7).unwrap();
    assert_eq!((y.id(), y.to_vec().unwrap()), (x.id(), x_host.clone()), "eval mode returns x itself");
    let mut tape = Tape::train();
    tape.watch(&x);
    let y = dropout(&mut tape, &x, 0.0, 7).unwrap();
    assert_eq!((y.id(), y.to_vec().unwrap()), (x.id(), x_host), "p = 0 returns x itself");
    assert!(tape.is_empty());
});

test_device!(dropout_records_its_backward, |dev| {
    // loss = softmax_xent(dropout(x)): the recorded chain must equal the ops applied by hand.
    let x = rand_tensor(&[1, 40], 8, &dev);
    let labels = Tensor::from_vec(&[1], vec![13u32], &dev).unwrap();
    let mut tape = Tape::train();
    tape.watch(&x);
    let y = dropout(&mut tape, &x, 0.25, 77).unwrap();
    let loss = softmax_xent(&mut tape, &y, &labels).unwrap();
    assert_eq!(tape.len(), 2);
    let gx = tape.backward(&loss).unwrap().get(&x).expect("x has a gradient").to_vec().unwrap();
    let (_, probs) = softmax_xent_fwd(&y, &labels).unwrap();
    let one = Tensor::from_vec(&[1], vec![1.0], &dev).unwrap();
    let gy = softmax_xent_bwd(&probs, &labels, &one).unwrap();
    let want = dropout_bwd(&gy, 0.25, 77).unwrap().to_vec().unwrap();
    // The same kernels on the same values: identical; zero exactly where the mask drops.
    assert_close("dropout recorded grad", &want, &gx, 0.0, 0.0);
    let mask = naive_mask(40, 0.25, 77);
    assert!(gx.iter().zip(&mask).all(|(&g, &keep)| (g == 0.0) != keep), "{gx:?}");
});

test_device!(dropout_keeps_nan_where_it_drops, |dev| {
    // PyTorch multiplies by the mask (x * mask / (1 - p)): a dropped NaN or +-inf is NaN, not 0
    // (NaN * 0 and inf * 0 are NaN), a dropped finite value is +-0 (its sign times 0), a kept one
    // x * scale. The backward is the same map on gy.
    let (p, seed) = (0.5f32, 99);
    let keep = naive_mask(64, p, seed);
    let kept: Vec<usize> = (0..64).filter(|&i| keep[i]).take(4).collect();
    let dropped: Vec<usize> = (0..64).filter(|&i| !keep[i]).take(4).collect();
    assert!(kept.len() == 4 && dropped.len() == 4, "seed {seed} keeps and drops within 64");
    let n = kept.iter().chain(&dropped).max().unwrap() + 1;
    let mut x_host = uniform(n, -1.0, 1.0, 5);
    for idx in [&kept, &dropped] {
        (x_host[idx[0]], x_host[idx[1]], x_host[idx[2]], x_host[idx[3]]) =
            (f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.75);
    }
    let t = Tensor::from_vec(&[n], x_host.clone(), &dev).unwrap();
    let want = naive_dropout(&x_host, p, seed);
    let operand = |i: usize| format!("x {}, kept {}", x_host[i], keep[i]);
    assert_same_bits("forward", &want, &dropout_fwd(&t, p, seed).unwrap().to_vec().unwrap(), operand);
    assert_same_bits("backward", &want, &dropout_bwd(&t, p, seed).unwrap().to_vec().unwrap(), operand);
});

#[test]
fn dropout_rejects_bad_rates() {
    let x = Tensor::from_vec(&[2], vec![1.0, 2.0], &Device::Cpu).unwrap();
    for p in [1.0f32, 1.5, -0.1, f32::NAN] {
        assert_mentions(&err_msg(dropout_fwd(&x, p, 0)), &["dropout", "[0, 1)", &format!("found {p}")]);
        assert!(dropout_bwd(&x, p, 0).is_err());
        assert!(dropout(&mut Tape::eval(), &x, p, 0).is_err(), "eval mode still checks p");
    }
}
