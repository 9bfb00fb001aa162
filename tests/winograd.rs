//! Winograd F(m x m, r x r): the CPU pipeline's forward, input grad and weight grad against the
//! direct convolution, for every tile size the kernels are built for and awkward shapes (partial
//! tiles at the right and bottom edges, padding 0..=r-1, one channel, odd batch); then the CUDA
//! kernels themselves, run on the CPU by the emulator (emu/), with the launches the GPU gets,
//! against the same reference. On a GPU, tests/conv2d.rs checks them on AlexNet's shapes.
mod common;
use common::*;
use ptxgrad::ops::conv2d::{
    conv2d_bwd_bias_cpu, conv2d_bwd_input_cpu, conv2d_bwd_weight_cpu, conv2d_fwd_cpu, conv2d_fwd_with, conv2d_with,
    Conv2dParams, ConvAlgo,
};
use ptxgrad::ops::gemm_math::GemmMath;
use ptxgrad::ops::gemm_plan::Tile;
use ptxgrad::ops::relu::relu_bwd_cpu;
use ptxgrad::ops::winograd::{
    output_tile, weight_grad_splits, winograd_bwd_input_cpu, winograd_bwd_weight_cpu, winograd_fwd_cpu, GemmParams,
    Pass, TileParams, KERNEL_ALPHAS,
};
use ptxgrad::{Tape, Tensor};

/// (n, cin, h, w, cout, r, pad)
const CASES: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
    (1, 1, 5, 5, 1, 3, 1),
    (2, 3, 7, 9, 5, 3, 1),   // partial tiles at the right and bottom
    (3, 4, 12, 12, 6, 3, 1), // AlexNet conv3-5's 12 x 12: whole tiles for m = 2, 3, 4, 6
    (2, 5, 8, 11, 3, 3, 0),
    (1, 2, 6, 6, 4, 3, 2),
    (2, 6, 13, 13, 7, 5, 2), // conv2's 5x5 with padding 2 (26 x 26 there)
    (1, 3, 9, 7, 2, 5, 0),
    (2, 2, 10, 10, 3, 5, 4),
    (1, 4, 9, 9, 3, 2, 1), // an even kernel
];

#[test]
fn winograd_cpu_matches_direct_convolution() {
    for (i, &(n, cin, h, w, cout, r, pad)) in CASES.iter().enumerate() {
        let p = Conv2dParams::new(n, cin, h, w, cout, r, r, 1, pad).unwrap();
        let seed = 100 * i as u64;
        let x = uniform(p.x_len(), -1.0, 1.0, seed);
        let wt = uniform(p.w_len(), -1.0, 1.0, seed + 1);
        let b = uniform(cout, -1.0, 1.0, seed + 2);
        let gy = uniform(p.y_len(), -1.0, 1.0, seed + 3);
        let (y_ref, gx_ref, gw_ref) = (
            conv2d_fwd_cpu(&x, &wt, &b, &p, false),
            conv2d_bwd_input_cpu(&wt, &gy, &p),
            conv2d_bwd_weight_cpu(&x, &gy, &p),
        );
        // Every m with alpha = m + r - 1 one of the kernels' 4, 6, 8.
        for m in (1..=7).filter(|&m| KERNEL_ALPHAS.contains(&(m + r - 1))) {
            assert_eq!(output_tile(&p, Some(m)), Some(m));
            let tag = |s: &str| format!("{s}: F({m}, {r}) on x {:?}, pad {pad}", [n, cin, h, w]);
            let y = winograd_fwd_cpu(&x, &wt, &b, &p, m).unwrap();
            assert_close(&tag("y"), &y_ref, &y, wino_atol(cin * r * r), 0.0);
            let gx = winograd_bwd_input_cpu(&wt, &gy, &p, m).unwrap();
            assert_close(&tag("gx"), &gx_ref, &gx, wino_atol(cout * r * r), 0.0);
            let gw = winograd_bwd_weight_cpu(&x, &gy, &p, m).unwrap();
            assert_close(&tag("gw"), &gw_ref, &gw, wino_atol(n * p.ohw()), 0.0);
        }
    }
}

