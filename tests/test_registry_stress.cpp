// Serving while the registry changes: reader threads run mixed GPT-2 batches bound to the registry while
// a writer loads, replaces and unloads adapters under the same names. Every sequence of every batch must
// equal the single-threaded logits of the adapter version its batch was bound to (identified by its
// factors), and every version must be freed once the last batch holding it is done. Built into
// lora_tests, and alone under ThreadSanitizer as lora_tsan_tests (.ci/run), where any data race fails.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "registry_support.hpp"
#include "support.hpp"

namespace {

using lora::index;
using lora_test::tokens;
using model_type = lora::models::gpt2<double>;

constexpr int k_readers = 3;
constexpr int k_batches = 200;  // per reader
const std::vector<std::string> k_slots = {"s0", "s1", "s2"};
const std::vector<tokens> k_prompts = {{1, 2, 3}, {4, 5}, {6, 7, 8, 9}, {10, 0, 3}};

/// The variants the writer publishes: adapters of different ranks and targets, their PEFT form, and the
/// logits of each prompt alone with each, computed single-threaded before any thread starts.
struct variants {
  std::vector<lora::io::peft_adapter> peft;
  std::vector<std::vector<lora::matrix<double>>> logits;  // [variant][prompt]
  std::vector<lora::matrix<double>> base;                 // [prompt]
};

variants make_variants() {
  auto owner = lora_test::registry_model<double>();
  const std::vector<std::vector<std::string>> targets = {
      {"c_attn"}, {"c_fc", "mlp.c_proj"}, {"c_attn", "c_proj", "c_fc"}, {"attn.c_proj"}};
  variants v;
  for (std::size_t k = 0; k < targets.size(); ++k) {
    const std::string name = "v" + std::to_string(k);
    lora_test::add_random_adapter(*owner, name, static_cast<index>(k + 1), targets[k], 10 + k);
    v.peft.push_back(lora_test::exported_adapter(*owner, name));
    v.logits.emplace_back();
    for (const auto& p : k_prompts) v.logits.back().push_back(lora_test::logits_alone(*owner, name, p));
  }
  for (const auto& p : k_prompts) v.base.push_back(lora_test::logits_alone(*owner, "", p));
  return v;
}

/// Which variant a published version is: the one whose first module's A it holds.
int variant_of(const lora::io::adapter_version<double>& version, const variants& v,
               const std::vector<std::pair<std::string, lora::linear<double>*>>& layers) {
  for (std::size_t k = 0; k < v.peft.size(); ++k) {
    const auto& m = v.peft[k].modules.front();
    for (const auto& [path, layer] : layers) {
      if (path != m.path) continue;
      const lora::routed_factors<double>* f = version.find(&layer->adapted_part(0));
      if (f != nullptr && f->a.rows() == m.a.rows() && f->a == m.a) return static_cast<int>(k);
    }
  }
  return -1;
}

TEST(registry_stress, every_response_equals_the_single_threaded_result_for_the_version_it_saw) {
  const variants v = make_variants();
  auto served = lora_test::registry_model<double>();
  const auto layers = served->named_layers();
  lora::io::adapter_registry<double> reg(layers);
  std::atomic<int> readers_done{0}, failures{0};
  std::atomic<long> checked{0};
  std::vector<std::weak_ptr<const lora::io::adapter_version<double>>> published;

  std::thread writer([&] {
    lora::rng gen(99);
    for (int step = 0; readers_done.load() < k_readers; ++step) {
      const std::string& slot = k_slots[static_cast<std::size_t>(gen.uniform(0, 3)) % k_slots.size()];
      const auto& peft = v.peft[static_cast<std::size_t>(gen.uniform(0, 4)) % v.peft.size()];
      if (!reg.contains(slot)) {
        reg.load(slot, peft);
      } else if (step % 3 == 0) {
        reg.unload(slot);
        continue;
      } else {
        reg.replace(slot, peft);
      }
      published.push_back(reg.current()->version(slot));  // only this thread publishes
      std::this_thread::yield();
    }
  });

  std::vector<std::thread> readers;
  for (int t = 0; t < k_readers; ++t) {
    readers.emplace_back([&, t] {
      lora::rng gen(static_cast<std::uint64_t>(t) + 1);
      lora::models::gpt2_batch_workspace<double> ws;
      std::vector<lora::matrix<double>> logits;
      for (int b = 0; b < k_batches; ++b) {
        std::vector<tokens> seqs;
        std::vector<std::string> names;
        std::vector<std::size_t> prompt_of;
        std::vector<std::pair<std::string, index>> runs;
        for (int s = 0; s < 3; ++s) {
          const auto p = static_cast<std::size_t>(gen.uniform(0, 4)) % k_prompts.size();
          const auto slot = static_cast<std::size_t>(gen.uniform(0, 4)) % (k_slots.size() + 1);
          names.push_back(slot == k_slots.size() ? std::string() : k_slots[slot]);  // or the base alone
          seqs.push_back(k_prompts[p]);
          prompt_of.push_back(p);
          runs.emplace_back(names.back(), static_cast<index>(k_prompts[p].size()));
        }
        auto routing = lora::adapter_routing::from_runs(runs, {}, lora::missing_adapter::base);
        const auto snap = reg.bind(routing);
        std::vector<model_type::cache_type> caches;
        std::vector<model_type::cache_type*> ptrs;
        for (std::size_t s = 0; s < seqs.size(); ++s) caches.push_back(served->make_cache());
        for (auto& c : caches) ptrs.push_back(&c);
        served->infer_batch(seqs, ptrs, routing, ws, &logits);
        for (std::size_t s = 0; s < seqs.size(); ++s) {
          const lora::io::adapter_version<double>* ver = names[s].empty() ? nullptr : snap->find(names[s]);
          const int k = ver == nullptr ? -1 : variant_of(*ver, v, layers);
          if (ver != nullptr && k < 0) ++failures;  // a version that is none of the variants: torn
          const lora::matrix<double>& want =
              k < 0 ? v.base[prompt_of[s]] : v.logits[static_cast<std::size_t>(k)][prompt_of[s]];
          if (!(lora_test::rel_error(logits[s], want) < 1e-12)) ++failures;
          ++checked;
        }
      }
      ++readers_done;
    });
  }
  for (auto& r : readers) r.join();
  writer.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(checked.load(), static_cast<long>(k_readers) * k_batches * 3);
  EXPECT_GT(reg.current()->generation(), 0U);
  for (const auto& s : k_slots)
    if (reg.contains(s)) reg.unload(s);
  for (const auto& w : published) EXPECT_TRUE(w.expired());  // nothing outlives its last user
}

}  // namespace
