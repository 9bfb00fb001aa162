//! Winograd convolution F(m x m, r x r): the forward, input grad and weight grad of a stride-1
//! convolution with a square r x r kernel, with fewer multiplications than the direct (implicit
//! GEMM) method: per m x m output tile, alpha^2 products instead of m^2 r^2, alpha = m + r - 1
//! (F(4x4, 3x3): 36 instead of 144, 4x; F(2x2, 5x5): 36 instead of 100, 2.8x).
//!
//! Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A for one r x r filter g and one alpha x alpha input tile d.
//! Summed over input channels, the elementwise product becomes alpha^2 independent GEMMs
//! ("non-fused" Winograd, as cuDNN's WINOGRAD_NONFUSED), so the pipeline is:
//!
//! 1. gather: each alpha x alpha input tile d -> B^T d B, stored as V (alpha^2, Cin, P), P = tiles;
//! 2. gather: each filter g -> G g G^T, stored as U (alpha^2, Cin, Cout);
//! 3. alpha^2 GEMMs: `M[xi]` (Cout, P) = `U[xi]^T` (Cout, Cin) . `V[xi]` (Cin, P), on kernels/gemm.cuh;
//! 4. scatter: each tile of M -> A^T M A, plus bias (and ReLU), into y (N, Cout, OH, OW).
//!
//! The input grad is the same pipeline on gy with the filters flipped and Cin/Cout swapped
//! (padding r - 1 - pad; U is then (alpha^2, Cout, Cin)). The weight grad is F(r x r, m x m):
//! gy's m x m tiles are the "filters" (transformed by G'), x's alpha x alpha tiles the inputs (B
//! is the same matrix), both gathered tile-major, and the GEMM reduces over the tiles:
//! `M[xi]` (Cout, Cin) = `GY[xi]^T` (Cout, P) . `X[xi]` (P, Cin), then A'^T M A'.
//!
//! Every GEMM is thus `C[xi]` (M, N) = `A[xi]^T` `B[xi]` with `A[xi]` (K, M) and `B[xi]` (K, N) dense and
//! row-major: both operands are read along rows (m and n contiguous), which lets the GEMM core
//! load whole 16-byte groups (gemm.cuh's vec4 path) when M and N are multiples of 4.
//!
//! Both gathers and the scatter are one operation, out = L T L^T for an alpha x alpha matrix L
//! (zero-padded when the tile is smaller than alpha), applied to every tile of a stack of planes:
//! `TileParams` describes the tiling, the CPU reference and `kernels/winograd.cu` share it.
//!
//! The matrices come from the Cook-Toom construction at the points 0, 1, -1, 2, -2, 1/2, -1/2
//! (and infinity), computed here in f64. Larger tiles cut more multiplications and lose more
//! precision: alpha is limited to 8 (F(6x6, 3x3), F(4x4, 5x5)).

use cudarc::driver::LaunchConfig;

use crate::device::{grid_1d, DeviceBuf, Gpu};
use crate::error::{Error, Result};
use crate::ops::conv2d::params::{Conv2dParams, KERNEL_ALPHAS};
use crate::ops::fast_div::FastDiv;
use crate::ops::gemm::cpu::{gemm_acc, transpose};
use crate::ops::gemm::math::{gemm_kernel_names, GemmMath};
use crate::ops::gemm::plan::{split_chunk, Planner, Tile};
use crate::ops::gemm::GemmOpts;
use crate::ops::parallel::map_ranges;
use crate::ops::relu::relu_value;
use crate::ptx::Module;

/// The largest tile side alpha of the matrices.
pub const MAX_ALPHA: usize = 8;
/// The interpolation points after infinity, in the order they are taken.
const POINTS: [f64; MAX_ALPHA - 1] = [0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5];

/// The three matrices of F(m, r) (1-D: m outputs of an r-tap correlation), row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct WinogradMatrices {
    pub m: usize,
    pub r: usize,
    pub alpha: usize,
    /// A^T: (m, alpha), the output transform.
    pub at: Vec<f64>,
    /// G: (alpha, r), the filter transform.
    pub g: Vec<f64>,
    /// B^T: (alpha, alpha), the input transform.
    pub bt: Vec<f64>,
}

