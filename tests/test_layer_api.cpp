// The one adapter API (layer.hpp) over every layer kind: the is_lora_layer_v trait, shape-safe factor
// views, set_factors / add_adapter with factors (DoRA magnitude derived or given), errors worded with the
// composite layer's own name, and merges that are all-or-nothing across a layer's parts.
#include <lora/lora.hpp>

#include "layer_support.hpp"
#include "support.hpp"

namespace {

using lora::index;
using lora_test::bitwise_equal;
using lora_test::expect_error;
using lora_test::random_matrix;
using mat = lora::matrix<double>;

static_assert(lora::is_lora_layer_v<lora::linear<float>>);
static_assert(lora::is_lora_layer_v<lora::embedding<double>>);
static_assert(lora::is_lora_layer_v<lora::merged_linear<float>>);
static_assert(lora::is_lora_layer_v<lora::conv2d<double>>);
static_assert(!lora::is_lora_layer_v<lora::adapter<float>>);
static_assert(!lora::is_lora_layer_v<Eigen::MatrixXf>);

template <typename Scalar>
class layer_api_typed : public ::testing::Test {};
TYPED_TEST_SUITE(layer_api_typed, lora_test::scalar_types);

// The misuse from the issue: a rank-2, in = 4 adapter handed a 2 x 5 matrix through a().
TYPED_TEST(layer_api_typed, factor_views_refuse_to_resize) {
  using S = TypeParam;
  using M = lora::matrix<S>;
  lora::rng gen(1);
  lora::linear<S> layer(random_matrix<S>(gen, 3, 4), "proj");
  auto& a = layer.add_adapter("a", lora_test::random_config(2, 4.0, 7));
  const M before = a.a();
  expect_error<lora::shape_error>([&] { layer.adapter("a").a() = M::Ones(2, 5); },
                                  {"linear 'proj' adapter 'a'", "A (rank x in_features)", "2x4", "2x5"});
  expect_error<lora::shape_error>([&] { a.b() += M::Ones(2, 3); }, {"B (out_features x rank)", "3x2", "2x3"});
  expect_error<lora::shape_error>([&] { a.grad_a() -= M::Ones(4, 2); }, {"dA", "2x4", "4x2"});
  EXPECT_TRUE(bitwise_equal(a.a(), before));
  EXPECT_EQ(a.grad_a().rows(), 2);
  EXPECT_EQ(a.grad_a().cols(), 4);
  // Same-shape writes go through, in place.
  a.a() = M::Constant(2, 4, S(0.5));
  a.b() += M::Ones(3, 2);
  EXPECT_EQ(layer.adapter("a").a()(1, 3), S(0.5));
  const M x = random_matrix<S>(gen, 5, 4);
  const M expected = x * layer.weight().transpose() + S(a.scaling()) * (x * a.a().transpose()) * a.b().transpose();
  EXPECT_LT(lora_test::rel_error(layer.forward(x), expected), lora_test::tolerance<S>());
}

TYPED_TEST(layer_api_typed, set_factors_checks_shapes_and_leaves_factors_on_error) {
  using S = TypeParam;
  using M = lora::matrix<S>;
  lora::rng gen(2);
  lora::linear<S> layer(random_matrix<S>(gen, 3, 4), "proj");
  layer.add_adapter("a", lora_test::random_config(2, 4.0, 7));
  const M a0 = layer.adapter("a").a(), b0 = layer.adapter("a").b();
  expect_error<lora::shape_error>([&] { layer.set_factors("a", M(2, 5), M(3, 2)); },
                                  {"linear 'proj' adapter 'a'", "A must be 2x4", "got 2x5"});
  expect_error<lora::shape_error>([&] { layer.set_factors("a", M(2, 4), M(2, 2)); }, {"B must be 3x2", "got 2x2"});
  expect_error<lora::name_error>([&] { layer.set_factors("zz", M(2, 4), M(3, 2)); }, {"no adapter named 'zz'"});
  EXPECT_TRUE(bitwise_equal(layer.adapter("a").a(), a0));
  EXPECT_TRUE(bitwise_equal(layer.adapter("a").b(), b0));
  const M a1 = random_matrix<S>(gen, 2, 4), b1 = random_matrix<S>(gen, 3, 2);
  layer.set_factors("a", a1, b1);
  EXPECT_TRUE(bitwise_equal(layer.adapter("a").a(), a1));
  EXPECT_TRUE(bitwise_equal(layer.adapter("a").b(), b1));
  layer.merge();
  expect_error<lora::state_error>([&] { layer.set_factors("a", a1, b1); }, {"is merged"});
}

TYPED_TEST(layer_api_typed, add_adapter_with_factors_is_all_or_nothing) {
  using S = TypeParam;
  using M = lora::matrix<S>;
  lora::rng gen(3);
  lora::linear<S> layer(random_matrix<S>(gen, 3, 4), "proj");
  lora::adapter_config c;
  c.rank = 2;
  c.alpha = 2.0;
  expect_error<lora::shape_error>([&] { layer.add_adapter("a", c, M(3, 4), M(3, 3)); },
                                  {"A must be 2x4 (rank x in_features), got 3x4"});
  EXPECT_FALSE(layer.has_adapter("a"));
  const M a = random_matrix<S>(gen, 2, 4), b = random_matrix<S>(gen, 3, 2);
  auto& added = layer.add_adapter("a", c, a, b);
  EXPECT_TRUE(bitwise_equal(added.a(), a));
  EXPECT_TRUE(bitwise_equal(added.b(), b));
}

// A DoRA adapter created from given factors starts at m = ‖W + s B A‖ (so the layer equals W + s B A),
// unless m is given.
TEST(layer_api, dora_magnitude_from_factors_or_given) {
  lora::rng gen(4);
  const mat w = random_matrix(gen, 5, 6);
  lora::linear<double> layer(w, "proj");
  lora::adapter_config c;
  c.rank = 3;
  c.alpha = 6.0;
  c.use_dora = true;
  const mat a = random_matrix(gen, 3, 6), b = random_matrix(gen, 5, 3);
  auto& d = layer.add_adapter("d", c, a, b);
  const mat merged = w + d.scaling() * b * a;
  EXPECT_LT(lora_test::rel_error(d.magnitude(), merged.rowwise().norm()), 1e-13);
  const mat x = random_matrix(gen, 4, 6);
  EXPECT_LT(lora_test::rel_error(layer.infer(x), x * merged.transpose()), 1e-12);

  const Eigen::VectorXd m = Eigen::VectorXd::LinSpaced(5, 1.0, 2.0);
  layer.set_factors("d", a, b, m);
  EXPECT_TRUE(bitwise_equal(d.magnitude(), m));
  expect_error<lora::shape_error>([&] { layer.set_factors("d", a, b, Eigen::VectorXd::Ones(4)); },
                                  {"magnitude must be a vector of length out_features = 5", "4x1"});
  lora::linear<double> plain(w, "plain");
  plain.add_adapter("p", lora_test::random_config(3, 6.0, 1));
  expect_error<lora::config_error>([&] { plain.set_factors("p", a, b, m); }, {"does not use DoRA"});
  c.use_dora = false;
  expect_error<lora::config_error>([&] { plain.add_adapter("q", c, a, b, m); }, {"use_dora is false"});
  EXPECT_FALSE(plain.has_adapter("q"));
}

// Errors raised inside a composite layer name that layer, not the linear it is built from.
TEST(layer_api, composite_errors_name_the_composite) {
  lora::rng gen(5);
  lora::embedding<double> wte(random_matrix(gen, 10, 4), "wte");
  expect_error<lora::name_error>([&] { wte.remove_adapter("nope"); }, {"embedding 'wte'", "no adapter named 'nope'"});
  wte.add_adapter("a", lora_test::random_config(2, 2.0, 1));
  expect_error<lora::name_error>([&] { wte.add_adapter("a"); }, {"embedding 'wte'", "already exists"});
  expect_error<lora::shape_error>([&] { wte.set_factors("a", mat(2, 9), mat(4, 2)); },
                                  {"embedding 'wte' adapter 'a'", "A must be 2x10"});
  expect_error<lora::shape_error>([&] { wte.adapter("a").b() = mat::Ones(5, 2); }, {"embedding 'wte' adapter 'a'"});
  wte.merge();
  expect_error<lora::state_error>([&] { wte.remove_adapter("a"); }, {"embedding 'wte'", "merged"});

  lora::merged_linear<double> qkv(random_matrix(gen, 6, 4), {true, false, true}, "c_attn");
  qkv.add_adapter("a", lora_test::random_config(2, 2.0, 1));
  expect_error<lora::name_error>([&] { qkv.set_active({"a", "b"}); }, {"merged_linear 'c_attn'", "'b'"});
  expect_error<lora::shape_error>([&] { qkv.adapter("a", 1); }, {"merged_linear 'c_attn'", "slice 1"});
  expect_error<lora::shape_error>([&] { qkv.set_factors("a", 2, mat(2, 4), mat(3, 2)); },
                                  {"merged_linear 'c_attn' adapter 'a'", "B must be 2x2"});

  lora::conv2d_options o;
  o.in_channels = 2;
  o.input = {4, 4};
  o.kernel = {3, 3};
  o.groups = 2;
  lora::conv2d<double> grouped(random_matrix(gen, 4, 9), o, "conv");
  expect_error<lora::config_error>([&] { grouped.add_adapter("a"); }, {"conv2d 'conv'", "groups = 1"});
  EXPECT_TRUE(grouped.adapter_names().empty());
  EXPECT_FALSE(grouped.merged());
}

// merged_linear: a safe merge refused on one slice leaves every slice bit for bit as it was, and the
// error names the fused layer.
TEST(layer_api, safe_merge_is_all_or_nothing_across_parts) {
  lora::rng gen(6);
  const mat w = random_matrix(gen, 6, 4);
  lora::merged_linear<double> qkv(w, {true, true, true}, "c_attn");
  qkv.add_adapter("ok", lora_test::random_config(2, 2.0, 1));
  qkv.merge();
  const mat merged_once = qkv.weight();
  qkv.add_adapter("bad", lora_test::random_config(2, 2.0, 2));
  qkv.set_factors("bad", 2, mat::Constant(2, 4, 1e300), mat::Constant(2, 2, 1e300));
  expect_error<lora::numeric_error>([&] { qkv.safe_merge({"bad"}); }, {"merged_linear 'c_attn'", "'bad'"});
  EXPECT_TRUE(bitwise_equal(qkv.weight(), merged_once));
  EXPECT_EQ(qkv.merged_adapters(), std::vector<std::string>{"ok"});
  qkv.unmerge();
  EXPECT_TRUE(bitwise_equal(qkv.weight(), w));
}

// The same generic code works on every layer kind through the trait and the shared API.
template <typename Layer>
std::size_t count_trainables(Layer& layer) {
  static_assert(lora::is_lora_layer_v<Layer>, "a LoRA layer");
  return layer.parameters().size();
}

TEST(layer_api, one_api_for_every_layer_kind) {
  lora::rng gen(7);
  lora::linear<double> lin(random_matrix(gen, 3, 4), "lin");
  lora::embedding<double> emb(random_matrix(gen, 8, 3), "emb");
  lora::merged_linear<double> fused(random_matrix(gen, 6, 4), {true, false, true}, "fused");
  lora::conv2d_options o;
  o.in_channels = 1;
  o.input = {4, 4};
  o.kernel = {3, 3};
  lora::conv2d<double> conv(random_matrix(gen, 2, 9), o, "conv");
  auto exercise = [](auto& layer, std::size_t per_adapter) {
    layer.add_adapter("a", lora_test::random_config(2, 2.0, 1));
    layer.add_adapter("b", lora_test::random_config(1, 2.0, 2));
    EXPECT_EQ(layer.adapter_names(), (std::vector<std::string>{"a", "b"}));
    EXPECT_EQ(layer.active_adapters(), std::vector<std::string>{"a"});
    layer.set_active({"a", "b"});
    EXPECT_EQ(count_trainables(layer), 2 * per_adapter);
    layer.eval();
    EXPECT_FALSE(layer.training());
    layer.train();
    EXPECT_TRUE(layer.training());
    layer.disable_adapters();
    EXPECT_TRUE(layer.adapters_disabled());
    layer.enable_adapters();
    const auto before = layer.weight();
    layer.merge();
    EXPECT_TRUE(layer.merged());
    EXPECT_EQ(count_trainables(layer), 0U);
    layer.unmerge();
    EXPECT_TRUE(bitwise_equal(layer.weight(), before));
    layer.remove_adapter("b");
    EXPECT_GT(layer.report().trainable_params, 0);
    const auto unloaded = layer.merge_and_unload();
    EXPECT_TRUE(layer.adapter_names().empty());
    EXPECT_TRUE(bitwise_equal(layer.weight(), unloaded));
  };
  exercise(lin, 2);
  exercise(emb, 2);
  exercise(fused, 4);  // two enabled slices, A and B each
  exercise(conv, 2);
}

}  // namespace
