#!/usr/bin/env bash
# Reproduces the README's performance tables: installs libtorch (Debian's libtorch-dev) if missing,
# builds the benchmarks in the release preset against it, runs the training-step grid with three
# repetitions (medians), the inference and memory benchmarks, keeps the JSON under benchmarks/results/
# and renders benchmarks/results/REPORT.md and the rank-vs-memory plot.
# Usage: scripts/bench.sh [--quick]   (--quick: d = 1024 shapes only, for a smoke test)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh libtorch-dev python3
cmake --preset release -DLORA_BUILD_BENCHMARKS=ON -DLORA_WITH_TORCH=ON >/dev/null
cmake --build --preset release -j "$(nproc)" --target bench_step bench_linear bench_memory bench_layers
out=benchmarks/results
mkdir -p "$out"
filter=.
[ "${1:-}" = "--quick" ] && filter='in:1024/'
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
run() {  # run NAME ARGS...: JSON to $out/NAME.json, console to stderr
  local name=$1
  shift
  "build/release/benchmarks/$name" --benchmark_out="$out/$name.json" --benchmark_out_format=json "$@" >&2
}
run bench_step --benchmark_repetitions=3 --benchmark_report_aggregates_only=true --benchmark_filter="$filter"
run bench_linear --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
run bench_memory
run bench_layers --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
python3 scripts/bench_report.py "$out" > "$out/REPORT.md"
if command -v gnuplot >/dev/null; then
  gnuplot "$out/memory_plot.gp" && echo "plot: $out/rank_vs_memory.png" >&2
fi
echo "report: $out/REPORT.md" >&2
