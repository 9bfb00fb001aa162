//! ptxgrad's CUDA kernels, compiled from the same `kernels/*.cu` source as host C++ and run on
//! CPU threads: one OS thread per CUDA thread, blocks one after another, real barriers for
//! `__syncthreads` and warp shuffles (see `cuda_host.h`). It checks a kernel's logic (indexing,
//! bounds, parameter layouts, the shared-memory pipeline's ordering) on machines without a GPU;
//! it says nothing about speed, and it is slow: keep shapes small.
//!
//! The kernels are `extern "C"` symbols of the static library this crate builds; a test declares
//! the ones it calls in an `extern "C"` block with the engine's own `#[repr(C)]` parameter types
//! (so the C++ sees exactly what the GPU would) and runs them with [`launch`].

use std::ffi::c_void;

extern "C" {
    fn ptxgrad_emu_run(gx: u32, gy: u32, gz: u32, threads: u32, body: extern "C" fn(*mut c_void), ctx: *mut c_void);
}

/// Runs `kernel` (a closure that calls one emulated kernel) as every thread of a `grid` of
/// 1-D blocks of `threads` threads, like a launch followed by a synchronisation.
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
