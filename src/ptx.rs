//! The PTX of every `kernels/*.cu`, embedded at build time (see build.rs), and the enum that
//! names each module. Modules are loaded lazily, once per device, by `device::Gpu`.
//!
//! The texts are embedded zlib-compressed (every binary carries all of them: 1.7 MB instead of
//! 9.3 MB) and inflated once per process, when a module's text is first asked for.

use std::io::Read as _;
use std::sync::OnceLock;

/// One kernel file's embedded PTX (build.rs writes the table).
struct Embedded {
    /// The file stem in `kernels/`.
    stem: &'static str,
    /// The PTX, zlib-compressed; None in a CPU-only build.
    zlib: Option<&'static [u8]>,
    /// The PTX's length in bytes.
    len: usize,
}

mod generated {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

/// The inflated text of `generated::MODULES[i]`, made on first use.
static TEXTS: [OnceLock<String>; generated::COUNT] = [const { OnceLock::new() }; generated::COUNT];

/// The PTX of `generated::MODULES[i]`, or None in a CPU-only build.
fn text(i: usize) -> Option<&'static str> {
    let m = &generated::MODULES[i];
    let zlib = m.zlib?;
    let text = TEXTS[i].get_or_init(|| {
        let mut text = String::with_capacity(m.len);
        // build.rs wrote these bytes from the PTX it compiled: they inflate, to valid UTF-8.
        flate2::read::ZlibDecoder::new(zlib)
            .read_to_string(&mut text)
            .unwrap_or_else(|e| panic!("the embedded PTX of kernels/{}.cu does not inflate: {e}", m.stem));
        text
    });
    Some(text.as_str())
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
        generated::MODULES.iter().position(|m| m.stem == self.stem()).and_then(text)
    }
}

/// Every (stem, PTX) pair that was built, for the ptxas test.
pub fn all() -> Vec<(&'static str, Option<&'static str>)> {
    (0..generated::COUNT).map(|i| (generated::MODULES[i].stem, text(i))).collect()
}

/// One kernel (`.entry`) of a PTX module, with the launch bounds its `__launch_bounds__` gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub name: &'a str,
    /// `.maxntid`: the most threads a block of it may have (None: no bound, CUDA's 1024).
    pub max_threads: Option<u32>,
    /// `.minnctapersm`: the blocks of `max_threads` threads that must fit on one SM at once
    /// (the GEMM kernels ask for 2, which caps them at 128 registers).
    pub min_blocks: Option<u32>,
}

/// Every `.entry` of a PTX module's text, in order.
pub fn entries(ptx: &str) -> Vec<Entry<'_>> {
    ptx.split(".entry ")
        .skip(1)
        .map(|e| {
            let name = e.split('(').next().unwrap_or("").trim();
            // The directives between the parameter list and the body.
            let head = &e[..e.find('{').unwrap_or(e.len())];
            let directive = |key: &str| {
                head.split(key).nth(1).and_then(|r| r.split([',', '\n']).next()).and_then(|n| n.trim().parse().ok())
            };
            Entry { name, max_threads: directive(".maxntid"), min_blocks: directive(".minnctapersm") }
        })
        .collect()
}