#[test]
fn winograd_fused_relu_matches_direct() {
    let mut p = Conv2dParams::new(2, 3, 12, 12, 4, 3, 3, 1, 1).unwrap();
    p.relu = 1;
    let (x, w, b) = (uniform(p.x_len(), -1.0, 1.0, 1), uniform(p.w_len(), -1.0, 1.0, 2), uniform(4, -1.0, 1.0, 3));
    let y = winograd_fwd_cpu(&x, &w, &b, &p, 4).unwrap();
    assert!(y.iter().all(|&v| v >= 0.0), "ReLU applied");
    assert_close("relu(y)", &conv2d_fwd_cpu(&x, &w, &b, &p, true), &y, wino_atol(27), 0.0);
}

#[test]
fn winograd_applies_only_where_it_can() {
    let conv = |h, k, s, pad| Conv2dParams::new(1, 1, h, h, 1, k, k, s, pad).unwrap();
    assert_eq!(output_tile(&conv(12, 3, 1, 1), None), Some(4), "F(4x4, 3x3) by default");
    assert_eq!(output_tile(&conv(26, 5, 1, 2), None), Some(2), "F(2x2, 5x5) by default");
    assert_eq!(output_tile(&conv(224, 11, 4, 1), None), None, "stride 4");
    assert_eq!(output_tile(&conv(12, 3, 2, 1), None), None, "stride 2");
    assert_eq!(output_tile(&conv(8, 1, 1, 0), None), None, "1x1 kernel");
    assert_eq!(output_tile(&conv(12, 3, 1, 3), None), None, "padding beyond r - 1");
    assert_eq!(output_tile(&conv(12, 3, 1, 1), Some(7)), None, "alpha 9 is beyond the kernels");
    assert_eq!(output_tile(&conv(12, 3, 1, 1), Some(3)), None, "alpha 5: no kernel");
    assert_eq!(output_tile(&conv(12, 7, 1, 3), None), Some(2), "F(2x2, 7x7): alpha 8");
    assert_eq!(output_tile(&conv(12, 6, 1, 2), None), Some(3), "F(3x3, 6x6): alpha 8");
    let rect = Conv2dParams::new(1, 1, 9, 9, 1, 3, 2, 1, 0).unwrap();
    assert_eq!(output_tile(&rect, None), None, "non-square kernel");
}

#[test]
fn conv_algo_parses_and_prints() {
    for s in ["auto", "gemm", "winograd", "winograd:2", "winograd:6"] {
        assert_eq!(s.parse::<ConvAlgo>().unwrap().to_string(), s);
    }
    for bad in ["", "fft", "winograd:0", "winograd:9", "winograd:x", "gemm:2", "auto:2"] {
        let msg = err_msg(bad.parse::<ConvAlgo>());
        assert_mentions(&msg, &["auto, gemm, winograd or winograd:M", &format!("`{bad}`")]);
    }
}

// ---- NaN and infinities ----

