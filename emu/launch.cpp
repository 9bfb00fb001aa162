// The launcher of the host emulation (see cuda_host.h): runs a grid of 1-D blocks, blocks one
// after another, each CUDA thread of a block as a fiber (its own stack, switched in user space)
// on the calling OS thread. A fiber runs until it waits at __syncthreads or a warp shuffle, or
// ends; the scheduler resumes the waiters of a barrier once every live thread it concerns has
// arrived (the whole block for __syncthreads, the 32 lanes of a warp for a shuffle). Switching
// costs tens of nanoseconds on x86-64 (six registers and the stack pointer), so even a grid of
// 100,000 blocks runs in about a second.
//
// Two things a GPU leaves undefined are made hostile here, so that a kernel relying on them fails
// its tests instead of passing them by luck:
// - the order in which threads reach the next barrier, and blocks run: each round runs the ready
//   threads in ascending order, and blocks run in ascending order, or both descending with the
//   reverse schedule (PTXGRAD_EMU_SCHEDULE=reverse, or ptxgrad_emu_set_reverse). A read of a
//   word that another thread writes before the same barrier (or another block in the same
//   launch) returns the old value in one order and the new one in the other, so a race changes
//   the result between the two (CI runs the suite once in each);
// - the contents of shared memory when a block starts: every shared array (emu_shared) is NaN
//   then, so a read of a word nobody wrote, or before its copy landed, is a NaN.
#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda_host.h"

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

