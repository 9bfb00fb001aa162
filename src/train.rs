//! The training loop of the d2l book's `train_ch6`: minibatch SGD on Fashion-MNIST, test
//! accuracy after every epoch, and the same final figures the book prints.
//!
//! Per step, the only host->device traffic is the batch itself as uint8 28x28 images and u32
//! labels; resizing to the network's resolution happens on the device. Loss and accuracy are
//! accumulated on the device and read back every `PROGRESS_EVERY` steps (for the caller's
//! [`Progress`] and the non-finite check) and at the end of the epoch.
//!
//! The loop prints nothing: what it has to tell goes to the [`Progress`] the caller passes (the
//! `ptxgrad` command draws a progress bar and prints a line per epoch; tests pass
//! [`NoProgress`]), and what went wrong comes back as the error.
//!
//! Nothing is lost and nothing silently wrong: a non-finite loss stops the run at the progress
//! read that sees it, the parameters are checked on the device before every checkpoint is
//! written (a diverged model is never saved), and a stop request ([`Stop`]: Ctrl-C or SIGTERM in
//! the `ptxgrad` command) ends the run at the next step, after the save in flight has finished.
//! Each of these errors says what the checkpoint on disk holds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::checkpoint;
use crate::data::fashion_mnist::{epoch_batches, sequential_batches, Split};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::model::Model;
use crate::nn::saved;
use crate::nn::sgd_step;
use crate::ops::nonfinite::nonfinite_counts;
use crate::ops::resize::resize_bilinear;
use crate::ops::softmax_xent::{accumulate_stats, argmax_rows_cpu, softmax_xent};
use crate::tape::Tape;
use crate::tensor::{Images, Labels, Tensor};

/// Steps between reads of the device-side statistics.
const PROGRESS_EVERY: usize = 20;
/// Batch size for evaluation (no activations are kept, so larger than training's).
pub const EVAL_BATCH: usize = 500;

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub resolution: usize,
    pub seed: u64,
    /// Where the checkpoint is written after every epoch (None: not written), claimed for this
    /// run so that no other writes it meanwhile.
    pub checkpoint: Option<checkpoint::Claim>,
    /// Asks the run to stop at its next step (see [`Stop`]).
    pub stop: Stop,
}

/// A request to stop a run, made from outside it: a signal handler, another thread or a test.
/// Training reads it before every step (one atomic load) and during evaluation; once set, the
/// run waits for the checkpoint save in flight, if any, and fails with `Error::Interrupted`.
/// Clones share one request.
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<AtomicUsize>);

impl Stop {
    /// The shared cell, for `signal_hook::flag::register_usize`: it holds the signal number
    /// (nonzero) once a stop is requested.
    pub fn cell(&self) -> Arc<AtomicUsize> {
        self.0.clone()
    }

    /// Requests a stop on behalf of `signal` (its number, e.g. 2 for SIGINT).
    pub fn request(&self, signal: usize) {
        self.0.store(signal.max(1), Ordering::Relaxed);
    }

    /// The signal that requested a stop, if one did.
    pub fn requested(&self) -> Option<usize> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&s| s != 0)
    }
}

