//! The `ptxgrad` command: train, summary, eval, predict, bench.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use ptxgrad::checkpoint;
use ptxgrad::data::fashion_mnist::{resolve_data_dir, FashionMnist, CLASS_NAMES};
use ptxgrad::kernel_resources;
use ptxgrad::nn::alexnet::{self, AlexNet};
use ptxgrad::nn::conv_tune;
use ptxgrad::nn::Compute;
use ptxgrad::ops::conv2d::ConvAlgo;
use ptxgrad::ops::gemm::math::GemmMath;
use ptxgrad::ops::gemm::GemmOpts;
use ptxgrad::train::{self, EpochReport, Stop, TrainConfig};
use ptxgrad::Device;

#[derive(Parser)]
#[command(
    name = "ptxgrad",
    version,
    about = "Trains the d2l book's AlexNet on Fashion-MNIST with hand-written CUDA kernels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train AlexNet on Fashion-MNIST (the book's recipe by default)
    Train(TrainArgs),
    /// Print each layer's output shape for one 1x1xRxR input, and the parameter count
    Summary {
        /// Input height and width
        #[arg(long, default_value_t = 224)]
        resize: usize,
    },
    /// Report a checkpoint's accuracy on the test set
    Eval(CheckpointArgs),
    /// Show true and predicted labels of the first test images from a checkpoint
    Predict {
        #[command(flatten)]
        common: CheckpointArgs,
        /// How many test images
        #[arg(short = 'n', long, default_value_t = 10)]
        count: usize,
    },
    /// Training-step throughput on a synthetic batch, as JSON lines
    Bench(ptxgrad::bench::BenchArgs),
    /// Every kernel as the GPU runs it (registers, local memory, blocks per SM, machine code or
    /// PTX), checked against the kernels' design rules; fails if one breaks them
    Kernels {
        /// cuda or cuda:N
        #[arg(long, default_value = "cuda")]
        device: String,
        /// One JSON line per kernel instead of the table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct DataArgs {
    /// Directory holding the four Fashion-MNIST .gz files [default: $PTXGRAD_DATA, else data/fashion-mnist]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// cpu, cuda, cuda:N, emu (the CUDA path on the kernel emulator: slow), or auto (cuda:0
    /// when a GPU can be used, else cpu)
    #[arg(long, default_value = "auto")]
    device: String,
    /// Convolution algorithm: auto (train: each conv layer takes the fastest of the others as
    /// timed on the GPU before the first step, among those that agree with gemm; eval, predict
    /// and the CPU: gemm), gemm (implicit GEMM), winograd (F(4x4,3x3) and F(2x2,5x5) where they
    /// apply), or winograd:M (output tile M)
    #[arg(long, default_value = "auto")]
    conv_algo: ConvAlgo,
    /// GEMM arithmetic (CUDA): fp32 (FFMAs, exact products: PyTorch's strict fp32), 3xtf32
    /// (three TF32 tensor-core products per multiply-add: about fp32's accuracy), tf32 (one,
    /// of operands rounded to 10 mantissa bits: PyTorch's default convolutions), or bf16 (one,
    /// of operands rounded to bfloat16: the products of PyTorch's bf16 autocast)
    #[arg(long, default_value = "fp32")]
    math: GemmMath,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Examples per SGD step [default: 128; with --resume, the checkpoint's]
    #[arg(long)]
    batch_size: Option<usize>,
    /// Learning rate (plain SGD) [default: 0.01; with --resume, the checkpoint's]
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f32>,
    /// Height and width the 28x28 images are resized to (bilinear); the network works from 65 up
    /// [default: 224; with --resume, the checkpoint's]
    #[arg(long)]
    resize: Option<usize>,
    /// Seed of the initial weights, the shuffling and dropout [default: 0; with --resume, the
    /// checkpoint's]
    #[arg(long)]
    seed: Option<u64>,
    /// Use only the first N training and N test examples (quick runs)
    #[arg(long)]
    max_examples: Option<usize>,
    /// Checkpoint written after every epoch (safetensors, PyTorch state_dict names)
    #[arg(long, default_value = "checkpoints/alexnet.safetensors")]
    checkpoint: PathBuf,
    /// Continue from --checkpoint instead of starting afresh
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Start afresh even though --checkpoint exists (it is replaced after the first epoch)
    #[arg(long)]
    overwrite: bool,
    /// Also write every figure as JSON lines to this file
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bar
    #[arg(long)]
    quiet: bool,
}

/// The book's recipe: what `train` runs with when not told otherwise.
const DEFAULT_BATCH: usize = 128;
const DEFAULT_LR: f32 = 0.01;
const DEFAULT_RESIZE: usize = 224;

#[derive(Args)]
struct CheckpointArgs {
    /// A checkpoint written by `ptxgrad train`
    #[arg(long, default_value = "checkpoints/alexnet.safetensors")]
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
}

fn main() {
    let cli = Cli::parse();
    // Ctrl-C and SIGTERM stop `train` cleanly (see `cmd_train`); a second one ends it at once.
    let stop = Stop::default();
    if matches!(cli.command, Command::Train(_)) {
        if let Err(e) = stop_on_signals(&stop) {
            eprintln!("warning: Ctrl-C will not stop training cleanly: {e}");
        }
    }
    let result = match cli.command {
        Command::Train(a) => cmd_train(a, stop),
        Command::Summary { resize } => alexnet::summary(resize).map(|s| print!("{s}")).map_err(Into::into),
        Command::Eval(a) => cmd_eval(a),
        Command::Predict { common, count } => cmd_predict(common, count),
        Command::Bench(a) => ptxgrad::bench::run(&a).map_err(Into::into),
        Command::Kernels { device, json } => cmd_kernels(&device, json),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        // Ended by a signal: 128 + its number, as a shell reports a process the signal killed.
        let code = match e.downcast_ref::<ptxgrad::Error>() {
            Some(ptxgrad::Error::Interrupted { signal, .. }) => 128 + *signal as i32,
            _ => 1,
        };
        std::process::exit(code);
    }
}

/// SIGINT, SIGTERM and SIGHUP request a stop (the run ends after its step and its save in
/// flight); the second such signal exits at once, with 128 + its number.
fn stop_on_signals(stop: &Stop) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM, SIGHUP] {
        // In this order: a signal that finds `seen` set exits; else it sets it and the request.
        signal_hook::flag::register_conditional_shutdown(signal, 128 + signal, seen.clone())?;
        signal_hook::flag::register(signal, seen.clone())?;
        signal_hook::flag::register_usize(signal, stop.cell(), signal as usize)?;
    }
    Ok(())
}

