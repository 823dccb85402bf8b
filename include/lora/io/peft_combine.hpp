// lora/io/peft_combine.hpp: PEFT's add_weighted_adapter on adapter directories, without a base model
// (docs/CONVENTIONS.md §combine). The maths per module is lora::combine_factors (lora/combine.hpp).
//
//   combine_peft(adapters, weights, options)             in memory
//   combine_peft_dirs(dirs, weights, out_dir, options)   directories in, a new directory out (lora-combine)
//
// As PEFT: a module missing from some adapters is combined from the others there; target_modules is the
// union (lists) or "(t1)|(t2)" (regex strings; a list mixed with a string is refused); every adapter's rank
// is max(r, rank_pattern values), and the new rank (cat: their sum, svd types: svd_rank or their maximum,
// the others: their common value) is every module's rank, smaller results zero-padded (A rows, B columns).
// The new config is the first adapter's with r = lora_alpha = the new rank, no patterns, and
// use_rslora = false (so the scaling is exactly 1). Each module draws its DARE masks from seed ^ fnv1a(path).
// Conv2d modules are combined flattened (A: r x C kh kw, B: O x r) and stored 4-D again.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "../combine.hpp"
#include "../config.hpp"
#include "../error.hpp"
#include "peft_config.hpp"
#include "peft_file.hpp"

namespace lora::io {

/// A combined adapter and what the combination was.
struct peft_combine_result {
  peft_adapter adapter;     ///< r = lora_alpha = rank, every module of rank `rank`
  combination_type type{};  ///< the type applied (linear when one adapter was given)
  index rank = 0;
  /// Things left out that a user should know (the adapters' whole tensors, modules_to_save).
  std::vector<std::string> notes;
};

/// Combines PEFT adapters in memory. config_error for no adapters, weights.size() != adapters.size(),
/// invalid options, DoRA or lora_B-bias sources, mixed target_modules kinds, two adapters replacing one
/// module (modules_to_save) or unequal ranks where they must agree; shape_error or format_error for a
/// module whose adapters disagree on its shape or kind.
peft_combine_result combine_peft(const std::vector<peft_adapter>& adapters, const std::vector<double>& weights,
                                 const combine_options& options = {});
/// Loads `dirs`, combines them and saves the result to `out_dir` (peft_adapter::save: each file atomic).
peft_combine_result combine_peft_dirs(const std::vector<std::string>& dirs, const std::vector<double>& weights,
                                      const std::string& out_dir, const combine_options& options = {});

// ===================================================================================================
// Implementation
// ===================================================================================================

namespace detail {

/// PEFT's allocation rank of an adapter: max(r, rank_pattern values).
inline index allocation_rank(const peft_config& c) {
  index r = c.r;
  for (const auto& entry : c.rank_pattern) r = std::max(r, entry.second);
  return r;
}

/// Refuses what PEFT refuses, or what this library will not combine (DoRA, lora_B biases).
inline void check_combinable(const std::vector<peft_adapter>& adapters, const std::vector<double>& weights) {
  if (adapters.empty()) throw config_error("combine_peft: expected at least one adapter, got none");
  if (weights.size() != adapters.size())
    throw config_error(
        cat("combine_peft: expected one weight per adapter (", adapters.size(), "), got ", weights.size(), " weights"));
  std::map<std::string, std::size_t> replaced;
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    const peft_config& c = adapters[i].config;
    if (c.use_dora)
      throw config_error(cat("combine_peft: adapter ", i, " uses DoRA; PEFT does not combine magnitudes"));
    if (c.lora_bias)
      throw config_error(cat("combine_peft: adapter ", i,
                             " has lora_B biases, which PEFT's combination drops; "
                             "expected adapters without them"));
    if (c.target_modules.index() != adapters.front().config.target_modules.index())
      throw config_error(cat("combine_peft: adapter ", i, "'s target_modules is a ",
                             c.target_modules.index() == 0 ? "list" : "regex string", " but adapter 0's is not; PEFT ",
                             "does not combine a list with a string"));
    for (const peft_full_tensor& f : adapters[i].full_tensors) {
      const auto [it, fresh] = replaced.emplace(f.path, i);
      if (!fresh && it->second != i)
        throw config_error(cat("combine_peft: adapters ", it->second, " and ", i, " both replace '", f.path,
                               "' (modules_to_save); PEFT cannot combine them"));
    }
  }
}

/// The union of the target_modules: a sorted list, or "(t1)|(t2)|…" for regex strings.
inline std::variant<std::vector<std::string>, std::string> target_union(const std::vector<peft_adapter>& adapters) {
  if (std::holds_alternative<std::string>(adapters.front().config.target_modules)) {
    std::string joined;
    for (const auto& a : adapters) joined += (joined.empty() ? "(" : "|(") + std::get<1>(a.config.target_modules) + ")";
    return joined;
  }
  std::set<std::string> names;
  for (const auto& a : adapters) {
    const auto& list = std::get<0>(a.config.target_modules);
    names.insert(list.begin(), list.end());
  }
  return std::vector<std::string>(names.begin(), names.end());
}

/// shape_error or format_error unless module `m` of a later adapter has the kind and shape of `first`.
inline void check_same_module(const peft_module& first, const peft_module& m, std::size_t adapter) {
  const std::string where = cat("combine_peft: module '", m.path, "' of adapter ", adapter);
  if (m.embedding != first.embedding)
    throw format_error(cat(where, " is ", m.embedding ? "" : "not ", "an embedding, but it is ",
                           first.embedding ? "" : "not ", "one in an earlier adapter"));
  // Conv modules: the same kernel [·, C, kh, kw] (the rank may differ).
  const bool shape_a =
      m.a_shape.size() == first.a_shape.size() &&
      (m.a_shape.empty() || std::equal(m.a_shape.begin() + 1, m.a_shape.end(), first.a_shape.begin() + 1));
  if (m.in_features() != first.in_features() || m.out_features() != first.out_features() || !shape_a)
    throw shape_error(cat(where, " has in x out = ", shape_str(m.in_features(), m.out_features()), " (A stored as ",
                          shape_to_string(m.a_shape), "), an earlier adapter ",
                          shape_str(first.in_features(), first.out_features()), " (", shape_to_string(first.a_shape),
                          ")"));
}

/// The dtype of a combined module: the sources' common dtype, else F64 if one is F64, else F32.
inline dtype combined_dtype(const std::vector<const peft_module*>& modules) {
  dtype t = modules.front()->type;
  for (const peft_module* m : modules)
    if (m->type != t) t = m->type == dtype::f64 || t == dtype::f64 ? dtype::f64 : dtype::f32;
  return t;
}

/// Combines one module from the adapters that have it, padded to `rank`.
inline peft_module combine_module(const std::vector<const peft_module*>& modules,
                                  const std::vector<combine_source<double>>& sources, const combine_options& options,
                                  index rank) {
  combine_options o = options;
  o.seed = options.seed ^ lora::detail::fnv1a(modules.front()->path);
  if (is_svd_type(o.type)) o.svd_rank = rank;
  const combined_factors<double> f = combine_factors(sources, o);
  const peft_module& first = *modules.front();
  peft_module m;
  m.path = first.path;
  m.embedding = first.embedding;
  m.type = combined_dtype(modules);
  m.a = matrix<double>::Zero(rank, f.a.cols());
  m.b = matrix<double>::Zero(f.b.rows(), rank);
  m.a.topRows(f.rank()) = f.a;
  m.b.leftCols(f.rank()) = f.b;
  if (!first.a_shape.empty()) {
    m.a_shape = first.a_shape;
    m.a_shape[0] = static_cast<std::int64_t>(rank);
    m.b_shape = {static_cast<std::int64_t>(m.b.rows()), static_cast<std::int64_t>(rank), 1, 1};
  }
  return m;
}

/// The new config: the first adapter's with r = lora_alpha = rank, no patterns, no rsLoRA.
inline peft_config combined_config(const std::vector<peft_adapter>& adapters, index rank) {
  peft_config c = adapters.front().config;
  c.r = rank;
  c.lora_alpha = static_cast<double>(rank);
  c.rank_pattern.clear();
  c.alpha_pattern.clear();
  c.target_modules = target_union(adapters);
  c.use_rslora = false;  // PEFT copies it (scaling √rank); docs/CONVENTIONS.md §combine
  c.warnings.clear();
  c.inference_mode = true;
  return c;
}

}  // namespace detail

