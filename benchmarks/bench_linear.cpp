// bench_linear: serving costs of lora::linear.
//
//  bm_infer  the frozen layer alone (Y = X Wᵀ), the same layer with an adapter merged into W, and the
//            unmerged adapter path (Y = X Wᵀ + s (X Aᵀ) Bᵀ), timed back to back on the same operands;
//            counters are ratios of medians. The unmerged path adds 2 n r (in + out) FLOPs to 2 n in·out,
//            so its ideal ratio is 1 + r (in + out) / (in·out); the target allows 1.5 times that overhead.
//  bm_merge  merge and exact unmerge of one adapter into one layer.
//
// Arguments: d = in = out, n = rows per call (1 = a single decode step, 512 = a prefill chunk), r = rank.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <lora/lora.hpp>

#include <vector>
#include "bench_common.hpp"

namespace {

using lora_bench::median;
using lora_bench::random;
using lora_bench::random_adapter;
using lora_bench::seconds;

using mat = lora::matrix<float>;

void bm_infer(benchmark::State& st) {
  const lora::index d = st.range(0), n = st.range(1), r = st.range(2);
  mat w = random(d, d, 1), w_merged = w;
  const mat x = random(n, d, 2);
  mat y(n, d);
  lora::linear<float> unmerged(lora::view, w, "unmerged"), merged(lora::view, w_merged, "merged");
  unmerged.add_adapter("default", random_adapter(r));
  merged.add_adapter("default", random_adapter(r));
  merged.merge();
  lora::inference_workspace<float> ws;
  std::vector<double> t_base, t_merged, t_unmerged;
  for (auto _ : st) {
    t_base.push_back(seconds([&] { y.noalias() = x * w.transpose(); }));
    t_merged.push_back(seconds([&] { merged.infer(x, y, ws); }));
    t_unmerged.push_back(seconds([&] { unmerged.infer(x, y, ws); }));
    benchmark::DoNotOptimize(y.data());
  }
  const double base = median(t_base);
  st.counters["base_us"] = 1e6 * base;
  st.counters["merged_over_base"] = median(t_merged) / base;
  st.counters["unmerged_over_base"] = median(t_unmerged) / base;
  st.counters["target"] = 1.0 + 1.5 * static_cast<double>(r) * 2.0 * static_cast<double>(d) /
                                    (static_cast<double>(d) * static_cast<double>(d));
}

void bm_merge(benchmark::State& st) {
  const lora::index d = st.range(0), r = st.range(1);
  mat w = random(d, d, 3);
  lora::linear<float> layer(lora::view, w, "layer");
  layer.add_adapter("default", random_adapter(r));
  std::vector<double> t_merge, t_unmerge;
  for (auto _ : st) {
    t_merge.push_back(seconds([&] { layer.merge(); }));
    t_unmerge.push_back(seconds([&] { layer.unmerge(); }));
  }
  st.counters["merge_ms"] = 1e3 * median(t_merge);
  st.counters["unmerge_ms"] = 1e3 * median(t_unmerge);
}

// d = 4096 (7B-class projections) and 1024; n from one decode step to a prefill chunk; r = 8 and 64.
BENCHMARK(bm_infer)
    ->ArgNames({"d", "n", "r"})
    ->ArgsProduct({{1024, 4096}, {1, 8, 64, 512}, {8, 64}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.3);
BENCHMARK(bm_merge)->ArgNames({"d", "r"})->ArgsProduct({{1024, 4096}, {8, 64}})->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
