//! ptxgrad's CUDA kernels, compiled from the same `kernels/*.cu` source as host C++ and run on
//! the CPU: blocks one after another, each CUDA thread a fiber, real barriers for
//! `__syncthreads` and warp shuffles (see `cuda_host.h` and `launch.cpp`). It checks a kernel's logic (indexing,
//! bounds, parameter layouts, the shared-memory pipeline's ordering) on machines without a GPU;
//! it says nothing about speed, and it is slow: keep shapes small.
//!
//! The way in is [`call`]: a kernel by name, from the table of every kernel that build.rs makes
//! from the sources ([`KERNELS`]), with a CUDA-style argument array. It is how the engine's `emu`
//! device launches every kernel, the tests' included; [`launch`] runs a closure on a grid, and
//! is what `call` is made of.

use std::ffi::c_void;

/// Unpacks an argument array (one pointer per kernel argument) and calls one kernel.
pub type Trampoline = unsafe extern "C" fn(*const *mut c_void);

/// One kernel of kernels/*.cu.
pub struct Kernel {
    pub name: &'static str,
    /// The stem of the file that defines it: its module on a GPU.
    pub module: &'static str,
    /// The most threads per block a GPU launches it with (its `__launch_bounds__`, else 1024).
    pub max_threads: u32,
    pub run: Trampoline,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

extern "C" {
    fn ptxgrad_emu_run(
        gx: u32,
        gy: u32,
        gz: u32,
        threads: u32,
        body: extern "C" fn(*mut c_void),
        ctx: *mut c_void,
    ) -> *const std::ffi::c_char;
    fn ptxgrad_emu_vec4_copies() -> u64;
    fn ptxgrad_emu_vec_stores() -> u64;
    fn ptxgrad_emu_poison(p: *const c_void, bytes: usize, poison: i32);
    fn ptxgrad_emu_set_reverse(reverse: i32) -> i32;
}

/// The order in which the emulator runs a block's threads between two barriers, and a launch's
/// blocks, for the launches made from the calling OS thread (see launch.cpp). A GPU promises no
/// order; a kernel whose result depends on it has a race, and gives different results under the
/// two schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Ascending thread and block index (the default).
    Forward,
    /// Descending thread and block index (the default of every thread when
    /// `PTXGRAD_EMU_SCHEDULE` is `reverse`).
    Reverse,
}

/// Sets the calling OS thread's schedule; returns the previous one.
pub fn set_schedule(schedule: Schedule) -> Schedule {
    // SAFETY: sets a thread-local flag.
    let previous = unsafe { ptxgrad_emu_set_reverse((schedule == Schedule::Reverse) as i32) };
    if previous != 0 {
        Schedule::Reverse
    } else {
        Schedule::Forward
    }
}

/// Marks `bytes` bytes at `p` unaddressable (`poison`) or addressable again for
/// AddressSanitizer, when the emulator is built with it (PTXGRAD_EMU_ASAN=1): an emulated kernel
/// that touches poisoned memory stops the process with a report. Otherwise does nothing.
///
/// # Safety
/// The range must lie in one live allocation of the caller's, and be unpoisoned before it is
/// freed or used by Rust code.
pub unsafe fn poison(p: *const c_void, bytes: usize, poison: bool) {
    // SAFETY: as the caller promises.
    unsafe { ptxgrad_emu_poison(p, bytes, poison as i32) }
}

/// How many 16-byte `cp.async` copies (the GEMM core's vector loads) the kernels launched from
/// this thread have made so far: tests read it before and after a launch to check that a kernel
/// takes its fast path where it should.
pub fn vec4_copies() -> u64 {
    // SAFETY: reads a thread-local counter.
    unsafe { ptxgrad_emu_vec4_copies() }
}

/// How many paired 8-byte stores (2 consecutive floats: the GEMM epilogues' fast path) the kernels
/// launched from this thread have made so far; read like `vec4_copies`.
pub fn vec_stores() -> u64 {
    // SAFETY: reads a thread-local counter.
    unsafe { ptxgrad_emu_vec_stores() }
}

