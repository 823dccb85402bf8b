// lora/detail/combine_ops.hpp: the tensor operations of adapter arithmetic (lora/combine.hpp), PEFT's
// merge_utils written over Eigen (docs/CONVENTIONS.md §combine).
//
// A "stack" is a list of task tensors τ_1 … τ_n of one shape with weights λ_1 … λ_n:
//   task arithmetic   Σ_t λ_t τ_t
//   magnitude prune   each τ_t keeps its int(density · numel) entries of largest |x|, then Σ_t λ_t τ_t
//   TIES              magnitude prune → elect a sign per entry → disjoint merge
//   DARE linear       random prune (keep with probability density, divide the kept by density) → Σ_t λ_t τ_t
//   DARE TIES         random prune → elect → disjoint merge
// Sign election looks at the pruned, unweighted stack: total = sgn Σ_t τ_t, frequency = sgn Σ_t sgn τ_t,
// a sum of 0 elects +. Disjoint merge = Σ_t m_t λ_t τ_t / max(Σ_t m_t, 1) with m_t = [sgn τ_t = elected]
// (zeros never agree). density ≥ 1 prunes nothing. Entries are visited in row-major order (torch's flat
// order): it fixes which of equal magnitudes survive a prune and which entry each random draw decides.
#pragma once

#include <Eigen/Core>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <string_view>
#include <vector>

#include "../config.hpp"
#include "../random.hpp"

