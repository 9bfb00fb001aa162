//! Bilinear resize (PyTorch align_corners=False semantics): hand-computed values, every device
//! against a naive f64 oracle on the Fashion-MNIST 28 -> 224 batch and awkward sizes, and
//! argument errors.
mod common;
use common::*;
use ptxgrad::ops::resize::resize_bilinear;
use ptxgrad::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn images(shape: &[usize], seed: u64, dev: &Device) -> Tensor<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    Tensor::from_vec(shape, (0..n).map(|_| rng.random::<u8>()).collect(), dev).unwrap()
}

/// (input shape, OH, OW)
const CASES: &[(&[usize], usize, usize)] = &[
    (&[128, 1, 28, 28], 224, 224), // the training batch: Fashion-MNIST -> AlexNet input
    (&[1, 1, 28, 28], 224, 224),   // batch 1
    (&[3, 1, 28, 28], 224, 224),   // batch 3
    (&[3, 1, 28, 28], 227, 225),   // non-integer scales
    (&[2, 3, 5, 7], 11, 3),        // C = 3, up in y, down in x
    (&[1, 1, 1, 1], 4, 4),         // a single pixel
    (&[2, 1, 10, 10], 10, 10),     // identity
    (&[1, 2, 9, 13], 4, 5),        // downsampling
    (&[1, 1, 7, 1], 3, 9),
    (&[2, 1, 2, 2], 4, 4),
    (&[1, 1, 28, 28], 1, 1),
];

/// The emulator runs the cases up to this many output elements (all but the batch of 128).
const EMULATED_MAX: usize = 1 << 18;

/// One axis of PyTorch's bilinear sampling (align_corners=False): output index `dst` of `out`
/// reads the input of length `len` at src = (dst + 0.5) * len / out - 0.5, clamped below at 0;
/// (i0, i1, weight of i1): i0 = floor(src), i1 = i0 + 1 but at most the last index.
fn taps(dst: usize, len: usize, out: usize) -> (usize, usize, f64) {
    let src = ((dst as f64 + 0.5) * len as f64 / out as f64 - 0.5).max(0.0);
    let i0 = src.floor() as usize;
    let i1 = if i0 + 1 < len { i0 + 1 } else { i0 };
    (i0, i1, src - i0 as f64)
}

/// The naive oracle, F.interpolate(x.float() / 255, size=(oh, ow), mode="bilinear",
/// align_corners=False) in f64: images (N, C, H, W) u8 -> (N, C, OH, OW), each output the
/// weighted mean of its 2 x 2 taps (rows first, then columns).
fn naive_resize(x: &[u8], shape: &[usize], oh: usize, ow: usize) -> Vec<f32> {
    let &[_, _, h, w] = shape else { panic!("images (N, C, H, W), not {shape:?}") };
    let mut y = Vec::new();
    for plane in x.chunks_exact(h * w) {
        let at = |r: usize, c: usize| plane[r * w + c] as f64 / 255.0;
        for oy in 0..oh {
            let (y0, y1, wy) = taps(oy, h, oh);
            for ox in 0..ow {
                let (x0, x1, wx) = taps(ox, w, ow);
                let top = (1.0 - wx) * at(y0, x0) + wx * at(y0, x1);
                let bottom = (1.0 - wx) * at(y1, x0) + wx * at(y1, x1);
                y.push(((1.0 - wy) * top + wy * bottom) as f32);
            }
        }
    }
    y
}

