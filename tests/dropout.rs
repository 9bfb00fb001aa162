//! Dropout: the counter-based mask (statistics, determinism, CPU == CUDA bit for bit), scaling,
//! eval-mode identity, the backward, and argument errors.
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
        let dev = (dropped as f64 - n as f64 * p as f64).abs();
        assert!(dev <= 6.0 * sd, "p = {p}: dropped {dropped} of {n}, {dev} from the mean > 6 sd = {}", 6.0 * sd);
    }
    // p = 0 keeps everything (u >= 0 always).
    assert_eq!(kept(10_000, 0.0, 3), 10_000);
}

#[test]
fn dropout_masks_depend_on_seed_and_index_only() {
    let n = 100_000u64;
    let mask = |seed| (0..n).map(|i| dropout_mask_keep(seed, i, 0.5)).collect::<Vec<_>>();
    assert_eq!(mask(42), mask(42), "same seed, same mask");
    // Masks of neighbouring seeds must be independent: they agree on ~half the elements
    // (Binomial(n, 1/2), sd = 158; 6 sd = 950).
    for (a, b) in [(42u64, 43u64), (0, 1), (7, 7 + (1 << 32))] {
        let (ma, mb) = (mask(a), mask(b));
        let agree = ma.iter().zip(&mb).filter(|(x, y)| x == y).count() as f64;
        assert!((agree - n as f64 / 2.0).abs() < 950.0, "seeds {a} and {b}: masks agree on {agree} of {n}");
    }
    // Nor may a mask be its neighbour's shifted by one index.
    let m = mask(5);
    let shifted = m.windows(2).filter(|w| w[0] == w[1]).count() as f64;
    assert!((shifted - (n - 1) as f64 / 2.0).abs() < 950.0, "adjacent elements agree {shifted} times");
}

#[test]
fn dropout_cpu_backward_matches_finite_differences() {
    let (p, seed) = (0.3f32, 99u64);
    let x = uniform(300, -1.0, 1.0, 1);
    let w = uniform(300, -1.0, 1.0, 2);
    let analytic = dropout_cpu(&w, p, seed).unwrap(); // the backward is the same map, on gy = w
    let scale = 1.0 / (1.0 - p as f64);
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let numeric = numeric_grad(&x64, 1e-3, |x| {
        x.iter()
            .enumerate()
            .map(|(i, &v)| if dropout_mask_keep(seed, i as u64, p) { v * scale * w[i] as f64 } else { 0.0 })
            .sum()
    });
    let numeric: Vec<f32> = numeric.iter().map(|&v| v as f32).collect();
    // Linear in x: central differences are exact up to f64 rounding (the sum of 300 terms < 1e-12)
    // plus the f32 rounding of w * scale in the analytic gradient (< 1 ulp, 1.2e-7 relative).
    assert_close("dropout grad", &numeric, &analytic, 1e-6, 1e-6);
}

test_device!(dropout_matches_cpu_reference, |dev| {
    for (k, shape) in SHAPES.iter().enumerate() {
        let (p, seed) = ([0.5f32, 0.1, 0.9][k % 3], 1234 + k as u64);
        let x = rand_tensor(shape, k as u64, &dev);
        let y = dropout_fwd(&x, p, seed).unwrap().to_vec().unwrap();
        let gx = dropout_bwd(&x, p, seed).unwrap().to_vec().unwrap();
        let xh = x.to_vec().unwrap();
        let r = dropout_cpu(&xh, p, seed).unwrap();
        // Same integer hash and one IEEE multiply by the same f32 scale: bit-identical, so the
        // zero pattern (the mask) is identical too; the loop below checks it element by element
        // against dropout_mask_keep (an x that is exactly 0 cannot hide a mask difference there).
        assert_close("dropout fwd", &r, &y, 0.0, 0.0);
        assert_close("dropout bwd", &r, &gx, 0.0, 0.0);
        let scale = 1.0 / (1.0 - p);
        for (i, (&xv, &yv)) in xh.iter().zip(&y).enumerate() {
            let keep = dropout_mask_keep(seed, i as u64, p);
            assert_eq!(yv, if keep { xv * scale } else { 0.0 }, "element {i} of {shape:?}");
        }
    }
});

