#!/usr/bin/env bash
# One prepared device run, sized for a 15-minute GPU lease (about 5-6 minutes of work on an
# H200): every CUDA test, the conv timing test, ptxgrad's bench with the per-layer table for
# --conv-algo auto (the per-layer timings it chose by), the implicit GEMM and Winograd, the
# PyTorch peer's bench, and 10 epochs of training. Build and pack here first:
#     ../shared/gpu/pack --data --peer
# then on the device (carry [".gpu"]):   bash scripts/gpu-check.sh [CONV_ALGO]
# Training uses CONV_ALGO (auto, gemm, winograd, winograd:M); by default auto if every conv2d
# test passed (they include the Winograd kernels'), else gemm.
# Logs go to $OUT (at most 8 files come back): gpu.txt, tests.txt, bench.txt, peer-bench.jsonl,
# train.txt, train.jsonl, and summary.md (scripts/bench-table.py: the BENCHMARKS.md tables).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.gpu/out}; mkdir -p "$out"
[ -d .gpu/bin ] || tar -C .gpu -xJf .gpu/bundle.tar.xz
export PTXGRAD_REQUIRE_GPU=1 PTXGRAD_DATA="$PWD/data/fashion-mnist"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# CUDA tests first: every test whose name says cuda (test_device!'s `::cuda` cases and the
# gpu_or_skip tests, named *_cuda_*), from every test binary. The CPU and emulator cases are CI's
# work, done without a GPU.
for b in .gpu/bin/test-*; do
  echo "== ${b##*/test-}"; timeout 120 "$b" cuda --test-threads=4 2>&1 | grep -E "^test |test result|panicked|SKIPPED" -A3
done > "$out/tests.txt" 2>&1
grep -E "test result|FAILED|panicked" "$out/tests.txt"
algo=${1:-}
if [ -z "$algo" ]; then
  if awk '/^== conv2d$/{f=1; next} /^== /{f=0} f' "$out/tests.txt" | grep -q "test result: ok"; then
    algo=auto
  else
    algo=gemm
  fi
fi
{ echo "== conv timing (gemm, winograd, winograd:2, winograd:4, winograd:6)"
  timeout 120 .gpu/bin/test-conv2d --ignored --nocapture conv2d_cuda_alexnet_timing 2>&1 | grep -vE "^$|running"
  for a in auto gemm winograd; do echo "== bench --conv-algo $a"; timeout 120 .gpu/bin/bin-ptxgrad bench --conv-algo $a 2>&1; done
} > "$out/bench.txt"; grep -E '"bench"|"conv_tune"|conv total|^gemm|^winograd' "$out/bench.txt"
PYTHONUNBUFFERED=1 timeout 150 python3 .gpu/torch_alexnet.py bench > "$out/peer-bench.jsonl" 2>&1; cat "$out/peer-bench.jsonl"
timeout 300 .gpu/bin/bin-ptxgrad train --device cuda --epochs 10 --quiet --conv-algo "$algo" --checkpoint /tmp/ptxgrad.safetensors \
  --json "$out/train.jsonl" > "$out/train.txt" 2>&1
cat "$out/train.txt"
python3 scripts/bench-table.py "$out" > "$out/summary.md" 2>&1; cat "$out/summary.md"
