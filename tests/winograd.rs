//! Winograd F(m x m, r x r) on the CPU: the forward, input grad and weight grad against the
//! direct convolution, for every tile size the kernels are built for and awkward shapes (partial
//! tiles at the right and bottom edges, padding 0..=r-1, one channel, odd batch). The CUDA
//! kernels are checked against the direct reference in tests/conv2d.rs.
mod common;
use common::*;
use ptxgrad::ops::conv2d::{conv2d_bwd_input_cpu, conv2d_bwd_weight_cpu, conv2d_fwd_cpu, Conv2dParams, ConvAlgo};
use ptxgrad::ops::winograd::{
    output_tile, winograd_bwd_input_cpu, winograd_bwd_weight_cpu, winograd_fwd_cpu, KERNEL_ALPHAS,
};

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
    for s in ["gemm", "winograd", "winograd:2", "winograd:6"] {
        assert_eq!(s.parse::<ConvAlgo>().unwrap().to_string(), s);
    }
    for bad in ["", "fft", "winograd:0", "winograd:9", "winograd:x", "gemm:2"] {
        let msg = err_msg(bad.parse::<ConvAlgo>());
        assert_mentions(&msg, &["gemm, winograd or winograd:M", &format!("`{bad}`")]);
    }
}