test_device!(dropout_is_identity_in_eval_mode_and_at_p_zero, |dev| {
    let x = rand_tensor(&[3, 4096], 5, &dev);
    let y = dropout(&mut Tape::eval(), &x, 0.5, 7).unwrap();
    assert_eq!(y.id(), x.id(), "eval mode returns x itself");
    let mut tape = Tape::train();
    tape.watch(&x);
    let y = dropout(&mut tape, &x, 0.0, 7).unwrap();
    assert_eq!(y.id(), x.id(), "p = 0 returns x itself");
    assert!(tape.is_empty());
    assert_eq!(y.to_vec().unwrap(), x.to_vec().unwrap());
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
    // The same kernels on the same values: identical.
    assert_close("dropout recorded grad", &want, &gx, 0.0, 0.0);
    assert!(gx.iter().enumerate().all(|(i, &g)| (g == 0.0) != dropout_mask_keep(77, i as u64, 0.25)));
});

test_device!(dropout_keeps_nan_where_it_drops, |dev| {
    // PyTorch multiplies by the mask (x * mask / (1 - p)): a dropped NaN or +-inf is NaN, not 0
    // (NaN * 0 and inf * 0 are NaN), a dropped finite value is +-0 (its sign times 0), a kept one
    // x * scale. The backward is the same map on gy.
    let (p, seed) = (0.5f32, 99);
    let scale = 1.0 / (1.0 - p);
    let keep: Vec<bool> = (0..64).map(|i| dropout_mask_keep(seed, i, p)).collect();
    let kept: Vec<usize> = (0..64).filter(|&i| keep[i]).take(4).collect();
    let dropped: Vec<usize> = (0..64).filter(|&i| !keep[i]).take(4).collect();
    assert!(kept.len() == 4 && dropped.len() == 4, "seed {seed} keeps and drops within 64");
    let n = kept.iter().chain(&dropped).max().unwrap() + 1;
    let mut v = uniform(n, -1.0, 1.0, 5);
    for idx in [&kept, &dropped] {
        (v[idx[0]], v[idx[1]], v[idx[2]], v[idx[3]]) = (f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.75);
    }
    let t = Tensor::from_vec(&[n], v.clone(), &dev).unwrap();
    let want: Vec<f32> = (0..n).map(|i| v[i] * if keep[i] { scale } else { 0.0 }).collect();
    assert!(dropped[..3].iter().all(|&i| want[i].is_nan()) && want[dropped[3]].to_bits() == (-0.0f32).to_bits());
    let fwd = dropout_fwd(&t, p, seed).unwrap().to_vec().unwrap();
    let bwd = dropout_bwd(&t, p, seed).unwrap().to_vec().unwrap();
    let cpu = dropout_cpu(&v, p, seed).unwrap();
    for (what, got) in [("forward", &fwd), ("backward", &bwd), ("CPU reference", &cpu)] {
        for i in 0..n {
            let same = want[i].to_bits() == got[i].to_bits() || (want[i].is_nan() && got[i].is_nan());
            assert!(same, "{what}: element {i} (x {}, kept {}): {} instead of {}", v[i], keep[i], got[i], want[i]);
        }
    }
});

#[test]
fn dropout_rejects_bad_rates() {
    let x = Tensor::from_vec(&[2], vec![1.0, 2.0], &Device::Cpu).unwrap();
    for p in [1.0f32, 1.5, -0.1, f32::NAN] {
        let err = dropout_fwd(&x, p, 0).unwrap_err().to_string();
        assert!(err.contains("[0, 1)") && err.contains(&format!("{p}")), "{err}");
        assert!(dropout_bwd(&x, p, 0).is_err());
        assert!(dropout(&mut Tape::eval(), &x, p, 0).is_err(), "eval mode still checks p");
    }
}
