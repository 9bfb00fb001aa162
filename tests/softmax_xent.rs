//! Softmax cross-entropy: every device against the naive f64 oracle (tests/common/naive.rs:
//! loss, probabilities, gradient, statistics, argmax), the CPU reference's backward against
//! finite differences, stability, NaN and infinite logits as PyTorch gives them, bad labels, errors.
mod common;
use common::*;
use ptxgrad::ops::softmax_xent::{
    accumulate_stats, argmax_rows_cpu, softmax_xent, softmax_xent_bwd, softmax_xent_bwd_cpu, softmax_xent_fwd,
    softmax_xent_fwd_cpu,
};
use ptxgrad::{Device, Tape, Tensor};

/// (N, C, logit scale)
const CASES: &[(usize, usize, f32)] = &[
    (128, 10, 3.0),   // AlexNet's head, batch 128
    (1, 10, 3.0),     // batch 1
    (3, 10, 3.0),     // batch 3
    (128, 1000, 3.0), // ImageNet-sized rows: 32 columns per lane
    (1, 1, 3.0),      // one class: loss 0, probability 1
    (3, 1, 3.0),
    (7, 33, 3.0),    // C just above a warp
    (5, 31, 3.0),    // C just below a warp
    (1000, 10, 3.0), // more rows than one reduction block's 256 threads
    (2, 1000, 1e4),  // huge logits: exp would overflow without the max subtraction
    (128, 10, 1e4),
    (300, 7, 0.0), // all-equal logits: uniform probabilities, argmax 0 everywhere
];

fn labels_for(n: usize, c: usize, seed: u64) -> Vec<u32> {
    uniform(n, 0.0, c as f32, seed).iter().map(|&v| (v as u32).min(c as u32 - 1)).collect()
}

/// The batch-mean loss of the naive oracle.
fn mean_loss(x: &[f64], labels: &[u32], c: usize) -> f64 {
    naive::softmax_xent(x, labels, c).0.iter().sum::<f64>() / labels.len() as f64
}

#[test]
fn softmax_xent_cpu_backward_matches_finite_differences() {
    for (n, c) in [(3usize, 5usize), (1, 1), (4, 10), (2, 40)] {
        let x = uniform(n * c, -3.0, 3.0, 1);
        let labels = labels_for(n, c, 2);
        let (_, probs) = softmax_xent_fwd_cpu(&x, &labels, c).unwrap();
        let gloss = 0.75f32;
        let analytic = softmax_xent_bwd_cpu(&probs, &labels, c, gloss).unwrap();
        let numeric = numeric_grad_at(&x, 1e-4, |x| gloss as f64 * mean_loss(x, &labels, c));
        // Smooth loss: central differences err by ~eps^2 * f''' ~ 1e-8, f64 cancellation by
        // ~1e-16 / 1e-4 = 1e-12; the analytic side rounds probs to f32 (6e-8 relative). 1e-6 covers all.
        assert_close("softmax_xent grad", &numeric, &analytic, 1e-6, 1e-5);
    }
}

#[test]
fn softmax_xent_is_stable_for_huge_logits() {
    let x = [1e4f32, 0.0, -1e4, 0.0, 1e4, 1e4];
    let (losses, probs) = softmax_xent_fwd_cpu(&x, &[0, 0], 3).unwrap();
    // Row 0: the label holds all the mass: loss log(1 + e^-1e4 + e^-2e4) = 0.
    // Row 1: loss = 1e4 + log 2 - 0.
    assert_eq!(losses[0], 0.0);
    assert_close("huge loss", &[1e4 + std::f32::consts::LN_2], &losses[1..], 0.0, 1e-7);
    assert_eq!(probs, vec![1.0, 0.0, 0.0, 0.0, 0.5, 0.5]);
}

