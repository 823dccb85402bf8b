#!/usr/bin/env python3
"""Renders benchmarks/results/*.json (Google Benchmark output of scripts/bench.sh) as markdown tables on
stdout, and writes a gnuplot script for the rank-vs-memory plot next to the JSON.

Usage: scripts/bench_report.py RESULTS_DIR > RESULTS_DIR/REPORT.md
       scripts/bench_report.py --gpt2 RESULTS_DIR/gpt2_step.json      (the GPT-2 step table alone)
       scripts/bench_report.py --merge-gpt2 NOTE OUT.json RUN.json...  (used by scripts/bench_gpt2.sh)

The training step's contenders come from bench_step_t<threads>_<contender>.json, one process each;
step/gemm2 and vs_libtorch are ratios of their medians. bench_step_interleaved.json, the earlier
one-process layout, is rendered after them when present.
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


def machine(doc):
    ctx = doc.get("context", {})
    return f"{ctx.get('num_cpus')} CPUs at {ctx.get('mhz_per_cpu')} MHz, run {ctx.get('date')}"


def step_summary(table, out, ratio_key="step_over_gemm2", vs_key="vs_libtorch"):
    """The issue's targets over the rows of one table (dicts with r, the two ratios)."""
    small_r = [row[ratio_key] for row in table if row["r"] <= 64 and row.get(ratio_key) is not None]
    big_r = [row[ratio_key] for row in table if row["r"] > 64 and row.get(ratio_key) is not None]
    vs = [row[vs_key] for row in table if row.get(vs_key) is not None]
    if small_r:
        out.append(f"- median step/gemm2 over r ≤ 64: **{fmt(statistics.median(small_r))}** (target ≤ 1.05)")
    if big_r:
        out.append(f"- median step/gemm2 at r = 256: **{fmt(statistics.median(big_r))}** (target ≤ 1.15)")
    if vs:
        out.append(f"- vs_libtorch: median **{fmt(statistics.median(vs))}**, minimum **{fmt(min(vs))}** "
                   f"(targets ≥ 1.5 and ≥ 1)")
    out.append("")


