//! The training loop of the d2l book's `train_ch6`: minibatch SGD on Fashion-MNIST, test
//! accuracy after every epoch, and the same final figures the book prints.
//!
//! Per step, the only host->device traffic is the batch itself as uint8 28x28 images and u32
//! labels; resizing to the network's resolution happens on the device. Loss and accuracy are
//! accumulated on the device and read back every `PROGRESS_EVERY` steps (for the progress bar
//! and the non-finite check) and at the end of the epoch.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint;
use crate::data::fashion_mnist::{epoch_batches, sequential_batches, Split};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::alexnet::AlexNet;
use crate::nn::sgd_step;
use crate::ops::resize::resize_bilinear;
use crate::ops::softmax_xent::{accumulate_stats, argmax_rows, softmax_xent};
use crate::tape::Tape;
use crate::tensor::{Images, Labels, Tensor};

/// Steps between reads of the device-side statistics.
const PROGRESS_EVERY: usize = 20;
/// Batch size for evaluation (no activations are kept, so larger than training's).
const EVAL_BATCH: usize = 500;

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub resolution: usize,
    pub seed: u64,
    /// Where the checkpoint is written after every epoch (None: not written).
    pub checkpoint: Option<PathBuf>,
    pub progress: bool,
}

/// The figures of one epoch.
#[derive(Debug, Clone, Copy)]
pub struct EpochReport {
    pub epoch: usize,
    pub loss: f64,
    pub train_acc: f64,
    pub test_acc: f64,
    /// Training steps only (the book's timer).
    pub train_seconds: f64,
    pub examples: usize,
    /// The whole epoch: batching, copies, training steps, evaluation and checkpoint. A checkpoint
    /// is written while the next epoch trains, so an epoch counts the copy of its parameters to
    /// the host and any wait for the previous epoch's save; the last epoch waits for its own. The
    /// epochs' sum is the run's wall time either way.
    pub epoch_seconds: f64,
}

impl EpochReport {
    pub fn examples_per_sec(&self) -> f64 {
        self.examples as f64 / self.train_seconds
    }

    pub fn end_to_end_examples_per_sec(&self) -> f64 {
        self.examples as f64 / self.epoch_seconds
    }
}

/// Uploads a batch of host images (B*H*W bytes) and labels and resizes on the device.
pub fn prepare_batch(
    pixels: Vec<u8>,
    labels: Vec<u32>,
    hw: (usize, usize),
    resolution: usize,
    device: &Device,
) -> Result<(Tensor, Labels)> {
    let b = labels.len();
    let images = Images::from_vec(&[b, 1, hw.0, hw.1], pixels, device)?;
    let labels = Labels::from_vec(&[b], labels, device)?;
    Ok((resize_bilinear(&images, resolution, resolution)?, labels))
}

/// Seed of the dropout masks of one step: distinct for every (run seed, epoch, step).
fn step_seed(seed: u64, epoch: usize, step: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((epoch as u64) << 40) ^ ((step as u64) << 8)
}

/// One SGD step on the batch (x, y): forward (recorded), loss, backward, update. Adds the
/// batch's [loss sum, correct] into `stats` when given. Returns the loss (on the device).
pub fn train_step(
    model: &mut AlexNet,
    x: &Tensor,
    y: &Labels,
    dropout_seed: u64,
    lr: f32,
    stats: Option<&mut Tensor>,
) -> Result<Tensor> {
    let mut tape = Tape::train();
    let logits = model.forward(&mut tape, x, dropout_seed)?;
    let loss = softmax_xent(&mut tape, &logits, y)?;
    if let Some(stats) = stats {
        accumulate_stats(&logits, y, stats)?;
    }
    let grads = tape.backward(&loss)?;
    sgd_step(&mut model.params, &grads, lr)?;
    Ok(loss)
}

