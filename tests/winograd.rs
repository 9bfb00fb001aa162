//! Winograd F(m x m, r x r): the CPU pipeline's forward, input grad and weight grad against the
//! direct sums (tests/common/kernels.rs), for every tile size the kernels are built for and
//! awkward shapes (partial tiles at the right and bottom edges, padding 0..=r-1, one channel,
//! odd batch); then the CUDA kernels themselves, run on the CPU by the emulator (emu/), with the
//! launches the GPU gets, by name, against the same sums. On a GPU, tests/conv2d.rs checks them
//! on AlexNet's shapes.
mod common;
use common::kernels::*;
use common::*;
use ptxgrad::device::DeviceBuf;
use ptxgrad::ops::conv2d::params::KERNEL_ALPHAS;
use ptxgrad::ops::conv2d::winograd::{
    weight_grad_splits, winograd_bwd_input_cpu, winograd_bwd_weight_cpu, winograd_fwd_cpu, Pass, TileParams,
};
use ptxgrad::ops::conv2d::{conv2d, conv2d_fwd, output_tile, Conv2d, Conv2dParams, ConvAlgo};
use ptxgrad::ops::gemm::math::GemmMath;
use ptxgrad::ops::gemm::plan::{Planner, Tile};
use ptxgrad::ops::gemm::GemmOpts;
use ptxgrad::ptx::Module;
use ptxgrad::{Gpu, Tape, Tensor};

/// (n, c_in, h, w, c_out, r, pad)
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
fn winograd_cpu_matches_direct_sums() {
    for (i, &(n, c_in, h, w, c_out, r, pad)) in CASES.iter().enumerate() {
        let p = Conv2dParams::new(n, c_in, h, w, c_out, r, r, 1, pad).unwrap();
        let seed = 100 * i as u64;
        let xv = uniform(p.x_len(), -1.0, 1.0, seed);
        let wv = uniform(p.w_len(), -1.0, 1.0, seed + 1);
        let bv = uniform(c_out, -1.0, 1.0, seed + 2);
        let gyv = uniform(p.y_len(), -1.0, 1.0, seed + 3);
        let (y_exact, gx_exact, gw_exact) = (
            to_f32(&conv_fwd_exact(&xv, &wv, &bv, &p, false)),
            to_f32(&conv_input_grad_exact(&wv, &gyv, &p)),
            to_f32(&conv_weight_grad_exact(&xv, &gyv, &p)),
        );
        // Every m with alpha = m + r - 1 one of the kernels' 4, 6, 8.
        for m in (1..=7).filter(|&m| KERNEL_ALPHAS.contains(&(m + r - 1))) {
            assert_eq!(output_tile(&p, Some(m)), Some(m));
            let tag = |s: &str| format!("{s}: F({m}, {r}) on x {:?}, pad {pad}", [n, c_in, h, w]);
            let y = winograd_fwd_cpu(&xv, &wv, &bv, &p, m).unwrap();
            assert_close(&tag("y"), &y_exact, &y, wino_atol(c_in * r * r), 0.0);
            let gx = winograd_bwd_input_cpu(&wv, &gyv, &p, m).unwrap();
            assert_close(&tag("gx"), &gx_exact, &gx, wino_atol(c_out * r * r), 0.0);
            let gw = winograd_bwd_weight_cpu(&xv, &gyv, &p, m).unwrap();
            assert_close(&tag("gw"), &gw_exact, &gw, wino_atol(n * p.ohw()), 0.0);
        }
    }
}

