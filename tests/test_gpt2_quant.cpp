// GPT-2 over a quantized base (gpt2::set_base_storage, docs/CONVENTIONS.md §quant): the model equals one
// built from the dequantized weights, the float tensors are released, adapters train over the codes, and
// the refusals.
#include <gtest/gtest.h>

#include <lora/models/gpt2.hpp>
#include <string>
#include <vector>

#include "support.hpp"

namespace {

using lora::index;
using lora::models::gpt2;
using lora::models::gpt2_base_training;
using lora::models::gpt2_config;
using lora::models::gpt2_module;
using lora::models::gpt2_weights;
using lora::quant::qtype;
using tokens = std::vector<std::int32_t>;

const gpt2_config k_small{2, 2, 32, 16, 11, 1e-5};  // d = 32: whole q8_0 / q4_0 blocks

/// The weights a quantized model computes with: every projection replaced by deq(W).
gpt2_weights<double> dequantized_weights(const gpt2<double>& q, const gpt2_weights<double>& original) {
  gpt2_weights<double> w = original;
  for (index l = 0; l < k_small.n_layer; ++l) {
    for (int m = 0; m < lora::models::gpt2_module_count; ++m) {
      const auto mod = static_cast<gpt2_module>(m);
      const std::string name = lora::models::gpt2_module_path(l, mod).substr(std::string("transformer.").size());
      w.matrix(w.find(name + ".weight")) = q.layer(l, mod).weight().transpose();  // Conv1D: in x out
    }
  }
  return w;
}

TEST(gpt2_quant, equals_the_model_on_dequantized_weights_and_trains_adapters) {
  const auto original = gpt2_weights<double>::random(k_small, 3);
  const tokens in = {1, 4, 2, 9, 0, 3, 3, 7, 10, 5}, target = {4, 2, 9, 0, 6, 3, -1, 10, 5, 8};
  for (qtype t : {qtype::nf4, qtype::q4_0, qtype::int8}) {
    gpt2<double> q{gpt2_weights<double>(original)};
    const index elements = q.weights().num_elements();
    q.set_base_storage(t);
    EXPECT_EQ(q.base_storage(), t);
    EXPECT_FALSE(q.weights().has(q.weights().find("h.0.attn.c_attn.weight")));
    EXPECT_TRUE(q.weights().has(q.weights().find("h.0.attn.c_attn.bias")));
    EXPECT_EQ(q.weights().num_elements(), elements);  // the specs stay
    gpt2<double> plain(dequantized_weights(q, original));
    lora::adapter_config c;
    c.rank = 2;
    c.alpha = 4;
    c.init = lora::init_method::random_ab;
    q.add_adapter("a", c, {"c_attn", "c_fc"});
    plain.add_adapter("a", c, {"c_attn", "c_fc"});
    const double lq = q.forward_backward(in, target, 2, 5), lp = plain.forward_backward(in, target, 2, 5);
    EXPECT_NEAR(lq, lp, 1e-12) << lora::quant::qtype_name(t);
    const auto pq = q.parameters(), pp = plain.parameters();
    ASSERT_EQ(pq.size(), pp.size());
    for (std::size_t i = 0; i < pq.size(); ++i) {
      const Eigen::Map<const lora::matrix<double>> gq(pq[i].grad_data, pq[i].rows, pq[i].cols),
          gp(pp[i].grad_data, pp[i].rows, pp[i].cols);
      EXPECT_LT(lora_test::rel_error(gq, gp), 1e-10) << pq[i].name;
    }
    auto cache = q.make_cache();
    auto cache_p = plain.make_cache();
    EXPECT_NEAR(q.nll(in, cache), plain.nll(in, cache_p), 1e-10);
  }
}

TEST(gpt2_quant, refusals_name_what_is_wrong) {
  gpt2<float> model(gpt2_weights<float>::random(gpt2_config{1, 2, 8, 16, 11, 1e-5}, 1));  // d = 8
  lora_test::expect_error<lora::shape_error>([&] { model.set_base_storage(qtype::q4_0); }, {"q4_0", "32"});
  EXPECT_EQ(model.base_storage(), qtype::f32);  // nothing changed
  model.set_base_storage(qtype::nf4);
  const index w = model.weights().find("h.0.mlp.c_fc.weight");
  lora_test::expect_error<lora::state_error>([&] { (void)model.weights().matrix(w); },
                                             {"h.0.mlp.c_fc.weight", "quantized"});
  lora_test::expect_error<lora::state_error>([&] { model.set_base_training(gpt2_base_training::full); },
                                             {"quantized", "in full"});
  model.set_base_training(gpt2_base_training::norms_and_head);  // LayerNorms and wte are still float
  lora::adapter_config c;
  c.rank = 2;
  model.add_adapter("a", c, {"c_attn"});
  model.merge();
  lora_test::expect_error<lora::state_error>([&] { model.set_base_storage(qtype::int8); }, {"merged"});
  model.unmerge();
  model.set_base_storage(qtype::f32);
  EXPECT_EQ(model.base_storage(), qtype::f32);
  EXPECT_FALSE(model.weights().has(w));  // the plain layers own deq(W); the table does not get it back
}

}  // namespace
