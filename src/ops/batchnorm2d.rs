//! Batch normalisation over (N, H, W) per channel, PyTorch's `BatchNorm2d`: x (N, C, H, W),
//! gamma, beta, running mean and variance (C); y = gamma * (x - mean) / sqrt(var + eps) + beta.
//!
//! Training (a training tape) normalises with the batch's mean and biased variance, returns
//! them (`BatchStats`) for `update_running`, and records the backward: gradients for x, gamma
//! and beta. Evaluation normalises with the running statistics and records nothing. The running
//! update is PyTorch's: momentum 0.1, the variance unbiased (times count / (count - 1)).
//!
//! The variance is two passes (the mean, then the centred squares), never `E[x^2] - E[x]^2`, and
//! each channel's sums follow a fixed order: BN_THREADS strided partial sums, then a tree (see
//! kernels/batchnorm2d.cu). The CPU reference sums in the same order, so it agrees with the
//! kernels to the rounding of single operations.

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use crate::device::{grid_1d, grid_planes, Gpu};
use crate::error::{Error, Result};
use crate::ops::fast_div::FastDiv;
use crate::ptx::Module;
use crate::tape::Tape;
use crate::tensor::{common_device, Storage, Tensor};

/// PyTorch's default eps.
pub const BN_EPS: f32 = 1e-5;
/// PyTorch's default momentum of the running statistics.
pub const BN_MOMENTUM: f32 = 0.1;
/// Threads per block of the reduction kernels, and partial sums per channel (kernels/batchnorm2d.cu).
pub const BN_THREADS: usize = 256;

/// Mirrors `Batchnorm2dParams` in kernels/batchnorm2d.cu, field for field.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batchnorm2dParams {
    pub n: u32,
    pub c: u32,
    pub hw: u32,
    /// n * hw: the values of one channel.
    pub count: u32,
    pub eps: f32,
    pub momentum: f32,
    pub hw_div: FastDiv,
}

// SAFETY: #[repr(C)] plain data, mirrored field for field by the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for Batchnorm2dParams {}

impl Batchnorm2dParams {
    /// Checks a (N, C, H, W) input and the (C) per-channel tensors' shapes.
    pub fn new(x_shape: &[usize]) -> Result<Self> {
        let [n, c, h, w] = <[usize; 4]>::try_from(x_shape)
            .map_err(|_| Error::shape("batchnorm2d", "a 4-D (N, C, H, W) input", format!("shape {x_shape:?}")))?;
        let hw = h * w;
        let count = n * hw;
        // The kernels index a channel's values with FastDiv (below 2^31) and count planes in 32 bits.
        if count >= 1 << 31 || n * c >= 1 << 32 || count == 0 {
            return Err(Error::shape(
                "batchnorm2d",
                "1 to 2^31 - 1 values per channel (N * H * W) and N * C below 2^32",
                format!("shape {x_shape:?}"),
            ));
        }
        Ok(Batchnorm2dParams {
            n: n as u32,
            c: c as u32,
            hw: hw as u32,
            count: count as u32,
            eps: BN_EPS,
            momentum: BN_MOMENTUM,
            hw_div: FastDiv::new(hw as u32),
        })
    }

    fn reduce_launch(&self) -> LaunchConfig {
        let blocks = self.c.clamp(1, 65535);
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BN_THREADS as u32, 1, 1), shared_mem_bytes: 0 }
    }

    fn planes_launch(&self) -> LaunchConfig {
        grid_planes(self.n as usize * self.c as usize, self.hw)
    }
}

/// The statistics of one training batch, per channel: the mean and the biased variance (C),
/// each over `count` = N*H*W values.
#[derive(Debug)]
pub struct BatchStats {
    pub mean: Tensor,
    pub var: Tensor,
    pub count: usize,
}

/// The values of channel `ch` of x, in the kernels' order (element e = n * hw + i).
fn channel<'a>(x: &'a [f32], p: &Batchnorm2dParams, ch: usize) -> impl Iterator<Item = f32> + 'a {
    let (n, c, hw) = (p.n as usize, p.c as usize, p.hw as usize);
    (0..n).flat_map(move |ni| x[(ni * c + ch) * hw..(ni * c + ch + 1) * hw].iter().copied())
}

/// The kernels' sum: BN_THREADS partial sums (thread t adds elements t, t + BN_THREADS, ...),
/// then the tree sh[t] += sh[t + s] for s = BN_THREADS/2, ..., 1.
fn block_sum(values: impl Iterator<Item = f32>) -> f32 {
    let mut sh = [0.0f32; BN_THREADS];
    for (e, v) in values.enumerate() {
        sh[e % BN_THREADS] += v;
    }
    let mut s = BN_THREADS / 2;
    while s > 0 {
        for t in 0..s {
            sh[t] += sh[t + s];
        }
        s /= 2;
    }
    sh[0]
}