impl WinogradMatrices {
    /// F(m, r): y_i = sum_k g_k d_{i+k}, i < m, from alpha = m + r - 1 inputs.
    ///
    /// Derivation: the linear convolution s = g * h of an r-tap g and an m-tap h is
    /// s = C [(E_r g) ⊙ (E_m h)], where E_n evaluates an n-coefficient polynomial at the alpha
    /// points (infinity picks the leading coefficient) and C interpolates s back from its values.
    /// Correlation is the transpose of h -> g * h, hence y = E_m^T [(E_r g) ⊙ (C^T d)]:
    /// A^T = E_m^T, G = E_r, B^T = C^T. Row j of B^T is then scaled by the Lagrange denominator
    /// prod_{l != j} (a_j - a_l) and row j of G divided by it (the product is unchanged), which
    /// leaves B^T with small integers at the usual points (Lavin & Gray's matrices, up to signs).
    pub fn new(m: usize, r: usize) -> Result<Self> {
        let alpha = (m + r).saturating_sub(1);
        if m == 0 || r == 0 || !(2..=MAX_ALPHA).contains(&alpha) {
            return Err(Error::Invalid(format!(
                "winograd: F({m}, {r}) needs m, r >= 1 and 2 <= m + r - 1 <= {MAX_ALPHA}, found m = {m}, r = {r}"
            )));
        }
        let pts = &POINTS[..alpha - 1];
        // E_n: (alpha, n); the last row is the point at infinity.
        let eval = |n: usize| -> Vec<f64> {
            let mut e = vec![0.0; alpha * n];
            for (j, &a) in pts.iter().enumerate() {
                for i in 0..n {
                    e[j * n + i] = a.powi(i as i32);
                }
            }
            e[(alpha - 1) * n + n - 1] = 1.0;
            e
        };
        let e_m = eval(m);
        let mut g = eval(r);
        // C (alpha, alpha): s_{alpha-1} = v_inf; the lower coefficients solve the Vandermonde
        // system V q = v_j - v_inf a_j^(alpha-1) on the finite points.
        let f = alpha - 1;
        let vinv = invert(&(0..f * f).map(|e| pts[e / f].powi((e % f) as i32)).collect::<Vec<_>>(), f);
        let mut c = vec![0.0; alpha * alpha];
        for k in 0..f {
            for j in 0..f {
                c[k * alpha + j] = vinv[k * f + j];
            }
            c[k * alpha + f] = -(0..f).map(|j| vinv[k * f + j] * pts[j].powi(f as i32)).sum::<f64>();
        }
        c[f * alpha + f] = 1.0;
        let mut bt = transpose_f64(&c, alpha, alpha);
        for (j, &a) in pts.iter().enumerate() {
            let denom: f64 = pts.iter().enumerate().filter(|&(l, _)| l != j).map(|(_, &b)| a - b).product();
            bt[j * alpha..][..alpha].iter_mut().for_each(|v| *v *= denom);
            g[j * r..][..r].iter_mut().for_each(|v| *v /= denom);
        }
        Ok(WinogradMatrices { m, r, alpha, at: transpose_f64(&e_m, alpha, m), g, bt })
    }

    /// `mat` (rows, cols), zero-padded into the alpha x alpha, row pitch MAX_ALPHA, f32 form
    /// that `TileParams::l` holds; `flip` reverses the columns (a filter read back to front).
    fn padded(mat: &[f64], rows: usize, cols: usize, flip: bool) -> [f32; MAX_ALPHA * MAX_ALPHA] {
        let mut l = [0.0f32; MAX_ALPHA * MAX_ALPHA];
        for i in 0..rows {
            for j in 0..cols {
                let src = if flip { cols - 1 - j } else { j };
                l[i * MAX_ALPHA + j] = mat[i * cols + src] as f32;
            }
        }
        l
    }
}

/// Gauss-Jordan inverse of the n x n matrix `a` (a Vandermonde matrix on distinct points: never
/// singular), partial pivoting, f64.
fn invert(a: &[f64], n: usize) -> Vec<f64> {
    let mut m = a.to_vec();
    let mut inv: Vec<f64> = (0..n * n).map(|e| if e / n == e % n { 1.0 } else { 0.0 }).collect();
    for col in 0..n {
        let piv = (col..n).max_by(|&x, &y| m[x * n + col].abs().total_cmp(&m[y * n + col].abs())).unwrap_or(col);
        for k in 0..n {
            m.swap(col * n + k, piv * n + k);
            inv.swap(col * n + k, piv * n + k);
        }
        let d = m[col * n + col];
        for k in 0..n {
            m[col * n + k] /= d;
            inv[col * n + k] /= d;
        }
        for row in (0..n).filter(|&row| row != col) {
            let factor = m[row * n + col];
            for k in 0..n {
                m[row * n + k] -= factor * m[col * n + k];
                inv[row * n + k] -= factor * inv[col * n + k];
            }
        }
    }
    inv
}

