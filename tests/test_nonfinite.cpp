// The guarded step: a non-finite loss or gradient is refused before anything is written. By default it
// throws numeric_error naming the culprit with parameters and optimizer state untouched; with the skip
// policy it zeroes the gradients, counts the skip and returns false. Also: clipping inside the guard,
// and a bad micro-batch inside an accumulation window.
#include <lora/optim/adam.hpp>
#include <lora/optim/grad_accumulator.hpp>
#include <lora/optim/step_guard.hpp>

#include "support.hpp"

namespace {

using lora::param_role;
using lora::optim::nonfinite_policy;

/// A LoRA-shaped pair of parameters, A (2x3) and B (3x2), with finite gradients and an AdamW that
/// has already taken one step, so that its state is not trivially zero.
template <typename Scalar>
struct model {
  lora::matrix<Scalar> a = lora::matrix<Scalar>::Constant(2, 3, Scalar(0.5));
  lora::matrix<Scalar> b = lora::matrix<Scalar>::Constant(3, 2, Scalar(-0.25));
  lora::matrix<Scalar> da = lora::matrix<Scalar>::Constant(2, 3, Scalar(0.1));
  lora::matrix<Scalar> db = lora::matrix<Scalar>::Constant(3, 2, Scalar(0.2));
  lora::optim::adamw<Scalar> opt{{{"fc2.lora_A", param_role::lora_a, a.data(), da.data(), 2, 3},
                                  {"fc2.lora_B", param_role::lora_b, b.data(), db.data(), 3, 2}}};

  model() { opt.step(); }

