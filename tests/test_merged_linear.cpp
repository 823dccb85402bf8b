// lora::merged_linear (loralib's MergedLinear): slices against a dense reference on every storage,
// gradients against finite differences, exact merge/unmerge that leaves frozen slices untouched, and the
// PEFT view of the same fused weight as one lora::linear (weight_layout::in_out) merging to the same W.
#include <limits>
#include <lora/merged_linear.hpp>

#include "layer_support.hpp"
#include "support.hpp"

namespace {

using lora::index;
using lora_test::bitwise_equal;
using lora_test::expect_error;
using lora_test::random_config;
using lora_test::random_matrix;

/// X Wᵀ + b + Σ_{enabled i} s (X A_iᵀ) B_iᵀ in the rows of slice i, in double.
template <typename Scalar>
lora::matrix<double> reference(const lora::merged_linear<Scalar>& m, const lora::matrix<Scalar>& w_out_in,
                               const lora::vector<Scalar>& bias, const lora::matrix<Scalar>& x,
                               const std::string& adapter) {
  const lora::matrix<double> xd = x.template cast<double>();
  lora::matrix<double> y = xd * w_out_in.template cast<double>().transpose();
  y.rowwise() += bias.template cast<double>().transpose();
  for (index i = 0; i < m.num_slices(); ++i) {
    if (!m.enable_lora()[static_cast<std::size_t>(i)]) continue;
    const auto& a = m.adapter(adapter, i);
    y.middleCols(i * m.slice_features(), m.slice_features()) += double(a.scaling()) * xd *
                                                                a.a().template cast<double>().transpose() *
                                                                a.b().template cast<double>().transpose();
  }
  return y;
}

template <typename Scalar>
class merged_linear_typed : public ::testing::Test {};
TYPED_TEST_SUITE(merged_linear_typed, lora_test::scalar_types);

TYPED_TEST(merged_linear_typed, forward_matches_reference_on_every_storage) {
  using S = TypeParam;
  using row_major = Eigen::Matrix<S, -1, -1, Eigen::RowMajor>;
  lora::rng gen(1);
  const index in = 7, out = 9;
  const lora::matrix<S> w = random_matrix<S>(gen, out, in);  // out x in
  const lora::vector<S> b = random_matrix<S>(gen, out, 1).col(0);
  const lora::matrix<S> x = random_matrix<S>(gen, 5, in);
  lora::matrix<S> cm = w;
  row_major rm = w;
  lora::matrix<S> cm_t = w.transpose();  // in x out, GPT-2's Conv1D
  row_major rm_t = w.transpose();
  const std::vector<bool> enable{true, false, true};
  std::vector<lora::merged_linear<S>> layers;
  layers.emplace_back(w, b, enable, "owned");
  layers.emplace_back(lora::view, cm, enable, "view col-major");
  layers.emplace_back(lora::view, rm, enable, "view row-major");
  layers.emplace_back(lora::view, cm_t, enable, "view in_out col-major", lora::weight_layout::in_out);
  layers.emplace_back(lora::view, rm_t, enable, "view in_out row-major", lora::weight_layout::in_out);
  for (auto& m : layers) {
    if (m.name() != "owned") m.set_bias(b);
    m.add_adapter("default", random_config(2, 4.0, 5));
    EXPECT_EQ(m.out_features(), out);
    EXPECT_EQ(m.slice_features(), 3);
    EXPECT_TRUE(bitwise_equal(m.weight(), w)) << m.name();
    const auto expected = reference(m, w, b, x, "default");
    EXPECT_LT(lora_test::rel_error(m.forward(x), expected), 10 * lora_test::tolerance<S>()) << m.name();
    EXPECT_LT(lora_test::rel_error(m.infer(x), expected), 10 * lora_test::tolerance<S>()) << m.name();
  }
  // Slices draw their own factors (seed + i).
  EXPECT_FALSE(layers[0].adapter("default", 0).a().isApprox(layers[0].adapter("default", 2).a()));
}

TYPED_TEST(merged_linear_typed, merge_is_exact_and_leaves_frozen_slices_untouched) {
  using S = TypeParam;
  lora::rng gen(2);
  const lora::matrix<S> w_t = random_matrix<S>(gen, 6, 12);  // stored in x out: in = 6, out = 12
  lora::matrix<S> storage = w_t;
  lora::merged_linear<S> m(lora::view, storage, {true, false, true}, "c_attn", lora::weight_layout::in_out);
  m.add_adapter("a", random_config(2, 4.0, 1));
  m.add_adapter("b", random_config(3, 3.0, 2));
  m.set_active({"a", "b"});
  const lora::matrix<S> x = random_matrix<S>(gen, 4, 6);
  const auto y = m.infer(x);
  m.merge();
  EXPECT_EQ(m.merged_adapters(), (std::vector<std::string>{"a", "b"}));
  EXPECT_LT(lora_test::rel_error(m.infer(x), y), 10 * lora_test::tolerance<S>());
  EXPECT_LT(lora_test::rel_error(m.forward(x), y), 10 * lora_test::tolerance<S>());
  EXPECT_TRUE(bitwise_equal(lora::matrix<S>(storage.middleCols(4, 4)), lora::matrix<S>(w_t.middleCols(4, 4))));
  EXPECT_FALSE(storage.middleCols(0, 4).isApprox(w_t.middleCols(0, 4)));
  m.unmerge();
  EXPECT_TRUE(bitwise_equal(storage, w_t));
  for (int cycle = 0; cycle < 200; ++cycle) {
    m.merge({cycle % 2 ? "a" : "b"});
    m.merge();
    m.unmerge();
  }
  EXPECT_TRUE(bitwise_equal(storage, w_t));
}

// The PEFT view of GPT-2's c_attn: one lora::linear over the fused in x out weight. A merged_linear with
// every slice enabled and rank r equals a linear with rank k r, A = [A_0; A_1; A_2] and block-diagonal B
// (alpha scaled by k so that s = alpha / r is unchanged); with {true, false, true} the k block of B is zero.
TYPED_TEST(merged_linear_typed, peft_single_linear_view_merges_to_the_same_weight) {
  using S = TypeParam;
  lora::rng gen(3);
  const index in = 8, m_out = 4, k = 3, r = 2;
  const lora::matrix<S> w_t = random_matrix<S>(gen, in, k * m_out);  // in x out, as GPT-2 stores c_attn
  const lora::matrix<S> x = random_matrix<S>(gen, 5, in);
  for (const std::vector<bool>& enable : {std::vector<bool>{true, true, true}, std::vector<bool>{true, false, true}}) {
    lora::matrix<S> w_merged = w_t, w_peft = w_t;
    lora::merged_linear<S> fused(lora::view, w_merged, enable, "c_attn", lora::weight_layout::in_out);
    fused.add_adapter("default", random_config(r, 4.0, 9));
    lora::linear<S> peft(lora::view, w_peft, "c_attn", lora::weight_layout::in_out);
    auto& big = peft.add_adapter("default", random_config(k * r, 4.0 * k, 0));
    big.a().setZero();
    big.b().setZero();
    for (index i = 0; i < k; ++i) {
      if (!enable[static_cast<std::size_t>(i)]) continue;
      big.a().middleRows(i * r, r) = fused.adapter("default", i).a();
      big.b().block(i * m_out, i * r, m_out, r) = fused.adapter("default", i).b();
    }
    ASSERT_EQ(big.scaling(), fused.adapter("default", 0).scaling());
    EXPECT_LT(lora_test::rel_error(peft.infer(x), fused.infer(x)), 10 * lora_test::tolerance<S>());
    fused.merge();
    peft.merge();
    EXPECT_LT(lora_test::rel_error(w_peft, w_merged), 10 * lora_test::tolerance<S>());
    EXPECT_LT(lora_test::rel_error(peft.infer(x), fused.infer(x)), 10 * lora_test::tolerance<S>());
    fused.unmerge();
    peft.unmerge();
    EXPECT_TRUE(bitwise_equal(w_merged, w_t));
    EXPECT_TRUE(bitwise_equal(w_peft, w_t));
  }
}

struct grad_case {
  bool in_out;
  double dropout;
  const char* label;
};

class merged_linear_gradients : public ::testing::TestWithParam<grad_case> {};

// Loss L = Σ (Y ⊙ G), so dL/dY = G.
TEST_P(merged_linear_gradients, match_finite_differences) {
  const grad_case c = GetParam();
  lora::rng gen(4);
  const index in = 5, out = 6;
  lora::matrix<double> storage = c.in_out ? random_matrix<double>(gen, in, out) : random_matrix<double>(gen, out, in);
  lora::merged_linear<double> m(lora::view, storage, {true, false, true}, "qkv",
                                c.in_out ? lora::weight_layout::in_out : lora::weight_layout::out_in);
  m.set_bias(random_matrix<double>(gen, out, 1).col(0));
  m.add_adapter("a", random_config(2, 3.0, 1, c.dropout));
  m.add_adapter("b", random_config(1, 2.0, 2, c.dropout));
  m.set_active({"a", "b"});
  lora::matrix<double> x = random_matrix<double>(gen, 4, in);
  const lora::matrix<double> g = random_matrix<double>(gen, 4, out);
  // Replay every slice's dropout stream for each evaluation.
  std::vector<std::pair<lora::adapter<double>*, lora::rng::state_type>> streams;
  for (index i : {0, 2})
    for (const auto* n : {"a", "b"}) streams.emplace_back(&m.adapter(n, i), m.adapter(n, i).dropout_rng().state());
  auto rewind = [&] {
    for (auto& [a, st] : streams) a->dropout_rng().set_state(st);
  };
  auto loss = [&] {
    rewind();
    return m.forward(x).cwiseProduct(g).sum();
  };
  rewind();
  m.forward(x);
  const lora::matrix<double> dx = m.backward(g);
  EXPECT_LT(lora_test::rel_error(dx, lora_test::numeric_gradient(x, loss)), 1e-8) << c.label;
  for (auto& [a, st] : streams) {
    const lora::matrix<double> da = a->grad_a(), db = a->grad_b();
    EXPECT_LT(lora_test::rel_error(da, lora_test::numeric_gradient(a->a(), loss)), 1e-8) << c.label;
    EXPECT_LT(lora_test::rel_error(db, lora_test::numeric_gradient(a->b(), loss)), 1e-8) << c.label;
    EXPECT_GT(db.norm(), 0.0);
  }
  // backward_params_only accumulates the same dA, dB.
  m.zero_grad();
  rewind();
  m.forward(x);
  m.backward_params_only(g);
  EXPECT_LT(lora_test::rel_error(m.adapter("a", 2).grad_b(), lora_test::numeric_gradient(m.adapter("a", 2).b(), loss)),
            1e-8);
}

INSTANTIATE_TEST_SUITE_P(storages, merged_linear_gradients,
                         ::testing::Values(grad_case{false, 0.0, "out_in"}, grad_case{true, 0.0, "in_out"},
                                           grad_case{true, 0.3, "in_out with dropout"}));

TEST(merged_linear, parameters_report_and_errors) {
  lora::merged_linear<double> m(lora::matrix<double>::Ones(9, 4), lora::vector<double>::Zero(9), {true, false, true},
                                "c_attn");
  m.add_adapter("default", random_config(2, 2.0, 1));
  const auto ps = m.parameters();
  ASSERT_EQ(ps.size(), 4u);
  EXPECT_EQ(ps[0].name, "c_attn.0.lora_A.default.weight");
  EXPECT_EQ(ps[3].name, "c_attn.2.lora_B.default.weight");
  EXPECT_EQ(ps[3].rows, 3);  // out / k
  const auto r = m.report();
  EXPECT_EQ(r.frozen_params, 9 * 4 + 9);
  EXPECT_EQ(r.trainable_params, 2 * (2 * 4 + 3 * 2));
  EXPECT_FALSE(m.is_view());

  expect_error<lora::shape_error>([&] { m.adapter("default", 1); }, {"c_attn", "slice 1", "enable_lora"});
  expect_error<lora::name_error>([&] { m.add_adapter("default"); }, {"already exists"});
  expect_error<lora::shape_error>([&] { m.forward(lora::matrix<double>::Ones(2, 5)); },
                                  {"c_attn", "in_features = 4", "2x5"});
  expect_error<lora::state_error>([&] { m.backward(lora::matrix<double>::Ones(2, 9)); }, {"c_attn", "forward"});
  expect_error<lora::shape_error>(
      [&] {
        lora::merged_linear<double>(lora::matrix<double>::Ones(10, 4), {true, false, true}, "bad");
      },
      {"bad", "divisible", "len(enable_lora) = 3", "10x4"});
  lora::merged_linear<double> frozen(lora::matrix<double>::Ones(4, 4), {false, false}, "k_only");
  expect_error<lora::config_error>([&] { frozen.add_adapter("x"); }, {"k_only", "enable_lora"});
}

// Slice 0 merges, slice 1 refuses: slice 0 is rolled back to its state before the call, earlier merges
// included, bit for bit.
TEST(merged_linear, refused_safe_merge_leaves_every_slice_as_it_was) {
  lora::rng gen(5);
  lora::matrix<double> w = random_matrix<double>(gen, 6, 3);
  const lora::matrix<double> original = w;
  lora::merged_linear<double> m(lora::view, w, {true, true}, "qk");
  m.add_adapter("good", random_config(1, 1.0, 1));
  m.add_adapter("bad", random_config(2, 1.0, 2));
  m.adapter("bad", 1).b()(0, 0) = std::numeric_limits<double>::infinity();
  m.merge({"good"});
  const lora::matrix<double> after_good = w;
  expect_error<lora::numeric_error>([&] { m.safe_merge({"bad"}); }, {"qk", "non-finite", "unchanged"});
  EXPECT_EQ(m.merged_adapters(), std::vector<std::string>{"good"});
  EXPECT_TRUE(bitwise_equal(w, after_good));
  EXPECT_FALSE(m.adapter("bad", 0).merged());
  m.unmerge();
  EXPECT_TRUE(bitwise_equal(w, original));
}

// DoRA runs per slice: rows of slice i become m_i ⊙ (W_i + s B_i A_i) / ‖W_i + s B_i A_i‖ (row norms).
TEST(merged_linear, dora_adapters_rescale_their_slice_rows) {
  lora::rng gen(6);
  const lora::matrix<double> w = random_matrix<double>(gen, 9, 5);
  lora::matrix<double> storage = w;
  lora::merged_linear<double> m(lora::view, storage, {true, false, true}, "qkv");
  lora::adapter_config cfg = random_config(2, 3.0, 1);
  cfg.use_dora = true;
  m.add_adapter("dora", cfg);
  lora::matrix<double> expected = w;
  for (index i : {0, 2}) {
    auto& a = m.adapter("dora", i);
    a.magnitude() = (random_matrix<double>(gen, 3, 1).array() + 2.0).matrix();
    const lora::matrix<double> v = w.middleRows(3 * i, 3) + a.scaling() * a.b() * a.a();
    expected.middleRows(3 * i, 3) = a.magnitude().cwiseQuotient(v.rowwise().norm()).asDiagonal() * v;
  }
  const lora::matrix<double> x = random_matrix<double>(gen, 4, 5);
  EXPECT_LT(lora_test::rel_error(m.forward(x), lora::matrix<double>(x * expected.transpose())), 1e-12);
  m.merge();
  EXPECT_LT(lora_test::rel_error(storage, expected), 1e-12);
  m.unmerge();
  EXPECT_TRUE(bitwise_equal(storage, w));
  EXPECT_EQ(m.parameters().size(), 6u);  // A, B and the magnitude on each enabled slice
}

}  // namespace
