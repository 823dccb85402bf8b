#!/usr/bin/env bash
# Reproduces the README's performance tables: installs libtorch (Debian's libtorch-dev) if missing,
# builds the benchmarks in the release preset against it, runs the training-step grid with three
# repetitions (medians), the inference and memory benchmarks, keeps the JSON under benchmarks/results/
# and renders benchmarks/results/REPORT.md and the rank-vs-memory plot.
#
# The training step has three contenders (the two GEMMs alone, our step, libtorch's step). Each runs in a
# process of its own, at each thread count of BENCH_THREADS (default "1 2"), so that one's spinning thread
# pool cannot slow the next one down; every library in that process gets the same count (OpenBLAS through
# OPENBLAS_NUM_THREADS, libtorch's pool through at::set_num_threads, OpenMP through OMP_NUM_THREADS).
# Results: benchmarks/results/bench_step_t<threads>_<contender>.json; bench_report.py pairs them up.
#
# Usage: scripts/bench.sh [--quick] [--step-only]
#   --quick      d = 1024 shapes of the training-step grid only (15 of 22), for a smoke test
#   --step-only  skip the inference, memory and layer benchmarks
#   BENCH_SHAPES  a regular expression over the step grid's names (overrides --quick), BENCH_THREADS
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0 step_only=0
for arg in "$@"; do
  case $arg in
    --quick) quick=1 ;;
    --step-only) step_only=1 ;;
    *) echo "usage: $0 [--quick] [--step-only]" >&2 && exit 2 ;;
  esac
done
scripts/setup.sh libtorch-dev python3
cmake --preset release -DLORA_BUILD_BENCHMARKS=ON -DLORA_WITH_TORCH=ON >/dev/null
targets="bench_step bench_linear bench_memory bench_layers"
[ "$step_only" = 1 ] && targets=bench_step
# shellcheck disable=SC2086
cmake --build --preset release -j "${JOBS:-$(nproc)}" --target $targets
out=benchmarks/results
mkdir -p "$out"
shapes=.
[ "$quick" = 1 ] && shapes='in:1024/'
shapes=${BENCH_SHAPES:-$shapes}  # e.g. BENCH_SHAPES='in:1024/out:1024/n:512/' for a quick subset
run() {  # run OUT BINARY ARGS...: JSON to $out/OUT.json, console to stderr
  local name=$1 bin=$2
  shift 2
  "build/release/benchmarks/$bin" --benchmark_out="$out/$name.json" --benchmark_out_format=json "$@" >&2
}
rm -f "$out"/bench_step_t*_*.json
for t in ${BENCH_THREADS:-1 2}; do
  for c in gemm2 ours torch; do
    OPENBLAS_NUM_THREADS=$t OMP_NUM_THREADS=$t run "bench_step_t${t}_$c" bench_step --benchmark_repetitions=3 \
      --benchmark_report_aggregates_only=true --benchmark_filter="^bm_step_$c/$shapes"
  done
done
if [ "$step_only" = 0 ]; then
  export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  run bench_linear bench_linear --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
  run bench_memory bench_memory
  run bench_layers bench_layers --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
fi
python3 scripts/bench_report.py "$out" >"$out/REPORT.md"
if [ "$step_only" = 0 ] && command -v gnuplot >/dev/null; then
  gnuplot "$out/memory_plot.gp" && echo "plot: $out/rank_vs_memory.png" >&2
fi
echo "report: $out/REPORT.md" >&2
