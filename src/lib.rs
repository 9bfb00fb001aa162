//! ptxgrad: a from-scratch CUDA tensor engine that trains AlexNet on Fashion-MNIST.
//!
//! The modules form layers, and a module imports only from its own layer or those below it
//! (tests/layers.rs checks this, and that no two modules import each other):
//!
//! 1. `error`: the one error type.
//! 2. `ptx`, `buffer_pool`, `buffer`, `device`, `kernel_resources`: the embedded kernel modules,
//!    memory, and the devices (CPU, CUDA, the kernel emulator) with their launches and facts.
//! 3. `tensor`: shapes, storage, transfers, and the in-place add the tape accumulates with.
//! 4. `tape`: autograd.
//! 5. `ops`: one module per op (shape checks, CPU reference, launch, the backward it records);
//!    `ops::gemm` holds the GEMM planning and arithmetic that conv2d and dense share.
//! 6. `data` (IDX / Fashion-MNIST), `checkpoint` (safetensors files), `nn` (AlexNet, SGD, the
//!    per-layer convolution tuning).
//! 7. `train` (the loop, evaluation) and `bench` (measurements), used by the `ptxgrad` binary
//!    (src/bin/ptxgrad/), which holds all of the command-line interface.

pub mod bench;
pub mod buffer;
pub mod buffer_pool;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod error;
pub mod kernel_resources;
pub mod nn;
pub mod ops;
pub mod ptx;
pub mod tape;
pub mod tensor;
pub mod train;

/// See Cargo.toml: the CPU path's large, short-lived buffers are far cheaper with mimalloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub use device::{Device, Gpu};
pub use error::{Error, Result};
pub use tape::{Gradients, Tape};
pub use tensor::{Images, Labels, ReluFact, Tensor};