// A fiber's saved context and the switch between two. On x86-64: the stack pointer, with the
// callee-saved registers pushed on the fiber's own stack (ptxgrad_emu_switch). Elsewhere (or
// with PTXGRAD_EMU_UCONTEXT defined): POSIX ucontext, portable and a few times slower (it saves
// the signal mask with a system call).
#if defined(__x86_64__) && !defined(PTXGRAD_EMU_UCONTEXT)
#define PTXGRAD_EMU_ASM_SWITCH 1
// ptxgrad_emu_switch(&from_sp, to_sp): saves the callee-saved registers on the current stack,
// stores the stack pointer in *from_sp, and resumes the context saved at to_sp.
extern "C" void ptxgrad_emu_switch(void** from_sp, void* to_sp);
asm(R"(
.text
.globl ptxgrad_emu_switch
.type ptxgrad_emu_switch, @function
ptxgrad_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size ptxgrad_emu_switch, .-ptxgrad_emu_switch
)");
struct Context {
    void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { ptxgrad_emu_switch(&from.sp, to.sp); }
#else
#include <ucontext.h>
struct Context {
    ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

namespace {

enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Done };

constexpr size_t kStack = 1 << 20;  // per fiber, committed lazily; a guard page below it

// A cp.async the thread issued and has not waited for: its source was read at issue (global
// memory does not change during a kernel here), its destination is written at the wait that
// completes its group, as a GPU guarantees no earlier.
struct PendingCopy {
    float* dst;
    float vals[4];
    unsigned n;
    unsigned group;  // the commit group: the number of commits before the copy was issued
};

struct Fiber {
    Context ctx;
    char* stack = nullptr;  // the mapping: guard page, then kStack bytes
    State state = State::Done;
    std::vector<PendingCopy> copies;  // issued, not yet waited for
    unsigned commits = 0;             // cp.async groups committed
    unsigned mmas = 0;                // mma exchanges made (their parity picks the slot buffer)
    unsigned smem_claims = 0;         // shared arrays declared so far in this block
};

// One lane's operands of an emulated mma row (emu_mma_tf32_row, emu_mma_bf16_row: a BF16 row uses
// a[0..2) and b[j][0]).
constexpr unsigned kMaxMmaRow = 8;
struct MmaSlot {
    unsigned a[4];
    unsigned b[kMaxMmaRow][2];
};

struct Scheduler {
    std::vector<Fiber> fibers;  // one per CUDA thread of a block; stacks kept across launches
    bool reverse = false;       // run each round's ready threads in descending order
    // The running block's shared arrays (emu_shared), in declaration order, and the bytes they
    // take together (filled with NaN as each was first claimed).
    struct SmemArray {
        unsigned long long bytes, at;
    };
    std::vector<SmemArray> smem_arrays;
    unsigned long long smem_end = 0;
    Context home;               // the scheduler's own context while a fiber runs
    unsigned current = 0;
    unsigned warp_slots[1024 / 32][32];
    std::vector<MmaSlot> mma_slots;  // [2][1024 / 32][32], made at the first mma: see emu_mma_tf32_row
    void (*body)(void*) = nullptr;
    void* ctx = nullptr;
};
// PTXGRAD_EMU_SCHEDULE: unset or "forward", or "reverse"; anything else is refused, so that a
// misspelt setting does not silently run the default.
bool schedule_from_env() {
    const char* v = std::getenv("PTXGRAD_EMU_SCHEDULE");
    if (!v || !*v || std::strcmp(v, "forward") == 0) return false;
    if (std::strcmp(v, "reverse") == 0) return true;
    std::fprintf(stderr, "ptxgrad-emu: PTXGRAD_EMU_SCHEDULE is `%s`; expected `forward` or `reverse`\n", v);
    std::exit(2);
}

thread_local Scheduler sched = [] {
    Scheduler s;
    s.reverse = schedule_from_env();
    return s;
}();

void yield(State why) {
    Fiber& f = sched.fibers[sched.current];
    f.state = why;
    switch_context(f.ctx, sched.home);
}

// Where every fiber starts (entered by `ret` from the switch, with a call-aligned stack).
extern "C" [[noreturn]] void ptxgrad_emu_fiber_entry() {
    sched.body(sched.ctx);
    Fiber& f = sched.fibers[sched.current];
    f.state = State::Done;
    switch_context(f.ctx, sched.home);
    std::abort();  // a finished fiber is never resumed
}

// A fresh context on fiber t's stack whose first switch-in enters ptxgrad_emu_fiber_entry.
void prepare(Fiber& f) {
    if (!f.stack) {
        const size_t page = 4096;
        void* m = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "ptxgrad-emu: cannot map a fiber stack\n");
            std::abort();
        }
        mprotect(m, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
        f.stack = static_cast<char*>(m);
    }
#if PTXGRAD_EMU_ASM_SWITCH
    // Top of stack, 16-aligned; the entry address sits at top - 16 so that after `ret` the
    // stack pointer is top - 8, as at the entry of a called function. Below it, the six
    // registers the switch pops (zero).
    auto top = reinterpret_cast<uintptr_t>(f.stack + 4096 + kStack) & ~uintptr_t(15);
    auto* slot = reinterpret_cast<void**>(top - 16);
    *slot = reinterpret_cast<void*>(&ptxgrad_emu_fiber_entry);
    for (int i = 1; i <= 6; ++i) slot[-i] = nullptr;
    f.ctx.sp = slot - 6;
#else
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = f.stack + 4096;
    f.ctx.uc.uc_stack.ss_size = kStack;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, reinterpret_cast<void (*)()>(&ptxgrad_emu_fiber_entry), 0);
#endif
    f.state = State::Ready;
    f.copies.clear();  // a GPU's next block starts with fresh shared memory and no copies in flight
    f.commits = 0;
    f.mmas = 0;
    f.smem_claims = 0;
}

