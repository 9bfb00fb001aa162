//! Counts of the non-finite values (NaN, +Inf, -Inf) of a list of f32 tensors, made where the
//! tensors live: a training run checks every parameter before it writes a checkpoint, and on a
//! GPU that costs one pass over the parameters' memory and one small copy to the host (one count
//! per tensor), not a copy of the parameters.

use cudarc::driver::LaunchConfig;

use crate::device::{grid_1d, Device};
use crate::error::Result;
use crate::ops::parallel::map_ranges;
use crate::ptx::Module;
use crate::tensor::{common_device, Tensor};

/// Threads per block of `nonfinite_count_f32` (its launch bounds, NONFINITE_BLOCK).
const THREADS: u32 = 256;
/// The most blocks of one launch: about two waves of 256-thread blocks on an H200 (132 SMs of 8
/// such blocks); the kernel's grid-stride loop covers the rest. The kernel's 32-bit per-warp
/// sums rely on this grid (see kernels/nonfinite.cu).
const MAX_BLOCKS: u32 = 2048;

/// Tensors with fewer elements are counted on the calling thread (splitting them over the
/// worker pool costs more than it saves).
const PARALLEL_MIN: usize = 1 << 18;

/// CPU reference: the number of NaN, +Inf and -Inf values in `x` (f32::MAX, subnormals and -0.0
/// are finite).
pub fn count_nonfinite_cpu(x: &[f32]) -> u64 {
    x.iter().filter(|v| !v.is_finite()).count() as u64
}

/// The launch that counts `n` elements: one thread per group of 4 (the kernel's float4 loads),
/// at most MAX_BLOCKS blocks.
fn grid(n: u64) -> LaunchConfig {
    let mut cfg = grid_1d((n as usize).div_ceil(4), THREADS);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(MAX_BLOCKS);
    cfg
}

/// The number of non-finite values of each tensor, in order; all on one device (else a
/// DeviceMismatch error). An empty list gives an empty vector, an empty tensor 0.
///
/// On a GPU (or the emulator): one zeroed buffer of 64-bit counters, one kernel launch per
/// non-empty tensor adding into its own counter, then a single copy of the counters to the host
/// (the one wait for the device). On the CPU: `count_nonfinite_cpu`, large tensors split over
/// the worker pool.
pub fn nonfinite_counts(tensors: &[&Tensor]) -> Result<Vec<u64>> {
    if tensors.is_empty() {
        return Ok(Vec::new());
    }
    let devices: Vec<Device> = tensors.iter().map(|t| t.device()).collect();
    match common_device("nonfinite_counts", &devices)? {
        Device::Cpu => Ok(tensors
            .iter()
            .map(|t| {
                let x = t.cpu().expect("checked by common_device");
                if x.len() < PARALLEL_MIN {
                    count_nonfinite_cpu(x)
                } else {
                    map_ranges(x.len(), |r| count_nonfinite_cpu(&x[r])).into_iter().sum()
                }
            })
            .collect()),
        Device::Cuda(gpu) => {
            let mut counts = gpu.zeros::<u64>(tensors.len())?;
            for (slot, t) in tensors.iter().enumerate() {
                let n = t.len() as u64;
                if n == 0 {
                    continue; // its counter stays 0
                }
                let (_, x) = t.cuda().expect("checked by common_device");
                let slot = slot as u64;
                crate::launch!(&gpu, Module::Nonfinite, "nonfinite_count_f32", grid(n), x, &mut counts, &slot, &n)?;
            }
            gpu.download(&counts)
        }
    }
}
