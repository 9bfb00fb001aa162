//! The CUDA runtime: one context and one stream per device, kernel modules loaded once and
//! cached, checked launches, and errors that say what happened.
//!
//! All work goes to a single stream per device, so kernels run in launch order and a tensor
//! is never read before the kernel writing it has finished. cudarc's per-buffer event tracking
//! (for multi-stream use) is therefore switched off: it would add two events per launch.
//!
//! A `Gpu` may also be the kernel emulator (`Device::parse("emu")`, crate emu/): the same ops,
//! launches and buffer cache, with buffers in host memory and every kernel run from its CUDA
//! source on the CPU (as fibers, emu/launch.cpp). It exists to test the CUDA path on machines
//! without a GPU; it is slow.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    result::DriverError, sys::cudaError_enum as CuErr, CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig,
};

pub use crate::buffer::{DeviceBuf, Elem, EmuArg};
use crate::buffer::{HostMem, Mem};
use crate::buffer_pool::{BufferPool, PoolStats};
use crate::error::{Error, Result};
use crate::ptx::{self, Module};

/// Where a tensor lives and where its ops run.
#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<Gpu>),
}

impl Device {
    /// `cpu`, `cuda`, `cuda:N`, `emu` (the CUDA path on the kernel emulator), or `auto` (cuda:0
    /// when a GPU can be used, else cpu).
    pub fn parse(spec: &str) -> Result<Device> {
        match spec {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Gpu::get(0).map(Device::Cuda).unwrap_or(Device::Cpu)),
            "cuda" => Ok(Device::Cuda(Gpu::get(0)?)),
            "emu" => Ok(Device::Cuda(Gpu::get(EMU_ORDINAL)?)),
            s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(Gpu::get(n)?)),
                _ => Err(Error::Invalid(format!("unknown device `{s}`: expected cpu, cuda, cuda:N, emu or auto"))),
            },
        }
    }

    /// `cpu`, `cuda:N` or `emu`.
    pub fn label(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(g) if g.is_emu() => "emu".into(),
            Device::Cuda(g) => format!("cuda:{}", g.ordinal),
        }
    }

    /// The hardware's name: the GPU's, or "CPU".
    pub fn hardware_name(&self) -> String {
        match self {
            Device::Cpu => "CPU".into(),
            Device::Cuda(g) => g.name.clone(),
        }
    }

    /// What the kernels loaded so far run from (`Gpu::kernel_code`); None on the CPU.
    pub fn kernel_code(&self) -> Option<String> {
        match self {
            Device::Cpu => None,
            Device::Cuda(g) => Some(g.kernel_code()),
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// Same device (for CUDA: same ordinal).
    pub fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => a.ordinal == b.ordinal,
            _ => false,
        }
    }

    /// Waits for all queued work (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(g) => g.synchronize(),
        }
    }

    /// How much memory is left for this process: on the host (see [`host_memory_available`]) and
    /// on the device (a GPU's free memory; on the emulator, whose buffers are host memory, the
    /// host figure; None on the CPU). For refusing sizes that cannot fit before allocating them:
    /// the figures are a snapshot, and other processes may take memory after it.
    pub fn memory_available(&self) -> Result<MemoryAvailable> {
        let host = host_memory_available();
        let device = match self {
            Device::Cpu => None,
            Device::Cuda(g) if g.is_emu() => host,
            Device::Cuda(g) => {
                let (free, _total) = g
                    .mem_get_info()
                    .map_err(|e| Error::cuda(format!("reading the free memory of cuda:{}", g.ordinal), e))?;
                Some(free as u64)
            }
        };
        Ok(MemoryAvailable { host, device })
    }
}

/// Memory left, in bytes; None where it cannot be known (see [`Device::memory_available`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryAvailable {
    /// What this process can still use on the host.
    pub host: Option<u64>,
    /// What it can still allocate on the device: None on the CPU (which has only the host's).
    pub device: Option<u64>,
}

/// Bytes of host memory this process can still use: the kernel's MemAvailable (/proc/meminfo),
/// lowered by the memory limit of the process's control group (cgroup v2 `memory.max`, v1
/// `memory.limit_in_bytes`, of its own group and every group above it) minus what the group
/// already uses. None where neither can be read (not Linux).
///
/// A group's use counts page cache the kernel drops before it would refuse memory (its
/// `inactive_file`), so that is counted as available, as MemAvailable counts it: otherwise
/// reading the dataset once would look like memory used for good.
pub fn host_memory_available() -> Option<u64> {
    host_memory_available_under(Path::new("/"))
}

