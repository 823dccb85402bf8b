// Test support for serving GPT-2 from an adapter registry: a small random model, adapters made on a
// second copy of it and exported as PEFT adapters, and the single-threaded reference logits.
#pragma once

#include <lora/io/adapter_registry.hpp>
#include <lora/models/gpt2.hpp>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace lora_test {

using tokens = std::vector<std::int32_t>;

inline const lora::models::gpt2_config k_registry_model{2, 2, 8, 16, 11, 1e-5};

/// A random model (weights scaled up so that adapters visibly change the logits), the same every call.
template <typename Scalar>
std::unique_ptr<lora::models::gpt2<Scalar>> registry_model() {
  auto w = lora::models::gpt2_weights<Scalar>::random(k_registry_model, 5);
  for (lora::index id = 0; id < w.num_tensors(); ++id)
    if (!w.spec(id).is_vector()) w.flat(id) *= Scalar(10);
  return std::make_unique<lora::models::gpt2<Scalar>>(std::move(w));
}

/// Adds adapter `name` (rank, targets) to `model` with random factors from `seed`.
template <typename Scalar>
void add_random_adapter(lora::models::gpt2<Scalar>& model, const std::string& name, lora::index rank,
                        const std::vector<std::string>& targets, std::uint64_t seed) {
  model.add_adapter(name, {rank, 2.0 * static_cast<double>(rank)}, targets);
  lora::rng gen(seed);
  for (auto& [path, layer] : model.named_layers()) {
    if (!layer->has_adapter(name)) continue;
    const auto& a = layer->adapter(name);
    lora::matrix<Scalar> am(a.a().rows(), a.a().cols()), bm(a.b().rows(), a.b().cols());
    for (lora::index i = 0; i < am.size(); ++i) am.data()[i] = static_cast<Scalar>(0.5 * gen.normal());
    for (lora::index i = 0; i < bm.size(); ++i) bm.data()[i] = static_cast<Scalar>(0.5 * gen.normal());
    layer->set_factors(name, am, bm);
  }
}

/// Adapter `name` of `model` as a PEFT adapter (the modules that hold it).
template <typename Scalar>
lora::io::peft_adapter exported_adapter(lora::models::gpt2<Scalar>& model, const std::string& name) {
  std::vector<std::pair<std::string, lora::linear<Scalar>*>> holding;
  for (auto& e : model.named_layers())
    if (e.second->has_adapter(name)) holding.push_back(e);
  return lora::io::peft_adapter::from_layers(holding, name);
}

/// Logits (vocab x tokens) of `prompt` alone through `model` with adapter `name` the only active one
/// (the base alone for an empty name or base_adapter).
template <typename Scalar>
lora::matrix<Scalar> logits_alone(lora::models::gpt2<Scalar>& model, const std::string& name, const tokens& prompt) {
  const bool base = lora::adapter_routing::is_base(name);
  for (auto& e : model.named_layers()) {
    if (!e.second->has_adapter(name) || base) {
      e.second->disable_adapters();
      continue;
    }
    e.second->enable_adapters();
    e.second->set_active({name});
  }
  auto cache = model.make_cache();
  lora::matrix<Scalar> logits;
  model.infer(prompt, cache, &logits);
  for (auto& e : model.named_layers()) e.second->enable_adapters();
  return logits;
}

}  // namespace lora_test
