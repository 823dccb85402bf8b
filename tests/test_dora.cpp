// DoRA in lora::linear: forward against the formula W' = m ⊙ (W + s B A) / ‖W + s B A‖_row, gradients with
// the norm treated as a constant (as PEFT does) against finite differences of that formula, exact merges.
#include <cstring>
#include <lora/lora.hpp>

#include "support.hpp"

namespace {

using lora::index;
using mat = lora::matrix<double>;
using vec = lora::vector<double>;

mat random(lora::rng& gen, index r, index c) { return lora_test::random_matrix(gen, r, c); }

lora::adapter_config dora_config(index rank, double alpha, std::uint64_t seed) {
  lora::adapter_config c;
  c.rank = rank;
  c.alpha = alpha;
  c.use_dora = true;
  c.init = lora::init_method::random_ab;
  c.seed = seed;
  return c;
}

// Row norms of W + s B A, formed densely (the independent reference).
vec dense_norm(const mat& w, const mat& a, const mat& b, double s) { return (w + s * b * a).rowwise().norm(); }

TEST(dora, forward_matches_formula_and_starts_at_base) {
  lora::rng gen(1);
  const mat w = random(gen, 6, 5), x = random(gen, 4, 5);
  const vec bias = random(gen, 6, 1);
  lora::linear<double> layer(w, bias, "fc");
  auto& d = layer.add_adapter("d", dora_config(3, 6.0, 2));
  // At creation the magnitude is ‖W + s B A‖, so the layer equals the plain LoRA layer W + s B A.
  const mat w_lora = w + d.scaling() * d.b() * d.a();
  EXPECT_LT(lora_test::rel_error(d.magnitude(), dense_norm(w, d.a(), d.b(), d.scaling())), 1e-12);
  EXPECT_LT(lora_test::rel_error(layer.infer(x), (x * w_lora.transpose()).rowwise() + bias.transpose()), 1e-12);
  // With another magnitude: y = X W'ᵀ + b, W' = m ⊙ (W + s B A) / ‖W + s B A‖.
  for (index o = 0; o < 6; ++o) d.magnitude()(o) *= 1.0 + 0.1 * double(o);
  const vec n = dense_norm(w, d.a(), d.b(), d.scaling());
  const mat w_dora = d.magnitude().cwiseQuotient(n).asDiagonal() * w_lora;
  const mat expected = (x * w_dora.transpose()).rowwise() + bias.transpose();
  EXPECT_LT(lora_test::rel_error(layer.forward(x), expected), 1e-12);
  EXPECT_LT(lora_test::rel_error(layer.infer(x), expected), 1e-12);
  // With the default init (B = 0) a DoRA layer starts exactly at the base layer.
  lora::linear<double> fresh(w, bias, "fc");
  lora::adapter_config c;
  c.use_dora = true;
  fresh.add_adapter("d", c);
  EXPECT_LT(lora_test::rel_error(fresh.forward(x), (x * w.transpose()).rowwise() + bias.transpose()), 1e-12);
}

// Gradients: A and B against finite differences of the formula with n frozen at its current value (the
// detached norm of PEFT and the DoRA paper, §4.3); m and X against finite differences of the layer itself.
TEST(dora, gradients_match_detached_norm_formula) {
  for (bool transposed : {false, true}) {
    lora::rng gen(3);
    const mat w = random(gen, 5, 4), g = random(gen, 3, 5);
    mat x = random(gen, 3, 4);
    const vec bias = random(gen, 5, 1);
    mat w_t = w.transpose();
    lora::linear<double> layer = transposed ? lora::linear<double>(lora::view, w_t, "t", lora::weight_layout::in_out)
                                            : lora::linear<double>(w, "n");
    layer.set_bias(bias);
    auto& d = layer.add_adapter("d", dora_config(2, 3.0, 4));
    lora::adapter_config plain;
    plain.rank = 3;
    plain.init = lora::init_method::random_ab;
    plain.seed = 9;
    auto& p = layer.add_adapter("p", plain);
    layer.set_active({"d", "p"});
    d.magnitude() *= 1.3;
    const double s = d.scaling();

    layer.zero_grad();
    layer.forward(x);
    const mat dx = layer.backward(g);

    const vec n0 = dense_norm(w, d.a(), d.b(), s);  // frozen
    auto reference = [&] {
      const mat wd = d.magnitude().cwiseQuotient(n0).asDiagonal() * (w + s * d.b() * d.a());
      const mat y = (x * (wd + p.scaling() * p.b() * p.a()).transpose()).rowwise() + bias.transpose();
      return y.cwiseProduct(g).sum();
    };
    auto layer_loss = [&] { return layer.forward(x).cwiseProduct(g).sum(); };
    EXPECT_LT(lora_test::rel_error(d.grad_a(), lora_test::numeric_gradient(d.a(), reference)), 1e-7);
    EXPECT_LT(lora_test::rel_error(d.grad_b(), lora_test::numeric_gradient(d.b(), reference)), 1e-7);
    EXPECT_LT(lora_test::rel_error(p.grad_a(), lora_test::numeric_gradient(p.a(), reference)), 1e-7);
    EXPECT_LT(lora_test::rel_error(p.grad_b(), lora_test::numeric_gradient(p.b(), reference)), 1e-7);
    mat m = d.magnitude();
    const mat dm = lora_test::numeric_gradient(d.magnitude().data(), 5, 1, layer_loss);
    EXPECT_LT(lora_test::rel_error(mat(d.grad_magnitude()), dm), 1e-7);
    EXPECT_LT(lora_test::rel_error(dx, lora_test::numeric_gradient(x, layer_loss)), 1e-7);
    EXPECT_EQ(m, mat(d.magnitude()));
  }
}

TEST(dora, merge_equals_unmerged_and_unmerge_is_exact) {
  lora::rng gen(5);
  const mat w = random(gen, 8, 7), x = random(gen, 4, 7);
  mat w_t = w.transpose();
  std::vector<lora::linear<double>> layers;
  layers.emplace_back(w, "owned");
  layers.emplace_back(lora::view, w_t, "in_out", lora::weight_layout::in_out);
  for (auto& l : layers) {
    auto& d = l.add_adapter("d", dora_config(3, 6.0, 6));
    d.magnitude() *= 0.7;
    lora::adapter_config plain;
    plain.init = lora::init_method::random_ab;
    l.add_adapter("p", plain);
    l.set_active({"d", "p"});
    const mat y = l.infer(x);
    l.merge();  // DoRA first, then the plain adapter: two records
    EXPECT_EQ(l.merged_adapters(), (std::vector<std::string>{"d", "p"}));
    EXPECT_LT(lora_test::rel_error(l.infer(x), y), 1e-12) << l.name();
    for (int cycle = 0; cycle < 200; ++cycle) {
      l.unmerge();
      l.merge();
    }
    l.unmerge();
    const mat back = l.weight();
    EXPECT_EQ(std::memcmp(back.data(), w.data(), sizeof(double) * w.size()), 0) << l.name();
    EXPECT_LT(lora_test::rel_error(l.infer(x), y), 1e-12) << l.name();
  }
}

TEST(dora, merge_rules_and_parameters) {
  lora::rng gen(7);
  lora::linear<double> layer(random(gen, 4, 3), "fc");
  layer.add_adapter("d1", dora_config(2, 2.0, 1));
  layer.add_adapter("d2", dora_config(2, 2.0, 2));
  lora::adapter_config plain;
  layer.add_adapter("p", plain);
  layer.set_active({"d1", "d2", "p"});
  lora_test::expect_error<lora::state_error>([&] { layer.merge(); }, {"fc", "one at a time", "'d1'", "'d2'"});
  layer.merge({"p"});
  lora_test::expect_error<lora::state_error>([&] { layer.merge({"d1"}); }, {"'d1'", "before any other"});
  layer.unmerge();
  auto ps = layer.parameters("d1");
  ASSERT_EQ(ps.size(), 3u);
  EXPECT_EQ(ps[2].name, "fc.lora_magnitude_vector.d1");
  EXPECT_EQ(ps[2].role, lora::param_role::vector);
  EXPECT_EQ(ps[2].size(), 4);
  EXPECT_EQ(layer.report().trainable_params, 2 * (2 * 3 + 4 * 2 + 4) + 8 * (3 + 4));
}

}  // namespace
