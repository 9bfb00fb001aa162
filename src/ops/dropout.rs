//! Inverted dropout with rate p: each element is multiplied by 0 with probability p and otherwise
//! by 1 / (1 - p), so the expectation is unchanged and inference needs no rescaling. A multiply,
//! as in PyTorch, not a select: a dropped NaN or infinite element gives NaN, so a diverged value
//! is not hidden by the mask.
//!
//! The mask comes from a counter-based RNG, a pure function of (seed, element index) that the
//! kernel computes identically (see kernels/dropout.cu): the backward regenerates the forward's
//! mask instead of storing it, and nothing is copied from the host. The caller passes a fresh
//! seed per call (per step and per layer): the same seed gives the same mask.

use crate::device::grid_1d;
use crate::error::{Error, Result};
use crate::ptx::Module;
use crate::tape::Tape;
use crate::tensor::{Storage, Tensor};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's output function (Steele, Lea, Flood 2014; "mix13" constants).
fn splitmix64_mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The start of a seed's stream.
fn stream_start(seed: u64) -> u64 {
    splitmix64_mix(seed.wrapping_add(GOLDEN))
}

fn keep_from_start(start: u64, index: u64, p: f32) -> bool {
    let h = splitmix64_mix(start.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN)));
    // Top 24 bits -> u = k / 2^24 in [0, 1), exactly representable in f32.
    let u = (h >> 40) as f32 * (1.0 / 16_777_216.0);
    u >= p
}

/// Whether element `index` survives dropout at rate `p` under `seed`: the same function as the
/// kernel's `dropout_keep`, bit for bit. P(keep) = 1 - ceil(p * 2^24) / 2^24.
pub fn dropout_mask_keep(seed: u64, index: u64, p: f32) -> bool {
    keep_from_start(stream_start(seed), index, p)
}

/// 1 / (1 - p), after checking that p is in [0, 1).
fn scale_for(p: f32) -> Result<f32> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Invalid(format!("dropout: the rate p must be in [0, 1), found {p}")));
    }
    Ok(1.0 / (1.0 - p))
}

/// CPU reference: `out[i]` = `v[i]` * (keep(seed, i) ? scale : 0) (the forward on x, the backward on
/// gy): the mask multiplies, as in PyTorch, so a dropped NaN or inf gives NaN.
pub fn dropout_cpu(v: &[f32], p: f32, seed: u64) -> Result<Vec<f32>> {
    let scale = scale_for(p)?;
    let start = stream_start(seed);
    Ok(v.iter().enumerate().map(|(i, &x)| x * if keep_from_start(start, i as u64, p) { scale } else { 0.0 }).collect())
}

fn dropout_apply(v: &Tensor, p: f32, seed: u64, kernel: &'static str) -> Result<Tensor> {
    let scale = scale_for(p)?;
    let n = v.len() as u64;
    let storage = match v.storage() {
        Storage::Cpu(data) => Storage::Cpu(dropout_cpu(data, p, seed)?),
        Storage::Cuda { gpu, buf } => {
            let mut out = gpu.uninit::<f32>(v.len())?;
            crate::launch!(gpu, Module::Dropout, kernel, grid_1d(v.len(), 256), buf, &mut out, &p, &scale, &seed, &n)?;
            Storage::Cuda { gpu: gpu.clone(), buf: out }
        }
    };
    Ok(Tensor::from_storage(v.shape().to_vec(), storage))
}

/// y = x * mask / (1 - p), any shape (always applies the mask: see `dropout` for eval mode).
pub fn dropout_fwd(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    dropout_apply(x, p, seed, "dropout_fwd_f32")
}

/// gx = gy * mask / (1 - p), with the mask regenerated from (seed, index).
pub fn dropout_bwd(gy: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    dropout_apply(gy, p, seed, "dropout_bwd_f32")
}

/// Recorded dropout: the identity (x itself) in eval mode or when p == 0.
pub fn dropout(tape: &mut Tape, x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    scale_for(p)?;
    if !tape.is_training() || p == 0.0 {
        return Ok(x.clone());
    }
    let y = dropout_fwd(x, p, seed)?;
    let x_id = x.id();
    tape.record(&y, &[x], move |gy, grads| grads.accumulate(x_id, dropout_bwd(gy, p, seed)?));
    Ok(y)
}
