//! Naive oracles that several test files compare the engine with: plain loops that follow
//! PyTorch's documented semantics, written apart from the library's CPU references (so that a
//! test of the CPU path compares it with something else) and slow where that keeps them obvious.
//! The oracles of one op alone live beside its tests (tests/<op>.rs).

/// The values as f64, for the oracles that work in f64.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// f32s of f64s (an oracle's values, to compare with the engine's).
pub fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&a| a as f32).collect()
}

/// PyTorch's relu: x where x > 0, +0.0 where x <= 0 (-0.0 included), and NaN where x is NaN (a
/// diverged value is not hidden).
pub fn relu(x: &[f32]) -> Vec<f32> {
    let mut y = Vec::with_capacity(x.len());
    for &v in x {
        y.push(if v.is_nan() || v > 0.0 { v } else { 0.0 });
    }
    y
}

/// PyTorch's threshold_backward for relu, from the output y: gx = 0 where y <= 0, else gy (so a
/// NaN output, which is not <= 0, passes its gradient; a zeroed one drops even a NaN gradient).
pub fn relu_backward(y: &[f32], gy: &[f32]) -> Vec<f32> {
    assert_eq!(y.len(), gy.len());
    let mut gx = Vec::with_capacity(y.len());
    for i in 0..y.len() {
        gx.push(if y[i] <= 0.0 { 0.0 } else { gy[i] });
    }
    gx
}

/// PyTorch's cross_entropy on logits x (N, C) row-major with class labels (N), in f64:
/// (per-row losses, softmax probabilities (N, C)). Row r: loss = log(sum_j exp(x_rj)) - x_r,label,
/// with the row's maximum subtracted before exp (the log-sum-exp trick: the same value, without
/// overflow). Finite logits only (the NaN and infinity cases are spelled out by the tests).
pub fn softmax_xent(x: &[f64], labels: &[u32], c: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(x.len(), labels.len() * c);
    let mut losses = Vec::with_capacity(labels.len());
    let mut probs = Vec::with_capacity(x.len());
    for (r, &label) in labels.iter().enumerate() {
        let row = &x[r * c..(r + 1) * c];
        let mut max = row[0];
        for &v in row {
            if v > max {
                max = v;
            }
        }
        let mut sum = 0.0;
        for &v in row {
            sum += (v - max).exp();
        }
        losses.push(max + sum.ln() - row[label as usize]);
        for &v in row {
            probs.push((v - max).exp() / sum);
        }
    }
    (losses, probs)
}

/// The gradient of `gloss` times the batch-mean cross-entropy with respect to the logits:
/// (probs - onehot(label)) * gloss / N, row by row.
pub fn softmax_xent_grad(probs: &[f64], labels: &[u32], c: usize, gloss: f64) -> Vec<f64> {
    let n = labels.len();
    let mut g = Vec::with_capacity(probs.len());
    for (r, &label) in labels.iter().enumerate() {
        for j in 0..c {
            let onehot = if j == label as usize { 1.0 } else { 0.0 };
            g.push((probs[r * c + j] - onehot) * gloss / n as f64);
        }
    }
    g
}

/// torch.argmax over each row of x (N, C): the index of the largest value, the first of equal
/// ones; a NaN counts as larger than everything (the first NaN wins).
pub fn argmax_rows(x: &[f32], c: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(x.len() / c);
    for row in x.chunks_exact(c) {
        let first_nan = row.iter().position(|v| v.is_nan());
        let best = first_nan.unwrap_or_else(|| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            row.iter().position(|&v| v == max).expect("the maximum is in the row")
        });
        out.push(best as u32);
    }
    out
}
