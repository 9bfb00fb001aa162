// The launcher of the host emulation (see cuda_host.h): runs a grid of 1-D blocks, one OS thread
// per CUDA thread, blocks in order, with real barriers for __syncthreads and warp shuffles.
#include <barrier>
#include <memory>
#include <thread>
#include <vector>

#include "cuda_host.h"

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {
struct Warp {
    std::barrier<> bar;
    unsigned slots[32];
    explicit Warp(std::ptrdiff_t lanes) : bar(lanes), slots{} {}
};
thread_local std::barrier<>* tl_block = nullptr;
thread_local Warp* tl_warp = nullptr;
}  // namespace

void __syncthreads() { tl_block->arrive_and_wait(); }

unsigned emu_shfl_xor_bits(unsigned bits, int lane_mask) {
    const unsigned lane = threadIdx.x % 32;
    tl_warp->slots[lane] = bits;
    tl_warp->bar.arrive_and_wait();  // every lane has written
    const unsigned got = tl_warp->slots[(lane ^ (unsigned)lane_mask) % 32];
    tl_warp->bar.arrive_and_wait();  // every lane has read before the next shuffle writes
    return got;
}

// Runs body(ctx) as every thread of every block of a (gx, gy, gz) grid of `threads`-thread blocks.
// body calls the kernel, which reads threadIdx & co. from this thread's thread_locals.
extern "C" void ptxgrad_emu_run(unsigned gx, unsigned gy, unsigned gz, unsigned threads, void (*body)(void*),
                                void* ctx) {
    std::barrier<> block(threads);
    std::vector<std::unique_ptr<Warp>> warps;
    for (unsigned w = 0; w * 32 < threads; ++w) warps.push_back(std::make_unique<Warp>((threads - w * 32 < 32u ? threads - w * 32 : 32u)));
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            threadIdx = dim3{t, 0, 0};
            blockDim = dim3{threads, 1, 1};
            gridDim = dim3{gx, gy, gz};
            tl_block = &block;
            tl_warp = warps[t / 32].get();
            for (unsigned z = 0; z < gz; ++z)
                for (unsigned y = 0; y < gy; ++y)
                    for (unsigned x = 0; x < gx; ++x) {
                        blockIdx = dim3{x, y, z};
                        body(ctx);
                        block.arrive_and_wait();  // the block is done before the next reuses __shared__
                    }
        });
    }
    for (auto& th : pool) th.join();
}