/// Picks the device; `auto` without a usable GPU falls back to the CPU with a warning (how slow
/// that is depends on the input size: `resolution`, where known).
fn pick_device(spec: &str, resolution: Option<usize>) -> Result<Device> {
    if spec == "auto" {
        return Ok(match Device::parse("cuda") {
            Ok(d) => d,
            Err(e) => {
                let slow = match resolution {
                    Some(r) if r > 96 => format!(", which is very slow at {r}x{r}"),
                    _ => String::new(),
                };
                eprintln!("warning: no GPU ({e}); running on the CPU{slow}");
                Device::Cpu
            }
        });
    }
    Ok(Device::parse(spec)?)
}

/// Bytes as GB (or MB below one GB), for messages.
fn gigabytes(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GB", bytes as f64 / 1e9)
    } else {
        format!("{:.0} MB", bytes as f64 / 1e6)
    }
}

/// Refuses a run whose model, at `flags`' sizes, cannot fit the memory `device` has left, before
/// anything is allocated: what the OOM killer or a failed allocation would say later, hours in.
fn check_memory(device: &Device, need: alexnet::Footprint, flags: &str, what: &str) -> Result<()> {
    let free = device.memory_available()?;
    let parts = format!(
        "{} of parameters{}, {} of activations",
        gigabytes(need.params),
        if what == "training" { " and gradients" } else { "" },
        gigabytes(need.activations)
    );
    let advice = "use a smaller --resize or --batch-size";
    match (free.device, device) {
        (Some(avail), Device::Cuda(g)) if !g.is_emu() && need.device > avail => bail!(
            "{flags}: {what} needs at least {} of GPU memory ({parts}), but {} has {} free; {advice}",
            gigabytes(need.device),
            device.label(),
            gigabytes(avail)
        ),
        _ => {}
    }
    // On the CPU and the emulator the model's memory is the host's too.
    let on_host = match device {
        Device::Cuda(g) if !g.is_emu() => need.host,
        _ => need.host.saturating_add(need.device),
    };
    if let Some(avail) = free.host.filter(|&a| on_host > a) {
        bail!(
            "{flags}: {what} needs at least {} of host memory ({parts}, and the copies a checkpoint is made of), \
             but {} is available; {advice}",
            gigabytes(on_host),
            gigabytes(avail)
        );
    }
    Ok(())
}

