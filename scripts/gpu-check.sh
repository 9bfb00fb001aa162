#!/usr/bin/env bash
# One prepared device run, sized for a 15-minute GPU lease (about 5 minutes of work on an
# H200): every CUDA test, ptxgrad's bench with the per-layer table, the PyTorch peer's bench,
# and 10 epochs of training. Build and pack here first:
#     ../shared/gpu/pack --data --peer
# then on the device (carry [".gpu"]):   bash scripts/gpu-check.sh
# Logs go to $OUT (at most 8 files come back): gpu.txt, tests.txt, bench.txt, peer-bench.jsonl,
# train.txt, train.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.gpu/out}; mkdir -p "$out"
[ -d .gpu/bin ] || tar -C .gpu -xJf .gpu/bundle.tar.xz
export PTXGRAD_REQUIRE_GPU=1 PTXGRAD_DATA="$PWD/data/fashion-mnist"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# CUDA tests first (the CPU-only test files are CI's job and are skipped here to save minutes).
for t in conv2d dense tape tensor add relu maxpool2d dropout softmax_xent sgd resize reshape; do
  echo "== $t"; timeout 120 ".gpu/bin/test-$t" --test-threads=4 2>&1 | grep -E "^test |test result|panicked|SKIPPED" -A3
done > "$out/tests.txt" 2>&1
grep -E "test result|FAILED|panicked" "$out/tests.txt"
timeout 120 .gpu/bin/bin-ptxgrad bench > "$out/bench.txt" 2>&1; head -3 "$out/bench.txt"
PYTHONUNBUFFERED=1 timeout 150 python3 .gpu/torch_alexnet.py bench > "$out/peer-bench.jsonl" 2>&1; cat "$out/peer-bench.jsonl"
timeout 300 .gpu/bin/bin-ptxgrad train --epochs 10 --quiet --checkpoint /tmp/ptxgrad.safetensors \
  --json "$out/train.jsonl" > "$out/train.txt" 2>&1
cat "$out/train.txt"
