// Adam and AdamW against torch.optim.Adam / torch.optim.AdamW: a worked AdamW example computed by hand,
// PyTorch reference runs (L2 weight decay, AMSGrad), the Adam/AdamW difference, eps placement, defaults,
// and the optimizer state: names, bytes, export, import, all-or-nothing refusal.
#include <lora/optim/adam.hpp>
#include <lora/optim/sgd.hpp>

#include "optim_support.hpp"

namespace {

using lora_test::expect_values;
using lora_test::tensor;

using lora::param_role;

/// Runs `opt` over the gradient sequence, checking the parameter after every step.
template <typename Scalar>
void run_and_check(lora::optim::optimizer<Scalar>& opt, tensor<Scalar>& w,
                   const std::vector<std::vector<double>>& grads, const std::vector<std::vector<double>>& expected) {
  for (std::size_t t = 0; t < grads.size(); ++t) {
    w.set_grad(grads[t]);
    opt.step();
    SCOPED_TRACE(::testing::Message() << "after step " << t + 1);
    expect_values(w, expected[t]);
  }
}

template <typename Scalar>
class AdamTest : public ::testing::Test {};
TYPED_TEST_SUITE(AdamTest, lora_test::scalar_types);

// A worked AdamW example (torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)).
// p0 = (1, -0.5); gradients g1 = (0.1, -0.2), g2 = (0.3, 0.1), g3 = (-0.2, 0.4). Per step t:
//   p  <- p * (1 - lr * wd) = 0.99 p                   (decoupled decay first)
//   m  <- 0.9 m + 0.1 g          v <- 0.999 v + 0.001 g^2
//   bc1 = 1 - 0.9^t              bc2 = 1 - 0.999^t
//   p  <- p - (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
//
// Step 1: bc1 = 0.1, bc2 = 0.001, so m_hat = g and sqrt(v_hat) = |g|: the update is lr * g / (|g| + eps).
//   p[0]: 0.99 * 1     = 0.99;    m = 0.01,  v = 1e-5;  update = 0.1 * 0.1 / (0.1 + 1e-8) = 0.09999999
//         p = 0.99 - 0.09999999 = 0.89000001
//   p[1]: 0.99 * -0.5  = -0.495;  m = -0.02, v = 4e-5;  update = -0.1 * 0.2 / (0.2 + 1e-8) = -0.099999995
//         p = -0.495 + 0.099999995 = -0.395000005
// Step 2: bc1 = 0.19, bc2 = 0.001999, lr / bc1 = 0.526315789...
//   p[0]: 0.99 * 0.89000001 = 0.8811000099; m = 0.9 * 0.01 + 0.1 * 0.3 = 0.039;
//         v = 0.999 * 1e-5 + 0.001 * 0.09 = 9.999e-5; m_hat = 0.205263158, sqrt(v_hat) = 0.223651537
//         update = 0.205263158 / (0.223651537 + 1e-8) * 0.1 = 0.0917781078;  p = 0.7893219021
//   p[1]: 0.99 * -0.395000005 = -0.39105000495; m = -0.018 + 0.01 = -0.008;
//         v = 0.999 * 4e-5 + 0.001 * 0.01 = 4.996e-5; m_hat = -0.0421052632, sqrt(v_hat) = 0.158090152
//         update = -0.0266337023;  p = -0.3644163027
// Step 3: bc1 = 0.271, bc2 = 0.002997001, lr / bc1 = 0.369003690...
//   p[0]: 0.99 * 0.7893219021 = 0.7814286831; m = 0.0351 - 0.02 = 0.0151;
//         v = 0.999 * 9.999e-5 + 0.001 * 0.04 = 1.3989001e-4; m_hat = 0.0557195572, sqrt(v_hat) = 0.216047829
//         update = 0.0257903793;  p = 0.7556383038
//   p[1]: 0.99 * -0.3644163027 = -0.3607721396; m = -0.0072 + 0.04 = 0.0328;
//         v = 0.999 * 4.996e-5 + 0.001 * 0.16 = 2.0991004e-4; m_hat = 0.121033210, sqrt(v_hat) = 0.264650770
//         update = 0.0457331773;  p = -0.4065053169
// The full-precision values below are PyTorch 1.13's in float64, which agree with the hand figures.
TYPED_TEST(AdamTest, AdamWWorkedExampleMatchesPyTorch) {
  using Scalar = TypeParam;
  tensor<Scalar> w({1.0, -0.5});
  lora::optim::adamw_options o;
  o.lr = 0.1;
  o.weight_decay = 0.1;
  lora::optim::adamw<Scalar> opt({w.view("w")}, o);
  run_and_check<Scalar>(opt, w, {{0.1, -0.2}, {0.3, 0.1}, {-0.2, 0.4}},
                        {{0.890000009999999, -0.39500000499999977},
                         {0.7893219021055898, -0.36441630266867575},
                         {0.755638303768737, -0.40650531691466324}});
  // The moments after step 3, from the hand computation.
  EXPECT_NEAR(static_cast<double>(opt.state_tensor_data(0)(0)), 0.0151, 1e-7);
  EXPECT_NEAR(static_cast<double>(opt.state_tensor_data(1)(1)), 2.0991004e-4, 1e-10);
}

// torch.optim.Adam(lr=0.1, weight_decay=0.1): the L2 term 0.1 * p joins the gradient before the moments.
TYPED_TEST(AdamTest, AdamWithL2MatchesPyTorch) {
  using Scalar = TypeParam;
  tensor<Scalar> w({1.0, -0.5});
  lora::optim::adam_options o;
  o.lr = 0.1;
  o.weight_decay = 0.1;
  lora::optim::adam<Scalar> opt({w.view("w")}, o);
  run_and_check<Scalar>(opt, w, {{0.1, -0.2}, {0.3, 0.1}, {-0.2, 0.4}},
                        {{0.9000000049999998, -0.4000000039999998},
                         {0.8032147551675831, -0.3522205254389129},
                         {0.7478813928880648, -0.38318917646722606}});
  EXPECT_FALSE(opt.decoupled_weight_decay());
  EXPECT_EQ(opt.kind(), "adam");
}

// torch.optim.Adam(lr=0.1, amsgrad=True) and torch.optim.AdamW(lr=0.1, amsgrad=True) (weight_decay
// 0.01), with a shrinking first gradient so that the running maximum of v matters.
TYPED_TEST(AdamTest, AmsgradMatchesPyTorch) {
  using Scalar = TypeParam;
  const std::vector<std::vector<double>> grads = {{0.5, -0.2}, {0.1, 0.1}, {0.05, 0.4}};
  tensor<Scalar> w({1.0, -0.5});
  lora::optim::adam_options o;
  o.lr = 0.1;
  o.amsgrad = true;
  lora::optim::adam<Scalar> opt({w.view("w")}, o);
  run_and_check<Scalar>(opt, w, grads,
                        {{0.900000002, -0.40000000499999977},
                         {0.8196959063846518, -0.37336630271867577},
                         {0.7516772457394008, -0.41909947999135}});
  EXPECT_EQ(opt.state_tensor_count(), 3u);
  EXPECT_EQ(opt.state_tensor_name(2), "w.max_exp_avg_sq");
  // v[0] = 2.5e-4, 2.5975e-4, 2.6199025e-4 over the three steps: the running maximum is the last.
  EXPECT_NEAR(static_cast<double>(opt.state_tensor_data(2)(0)), 2.6199025e-4, 1e-10);

  tensor<Scalar> u({1.0, -0.5});
  lora::optim::adamw_options ow;
  ow.lr = 0.1;
  ow.amsgrad = true;
  lora::optim::adamw<Scalar> optw({u.view("u")}, ow);
  run_and_check<Scalar>(optw, u, grads,
                        {{0.899000002, -0.39950000499999977},
                         {0.8177969063826518, -0.37246680271367577},
                         {0.7489604488310181, -0.4178275131836363}});
}

// With a zero gradient, AdamW still shrinks p by exactly (1 - lr * wd) per step, while Adam's L2 term
// becomes the gradient and is normalised by sqrt(v): its first step moves p by lr * sign(p), whatever wd.
TYPED_TEST(AdamTest, DecoupledDecayDiffersFromL2) {
  using Scalar = TypeParam;
  tensor<Scalar> a({2.0, -4.0}), b({2.0, -4.0});
  lora::optim::adam_options o;
  o.lr = 0.01;
  o.weight_decay = 0.1;
  lora::optim::adam<Scalar> adam({a.view("a")}, o);
  lora::optim::adamw_options ow;
  ow.lr = 0.01;
  ow.weight_decay = 0.1;
  lora::optim::adamw<Scalar> adamw({b.view("b")}, ow);
  adam.step();
  adamw.step();
  expect_values(a, {2.0 - 0.01 * 0.2 / (0.2 + 1e-8), -4.0 + 0.01 * 0.4 / (0.4 + 1e-8)});  // g = wd * p
  expect_values(b, {2.0 * (1 - 0.001), -4.0 * (1 - 0.001)});  // p * (1 - lr * wd), m = v = 0
  EXPECT_TRUE(adamw.decoupled_weight_decay());
}

TYPED_TEST(AdamTest, FirstStepMovesByLrWhateverTheGradientScale) {
  using Scalar = TypeParam;
  // Bias correction: after step 1, m_hat = g and sqrt(v_hat) = |g|, so |dp| = lr |g| / (|g| + eps).
  for (double scale : {1e-3, 1.0, 1e3}) {
    tensor<Scalar> w({0.0, 0.0});
    lora::optim::adam<Scalar> opt({w.view("w")});
    w.set_grad({scale, -scale});
    opt.step();
    expect_values(w, {-1e-3 * scale / (scale + 1e-8), 1e-3 * scale / (scale + 1e-8)});
  }
}

TYPED_TEST(AdamTest, EpsIsAddedOutsideTheBiasCorrectedRoot) {
  using Scalar = TypeParam;
  // denom = sqrt(v) / sqrt(bc2) + eps. With g = 0.01 and eps = 1e-3, step 1 gives
  // dp = -lr * 0.01 / (0.01 + 0.001); eps inside the root, or divided by sqrt(bc2), would differ.
  tensor<Scalar> w({0.0});
  lora::optim::adam_options o;
  o.lr = 0.1;
  o.eps = 1e-3;
  lora::optim::adam<Scalar> opt({w.view("w")}, o);
  w.set_grad({0.01});
  opt.step();
  expect_values(w, {-0.1 * 0.01 / 0.011});
}

TYPED_TEST(AdamTest, StateIsNamedSizedAndExported) {
  using Scalar = TypeParam;
  tensor<Scalar> a({1.0, 2.0, 3.0}), b({4.0});
  lora::optim::adamw<Scalar> opt({a.view("fc.lora_A", param_role::lora_a), b.view("fc.bias", param_role::vector)});
  EXPECT_EQ(opt.state_bytes(), 2 * 4 * sizeof(Scalar));
  ASSERT_EQ(opt.state_tensor_count(), 4u);
  EXPECT_EQ(opt.state_tensor_name(0), "fc.lora_A.exp_avg");
  EXPECT_EQ(opt.state_tensor_name(1), "fc.lora_A.exp_avg_sq");
  EXPECT_EQ(opt.state_tensor_name(2), "fc.bias.exp_avg");
  EXPECT_EQ(opt.state_tensor_name(3), "fc.bias.exp_avg_sq");
  a.set_grad({1.0, 1.0, 1.0});
  b.set_grad({2.0});
  opt.step();
  const auto s = opt.state();
  EXPECT_EQ(s.kind, "adamw");
  EXPECT_EQ(s.step, 1);
  EXPECT_EQ(s.lr, 1e-3);
  ASSERT_EQ(s.tensors.size(), 4u);
  EXPECT_EQ(s.tensors[2].name, "fc.bias.exp_avg");
  EXPECT_NEAR(static_cast<double>(s.tensors[2].data(0)), 0.2, 1e-6);
}

TYPED_TEST(AdamTest, ImportedStateResumesBitIdentically) {
  using Scalar = TypeParam;
  const std::vector<std::vector<double>> grads = {{0.3, -0.1}, {0.2, 0.4}, {-0.5, 0.1}, {0.05, -0.3}};
  lora::optim::adamw_options o;
  o.lr = 0.05;
  o.amsgrad = true;
  // Uninterrupted: four steps.
  tensor<Scalar> w({1.0, 2.0});
  lora::optim::adamw<Scalar> opt({w.view("w")}, o);
  for (const auto& g : grads) {
    w.set_grad(g);
    opt.step();
  }
  // Interrupted after two: a new optimizer takes the exported state (with a different lr in force).
  tensor<Scalar> u({1.0, 2.0});
  lora::optim::adamw<Scalar> first({u.view("w")}, o);
  for (std::size_t t = 0; t < 2; ++t) {
    u.set_grad(grads[t]);
    first.step();
  }
  const auto saved = first.state();
  lora::optim::adamw_options other = o;
  other.lr = 0.5;
  lora::optim::adamw<Scalar> second({u.view("w")}, other);
  second.load_state(saved);
  EXPECT_EQ(second.step_count(), 2);
  EXPECT_EQ(second.lr(), 0.05);
  for (std::size_t t = 2; t < grads.size(); ++t) {
    u.set_grad(grads[t]);
    second.step();
  }
  EXPECT_TRUE(u.value == w.value) << u.value.transpose() << " vs " << w.value.transpose();
}

TEST(AdamState, LoadStateIsAllOrNothing) {
  tensor<double> a({1.0, 2.0}), b({3.0});
  lora::optim::adam<double> opt({a.view("a"), b.view("b")});
  a.set_grad({1.0, -1.0});
  b.set_grad({0.5});
  opt.step();
  const auto before = opt.state();
  const auto unchanged = [&] {
    const auto now = opt.state();
    EXPECT_EQ(now.step, before.step);
    for (std::size_t i = 0; i < now.tensors.size(); ++i) EXPECT_TRUE(now.tensors[i].data == before.tensors[i].data);
  };

  auto s = before;  // a valid state, then one defect at a time; the first tensors would load fine
  for (auto& t : s.tensors) t.data.setConstant(7.0);
  s.kind = "adamw";
  lora_test::expect_error<lora::name_error>([&] { opt.load_state(s); }, {"'adamw'"});
  unchanged();
  s.kind = "adam";
  s.tensors.back().data.resize(3);
  lora_test::expect_error<lora::shape_error>([&] { opt.load_state(s); }, {"b.exp_avg_sq", "3", "1"});
  unchanged();
  s.tensors.pop_back();
  lora_test::expect_error<lora::name_error>([&] { opt.load_state(s); }, {"lacks", "b.exp_avg_sq"});
  unchanged();
  s.tensors.push_back({"b.momentum_buffer", lora::vector<double>::Zero(1)});
  lora_test::expect_error<lora::name_error>([&] { opt.load_state(s); }, {"b.momentum_buffer"});
  unchanged();
  s.tensors.back() = s.tensors.front();
  lora_test::expect_error<lora::name_error>([&] { opt.load_state(s); }, {"a.exp_avg", "twice"});
  unchanged();
  s = before;
  s.step = -1;
  lora_test::expect_error<lora::config_error>([&] { opt.load_state(s); }, {"step"});
  unchanged();

  // Tensors are matched by name, so another order loads the same state.
  s = before;
  std::reverse(s.tensors.begin(), s.tensors.end());
  lora::optim::adam<double> other({a.view("a"), b.view("b")});
  other.load_state(s);
  for (std::size_t i = 0; i < before.tensors.size(); ++i) {
    EXPECT_TRUE(other.state_tensor_data(i) == before.tensors[i].data);
  }

  // An SGD state does not fit an Adam optimizer.
  lora::optim::sgd_options so;
  so.momentum = 0.9;
  lora::optim::sgd<double> sgd({a.view("a"), b.view("b")}, so);
  lora_test::expect_error<lora::name_error>([&] { opt.load_state(sgd.state()); }, {"'sgd'"});
}

TEST(AdamOptions, DefaultsArePyTorchs) {
  const lora::optim::adam_options a;
  EXPECT_EQ(a.lr, 1e-3);
  EXPECT_EQ(a.beta1, 0.9);
  EXPECT_EQ(a.beta2, 0.999);
  EXPECT_EQ(a.eps, 1e-8);
  EXPECT_EQ(a.weight_decay, 0.0);
  EXPECT_FALSE(a.amsgrad);
  const lora::optim::adamw_options w;
  EXPECT_EQ(w.lr, 1e-3);
  EXPECT_EQ(w.weight_decay, 1e-2);
  tensor<float> p({1.0});
  EXPECT_EQ(lora::optim::adamw<float>({p.view("p")}).options().weight_decay, 1e-2);
}

TEST(AdamOptions, InvalidOptionsAreRefused) {
  tensor<double> w({1.0});
  const auto make = [&](const lora::optim::adam_options& o) { lora::optim::adam<double> opt({w.view("w")}, o); };
  lora::optim::adam_options o;
  o.beta1 = 1.0;
  lora_test::expect_error<lora::config_error>([&] { make(o); }, {"adam", "beta1", "[0, 1)"});
  o = {};
  o.beta2 = -0.1;
  lora_test::expect_error<lora::config_error>([&] { make(o); }, {"beta2"});
  o = {};
  o.eps = -1e-8;
  lora_test::expect_error<lora::config_error>([&] { make(o); }, {"eps"});
  o = {};
  o.lr = std::numeric_limits<double>::quiet_NaN();
  lora_test::expect_error<lora::config_error>([&] { make(o); }, {"lr", "nan"});
  lora::optim::adamw_options ow;
  ow.weight_decay = -1.0;
  lora_test::expect_error<lora::config_error>([&] { lora::optim::adamw<double> opt({w.view("w")}, ow); },
                                              {"adamw", "weight_decay"});
}

}  // namespace