fn rstd(var: f32, eps: f32) -> f32 {
    1.0 / (var + eps).sqrt()
}

/// CPU reference: the batch's (mean, biased variance) per channel, two passes.
pub fn batchnorm2d_stats_cpu(x: &[f32], p: &Batchnorm2dParams) -> (Vec<f32>, Vec<f32>) {
    let per: Vec<(f32, f32)> = (0..p.c as usize)
        .into_par_iter()
        .map(|ch| {
            let m = block_sum(channel(x, p, ch)) / p.count as f32;
            let v = block_sum(channel(x, p, ch).map(|v| (v - m) * (v - m))) / p.count as f32;
            (m, v)
        })
        .collect();
    per.into_iter().unzip()
}

/// CPU reference: y = (x - mean) * (gamma * rstd) + beta with the given statistics.
pub fn batchnorm2d_apply_cpu(
    x: &[f32],
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    beta: &[f32],
    p: &Batchnorm2dParams,
) -> Vec<f32> {
    let (c, hw) = (p.c as usize, p.hw as usize);
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(hw).zip(x.par_chunks(hw)).enumerate().for_each(|(plane, (yp, xp))| {
        let ch = plane % c;
        let (m, scale, shift) = (mean[ch], gamma[ch] * rstd(var[ch], p.eps), beta[ch]);
        for (y, &x) in yp.iter_mut().zip(xp) {
            *y = (x - m) * scale + shift;
        }
    });
    y
}

/// CPU reference, backward of training mode: (gx, ggamma, gbeta) from x, gy, the batch's
/// statistics and gamma.
pub fn batchnorm2d_bwd_cpu(
    x: &[f32],
    gy: &[f32],
    mean: &[f32],
    var: &[f32],
    gamma: &[f32],
    p: &Batchnorm2dParams,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let sums: Vec<(f32, f32)> = (0..p.c as usize)
        .into_par_iter()
        .map(|ch| {
            let (m, r) = (mean[ch], rstd(var[ch], p.eps));
            let gb = block_sum(channel(gy, p, ch));
            let gg = block_sum(channel(gy, p, ch).zip(channel(x, p, ch)).map(|(g, x)| g * ((x - m) * r)));
            (gb, gg)
        })
        .collect();
    let (gbeta, ggamma): (Vec<f32>, Vec<f32>) = sums.into_iter().unzip();
    let (c, hw, cnt) = (p.c as usize, p.hw as usize, p.count as f32);
    let mut gx = vec![0.0f32; x.len()];
    gx.par_chunks_mut(hw).enumerate().for_each(|(plane, gxp)| {
        let ch = plane % c;
        let (m, r) = (mean[ch], rstd(var[ch], p.eps));
        let (k, gb, gg) = (gamma[ch] * r / cnt, gbeta[ch], ggamma[ch]);
        let base = plane * hw;
        for (i, g) in gxp.iter_mut().enumerate() {
            let xhat = (x[base + i] - m) * r;
            *g = k * (cnt * gy[base + i] - gb - xhat * gg);
        }
    });
    (gx, ggamma, gbeta)
}

/// CPU reference of the running update (see `update_running`), in place.
pub fn update_running_cpu(
    running_mean: &mut [f32],
    running_var: &mut [f32],
    mean: &[f32],
    var: &[f32],
    count: usize,
    momentum: f32,
) {
    let unbias = count as f32 / (count - 1) as f32;
    for ch in 0..running_mean.len() {
        running_mean[ch] = (1.0 - momentum) * running_mean[ch] + momentum * mean[ch];
        running_var[ch] = (1.0 - momentum) * running_var[ch] + momentum * (var[ch] * unbias);
    }
}

/// Checks that each of `tensors` (named) is (C) and on x's device.
fn check_channels(x: &Tensor, c: u32, tensors: &[(&str, &Tensor)]) -> Result<()> {
    for (what, t) in tensors {
        t.expect_shape("batchnorm2d", what, &[c as usize])?;
    }
    let mut devices = vec![x.device()];
    devices.extend(tensors.iter().map(|(_, t)| t.device()));
    common_device("batchnorm2d", &devices)?;
    Ok(())
}

/// The host data of a per-channel tensor that `common_device` found on the CPU with x.
fn host(t: &Tensor) -> &[f32] {
    t.cpu().unwrap_or_default()
}

