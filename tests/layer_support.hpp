// tests/layer_support.hpp: helpers the layer tests (embedding, merged_linear, conv2d, init, GPT-2 block)
// share beside support.hpp: bit-for-bit comparison and an adapter config with both factors random (so that
// every gradient is non-zero from the first step).
#pragma once

#include <Eigen/Core>
#include <cstring>
#include <lora/adapter.hpp>

namespace lora_test {

/// Same shape and the same bits (so +0 differs from -0, and NaNs compare by payload).
template <typename A, typename B>
bool bitwise_equal(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  using S = typename A::Scalar;
  static_assert(std::is_same_v<S, typename B::Scalar>, "bitwise_equal compares matrices of one scalar type");
  const lora::matrix<S> x = a, y = b;  // plain column-major copies, whatever the operands' layouts
  return x.rows() == y.rows() && x.cols() == y.cols() &&
         std::memcmp(x.data(), y.data(), sizeof(S) * static_cast<std::size_t>(x.size())) == 0;
}

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