#[test]
fn winograd_fused_relu_matches_direct_sums() {
    let mut p = Conv2dParams::new(2, 3, 12, 12, 4, 3, 3, 1, 1).unwrap();
    p.relu = 1;
    let (x, w, b) = (uniform(p.x_len(), -1.0, 1.0, 1), uniform(p.w_len(), -1.0, 1.0, 2), uniform(4, -1.0, 1.0, 3));
    let y = winograd_fwd_cpu(&x, &w, &b, &p, 4).unwrap();
    assert!(y.iter().all(|&v| v >= 0.0), "ReLU applied");
    assert_close("relu(y)", &to_f32(&conv_fwd_exact(&x, &w, &b, &p, true)), &y, wino_atol(27), 0.0);
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
        let conv = Conv2d::new(1, 1).relu(true).algo(algo);
        let what = |s: &str| format!("{s}: F({m}, 3) on {}", dev.label());
        let mut tape = Tape::train();
        for v in [&x, &w, &b] {
            tape.watch(v);
        }
        let y = conv2d(&mut tape, &x, &w, &b, &conv).unwrap();
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
        let y_exact = to_f32(&conv_fwd_exact(&xv, &wv, &bv, &p, true));
        assert_close_nonfinite(&what("y"), &y_exact, &yv, wino_atol(18), 0.0);
        let masked = relu_mask_exact(&yv, &rv);
        let (gx, gw, gb) = (got(&x), got(&w), got(&b));
        let gx_exact = to_f32(&conv_input_grad_exact(&wv, &masked, &p));
        assert_close_nonfinite(&what("gx"), &gx_exact, &gx, wino_atol(36), 0.0);
        let gw_exact = to_f32(&conv_weight_grad_exact(&xv, &masked, &p));
        assert_close_nonfinite(&what("gw"), &gw_exact, &gw, wino_atol(2 * plane), 0.0);
        let gb_exact = to_f32(&conv_bias_grad_exact(&masked, &p));
        assert_close_nonfinite(&what("gb"), &gb_exact, &gb, wino_atol(2 * plane), 0.0);

        // A NaN pixel (image 1, channel 1, row 3, column 5): the direct convolution is NaN where
        // the pixel is in an output's 3 x 3 window; Winograd also where it is in the input tile
        // of the output's m x m tile (alpha x alpha, from row th*m - pad): a transform
        // multiplies it by 0, NaN * 0 is NaN, and every transform mixes the whole tile.
        // Elsewhere the values are the direct convolution's.
        let (nan_row, nan_col) = (3, 5);
        let mut xn = xv.clone();
        xn[(2 + 1) * 64 + nan_row * 8 + nan_col] = f32::NAN;
        let yn = conv2d_fwd(&t(&[2, 2, 8, 8], &xn), &w, &b, &conv).unwrap().to_vec().unwrap();
        let direct = to_f32(&conv_fwd_exact(&xn, &wv, &bv, &p, true));
        let alpha = m + 2;
        // Whether input row (column) `at` lies in the input tile of output row (column) `out`.
        let in_tile = |out: usize, at: usize| (at + 1).checked_sub(out / m * m).is_some_and(|d| d < alpha);
        for (i, (&g, &d)) in yn.iter().zip(&direct).enumerate() {
            let (img, co, pix) = (i / (4 * plane), i / plane % 4, i % plane);
            let (oy, ox) = (pix / 8, pix % 8);
            let in_window = img == 1 && oy.abs_diff(nan_row) <= 1 && ox.abs_diff(nan_col) <= 1;
            let tile_nan = img == 1 && in_tile(oy, nan_row) && in_tile(ox, nan_col);
            assert_eq!(d.is_nan(), co == 0 || in_window, "{}: direct y[{i}] = {d}", what("NaN pixel"));
            assert_eq!(g.is_nan(), co == 0 || tile_nan, "{}: y[{i}] = {g}", what("NaN pixel"));
            if !g.is_nan() {
                assert_close_nonfinite(&what("NaN pixel"), &[d], &[g], wino_atol(18), 0.0);
            }
        }
    }
});

// ---- the CUDA kernels, emulated, launched by name ----

type Buf = DeviceBuf<f32>;

/// The pass's four launches, as the engine makes them (gathers, the GEMM in `math` on `tile`,
/// the scatter), on the emulator, through `launch!`: the emulator's kernel table checks each
/// name, its module and the block size against the kernel's launch bounds, and the parameter
/// structs are the engine's own #[repr(C)] types, so a layout mismatch with the .cu shows up here.
fn run_pass(
    gpu: &Gpu,
    pass: &Pass,
    (a_src, b_src, bias): (&Buf, &Buf, Option<&Buf>),
    math: GemmMath,
    tile: Tile,
) -> ptxgrad::Result<Vec<f32>> {
    let gather = |src: &Buf, t: &TileParams| -> ptxgrad::Result<Buf> {
        let mut out = gpu.uninit::<f32>(t.wino_len(pass.alpha))?;
        let (name, cfg) = pass.tile_launch(t, false)?;
        ptxgrad::launch!(gpu, Module::Winograd, name, cfg, src, &mut out, t)?;
        Ok(out)
    };
    let a = gather(a_src, &pass.gather_a)?;
    let b = gather(b_src, &pass.gather_b)?;
    let mut c = gpu.uninit::<f32>(pass.gemm.out_len())?;
    let (name, cfg) = pass.gemm_launch(&Planner::new(gpu, GemmOpts::math(math)), math, Some(tile))?;
    let g = pass.gemm;
    let (copies, stores) = (ptxgrad_emu::vec4_copies(), ptxgrad_emu::vec_stores());
    ptxgrad::launch!(gpu, Module::Winograd, name, cfg, &a, &b, &mut c, &g)?;
    // The 16-byte loads are taken exactly when both operands' rows are whole groups of 4, aligned.
    let vec = g.m.is_multiple_of(4)
        && g.n.is_multiple_of(4)
        && emu_addr(&a).is_multiple_of(16)
        && emu_addr(&b).is_multiple_of(16);
    let vec_taken = ptxgrad_emu::vec4_copies() > copies;
    assert_eq!(vec_taken, vec, "16-byte loads taken: {vec_taken}, expected {vec} for M {} N {}", g.m, g.n);
    // C's rows take paired stores when they are whole groups of 4 from an aligned start.
    let stored = ptxgrad_emu::vec_stores() > stores;
    assert_eq!(
        stored,
        g.n.is_multiple_of(4) && emu_addr(&c).is_multiple_of(16),
        "vector stores of C (M {} N {}): {stored}",
        g.m,
        g.n
    );
    let sc = &pass.scatter;
    let mut out = gpu.uninit::<f32>(sc.plane_len())?;
    let (name, cfg) = pass.tile_launch(sc, true)?;
    let has_bias = bias.is_some() as u32;
    // Without a bias the kernel never reads the pointer: any valid buffer stands in.
    let bias = bias.unwrap_or(&c);
    ptxgrad::launch!(gpu, Module::Winograd, name, cfg, &c, bias, &mut out, sc, &has_bias)?;
    gpu.download(&out)
}

