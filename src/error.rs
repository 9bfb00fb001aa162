//! One error type for the engine. Every variant says what was expected and what was found, so
//! a user can act on the message without reading the code.

use cudarc::driver::DriverError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An op got tensors whose shapes do not fit together.
    #[error("{op}: expected {expected}, found {found}")]
    Shape { op: &'static str, expected: String, found: String },

    /// Operands of one op live on different devices.
    #[error("{op}: all operands must be on one device, found {found}")]
    DeviceMismatch { op: &'static str, found: String },

    /// CUDA was asked for but cannot be used here (no driver, no device, a CPU-only build). The
    /// message names the ways to run without a GPU, as the user may not know they exist.
    #[error(
        "CUDA is not available: {0}. To run without a GPU, pass `--device cpu` (the CPU), or `--device emu` \
         (the CUDA kernels on the kernel emulator, slow)"
    )]
    NoCuda(String),

    /// The driver rejected our PTX as too new: the compiler that built it is newer than the driver.
    #[error(
        "the GPU driver cannot load kernel module `{module}`: its PTX (built by {compiler} for {arch}) \
         is newer than this driver supports (driver API {driver_version}). Update the NVIDIA driver, \
         or rebuild with an older nvcc/NVRTC (see docs/kernels.md)"
    )]
    PtxTooNew { module: String, compiler: String, arch: String, driver_version: String },

    #[error("CUDA out of memory: asked for {bytes} bytes ({free} bytes free of {total})")]
    OutOfMemory { bytes: usize, free: usize, total: usize },

    /// A kernel launch failed or a kernel faulted (faults surface at the next synchronisation).
    #[error("CUDA error in {context}: {source}")]
    Cuda { context: String, source: DriverError },

    /// The kernel emulator (`--device emu`) refused or failed a launch, as a GPU would have.
    #[error("emulated kernel launch: {0}")]
    Emulator(String),

    /// A setting or argument outside what it accepts: a flag or environment variable, or an
    /// op's parameter (a stride of 0, a dropout rate of 1, a label beyond the classes).
    #[error("{0}")]
    Invalid(String),

    /// A size beyond what the kernels' 32-bit indices or one launch's grid can hold.
    #[error("{0}")]
    TooLarge(String),

    /// A dataset file that is not what it should be (missing, truncated, a wrong magic number,
    /// labels out of range).
    #[error("{0}")]
    Dataset(String),

    /// A checkpoint that cannot be written, read or used: its path, its format, its tensors'
    /// names and shapes, its metadata, or another run holding it.
    #[error("{0}")]
    Checkpoint(String),

    /// Training produced NaN or Inf; the message says where, and what is on disk.
    #[error("{0}")]
    Diverged(String),

    /// A broken invariant of the engine: a bug to report, not something an input can cause.
    #[error("internal error: {0}")]
    Internal(String),

    /// A run was asked to stop (a signal, see `train::Stop`); the message says what is on disk.
    /// The `ptxgrad` command exits with 128 + `signal`, as a shell reports a process the signal
    /// ended.
    #[error("{message}")]
    Interrupted { signal: usize, message: String },

    /// A file could not be read or written. (`reason`, not `source`: the message already holds
    /// it, and an error chain printed with `{:#}` would repeat a source.)
    #[error("{path}: {reason}")]
    Io { path: String, reason: std::io::Error },
}

impl Error {
    pub fn shape(op: &'static str, expected: impl Into<String>, found: impl Into<String>) -> Self {
        Error::Shape { op, expected: expected.into(), found: found.into() }
    }

    pub fn cuda(context: impl Into<String>, source: DriverError) -> Self {
        Error::Cuda { context: context.into(), source }
    }
}
