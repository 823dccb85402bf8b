// tests/layer_support.hpp: what the layer tests (embedding, merged_linear, conv2d, init, GPT-2 block) share
// beside support.hpp: an adapter config with both factors random (so that every gradient is non-zero from
// the first step); the mixed-batch tests' rows and adapters (mixed batches, the registry).
#pragma once

#include <Eigen/Core>
#include <lora/adapter.hpp>
#include <lora/adapter_routing.hpp>
#include <string>
#include <vector>

namespace lora_test {

/// rank, alpha, seed and dropout, with init_method::random_ab.
inline lora::adapter_config random_config(lora::index rank, double alpha, std::uint64_t seed, double dropout = 0.0) {
  lora::adapter_config c;
  c.rank = rank;
  c.alpha = alpha;
  c.seed = seed;
  c.dropout = dropout;
  c.init = lora::init_method::random_ab;
  return c;
}

/// Row i's adapter and scale in the mixed-batch tests: three adapters, the base alone, scattered and repeated.
inline const std::vector<std::string> mixed_row_names = {"b", "a", lora::base_adapter, "c", "a", "b", "", "c", "a"};
inline const std::vector<double> mixed_row_scales = {1.0, 0.5, 1.0, -2.0, 1.0, 1.0, 1.0, 3.0, 1.0};

/// Adapters "a", "b", "c" of ranks 2, 5, 8 (random factors), for mixed_row_names.
template <typename Layer>
void add_three(Layer& layer) {
  layer.add_adapter("a", random_config(2, 4.0, 1));
  layer.add_adapter("b", random_config(5, 5.0, 2));
  layer.add_adapter("c", random_config(8, 32.0, 3));
}

}  // namespace lora_test
