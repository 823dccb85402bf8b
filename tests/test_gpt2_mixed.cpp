// GPT-2 serving several sequences at once, each through its own adapter (gpt2::routing, infer_batch): the
// logits of every sequence equal infer() of that sequence alone with its adapter the only active one, for
// a prompt batch of different lengths and then token-by-token decoding with the caches; adapters of
// different ranks on different modules, and the base alone; the name and shape errors.
#include <gtest/gtest.h>

#include <lora/models/gpt2.hpp>
#include <memory>
#include <string>
#include <vector>

namespace {

using lora::index;
using lora::models::gpt2;
using lora::models::gpt2_config;
using lora::models::gpt2_weights;
using tokens = std::vector<std::int32_t>;

const gpt2_config k_small{2, 2, 8, 16, 11, 1e-5};

template <typename Scalar>
void randomise(gpt2<Scalar>& model, const std::string& name, std::uint64_t seed) {
  lora::rng gen(seed);
  for (auto& [path, layer] : model.named_layers()) {
    if (!layer->has_adapter(name)) continue;
    const auto& a = layer->adapter(name);
    lora::matrix<Scalar> am(a.a().rows(), a.a().cols()), bm(a.b().rows(), a.b().cols());
    for (index i = 0; i < am.size(); ++i) am.data()[i] = static_cast<Scalar>(0.5 * gen.normal());
    for (index i = 0; i < bm.size(); ++i) bm.data()[i] = static_cast<Scalar>(0.5 * gen.normal());
    layer->set_factors(name, am, bm);
  }
}

/// A model with three adapters: "q" (r 2) on c_attn only, "m" (r 4) on the MLP, "all" (r 3) everywhere.
template <typename Scalar>
std::unique_ptr<gpt2<Scalar>> model_with_adapters() {
  auto w = gpt2_weights<Scalar>::random(k_small, 5);
  for (index id = 0; id < w.num_tensors(); ++id)
    if (!w.spec(id).is_vector()) w.flat(id) *= Scalar(10);
  auto owned = std::make_unique<gpt2<Scalar>>(std::move(w));
  auto& model = *owned;
  model.add_adapter("q", {2, 4.0}, {"c_attn"});
  model.add_adapter("m", {4, 8.0}, {"c_fc", "mlp.c_proj"});
  model.add_adapter("all", {3, 3.0}, {"c_attn", "c_proj", "c_fc"});
  randomise(model, "q", 1);
  randomise(model, "m", 2);
  randomise(model, "all", 3);
  return owned;
}

template <typename Scalar>
class gpt2_mixed_typed : public ::testing::Test {};
using scalar_types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(gpt2_mixed_typed, scalar_types);

TYPED_TEST(gpt2_mixed_typed, each_sequence_equals_its_adapter_alone_through_prompt_and_decoding) {
  using S = TypeParam;
  const double tol = std::is_same_v<S, float> ? 2e-4 : 1e-11;
  auto owned = model_with_adapters<S>();
  auto& model = *owned;
  model.train(false);
  const std::vector<std::string> names = {"m", lora::base_adapter, "all", "q", "m"};
  const std::vector<tokens> prompts = {{1, 2, 3}, {4}, {5, 6, 7, 8, 9}, {10, 0}, {3, 3}};
  const std::vector<tokens> steps = {{7}, {2}, {1}, {9}, {4}};  // then one more token for each, twice

  // Batched: every prompt at once, then the next tokens, one per sequence per call.
  std::vector<typename gpt2<S>::cache_type> caches;
  std::vector<typename gpt2<S>::cache_type*> ptrs;
  for (std::size_t k = 0; k < names.size(); ++k) caches.push_back(model.make_cache());
  for (auto& c : caches) ptrs.push_back(&c);
  lora::models::gpt2_batch_workspace<S> ws;
  std::vector<lora::matrix<S>> prompt_logits, step_logits, step2_logits;
  std::vector<index> lengths;
  for (const auto& p : prompts) lengths.push_back(static_cast<index>(p.size()));
  model.infer_batch(prompts, ptrs, model.routing(names, lengths), ws, &prompt_logits);
  const auto decode = model.routing(names, std::vector<index>(names.size(), 1));
  model.infer_batch(steps, ptrs, decode, ws, &step_logits);
  model.infer_batch(std::vector<tokens>(names.size(), tokens{6}), ptrs, decode, ws, &step2_logits);

  // One sequence at a time with its adapter the only active one (the base: none active).
  for (std::size_t k = 0; k < names.size(); ++k) {
    const bool base = lora::adapter_routing::is_base(names[k]);
    for (auto& [path, layer] : model.named_layers())
      layer->set_active(!base && layer->has_adapter(names[k]) ? std::vector<std::string>{names[k]}
                                                              : std::vector<std::string>{});
    auto cache = model.make_cache();
    lora::matrix<S> p, s1, s2;
    model.infer(prompts[k], cache, &p);
    model.infer(steps[k], cache, &s1);
    model.infer({6}, cache, &s2);
    EXPECT_LT((prompt_logits[k] - p).cwiseAbs().maxCoeff(), tol) << "sequence " << k << " (" << names[k] << ")";
    EXPECT_LT((step_logits[k] - s1).cwiseAbs().maxCoeff(), tol) << "sequence " << k;
    EXPECT_LT((step2_logits[k] - s2).cwiseAbs().maxCoeff(), tol) << "sequence " << k;
    EXPECT_EQ(caches[k].length, static_cast<index>(prompts[k].size()) + 2);
  }
}

TEST(gpt2_mixed, adapters_matter_and_the_base_rows_ignore_them) {
  auto owned = model_with_adapters<double>();
  auto& model = *owned;
  const std::vector<tokens> seqs = {{1, 2, 3}, {1, 2, 3}, {1, 2, 3}};
  auto c0 = model.make_cache(), c1 = model.make_cache(), c2 = model.make_cache();
  lora::models::gpt2_batch_workspace<double> ws;
  std::vector<lora::matrix<double>> logits;
  model.infer_batch(seqs, {&c0, &c1, &c2}, model.routing({"all", "", "q"}, {3, 3, 3}), ws, &logits);
  // The same tokens through different adapters give different logits; the base row equals no adapter.
  EXPECT_GT((logits[0] - logits[1]).cwiseAbs().maxCoeff(), 1e-3);
  EXPECT_GT((logits[2] - logits[1]).cwiseAbs().maxCoeff(), 1e-3);
  for (auto& [path, layer] : model.named_layers()) layer->set_active({});
  auto c = model.make_cache();
  lora::matrix<double> base;
  model.infer(seqs[1], c, &base);
  EXPECT_LT((logits[1] - base).cwiseAbs().maxCoeff(), 1e-12);
}

TEST(gpt2_mixed, errors_name_the_sequence_and_the_adapters) {
  auto owned = model_with_adapters<double>();
  auto& model = *owned;
  try {
    (void)model.routing({"q", "nope"}, {1, 1});
    ADD_FAILURE() << "expected a name_error";
  } catch (const lora::name_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("sequence 1 names adapter 'nope'"), std::string::npos) << what;
    EXPECT_NE(what.find("'q', 'all', 'm'"), std::string::npos) << what;
  }
  EXPECT_THROW((void)model.routing({"q"}, {1, 1}), lora::shape_error);
  auto c0 = model.make_cache(), c1 = model.make_cache();
  lora::models::gpt2_batch_workspace<double> ws;
  const auto r = model.routing({"q", "m"}, {2, 1});
  EXPECT_THROW(model.infer_batch({{1, 2}, {3}}, {&c0}, r, ws, nullptr), lora::shape_error);          // one cache short
  EXPECT_THROW(model.infer_batch({{1, 2}, {3, 4}}, {&c0, &c1}, r, ws, nullptr), lora::shape_error);  // 4 rows, 3 routed
  EXPECT_THROW(model.infer_batch({{1, 99}, {3}}, {&c0, &c1}, r, ws, nullptr), lora::shape_error);    // id out of range
  model.set_active({"q"});
  model.merge();
  EXPECT_THROW(model.infer_batch({{1, 2}, {3}}, {&c0, &c1}, r, ws, nullptr), lora::state_error);
}

}  // namespace
