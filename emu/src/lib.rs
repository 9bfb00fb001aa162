//! ptxgrad's CUDA kernels, compiled from the same `kernels/*.cu` source as host C++ and run on
//! the CPU: blocks one after another, each CUDA thread a fiber, real barriers for
//! `__syncthreads` and warp shuffles (see `cuda_host.h` and `launch.cpp`). It checks a kernel's logic (indexing,
//! bounds, parameter layouts, the shared-memory pipeline's ordering) on machines without a GPU;
//! it says nothing about speed, and it is slow: keep shapes small.
//!
//! Two ways in: [`launch`] runs a closure that calls a kernel's `extern "C"` symbol directly
//! (tests declare the kernels they call with the engine's `#[repr(C)]` parameter types); [`call`]
//! runs a kernel by name with a CUDA-style argument array, which is how the engine's `emu`
//! device launches every kernel.

use std::ffi::c_void;

/// Unpacks an argument array (one pointer per kernel argument) and calls one kernel.
pub type Trampoline = unsafe extern "C" fn(*const *mut c_void);

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

extern "C" {
    fn ptxgrad_emu_run(gx: u32, gy: u32, gz: u32, threads: u32, body: extern "C" fn(*mut c_void), ctx: *mut c_void);
    fn ptxgrad_emu_vec4_copies() -> u64;
}

/// How many 16-byte `cp.async` copies (the GEMM core's vector loads) the kernels launched from
/// this thread have made so far: tests read it before and after a launch to check that a kernel
/// takes its fast path where it should.
pub fn vec4_copies() -> u64 {
    // SAFETY: reads a thread-local counter.
    unsafe { ptxgrad_emu_vec4_copies() }
}

/// Runs `kernel` (a closure that calls one emulated kernel) as every thread of a `grid` of
/// 1-D blocks of `threads` threads, like a launch followed by a synchronisation. Runs on the
/// calling thread; concurrent launches from several threads are independent.
pub fn launch(grid: (u32, u32, u32), threads: u32, kernel: &(dyn Fn() + Sync)) {
    extern "C" fn trampoline(ctx: *mut c_void) {
        // SAFETY: ctx is the &&dyn Fn passed below, alive for the whole (blocking) run.
        let f = unsafe { &*(ctx as *const &(dyn Fn() + Sync)) };
        f();
    }
    assert!(threads > 0 && grid.0 > 0 && grid.1 > 0 && grid.2 > 0, "empty launch");
    let ctx: &&(dyn Fn() + Sync) = &kernel;
    // SAFETY: ptxgrad_emu_run calls trampoline(ctx) from threads it joins before returning.
    unsafe { ptxgrad_emu_run(grid.0, grid.1, grid.2, threads, trampoline, ctx as *const _ as *mut c_void) }
}

/// The trampoline of kernel `name`, if kernels/*.cu defines it.
pub fn find(name: &str) -> Option<Trampoline> {
    KERNELS.iter().find(|(n, _)| *n == name).map(|&(_, t)| t)
}

/// Runs kernel `name` on a `grid` of `threads`-thread blocks with `args`, one pointer per
/// kernel argument pointing at its value (a device pointer's value is a host address here).
///
/// # Safety
/// `args` must match the kernel's parameter list in number and types, and every buffer the
/// kernel touches must be valid for what it reads and writes, as for a CUDA launch.
pub unsafe fn call(name: &str, grid: (u32, u32, u32), threads: u32, args: &[*mut c_void]) -> Result<(), String> {
    let t = find(name).ok_or_else(|| format!("no kernel `{name}` in kernels/*.cu"))?;
    let args = args.as_ptr() as usize; // raw pointers are not Sync; the array outlives the launch
                                       // SAFETY: as the caller promises.
    launch(grid, threads, &|| unsafe { t(args as *const *mut c_void) });
    Ok(())
}
