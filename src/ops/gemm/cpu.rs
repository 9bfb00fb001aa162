//! The CPU references' matrix products, row-major and contiguous, single-threaded (callers split
//! the work over the cores):
//! - `gemm_acc`: C (m x n) += A (m x k) · B (k x n);
//! - `gemm_abt_acc`: C (m x n) += A (m x k) · B^T, B stored (n x k): both operands are read
//!   along k, so a product with a transposed operand needs no transposed copy.
//!
//! Design rules (the same as a GPU tile's, on a CPU's registers):
//! - Each output tile is summed in registers across the whole k loop (k-block, for
//!   `gemm_abt_acc`) and added to C once: C is read and written once per tile, not per k step.
//! - `gemm_acc` tiles are MR x NR = 6 x 16: per k step, 6 broadcasts of A and 2 vectors of B
//!   feed 12 vector multiply-adds into 12 accumulators (of the 16 AVX registers). B's 16-column
//!   panel is packed first (k x 16, zero-padded past n), so that the tile's loads are
//!   contiguous and the panel stays in L1 while every 6-row block of A passes over it.
//! - `gemm_abt_acc` tiles are 4 rows of A x 3 rows of B: per 8 values of k, 7 vector loads feed
//!   12 multiply-adds into 12 vectors of 8 partial sums, added up at the end of each k-block.
//! - On x86-64 CPUs with AVX2 and FMA (checked at run time) the tiles are AVX2 intrinsics with
//!   fused multiply-adds (module `avx2`: the compiler does not keep an array of accumulators in
//!   registers on its own); elsewhere the same tiles are plain loops, a multiply and an add. The
//!   two round differently, so the CPU's results are reproducible on one kind of CPU, not across
//!   kinds (the references are compared with tolerances, never bit for bit, to GPUs).

/// Rows of A per `gemm_acc` tile.
const MR: usize = 6;
/// Columns of B per `gemm_acc` tile (two 8-float vectors).
const NR: usize = 16;
/// Rows of A per `gemm_abt_acc` tile.
const TA: usize = 4;
/// Rows of B per `gemm_abt_acc` tile.
const TB: usize = 3;
/// Values of k per `gemm_abt_acc` step: one 8-float vector.
const KV: usize = 8;
/// Values of k per `gemm_abt_acc` block (4 KB of each row): a tile's rows stay in L1, and the
/// block of the operand re-read for every tile stays in L2.
const KB: usize = 1024;

/// c (m x n) += a (m x k) · b (k x n).
pub fn gemm_acc(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm_acc: operands shorter than their shapes");
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU supports AVX2 and FMA, the features the function is compiled for.
        return unsafe { avx2::gemm_acc(m, n, k, a, b, c) };
    }
    gemm_acc_with::<false>(m, n, k, a, b, c)
}

/// c (m x n) += a (m x k) · b^T, b stored (n x k).
pub fn gemm_abt_acc(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(
        a.len() >= m * k && b.len() >= n * k && c.len() >= m * n,
        "gemm_abt_acc: operands shorter than their shapes"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: as in `gemm_acc`.
        return unsafe { avx2::gemm_abt_acc(m, n, k, a, b, c) };
    }
    gemm_abt_acc_with::<false>(m, n, k, a, b, c)
}

/// The loops of `gemm_acc` around its tiles; `SIMD`: the `avx2` tiles (set only inside functions
/// compiled for AVX2 and FMA).
#[inline(always)]
fn gemm_acc_with<const SIMD: bool>(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    // panel: (k, NR), B's columns j0..j0 + w, zeros past w.
    let mut panel = vec![0.0f32; k * NR];
    for j0 in (0..n).step_by(NR) {
        let w = NR.min(n - j0);
        for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
            row[..w].copy_from_slice(&b[kk * n + j0..][..w]);
        }
        for i0 in (0..m).step_by(MR) {
            let (a_rows, c_rows) = (&a[i0 * k..], &mut c[i0 * n + j0..]);
            match MR.min(m - i0) {
                6 => tile::<6, SIMD>(k, n, w, a_rows, &panel, c_rows),
                5 => tile::<5, SIMD>(k, n, w, a_rows, &panel, c_rows),
                4 => tile::<4, SIMD>(k, n, w, a_rows, &panel, c_rows),
                3 => tile::<3, SIMD>(k, n, w, a_rows, &panel, c_rows),
                2 => tile::<2, SIMD>(k, n, w, a_rows, &panel, c_rows),
                _ => tile::<1, SIMD>(k, n, w, a_rows, &panel, c_rows),
            }
        }
    }
}