/// Trains `model` for the epochs `start_epoch+1 ..= cfg.epochs`, calling `on_epoch` after each.
pub fn train(
    model: &mut AlexNet,
    train: &Split,
    test: &Split,
    cfg: &TrainConfig,
    start_epoch: usize,
    mut on_epoch: impl FnMut(&EpochReport) -> Result<()>,
) -> Result<Vec<EpochReport>> {
    let device = model.device();
    let hw = (train.images.h, train.images.w);
    let mut reports = Vec::new();
    if let Some(path) = &cfg.checkpoint {
        checkpoint::probe_writable(path).map_err(|e| Error::Data(format!("the checkpoint cannot be written: {e}")))?;
    }
    // Each epoch's checkpoint is written while the next one trains (the last one is waited for).
    let mut writer = checkpoint::Writer::default();
    for epoch in start_epoch + 1..=cfg.epochs {
        let epoch_start = Instant::now();
        let batches = epoch_batches(train.len(), cfg.batch_size, cfg.seed, epoch);
        let bar = progress_bar(cfg.progress, batches.len(), epoch, cfg.epochs);
        // [sum of per-example losses, correct predictions], kept on the device.
        let mut stats = Tensor::zeros(&[2], &device)?;
        // Every step's loss, copied on the device, so that a divergence is pinned to its step.
        let mut losses = Tensor::zeros(&[batches.len()], &device)?;
        let mut checked = 0;
        let mut seen = 0;
        // Timed as the book times it: the training steps (the batch gather on the host is a
        // few microseconds and is included), not evaluation or checkpointing.
        let loop_start = Instant::now();
        for (step, idx) in batches.iter().enumerate() {
            let (pixels, labels) = train.gather(idx);
            let (x, y) = prepare_batch(pixels, labels, hw, cfg.resolution, &device)?;
            let loss = train_step(model, &x, &y, step_seed(cfg.seed, epoch, step), cfg.lr, Some(&mut stats))?;
            losses.write_at(step, &loss)?;
            seen += idx.len();
            if (step + 1) % PROGRESS_EVERY == 0 || step + 1 == batches.len() {
                let s = stats.to_vec()?; // waits for the queued steps
                let recent = &losses.to_vec()?[checked..=step];
                if let Some(bad) = recent.iter().position(|l| !l.is_finite()) {
                    bar.abandon();
                    // The previous epoch's save may still be running: what is on disk is only
                    // known once it has ended.
                    let kept = match (&cfg.checkpoint, epoch - 1, writer.finish()) {
                        (Some(p), _, Err(e)) => {
                            format!("the save of the previous epoch's checkpoint to {} failed too: {e}", p.display())
                        }
                        (Some(p), 0, Ok(())) => format!("nothing was written to {}", p.display()),
                        (Some(p), done, Ok(())) => format!("{} (after epoch {done}) is intact", p.display()),
                        (None, _, _) => "no checkpoint was being written".to_string(),
                    };
                    return Err(Error::Data(format!(
                        "training diverged: non-finite loss ({}) in epoch {epoch} at step {} of {} (lr {}); {kept}",
                        recent[bad],
                        checked + bad + 1,
                        batches.len(),
                        cfg.lr,
                    )));
                }
                writer.poll()?; // a failed save stops training now, not an epoch later
                checked = step + 1;
                bar.set_position(step as u64 + 1);
                bar.set_message(format!("loss {:.3}, train acc {:.3}", s[0] / seen as f32, s[1] / seen as f32));
            }
        }
        // The last step read the statistics back, so all its work has finished.
        let train_time = loop_start.elapsed();
        bar.finish_and_clear();
        let s = stats.to_vec()?;
        let test_acc = evaluate(model, test, cfg.resolution)?;
        if let Some(path) = &cfg.checkpoint {
            let (tensors, metadata) = checkpoint_contents(model, epoch, cfg)?;
            writer.start(path, tensors, metadata)?;
            if epoch == cfg.epochs {
                writer.finish()?; // on disk before training returns, and inside this epoch's time
            }
        }
        let report = EpochReport {
            epoch,
            loss: s[0] as f64 / seen as f64,
            train_acc: s[1] as f64 / seen as f64,
            test_acc,
            train_seconds: train_time.as_secs_f64(),
            examples: seen,
            epoch_seconds: epoch_start.elapsed().as_secs_f64(),
        };
        on_epoch(&report)?;
        reports.push(report);
    }
    Ok(reports)
}

