// lora/quant/requant_error.hpp: what storing a weight in fewer bits changes, measured (docs/CONVENTIONS.md
// §quant). A merge into a quantized (or bf16/f16) weight cannot be exact: the exact merged weight W* is
// rounded to the storage format, giving Wq = deq(quant(W*)). The error E = Wq − W* (out x in) is reported
// as the weight's change and as the change of the layer's output X Eᵀ on a probe batch X (p x in, entries
// N(0, 1) from a fixed seed, so that two reports of the same weights agree).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../config.hpp"
#include "../error.hpp"
#include "../random.hpp"

namespace lora::quant {

/// Maxima and root-mean-squares of E = Wq − W* and of X Eᵀ; the relative figures divide by the RMS of W*
/// and of X W*ᵀ (0 when those are 0).
struct requant_error {
  double max_weight = 0;        ///< max |E|
  double rms_weight = 0;        ///< √(mean E²) over out · in
  double rel_rms_weight = 0;    ///< rms_weight / RMS(W*)
  double max_output = 0;        ///< max |X Eᵀ| over the probe batch
  double rms_output = 0;        ///< √(mean (X Eᵀ)²)
  double rel_rms_output = 0;    ///< rms_output / RMS(X W*ᵀ)
  index probe_rows = 0;         ///< p
  index weights = 0;            ///< out · in: the count rms_weight averages over
  index outputs = 0;            ///< p · out: the count rms_output averages over
  double rms_exact_weight = 0;  ///< RMS(W*)
  double rms_exact_output = 0;  ///< RMS(X W*ᵀ)
  /// The worse of two reports, entry by entry (RMS values combine as the maximum, not a pooled mean).
  void absorb(const requant_error& o) noexcept;
  /// Adds another tensor's figures as if both were one: maxima combine as the maximum, each RMS as
  /// √((n₁ r₁² + n₂ r₂²) / (n₁ + n₂)) weighted by its count (weights or outputs), and the relative
  /// figures are the pooled RMS of E over the pooled RMS of W* (of X Eᵀ over X W*ᵀ). Associative, so a
  /// whole model is pooled one tensor at a time.
  void pool(const requant_error& o) noexcept;
};

/// The probe batch: p x in, N(0, 1) entries from rng(seed).
matrix<double> probe_batch(index p, index in, std::uint64_t seed = 0x5eed);

/// E = stored − exact (both out x in, stored = the weight as the format keeps it) measured with a probe of
/// p rows. shape_error when the shapes differ.
requant_error measure_requant_error(const Eigen::Ref<const matrix<double>>& exact,
                                    const Eigen::Ref<const matrix<double>>& stored, index p = 64);

// ================================================================================================
// Implementation
// ================================================================================================

inline void requant_error::absorb(const requant_error& o) noexcept {
  max_weight = std::max(max_weight, o.max_weight);
  rms_weight = std::max(rms_weight, o.rms_weight);
  rel_rms_weight = std::max(rel_rms_weight, o.rel_rms_weight);
  max_output = std::max(max_output, o.max_output);
  rms_output = std::max(rms_output, o.rms_output);
  rel_rms_output = std::max(rel_rms_output, o.rel_rms_output);
  probe_rows = std::max(probe_rows, o.probe_rows);
  weights = std::max(weights, o.weights);
  outputs = std::max(outputs, o.outputs);
  rms_exact_weight = std::max(rms_exact_weight, o.rms_exact_weight);
  rms_exact_output = std::max(rms_exact_output, o.rms_exact_output);
}

namespace detail {

using lora::detail::cat;
using lora::detail::shape_str;

/// √((n₁ a² + n₂ b²) / (n₁ + n₂)), 0 when both counts are 0.
inline double pooled_rms(double a, index n1, double b, index n2) noexcept {
  const auto w1 = static_cast<double>(n1), w2 = static_cast<double>(n2);
  return n1 + n2 > 0 ? std::sqrt((w1 * a * a + w2 * b * b) / (w1 + w2)) : 0.0;
}

inline double relative(double num, double den) noexcept { return den > 0 ? num / den : 0.0; }

}  // namespace detail

inline void requant_error::pool(const requant_error& o) noexcept {
  max_weight = std::max(max_weight, o.max_weight);
  max_output = std::max(max_output, o.max_output);
  rms_weight = detail::pooled_rms(rms_weight, weights, o.rms_weight, o.weights);
  rms_exact_weight = detail::pooled_rms(rms_exact_weight, weights, o.rms_exact_weight, o.weights);
  rms_output = detail::pooled_rms(rms_output, outputs, o.rms_output, o.outputs);
  rms_exact_output = detail::pooled_rms(rms_exact_output, outputs, o.rms_exact_output, o.outputs);
  rel_rms_weight = detail::relative(rms_weight, rms_exact_weight);
  rel_rms_output = detail::relative(rms_output, rms_exact_output);
  weights += o.weights;
  outputs += o.outputs;
  probe_rows = std::max(probe_rows, o.probe_rows);
}

inline matrix<double> probe_batch(index p, index in, std::uint64_t seed) {
  rng gen(seed);
  matrix<double> x(p, in);
  for (index j = 0; j < in; ++j)
    for (index i = 0; i < p; ++i) x(i, j) = gen.normal();
  return x;
}

inline requant_error measure_requant_error(const Eigen::Ref<const matrix<double>>& exact,
                                           const Eigen::Ref<const matrix<double>>& stored, index p) {
  if (exact.rows() != stored.rows() || exact.cols() != stored.cols())
    throw shape_error(detail::cat("measure_requant_error: the stored weight must be ",
                                  detail::shape_str(exact.rows(), exact.cols()), " like the exact one, got ",
                                  detail::shape_str(stored.rows(), stored.cols())));
  requant_error r;
  r.probe_rows = p;
  if (exact.size() == 0) return r;
  const matrix<double> e = stored - exact;
  const auto n = static_cast<double>(e.size());
  r.weights = e.size();
  r.max_weight = e.cwiseAbs().maxCoeff();
  r.rms_weight = std::sqrt(e.squaredNorm() / n);
  r.rms_exact_weight = std::sqrt(exact.squaredNorm() / n);
  r.rel_rms_weight = detail::relative(r.rms_weight, r.rms_exact_weight);
  if (p > 0) {
    const matrix<double> x = probe_batch(p, exact.cols());
    const matrix<double> out = x * e.transpose(), ref = x * exact.transpose();
    const auto m = static_cast<double>(out.size());
    r.outputs = out.size();
    r.max_output = out.cwiseAbs().maxCoeff();
    r.rms_output = std::sqrt(out.squaredNorm() / m);
    r.rms_exact_output = std::sqrt(ref.squaredNorm() / m);
    r.rel_rms_output = detail::relative(r.rms_output, r.rms_exact_output);
  }
  return r;
}

}  // namespace lora::quant
