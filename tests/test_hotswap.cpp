// Hot-swapping an adapter in place (layer_base::hotswap_adapter, prepare_for_hotswap; PEFT's
// hotswap_adapter and prepare_model_for_compiled_hotswap): the swapped layer computes what a layer given
// the new adapter from scratch computes, in the same memory when the rank fits; zero-padding changes no
// output and no gradient that matters (the padded rows of dA and columns of dB stay zero, checked
// against finite differences); the refusals (merged, DoRA, rsLoRA or dropout changed, shapes, ranks).
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

template <typename Scalar>
class hotswap_typed : public ::testing::Test {};
TYPED_TEST_SUITE(hotswap_typed, lora_test::scalar_types);

TYPED_TEST(hotswap_typed, a_swapped_adapter_equals_the_new_adapter_added_fresh) {
  using S = TypeParam;
  lora::rng gen(1);
  const lora::matrix<S> w = random_matrix<S>(gen, 6, 9), x = random_matrix<S>(gen, 4, 9);
  lora::linear<S> layer(w, "fc"), fresh(w, "fc");
  layer.add_adapter("a", random_config(4, 8.0, 1));
  layer.add_adapter("other", random_config(3, 3.0, 2));
  layer.set_active({"a", "other"});
  const S* a_storage = layer.adapter("a").a().data();
  // A rank-2 adapter with another alpha into the rank-4 slot: in place, zero-padded.
  const lora::adapter_config c = random_config(2, 5.0, 3);
  const lora::matrix<S> a2 = random_matrix<S>(gen, 2, 9), b2 = random_matrix<S>(gen, 6, 2);
  EXPECT_TRUE(layer.hotswap_adapter("a", c, a2, b2));
  EXPECT_EQ(layer.adapter("a").a().data(), a_storage);
  EXPECT_EQ(layer.adapter("a").rank(), 4);
  EXPECT_DOUBLE_EQ(static_cast<double>(layer.adapter("a").scaling()), static_cast<double>(S(5.0 / 2.0)));
  EXPECT_NEAR(lora::scaling_of(layer.adapter("a").config()), 2.5, 1e-15);
  fresh.add_adapter("a", c, a2, b2);
  fresh.add_adapter("other", random_config(3, 3.0, 2));
  fresh.set_active({"a", "other"});
  EXPECT_LT(rel_error(layer.infer(x), fresh.infer(x)), lora_test::tolerance<S>());
  EXPECT_EQ(layer.active_adapters(), (std::vector<std::string>{"a", "other"}));
  // A larger rank does not fit: the factors grow.
  const lora::matrix<S> a6 = random_matrix<S>(gen, 6, 9), b6 = random_matrix<S>(gen, 6, 6);
  EXPECT_FALSE(layer.hotswap_adapter("a", random_config(6, 6.0, 4), a6, b6));
  EXPECT_EQ(layer.adapter("a").rank(), 6);
  lora::linear<S> fresh6(w, "fc");
  fresh6.add_adapter("a", random_config(6, 6.0, 4), a6, b6);
  fresh6.add_adapter("other", random_config(3, 3.0, 2));
  fresh6.set_active({"a", "other"});
  EXPECT_LT(rel_error(layer.infer(x), fresh6.infer(x)), lora_test::tolerance<S>());
}

TYPED_TEST(hotswap_typed, padding_changes_no_output_and_swaps_up_to_the_target_run_in_place) {
  using S = TypeParam;
  lora::rng gen(2);
  lora::embedding<S> wte(random_matrix<S>(gen, 12, 5), "wte");
  wte.add_adapter("a", random_config(2, 2.0, 1, 0.0));
  wte.adapter("a").b() = random_matrix<S>(gen, 5, 2);
  wte.adapter("a").a() = random_matrix<S>(gen, 2, 12);
  const std::vector<index> ids = {3, 0, 11, 3};
  const lora::matrix<S> before = wte.infer(ids);
  wte.prepare_for_hotswap(8);
  EXPECT_EQ(wte.adapter("a").rank(), 8);
  EXPECT_TRUE(lora_test::bitwise_equal(wte.infer(ids), before) || rel_error(wte.infer(ids), before) < 1e-6);
  const S* storage = wte.adapter("a").b().data();
  const lora::matrix<S> a5 = random_matrix<S>(gen, 5, 12), b5 = random_matrix<S>(gen, 5, 5);
  EXPECT_TRUE(wte.hotswap_adapter("a", random_config(5, 10.0, 2), a5, b5));
  EXPECT_EQ(wte.adapter("a").b().data(), storage);
  lora::embedding<S> fresh(wte.weight(), "wte");
  fresh.add_adapter("a", random_config(5, 10.0, 2), a5, b5);
  EXPECT_LT(rel_error(wte.infer(ids), fresh.infer(ids)), lora_test::tolerance<S>());
}