// Runs one block to completion.
void run_block(unsigned threads) {
    sched.smem_arrays.clear();
    sched.smem_end = 0;
    for (unsigned t = 0; t < threads; ++t) prepare(sched.fibers[t]);
    for (;;) {
        bool ran = false;
        for (unsigned i = 0; i < threads; ++i) {
            const unsigned t = sched.reverse ? threads - 1 - i : i;
            if (sched.fibers[t].state != State::Ready) continue;
            sched.current = t;
            threadIdx = dim3{t, 0, 0};
            switch_context(sched.home, sched.fibers[t].ctx);
            ran = true;
        }
        if (ran) continue;
        // Nobody can run: release a warp whose live lanes all wait at its exchange, else the
        // block if every live thread waits at __syncthreads. Our exchanges (full-mask shuffles,
        // mma.sync.aligned) need all 32 lanes on a GPU: one in a warp with lanes that have
        // exited, or that a block of threads % 32 != 0 does not have, is a fault (released
        // anyway, so that the launch ends and reports it).
        bool released = false, live = false, all_at_block = true;
        for (unsigned w = 0; w * 32 < threads; ++w) {
            bool any = false, all = true, whole = w * 32 + 32 <= threads;
            for (unsigned t = w * 32; t < threads && t < w * 32 + 32; ++t) {
                const State s = sched.fibers[t].state;
                if (s == State::Done) {
                    whole = false;
                    continue;
                }
                any = true;
                all = all && s == State::AtWarpBarrier;
            }
            if (any && all) {
                if (!whole) emu_fault("a warp exchange (shuffle or mma) without all 32 lanes of the warp");
                for (unsigned t = w * 32; t < threads && t < w * 32 + 32; ++t)
                    if (sched.fibers[t].state == State::AtWarpBarrier) sched.fibers[t].state = State::Ready;
                released = true;
            }
        }
        if (released) continue;
        for (unsigned t = 0; t < threads; ++t) {
            const State s = sched.fibers[t].state;
            if (s == State::Done) continue;
            live = true;
            all_at_block = all_at_block && s == State::AtBlockBarrier;
        }
        if (!live) return;
        if (!all_at_block) {
            std::fprintf(stderr, "ptxgrad-emu: deadlock: threads wait at different barriers\n");
            std::abort();
        }
        for (unsigned t = 0; t < threads; ++t)
            if (sched.fibers[t].state == State::AtBlockBarrier) sched.fibers[t].state = State::Ready;
    }
}

}  // namespace

void __syncthreads() { yield(State::AtBlockBarrier); }

unsigned emu_shfl_xor_bits(unsigned bits, int lane_mask) {
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    sched.warp_slots[warp][lane] = bits;
    yield(State::AtWarpBarrier);  // every lane has written
    const unsigned got = sched.warp_slots[warp][(lane ^ (unsigned)lane_mask) % 32];
    yield(State::AtWarpBarrier);  // every lane has read before the next shuffle writes
    return got;
}

// mma.sync.aligned.m16n8k8.row.col.f32.<type>.<type>.f32, n times with one A: every lane deposits
// its fragments, waits for the warp, then computes its own 4 x n results from everyone's
// fragments, by the PTX ISA's layout (lane = 4 g + t): result i of lane 4 g + t is C (g + 8 (i >= 2),
// 2 t + i % 2); `a_at(slots, r, k)` and `b_at(slots, j, k, c)` read element (row r, k) of A and
// (k, col c) of B[j] from the deposited registers, as doubles. Products of two TF32 (or BF16)
// values are exact in fp32; the emulator adds the 8 of them and the accumulator in double and
// rounds once (a GPU's order and intermediate rounding differ: tests compare with tolerances).
// The slots are double-buffered, so one wait suffices: a lane that has read call c's slots and
// writes call c+1's cannot reach call c+2 (which reuses call c's buffer) before every lane of
// the warp has arrived at call c+1, i.e. finished reading call c.
template <class AAt, class BAt>
static void mma_row(float* d, const unsigned* a, unsigned a_regs, const unsigned* b, unsigned b_regs, unsigned n,
                    AAt a_at, BAt b_at) {
    if (n > kMaxMmaRow) {
        emu_fault("emulated mma row: more fragments per row than the emulator holds");
        return;
    }
    Fiber& f = sched.fibers[sched.current];
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (sched.mma_slots.empty()) sched.mma_slots.resize(2 * 32 * 32);
    MmaSlot* slots = &sched.mma_slots[((f.mmas++ % 2) * 32 + warp) * 32];
    std::memcpy(slots[lane].a, a, a_regs * sizeof(unsigned));
    for (unsigned j = 0; j < n; ++j) std::memcpy(slots[lane].b[j], b + j * b_regs, b_regs * sizeof(unsigned));
    yield(State::AtWarpBarrier);  // every lane has deposited its fragments
    const unsigned g = lane / 4, t = lane % 4;
    for (unsigned j = 0; j < n; ++j)
        for (unsigned i = 0; i < 4; ++i) {
            const unsigned r = g + 8 * (i / 2), c = 2 * t + i % 2;
            double s = d[4 * j + i];
            for (unsigned k = 0; k < 8; ++k) s += a_at(slots, r, k) * b_at(slots, j, k, c);
            d[4 * j + i] = (float)s;
        }
}

