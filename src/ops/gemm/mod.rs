//! The GEMM machinery shared by every op whose kernels run on the GEMM core of `kernels/gemm.cuh`
//! (conv2d's implicit GEMMs, Winograd's batched GEMMs, dense): the arithmetic of the products
//! (`math`), the planning of a launch (`plan`: tile, grid, split-K) and the CPU references'
//! matrix product (`cpu`). `GemmOpts` is how a model says how its GEMMs run; ops take it as an
//! argument, so nothing about a launch hides in global or thread-local state.

pub mod cpu;
pub mod math;
pub mod plan;

use crate::device::Device;
use crate::error::{Error, Result};
use math::GemmMath;

/// How the GEMMs of an op run: the arithmetic of the products and whether the planner may pick
/// the 96-wide tiles. The default is fp32 with every tile: what a model runs unless told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmOpts {
    pub math: GemmMath,
    /// The 96 x 128 and 128 x 96 tiles, for outputs of 96 or 192 rows (columns); off only to
    /// time what they change.
    pub wide_96: bool,
}

impl Default for GemmOpts {
    fn default() -> Self {
        GemmOpts { math: GemmMath::Fp32, wide_96: true }
    }
}

impl GemmOpts {
    /// The default options with the arithmetic `math`.
    pub fn math(math: GemmMath) -> Self {
        GemmOpts { math, ..GemmOpts::default() }
    }

    /// Refuses tensor-core arithmetic on the CPU, whose path computes in fp32 only (asking it
    /// for TF32 or BF16 is a mistake to report, not to ignore).
    pub fn check_device(&self, device: &Device) -> Result<()> {
        if self.math != GemmMath::Fp32 && !device.is_cuda() {
            return Err(Error::Invalid(format!(
                "--math {} needs a CUDA device (or emu); the CPU path computes in fp32 only, found {}",
                self.math,
                device.label()
            )));
        }
        Ok(())
    }
}
