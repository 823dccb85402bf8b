// SGD against torch.optim.SGD: plain steps, momentum with dampening, Nesterov, L2 weight decay, per-role
// learning rates, state layout, and the checks shared by every optimizer (parameter lists, options).
#include <lora/optim/sgd.hpp>

#include "optim_support.hpp"

namespace {

using lora::param_role;
using lora_test::expect_values;
using lora_test::tensor;

// The gradients of the PyTorch reference runs below: 4 steps on a 3-vector starting at (1, -0.5, 2).
const std::vector<std::vector<double>> reference_grads = {
    {0.1, -0.2, 0.3}, {0.3, 0.1, -0.1}, {-0.2, 0.4, 0.05}, {0.0, 0.2, -0.3}};

template <typename Scalar>
class SgdTest : public ::testing::Test {};
TYPED_TEST_SUITE(SgdTest, lora_test::scalar_types);

TYPED_TEST(SgdTest, PlainStepIsLrTimesGradient) {
  using Scalar = TypeParam;
  tensor<Scalar> w({1.0, -2.0, 0.5});
  lora::optim::sgd_options o;
  o.lr = 0.1;
  lora::optim::sgd<Scalar> opt({w.view("w")}, o);
  w.set_grad({0.5, 1.0, -4.0});
  opt.step();
  // p = p - lr * g
  expect_values(w, {0.95, -2.1, 0.9});
  EXPECT_EQ(opt.step_count(), 1);
  EXPECT_EQ(opt.state_tensor_count(), 0u);  // momentum = 0 keeps no state
  EXPECT_EQ(opt.state_bytes(), 0u);
  EXPECT_EQ(opt.kind(), "sgd");
}

TYPED_TEST(SgdTest, MomentumBufferStartsAtTheGradient) {
  using Scalar = TypeParam;
  // Constant g = 0.5, lr = 0.1, momentum 0.9, dampening 0.1:
  //   step 1: b = g = 0.5                          p = 1 - 0.1 * 0.5 = 0.95
  //   step 2: b = 0.9 * 0.5 + 0.9 * 0.5 = 0.9       p = 0.95 - 0.09 = 0.86
  //   step 3: b = 0.9 * 0.9 + 0.9 * 0.5 = 1.26      p = 0.86 - 0.126 = 0.734
  tensor<Scalar> w({1.0});
  lora::optim::sgd_options o;
  o.lr = 0.1;
  o.momentum = 0.9;
  o.dampening = 0.1;
  lora::optim::sgd<Scalar> opt({w.view("w")}, o);
  const std::vector<double> expected = {0.95, 0.86, 0.734};
  for (double e : expected) {
    w.set_grad({0.5});
    opt.step();
    expect_values(w, {e});
  }
  EXPECT_EQ(opt.state_tensor_name(0), "w.momentum_buffer");
  EXPECT_NEAR(static_cast<double>(opt.state_tensor_data(0)(0)), 1.26, 1e-6);
  EXPECT_EQ(opt.state_bytes(), sizeof(Scalar));
}

TYPED_TEST(SgdTest, NesterovLooksAhead) {
  using Scalar = TypeParam;
  // Constant g = 0.5, lr = 0.1, momentum 0.9, no dampening; the step direction is g + momentum * b:
  //   step 1: b = 0.5,                 d = 0.5 + 0.45 = 0.95,    p = 1 - 0.095 = 0.905
  //   step 2: b = 0.45 + 0.5 = 0.95,   d = 0.5 + 0.855 = 1.355,  p = 0.905 - 0.1355 = 0.7695
  tensor<Scalar> w({1.0});
  lora::optim::sgd_options o;
  o.lr = 0.1;
  o.momentum = 0.9;
  o.nesterov = true;
  lora::optim::sgd<Scalar> opt({w.view("w")}, o);
  for (double e : {0.905, 0.7695}) {
    w.set_grad({0.5});
    opt.step();
    expect_values(w, {e});
  }
}

TYPED_TEST(SgdTest, WeightDecayIsAddedToTheGradient) {
  using Scalar = TypeParam;
  // g' = g + wd * p = 0.5 + 0.1 * 1 = 0.6, p = 1 - 0.1 * 0.6 = 0.94; with momentum the buffer holds g'.
  tensor<Scalar> w({1.0});
  lora::optim::sgd_options o;
  o.lr = 0.1;
  o.momentum = 0.5;
  o.weight_decay = 0.1;
  lora::optim::sgd<Scalar> opt({w.view("w")}, o);
  w.set_grad({0.5});
  opt.step();
  expect_values(w, {0.94});
  EXPECT_NEAR(static_cast<double>(opt.state_tensor_data(0)(0)), 0.6, 1e-6);
}

// Reference values: torch.optim.SGD([p], lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01) in
// float64 (PyTorch 1.13), p0 = (1, -0.5, 2), the gradients of reference_grads.
TYPED_TEST(SgdTest, MatchesPyTorchWithMomentumDampeningAndDecay) {
  using Scalar = TypeParam;
  const std::vector<std::vector<double>> expected = {{0.989, -0.4795, 1.968},
                                                     {0.9512098999999999, -0.46961844999999997, 1.9464288},
                                                     {0.9343427210899999, -0.49630239839499996, 1.92076293408},
                                                     {0.9183213516220189, -0.5378712797919445, 1.9229349681113281}};
  tensor<Scalar> w({1.0, -0.5, 2.0});
  lora::optim::sgd_options o;
  o.lr = 0.1;
  o.momentum = 0.9;
  o.dampening = 0.1;
  o.weight_decay = 0.01;
  lora::optim::sgd<Scalar> opt({w.view("w")}, o);
  for (std::size_t t = 0; t < expected.size(); ++t) {
    w.set_grad(reference_grads[t]);
    opt.step();
    expect_values(w, expected[t]);
  }
}

// torch.optim.SGD([p], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), as above.
TYPED_TEST(SgdTest, MatchesPyTorchWithNesterov) {
  using Scalar = TypeParam;
  const std::vector<std::vector<double>> expected = {{0.9791, -0.46105, 1.9392},
                                                     {0.91132971, -0.46256900500000003, 1.92859552},
                                                     {0.914486112551, -0.5304721733905, 1.898632436512},
                                                     {0.8984095479720531, -0.592993439917008, 1.9312939957114272}};
  tensor<Scalar> w({1.0, -0.5, 2.0});
  lora::optim::sgd_options o;
  o.lr = 0.1;
  o.momentum = 0.9;
  o.nesterov = true;
  o.weight_decay = 0.01;
  lora::optim::sgd<Scalar> opt({w.view("w")}, o);
  for (std::size_t t = 0; t < expected.size(); ++t) {
    w.set_grad(reference_grads[t]);
    opt.step();
    expect_values(w, expected[t]);
  }
}

TYPED_TEST(SgdTest, RoleScalesMultiplyTheLearningRate) {
  using Scalar = TypeParam;
  tensor<Scalar> a({1.0}), b({1.0});
  lora::optim::sgd_options o;
  o.lr = 0.1;
  lora::optim::sgd<Scalar> opt({a.view("a", param_role::lora_a), b.view("b", param_role::lora_b)}, o);
  opt.set_lr_scale(param_role::lora_b, 3.0);
  EXPECT_DOUBLE_EQ(opt.lr_of(param_role::lora_b), 0.1 * 3.0);
  EXPECT_DOUBLE_EQ(opt.lr_of(param_role::lora_a), 0.1);
  a.set_grad({1.0});
  b.set_grad({1.0});
  opt.step();
  expect_values(a, {0.9});
  expect_values(b, {0.7});
  opt.set_lr(0.01);  // what a schedule does; the scale stays
  opt.step();
  expect_values(a, {0.89});
  expect_values(b, {0.67});
}

TYPED_TEST(SgdTest, ZeroGradClearsEveryGradient) {
  using Scalar = TypeParam;
  tensor<Scalar> a({1.0, 2.0}), b({3.0});
  lora::optim::sgd<Scalar> opt({a.view("a"), b.view("b")});
  a.set_grad({1.0, -1.0});
  b.set_grad({5.0});
  opt.zero_grad();
  EXPECT_TRUE(a.grad.isZero(0));
  EXPECT_TRUE(b.grad.isZero(0));
}

TEST(SgdOptions, DefaultsArePyTorchs) {
  const lora::optim::sgd_options o;
  EXPECT_EQ(o.lr, 1e-3);
  EXPECT_EQ(o.momentum, 0.0);
  EXPECT_EQ(o.dampening, 0.0);
  EXPECT_EQ(o.weight_decay, 0.0);
  EXPECT_FALSE(o.nesterov);
}

TEST(SgdOptions, InvalidOptionsAreRefused) {
  tensor<double> w({1.0});
  const auto make = [&](lora::optim::sgd_options o) { lora::optim::sgd<double> opt({w.view("w")}, o); };
  lora::optim::sgd_options o;
  o.lr = -1.0;
  lora_test::expect_error<lora::config_error>([&] { make(o); }, {"sgd", "lr", "-1"});
  o = {};
  o.momentum = -0.5;
  lora_test::expect_error<lora::config_error>([&] { make(o); }, {"momentum"});
  o = {};
  o.nesterov = true;  // needs momentum > 0
  lora_test::expect_error<lora::config_error>([&] { make(o); }, {"nesterov"});
  o.momentum = 0.9;
  o.dampening = 0.1;  // and no dampening
  lora_test::expect_error<lora::config_error>([&] { make(o); }, {"nesterov", "dampening"});
  o = {};
  o.weight_decay = std::numeric_limits<double>::quiet_NaN();
  lora_test::expect_error<lora::config_error>([&] { make(o); }, {"weight_decay"});
  lora::optim::sgd<double> opt({w.view("w")});
  lora_test::expect_error<lora::config_error>([&] { opt.set_lr(std::numeric_limits<double>::infinity()); }, {"lr"});
  lora_test::expect_error<lora::config_error>([&] { opt.set_lr_scale(param_role::lora_b, 0.0); }, {"lora_b"});
}

TEST(OptimizerParameters, ListsAreValidated) {
  tensor<double> a({1.0}), b({2.0});
  lora_test::expect_error<lora::name_error>(
      [&] {
        lora::optim::sgd<double>({a.view("x"), b.view("x")});
      },
      {"duplicate", "'x'"});
  lora_test::expect_error<lora::name_error>([&] { lora::optim::sgd<double>({a.view("")}); }, {"empty name"});
  auto broken = a.view("a");
  broken.grad_data = nullptr;
  lora_test::expect_error<lora::config_error>([&] { lora::optim::sgd<double>({broken}); }, {"'a'", "gradient"});
  auto negative = a.view("n");
  negative.rows = -1;
  lora_test::expect_error<lora::shape_error>([&] { lora::optim::sgd<double>({negative}); }, {"'n'", "-1x1"});
}

TEST(OptimizerParameters, StepWritesInPlaceThroughTheViews) {
  // The optimizer keeps views: a value changed by the owner between steps is what the next step updates.
  tensor<double> w({1.0});
  lora::optim::sgd_options o;
  o.lr = 1.0;
  lora::optim::sgd<double> opt({w.view("w")}, o);
  w.value(0) = 10.0;
  w.set_grad({1.0});
  opt.step();
  EXPECT_EQ(w.value(0), 9.0);
  EXPECT_EQ(opt.parameters()[0].value_data, w.value.data());
}

}  // namespace
