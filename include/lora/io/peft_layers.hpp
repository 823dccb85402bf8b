// lora/io/peft_layers.hpp: the bridge between PEFT adapters (io/peft_file.hpp) and the library's
// layers: peft_adapter::from_layers reads trained adapters off named layers, attach() adds an
// adapter's modules to them (docs/CONVENTIONS.md §peft). Both take every layer kind, mixed in one call,
// through module_ref (io/module_ref.hpp): linear (fan_in_fan_out too), embedding, conv2d, merged_linear.
#pragma once

#include <algorithm>
#include <cstddef>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../adapter.hpp"
#include "../config.hpp"
#include "../error.hpp"
#include "../linear.hpp"
#include "module_match.hpp"
#include "module_ref.hpp"
#include "peft_file.hpp"

namespace lora::io {

/// Attaches `adapter` as `adapter_name` to matching layers: `layers` is any range of
/// std::pair<std::string, P> with P a pointer to a LoRA layer (linear, embedding, merged_linear, conv2d)
/// or a module_ref<Scalar> (to mix kinds), keyed by module path. Every
/// module of the adapter must match one layer (exact path, or the longest common dotted suffix as in
/// detail::suffix_index); layers without a module are left alone. All or nothing: every module is
/// checked first (a layer of the module's kind, in and out features, rank against the config, a free
/// adapter name, no lora_B bias, DoRA only on linear and conv2d) and only then are adapters
/// added, each with the module's effective rank, alpha, use_rslora and lora_dropout and with A and B
/// copied in. On any error nothing changes and the message names the module. The new adapter becomes
/// active only on layers that had no adapter (lora::linear::add_adapter).
template <typename Layers>
void attach(const peft_adapter& adapter, const Layers& layers, const std::string& adapter_name);

namespace detail {

/// The element type P of a range of std::pair<std::string, P>.
template <typename Layers>
using layer_pointer_of = std::decay_t<decltype(std::begin(std::declval<const Layers&>())->second)>;

/// The Scalar of a layer pointer or of a module_ref.
template <typename P>
struct module_scalar {
  static_assert(std::is_pointer_v<P>, "layers are given as pairs of (module path, pointer to a LoRA layer)");
  using type = typename std::remove_cv_t<std::remove_pointer_t<P>>::Scalar;
};
template <typename S>
struct module_scalar<module_ref<S>> {
  using type = S;
};

/// A module_ref for a layer pointer (from_layers only reads through it) or a module_ref itself.
template <typename S, typename P>
module_ref<S> to_module_ref(P p) {
  if constexpr (std::is_pointer_v<P>) {
    static_assert(is_lora_layer_v<std::remove_cv_t<std::remove_pointer_t<P>>>, "a pointer to a LoRA layer");
    return module_ref<S>(const_cast<std::remove_cv_t<std::remove_pointer_t<P>>*>(p));
  } else {
    return p;
  }
}

/// (path, module_ref) pairs of a range of (path, P), null layers refused.
template <typename Layers>
std::vector<std::pair<std::string, module_ref<typename module_scalar<layer_pointer_of<Layers>>::type>>> module_refs(
    const Layers& layers, const char* who) {
  using S = typename module_scalar<layer_pointer_of<Layers>>::type;
  std::vector<std::pair<std::string, module_ref<S>>> out;
  for (const auto& [path, layer] : layers) {
    module_ref<S> ref = to_module_ref<S>(layer);
    if (ref.is_null()) throw name_error(cat(who, ": the layer for module '", path, "' is null"));
    if (path.empty()) throw name_error(cat(who, ": a module path is empty"));
    out.emplace_back(path, ref);
  }
  return out;
}

/// The key with the most votes (ties: the smallest key).
template <typename Votes>
typename Votes::key_type most_common(const Votes& votes);

/// Sets `patterns` to entries for the modules whose value_of(k) differs from `default_value`, each
/// its own escaped path, longest first so that a path is matched by its own entry before one of its
/// suffixes; then adds entries for modules that a shorter pattern would capture wrongly, until
/// effective(path) reads back value_of(k) for every module.
template <typename T, typename ValueOf, typename Effective>
void settle_patterns(pattern_list<T>& patterns, const std::vector<peft_module>& modules, ValueOf value_of,
                     Effective effective, T default_value);

}  // namespace detail

// ===================================================================================================
// Implementation
// ===================================================================================================

namespace detail {

template <typename Votes>
typename Votes::key_type most_common(const Votes& votes) {
  auto best = votes.begin();
  for (auto it = votes.begin(); it != votes.end(); ++it) {
    if (it->second > best->second) best = it;
  }
  return best->first;
}

template <typename T, typename ValueOf, typename Effective>
void settle_patterns(pattern_list<T>& patterns, const std::vector<peft_module>& modules, ValueOf value_of,
                     Effective effective, T default_value) {
  patterns.clear();
  pattern_list<T> own;
  std::vector<bool> has(modules.size(), false);
  for (std::size_t k = 0; k < modules.size(); ++k) {
    if (value_of(k) != default_value) {
      own.emplace_back(modules[k].path, value_of(k));
      has[k] = true;
    }
  }
  for (bool changed = true; changed;) {
    std::sort(own.begin(), own.end(), [](const auto& x, const auto& y) {
      return x.first.size() != y.first.size() ? x.first.size() > y.first.size() : x.first < y.first;
    });
    patterns.clear();
    for (const auto& [path, value] : own) patterns.emplace_back(regex_escape(path), value);
    changed = false;
    for (std::size_t k = 0; k < modules.size(); ++k) {
      if (!has[k] && effective(modules[k].path) != value_of(k)) {
        own.emplace_back(modules[k].path, value_of(k));
        has[k] = true;
        changed = true;
      }
    }
  }
}

/// from_layers: PEFT's use_dora is one flag, so every non-embedding module has a magnitude or none does.
inline void agree_on_dora(const peft_module& m, bool& dora, bool& known) {
  if (m.embedding) return;  // embeddings take no magnitude either way
  const bool has = m.magnitude.size() != 0;
  if (known && has != dora)
    throw config_error(cat("from_layers: module '", m.path, "' ", dora ? "does not use" : "uses",
                           " DoRA but an earlier module ", dora ? "does" : "does not",
                           "; a PEFT config holds one use_dora"));
  dora = has;
  known = true;
}

/// One module to attach to one layer, checked.
template <typename S>
struct attach_step {
  module_ref<S> layer;
  const peft_module* module;
  adapter_config config;
};

/// Phase 1 of attach: matches every module to a layer and checks it; nothing changes.
/// An empty adapter_name plans adapters held outside the layers (no name to collide with theirs).
template <typename S>
std::vector<attach_step<S>> plan_attach(const peft_adapter& adapter,
                                        const std::vector<std::pair<std::string, module_ref<S>>>& layers,
                                        const std::string& adapter_name) {
  std::vector<std::string> names;
  for (const auto& named : layers) names.push_back(named.first);
  const suffix_index index_of(names);
  std::vector<attach_step<S>> plan;
  std::map<std::size_t, const peft_module*> claimed;
  for (const peft_module& m : adapter.modules) {
    const std::string what = cat("adapter module '", m.path, "'");
    const std::ptrdiff_t k = index_of.find(m.path, what);
    if (k < 0) throw name_error(cat("attach: no layer for ", what, " (layers: ", list_names(names), ")"));
    const auto& [path, layer] = layers[static_cast<std::size_t>(k)];
    const std::string where = cat("attach: ", what, " -> layer '", path, "' (", layer.label(), ")");
    if (!claimed.emplace(static_cast<std::size_t>(k), &m).second)
      throw name_error(
          cat(where, ": the layer is already matched by module '", claimed[static_cast<std::size_t>(k)]->path, "'"));
    const adapter_config c = adapter.config.adapter_config_for(m.path);
    layer.check(m, c, where, adapter_name);
    plan.push_back(attach_step<S>{layer, &m, c});
  }
  return plan;
}

}  // namespace detail

template <typename Layers>
peft_adapter peft_adapter::from_layers(const Layers& layers, const std::string& adapter_name, peft_config base) {
  peft_adapter out;
  out.config = std::move(base);
  out.config.warnings.clear();
  std::map<index, std::size_t> rank_votes;
  std::map<double, std::size_t> alpha_votes;
  std::vector<double> alphas;
  std::set<std::string> last_components;
  bool dora = false, dora_known = false;
  for (const auto& [path, layer] : detail::module_refs(layers, "from_layers")) {
    if (!layer.has_adapter(adapter_name))
      throw name_error(detail::cat("from_layers: module '", path, "' (", layer.label(), ") has no adapter named '",
                                   adapter_name, "'"));
    const adapter_config c = layer.exported_config(adapter_name);
    if (out.modules.empty()) {
      out.config.use_rslora = c.use_rslora;
      out.config.lora_dropout = c.dropout;
    } else if (c.use_rslora != out.config.use_rslora) {
      throw config_error(detail::cat("from_layers: module '", path, "' has use_rslora = ",
                                     c.use_rslora ? "true" : "false", " but an earlier module has ",
                                     out.config.use_rslora ? "true" : "false", "; a PEFT config holds one use_rslora"));
    }
    peft_module m = layer.export_adapter(adapter_name);
    m.path = path;
    detail::agree_on_dora(m, dora, dora_known);
    out.modules.push_back(std::move(m));
    ++rank_votes[c.rank];
    ++alpha_votes[c.alpha];
    alphas.push_back(c.alpha);
    last_components.insert(std::string(detail::split_dots(path).back()));
  }
  // The most common rank and alpha become r and lora_alpha (ties: the smallest).
  if (!rank_votes.empty()) {
    out.config.r = detail::most_common(rank_votes);
    out.config.lora_alpha = detail::most_common(alpha_votes);
  }
  out.config.target_modules = std::vector<std::string>(last_components.begin(), last_components.end());
  out.config.use_dora = dora;
  out.config.lora_bias = false;
  out.config.peft_type = "LORA";
  detail::settle_patterns(
      out.config.rank_pattern, out.modules, [&](std::size_t k) { return out.modules[k].rank(); },
      [&](const std::string& p) { return out.config.rank_for(p); }, out.config.r);
  detail::settle_patterns(
      out.config.alpha_pattern, out.modules, [&](std::size_t k) { return alphas[k]; },
      [&](const std::string& p) { return out.config.alpha_for(p); }, out.config.lora_alpha);
  std::sort(out.modules.begin(), out.modules.end(),
            [](const peft_module& x, const peft_module& y) { return x.path < y.path; });
  out.validate();
  return out;
}

template <typename Layers>
void attach(const peft_adapter& adapter, const Layers& layers, const std::string& adapter_name) {
  static_assert(!std::is_const_v<std::remove_pointer_t<detail::layer_pointer_of<Layers>>>,
                "attach takes pairs of (module path, non-const pointer to a LoRA layer)");
  if (adapter_name.empty()) throw name_error("attach: adapter names must be non-empty");
  const auto plan = detail::plan_attach(adapter, detail::module_refs(layers, "attach"), adapter_name);
  // Phase 2: add. Only allocation can fail now; undo what was added if it does.
  std::size_t done = 0;
  try {
    for (; done < plan.size(); ++done) plan[done].layer.attach(*plan[done].module, plan[done].config, adapter_name);
  } catch (...) {
    for (std::size_t k = 0; k <= done && k < plan.size(); ++k)
      if (plan[k].layer.has_adapter(adapter_name)) plan[k].layer.remove(adapter_name);
    throw;
  }
}

}  // namespace lora::io
