// bench_serving: inference of one layer over a batch whose rows use different adapters (adapter_routing.hpp),
// every contender on the same operands, back to back in one loop; counters are medians and their ratios.
//
//  base     Y = X Wᵀ + b, no adapter (the floor)
//  one      every row on one adapter (a routing with one group: the single-adapter batch)
//  ours     rows spread round-robin over A adapters (row i uses adapter i mod A: every group scattered),
//           one product with W, then per adapter gather, two thin products, scatter-add
//  registry ours with the adapters published in an io::adapter_registry over the same layer (copies of
//           its adapters, held outside it),
//           the routing bound to the registry's snapshot every batch (one atomic load, the lookups, the
//           bound source's allocation) and each group's factors found by part address
//  masked   the loop over adapters with row masks: for each adapter its term over every row of the
//           batch, masked to its rows (Y += M_a ⊙ s (X Aᵀ) Bᵀ): A times the adapter work of one
//  merged   switching merged weights: per adapter, merge s B A into W, run its rows, unmerge (at d 1024
//           and A 4 only: an exact merge and unmerge cost ~25 ms per adapter at d 1024, so A 64 takes
//           1.5–6.4 s a batch, and d 4096 sixteen times that)
//
// Arguments: d = in = out, n = rows, r = rank of every adapter, A = adapters. Counters: *_us (medians),
// ours_over_one (target at r 8, A 16: ≤ 1.3), registry_over_ours, masked_over_ours and merged_over_ours (target at A
// 64: masked ≥ 3). One thread unless OPENBLAS_NUM_THREADS says otherwise. Results:
// benchmarks/results/bench_serving_1thread.json and bench_serving_2threads.json.
#include <benchmark/benchmark.h>

#include <lora/io/adapter_registry.hpp>
#include <lora/lora.hpp>
#include <string>
#include <utility>
#include <vector>

#include "bench_common.hpp"

namespace {

using lora_bench::median;
using lora_bench::random;
using lora_bench::random_adapter;
using lora_bench::seconds;
using mat = lora::matrix<float>;

/// Y = X Wᵀ + Σ_a M_a ⊙ s_a (X A_aᵀ) B_aᵀ, every adapter over every row (mask: the rows of adapter a).
void masked_loop(const lora::linear<float>& layer, const std::vector<std::string>& names, const mat& x,
                 const std::vector<lora::vector<float>>& masks, mat& y, mat& h, mat& d) {
  y.noalias() = x * layer.stored_weight().transpose();
  for (std::size_t k = 0; k < names.size(); ++k) {
    const auto& a = layer.adapter(names[k]);
    h.noalias() = x * a.a().transpose();
    h *= a.scaling();
    d.noalias() = h * a.b().transpose();
    y.noalias() += masks[k].asDiagonal() * d;
  }
}

/// Per adapter: merge it, Y[rows] = X[rows] Wᵀ, unmerge.
void merged_switching(lora::linear<float>& layer, const lora::adapter_routing& routing, const mat& x, mat& y,
                      lora::inference_workspace<float>& ws, mat& xg, mat& yg) {
  for (const auto& g : routing.groups()) {
    const auto m = static_cast<lora::index>(g.rows.size());
    xg.resize(m, x.cols());
    yg.resize(m, y.cols());
    for (lora::index k = 0; k < m; ++k) xg.row(k) = x.row(g.rows[static_cast<std::size_t>(k)]);
    layer.merge({g.adapter});
    layer.infer(xg, yg, ws);
    layer.unmerge();
    for (lora::index k = 0; k < m; ++k) y.row(g.rows[static_cast<std::size_t>(k)]) = yg.row(k);
  }
}

void bm_serving(benchmark::State& st) {
  const lora::index d = st.range(0), n = st.range(1), r = st.range(2), adapters = st.range(3);
  lora::linear<float> layer(random(d, d, 1) * 0.02f, "fc");
  std::vector<std::string> names, rows, one(static_cast<std::size_t>(n), "a0");
  for (lora::index a = 0; a < adapters; ++a) {
    names.push_back("a" + std::to_string(a));
    layer.add_adapter(names.back(), random_adapter(r));
  }
  std::vector<lora::vector<float>> masks(names.size(), lora::vector<float>::Zero(n));
  for (lora::index i = 0; i < n; ++i) {
    rows.push_back(names[static_cast<std::size_t>(i % adapters)]);
    masks[static_cast<std::size_t>(i % adapters)](i) = 1.0f;
  }
  const lora::adapter_routing spread(rows), single(one);
  // Over the same layer (its own adapters play no part in a bound routing): the same weight, as warm in
  // cache as for `ours`, so that the ratio is the registry's own cost.
  lora::io::adapter_registry<float> registry(std::vector<std::pair<std::string, lora::linear<float>*>>{{"fc", &layer}});
  for (const auto& name : names)
    registry.load(name, lora::io::peft_adapter::from_layers(
                            std::vector<std::pair<std::string, lora::linear<float>*>>{{"fc", &layer}}, name));
  lora::adapter_routing bound = spread;
  const mat x = random(n, d, 2);
  mat y(n, d), h, dd, xg, yg;
  lora::inference_workspace<float> ws;
  const bool with_merged = d <= 1024 && adapters <= 4;
  std::vector<double> t_base, t_one, t_ours, t_registry, t_masked, t_merged;
  for (auto _ : st) {
    t_base.push_back(seconds([&] { y.noalias() = x * layer.stored_weight().transpose(); }));
    t_one.push_back(seconds([&] { layer.infer(x, single, y, ws); }));
    t_ours.push_back(seconds([&] { layer.infer(x, spread, y, ws); }));
    t_registry.push_back(seconds([&] {
      registry.bind(bound);
      layer.infer(x, bound, y, ws);
    }));
    t_masked.push_back(seconds([&] { masked_loop(layer, names, x, masks, y, h, dd); }));
    if (with_merged) t_merged.push_back(seconds([&] { merged_switching(layer, spread, x, y, ws, xg, yg); }));
    benchmark::DoNotOptimize(y.data());
  }
  const double ours = median(t_ours);
  st.counters["base_us"] = 1e6 * median(t_base);
  st.counters["one_us"] = 1e6 * median(t_one);
  st.counters["ours_us"] = 1e6 * ours;
  st.counters["masked_us"] = 1e6 * median(t_masked);
  st.counters["ours_over_one"] = ours / median(t_one);
  st.counters["ours_over_base"] = ours / median(t_base);
  st.counters["registry_us"] = 1e6 * median(t_registry);
  st.counters["registry_over_ours"] = median(t_registry) / ours;
  st.counters["masked_over_ours"] = median(t_masked) / ours;
  if (with_merged) {
    st.counters["merged_us"] = 1e6 * median(t_merged);
    st.counters["merged_over_ours"] = median(t_merged) / ours;
  }
}

BENCHMARK(bm_serving)
    ->ArgNames({"d", "n", "r", "A"})
    ->ArgsProduct({{1024, 4096}, {64, 512}, {8, 64}, {4, 16, 64}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.3);

}  // namespace

BENCHMARK_MAIN();