fn transpose_f64(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..rows * cols).map(|e| a[(e % rows) * cols + e / rows]).collect()
}

// ---------------------------------------------------------------------------------------------
// The tile transform (shared by the CPU reference and kernels/winograd.cu)
// ---------------------------------------------------------------------------------------------

/// One tile transform over a stack of planes (N, C, H, W); mirrored field for field by
/// `struct TileParams` in kernels/winograd.cu.
///
/// Tile (th, tw) of a plane covers rows th*step - pad .. + extent (and the same for columns).
/// - gather: each tile T (extent x extent, 0 outside the plane) becomes L T L^T (alpha x alpha),
///   stored at `out[xi][c][p]` for xi = (i, j) < alpha^2, p = (n, th, tw): (alpha^2, C, P); or,
///   with `tile_major`, at `out[xi][p][c]`: (alpha^2, P, C).
/// - scatter: the alpha x alpha tile read from `in[xi][c][p]` (summed over `splits` partials
///   `split_len` apart) becomes L T L^T, whose top-left extent x extent corner (plus `bias[c]`,
///   then the ReLU if `relu`: `relu_value`, NaN staying NaN) is stored into the tile's in-plane
///   pixels.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TileParams {
    pub n: u32,
    pub c: u32,
    pub h: u32,
    pub w: u32,
    pub tiles_h: u32,
    pub tiles_w: u32,
    pub step: u32,
    pub pad: u32,
    pub extent: u32,
    pub relu: u32,
    pub splits: u32,
    pub split_len: u32,
    /// Gather only: 1 writes (alpha^2, P, C) (consecutive kernel threads take consecutive
    /// channels, so that the stores stay coalesced), 0 writes (alpha^2, C, P).
    pub tile_major: u32,
    /// Division by C, by P (tiles over the batch), by the tiles per plane and by tiles_w: the
    /// kernels' index math (made by `tile_params`).
    pub c_div: FastDiv,
    pub tiles_div: FastDiv,
    pub per_plane_div: FastDiv,
    pub tiles_w_div: FastDiv,
    /// L, alpha x alpha, row pitch MAX_ALPHA, zero outside (rows, cols) of the actual matrix.
    pub l: [f32; MAX_ALPHA * MAX_ALPHA],
}

// SAFETY: #[repr(C)] u32 and f32 fields (FastDiv: two u32), mirrored by the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for TileParams {}

impl TileParams {
    /// Tiles per plane times planes' images: the P of the layouts above.
    pub fn tiles(&self) -> usize {
        (self.n * self.tiles_h * self.tiles_w) as usize
    }
    /// Elements of the (alpha^2, C, P) side for tiles of side `alpha`.
    pub fn wino_len(&self, alpha: usize) -> usize {
        alpha * alpha * self.c as usize * self.tiles()
    }
    pub fn plane_len(&self) -> usize {
        (self.n * self.c * self.h * self.w) as usize
    }
    /// Where element xi of tile q of channel c lies on the alpha^2 side.
    fn wino_index(&self, xi: usize, c: usize, q: usize) -> usize {
        let (c_n, tiles) = (self.c as usize, self.tiles());
        if self.tile_major != 0 {
            (xi * tiles + q) * c_n + c
        } else {
            (xi * c_n + c) * tiles + q
        }
    }
    /// Where tile element (a, b) of tile q of plane (n, c) lies, if inside the plane.
    fn pixel(&self, q: usize, a: usize, b: usize) -> Option<usize> {
        let per = (self.tiles_h * self.tiles_w) as usize;
        let (n, t) = (q / per, q % per);
        let (th, tw) = (t / self.tiles_w as usize, t % self.tiles_w as usize);
        let ih = (th * self.step as usize + a).checked_sub(self.pad as usize)?;
        let iw = (tw * self.step as usize + b).checked_sub(self.pad as usize)?;
        (ih < self.h as usize && iw < self.w as usize)
            .then_some((n * self.c as usize * self.h as usize + ih) * self.w as usize + iw)
    }
}

