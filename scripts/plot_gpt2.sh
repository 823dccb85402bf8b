#!/usr/bin/env bash
# Renders gpt2_finetune's study results as two PNG plots:
#   OUT_DIR/bits_per_byte_vs_rank.png  test bits per byte against LoRA rank (log2 axis), mean over seeds
#                                      with ± std error bars, one line per shift; full fine-tuning
#                                      (dashed), norms_and_head (dotted) and the base (no fine-tuning,
#                                      thin) as horizontal references in the shift's colour
#   OUT_DIR/training_curves.png        training loss (bits per token) against step, one panel per shift,
#                                      one line per method (first seed, chosen learning rate)
#
# Usage: scripts/plot_gpt2.sh RESULTS.json OUT_DIR
#
# RESULTS.json is what `gpt2_finetune study --json` writes (fields listed above study_json in
# examples/gpt2_finetune.cpp); this script reads
#   {"results": [{"shift", "method": "lora"|"full"|"norms_and_head"|"none", "rank",
#                 "test_bits_per_byte": {"mean", "std" or null}, "curve": [[step, nats per token], ...]}]}
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

if gnuplot -e "set terminal pngcairo" >/dev/null 2>&1; then
  terminal="pngcairo size 1100,700 enhanced font 'DejaVu Sans,12' linewidth 1.5"
  wide="pngcairo size 1500,550 enhanced font 'DejaVu Sans,11' linewidth 1.5"
  cairo=1
else
  terminal="png size 1100,700 enhanced font 'DejaVu Sans,11'"
  wide="png size 1500,550 enhanced font 'DejaVu Sans,10'"
  cairo=0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 - "$results" "$work" "$out_dir" "$terminal" "$wide" "$cairo" <<'PY'
import json, math, os, sys

results_path, work, out_dir, terminal, wide, cairo = sys.argv[1:7]
cairo = cairo == "1"
try:
    with open(results_path) as f:
        results = json.load(f)
    rows = results["results"]
except (OSError, ValueError, KeyError, TypeError) as e:
    sys.exit(f"plot_gpt2: '{results_path}' is not a study results file with a 'results' list: {e}")

summary = {}  # (shift, method, rank) -> (mean, std, curve)
for i, row in enumerate(rows):
    try:
        method = str(row["method"])
        key = (str(row["shift"]), method, int(row["rank"]) if method == "lora" else 0)
        t = row["test_bits_per_byte"]
        summary[key] = (float(t["mean"]), float(t["std"] or 0.0), row.get("curve") or [])
    except (KeyError, TypeError, ValueError) as e:
        sys.exit(f"plot_gpt2: result {i} of '{results_path}' lacks a field or has a bad value: {e}")

cfg = results.get("config", {})
seeds = cfg.get("seeds") or []
seeds = f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else "one seed"
order = {"mild": 0, "larger": 1, "extreme": 2}
names = {"mild": "mild (held-out English)", "larger": "larger (Spanish)", "extreme": "extreme (Russian)"}
shifts = sorted({k[0] for k in summary}, key=lambda s: (order.get(s, 9), s))
colours = ["#1f77b4", "#ff7f0e", "#d62728", "#2ca02c", "#9467bd"]
colour = {s: colours[i % len(colours)] for i, s in enumerate(shifts)}
ranks = sorted({k[2] for k in summary if k[1] == "lora"})
lo, hi = (ranks[0], ranks[-1]) if ranks else (1, 64)


def q(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


if cairo:
    refs = (("full", "lines dt 2 lw 2", "full"), ("norms_and_head", "lines dt 3 lw 2", "LN+head"), ("none", "lines dt 4 lw 1", "base"))
else:
    refs = (("full", "linespoints pt 4 pi 20 lw 2", "full"), ("norms_and_head", "linespoints pt 8 pi 20 lw 2", "LN+head"), ("none", "lines lw 1", "base"))

plots = []
for s in shifts:
    pts = sorted((k[2], v) for k, v in summary.items() if k[0] == s and k[1] == "lora")
    if pts:
        path = os.path.join(work, f"lora_{s}.dat")
        with open(path, "w") as f:
            for r, (m, sd, _) in pts:
                f.write(f"{r} {m:.6g} {sd:.6g}\n")
        plots.append(f"{q(path)} using 1:2:3 with yerrorlines lw 2.5 pt 7 ps 1.3 lc rgb '{colour[s]}' title {q('LoRA, ' + names.get(s, s))}")
    for method, style, label in refs:
        v = summary.get((s, method, 0))
        if v:
            plots.append(f"{v[0]:.6g} with {style} lc rgb '{colour[s]}' title {q(f'{label}, {s} ({v[0]:.3f})')}")

# The base of a large shift can sit far above everything else: the y axis stops above the fine-tuned
# results (the legend still gives every reference's value).
tuned = [v[0] for k, v in summary.items() if k[1] != "none"]
top = max(tuned) * 1.08 if tuned else 10

script = f"""set terminal {terminal}
set output {q(os.path.join(out_dir, "bits_per_byte_vs_rank.png"))}
set grid xtics ytics lc rgb '#dddddd' lw 1
set logscale x 2
set xrange [{lo / 1.5}:{hi * 1.5}]
set xtics ({", ".join(str(r) for r in ranks) if ranks else "1, 2, 4, 8, 16, 32, 64"})
set xlabel 'LoRA rank r'
set ylabel 'test bits per byte (lower is better)'
set key outside right center vertical box spacing 1.2 width 1
set title "Byte-level GPT-2 fine-tuned on three shifts\\n{{/*0.8 LoRA (c\\\\_attn, c\\\\_proj, c\\\\_fc; alpha = 2r) vs full, LN+head, none; {seeds}}}" font ',14'
set yrange [*:{top:.3g}]
plot {", ".join(plots) if plots else "NaN notitle"}
"""

# Training curves: one panel per shift.
panels = []
styles = {"full": "dt 2", "norms_and_head": "dt 3"} if cairo else {}
for s in shifts:
    curves = []
    for (sh, method, rank), (_, _, curve) in sorted(summary.items(), key=lambda kv: (kv[0][1] != "lora", kv[0][2], kv[0][1])):
        if sh != s or not curve:
            continue
        label = f"LoRA r={rank}" if method == "lora" else method
        path = os.path.join(work, f"curve_{s}_{method}_{rank}.dat")
        with open(path, "w") as f:
            for step, loss in curve:
                f.write(f"{step} {loss / math.log(2):.6g}\n")
        curves.append(f"{q(path)} using 1:2 with lines lw 2 {styles.get(method, '')} title {q(label)}")
    panels.append(f"set title {q(names.get(s, s))}\nplot {', '.join(curves) if curves else 'NaN notitle'}\n")
script += f"""
reset
set terminal {wide}
set output {q(os.path.join(out_dir, "training_curves.png"))}
set grid lc rgb '#dddddd'
set xlabel 'step'
set ylabel 'training loss (bits per token)'
set key top right
set multiplot layout 1,{max(1, len(panels))} title "Training curves (first seed, chosen learning rate)"
{''.join(panels)}unset multiplot
"""
with open(os.path.join(work, "plots.gp"), "w") as f:
    f.write(script)
PY

gnuplot "$work/plots.gp"
echo "wrote $out_dir/bits_per_byte_vs_rank.png and $out_dir/training_curves.png"