/// c[r][0..w] += sum over kk of a[r][kk] * panel[kk][0..w], for the R rows at the start of `a`
/// (row stride k) and of `c` (row stride ldc).
#[inline(always)]
fn tile<const R: usize, const SIMD: bool>(k: usize, ldc: usize, w: usize, a: &[f32], panel: &[f32], c: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if SIMD {
        // SAFETY: SIMD is set only in functions compiled for AVX2 and FMA, run where both exist.
        return unsafe { avx2::tile::<R>(k, ldc, w, a, panel, c) };
    }
    let mut acc = [[0.0f32; NR]; R];
    for (kk, bv) in panel.chunks_exact(NR).take(k).enumerate() {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = a[r * k + kk];
            acc_r.iter_mut().zip(bv).for_each(|(x, &bj)| *x += av * bj);
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        c[r * ldc..][..w].iter_mut().zip(acc_r).for_each(|(d, &v)| *d += v);
    }
}

/// The loops of `gemm_abt_acc` around its tiles; `SIMD` as in `gemm_acc_with`.
#[inline(always)]
fn gemm_abt_acc_with<const SIMD: bool>(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    for k0 in (0..k).step_by(KB) {
        let kb = KB.min(k - k0);
        let (a, b) = (&a[k0..], &b[k0..]);
        // The operand with fewer rows is the one re-read for every tile of the other: its
        // k-block is the one more likely to stay in cache.
        if n <= m {
            for i0 in (0..m).step_by(TA) {
                for j0 in (0..n).step_by(TB) {
                    abt_tile::<SIMD>((m, n, k, kb), (i0, j0), a, b, c);
                }
            }
        } else {
            for j0 in (0..n).step_by(TB) {
                for i0 in (0..m).step_by(TA) {
                    abt_tile::<SIMD>((m, n, k, kb), (i0, j0), a, b, c);
                }
            }
        }
    }
}

/// The `gemm_abt_acc` tile at rows i0.. of A and j0.. of B, over the kb values of k at the start
/// of each row (a and b start at the k-block; rows of stride k).
#[inline(always)]
fn abt_tile<const SIMD: bool>(
    (m, n, k, kb): (usize, usize, usize, usize),
    (i0, j0): (usize, usize),
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) {
    let (a, b) = (&a[i0 * k..], &b[j0 * k..]);
    match (TA.min(m - i0), TB.min(n - j0)) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `tile`.
        (4, 3) if SIMD => unsafe { avx2::dots::<4, 3>(kb, k, a, b, &mut c[i0 * n + j0..], n) },
        (4, 3) => dots::<4, 3>(kb, k, a, b, &mut c[i0 * n + j0..], n),
        (ra, rb) => {
            for r in 0..ra {
                for s in 0..rb {
                    let c = &mut c[(i0 + r) * n + j0 + s..];
                    #[cfg(target_arch = "x86_64")]
                    if SIMD {
                        // SAFETY: as in `tile`.
                        unsafe { avx2::dots::<1, 1>(kb, k, &a[r * k..], &b[s * k..], c, n) };
                        continue;
                    }
                    dots::<1, 1>(kb, k, &a[r * k..], &b[s * k..], c, n);
                }
            }
        }
    }
}

