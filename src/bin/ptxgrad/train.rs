//! `ptxgrad train`: checks the flags and the checkpoint before any work, trains (the library's
//! `train::train`, shown by [`Console`]), then prints the run's figures and some predictions.

use std::io::Write as _;

use anyhow::{bail, Context, Result};

use ptxgrad::checkpoint;
use ptxgrad::nn::conv_tune::{self, LayerTuning};
use ptxgrad::nn::model::Model;
use ptxgrad::nn::models::ALEXNET;
use ptxgrad::nn::saved::{self, Expect, Source};
use ptxgrad::train::{self, EpochReport, Stop, TrainConfig};
use ptxgrad::Device;

use crate::args::{default_checkpoint, TrainArgs};
use crate::progress::{Console, Plot};
use crate::report::{accuracy, print_predictions, tuning_json, tunings_table};
use crate::setup::{check_memory, compute_of, load_data, missing_checkpoint, pick_device};

/// One hyperparameter of a run: the flag's value if given, else the one the checkpoint recorded
/// (with --resume), else the default. A flag that differs from the recorded value is noted in
/// `changed`, for the user to see.
fn choose<T: PartialEq + std::fmt::Display + Copy>(
    flag: &str,
    given: Option<T>,
    recorded: Option<T>,
    default: T,
    changed: &mut Vec<String>,
) -> T {
    match (given, recorded) {
        (Some(g), Some(r)) if g != r => changed.push(format!("{flag} {g} (the checkpoint was trained with {r})")),
        _ => {}
    }
    given.or(recorded).unwrap_or(default)
}

/// Runs `ptxgrad train`; `stop` is set by the signal handlers (see `main`).
pub fn run(a: TrainArgs, stop: Stop) -> Result<()> {
    if a.epochs == 0 || a.batch_size == Some(0) {
        bail!("--epochs and --batch-size must be at least 1 (got {} and {})", a.epochs, a.batch_size.unwrap_or(0));
    }
    if let Some(lr) = a.lr.filter(|lr| !(lr.is_finite() && *lr > 0.0)) {
        bail!("--lr must be a positive number, got {lr}");
    }
    // Without --resume the network is known now; with it, once the checkpoint is read.
    let net = a.model.unwrap_or(&ALEXNET);
    if let (Some(r), false) = (a.resize, a.resume) {
        net.leaf_shapes(&net.input_shape(1, r)).context("--resize")?;
    }
    let path = a.checkpoint.clone().unwrap_or_else(|| default_checkpoint(a.model));
    // One writer per checkpoint, claimed before any work (and before it is read for --resume).
    let claim = checkpoint::Claim::acquire(&path).context("--checkpoint")?;
    for stale in claim.removed_stale() {
        println!("removed {}, a temp file that a killed run left behind", stale.display());
    }
    let exists = claim.path().exists();
    if exists && !a.resume && !a.overwrite {
        bail!(
            "--checkpoint {} exists already: --resume continues it, --overwrite starts afresh and replaces it \
             after the first epoch, or --checkpoint PATH names another file",
            path.display()
        );
    }
    if a.resume && !exists {
        bail!(missing_checkpoint("--resume: ", &path));
    }
    let device = pick_device(&a.data.device, a.resize.or((!a.resume).then_some(net.recipe.resolution)))?;
    let compute = compute_of(&a.data, &device)?;
    // --resume continues the checkpoint's network with its recipe unless told otherwise (and
    // then says so); a PyTorch state_dict starts at epoch 0 with the network's recipe.
    let expect = Expect { net: a.model, resolution: a.resize };
    let resumed = match a.resume {
        true => Some(saved::load(claim.path(), &device, expect).context("--resume: loading a checkpoint")?),
        false => None,
    };
    let net = resumed.as_ref().map_or(net, |l| l.model.net);
    let recorded = resumed.as_ref().map(|l| l.recorded()).unwrap_or_default();
    let recipe = net.recipe;
    let mut changed = Vec::new();
    let batch_size = choose("--batch-size", a.batch_size, recorded.batch_size, recipe.batch_size, &mut changed);
    let lr = choose("--lr", a.lr, recorded.lr, recipe.lr, &mut changed);
    let seed = choose("--seed", a.seed, recorded.seed, 0, &mut changed);
    let data = load_data(&a.data, a.max_examples)?;
    if data.train.is_empty() {
        bail!("no training examples (--max-examples 0?)");
    }
    if data.test.is_empty() {
        eprintln!("warning: no test examples: test accuracy is not measured (it prints as n/a)");
    }
    let steps_batch = batch_size.min(data.train.len());
    let (model, start_epoch) = match resumed {
        Some(loaded) => {
            let epoch = loaded.epoch();
            match &loaded.source {
                Source::Ptxgrad { .. } => println!("resuming from {} after epoch {epoch}", path.display()),
                Source::StateDict { note } => println!("resuming from {}: {note}; epochs count from 0", path.display()),
            }
            let m = loaded.model;
            let need = m.net.footprint(m.resolution, steps_batch, true)?;
            check_memory(&device, need, &format!("--batch-size {batch_size}"), "training")?;
            (m, epoch)
        }
        None => {
            let resize = a.resize.unwrap_or(recipe.resolution);
            // Sizes first: an impossible --resize or --batch-size is refused before it is allocated.
            let need = net.footprint(resize, steps_batch, true).context("--resize")?;
            check_memory(&device, need, &format!("--resize {resize} --batch-size {batch_size}"), "training")?;
            (Model::new(net, resize, seed, &device)?, 0)
        }
    };
    for c in &changed {
        println!("--resume: continuing with {c}");
    }
    let mut model = model.with_compute(compute)?;
    if start_epoch >= a.epochs {
        bail!("the checkpoint already has {start_epoch} epochs; ask for more with --epochs");
    }
    let cfg = TrainConfig {
        epochs: a.epochs,
        batch_size,
        lr,
        resolution: model.resolution,
        seed,
        checkpoint: Some(claim),
        stop,
    };
    println!(
        "training {} ({} parameters) on {} ({}), {} train / {} test examples at {}x{}, batch {}, lr {}, {} epochs, {} convolutions, {} GEMMs",
        model.net.title,
        model.param_count(),
        device.label(),
        device.hardware_name(),
        data.train.len(),
        data.test.len(),
        model.resolution,
        model.resolution,
        batch_size,
        lr,
        a.epochs,
        compute.conv,
        compute.gemm.math
    );
    // Tuned at the batch the steps will mostly run (no larger than the data).
    let tune_batch = batch_size.min(data.train.len());
    let tunings = model.tune_convs(tune_batch, conv_tune::REPS).context("timing the convolution algorithms")?;
    print_tunings(&tunings, &device);
    let mut json = match &a.json {
        Some(p) => Some(std::fs::File::create(p).with_context(|| format!("--json: creating {}", p.display()))?),
        None => None,
    };
    if let Some(f) = json.as_mut() {
        for t in &tunings {
            writeln!(f, "{}", tuning_json(t))?;
        }
    }
    let plot = a.plot.clone().map(|path| Plot {
        path,
        title: format!(
            "{} on Fashion-MNIST: lr {lr}, batch {batch_size}, {r}x{r}",
            model.net.title,
            r = model.resolution
        ),
        epochs: Vec::new(),
    });
    let mut console = Console::new(!a.quiet, json.as_mut(), plot);
    let reports = train::train(&mut model, &data.train, &data.test, &cfg, start_epoch, &mut console)?;
    print_run(&reports, &device, json.as_mut())?;
    print_predictions(&model, &data, 10)?;
    let linked = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
    match cfg.checkpoint.as_ref().map(|c| c.path()) {
        Some(p) if linked => println!("checkpoint: {} (-> {})", path.display(), p.display()),
        _ => println!("checkpoint: {}", path.display()),
    }
    Ok(())
}

