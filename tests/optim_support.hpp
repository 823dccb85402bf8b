// tests/optim_support.hpp: what the optimizer tests share: a trainable tensor owned by the test and
// exposed as a lora::parameter, and an element-wise check against reference values.
#pragma once

#include <lora/parameter.hpp>
#include <string>
#include <vector>

#include "support.hpp"

namespace lora_test {

using lora::param_role;

/// A trainable tensor owned by the test, exposed as a lora::parameter.
template <typename Scalar>
struct tensor {
  lora::matrix<Scalar> value, grad;
  explicit tensor(const std::vector<double>& v)
      : value(Eigen::Map<const lora::vector<double>>(v.data(), static_cast<lora::index>(v.size())).cast<Scalar>()),
        grad(lora::matrix<Scalar>::Zero(value.rows(), 1)) {}
  lora::parameter<Scalar> view(std::string name, param_role role = param_role::dense) {
    return {std::move(name), role, value.data(), grad.data(), value.rows(), value.cols()};
  }
  void set_grad(const std::vector<double>& g) {
    for (std::size_t i = 0; i < g.size(); ++i) grad(static_cast<lora::index>(i)) = static_cast<Scalar>(g[i]);
  }
};

template <typename Scalar>
void expect_values(const tensor<Scalar>& t, const std::vector<double>& expected) {
  ASSERT_EQ(t.value.size(), static_cast<lora::index>(expected.size()));
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_NEAR(static_cast<double>(t.value(static_cast<lora::index>(i))), expected[i],
                lora_test::tolerance<Scalar>() * std::max(1.0, std::abs(expected[i])))
        << "element " << i;
  }
}

}  // namespace lora_test
