// Learning-rate schedules against Hugging Face transformers' lr_lambda formulas (optimization.py).
#include <cmath>
#include <lora/optim/schedule.hpp>
#include <lora/optim/sgd.hpp>

#include "support.hpp"

namespace {

using lora::optim::lr_schedule;

const double pi = 3.141592653589793;  // Python's math.pi

// transformers' lambdas, transcribed from Python as literally as C++ allows.
double hf_warmup(std::int64_t step, std::int64_t warmup) {
  return static_cast<double>(step) / static_cast<double>(std::max<std::int64_t>(1, warmup));
}
double hf_linear(std::int64_t step, std::int64_t warmup, std::int64_t total) {
  if (step < warmup) return hf_warmup(step, warmup);
  return std::max(0.0,
                  static_cast<double>(total - step) / static_cast<double>(std::max<std::int64_t>(1, total - warmup)));
}
double hf_cosine(std::int64_t step, std::int64_t warmup, std::int64_t total, double min_lr_rate) {
  if (step < warmup) return hf_warmup(step, warmup);
  const double progress =
      static_cast<double>(step - warmup) / static_cast<double>(std::max<std::int64_t>(1, total - warmup));
  const double num_cycles = 0.5;
  double factor = 0.5 * (1.0 + std::cos(pi * num_cycles * 2.0 * progress));
  factor = factor * (1 - min_lr_rate) + min_lr_rate;
  return std::max(0.0, factor);
}

TEST(Schedule, ConstantWithAndWithoutWarmup) {
  const auto flat = lr_schedule::constant(3e-4);
  for (std::int64_t t : {0, 1, 100, 1000000}) EXPECT_EQ(flat.lr_at(t), 3e-4);
  const auto warm = lr_schedule::constant(1e-3, 4);
  EXPECT_EQ(warm.lr_at(0), 0.0);  // transformers: the first update of a warm-up runs at lr 0
  EXPECT_DOUBLE_EQ(warm.lr_at(1), 0.25e-3);
  EXPECT_DOUBLE_EQ(warm.lr_at(3), 0.75e-3);
  EXPECT_EQ(warm.lr_at(4), 1e-3);
  EXPECT_EQ(warm.lr_at(400), 1e-3);
  EXPECT_EQ(warm.type(), lr_schedule::kind::constant);
}

TEST(Schedule, LinearMatchesTransformers) {
  const auto s = lr_schedule::linear(1e-3, 10, 100);
  for (std::int64_t t = 0; t <= 130; ++t) {
    EXPECT_EQ(s.factor_at(t), hf_linear(t, 10, 100)) << "step " << t;
    EXPECT_EQ(s.lr_at(t), 1e-3 * hf_linear(t, 10, 100)) << "step " << t;
  }
  EXPECT_DOUBLE_EQ(s.lr_at(5), 0.5e-3);
  EXPECT_EQ(s.lr_at(10), 1e-3);
  EXPECT_DOUBLE_EQ(s.lr_at(55), 0.5e-3);
  EXPECT_EQ(s.lr_at(100), 0.0);
  EXPECT_EQ(s.lr_at(150), 0.0);
}

TEST(Schedule, CosineMatchesTransformersUpToTotalSteps) {
  for (double floor : {0.0, 0.1}) {
    const auto s = lr_schedule::cosine(2e-4, 5, 50, floor);
    for (std::int64_t t = 0; t <= 50; ++t) {
      EXPECT_EQ(s.factor_at(t), hf_cosine(t, 5, 50, floor)) << "step " << t << " floor " << floor;
    }
    EXPECT_EQ(s.lr_at(5), 2e-4);
    EXPECT_NEAR(s.lr_at(27), 2e-4 * (floor + (1 - floor) * 0.5 * (1 + std::cos(pi * 22.0 / 45))), 1e-18);
    EXPECT_NEAR(s.lr_at(50), floor * 2e-4, 1e-18);
  }
}

TEST(Schedule, CosineStaysAtItsFloorAfterTotalSteps) {
  // The one deliberate difference from transformers, whose curve would climb back after total_steps.
  const auto s = lr_schedule::cosine(1.0, 0, 10, 0.05);
  for (std::int64_t t : {10, 11, 15, 20, 1000}) EXPECT_NEAR(s.lr_at(t), 0.05, 1e-15) << "step " << t;
  EXPECT_GT(hf_cosine(15, 0, 10, 0.05), 0.5);  // what transformers would give at step 15
}

TEST(Schedule, RisesDuringWarmupThenFalls) {
  const auto cos = lr_schedule::cosine(1.0, 3, 40, 0.2);
  const auto lin = lr_schedule::linear(1.0, 3, 40);
  for (std::int64_t t = 0; t < 60; ++t) {
    SCOPED_TRACE(::testing::Message() << "step " << t);
    if (t < 3) {
      EXPECT_GT(cos.lr_at(t + 1), cos.lr_at(t));
      EXPECT_GT(lin.lr_at(t + 1), lin.lr_at(t));
    } else if (t < 40) {
      EXPECT_LT(cos.lr_at(t + 1), cos.lr_at(t));
      EXPECT_LT(lin.lr_at(t + 1), lin.lr_at(t));
      EXPECT_GE(cos.lr_at(t + 1), 0.2 - 1e-15);
    } else {
      EXPECT_EQ(cos.lr_at(t + 1), cos.lr_at(t));
      EXPECT_EQ(lin.lr_at(t), 0.0);
    }
  }
}

TEST(Schedule, ApplySetsTheRateOfTheNextStep) {
  lora::matrix<double> v = lora::matrix<double>::Zero(1, 1), g = lora::matrix<double>::Ones(1, 1);
  lora::optim::sgd<double> opt({{"w", lora::param_role::dense, v.data(), g.data(), 1, 1}});
  const auto s = lr_schedule::linear(0.1, 2, 6);
  double expected_value = 0.0;
  for (std::int64_t t = 0; t < 8; ++t) {
    s.apply(opt);
    EXPECT_EQ(opt.lr(), s.lr_at(t));
    expected_value -= s.lr_at(t);
    opt.step();
  }
  EXPECT_NEAR(v(0, 0), expected_value, 1e-15);
  EXPECT_NEAR(expected_value, -(0.0 + 0.05 + 0.1 + 0.075 + 0.05 + 0.025), 1e-15);
}

TEST(Schedule, WarmupOnlyAndDegenerateLengths) {
  // total <= warmup: decay has max(1, T - W) = 1 step, as in transformers.
  const auto s = lr_schedule::linear(1.0, 4, 4);
  EXPECT_EQ(s.lr_at(3), 0.75);
  EXPECT_EQ(s.lr_at(4), 0.0);
  const auto c = lr_schedule::cosine(1.0, 0, 0);
  EXPECT_EQ(c.lr_at(0), 1.0);
  EXPECT_NEAR(c.lr_at(1), 0.0, 1e-16);
}

TEST(Schedule, InvalidArgumentsAreRefused) {
  using lora_test::expect_error;
  expect_error<lora::config_error>([] { lr_schedule::constant(-1e-3); }, {"peak_lr"});
  expect_error<lora::config_error>([] { lr_schedule::linear(1e-3, -1, 10); }, {"warmup_steps", "-1"});
  expect_error<lora::config_error>([] { lr_schedule::linear(1e-3, 0, -10); }, {"total_steps"});
  expect_error<lora::config_error>([] { lr_schedule::cosine(1e-3, 0, 10, 1.5); }, {"min_lr_ratio"});
  expect_error<lora::config_error>([] { lr_schedule::cosine(std::nan(""), 0, 10); }, {"peak_lr"});
  expect_error<lora::config_error>([] { lr_schedule::constant(1.0).lr_at(-1); }, {"step", "-1"});
}

}  // namespace
