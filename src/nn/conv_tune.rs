//! `--conv-algo auto`: each convolution layer runs the algorithm that is fastest for its shapes on
//! this device, as measured (cuDNN's benchmark mode does the same). For every conv layer of the
//! model at the batch size it will run, each candidate that applies (the implicit GEMM; Winograd
//! with every output tile that has kernels) runs the layer's forward and backward on synthetic
//! data: once to warm up and to check its results against the implicit GEMM's, then `reps` times
//! under CUDA events. The fastest candidate whose results agree wins; the implicit GEMM on a tie.
//!
//! The check makes `auto` safe to be the default: an algorithm whose output, input grad or
//! weight grad differs from the implicit GEMM's by more than `AGREE` (relative to the largest
//! value) is never picked, whatever its speed; nor is one that runs out of device memory (the
//! transformed tensors of the larger Winograd tiles are big), which is then skipped, not fatal.
//!
//! On the CPU nothing is timed: the CPU path's Winograd is slower than its direct convolution
//! (BENCHMARKS.md), so every layer takes the implicit GEMM. The emulator tunes like a GPU (its
//! wall time decides, which says nothing about a GPU): that is how tests run this code.

use crate::device::{Device, Gpu};
use crate::error::{Error, Result};
use crate::ops::conv2d::{conv2d_bwd, conv2d_fwd, winograd_tiles, Conv2d, Conv2dParams, ConvAlgo};
use crate::ops::gemm::math::GemmMath;
use crate::ops::gemm::GemmOpts;
use crate::tensor::Tensor;

/// Timed runs per candidate in `ptxgrad train` and `bench` (after one untimed run).
pub const REPS: usize = 3;

/// The largest |candidate - implicit GEMM| allowed, relative to the largest |implicit GEMM| of
/// the same result. Winograd's transforms cost a few 1e-5 of that in fp32 (tests/winograd.rs);
/// a wrong term costs O(1).
pub const AGREE: f32 = 1e-3;
/// `AGREE` for GEMMs in TF32 (ops::gemm::math), whose rounding of both operands to 10 mantissa
/// bits already costs ~1e-3 of the largest value in each of the two results compared.
pub const AGREE_TF32: f32 = 1e-2;
/// `AGREE` for GEMMs in BF16, whose operands keep 8 significant bits (TF32: 11). The implicit
/// GEMM in bf16 is within ~2e-3 of the exact result (tests/gemm_math.rs, emulated); Winograd's
/// transformed operands span a wider range, and in bf16 its larger tiles fail this: on the
/// emulator at 65x65, F(2x2, 3x3) agreed within 5e-3, F(4x4, 3x3) within 2-3e-2 (conv3 just
/// over), F(6x6, 3x3) and both 5x5 tiles were ~0.1 off and were rejected.
pub const AGREE_BF16: f32 = 3e-2;

/// The agreement tolerance for the GEMM arithmetic `math` (3xtf32 is fp32-accurate).
fn agree_tolerance(math: GemmMath) -> f32 {
    match math {
        GemmMath::Tf32 => AGREE_TF32,
        GemmMath::Bf16 => AGREE_BF16,
        GemmMath::Fp32 | GemmMath::Tf32x3 => AGREE,
    }
}

/// One candidate's measurement on one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub algo: ConvAlgo,
    /// Mean GPU time of forward + backward, ms (NaN if it ran out of memory).
    pub ms: f32,
    /// Largest disagreement with the implicit GEMM over y, gx and gw (relative, see `AGREE`;
    /// infinite if it ran out of memory).
    pub rel_err: f32,
    /// The largest `rel_err` that agrees: `AGREE`, or `AGREE_TF32` when tuned with TF32 GEMMs.
    pub tolerance: f32,
    /// Set when the candidate could not run for want of device memory (its workspaces: the
    /// transformed tensors of Winograd's larger tiles are big); it is then never picked.
    pub out_of_memory: bool,
}

impl Trial {
    pub fn agrees(&self) -> bool {
        self.rel_err <= self.tolerance
    }
}