def step_table(table, out):
    out.append("| in | out | n | r | gemm2 ms | step ms | step/gemm2 | FLOP bound | libtorch ms | vs_libtorch |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    def cell(x, digits):
        return fmt(x, digits) if x is not None else "n/a"

    for row in table:
        out.append(f"| {row['in']} | {row['out']} | {row['n']} | {row['r']} | {cell(row['gemm2_ms'], 2)} | "
                   f"{cell(row['step_ms'], 2)} | {cell(row['step_over_gemm2'], 3)} | {fmt(row['flop_bound'])} | "
                   f"{cell(row['torch_ms'], 2)} | {cell(row['vs_libtorch'], 3)} |")
    out.append("")


SPLIT_STEP = re.compile(r"bench_step_t(\d+)_(gemm2|ours|torch)\.json$")


def split_step_runs(results_dir):
    """{threads: {contender: doc}} from bench_step_t<threads>_<contender>.json (one process each)."""
    runs = {}
    for name in sorted(os.listdir(results_dir)):
        m = SPLIT_STEP.match(name)
        if m:
            runs.setdefault(int(m.group(1)), {})[m.group(2)] = load(os.path.join(results_dir, name))
    return runs


def split_step_table(contenders):
    """Rows joined on (in, out, n, r): each contender's median `ms`, and the ratios of those medians."""
    ms, bound = {}, {}
    for c, doc in contenders.items():
        for b in rows(doc):
            a = args(b["name"])
            key = (a["in"], a["out"], a["n"], a["r"])
            ms.setdefault(key, {})[c] = b["ms"]
            bound[key] = b["flop_bound"]
    table = []
    for key in sorted(ms, key=lambda k: (k[0], k[1], k[2], k[3])):
        g, s, t = (ms[key].get(c) for c in ("gemm2", "ours", "torch"))
        table.append({"in": key[0], "out": key[1], "n": key[2], "r": key[3], "gemm2_ms": g, "step_ms": s,
                      "torch_ms": t, "flop_bound": bound[key],
                      "step_over_gemm2": s / g if s and g else None, "vs_libtorch": t / s if s and t else None})
    return table


def load_note(contenders, out):
    """The 1-minute load average when each contender's process started (Google Benchmark's context), with a
    warning when it exceeded the CPU count: then other work shared the machine and the times are inflated."""
    names = {"gemm2": "gemm2", "ours": "ours", "torch": "libtorch"}
    loads, cpus = [], None
    for c in ("gemm2", "ours", "torch"):
        ctx = contenders.get(c, {}).get("context", {}) if contenders.get(c) else {}
        if ctx.get("load_avg"):
            loads.append((names[c], ctx["load_avg"][0]))
            cpus = ctx.get("num_cpus", cpus)
    if not loads:
        return
    text = ", ".join(f"{n} {x:.1f}" for n, x in loads)
    busy = cpus is not None and max(x for _, x in loads) > cpus
    out.append(f"1-minute load average when each contender started: {text} ({cpus} CPUs)."
               + (" **Above the CPU count: other work shared the machine; these times are not measurements.**"
                  if busy else "") + "\n")


def split_step_report(runs, out):
    any_doc = next(iter(next(iter(runs.values())).values()))
    out.append(f"Machine: {machine(any_doc)}. Each contender ran in its own process (scripts/bench.sh), so no "
               "thread pool spun while another contender was timed; the ratios are ratios of the "
               "per-contender medians. Every library in a process got the same thread count (OpenBLAS, "
               "libtorch's pool, OpenMP).\n")
    tables = {}
    for threads in sorted(runs):
        tables[threads] = split_step_table(runs[threads])
        out += [f"### {threads} thread{'s' if threads > 1 else ''}", ""]
        load_note(runs[threads], out)
        if len(tables[threads]) < 22:
            out.append(f"{len(tables[threads])} of the 22 shapes of the grid (`scripts/bench.sh --quick` runs the "
                       "d = 1024 ones).\n")
        step_table(tables[threads], out)
        step_summary(tables[threads], out)
    if 1 in tables and len(tables) > 1:
        one = {(r["in"], r["out"], r["n"], r["r"]): r for r in tables[1]}
        for threads in sorted(tables):
            if threads == 1:
                continue
            for c, key in (("gemm2", "gemm2_ms"), ("ours", "step_ms"), ("libtorch", "torch_ms")):
                sp = [one[k][key] / row[key] for row in tables[threads]
                      for k in [(row["in"], row["out"], row["n"], row["r"])]
                      if k in one and one[k][key] and row[key]]
                if sp:
                    out.append(f"- {c}: {threads}-thread speed-up over 1 thread, median over shapes "
                               f"**{fmt(statistics.median(sp), 2)}×**")
        out.append("")


def interleaved_step_report(doc, out):
    """The earlier bench_step format: the three contenders timed back to back in one process."""
    out.append(f"Machine: {machine(doc)}; both libraries call the same OpenBLAS on one thread.\n")
    table = []
    for b in rows(doc):
        a = args(b["name"])
        table.append({**a, "gemm2_ms": b["gemm2_ms"], "step_ms": b["step_ms"], "torch_ms": b.get("torch_ms"),
                      "flop_bound": b["flop_bound"], "step_over_gemm2": b["step_over_gemm2"],
                      "vs_libtorch": b.get("vs_libtorch")})
    step_table(table, out)
    step_summary(table, out)


def gpt2_report(doc, out):
    """ours vs torch per (mode, threads, ctx, batch) from gpt2_step.json (scripts/bench_gpt2.sh)."""
    runs = doc.get("runs", [])
    if doc.get("note"):
        out.append(doc["note"] + "\n")
    groups = {}
    for r in runs:
        groups.setdefault((r["mode"], r["threads"], r["ctx"], r["batch"]), {})[r["contender"]] = r
    out.append("| mode | threads | n_ctx | batch | ours tokens/s | PyTorch tokens/s | ours / PyTorch | "
               "ours peak RSS | PyTorch peak RSS |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def tps(r):
        return f"{r['tokens_per_s']:.1f}" if r else "n/a"

    def rss(r):
        return f"{r['peak_rss_mib'] / 1024:.2f} GiB" if r else "n/a"

    for key in sorted(groups):
        ours, torch = groups[key].get("ours"), groups[key].get("torch")
        ratio = f"**{ours['tokens_per_s'] / torch['tokens_per_s']:.2f}×**" if ours and torch else "n/a"
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {tps(ours)} | {tps(torch)} | {ratio} | "
                   f"{rss(ours)} | {rss(torch)} |")
    out.append("")
    out.append("Target (LoRA, n_ctx 256, batch 4, 2 threads): ours / PyTorch ≥ 1.5 and less peak memory.\n")
    loads = [r["load_avg_start"] for r in runs if r.get("load_avg_start", -1) >= 0]
    cpus = doc.get("cpus")
    if loads:
        busy = cpus is not None and max(loads) > cpus
        out.append(f"1-minute load average before the first step: {min(loads):.1f} to {max(loads):.1f}"
                   + (f" ({cpus} CPUs). **Above the CPU count: other work shared the machine; these figures are "
                      "not measurements.**" if busy else ".") + "\n")
    for r in runs:
        parts = r.get("breakdown_ms")
        if r["contender"] != "ours" or not parts:
            continue
        total = sum(parts.values())
        out.append(f"Where our step's time goes ({r['mode']}, {r['threads']} thread(s), n_ctx {r['ctx']}, "
                   f"batch {r['batch']}; ms per step):\n")
        out.append("| part | ms | share |")
        out.append("|---|---:|---:|")
        for name, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
            out.append(f"| {name} | {ms:.1f} | {100 * ms / total:.0f}% |" if total else f"| {name} | {ms:.1f} | |")
        out.append("")


def merge_gpt2(out_path, inputs, note):
    """Collects the per-process JSON of scripts/bench_gpt2.sh into gpt2_step.json. Runs already there for
    other (mode, threads, n_ctx, batch, contender) keys are kept, and the note says they are earlier ones."""
    runs = [r for r in (load(p) for p in inputs) if r]

    def key(r):
        return (r["mode"], r["threads"], r["ctx"], r["batch"], r["contender"])

    measured = {key(r) for r in runs}
    old = load(out_path) or {}
    kept = [r for r in old.get("runs", []) if key(r) not in measured]
    if kept:
        note += " Kept from an earlier run (" + str(len(kept)) + " runs): " + old.get("note", "")
    with open(out_path, "w") as f:
        json.dump({"note": note, "cpus": os.cpu_count(), "runs": runs + kept}, f, indent=2)
        f.write("\n")


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
    if len(sys.argv) > 1 and sys.argv[1] == "--merge-gpt2":
        merge_gpt2(sys.argv[3], sys.argv[4:], sys.argv[2])
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--gpt2":
        out = []
        gpt2_report(load(sys.argv[2]), out)
        print("\n".join(out))
        return
    d = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"
    out = ["# Benchmark report", "", "Generated by `scripts/bench.sh` (medians of 3 repetitions).", ""]
    runs = split_step_runs(d)
    if runs:
        out += ["## Training step: ours vs the two GEMMs vs libtorch, one process per contender", ""]
        split_step_report(runs, out)
    gpt2 = load(os.path.join(d, "gpt2_step.json"))
    if gpt2:
        out += ["## GPT-2 small training step: ours vs PyTorch", ""]
        gpt2_report(gpt2, out)
    old = load(os.path.join(d, "bench_step_interleaved.json"))
    if old:
        out += ["## Training step, earlier run: the three contenders interleaved in one process (1 thread)", "",
                "Kept for the record until the grid is rerun with one process per contender. At one thread "
                "the contenders do not spin against each other; with more threads this layout is not a "
                "measurement (see above).", ""]
        interleaved_step_report(old, out)
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