/// out = L t L^T for alpha x alpha `t` (row-major) and L in TileParams form.
fn sandwich(l: &[f32; MAX_ALPHA * MAX_ALPHA], t: &[f32], alpha: usize) -> Vec<f32> {
    let mut lt = vec![0.0f32; alpha * alpha];
    for i in 0..alpha {
        for a in 0..alpha {
            let li = l[i * MAX_ALPHA + a];
            for b in 0..alpha {
                lt[i * alpha + b] += li * t[a * alpha + b];
            }
        }
    }
    let mut out = vec![0.0f32; alpha * alpha];
    for i in 0..alpha {
        for j in 0..alpha {
            out[i * alpha + j] = (0..alpha).map(|b| lt[i * alpha + b] * l[j * MAX_ALPHA + b]).sum();
        }
    }
    out
}

/// CPU reference gather: planes (N, C, H, W) -> (alpha^2, C, P) (or (alpha^2, P, C)).
pub fn tile_gather_cpu(src: &[f32], p: &TileParams, alpha: usize) -> Vec<f32> {
    let (c_n, tiles) = (p.c as usize, p.tiles());
    let (plane, e) = ((p.h * p.w) as usize, p.extent as usize);
    let mut out = vec![0.0f32; p.wino_len(alpha)];
    let mut t = vec![0.0f32; alpha * alpha];
    for c in 0..c_n {
        for q in 0..tiles {
            t.fill(0.0);
            for a in 0..e.min(alpha) {
                for b in 0..e.min(alpha) {
                    if let Some(at) = p.pixel(q, a, b) {
                        t[a * alpha + b] = src[at + c * plane];
                    }
                }
            }
            for (xi, v) in sandwich(&p.l, &t, alpha).into_iter().enumerate() {
                out[p.wino_index(xi, c, q)] = v;
            }
        }
    }
    out
}

