// lora/models/gpt2_adapters.hpp: the adapters of a GPT-2 model across its projections (included by
// gpt2.hpp): PEFT-style target matching, adding, activating, merging, and the routing of a batch of
// sequences that each use their own adapter (docs/CONVENTIONS.md §mixed).
#pragma once

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "../adapter_routing.hpp"
#include "gpt2.hpp"

namespace lora::models {

template <typename Scalar>
std::vector<std::pair<std::string, linear<Scalar>*>> gpt2<Scalar>::named_layers() {
  std::vector<std::pair<std::string, layer_type*>> out;
  for (auto& layer : m_layers) out.emplace_back(layer.name(), &layer);
  return out;
}

template <typename Scalar>
std::vector<std::pair<std::string, linear<Scalar>*>> gpt2<Scalar>::match(const std::vector<std::string>& targets) {
  std::vector<std::pair<std::string, layer_type*>> out;
  for (const auto& t : targets) {
    if (t == "wte" || t == "transformer.wte" || t == "lm_head")
      throw name_error("gpt2: target '" + t +
                       "' is not supported: the LM head is tied to wte, so an adapter there would change both; "
                       "targets are c_attn, c_proj, c_fc (or full paths)");
    bool found = false;
    for (auto& layer : m_layers) {
      const std::string& p = layer.name();
      const bool hit = p == t || (p.size() > t.size() && p.compare(p.size() - t.size(), t.size(), t) == 0 &&
                                  p[p.size() - t.size() - 1] == '.');
      if (!hit) continue;
      found = true;
      const bool seen = std::any_of(out.begin(), out.end(), [&](const auto& e) { return e.second == &layer; });
      if (!seen) out.emplace_back(p, &layer);
    }
    if (!found)
      throw name_error("gpt2: target '" + t + "' matches no module (expected c_attn, c_proj, c_fc, attn.c_proj, " +
                       "mlp.c_proj or a path such as " + gpt2_module_path(0, gpt2_module::c_attn) + ")");
  }
  return out;
}

template <typename Scalar>
void gpt2<Scalar>::add_adapter(const std::string& name, const adapter_config& cfg,
                               const std::vector<std::string>& targets) {
  const auto chosen = match(targets);
  for (const auto& [path, layer] : chosen)
    if (layer->has_adapter(name)) throw name_error("gpt2: module '" + path + "' already has an adapter '" + name + "'");
  std::size_t done = 0;
  try {
    for (; done < chosen.size(); ++done) {
      adapter_config c = cfg;
      c.seed = cfg.seed + done;  // a different initialisation per module
      chosen[done].second->add_adapter(name, c);
    }
  } catch (...) {
    for (std::size_t i = 0; i < done; ++i) chosen[i].second->remove_adapter(name);
    throw;
  }
}

template <typename Scalar>
void gpt2<Scalar>::set_active(const std::vector<std::string>& names) {
  for (auto& layer : m_layers) {
    const bool has_all =
        std::all_of(names.begin(), names.end(), [&](const std::string& n) { return layer.has_adapter(n); });
    if (has_all) layer.set_active(names);
  }
}

template <typename Scalar>
void gpt2<Scalar>::merge() {
  for (auto& layer : m_layers)
    if (!layer.active_adapters().empty()) layer.merge();
}

template <typename Scalar>
void gpt2<Scalar>::unmerge() {
  for (auto& layer : m_layers)
    if (layer.merged()) layer.unmerge();
}

template <typename Scalar>
void gpt2<Scalar>::train(bool on) {
  for (auto& layer : m_layers) layer.train(on);
}

template <typename Scalar>
std::vector<std::string> gpt2<Scalar>::adapter_names() const {
  std::vector<std::string> all;
  for (const auto& layer : m_layers)
    for (const auto& a : layer.adapter_names())
      if (std::find(all.begin(), all.end(), a) == all.end()) all.push_back(a);
  return all;
}

template <typename Scalar>
adapter_routing gpt2<Scalar>::routing(const std::vector<std::string>& names, const std::vector<index>& lengths) const {
  if (names.size() != lengths.size())
    throw shape_error("gpt2::routing: expected one adapter name per sequence (" + std::to_string(lengths.size()) +
                      " sequences), got " + std::to_string(names.size()));
  const std::vector<std::string> known = adapter_names();
  std::vector<std::pair<std::string, index>> runs;
  for (std::size_t k = 0; k < names.size(); ++k) {
    const std::string& n = names[k];
    if (!adapter_routing::is_base(n) && std::find(known.begin(), known.end(), n) == known.end()) {
      std::string list;
      for (const auto& a : known) list += (list.empty() ? "'" : ", '") + a + "'";
      throw name_error("gpt2: sequence " + std::to_string(k) + " names adapter '" + n +
                       "', which no projection holds (adapters: " + (list.empty() ? "none" : list) + "; '" +
                       base_adapter + "' for the base alone)");
    }
    runs.emplace_back(n, lengths[k]);
  }
  return adapter_routing::from_runs(runs, {}, missing_adapter::base);
}

}  // namespace lora::models
