#!/usr/bin/env bash
# The whole GPU measurement in one run, within a time budget: every CUDA test; every kernel as the
# GPU runs it, against the design rules (`ptxgrad kernels`: the machine code built here, then the
# PTX as the driver compiles it); ptxgrad's bench with the per-layer table for --conv-algo auto
# (and the timings it chose by); the PyTorch peer's bench; the bench with the tensor-core GEMMs
# (--math 3xtf32, tf32, bf16); 10 epochs of training; a hardware-counter profile of one training
# step (Nsight Compute, where it can read the counters); the bench of other builds (if
# tools/gpu/builds.sh made them); the GEMM core's throughput; the layers bench (GEMM core, conv algorithms); the bench
# with the implicit GEMM, with Winograd, and with the PTX instead of the machine code; and, if
# time is left, one small step under compute-sanitizer's racecheck and initcheck.
# Build and pack on a machine with Rust first (tools/gpu/pack.sh), then on the GPU machine, with
# .gpu/ (and .builds/) in the project root:   bash tools/gpu/check.sh [CONV_ALGO]
# Training and the profile use CONV_ALGO (auto, gemm, winograd, winograd:M); by default auto if
# every conv2d test passed (they include the Winograd kernels'), else gemm.
#
# The whole run keeps within PTXGRAD_CHECK_SECONDS (default 550): the stages run in order of what the figures in BENCHMARKS.md need
# most, each under a cap and under what is left, and a stage with too little time left is
# skipped with a line saying so. Logs go to $OUT (default .gpu/out): gpu.txt, tests.txt,
# bench.txt, peer-bench.jsonl, train.txt, train.jsonl, ncu.csv, and summary.md
# (tools/gpu/bench-table.py: the BENCHMARKS.md tables).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-.gpu/out}; mkdir -p "$out"
end=$((SECONDS + ${PTXGRAD_CHECK_SECONDS:-550}))
[ -d .gpu/bin ] || tar -C .gpu -xJf .gpu/bundle.tar.xz
export PTXGRAD_REQUIRE_GPU=1 PTXGRAD_DATA="$PWD/data/fashion-mnist"
bin=.gpu/bin/bin-ptxgrad

