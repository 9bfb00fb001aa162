//! What the GPU runs of each kernel: registers, local memory, static shared memory, the most
//! threads a block may have, and how many blocks fit on one SM, as the driver reports them
//! (`ptxgrad kernels`).
//!
//! A GPU without machine code built for it (see build.rs), or `PTXGRAD_KERNEL_CODE=ptx`, runs the
//! PTX, which the driver compiles with its own compiler: not the ptxas 12.9 whose report
//! `tests/ptx.rs` checks (no spills, registers within the launch bounds). A different compiler
//! can allocate registers differently, and a kernel at the 128-register cap of
//! `__launch_bounds__(256, 2)` is where it would show. So the design rules are checked again
//! here, on what actually runs:
//! - no local memory (register spills or a stack frame),
//! - a block of `.maxntid` threads may be launched (the driver allows at least that many),
//! - `.minnctapersm` such blocks fit on one SM at once (the GEMM kernels' 2 per SM).
//!
//! Where build.rs assembled machine code for this GPU (sm_90 by default) the driver loads it as
//! built, and these figures should equal ptxas's. The `code` column says which ran.

use crate::device::{Gpu, LoadedCode};
use crate::error::{Error, Result};
use crate::ptx::{self, Module};

/// One kernel as the driver compiled it for this GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelResources {
    /// The file stem in `kernels/`.
    pub module: &'static str,
    pub kernel: &'static str,
    /// 32-bit registers per thread.
    pub registers: u32,
    /// Local memory per thread, bytes: register spills and any stack frame.
    pub local_bytes: u32,
    /// Statically allocated shared memory per block, bytes.
    pub shared_bytes: u32,
    /// The most threads per block the driver accepts for it (registers permitting).
    pub max_threads: u32,
    /// `.maxntid` and `.minnctapersm` of its PTX (see `ptx::Entry`).
    pub bound_threads: Option<u32>,
    pub bound_blocks: Option<u32>,
    /// Blocks of `bound_threads` threads that fit on one SM at once (None without a bound).
    pub blocks_per_sm: Option<u32>,
    /// The machine code's architecture, e.g. 90 for sm_90.
    pub binary_version: u32,
    /// What its module was loaded from: the machine code built ahead of time, or the PTX.
    pub code: LoadedCode,
}

impl KernelResources {
    /// The design rules (module docs) this kernel breaks, each as a sentence.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.local_bytes > 0 {
            v.push(format!(
                "uses {} bytes of local memory per thread (register spills or a stack frame), expected none",
                self.local_bytes
            ));
        }
        if let Some(bound) = self.bound_threads.filter(|&b| self.max_threads < b) {
            v.push(format!(
                "accepts at most {} threads per block, but is launched with up to {bound} (its launch bounds)",
                self.max_threads
            ));
        }
        if let (Some(want), Some(fit)) = (self.bound_blocks, self.blocks_per_sm) {
            if fit < want {
                v.push(format!(
                    "fits {fit} block(s) of {} threads per SM, but its launch bounds ask for {want}",
                    self.bound_threads.unwrap_or(1024)
                ));
            }
        }
        v
    }
}

/// Every kernel of every module, loaded (and so compiled by the driver) on `gpu`. Needs a GPU:
/// the emulator compiles the kernels as host C++, which has no registers to report.
pub fn kernel_resources(gpu: &Gpu) -> Result<Vec<KernelResources>> {
    if gpu.is_emu() {
        return Err(Error::NoCuda(
            "the kernel emulator runs the kernels as host C++: registers and occupancy exist only on a GPU".into(),
        ));
    }
    let mut out = Vec::new();
    for module in Module::ALL {
        let text = module.ptx().ok_or_else(|| {
            Error::NoCuda(format!("kernel module `{}` was not compiled into this build", module.stem()))
        })?;
        for entry in ptx::entries(text) {
            let f = gpu.function(module, entry.name)?;
            let what = |attribute: &str| format!("reading the {attribute} of kernel `{}`", entry.name);
            let attr = |value: std::result::Result<i32, _>, attribute: &str| {
                value.map(|v| v.max(0) as u32).map_err(|e| Error::cuda(what(attribute), e))
            };
            let blocks_per_sm = match entry.max_threads {
                Some(threads) => Some(
                    f.occupancy_max_active_blocks_per_multiprocessor(threads, 0, None)
                        .map_err(|e| Error::cuda(what("occupancy"), e))?,
                ),
                None => None,
            };
            out.push(KernelResources {
                module: module.stem(),
                kernel: entry.name,
                registers: attr(f.num_regs(), "register count")?,
                local_bytes: attr(f.local_size_bytes(), "local memory size")?,
                shared_bytes: attr(f.shared_size_bytes(), "shared memory size")?,
                max_threads: attr(f.max_threads_per_block(), "thread limit")?,
                bound_threads: entry.max_threads,
                bound_blocks: entry.min_blocks,
                blocks_per_sm,
                binary_version: attr(f.binary_version(), "binary version")?,
                code: gpu.loaded_code(module).unwrap_or_else(|| LoadedCode::Ptx("not recorded".into())),
            });
        }
    }
    Ok(out)
}

/// Every rule `kernels` break, as "kernel: sentence" (empty when all keep them).
pub fn broken_rules(kernels: &[KernelResources]) -> Vec<String> {
    kernels.iter().flat_map(|k| k.violations().into_iter().map(move |v| format!("{}: {v}", k.kernel))).collect()
}
