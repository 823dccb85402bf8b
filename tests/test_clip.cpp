// Global gradient-norm clipping (torch.nn.utils.clip_grad_norm_) and the non-finite gradient check.
#include <lora/optim/clip.hpp>

#include "support.hpp"

namespace {

using lora::param_role;

/// Two parameters whose gradients are (3, 0; 0, 4) and (12): total norm sqrt(9 + 16 + 144) = 13.
template <typename Scalar>
struct two_params {
  lora::matrix<Scalar> a_value = lora::matrix<Scalar>::Zero(2, 2), a_grad{{3, 0}, {0, 4}};
  lora::matrix<Scalar> b_value = lora::matrix<Scalar>::Zero(1, 1), b_grad{{12}};
  lora::parameter_list<Scalar> params() {
    return {{"fc.lora_A", param_role::lora_a, a_value.data(), a_grad.data(), 2, 2},
            {"fc.lora_B", param_role::lora_b, b_value.data(), b_grad.data(), 1, 1}};
  }
};

template <typename Scalar>
class ClipTest : public ::testing::Test {};
TYPED_TEST_SUITE(ClipTest, lora_test::scalar_types);

TYPED_TEST(ClipTest, NormIsOverEveryElementOfEveryParameter) {
  using Scalar = TypeParam;
  two_params<Scalar> m;
  EXPECT_EQ(lora::optim::grad_norm(m.params()), 13.0);
  EXPECT_EQ(lora::optim::grad_norm(lora::parameter_list<Scalar>{}), 0.0);
}

// torch.nn.utils.clip_grad_norm_([a, b], 6.5) in float64 (PyTorch 1.13) returns 13 and leaves the
// gradients (1.4999998846153937, 0, 0, 1.9999998461538582) and 5.999999538461575: each times
// 6.5 / (13 + 1e-6).
TYPED_TEST(ClipTest, ClipsToMaxNormLikePyTorch) {
  using Scalar = TypeParam;
  two_params<Scalar> m;
  EXPECT_EQ(lora::optim::clip_grad_norm(m.params(), 6.5), 13.0);
  const double tol = lora_test::tolerance<Scalar>();
  EXPECT_NEAR(static_cast<double>(m.a_grad(0, 0)), 1.4999998846153937, tol);
  EXPECT_EQ(m.a_grad(1, 0), Scalar(0));
  EXPECT_NEAR(static_cast<double>(m.a_grad(1, 1)), 1.9999998461538582, tol);
  EXPECT_NEAR(static_cast<double>(m.b_grad(0, 0)), 5.999999538461575, tol);
  EXPECT_NEAR(lora::optim::grad_norm(m.params()), 6.5, 1e-5);
}

TYPED_TEST(ClipTest, GradientsBelowTheLimitAreUntouched) {
  using Scalar = TypeParam;
  two_params<Scalar> m;
  const lora::matrix<Scalar> a = m.a_grad, b = m.b_grad;
  EXPECT_EQ(lora::optim::clip_grad_norm(m.params(), 100.0), 13.0);
  EXPECT_TRUE(m.a_grad == a);
  EXPECT_TRUE(m.b_grad == b);
  // At exactly the norm, PyTorch's factor 13 / (13 + 1e-6) is still below 1: a tiny shrink.
  lora::optim::clip_grad_norm(m.params(), 13.0);
  EXPECT_LT(m.b_grad(0, 0), Scalar(12));
  EXPECT_NEAR(static_cast<double>(m.b_grad(0, 0)), 12.0 * 13.0 / (13.0 + 1e-6), 1e-5);
}

TYPED_TEST(ClipTest, NonFiniteNormLeavesGradientsAlone) {
  using Scalar = TypeParam;
  two_params<Scalar> m;
  m.a_grad(0, 1) = std::numeric_limits<Scalar>::quiet_NaN();
  const lora::matrix<Scalar> b = m.b_grad;
  EXPECT_TRUE(std::isnan(lora::optim::clip_grad_norm(m.params(), 1.0)));
  EXPECT_TRUE(m.b_grad == b);
  EXPECT_EQ(m.a_grad(0, 0), Scalar(3));
}

TYPED_TEST(ClipTest, FindsTheFirstNonFiniteGradient) {
  using Scalar = TypeParam;
  two_params<Scalar> m;
  EXPECT_FALSE(lora::optim::find_nonfinite_grad(m.params()));
  EXPECT_NO_THROW(lora::optim::check_grads_finite(m.params()));

  m.b_grad(0, 0) = -std::numeric_limits<Scalar>::infinity();
  m.a_grad(1, 1) = std::numeric_limits<Scalar>::quiet_NaN();  // storage index 3 of the first parameter
  const auto params = m.params();
  const auto bad = lora::optim::find_nonfinite_grad(params);
  ASSERT_TRUE(bad);
  EXPECT_EQ(bad.param, &params[0]);
  EXPECT_EQ(bad.at, 3);
  EXPECT_TRUE(std::isnan(bad.value));
  lora_test::expect_error<lora::numeric_error>([&] { lora::optim::check_grads_finite(params); },
                                               {"'fc.lora_A'", "2x2", "nan", "element 3"});

  m.a_grad(1, 1) = 4;
  lora_test::expect_error<lora::numeric_error>([&] { lora::optim::check_grads_finite(m.params()); },
                                               {"'fc.lora_B'", "-inf", "element 0"});
}

TEST(Clip, MaxNormMustBeFiniteAndNonNegative) {
  two_params<double> m;
  for (double bad : {-1.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    lora_test::expect_error<lora::config_error>([&] { lora::optim::clip_grad_norm(m.params(), bad); }, {"max_norm"});
  }
  EXPECT_EQ(m.b_grad(0, 0), 12.0);
  lora::optim::clip_grad_norm(m.params(), 0.0);  // as in PyTorch: a zero limit zeroes the gradients
  EXPECT_TRUE(m.a_grad.isZero(0));
}

TEST(Clip, NormIsAccumulatedInDouble) {
  // float squares of 1e20 overflow; the double accumulation does not.
  lora::matrix<float> v = lora::matrix<float>::Zero(2, 1), g = lora::matrix<float>::Constant(2, 1, 1e20f);
  const lora::parameter_list<float> params = {{"big", param_role::dense, v.data(), g.data(), 2, 1}};
  EXPECT_NEAR(lora::optim::grad_norm(params), std::sqrt(2.0) * 1e20, 1e13);
}

}  // namespace
