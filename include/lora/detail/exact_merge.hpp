// lora/detail/exact_merge.hpp: merging a low-rank delta into a weight so that it can be taken out
// again bit for bit.
//
// Floating-point addition does not invert: fl(fl(W + D) - D) differs from W by a few ulps in general,
// which is the drift PEFT users see after merge/unmerge cycles. We merge W' = fl(W + D) and record,
// per element, how many ulps u = fl(W' - D) lies from the original W, as an int8 (1 byte per weight,
// a quarter of a float copy). Unmerge recomputes D deterministically from copies of the factors
// taken at merge time, forms u, and steps it back by the recorded ulps. Elements whose distance does
// not fit in an int8 (|D| >> |W|, signed zeros, NaN) keep their original value in a sparse list.
//
// D is formed column block by column block with a coefficient-based (lazy) product, whose summation
// order depends only on the shapes, never on thread counts or cache blocking, so merge and unmerge
// see the very same D.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"

namespace lora::detail {

/// Same-size unsigned integer for a floating type.
template <typename Scalar>
using bits_of = std::conditional_t<sizeof(Scalar) == 4, std::uint32_t, std::uint64_t>;

/// Maps a float to an integer that is monotonic in the float's value (ulp steps are unit steps).
/// +0 and -0 both map to 0; NaNs map somewhere meaningless (callers verify round trips).
template <typename Scalar>
std::int64_t ordered_int(Scalar x) {
  static_assert(std::is_floating_point_v<Scalar> && (sizeof(Scalar) == 4 || sizeof(Scalar) == 8),
                "exact merge supports float and double");
  using U = bits_of<Scalar>;
  U u;
  std::memcpy(&u, &x, sizeof u);
  constexpr U sign = U{1} << (sizeof(U) * 8 - 1);
  if constexpr (sizeof(U) == 4) {
    return (u & sign) ? -static_cast<std::int64_t>(u & ~sign) : static_cast<std::int64_t>(u);
  } else {
    // Magnitudes use at most 63 bits, so they fit in int64.
    return (u & sign) ? -static_cast<std::int64_t>(u & ~sign) : static_cast<std::int64_t>(u);
  }
}

/// Inverse of ordered_int (0 maps to +0).
template <typename Scalar>
Scalar from_ordered_int(std::int64_t k) {
  using U = bits_of<Scalar>;
  constexpr U sign = U{1} << (sizeof(U) * 8 - 1);
  const std::uint64_t magnitude = k < 0 ? 0 - static_cast<std::uint64_t>(k) : static_cast<std::uint64_t>(k);
  const U u = static_cast<U>(magnitude) | (k < 0 ? sign : U{0});
  Scalar x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

/// u stepped by `step` ulps; step 0 keeps u's bits exactly (including the sign of a zero).
template <typename Scalar>
Scalar step_ulps(Scalar u, std::int64_t step) {
  if (step == 0) return u;
  return from_ordered_int<Scalar>(
      static_cast<std::int64_t>(static_cast<std::uint64_t>(ordered_int(u)) + static_cast<std::uint64_t>(step)));
}

/// True when a and b have the same bits.
template <typename Scalar>
bool same_bits(Scalar a, Scalar b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

/// What unmerge needs to restore a weight exactly after `W += P Qᵀ`.
template <typename Scalar>
struct merge_record {
  std::vector<std::string> adapters;            // merged together by one merge() call
  matrix<Scalar> p;                             // stored_rows x R, scaling folded in
  matrix<Scalar> q;                             // stored_cols x R
  std::vector<std::int8_t> ulps;                // stored_rows * stored_cols, column-major
  std::vector<std::pair<index, Scalar>> exact;  // (linear index, original value) where ulps cannot say
  // DoRA: W' = g ⊙ (W + P Qᵀ) with one factor g_o per output o (empty for plain LoRA). Outputs are the
  // stored matrix's rows, or its columns when scale_columns (a stored Wᵀ).
  vector<Scalar> scale;
  bool scale_columns = false;

  /// The merged value of one element, and its inverse (exact up to the recorded ulps).
  Scalar forward(Scalar w, Scalar d, index i, index j) const {
    if (scale.size() == 0) return w + d;
    return (w + d) * scale(scale_columns ? j : i);
  }
  Scalar inverse(Scalar w, Scalar d, index i, index j) const {
    if (scale.size() == 0) return w - d;
    return w / scale(scale_columns ? j : i) - d;
  }

  std::size_t bytes() const {
    return sizeof(Scalar) * static_cast<std::size_t>(p.size() + q.size() + scale.size()) + ulps.size() +
           exact.size() * sizeof(std::pair<index, Scalar>);
  }
};

/// Columns of D = P Qᵀ handled at once.
constexpr index merge_block_cols = 64;

/// d = P Q(j0 : j0 + nb, :)ᵀ, in an order fixed by the shapes alone.
template <typename Scalar>
void delta_block(const matrix<Scalar>& p, const matrix<Scalar>& q, index j0, index nb, matrix<Scalar>& d) {
  d.resize(p.rows(), nb);
  d.noalias() = p.lazyProduct(q.middleRows(j0, nb).transpose());
}

/// Calls f(i, j, d_ij) for every element of D = P Qᵀ (rows x cols), block of columns after block, in an
/// order fixed by the shapes alone; stops at the first f that returns false. True if it ran to the end.
template <typename Scalar, typename F>
bool for_each_delta(const merge_record<Scalar>& rec, index rows, index cols, F&& f) {
  matrix<Scalar> d;
  for (index j0 = 0; j0 < cols; j0 += merge_block_cols) {
    const index nb = std::min(merge_block_cols, cols - j0);
    delta_block(rec.p, rec.q, j0, nb, d);
    for (index j = 0; j < nb; ++j)
      for (index i = 0; i < rows; ++i)
        if (!f(i, j0 + j, d(i, j))) return false;
  }
  return true;
}

/// True if every element of the merged weight would be finite. Reads W only.
template <typename Scalar, typename WeightMap>
bool merge_is_finite(const WeightMap& w, const merge_record<Scalar>& rec) {
  return for_each_delta(rec, w.rows(), w.cols(),
                        [&](index i, index j, Scalar d) { return std::isfinite(rec.forward(w(i, j), d, i, j)); });
}

/// W += P Qᵀ (or W = g ⊙ (W + P Qᵀ) for DoRA), filling rec.ulps / rec.exact so that unmerge_exact restores W bit for
/// bit.
template <typename Scalar, typename WeightMap>
void merge_exact(WeightMap& w, merge_record<Scalar>& rec) {
  const index rows = w.rows();
  rec.ulps.assign(static_cast<std::size_t>(rows * w.cols()), 0);
  rec.exact.clear();
  for_each_delta(rec, rows, w.cols(), [&](index i, index j, Scalar d) {
    const Scalar original = w(i, j);
    const Scalar merged = rec.forward(original, d, i, j);
    const Scalar back = rec.inverse(merged, d, i, j);
    // Wrapping subtraction (no UB for NaN payloads); a wrapped step fails the check below.
    const auto step = static_cast<std::int64_t>(static_cast<std::uint64_t>(ordered_int(original)) -
                                                static_cast<std::uint64_t>(ordered_int(back)));
    const index at = j * rows + i;
    if (step >= -127 && step <= 127 && same_bits(step_ulps(back, step), original)) {
      rec.ulps[static_cast<std::size_t>(at)] = static_cast<std::int8_t>(step);
    } else {
      rec.exact.emplace_back(at, original);
    }
    w(i, j) = merged;
    return true;
  });
}

/// Undoes merge_exact: applies the inverse of the merge, then corrects every element to its recorded original bits.
template <typename Scalar, typename WeightMap>
void unmerge_exact(WeightMap& w, const merge_record<Scalar>& rec) {
  const index rows = w.rows();
  for_each_delta(rec, rows, w.cols(), [&](index i, index j, Scalar d) {
    const Scalar back = rec.inverse(w(i, j), d, i, j);
    w(i, j) = step_ulps(back, static_cast<std::int64_t>(rec.ulps[static_cast<std::size_t>(j * rows + i)]));
    return true;
  });
  for (const auto& [at, original] : rec.exact) w(at % rows, at / rows) = original;
}

}  // namespace lora::detail
