// Gradients of lora::linear against central finite differences, in double (docs/CONVENTIONS.md §orientation).
#include <lora/lora.hpp>

#include "support.hpp"

namespace {

using lora::index;
using mat = lora::matrix<double>;

struct case_spec {
  index n, in, out;
  std::vector<index> ranks;  // one adapter per rank, all active
  bool bias;
  double dropout;
  const char* label;
};

// Loss L = Σ (Y ⊙ G) for a fixed random G, so dL/dY = G.
class linear_gradients : public ::testing::TestWithParam<case_spec> {};

TEST_P(linear_gradients, match_finite_differences) {
  const case_spec c = GetParam();
  lora::rng gen(42);
  auto rnd = [&](index r, index k) {
    mat m(r, k);
    for (index i = 0; i < m.size(); ++i) m.data()[i] = gen.uniform(-1, 1);
    return m;
  };
  const mat w = rnd(c.out, c.in);
  mat x = rnd(c.n, c.in);
  const mat g = rnd(c.n, c.out);
  lora::linear<double> layer =
      c.bias ? lora::linear<double>(w, rnd(c.out, 1).col(0), "probe") : lora::linear<double>(w, "probe");
  std::vector<std::string> names;
  for (std::size_t i = 0; i < c.ranks.size(); ++i) {
    lora::adapter_config cfg;
    cfg.rank = c.ranks[i];
    cfg.alpha = 2.0 + static_cast<double>(i);
    cfg.dropout = c.dropout;
    cfg.init = lora::init_method::random_ab;
    cfg.seed = 7 + i;
    names.push_back("ad" + std::to_string(i));
    layer.add_adapter(names.back(), cfg);
  }
  layer.set_active(names);
  // Dropout masks depend only on each adapter's stream state: replay the same state for every evaluation.
  std::vector<lora::rng::state_type> states;
  for (const auto& n : names) states.push_back(layer.adapter(n).dropout_rng().state());
  auto rewind = [&] {
    for (std::size_t i = 0; i < names.size(); ++i) layer.adapter(names[i]).dropout_rng().set_state(states[i]);
  };
  auto loss = [&] {
    rewind();
    return layer.forward(x).cwiseProduct(g).sum();
  };

  rewind();
  layer.zero_grad();
  layer.forward(x);
  const mat dx = layer.backward(g);

  EXPECT_LT(lora_test::rel_error(dx, lora_test::numeric_gradient(x, loss)), 1e-7) << c.label << " dX";
  for (const auto& n : names) {
    auto& a = layer.adapter(n);
    const mat da = a.grad_a(), db = a.grad_b();
    EXPECT_LT(lora_test::rel_error(da, lora_test::numeric_gradient(a.a(), loss)), 1e-7) << c.label << " dA " << n;
    EXPECT_LT(lora_test::rel_error(db, lora_test::numeric_gradient(a.b(), loss)), 1e-7) << c.label << " dB " << n;
    EXPECT_GT(da.norm(), 0.0);
    EXPECT_GT(db.norm(), 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(shapes, linear_gradients,
                         ::testing::Values(case_spec{5, 4, 3, {2}, false, 0.0, "non-square, no bias"},
                                           case_spec{5, 4, 3, {2}, true, 0.0, "with bias"},
                                           case_spec{3, 6, 7, {1}, true, 0.0, "rank 1"},
                                           case_spec{4, 3, 5, {8}, false, 0.0, "rank above min(in, out)"},
                                           case_spec{6, 5, 4, {1, 3, 2}, true, 0.0, "three active adapters"},
                                           case_spec{6, 5, 4, {2, 3}, true, 0.3, "dropout on two adapters"},
                                           case_spec{1, 9, 2, {4}, true, 0.0, "single row"}));

// The same gradients when W is viewed in the other storage orders and layouts.
TEST(linear_gradients_layouts, views_agree_with_owned) {
  lora::rng gen(3);
  mat w(5, 4), x(3, 4), g(3, 5);
  for (mat* m : {&w, &x, &g})
    for (index i = 0; i < m->size(); ++i) m->data()[i] = gen.uniform(-1, 1);
  lora::adapter_config cfg;
  cfg.rank = 2;
  cfg.init = lora::init_method::random_ab;

  lora::linear<double> owned(w, "owned");
  owned.add_adapter("a", cfg);
  owned.forward(x);
  const mat dx_ref = owned.backward(g);
  const mat da_ref = owned.adapter("a").grad_a();
  const mat db_ref = owned.adapter("a").grad_b();

  Eigen::Matrix<double, -1, -1, Eigen::RowMajor> w_rm = w;
  mat w_t = w.transpose();                                                // in x out, column-major
  Eigen::Matrix<double, -1, -1, Eigen::RowMajor> w_t_rm = w.transpose();  // in x out, row-major
  std::vector<lora::linear<double>> layers;
  layers.emplace_back(lora::view, w_rm, "row-major");
  layers.emplace_back(lora::view, w_t, "in_out col-major", lora::weight_layout::in_out);
  layers.emplace_back(lora::view, w_t_rm, "in_out row-major", lora::weight_layout::in_out);
  for (auto& l : layers) {
    l.add_adapter("a", cfg);
    EXPECT_EQ(l.in_features(), 4);
    EXPECT_EQ(l.out_features(), 5);
    EXPECT_LT(lora_test::rel_error(l.weight(), w), 1e-15) << l.name();
    l.forward(x);
    const mat dx = l.backward(g);
    EXPECT_LT(lora_test::rel_error(dx, dx_ref), 1e-13) << l.name();
    EXPECT_LT(lora_test::rel_error(l.adapter("a").grad_a(), da_ref), 1e-13) << l.name();
    EXPECT_LT(lora_test::rel_error(l.adapter("a").grad_b(), db_ref), 1e-13) << l.name();
  }
}

// backward_params_only accumulates the same dA, dB as backward, and grads accumulate across calls.
TEST(linear_gradients_layouts, params_only_and_accumulation) {
  lora::rng gen(5);
  mat w(3, 4), x(2, 4), g(2, 3);
  for (mat* m : {&w, &x, &g})
    for (index i = 0; i < m->size(); ++i) m->data()[i] = gen.uniform(-1, 1);
  lora::adapter_config cfg;
  cfg.init = lora::init_method::random_ab;
  lora::linear<double> l(w);
  l.add_adapter("a", cfg);
  l.forward(x);
  l.backward(g);
  const mat da = l.adapter("a").grad_a();
  l.zero_grad();
  l.forward(x);
  l.backward_params_only(g);
  EXPECT_LT(lora_test::rel_error(l.adapter("a").grad_a(), da), 1e-15);
  l.forward(x);
  l.backward_params_only(g);
  EXPECT_LT(lora_test::rel_error(l.adapter("a").grad_a(), 2 * da), 1e-15);
}

}  // namespace
