//! The command line: every command and flag, with its help text and default (clap derive).
//! Plain values only; the commands turn them into the library's configurations.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use ptxgrad::nn::models;
use ptxgrad::nn::network::Network;
use ptxgrad::ops::conv2d::ConvAlgo;
use ptxgrad::ops::gemm::math::GemmMath;

/// `--model NAME`: one of the networks of `nn::models`.
fn network(name: &str) -> Result<&'static Network, String> {
    let names: Vec<&str> = models::ALL.iter().map(|n| n.name).collect();
    models::ALL.iter().copied().find(|n| n.name == name).ok_or_else(|| format!("expected one of {}", names.join(", ")))
}

/// The help of `--model`, each network with its recipe (from the models' tables), then
/// `default`.
fn model_help(default: &str) -> String {
    let each: Vec<String> = models::ALL
        .iter()
        .map(|n| {
            let r = n.recipe;
            format!("{} ({}x{}, lr {}, batch {})", n.name, r.resolution, r.resolution, r.lr, r.batch_size)
        })
        .collect();
    format!("The network, trained with the d2l book's recipe unless told otherwise: {} {default}", each.join(", "))
}

#[derive(Parser)]
#[command(
    name = "ptxgrad",
    version,
    about = "Trains the d2l book's CNNs (LeNet, AlexNet, VGG-11, NiN) on Fashion-MNIST with hand-written CUDA kernels"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train a network on Fashion-MNIST (AlexNet and the book's recipe by default)
    Train(TrainArgs),
    /// Print each layer's output shape for one 1x1xRxR input, and the parameter count
    Summary {
        #[arg(long, default_value = "alexnet", value_parser = network, help = model_help(""))]
        model: &'static Network,
        /// Input height and width [default: the model's recipe]
        #[arg(long)]
        resize: Option<usize>,
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
    Bench(BenchArgs),
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

// Where the data comes from and what runs it: shared by `train`, `eval` and `predict`. (No doc
// comment on an `Args` struct: clap would take it for the help text of the command it is in.)
#[derive(Args)]
pub struct DataArgs {
    /// Directory holding the four Fashion-MNIST .gz files [default: $PTXGRAD_DATA, else data/fashion-mnist]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// cpu, cuda, cuda:N, emu (the CUDA path on the kernel emulator: slow), or auto (cuda:0
    /// when a GPU can be used, else cpu)
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Convolution algorithm: auto (train: each conv layer takes the fastest of the others as
    /// timed on the GPU before the first step, among those that agree with gemm; eval, predict
    /// and the CPU: gemm), gemm (implicit GEMM), winograd (F(4x4,3x3) and F(2x2,5x5) where they
    /// apply), or winograd:M (output tile M)
    #[arg(long, default_value = "auto")]
    pub conv_algo: ConvAlgo,
    /// GEMM arithmetic (CUDA): fp32 (FFMAs, exact products: PyTorch's strict fp32), 3xtf32
    /// (three TF32 tensor-core products per multiply-add: about fp32's accuracy), tf32 (one,
    /// of operands rounded to 10 mantissa bits: PyTorch's default convolutions), or bf16 (one,
    /// of operands rounded to bfloat16: the products of PyTorch's bf16 autocast)
    #[arg(long, default_value = "fp32")]
    pub math: GemmMath,
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, value_parser = network, help = model_help("[default: alexnet; with --resume, the checkpoint's]"))]
    pub model: Option<&'static Network>,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Examples per SGD step [default: the model's recipe; with --resume, the checkpoint's]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate (plain SGD) [default: the model's recipe; with --resume, the checkpoint's]
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f32>,
    /// Height and width the 28x28 images are resized to (bilinear; 28: used as they are); AlexNet
    /// works from 65 up, `ptxgrad summary --model M --resize R` says whether M does [default: the
    /// model's recipe; with --resume, the checkpoint's]
    #[arg(long)]
    pub resize: Option<usize>,
    /// Seed of the initial weights, the shuffling and dropout [default: 0; with --resume, the
    /// checkpoint's]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Use only the first N training and N test examples (quick runs)
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// Checkpoint written after every epoch (safetensors, PyTorch state_dict names)
    /// [default: checkpoints/MODEL.safetensors]
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Continue from --checkpoint instead of starting afresh (a checkpoint of ptxgrad's, or a
    /// PyTorch state_dict saved with safetensors, which starts at epoch 0)
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Start afresh even though --checkpoint exists (it is replaced after the first epoch)
    #[arg(long)]
    pub overwrite: bool,
    /// Also write every figure as JSON lines to this file
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw loss, train accuracy and test accuracy per epoch in this SVG file (redrawn after
    /// every epoch)
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct CheckpointArgs {
    /// A checkpoint written by `ptxgrad train`, or a PyTorch state_dict saved with
    /// `safetensors.torch.save_file` [default: checkpoints/MODEL.safetensors]
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long, value_parser = network, help = model_help("[default: the checkpoint's; a PyTorch state_dict: the network its names are]"))]
    pub model: Option<&'static Network>,
    /// Input height and width [default: the checkpoint's; a PyTorch state_dict: the model's
    /// recipe where its shapes fit it, else the one size they fit]
    #[arg(long)]
    pub resize: Option<usize>,
    /// Use only the first N test examples
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// JSON lines on standard output instead of text: one per image (index, label, predicted
    /// class, logits), then the totals
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data: DataArgs,
}

impl CheckpointArgs {
    /// --checkpoint, else the default file of --model (alexnet without one).
    pub fn path(&self) -> PathBuf {
        self.checkpoint.clone().unwrap_or_else(|| default_checkpoint(self.model))
    }
}

/// `checkpoints/<model>.safetensors`: where `train` writes and `eval` reads when not told.
pub fn default_checkpoint(model: Option<&'static Network>) -> PathBuf {
    PathBuf::from(format!("checkpoints/{}.safetensors", model.map_or("alexnet", |m| m.name)))
}

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "alexnet", value_parser = network, help = model_help(""))]
    pub model: &'static Network,
    /// [default: the model's recipe]
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, default_value_t = 10)]
    pub warmup: usize,
    #[arg(long, default_value_t = 40)]
    pub steps: usize,
    /// Input height and width [default: the model's recipe]
    #[arg(long)]
    pub resize: Option<usize>,
    /// cuda, cuda:N, cpu, or emu (the CUDA path on the kernel emulator); cpu and emu are very
    /// slow at 224: use --resize 65, a small batch and few steps
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Skip the per-layer table
    #[arg(long)]
    pub no_layers: bool,
    /// After the timed steps, run this many more inside a profiler range (cuProfilerStart /
    /// cuProfilerStop), for a profiler started with `--profile-from-start off`, e.g.
    /// `ncu --profile-from-start off ptxgrad bench --profile-steps 1` (tools/gpu/check.sh)
    #[arg(long, default_value_t = 0)]
    pub profile_steps: usize,
    /// Convolution algorithm: auto (each conv layer takes the fastest of the others as timed
    /// before the warm-up, among those that agree with gemm), gemm (implicit GEMM), winograd
    /// (F(4x4,3x3) and F(2x2,5x5) where they apply), or winograd:M (output tile M)
    #[arg(long, default_value = "auto")]
    pub conv_algo: ConvAlgo,
    /// GEMM arithmetic (CUDA): fp32 (FFMAs, exact products: PyTorch's strict fp32), 3xtf32
    /// (three TF32 tensor-core products per multiply-add: about fp32's accuracy), tf32 (one,
    /// of operands rounded to 10 mantissa bits: PyTorch's default convolutions), or bf16 (one,
    /// of operands rounded to bfloat16: the products of PyTorch's bf16 autocast)
    #[arg(long, default_value = "fp32")]
    pub math: GemmMath,
}