test_device!(winograd_fused_relu_propagates_nan_as_pytorch, |dev| {
    // The scatter's bias + ReLU for every alpha (F(2, 3), F(4, 3), F(6, 3): alpha 4, 6, 8), with
    // bias NaN, +inf, -inf and finite for the four channels: as PyTorch's conv2d then relu gives,
    // channel 0 NaN, 1 +inf, 2 +0.0, 3 relu of the sum; the backward passes the gradient
    // wherever y is NaN or positive. Then one NaN pixel in x: NaN wherever it enters a sum.
    let p = Conv2dParams::new(2, 2, 8, 8, 4, 3, 3, 1, 1).unwrap();
    let plane = p.ohw();
    let t = |shape: &[usize], v: &[f32]| Tensor::from_vec(shape, v.to_vec(), &dev).unwrap();
    let xv = uniform(p.x_len(), -1.0, 1.0, 1);
    let wv = uniform(p.w_len(), -1.0, 1.0, 2);
    let bv = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.1];
    let rv = uniform(p.y_len(), -1.0, 1.0, 3);
    let (x, w, b, r) = (t(&[2, 2, 8, 8], &xv), t(&[4, 2, 3, 3], &wv), t(&[4], &bv), t(&[2, 4, 8, 8], &rv));
    for m in [2, 4, 6] {
        let algo = ConvAlgo::Winograd { tile: Some(m) };
        assert_eq!(algo.winograd_tile(&p), Some(m));
        let what = |s: &str| format!("{s}: F({m}, 3) on {}", dev.label());
        let mut tape = Tape::train();
        for v in [&x, &w, &b] {
            tape.watch(v);
        }
        let y = conv2d_with(&mut tape, &x, &w, &b, 1, 1, true, algo).unwrap();
        let grads = backward_from(tape, &y, &r);
        let got = |v: &Tensor| grads.get(v).unwrap().to_vec().unwrap();

        let yv = y.to_vec().unwrap();
        for (i, &v) in yv.iter().enumerate() {
            let ok = match i / plane % 4 {
                0 => v.is_nan(),
                1 => v == f32::INFINITY,
                2 => v.to_bits() == 0, // +0.0
                _ => v.is_finite() && v >= 0.0,
            };
            assert!(ok, "{}: y[{i}] = {v}", what("pattern"));
        }
        assert_close_nonfinite(&what("y"), &conv2d_fwd_cpu(&xv, &wv, &bv, &p, true), &yv, wino_atol(18), 0.0);
        let masked = relu_bwd_cpu(&yv, &rv);
        for (i, (&g, &r)) in masked.iter().zip(&rv).enumerate() {
            let passes = match i / plane % 4 {
                0 | 1 => true, // NaN, +inf
                2 => false,    // 0
                _ => yv[i] > 0.0,
            };
            assert_eq!(g, if passes { r } else { 0.0 }, "{}: masked gy at {i}", what("mask"));
        }
        let (gx, gw, gb) = (got(&x), got(&w), got(&b));
        assert_close_nonfinite(&what("gx"), &conv2d_bwd_input_cpu(&wv, &masked, &p), &gx, wino_atol(36), 0.0);
        assert_close_nonfinite(&what("gw"), &conv2d_bwd_weight_cpu(&xv, &masked, &p), &gw, wino_atol(2 * plane), 0.0);
        assert_close_nonfinite(&what("gb"), &conv2d_bwd_bias_cpu(&masked, &p), &gb, wino_atol(2 * plane), 0.0);

        // A NaN pixel (image 1, channel 1, row 3, column 5): the direct convolution is NaN where
        // the pixel is in an output's 3 x 3 window; Winograd also where it is in the output tile's
        // input tile (a transform multiplies it by 0, and NaN * 0 is NaN), which its CPU pipeline
        // mirrors exactly. Elsewhere the values are the direct convolution's.
        let mut xn = xv.clone();
        xn[(2 + 1) * 64 + 3 * 8 + 5] = f32::NAN;
        let yn = conv2d_fwd_with(&t(&[2, 2, 8, 8], &xn), &w, &b, 1, 1, true, algo).unwrap().to_vec().unwrap();
        let direct = conv2d_fwd_cpu(&xn, &wv, &bv, &p, true);
        let pipeline = winograd_fwd_cpu(&xn, &wv, &bv, &p, m).unwrap();
        for (i, ((&g, &d), &c)) in yn.iter().zip(&direct).zip(&pipeline).enumerate() {
            let (img, co, pix) = (i / (4 * plane), i / plane % 4, i % plane);
            let in_window = img == 1 && (pix / 8).abs_diff(3) <= 1 && (pix % 8).abs_diff(5) <= 1;
            assert_eq!(d.is_nan(), co == 0 || in_window, "{}: direct y[{i}] = {d}", what("NaN pixel"));
            assert_eq!(g.is_nan(), c.is_nan(), "{}: y[{i}] = {g}, the CPU pipeline gives {c}", what("NaN pixel"));
            assert!(!d.is_nan() || g.is_nan(), "{}: y[{i}] = {g}, direct NaN", what("NaN pixel"));
            if !g.is_nan() {
                assert_close_nonfinite(&what("NaN pixel"), &[d], &[g], wino_atol(18), 0.0);
            }
        }
    }
});

// ---- the CUDA kernels, emulated ----

