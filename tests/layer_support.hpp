// tests/layer_support.hpp: what the layer tests (embedding, merged_linear, conv2d, init, GPT-2 block) share
// beside support.hpp: an adapter config with both factors random (so that every gradient is non-zero from
// the first step).
#pragma once

#include <Eigen/Core>
#include <lora/adapter.hpp>

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

}  // namespace lora_test