/// The limits a GPU puts on a launch's shape (every CUDA GPU since compute capability 3.0):
/// checked here so that a launch the emulator runs is one a GPU accepts.
const MAX_GRID: (u32, u32, u32) = ((1 << 31) - 1, 65535, 65535);
const MAX_BLOCK: u32 = 1024;

/// Why a GPU would refuse a launch of `grid` blocks of `threads` threads, if it would.
pub fn check_launch_shape(grid: (u32, u32, u32), threads: u32) -> Result<(), String> {
    if threads == 0 || threads > MAX_BLOCK {
        return Err(format!("{threads} threads per block: a GPU takes 1 to {MAX_BLOCK}"));
    }
    let ok = |n: u32, max: u32| (1..=max).contains(&n);
    if !(ok(grid.0, MAX_GRID.0) && ok(grid.1, MAX_GRID.1) && ok(grid.2, MAX_GRID.2)) {
        return Err(format!(
            "a grid of {grid:?} blocks: a GPU takes 1 to {} in x and 1 to {} in y and z",
            MAX_GRID.0, MAX_GRID.1
        ));
    }
    Ok(())
}

/// Runs `kernel` (a closure that calls one emulated kernel) as every thread of a `grid` of
/// 1-D blocks of `threads` threads, like a launch followed by a synchronisation. Runs on the
/// calling thread; concurrent launches from several threads are independent.
///
/// Errors where a GPU would fail the launch: a shape outside its limits, or a kernel that broke
/// a rule it enforces (a misaligned 16-byte copy).
pub fn launch(grid: (u32, u32, u32), threads: u32, kernel: &(dyn Fn() + Sync)) -> Result<(), String> {
    extern "C" fn trampoline(ctx: *mut c_void) {
        // SAFETY: ctx is the &&dyn Fn passed below, alive for the whole (blocking) run.
        let f = unsafe { &*(ctx as *const &(dyn Fn() + Sync)) };
        f();
    }
    check_launch_shape(grid, threads)?;
    let ctx: &&(dyn Fn() + Sync) = &kernel;
    // SAFETY: ptxgrad_emu_run calls trampoline(ctx) from threads it joins before returning.
    let fault = unsafe { ptxgrad_emu_run(grid.0, grid.1, grid.2, threads, trampoline, ctx as *const _ as *mut c_void) };
    if fault.is_null() {
        Ok(())
    } else {
        // SAFETY: a string literal of the kernels' source (emu_fault's argument).
        Err(unsafe { std::ffi::CStr::from_ptr(fault) }.to_string_lossy().into_owned())
    }
}

/// Kernel `name`, if kernels/*.cu defines it.
pub fn find(name: &str) -> Option<&'static Kernel> {
    KERNELS.iter().find(|k| k.name == name)
}

/// Runs kernel `name` of module `module` (a kernels/ file stem) on a `grid` of `threads`-thread
/// blocks with `args`, one pointer per kernel argument pointing at its value (a device pointer's
/// value is a host address here). Fails as a GPU launch would: a kernel that is not in that
/// module, more threads than its launch bounds, a grid beyond the limits, or a misaligned copy.
///
/// # Safety
/// `args` must match the kernel's parameter list in number and types, and every buffer the
/// kernel touches must be valid for what it reads and writes, as for a CUDA launch.
pub unsafe fn call(
    module: &str,
    name: &str,
    grid: (u32, u32, u32),
    threads: u32,
    args: &[*mut c_void],
) -> Result<(), String> {
    let k = find(name).ok_or_else(|| format!("no kernel `{name}` in kernels/*.cu"))?;
    if k.module != module {
        return Err(format!("kernel `{name}` is in module `{}` (kernels/{0}.cu), not in `{module}`", k.module));
    }
    if threads > k.max_threads {
        return Err(format!(
            "kernel `{name}` launched with {threads} threads per block; its launch bounds allow {}",
            k.max_threads
        ));
    }
    let args = args.as_ptr() as usize; // raw pointers are not Sync; the array outlives the launch
    let run = k.run;
    launch(grid, threads, &|| {
        // SAFETY: as the caller promises.
        unsafe { run(args as *const *mut c_void) }
    })
    .map_err(|e| format!("kernel `{name}`: {e}"))
}