/// A model's conv layer as the tuner sees it.
#[derive(Debug, Clone, Copy)]
pub struct ConvLayer {
    /// The layer's index in the model's layer table (what reports name it by).
    pub layer: usize,
    /// Its shapes at the batch size it will run.
    pub params: Conv2dParams,
    /// Whether a ReLU is fused into it.
    pub relu: bool,
    /// Whether its input needs a gradient (every layer's but the first's, as in training).
    pub input_grad: bool,
}

/// The tuning of one conv layer.
#[derive(Debug, Clone)]
pub struct LayerTuning {
    /// The layer's index in the model's layer table.
    pub layer: usize,
    pub params: Conv2dParams,
    /// Empty where nothing was timed (the CPU, or a single candidate).
    pub trials: Vec<Trial>,
    pub chosen: ConvAlgo,
}

/// The algorithms that can run `p`: the implicit GEMM, then Winograd for each output tile whose
/// alpha has kernels (none for a strided or non-square layer).
pub fn candidates(p: &Conv2dParams) -> Vec<ConvAlgo> {
    let mut out = vec![ConvAlgo::ImplicitGemm];
    out.extend(winograd_tiles(p).into_iter().map(|m| ConvAlgo::Winograd { tile: Some(m) }));
    out
}

/// The fastest trial that agrees with the implicit GEMM; the earliest (the implicit GEMM comes
/// first) among equals. None if no trial agrees (the implicit GEMM always does: it is the
/// reference, rel_err 0).
pub fn choose(trials: &[Trial]) -> Option<ConvAlgo> {
    trials
        .iter()
        .filter(|t| t.agrees())
        .fold(None, |best: Option<&Trial>, t| match best {
            Some(b) if b.ms <= t.ms => Some(b),
            _ => Some(t),
        })
        .map(|t| t.algo)
}

/// Tunes the conv layers `convs` of a model, with its GEMM options `opts`: one `LayerTuning` per
/// layer, in order. `reps` timed runs per candidate (after one untimed run).
pub fn tune(device: &Device, convs: &[ConvLayer], opts: GemmOpts, reps: usize) -> Result<Vec<LayerTuning>> {
    let mut out = Vec::new();
    for c in convs {
        let cands = candidates(&c.params);
        let (trials, chosen) = match device {
            Device::Cuda(gpu) if cands.len() > 1 => {
                let trials = time_layer(device, gpu, c, opts, &cands, reps)?;
                let chosen = choose(&trials).unwrap_or(ConvAlgo::ImplicitGemm);
                (trials, chosen)
            }
            _ => (Vec::new(), ConvAlgo::ImplicitGemm),
        };
        out.push(LayerTuning { layer: c.layer, params: c.params, trials, chosen });
    }
    Ok(out)
}

/// Runs every candidate on `layer`; the implicit GEMM (first) is the reference.
fn time_layer(
    device: &Device,
    gpu: &Gpu,
    layer: &ConvLayer,
    opts: GemmOpts,
    cands: &[ConvAlgo],
    reps: usize,
) -> Result<Vec<Trial>> {
    let (p, i) = (&layer.params, layer.layer);
    let conv = Conv2d::new(p.stride as usize, p.pad as usize).relu(layer.relu).gemm(opts);
    let (k, c_in) = (p.kh as usize, p.c_in as usize);
    let salt = 1000 * i as u64;
    let x = Tensor::synthetic(&[p.n as usize, c_in, p.h as usize, p.w as usize], -1.0, 1.0, salt, device)?;
    // Weights at the scale of the model's initialisation, so that y has the scale training sees.
    let bound = (6.0 / ((c_in + p.c_out as usize) * k * k) as f32).sqrt();
    let w = Tensor::synthetic(&[p.c_out as usize, c_in, k, k], -bound, bound, salt + 1, device)?;
    let b = Tensor::synthetic(&[p.c_out as usize], -0.1, 0.1, salt + 2, device)?;
    let gy = Tensor::synthetic(
        &[p.n as usize, p.c_out as usize, p.oh as usize, p.ow as usize],
        -1.0,
        1.0,
        salt + 3,
        device,
    )?;
    let need_gx = layer.input_grad;
    let run = |algo: ConvAlgo| -> Result<Vec<Tensor>> {
        let conv = conv.algo(algo);
        let y = conv2d_fwd(&x, &w, &b, &conv)?;
        let (gx, gw, _) = conv2d_bwd(&x, &w, &gy, &conv, need_gx)?;
        Ok([Some(y), gx, Some(gw)].into_iter().flatten().collect())
    };
    let reference: Vec<Vec<f32>> = run(ConvAlgo::ImplicitGemm)?.iter().map(Tensor::to_vec).collect::<Result<_>>()?;
    let mut trials = Vec::new();
    for &algo in cands {
        let measure = || -> Result<Trial> {
            let outputs = run(algo)?; // warm-up: loads modules, fills the buffer cache
            let mut rel_err = 0.0f32;
            for (got, want) in outputs.iter().zip(&reference) {
                rel_err = rel_err.max(relative_error(&got.to_vec()?, want));
            }
            let reps = reps.max(1);
            let ms = gpu.time_ms(|| (0..reps).try_for_each(|_| run(algo).map(drop)))? / reps as f32;
            Ok(Trial { algo, ms, rel_err, tolerance: agree_tolerance(opts.math), out_of_memory: false })
        };
        match measure() {
            Ok(t) => trials.push(t),
            // Memory is the one failure a candidate may have that training would not: skip it.
            // Anything else (a fault, a launch error) is a real error and stops here.
            Err(Error::OutOfMemory { .. }) if algo != ConvAlgo::ImplicitGemm => trials.push(Trial {
                algo,
                ms: f32::NAN,
                rel_err: f32::INFINITY,
                tolerance: agree_tolerance(opts.math),
                out_of_memory: true,
            }),
            Err(e) => return Err(e),
        }
    }
    Ok(trials)
}