fn load_data(args: &DataArgs, cap: Option<usize>) -> Result<FashionMnist> {
    let dir = resolve_data_dir(args.data_dir.as_deref());
    let mut data = FashionMnist::load(&dir).with_context(|| format!("loading Fashion-MNIST from {}", dir.display()))?;
    if let Some(n) = cap {
        data.train.truncate(n);
        data.test.truncate(n);
    }
    Ok(data)
}

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

fn cmd_train(a: TrainArgs, stop: Stop) -> Result<()> {
    if a.epochs == 0 || a.batch_size == Some(0) {
        bail!("--epochs and --batch-size must be at least 1 (got {} and {})", a.epochs, a.batch_size.unwrap_or(0));
    }
    if let Some(lr) = a.lr.filter(|lr| !(lr.is_finite() && *lr > 0.0)) {
        bail!("--lr must be a positive number, got {lr}");
    }
    if let Some(r) = a.resize {
        alexnet::layer_shapes(&[1, 1, r, r]).context("--resize")?;
    }
    // One writer per checkpoint, claimed before any work (and before it is read for --resume).
    let claim = checkpoint::Claim::acquire(&a.checkpoint).context("--checkpoint")?;
    for stale in claim.removed_stale() {
        println!("removed {}, a temp file that a killed run left behind", stale.display());
    }
    let exists = claim.path().exists();
    if exists && !a.resume && !a.overwrite {
        bail!(
            "--checkpoint {} exists already: --resume continues it, --overwrite starts afresh and replaces it \
             after the first epoch, or --checkpoint PATH names another file",
            a.checkpoint.display()
        );
    }
    if a.resume && !exists {
        bail!(missing_checkpoint("--resume: ", &a.checkpoint));
    }
    // --resume continues with the checkpoint's recipe unless told otherwise (and then says so).
    let recorded = match a.resume {
        true => train::recorded_hyperparameters(claim.path()).context("--resume")?,
        false => train::Recorded::default(),
    };
    let mut changed = Vec::new();
    let batch_size = choose("--batch-size", a.batch_size, recorded.batch_size, DEFAULT_BATCH, &mut changed);
    let lr = choose("--lr", a.lr, recorded.lr, DEFAULT_LR, &mut changed);
    let seed = choose("--seed", a.seed, recorded.seed, 0, &mut changed);
    let device = pick_device(&a.data.device, if a.resume { a.resize } else { a.resize.or(Some(DEFAULT_RESIZE)) })?;
    let compute = compute_of(&a.data, &device)?;
    let data = load_data(&a.data, a.max_examples)?;
    if data.train.is_empty() {
        bail!("no training examples (--max-examples 0?)");
    }
    if data.test.is_empty() {
        eprintln!("warning: no test examples: test accuracy is not measured (it prints as n/a)");
    }
    let (model, start_epoch) = if a.resume {
        let (m, epoch) = open_checkpoint(claim.path(), &device, "--resume: ")?;
        if let Some(r) = a.resize.filter(|&r| r != m.resolution) {
            bail!("--resume: the checkpoint was trained at {0}x{0}, but --resize is {r}", m.resolution);
        }
        println!("resuming from {} after epoch {epoch}", a.checkpoint.display());
        (m, epoch)
    } else {
        let resize = a.resize.unwrap_or(DEFAULT_RESIZE);
        // Sizes first: an impossible --resize or --batch-size is refused before it is allocated.
        let steps_batch = batch_size.min(data.train.len());
        let need = alexnet::footprint(resize, steps_batch, true).context("--resize")?;
        check_memory(&device, need, &format!("--resize {resize} --batch-size {batch_size}"), "training")?;
        (AlexNet::new(resize, seed, &device)?, 0)
    };
    if a.resume {
        let need = alexnet::footprint(model.resolution, batch_size.min(data.train.len()), true)?;
        check_memory(&device, need, &format!("--batch-size {batch_size}"), "training")?;
    }
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
        progress: !a.quiet,
        stop,
    };
    println!(
        "training AlexNet ({} parameters) on {} ({}), {} train / {} test examples at {}x{}, batch {}, lr {}, {} epochs, {} convolutions, {} GEMMs",
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
    match &device {
        _ if tunings.is_empty() => {}
        Device::Cpu => {
            println!("convolution algorithms (auto): gemm on every layer (on the CPU its Winograd is slower)")
        }
        Device::Cuda(g) => {
            let clock =
                if g.is_emu() { "wall time on the kernel emulator, says nothing of a GPU" } else { "CUDA events" };
            print!("convolution algorithms per layer (auto, timed by {clock}):\n{}", conv_tune::report(&tunings));
        }
    }
    let mut json = match &a.json {
        Some(p) => Some(std::fs::File::create(p).with_context(|| format!("--json: creating {}", p.display()))?),
        None => None,
    };
    if let Some(f) = json.as_mut() {
        for t in &tunings {
            writeln!(f, "{}", conv_tune::to_json(t))?;
        }
    }
    let reports = train::train(&mut model, &data.train, &data.test, &cfg, start_epoch, |r: &EpochReport| {
        println!(
            "epoch {}: loss {:.3}, train acc {:.3}, test acc {}, {:.1} examples/sec ({:.1} end to end)",
            r.epoch,
            r.loss,
            r.train_acc,
            accuracy(r.test_acc),
            r.examples_per_sec(),
            r.end_to_end_examples_per_sec()
        );
        if let Some(f) = json.as_mut() {
            let line = serde_json::json!({
                "kind": "epoch", "epoch": r.epoch, "loss": r.loss, "train_acc": r.train_acc,
                "test_acc": r.test_acc, "examples_per_sec": r.examples_per_sec(),
                "end_to_end_examples_per_sec": r.end_to_end_examples_per_sec(),
            });
            writeln!(f, "{line}").map_err(|e| ptxgrad::Error::Io { path: "--json".into(), reason: e })?;
        }
        Ok(())
    })?;
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
    if let Some(f) = json.as_mut() {
        let line = serde_json::json!({
            "kind": "final", "loss": last.loss, "train_acc": last.train_acc, "test_acc": last.test_acc,
            "examples_per_sec": rate, "end_to_end_examples_per_sec": end_to_end, "seconds": wall,
            "device": device.label(), "device_name": device.hardware_name(),
            "kernel_code": device.kernel_code(),
        });
        writeln!(f, "{line}")?;
    }
    print_predictions(&model, &data, 10)?;
    let linked = std::fs::symlink_metadata(&a.checkpoint).is_ok_and(|m| m.file_type().is_symlink());
    match cfg.checkpoint.as_ref().map(|c| c.path()) {
        Some(p) if linked => println!("checkpoint: {} (-> {})", a.checkpoint.display(), p.display()),
        _ => println!("checkpoint: {}", a.checkpoint.display()),
    }
    Ok(())
}

