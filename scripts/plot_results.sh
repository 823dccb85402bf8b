#!/usr/bin/env bash
# Renders the fashion_mnist example's results as two PNG plots:
#   OUT_DIR/accuracy_vs_rank.png     test accuracy against LoRA rank (log2 axis), mean over seeds with
#                                    ± std error bars, one line per domain; full fine-tuning (dashed)
#                                    and head-only (dotted) as references
#   OUT_DIR/train_state_vs_rank.png  training-state bytes against LoRA rank (log axis), with full
#                                    fine-tuning and head-only as references
#
# Usage: scripts/plot_results.sh RESULTS.json OUT_DIR
#
# RESULTS.json is what `fashion_mnist --json` writes (the field list is at the top of
# examples/fashion_mnist.cpp); this script reads:
#   {"base": {"test_accuracy": 0.88},
#    "results": [{"domain": "mild"|"extreme", "method": "lora"|"full"|"head", "rank": 8 (0 unless lora),
#                 "test_accuracy": {"mean": 0.85, "std": 0.002 or null}, "train_state_bytes": 199936}, ...]}
# Needs python3 (standard library only) and gnuplot (Debian: apt-get install gnuplot-nox).
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 RESULTS.json OUT_DIR" >&2
  exit 2
fi
results=$1
out_dir=$2
[ -r "$results" ] || { echo "$0: cannot read '$results'" >&2; exit 1; }
command -v python3 >/dev/null || { echo "$0: python3 is needed" >&2; exit 1; }
command -v gnuplot >/dev/null || { echo "$0: gnuplot is needed (apt-get install gnuplot-nox)" >&2; exit 1; }
mkdir -p "$out_dir"

# pngcairo draws antialiased lines and dash patterns; plain png (libgd) is the fallback.
if gnuplot -e "set terminal pngcairo" >/dev/null 2>&1; then
  terminal="pngcairo size 1100,700 enhanced font 'DejaVu Sans,12' linewidth 1.5"
else
  terminal="png size 1100,700 enhanced font 'DejaVu Sans,11'"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# JSON -> gnuplot data files (one per domain for the LoRA sweep) and the plot script, whose reference
# lines depend on which runs exist.
python3 - "$results" "$work" "$out_dir" "$terminal" <<'PY'
import json, os, sys

results_path, work, out_dir, terminal = sys.argv[1:5]
try:
    with open(results_path) as f:
        results = json.load(f)
    rows = results["results"]
except (OSError, ValueError, KeyError, TypeError) as e:
    sys.exit(f"plot_results: '{results_path}' is not a results file with a 'results' list: {e}")

# (domain, method, rank) -> (test accuracy mean, its std or 0, train_state_bytes)
summary = {}
for i, row in enumerate(rows):
    try:
        key = (str(row["domain"]), str(row["method"]), int(row["rank"]) if row["method"] == "lora" else 0)
        acc = row["test_accuracy"]
        value = (float(acc["mean"]), float(acc["std"] or 0.0), float(row["train_state_bytes"]))
    except (KeyError, TypeError, ValueError) as e:
        sys.exit(f"plot_results: result {i} of '{results_path}' lacks a field or has a bad value: {e}")
    if key[1] == "lora" and key[2] <= 0:
        sys.exit(f"plot_results: result {i} is a LoRA result with rank {key[2]}")
    if key in summary:
        sys.exit(f"plot_results: result {i} repeats {key}")
    summary[key] = value

seeds = results.get("config", {}).get("seeds") or []
seeds = f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else "one seed"

order = {"mild": 0, "extreme": 1}
domains = sorted({k[0] for k in summary}, key=lambda d: (order.get(d, 2), d))
colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
colour = {d: colours[i % len(colours)] for i, d in enumerate(domains)}
ranks = sorted({k[2] for k in summary if k[1] == "lora"})
lo, hi = (ranks[0], ranks[-1]) if ranks else (1, 64)


