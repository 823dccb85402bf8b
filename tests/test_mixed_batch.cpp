// Batches whose rows use different adapters (adapter_routing.hpp, infer with a routing): every row equals
// the same row run alone with its adapter the only active one (scaled by its row scale), for every layer
// kind (linear over plain and quantized weights, merged_linear, embedding, conv2d), in float and double,
// with adapters of different ranks, rows of the base alone, consecutive and scattered rows; and the
// refusals (unknown names, merged or DoRA adapters, row counts).
#include <lora/lora.hpp>
#include <string>
#include <vector>

#include "layer_support.hpp"
#include "support.hpp"

namespace {

using lora::index;
using lora_test::expect_error;
using lora_test::random_config;
using lora_test::random_matrix;
using lora_test::rel_error;

const std::vector<std::string>& row_names = lora_test::mixed_row_names;
const std::vector<double>& row_scales = lora_test::mixed_row_scales;
using lora_test::add_three;

/// Row i of X run alone: the base plus scale · (its adapter's term), from infer() with that adapter the
/// only active one (and none for the base), as a user without routing would compute it.
template <typename Layer, typename Rows, typename RunOne>
lora::matrix<double> one_by_one(Layer& layer, const Rows& names, const std::vector<double>& scales, index out,
                                RunOne&& run_one) {
  lora::matrix<double> y(static_cast<index>(names.size()), out);
  for (index i = 0; i < y.rows(); ++i) {
    const std::string& name = names[static_cast<std::size_t>(i)];
    layer.set_active({});
    const lora::matrix<double> base = run_one(i);
    if (lora::adapter_routing::is_base(name)) {
      y.row(i) = base;
      continue;
    }
    layer.set_active({name});
    const double c = scales.empty() ? 1.0 : scales[static_cast<std::size_t>(i)];
    y.row(i) = base + c * (run_one(i) - base);
  }
  return y;
}

template <typename Scalar>
class mixed_batch_typed : public ::testing::Test {};
TYPED_TEST_SUITE(mixed_batch_typed, lora_test::scalar_types);

TYPED_TEST(mixed_batch_typed, linear_rows_equal_each_row_alone_with_its_adapter) {
  using S = TypeParam;
  lora::rng gen(7);
  lora::linear<S> layer(random_matrix<S>(gen, 6, 10), random_matrix<S>(gen, 6, 1).col(0), "fc");
  add_three(layer);
  const lora::matrix<S> x = random_matrix<S>(gen, 9, 10);
  const lora::adapter_routing routing(row_names, row_scales);
  const lora::matrix<S> y = layer.infer(x, routing);
  const auto expected = one_by_one(layer, row_names, row_scales, 6, [&](index i) {
    return lora::matrix<double>(layer.infer(x.row(i)).template cast<double>());
  });
  EXPECT_LT(rel_error(y, expected), 10 * lora_test::tolerance<S>());
}

TYPED_TEST(mixed_batch_typed, consecutive_rows_and_scattered_rows_give_the_same_rows) {
  using S = TypeParam;
  lora::rng gen(8);
  lora::linear<S> layer(random_matrix<S>(gen, 7, 12), "fc");
  add_three(layer);
  // Sorted by adapter (each group consecutive: products in place) against the same rows interleaved.
  const std::vector<std::string> sorted = {"a", "a", "a", "b", "b", "__base__", "c", "c"};
  const std::vector<index> order = {3, 0, 6, 5, 1, 7, 2, 4};  // interleaved row k = sorted row order[k]
  std::vector<std::string> interleaved;
  lora::matrix<S> xs = random_matrix<S>(gen, 8, 12), xi(8, 12);
  for (index k = 0; k < 8; ++k) {
    interleaved.push_back(sorted[static_cast<std::size_t>(order[static_cast<std::size_t>(k)])]);
    xi.row(k) = xs.row(order[static_cast<std::size_t>(k)]);
  }
  const lora::adapter_routing rs(sorted), ri(interleaved);
  for (const auto& g : rs.groups()) EXPECT_GE(g.first, 0) << g.adapter;
  EXPECT_EQ(ri.groups().front().first, -1);
  const lora::matrix<S> ys = layer.infer(xs, rs), yi = layer.infer(xi, ri);
  for (index k = 0; k < 8; ++k)
    EXPECT_LT(rel_error(yi.row(k), ys.row(order[static_cast<std::size_t>(k)])), lora_test::tolerance<S>()) << k;
}

TYPED_TEST(mixed_batch_typed, merged_linear_slices_without_adapters_run_the_base) {
  using S = TypeParam;
  lora::rng gen(9);
  lora::merged_linear<S> qkv(random_matrix<S>(gen, 12, 8), {true, false, true}, "qkv");
  add_three(qkv);
  const lora::matrix<S> x = random_matrix<S>(gen, 9, 8);
  const lora::adapter_routing routing(row_names, row_scales);
  const lora::matrix<S> y = qkv.infer(x, routing);
  const auto expected = one_by_one(qkv, row_names, row_scales, 12, [&](index i) {
    return lora::matrix<double>(qkv.infer(x.row(i)).template cast<double>());
  });
  EXPECT_LT(rel_error(y, expected), 10 * lora_test::tolerance<S>());
}

TYPED_TEST(mixed_batch_typed, embedding_ids_equal_each_id_alone_with_its_adapter) {
  using S = TypeParam;
  lora::rng gen(10);
  lora::embedding<S> wte(random_matrix<S>(gen, 20, 6), "wte");
  add_three(wte);
  const std::vector<index> ids = {3, 19, 3, 0, 7, 7, 12, 5, 3};
  const lora::adapter_routing routing(row_names, row_scales);
  const lora::matrix<S> y = wte.infer(ids, routing);
  const auto expected = one_by_one(wte, row_names, row_scales, 6, [&](index i) {
    return lora::matrix<double>(wte.infer({ids[static_cast<std::size_t>(i)]}).template cast<double>());
  });
  EXPECT_LT(rel_error(y, expected), 10 * lora_test::tolerance<S>());
}

TYPED_TEST(mixed_batch_typed, conv2d_images_equal_each_image_alone_with_its_adapter) {
  using S = TypeParam;
  lora::rng gen(11);
  lora::conv2d_options o;
  o.in_channels = 4;
  o.input = {5, 6};
  o.kernel = {3, 2};
  o.padding = {1, 0};
  o.stride = {2, 1};
  lora::conv2d<S> conv(random_matrix<S>(gen, 6, 4 * 3 * 2), random_matrix<S>(gen, 6, 1).col(0), o, "conv");
  conv.add_adapter("a", random_config(2, 4.0, 1));
  conv.add_adapter("b", random_config(4, 2.0, 2));
  const std::vector<std::string> names = {"b", "__base__", "a", "b", "a"};
  const std::vector<double> scales = {1.0, 1.0, 0.25, 2.0, 1.0};
  const lora::matrix<S> x = random_matrix<S>(gen, 5, 4 * 5 * 6);
  const lora::matrix<S> y = conv.infer(x, lora::adapter_routing(names, scales));
  const auto expected = one_by_one(conv, names, scales, y.cols(), [&](index i) {
    return lora::matrix<double>(conv.infer(x.row(i)).template cast<double>());
  });
  EXPECT_LT(rel_error(y, expected), 10 * lora_test::tolerance<S>());
}

TEST(mixed_batch, quantized_weight_rows_equal_each_row_alone) {
  lora::rng gen(12);
  lora::linear<float> layer(
      lora::quant::quantized_matrix::quantize(random_matrix<float>(gen, 16, 64), lora::quant::qtype::nf4), "q");
  add_three(layer);
  const lora::matrix<float> x = random_matrix<float>(gen, 9, 64);
  const lora::matrix<float> y = layer.infer(x, lora::adapter_routing(row_names, row_scales));
  const auto expected = one_by_one(layer, row_names, row_scales, 16,
                                   [&](index i) { return lora::matrix<double>(layer.infer(x.row(i)).cast<double>()); });
  EXPECT_LT(rel_error(y, expected), 1e-4);
}

TEST(mixed_batch, the_active_setting_plays_no_part_and_disabled_adapters_win) {
  lora::rng gen(13);
  lora::linear<double> layer(random_matrix<double>(gen, 5, 4), "fc");
  add_three(layer);
  const lora::matrix<double> x = random_matrix<double>(gen, 9, 4);
  const lora::adapter_routing routing(row_names, row_scales);
  layer.set_active({"c"});
  const lora::matrix<double> y1 = layer.infer(x, routing);
  layer.set_active({"a", "b"});
  EXPECT_TRUE(lora_test::bitwise_equal(layer.infer(x, routing), y1));
  layer.disable_adapters();
  const lora::matrix<double> base = layer.weight() * x.transpose();
  EXPECT_LT(rel_error(layer.infer(x, routing), base.transpose()), 1e-14);
}

TEST(mixed_batch, refusals_name_what_was_expected) {
  lora::rng gen(14);
  lora::linear<double> layer(random_matrix<double>(gen, 5, 4), "fc");
  add_three(layer);
  const lora::matrix<double> x = random_matrix<double>(gen, 3, 4);
  expect_error<lora::name_error>(
      [&] {
        layer.infer(x, lora::adapter_routing({"a", "zz", "b"}));
      },
      {"linear 'fc'", "no adapter named 'zz'", "'a', 'b', 'c'"});
  // A model's routing may name adapters some layers lack: those rows run the base there.
  const lora::adapter_routing lenient({"a", "zz", "zz"}, {}, lora::missing_adapter::base);
  const lora::matrix<double> y = layer.infer(x, lenient);
  EXPECT_LT(rel_error(y.bottomRows(2), (x.bottomRows(2) * layer.weight().transpose()).eval()), 1e-14);
  expect_error<lora::shape_error>(
      [&] {
        layer.infer(x, lora::adapter_routing({"a", "b"}));
      },
      {"covers 2 rows", "batch has 3"});
  expect_error<lora::shape_error>(
      [&] {
        lora::adapter_routing({"a", "b"}, {1.0});
      },
      {"one scale per row (2)", "got 1"});
  layer.merge({"a"});
  expect_error<lora::state_error>(
      [&] {
        layer.infer(x, lora::adapter_routing({"b", "b", "c"}));
      },
      {"merged ('a')", "unmerge() first"});
  layer.unmerge();
  lora::adapter_config dora = random_config(2, 2.0, 5);
  dora.use_dora = true;
  layer.add_adapter("d", dora);
  expect_error<lora::config_error>(
      [&] {
        layer.infer(x, lora::adapter_routing({"a", "d", "b"}));
      },
      {"'d' is a DoRA adapter"});
  // A DoRA adapter that no row names does not stand in the way.
  EXPECT_NO_THROW(layer.infer(x, lora::adapter_routing({"a", "c", "b"})));
}

TEST(adapter_routing, groups_rows_in_order_of_first_appearance) {
  const lora::adapter_routing r(row_names, row_scales);
  EXPECT_EQ(r.rows(), 9);
  ASSERT_EQ(r.groups().size(), 3U);
  EXPECT_EQ(r.groups()[0].adapter, "b");
  EXPECT_EQ(r.groups()[0].rows, (std::vector<index>{0, 5}));
  EXPECT_TRUE(r.groups()[0].scales.empty());  // every scale 1: none kept
  EXPECT_EQ(r.groups()[1].adapter, "a");
  EXPECT_EQ(r.groups()[1].rows, (std::vector<index>{1, 4, 8}));
  EXPECT_EQ(r.groups()[1].scales, (std::vector<double>{0.5, 1.0, 1.0}));
  EXPECT_EQ(r.groups()[2].scales, (std::vector<double>{-2.0, 3.0}));
  EXPECT_EQ(r.groups()[2].first, -1);

  const auto runs = lora::adapter_routing::from_runs({{"x", 3}, {"", 2}, {"y", 1}, {"x", 0}}, {2.0, 1.0, 1.0, 1.0});
  EXPECT_EQ(runs.rows(), 6);
  ASSERT_EQ(runs.groups().size(), 2U);
  EXPECT_EQ(runs.groups()[0].first, 0);
  EXPECT_EQ(runs.groups()[0].scales, (std::vector<double>{2.0, 2.0, 2.0}));
  EXPECT_EQ(runs.groups()[1].first, 5);

  const auto pixels = lora::adapter_routing({"p", "", "p"}, {1.0, 1.0, 4.0}).repeat_rows(2);
  EXPECT_EQ(pixels.rows(), 6);
  EXPECT_EQ(pixels.groups()[0].rows, (std::vector<index>{0, 1, 4, 5}));
  EXPECT_EQ(pixels.groups()[0].scales, (std::vector<double>{1.0, 1.0, 4.0, 4.0}));
  expect_error<lora::shape_error>([&] { lora::adapter_routing::from_runs({{"x", -1}}); }, {"negative row count -1"});
}

}  // namespace
