//! ptxgrad: a from-scratch CUDA tensor engine that trains AlexNet on Fashion-MNIST.
//!
//! Data flows one way: `data` -> `ops` (each a hand-written CUDA kernel plus a CPU reference)
//! -> `tape` (autograd) -> `nn` (AlexNet, SGD) -> the `ptxgrad` binary.

pub mod bench;
pub mod buffer;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod error;
pub mod kernel_resources;
pub mod nn;
pub mod ops;
pub mod pool;
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
