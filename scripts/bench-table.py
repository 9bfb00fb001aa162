#!/usr/bin/env python3
"""Turns one scripts/gpu-check.sh run's logs into the Markdown tables of BENCHMARKS.md.

    python3 scripts/bench-table.py DIR      # DIR: the run's $OUT (gpu.txt, bench.txt, ...)

Reads what the run wrote and nothing else: every figure printed comes from a log line, and a
missing log prints as "not run". Ratios are ptxgrad's examples/sec over PyTorch's, both from
the same run (same GPU, minutes apart).
"""
import json
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
        f"ptxgrad {b.get('conv_algo', '?')} ÷ this" for b in ours) + " |",
        "| --- | ---: | ---: |" + " ---: |" * len(ours)]
    for b in ours:
        algos = ", ".join(b.get("conv_algos") or [])
        name = f"ptxgrad fp32, --conv-algo {b.get('conv_algo', '?')}" + (f" ({algos})" if algos else "")
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


def step_hygiene(bench):
    """What each bench's timed steps did besides computing: allocations, copies, waits, memory."""
    lines = []
    for b in (b for b in bench if b.get("kind") == "bench"):
        counts = [(b.get(k), what) for k, what in [("allocations_in_timed_steps", "allocations"),
                                                    ("host_copies_in_timed_steps", "host <-> device copies"),
                                                    ("synchronizations_in_timed_steps", "synchronisations")]]
        said = ", ".join(f"{n} {what}" for n, what in counts if n is not None) or "not reported"
        peak = b.get("peak_mem_gib")
        lines.append(f"- `--conv-algo {b.get('conv_algo', '?')}`, timed steps: {said}"
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
    """The per-layer rows that follow the first bench line (the auto run in gpu-check.sh)."""
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


def train_summary(train):
    epochs = [e for e in train if e.get("kind") == "epoch"]
    final = [e for e in train if e.get("kind") == "final"]
    if not epochs:
        return "(training not run or no epoch finished)"
    last = epochs[-1]
    rate = final[0]["examples_per_sec"] if final else last["examples_per_sec"]
    return (f"{len(epochs)} epochs: loss {last['loss']:.3f}, train acc {last['train_acc']:.3f}, "
            f"test acc {last['test_acc']:.3f}, {rate:,.1f} examples/sec "
            f"({last['end_to_end_examples_per_sec']:,.1f} end to end in the last epoch)")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    d = Path(sys.argv[1])
    gpu = (d / "gpu.txt").read_text().strip() if (d / "gpu.txt").exists() else "unknown GPU"
    bench, peer, train = json_lines(d / "bench.txt"), json_lines(d / "peer-bench.jsonl"), json_lines(d / "train.jsonl")
    print(f"GPU: {gpu}\n")
    first = next((b for b in bench if b.get("kind") == "bench"), {})
    shape = f"batch {first.get('batch', '?')}, {first.get('resolution', '?')}x{first.get('resolution', '?')}"
    print(f"## Training step ({shape}, synthetic input on the GPU; PyTorch at batch 128)\n")
    print(step_table(bench, peer) + "\n")
    print(step_hygiene(bench) + "\n")
    print("## --conv-algo auto: what each conv layer measured\n")
    print(tune_table(bench) + "\n")
    print("## Per-layer GPU time (the first bench of the run)\n")
    print(layer_table(bench) + "\n")
    print("## 10-epoch training\n")
    print(train_summary(train))


if __name__ == "__main__":
    main()