fn progress_bar(enabled: bool, steps: usize, epoch: usize, epochs: usize) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    // Draws only on a terminal (indicatif hides itself when stderr is not one).
    let bar = ProgressBar::new(steps as u64);
    let style = ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta} left)")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(format!("{epoch}/{epochs}"));
    bar
}

/// Predicted class of every example of `split` (eval mode), in order.
pub fn predict(model: &AlexNet, split: &Split, resolution: usize, limit: usize) -> Result<Vec<u32>> {
    let device = model.device();
    let hw = (split.images.h, split.images.w);
    let mut out = Vec::new();
    for idx in sequential_batches(split.len().min(limit), EVAL_BATCH) {
        let (pixels, labels) = split.gather(&idx);
        let (x, _) = prepare_batch(pixels, labels, hw, resolution, &device)?;
        let logits = model.forward(&mut Tape::eval(), &x, 0)?;
        out.extend(argmax_rows(&logits)?.to_vec()?);
    }
    Ok(out)
}

/// Accuracy on `split` in eval mode (dropout off, nothing recorded).
pub fn evaluate(model: &AlexNet, split: &Split, resolution: usize) -> Result<f64> {
    let device = model.device();
    let hw = (split.images.h, split.images.w);
    let mut stats = Tensor::zeros(&[2], &device)?;
    for idx in sequential_batches(split.len(), EVAL_BATCH) {
        let (pixels, labels) = split.gather(&idx);
        let (x, y) = prepare_batch(pixels, labels, hw, resolution, &device)?;
        let logits = model.forward(&mut Tape::eval(), &x, 0)?;
        accumulate_stats(&logits, &y, &mut stats)?;
    }
    let s = stats.to_vec()?;
    Ok(s[1] as f64 / split.len().max(1) as f64)
}

/// Metadata keys stored in checkpoints.
pub const META_EPOCH: &str = "epoch";
pub const META_RESOLUTION: &str = "resolution";

/// What the checkpoint after `epoch` holds: the parameters, copied to the host (so that training
/// may go on while they are written), and the metadata `load_checkpoint` needs.
pub fn checkpoint_contents(
    model: &AlexNet,
    epoch: usize,
    cfg: &TrainConfig,
) -> Result<(Vec<checkpoint::NamedTensor>, BTreeMap<String, String>)> {
    let tensors = model.to_named()?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "ptxgrad alexnet v1 (torch nn.Sequential state_dict names)".to_string());
    meta.insert(META_EPOCH.to_string(), epoch.to_string());
    meta.insert(META_RESOLUTION.to_string(), model.resolution.to_string());
    meta.insert("seed".to_string(), cfg.seed.to_string());
    meta.insert("lr".to_string(), cfg.lr.to_string());
    meta.insert("batch_size".to_string(), cfg.batch_size.to_string());
    Ok((tensors, meta))
}

/// Loads a checkpoint: (model, epochs completed).
pub fn load_checkpoint(path: &std::path::Path, device: &Device) -> Result<(AlexNet, usize)> {
    let (tensors, meta) = checkpoint::load(path)?;
    let field = |key: &str| -> Result<usize> {
        let v = meta.get(key).ok_or_else(|| {
            Error::Data(format!("{}: not a ptxgrad checkpoint (no `{key}` in its metadata)", path.display()))
        })?;
        v.parse().map_err(|_| Error::Data(format!("{}: metadata `{key}` is `{v}`, not a number", path.display())))
    };
    let (epoch, resolution) = (field(META_EPOCH)?, field(META_RESOLUTION)?);
    Ok((AlexNet::from_named(resolution, tensors, device)?, epoch))
}
