#!/usr/bin/env python3
"""Renders benchmarks/results/*.json (Google Benchmark output of scripts/bench.sh) as markdown tables on
stdout, and writes a gnuplot script for the rank-vs-memory plot next to the JSON.

Usage: scripts/bench_report.py RESULTS_DIR > RESULTS_DIR/REPORT.md
"""
import json
import os
import re
import statistics
import sys


def load(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def rows(doc):
    """Median aggregates when the run had repetitions, else the plain runs."""
    bench = doc.get("benchmarks", [])
    med = [b for b in bench if b.get("aggregate_name") == "median"]
    return med if med else [b for b in bench if b.get("run_type", "iteration") == "iteration"]


def args(name):
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", name) if k != "min_time"}


def fmt(x, digits=3):
    return f"{x:.{digits}f}"


def step_report(doc, out):
    ctx = doc.get("context", {})
    out.append(f"Machine: {ctx.get('num_cpus')} CPUs at {ctx.get('mhz_per_cpu')} MHz, run {ctx.get('date')}; "
               "both libraries call the same OpenBLAS on one thread.\n")
    out.append("| in | out | n | r | gemm2 ms | step ms | step/gemm2 | FLOP bound | libtorch ms | vs_libtorch |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    small_r, big_r, vs = [], [], []
    for b in rows(doc):
        a = args(b["name"])
        t = b.get("torch_ms")
        out.append(f"| {a['in']} | {a['out']} | {a['n']} | {a['r']} | {fmt(b['gemm2_ms'], 2)} | {fmt(b['step_ms'], 2)} | "
                   f"{fmt(b['step_over_gemm2'])} | {fmt(b['flop_bound'])} | "
                   f"{fmt(t, 2) if t is not None else 'n/a'} | {fmt(b['vs_libtorch']) if t is not None else 'n/a'} |")
        (small_r if a["r"] <= 64 else big_r).append(b["step_over_gemm2"])
        if t is not None:
            vs.append(b["vs_libtorch"])
    out.append("")
    if small_r:
        out.append(f"- median step/gemm2 over r ≤ 64: **{fmt(statistics.median(small_r))}** (target ≤ 1.05)")
    if big_r:
        out.append(f"- median step/gemm2 at r = 256: **{fmt(statistics.median(big_r))}** (target ≤ 1.15)")
    if vs:
        out.append(f"- vs_libtorch: median **{fmt(statistics.median(vs))}**, minimum **{fmt(min(vs))}** "
                   f"(targets ≥ 1.5 and ≥ 1)")
    out.append("")


def infer_report(doc, out):
    out.append("| d | n | r | base µs | merged/base | unmerged/base | target |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|")
    merges = []
    for b in rows(doc):
        a = args(b["name"])
        if b["name"].startswith("bm_infer"):
            out.append(f"| {a['d']} | {a['n']} | {a['r']} | {fmt(b['base_us'], 1)} | {fmt(b['merged_over_base'])} | "
                       f"{fmt(b['unmerged_over_base'])} | {fmt(b['target'])} |")
        elif b["name"].startswith("bm_merge"):
            merges.append((a, b))
    out.append("")
    if merges:
        out.append("| d | r | merge ms | exact unmerge ms |")
        out.append("|---:|---:|---:|---:|")
        for a, b in merges:
            out.append(f"| {a['d']} | {a['r']} | {fmt(b['merge_ms'], 1)} | {fmt(b['unmerge_ms'], 1)} |")
        out.append("")


def memory_report(doc, out, results_dir):
    out.append("| r | params | grads | Adam | cache | LoRA total | full fine-tuning | full / LoRA |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")

    def kib(x):
        return f"{x / 1024:,.0f} KiB"

    data = []
    for b in rows(doc):
        a = args(b["name"])
        data.append((a["r"], b))
        out.append(f"| {a['r']} | {kib(b['params_bytes'])} | {kib(b['grad_bytes'])} | {kib(b['adam_bytes'])} | "
                   f"{kib(b['cache_bytes'])} | {kib(b['lora_total_bytes'])} | {kib(b['full_total_bytes'])} | "
                   f"{b['full_over_lora']:,.1f}× |")
    out.append("")
    dat = os.path.join(results_dir, "memory.dat")
    with open(dat, "w") as f:
        f.write("# r lora_total_MiB full_total_MiB params grads adam cache (MiB)\n")
        for r, b in data:
            m = 1 << 20
            f.write(f"{r} {b['lora_total_bytes'] / m} {b['full_total_bytes'] / m} {b['params_bytes'] / m} "
                    f"{b['grad_bytes'] / m} {b['adam_bytes'] / m} {b['cache_bytes'] / m}\n")
    with open(os.path.join(results_dir, "memory_plot.gp"), "w") as f:
        f.write(f"""set terminal pngcairo size 900,560 font 'DejaVu Sans,11'
set output '{os.path.join(results_dir, "rank_vs_memory.png")}'
set title 'Training memory of one 4096x4096 layer (batch 512, Adam, fp32)'
set xlabel 'LoRA rank r'
set ylabel 'MiB (log scale)'
set logscale xy 2
set logscale y 10
set key top left
set grid
plot '{dat}' using 1:2 with linespoints lw 2 pt 7 title 'LoRA: params + grads + Adam + cache', \\
     '' using 1:4 with linespoints dt 2 title 'LoRA: A and B', \\
     '' using 1:7 with linespoints dt 3 title 'LoRA: activation cache (n r)', \\
     '' using 1:3 with lines lw 2 dt 4 lc rgb 'black' title 'full fine-tuning of W'
""")


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    out = ["# Benchmark report", "", "Generated by `scripts/bench.sh` (medians of 3 repetitions).", ""]
    step = load(os.path.join(d, "bench_step.json"))
    if step:
        out += ["## Training step: ours vs the two GEMMs vs libtorch", ""]
        step_report(step, out)
    lin = load(os.path.join(d, "bench_linear.json"))
    if lin:
        out += ["## Inference and merging", ""]
        infer_report(lin, out)
    mem = load(os.path.join(d, "bench_memory.json"))
    if mem:
        out += ["## Rank vs memory (d = 4096, n = 512)", ""]
        memory_report(mem, out, d)
    print("\n".join(out))


if __name__ == "__main__":
    main()
