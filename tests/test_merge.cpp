// Merging adapters into W: merged forward equals the unmerged one, unmerge restores W bit for bit after
// any number of cycles, safe_merge refuses non-finite results, merge_and_unload hands back W + Σ s B A.
#include <cstring>
#include <limits>
#include <lora/lora.hpp>

#include "support.hpp"

namespace {

using lora_test::bitwise_equal;
using lora_test::random_matrix;

using lora::index;

template <typename Scalar>
lora::adapter_config random_config(index rank, double alpha, std::uint64_t seed) {
  lora::adapter_config c;
  c.rank = rank;
  c.alpha = alpha;
  c.init = lora::init_method::random_ab;
  c.seed = seed;
  return c;
}

template <typename Scalar>
class merge : public ::testing::Test {};
TYPED_TEST_SUITE(merge, lora_test::scalar_types);

TYPED_TEST(merge, merged_forward_equals_unmerged) {
  using S = TypeParam;
  lora::rng gen(11);
  const auto w = random_matrix<S>(gen, 9, 6);
  const auto x = random_matrix<S>(gen, 5, 6);
  lora::linear<S> layer(w, lora::vector<S>::Ones(9), "fc");
  layer.add_adapter("a", random_config<S>(3, 6.0, 1));
  layer.add_adapter("b", random_config<S>(2, 1.0, 2));
  layer.set_active({"a", "b"});
  const auto y = layer.infer(x);
  layer.merge();
  EXPECT_TRUE(layer.merged());
  EXPECT_EQ(layer.merged_adapters(), (std::vector<std::string>{"a", "b"}));
  EXPECT_LT(lora_test::rel_error(layer.infer(x), y), 10 * lora_test::tolerance<S>());
  EXPECT_LT(lora_test::rel_error(layer.forward(x), y), 10 * lora_test::tolerance<S>());
  // Independent computation of W + Σ s B A.
  const auto& a = layer.adapter("a");
  const auto& b = layer.adapter("b");
  const lora::matrix<double> expected =
      w.template cast<double>() +
      double(a.scaling()) * (a.b().template cast<double>() * a.a().template cast<double>()) +
      double(b.scaling()) * (b.b().template cast<double>() * b.a().template cast<double>());
  EXPECT_LT(lora_test::rel_error(layer.weight(), expected), 10 * lora_test::tolerance<S>());
  layer.unmerge();
  EXPECT_TRUE(bitwise_equal(layer.weight(), w));
  EXPECT_FALSE(layer.merged());
}

// 1000 merge/unmerge cycles on every storage arrangement leave W bit-identical.
TYPED_TEST(merge, unmerge_is_bit_exact_after_1000_cycles) {
  using S = TypeParam;
  lora::rng gen(12);
  const auto w = random_matrix<S>(gen, 33, 70);
  lora::matrix<S> w_cm = w;
  Eigen::Matrix<S, -1, -1, Eigen::RowMajor> w_rm = w;
  lora::matrix<S> w_t = w.transpose();
  std::vector<lora::linear<S>> layers;
  layers.emplace_back(w, "owned");
  layers.emplace_back(lora::view, w_cm, "view col-major");
  layers.emplace_back(lora::view, w_rm, "view row-major");
  layers.emplace_back(lora::view, w_t, "view in_out", lora::weight_layout::in_out);
  for (auto& l : layers) {
    l.add_adapter("a", random_config<S>(4, 8.0, 3));
    l.add_adapter("b", random_config<S>(2, 3.0, 4));
    for (int cycle = 0; cycle < 1000; ++cycle) {
      if (cycle % 2 == 0) {
        l.merge({"a", "b"});
      } else {  // stacked merges unmerge in reverse order
        l.merge({"a"});
        l.merge({"b"});
      }
      l.unmerge();
    }
    EXPECT_TRUE(bitwise_equal(l.weight(), w)) << l.name();
  }
  EXPECT_TRUE(bitwise_equal(w_cm, w));
  EXPECT_TRUE(bitwise_equal(lora::matrix<S>(w_rm), w));
  EXPECT_TRUE(bitwise_equal(lora::matrix<S>(w_t.transpose()), w));
}

// A naive W - s B A after W + s B A drifts; ours does not, even when the delta dwarfs W, W holds signed
// zeros, or the delta cancels W exactly.
TYPED_TEST(merge, unmerge_exact_on_hard_values) {
  using S = TypeParam;
  lora::rng gen(13);
  auto w = random_matrix<S>(gen, 16, 16, 1e-6);
  w(0, 0) = S(-0.0);
  w(1, 1) = S(0.0);
  w(2, 2) = std::numeric_limits<S>::denorm_min();
  w(3, 3) = std::numeric_limits<S>::max() / 4;
  lora::linear<S> layer(w);
  auto& a = layer.add_adapter("big", random_config<S>(3, 3e3, 5));  // delta >> W
  (void)a;
  layer.merge();
  const auto merged = layer.weight();
  const auto& ad = layer.adapter("big");
  const lora::matrix<S> naive = merged - ad.scaling() * ad.b() * ad.a();
  EXPECT_FALSE(bitwise_equal(naive, w));  // the drift we avoid
  layer.unmerge();
  EXPECT_TRUE(bitwise_equal(layer.weight(), w));
}

TYPED_TEST(merge, safe_merge_refuses_non_finite_and_leaves_w_untouched) {
  using S = TypeParam;
  lora::rng gen(14);
  const auto w = random_matrix<S>(gen, 5, 4);
  lora::linear<S> layer(w, "fc1");
  auto& a = layer.add_adapter("bad", random_config<S>(2, 2.0, 6));
  a.b()(3, 1) = std::numeric_limits<S>::infinity();
  lora_test::expect_error<lora::numeric_error>([&] { layer.safe_merge(); }, {"fc1", "bad", "non-finite", "unchanged"});
  EXPECT_TRUE(bitwise_equal(layer.weight(), w));
  EXPECT_FALSE(layer.merged());
  // Overflow to infinity from finite factors is caught as well.
  a.b().setConstant(std::numeric_limits<S>::max());
  a.a().setConstant(S(4));
  EXPECT_THROW(layer.merge({}, true), lora::numeric_error);
  EXPECT_TRUE(bitwise_equal(layer.weight(), w));
  // The unsafe merge goes through, and unmerge still restores W exactly.
  layer.merge();
  EXPECT_FALSE(layer.weight().allFinite());
  layer.unmerge();
  EXPECT_TRUE(bitwise_equal(layer.weight(), w));
}

TYPED_TEST(merge, merge_and_unload_returns_merged_weight) {
  using S = TypeParam;
  lora::rng gen(15);
  auto w = random_matrix<S>(gen, 6, 3);
  lora::matrix<S> user = w;
  lora::linear<S> layer(lora::view, user, "fc");
  layer.add_adapter("a", random_config<S>(2, 4.0, 7));
  const auto& a = layer.adapter("a");
  const lora::matrix<S> expected = w + a.scaling() * a.b() * a.a();
  const auto x = random_matrix<S>(gen, 2, 3);
  const auto y = layer.infer(x);
  const lora::matrix<S> merged = layer.merge_and_unload();
  EXPECT_LT(lora_test::rel_error(merged, expected), 10 * lora_test::tolerance<S>());
  EXPECT_TRUE(bitwise_equal(user, merged));  // the view's memory holds the merged weight
  EXPECT_TRUE(layer.adapter_names().empty());
  EXPECT_FALSE(layer.merged());
  EXPECT_LT(lora_test::rel_error(layer.infer(x), y), 10 * lora_test::tolerance<S>());
}

TYPED_TEST(merge, merge_inactive_adapter_by_name_activates_it) {
  using S = TypeParam;
  lora::rng gen(16);
  const auto w = random_matrix<S>(gen, 4, 4);
  lora::linear<S> layer(w);
  layer.add_adapter("a", random_config<S>(2, 2.0, 8));
  layer.add_adapter("b", random_config<S>(2, 2.0, 9));
  EXPECT_EQ(layer.active_adapters(), std::vector<std::string>{"a"});
  layer.merge({"b"});
  EXPECT_EQ(layer.active_adapters(), (std::vector<std::string>{"a", "b"}));
  lora_test::expect_error<lora::state_error>([&] { layer.set_active({"a"}); }, {"'b'", "merged"});
  lora_test::expect_error<lora::state_error>([&] { layer.merge({"b"}); }, {"already merged"});
  lora_test::expect_error<lora::state_error>([&] { layer.remove_adapter("b"); }, {"merged"});
  lora_test::expect_error<lora::state_error>([&] { layer.disable_adapters(); }, {"merged"});
  layer.unmerge();
  layer.set_active({"a"});
  layer.remove_adapter("b");
  EXPECT_TRUE(bitwise_equal(layer.weight(), w));
}

}  // namespace
