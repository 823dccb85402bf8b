// lora/io/peft_layers.hpp: the bridge between PEFT adapters (io/peft_file.hpp) and the library's
// layers: peft_adapter::from_layers reads trained adapters off named layers, attach() adds an
// adapter's modules to them (docs/CONVENTIONS.md §peft). Today both take lora::linear layers.
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
#include "peft_file.hpp"

namespace lora::io {

/// Attaches `adapter` as `adapter_name` to matching layers: `layers` is any range of
/// std::pair<std::string, P> with P a pointer to lora::linear<Scalar>, keyed by module path. Every
/// module of the adapter must match one layer (exact path, or the longest common dotted suffix as in
/// detail::suffix_index); layers without a module are left alone. All or nothing: every module is
/// checked first (a layer for it, in and out features, rank against the config, a free adapter name,
/// a plain LoRA module: no DoRA magnitude, no lora_B bias, no embedding) and only then are adapters
/// added, each with the module's effective rank, alpha, use_rslora and lora_dropout and with A and B
/// copied in. On any error nothing changes and the message names the module. The new adapter becomes
/// active only on layers that had no adapter (lora::linear::add_adapter).
template <typename Layers>
void attach(const peft_adapter& adapter, const Layers& layers, const std::string& adapter_name);

namespace detail {

/// The pointer type P of a range of std::pair<std::string, P>.
template <typename Layers>
using layer_pointer_of = std::decay_t<decltype(std::begin(std::declval<const Layers&>())->second)>;

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

/// One module to attach to one layer, checked.
template <typename Layer>
struct attach_step {
  Layer* layer;
  const peft_module* module;
  adapter_config config;
};

/// Phase 1 of attach: matches every module to a layer and checks it; nothing changes.
template <typename Layer>
std::vector<attach_step<Layer>> plan_attach(const peft_adapter& adapter, const std::vector<std::string>& names,
                                            const std::vector<Layer*>& targets, const std::string& adapter_name);

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

/// from_layers' checks of one (path, layer) pair.
template <typename Layer>
void check_named_layer(const std::string& path, const Layer* layer, const std::string& adapter_name) {
  if (layer == nullptr) throw name_error(cat("from_layers: the layer for module '", path, "' is null"));
  if (path.empty()) throw name_error("from_layers: a module path is empty");
  if (!layer->has_adapter(adapter_name)) {
    throw name_error(cat("from_layers: module '", path, "' (linear '", layer->name(), "') has no adapter named '",
                         adapter_name, "'"));
  }
}

/// Checks one module against the layer it matched (`where` names both).
template <typename Layer>
void check_attach_step(const peft_module& m, const Layer& layer, const adapter_config& c, const std::string& where,
                       const std::string& adapter_name) {
  if (m.embedding) throw config_error(cat(where, ": an embedding adapter cannot attach to a linear layer"));
  if (m.magnitude.size() != 0) {
    throw config_error(cat(where, ": DoRA (lora_magnitude_vector) is not supported by lora::linear"));
  }
  if (m.b_bias.size() != 0) throw config_error(cat(where, ": lora_B.bias is not supported by lora::linear"));
  if (m.in_features() != layer.in_features() || m.out_features() != layer.out_features()) {
    throw shape_error(cat(where, ": the adapter is for in x out = ", shape_str(m.in_features(), m.out_features()),
                          " but the layer is ", shape_str(layer.in_features(), layer.out_features())));
  }
  if (m.a.rows() != m.b.cols() || m.a.rows() != c.rank) {
    throw shape_error(
        cat(where, ": A has rank ", m.a.rows(), ", B has rank ", m.b.cols(), " and the config gives r = ", c.rank));
  }
  if (layer.has_adapter(adapter_name)) {
    throw name_error(cat(where, ": the layer already has an adapter named '", adapter_name, "'"));
  }
  lora::validate(c, where);
}

template <typename Layer>
std::vector<attach_step<Layer>> plan_attach(const peft_adapter& adapter, const std::vector<std::string>& names,
                                            const std::vector<Layer*>& targets, const std::string& adapter_name) {
  const suffix_index index_of(names);
  std::vector<attach_step<Layer>> plan;
  std::map<const Layer*, const peft_module*> claimed;
  for (const peft_module& m : adapter.modules) {
    const std::string what = cat("adapter module '", m.path, "'");
    const std::ptrdiff_t k = index_of.find(m.path, what);
    if (k < 0) throw name_error(cat("attach: no layer for ", what, " (layers: ", list_names(names), ")"));
    Layer* layer = targets[static_cast<std::size_t>(k)];
    const std::string where = cat("attach: ", what, " -> layer '", names[static_cast<std::size_t>(k)], "'");
    if (!claimed.emplace(layer, &m).second) {
      throw name_error(cat(where, ": the layer is already matched by module '", claimed[layer]->path, "'"));
    }
    const adapter_config c = adapter.config.adapter_config_for(m.path);
    check_attach_step(m, *layer, c, where, adapter_name);
    plan.push_back(attach_step<Layer>{layer, &m, c});
  }
  if (adapter_name.empty()) throw name_error("attach: adapter names must be non-empty");
  return plan;
}

}  // namespace detail

template <typename Layers>
peft_adapter peft_adapter::from_layers(const Layers& layers, const std::string& adapter_name, peft_config base) {
  using pointer = detail::layer_pointer_of<Layers>;
  using layer_type = std::remove_cv_t<std::remove_pointer_t<pointer>>;
  static_assert(std::is_pointer_v<pointer>, "from_layers takes pairs of (module path, pointer to lora::linear)");
  using Scalar = typename layer_type::Scalar;
  static_assert(std::is_same_v<layer_type, linear<Scalar>>,
                "from_layers takes pairs of (module path, pointer to lora::linear)");

  peft_adapter out;
  out.config = std::move(base);
  out.config.warnings.clear();
  std::map<index, std::size_t> rank_votes;
  std::map<double, std::size_t> alpha_votes;
  std::vector<double> alphas;
  std::set<std::string> last_components;
  for (const auto& [path, layer] : layers) {
    detail::check_named_layer(path, layer, adapter_name);
    const auto& ad = layer->adapter(adapter_name);
    const adapter_config& c = ad.config();
    if (out.modules.empty()) {
      out.config.use_rslora = c.use_rslora;
      out.config.lora_dropout = c.dropout;
    } else if (c.use_rslora != out.config.use_rslora) {
      throw config_error(detail::cat("from_layers: module '", path, "' has use_rslora = ",
                                     c.use_rslora ? "true" : "false", " but an earlier module has ",
                                     out.config.use_rslora ? "true" : "false", "; a PEFT config holds one use_rslora"));
    }
    peft_module m;
    m.path = path;
    m.a = ad.a().template cast<double>();
    m.b = ad.b().template cast<double>();
    m.type = dtype_of<Scalar>();
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
  out.config.use_dora = false;
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
  using pointer = detail::layer_pointer_of<Layers>;
  using layer_type = std::remove_pointer_t<pointer>;
  static_assert(std::is_pointer_v<pointer> && !std::is_const_v<layer_type>,
                "attach takes pairs of (module path, non-const pointer to lora::linear)");
  using Scalar = typename layer_type::Scalar;
  static_assert(std::is_same_v<layer_type, linear<Scalar>>, "attach takes pairs of (module path, lora::linear*)");

  std::vector<std::string> names;
  std::vector<layer_type*> targets;
  for (const auto& [path, layer] : layers) {
    if (layer == nullptr) throw name_error(detail::cat("attach: the layer for '", path, "' is null"));
    names.push_back(path);
    targets.push_back(layer);
  }
  const std::vector<detail::attach_step<layer_type>> plan = detail::plan_attach(adapter, names, targets, adapter_name);

  // Phase 2: add. Only allocation can fail now; undo what was added if it does.
  std::size_t done = 0;
  try {
    for (; done < plan.size(); ++done) {
      auto& ad = plan[done].layer->add_adapter(adapter_name, plan[done].config);
      ad.a() = plan[done].module->a.template cast<Scalar>();
      ad.b() = plan[done].module->b.template cast<Scalar>();
    }
  } catch (...) {
    for (std::size_t k = 0; k < done; ++k) plan[k].layer->remove_adapter(adapter_name);
    if (done < plan.size() && plan[done].layer->has_adapter(adapter_name)) {
      plan[done].layer->remove_adapter(adapter_name);
    }
    throw;
  }
}

}  // namespace lora::io