# budget CAP [NEED]: prints the seconds a stage may take (CAP, or less if less is left, keeping
# 10 in hand for the summary); fails if fewer than NEED (default 20) are left.
budget() {
  local left=$((end - SECONDS - 10)) need=${2:-20}
  [ "$left" -ge "$need" ] || { echo "== skipped: ${left}s left" >&2; return 1; }
  echo $((left < $1 ? left : $1))
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

# 1. CUDA tests: every test whose name says cuda (test_device!'s `::cuda` cases and the
# gpu_or_skip tests, named *_cuda_*), from every test binary. The CPU and emulator cases are CI's
# work, done without a GPU.
for b in .gpu/bin/test-*; do
  echo "== ${b##*/test-}"
  t=$(budget 120) && timeout "$t" "$b" cuda --test-threads=4 2>&1 | grep -E "^test |test result|panicked|SKIPPED" -A3
done > "$out/tests.txt" 2>&1
grep -E "test result|FAILED|panicked|skipped" "$out/tests.txt"
# What the GPU runs of every kernel (registers, local memory, blocks per SM), one JSON line each,
# as the driver reports it: tests/ptx.rs reads ptxas 12.9's build.
# With PTXGRAD_KERNEL_CODE=ptx the driver compiles the PTX instead of loading the sm_90 machine
# code built here: what its own compiler would make of the kernels.
{ echo "== kernels (as loaded)"
  t=$(budget 60 20) && timeout "$t" "$bin" kernels --json 2>&1; echo "exit $?"
  echo "== kernels (PTXGRAD_KERNEL_CODE=ptx: the driver's compiler)"
  t=$(budget 60 20) && PTXGRAD_KERNEL_CODE=ptx timeout "$t" "$bin" kernels --json 2>&1; echo "exit $?"
} >> "$out/tests.txt" 2>&1
grep -A400 "== kernels" "$out/tests.txt" | grep -vE '^\{' | head -n 12
algo=${1:-}
if [ -z "$algo" ]; then
  if awk '/^== conv2d$/{f=1; next} /^== /{f=0} f' "$out/tests.txt" | grep -q "test result: ok"; then
    algo=auto
  else
    algo=gemm
  fi
fi

# 2. The step rate, with the per-layer table, and the peer's.
bench() { echo "== bench --conv-algo $*"; t=$(budget 120) && timeout "$t" "$bin" bench --conv-algo "$@" 2>&1; }
bench "$algo" > "$out/bench.txt" 2>&1
grep -E '"bench"|"conv_tune"' "$out/bench.txt"
t=$(budget 150 60 2> "$out/peer-bench.jsonl") &&
  PYTHONUNBUFFERED=1 timeout "$t" python3 .gpu/torch_alexnet.py bench > "$out/peer-bench.jsonl" 2>&1
cat "$out/peer-bench.jsonl"
# The tensor-core GEMMs: 3xtf32 (fp32-accurate), tf32 and bf16, without the per-layer table.
for m in 3xtf32 tf32 bf16; do bench "$algo" --math "$m" --no-layers >> "$out/bench.txt" 2>&1; done
grep -E '"bench"' "$out/bench.txt" | tail -n 3

# 3. Ten epochs of the book's recipe (each epoch's figures land in train.jsonl as it ends).
t=$(budget 300 60 2> "$out/train.txt") && timeout "$t" "$bin" train --device cuda --epochs 10 --quiet --conv-algo "$algo" \
  --checkpoint /tmp/ptxgrad.safetensors --json "$out/train.jsonl" > "$out/train.txt" 2>&1
cat "$out/train.txt"

# 4. Hardware counters of one training step (bench --profile-steps 1 brackets it with
# cuProfilerStart/Stop): per kernel, the sections that say where the time goes (speed of light,
# issue slots and warp stall reasons, occupancy, shared-memory bank conflicts). Clocks are left
# alone (--clock-control none), as for the timings. Only the sections this ncu knows are asked
# for; ncu.csv is its raw page, one row per kernel; its messages go to bench.txt.
# A step is about 120 kernels and each section costs replay passes, so the list is kept to what
# the table uses; ncu writes its report only at the end, so its cap is generous.
if command -v ncu > /dev/null && t=$(budget 200 90); then
  want="SpeedOfLight SpeedOfLight_RooflineChart LaunchStats Occupancy WarpStateStats SchedulerStats
        ComputeWorkloadAnalysis MemoryWorkloadAnalysis_Tables"
  have=$(ncu --list-sections 2>/dev/null)
  sections=(); for s in $want; do grep -qw -- "$s" <<< "$have" && sections+=(--section "$s"); done
  # The DRAM bytes each kernel moves (Winograd's transforms are memory-bound), if this ncu has them.
  known=$(timeout 30 ncu --query-metrics 2>/dev/null)
  dram=(); for m in dram__bytes_read dram__bytes_write; do
    grep -q "^$m " <<< "$known" && dram+=("$m.sum"); done
  [ ${#dram[@]} -eq 2 ] && sections+=(--metrics "$(IFS=,; echo "${dram[*]}")")
  { echo "== ncu ${sections[*]}"
    timeout "$t" ncu --profile-from-start off --clock-control none "${sections[@]}" \
      --export /tmp/ptxgrad-step --force-overwrite \
      "$bin" bench --conv-algo "$algo" --warmup 3 --steps 1 --no-layers --profile-steps 1 2>&1 | tail -n 30
    ncu --import /tmp/ptxgrad-step.ncu-rep --csv --page raw --print-units base > "$out/ncu.csv" 2>&1
    echo "ncu.csv: $(wc -l < "$out/ncu.csv") lines"
    # A profiler killed at its cap can leave the profiled program behind, which would share the
    # GPU with the timings below.
    pkill -f "bin-ptxgrad bench" && echo "stopped a profiled bench left running"
  } >> "$out/bench.txt" 2>&1
else
  echo "== ncu: not run ($(command -v ncu > /dev/null && echo 'out of time' || echo 'not installed'))" >> "$out/bench.txt"
fi
tail -n 3 "$out/bench.txt"

# 4b. Other builds (tools/gpu/builds.sh, in .builds/): each one's bench at its own defaults, in
# this run, so that its ratio to the current build is what the commits in between changed. Their JSON lines gain "build": REV, which keeps them out of the current
# build's tables in summary.md.
if [ -f .builds/bundle.tar.xz ]; then
  ms=/tmp/ptxgrad-builds; rm -rf "$ms"; mkdir -p "$ms" && tar -C "$ms" -xJf .builds/bundle.tar.xz
  for rev in $(cat "$ms/order"); do
    { echo "== build $(cat "$ms/$rev/about")"
      t=$(budget 45 25) && timeout "$t" "$ms/$rev/bin-ptxgrad" bench --no-layers 2>&1 | sed -E "s/^\{/{\"build\":\"$rev\",/"
    } >> "$out/bench.txt" 2>&1
  done
  grep '"build"' "$out/bench.txt" | grep '"kind":"bench"'
else
  echo "== builds: none (tools/gpu/builds.sh makes them)" >> "$out/bench.txt"
fi

# 5. The GEMM core alone (one large problem per load path), the convolution algorithms one by one
# (the criterion bench `layers`), and `ptxgrad bench` with each.
{ echo "== layers bench: gemm_core (4096^3 per load path and math), conv_algos (gemm, each Winograd tile, without the 96-wide tiles, 3xtf32), dense"
  t=$(budget 180 60) && timeout "$t" .gpu/bin/bench-layers --bench --warm-up-time 1 --measurement-time 2 'gemm_core|conv_algos|dense' 2>&1 | grep -vE "^$|Warming|Collecting|Analyzing|Found|outlier|^ +[0-9]+ \("
  for a in gemm winograd; do [ "$a" = "$algo" ] || bench "$a"; done
  # The machine code built here against the driver compiling the PTX, same settings.
  PTXGRAD_KERNEL_CODE=ptx bench "$algo" --no-layers
} >> "$out/bench.txt" 2>&1
grep -E '"bench"|^gemm_core|^conv_algos|^dense|time:' "$out/bench.txt" | head -n 60

# 6. If time is left: one small training step under compute-sanitizer's racecheck (shared-memory
# hazards at any interleaving, where the emulator's two schedules see only barrier-to-barrier
# orders) and initcheck (reads of device memory nothing wrote), every kernel of the step and of
# the conv algorithm trials. Its lines go to tests.txt.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2> /dev/null)
for tool in racecheck initcheck; do
  { echo "== compute-sanitizer --tool $tool"
    if [ -z "$sanitizer" ]; then echo "not installed"; continue; fi
    if t=$(budget 60 30); then
      timeout "$t" "$sanitizer" --tool "$tool" --error-exitcode 1 \
        "$bin" bench --conv-algo "$algo" --resize 65 --batch-size 2 --warmup 1 --steps 1 --no-layers 2>&1 | tail -n 20
      echo "exit ${PIPESTATUS[0]}"
    fi
  } >> "$out/tests.txt" 2>&1
done
grep -A22 "== compute-sanitizer" "$out/tests.txt" | grep -E "== |ERROR SUMMARY|exit|skipped|not installed"

python3 tools/gpu/bench-table.py "$out" > "$out/summary.md" 2>&1; cat "$out/summary.md"
