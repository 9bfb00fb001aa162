//! One file per op. Each holds: a `#[repr(C)]` parameter struct mirrored field for field in
//! `kernels/<op>.cu` (where the op has parameters), the shape checks, the CPU reference
//! (`cpu` functions, the oracle the kernels are tested against), the CUDA launch, and the
//! backward closure it records on the tape.

pub mod adaptive_avgpool2d;
pub mod add;
pub mod avgpool2d;
pub mod batchnorm2d;
pub mod concat;
pub mod conv2d;
pub mod dense;
pub mod dropout;
pub mod fast_div;
pub mod gemm;
pub mod maxpool2d;
pub mod nonfinite;
pub mod parallel;
pub mod relu;
pub mod reshape;
pub mod resize;
pub mod sgd;
pub mod sigmoid;
pub mod softmax_xent;