/// CPU reference scatter: (splits x) (alpha^2, C, P) -> planes (N, C, H, W).
pub fn tile_scatter_cpu(src: &[f32], bias: Option<&[f32]>, p: &TileParams, alpha: usize) -> Vec<f32> {
    debug_assert_eq!(p.tile_major, 0, "the scatter reads (alpha^2, C, P)");
    let (c_n, tiles) = (p.c as usize, p.tiles());
    let (plane, e) = ((p.h * p.w) as usize, p.extent as usize);
    let mut out = vec![0.0f32; p.plane_len()];
    let mut t = vec![0.0f32; alpha * alpha];
    for c in 0..c_n {
        for q in 0..tiles {
            for (xi, v) in t.iter_mut().enumerate() {
                let at = p.wino_index(xi, c, q);
                *v = (0..p.splits as usize).map(|s| src[s * p.split_len as usize + at]).sum();
            }
            let o = sandwich(&p.l, &t, alpha);
            for a in 0..e.min(alpha) {
                for b in 0..e.min(alpha) {
                    if let Some(at) = p.pixel(q, a, b) {
                        let v = o[a * alpha + b] + bias.map_or(0.0, |bv| bv[c]);
                        out[at + c * plane] = if p.relu != 0 { relu_value(v) } else { v };
                    }
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Plans: the transforms and GEMMs of each pass
// ---------------------------------------------------------------------------------------------

/// The GEMM of one pass: alpha^2 products `C[xi]` (M, N) = `A[xi]^T` `B[xi]`, `A[xi]` (K, M) and `B[xi]`
/// (K, N) dense and row-major, one after another (xi = 0 .. batch); C (splits, batch, M, N), each
/// split reducing `k_chunk` of K. Mirrored field for field by `struct GemmParams` in
/// kernels/winograd.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    /// alpha^2 products; blockIdx.z = split * batch + xi.
    pub batch: u32,
    /// Reduction length of each split (the whole K when there is one split).
    pub k_chunk: u32,
}

// SAFETY: #[repr(C)] plain u32 fields, mirrored by the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for GemmParams {}

impl GemmParams {
    fn new(m: usize, n: usize, k: usize, batch: usize, k_chunk: usize) -> Self {
        let u = |v: usize| v as u32;
        GemmParams { m: u(m), n: u(n), k: u(k), batch: u(batch), k_chunk: u(k_chunk) }
    }
    /// Splits of the reduction (1 unless the weight grad's).
    pub fn splits(&self) -> usize {
        (self.k as usize).div_ceil(self.k_chunk.max(1) as usize).max(1)
    }
    /// Elements of C: (splits, batch, M, N).
    pub fn out_len(&self) -> usize {
        self.splits() * (self.batch * self.m * self.n) as usize
    }
}

/// CPU reference of the batched GEMM: C (splits, alpha^2, M, N) as the kernel writes it (one
/// split: the reduction is not split on the CPU, the partial sums of the other splits are 0).
fn batched_gemm_cpu(a: &[f32], b: &[f32], g: &GemmParams) -> Vec<f32> {
    let (m, n, k, batch) = (g.m as usize, g.n as usize, g.k as usize, g.batch as usize);
    let mut out = vec![0.0f32; g.out_len()];
    let parts = map_ranges(batch, |xis| {
        let mut c = vec![0.0f32; xis.len() * m * n];
        for (i, xi) in xis.enumerate() {
            // A[xi] (K, M) transposed into the row-major (M, K) that gemm_acc takes.
            let am = transpose(&a[xi * k * m..][..k * m], k, m);
            gemm_acc(m, n, k, &am, &b[xi * k * n..][..k * n], &mut c[i * m * n..][..m * n]);
        }
        c
    });
    let c = parts.concat();
    out[..c.len()].copy_from_slice(&c);
    out
}

/// Everything one pass needs: the two gathers, the GEMM and the scatter. Public so that the
/// kernel emulator's tests (tests/winograd.rs) run exactly the launches the GPU gets.
#[derive(Debug, Clone)]
pub struct Pass {
    pub alpha: usize,
    /// Gathered into the GEMM's A (K, M) (filters for fwd / input grad, gy for the weight grad).
    pub gather_a: TileParams,
    /// Gathered into the GEMM's B (K, N) (x for fwd / weight grad, gy for the input grad).
    pub gather_b: TileParams,
    pub gemm: GemmParams,
    pub scatter: TileParams,
}

fn tile_params(planes: [usize; 4], tiles: [usize; 2], step: usize, pad: usize, extent: usize) -> TileParams {
    let u = |v: usize| v as u32;
    // Divisors for the kernels. Sizes of 2^31 and more never reach a kernel (Pass::check_size
    // refuses them first): clamping only keeps FastDiv::new's precondition.
    let div = |d: usize| FastDiv::new(d.clamp(1, (1 << 31) - 1) as u32);
    let per_plane = tiles[0] * tiles[1];
    TileParams {
        n: u(planes[0]),
        c: u(planes[1]),
        h: u(planes[2]),
        w: u(planes[3]),
        tiles_h: u(tiles[0]),
        tiles_w: u(tiles[1]),
        step: u(step),
        pad: u(pad),
        extent: u(extent),
        relu: 0,
        splits: 1,
        split_len: 0,
        tile_major: 0,
        c_div: div(planes[1]),
        tiles_div: div(planes[0] * per_plane),
        per_plane_div: div(per_plane),
        tiles_w_div: div(tiles[1]),
        l: [0.0; MAX_ALPHA * MAX_ALPHA],
    }
}

impl Pass {
    /// The forward of `p` with F(m, r): A = filters, B = x; the scatter writes y.
    pub fn forward(p: &Conv2dParams, m: usize) -> Result<Pass> {
        Pass::correlation(p, m, false)
    }

    /// The input grad of `p` with F(m, r): A = filters (flipped), B = gy; the scatter writes gx.
    pub fn input_grad(p: &Conv2dParams, m: usize) -> Result<Pass> {
        Pass::correlation(p, m, true)
    }

    /// The forward (`input_grad` false: x -> y) or the input grad (gy -> gx) of `p` with
    /// F(m, r): a correlation of `c_in` planes of `h x w`, padded by `pad`, into `c_out` planes.
    fn correlation(p: &Conv2dParams, m: usize, input_grad: bool) -> Result<Pass> {
        let r = p.kh as usize;
        let mats = WinogradMatrices::new(m, r)?;
        let alpha = mats.alpha;
        let (n, cin, cout) = (p.n as usize, p.c_in as usize, p.c_out as usize);
        let (src_hw, dst_hw) = ([p.h as usize, p.w as usize], [p.oh as usize, p.ow as usize]);
        // The input grad correlates gy (Cout planes of OH x OW) with the flipped filters into gx.
        let (c_src, c_dst, src, dst, pad) = if input_grad {
            (cout, cin, dst_hw, src_hw, r - 1 - p.pad as usize)
        } else {
            (cin, cout, src_hw, dst_hw, p.pad as usize)
        };
        let tiles = [dst[0].div_ceil(m), dst[1].div_ceil(m)];
        // Filters w (Cout, Cin, r, r): one tile per plane, gathered into the GEMM's A (K, M) =
        // (c_src, c_dst). The forward views w as Cout images of Cin planes (tile p = co, channel
        // ci): U (alpha^2, Cin, Cout); the input grad as one image of Cout * Cin planes: U
        // (alpha^2, Cout, Cin).
        let filter_planes = if input_grad { [1, cout * cin, r, r] } else { [cout, cin, r, r] };
        let mut gather_a = tile_params(filter_planes, [1, 1], 0, 0, r);
        gather_a.l = WinogradMatrices::padded(&mats.g, alpha, r, input_grad);
        let mut gather_b = tile_params([n, c_src, src[0], src[1]], tiles, m, pad, alpha);
        gather_b.l = WinogradMatrices::padded(&mats.bt, alpha, alpha, false);
        let mut scatter = tile_params([n, c_dst, dst[0], dst[1]], tiles, m, 0, m);
        scatter.l = WinogradMatrices::padded(&mats.at, m, alpha, false);
        // ReLU belongs to the forward's output only (the input grad arrives already masked).
        scatter.relu = if input_grad { 0 } else { p.relu };
        let k = c_src;
        let gemm = GemmParams::new(c_dst, gather_b.tiles(), k, alpha * alpha, k);
        Ok(Pass { alpha, gather_a, gather_b, gemm, scatter })
    }

    /// The weight grad of `p` with F(r, m): gy's m x m tiles (G') against x's alpha x alpha tiles
    /// (B'), reduced over all tiles, split `splits` ways. A = gy, B = x; the scatter writes gw.
    pub fn weight_grad(p: &Conv2dParams, m: usize, splits: usize) -> Result<Pass> {
        let r = p.kh as usize;
        let mats = WinogradMatrices::new(r, m)?;
        let alpha = mats.alpha;
        let (n, cin, cout) = (p.n as usize, p.c_in as usize, p.c_out as usize);
        let tiles = [(p.oh as usize).div_ceil(m), (p.ow as usize).div_ceil(m)];
        // Tile-major: GY (alpha^2, P, Cout) and X (alpha^2, P, Cin) are the GEMM's A (K, M) and
        // B (K, N), reduced over the tiles.
        let mut gather_a = tile_params([n, cout, p.oh as usize, p.ow as usize], tiles, m, 0, m);
        gather_a.l = WinogradMatrices::padded(&mats.g, alpha, m, false);
        gather_a.tile_major = 1;
        let mut gather_b = tile_params([n, cin, p.h as usize, p.w as usize], tiles, m, p.pad as usize, alpha);
        gather_b.l = WinogradMatrices::padded(&mats.bt, alpha, alpha, false);
        gather_b.tile_major = 1;
        let big_k = gather_b.tiles();
        let (_, chunk) = split_chunk(big_k, splits);
        let gemm = GemmParams::new(cout, cin, big_k, alpha * alpha, chunk);
        let mut scatter = tile_params([1, cout * cin, r, r], [1, 1], 0, 0, r);
        scatter.l = WinogradMatrices::padded(&mats.at, r, alpha, false);
        scatter.splits = gemm.splits() as u32;
        scatter.split_len = (alpha * alpha * cout * cin) as u32;
        Ok(Pass { alpha, gather_a, gather_b, gemm, scatter })
    }

    /// Refuses sizes the kernels' 32-bit indices cannot hold.
    fn check_size(&self) -> Result<()> {
        let big = self.gemm.out_len().max(self.gather_b.wino_len(self.alpha)).max(self.gather_a.wino_len(self.alpha));
        if big >= 1 << 31 {
            return Err(Error::TooLarge(format!(
                "winograd: a buffer of {big} elements exceeds the kernels' 2^31 limit"
            )));
        }
        Ok(())
    }

    fn run_cpu(&self, a_src: &[f32], b_src: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let a = tile_gather_cpu(a_src, &self.gather_a, self.alpha);
        let b = tile_gather_cpu(b_src, &self.gather_b, self.alpha);
        let c = batched_gemm_cpu(&a, &b, &self.gemm);
        tile_scatter_cpu(&c, bias, &self.scatter, self.alpha)
    }

    /// The kernel and launch of the gather `t` (`self.gather_a` or `self.gather_b`) or of the
    /// scatter: one thread per (plane, tile), 128 per block.
    pub fn tile_launch(&self, t: &TileParams, scatter: bool) -> Result<(&'static str, LaunchConfig)> {
        const GATHER: [&str; 3] = ["winograd_gather_f32_a4", "winograd_gather_f32_a6", "winograd_gather_f32_a8"];
        const SCATTER: [&str; 3] = ["winograd_scatter_f32_a4", "winograd_scatter_f32_a6", "winograd_scatter_f32_a8"];
        let slot = alpha_slot(self.alpha)?;
        Ok((if scatter { SCATTER[slot] } else { GATHER[slot] }, grid_1d(t.c as usize * t.tiles(), 128)))
    }

    /// The kernel and launch of the GEMM in `math`: the tile `plan` picks unless `tile` is given.
    pub fn gemm_launch(
        &self,
        plan: &Planner,
        math: GemmMath,
        tile: Option<Tile>,
    ) -> Result<(&'static str, LaunchConfig)> {
        let g = &self.gemm;
        let (cfg, tile) = plan.launch(g.m as usize, g.n as usize, g.splits() * g.batch as usize, tile)?;
        const NAMES: [[&str; 5]; 4] = gemm_kernel_names!("winograd_gemm");
        Ok((math.kernel(&NAMES, tile), cfg))
    }

    fn run_cuda(
        &self,
        gpu: &Gpu,
        opts: GemmOpts,
        a_src: &DeviceBuf<f32>,
        b_src: &DeviceBuf<f32>,
        bias: Option<&DeviceBuf<f32>>,
    ) -> Result<DeviceBuf<f32>> {
        self.check_size()?;
        let gather = |src: &DeviceBuf<f32>, t: &TileParams| -> Result<DeviceBuf<f32>> {
            let mut out = gpu.uninit::<f32>(t.wino_len(self.alpha))?;
            let (name, cfg) = self.tile_launch(t, false)?;
            crate::launch!(gpu, Module::Winograd, name, cfg, src, &mut out, t)?;
            Ok(out)
        };
        let a = gather(a_src, &self.gather_a)?;
        let b = gather(b_src, &self.gather_b)?;
        let mut c = gpu.uninit::<f32>(self.gemm.out_len())?;
        let (name, cfg) = self.gemm_launch(&Planner::new(gpu, opts), opts.math, None)?;
        crate::launch!(gpu, Module::Winograd, name, cfg, &a, &b, &mut c, &self.gemm)?;
        let sc = &self.scatter;
        let mut out = gpu.uninit::<f32>(sc.plane_len())?;
        let (name, cfg) = self.tile_launch(sc, true)?;
        let has_bias = bias.is_some() as u32;
        // Without a bias the kernel never reads the pointer: any valid buffer stands in.
        let bias = bias.unwrap_or(&c);
        crate::launch!(gpu, Module::Winograd, name, cfg, &c, bias, &mut out, sc, &has_bias)?;
        Ok(out)
    }
}

/// The kernel variant for `alpha`, one of KERNEL_ALPHAS (which `output_tile` guarantees).
fn alpha_slot(alpha: usize) -> Result<usize> {
    KERNEL_ALPHAS.iter().position(|&a| a == alpha).ok_or_else(|| {
        Error::Invalid(format!("winograd: no kernel for tiles of {alpha}, expected one of {KERNEL_ALPHAS:?}"))
    })
}

/// Splits of the weight grad's reduction over tiles (see `Planner::split_count`), each split at
/// least 256 tiles long.
pub fn weight_grad_splits(p: &Conv2dParams, m: usize, plan: &Planner) -> usize {
    let alpha = m + p.kh as usize - 1;
    let blocks = alpha * alpha * (p.c_out as usize).div_ceil(128) * (p.c_in as usize).div_ceil(128);
    let tiles = p.n as usize * (p.oh as usize).div_ceil(m) * (p.ow as usize).div_ceil(m);
    plan.split_count(blocks, tiles.div_ceil(256))
}

// ---------------------------------------------------------------------------------------------
// The three passes, CPU and CUDA
// ---------------------------------------------------------------------------------------------

/// Forward y (N, Cout, OH, OW) = conv(x, w) + b (then the ReLU, `relu_value`, if p.relu) with F(m, r).
pub fn winograd_fwd_cpu(x: &[f32], w: &[f32], b: &[f32], p: &Conv2dParams, m: usize) -> Result<Vec<f32>> {
    Ok(Pass::correlation(p, m, false)?.run_cpu(w, x, Some(b)))
}

/// Input grad gx (N, Cin, H, W) from gy (N, Cout, OH, OW) (ReLU mask already applied).
pub fn winograd_bwd_input_cpu(w: &[f32], gy: &[f32], p: &Conv2dParams, m: usize) -> Result<Vec<f32>> {
    Ok(Pass::correlation(p, m, true)?.run_cpu(w, gy, None))
}

/// Weight grad gw (Cout, Cin, r, r) from x and gy.
pub fn winograd_bwd_weight_cpu(x: &[f32], gy: &[f32], p: &Conv2dParams, m: usize) -> Result<Vec<f32>> {
    Ok(Pass::weight_grad(p, m, 1)?.run_cpu(gy, x, None))
}

pub(crate) fn winograd_fwd_cuda(
    gpu: &Gpu,
    (x, w, b): (&DeviceBuf<f32>, &DeviceBuf<f32>, &DeviceBuf<f32>),
    p: &Conv2dParams,
    m: usize,
    opts: GemmOpts,
) -> Result<DeviceBuf<f32>> {
    Pass::correlation(p, m, false)?.run_cuda(gpu, opts, w, x, Some(b))
}

pub(crate) fn winograd_bwd_input_cuda(
    gpu: &Gpu,
    (w, gy): (&DeviceBuf<f32>, &DeviceBuf<f32>),
    p: &Conv2dParams,
    m: usize,
    opts: GemmOpts,
) -> Result<DeviceBuf<f32>> {
    Pass::correlation(p, m, true)?.run_cuda(gpu, opts, w, gy, None)
}

pub(crate) fn winograd_bwd_weight_cuda(
    gpu: &Gpu,
    (x, gy): (&DeviceBuf<f32>, &DeviceBuf<f32>),
    p: &Conv2dParams,
    m: usize,
    opts: GemmOpts,
) -> Result<DeviceBuf<f32>> {
    let splits = weight_grad_splits(p, m, &Planner::new(gpu, opts));
    Pass::weight_grad(p, m, splits)?.run_cuda(gpu, opts, gy, x, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1-D check of F(m, r) against the direct correlation on a ramp-like signal.
    #[test]
    fn matrices_compute_a_correlation() {
        for (m, r) in [(2, 3), (4, 3), (6, 3), (2, 5), (4, 5), (3, 4), (5, 3), (3, 2), (1, 2)] {
            let w = WinogradMatrices::new(m, r).expect("valid");
            let a = w.alpha;
            let d: Vec<f64> = (0..a).map(|i| (i as f64 * 0.37).sin() + 0.1).collect();
            let g: Vec<f64> = (0..r).map(|i| (i as f64 * 1.3).cos() - 0.2).collect();
            let gg: Vec<f64> = (0..a).map(|j| (0..r).map(|k| w.g[j * r + k] * g[k]).sum()).collect();
            let bd: Vec<f64> = (0..a).map(|j| (0..a).map(|k| w.bt[j * a + k] * d[k]).sum()).collect();
            for i in 0..m {
                let y: f64 = (0..a).map(|j| w.at[i * a + j] * gg[j] * bd[j]).sum();
                let direct: f64 = (0..r).map(|k| g[k] * d[i + k]).sum();
                assert!((y - direct).abs() < 1e-9, "F({m}, {r}) output {i}: {y} vs {direct}");
            }
        }
    }

    #[test]
    fn f43_input_transform_has_the_known_integers() {
        // Lavin & Gray's B^T for F(4, 3), up to the signs of rows.
        let w = WinogradMatrices::new(4, 3).expect("valid");
        let row0: Vec<f64> = w.bt[..6].iter().map(|v| v.abs()).collect();
        assert_eq!(row0, [4.0, 0.0, 5.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn rejects_tiles_beyond_the_kernels() {
        assert!(WinogradMatrices::new(6, 5).is_err());
        assert!(WinogradMatrices::new(0, 3).is_err());
        assert!(WinogradMatrices::new(0, 0).is_err());
    }
}