test_device!(softmax_xent_matches_naive_oracle, |dev| {
    for (k, &(n, c, scale)) in CASES.iter().enumerate() {
        let x_host: Vec<f32> = uniform(n * c, -1.0, 1.0, k as u64).iter().map(|v| v * scale).collect();
        let labels_host = labels_for(n, c, 100 + k as u64);
        let x = Tensor::from_vec(&[n, c], x_host.clone(), &dev).unwrap();
        let labels = Tensor::from_vec(&[n], labels_host.clone(), &dev).unwrap();
        let (row_losses, probs_f64) = naive::softmax_xent(&naive::f64s(&x_host), &labels_host, c);
        let loss_sum: f64 = row_losses.iter().sum();
        let (loss, probs) = softmax_xent_fwd(&x, &labels).unwrap();
        // The kernel's exp/log (<= 2 ulp each) and its f32 sums against the f64 oracle: each row
        // loss is off by ~1e-6 * (1 + |logits|): rtol 1e-5 on the mean (whose magnitude is about
        // the logits' for the 1e4 cases) plus an atol for the near-zero losses.
        let case = format!("case {k} ({n} x {c}, scale {scale})");
        assert_close(&format!("loss, {case}"), &[(loss_sum / n as f64) as f32], &loss.to_vec().unwrap(), 1e-5, 1e-5);
        // Probabilities: a few ulp of relative error from exp and the division; atol for the
        // tiny ones (and the underflowed ones of the 1e4 cases).
        assert_close(&format!("probs, {case}"), &naive::f32s(&probs_f64), &probs.to_vec().unwrap(), 1e-7, 1e-5);
        let gloss = 0.7f32;
        let gx = softmax_xent_bwd(&probs, &labels, &Tensor::from_vec(&[1], vec![gloss], &dev).unwrap()).unwrap();
        let want_gx = naive::softmax_xent_grad(&probs_f64, &labels_host, c, gloss as f64);
        // The gradient is (probs - onehot) * g / N: the probability tolerance scaled by g / N <= 1.
        assert_close(&format!("grad, {case}"), &naive::f32s(&want_gx), &gx.to_vec().unwrap(), 1e-7, 1e-5);

        // Argmax is exact; ties (the all-equal case) go to the first column.
        let argmax = naive::argmax_rows(&x_host, c);
        assert_eq!(argmax_rows_cpu(&x_host, c), argmax, "argmax, {case}");
        // Statistics added twice onto [1.5, 2]: [loss sum, correct count] each time.
        let mut stats = Tensor::from_vec(&[2], vec![1.5, 2.0], &dev).unwrap();
        accumulate_stats(&x, &labels, &mut stats).unwrap();
        accumulate_stats(&x, &labels, &mut stats).unwrap();
        let correct = argmax.iter().zip(&labels_host).filter(|(a, b)| a == b).count() as f32;
        let got = stats.to_vec().unwrap();
        // Loss sum: the per-row tolerance above times N (<= 1000). Count: exact.
        assert_close(&format!("stats loss, {case}"), &[1.5 + 2.0 * loss_sum as f32], &got[..1], 1e-3, 1e-5);
        assert_eq!(got[1], 2.0 + 2.0 * correct, "stats correct count, {case}");
    }
});

test_device!(argmax_takes_the_first_of_ties_and_nan_as_largest, |dev| {
    // The kernels' argmax is the one the correct count uses: a row counts as correct exactly when
    // its label is the argmax, so labels set to the expected argmax count every row, and labels
    // one off count none.
    let check = |x: Vec<f32>, c: usize, want: Vec<u32>| {
        assert_eq!(argmax_rows_cpu(&x, c), want, "argmax_rows_cpu");
        let n = want.len();
        let x = Tensor::from_vec(&[n, c], x, &dev).unwrap();
        for (off, correct) in [(0, n as f32), (1, 0.0)] {
            let labels: Vec<u32> = want.iter().map(|&a| (a + off) % c as u32).collect();
            let mut stats = Tensor::zeros(&[2], &dev).unwrap();
            accumulate_stats(&x, &Tensor::from_vec(&[n], labels, &dev).unwrap(), &mut stats).unwrap();
            assert_eq!(stats.to_vec().unwrap()[1], correct, "correct count with labels {off} off {want:?}");
        }
    };
    #[rustfmt::skip]
    let x = vec![
        1.0, 3.0, 3.0, 2.0,
        f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY, f32::NEG_INFINITY,
        0.0, f32::NAN, 5.0, f32::NAN,
        -1.0, -1.0, -1.0, 0.5,
    ];
    check(x, 4, vec![1, 0, 1, 3]);
    // 40 columns: ties across different lanes of the warp (columns 3 and 35 share lane 3, 8 is lane 8).
    let mut row = vec![0.0f32; 40];
    (row[8], row[35], row[3]) = (2.0, 2.0, 2.0);
    check(row, 40, vec![3]);
});

