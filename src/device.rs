//! The CUDA runtime: one context and one stream per device, kernel modules loaded once and
//! cached, checked launches, and errors that say what happened.
//!
//! All work goes to a single stream per device, so kernels run in launch order and a tensor
//! is never read before the kernel writing it has finished. cudarc's per-buffer event tracking
//! (for multi-stream use) is therefore switched off: it would add two events per launch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    result::DriverError, sys::cudaError_enum as CuErr, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream,
    DeviceRepr, ValidAsZeroBits,
};

use crate::error::{Error, Result};
use crate::pool::{BufferPool, PoolStats};
use crate::ptx::{self, Module};

/// Where a tensor lives and where its ops run.
#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<Gpu>),
}

impl Device {
    /// `cpu`, `cuda`, `cuda:N`, or `auto` (cuda:0 when a GPU can be used, else cpu).
    pub fn parse(spec: &str) -> Result<Device> {
        match spec {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Gpu::get(0).map(Device::Cuda).unwrap_or(Device::Cpu)),
            "cuda" => Ok(Device::Cuda(Gpu::get(0)?)),
            s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(Gpu::get(n)?)),
                _ => Err(Error::Data(format!("unknown device `{s}`: expected cpu, cuda, cuda:N or auto"))),
            },
        }
    }

    /// `cpu` or `cuda:N`.
    pub fn label(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
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
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}

/// One CUDA device: its context, its stream, and the kernels loaded on it.
pub struct Gpu {
    pub ordinal: usize,
    pub name: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: Mutex<HashMap<(Module, &'static str), CudaFunction>>,
    modules: Mutex<HashMap<Module, Arc<CudaModule>>>,
    /// PTXGRAD_SYNC_LAUNCHES=1: synchronise after every launch, so that a faulting kernel is
    /// named in the error instead of surfacing at some later copy.
    sync_launches: bool,
    /// Dropped buffers, reused by the next request of the same type and length (see pool.rs).
    pool: Arc<BufferPool>,
}

/// A device buffer that goes back to its GPU's buffer cache when dropped (instead of being
/// freed), so that steady-state training allocates nothing. Derefs to cudarc's CudaSlice and is
/// passed to kernels as one.
pub struct DeviceBuf<T: Elem> {
    // Some until dropped.
    buf: Option<CudaSlice<T>>,
    pool: Arc<BufferPool>,
}

impl<T: Elem> std::ops::Deref for DeviceBuf<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        self.buf.as_ref().expect("present until drop")
    }
}

impl<T: Elem> std::ops::DerefMut for DeviceBuf<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        self.buf.as_mut().expect("present until drop")
    }
}

impl<T: Elem> Drop for DeviceBuf<T> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give(buf.len(), buf.len() * std::mem::size_of::<T>(), buf);
        }
    }
}

// SAFETY: delegates to cudarc's impls for &CudaSlice / &mut CudaSlice, which push the buffer's
// device pointer (it lives as long as the borrow of the DeviceBuf).
unsafe impl<'a, 'b: 'a, T: Elem> cudarc::driver::PushKernelArg<&'b DeviceBuf<T>> for cudarc::driver::LaunchArgs<'a> {
    fn arg(&mut self, arg: &'b DeviceBuf<T>) -> &mut Self {
        let slice: &'b CudaSlice<T> = arg;
        self.arg(slice)
    }
}

// SAFETY: as above.
unsafe impl<'a, 'b: 'a, T: Elem> cudarc::driver::PushKernelArg<&'b mut DeviceBuf<T>>
    for cudarc::driver::LaunchArgs<'a>
{
    fn arg(&mut self, arg: &'b mut DeviceBuf<T>) -> &mut Self {
        let slice: &'b mut CudaSlice<T> = arg;
        self.arg(slice)
    }
}

