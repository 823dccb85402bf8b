// lora::linear and lora::merged_linear over a quantized frozen weight (docs/CONVENTIONS.md §quant): the
// same layer as a plain one holding deq(W), gradients against finite differences, accounting, and the
// merge that re-quantizes (its reported error, and the exact unmerge).
#include <lora/lora.hpp>
#include <string>
#include <vector>

#include "layer_support.hpp"
#include "support.hpp"

namespace {

using lora::index;
using lora::quant::qtype;
template <typename S>
using mat = lora::matrix<S>;

constexpr qtype all_formats[] = {qtype::f32, qtype::bf16,   qtype::f16,  qtype::int8,
                                 qtype::nf4, qtype::nf4_dq, qtype::q8_0, qtype::q4_0};

template <typename S>
lora::linear<S> quantized_layer(const mat<S>& w, qtype t, const std::string& name = "q") {
  return lora::linear<S>(lora::quant::quantized_matrix::quantize(w, t), name);
}

// Adds two adapters with non-zero B (random_ab), both active.
template <typename Layer>
void add_two_adapters(Layer& layer, bool dora = false) {
  auto c1 = lora_test::random_config(4, 8.0, 11);
  c1.init = lora::init_method::random_ab;
  c1.use_dora = dora;
  auto c2 = lora_test::random_config(2, 3.0, 12);
  c2.init = lora::init_method::random_ab;
  layer.add_adapter("one", c1);
  layer.add_adapter("two", c2);
  layer.set_active({"one", "two"});
}

template <typename S>
void expect_same_layer(qtype t, index n, double tol) {
  lora::rng gen(5);
  const index in = 64, out = 40;
  const mat<S> w = lora_test::random_matrix<S>(gen, out, in, 0.1);
  lora::linear<S> q = quantized_layer(w, t);
  lora::linear<S> plain(q.weight(), "plain");  // deq(W) as a plain weight
  const lora::vector<S> bias = lora_test::random_matrix<S>(gen, out, 1).col(0);
  q.set_bias(bias);
  plain.set_bias(bias);
  add_two_adapters(q);
  add_two_adapters(plain);
  const mat<S> x = lora_test::random_matrix<S>(gen, n, in), dy = lora_test::random_matrix<S>(gen, n, out);
  const mat<S> yq = q.forward(x), yp = plain.forward(x);
  EXPECT_LT(lora_test::rel_error(yq, yp), tol) << lora::quant::qtype_name(t) << " n " << n;
  const mat<S> dxq = q.backward(dy), dxp = plain.backward(dy);
  EXPECT_LT(lora_test::rel_error(dxq, dxp), tol) << lora::quant::qtype_name(t) << " dX n " << n;
  for (const char* a : {"one", "two"}) {
    EXPECT_LT(lora_test::rel_error(q.adapter(a).grad_a(), plain.adapter(a).grad_a()), tol) << a;
    EXPECT_LT(lora_test::rel_error(q.adapter(a).grad_b(), plain.adapter(a).grad_b()), tol) << a;
  }
  q.eval();
  lora::inference_workspace<S> ws;
  mat<S> yi(n, out);
  q.infer(x, yi, ws);
  EXPECT_LT(lora_test::rel_error(yi, yp), tol) << "infer";
}

TEST(linear_quant, equals_a_plain_layer_over_the_dequantized_weight) {
  for (qtype t : all_formats) {
    for (index n : {1, 3, 4, 17}) {
      expect_same_layer<float>(t, n, 2e-5);
      expect_same_layer<double>(t, n, 1e-12);
    }
  }
}

TEST(linear_quant, gradients_match_finite_differences) {
  for (qtype t : {qtype::nf4, qtype::q4_0, qtype::int8}) {
    lora::rng gen(9);
    const mat<double> w = lora_test::random_matrix<double>(gen, 6, 32, 0.5);
    lora::linear<double> layer = quantized_layer(w, t);
    add_two_adapters(layer);
    const mat<double> x = lora_test::random_matrix<double>(gen, 5, 32), g = lora_test::random_matrix<double>(gen, 5, 6);
    auto loss = [&] { return layer.forward(x).cwiseProduct(g).sum(); };
    layer.zero_grad();
    layer.forward(x);
    const mat<double> dx = layer.backward(g);
    mat<double> xv = x;
    auto loss_x = [&] { return layer.forward(xv).cwiseProduct(g).sum(); };
    EXPECT_LT(lora_test::rel_error(dx, lora_test::numeric_gradient(xv, loss_x)), 1e-7);
    for (const char* a : {"one", "two"}) {
      auto& ad = layer.adapter(a);
      EXPECT_LT(lora_test::rel_error(ad.grad_a(), lora_test::numeric_gradient(ad.a(), loss)), 1e-7) << a;
      EXPECT_LT(lora_test::rel_error(ad.grad_b(), lora_test::numeric_gradient(ad.b(), loss)), 1e-7) << a;
    }
  }
}

TEST(linear_quant, dora_over_codes_equals_dora_over_the_dequantized_weight) {
  lora::rng gen(3);
  const mat<double> w = lora_test::random_matrix<double>(gen, 24, 64, 0.2);
  lora::linear<double> q = quantized_layer(w, qtype::nf4);
  lora::linear<double> plain(q.weight(), "plain");
  add_two_adapters(q, true);
  add_two_adapters(plain, true);
  EXPECT_LT(lora_test::rel_error(q.adapter("one").magnitude(), plain.adapter("one").magnitude()), 1e-12);
  const mat<double> x = lora_test::random_matrix<double>(gen, 7, 64), dy = lora_test::random_matrix<double>(gen, 7, 24);
  EXPECT_LT(lora_test::rel_error(q.forward(x), plain.forward(x)), 1e-12);
  EXPECT_LT(lora_test::rel_error(q.backward(dy), plain.backward(dy)), 1e-12);
  EXPECT_LT(lora_test::rel_error(q.adapter("one").grad_magnitude(), plain.adapter("one").grad_magnitude()), 1e-12);
}

TEST(linear_quant, accounting_counts_the_codes) {
  lora::rng gen(1);
  const mat<float> w = lora_test::random_matrix<float>(gen, 128, 256);
  for (qtype t : all_formats) {
    lora::linear<float> q = quantized_layer(w, t);
    q.set_bias(lora::vector<float>::Zero(128));
    const auto r = q.report();
    EXPECT_EQ(r.frozen_params, 128 * 256 + 128);
    EXPECT_EQ(r.frozen_bytes, static_cast<std::int64_t>(q.quantized_weight().storage_bytes()) + 128 * 4)
        << lora::quant::qtype_name(t);
  }
  lora::linear<float> nf4 = quantized_layer(w, qtype::nf4_dq);
  EXPECT_NEAR(nf4.quantized_weight().bits_per_weight(), 4.127, 0.01);
}

TEST(linear_quant, storage_changes_and_refusals) {
  lora::rng gen(2);
  mat<float> w = lora_test::random_matrix<float>(gen, 16, 64);
  lora::linear<float> layer(lora::view, w, "viewed");
  EXPECT_TRUE(layer.is_view());
  layer.set_weight_storage(qtype::nf4);
  EXPECT_FALSE(layer.is_view());
  EXPECT_TRUE(layer.is_quantized());
  EXPECT_EQ(layer.weight_storage(), qtype::nf4);
  const mat<float> deq = layer.weight();
  EXPECT_LT(lora_test::rel_error(deq, w), 0.15);  // NF4's error, and not the identity
  EXPECT_GT(lora_test::rel_error(deq, w), 1e-3);
  w.setZero();  // the user's memory is no longer read
  EXPECT_TRUE(lora_test::bitwise_equal(layer.weight(), deq));
  lora_test::expect_error<lora::state_error>([&] { (void)layer.stored_weight(); }, {"viewed", "quantized"});
  layer.set_weight_storage(qtype::f32);
  EXPECT_FALSE(layer.is_quantized());
  EXPECT_TRUE(lora_test::bitwise_equal(layer.weight(), deq));
  lora_test::expect_error<lora::state_error>([&] { (void)layer.quantized_weight(); }, {"viewed", "not quantized"});
  lora::linear<float> odd(lora_test::random_matrix<float>(gen, 4, 48), "odd");
  lora_test::expect_error<lora::shape_error>([&] { odd.set_weight_storage(qtype::q4_0); }, {"q4_0", "multiples of 32"});
  EXPECT_FALSE(odd.is_quantized());  // unchanged after the refusal
  add_two_adapters(layer);
  layer.merge();
  lora_test::expect_error<lora::state_error>([&] { layer.set_weight_storage(qtype::nf4); }, {"merged", "unmerge"});
}

TEST(linear_quant, merge_requantizes_reports_its_error_and_unmerge_restores_the_codes) {
  lora::rng gen(4);
  const mat<double> w = lora_test::random_matrix<double>(gen, 32, 128, 0.05);
  for (qtype t : {qtype::nf4, qtype::nf4_dq, qtype::q4_0, qtype::q8_0, qtype::int8, qtype::bf16}) {
    lora::linear<double> layer = quantized_layer(w, t);
    add_two_adapters(layer);
    const mat<double> before = layer.quantized_weight().dequantize<double>();
    const std::size_t bytes = layer.quantized_weight().storage_bytes();
    const mat<double> x = lora_test::random_matrix<double>(gen, 8, 128);
    layer.eval();
    const mat<double> y_unmerged = layer.forward(x);
    layer.merge();
    const auto& e = layer.merge_error();
    EXPECT_GT(e.max_weight, 0.0) << lora::quant::qtype_name(t);
    EXPECT_GT(e.rms_output, 0.0);
    EXPECT_EQ(e.probe_rows, 64);
    EXPECT_LT(e.rel_rms_weight, t == qtype::bf16 || t == qtype::q8_0 || t == qtype::int8 ? 0.01 : 0.15);
    // The merged layer is the exact merge up to the reported re-quantization error.
    const mat<double> y_merged = layer.forward(x);
    EXPECT_GT((y_merged - y_unmerged).cwiseAbs().maxCoeff(), 0.0);
    EXPECT_LT((y_merged - y_unmerged).norm() / y_unmerged.norm(), 3 * e.rel_rms_output + 1e-12);
    EXPECT_GT(layer.report().merge_bytes, static_cast<std::int64_t>(bytes) - 1);  // the original codes are kept
    layer.unmerge();
    EXPECT_TRUE(lora_test::bitwise_equal(layer.quantized_weight().dequantize<double>(), before));
    EXPECT_EQ(layer.quantized_weight().storage_bytes(), bytes);
    EXPECT_EQ(layer.merge_error().max_weight, 0.0);
    EXPECT_LT(lora_test::rel_error(layer.forward(x), y_unmerged), 1e-13);
  }
}

TEST(linear_quant, merges_start_from_the_original_codes_each_time) {
  lora::rng gen(6);
  const mat<double> w = lora_test::random_matrix<double>(gen, 16, 64, 0.05);
  lora::linear<double> layer = quantized_layer(w, qtype::q4_0);
  add_two_adapters(layer);
  layer.merge({"one"});
  const mat<double> once = layer.weight();
  layer.unmerge();
  layer.merge({"one"});
  layer.merge({"two"});
  layer.unmerge();
  layer.merge({"one"});
  EXPECT_TRUE(lora_test::bitwise_equal(layer.weight(), once));  // no drift from the cycles
  // safe_merge refuses a non-finite result and leaves the codes as they were.
  layer.unmerge();
  const mat<double> before = layer.weight();
  layer.adapter("two").b()(0, 0) = std::numeric_limits<double>::infinity();
  lora_test::expect_error<lora::numeric_error>([&] { layer.safe_merge({"two"}); }, {"two"});
  EXPECT_TRUE(lora_test::bitwise_equal(layer.weight(), before));
  EXPECT_FALSE(layer.merged());
}

TEST(merged_linear_quant, slices_are_quantized_and_train_as_before) {
  lora::rng gen(8);
  const mat<double> w = lora_test::random_matrix<double>(gen, 96, 64, 0.1);  // q | k | v, 32 rows each
  lora::merged_linear<double> q(w, {true, false, true}, "c_attn");
  q.set_weight_storage(qtype::nf4);
  EXPECT_EQ(q.weight_storage(), qtype::nf4);
  EXPECT_FALSE(q.is_view());
  lora::merged_linear<double> plain(q.weight(), {true, false, true}, "c_attn");
  add_two_adapters(q);
  add_two_adapters(plain);
  const mat<double> x = lora_test::random_matrix<double>(gen, 5, 64), dy = lora_test::random_matrix<double>(gen, 5, 96);
  EXPECT_LT(lora_test::rel_error(q.forward(x), plain.forward(x)), 1e-12);
  EXPECT_LT(lora_test::rel_error(q.backward(dy), plain.backward(dy)), 1e-12);
  const auto r = q.report();
  EXPECT_LT(r.frozen_bytes, 96 * 64 * 8 / 10);  // codes, not doubles
  const mat<double> before = q.weight();
  q.merge();
  q.unmerge();
  EXPECT_TRUE(lora_test::bitwise_equal(q.weight(), before));
}

}  // namespace