/// What `--conv-algo auto` chose for each conv layer, and by which clock (nothing for a fixed
/// algorithm: `tunings` is empty then).
fn print_tunings(tunings: &[LayerTuning], device: &Device) {
    match device {
        _ if tunings.is_empty() => {}
        Device::Cpu => {
            println!("convolution algorithms (auto): gemm on every layer (on the CPU its Winograd is slower)")
        }
        Device::Cuda(g) => {
            let clock =
                if g.is_emu() { "wall time on the kernel emulator, says nothing of a GPU" } else { "CUDA events" };
            print!("convolution algorithms per layer (auto, timed by {clock}):\n{}", tunings_table(tunings));
        }
    }
}

/// The whole run's figures, from its epochs' `reports` (at least one): the last epoch's loss
/// and accuracies, the step rate and the end-to-end rate; also as the `"kind": "final"` line of
/// the `--json` file.
fn print_run(reports: &[EpochReport], device: &Device, json: Option<&mut std::fs::File>) -> Result<()> {
    let last = reports.last().context("no epoch ran")?;
    let examples: usize = reports.iter().map(|r| r.examples).sum();
    let seconds: f64 = reports.iter().map(|r| r.train_seconds).sum();
    let rate = examples as f64 / seconds;
    // The whole run's wall time: batching, copies, evaluation and checkpoints included.
    let wall: f64 = reports.iter().map(|r| r.epoch_seconds).sum();
    let end_to_end = examples as f64 / wall;
    println!("loss {:.3}, train acc {:.3}, test acc {}", last.loss, last.train_acc, accuracy(last.test_acc));
    println!(
        "{rate:.1} examples/sec on {} ({}); {end_to_end:.1} end to end ({} epochs in {wall:.1} s, evaluation and checkpoints included)",
        device.label(),
        device.hardware_name(),
        reports.len()
    );
    // How long the run took to reach its final test accuracy: the first epoch at it (or above:
    // an earlier epoch may have scored higher), with the wall time up to that epoch's end.
    let reached = reports.iter().position(|r| r.test_acc >= last.test_acc).map(|i| {
        let seconds: f64 = reports[..=i].iter().map(|r| r.epoch_seconds).sum();
        (reports[i].epoch, seconds)
    });
    if let Some((epoch, secs)) = reached {
        println!("test acc {} first reached after epoch {epoch}, {secs:.1} s into the run", accuracy(last.test_acc));
    }
    if let Some(f) = json {
        let line = serde_json::json!({
            "kind": "final", "loss": last.loss, "train_acc": last.train_acc, "test_acc": last.test_acc,
            "final_test_acc_first_epoch": reached.map(|r| r.0), "final_test_acc_first_seconds": reached.map(|r| r.1),
            "examples_per_sec": rate, "end_to_end_examples_per_sec": end_to_end, "seconds": wall,
            "device": device.label(), "device_name": device.hardware_name(),
            "kernel_code": device.kernel_code(),
        });
        writeln!(f, "{line}")?;
    }
    Ok(())
}
