// benchmarks/bench_common.hpp: what every benchmark binary shares: seeded operands and timing of
// contenders interleaved in one loop, compared by their medians.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <lora/lora.hpp>
#include <vector>

namespace lora_bench {

/// rows x cols uniform in [-1, 1), reproducible from the seed.
inline lora::matrix<float> random(lora::index rows, lora::index cols, std::uint64_t seed) {
  lora::rng gen(seed);
  lora::matrix<float> m(rows, cols);
  for (lora::index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(gen.uniform(-1, 1));
  return m;
}

/// The median of the samples (0 for none).
inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

/// Wall-clock seconds that f() takes.
template <typename F>
double seconds(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// A random_ab adapter of rank r with alpha = 2r (scaling 2).
inline lora::adapter_config random_adapter(lora::index r) {
  lora::adapter_config c;
  c.rank = r;
  c.alpha = 2.0 * static_cast<double>(r);
  c.init = lora::init_method::random_ab;
  return c;
}

}  // namespace lora_bench