/// max |got - want| / max |want| (infinite where got has a NaN or the lengths differ).
fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    if got.len() != want.len() {
        return f32::INFINITY;
    }
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    got.iter().zip(want).fold(0.0f32, |m, (g, w)| {
        let d = (g - w).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d / scale)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(algo: ConvAlgo, ms: f32, rel_err: f32) -> Trial {
        Trial { algo, ms, rel_err, tolerance: AGREE, out_of_memory: false }
    }

    #[test]
    fn picks_the_fastest_that_agrees() {
        let w = |m| ConvAlgo::Winograd { tile: Some(m) };
        let trials = [trial(ConvAlgo::ImplicitGemm, 4.0, 0.0), trial(w(2), 2.0, 1e-5), trial(w(4), 1.0, 0.5)];
        assert_eq!(choose(&trials), Some(w(2)), "winograd:4 is faster but wrong");
        let tie = [trial(ConvAlgo::ImplicitGemm, 2.0, 0.0), trial(w(2), 2.0, 1e-5)];
        assert_eq!(choose(&tie), Some(ConvAlgo::ImplicitGemm), "ties go to the implicit GEMM");
        assert_eq!(choose(&[trial(w(2), 1.0, f32::INFINITY)]), None);
        let oom = Trial { algo: w(4), ms: f32::NAN, rel_err: f32::INFINITY, tolerance: AGREE, out_of_memory: true };
        assert_eq!(choose(&[trial(ConvAlgo::ImplicitGemm, 3.0, 0.0), oom]), Some(ConvAlgo::ImplicitGemm));
    }

    #[test]
    fn relative_error_flags_nan_and_scales() {
        assert_eq!(relative_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((relative_error(&[1.0, 2.5], &[1.0, 2.0]) - 0.25).abs() < 1e-6);
        assert_eq!(relative_error(&[f32::NAN, 2.0], &[1.0, 2.0]), f32::INFINITY);
        assert_eq!(relative_error(&[1.0], &[1.0, 2.0]), f32::INFINITY);
    }

    #[test]
    fn candidates_follow_the_kernels() {
        let p = |k, s, pad| Conv2dParams::new(2, 4, 12, 12, 8, k, k, s, pad).unwrap();
        let w = |m| ConvAlgo::Winograd { tile: Some(m) };
        assert_eq!(candidates(&p(3, 1, 1)), [ConvAlgo::ImplicitGemm, w(2), w(4), w(6)], "alpha 4, 6, 8");
        assert_eq!(candidates(&p(5, 1, 2)), [ConvAlgo::ImplicitGemm, w(2), w(4)], "alpha 6, 8");
        assert_eq!(candidates(&p(11, 4, 1)), [ConvAlgo::ImplicitGemm], "stride 4");
    }
}