/// Element types that live in device buffers.
pub trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + std::fmt::Debug + 'static {}
impl Elem for f32 {}
impl Elem for u32 {}
impl Elem for u8 {}

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
        Ok(Gpu {
            ordinal,
            name,
            ctx,
            stream,
            functions: Mutex::default(),
            modules: Mutex::default(),
            sync_launches: std::env::var("PTXGRAD_SYNC_LAUNCHES").is_ok_and(|v| v == "1"),
            pool,
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A kernel function, loading its module on first use.
    pub fn function(&self, module: Module, name: &'static str) -> Result<CudaFunction> {
        let mut fns = self.functions.lock().unwrap_or_else(|p| p.into_inner());
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
        let mut mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = mods.get(&module) {
            return Ok(m.clone());
        }
        let src = module.ptx().ok_or_else(|| {
            Error::NoCuda(format!("kernel module `{}` was not compiled into this build", module.stem()))
        })?;
        let m = self.ctx.load_module(cudarc::nvrtc::Ptx::from_src(src)).map_err(|e| {
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
        })?;
        mods.insert(module, m.clone());
        Ok(m)
    }

    /// Checks a launch's result; with PTXGRAD_SYNC_LAUNCHES=1 also waits for the kernel, so
    /// that a fault is reported against the kernel that caused it.
    pub fn check_launch(&self, kernel: &str, launched: std::result::Result<(), DriverError>) -> Result<()> {
        launched.map_err(|e| Error::cuda(format!("launching `{kernel}`"), e))?;
        if self.sync_launches {
            self.stream.synchronize().map_err(|e| Error::cuda(format!("running `{kernel}`"), e))?;
        }
        Ok(())
    }

    /// Waits for all queued work on this device.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| {
            Error::cuda(
                "waiting for the GPU (a kernel may have faulted; rerun with PTXGRAD_SYNC_LAUNCHES=1 to name it)",
                e,
            )
        })
    }

    fn oom_or(&self, bytes: usize, e: DriverError, what: &str) -> Error {
        if e.0 == CuErr::CUDA_ERROR_OUT_OF_MEMORY {
            let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
            Error::OutOfMemory { bytes, free, total }
        } else {
            Error::cuda(what.to_string(), e)
        }
    }

    /// A buffer of `len` elements from the cache, else a fresh one from the driver's pool; after
    /// an out-of-memory error the cache is emptied and the allocation tried once more.
    fn take<T: Elem>(&self, len: usize, what: &str) -> Result<DeviceBuf<T>> {
        let wrap = |buf| DeviceBuf { buf: Some(buf), pool: self.pool.clone() };
        if let Some(buf) = self.pool.take::<CudaSlice<T>>(len) {
            return Ok(wrap(buf));
        }
        let bytes = len * std::mem::size_of::<T>();
        // SAFETY: T is plain data (Elem); every caller writes the buffer before it is read.
        let alloc = || unsafe { self.stream.alloc::<T>(len) };
        match alloc() {
            Ok(buf) => Ok(wrap(buf)),
            Err(e) if e.0 == CuErr::CUDA_ERROR_OUT_OF_MEMORY => {
                self.pool.clear();
                alloc().map(wrap).map_err(|e| self.oom_or(bytes, e, what))
            }
            Err(e) => Err(self.oom_or(bytes, e, what)),
        }
    }

    /// A zero-filled buffer of `len` elements.
    pub fn zeros<T: Elem>(&self, len: usize) -> Result<DeviceBuf<T>> {
        let mut buf = self.take::<T>(len, "allocating device memory")?;
        self.stream.memset_zeros(&mut *buf).map_err(|e| Error::cuda("zeroing a buffer on the GPU", e))?;
        Ok(buf)
    }

    /// A buffer of `len` elements whose contents are unspecified: only for outputs that the
    /// next kernel writes in full.
    pub fn uninit<T: Elem>(&self, len: usize) -> Result<DeviceBuf<T>> {
        self.take::<T>(len, "allocating device memory")
    }

    /// A buffer of `len` copies of `value`, set on the device (a 32-bit memset: no kernel and
    /// no host copy).
    pub fn full_f32(&self, len: usize, value: f32) -> Result<DeviceBuf<f32>> {
        use cudarc::driver::DevicePtrMut as _;
        let mut buf = self.uninit::<f32>(len)?;
        let (ptr, _sync) = buf.device_ptr_mut(&self.stream);
        // SAFETY: `ptr` addresses `len` f32 (4-byte) elements of a live buffer on this stream.
        let res = unsafe { cudarc::driver::sys::cuMemsetD32Async(ptr, value.to_bits(), len, self.stream.cu_stream()) };
        if res != CuErr::CUDA_SUCCESS {
            return Err(Error::cuda("filling a buffer on the GPU", DriverError(res)));
        }
        drop(_sync);
        Ok(buf)
    }

    /// Host -> device copy.
    pub fn upload<T: Elem>(&self, host: &[T]) -> Result<DeviceBuf<T>> {
        let mut buf = self.take::<T>(host.len(), "allocating device memory for a copy to the GPU")?;
        self.stream.memcpy_htod(host, &mut *buf).map_err(|e| Error::cuda("copying to the GPU", e))?;
        Ok(buf)
    }

    /// Device -> host copy (waits for the stream).
    pub fn download<T: Elem>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(dev).map_err(|e| {
            Error::cuda(
                "copying from the GPU (a kernel may have faulted; rerun with PTXGRAD_SYNC_LAUNCHES=1 to name it)",
                e,
            )
        })
    }

    /// Device -> device copy into a new buffer.
    pub fn duplicate<T: Elem>(&self, src: &CudaSlice<T>) -> Result<DeviceBuf<T>> {
        let mut buf = self.take::<T>(src.len(), "allocating device memory for a copy")?;
        self.stream.memcpy_dtod(src, &mut *buf).map_err(|e| Error::cuda("copying on the GPU", e))?;
        Ok(buf)
    }

    /// The buffer cache's counters: after the first training step, `fresh` stays put.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Runs `work` (which queues kernels on this device) and returns the GPU time it took, in
    /// milliseconds, measured with CUDA events around it (waits for the work to finish).
    pub fn time_ms(&self, work: impl FnOnce() -> Result<()>) -> Result<f32> {
        let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let event = || self.ctx.new_event(timing).map_err(|e| Error::cuda("creating a CUDA event", e));
        let (start, end) = (event()?, event()?);
        start.record(&self.stream).map_err(|e| Error::cuda("recording a CUDA event", e))?;
        work()?;
        end.record(&self.stream).map_err(|e| Error::cuda("recording a CUDA event", e))?;
        start.elapsed_ms(&end).map_err(|e| Error::cuda("timing with CUDA events (a kernel may have faulted)", e))
    }

    /// The most memory the allocation pool has had in use since the context was created, in
    /// bytes (the analogue of PyTorch's `max_memory_allocated`), if the driver reports it.
    pub fn peak_pool_bytes(&self) -> Option<u64> {
        use cudarc::driver::sys;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut high = 0u64;
        let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: as in keep_pool_memory.
        let ok = unsafe {
            self.ctx.bind_to_thread().is_ok()
                && sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()) == CuErr::CUDA_SUCCESS
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

fn driver_version() -> String {
    let mut v = 0i32;
    // SAFETY: writes one int; only called after the driver was loaded.
    let ok = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if ok == CuErr::CUDA_SUCCESS {
        format!("{}.{}", v / 1000, (v % 1000) / 10)
    } else {
        "unknown".into()
    }
}

/// Launches a kernel on a device's stream and checks the launch.
///
/// `launch!(gpu, Module::Relu, "relu_fwd_f32", cfg, &x, &mut y, &n)`: the arguments must
/// mirror the kernel's parameter list in `kernels/<module>.cu`, in order and type.
#[macro_export]
macro_rules! launch {
    ($gpu:expr, $module:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let gpu: &$crate::device::Gpu = $gpu;
        let func = gpu.function($module, $name)?;
        let mut builder = gpu.stream().launch_builder(&func);
        $( builder.arg($arg); )+
        let cfg: cudarc::driver::LaunchConfig = $cfg;
        // SAFETY: the argument list mirrors the kernel signature (see the kernel's .cu file).
        let launched = unsafe { builder.launch(cfg) };
        gpu.check_launch($name, launched.map(|_| ()))
    }};
}

/// A 1-D launch of `threads`-wide blocks covering `n` items.
pub fn grid_1d(n: usize, threads: u32) -> cudarc::driver::LaunchConfig {
    let blocks = n.div_ceil(threads as usize).max(1) as u32;
    cudarc::driver::LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}