/// [`host_memory_available`] with /proc and /sys read under `root` (tests point it at a tree of
/// their own).
fn host_memory_available_under(root: &Path) -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
    let meminfo = read("proc/meminfo").and_then(|s| meminfo_available(&s));
    let groups = read("proc/self/cgroup").unwrap_or_default();
    // cgroup v2: the one line `0::/path`; the limits live in /sys/fs/cgroup/<path>/ and above.
    let v2 = groups.lines().find_map(|l| l.strip_prefix("0::"));
    let v2 = cgroup_headroom(&root.join("sys/fs/cgroup"), v2, ["memory.max", "memory.current"], "inactive_file");
    // cgroup v1: the line `N:<controllers>:/path` whose controllers include `memory`.
    let v1 = groups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "memory").then_some(path)
    });
    let v1 = cgroup_headroom(
        &root.join("sys/fs/cgroup/memory"),
        v1,
        ["memory.limit_in_bytes", "memory.usage_in_bytes"],
        "total_inactive_file",
    );
    meminfo.into_iter().chain(v2).chain(v1).min()
}

/// MemAvailable from the text of /proc/meminfo, in bytes; on kernels before 3.14, which lack
/// it, MemFree + Buffers + Cached (what it estimates).
fn meminfo_available(text: &str) -> Option<u64> {
    let field = |key: &str| {
        let value = text.lines().find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == key))?.1;
        let mut words = value.split_whitespace();
        let number: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") => number.checked_mul(1024),
            None => Some(number),
            Some(_) => None,
        }
    };
    field("MemAvailable").or_else(|| field("MemFree")?.checked_add(field("Buffers")?)?.checked_add(field("Cached")?))
}

/// The least headroom (limit - (usage - reclaimable cache)) of the control group at `path`
/// under the hierarchy mounted at `mount` and of every group above it, each of which may hold
/// a tighter limit; None when none of them has a limit. `files` are the limit and usage files,
/// `inactive_key` the reclaimable cache's line in memory.stat. A group path that leaves the
/// mount (`..`, as seen from another cgroup namespace) is not followed: only the mount's own
/// group is read then.
fn cgroup_headroom(mount: &Path, path: Option<&str>, files: [&str; 2], inactive_key: &str) -> Option<u64> {
    let read_u64 = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).ok()?.trim().parse::<u64>().ok();
    let mut dirs = vec![mount.to_path_buf()];
    let components: Option<Vec<_>> = Path::new(path.unwrap_or(""))
        .components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .map(|c| match c {
            Component::Normal(name) => Some(name.to_owned()),
            _ => None,
        })
        .collect();
    let mut dir = PathBuf::from(mount);
    for name in components.unwrap_or_default() {
        dir.push(name);
        dirs.push(dir.clone());
    }
    dirs.iter()
        .filter_map(|dir| {
            // "max" (v2's "no limit") and anything else that is not a number is no limit.
            let limit = read_u64(dir, files[0])?;
            let Some(usage) = read_u64(dir, files[1]) else { return Some(limit) };
            let inactive = std::fs::read_to_string(dir.join("memory.stat"))
                .ok()
                .and_then(|stat| {
                    stat.lines().find_map(|l| {
                        let (key, value) = l.split_once(' ')?;
                        (key == inactive_key).then(|| value.trim().parse::<u64>().ok()).flatten()
                    })
                })
                .unwrap_or(0);
            Some(limit.saturating_sub(usage.saturating_sub(inactive)))
        })
        .min()
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

/// One CUDA device (its context, its stream, the kernels loaded on it), or the emulator.
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    /// Streaming multiprocessors, read from the driver: the GEMM planner sizes its waves by them.
    /// The emulator reports an H100/H200's 132, so that emulated runs take the launch plans
    /// those GPUs get.
    sms: usize,
    backend: Backend,
    /// PTXGRAD_SYNC_LAUNCHES=1: synchronise after every launch, so that a faulting kernel is
    /// named in the error instead of surfacing at some later copy.
    sync_launches: bool,
    /// Dropped buffers, reused by the next request of the same type and length (see buffer_pool.rs).
    pool: Arc<BufferPool>,
    /// Counts of what makes the host wait on or feed the device (see `host_traffic`).
    traffic: TrafficCounters,
}

/// How often the host has copied to or from a device, or waited for it: a training step does
/// none of these (its batch is uploaded before it; `train` reads the losses and counts every
/// PROGRESS_EVERY steps, between steps).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostTraffic {
    /// Host -> device copies (`upload`).
    pub uploads: u64,
    /// Device -> host copies (`download`; each waits for the device).
    pub downloads: u64,
    /// Explicit waits for the device (`synchronize`; not the per-launch waits of the debugging
    /// switch PTXGRAD_SYNC_LAUNCHES=1).
    pub synchronizations: u64,
}

impl std::ops::Sub for HostTraffic {
    type Output = HostTraffic;
    fn sub(self, before: HostTraffic) -> HostTraffic {
        HostTraffic {
            uploads: self.uploads - before.uploads,
            downloads: self.downloads - before.downloads,
            synchronizations: self.synchronizations - before.synchronizations,
        }
    }
}

#[derive(Default)]
struct TrafficCounters {
    uploads: AtomicU64,
    downloads: AtomicU64,
    synchronizations: AtomicU64,
}