fn cuda_buf(t: &Tensor) -> Result<&crate::device::DeviceBuf<f32>> {
    t.cuda().map(|(_, b)| b).ok_or_else(|| Error::Internal("batchnorm2d: a host tensor among device ones".into()))
}

/// The batch's (mean, biased variance), each (C).
pub fn batchnorm2d_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let p = Batchnorm2dParams::new(x.shape())?;
    let c = p.c as usize;
    let (m, v) = match x.storage() {
        Storage::Cpu(xv) => {
            let (m, v) = batchnorm2d_stats_cpu(xv, &p);
            (Storage::Cpu(m), Storage::Cpu(v))
        }
        Storage::Cuda { gpu, buf } => {
            let (mut m, mut v) = (gpu.uninit::<f32>(c)?, gpu.uninit::<f32>(c)?);
            crate::launch!(
                gpu,
                Module::Batchnorm2d,
                "batchnorm2d_stats_f32",
                p.reduce_launch(),
                buf,
                &mut m,
                &mut v,
                &p
            )?;
            (Storage::Cuda { gpu: gpu.clone(), buf: m }, Storage::Cuda { gpu: gpu.clone(), buf: v })
        }
    };
    Ok((Tensor::from_storage(vec![c], m), Tensor::from_storage(vec![c], v)))
}

