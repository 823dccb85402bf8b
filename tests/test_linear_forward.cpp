// lora::linear forward and inference against the formula Y = X Wᵀ + b + Σ s (X Aᵀ) Bᵀ computed densely.
#include <lora/lora.hpp>
#include <thread>

#include "support.hpp"

namespace {

using lora_test::random_matrix;

using lora::index;

template <typename Scalar>
class linear_forward : public ::testing::Test {};
TYPED_TEST_SUITE(linear_forward, lora_test::scalar_types);

TYPED_TEST(linear_forward, matches_dense_formula) {
  using S = TypeParam;
  lora::rng gen(1);
  const auto w = random_matrix<S>(gen, 7, 5);
  const lora::vector<S> b = random_matrix<S>(gen, 7, 1);
  const auto x = random_matrix<S>(gen, 4, 5);
  lora::linear<S> layer(w, b, "fc");
  lora::adapter_config c1, c2;
  c1.rank = 3;
  c1.alpha = 6.0;
  c1.init = lora::init_method::random_ab;
  c1.seed = 1;
  c2.rank = 2;
  c2.alpha = 4.0;
  c2.use_rslora = true;
  c2.init = lora::init_method::random_ab;
  c2.seed = 2;
  layer.add_adapter("one", c1);
  layer.add_adapter("two", c2);
  layer.set_active({"one", "two"});
  const auto& a1 = layer.adapter("one");
  const auto& a2 = layer.adapter("two");
  EXPECT_EQ(a1.scaling(), S(2));                                  // alpha / r
  EXPECT_NEAR(double(a2.scaling()), 4.0 / std::sqrt(2.0), 1e-6);  // rsLoRA: alpha / sqrt(r)

  const lora::matrix<double> expected =
      (x.template cast<double>() *
       (w.template cast<double>() + double(a1.scaling()) * (a1.b() * a1.a()).template cast<double>() +
        double(a2.scaling()) * (a2.b() * a2.a()).template cast<double>())
           .transpose())
          .rowwise() +
      b.template cast<double>().transpose();
  EXPECT_LT(lora_test::rel_error(layer.forward(x), expected), lora_test::tolerance<S>());
  EXPECT_LT(lora_test::rel_error(layer.infer(x), expected), lora_test::tolerance<S>());

  // Only "one" active.
  layer.set_active({"one"});
  const lora::matrix<double> expected_one =
      (x.template cast<double>() * (w + a1.scaling() * a1.b() * a1.a()).template cast<double>().transpose()).rowwise() +
      b.template cast<double>().transpose();
  EXPECT_LT(lora_test::rel_error(layer.infer(x), expected_one), lora_test::tolerance<S>());

  // Disabled: the base layer alone.
  layer.disable_adapters();
  const lora::matrix<double> base =
      (x * w.transpose()).template cast<double>().rowwise() + b.template cast<double>().transpose();
  EXPECT_LT(lora_test::rel_error(layer.forward(x), base), lora_test::tolerance<S>());
  layer.enable_adapters();
  EXPECT_LT(lora_test::rel_error(layer.infer(x), expected_one), lora_test::tolerance<S>());
}

TYPED_TEST(linear_forward, peft_default_starts_equal_to_base) {
  using S = TypeParam;
  lora::rng gen(2);
  const auto w = random_matrix<S>(gen, 6, 8);
  const auto x = random_matrix<S>(gen, 3, 8);
  lora::linear<S> layer(w);
  layer.add_adapter("default");
  EXPECT_EQ(layer.forward(x), (x * w.transpose()).eval());
}

TYPED_TEST(linear_forward, row_major_and_expression_inputs) {
  using S = TypeParam;
  lora::rng gen(3);
  const auto w = random_matrix<S>(gen, 4, 6);
  const auto x = random_matrix<S>(gen, 5, 6);
  lora::linear<S> layer(w);
  lora::adapter_config cfg;
  cfg.init = lora::init_method::random_ab;
  layer.add_adapter("a", cfg);
  const auto y = layer.infer(x);
  const Eigen::Matrix<S, -1, -1, Eigen::RowMajor> x_rm = x;
  EXPECT_LT(lora_test::rel_error(layer.forward(x_rm), y), lora_test::tolerance<S>());
  layer.backward(lora::matrix<S>::Ones(5, 4));
  EXPECT_LT(lora_test::rel_error(layer.forward(x * S(1)), y), lora_test::tolerance<S>());  // expression: copied
  layer.backward(lora::matrix<S>::Ones(5, 4));
  EXPECT_LT(lora_test::rel_error(layer.forward(lora::matrix<S>(x)), y), lora_test::tolerance<S>());  // rvalue
  layer.backward(lora::matrix<S>::Ones(5, 4));
  EXPECT_LT(lora_test::rel_error(layer.forward(x.middleRows(1, 3)), y.middleRows(1, 3)), lora_test::tolerance<S>());
}

TYPED_TEST(linear_forward, dropout_is_inverted_and_off_in_eval) {
  using S = TypeParam;
  lora::rng gen(4);
  const auto w = random_matrix<S>(gen, 3, 200);
  const lora::matrix<S> x = lora::matrix<S>::Ones(400, 200);
  lora::linear<S> layer(w);
  lora::adapter_config cfg;
  cfg.rank = 1;
  cfg.alpha = 1;
  cfg.dropout = 0.25;
  cfg.init = lora::init_method::zeros;
  auto& a = layer.add_adapter("a", cfg);
  a.a().setOnes();  // H = drop(X) Aᵀ = row sums of drop(X)
  a.b().setZero();
  a.b()(0, 0) = 1;
  const auto y_train = layer.forward(x);
  const auto y_base = (x * w.transpose()).eval();
  // Each kept element is scaled by 1/(1-p): the mean of a row of drop(1) is 1 within sampling error.
  const double mean_h = double((y_train.col(0) - y_base.col(0)).mean()) / 200.0;
  EXPECT_NEAR(mean_h, 1.0, 0.01);
  // Individual rows differ (a mask was drawn) ...
  EXPECT_GT(double((y_train.col(0) - y_base.col(0)).array().abs().maxCoeff()), 0.0);
  EXPECT_GT(double(((y_train.col(0) - y_base.col(0)).array() - S(200)).abs().maxCoeff()), 1.0);
  // ... and in eval mode the adapter sees X unchanged.
  layer.eval();
  const auto y_eval = layer.forward(x);
  EXPECT_LT(lora_test::rel_error((y_eval - y_base).col(0), lora::matrix<S>::Constant(400, 1, S(200))),
            lora_test::tolerance<S>());
  // infer never drops.
  layer.train();
  EXPECT_LT(lora_test::rel_error(layer.infer(x), y_eval), lora_test::tolerance<S>());
}

// Many threads share one const layer, each with its own workspace; results equal the serial ones.
TYPED_TEST(linear_forward, infer_is_thread_safe) {
  using S = TypeParam;
  lora::rng gen(5);
  const auto w = random_matrix<S>(gen, 32, 48);
  lora::linear<S> layer(w);
  lora::adapter_config cfg;
  cfg.init = lora::init_method::random_ab;
  layer.add_adapter("a", cfg);
  const lora::linear<S>& frozen = layer;
  std::vector<lora::matrix<S>> inputs, expected;
  for (int t = 0; t < 4; ++t) {
    inputs.push_back(random_matrix<S>(gen, 16 + t, 48));
    expected.push_back(frozen.infer(inputs.back()));
  }
  std::vector<int> ok(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      lora::inference_workspace<S> ws;
      lora::matrix<S> y(inputs[t].rows(), 32);
      bool same = true;
      for (int rep = 0; rep < 50; ++rep) {
        frozen.infer(inputs[t], y, ws);
        same = same && (y == expected[t]);
      }
      ok[t] = same ? 1 : 0;
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(ok[t], 1) << "thread " << t;
}

}  // namespace