impl TrafficCounters {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

enum Backend {
    Cuda(Cuda),
    Emu,
}

struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// The GPU's compute capability as build.rs names machine code: 90 for sm_90.
    arch: u32,
    /// PTXGRAD_KERNEL_CODE=ptx: load the PTX even where machine code was built for this GPU.
    force_ptx: bool,
    functions: Mutex<HashMap<(Module, &'static str), CudaFunction>>,
    modules: Mutex<HashMap<Module, (Arc<CudaModule>, LoadedCode)>>,
}

/// What a kernel module was loaded from on a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadedCode {
    /// The machine code built ahead of time for this GPU (`sm_<arch>`, see build.rs): the code
    /// tests/ptx.rs reads, loaded as built.
    Sass(u32),
    /// The PTX, compiled by the driver as it loaded; why no machine code was used.
    Ptx(String),
}

impl std::fmt::Display for LoadedCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadedCode::Sass(arch) => write!(f, "sm_{arch} machine code built ahead of time ({})", ptx::SASS_COMPILER),
            LoadedCode::Ptx(why) => write!(f, "PTX compiled by the driver ({why})"),
        }
    }
}

/// The SM count the emulator reports: an H100/H200 SXM's.
pub const EMU_SMS: usize = 132;

/// The ordinal that stands for the emulator.
const EMU_ORDINAL: usize = usize::MAX;

/// Whether libcuda can be loaded at all, checked before any cudarc call (cudarc panics when
/// the library is missing).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

impl Gpu {
    /// The shared handle for device `ordinal`, created on first use.
    pub fn get(ordinal: usize) -> Result<Arc<Gpu>> {
        static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
        let mut gpus = GPUS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = gpus.get(&ordinal) {
            return Ok(g.clone());
        }
        let gpu = Arc::new(Gpu::open(ordinal)?);
        gpus.insert(ordinal, gpu.clone());
        Ok(gpu)
    }