def q(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


lora_series = []  # (domain, data file)
for d in domains:
    rows = sorted((k[2], v) for k, v in summary.items() if k[0] == d and k[1] == "lora")
    if not rows:
        continue
    path = os.path.join(work, f"lora_{len(lora_series)}.dat")
    with open(path, "w") as f:
        f.write("# rank accuracy_percent std_percent train_state_bytes\n")
        for r, (acc, sd, state) in rows:
            f.write(f"{r} {100 * acc:.6g} {100 * sd:.6g} {state:.10g}\n")
    lora_series.append((d, path))


# Reference lines: dashed and dotted where the terminal draws dash patterns (cairo); libgd's png does
# not, so there they carry sparse markers instead.
if terminal.startswith("pngcairo"):
    REFERENCES = (("full", "lines dt 2", "full fine-tuning"), ("head", "lines dt 3", "head only"))
    BASE_STYLE = "lines dt 4"
else:
    REFERENCES = (("full", "linespoints pt 4 pi 20", "full fine-tuning"), ("head", "linespoints pt 8 pi 20", "head only"))
    BASE_STYLE = "lines"


def human_bytes(n):
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.3g} {unit}"
        n /= 1000


def reference(method, d):
    return summary.get((d, method, 0))


common = f"""set terminal {terminal}
set grid xtics ytics mytics lc rgb '#dddddd' lw 1
set logscale x 2
set xrange [{lo / 1.5}:{hi * 1.5}]
set xtics ({", ".join(str(r) for r in ranks) if ranks else "1, 2, 4, 8, 16, 32, 64"})
set xlabel 'LoRA rank r'
set key outside right center vertical box spacing 1.3 width 1
set border lw 1
"""

# Plot 1: accuracy against rank.
plots = []
for d, path in lora_series:
    plots.append(f"{q(path)} using 1:2:3 with yerrorlines lw 2.5 pt 7 ps 1.3 lc rgb '{colour[d]}' title {q('LoRA, ' + d)}")
for method, style, label in REFERENCES:
    for d in domains:
        ref = reference(method, d)
        if ref:
            plots.append(f"{100 * ref[0]:.6g} with {style} lw 2 lc rgb '{colour[d]}' "
                         f"title {q(f'{label}, {d} ({100 * ref[0]:.1f} ± {100 * ref[1]:.1f})')}")
base = results.get("base", {}).get("test_accuracy")
if isinstance(base, (int, float)):
    plots.append(f"{100 * base:.6g} with {BASE_STYLE} lw 1.5 lc rgb '#555555' title 'base model, unshifted test set'")
accuracy_script = common + f"""set output {q(os.path.join(out_dir, "accuracy_vs_rank.png"))}
set title "Test accuracy after fine-tuning on each shifted domain\\n{{/*0.8 Fashion-MNIST, MLP 784-256-128-10; {seeds}; lr chosen on validation}}" font ',14'
set ylabel 'test accuracy (%)'
set yrange [*:100]
set format y '%.0f'
plot {", ".join(plots) if plots else "NaN notitle"}
"""

# Plot 2: training-state bytes against rank. LoRA's state does not depend on the domain, so domains
# whose sweeps agree share one line.
groups = {}  # the sweep's (rank, bytes) rows -> [(domain, data file)]
for d, path in lora_series:
    rows = tuple(sorted((k[2], round(v[2])) for k, v in summary.items() if k[0] == d and k[1] == "lora"))
    groups.setdefault(rows, []).append((d, path))
plots = []
for i, members in enumerate(groups.values()):
    d, path = members[0]
    name = "LoRA (" + " and ".join(m[0] for m in members) + ")"
    plots.append(f"{q(path)} using 1:4 with linespoints lw 2.5 pt {7 + 2 * i} ps 1.3 lc rgb '{colour[d]}' title {q(name)}")
for method, style, label in REFERENCES:
    values = sorted({round(reference(method, d)[2]) for d in domains if reference(method, d)})
    for v in values:
        plots.append(f"{v} with {style} lw 2 lc rgb '#333333' title {q(f'{label} ({human_bytes(v)})')}")
state_script = common + f"""set output {q(os.path.join(out_dir, "train_state_vs_rank.png"))}
set title "Memory held for training (training state)\\n{{/*0.8 Fashion-MNIST, MLP 784-256-128-10}}" font ',14'
set ylabel 'training-state bytes'
set logscale y 10
set format y '%.0s %cB'
plot {", ".join(plots) if plots else "NaN notitle"}
"""

with open(os.path.join(work, "plots.gp"), "w") as f:
    f.write(accuracy_script + "\nreset\n" + state_script)
PY

gnuplot "$work/plots.gp"
echo "wrote $out_dir/accuracy_vs_rank.png and $out_dir/train_state_vs_rank.png"
