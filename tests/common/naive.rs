//! Naive oracles that several test files compare the engine with: plain loops that follow
//! PyTorch's documented semantics, written apart from the library's CPU references (so that a
//! test of the CPU path compares it with something else) and slow where that keeps them obvious.
//! (Some oracles of one op alone live beside its tests, tests/<op>.rs.)

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

/// torch.sigmoid in f64: 1 / (1 + exp(-x)), the definition as written. f64 has the range that
/// f32 inputs need (exp(-x) overflows only to +inf, where the value is 0), so it needs no
/// rearranging; -inf gives 0, +inf gives 1, NaN stays NaN.
pub fn sigmoid(x: &[f32]) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for &v in x {
        y.push(1.0 / (1.0 + (-(v as f64)).exp()));
    }
    y
}

/// The sigmoid's backward from its output y, in f64: gx = gy * y * (1 - y) (the derivative of
/// the sigmoid at x is sigmoid(x) * (1 - sigmoid(x))).
pub fn sigmoid_backward(y: &[f32], gy: &[f32]) -> Vec<f64> {
    assert_eq!(y.len(), gy.len());
    let mut gx = Vec::with_capacity(y.len());
    for i in 0..y.len() {
        let y = y[i] as f64;
        gx.push(gy[i] as f64 * y * (1.0 - y));
    }
    gx
}

/// The geometry of PyTorch's nn.AvgPool2d(k, stride=s, padding=p, ceil_mode=False,
/// count_include_pad) on an input x (N, C, H, W).
#[derive(Debug, Clone, Copy)]
pub struct AvgPool {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub s: usize,
    pub p: usize,
    pub count_include_pad: bool,
}

impl AvgPool {
    pub fn new(x_shape: &[usize], k: usize, s: usize, p: usize, count_include_pad: bool) -> AvgPool {
        let &[n, c, h, w] = x_shape else { panic!("x (N, C, H, W), not {x_shape:?}") };
        AvgPool { n, c, h, w, k, s, p, count_include_pad }
    }

    /// (OH, OW): floor((H + 2p - k) / s) + 1, as PyTorch's docs give the output size.
    pub fn out_hw(&self) -> (usize, usize) {
        ((self.h + 2 * self.p - self.k) / self.s + 1, (self.w + 2 * self.p - self.k) / self.s + 1)
    }

    pub fn out_shape(&self) -> Vec<usize> {
        let (oh, ow) = self.out_hw();
        vec![self.n, self.c, oh, ow]
    }

    /// The k x k cells of output (oy, ox)'s window, as (row, column) of x (signed: a padding cell
    /// is outside [0, H) x [0, W)), and the divisor: the number of cells inside the padded input
    /// [-p, H + p) x [-p, W + p) with count_include_pad, else the number inside x itself.
    fn window(&self, oy: usize, ox: usize) -> (Vec<(i64, i64)>, f64) {
        let (h, w, p) = (self.h as i64, self.w as i64, self.p as i64);
        let (mut cells, mut padded, mut real) = (Vec::new(), 0, 0);
        for ky in 0..self.k {
            for kx in 0..self.k {
                let iy = (oy * self.s + ky) as i64 - p;
                let ix = (ox * self.s + kx) as i64 - p;
                if iy < h + p && ix < w + p {
                    padded += 1;
                }
                if (0..h).contains(&iy) && (0..w).contains(&ix) {
                    real += 1;
                }
                cells.push((iy, ix));
            }
        }
        (cells, if self.count_include_pad { padded } else { real } as f64)
    }

    fn real(&self, (iy, ix): (i64, i64)) -> Option<usize> {
        ((0..self.h as i64).contains(&iy) && (0..self.w as i64).contains(&ix))
            .then(|| iy as usize * self.w + ix as usize)
    }

    /// The forward in f64: each window's sum (padding cells are zeros) over its divisor.
    pub fn forward(&self, x: &[f64]) -> Vec<f64> {
        assert_eq!(x.len(), self.n * self.c * self.h * self.w, "x of {self:?}");
        let (oh, ow) = self.out_hw();
        let mut y = Vec::new();
        for plane in x.chunks_exact(self.h * self.w) {
            for oy in 0..oh {
                for ox in 0..ow {
                    let (cells, divisor) = self.window(oy, ox);
                    let sum: f64 = cells.into_iter().map(|cell| self.real(cell).map_or(0.0, |i| plane[i])).sum();
                    y.push(sum / divisor);
                }
            }
        }
        y
    }

    /// The backward in f64: gy (N, C, OH, OW) -> gx (N, C, H, W); each output sends gy / divisor
    /// to every real cell of its window (dy/dx of the forward's sum over divisor).
    pub fn backward(&self, gy: &[f64]) -> Vec<f64> {
        let (oh, ow) = self.out_hw();
        assert_eq!(gy.len(), self.n * self.c * oh * ow, "gy of {self:?}");
        let mut gx = vec![0.0f64; self.n * self.c * self.h * self.w];
        for (gxp, gp) in gx.chunks_exact_mut(self.h * self.w).zip(gy.chunks_exact(oh * ow)) {
            for oy in 0..oh {
                for ox in 0..ow {
                    let (cells, divisor) = self.window(oy, ox);
                    for i in cells.into_iter().filter_map(|cell| self.real(cell)) {
                        gxp[i] += gp[oy * ow + ox] / divisor;
                    }
                }
            }
        }
        gx
    }
}

/// nn.AdaptiveAvgPool2d((1, 1)) in f64: x (N, C, H, W) -> (N, C, 1, 1), each plane's mean.
pub fn global_avg_pool2d(x: &[f64], x_shape: &[usize]) -> Vec<f64> {
    let &[n, c, h, w] = x_shape else { panic!("x (N, C, H, W), not {x_shape:?}") };
    assert_eq!(x.len(), n * c * h * w);
    let mut y = Vec::new();
    for plane in 0..n * c {
        let mut sum = 0.0;
        for i in 0..h * w {
            sum += x[plane * h * w + i];
        }
        y.push(sum / (h * w) as f64);
    }
    y
}

/// Its backward: gy (N, C, 1, 1) -> gx (N, C, H, W), gy / (H * W) at every element of the plane.
pub fn global_avg_pool2d_backward(gy: &[f64], x_shape: &[usize]) -> Vec<f64> {
    let &[n, c, h, w] = x_shape else { panic!("x (N, C, H, W), not {x_shape:?}") };
    assert_eq!(gy.len(), n * c);
    let mut gx = Vec::new();
    for &g in gy {
        for _ in 0..h * w {
            gx.push(g / (h * w) as f64);
        }
    }
    gx
}