    fn open(ordinal: usize) -> Result<Gpu> {
        let sync_launches = std::env::var("PTXGRAD_SYNC_LAUNCHES").is_ok_and(|v| v == "1");
        if ordinal == EMU_ORDINAL {
            return Ok(Gpu {
                ordinal,
                name: "kernel emulator (CUDA source on the CPU)".into(),
                sms: EMU_SMS,
                backend: Backend::Emu,
                sync_launches,
                pool: Arc::new(BufferPool::new(4 << 30)),
                traffic: TrafficCounters::default(),
            });
        }
        if ptx::ARCH.is_none() {
            return Err(Error::NoCuda(
                "this build has no CUDA kernels (no nvcc or NVRTC was found when it was built; \
                 run `eval \"$(scripts/cuda-wheels.sh)\"` and rebuild)"
                    .into(),
            ));
        }
        if !driver_present() {
            return Err(Error::NoCuda("the NVIDIA driver library (libcuda.so) was not found".into()));
        }
        let count =
            CudaContext::device_count().map_err(|e| Error::NoCuda(format!("the driver failed to start: {e}")))?;
        if ordinal >= count as usize {
            return Err(Error::NoCuda(format!("asked for cuda:{ordinal}, but the driver sees {count} device(s)")));
        }
        let ctx =
            CudaContext::new(ordinal).map_err(|e| Error::cuda(format!("creating a context on cuda:{ordinal}"), e))?;
        // SAFETY: every buffer is used on this one stream only (see the module comment).
        unsafe { ctx.disable_event_tracking() };
        keep_pool_memory(&ctx);
        let name = ctx.name().unwrap_or_else(|_| format!("cuda:{ordinal}"));
        let stream = ctx.default_stream();
        // The cache may hold up to a quarter of the card (unknown size: 4 GiB).
        let total = ctx.mem_get_info().map(|(_, total)| total).unwrap_or(16 << 30);
        let pool = Arc::new(BufferPool::new(total / 4));
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| Error::cuda(format!("reading cuda:{ordinal}'s compute capability"), e))?;
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| Error::cuda(format!("reading cuda:{ordinal}'s SM count"), e))?
            .max(1) as usize;
        let force_ptx = match std::env::var("PTXGRAD_KERNEL_CODE").as_deref() {
            Err(_) | Ok("auto") => false,
            Ok("ptx") => true,
            Ok(other) => {
                return Err(Error::Invalid(format!(
                    "PTXGRAD_KERNEL_CODE: expected auto (machine code where it was built for this GPU) or ptx, \
                     found `{other}`"
                )))
            }
        };
        let cuda = Cuda {
            ctx,
            stream,
            arch: (major * 10 + minor).max(0) as u32,
            force_ptx,
            functions: Mutex::default(),
            modules: Mutex::default(),
        };
        let traffic = TrafficCounters::default();
        Ok(Gpu { ordinal, name, sms, backend: Backend::Cuda(cuda), sync_launches, pool, traffic })
    }

    /// Streaming multiprocessors (the emulator: `EMU_SMS`).
    pub fn sm_count(&self) -> usize {
        self.sms
    }

    /// Whether this is the kernel emulator rather than a GPU.
    pub fn is_emu(&self) -> bool {
        matches!(self.backend, Backend::Emu)
    }

    fn cuda(&self) -> &Cuda {
        match &self.backend {
            Backend::Cuda(c) => c,
            Backend::Emu => unreachable!("a CUDA-only call on the emulator"),
        }
    }

    /// The device's one stream (GPUs only: `launch!` takes the emulator's path before this).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.cuda().stream
    }

    /// Runs kernel `name` on the emulator; `args` point at the arguments' values, in the
    /// kernel's parameter order (what `launch!` builds on the emulator).
    pub fn emu_launch(&self, module: Module, name: &str, cfg: LaunchConfig, args: &[*mut c_void]) -> Result<()> {
        if (cfg.block_dim.1, cfg.block_dim.2) != (1, 1) {
            return Err(Error::Emulator(format!("`{name}` launched with 2-D or 3-D blocks")));
        }
        // SAFETY: launch! passes the kernel's argument list, as for a CUDA launch.
        unsafe { ptxgrad_emu::call(module.stem(), name, cfg.grid_dim, cfg.block_dim.0, args) }.map_err(Error::Emulator)
    }

    /// A kernel function, loading its module on first use.
    pub fn function(&self, module: Module, name: &'static str) -> Result<CudaFunction> {
        let mut fns = self.cuda().functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = fns.get(&(module, name)) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m
            .load_function(name)
            .map_err(|e| Error::cuda(format!("finding kernel `{name}` in module `{}`", module.stem()), e))?;
        fns.insert((module, name), f.clone());
        Ok(f)
    }

    fn module(&self, module: Module) -> Result<Arc<CudaModule>> {
        let cuda = self.cuda();
        let mut mods = cuda.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((m, _)) = mods.get(&module) {
            return Ok(m.clone());
        }
        let arch = cuda.arch;
        // (Forced to PTX, the cubin is not even inflated.)
        let cubin = if cuda.force_ptx { None } else { module.sass(arch) };
        let (m, code) = match cubin {
            _ if cuda.force_ptx => (self.load_ptx(module)?, LoadedCode::Ptx("PTXGRAD_KERNEL_CODE=ptx".into())),
            None => (self.load_ptx(module)?, LoadedCode::Ptx(format!("this build has no sm_{arch} machine code"))),
            Some(cubin) => match cuda.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(cubin)) {
                Ok(m) => (m, LoadedCode::Sass(arch)),
                Err(e) => {
                    // Not expected (the driver accepts cubins of older toolkits for its GPU): the
                    // PTX still runs, and the reason travels with it (`kernel_code`, which
                    // `ptxgrad bench`, `train --json` and `ptxgrad kernels` report).
                    let why = format!("its sm_{arch} machine code did not load: {e}");
                    (self.load_ptx(module)?, LoadedCode::Ptx(why))
                }
            },
        };
        mods.insert(module, (m.clone(), code));
        Ok(m)
    }

    fn load_ptx(&self, module: Module) -> Result<Arc<CudaModule>> {
        let src = module.ptx().ok_or_else(|| {
            Error::NoCuda(format!("kernel module `{}` was not compiled into this build", module.stem()))
        })?;
        self.cuda().ctx.load_module(cudarc::nvrtc::Ptx::from_src(src)).map_err(|e| {
            if e.0 == CuErr::CUDA_ERROR_UNSUPPORTED_PTX_VERSION {
                Error::PtxTooNew {
                    module: module.stem().into(),
                    compiler: ptx::COMPILER.into(),
                    arch: ptx::ARCH.unwrap_or("?").into(),
                    driver_version: driver_version(),
                }
            } else {
                Error::cuda(format!("loading kernel module `{}`", module.stem()), e)
            }
        })
    }

    /// What `module` was loaded from, once it has been (None before, and on the emulator).
    pub fn loaded_code(&self, module: Module) -> Option<LoadedCode> {
        match &self.backend {
            Backend::Cuda(c) => {
                c.modules.lock().unwrap_or_else(|p| p.into_inner()).get(&module).map(|(_, c)| c.clone())
            }
            Backend::Emu => None,
        }
    }

    /// What the modules loaded so far were loaded from, in one line: one entry when they agree.
    pub fn kernel_code(&self) -> String {
        if self.is_emu() {
            return "kernels/*.cu compiled as host C++ (the emulator)".into();
        }
        let mut codes: Vec<(String, &str)> =
            Module::ALL.iter().filter_map(|&m| Some((self.loaded_code(m)?.to_string(), m.stem()))).collect();
        codes.sort();
        match codes.first() {
            None => "no kernel module loaded yet".into(),
            Some((first, _)) if codes.iter().all(|(c, _)| c == first) => first.clone(),
            Some(_) => codes.iter().map(|(c, m)| format!("{m}: {c}")).collect::<Vec<_>>().join("; "),
        }
    }

    /// Checks a launch's result; with PTXGRAD_SYNC_LAUNCHES=1 also waits for the kernel, so
    /// that a fault is reported against the kernel that caused it.
    pub fn check_launch(&self, kernel: &str, launched: std::result::Result<(), DriverError>) -> Result<()> {
        launched.map_err(|e| Error::cuda(format!("launching `{kernel}`"), e))?;
        if self.sync_launches {
            self.stream().synchronize().map_err(|e| Error::cuda(format!("running `{kernel}`"), e))?;
        }
        Ok(())
    }

    /// Waits for all queued work on this device.
    pub fn synchronize(&self) -> Result<()> {
        TrafficCounters::count(&self.traffic.synchronizations);
        if self.is_emu() {
            return Ok(()); // emulated launches run to completion
        }
        self.stream().synchronize().map_err(|e| {
            Error::cuda(
                "waiting for the GPU (a kernel may have faulted; rerun with PTXGRAD_SYNC_LAUNCHES=1 to name it)",
                e,
            )
        })
    }

    /// (free, total) bytes of the GPU's memory (binds the context to this thread first, as the
    /// driver asks for the current context's device).
    fn mem_get_info(&self) -> std::result::Result<(usize, usize), DriverError> {
        self.cuda().ctx.mem_get_info()
    }

    fn oom_or(&self, bytes: usize, e: DriverError, what: &str) -> Error {
        if e.0 == CuErr::CUDA_ERROR_OUT_OF_MEMORY {
            let (free, total) = self.mem_get_info().unwrap_or((0, 0));
            Error::OutOfMemory { bytes, free, total }
        } else {
            Error::cuda(what.to_string(), e)
        }
    }

    /// A buffer of `len` elements from the cache, else a fresh one from the driver's pool; after
    /// an out-of-memory error the cache is emptied and the allocation tried once more.
    fn take<T: Elem>(&self, len: usize, what: &str) -> Result<DeviceBuf<T>> {
        let wrap = |mem| DeviceBuf::new(mem, self.pool.clone());
        if let Some(mem) = self.pool.take::<Mem<T>>(len) {
            return Ok(wrap(mem));
        }
        let stream = match &self.backend {
            Backend::Emu => return Ok(wrap(Mem::Host(HostMem::zeroed(len)))),
            Backend::Cuda(c) => &c.stream,
        };
        let bytes = len * std::mem::size_of::<T>();
        // SAFETY: T is plain data (Elem); every caller writes the buffer before it is read.
        let alloc = || unsafe { stream.alloc::<T>(len) }.map(|s| wrap(Mem::Cuda(s)));
        match alloc() {
            Ok(buf) => Ok(buf),
            Err(e) if e.0 == CuErr::CUDA_ERROR_OUT_OF_MEMORY => {
                self.pool.clear();
                alloc().map_err(|e| self.oom_or(bytes, e, what))
            }
            Err(e) => Err(self.oom_or(bytes, e, what)),
        }
    }

    /// A zero-filled buffer of `len` elements.
    pub fn zeros<T: Elem>(&self, len: usize) -> Result<DeviceBuf<T>> {
        let mut buf = self.take::<T>(len, "allocating device memory")?;
        match buf.mem_mut() {
            Mem::Host(h) => h.data_mut().fill(T::default()),
            Mem::Cuda(s) => {
                self.stream().memset_zeros(s).map_err(|e| Error::cuda("zeroing a buffer on the GPU", e))?;
            }
        }
        Ok(buf)
    }

    /// A buffer of `len` elements whose contents are unspecified: only for outputs that the
    /// next kernel writes in full. On the emulator they are `T::POISON`, so that a kernel that
    /// reads what it did not write fails its tests there, as it may on a GPU (where the buffer
    /// holds whatever the memory last held).
    pub fn uninit<T: Elem>(&self, len: usize) -> Result<DeviceBuf<T>> {
        let mut buf = self.take::<T>(len, "allocating device memory")?;
        if let Mem::Host(h) = buf.mem_mut() {
            h.data_mut().fill(T::POISON);
        }
        Ok(buf)
    }

    /// A buffer of `len` copies of `value`, set on the device (a 32-bit memset: no kernel and
    /// no host copy).
    pub fn full_f32(&self, len: usize, value: f32) -> Result<DeviceBuf<f32>> {
        use cudarc::driver::DevicePtrMut as _;
        let mut buf = self.uninit::<f32>(len)?;
        match buf.mem_mut() {
            Mem::Host(h) => h.data_mut().fill(value),
            Mem::Cuda(slice) => {
                let stream = self.stream();
                let (ptr, _sync) = slice.device_ptr_mut(stream);
                // SAFETY: `ptr` addresses `len` f32 (4-byte) elements of a live buffer on this stream.
                let res =
                    unsafe { cudarc::driver::sys::cuMemsetD32Async(ptr, value.to_bits(), len, stream.cu_stream()) };
                if res != CuErr::CUDA_SUCCESS {
                    return Err(Error::cuda("filling a buffer on the GPU", DriverError(res)));
                }
            }
        }
        Ok(buf)
    }

    /// Host -> device copy.
    pub fn upload<T: Elem>(&self, host: &[T]) -> Result<DeviceBuf<T>> {
        TrafficCounters::count(&self.traffic.uploads);
        let mut buf = self.take::<T>(host.len(), "allocating device memory for a copy to the GPU")?;
        match buf.mem_mut() {
            Mem::Host(h) => h.data_mut().copy_from_slice(host),
            Mem::Cuda(s) => self.stream().memcpy_htod(host, s).map_err(|e| Error::cuda("copying to the GPU", e))?,
        }
        Ok(buf)
    }

    /// Device -> host copy (waits for the stream).
    pub fn download<T: Elem>(&self, dev: &DeviceBuf<T>) -> Result<Vec<T>> {
        TrafficCounters::count(&self.traffic.downloads);
        match dev.mem() {
            Mem::Host(h) => Ok(h.data().to_vec()),
            Mem::Cuda(s) => self.stream().clone_dtoh(s).map_err(|e| {
                Error::cuda(
                    "copying from the GPU (a kernel may have faulted; rerun with PTXGRAD_SYNC_LAUNCHES=1 to name it)",
                    e,
                )
            }),
        }
    }

    /// Device -> device copy into a new buffer.
    pub fn duplicate<T: Elem>(&self, src: &DeviceBuf<T>) -> Result<DeviceBuf<T>> {
        let mut buf = self.take::<T>(src.len(), "allocating device memory for a copy")?;
        self.copy_into(&mut buf, 0, src)?;
        Ok(buf)
    }

    /// Copies all of `src` into `dst` at element `offset` (the caller checks the bounds).
    pub fn copy_into<T: Elem>(&self, dst: &mut DeviceBuf<T>, offset: usize, src: &DeviceBuf<T>) -> Result<()> {
        let end = offset + src.len();
        match (dst.mem_mut(), src.mem()) {
            (Mem::Host(d), Mem::Host(s)) => d.data_mut()[offset..end].copy_from_slice(s.data()),
            (Mem::Cuda(d), Mem::Cuda(s)) => {
                let mut view = d.slice_mut(offset..end);
                self.stream().memcpy_dtod(s, &mut view).map_err(|e| Error::cuda("copying on the GPU", e))?;
            }
            _ => unreachable!("one device is one backend"),
        }
        Ok(())
    }

    /// The buffer cache's counters: after the first training step, `fresh` stays put.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Copies between host and device and waits for the device so far (on the emulator too:
    /// it counts the same calls): a training step adds none.
    pub fn host_traffic(&self) -> HostTraffic {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let t = &self.traffic;
        HostTraffic {
            uploads: get(&t.uploads),
            downloads: get(&t.downloads),
            synchronizations: get(&t.synchronizations),
        }
    }

    /// Runs `work` (which queues kernels on this device) and returns the GPU time it took, in
    /// milliseconds, measured with CUDA events around it (waits for the work to finish). On the
    /// emulator: the wall time.
    pub fn time_ms(&self, work: impl FnOnce() -> Result<()>) -> Result<f32> {
        let Backend::Cuda(c) = &self.backend else {
            let t = std::time::Instant::now();
            work()?;
            return Ok(t.elapsed().as_secs_f32() * 1e3);
        };
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let event = || c.ctx.new_event(timing).map_err(|e| Error::cuda("creating a CUDA event", e));
        let (start, end) = (event()?, event()?);
        start.record(&c.stream).map_err(|e| Error::cuda("recording a CUDA event", e))?;
        work()?;
        end.record(&c.stream).map_err(|e| Error::cuda("recording a CUDA event", e))?;
        start.elapsed_ms(&end).map_err(|e| Error::cuda("timing with CUDA events (a kernel may have faulted)", e))
    }

    /// Runs `work` (which queues kernels on this device) inside a profiler range: between
    /// cuProfilerStart and cuProfilerStop, after waiting for the work queued before it and
    /// before returning, so that a profiler started with `--profile-from-start off` (Nsight
    /// Compute, Nsight Systems) records exactly the kernels `work` queues. On the emulator it
    /// only runs `work`.
    pub fn profiled(&self, work: impl FnOnce() -> Result<()>) -> Result<()> {
        use cudarc::driver::sys;
        let Backend::Cuda(c) = &self.backend else { return work() };
        let check = |r: CuErr, what: &str| match r {
            CuErr::CUDA_SUCCESS => Ok(()),
            e => Err(Error::cuda(what, DriverError(e))),
        };
        self.synchronize()?;
        c.ctx.bind_to_thread().map_err(|e| Error::cuda("binding the CUDA context", e))?;
        // SAFETY: plain driver calls on the bound, live context.
        check(unsafe { sys::cuProfilerStart() }, "starting the profiler range (cuProfilerStart)")?;
        let done = work().and_then(|()| self.synchronize());
        // SAFETY: as above; the range is closed whether or not the work succeeded.
        let stopped = check(unsafe { sys::cuProfilerStop() }, "ending the profiler range (cuProfilerStop)");
        done.and(stopped)
    }

    /// The most memory the allocation pool has had in use since the context was created, in
    /// bytes (the analogue of PyTorch's `max_memory_reserved`), if the driver reports it.
    pub fn peak_pool_bytes(&self) -> Option<u64> {
        use cudarc::driver::sys;
        let Backend::Cuda(c) = &self.backend else { return None };
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut high = 0u64;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: as in keep_pool_memory.
        let ok = unsafe {
            c.ctx.bind_to_thread().is_ok()
                && sys::cuDeviceGetDefaultMemPool(&mut pool, c.ctx.cu_device()) == CuErr::CUDA_SUCCESS
                && sys::cuMemPoolGetAttribute(pool, attr, &mut high as *mut u64 as *mut _) == CuErr::CUDA_SUCCESS
        };
        ok.then_some(high)
    }
}

