//! Global average pooling, PyTorch's `nn.AdaptiveAvgPool2d((1, 1))`: x (N, C, H, W) ->
//! y (N, C, 1, 1), the mean of each (n, c) plane; the backward spreads gy / (H * W) over the
//! plane (see kernels/adaptive_avgpool2d.cu). The recorded op is `global_avgpool2d`.

use cudarc::driver::LaunchConfig;

use crate::device::grid_planes;
use crate::error::{Error, Result};
use crate::ops::parallel::for_each_row;
use crate::ptx::Module;
use crate::tape::Tape;
use crate::tensor::{Storage, Tensor};

const OP: &str = "adaptive_avgpool2d";

/// The forward kernel's largest block (GAP_BLOCK in the kernel).
const MAX_BLOCK: u32 = 256;

/// (N * C, H * W) of a (N, C, H, W) input: the planes and their size. Refuses what PyTorch does
/// (not 4-D; C, H or W of 0) and what the kernels' 32-bit plane index cannot hold.
fn planes_of(x_shape: &[usize]) -> Result<(usize, usize)> {
    let [n, c, h, w] = <[usize; 4]>::try_from(x_shape)
        .map_err(|_| Error::shape(OP, "a 4-D (N, C, H, W) input", format!("shape {x_shape:?}")))?;
    if c == 0 || h == 0 || w == 0 {
        return Err(Error::shape(OP, "C, H and W of at least 1 (N may be 0)", format!("shape {x_shape:?}")));
    }
    let too_big = || Error::TooLarge(format!("{OP}: expected planes below 2^31 elements, found shape {x_shape:?}"));
    let hw = h.checked_mul(w).filter(|&hw| hw < 1 << 31).ok_or_else(too_big)?;
    let planes = n.checked_mul(c).filter(|p| p.checked_mul(hw).is_some()).ok_or_else(too_big)?;
    Ok((planes, hw))
}

/// CPU reference, forward: x (planes * hw values, plane after plane) -> the mean of each plane,
/// summed in f64 and rounded once (the kernel's fp32 tree sum is within a few ulp of it).
pub fn adaptive_avgpool2d_fwd_cpu(x: &[f32], hw: usize) -> Vec<f32> {
    x.chunks_exact(hw.max(1)).map(|p| (p.iter().map(|&v| v as f64).sum::<f64>() / hw as f64) as f32).collect()
}

/// CPU reference, backward: gy (one value per plane) -> gx, gy / hw at each of the plane's `hw`
/// elements, computed as the kernel does (an f32 division): bit-identical.
pub fn adaptive_avgpool2d_bwd_cpu(gy: &[f32], hw: usize) -> Vec<f32> {
    let mut gx = vec![0.0f32; gy.len() * hw];
    for_each_row(&mut gx, hw, |plane, gp| gp.fill(gy[plane] / hw as f32));
    gx
}

/// The forward's launch: one block per plane (at most 2^31 - 1 blocks; the kernel loops over
/// the rest), of whole warps up to 256 threads, one thread per element where the plane is smaller.
fn fwd_launch(planes: usize, hw: usize) -> LaunchConfig {
    let threads = (hw as u32).div_ceil(32).clamp(1, MAX_BLOCK / 32) * 32;
    let grid_x = (planes as u64).clamp(1, (1 << 31) - 1) as u32;
    LaunchConfig { grid_dim: (grid_x, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// The backward's launch: one thread per element, the planes over grid x (`grid_planes`).
fn bwd_launch(planes: usize, hw: usize) -> LaunchConfig {
    grid_planes(planes, hw as u32)
}

/// y = the mean of each plane: x (N, C, H, W) -> y (N, C, 1, 1).
pub fn adaptive_avgpool2d_fwd(x: &Tensor) -> Result<Tensor> {
    let (planes, hw) = planes_of(x.shape())?;
    let out_shape = vec![x.shape()[0], x.shape()[1], 1, 1];
    let storage = match x.storage() {
        Storage::Cpu(v) => Storage::Cpu(adaptive_avgpool2d_fwd_cpu(v, hw)),
        Storage::Cuda { gpu, buf } => {
            let mut y = gpu.uninit::<f32>(planes)?;
            let (cfg, planes, hw) = (fwd_launch(planes, hw), planes as u64, hw as u32);
            crate::launch!(
                gpu,
                Module::AdaptiveAvgpool2d,
                "adaptive_avgpool2d_fwd_f32",
                cfg,
                buf,
                &mut y,
                &planes,
                &hw
            )?;
            Storage::Cuda { gpu: gpu.clone(), buf: y }
        }
    };
    Ok(Tensor::from_storage(out_shape, storage))
}

/// gx (shape `x_shape`, the forward's input (N, C, H, W)) from gy (N, C, 1, 1).
pub fn adaptive_avgpool2d_bwd(gy: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
    let (planes, hw) = planes_of(x_shape)?;
    gy.expect_shape("adaptive_avgpool2d_bwd", "gy", &[x_shape[0], x_shape[1], 1, 1])?;
    let storage = match gy.storage() {
        Storage::Cpu(g) => Storage::Cpu(adaptive_avgpool2d_bwd_cpu(g, hw)),
        Storage::Cuda { gpu, buf } => {
            let mut gx = gpu.uninit::<f32>(planes * hw)?;
            let (cfg, planes, hw) = (bwd_launch(planes, hw), planes as u64, hw as u32);
            crate::launch!(
                gpu,
                Module::AdaptiveAvgpool2d,
                "adaptive_avgpool2d_bwd_f32",
                cfg,
                buf,
                &mut gx,
                &planes,
                &hw
            )?;
            Storage::Cuda { gpu: gpu.clone(), buf: gx }
        }
    };
    Ok(Tensor::from_storage(x_shape.to_vec(), storage))
}

/// Recorded global average pooling (`nn.AdaptiveAvgPool2d((1, 1))`): x (N, C, H, W) ->
/// (N, C, 1, 1). The tape keeps only x's shape.
pub fn global_avgpool2d(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    let y = adaptive_avgpool2d_fwd(x)?;
    let (x_id, x_shape) = (x.id(), x.shape().to_vec());
    tape.record(&y, &[x], move |gy, grads| grads.accumulate(x_id, adaptive_avgpool2d_bwd(gy, &x_shape)?));
    Ok(y)
}