// The kernels of kernels/winograd.cu, compiled as host C++ by ptxgrad-emu; the parameter structs
// are the engine's own #[repr(C)] types, so a layout mismatch with the .cu shows up here.
extern "C" {
    fn winograd_gather_f32_a4(src: *const f32, out: *mut f32, p: TileParams);
    fn winograd_gather_f32_a6(src: *const f32, out: *mut f32, p: TileParams);
    fn winograd_gather_f32_a8(src: *const f32, out: *mut f32, p: TileParams);
    fn winograd_scatter_f32_a4(src: *const f32, bias: *const f32, out: *mut f32, p: TileParams, has_bias: u32);
    fn winograd_scatter_f32_a6(src: *const f32, bias: *const f32, out: *mut f32, p: TileParams, has_bias: u32);
    fn winograd_scatter_f32_a8(src: *const f32, bias: *const f32, out: *mut f32, p: TileParams, has_bias: u32);
    fn winograd_gemm_f32_t128(a: *const f32, b: *const f32, c: *mut f32, p: GemmParams);
    fn winograd_gemm_f32_t128x64(a: *const f32, b: *const f32, c: *mut f32, p: GemmParams);
    fn winograd_gemm_f32_t64(a: *const f32, b: *const f32, c: *mut f32, p: GemmParams);
    fn winograd_gemm_f32_t96(a: *const f32, b: *const f32, c: *mut f32, p: GemmParams);
    fn winograd_gemm_f32_t128x96(a: *const f32, b: *const f32, c: *mut f32, p: GemmParams);
    fn winograd_gemm_3xtf32_t128(a: *const f32, b: *const f32, c: *mut f32, p: GemmParams);
    fn winograd_gemm_3xtf32_t128x64(a: *const f32, b: *const f32, c: *mut f32, p: GemmParams);
    fn winograd_gemm_3xtf32_t64(a: *const f32, b: *const f32, c: *mut f32, p: GemmParams);
    fn winograd_gemm_3xtf32_t96(a: *const f32, b: *const f32, c: *mut f32, p: GemmParams);
    fn winograd_gemm_3xtf32_t128x96(a: *const f32, b: *const f32, c: *mut f32, p: GemmParams);
}

type Gather = unsafe extern "C" fn(*const f32, *mut f32, TileParams);
type Scatter = unsafe extern "C" fn(*const f32, *const f32, *mut f32, TileParams, u32);
type Gemm = unsafe extern "C" fn(*const f32, *const f32, *mut f32, GemmParams);

fn gather_fn(name: &str) -> Gather {
    emu_kernel!(name, winograd_gather_f32_a4, winograd_gather_f32_a6, winograd_gather_f32_a8)
}

fn scatter_fn(name: &str) -> Scatter {
    emu_kernel!(name, winograd_scatter_f32_a4, winograd_scatter_f32_a6, winograd_scatter_f32_a8)
}

fn gemm_fn(name: &str) -> Gemm {
    emu_kernel!(
        name,
        winograd_gemm_f32_t128,
        winograd_gemm_f32_t128x64,
        winograd_gemm_f32_t64,
        winograd_gemm_f32_t96,
        winograd_gemm_f32_t128x96,
        winograd_gemm_3xtf32_t128,
        winograd_gemm_3xtf32_t128x64,
        winograd_gemm_3xtf32_t64,
        winograd_gemm_3xtf32_t96,
        winograd_gemm_3xtf32_t128x96,
    )
}

/// The pass's four launches, as Pass::run_cuda makes them, on the emulator; `tile` overrides the
/// GEMM's tile.
fn run_pass_emu(pass: &Pass, a_src: &[f32], b_src: &[f32], bias: Option<&[f32]>, tile: Option<Tile>) -> Vec<f32> {
    let gather = |src: &[f32], t: &TileParams| {
        let mut out = emu_uninit(t.wino_len(pass.alpha));
        let (name, cfg) = pass.tile_launch(t, false).unwrap();
        let (f, s, o, t) = (gather_fn(name), src.as_ptr() as usize, out.as_mut_ptr() as usize, *t);
        emu_launch(cfg, &|| unsafe { f(s as *const f32, o as *mut f32, t) });
        out
    };
    let a = gather(a_src, &pass.gather_a);
    let b = gather(b_src, &pass.gather_b);
    let mut c = emu_uninit(pass.gemm.out_len());
    let (name, cfg) = pass.gemm_launch(tile).unwrap();
    let (f, pa, pb, pc, g) =
        (gemm_fn(name), a.as_ptr() as usize, b.as_ptr() as usize, c.as_mut_ptr() as usize, pass.gemm);
    let (copies, stores) = (ptxgrad_emu::vec4_copies(), ptxgrad_emu::vec_stores());
    emu_launch(cfg, &|| unsafe { f(pa as *const f32, pb as *const f32, pc as *mut f32, g) });
    // The 16-byte loads are taken exactly when both operands' rows are whole groups of 4, aligned.
    let vec = g.m % 4 == 0 && g.n % 4 == 0 && pa % 16 == 0 && pb % 16 == 0;
    let vec_taken = ptxgrad_emu::vec4_copies() > copies;
    assert_eq!(vec_taken, vec, "16-byte loads taken: {vec_taken}, expected {vec} for M {} N {}", g.m, g.n);
    // C's rows take paired stores when they are whole groups of 4 from an aligned start.
    let stored = ptxgrad_emu::vec_stores() > stores;
    assert_eq!(stored, g.n % 4 == 0 && pc % 16 == 0, "vector stores of C (M {} N {}): {stored}", g.m, g.n);
    let sc = pass.scatter;
    let mut out = emu_uninit(sc.plane_len());
    let (name, cfg) = pass.tile_launch(&sc, true).unwrap();
    let has_bias = bias.is_some() as u32;
    let bias = bias.unwrap_or(&c);
    let (f, pc, pbias, po) = (scatter_fn(name), c.as_ptr() as usize, bias.as_ptr() as usize, out.as_mut_ptr() as usize);
    emu_launch(cfg, &|| unsafe { f(pc as *const f32, pbias as *const f32, po as *mut f32, sc, has_bias) });
    out
}