TEST(hotswap, padded_factors_train_like_the_unpadded_ones) {
  lora::rng gen(3);
  const lora::matrix<double> w = random_matrix<double>(gen, 4, 6), x = random_matrix<double>(gen, 3, 6),
                             dy = random_matrix<double>(gen, 3, 4);
  lora::linear<double> plain(w, "fc"), padded(w, "fc");
  plain.add_adapter("a", random_config(2, 4.0, 5));
  plain.adapter("a").b() = random_matrix<double>(gen, 4, 2);
  padded.add_adapter("a", random_config(2, 4.0, 5));
  padded.adapter("a").b() = plain.adapter("a").b();
  padded.prepare_for_hotswap(5);
  EXPECT_LT(rel_error(padded.forward(x), plain.forward(x)), 1e-14);
  padded.backward(dy);
  plain.backward(dy);
  const auto& pa = padded.adapter("a");
  EXPECT_LT(rel_error(pa.grad_a().topRows(2), plain.adapter("a").grad_a()), 1e-14);
  EXPECT_LT(rel_error(pa.grad_b().leftCols(2), plain.adapter("a").grad_b()), 1e-14);
  EXPECT_TRUE(pa.grad_a().bottomRows(3).isZero(0.0));  // A's zero rows meet B's zero columns
  EXPECT_TRUE(pa.grad_b().rightCols(3).isZero(0.0));
  // Every entry of the padded factors, padding included, against central differences of <Y, dY>.
  const lora::matrix<double> da = pa.grad_a(), db = pa.grad_b();
  const auto loss = [&] { return padded.forward(x).cwiseProduct(dy).sum(); };
  EXPECT_LT(rel_error(da, lora_test::numeric_gradient(padded.adapter("a").a(), loss)), 1e-7);
  EXPECT_LT(rel_error(db, lora_test::numeric_gradient(padded.adapter("a").b(), loss)), 1e-7);
}

TEST(hotswap, refusals_name_what_was_expected_and_change_nothing) {
  lora::rng gen(4);
  lora::linear<double> layer(random_matrix<double>(gen, 4, 6), "fc");
  layer.add_adapter("a", random_config(4, 4.0, 1));
  const lora::matrix<double> a2 = random_matrix<double>(gen, 2, 6), b2 = random_matrix<double>(gen, 4, 2);
  const lora::adapter_config c2 = random_config(2, 2.0, 2);
  expect_error<lora::name_error>([&] { layer.hotswap_adapter("zz", c2, a2, b2); }, {"no adapter named 'zz'"});
  expect_error<lora::shape_error>([&] { layer.hotswap_adapter("a", random_config(3, 2.0, 2), a2, b2); },
                                  {"A must be 3x6", "got 2x6"});
  lora::adapter_config rs = c2;
  rs.use_rslora = true;
  expect_error<lora::config_error>([&] { layer.hotswap_adapter("a", rs, a2, b2); }, {"keep use_rslora and dropout"});
  lora::adapter_config dora = c2;
  dora.use_dora = true;
  expect_error<lora::config_error>([&] { layer.hotswap_adapter("a", dora, a2, b2); },
                                   {"DoRA adapters cannot be hot-swapped"});
  expect_error<lora::config_error>([&] { layer.prepare_for_hotswap(3); },
                                   {"target rank 3 is below adapter 'a''s rank 4"});
  const lora::matrix<double> before = layer.adapter("a").a();
  layer.merge({"a"});
  expect_error<lora::state_error>([&] { layer.hotswap_adapter("a", c2, a2, b2); }, {"is merged", "unmerge() first"});
  expect_error<lora::state_error>([&] { layer.prepare_for_hotswap(8); }, {"merged", "unmerge() first"});
  layer.unmerge();
  EXPECT_TRUE(lora_test::bitwise_equal(layer.adapter("a").a(), before));
  EXPECT_EQ(layer.adapter("a").rank(), 4);
}

TEST(hotswap, merged_linear_swaps_one_slice) {
  lora::rng gen(5);
  const lora::matrix<double> w = random_matrix<double>(gen, 9, 4), x = random_matrix<double>(gen, 2, 4);
  lora::merged_linear<double> qkv(w, {true, false, true}, "qkv"), fresh(w, {true, false, true}, "qkv");
  qkv.add_adapter("a", random_config(3, 3.0, 1));
  fresh.add_adapter("a", random_config(3, 3.0, 1));
  const lora::matrix<double> a2 = random_matrix<double>(gen, 2, 4), b2 = random_matrix<double>(gen, 3, 2);
  EXPECT_TRUE(qkv.hotswap_adapter("a", 2, random_config(2, 4.0, 2), a2, b2));
  fresh.set_factors("a", 2, (lora::matrix<double>(3, 4) << a2, lora::matrix<double>::Zero(1, 4)).finished(),
                    (lora::matrix<double>(3, 3) << b2 * 2.0 / 1.0, lora::matrix<double>::Zero(3, 1)).finished());
  EXPECT_LT(rel_error(qkv.infer(x), fresh.infer(x)), 1e-13);
  expect_error<lora::shape_error>([&] { qkv.hotswap_adapter("a", 1, random_config(2, 4.0, 2), a2, b2); },
                                  {"slice in [0, 3) that takes adapters"});
}

}  // namespace
