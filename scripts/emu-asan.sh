#!/usr/bin/env bash
# The test suite with the emulated kernels under AddressSanitizer (gcc's libasan): an emulated
# kernel that reads or writes outside its buffers stops its test with a report naming the
# kernel's source line. On a GPU such an access is silent corruption or a fault at the next
# synchronisation; here it is caught on a machine without one.
#
# Only the kernels (emu/, built with PTXGRAD_EMU_ASAN=1) are instrumented; the ASan runtime is
# preloaded into the test binaries (cargo's runner), so that the buffers the Rust side allocates
# get red zones too. A separate target directory keeps the normal build untouched.
# Usage: scripts/emu-asan.sh [cargo test arguments; default: the test targets below, or e.g.
# --test winograd for one]
set -euo pipefail
cd "$(dirname "$0")/.."
asan=$(gcc -print-file-name=libasan.so)
if [ ! -e "$asan" ]; then
    echo "emu-asan: no libasan.so found by gcc (Debian: apt install libasan8)" >&2
    exit 1
fi
export PTXGRAD_EMU_ASAN=1 CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/asan}"
# Leak checks are off: the engine keeps its device state for the life of the process on purpose.
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="env LD_PRELOAD=$asan ASAN_OPTIONS=detect_leaks=0:abort_on_error=1"
scripts/cuda-wheels.sh > /dev/null
# By default the unit tests and every test target but tests/faults.rs, whose runs are the CPU
# path in child processes: nothing of it is emulated, so nothing of it is instrumented.
if [ $# -eq 0 ]; then
    set -- --lib --bins
    for t in tests/*.rs; do
        name=$(basename "$t" .rs)
        [ "$name" = faults ] || set -- "$@" --test "$name"
    done
fi
cargo test --release "$@"
