// Gradient accumulation: k micro-batches of m samples, each with its mean loss, step like one batch of
// k*m samples with the mean loss, whether the layers' backward overwrites or adds to the gradients.
#include <lora/optim/adam.hpp>
#include <lora/optim/grad_accumulator.hpp>
#include <lora/optim/sgd.hpp>
#include <lora/random.hpp>

#include "support.hpp"

namespace {

using lora::index;

/// Linear regression Y ≈ X Wᵀ with W: out x in (role dense), X: n x in, Y: n x out. The loss of rows
/// [begin, begin + count) is L = 1/(2 count) ||X_b Wᵀ - Y_b||², its gradient dW = (1/count) Rᵀ X_b with
/// R = X_b Wᵀ - Y_b (count x out).
template <typename Scalar>
struct regression {
  lora::matrix<Scalar> x, y, w, dw;

  regression(index n, index in, index out, std::uint64_t seed) : x(n, in), y(n, out), w(out, in) {
    lora::rng gen(seed);
    for (auto* m : {&x, &y, &w}) {
      for (index k = 0; k < m->size(); ++k) m->data()[k] = static_cast<Scalar>(gen.normal());
    }
    dw = lora::matrix<Scalar>::Zero(out, in);
  }
  lora::parameter_list<Scalar> params() {
    return {{"w", lora::param_role::dense, w.data(), dw.data(), w.rows(), w.cols()}};
  }

