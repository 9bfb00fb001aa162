// Kernels of the emulator's own tests (tests/emu.rs), compiled only into the emulator: kernels that
// break a rule a GPU enforces, to check that the emulator fails the launch as the GPU would, and
// kernels that expose a device helper to a test.
#include "../kernels/gemm.cuh"

// A 16-byte cp.async from `src` (the test passes a misaligned address).
PTX_KERNEL void emu_selftest_copy_f32x4(const float* src) {
    PTX_SHARED_ARRAY(float, tile, 4);
    cp_async_f32x4(tile, src, true);
    cp_async_commit();
    cp_async_wait<0>();
}

// out[2t], out[2t + 1] = gemm.cuh's (grid_x(t), grid_y(t)) for each thread t of a 256-thread block.
PTX_KERNEL void emu_selftest_gemm_grid(int* out) {
    const int t = threadIdx.x;
    out[2 * t] = grid_x(t);
    out[2 * t + 1] = grid_y(t);
}

// cp.async ordering (one thread): out = [shared word 0 before any wait, words 0 and 1 after
// wait_group 1 with two groups committed, word 1 after a barrier, word 1 after wait_group 0].
PTX_KERNEL void emu_selftest_cp_async_order(const float* src, float* out) {
    PTX_SHARED_ARRAY(float, s, 2);
    s[0] = -1.0f;
    s[1] = -1.0f;
    cp_async_f32(&s[0], src, true);  // group 0
    cp_async_commit();
    cp_async_f32(&s[1], src + 1, true);  // group 1
    cp_async_commit();
    out[0] = s[0];
    cp_async_wait<1>();
    out[1] = s[0];
    out[2] = s[1];
    __syncthreads();
    out[3] = s[1];
    cp_async_wait<0>();
    out[4] = s[1];
}

// A race, or not: every thread writes its word of shared memory, then (with `barrier`, after a
// __syncthreads) reads its left neighbour's: out[t] = t - 1 for t > 0 (out[0] = 0). Without the
// barrier, thread t reads a word that thread t - 1 writes before the same barrier: ascending
// order happens to run the writer first, descending order does not (and reads the NaN that the
// block's shared memory starts with).
PTX_KERNEL void emu_selftest_left_neighbour(float* out, int barrier) {
    PTX_SHARED_ARRAY(float, s, 1024);
    const unsigned t = threadIdx.x;
    s[t] = (float)t;
    if (barrier) __syncthreads();
    out[t] = t > 0 ? s[t - 1] : 0.0f;
}

// A warp sum among the lanes that remain after lanes >= `live` of each warp return. A GPU's
// full-mask shuffle needs all 32 lanes, so the emulator fails the launch unless every warp is
// whole: live == 32 and a block of a multiple of 32 threads.
PTX_KERNEL void emu_selftest_warp_sum(float* out, int live) {
    if ((int)(threadIdx.x % 32) >= live) return;
    out[threadIdx.x] = warp_sum(1.0f);
}
