// lora/detail/linear_quant.hpp: the definitions of lora::linear's quantized weights (docs/CONVENTIONS.md
// §quant): changing the storage, DoRA's norm over codes, and the merge that re-quantizes.
//
// A quantized layer stores W (out x in) in the layout of quant::quantized_matrix, never transposed. A merge
// cannot add s B A to codes exactly, so it forms the exact merged weight W* = deq(original codes) with
// every merge record applied in order (the same records an exact merge of a plain weight uses, without
// their ulp corrections), re-quantizes W* in the same format and measures what that rounding changed
// (quant/requant_error.hpp). The original codes are kept while anything is merged: unmerging everything
// puts them back byte for byte; unmerging part re-quantizes the rest from them, so errors never accumulate.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "../linear.hpp"

namespace lora {

template <typename Scalar>
linear<Scalar>::linear(quant::quantized_matrix weight, std::string name) : m_name(std::move(name)) {
  if (weight.rows() == 0 || weight.cols() == 0)
    throw shape_error(detail::cat(where(), ": weight must be non-empty, got ",
                                  detail::shape_str(weight.rows(), weight.cols()), " (out x in)"));
  m_out = weight.rows();
  m_in = weight.cols();
  adopt_quantized(std::move(weight));
}

template <typename Scalar>
void linear<Scalar>::adopt_quantized(quant::quantized_matrix q) {
  LORA_ASSERT(q.rows() == m_out && q.cols() == m_in);
  m_quant_row_sq.resize(m_out);  // ‖deq(W)_o‖², for DoRA, a row at a time
  std::vector<Scalar> row(static_cast<std::size_t>(m_in));
  for (index o = 0; o < m_out; ++o) {
    q.dequantize_rows(o, o + 1, row.data());
    m_quant_row_sq(o) = Eigen::Map<const vector_type>(row.data(), m_in).squaredNorm();
  }
  m_quant = std::move(q);
  m_quantized = true;
  m_owned.resize(0, 0);
  m_view_data = nullptr;
  m_transposed = false;
  m_rows = m_out;
  m_cols = m_in;
  m_stride = m_out;
  invalidate_cache();
}

template <typename Scalar>
void linear<Scalar>::set_weight_storage(quant::qtype type) {
  if (core_merged())
    throw state_error(detail::cat(where(), ": cannot change the weight's storage to ", quant::qtype_name(type),
                                  " while adapters are merged; unmerge() first"));
  if (type == quant::qtype::f32) {
    if (!m_quantized) return;  // already plain
    m_owned = m_quant.template dequantize<Scalar>();
    m_quant = quant::quantized_matrix();
    m_quant_row_sq.resize(0);
    m_quantized = false;
    invalidate_cache();
    return;
  }
  adopt_quantized(quant::quantized_matrix::quantize(weight(), type));
}

template <typename Scalar>
const quant::quantized_matrix& linear<Scalar>::quantized_weight() const {
  if (!m_quantized) throw state_error(where() + ": the weight is not quantized (set_weight_storage() quantizes it)");
  return m_quant;
}

template <typename Scalar>
typename linear<Scalar>::vector_type linear<Scalar>::dora_norm(const adapter_type& a) const {
  if (!m_quantized) return detail::dora_norm<Scalar>(stored_weight(), m_transposed, a.m_a, a.m_b, a.m_scaling);
  // ‖W_o + s (B A)_o‖² = ‖W_o‖² + 2 s B_o · (W Aᵀ)_o + s² B_o (A Aᵀ) B_oᵀ, W Aᵀ from the codes.
  quant::qgemm_workspace<Scalar> ws;
  matrix_type a_wt(a.m_a.rows(), m_out);  // A deq(W)ᵀ: r x out
  quant::qgemm_forward<Scalar>(a.m_a, m_quant, a_wt, ws);
  const Scalar s = a.m_scaling;
  const matrix_type b_aat = a.m_b * (a.m_a * a.m_a.transpose());
  const vector_type sq = m_quant_row_sq + (2 * s) * a.m_b.cwiseProduct(a_wt.transpose()).rowwise().sum() +
                         (s * s) * b_aat.cwiseProduct(a.m_b).rowwise().sum();
  return sq.cwiseMax(Scalar(0)).cwiseSqrt();
}

template <typename Scalar>
typename linear<Scalar>::matrix_type linear<Scalar>::quant_merged_weight(
    const std::vector<detail::merge_record<Scalar>>& extra) const {
  const quant::quantized_matrix& original = m_records.empty() ? m_quant : m_quant_kept;
  matrix_type w = original.template dequantize<Scalar>();
  const auto apply = [&](const detail::merge_record<Scalar>& rec) {
    detail::for_each_delta(rec, m_out, m_in, [&](index i, index j, Scalar d) {
      w(i, j) = rec.forward(w(i, j), d, i, j);
      return true;
    });
  };
  for (const auto& rec : m_records) apply(rec);
  for (const auto& rec : extra) apply(rec);
  return w;
}

template <typename Scalar>
int linear<Scalar>::quant_merge(std::vector<detail::merge_record<Scalar>> records,
                                const std::vector<std::string>& chosen, bool safe) {
  const matrix_type exact = quant_merged_weight(records);
  if (safe && !exact.allFinite()) return -1;  // nothing changed yet
  quant::quantized_matrix merged = quant::quantized_matrix::quantize(exact, m_quant.type());
  m_merge_error = quant::measure_requant_error(exact.template cast<double>(), merged.template dequantize<double>());
  quant::quantized_matrix original = std::move(m_quant);
  adopt_quantized(std::move(merged));
  if (m_records.empty()) m_quant_kept = std::move(original);
  for (const auto& n : chosen) {
    core_find(n)->m_merged = true;
    if (!is_active(n)) m_active.push_back(n);
  }
  const int pushed = static_cast<int>(records.size());
  for (auto& rec : records) m_records.push_back(std::move(rec));
  invalidate_cache();
  return pushed;
}

template <typename Scalar>
void linear<Scalar>::quant_pop_merges(int records) {
  for (int k = 0; k < records && !m_records.empty(); ++k) {
    for (const auto& n : m_records.back().adapters)
      if (adapter_type* a = core_find(n)) a->m_merged = false;
    m_records.pop_back();
  }
  if (m_records.empty()) {
    if (m_quant_kept.rows() > 0) adopt_quantized(std::move(m_quant_kept));  // the original codes, byte for byte
    m_quant_kept = quant::quantized_matrix();
    m_merge_error = quant::requant_error();
  } else {
    const matrix_type exact = quant_merged_weight({});
    adopt_quantized(quant::quantized_matrix::quantize(exact, m_quant_kept.type()));
    m_merge_error = quant::measure_requant_error(exact.template cast<double>(), m_quant.template dequantize<double>());
  }
  invalidate_cache();
}

}  // namespace lora
