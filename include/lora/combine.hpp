// lora/combine.hpp: adapter arithmetic, PEFT's add_weighted_adapter (docs/CONVENTIONS.md §combine).
//
// Source adapter i of a module has factors A_i (r_i x in) and B_i (out x r_i), scaling s_i and a user weight
// w_i (any sign); c_i = w_i s_i. The new adapter has rank = alpha = its rank, so its scaling is 1:
//   cat        A = [c_1 A_1; c_2 A_2; …] (rows), B = [B_1, B_2, …] (columns): B A = Σ c_i B_i A_i exactly
//   linear, ties, dare_linear, dare_ties, magnitude_prune
//              A and B merged separately (detail/combine_ops.hpp): A from the stack A_i with weights
//              sgn(c_i) √|c_i|, B from B_i with weights √|c_i|. Exact for one adapter; otherwise B A holds
//              the cross terms B_i A_j. Needs equal ranks.
//   svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
//              the stack Δ_i = s_i B_i A_i (out x in) merged with weights c_i, so s_i enters squared (as in
//              PEFT), then B = U_k diag(S_k), A = V_kᵀ, k = svd_rank or max r_i; optionally both clamped to
//              the svd_clamp quantile of their entries.
// Embeddings (A: r x num, B: dim x r) and flattened conv kernels (A: r x C kh kw, B: O x r) are the same
// maths. lora::add_weighted_adapter does this for a layer of any kind; <lora/io/peft_combine.hpp> for
// PEFT adapter directories.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "adapter.hpp"
#include "config.hpp"
#include "detail/combine_ops.hpp"
#include "error.hpp"
#include "layer.hpp"
#include "merged_linear.hpp"
#include "random.hpp"

