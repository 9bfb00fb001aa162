//! The PTX of every `kernels/*.cu`, embedded at build time (see build.rs), the machine code
//! ptxas made of it for the GPUs named at build time (`SASS_ARCHS`: sm_90 by default), and the
//! enum that names each module. Modules are loaded lazily, once per device, by `device::Gpu`:
//! the machine code where it was built for that GPU, else the PTX (which the driver compiles).
//!
//! Both are embedded zlib-compressed (every binary carries all of them: 1.7 MB of PTX instead of
//! 9.3 MB) and inflated when a module is first asked for: the texts once per process.

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
    /// The module's machine code for each GPU of `SASS_ARCHS`.
    sass: &'static [Sass],
}

/// One module's machine code (a cubin) for one GPU architecture.
struct Sass {
    /// 90 for sm_90.
    arch: u32,
    zlib: &'static [u8],
    len: usize,
}

/// Inflates what build.rs deflated; `what` names it in the panic, which only a corrupt binary
/// can cause.
fn inflate(zlib: &[u8], len: usize, what: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len);
    flate2::read::ZlibDecoder::new(zlib)
        .read_to_end(&mut bytes)
        .unwrap_or_else(|e| panic!("the embedded {what} does not inflate: {e}"));
    bytes
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
        // build.rs wrote these bytes from the PTX it compiled: they inflate, to valid UTF-8.
        let what = format!("PTX of kernels/{}.cu", m.stem);
        String::from_utf8(inflate(zlib, m.len, &what)).unwrap_or_else(|e| panic!("the embedded {what}: {e}"))
    });
    Some(text.as_str())
}

/// `ARCH`: the PTX's virtual architecture (None in a CPU-only build); `COMPILER`: what made it.
/// `SASS_ARCHS`: the GPUs with machine code built ahead of time (90: sm_90); `SASS_COMPILER`: the
/// ptxas that assembled it.
pub use generated::{ARCH, COMPILER, SASS_ARCHS, SASS_COMPILER};

/// One variant per `kernels/<stem>.cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    Add,
    Conv2d,
    Dense,
    Dropout,
    Maxpool2d,
    Nonfinite,
    Relu,
    Resize,
    Sgd,
    SoftmaxXent,
    Winograd,
}

impl Module {
    pub const ALL: [Module; 11] = [
        Module::Add,
        Module::Conv2d,
        Module::Dense,
        Module::Dropout,
        Module::Maxpool2d,
        Module::Nonfinite,
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
            Module::Nonfinite => "nonfinite",
            Module::Relu => "relu",
            Module::Resize => "resize",
            Module::Sgd => "sgd",
            Module::SoftmaxXent => "softmax_xent",
            Module::Winograd => "winograd",
        }
    }

    fn index(self) -> Option<usize> {
        generated::MODULES.iter().position(|m| m.stem == self.stem())
    }

    /// The module's PTX, or None in a CPU-only build (no CUDA compiler was found).
    pub fn ptx(self) -> Option<&'static str> {
        self.index().and_then(text)
    }

    /// The module's machine code (a cubin) for GPU architecture `arch` (90: sm_90), if it was
    /// built ahead of time (see `SASS_ARCHS`). Inflated anew at each call.
    pub fn sass(self, arch: u32) -> Option<Vec<u8>> {
        let m = &generated::MODULES[self.index()?];
        let sass = m.sass.iter().find(|s| s.arch == arch)?;
        Some(inflate(sass.zlib, sass.len, &format!("sm_{arch} machine code of kernels/{}.cu", m.stem)))
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
