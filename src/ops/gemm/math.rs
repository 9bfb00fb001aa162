//! Which arithmetic the GEMM kernels use for their products (kernels/gemm.cuh's `GemmMath`):
//! one choice for every GEMM (implicit-GEMM and Winograd convolutions, dense layers).
//!
//! - `fp32` (the default): fp32 FFMAs on the CUDA cores. Exact products, as PyTorch computes
//!   with TF32 disabled ("strict fp32").
//! - `3xtf32`: each operand split into a TF32 value and a TF32 remainder, three tensor-core
//!   products per multiply-add (big*big + big*small + small*big): about fp32's accuracy (what is
//!   lost, small*small and the remainder's own truncation, is ~2^-21 of the product) at
//!   tensor-core throughput. Not what PyTorch
//!   calls strict fp32, which never uses tensor cores for fp32 data; reported under its own name.
//! - `tf32`: one tensor-core product of operands rounded to TF32 (10 mantissa bits), as PyTorch's
//!   default convolutions (`cudnn.allow_tf32`; PyTorch keeps its matmuls in fp32 by default, while
//!   ptxgrad's setting covers the dense layers too: ~4% of a step's time in the 2026-11-27 H200 profile).
//! - `bf16`: one tensor-core product of operands rounded to bfloat16 (8 significant bits, to
//!   nearest even), accumulated in fp32: the products of PyTorch's bf16 autocast. Autocast also
//!   stores the activations in bf16 (half the memory traffic); here every tensor stays fp32, and
//!   only the GEMMs' operands are rounded, as they are read from shared memory.
//!
//! The choice is a value (`GemmOpts::math`) that the model holds and passes to every op that runs
//! GEMMs (forward and the backward it records); the CPU path always computes in fp32.

use crate::error::{Error, Result};
use crate::ops::gemm::plan::Tile;

/// The arithmetic of the GEMM kernels' products; the discriminant indexes `gemm_kernel_names!`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmMath {
    #[default]
    Fp32 = 0,
    Tf32x3 = 1,
    Tf32 = 2,
    Bf16 = 3,
}

impl GemmMath {
    pub const ALL: [GemmMath; 4] = [GemmMath::Fp32, GemmMath::Tf32x3, GemmMath::Tf32, GemmMath::Bf16];

    /// The kernel of `names` (a `gemm_kernel_names!` table) for this arithmetic and `tile`.
    pub fn kernel(self, names: &[[&'static str; 5]; 4], tile: Tile) -> &'static str {
        names[self as usize][tile as usize]
    }
}

impl std::str::FromStr for GemmMath {
    type Err = Error;
    /// "fp32", "3xtf32", "tf32" or "bf16".
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" => Ok(GemmMath::Fp32),
            "3xtf32" => Ok(GemmMath::Tf32x3),
            "tf32" => Ok(GemmMath::Tf32),
            "bf16" => Ok(GemmMath::Bf16),
            _ => Err(Error::Invalid(format!("GEMM math: expected fp32, 3xtf32, tf32 or bf16, found `{s}`"))),
        }
    }
}

impl std::fmt::Display for GemmMath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GemmMath::Fp32 => "fp32",
            GemmMath::Tf32x3 => "3xtf32",
            GemmMath::Tf32 => "tf32",
            GemmMath::Bf16 => "bf16",
        })
    }
}

/// The names of a GEMM kernel family, `[math][tile]` in the order of `GemmMath` and `Tile`:
/// `<base>_f32_t128`, `<base>_3xtf32_t128x64`, ... as gemm.cuh's GEMM_FOR_EACH_MATH makes them.
macro_rules! gemm_kernel_names {
    ($base:literal) => {
        [
            [
                concat!($base, "_f32_t128"),
                concat!($base, "_f32_t128x64"),
                concat!($base, "_f32_t64"),
                concat!($base, "_f32_t96"),
                concat!($base, "_f32_t128x96"),
            ],
            [
                concat!($base, "_3xtf32_t128"),
                concat!($base, "_3xtf32_t128x64"),
                concat!($base, "_3xtf32_t64"),
                concat!($base, "_3xtf32_t96"),
                concat!($base, "_3xtf32_t128x96"),
            ],
            [
                concat!($base, "_tf32_t128"),
                concat!($base, "_tf32_t128x64"),
                concat!($base, "_tf32_t64"),
                concat!($base, "_tf32_t96"),
                concat!($base, "_tf32_t128x96"),
            ],
            [
                concat!($base, "_bf16_t128"),
                concat!($base, "_bf16_t128x64"),
                concat!($base, "_bf16_t64"),
                concat!($base, "_bf16_t96"),
                concat!($base, "_bf16_t128x96"),
            ],
        ]
    };
}
pub(crate) use gemm_kernel_names;