/// Buffers come from the device's default stream-ordered pool (cuMemAllocAsync). By default
/// the pool hands freed memory back to the driver at every synchronisation, so the next step
/// would map it again; a release threshold of "never" keeps it cached, as PyTorch's allocator
/// does. Best effort: without it everything still works, only slower.
fn keep_pool_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver queries on a live context; the pointers outlive the calls.
    unsafe {
        if ctx.bind_to_thread().is_ok()
            && sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == CuErr::CUDA_SUCCESS
        {
            let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
            sys::cuMemPoolSetAttribute(pool, attr, &mut threshold as *mut u64 as *mut _);
        }
    }
}

/// The CUDA version the driver supports, e.g. "13.0" ("unknown" if it cannot say). Call it once
/// a `Gpu` is open: the driver library is loaded by then.
pub fn driver_version() -> String {
    let mut v = 0i32;
    // SAFETY: writes one int; the driver library is loaded (see above).
    let ok = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if ok == CuErr::CUDA_SUCCESS {
        format!("{}.{}", v / 1000, (v % 1000) / 10)
    } else {
        "unknown".into()
    }
}

/// Launches a kernel on a device's stream and checks the launch (on the emulator: runs it).
///
/// `launch!(gpu, Module::Relu, "relu_fwd_f32", cfg, &x, &mut y, &n)`: the arguments must
/// mirror the kernel's parameter list in `kernels/<module>.cu`, in order and type.
#[macro_export]
macro_rules! launch {
    ($gpu:expr, $module:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let gpu: &$crate::device::Gpu = $gpu;
        let cfg: cudarc::driver::LaunchConfig = $cfg;
        if gpu.is_emu() {
            let args = [$( $crate::device::EmuArg::emu_ptr(&$arg) ),+];
            gpu.emu_launch($module, $name, cfg, &args)
        } else {
            let func = gpu.function($module, $name)?;
            let mut builder = gpu.stream().launch_builder(&func);
            $( builder.arg($arg); )+
            // SAFETY: the argument list mirrors the kernel signature (see the kernel's .cu file).
            let launched = unsafe { builder.launch(cfg) };
            gpu.check_launch($name, launched.map(|_| ()))
        }
    }};
}