test_device!(softmax_xent_records_its_backward, |dev| {
    // x: (3, 10) logits; the tape's gradient of the loss itself (gloss = 1).
    let (x_host, x) = rand_host_and_tensor(&[3, 10], 4, &dev);
    let labels_host = vec![1u32, 9, 0];
    let labels = Tensor::from_vec(&[3], labels_host.clone(), &dev).unwrap();
    let mut tape = Tape::train();
    tape.watch(&x);
    let loss = softmax_xent(&mut tape, &x, &labels).unwrap();
    assert_eq!(loss.shape(), &[1]);
    let gx = tape.backward(&loss).unwrap().get(&x).expect("x has a gradient").to_vec().unwrap();
    let (_, probs) = naive::softmax_xent(&naive::f64s(&x_host), &labels_host, 10);
    let want = naive::f32s(&naive::softmax_xent_grad(&probs, &labels_host, 10, 1.0));
    // As in softmax_xent_matches_naive_oracle.
    assert_close("recorded grad", &want, &gx, 1e-7, 1e-5);
    // Each row's gradient sums to 0 (probabilities sum to 1).
    for r in gx.chunks(10) {
        assert!(r.iter().sum::<f32>().abs() < 1e-6, "{r:?}");
    }
});

test_device!(softmax_xent_propagates_nan_and_infinite_logits_as_pytorch, |dev| {
    // One row at a time (loss, gradient, statistics), as PyTorch's cross_entropy gives them:
    // a NaN logit anywhere in the row, or a +inf one (inf - inf in the log-sum-exp), makes the
    // loss and the row's whole gradient NaN; a -inf logit off the label only drops its class
    // (finite loss, gradient 0 there); -inf at the label makes the loss +inf.
    let (nan, inf) = (f32::NAN, f32::INFINITY);
    let finite = |row: &[f64], label: u32| naive::softmax_xent(row, &[label], row.len()).0[0] as f32;
    #[rustfmt::skip]
    let cases: [([f32; 4], u32, f32); 6] = [
        ([0.5, nan, -1.0, 2.0], 0, nan),   // NaN off the label
        ([0.5, 1.0, nan, 2.0], 2, nan),    // NaN at the label
        ([inf, 0.0, 1.0, 2.0], 1, nan),    // +inf
        ([nan; 4], 3, nan),                // all NaN
        ([-inf, 1.0, 2.0, 3.0], 3, finite(&[1.0, 2.0, 3.0], 2)), // the -inf class drops out
        ([-inf, 0.0, 0.0, 0.0], 0, inf),
    ];
    let one = Tensor::from_vec(&[1], vec![1.0], &dev).unwrap();
    for (row, label, want) in cases {
        let x = Tensor::from_vec(&[1, 4], row.to_vec(), &dev).unwrap();
        let labels = Tensor::from_vec(&[1], vec![label], &dev).unwrap();
        let (loss, probs) = softmax_xent_fwd(&x, &labels).unwrap();
        let loss = loss.to_vec().unwrap()[0];
        // NaN for NaN, +inf for +inf, else within rounding (f32 on the device, f64 on the CPU).
        let like = |got: f32| if want.is_nan() { got.is_nan() } else { got == want || (got - want).abs() < 1e-6 };
        assert!(like(loss), "row {row:?}, label {label}: loss {loss}, PyTorch gives {want}");
        let gx = softmax_xent_bwd(&probs, &labels, &one).unwrap().to_vec().unwrap();
        if want.is_nan() {
            assert!(gx.iter().all(|g| g.is_nan()), "row {row:?}: gradient {gx:?}");
        } else if want.is_finite() {
            // The -inf class has probability 0: its gradient is 0; the row still sums to 0.
            assert!(gx[0] == 0.0 && gx.iter().all(|g| g.is_finite()) && gx.iter().sum::<f32>().abs() < 1e-6, "{gx:?}");
        } else {
            // -inf at the label: softmax - onehot is still finite, [-1, 1/3, 1/3, 1/3].
            assert_close("gradient, -inf at the label", &[-1.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0], &gx, 1e-6, 0.0);
        }
        let mut stats = Tensor::zeros(&[2], &dev).unwrap();
        accumulate_stats(&x, &labels, &mut stats).unwrap();
        let s = stats.to_vec().unwrap();
        assert!(like(s[0]), "row {row:?}, label {label}: stats {s:?}");
    }
    // In a batch, one NaN row makes the mean loss NaN and leaves the other rows' gradients finite.
    let x = Tensor::from_vec(&[2, 4], vec![0.5, 1.0, -1.0, 2.0, 0.5, nan, -1.0, 2.0], &dev).unwrap();
    let labels = Tensor::from_vec(&[2], vec![3u32, 0], &dev).unwrap();
    let (loss, probs) = softmax_xent_fwd(&x, &labels).unwrap();
    assert!(loss.to_vec().unwrap()[0].is_nan());
    let gx = softmax_xent_bwd(&probs, &labels, &one).unwrap().to_vec().unwrap();
    assert!(gx[..4].iter().all(|g| g.is_finite()) && gx[4..].iter().all(|g| g.is_nan()), "{gx:?}");
});

