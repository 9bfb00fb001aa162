//! The `ptxgrad` command: train, summary, eval, predict, bench.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use ptxgrad::data::fashion_mnist::{resolve_data_dir, FashionMnist, CLASS_NAMES};
use ptxgrad::kernel_resources;
use ptxgrad::nn::alexnet::{self, AlexNet};
use ptxgrad::nn::conv_tune;
use ptxgrad::ops::conv2d::ConvAlgo;
use ptxgrad::ops::gemm_math::GemmMath;
use ptxgrad::train::{self, EpochReport, TrainConfig};
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
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Learning rate (plain SGD)
    #[arg(long, default_value_t = 0.01, allow_negative_numbers = true)]
    lr: f32,
    /// Height and width the 28x28 images are resized to (bilinear); the network works from 65 up
    #[arg(long, default_value_t = 224)]
    resize: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use only the first N training and N test examples (quick runs)
    #[arg(long)]
    max_examples: Option<usize>,
    /// Checkpoint written after every epoch (safetensors, PyTorch state_dict names)
    #[arg(long, default_value = "checkpoints/alexnet.safetensors")]
    checkpoint: PathBuf,
    /// Continue from --checkpoint instead of starting afresh
    #[arg(long)]
    resume: bool,
    /// Also write every figure as JSON lines to this file
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bar
    #[arg(long)]
    quiet: bool,
}

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
    let result = match cli.command {
        Command::Train(a) => cmd_train(a),
        Command::Summary { resize } => alexnet::summary(resize).map(|s| print!("{s}")).map_err(Into::into),
        Command::Eval(a) => cmd_eval(a),
        Command::Predict { common, count } => cmd_predict(common, count),
        Command::Bench(a) => ptxgrad::bench::run(&a).map_err(Into::into),
        Command::Kernels { device, json } => cmd_kernels(&device, json),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Picks the device; `auto` without a usable GPU falls back to the CPU with a warning.
fn pick_device(spec: &str) -> Result<Device> {
    if spec == "auto" {
        return Ok(match Device::parse("cuda") {
            Ok(d) => d,
            Err(e) => {
                eprintln!("warning: no GPU ({e}); running on the CPU, which is very slow at 224x224");
                Device::Cpu
            }
        });
    }
    Ok(Device::parse(spec)?)
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

fn cmd_train(a: TrainArgs) -> Result<()> {
    if a.epochs == 0 || a.batch_size == 0 {
        bail!("--epochs and --batch-size must be at least 1 (got {} and {})", a.epochs, a.batch_size);
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        bail!("--lr must be a positive number, got {}", a.lr);
    }
    alexnet::layer_shapes(&[1, 1, a.resize, a.resize]).context("--resize")?;
    let device = pick_device(&a.data.device)?;
    let _math = a.data.math.scope_on(&device)?;
    let data = load_data(&a.data, a.max_examples)?;
    if data.train.is_empty() {
        bail!("no training examples (--max-examples 0?)");
    }
    let (mut model, start_epoch) = if a.resume {
        let (m, epoch) = open_checkpoint(&a.checkpoint, &device, "--resume: ")?;
        if m.resolution != a.resize {
            bail!("--resume: the checkpoint was trained at {0}x{0}, but --resize is {1}", m.resolution, a.resize);
        }
        println!("resuming from {} after epoch {epoch}", a.checkpoint.display());
        (m, epoch)
    } else {
        (AlexNet::new(a.resize, a.seed, &device)?, 0)
    };
    model.conv_algo = a.data.conv_algo;
    if start_epoch >= a.epochs {
        bail!("the checkpoint already has {start_epoch} epochs; ask for more with --epochs");
    }
    let cfg = TrainConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        resolution: a.resize,
        seed: a.seed,
        checkpoint: Some(a.checkpoint.clone()),
        progress: !a.quiet,
    };
    println!(
        "training AlexNet ({} parameters) on {} ({}), {} train / {} test examples at {}x{}, batch {}, lr {}, {} epochs, {} convolutions, {} GEMMs",
        model.param_count(),
        device.label(),
        device.hardware_name(),
        data.train.len(),
        data.test.len(),
        a.resize,
        a.resize,
        a.batch_size,
        a.lr,
        a.epochs,
        model.conv_algo,
        a.data.math
    );
    // Tuned at the batch the steps will mostly run (no larger than the data).
    let tune_batch = a.batch_size.min(data.train.len());
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
            "epoch {}: loss {:.3}, train acc {:.3}, test acc {:.3}, {:.1} examples/sec ({:.1} end to end)",
            r.epoch,
            r.loss,
            r.train_acc,
            r.test_acc,
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
    println!("loss {:.3}, train acc {:.3}, test acc {:.3}", last.loss, last.train_acc, last.test_acc);
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
    println!("checkpoint: {}", a.checkpoint.display());
    Ok(())
}

fn print_predictions(model: &AlexNet, data: &FashionMnist, count: usize) -> Result<()> {
    let n = count.min(data.test.len());
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

/// The model and epoch of a checkpoint; `what` prefixes the errors (the flag that asked for it).
fn open_checkpoint(checkpoint: &Path, device: &Device, what: &str) -> Result<(AlexNet, usize)> {
    if !checkpoint.exists() {
        bail!(
            "{what}no checkpoint at {}: `ptxgrad train` writes one after every epoch (--checkpoint PATH names \
             another file)",
            checkpoint.display()
        );
    }
    // The errors of `load_checkpoint` name the file already.
    train::load_checkpoint(checkpoint, device).with_context(|| format!("{what}loading a checkpoint"))
}

fn load_model(checkpoint: &Path, data: &DataArgs, device: &Device) -> Result<(AlexNet, usize)> {
    let (mut model, epoch) = open_checkpoint(checkpoint, device, "")?;
    model.conv_algo = data.conv_algo;
    Ok((model, epoch))
}

fn cmd_eval(a: CheckpointArgs) -> Result<()> {
    let device = pick_device(&a.data.device)?;
    let _math = a.data.math.scope_on(&device)?;
    let (model, epoch) = load_model(&a.checkpoint, &a.data, &device)?;
    let data = load_data(&a.data, None)?;
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
    let device = pick_device(&a.data.device)?;
    let _math = a.data.math.scope_on(&device)?;
    let (model, _) = load_model(&a.checkpoint, &a.data, &device)?;
    let data = load_data(&a.data, None)?;
    print_predictions(&model, &data, count)
}
