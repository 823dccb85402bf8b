// Adapter management, initialisation statistics, parameters and accounting.
#include <lora/lora.hpp>

#include "support.hpp"

namespace {

using mat = lora::matrix<double>;

TEST(adapters, add_select_remove_query) {
  lora::linear<float> layer(lora::matrix<float>::Zero(8, 5), "q_proj");
  EXPECT_TRUE(layer.adapter_names().empty());
  layer.add_adapter("first");
  layer.add_adapter("second");
  EXPECT_EQ(layer.active_adapters(), std::vector<std::string>{"first"});  // only the first auto-activates
  EXPECT_TRUE(layer.has_adapter("second"));
  layer.set_active({"second", "first"});
  EXPECT_EQ(layer.active_adapters(), (std::vector<std::string>{"second", "first"}));
  EXPECT_EQ(layer.parameters().size(), 4u);
  layer.set_active({});
  EXPECT_TRUE(layer.parameters().empty());
  layer.remove_adapter("first");
  EXPECT_EQ(layer.adapter_names(), std::vector<std::string>{"second"});
  EXPECT_FALSE(layer.has_adapter("first"));
}

TEST(adapters, parameter_views_alias_the_factors) {
  lora::linear<double> layer(mat::Ones(6, 4), "fc2");
  auto& a = layer.add_adapter("default", {3, 6.0});
  auto ps = layer.parameters();
  ASSERT_EQ(ps.size(), 2u);
  EXPECT_EQ(ps[0].name, "fc2.lora_A.default.weight");
  EXPECT_EQ(ps[0].role, lora::param_role::lora_a);
  EXPECT_EQ(ps[0].rows, 3);
  EXPECT_EQ(ps[0].cols, 4);
  EXPECT_EQ(ps[1].name, "fc2.lora_B.default.weight");
  EXPECT_EQ(ps[1].role, lora::param_role::lora_b);
  ps[1].value()(0) = 5.0;
  EXPECT_EQ(a.b()(0, 0), 5.0);
  ps[0].grad().setConstant(1.0);
  EXPECT_EQ(a.grad_a().sum(), 12.0);
  layer.zero_grad();
  EXPECT_EQ(a.grad_a().sum(), 0.0);
}

TEST(adapters, init_statistics) {
  const lora::index in = 1000, out = 400, r = 50;
  lora::linear<double> layer(mat::Zero(out, in));
  // PEFT default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (variance bound^2 / 3), B = 0.
  const auto& d = layer.add_adapter("default", {r, 16.0});
  const double bound = 1.0 / std::sqrt(double(in));
  EXPECT_LE(d.a().cwiseAbs().maxCoeff(), bound);
  EXPECT_GT(d.a().cwiseAbs().maxCoeff(), 0.99 * bound);
  EXPECT_NEAR(d.a().mean(), 0.0, 0.01 * bound);
  EXPECT_NEAR(d.a().squaredNorm() / double(d.a().size()), bound * bound / 3, 0.02 * bound * bound / 3);
  EXPECT_EQ(d.b().squaredNorm(), 0.0);
  // gaussian: A ~ N(0, (1/r)^2), B = 0.
  lora::adapter_config g{r, 16.0};
  g.init = lora::init_method::gaussian;
  const auto& ga = layer.add_adapter("gauss", g);
  const double var = ga.a().squaredNorm() / double(ga.a().size());
  EXPECT_NEAR(var, 1.0 / (r * r), 0.02 / (r * r));
  EXPECT_NEAR(ga.a().mean(), 0.0, 0.01 / r);
  EXPECT_EQ(ga.b().squaredNorm(), 0.0);
  // random_ab: B random too; seeds make it reproducible and distinct.
  lora::adapter_config ab{r, 16.0};
  ab.init = lora::init_method::random_ab;
  ab.seed = 5;
  const auto& x1 = layer.add_adapter("ab1", ab);
  const auto& x2 = layer.add_adapter("ab2", ab);
  EXPECT_GT(x1.b().squaredNorm(), 0.0);
  EXPECT_EQ(x1.a(), x2.a());
  EXPECT_EQ(x1.b(), x2.b());
  ab.seed = 6;
  EXPECT_NE(layer.add_adapter("ab3", ab).a(), x1.a());
}

TEST(adapters, accounting_matches_lora_paper_and_peft_format) {
  // RoBERTa-base: 12 layers, d = 768, adapters on Wq and Wv at r = 8 -> 294,912 trainable parameters.
  std::vector<lora::linear<float>> layers;
  for (int l = 0; l < 12; ++l)
    for (const char* m : {"q", "v"}) {
      layers.emplace_back(lora::matrix<float>::Zero(768, 768), std::string(m) + std::to_string(l));
      layers.back().add_adapter("default", {8, 16.0});
    }
  const lora::parameter_report r = lora::summarize_range(layers);
  EXPECT_EQ(r.trainable_params, 294912);
  EXPECT_EQ(r.frozen_params, 24 * 768 * 768);
  EXPECT_EQ(r.trainable_bytes, 294912 * 4);
  EXPECT_EQ(r.grad_bytes, 294912 * 4);
  EXPECT_EQ(r.frozen_bytes, 24 * 768 * 768 * 4);
  EXPECT_EQ(r.to_string(), "trainable params: 294,912 || all params: 14,450,688 || trainable%: 2.0408");
  const auto two = lora::summarize(layers[0], layers[1]);
  EXPECT_EQ(two.trainable_params, 2 * 8 * (768 + 768));
}

TEST(adapters, accounting_tracks_cache_and_merges) {
  lora::linear<double> layer(mat::Ones(10, 20), lora::vector<double>::Ones(10));
  layer.add_adapter("default", {4, 4.0});
  auto r = layer.report();
  EXPECT_EQ(r.trainable_params, 4 * 30);
  EXPECT_EQ(r.frozen_params, 200 + 10);
  EXPECT_EQ(r.cache_bytes, 0);
  const mat x = mat::Ones(7, 20);
  layer.forward(x);  // caches H (7 x 4) and a view of X
  EXPECT_EQ(layer.report().cache_bytes, 7 * 4 * 8);
  layer.forward(mat::Ones(7, 20));  // an rvalue is owned: + 7 x 20
  EXPECT_EQ(layer.report().cache_bytes, (7 * 4 + 7 * 20) * 8);
  layer.backward(mat::Ones(7, 10));
  EXPECT_EQ(layer.report().cache_bytes, 0);
  layer.merge();
  r = layer.report();
  EXPECT_EQ(r.trainable_params, 0);
  EXPECT_EQ(r.frozen_params, 210 + 120);
  EXPECT_GT(r.merge_bytes, 200);  // one byte per weight plus copies of the factors
  struct fake_optimizer {
    std::size_t state_bytes() const { return 96; }
  };
  r.add_optimizer_state(fake_optimizer{});
  EXPECT_EQ(r.train_state_bytes(), 96);
}

}  // namespace