namespace lora::detail {

/// Which merge_utils function a combination applies to its stack.
enum class merge_method { task_arithmetic, magnitude_prune, ties, dare_linear, dare_ties };

/// How to merge one stack: the method, PEFT's density (ignored by task arithmetic) and the sign rule.
struct merge_rule {
  merge_method method = merge_method::task_arithmetic;
  double density = 1.0;
  bool by_frequency = false;  ///< majority_sign_method "frequency" rather than "total"
};

/// Zeroes all but the int(density · numel) entries of largest |x| (ties: the earlier row-major entry).
template <typename Scalar>
void magnitude_prune(matrix<Scalar>& t, double density);
/// Keeps each entry with probability `density` (one draw per entry, row-major), divides the kept by it.
template <typename Scalar>
void random_prune(matrix<Scalar>& t, double density, rng& gen);
/// Σ_t λ_t τ_t.
template <typename Scalar>
matrix<Scalar> weighted_sum(const std::vector<matrix<Scalar>>& stack, const std::vector<double>& weights);
/// Sign election and disjoint merge over an already pruned stack.
template <typename Scalar>
matrix<Scalar> disjoint_merge(const std::vector<matrix<Scalar>>& stack, const std::vector<double>& weights,
                              bool by_frequency);
/// One stack merged by `rule` (pruning works on the given copies); random draws come from `gen`.
template <typename Scalar>
matrix<Scalar> merge_stack(std::vector<matrix<Scalar>> stack, const std::vector<double>& weights,
                           const merge_rule& rule, rng& gen);

/// torch.quantile(values, q) with its default linear interpolation, for q in [0, 1] and values non-empty.
template <typename Scalar>
Scalar quantile(std::vector<Scalar> values, double q);

/// B = U_k diag(S_k) (out x rank) and A = V_kᵀ (rank x in) from the SVD of delta (out x in), k = min(rank,
/// min(out, in)); columns of B and rows of A past k are zero. With clamp = q, both are clamped to [-h, h],
/// h = quantile(entries of U_k diag(S_k) and V_kᵀ, q). `full` picks full or thin singular vectors (the
/// kept ones are the same).
template <typename Scalar>
void truncated_factors(const matrix<Scalar>& delta, index rank, bool full, std::optional<double> clamp,
                       matrix<Scalar>& a, matrix<Scalar>& b);

/// A 64-bit FNV-1a hash: seeds a module's random draws from its path, whatever other modules there are.
inline std::uint64_t fnv1a(std::string_view text) {
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (const char c : text) h = (h ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  return h;
}

// ---------------------------------------------------------------------------------------------------

/// Calls f(i, j) for every entry of an rows x cols matrix in row-major order.
template <typename F>
void for_each_row_major(index rows, index cols, F&& f) {
  for (index i = 0; i < rows; ++i)
    for (index j = 0; j < cols; ++j) f(i, j);
}

template <typename Scalar>
void magnitude_prune(matrix<Scalar>& t, double density) {
  if (density >= 1.0) return;
  const index n = t.size(), cols = t.cols();
  const auto keep = static_cast<index>(density * static_cast<double>(n));  // Python's int(): toward zero
  std::vector<index> order(static_cast<std::size_t>(n));                   // row-major flat positions
  std::iota(order.begin(), order.end(), index{0});
  auto at = [&](index k) { return std::abs(t(k / cols, k % cols)); };
  std::stable_sort(order.begin(), order.end(), [&](index x, index y) { return at(x) > at(y); });
  matrix<Scalar> kept = matrix<Scalar>::Zero(t.rows(), cols);
  for (index k = 0; k < keep; ++k) {
    const index p = order[static_cast<std::size_t>(k)];
    kept(p / cols, p % cols) = t(p / cols, p % cols);
  }
  t = std::move(kept);
}

template <typename Scalar>
void random_prune(matrix<Scalar>& t, double density, rng& gen) {
  if (density >= 1.0) return;
  const auto d = static_cast<Scalar>(density);
  for_each_row_major(t.rows(), t.cols(), [&](index i, index j) {
    const bool kept = gen.uniform() < density;  // torch.bernoulli(density)
    t(i, j) = kept ? t(i, j) / d : Scalar(0);
  });
}

template <typename Scalar>
matrix<Scalar> weighted_sum(const std::vector<matrix<Scalar>>& stack, const std::vector<double>& weights) {
  matrix<Scalar> out = matrix<Scalar>::Zero(stack.front().rows(), stack.front().cols());
  for (std::size_t t = 0; t < stack.size(); ++t) out += static_cast<Scalar>(weights[t]) * stack[t];
  return out;
}

template <typename Scalar>
matrix<Scalar> disjoint_merge(const std::vector<matrix<Scalar>>& stack, const std::vector<double>& weights,
                              bool by_frequency) {
  const index rows = stack.front().rows(), cols = stack.front().cols();
  auto sign = [](Scalar x) { return static_cast<Scalar>((x > 0) - (x < 0)); };
  matrix<Scalar> vote = matrix<Scalar>::Zero(rows, cols);
  for (const auto& t : stack) vote += by_frequency ? matrix<Scalar>(t.unaryExpr(sign)) : t;
  matrix<Scalar> sum = matrix<Scalar>::Zero(rows, cols), count = matrix<Scalar>::Zero(rows, cols);
  for (std::size_t t = 0; t < stack.size(); ++t) {
    const auto lambda = static_cast<Scalar>(weights[t]);
    for (index j = 0; j < cols; ++j) {
      for (index i = 0; i < rows; ++i) {
        const Scalar elected = vote(i, j) >= 0 ? Scalar(1) : Scalar(-1);
        if (sign(stack[t](i, j)) != elected) continue;
        sum(i, j) += lambda * stack[t](i, j);
        count(i, j) += 1;
      }
    }
  }
  return sum.cwiseQuotient(count.cwiseMax(Scalar(1)));
}

template <typename Scalar>
matrix<Scalar> merge_stack(std::vector<matrix<Scalar>> stack, const std::vector<double>& weights,
                           const merge_rule& rule, rng& gen) {
  switch (rule.method) {
    case merge_method::task_arithmetic:
      return weighted_sum(stack, weights);
    case merge_method::magnitude_prune:
    case merge_method::ties:
      for (auto& t : stack) magnitude_prune(t, rule.density);
      break;
    case merge_method::dare_linear:
    case merge_method::dare_ties:
      for (auto& t : stack) random_prune(t, rule.density, gen);
      break;
  }
  const bool elect = rule.method == merge_method::ties || rule.method == merge_method::dare_ties;
  return elect ? disjoint_merge(stack, weights, rule.by_frequency) : weighted_sum(stack, weights);
}

template <typename Scalar>
Scalar quantile(std::vector<Scalar> values, double q) {
  std::sort(values.begin(), values.end());
  const double rank = q * static_cast<double>(values.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(rank)), hi = static_cast<std::size_t>(std::ceil(rank));
  const auto w = static_cast<Scalar>(rank - std::floor(rank));
  const Scalar a = values[lo], b = values[hi];
  return w < Scalar(0.5) ? a + w * (b - a) : b - (b - a) * (Scalar(1) - w);  // torch.lerp
}

template <typename Scalar>
void truncated_factors(const matrix<Scalar>& delta, index rank, bool full, std::optional<double> clamp,
                       matrix<Scalar>& a, matrix<Scalar>& b) {
  const unsigned int vectors = full ? (Eigen::ComputeFullU | Eigen::ComputeFullV)
                                    : static_cast<unsigned int>(Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::BDCSVD<matrix<Scalar>> svd(delta, vectors);
  const index k = std::min(rank, std::min(delta.rows(), delta.cols()));
  matrix<Scalar> u = svd.matrixU().leftCols(k) * svd.singularValues().head(k).asDiagonal();  // out x k
  matrix<Scalar> vt = svd.matrixV().leftCols(k).transpose();                                 // k x in
  if (clamp) {
    std::vector<Scalar> all(u.data(), u.data() + u.size());
    all.insert(all.end(), vt.data(), vt.data() + vt.size());
    const Scalar h = quantile(std::move(all), *clamp);
    u = u.cwiseMax(-h).cwiseMin(h);  // torch.clamp(min = -h, max = h): h wins when -h > h
    vt = vt.cwiseMax(-h).cwiseMin(h);
  }
  b = matrix<Scalar>::Zero(delta.rows(), rank);
  a = matrix<Scalar>::Zero(rank, delta.cols());
  b.leftCols(k) = u;
  a.topRows(k) = vt;
}

}  // namespace lora::detail
