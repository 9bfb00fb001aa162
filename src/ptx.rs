//! The PTX of every `kernels/*.cu`, embedded at build time (see build.rs), and the enum that
//! names each module. Modules are loaded lazily, once per device, by `device::Gpu`.

mod generated {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

pub use generated::{ARCH, COMPILER};

/// One variant per `kernels/<stem>.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    Add,
    Conv2d,
    Dense,
    Dropout,
    Maxpool2d,
    Relu,
    Resize,
    Sgd,
    SoftmaxXent,
    Winograd,
}

impl Module {
    pub const ALL: [Module; 10] = [
        Module::Add,
        Module::Conv2d,
        Module::Dense,
        Module::Dropout,
        Module::Maxpool2d,
        Module::Relu,
        Module::Resize,
        Module::Sgd,
        Module::SoftmaxXent,
        Module::Winograd,
    ];

    /// The file stem in `kernels/`.
    pub fn stem(self) -> &'static str {
        match self {
            Module::Add => "add",
            Module::Conv2d => "conv2d",
            Module::Dense => "dense",
            Module::Dropout => "dropout",
            Module::Maxpool2d => "maxpool2d",
            Module::Relu => "relu",
            Module::Resize => "resize",
            Module::Sgd => "sgd",
            Module::SoftmaxXent => "softmax_xent",
            Module::Winograd => "winograd",
        }
    }

    /// The module's PTX, or None in a CPU-only build (no CUDA compiler was found).
    pub fn ptx(self) -> Option<&'static str> {
        generated::MODULES.iter().find(|(stem, _)| *stem == self.stem()).and_then(|(_, ptx)| *ptx)
    }
}

/// Every (stem, PTX) pair that was built, for the ptxas test.
pub fn all() -> &'static [(&'static str, Option<&'static str>)] {
    generated::MODULES
}
