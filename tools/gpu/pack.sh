#!/usr/bin/env bash
# Builds and packs, on a machine with Rust and no GPU, everything tools/gpu/check.sh runs on a GPU
# machine without Rust:
#   ../shared/gpu/pack --data --peer   every binary, test and bench, the data and the PyTorch peer
#                                      -> .gpu/ (git-ignored)
#   tools/gpu/builds.sh                the build BENCHMARKS.md's figures are of -> .builds/
#                                      (skip: --no-builds)
# xz -9: every binary embeds the kernels (1.7 MB of compressed PTX and 1.7 MB of sm_90 machine
# code, see build.rs), and only xz -9's 64 MiB window sees the copies in the ~30 binaries as
# repeats (about 11 MB packed instead of 56); one thread, as more would cut the stream into
# blocks that lose them.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
eval "$(scripts/cuda-wheels.sh)"
XZ_OPT="-9 -T1" ../shared/gpu/pack --data --peer
if [ "${1:-}" != "--no-builds" ]; then
  tools/gpu/builds.sh
fi
echo "packed: $(du -sh .gpu $( [ -d .builds ] && echo .builds) | awk '{print $2 " " $1}' | paste -sd ' ')"
echo "on the GPU machine, from the project root: bash tools/gpu/check.sh"