// .tf32: A element (row r, k) is register (r >= 8) + 2 (k >= 4) of lane 4 (r % 8) + k % 4; B
// element (k, col c) is register (k >= 4) of lane 4 c + k % 4. Operands are read as TF32: the low
// 13 bits are ignored, as the tensor cores do.
void emu_mma_tf32_row(float* d, const unsigned* a, const unsigned* b, unsigned n) {
    auto tf32 = [](unsigned bits) { return (double)__uint_as_float(bits & 0xffffe000u); };
    mma_row(
        d, a, 4, b, 2, n,
        [&](const MmaSlot* s, unsigned r, unsigned k) {
            return tf32(s[4 * (r % 8) + k % 4].a[(r >= 8) + 2 * (k >= 4)]);
        },
        [&](const MmaSlot* s, unsigned j, unsigned k, unsigned c) { return tf32(s[4 * c + k % 4].b[j][k >= 4]); });
}

// .bf16: A element (row r, k) is half k % 2 (0: the low 16 bits) of register (r >= 8) of lane
// 4 (r % 8) + k / 2; B element (k, col c) is half k % 2 of the register of lane 4 c + k / 2. A
// bfloat16 is the upper half of an fp32.
void emu_mma_bf16_row(float* d, const unsigned* a, const unsigned* b, unsigned n) {
    auto bf16 = [](unsigned reg, unsigned half) {
        return (double)__uint_as_float(((reg >> (16 * half)) & 0xffffu) << 16);
    };
    mma_row(
        d, a, 2, b, 1, n,
        [&](const MmaSlot* s, unsigned r, unsigned k) { return bf16(s[4 * (r % 8) + k / 2].a[r >= 8], k % 2); },
        [&](const MmaSlot* s, unsigned j, unsigned k, unsigned c) { return bf16(s[4 * c + k / 2].b[j][0], k % 2); });
}

// Marks [p, p + bytes) unaddressable (or addressable again) for AddressSanitizer, when the
// emulator is built with it (PTXGRAD_EMU_ASAN=1); else does nothing.
extern "C" void ptxgrad_emu_poison(const void* p, size_t bytes, int poison) {
#if defined(__SANITIZE_ADDRESS__)
    if (poison)
        ASAN_POISON_MEMORY_REGION(p, bytes);
    else
        ASAN_UNPOISON_MEMORY_REGION(p, bytes);
#else
    (void)p, (void)bytes, (void)poison;
#endif
}

// cp.async as a GPU defines it, so that a kernel that reads a tile before waiting for its copies
// reads stale shared memory here too: copies join the open group, commit closes it, and
// wait_group(n) lands every copy of all but the n most recent groups. A barrier lands nothing.
void emu_cp_async(float* dst, const float* src, unsigned n, bool full) {
    Fiber& f = sched.fibers[sched.current];
    PendingCopy c{dst, {0, 0, 0, 0}, n, f.commits};
    for (unsigned i = 0; i < n; ++i) c.vals[i] = full ? src[i] : 0.0f;
    f.copies.push_back(c);
}
void emu_cp_async_commit() { ++sched.fibers[sched.current].commits; }
void emu_cp_async_wait(unsigned newest_pending) {
    Fiber& f = sched.fibers[sched.current];
    // Groups g with g + newest_pending < commits are complete.
    auto done = [&](const PendingCopy& c) { return c.group + newest_pending < f.commits; };
    for (const PendingCopy& c : f.copies)
        if (done(c))
            for (unsigned i = 0; i < c.n; ++i) c.dst[i] = c.vals[i];
    std::erase_if(f.copies, done);
}