namespace lora {

/// PEFT's combination_type values.
enum class combination_type {
  linear,
  cat,
  svd,
  ties,
  ties_svd,
  dare_linear,
  dare_ties,
  dare_linear_svd,
  dare_ties_svd,
  magnitude_prune,
  magnitude_prune_svd,
};

/// PEFT's majority_sign_method: the sign of Σ τ (total) or of Σ sgn τ (frequency).
enum class majority_sign { total, frequency };

/// The options of add_weighted_adapter, PEFT's defaults.
struct combine_options {
  combination_type type = combination_type::svd;
  /// Fraction of entries kept by the pruning types (required there, ignored elsewhere); >= 1 prunes nothing.
  std::optional<double> density;
  majority_sign sign_method = majority_sign::total;
  std::optional<index> svd_rank;    ///< Rank of an svd-type result (default: the largest source rank).
  std::optional<double> svd_clamp;  ///< Quantile q in [0, 1] clamping an svd-type result's factors.
  bool svd_full_matrices = true;    ///< Full or thin SVD; the factors do not depend on it.
  std::uint64_t seed = 0;           ///< Seeds DARE's masks (lora::rng; torch's masks cannot be reproduced).
};

/// One source adapter of one module.
template <typename Scalar>
struct combine_source {
  matrix<Scalar> a;    ///< r x in
  matrix<Scalar> b;    ///< out x r
  double scaling = 1;  ///< s = alpha / r (or alpha / √r with rsLoRA)
  double weight = 1;   ///< the user's weight w
};

/// The new adapter's factors: A (rank x in), B (out x rank), to be used with scaling 1.
template <typename Scalar>
struct combined_factors {
  matrix<Scalar> a;
  matrix<Scalar> b;
  index rank() const noexcept { return a.rows(); }
};

/// "dare_ties_svd" for combination_type::dare_ties_svd ...
const char* combination_name(combination_type type);
/// The type a PEFT name denotes; config_error listing the valid names otherwise.
combination_type parse_combination(std::string_view name);
/// "total" or "frequency"; config_error otherwise.
majority_sign parse_majority_sign(std::string_view name);
/// True for the types that end in an SVD (svd, ties_svd, ...).
bool is_svd_type(combination_type type) noexcept;
/// True for the types that prune, and so need a density.
bool needs_density(combination_type type) noexcept;
/// The type PEFT applies: linear when there is one source adapter, `type` otherwise.
combination_type effective_type(combination_type type, std::size_t adapters) noexcept;
/// The new rank from the source ranks: Σ (cat), svd_rank or the maximum (svd types), the common rank
/// (the others; config_error naming the ranks when they differ).
index combined_rank(const combine_options& options, const std::vector<index>& ranks);
/// config_error for options PEFT refuses or cannot use: density < 0 or NaN, a pruning type without a
/// density, DARE with density 0 (PEFT divides by it), svd_rank < 1, svd_clamp outside [0, 1].
void validate(const combine_options& options);

/// The new factors of one module from its source adapters, by options.type exactly as given (the
/// one-adapter rule is the callers', see effective_type). config_error for invalid options or unequal
/// ranks where they must agree, shape_error when the factors disagree, numeric_error for non-finite input.
template <typename Scalar>
combined_factors<Scalar> combine_factors(const std::vector<combine_source<Scalar>>& sources,
                                         const combine_options& options);

/// PEFT's add_weighted_adapter on one layer of any kind: adds adapter `new_name` combining `adapters`
/// ((name, weight) pairs) on every part that takes adapters (a merged_linear's slice i draws its DARE
/// masks from seed + i). The new adapter has rank = alpha = the new rank, no rsLoRA and no DoRA, the first
/// source's dropout and seed, and is not activated. Sources may be merged (their factors are kept).
/// name_error for an unknown source or an existing `new_name`; config_error for no sources, a DoRA
/// source or invalid options. Nothing is added when anything throws.
template <typename Layer>
void add_weighted_adapter(Layer& layer, const std::vector<std::pair<std::string, double>>& adapters,
                          const std::string& new_name, const combine_options& options = {});

// ---------------------------------------------------------------------------------------------------
// names and rules

namespace detail {

struct combination_info {
  combination_type type;
  const char* name;
  merge_method method;
  bool svd;
};
inline constexpr combination_info combination_table[] = {
    {combination_type::linear, "linear", merge_method::task_arithmetic, false},
    {combination_type::cat, "cat", merge_method::task_arithmetic, false},
    {combination_type::svd, "svd", merge_method::task_arithmetic, true},
    {combination_type::ties, "ties", merge_method::ties, false},
    {combination_type::ties_svd, "ties_svd", merge_method::ties, true},
    {combination_type::dare_linear, "dare_linear", merge_method::dare_linear, false},
    {combination_type::dare_ties, "dare_ties", merge_method::dare_ties, false},
    {combination_type::dare_linear_svd, "dare_linear_svd", merge_method::dare_linear, true},
    {combination_type::dare_ties_svd, "dare_ties_svd", merge_method::dare_ties, true},
    {combination_type::magnitude_prune, "magnitude_prune", merge_method::magnitude_prune, false},
    {combination_type::magnitude_prune_svd, "magnitude_prune_svd", merge_method::magnitude_prune, true},
};

inline const combination_info& info_of(combination_type type) noexcept {
  for (const auto& row : combination_table)
    if (row.type == type) return row;
  return combination_table[0];  // unreachable for a valid enumerator
}

/// "a, b, c" of the source ranks, for messages.
inline std::string rank_list(const std::vector<index>& ranks) {
  std::string out;
  for (const index r : ranks) out += (out.empty() ? "" : ", ") + std::to_string(r);
  return out;
}

/// For the types that need equal ranks: config_error naming `who` and each source ("'a' rank 2") when
/// the ranks differ.
inline void check_equal_ranks(combination_type type, const std::vector<std::string>& names,
                              const std::vector<index>& ranks, const std::string& who) {
  if (type == combination_type::cat || info_of(type).svd) return;
  if (std::all_of(ranks.begin(), ranks.end(), [&](index r) { return r == ranks.front(); })) return;
  std::string list;
  for (std::size_t i = 0; i < ranks.size(); ++i) list += cat(i == 0 ? "" : ", ", names[i], " rank ", ranks[i]);
  throw config_error(cat(who, " (", info_of(type).name, "): expected source adapters of one rank, got ", list,
                         " (cat and the svd types take different ranks)"));
}

}  // namespace detail

inline const char* combination_name(combination_type type) { return detail::info_of(type).name; }

inline combination_type parse_combination(std::string_view name) {
  std::string known;
  for (const auto& row : detail::combination_table) {
    if (name == row.name) return row.type;
    known += (known.empty() ? "" : ", ") + std::string(row.name);
  }
  throw config_error(detail::cat("combination type: expected one of ", known, "; got '", name, "'"));
}

inline majority_sign parse_majority_sign(std::string_view name) {
  if (name == "total") return majority_sign::total;
  if (name == "frequency") return majority_sign::frequency;
  throw config_error(detail::cat("majority_sign_method: expected 'total' or 'frequency', got '", name, "'"));
}

inline bool is_svd_type(combination_type type) noexcept { return detail::info_of(type).svd; }

inline bool needs_density(combination_type type) noexcept {
  return detail::info_of(type).method != detail::merge_method::task_arithmetic;
}

inline combination_type effective_type(combination_type type, std::size_t adapters) noexcept {
  return adapters == 1 ? combination_type::linear : type;
}

inline void validate(const combine_options& o) {
  const char* type = combination_name(o.type);
  if (o.density && !(*o.density >= 0.0))
    throw config_error(detail::cat("combine (", type, "): density must be >= 0, got ", *o.density));
  if (needs_density(o.type) && !o.density)
    throw config_error(detail::cat("combine (", type, "): this type prunes and needs a density in [0, 1]"));
  const auto method = detail::info_of(o.type).method;
  const bool dare = method == detail::merge_method::dare_linear || method == detail::merge_method::dare_ties;
  if (dare && o.density && *o.density == 0.0)
    throw config_error(detail::cat("combine (", type,
                                   "): DARE divides the kept entries by the density; expected a density > 0, got 0"));
  if (o.svd_rank && *o.svd_rank < 1)
    throw config_error(detail::cat("combine (", type, "): svd_rank must be >= 1, got ", *o.svd_rank));
  if (o.svd_clamp && !(*o.svd_clamp >= 0.0 && *o.svd_clamp <= 1.0))
    throw config_error(detail::cat("combine (", type, "): svd_clamp is a quantile in [0, 1], got ", *o.svd_clamp));
}

inline index combined_rank(const combine_options& options, const std::vector<index>& ranks) {
  if (ranks.empty()) throw config_error("combine: expected at least one source adapter, got none");
  if (options.type == combination_type::cat) return std::accumulate(ranks.begin(), ranks.end(), index{0});
  if (is_svd_type(options.type)) return options.svd_rank.value_or(*std::max_element(ranks.begin(), ranks.end()));
  for (const index r : ranks)
    if (r != ranks.front())
      throw config_error(detail::cat("combine (", combination_name(options.type),
                                     "): expected source adapters of one rank, got ranks ", detail::rank_list(ranks),
                                     " (cat and the svd types take different ranks)"));
  return ranks.front();
}

// ---------------------------------------------------------------------------------------------------
// one module

namespace detail {

/// shape_error unless every A_i is r_i x in and every B_i is out x r_i with one in and one out;
/// numeric_error for a non-finite factor, scaling or weight.
template <typename Scalar>
void check_sources(const std::vector<combine_source<Scalar>>& sources) {
  const index in = sources.front().a.cols(), out = sources.front().b.rows();
  for (std::size_t i = 0; i < sources.size(); ++i) {
    const auto& s = sources[i];
    if (s.a.cols() != in || s.b.rows() != out || s.a.rows() != s.b.cols() || s.a.rows() < 1)
      throw shape_error(cat("combine: source ", i, " has A ", shape_str(s.a.rows(), s.a.cols()), " and B ",
                            shape_str(s.b.rows(), s.b.cols()), "; expected A r x ", in, " and B ", out,
                            " x r with r >= 1 (as source 0)"));
    if (!std::isfinite(s.scaling) || !std::isfinite(s.weight) || !s.a.allFinite() || !s.b.allFinite())
      throw numeric_error(
          cat("combine: source ", i, " has a non-finite factor, scaling (", s.scaling, ") or weight (", s.weight, ")"));
  }
}

template <typename Scalar>
combined_factors<Scalar> cat_factors(const std::vector<combine_source<Scalar>>& sources, index rank) {
  combined_factors<Scalar> out{matrix<Scalar>(rank, sources.front().a.cols()),
                               matrix<Scalar>(sources.front().b.rows(), rank)};
  index row = 0;
  for (const auto& s : sources) {
    const index r = s.a.rows();
    out.a.middleRows(row, r) = static_cast<Scalar>(s.weight * s.scaling) * s.a;
    out.b.middleCols(row, r) = s.b;
    row += r;
  }
  return out;
}

template <typename Scalar>
combined_factors<Scalar> factor_path(const std::vector<combine_source<Scalar>>& sources, const merge_rule& rule,
                                     rng& gen) {
  std::vector<matrix<Scalar>> as, bs;
  std::vector<double> wa, wb;
  for (const auto& s : sources) {
    const double c = s.weight * s.scaling, root = std::sqrt(std::abs(c));
    as.push_back(s.a);
    bs.push_back(s.b);
    wa.push_back(c >= 0 ? root : -root);  // the sign on one side only, so that it survives B A
    wb.push_back(root);
  }
  matrix<Scalar> a = merge_stack(std::move(as), wa, rule, gen);  // A's draws first, as in PEFT
  matrix<Scalar> b = merge_stack(std::move(bs), wb, rule, gen);
  return {std::move(a), std::move(b)};
}

template <typename Scalar>
combined_factors<Scalar> svd_path(const std::vector<combine_source<Scalar>>& sources, const merge_rule& rule,
                                  const combine_options& options, index rank, rng& gen) {
  std::vector<matrix<Scalar>> deltas;
  std::vector<double> weights;
  for (const auto& s : sources) {
    deltas.push_back(static_cast<Scalar>(s.scaling) * (s.b * s.a));  // PEFT's get_delta_weight
    weights.push_back(s.weight * s.scaling);                         // and the scaling once more
  }
  const matrix<Scalar> delta = merge_stack(std::move(deltas), weights, rule, gen);
  combined_factors<Scalar> out;
  truncated_factors(delta, rank, options.svd_full_matrices, options.svd_clamp, out.a, out.b);
  return out;
}

}  // namespace detail

template <typename Scalar>
combined_factors<Scalar> combine_factors(const std::vector<combine_source<Scalar>>& sources,
                                         const combine_options& options) {
  static_assert(std::is_floating_point_v<Scalar>, "lora::combine_factors needs a floating-point Scalar");
  validate(options);
  if (sources.empty()) throw config_error("combine: expected at least one source adapter, got none");
  detail::check_sources(sources);
  std::vector<index> ranks;
  for (const auto& s : sources) ranks.push_back(s.a.rows());
  const index rank = combined_rank(options, ranks);
  if (options.type == combination_type::cat) return detail::cat_factors(sources, rank);
  const detail::merge_rule rule{detail::info_of(options.type).method, options.density.value_or(1.0),
                                options.sign_method == majority_sign::frequency};
  rng gen(options.seed);
  if (is_svd_type(options.type)) return detail::svd_path(sources, rule, options, rank, gen);
  return detail::factor_path(sources, rule, gen);
}

// ---------------------------------------------------------------------------------------------------
// layers

namespace detail {

/// The parts of a layer that take adapters: part 0, or a merged_linear's enabled slices.
template <typename Layer>
std::vector<index> adapted_parts(const Layer&) {
  return {0};
}
template <typename Scalar>
std::vector<index> adapted_parts(const merged_linear<Scalar>& layer) {
  std::vector<index> parts;
  for (index i = 0; i < layer.num_slices(); ++i)
    if (layer.enable_lora()[static_cast<std::size_t>(i)]) parts.push_back(i);
  return parts;
}

/// Checks the sources (known, not DoRA, ranks) and the new name of add_weighted_adapter; the first source's
/// config.
template <typename Layer>
adapter_config check_weighted(const Layer& layer, const std::vector<std::pair<std::string, double>>& adapters,
                              const std::string& new_name, index part, combination_type type) {
  if (adapters.empty()) throw config_error("add_weighted_adapter: expected at least one source adapter, got none");
  if (new_name.empty()) throw name_error("add_weighted_adapter: the new adapter's name must be non-empty");
  if (layer.has_adapter(new_name))
    throw name_error(cat("add_weighted_adapter: an adapter named '", new_name,
                         "' already exists (PEFT would silently do nothing; remove it or pick another name)"));
  std::vector<std::string> names;
  std::vector<index> ranks;
  for (const auto& [name, weight] : adapters) {
    const auto& ad = layer.adapter(name, part);  // name_error for an unknown adapter
    if (ad.is_dora())
      throw config_error(cat("add_weighted_adapter: adapter '", name,
                             "' uses DoRA; expected plain LoRA sources (PEFT does not combine magnitudes)"));
    names.push_back("'" + name + "'");
    ranks.push_back(ad.rank());
  }
  check_equal_ranks(type, names, ranks, "add_weighted_adapter");
  return layer.adapter(adapters.front().first, part).config();
}

}  // namespace detail

template <typename Layer>
void add_weighted_adapter(Layer& layer, const std::vector<std::pair<std::string, double>>& adapters,
                          const std::string& new_name, const combine_options& options) {
  static_assert(is_lora_layer_v<Layer>, "lora::add_weighted_adapter takes a LoRA layer");
  using Scalar = typename Layer::Scalar;
  const std::vector<index> parts = detail::adapted_parts(layer);
  if (parts.empty()) throw config_error("add_weighted_adapter: no part of this layer takes adapters");
  combine_options o = options;
  o.type = effective_type(options.type, adapters.size());
  validate(o);
  const adapter_config first = detail::check_weighted(layer, adapters, new_name, parts.front(), o.type);
  std::vector<combined_factors<Scalar>> results;
  for (const index p : parts) {
    std::vector<combine_source<Scalar>> sources;
    for (const auto& [name, weight] : adapters) {
      const auto& ad = std::as_const(layer).adapter(name, p);
      sources.push_back({ad.a(), ad.b(), static_cast<double>(ad.scaling()), weight});
    }
    o.seed = options.seed + static_cast<std::uint64_t>(p);
    results.push_back(combine_factors(sources, o));
  }
  adapter_config config;
  config.rank = results.front().rank();
  config.alpha = static_cast<double>(config.rank);  // scaling 1, and never rsLoRA (docs/CONVENTIONS.md §combine)
  config.dropout = first.dropout;
  config.seed = first.seed;
  config.init = init_method::zeros;
  layer.add_adapter(new_name, config);
  try {
    for (std::size_t k = 0; k < parts.size(); ++k) layer.set_factors(new_name, parts[k], results[k].a, results[k].b);
  } catch (...) {
    layer.remove_adapter(new_name);
    throw;
  }
}

}  // namespace lora
