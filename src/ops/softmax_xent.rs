//! Softmax cross-entropy over the rows of (N, C) logits with u32 class labels (N):
//! loss = mean_r -log `softmax(x_r)[label_r]`, computed by log-sum-exp (see kernels/softmax_xent.cu).
//! Also the training statistics (summed loss, correct predictions), kept on the device so that
//! training does not copy to the host every step, and the CPU's row argmax (evaluation's classes).

use cudarc::driver::LaunchConfig;

use crate::device::{grid_1d, DeviceBuf, Gpu};
use crate::error::{Error, Result};
use crate::ptx::Module;
use crate::tape::Tape;
use crate::tensor::{common_device, Storage, Tensor};

/// The block size of the single-block reductions (`SXE_BLOCK` in the kernel file).
const REDUCE_BLOCK: u32 = 256;

fn single_block() -> LaunchConfig {
    LaunchConfig { grid_dim: (1, 1, 1), block_dim: (REDUCE_BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One warp (32 threads) per row, 8 rows per 256-thread block.
fn warp_per_row(n: usize) -> LaunchConfig {
    grid_1d(n * 32, 256)
}

/// (N, C) after checking logits (N, C) with N, C >= 1 and labels (N) on the same device.
fn check(op: &'static str, logits: &Tensor, labels: &Tensor<u32>) -> Result<(usize, usize)> {
    let [n, c] = logits.dims2(op)?;
    if n == 0 || c == 0 || u32::try_from(n * c).is_err() {
        return Err(Error::shape(op, "logits (N, C) with N, C >= 1 and N * C < 2^32", format!("{:?}", logits.shape())));
    }
    labels.expect_shape(op, "labels", &[n])?;
    common_device(op, &[logits.device(), labels.device()])?;
    Ok((n, c))
}

fn check_labels(op: &str, labels: &[u32], c: usize) -> Result<()> {
    match labels.iter().enumerate().find(|(_, &l)| l as usize >= c) {
        Some((r, &l)) => Err(Error::Invalid(format!("{op}: row {r} has label {l}, but there are only {c} classes"))),
        None => Ok(()),
    }
}

/// CPU reference, one row: (loss, probabilities). Computed in f64 (the oracle is more accurate
/// than the kernel), rounded to f32 at the end.
fn row_cpu(x: &[f32], label: usize) -> (f32, impl Iterator<Item = f32> + '_) {
    let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
    let loss = s.ln() - (x[label] as f64 - m);
    (loss as f32, x.iter().map(move |&v| ((v as f64 - m).exp() / s) as f32))
}

/// CPU reference, forward: (per-row losses, probabilities), logits (N, C) row-major. Errors on a
/// label >= C, naming the row.
pub fn softmax_xent_fwd_cpu(logits: &[f32], labels: &[u32], c: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    check_labels("softmax_xent", labels, c)?;
    let mut probs = Vec::with_capacity(logits.len());
    let losses = logits
        .chunks_exact(c)
        .zip(labels)
        .map(|(x, &l)| {
            let (loss, p) = row_cpu(x, l as usize);
            probs.extend(p);
            loss
        })
        .collect();
    Ok((losses, probs))
}

/// CPU reference, backward: (probs - onehot(label)) * (gloss / N), as the kernel rounds it.
pub fn softmax_xent_bwd_cpu(probs: &[f32], labels: &[u32], c: usize, gloss: f32) -> Result<Vec<f32>> {
    check_labels("softmax_xent_bwd", labels, c)?;
    let g = gloss / labels.len() as f32;
    Ok(probs
        .chunks_exact(c)
        .zip(labels)
        .flat_map(|(p, &l)| p.iter().enumerate().map(move |(j, &v)| (v - if j == l as usize { 1.0 } else { 0.0 }) * g))
        .collect())
}

/// CPU reference: index of the largest value per row; the first wins a tie, NaN counts as largest
/// (as torch.argmax).
pub fn argmax_rows_cpu(x: &[f32], c: usize) -> Vec<u32> {
    x.chunks_exact(c)
        .map(|row| {
            let mut best = 0;
            for (j, &v) in row.iter().enumerate().skip(1) {
                let b = row[best];
                if !b.is_nan() && (v.is_nan() || v > b) {
                    best = j;
                }
            }
            best as u32
        })
        .collect()
}

/// (loss `[1]`, probs (N, C)): the batch mean of -log `softmax(logits)[label]`.
pub fn softmax_xent_fwd(logits: &Tensor, labels: &Tensor<u32>) -> Result<(Tensor, Tensor)> {
    let (n, c) = check("softmax_xent", logits, labels)?;
    let (loss, probs) = match (logits.storage(), labels.storage()) {
        (Storage::Cpu(x), Storage::Cpu(l)) => {
            let (losses, probs) = softmax_xent_fwd_cpu(x, l, c)?;
            let mean = (losses.iter().map(|&v| v as f64).sum::<f64>() / n as f64) as f32;
            (Storage::Cpu(vec![mean]), Storage::Cpu(probs))
        }
        (Storage::Cuda { gpu, buf: x }, Storage::Cuda { buf: l, .. }) => {
            let (n32, c32) = (n as u32, c as u32);
            let mut probs = gpu.uninit::<f32>(n * c)?;
            let mut row_loss = gpu.uninit::<f32>(n)?;
            let mut loss = gpu.uninit::<f32>(1)?;
            let m = Module::SoftmaxXent;
            crate::launch!(
                gpu,
                m,
                "softmax_xent_fwd_f32",
                warp_per_row(n),
                x,
                l,
                &mut probs,
                &mut row_loss,
                &n32,
                &c32
            )?;
            crate::launch!(gpu, m, "softmax_xent_mean_f32", single_block(), &row_loss, &mut loss, &n32)?;
            (Storage::Cuda { gpu: gpu.clone(), buf: loss }, Storage::Cuda { gpu: gpu.clone(), buf: probs })
        }
        _ => unreachable!("checked by common_device"),
    };
    Ok((Tensor::from_storage(vec![1], loss), Tensor::from_storage(vec![n, c], probs)))
}

/// d loss / d logits = (probs - onehot(labels)) * gloss / N; gloss is the `[1]` gradient of the loss.
pub fn softmax_xent_bwd(probs: &Tensor, labels: &Tensor<u32>, gloss: &Tensor) -> Result<Tensor> {
    let (n, c) = check("softmax_xent_bwd", probs, labels)?;
    gloss.expect_shape("softmax_xent_bwd", "gloss", &[1])?;
    common_device("softmax_xent_bwd", &[probs.device(), gloss.device()])?;
    let storage = match (probs.storage(), labels.storage(), gloss.storage()) {
        (Storage::Cpu(p), Storage::Cpu(l), Storage::Cpu(g)) => Storage::Cpu(softmax_xent_bwd_cpu(p, l, c, g[0])?),
        (Storage::Cuda { gpu, buf: p }, Storage::Cuda { buf: l, .. }, Storage::Cuda { buf: g, .. }) => {
            let (n32, c32) = (n as u32, c as u32);
            let mut gx = gpu.uninit::<f32>(n * c)?;
            let cfg = grid_1d(n * c, 256);
            crate::launch!(gpu, Module::SoftmaxXent, "softmax_xent_bwd_f32", cfg, p, l, g, &mut gx, &n32, &c32)?;
            Storage::Cuda { gpu: gpu.clone(), buf: gx }
        }
        _ => unreachable!("checked by common_device"),
    };
    Ok(Tensor::from_storage(vec![n, c], storage))
}

/// Recorded softmax cross-entropy: the scalar (shape `[1]`) mean loss. The tape keeps probs.
pub fn softmax_xent(tape: &mut Tape, logits: &Tensor, labels: &Tensor<u32>) -> Result<Tensor> {
    let (loss, probs) = softmax_xent_fwd(logits, labels)?;
    let (x_id, labels) = (logits.id(), labels.clone());
    tape.record(&loss, &[logits], move |gloss, grads| {
        grads.accumulate(x_id, softmax_xent_bwd(&probs, &labels, gloss)?)
    });
    Ok(loss)
}

/// Adds this batch's [sum of per-example losses, number of correct argmax predictions] into stats
/// (a 2-element f32 tensor on the same device), on the device: training statistics accumulate
/// without copying to the host each step. (Counts are exact in f32 up to 2^24 examples.)
pub fn accumulate_stats(logits: &Tensor, labels: &Tensor<u32>, stats: &mut Tensor) -> Result<()> {
    let (n, c) = check("accumulate_stats", logits, labels)?;
    stats.expect_shape("accumulate_stats", "stats", &[2])?;
    common_device("accumulate_stats", &[logits.device(), stats.device()])?;
    match (logits.storage(), labels.storage(), stats.storage_mut()?) {
        (Storage::Cpu(x), Storage::Cpu(l), Storage::Cpu(st)) => {
            let (losses, _) = softmax_xent_fwd_cpu(x, l, c)?;
            let correct = argmax_rows_cpu(x, c).iter().zip(l).filter(|(a, b)| a == b).count();
            st[0] += losses.iter().sum::<f32>();
            st[1] += correct as f32;
        }
        (Storage::Cuda { gpu, buf: x }, Storage::Cuda { buf: l, .. }, Storage::Cuda { buf: st, .. }) => {
            stats_cuda(&gpu.clone(), x, l, st, n, c)?;
        }
        _ => unreachable!("checked by common_device"),
    }
    Ok(())
}

fn stats_cuda(
    gpu: &Gpu,
    x: &DeviceBuf<f32>,
    l: &DeviceBuf<u32>,
    st: &mut DeviceBuf<f32>,
    n: usize,
    c: usize,
) -> Result<()> {
    let (n32, c32) = (n as u32, c as u32);
    let mut row_loss = gpu.uninit::<f32>(n)?;
    let mut row_correct = gpu.uninit::<f32>(n)?;
    let m = Module::SoftmaxXent;
    crate::launch!(
        gpu,
        m,
        "softmax_xent_stats_rows_f32",
        warp_per_row(n),
        x,
        l,
        &mut row_loss,
        &mut row_correct,
        &n32,
        &c32
    )?;
    crate::launch!(gpu, m, "softmax_xent_stats_add_f32", single_block(), &row_loss, &row_correct, st, &n32)
}