test_device!(resize_matches_hand_computed_values, |dev| {
    // [[0, 255], [255, 0]] -> 4x4. Per axis (scale 1/2) the sources are -0.25 -> 0, 0.25, 0.75,
    // 1.25 (i0 = 1, i1 = min(2, 1) = 1): [a, b] -> [a, .75a + .25b, .25a + .75b, b].
    let x = Tensor::from_vec(&[1, 1, 2, 2], vec![0u8, 255, 255, 0], &dev).unwrap();
    let y = resize_bilinear(&x, 4, 4).unwrap();
    assert_eq!(y.shape(), &[1, 1, 4, 4]);
    #[rustfmt::skip]
    let want = vec![
        0.0, 0.25, 0.75, 1.0,
        0.25, 0.375, 0.625, 0.75,
        0.75, 0.625, 0.375, 0.25,
        1.0, 0.75, 0.25, 0.0,
    ];
    // Every weight and product here is exact in binary floating point.
    assert_eq!(y.to_vec().unwrap(), want);

    // One row [0, 51, 255] -> 5 columns (scale 0.6): sources 0, 0.4, 1.0, 1.6, 2.2 (-> i0 = i1 = 2),
    // so [x0, .6 x0 + .4 x1, x1, .4 x1 + .6 x2, x2] = [0, 0.08, 0.2, 0.68, 1].
    let x = Tensor::from_vec(&[1, 1, 1, 3], vec![0u8, 51, 255], &dev).unwrap();
    let y = resize_bilinear(&x, 1, 5).unwrap().to_vec().unwrap();
    // 0.6 and 0.4 are inexact in f32: a few ulp.
    assert_close("1x3 -> 1x5", &[0.0, 0.08, 0.2, 0.68, 1.0], &y, 1e-6, 1e-6);

    // 4x4 -> 2x2 (scale 2): sources 0.5 and 2.5: each output is the mean of a 2x2 block.
    let x: Vec<u8> = (0..16).map(|v| v * 10).collect();
    let y = resize_bilinear(&Tensor::from_vec(&[1, 1, 4, 4], x, &dev).unwrap(), 2, 2).unwrap();
    let want: Vec<f32> = [25.0f32, 45.0, 105.0, 125.0].iter().map(|v| v / 255.0).collect();
    assert_close("4x4 -> 2x2", &want, &y.to_vec().unwrap(), 1e-6, 1e-6);

    // Same size: the identity, x / 255 exactly (sources are the destinations, weights 0).
    let x = images(&[2, 1, 6, 5], 3, &dev);
    let y = resize_bilinear(&x, 6, 5).unwrap().to_vec().unwrap();
    let want: Vec<f32> = x.to_vec().unwrap().iter().map(|&v| v as f32 / 255.0).collect();
    assert_eq!(y, want);
});

test_device!(resize_matches_naive_oracle, |dev| {
    for (k, &(shape, oh, ow)) in CASES.iter().enumerate() {
        if !case_runs_on(&dev, shape[0] * shape[1] * oh * ow, EMULATED_MAX) {
            continue;
        }
        let x = images(shape, k as u64, &dev);
        let y = resize_bilinear(&x, oh, ow).unwrap().to_vec().unwrap();
        // The engine computes the source coordinates in f32, as PyTorch does: a few ulp of
        // coordinates below 32 (ulp 1.9e-6) move an output by at most that much times the
        // difference of two neighbouring pixels (<= 1), plus the f32 rounding of the weighted
        // sums (~1e-7): 1e-5 bounds it. A wrong tap or weight moves outputs by O(1/255).
        let want = naive_resize(&x.to_vec().unwrap(), shape, oh, ow);
        assert_close(&format!("resize {shape:?} -> {oh}x{ow}"), &want, &y, 1e-5, 0.0);
        assert!(y.iter().all(|v| (0.0..=1.0).contains(v)), "outputs in [0, 1], case {k}");
    }
});

#[test]
fn resize_rejects_bad_arguments() {
    let dev = Device::Cpu;
    let msg = err_msg(resize_bilinear(&images(&[1, 28, 28], 0, &dev), 224, 224));
    assert_mentions(&msg, &["resize_bilinear", "4-D", "[1, 28, 28]"]);
    assert_mentions(&err_msg(resize_bilinear(&images(&[1, 1, 28, 28], 0, &dev), 0, 224)), &["0x224"]);
    assert_mentions(&err_msg(resize_bilinear(&images(&[0, 1, 28, 28], 0, &dev), 224, 224)), &["[0, 1, 28, 28]"]);
}