/// Every Winograd kernel (gather and scatter for tiles of 4, 6 and 8; the GEMM in all three block
/// tiles, with 4- and 16-byte loads; the weight grad's split-K) through its real launch, on small
/// awkward shapes, against the direct convolution. The GEMMs run in fp32 and, on the cases with
/// several blocks and the 16-byte loads, in 3xtf32 too (tensor cores; the same tolerances).
#[test]
fn winograd_kernels_emulated_match_direct_convolution() {
    // (n, cin, h, w, cout, r, pad, m): alphas 4, 6, 8; channels across 64-row tiles; channels and
    // tiles in multiples of 4 (the GEMMs' 16-byte loads), with a partial last block and k-tile.
    let cases = [
        (2, 3, 7, 9, 5, 3, 1, 2),
        (1, 70, 6, 6, 66, 3, 1, 4),
        (2, 8, 8, 8, 12, 3, 1, 4),
        (1, 132, 8, 8, 68, 3, 1, 4),
        (2, 4, 9, 7, 3, 3, 2, 6),
        (1, 5, 8, 8, 7, 5, 2, 2),
        (1, 3, 9, 9, 4, 5, 0, 4),
    ];
    for (i, &(n, cin, h, w, cout, r, pad, m)) in cases.iter().enumerate() {
        let mut p = Conv2dParams::new(n, cin, h, w, cout, r, r, 1, pad).unwrap();
        p.relu = 1;
        let seed = 500 + 10 * i as u64;
        let x = uniform(p.x_len(), -1.0, 1.0, seed);
        let wt = uniform(p.w_len(), -1.0, 1.0, seed + 1);
        let b = uniform(cout, -1.0, 1.0, seed + 2);
        let gy = uniform(p.y_len(), -1.0, 1.0, seed + 3);
        let y_ref = conv2d_fwd_cpu(&x, &wt, &b, &p, true);
        let gx_ref = conv2d_bwd_input_cpu(&wt, &gy, &p);
        let gw_ref = conv2d_bwd_weight_cpu(&x, &gy, &p);
        // The weight grad split as the GPU would, and in 3 (more splits than tiles per split).
        let splits = [weight_grad_splits(&p, m), 3];
        let maths: &[GemmMath] =
            if (1..=3).contains(&i) { &[GemmMath::Fp32, GemmMath::Tf32x3] } else { &[GemmMath::Fp32] };
        for (&math, tile) in maths.iter().flat_map(|m| Tile::ALL.map(|t| (m, t))) {
            let _m = math.scope();
            let tag =
                |s: &str| format!("{s}: F({m}, {r}), x {:?}, pad {pad}, {tile:?}, {math} (emulated)", [n, cin, h, w]);
            let y = run_pass_emu(&Pass::forward(&p, m).unwrap(), &wt, &x, Some(&b), Some(tile));
            assert_close(&tag("y"), &y_ref, &y, wino_atol(cin * r * r), 0.0);
            let gx = run_pass_emu(&Pass::input_grad(&p, m).unwrap(), &wt, &gy, None, Some(tile));
            assert_close(&tag("gx"), &gx_ref, &gx, wino_atol(cout * r * r), 0.0);
            for s in splits {
                let pass = Pass::weight_grad(&p, m, s).unwrap();
                let gw = run_pass_emu(&pass, &gy, &x, None, Some(tile));
                assert_close(
                    &tag(&format!("gw ({} splits)", pass.gemm.splits())),
                    &gw_ref,
                    &gw,
                    wino_atol(n * p.ohw()),
                    0.0,
                );
            }
        }
    }
}
