// Kernels of the emulator's own tests (tests/emu.rs), compiled only into the emulator: each breaks
// one rule a GPU enforces, to check that the emulator fails the launch as the GPU would.
#include "../kernels/gemm.cuh"

// A 16-byte cp.async from `src` (the test passes a misaligned address).
PTX_KERNEL void emu_selftest_copy_f32x4(const float* src) {
    __shared__ __align__(16) float tile[4];
    cp_async_f32x4(tile, src, true);
    cp_async_commit();
    cp_async_wait<0>();
}