/// The launch of a per-plane kernel (max-pool, average pooling): grid x over `planes` planes,
/// grid y over one plane's `elems` elements, blocks of up to 256 threads (fewer, in whole warps,
/// for small planes), both capped at CUDA's limits (the kernels loop over what the grid leaves).
pub fn grid_planes(planes: usize, elems: u32) -> cudarc::driver::LaunchConfig {
    let threads = elems.div_ceil(32).clamp(1, 8) * 32;
    let grid_y = elems.div_ceil(threads).clamp(1, 65535);
    let grid_x = (planes as u64).clamp(1, (1 << 31) - 1) as u32;
    cudarc::driver::LaunchConfig { grid_dim: (grid_x, grid_y, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// A 1-D launch of `threads`-wide blocks covering `n` items.
pub fn grid_1d(n: usize, threads: u32) -> cudarc::driver::LaunchConfig {
    let blocks = n.div_ceil(threads as usize).max(1) as u32;
    cudarc::driver::LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/` holding the given files (path relative to it, contents), removed on drop.
    struct FakeRoot(PathBuf);

    impl FakeRoot {
        fn new(test: &str, files: &[(&str, &str)]) -> FakeRoot {
            let root = std::env::temp_dir().join(format!("ptxgrad-unit-{}-{test}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for (path, text) in files {
                let path = root.join(path);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, text).unwrap();
            }
            std::fs::create_dir_all(&root).unwrap();
            FakeRoot(root)
        }
    }

    impl Drop for FakeRoot {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const MEMINFO: &str = "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n";
    const GB8: u64 = 8_000_000 * 1024;

    #[test]
    fn meminfo_available_and_its_fallback() {
        assert_eq!(meminfo_available(MEMINFO), Some(GB8));
        let old = "MemTotal: 100 kB\nMemFree: 10 kB\nBuffers: 2 kB\nCached: 3 kB\n";
        assert_eq!(meminfo_available(old), Some(15 * 1024));
        for odd in
            ["", "MemAvailable:", "MemAvailable: lots kB", "MemAvailable: 5 MB", "MemAvailable 5 kB", "\0\u{fffd}"]
        {
            assert_eq!(meminfo_available(odd), None, "{odd:?}");
        }
        // Overflow is unknown, not a wrapped small number.
        assert_eq!(meminfo_available(&format!("MemAvailable: {} kB", u64::MAX)), None);
    }

    #[test]
    fn no_proc_no_figure() {
        let root = FakeRoot::new("empty", &[]);
        assert_eq!(host_memory_available_under(&root.0), None);
    }

    #[test]
    fn cgroup_v2_limits_of_the_group_and_its_parents() {
        let files = [
            ("proc/meminfo", MEMINFO),
            ("proc/self/cgroup", "0::/outer/inner\n"),
            // The mount's own group: a limit, far away.
            ("sys/fs/cgroup/memory.max", "100000000000\n"),
            ("sys/fs/cgroup/memory.current", "1000\n"),
            // The parent: the tightest, 1 MB of which 400 kB used, 100 kB of it reclaimable cache.
            ("sys/fs/cgroup/outer/memory.max", "1000000\n"),
            ("sys/fs/cgroup/outer/memory.current", "400000\n"),
            ("sys/fs/cgroup/outer/memory.stat", "anon 300000\ninactive_file 100000\nactive_file 0\n"),
            // The process's own group: no limit.
            ("sys/fs/cgroup/outer/inner/memory.max", "max\n"),
            ("sys/fs/cgroup/outer/inner/memory.current", "5\n"),
        ];
        let root = FakeRoot::new("v2", &files);
        assert_eq!(host_memory_available_under(&root.0), Some(700_000));
        // Without limits the kernel's figure stands.
        let root = FakeRoot::new("v2-max", &[files[0], files[1], ("sys/fs/cgroup/memory.max", "max")]);
        assert_eq!(host_memory_available_under(&root.0), Some(GB8));
        // Over the limit: nothing left, not an underflow.
        let root = FakeRoot::new(
            "v2-over",
            &[files[0], ("sys/fs/cgroup/memory.max", "1000"), ("sys/fs/cgroup/memory.current", "5000")],
        );
        assert_eq!(host_memory_available_under(&root.0), Some(0));
    }

    #[test]
    fn cgroup_v1_memory_controller() {
        let files = [
            ("proc/meminfo", MEMINFO),
            ("proc/self/cgroup", "5:cpu,cpuacct:/\n4:memory:/job\n0::/\n"),
            ("sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n"),
            ("sys/fs/cgroup/memory/memory.usage_in_bytes", "4000000000\n"),
            ("sys/fs/cgroup/memory/job/memory.limit_in_bytes", "2000000\n"),
            ("sys/fs/cgroup/memory/job/memory.usage_in_bytes", "500000\n"),
            ("sys/fs/cgroup/memory/job/memory.stat", "cache 10\ninactive_file 1\ntotal_inactive_file 50000\n"),
        ];
        let root = FakeRoot::new("v1", &files);
        assert_eq!(host_memory_available_under(&root.0), Some(1_550_000));
    }

    #[test]
    fn odd_cgroup_contents_do_not_panic() {
        let odd = ["", "max", "-5", "abc", "99999999999999999999999999", "1e9", "\0", " 12 34"];
        for (i, text) in odd.iter().enumerate() {
            for groups in ["", "0::", "0::/../..", "garbage", ":::", "4:memory:", "4:memory:/a/../b", "0::/a\n0::/b"] {
                let root = FakeRoot::new(
                    &format!("odd-{i}"),
                    &[
                        ("proc/meminfo", MEMINFO),
                        ("proc/self/cgroup", groups),
                        ("sys/fs/cgroup/memory.max", text),
                        ("sys/fs/cgroup/memory.current", text),
                        ("sys/fs/cgroup/memory.stat", text),
                        ("sys/fs/cgroup/memory/memory.limit_in_bytes", text),
                        ("sys/fs/cgroup/memory/memory.usage_in_bytes", text),
                    ],
                );
                let got = host_memory_available_under(&root.0).expect("meminfo is readable");
                assert!(got <= GB8, "{text:?} / {groups:?}: {got}");
            }
        }
    }
}