/// A signal's name for messages (the common ones; others by number).
pub fn signal_name(signal: usize) -> String {
    match signal {
        1 => "SIGHUP".into(),
        2 => "SIGINT (Ctrl-C)".into(),
        15 => "SIGTERM".into(),
        s => format!("signal {s}"),
    }
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

/// What a run tells while it trains, in this order for each epoch: `epoch_start`; `steps` every
/// 20 steps (each call is a read back from the device) and after the last; `steps_end`; then,
/// once the epoch is evaluated and its checkpoint started, `epoch_end`. A run that fails makes
/// no further calls. Each method does nothing unless implemented.
pub trait Progress {
    /// Epoch `epoch` of `epochs` begins; `steps` SGD steps follow.
    fn epoch_start(&mut self, epoch: usize, epochs: usize, steps: usize) {
        let _ = (epoch, epochs, steps);
    }

    /// The first `done` steps of the epoch have run; `loss` and `train_acc` are their means over
    /// the examples seen so far.
    fn steps(&mut self, done: usize, loss: f64, train_acc: f64) {
        let _ = (done, loss, train_acc);
    }

    /// The epoch's steps are over: all of them (`completed`), or the run stops inside them (a
    /// stop request or a non-finite loss; its error follows).
    fn steps_end(&mut self, completed: bool) {
        let _ = completed;
    }

    /// The epoch's figures, once it is evaluated and its checkpoint is being written. An error
    /// stops the run with it.
    fn epoch_end(&mut self, report: &EpochReport) -> Result<()> {
        let _ = report;
        Ok(())
    }
}

/// A [`Progress`] that ignores everything: for runs nobody watches (tests, scripts).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

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
    model: &mut Model,
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

/// What the run's checkpoint holds now that training stops, for its error message: waits for
/// the save in flight (so that the answer is true), whose failure it reports too. `done`: the
/// last epoch whose save was started.
fn on_disk(cfg: &TrainConfig, writer: &mut checkpoint::Writer, done: usize, start_epoch: usize) -> String {
    let Some(claim) = &cfg.checkpoint else { return "no checkpoint was being written".to_string() };
    let p = claim.path().display();
    match writer.finish() {
        Err(e) => format!("the save of epoch {done}'s checkpoint to {p} failed too: {e}"),
        Ok(()) if done == start_epoch && claim.path().exists() => {
            format!("{p} is as it was before this run (it saved nothing)")
        }
        Ok(()) if done == start_epoch => format!("nothing was written to {p}"),
        Ok(()) => format!("{p} holds epoch {done}"),
    }
}

/// Trains `model` for the epochs `start_epoch+1 ..= cfg.epochs`, telling `progress` how it goes.
pub fn train(
    model: &mut Model,
    train: &Split,
    test: &Split,
    cfg: &TrainConfig,
    start_epoch: usize,
    progress: &mut dyn Progress,
) -> Result<Vec<EpochReport>> {
    let device = model.device();
    let hw = (train.images.h, train.images.w);
    let mut reports = Vec::new();
    // Each epoch's checkpoint is written while the next one trains (the last one is waited for).
    let mut writer = checkpoint::Writer::default();
    // The last epoch whose checkpoint save was started.
    let mut saved = start_epoch;
    let interrupted = |writer: &mut checkpoint::Writer, saved: usize, signal: usize, when: String| {
        let kept = on_disk(cfg, writer, saved, start_epoch);
        Error::Interrupted { signal, message: format!("stopped by {} {when}; {kept}", signal_name(signal)) }
    };
    for epoch in start_epoch + 1..=cfg.epochs {
        let epoch_start = Instant::now();
        let batches = epoch_batches(train.len(), cfg.batch_size, cfg.seed, epoch);
        progress.epoch_start(epoch, cfg.epochs, batches.len());
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
            if let Some(signal) = cfg.stop.requested() {
                progress.steps_end(false);
                let when = format!("in epoch {epoch} before step {} of {}", step + 1, batches.len());
                return Err(interrupted(&mut writer, saved, signal, when));
            }
            let (pixels, labels) = train.gather(idx);
            let (x, y) = prepare_batch(pixels, labels, hw, cfg.resolution, &device)?;
            let loss = train_step(model, &x, &y, step_seed(cfg.seed, epoch, step), cfg.lr, Some(&mut stats))?;
            losses.write_at(step, &loss)?;
            seen += idx.len();
            if (step + 1) % PROGRESS_EVERY == 0 || step + 1 == batches.len() {
                let s = stats.to_vec()?; // waits for the queued steps
                let recent = &losses.to_vec()?[checked..=step];
                if let Some(bad) = recent.iter().position(|l| !l.is_finite()) {
                    progress.steps_end(false);
                    // The previous epoch's save may still be running: what is on disk is only
                    // known once it has ended.
                    let kept = on_disk(cfg, &mut writer, saved, start_epoch);
                    return Err(Error::Diverged(format!(
                        "training diverged: non-finite loss ({}) in epoch {epoch} at step {} of {} (lr {}); {kept}",
                        recent[bad],
                        checked + bad + 1,
                        batches.len(),
                        cfg.lr,
                    )));
                }
                writer.poll()?; // a failed save stops training now, not an epoch later
                checked = step + 1;
                progress.steps(step + 1, s[0] as f64 / seen as f64, s[1] as f64 / seen as f64);
            }
        }
        // The last step read the statistics back, so all its work has finished.
        let train_time = loop_start.elapsed();
        progress.steps_end(true);
        let s = stats.to_vec()?;
        // A loss can stay finite while a parameter is not (a NaN gradient that no later step
        // reads): checked on the device, one read back for all of them.
        let bad = nonfinite_params(model)?;
        if !bad.is_empty() {
            let kept = on_disk(cfg, &mut writer, saved, start_epoch);
            return Err(Error::Diverged(format!(
                "training diverged: after epoch {epoch} (lr {}) the parameters hold non-finite values ({}); \
                 the model was not saved; {kept}",
                cfg.lr,
                bad.join(", ")
            )));
        }
        let Some(test_acc) = evaluate_until(model, test, cfg.resolution, Some(&cfg.stop))? else {
            let signal = cfg.stop.requested().unwrap_or(0);
            let when = format!("while evaluating epoch {epoch} (its steps were done, but it was not saved)");
            return Err(interrupted(&mut writer, saved, signal, when));
        };
        if let Some(claim) = &cfg.checkpoint {
            let (tensors, metadata) = saved::contents(model, epoch, cfg.seed, cfg.lr, cfg.batch_size)?;
            writer.start(claim.path(), tensors, metadata)?;
            saved = epoch;
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
        progress.epoch_end(&report)?;
        reports.push(report);
    }
    Ok(reports)
}

/// "`name`: k of n values" for every parameter holding NaN or Inf (empty when all are finite).
pub fn nonfinite_params(model: &Model) -> Result<Vec<String>> {
    let tensors: Vec<&Tensor> = model.params.iter().map(|p| &p.value).collect();
    let counts = nonfinite_counts(&tensors)?;
    Ok(model
        .params
        .iter()
        .zip(counts)
        .filter(|(_, k)| *k > 0)
        .map(|(p, k)| format!("`{}`: {k} of {} values", p.name, p.value.len()))
        .collect())
}

/// Predicted class (torch.argmax of the logits) of the first `limit` examples of `split` (eval
/// mode), in order.
pub fn predict(model: &Model, split: &Split, limit: usize) -> Result<Vec<u32>> {
    Ok(argmax_rows_cpu(&logits(model, split, limit)?, model.net.classes))
}

/// Accuracy on `split` in eval mode (dropout off, nothing recorded). An empty split has no
/// accuracy: NaN (the caller says so).
pub fn evaluate(model: &Model, split: &Split, resolution: usize) -> Result<f64> {
    Ok(evaluate_until(model, split, resolution, None)?.unwrap_or(f64::NAN))
}

/// `evaluate`, given up (None) as soon as `stop` is requested.
fn evaluate_until(model: &Model, split: &Split, resolution: usize, stop: Option<&Stop>) -> Result<Option<f64>> {
    let device = model.device();
    let hw = (split.images.h, split.images.w);
    let mut stats = Tensor::zeros(&[2], &device)?;
    for idx in sequential_batches(split.len(), EVAL_BATCH) {
        if stop.is_some_and(|s| s.requested().is_some()) {
            return Ok(None);
        }
        let (pixels, labels) = split.gather(&idx);
        let (x, y) = prepare_batch(pixels, labels, hw, resolution, &device)?;
        let logits = model.infer(&x)?;
        accumulate_stats(&logits, &y, &mut stats)?;
    }
    let s = stats.to_vec()?;
    Ok(Some(if split.is_empty() { f64::NAN } else { s[1] as f64 / split.len() as f64 }))
}

/// The logits (eval mode) of the first `limit` examples of `split`, in order: (n, classes)
/// row-major, n = min(limit, split.len()).
pub fn logits(model: &Model, split: &Split, limit: usize) -> Result<Vec<f32>> {
    let device = model.device();
    let hw = (split.images.h, split.images.w);
    let mut out = Vec::new();
    for idx in sequential_batches(split.len().min(limit), EVAL_BATCH) {
        let (pixels, labels) = split.gather(&idx);
        let (x, _) = prepare_batch(pixels, labels, hw, model.resolution, &device)?;
        out.extend(model.infer(&x)?.to_vec()?);
    }
    Ok(out)
}