/// c[r][s] += dot(a[r][..kb], b[s][..kb]) for the RA rows at the start of `a` and the RB rows at
/// the start of `b` (both of row stride ld), into `c` (row stride ldc).
#[inline(always)]
fn dots<const RA: usize, const RB: usize>(kb: usize, ld: usize, a: &[f32], b: &[f32], c: &mut [f32], ldc: usize) {
    let mut acc = [[[0.0f32; KV]; RB]; RA];
    let full = kb - kb % KV;
    for k0 in (0..full).step_by(KV) {
        for (r, acc_r) in acc.iter_mut().enumerate() {
            for (s, acc_rs) in acc_r.iter_mut().enumerate() {
                let (ar, bs) = (&a[r * ld + k0..][..KV], &b[s * ld + k0..][..KV]);
                acc_rs.iter_mut().zip(ar).zip(bs).for_each(|((x, &p), &q)| *x += p * q);
            }
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        for (s, acc_rs) in acc_r.iter().enumerate() {
            let tail = (full..kb).fold(0.0, |t, kk| t + a[r * ld + kk] * b[s * ld + kk]);
            c[r * ldc + s] += acc_rs.iter().sum::<f32>() + tail;
        }
    }
}

/// The AVX2 + FMA tiles, and the two products compiled for those features (so that the tiles
/// inline into their loops).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{KV, NR};

    /// Whether this CPU has AVX2 and FMA (std caches the CPUID answer: a load and a test).
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemm_acc(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
        super::gemm_acc_with::<true>(m, n, k, a, b, c)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemm_abt_acc(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
        super::gemm_abt_acc_with::<true>(m, n, k, a, b, c)
    }

    /// `super::tile`: R rows x 16 columns, two 8-float accumulators per row.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn tile<const R: usize>(k: usize, ldc: usize, w: usize, a: &[f32], panel: &[f32], c: &mut [f32]) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (kk, bv) in panel.chunks_exact(NR).take(k).enumerate() {
            // bv: 16 floats, so both 8-float loads are in bounds.
            let (b0, b1) = (_mm256_loadu_ps(bv.as_ptr()), _mm256_loadu_ps(bv[8..].as_ptr()));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(a[r * k + kk]);
                acc_r[0] = _mm256_fmadd_ps(av, b0, acc_r[0]);
                acc_r[1] = _mm256_fmadd_ps(av, b1, acc_r[1]);
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            let mut sums = [0.0f32; NR];
            _mm256_storeu_ps(sums.as_mut_ptr(), acc_r[0]);
            _mm256_storeu_ps(sums[8..].as_mut_ptr(), acc_r[1]);
            c[r * ldc..][..w].iter_mut().zip(sums).for_each(|(d, v)| *d += v);
        }
    }

    /// `super::dots`: RA x RB dot products, one 8-float vector of partial sums each.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub unsafe fn dots<const RA: usize, const RB: usize>(
        kb: usize,
        ld: usize,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        ldc: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); RB]; RA];
        let full = kb - kb % KV;
        // The rows' k-blocks as slices: every 8-float load below is in bounds.
        let ar: [&[f32]; RA] = std::array::from_fn(|r| &a[r * ld..][..kb]);
        let br: [&[f32]; RB] = std::array::from_fn(|s| &b[s * ld..][..kb]);
        for k0 in (0..full).step_by(KV) {
            // A loop, not array::from_fn: a closure is not compiled for this function's features.
            let mut bv = [_mm256_setzero_ps(); RB];
            for (v, b_s) in bv.iter_mut().zip(br) {
                *v = _mm256_loadu_ps(b_s[k0..k0 + KV].as_ptr());
            }
            for (acc_r, a_r) in acc.iter_mut().zip(ar) {
                let av = _mm256_loadu_ps(a_r[k0..k0 + KV].as_ptr());
                for (x, &bs) in acc_r.iter_mut().zip(&bv) {
                    *x = _mm256_fmadd_ps(av, bs, *x);
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (s, &v) in acc_r.iter().enumerate() {
                let mut lanes = [0.0f32; KV];
                _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                let mut tail = 0.0f32;
                for kk in full..kb {
                    tail = ar[r][kk].mul_add(br[s][kk], tail);
                }
                c[r * ldc + s] += lanes.iter().sum::<f32>() + tail;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Small integers and halves: every product and sum is exact in f32, with or without FMA.
    fn operands(m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
        let a = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b = (0..k * n).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
        (a, b)
    }

    /// Sizes around every tile edge: MR, NR, TA, TB and KV, below, at and above.
    const SIZES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (5, 7, 3),
        (4, 600, 9),
        (9, 1030, 2),
        (3, 2, 17),
        (6, 16, 8),
        (7, 17, 9),
        (13, 33, 25),
        (12, 6, 0),
    ];

    #[test]
    fn gemm_matches_the_textbook_loop_on_odd_sizes() {
        for &(m, n, k) in SIZES {
            let (a, b) = operands(m, n, k);
            let mut c = vec![1.0f32; m * n];
            gemm_acc(m, n, k, &a, &b, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = 1.0 + (0..k).map(|kk| a[i * k + kk] * b[kk * n + j]).sum::<f32>();
                    assert_eq!(c[i * n + j], want, "({m},{n},{k}) at ({i},{j})");
                }
            }
        }
        assert_eq!(transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    }

    #[test]
    fn gemm_abt_matches_the_textbook_loop_on_odd_sizes() {
        for &(m, n, k) in SIZES {
            // b stored (n x k): the k x n operand of the textbook loop, transposed.
            let (a, b_kn) = operands(m, n, k);
            let b = transpose(&b_kn, k, n);
            let mut c = vec![1.0f32; m * n];
            gemm_abt_acc(m, n, k, &a, &b, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = 1.0 + (0..k).map(|kk| a[i * k + kk] * b_kn[kk * n + j]).sum::<f32>();
                    assert_eq!(c[i * n + j], want, "({m},{n},{k}) at ({i},{j})");
                }
            }
        }
    }

    #[test]
    fn both_paths_agree_within_rounding() {
        // The FMA path and the plain one, compiled either way, on values that round.
        let (m, n, k) = (7, 19, 301);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 / 101.0 - 0.5) * 1.3).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 / 97.0 - 0.5) * 0.7).collect();
        let (mut fast, mut plain) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        gemm_acc(m, n, k, &a, &b, &mut fast);
        gemm_acc_with::<false>(m, n, k, &a, &b, &mut plain);
        for (i, (&x, &y)) in fast.iter().zip(&plain).enumerate() {
            // k products of magnitude < 0.5: the two roundings differ by at most k ulp of 0.5 k.
            assert!((x - y).abs() <= 1e-5 * k as f32, "at {i}: {x} vs {y}");
        }
    }
}