/// An accuracy for printing: "n/a" where there was nothing to measure it on (NaN).
fn accuracy(acc: f64) -> String {
    if acc.is_nan() {
        "n/a".into()
    } else {
        format!("{acc:.3}")
    }
}

fn print_predictions(model: &AlexNet, data: &FashionMnist, count: usize) -> Result<()> {
    let n = count.min(data.test.len());
    if n == 0 {
        println!("no test images to predict");
        return Ok(());
    }
    let pred = train::predict(model, &data.test, model.resolution, n)?;
    println!("first {n} test images:");
    println!("  {:>3}  {:<12} {:<12}", "#", "true", "predicted");
    let mut correct = 0;
    for (i, &p) in pred.iter().enumerate() {
        let t = data.test.labels[i] as usize;
        correct += usize::from(t == p as usize);
        let mark = if t == p as usize { "" } else { "  <- wrong" };
        println!("  {i:>3}  {:<12} {:<12}{mark}", CLASS_NAMES[t], CLASS_NAMES[p as usize % CLASS_NAMES.len()]);
    }
    println!("accuracy on these {n}: {:.3}", correct as f64 / n.max(1) as f64);
    Ok(())
}

/// What a missing checkpoint is told with; `what` prefixes it (the flag that asked for it).
fn missing_checkpoint(what: &str, checkpoint: &Path) -> String {
    format!(
        "{what}no checkpoint at {}: `ptxgrad train` writes one after every epoch (--checkpoint PATH names another \
         file)",
        checkpoint.display()
    )
}