// Shared memory: one buffer per OS thread, reused by every block it runs (its address never
// changes within a block). Each thread claims the block's arrays in the order it declares them
// (PTX_SHARED_ARRAY, common.cuh): the k-th claim of every thread is the same place, as a
// __shared__ variable is one for the block. Bytes are filled with NaN (all bits set) when a
// block first claims them, since a GPU gives a block shared memory with unspecified contents.
// A block's arrays together may take the 48 KB of static shared memory a GPU allows.
constexpr unsigned long long kSmemLimit = 48 * 1024;
void* emu_shared(unsigned long long bytes) {
    thread_local std::vector<float4> buf(2 * kSmemLimit / sizeof(float4));  // room past the limit
    char* base = reinterpret_cast<char*>(buf.data());
    Fiber& f = sched.fibers[sched.current];
    const unsigned k = f.smem_claims++;
    if (k < sched.smem_arrays.size()) {  // another thread of the block declared it first
        if (sched.smem_arrays[k].bytes != bytes)
            emu_fault("threads of a block declared different shared arrays (a PTX_SHARED_ARRAY under a branch?)");
        return base + sched.smem_arrays[k].at;
    }
    // The block's next array, after the others.
    const unsigned long long at = sched.smem_end, end = at + (bytes + 15) / 16 * 16;
    if (end > kSmemLimit) emu_fault("a block asks for more than 48 KB of static shared memory");
    if (end > 2 * kSmemLimit) {
        std::fprintf(stderr, "ptxgrad-emu: a block asks for %llu bytes of shared memory\n", end);
        std::abort();
    }
    std::memset(base + at, 0xff, end - at);
    sched.smem_arrays.push_back({bytes, at});
    sched.smem_end = end;
    return base + at;
}

// Sets this OS thread's schedule (nonzero: reverse) and returns the previous one.
extern "C" int ptxgrad_emu_set_reverse(int reverse) {
    const bool previous = sched.reverse;
    sched.reverse = reverse != 0;
    return previous;
}

// 16-byte copies made on this OS thread (launches run on the calling thread).
thread_local unsigned long long vec4_copies = 0;
void emu_count_vec4_copy() { ++vec4_copies; }
extern "C" unsigned long long ptxgrad_emu_vec4_copies() { return vec4_copies; }
// Paired 8-byte stores made on this OS thread.
thread_local unsigned long long vec_stores = 0;
void emu_count_vec_store() { ++vec_stores; }
extern "C" unsigned long long ptxgrad_emu_vec_stores() { return vec_stores; }

// The first rule a kernel broke in the current launch on this OS thread (see emu_fault), or null.
thread_local const char* fault = nullptr;
void emu_fault(const char* what) {
    if (!fault) fault = what;
}

// Runs body(ctx) as every thread of every block of a (gx, gy, gz) grid of `threads`-thread blocks.
// body calls the kernel, which reads threadIdx & co. from this OS thread's thread_locals.
// Returns null, or the first rule the kernel broke (emu_fault). The caller has checked the launch
// configuration against a GPU's limits (ptxgrad_emu::launch).
extern "C" const char* ptxgrad_emu_run(unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                                       void (*body)(void*), void* ctx) {
    fault = nullptr;
    if (sched.fibers.size() < threads) sched.fibers.resize(threads);
    sched.body = body;
    sched.ctx = ctx;
    blockDim = dim3{threads, 1, 1};
    gridDim = dim3{gx, gy, gz};
    // Blocks one after another, in the schedule's order too: a block that reads what another
    // block of the same launch writes (which a GPU may run in either order, or at once) then
    // sees the old value in one order and the new one in the other.
    const unsigned long long blocks = (unsigned long long)gx * gy * gz;
    for (unsigned long long i = 0; i < blocks; ++i) {
        const unsigned long long b = sched.reverse ? blocks - 1 - i : i;
        blockIdx = dim3{(unsigned)(b % gx), (unsigned)(b / gx % gy), (unsigned)(b / gx / gy)};
        run_block(threads);
    }
    return fault;
}