inline peft_combine_result combine_peft(const std::vector<peft_adapter>& adapters, const std::vector<double>& weights,
                                        const combine_options& options) {
  detail::check_combinable(adapters, weights);
  combine_options o = options;
  o.type = effective_type(options.type, adapters.size());
  validate(o);
  std::vector<index> ranks;
  std::vector<std::string> names;
  for (const auto& a : adapters) {
    names.push_back(detail::cat("adapter ", names.size()));
    ranks.push_back(detail::allocation_rank(a.config));  // PEFT compares these, not the modules' ranks
  }
  lora::detail::check_equal_ranks(o.type, names, ranks, "combine_peft");
  const index rank = combined_rank(o, ranks);
  std::set<std::string> paths;
  for (const auto& a : adapters)
    for (const auto& m : a.modules) paths.insert(m.path);
  peft_combine_result out{{detail::combined_config(adapters, rank), {}, {}}, o.type, rank, {}};
  for (const std::string& path : paths) {
    std::vector<const peft_module*> modules;
    std::vector<combine_source<double>> sources;
    std::vector<std::string> names;
    std::vector<index> ranks;
    for (std::size_t i = 0; i < adapters.size(); ++i) {
      const peft_module* m = adapters[i].find(path);
      if (m == nullptr) continue;  // PEFT skips an adapter a module lacks
      if (!modules.empty()) detail::check_same_module(*modules.front(), *m, i);
      modules.push_back(m);
      sources.push_back({m->a, m->b, adapters[i].config.scaling_for(path), weights[i]});
      names.push_back(detail::cat("adapter ", i));
      ranks.push_back(m->rank());
    }
    lora::detail::check_equal_ranks(o.type, names, ranks, detail::cat("combine_peft: module '", path, "'"));
    out.adapter.modules.push_back(detail::combine_module(modules, sources, o, rank));
  }
  std::size_t whole = 0;
  for (const auto& a : adapters) whole += a.full_tensors.size();
  if (whole != 0)
    out.notes.push_back(detail::cat(whole,
                                    " whole tensor(s) (modules_to_save) not carried over: PEFT gives the "
                                    "combined adapter fresh copies of the base modules"));
  out.adapter.validate();
  return out;
}

inline peft_combine_result combine_peft_dirs(const std::vector<std::string>& dirs, const std::vector<double>& weights,
                                             const std::string& out_dir, const combine_options& options) {
  std::vector<peft_adapter> adapters;
  for (const std::string& dir : dirs) adapters.push_back(peft_adapter::load(dir));
  peft_combine_result out = combine_peft(adapters, weights, options);
  out.adapter.save(out_dir);
  return out;
}

}  // namespace lora::io