  /// Everything a refused step must leave alone.
  struct snapshot {
    lora::matrix<Scalar> a, b;
    lora::optim::optimizer_state<Scalar> state;
  };
  snapshot take() const { return {a, b, opt.state()}; }
  void expect_unchanged(const snapshot& s) const {
    EXPECT_TRUE(a == s.a);
    EXPECT_TRUE(b == s.b);
    const auto now = opt.state();
    EXPECT_EQ(now.step, s.state.step);
    ASSERT_EQ(now.tensors.size(), s.state.tensors.size());
    for (std::size_t i = 0; i < now.tensors.size(); ++i) {
      EXPECT_TRUE(now.tensors[i].data == s.state.tensors[i].data) << now.tensors[i].name;
    }
  }
};

template <typename Scalar>
class NonFiniteTest : public ::testing::Test {};
TYPED_TEST_SUITE(NonFiniteTest, lora_test::scalar_types);

TYPED_TEST(NonFiniteTest, NonFiniteLossIsRefused) {
  using Scalar = TypeParam;
  model<Scalar> m;
  lora::optim::step_guard<Scalar> guard(m.opt);
  const auto before = m.take();
  const lora::matrix<Scalar> da = m.da;
  lora_test::expect_error<lora::numeric_error>([&] { guard.step(std::numeric_limits<double>::quiet_NaN()); },
                                               {"adamw step 2 refused", "loss is nan", "unchanged"});
  lora_test::expect_error<lora::numeric_error>([&] { guard.step(std::numeric_limits<double>::infinity()); },
                                               {"loss is inf"});
  m.expect_unchanged(before);
  EXPECT_TRUE(m.da == da);  // gradients are kept for inspection
  EXPECT_EQ(guard.skipped_steps(), 0);
}

TYPED_TEST(NonFiniteTest, NonFiniteGradientIsRefusedNamingTheParameter) {
  using Scalar = TypeParam;
  model<Scalar> m;
  lora::optim::step_guard<Scalar> guard(m.opt);
  const auto before = m.take();
  m.db(1, 1) = std::numeric_limits<Scalar>::infinity();  // storage index 4 of the 3x2 B
  lora_test::expect_error<lora::numeric_error>([&] { guard.step(0.5); },
                                               {"'fc2.lora_B'", "3x2", "inf", "element 4", "unchanged"});
  m.expect_unchanged(before);
  EXPECT_EQ(m.db(1, 1), std::numeric_limits<Scalar>::infinity());

  m.db(1, 1) = 0;
  m.da(0, 2) = -std::numeric_limits<Scalar>::quiet_NaN();
  lora_test::expect_error<lora::numeric_error>([&] { guard.step(0.5); }, {"'fc2.lora_A'", "nan", "element 4"});
  m.expect_unchanged(before);
}

TYPED_TEST(NonFiniteTest, SkipPolicyDropsTheBatch) {
  using Scalar = TypeParam;
  model<Scalar> m;
  lora::optim::guard_options o;
  o.on_nonfinite = nonfinite_policy::skip;
  lora::optim::step_guard<Scalar> guard(m.opt, o);
  const auto before = m.take();
  m.da(1, 0) = std::numeric_limits<Scalar>::quiet_NaN();
  EXPECT_FALSE(guard.step(1.0));
  EXPECT_FALSE(guard.step(std::numeric_limits<double>::quiet_NaN()));
  EXPECT_EQ(guard.skipped_steps(), 2);
  EXPECT_TRUE(m.da.isZero(0));
  EXPECT_TRUE(m.db.isZero(0));
  m.expect_unchanged(before);
  // The next good batch steps normally.
  m.da.setConstant(Scalar(0.1));
  m.db.setConstant(Scalar(0.2));
  EXPECT_TRUE(guard.step(1.0));
  EXPECT_EQ(m.opt.step_count(), 2);
  EXPECT_FALSE(m.a == before.a);
}

TYPED_TEST(NonFiniteTest, GuardClipsBeforeStepping) {
  using Scalar = TypeParam;
  model<Scalar> m, reference;
  lora::optim::guard_options o;
  o.max_grad_norm = 0.1;
  lora::optim::step_guard<Scalar> guard(m.opt, o);
  EXPECT_TRUE(std::isnan(guard.last_grad_norm()));
  EXPECT_TRUE(guard.step(1.0));
  const double norm = std::sqrt(6 * 0.01 + 6 * 0.04);  // six 0.1 and six 0.2 entries
  EXPECT_NEAR(guard.last_grad_norm(), norm, 1e-6);
  EXPECT_NEAR(lora::optim::grad_norm(m.opt.parameters()), 0.1, 1e-6);  // what the optimizer saw
  // Same as clipping by hand and stepping.
  lora::optim::clip_grad_norm(reference.opt.parameters(), 0.1);
  reference.opt.step();
  EXPECT_TRUE(m.a == reference.a);
  EXPECT_TRUE(m.b == reference.b);
}

TYPED_TEST(NonFiniteTest, BadMicroBatchRefusesTheWholeWindow) {
  using Scalar = TypeParam;
  model<Scalar> m;
  lora::optim::step_guard<Scalar> guard(m.opt);
  lora::optim::grad_accumulator<Scalar> acc(guard, 3);
  const auto before = m.take();
  EXPECT_FALSE(acc.accumulate(0.5));
  m.da(0, 0) = std::numeric_limits<Scalar>::quiet_NaN();  // the second micro-batch goes bad
  EXPECT_FALSE(acc.accumulate(0.5));
  m.da.setConstant(Scalar(0.1));
  m.db.setConstant(Scalar(0.2));
  lora_test::expect_error<lora::numeric_error>([&] { acc.accumulate(0.5); }, {"'fc2.lora_A'", "nan", "element 0"});
  m.expect_unchanged(before);
  EXPECT_EQ(acc.pending(), 0);  // the window is dropped; the next one starts clean
  m.opt.zero_grad();
  m.da.setConstant(Scalar(0.1));
  for (int j = 0; j < 3; ++j) EXPECT_EQ(acc.accumulate(0.5), j == 2);
  EXPECT_EQ(m.opt.step_count(), 2);
}

TEST(NonFinite, OverflowingNormIsRefusedWhenClipping) {
  // Every element finite, but the sum of squares of double gradients overflows.
  lora::matrix<double> v = lora::matrix<double>::Zero(2, 1), g = lora::matrix<double>::Constant(2, 1, 1e200);
  lora::optim::adam<double> opt({{"huge", param_role::dense, v.data(), g.data(), 2, 1}});
  lora::optim::guard_options o;
  o.max_grad_norm = 1.0;
  lora::optim::step_guard<double> guard(opt, o);
  lora_test::expect_error<lora::numeric_error>([&] { guard.step(0.0); }, {"norm overflows"});
  EXPECT_EQ(opt.step_count(), 0);
  EXPECT_EQ(g(0, 0), 1e200);
}

TEST(NonFinite, GuardOptionsAreValidated) {
  lora::matrix<double> v = lora::matrix<double>::Zero(1, 1), g = v;
  lora::optim::adam<double> opt({{"w", param_role::dense, v.data(), g.data(), 1, 1}});
  lora::optim::guard_options o;
  o.max_grad_norm = -1.0;
  lora_test::expect_error<lora::config_error>([&] { lora::optim::step_guard<double>(opt, o); }, {"max_grad_norm"});
}

}  // namespace