/// y = gamma * (x - mean) / sqrt(var + eps) + beta with the given per-channel statistics.
pub fn batchnorm2d_apply(x: &Tensor, mean: &Tensor, var: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Tensor> {
    let p = Batchnorm2dParams::new(x.shape())?;
    check_channels(x, p.c, &[("mean", mean), ("var", var), ("gamma", gamma), ("beta", beta)])?;
    let storage = match x.storage() {
        Storage::Cpu(xv) => Storage::Cpu(batchnorm2d_apply_cpu(xv, host(mean), host(var), host(gamma), host(beta), &p)),
        Storage::Cuda { gpu, buf } => {
            let mut y = gpu.uninit::<f32>(x.len())?;
            let (m, v, g, b) = (cuda_buf(mean)?, cuda_buf(var)?, cuda_buf(gamma)?, cuda_buf(beta)?);
            crate::launch!(
                gpu,
                Module::Batchnorm2d,
                "batchnorm2d_apply_f32",
                p.planes_launch(),
                buf,
                m,
                v,
                g,
                b,
                &mut y,
                &p
            )?;
            Storage::Cuda { gpu: gpu.clone(), buf: y }
        }
    };
    Ok(Tensor::from_storage(x.shape().to_vec(), storage))
}

/// The backward of training mode: (gx, ggamma, gbeta).
pub fn batchnorm2d_bwd(
    x: &Tensor,
    gy: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    gamma: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let p = Batchnorm2dParams::new(x.shape())?;
    gy.expect_shape("batchnorm2d_bwd", "gy", x.shape())?;
    check_channels(x, p.c, &[("mean", mean), ("var", var), ("gamma", gamma)])?;
    common_device("batchnorm2d_bwd", &[x.device(), gy.device()])?;
    let c = p.c as usize;
    let (gx, gg, gb) = match (x.storage(), gy.storage()) {
        (Storage::Cpu(xv), Storage::Cpu(g)) => {
            let (gx, gg, gb) = batchnorm2d_bwd_cpu(xv, g, host(mean), host(var), host(gamma), &p);
            (Storage::Cpu(gx), Storage::Cpu(gg), Storage::Cpu(gb))
        }
        (Storage::Cuda { gpu, buf: xb }, Storage::Cuda { buf: g, .. }) => {
            let (m, v, ga) = (cuda_buf(mean)?, cuda_buf(var)?, cuda_buf(gamma)?);
            let (mut gb, mut gg) = (gpu.uninit::<f32>(c)?, gpu.uninit::<f32>(c)?);
            let cfg = p.reduce_launch();
            crate::launch!(
                gpu,
                Module::Batchnorm2d,
                "batchnorm2d_bwd_reduce_f32",
                cfg,
                xb,
                g,
                m,
                v,
                &mut gb,
                &mut gg,
                &p
            )?;
            let mut gx = gpu.uninit::<f32>(x.len())?;
            let cfg = p.planes_launch();
            crate::launch!(
                gpu,
                Module::Batchnorm2d,
                "batchnorm2d_bwd_x_f32",
                cfg,
                xb,
                g,
                m,
                v,
                ga,
                &gb,
                &gg,
                &mut gx,
                &p
            )?;
            let wrap = |b| Storage::Cuda { gpu: gpu.clone(), buf: b };
            (wrap(gx), wrap(gg), wrap(gb))
        }
        _ => unreachable!("checked by common_device"),
    };
    Ok((
        Tensor::from_storage(x.shape().to_vec(), gx),
        Tensor::from_storage(vec![c], gg),
        Tensor::from_storage(vec![c], gb),
    ))
}

/// Recorded batch norm. x: (N, C, H, W); gamma, beta, running_mean, running_var: (C).
///
/// A training tape normalises with the batch's statistics and returns them (for
/// `update_running`); a batch of one value per channel is refused, as PyTorch does (its
/// unbiased variance is undefined). An eval tape normalises with the running statistics, returns
/// None and records nothing. The tape keeps x and the batch's statistics, not the running ones,
/// so that they can be updated in place while it lives.
pub fn batchnorm2d(
    tape: &mut Tape,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
) -> Result<(Tensor, Option<BatchStats>)> {
    let p = Batchnorm2dParams::new(x.shape())?;
    check_channels(
        x,
        p.c,
        &[("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)],
    )?;
    if !tape.is_training() {
        return Ok((batchnorm2d_apply(x, running_mean, running_var, gamma, beta)?, None));
    }
    if p.count < 2 {
        return Err(Error::shape(
            "batchnorm2d",
            "more than 1 value per channel when training (N * H * W > 1)",
            format!("shape {:?}", x.shape()),
        ));
    }
    let (mean, var) = batchnorm2d_stats(x)?;
    let y = batchnorm2d_apply(x, &mean, &var, gamma, beta)?;
    let (gx_needed, gg_needed, gb_needed) =
        (tape.requires_grad(x), tape.requires_grad(gamma), tape.requires_grad(beta));
    let (x_saved, gamma_saved, mean_saved, var_saved) = (x.clone(), gamma.clone(), mean.clone(), var.clone());
    let beta_id = beta.id();
    tape.record(&y, &[x, gamma, beta], move |gy, grads| {
        let (gx, gg, gb) = batchnorm2d_bwd(&x_saved, gy, &mean_saved, &var_saved, &gamma_saved)?;
        if gx_needed {
            grads.accumulate(x_saved.id(), gx)?;
        }
        if gg_needed {
            grads.accumulate(gamma_saved.id(), gg)?;
        }
        if gb_needed {
            grads.accumulate(beta_id, gb)?;
        }
        Ok(())
    });
    Ok((y, Some(BatchStats { mean, var, count: p.count as usize })))
}

/// PyTorch's running update, in place: running_mean = (1 - m) * running_mean + m * mean and
/// running_var = (1 - m) * running_var + m * var * count / (count - 1) (the unbiased variance),
/// m = `momentum`.
pub fn update_running(
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    stats: &BatchStats,
    momentum: f32,
) -> Result<()> {
    let c = stats.mean.len();
    for (what, t) in [("running_mean", &*running_mean), ("running_var", &*running_var), ("var", &stats.var)] {
        t.expect_shape("batchnorm2d running update", what, &[c])?;
    }
    if stats.count < 2 {
        return Err(Error::Invalid(format!(
            "batchnorm2d running update: expected statistics of more than 1 value per channel, found {}",
            stats.count
        )));
    }
    common_device(
        "batchnorm2d running update",
        &[running_mean.device(), running_var.device(), stats.mean.device(), stats.var.device()],
    )?;
    let (rm, rv) = (running_mean.storage_mut()?, running_var.storage_mut()?);
    match (rm, rv, stats.mean.storage(), stats.var.storage()) {
        (Storage::Cpu(rm), Storage::Cpu(rv), Storage::Cpu(m), Storage::Cpu(v)) => {
            update_running_cpu(rm, rv, m, v, stats.count, momentum)
        }
        (
            Storage::Cuda { gpu, buf: rm },
            Storage::Cuda { buf: rv, .. },
            Storage::Cuda { buf: m, .. },
            Storage::Cuda { buf: v, .. },
        ) => {
            let gpu: &Gpu = gpu;
            // The kernel reads c, count and momentum; count < 2^31 (it came from `new`).
            let (c32, count) = (c as u32, stats.count as u32);
            let p = Batchnorm2dParams { n: 0, c: c32, hw: 1, count, eps: BN_EPS, momentum, hw_div: FastDiv::new(1) };
            crate::launch!(gpu, Module::Batchnorm2d, "batchnorm2d_running_f32", grid_1d(c, 256), rm, rv, m, v, &p)?;
        }
        _ => unreachable!("checked by common_device"),
    }
    Ok(())
}
