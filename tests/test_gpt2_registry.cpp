// GPT-2 served from an adapter registry (io/adapter_registry.hpp): a mixed batch bound to the registry
// gives each sequence the logits of that sequence alone with its adapter active in the model, for adapters
// loaded from PEFT form and from a llama.cpp GGUF adapter file; a replaced adapter serves its new
// version to new batches while a batch bound before finishes on the old one.
#include <gtest/gtest.h>

#include <lora/io/gguf_lora.hpp>
#include <lora/models/gpt2_gguf.hpp>
#include <string>
#include <vector>

#include "file_support.hpp"
#include "registry_support.hpp"
#include "support.hpp"

namespace {

using lora::index;
using lora_test::tokens;

TEST(gpt2_registry, each_sequence_of_a_bound_batch_equals_its_adapter_alone) {
  auto owner = lora_test::registry_model<double>(), served = lora_test::registry_model<double>();
  lora_test::add_random_adapter(*owner, "q", 2, {"c_attn"}, 1);
  lora_test::add_random_adapter(*owner, "all", 3, {"c_attn", "c_proj", "c_fc"}, 2);
  lora::io::adapter_registry<double> reg(served->named_layers());
  reg.load("q", lora_test::exported_adapter(*owner, "q"));
  reg.load("all", lora_test::exported_adapter(*owner, "all"));

  const std::vector<std::string> names = {"all", lora::base_adapter, "q", "all"};
  const std::vector<tokens> prompts = {{1, 2, 3}, {4, 5}, {6, 7, 8, 9}, {10}};
  std::vector<std::pair<std::string, index>> runs;
  for (std::size_t k = 0; k < names.size(); ++k) runs.emplace_back(names[k], static_cast<index>(prompts[k].size()));
  lora::adapter_routing routing = lora::adapter_routing::from_runs(runs, {}, lora::missing_adapter::base);
  reg.bind(routing);

  std::vector<lora::models::gpt2<double>::cache_type> caches;
  std::vector<lora::models::gpt2<double>::cache_type*> ptrs;
  for (std::size_t k = 0; k < names.size(); ++k) caches.push_back(served->make_cache());
  for (auto& c : caches) ptrs.push_back(&c);
  lora::models::gpt2_batch_workspace<double> ws;
  std::vector<lora::matrix<double>> logits;
  served->infer_batch(prompts, ptrs, routing, ws, &logits);
  for (std::size_t k = 0; k < names.size(); ++k) {
    const lora::matrix<double> alone = lora_test::logits_alone(*owner, names[k], prompts[k]);
    EXPECT_LT(lora_test::rel_error(logits[k], alone), 1e-12) << names[k];
  }
  // The adapters matter: "all" differs from the base.
  EXPECT_GT(lora_test::rel_error(logits[0], lora_test::logits_alone(*owner, "", prompts[0])), 1e-3);
}

TEST(gpt2_registry, a_gguf_adapter_loads_into_the_registry_and_a_replacement_waits_for_new_batches) {
  auto owner = lora_test::registry_model<double>(), served = lora_test::registry_model<double>();
  lora_test::add_random_adapter(*owner, "a", 4, {"c_attn", "mlp.c_proj"}, 3);
  lora_test::add_random_adapter(*owner, "b", 2, {"c_fc"}, 4);
  lora_test::temp_dir dir;
  const std::string file = dir.path() + "/a.gguf";
  lora::io::write_gguf_lora(
      file, "gpt2",
      lora::models::gpt2_peft_to_gguf_modules(lora_test::exported_adapter(*owner, "a"), lora_test::k_registry_model));
  lora::io::adapter_registry<double> reg(served->named_layers());
  reg.load("x", lora::models::gpt2_gguf_lora_to_peft(lora::io::read_gguf_lora(lora::io::gguf_file::open(file))));

  const tokens prompt = {3, 1, 4, 1, 5};
  lora::adapter_routing old_batch = lora::adapter_routing::from_runs({{"x", 5}}, {}, lora::missing_adapter::base);
  reg.bind(old_batch);
  reg.replace("x", lora_test::exported_adapter(*owner, "b"));
  lora::adapter_routing new_batch = lora::adapter_routing::from_runs({{"x", 5}}, {}, lora::missing_adapter::base);
  reg.bind(new_batch);

  lora::models::gpt2_batch_workspace<double> ws;
  std::vector<lora::matrix<double>> got_old, got_new;
  auto c1 = served->make_cache(), c2 = served->make_cache();
  served->infer_batch({prompt}, {&c1}, old_batch, ws, &got_old);
  served->infer_batch({prompt}, {&c2}, new_batch, ws, &got_new);
  // The GGUF file stores float32 factors: the old batch matches "a" to float precision.
  EXPECT_LT(lora_test::rel_error(got_old[0], lora_test::logits_alone(*owner, "a", prompt)), 1e-6);
  EXPECT_LT(lora_test::rel_error(got_new[0], lora_test::logits_alone(*owner, "b", prompt)), 1e-12);
}

}  // namespace
