// lora/detail/linear_core.hpp: the definitions of lora::linear's core primitives, the share of the adapter
// API (layer.hpp) that one weight carries: its adapters, their selection, exact merge records, parameters
// and accounting. layer_base checks every call (names, states, shapes) before it reaches these.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "../linear.hpp"

namespace lora {

// ---------------------------------------------------------------------------------------------------
// adapters

template <typename Scalar>
typename linear<Scalar>::adapter_type* linear<Scalar>::core_find(const std::string& name) {
  for (auto& a : m_adapters)
    if (a.m_name == name) return &a;
  return nullptr;
}

template <typename Scalar>
const typename linear<Scalar>::adapter_type* linear<Scalar>::core_find(const std::string& name) const {
  for (const auto& a : m_adapters)
    if (a.m_name == name) return &a;
  return nullptr;
}

template <typename Scalar>
std::vector<std::string> linear<Scalar>::core_names() const {
  std::vector<std::string> names;
  for (const auto& a : m_adapters) names.push_back(a.m_name);
  return names;
}

template <typename Scalar>
std::vector<std::string> linear<Scalar>::core_merged_names() const {
  std::vector<std::string> names;
  for (const auto& rec : m_records) names.insert(names.end(), rec.adapters.begin(), rec.adapters.end());
  return names;
}

template <typename Scalar>
bool linear<Scalar>::is_active(const std::string& name) const {
  return std::find(m_active.begin(), m_active.end(), name) != m_active.end();
}

template <typename Scalar>
bool linear<Scalar>::dora_participates() const {
  for (const auto& a : m_adapters)
    if (a.is_dora() && participates(a)) return true;
  return false;
}

template <typename Scalar>
void linear<Scalar>::invalidate_cache() {
  m_has_cache = false;
  m_x.clear();
  for (auto& a : m_adapters) a.m_in_cache = false;
}

template <typename Scalar>
typename linear<Scalar>::adapter_type& linear<Scalar>::core_add(const std::string& name, const adapter_config& config,
                                                                const std::string& label) {
  adapter_type& added = m_adapters.emplace_back(name, config, m_in, m_out, m_kind, label);
  if (config.use_dora) {
    // PEFT: the magnitude starts at ‖W + s B A‖, so the adapted layer starts equal to W + s B A.
    added.m_magnitude = dora_norm(added);
    added.m_grad_magnitude = vector_type::Zero(m_out);
  }
  if (m_active.empty() && m_adapters.size() == 1) m_active.push_back(name);
  invalidate_cache();
  return added;
}

template <typename Scalar>
template <typename DA, typename DB>
void linear<Scalar>::core_set_factors(const std::string& name, const DA& a, const DB& b, const vector_type* magnitude) {
  adapter_type& ad = *core_find(name);
  ad.m_a = a;
  ad.m_b = b;
  if (ad.is_dora()) ad.m_magnitude = magnitude ? *magnitude : dora_norm(ad);
  invalidate_cache();
}

template <typename Scalar>
template <typename DA, typename DB>
bool linear<Scalar>::core_hotswap(const std::string& name, const DA& a, const DB& b, const adapter_config& config) {
  const bool in_place = core_find(name)->swap_in(a, b, config);
  invalidate_cache();
  return in_place;
}

template <typename Scalar>
void linear<Scalar>::core_pad_rank(const std::string& name, index rank) {
  core_find(name)->pad_rank(rank);
  invalidate_cache();
}

template <typename Scalar>
void linear<Scalar>::core_remove(const std::string& name) {
  m_active.erase(std::remove(m_active.begin(), m_active.end(), name), m_active.end());
  m_adapters.remove_if([&](const adapter_type& x) { return x.m_name == name; });
  invalidate_cache();
}

template <typename Scalar>
void linear<Scalar>::core_set_active(const std::vector<std::string>& names) {
  m_active = names;
  invalidate_cache();
}

template <typename Scalar>
void linear<Scalar>::core_set_disabled(bool disabled) {
  m_disabled = disabled;
  invalidate_cache();
}

template <typename Scalar>
void linear<Scalar>::core_zero_grad() {
  for (auto& a : m_adapters) a.zero_grad();
}

// ---------------------------------------------------------------------------------------------------
// merging (docs/CONVENTIONS.md §merge)

template <typename Scalar>
detail::merge_record<Scalar> linear<Scalar>::make_record(const std::vector<std::string>& group) const {
  // Stack the factors as in PEFT's "cat" combination: Σ s_a B_a A_a = [s_1 B_1 | s_2 B_2 ...][A_1; A_2 ...].
  // For a stored W (out x in) the record holds P = [s B] (out x R), Q = [Aᵀ] (in x R); for a stored Wᵀ the
  // roles swap, so that the stored matrix always receives P Qᵀ.
  index total_rank = 0;
  for (const auto& n : group) total_rank += core_find(n)->rank();
  detail::merge_record<Scalar> rec;
  rec.adapters = group;
  matrix_type sb(m_out, total_rank), at(m_in, total_rank);
  index col = 0;
  for (const auto& n : group) {
    const adapter_type& a = *core_find(n);
    sb.middleCols(col, a.rank()) = a.m_scaling * a.m_b;
    at.middleCols(col, a.rank()) = a.m_a.transpose();
    col += a.rank();
    if (a.is_dora()) {
      rec.scale = a.m_magnitude.cwiseQuotient(dora_norm(a));  // g = m / ‖W + s B A‖
      rec.scale_columns = m_transposed;
    }
  }
  rec.p = m_transposed ? std::move(at) : std::move(sb);
  rec.q = m_transposed ? std::move(sb) : std::move(at);
  return rec;
}

template <typename Scalar>
int linear<Scalar>::core_merge(const std::vector<std::string>& chosen, bool safe) {
  // A DoRA adapter (at most one, checked) merges alone, first, in a record of its own: its gain depends on
  // the unmerged W. The plain adapters follow in one more record.
  std::vector<std::string> dora, plain;
  for (const auto& n : chosen) (core_find(n)->is_dora() ? dora : plain).push_back(n);
  std::vector<detail::merge_record<Scalar>> records;
  if (!dora.empty()) records.push_back(make_record(dora));
  if (!plain.empty()) records.push_back(make_record(plain));
  if (m_quantized) return quant_merge(std::move(records), chosen, safe);

  stored_map w = stored();
  for (std::size_t k = 0; k < records.size(); ++k) {
    if (safe && !detail::merge_is_finite(w, records[k])) {
      for (std::size_t undo = k; undo-- > 0;) detail::unmerge_exact(w, records[undo]);  // W back, bit for bit
      return -1;
    }
    detail::merge_exact(w, records[k]);
  }
  for (const auto& n : chosen) {
    core_find(n)->m_merged = true;
    if (!is_active(n)) m_active.push_back(n);
  }
  for (auto& rec : records) m_records.push_back(std::move(rec));
  invalidate_cache();
  return static_cast<int>(records.size());
}

template <typename Scalar>
void linear<Scalar>::core_pop_merges(int records) {
  if (m_quantized) return quant_pop_merges(records);
  stored_map w = stored();
  for (int k = 0; k < records && !m_records.empty(); ++k) {
    detail::unmerge_exact(w, m_records.back());
    for (const auto& n : m_records.back().adapters)
      if (adapter_type* a = core_find(n)) a->m_merged = false;
    m_records.pop_back();
  }
  invalidate_cache();
}

template <typename Scalar>
void linear<Scalar>::core_unload() {
  m_records.clear();
  m_quant_kept = quant::quantized_matrix();  // the merged codes stay; the originals go
  m_adapters.clear();
  m_active.clear();
  m_disabled = false;
  invalidate_cache();
}

// ---------------------------------------------------------------------------------------------------
// accounting

template <typename Scalar>
parameter_report linear<Scalar>::core_report() const {
  parameter_report r;
  const auto bytes = static_cast<std::int64_t>(sizeof(Scalar));
  r.frozen_params = m_in * m_out + m_bias.size();
  for (const auto& a : m_adapters) {
    const std::int64_t n = a.m_a.size() + a.m_b.size() + a.m_magnitude.size();
    if (a.m_merged) {
      r.frozen_params += n;
    } else {
      r.trainable_params += n;
      r.trainable_bytes += n * bytes;
      r.grad_bytes += (a.m_grad_a.size() + a.m_grad_b.size() + a.m_grad_magnitude.size()) * bytes;
    }
    // An embedding adapter's touched-id bookkeeping belongs to its gradient: one flag per id and the list.
    r.grad_bytes += static_cast<std::int64_t>(a.m_marked.size() + a.m_touched.capacity() * sizeof(index));
    if (a.m_in_cache) r.cache_bytes += a.m_h.size() * bytes;
  }
  r.frozen_bytes = r.frozen_params * bytes;  // merged adapters keep their factors for unmerge
  if (m_quantized)                           // the codes in place of m_in · m_out Scalars
    r.frozen_bytes += static_cast<std::int64_t>(m_quant.storage_bytes()) - m_in * m_out * bytes;
  if (m_has_cache) r.cache_bytes += static_cast<std::int64_t>(m_x.owned_bytes());
  if (m_has_cache && m_dora.active) r.cache_bytes += m_dora.base.size() * bytes;
  for (const auto& rec : m_records) r.merge_bytes += static_cast<std::int64_t>(rec.bytes());
  r.merge_bytes += static_cast<std::int64_t>(m_quant_kept.storage_bytes());  // the original codes, for unmerge
  return r;
}

}  // namespace lora
