// LoRA+ as a configuration: lora_b and vector parameters learn lambda times faster than lora_a and dense
// ones (docs/CONVENTIONS.md §optim, PEFT's create_loraplus_optimizer), with any optimizer and under schedules.
#include <lora/optim/adam.hpp>
#include <lora/optim/lora_plus.hpp>
#include <lora/optim/schedule.hpp>
#include <lora/optim/sgd.hpp>

#include "support.hpp"

namespace {

using lora::param_role;

/// One tensor per role, each a 2-vector with gradient (1, -1).
template <typename Scalar>
struct four_roles {
  lora::matrix<Scalar> values = lora::matrix<Scalar>::Ones(2, 4);
  lora::matrix<Scalar> grads = (lora::matrix<Scalar>(2, 4) << 1, 1, 1, 1, -1, -1, -1, -1).finished();
  lora::parameter_list<Scalar> params() {
    const param_role roles[] = {param_role::lora_a, param_role::lora_b, param_role::vector, param_role::dense};
    lora::parameter_list<Scalar> out;
    for (lora::index j = 0; j < 4; ++j) {
      out.push_back({lora::to_string(roles[j]), roles[j], values.col(j).data(), grads.col(j).data(), 2, 1});
    }
    return out;
  }
  /// How far column j moved from 1.
  double moved(lora::index j) const { return std::abs(1.0 - static_cast<double>(values(0, j))); }
};

template <typename Scalar>
class LoraPlusTest : public ::testing::Test {};
TYPED_TEST_SUITE(LoraPlusTest, lora_test::scalar_types);

TYPED_TEST(LoraPlusTest, DefaultRatioIsSixteenForBAndVectors) {
  using Scalar = TypeParam;
  four_roles<Scalar> m;
  lora::optim::sgd<Scalar> opt(m.params());
  lora::optim::apply_lora_plus(opt);
  EXPECT_EQ(lora::optim::lora_plus_default_ratio, 16.0);
  EXPECT_EQ(opt.lr_scale(param_role::lora_a), 1.0);
  EXPECT_EQ(opt.lr_scale(param_role::dense), 1.0);
  EXPECT_EQ(opt.lr_scale(param_role::lora_b), 16.0);
  EXPECT_EQ(opt.lr_scale(param_role::vector), 16.0);
  EXPECT_DOUBLE_EQ(opt.lr_of(param_role::lora_b), 16.0 * 1e-3);
}

TYPED_TEST(LoraPlusTest, SgdStepsScaleWithTheRatio) {
  using Scalar = TypeParam;
  four_roles<Scalar> m;
  lora::optim::sgd_options o;
  o.lr = 0.01;
  lora::optim::sgd<Scalar> opt(m.params(), o);
  lora::optim::apply_lora_plus(opt, 4.0);
  opt.step();
  // dp = -lr_role * g with g = 1: A and dense move by 0.01, B and vector by 4 * 0.01.
  const double tol = lora_test::tolerance<Scalar>();
  EXPECT_NEAR(m.moved(0), 0.01, tol);
  EXPECT_NEAR(m.moved(1), 0.04, tol);
  EXPECT_NEAR(m.moved(2), 0.04, tol);
  EXPECT_NEAR(m.moved(3), 0.01, tol);
}

TYPED_TEST(LoraPlusTest, AdamWUsesTheGroupRateForStepsAndDecay) {
  using Scalar = TypeParam;
  four_roles<Scalar> m;
  lora::optim::adamw_options o;
  o.lr = 1e-3;
  o.weight_decay = 0.5;
  lora::optim::adamw<Scalar> opt(m.params(), o);
  lora::optim::apply_lora_plus(opt);
  opt.step();
  // Step 1 of AdamW with group rate r: p = 1 * (1 - r * wd) - r * g / (|g| + eps), g = 1.
  const auto expected = [](double r) { return 1.0 - r * 0.5 - r / (1.0 + 1e-8); };
  const double tol = lora_test::tolerance<Scalar>();
  EXPECT_NEAR(static_cast<double>(m.values(0, 0)), expected(1e-3), tol);
  EXPECT_NEAR(static_cast<double>(m.values(0, 1)), expected(16e-3), tol);
  EXPECT_NEAR(static_cast<double>(m.values(0, 2)), expected(16e-3), tol);
  EXPECT_NEAR(static_cast<double>(m.values(0, 3)), expected(1e-3), tol);
}

TYPED_TEST(LoraPlusTest, SchedulesSetTheBaseRateAndKeepTheRatio) {
  using Scalar = TypeParam;
  four_roles<Scalar> m;
  lora::optim::adam<Scalar> opt(m.params());
  lora::optim::apply_lora_plus(opt);
  const auto schedule = lora::optim::lr_schedule::linear(2e-4, 2, 10);
  for (int t = 0; t < 6; ++t) {
    schedule.apply(opt);
    EXPECT_DOUBLE_EQ(opt.lr_of(param_role::lora_a), schedule.lr_at(t));
    EXPECT_DOUBLE_EQ(opt.lr_of(param_role::lora_b), 16.0 * schedule.lr_at(t));
    opt.step();
  }
}

TEST(LoraPlus, RatioMustBePositiveAndFinite) {
  four_roles<double> m;
  lora::optim::sgd<double> opt(m.params());
  for (double bad : {0.0, -16.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    lora_test::expect_error<lora::config_error>([&] { lora::optim::apply_lora_plus(opt, bad); }, {"LoRA+", "lambda"});
  }
  EXPECT_EQ(opt.lr_scale(param_role::lora_b), 1.0);  // untouched by the refused calls
}

TEST(LoraPlus, ReapplyingReplacesTheRatio) {
  four_roles<double> m;
  lora::optim::sgd<double> opt(m.params());
  lora::optim::apply_lora_plus(opt, 8.0);
  lora::optim::apply_lora_plus(opt, 2.0);
  EXPECT_EQ(opt.lr_scale(param_role::vector), 2.0);
  lora::optim::apply_lora_plus(opt, 1.0);  // lambda = 1 is plain LoRA
  for (auto role : {param_role::lora_a, param_role::lora_b, param_role::vector, param_role::dense}) {
    EXPECT_EQ(opt.lr_scale(role), 1.0);
  }
}

}  // namespace
