//! The CPU references' matrix product: C += A·B, row-major, blocked so that each row of B is
//! loaded once for four rows of C and the inner loop runs over contiguous memory (the
//! compiler vectorises it). Plain and single-threaded: callers split work over the cores.

/// Rows of C updated together: each B element loaded feeds this many FMAs.
const MR: usize = 4;
/// Columns of C per block, so that MR rows of the block stay in L1 (4 x 512 x 4 B = 8 KiB).
const NC: usize = 512;

/// c (m x n) += a (m x k) · b (k x n); all row-major and contiguous.
pub fn gemm_acc(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    debug_assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    for j0 in (0..n).step_by(NC) {
        let j1 = (j0 + NC).min(n);
        for (blk, c_rows) in c[..m * n].chunks_mut(MR * n).enumerate() {
            let i0 = blk * MR;
            let rows = c_rows.len() / n;
            if rows == MR {
                let (c0, rest) = c_rows.split_at_mut(n);
                let (c1, rest) = rest.split_at_mut(n);
                let (c2, c3) = rest.split_at_mut(n);
                let (c0, c1, c2, c3) = (&mut c0[j0..j1], &mut c1[j0..j1], &mut c2[j0..j1], &mut c3[j0..j1]);
                for kk in 0..k {
                    let (a0, a1, a2, a3) =
                        (a[i0 * k + kk], a[(i0 + 1) * k + kk], a[(i0 + 2) * k + kk], a[(i0 + 3) * k + kk]);
                    let brow = &b[kk * n + j0..kk * n + j1];
                    for ((((x0, x1), x2), x3), &bv) in
                        c0.iter_mut().zip(c1.iter_mut()).zip(c2.iter_mut()).zip(c3.iter_mut()).zip(brow)
                    {
                        *x0 += a0 * bv;
                        *x1 += a1 * bv;
                        *x2 += a2 * bv;
                        *x3 += a3 * bv;
                    }
                }
            } else {
                for r in 0..rows {
                    let crow = &mut c_rows[r * n + j0..r * n + j1];
                    for kk in 0..k {
                        let av = a[(i0 + r) * k + kk];
                        let brow = &b[kk * n + j0..kk * n + j1];
                        crow.iter_mut().zip(brow).for_each(|(x, &bv)| *x += av * bv);
                    }
                }
            }
        }
    }
}

/// The transpose of a (rows x cols) row-major matrix.
pub fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; rows * cols];
    for (r, row) in a.chunks_exact(cols).take(rows).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

/// Dot product with 8 independent partial sums, so that it vectorises (a single f32 running sum
/// cannot be reordered by the compiler): the dense CPU reference.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_the_textbook_loop_on_odd_sizes() {
        for &(m, n, k) in &[(1, 1, 1), (5, 7, 3), (4, 600, 9), (9, 1030, 2), (3, 2, 17)] {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
            let mut c = vec![1.0f32; m * n];
            gemm_acc(m, n, k, &a, &b, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = 1.0 + (0..k).map(|kk| a[i * k + kk] * b[kk * n + j]).sum::<f32>();
                    // Small integers and halves: every product and sum is exact in f32.
                    assert_eq!(c[i * n + j], want, "({m},{n},{k}) at ({i},{j})");
                }
            }
        }
        assert_eq!(transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }
}
