#!/usr/bin/env python3
"""Turns one tools/gpu/check.sh run's logs into the Markdown tables of BENCHMARKS.md.

    python3 tools/gpu/bench-table.py DIR      # DIR: the run's $OUT (gpu.txt, bench.txt, ...)

Reads what the run wrote and nothing else: every figure printed comes from a log line, and a
missing log prints as "not run". Ratios are ptxgrad's examples/sec over PyTorch's, both from
the same run (same GPU, minutes apart).
"""
import csv
import json
import re
import sys
from pathlib import Path


def json_lines(path):
    """The JSON objects among a log's lines (other lines: test output, tables, errors)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def step_table(bench, peer):
    ours = [b for b in bench if b.get("kind") == "bench"]
    theirs = [p for p in peer if p.get("kind") == "bench" and p.get("batch") == 128]
    rows = ["| engine / precision | examples/sec | ms/step | " + " | ".join(
        f"ptxgrad {b.get('math', 'fp32')} {b.get('conv_algo', '?')} ÷ this" for b in ours) + " |",
        "| --- | ---: | ---: |" + " ---: |" * len(ours)]
    for b in ours:
        algos = ", ".join(b.get("conv_algos") or [])
        name = f"ptxgrad {b.get('math', 'fp32')}, --conv-algo {b.get('conv_algo', '?')}" + (f" ({algos})" if algos else "")
        if str(b.get("kernel_code", "")).startswith("PTX"):
            name += ", PTX compiled by the driver"
        ratios = " | ".join(f"{o['examples_per_sec'] / b['examples_per_sec']:.2f}" for o in ours)
        rows.append(f"| {name} | {b['examples_per_sec']:,.1f} | {b['ms_per_step']:.2f} | {ratios} |")
    for p in theirs:
        ratios = " | ".join(f"**{o['examples_per_sec'] / p['examples_per_sec']:.2f}**" for o in ours)
        rows.append(f"| PyTorch {p['config']} | {p['examples_per_sec']:,.1f} | {p['ms_per_step']:.2f} | {ratios} |")
    if not ours:
        rows.append("| ptxgrad | not run | | |")
    if not theirs:
        rows.append("| PyTorch | not run | | |")
    return "\n".join(rows)


def build_table(builds, bench, peer):
    """Other builds (tools/gpu/builds.sh) benched in this run, beside the current build's
    first bench (the auto, fp32 one) and PyTorch's strict fp32."""
    olds = [b for b in builds if b.get("kind") == "bench"]
    if not olds:
        return "(no other builds were benched: tools/gpu/builds.sh makes them)"
    now = next((b for b in bench if b.get("kind") == "bench"), None)
    strict = next((p for p in peer if p.get("kind") == "bench" and p.get("batch") == 128
                   and "strict" in str(p.get("config", ""))), None)
    rows = ["| build | examples/sec | ms/step | current ÷ this | this ÷ PyTorch fp32 strict |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for b in olds + ([dict(now, build="current")] if now else []):
        gain = f"{now['examples_per_sec'] / b['examples_per_sec']:.2f}" if now else "?"
        vs = f"{b['examples_per_sec'] / strict['examples_per_sec']:.2f}" if strict else "?"
        rows.append(f"| {b['build']} | {b['examples_per_sec']:,.1f} | {b['ms_per_step']:.2f} | {gain} | {vs} |")
    return "\n".join(rows)


def step_hygiene(bench):
    """What each bench's timed steps did besides computing: allocations, copies, waits, memory."""
    lines = []
    for b in (b for b in bench if b.get("kind") == "bench"):
        counts = [(b.get(k), what) for k, what in [("allocations_in_timed_steps", "allocations"),
                                                    ("host_copies_in_timed_steps", "host <-> device copies"),
                                                    ("synchronizations_in_timed_steps", "synchronisations")]]
        said = ", ".join(f"{n} {what}" for n, what in counts if n is not None) or "not reported"
        peak = b.get("peak_mem_gib")
        lines.append(f"- `--conv-algo {b.get('conv_algo', '?')} --math {b.get('math', 'fp32')}`, timed steps: {said}"
                     + (f"; peak device memory {peak} GiB" if peak is not None else ""))
    return "\n".join(lines)


def tune_table(bench):
    tunes = [t for t in bench if t.get("kind") == "conv_tune"]
    if not tunes:
        return "(no conv_tune lines: --conv-algo auto was not run)"
    seen, rows = set(), ["| conv layer | chosen | candidates (fwd + bwd ms; x = disagrees / out of memory) |",
                         "| --- | --- | --- |"]
    for t in tunes:
        if t["layer"] in seen:  # one bench's tuning is enough
            continue
        seen.add(t["layer"])
        trials = ", ".join(
            f"{tr['algo']} {tr['ms']:.3f}" if tr.get("agrees") else f"{tr['algo']} x" for tr in t.get("trials", []))
        rows.append(f"| {t['layer']} | {t['chosen']} | {trials or 'one candidate, not timed'} |")
    return "\n".join(rows)


def layer_table(bench):
    """The per-layer rows that follow the first bench line (the auto run in check.sh)."""
    rows, started = [], False
    for line in bench:
        if line.get("kind") == "bench":
            if started:
                break
            started = True
        elif started and line.get("kind") == "layer":
            rows.append(line)
    if not rows:
        return "(no per-layer lines)"
    total = sum(r["fwd_ms"] + r["bwd_ms"] for r in rows)
    out = ["| layer | algorithm | output | fwd ms | bwd ms | share |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        share = 100 * (r["fwd_ms"] + r["bwd_ms"]) / total if total else 0
        out.append(f"| {r['layer']} | {r.get('algo') or ''} | {r['output']} | {r['fwd_ms']:.3f} | "
                   f"{r['bwd_ms']:.3f} | {share:.1f}% |")
    out.append(f"| **total** | | | | | {total:.1f} ms |")
    return "\n".join(out)


def number(text):
    """A value of ncu's CSV ("1,234.5", "n/a", "") as a float, or None."""
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def ncu_rows(path):
    """ncu's raw page (--csv --page raw --print-units base): one dict per profiled kernel launch,
    metric name -> text. The line after the header gives units and is skipped."""
    if not path.exists():
        return None
    lines = [r for r in csv.reader(path.read_text(errors="replace").splitlines()) if r]
    start = next((i for i, r in enumerate(lines) if "Kernel Name" in r), None)
    if start is None:
        return []
    header = lines[start]
    rows = [dict(zip(header, r)) for r in lines[start + 1:] if len(r) == len(header)]
    return [r for r in rows if number(r.get("ID", "")) is not None]


STALL = re.compile(r"smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)(?:_per_issue_active)?\.ratio$")


def first(row, *names):
    for n in names:
        v = number(row.get(n))
        if v is not None:
            return v
    return None


def duration_ns(row):
    return first(row, "gpu__time_duration.sum") or 0


def dram_bytes(row):
    """A launch's DRAM traffic in bytes (read + write), from whichever counters ncu reported."""
    total = first(row, "dram__bytes.sum")
    if total is not None:
        return total
    parts = [first(row, f"dram__bytes_{d}.sum") for d in ("read", "write")]
    if None not in parts:
        return sum(parts)
    sectors = [first(row, f"dram__sectors_{d}.sum") for d in ("read", "write")]
    return 32 * sum(sectors) if None not in sectors else None


def ncu_table(path, top=25):
    """Per kernel (all launches of one name in the profiled step): time, how busy the SM and its
    issue slots were, achieved FLOP/s, DRAM traffic and throughput, occupancy, the leading warp
    stall reasons, and shared-memory bank conflicts, as ncu measured them. Columns ncu did not
    report print as blank."""
    rows = ncu_rows(path)
    if rows is None:
        return "(no ncu.csv: the profile was not run)"
    if not rows:
        return "(ncu.csv holds no kernels: see the == ncu lines in bench.txt for why)"
    kernels = {}
    for r in rows:
        kernels.setdefault(r["Kernel Name"], []).append(r)
    total_ns = sum(duration_ns(r) for r in rows)

    def mean(rs, *names):  # duration-weighted over the kernel's launches
        pairs = [(first(r, *names), duration_ns(r)) for r in rs]
        pairs = [(v, w) for v, w in pairs if v is not None]
        wsum = sum(w for _, w in pairs)
        return sum(v * w for v, w in pairs) / wsum if wsum else None

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    out = [f"{len(rows)} kernel launches profiled, {total_ns / 1e6:.2f} ms of GPU time under the profiler "
           "(caches flushed before each kernel, so a little slower than in the step).", "",
           "| kernel | launches | ms | share | SM % | issue slots % | FMA pipe % | TFLOP/s | DRAM GB | DRAM % "
           "| occupancy % | top stalls (cycles per issued instruction) | shared ld conflicts % |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    by_time = sorted(kernels.items(), key=lambda kv: -sum(duration_ns(r) for r in kv[1]))
    for name, rs in by_time[:top]:
        ns = sum(duration_ns(r) for r in rs)
        flop = 0.0
        for r in rs:
            ffma = first(r, "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum")
            if ffma is None:
                flop = None
                break
            flop += 2 * ffma + (first(r, "smsp__sass_thread_inst_executed_op_fadd_pred_on.sum") or 0) \
                + (first(r, "smsp__sass_thread_inst_executed_op_fmul_pred_on.sum") or 0)
        stalls = {}
        for col in rs[0]:
            m = STALL.match(col)
            v = mean(rs, col) if m else None
            if v:
                stalls[m.group(1)] = v
        top_stalls = ", ".join(f"{k} {v:.1f}" for k, v in sorted(stalls.items(), key=lambda kv: -kv[1])[:3])
        dram = [dram_bytes(r) for r in rs]
        dram = None if None in dram else sum(dram)
        conflicts = sum(first(r, "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum") or 0 for r in rs)
        wavefronts = sum(first(r, "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum") or 0 for r in rs)
        out.append(" | ".join([
            f"| {name}", str(len(rs)), f"{ns / 1e6:.3f}", f"{100 * ns / total_ns:.1f}%" if total_ns else "",
            fmt(mean(rs, "sm__throughput.avg.pct_of_peak_sustained_elapsed"), ".0f"),
            fmt(mean(rs, "smsp__issue_active.avg.pct_of_peak_sustained_active",
                     "sm__inst_issued.avg.pct_of_peak_sustained_active"), ".0f"),
            fmt(mean(rs, "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
                     "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active"), ".0f"),
            fmt(flop / ns / 1e3 if flop is not None and ns else None, ".1f"),
            fmt(dram / 1e9 if dram is not None else None, ".3f"),
            fmt(mean(rs, "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                     "dram__throughput.avg.pct_of_peak_sustained_elapsed"), ".0f"),
            fmt(mean(rs, "sm__warps_active.avg.pct_of_peak_sustained_active"), ".0f"),
            top_stalls, fmt(100 * conflicts / wavefronts if wavefronts else None, ".0f")]) + " |")
    if len(by_time) > top:
        out.append(f"| ({len(by_time) - top} more kernels) | | | | | | | | | | | | |")
    return "\n".join(out)


def timing_lines(path):
    """The plain-text lines of the criterion bench `layers` in bench.txt (the GEMM core, the conv
    layers per algorithm, the dense layers), as it printed them."""
    if not path.exists():
        return "(bench.txt missing)"
    keep, lines = False, []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("== "):
            keep = line.startswith("== layers bench")
        elif keep and line.strip() and not line.startswith(("{", "test ")):
            lines.append("    " + line)
    return "\n".join(lines) if lines else "(the layers bench was not run)"


def test_summary(path):
    """The CUDA tests' totals and failures, and the compute-sanitizer runs, from tests.txt."""
    if not path.exists():
        return "(tests.txt missing)"
    passed = failed = 0
    notes, sanitizer = [], False
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"test result: \w+\. (\d+) passed; (\d+) failed", line)
        if m:
            passed, failed = passed + int(m[1]), failed + int(m[2])
        elif line.startswith("== skipped"):
            notes.append("    " + line)
        elif line.startswith("== "):
            sanitizer = line.startswith("== compute-sanitizer")
            if sanitizer:
                notes.append("    " + line)
        elif (line.startswith("test ") and line.endswith("FAILED")) or (
                sanitizer and (re.match(r"(=+ )?ERROR SUMMARY|exit \d|not installed", line))):
            notes.append("    " + line)
    return "\n".join([f"CUDA tests: {passed} passed, {failed} failed"] + notes)


def kernel_summary(path):
    """Every kernel as the GPU ran it (`ptxgrad kernels --json`, in tests.txt): per kind of code
    (the sm_90 machine code built ahead of time; the PTX as the driver compiled it), the totals,
    the GEMM kernels' registers against the 128 that 2 blocks of 256 threads per SM allow, and the
    rules broken; then how the driver's compiler differs from the machine code built here."""
    kernels = [k for k in json_lines(path) if k.get("kind") == "kernel"]
    if not kernels:
        return "(`ptxgrad kernels` was not run or printed nothing)"
    groups = {}
    for k in kernels:
        groups.setdefault(k.get("code", "?"), []).append(k)
    lines = []
    for code, ks in groups.items():
        arch = sorted({k["binary_version"] for k in ks})
        local = [k for k in ks if k["local_bytes"] > 0]
        lines.append(f"- {code}: {len(ks)} kernels, machine code for " + ", ".join(f"sm_{a}" for a in arch)
                     + f"; {len(local)} with local memory")
        bounded = [k for k in ks if k.get("bound_blocks")]
        if bounded:
            regs = [k["registers"] for k in bounded]
            fit = [k["blocks_per_sm"] for k in bounded]
            lines.append(f"  {len(bounded)} with launch bounds (the GEMMs): {min(regs)}-{max(regs)} registers, "
                         f"{min(fit)}-{max(fit)} blocks per SM")
        for k in ks:
            for v in k.get("violations", []):
                lines.append(f"    {k['kernel']}: {v}")
    if len(groups) == 2:
        (_, a), (_, b) = groups.items()
        regs = {k["kernel"]: k["registers"] for k in a}
        diff = [(k["kernel"], regs[k["kernel"]], k["registers"]) for k in b
                if k["kernel"] in regs and k["registers"] != regs[k["kernel"]]]
        lines.append(f"- registers differ in {len(diff)} of {len(b)} kernels between the two"
                     + ("".join(f"; {n} {x} -> {y}" for n, x, y in diff[:5])))
    return "\n".join(lines)


def train_summary(train):
    epochs = [e for e in train if e.get("kind") == "epoch"]
    final = [e for e in train if e.get("kind") == "final"]
    if not epochs:
        return "(training not run or no epoch finished)"
    last = epochs[-1]
    rate = final[0]["examples_per_sec"] if final else last["examples_per_sec"]
    if final and "end_to_end_examples_per_sec" in final[0]:
        e2e = (f"{final[0]['end_to_end_examples_per_sec']:,.1f} end to end over the run, "
               f"{final[0]['seconds']:,.1f} s")
    else:
        e2e = f"{last['end_to_end_examples_per_sec']:,.1f} end to end in the last epoch"
    return (f"{len(epochs)} epochs: loss {last['loss']:.3f}, train acc {last['train_acc']:.3f}, "
            f"test acc {last['test_acc']:.3f}, {rate:,.1f} examples/sec ({e2e})")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = Path(sys.argv[1])
    gpu = (d / "gpu.txt").read_text().strip() if (d / "gpu.txt").exists() else "unknown GPU"
    bench, peer, train = json_lines(d / "bench.txt"), json_lines(d / "peer-bench.jsonl"), json_lines(d / "train.jsonl")
    # The other builds' lines (check.sh marks them "build") have their own table.
    builds, bench = [b for b in bench if "build" in b], [b for b in bench if "build" not in b]
    print(f"GPU: {gpu}\n")
    first = next((b for b in bench if b.get("kind") == "bench"), {})
    shape = f"batch {first.get('batch', '?')}, {first.get('resolution', '?')}x{first.get('resolution', '?')}"
    print(f"## Training step ({shape}, synthetic input on the GPU; PyTorch at batch 128)\n")
    print(step_table(bench, peer) + "\n")
    print(step_hygiene(bench) + "\n")
    print("## Other builds, benched in this run (tools/gpu/builds.sh)\n")
    print(build_table(builds, bench, peer) + "\n")
    print("## --conv-algo auto: what each conv layer measured\n")
    print(tune_table(bench) + "\n")
    print("## Per-layer GPU time (the first bench of the run)\n")
    print(layer_table(bench) + "\n")
    print("## CUDA tests and compute-sanitizer (tests.txt)\n")
    print(test_summary(d / "tests.txt") + "\n")
    print("## Kernels as the GPU ran them (`ptxgrad kernels`)\n")
    print(kernel_summary(d / "tests.txt") + "\n")
    print("## 10-epoch training\n")
    print(train_summary(train) + "\n")
    print("## The GEMM core and the conv layers (`cargo bench --bench layers`)\n")
    print(timing_lines(d / "bench.txt") + "\n")
    print("## One training step under Nsight Compute (ncu.csv)\n")
    try:
        print(ncu_table(d / "ncu.csv"))
    except Exception as e:  # a format this script does not know must not cost the other tables
        print(f"(ncu.csv could not be read: {type(e).__name__}: {e})")


if __name__ == "__main__":
    main()