  /// Forward and backward over rows [begin, begin + count); writes dW, or adds it when `add` (as
  /// layers that accumulate, PyTorch-style, do). Returns the loss.
  double backward(index begin, index count, bool add = false) {
    const lora::matrix<Scalar> r = x.middleRows(begin, count) * w.transpose() - y.middleRows(begin, count);
    const lora::matrix<Scalar> g = r.transpose() * x.middleRows(begin, count) / static_cast<Scalar>(count);
    if (add) {
      dw += g;
    } else {
      dw = g;
    }
    return 0.5 * static_cast<double>(r.squaredNorm()) / static_cast<double>(count);
  }
};

template <typename Scalar>
class AccumulationTest : public ::testing::Test {};
TYPED_TEST_SUITE(AccumulationTest, lora_test::scalar_types);

TYPED_TEST(AccumulationTest, MicroBatchesEqualOneBigBatch) {
  using Scalar = TypeParam;
  constexpr index k = 4, m = 3;
  regression<Scalar> big(k * m * 3, 5, 2, 42), small = big;
  lora::optim::adamw_options o;
  o.lr = 0.05;
  lora::optim::adamw<Scalar> big_opt(big.params(), o), small_opt(small.params(), o);
  lora::optim::step_guard<Scalar> guard(small_opt);
  lora::optim::grad_accumulator<Scalar> acc(guard, k);
  for (index window = 0; window < 3; ++window) {
    const index first = window * k * m;
    const double big_loss = big.backward(first, k * m);
    big_opt.step();
    for (index j = 0; j < k; ++j) {
      const bool stepped = acc.accumulate(small.backward(first + j * m, m));
      EXPECT_EQ(stepped, j == k - 1);
    }
    SCOPED_TRACE(::testing::Message() << "window " << window);
    EXPECT_TRUE(small.dw.isZero(0));  // every call leaves the gradients at zero
    EXPECT_NEAR(acc.last_loss(), big_loss, 10 * lora_test::tolerance<Scalar>() * big_loss);
    EXPECT_LT(lora_test::rel_error(small.w, big.w), 10 * lora_test::tolerance<Scalar>());
  }
  EXPECT_EQ(small_opt.step_count(), 3);
}

/// Runs one window through an SGD step with lr 1 from the current w and returns the gradient that the
/// step saw: w_before - w_after.
template <typename Scalar>
lora::matrix<Scalar> gradient_seen(regression<Scalar>& r, index k, index m, lora::optim::reduction how) {
  lora::optim::sgd_options o;
  o.lr = 1.0;
  lora::optim::sgd<Scalar> opt(r.params(), o);
  lora::optim::step_guard<Scalar> guard(opt);
  lora::optim::grad_accumulator<Scalar> acc(guard, k, how);
  const lora::matrix<Scalar> before = r.w;
  for (index j = 0; j < k; ++j) acc.accumulate(r.backward(j * m, m));
  return before - r.w;
}

TYPED_TEST(AccumulationTest, StepSeesTheBigBatchGradient) {
  using Scalar = TypeParam;
  regression<Scalar> r(12, 4, 3, 9);
  regression<Scalar> ref = r;
  ref.backward(0, 12);  // mean over all 12 rows
  const lora::matrix<Scalar> seen = gradient_seen(r, 4, 3, lora::optim::reduction::mean);
  EXPECT_LT(lora_test::rel_error(seen, ref.dw), 10 * lora_test::tolerance<Scalar>());
}

TYPED_TEST(AccumulationTest, BackwardMayOverwriteOrAdd) {
  using Scalar = TypeParam;
  regression<Scalar> overwrite(12, 4, 3, 7), add = overwrite;
  lora::optim::sgd_options o;
  o.lr = 0.1;
  o.momentum = 0.9;
  lora::optim::sgd<Scalar> opt_a(overwrite.params(), o), opt_b(add.params(), o);
  lora::optim::step_guard<Scalar> guard_a(opt_a), guard_b(opt_b);
  lora::optim::grad_accumulator<Scalar> acc_a(guard_a, 3), acc_b(guard_b, 3);
  for (int round = 0; round < 2; ++round) {
    for (index j = 0; j < 3; ++j) {
      acc_a.accumulate(overwrite.backward(4 * j, 4, false));
      acc_b.accumulate(add.backward(4 * j, 4, true));  // no zero_grad in between: the accumulator does it
    }
  }
  EXPECT_TRUE(overwrite.w == add.w);
}

TYPED_TEST(AccumulationTest, SumReductionKeepsTheSum) {
  using Scalar = TypeParam;
  regression<Scalar> r(6, 3, 2, 3);
  regression<Scalar> ref = r;
  lora::matrix<Scalar> expected = lora::matrix<Scalar>::Zero(2, 3);
  for (index j = 0; j < 3; ++j) {
    ref.backward(2 * j, 2);
    expected += ref.dw;
  }
  const lora::matrix<Scalar> seen = gradient_seen(r, 3, 2, lora::optim::reduction::sum);
  EXPECT_LT(lora_test::rel_error(seen, expected), 10 * lora_test::tolerance<Scalar>());
}

TEST(Accumulation, LastLossIsTheReducedLoss) {
  regression<double> r(6, 3, 2, 3);
  lora::optim::sgd<double> opt(r.params());
  lora::optim::step_guard<double> guard(opt);
  lora::optim::grad_accumulator<double> mean(guard, 3), sum(guard, 3, lora::optim::reduction::sum);
  for (double loss : {1.0, 2.0, 6.0}) {
    mean.accumulate(loss);
    sum.accumulate(loss);
  }
  EXPECT_EQ(mean.last_loss(), 3.0);
  EXPECT_EQ(sum.last_loss(), 9.0);
}

TYPED_TEST(AccumulationTest, OneMicroBatchIsAPlainStep) {
  using Scalar = TypeParam;
  regression<Scalar> a(8, 3, 2, 11), b = a;
  lora::optim::adam<Scalar> opt_a(a.params()), opt_b(b.params());
  lora::optim::step_guard<Scalar> guard(opt_b);
  lora::optim::grad_accumulator<Scalar> acc(guard, 1);
  EXPECT_EQ(acc.buffer_bytes(), 0u);
  for (index j = 0; j < 4; ++j) {
    a.backward(2 * j, 2);
    opt_a.step();
    EXPECT_TRUE(acc.accumulate(b.backward(2 * j, 2)));
  }
  EXPECT_TRUE(a.w == b.w);
}

TEST(Accumulation, CountsMicroBatchesAndResets) {
  regression<double> r(10, 2, 2, 5);
  lora::optim::sgd<double> opt(r.params());
  lora::optim::step_guard<double> guard(opt);
  lora::optim::grad_accumulator<double> acc(guard, 3);
  EXPECT_EQ(acc.micro_batches(), 3);
  EXPECT_EQ(acc.buffer_bytes(), 4 * sizeof(double));
  std::vector<bool> stepped;
  for (index j = 0; j < 7; ++j) {
    stepped.push_back(acc.accumulate(r.backward(j, 1)));
    EXPECT_EQ(acc.pending(), (j + 1) % 3);
  }
  EXPECT_EQ(stepped, (std::vector<bool>{false, false, true, false, false, true, false}));
  EXPECT_EQ(opt.step_count(), 2);
  EXPECT_TRUE(r.dw.isZero(0));  // the pending micro-batch's gradient went into the running sum
  acc.reset();
  EXPECT_EQ(acc.pending(), 0);
  // After a reset the next window starts afresh: it steps exactly as a new accumulator would.
  regression<double> twin = r;
  lora::optim::sgd<double> twin_opt(twin.params());
  lora::optim::step_guard<double> twin_guard(twin_opt);
  lora::optim::grad_accumulator<double> twin_acc(twin_guard, 3);
  for (index j = 0; j < 3; ++j) {
    acc.accumulate(r.backward(j, 1));
    twin_acc.accumulate(twin.backward(j, 1));
  }
  EXPECT_TRUE(r.w == twin.w);
}

TEST(Accumulation, MicroBatchCountMustBePositive) {
  regression<double> r(2, 2, 2, 1);
  lora::optim::sgd<double> opt(r.params());
  lora::optim::step_guard<double> guard(opt);
  lora_test::expect_error<lora::config_error>([&] { lora::optim::grad_accumulator<double>(guard, 0); },
                                              {"micro_batches", "0"});
}

}  // namespace