/// Every Winograd kernel (gather and scatter for tiles of 4, 6 and 8; the GEMM in all five block
/// tiles, with 4- and 16-byte loads; the weight grad's split-K) through its real launch, on small
/// awkward shapes, against the direct sums. The GEMMs run in fp32 and, on the cases with several
/// blocks and the 16-byte loads, in 3xtf32 too (tensor cores; the same tolerances).
#[test]
fn winograd_kernels_emulated_match_direct_sums() -> ptxgrad::Result<()> {
    let gpu = emu_gpu();
    // (n, c_in, h, w, c_out, r, pad, m): alphas 4, 6, 8; channels across 64-row tiles; channels
    // and tiles in multiples of 4 (the GEMMs' 16-byte loads), with a partial last block and k-tile.
    let cases = [
        (2, 3, 7, 9, 5, 3, 1, 2),
        (1, 70, 6, 6, 66, 3, 1, 4),
        (2, 8, 8, 8, 12, 3, 1, 4),
        (1, 132, 8, 8, 68, 3, 1, 4),
        (2, 4, 9, 7, 3, 3, 2, 6),
        (1, 5, 8, 8, 7, 5, 2, 2),
        (1, 3, 9, 9, 4, 5, 0, 4),
    ];
    for (i, &(n, c_in, h, w, c_out, r, pad, m)) in cases.iter().enumerate() {
        let mut p = Conv2dParams::new(n, c_in, h, w, c_out, r, r, 1, pad).unwrap();
        p.relu = 1;
        let seed = 500 + 10 * i as u64;
        let xv = uniform(p.x_len(), -1.0, 1.0, seed);
        let wv = uniform(p.w_len(), -1.0, 1.0, seed + 1);
        let bv = uniform(c_out, -1.0, 1.0, seed + 2);
        let gyv = uniform(p.y_len(), -1.0, 1.0, seed + 3);
        let (x, filters, b, gy) = (gpu.upload(&xv)?, gpu.upload(&wv)?, gpu.upload(&bv)?, gpu.upload(&gyv)?);
        let y_exact = to_f32(&conv_fwd_exact(&xv, &wv, &bv, &p, true));
        let gx_exact = to_f32(&conv_input_grad_exact(&wv, &gyv, &p));
        let gw_exact = to_f32(&conv_weight_grad_exact(&xv, &gyv, &p));
        // The weight grad split as the GPU would, and in 3 (more splits than tiles per split).
        let splits = [weight_grad_splits(&p, m, &Planner::new(&gpu, GemmOpts::default())), 3];
        let maths: &[GemmMath] =
            if (1..=3).contains(&i) { &[GemmMath::Fp32, GemmMath::Tf32x3] } else { &[GemmMath::Fp32] };
        for (&math, tile) in maths.iter().flat_map(|m| Tile::ALL.map(|t| (m, t))) {
            let tag =
                |s: &str| format!("{s}: F({m}, {r}), x {:?}, pad {pad}, {tile:?}, {math} (emulated)", [n, c_in, h, w]);
            let y = run_pass(&gpu, &Pass::forward(&p, m)?, (&filters, &x, Some(&b)), math, tile)?;
            assert_close(&tag("y"), &y_exact, &y, wino_atol(c_in * r * r), 0.0);
            let gx = run_pass(&gpu, &Pass::input_grad(&p, m)?, (&filters, &gy, None), math, tile)?;
            assert_close(&tag("gx"), &gx_exact, &gx, wino_atol(c_out * r * r), 0.0);
            for s in splits {
                let pass = Pass::weight_grad(&p, m, s)?;
                let gw = run_pass(&gpu, &pass, (&gy, &x, None), math, tile)?;
                let what = tag(&format!("gw ({} splits)", pass.gemm.splits()));
                assert_close(&what, &gw_exact, &gw, wino_atol(n * p.ohw()), 0.0);
            }
        }
    }
    Ok(())
}