#[test]
fn softmax_xent_rejects_out_of_range_labels_on_cpu() {
    let x = rand_tensor(&[3, 10], 4, &Device::Cpu);
    let labels = Tensor::from_vec(&[3], vec![1u32, 10, 0], &Device::Cpu).unwrap();
    let msg = err_msg(softmax_xent_fwd(&x, &labels));
    assert_mentions(&msg, &["softmax_xent", "row 1", "label 10", "10 classes"]);
    let mut stats = Tensor::zeros(&[2], &Device::Cpu).unwrap();
    assert_mentions(&err_msg(accumulate_stats(&x, &labels, &mut stats)), &["row 1", "label 10"]);
    assert_eq!(stats.to_vec().unwrap(), vec![0.0, 0.0], "stats untouched");
}

/// On the CUDA path (no check on the host, which would cost a copy per step) a label >= C makes
/// its row's loss NaN, is never used as an index, and counts as not correct.
fn out_of_range_labels_are_guarded(dev: Device) {
    let x = rand_tensor(&[3, 10], 4, &dev);
    let labels = Tensor::from_vec(&[3], vec![1u32, 4_000_000_000, 0], &dev).unwrap();
    let (loss, probs) = softmax_xent_fwd(&x, &labels).unwrap();
    assert!(loss.to_vec().unwrap()[0].is_nan(), "a bad label makes the loss NaN");
    let one = Tensor::from_vec(&[1], vec![1.0], &dev).unwrap();
    let gx = softmax_xent_bwd(&probs, &labels, &one).unwrap().to_vec().unwrap();
    assert!(gx.iter().all(|g| g.is_finite()), "the backward never indexes by the bad label: {gx:?}");
    let mut stats = Tensor::zeros(&[2], &dev).unwrap();
    accumulate_stats(&x, &labels, &mut stats).unwrap();
    let s = stats.to_vec().unwrap();
    assert!(s[0].is_nan() && s[1] <= 2.0, "{s:?}");
}

#[test]
fn softmax_xent_guards_out_of_range_labels_emulated() {
    out_of_range_labels_are_guarded(Device::parse("emu").unwrap());
}

#[test]
fn softmax_xent_guards_out_of_range_labels_on_cuda() {
    if let Some(dev) = gpu_or_skip("softmax_xent_guards_out_of_range_labels_on_cuda") {
        out_of_range_labels_are_guarded(dev);
    }
}

#[test]
fn softmax_xent_rejects_bad_shapes() {
    let dev = Device::Cpu;
    let x = |shape: &[usize]| rand_tensor(shape, 0, &dev);
    let labels = Tensor::from_vec(&[3], vec![0u32; 3], &dev).unwrap();
    assert_mentions(&err_msg(softmax_xent_fwd(&x(&[30]), &labels)), &["2-D", "[30]"]);
    assert_mentions(&err_msg(softmax_xent_fwd(&x(&[4, 10]), &labels)), &["labels of shape [4]", "found [3]"]);
    assert_mentions(&err_msg(softmax_xent_fwd(&x(&[3, 0]), &labels)), &["C >= 1"]);
    let probs = x(&[3, 10]);
    assert_mentions(&err_msg(softmax_xent_bwd(&probs, &labels, &x(&[2]))), &["gloss of shape [1]", "found [2]"]);
    let mut stats = Tensor::zeros(&[3], &dev).unwrap();
    assert_mentions(&err_msg(accumulate_stats(&probs, &labels, &mut stats)), &["stats of shape [2]", "found [3]"]);
}