/// The model and epoch of a checkpoint; `what` prefixes the errors (the flag that asked for it).
fn open_checkpoint(checkpoint: &Path, device: &Device, what: &str) -> Result<(AlexNet, usize)> {
    if !checkpoint.exists() {
        bail!(missing_checkpoint(what, checkpoint));
    }
    // The errors of `load_checkpoint` name the file already.
    train::load_checkpoint(checkpoint, device).with_context(|| format!("{what}loading a checkpoint"))
}

/// How the model runs its GEMMs and convolutions, as --math and --conv-algo say; refused at once
/// where the device cannot run it.
fn compute_of(data: &DataArgs, device: &Device) -> Result<Compute> {
    let compute = Compute { gemm: GemmOpts::math(data.math), conv: data.conv_algo };
    compute.gemm.check_device(device)?;
    Ok(compute)
}

fn load_model(checkpoint: &Path, compute: Compute, device: &Device) -> Result<(AlexNet, usize)> {
    let (model, epoch) = open_checkpoint(checkpoint, device, "")?;
    Ok((model.with_compute(compute)?, epoch))
}

/// `check_memory` for evaluating `model` in batches of `train::EVAL_BATCH`.
fn check_eval_memory(model: &AlexNet, device: &Device) -> Result<()> {
    let need = alexnet::footprint(model.resolution, train::EVAL_BATCH, false)?;
    let r = model.resolution;
    check_memory(device, need, &format!("the checkpoint's {r}x{r} inputs"), "evaluation")
}

fn cmd_eval(a: CheckpointArgs) -> Result<()> {
    let device = pick_device(&a.data.device, None)?;
    let compute = compute_of(&a.data, &device)?;
    let (model, epoch) = load_model(&a.checkpoint, compute, &device)?;
    let data = load_data(&a.data, None)?;
    check_eval_memory(&model, &device)?;
    if data.test.is_empty() {
        bail!("no test examples to evaluate on");
    }
    let acc = train::evaluate(&model, &data.test, model.resolution)?;
    println!(
        "{}: epoch {epoch}, {}x{}, test acc {acc:.4} on {} examples",
        a.checkpoint.display(),
        model.resolution,
        model.resolution,
        data.test.len()
    );
    Ok(())
}

fn cmd_kernels(spec: &str, json: bool) -> Result<()> {
    let gpu = match Device::parse(spec)? {
        Device::Cuda(g) if !g.is_emu() => g,
        d => bail!("`kernels` reports what a GPU runs: expected --device cuda or cuda:N, found {d:?}"),
    };
    let kernels = kernel_resources::kernel_resources(&gpu)?;
    if json {
        for k in &kernels {
            println!("{}", k.to_json());
        }
    } else {
        println!("{} (driver {}), {}:", gpu.name, ptxgrad::device::driver_version(), gpu.kernel_code());
        print!("{}", kernel_resources::report(&kernels));
    }
    let breaking = kernel_resources::broken_rules(&kernels);
    if !breaking.is_empty() {
        bail!("{} design rule(s) broken:\n  {}", breaking.len(), breaking.join("\n  "));
    }
    Ok(())
}

fn cmd_predict(a: CheckpointArgs, count: usize) -> Result<()> {
    let device = pick_device(&a.data.device, None)?;
    let compute = compute_of(&a.data, &device)?;
    let (model, _) = load_model(&a.checkpoint, compute, &device)?;
    let data = load_data(&a.data, None)?;
    check_eval_memory(&model, &device)?;
    print_predictions(&model, &data, count)
}
