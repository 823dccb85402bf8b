#!/usr/bin/env bash
# GPT-2 small's whole training step, ours against PyTorch, side by side: builds bench_gpt2_step in the
# release preset, then for every thread count and shape runs it and benchmarks/torch_gpt2_step.py (Debian's
# /usr/bin/python3 with python3-torch 1.13.1) each in a process of its own, one after the other, so that
# neither's thread pool runs while the other is timed. Every library gets the same thread count
# (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS, torch.set_num_threads).
#
# Writes benchmarks/results/gpt2_step.json (every run: tokens/s, peak RSS, our time breakdown),
# benchmarks/results/gpt2_step.md (the table) and re-renders benchmarks/results/REPORT.md.
#
# Usage: scripts/bench_gpt2.sh [--quick] [--full] [--shapes "CTXxBATCH ..."]
#   default shapes: 256x4 (the issue's headline); --shapes "256x1 256x8 1024x1 1024x4" adds the others
#   BENCH_THREADS  thread counts (default "1 2")
#   --quick        1 warm-up step and 3 timed steps (default 2 and 10)
#   --full         also full fine-tuning (both contenders)
set -euo pipefail
cd "$(dirname "$0")/.."
shapes="256x4" warmup=2 steps=10 modes="lora"
while [ $# -gt 0 ]; do
  case $1 in
    --quick) warmup=1 steps=3 ;;
    --full) modes="lora full" ;;
    --shapes) shapes=$2 && shift ;;
    *) echo "usage: $0 [--quick] [--full] [--shapes \"CTXxBATCH ...\"]" >&2 && exit 2 ;;
  esac
  shift
done
scripts/setup.sh python3-torch
cmake --preset release -DLORA_BUILD_BENCHMARKS=ON >/dev/null
cmake --build --preset release -j "${JOBS:-$(nproc)}" --target bench_gpt2_step
out=benchmarks/results
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
runs=()
for mode in $modes; do
  flag=()
  [ "$mode" = full ] && flag=(--full)
  for t in ${BENCH_THREADS:-1 2}; do
    for shape in $shapes; do
      ctx=${shape%x*} batch=${shape#*x}
      common=(--ctx "$ctx" --batch "$batch" --warmup "$warmup" --steps "$steps" "${flag[@]}")
      base="$tmp/${mode}_t${t}_${ctx}x${batch}"
      OPENBLAS_NUM_THREADS=$t OMP_NUM_THREADS=$t MKL_NUM_THREADS=$t \
        build/release/benchmarks/bench_gpt2_step "${common[@]}" --json "$base.ours.json" >&2
      /usr/bin/python3 benchmarks/torch_gpt2_step.py --threads "$t" "${common[@]}" --json "$base.torch.json" >&2
      runs+=("$base.ours.json" "$base.torch.json")
    done
  done
done
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
torch_version=$(/usr/bin/python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)
note="Run $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) CPUs ($cpu); median of $steps steps after $warmup \
warm-up step(s); each contender in its own process; PyTorch $torch_version (Debian's python3-torch) built \
from torch.nn with PEFT's unmerged LoRA."
python3 scripts/bench_report.py --merge-gpt2 "$note" "$out/gpt2_step.json" "${runs[@]}"
python3 scripts/bench_report.py --gpt2 "$out/gpt2_step.json" | tee "$out/gpt2_step.md"
python3 scripts/bench_report.py "$out" >"$out/REPORT.md"
echo "report: $out/gpt2_step.md, $out/REPORT.md" >&2
