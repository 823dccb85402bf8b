// lora/init.hpp: initialisations that move the principal part of a frozen weight into an adapter (PiSSA,
// OLoRA), a randomized truncated SVD for large weights, and PEFT's conversion of a trained PiSSA/OLoRA
// adapter back into a plain LoRA adapter against the original weight.
//
// PiSSA (Meng et al. 2024; PEFT's pissa_init), W = U S Vᵀ (out x in), keeping the top r triplets:
//   A = diag(√(S_r / s)) V_rᵀ   (r x in),   B = U_r diag(√(S_r / s))   (out x r),
// so s B A = U_r S_r V_rᵀ, and the frozen weight becomes the residual W_res = W − s B A.
// OLoRA (Büyükakyüz 2024; PEFT's olora_init), W = Q R (Householder QR):
//   B = Q[:, :r]   (out x r),   A = R[:r, :]   (r x in),   W_res = W − s B A   (PEFT scales neither factor).
// Either way W_res + s B A = W (to rounding), so the adapted layer starts equal to the base layer. The sign
// of each (Q column, R row) pair follows Eigen's Householder convention, which may differ from LAPACK's;
// the product B A, hence W_res, does not depend on it.
//
// Conversion (PEFT's subtract_mutated_init): after training, W_res + s B A = W + ΔW with
//   ΔW = s (B A − B0 A0) = s [B | −B0] [A; A0],
// a plain LoRA adapter of rank 2r against the original W, whose config doubles r and lora_alpha (alpha
// times √2 with rsLoRA) so that s is unchanged.
//
// Shapes follow docs/CONVENTIONS.md §orientation (W out x in) whatever the layer's storage: a fan_in_fan_out layer is
// decomposed in its out x in orientation too (PEFT's OLoRA decomposes the stored matrix instead).
#pragma once

#include <Eigen/Core>
#include <Eigen/QR>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "adapter.hpp"
#include "config.hpp"
#include "error.hpp"
#include "linear.hpp"
#include "random.hpp"

namespace lora {

/// A rank-k factorisation W ≈ U diag(s) Vᵀ with orthonormal columns in U (m x k), V (n x k), s descending.
template <typename Scalar>
struct truncated_svd {
  matrix<Scalar> u;
  vector<Scalar> s;
  matrix<Scalar> v;
};

/// The randomized SVD of Halko, Martinsson & Tropp, "Finding structure with randomness" (SIAM Review 53,
/// 2011): a Gaussian test matrix Ω (n x (k + p)), the range of (W Wᵀ)^q W Ω orthonormalised at every step
/// (their Algorithm 4.4), then the SVD of the small (k + p) x n matrix Qᵀ W (Algorithm 5.1). With Q the
/// range found, their Corollary 10.10 bounds the expected spectral error for k, p >= 2:
///   E ‖W − Q Qᵀ W‖ <= [ (1 + √(k / (p − 1))) σ_{k+1}^{2q+1}
///                       + (e √(k + p) / p) (Σ_{j>k} σ_j^{2(2q+1)})^{1/2} ]^{1/(2q+1)},
/// which for q = 0 is their Theorem 10.6, E ‖W − Q Qᵀ W‖ <= (1 + √(k/(p−1))) σ_{k+1} + (e √(k+p)/p)
/// (Σ_{j>k} σ_j²)^{1/2}: within a small factor of the optimum σ_{k+1}, a factor that tends to 1 as q grows.
/// Cost O(m n (k + p) (2q + 1)) instead of the O(m n min(m, n)) of a full SVD.
struct randomized_svd_options {
  index oversampling = 10;     ///< p >= 0; 0 with power_iterations = q reproduces PEFT's "pissa_niter_q".
  index power_iterations = 2;  ///< q >= 0.
  std::uint64_t seed = 0;      ///< Seeds Ω.
};

/// The top `rank` singular triplets of w (m x n) by randomized subspace iteration. config_error unless
/// 1 <= rank <= min(m, n) and p, q >= 0.
template <typename Derived>
truncated_svd<typename Derived::Scalar> randomized_svd(const Eigen::MatrixBase<Derived>& w, index rank,
                                                       const randomized_svd_options& options = {});

/// The top `rank` singular triplets of w by a full (divide-and-conquer) SVD.
template <typename Derived>
truncated_svd<typename Derived::Scalar> exact_svd(const Eigen::MatrixBase<Derived>& w, index rank);

/// An adapter's factors at initialisation, A0 (r x in) and B0 (out x r): what PEFT saves as the "initial
/// model" so that a trained PiSSA/OLoRA adapter can later be converted (convert_to_lora).
template <typename Scalar>
struct initial_factors {
  matrix<Scalar> a;
  matrix<Scalar> b;
};

/// PiSSA: sets A, B of `adapter_name` from the SVD of the layer's weight and writes W − s B A back as the
/// frozen weight (set_weight: a viewed weight changes in the user's memory). Returns A0, B0. name_error
/// for an unknown adapter, state_error while anything is merged, config_error unless rank <= min(out, in).
template <typename Scalar>
initial_factors<Scalar> init_pissa(linear<Scalar>& layer, const std::string& adapter_name);
/// PiSSA with a randomized SVD (PEFT's init_lora_weights = "pissa_niter_q"), for large weights.
template <typename Scalar>
initial_factors<Scalar> init_pissa(linear<Scalar>& layer, const std::string& adapter_name,
                                   const randomized_svd_options& options);
/// OLoRA: A, B from the QR decomposition of the weight, W − s B A written back. Errors as init_pissa.
template <typename Scalar>
initial_factors<Scalar> init_olora(linear<Scalar>& layer, const std::string& adapter_name);

/// A plain LoRA adapter as data: its config and factors A (r x in), B (out x r).
template <typename Scalar>
struct lora_factors {
  adapter_config config;
  matrix<Scalar> a;
  matrix<Scalar> b;
};

/// PEFT's conversion of a trained PiSSA/OLoRA adapter (factors A, B; initial factors A0, B0) into a plain
/// LoRA adapter of rank 2r against the original weight: A' = [A; A0], B' = [B | −B0], r' = 2r,
/// alpha' = 2 alpha (√2 alpha with rsLoRA). shape_error when the initial factors do not match, config_error
/// for a DoRA adapter.
template <typename Scalar>
lora_factors<Scalar> convert_to_lora(const adapter<Scalar>& trained, const initial_factors<Scalar>& initial);

/// Adds an adapter holding `factors` to a layer (typically one over the original weight).
/// shape_error when the factors do not fit the layer; otherwise as linear::add_adapter.
template <typename Scalar>
adapter<Scalar>& add_lora_adapter(linear<Scalar>& layer, const std::string& name, const lora_factors<Scalar>& factors);

// ---------------------------------------------------------------------------------------------------

namespace detail {

/// An orthonormal basis of the range of y (m x l, l <= m): the thin Q of its Householder QR.
template <typename Scalar>
matrix<Scalar> orthonormal_basis(const matrix<Scalar>& y) {
  Eigen::HouseholderQR<matrix<Scalar>> qr(y);
  return qr.householderQ() * matrix<Scalar>::Identity(y.rows(), y.cols());
}

inline void check_rank(index rank, index rows, index cols, const std::string& who) {
  if (rank < 1 || rank > std::min(rows, cols))
    throw config_error(cat(who, ": expected 1 <= rank <= min(out, in) = ", std::min(rows, cols), " for a ",
                           shape_str(rows, cols), " weight, got rank ", rank));
}

/// The adapter that an initialisation will overwrite, after the checks every one of them needs.
template <typename Scalar>
adapter<Scalar>& init_target(linear<Scalar>& layer, const std::string& adapter_name, const char* method) {
  const std::string who = cat("linear '", layer.name(), "': ", method, " for adapter '", adapter_name, "'");
  adapter<Scalar>& a = layer.adapter(adapter_name);
  if (layer.merged())
    throw state_error(who + " rewrites the frozen weight, which holds merged adapters; unmerge() first");
  check_rank(a.rank(), layer.out_features(), layer.in_features(), who);
  return a;
}

/// Once A and B are set from w: W ← w − s B A, and a DoRA adapter's magnitude ← ‖W_res + s B A‖ = ‖w‖ per
/// row (PEFT initialises DoRA after PiSSA/OLoRA the same way). Returns A0, B0.
template <typename Scalar>
initial_factors<Scalar> write_residual(linear<Scalar>& layer, adapter<Scalar>& a, const matrix<Scalar>& w) {
  layer.set_weight(w - a.scaling() * (a.b() * a.a()));
  if (a.is_dora()) a.magnitude() = w.rowwise().norm();
  return {a.a(), a.b()};
}

/// Sets A = diag(√(S/s)) Vᵀ, B = U diag(√(S/s)) and writes the residual (PiSSA, whatever computed the SVD).
template <typename Scalar>
initial_factors<Scalar> apply_pissa(linear<Scalar>& layer, adapter<Scalar>& a, const matrix<Scalar>& w,
                                    const truncated_svd<Scalar>& svd) {
  const vector<Scalar> root = (svd.s / a.scaling()).cwiseSqrt();
  layer.set_factors(a.name(), matrix<Scalar>(root.asDiagonal() * svd.v.transpose()),
                    matrix<Scalar>(svd.u * root.asDiagonal()));
  return write_residual(layer, a, w);
}

}  // namespace detail

template <typename Derived>
truncated_svd<typename Derived::Scalar> exact_svd(const Eigen::MatrixBase<Derived>& w, index rank) {
  using Scalar = typename Derived::Scalar;
  detail::check_rank(rank, w.rows(), w.cols(), "exact_svd");
  Eigen::BDCSVD<matrix<Scalar>> svd(w, Eigen::ComputeThinU | Eigen::ComputeThinV);
  return {svd.matrixU().leftCols(rank), svd.singularValues().head(rank), svd.matrixV().leftCols(rank)};
}

template <typename Derived>
truncated_svd<typename Derived::Scalar> randomized_svd(const Eigen::MatrixBase<Derived>& w_in, index rank,
                                                       const randomized_svd_options& options) {
  using Scalar = typename Derived::Scalar;
  using mat = matrix<Scalar>;
  detail::check_rank(rank, w_in.rows(), w_in.cols(), "randomized_svd");
  if (options.oversampling < 0 || options.power_iterations < 0)
    throw config_error(detail::cat("randomized_svd: expected oversampling >= 0 and power_iterations >= 0, got ",
                                   options.oversampling, " and ", options.power_iterations));
  const Eigen::Ref<const mat> w(w_in);
  const index l = std::min(rank + options.oversampling, std::min(w.rows(), w.cols()));
  rng gen(options.seed);
  mat omega(w.cols(), l);
  for (index k = 0; k < omega.size(); ++k) omega.data()[k] = static_cast<Scalar>(gen.normal());
  // Q spans the range of (W Wᵀ)^q W Ω; re-orthonormalising after each product keeps the small singular
  // directions from drowning in rounding (Algorithm 4.4).
  mat q = detail::orthonormal_basis<Scalar>(w * omega);
  for (index it = 0; it < options.power_iterations; ++it) {
    const mat z = detail::orthonormal_basis<Scalar>(w.transpose() * q);
    q = detail::orthonormal_basis<Scalar>(w * z);
  }
  const mat small = q.transpose() * w;  // l x n: W ≈ Q (Qᵀ W)
  Eigen::BDCSVD<mat> svd(small, Eigen::ComputeThinU | Eigen::ComputeThinV);
  return {q * svd.matrixU().leftCols(rank), svd.singularValues().head(rank), svd.matrixV().leftCols(rank)};
}

template <typename Scalar>
initial_factors<Scalar> init_pissa(linear<Scalar>& layer, const std::string& adapter_name) {
  adapter<Scalar>& a = detail::init_target(layer, adapter_name, "PiSSA");
  const matrix<Scalar> w = layer.weight();
  return detail::apply_pissa(layer, a, w, exact_svd(w, a.rank()));
}

template <typename Scalar>
initial_factors<Scalar> init_pissa(linear<Scalar>& layer, const std::string& adapter_name,
                                   const randomized_svd_options& options) {
  adapter<Scalar>& a = detail::init_target(layer, adapter_name, "PiSSA");
  const matrix<Scalar> w = layer.weight();
  return detail::apply_pissa(layer, a, w, randomized_svd(w, a.rank(), options));
}

template <typename Scalar>
initial_factors<Scalar> init_olora(linear<Scalar>& layer, const std::string& adapter_name) {
  adapter<Scalar>& a = detail::init_target(layer, adapter_name, "OLoRA");
  const matrix<Scalar> w = layer.weight();
  const index r = a.rank();
  Eigen::HouseholderQR<matrix<Scalar>> qr(w);
  const matrix<Scalar> b = qr.householderQ() * matrix<Scalar>::Identity(w.rows(), r);             // Q[:, :r]
  const matrix<Scalar> r_top = qr.matrixQR().topRows(r).template triangularView<Eigen::Upper>();  // R[:r, :]
  layer.set_factors(a.name(), r_top, b);
  return detail::write_residual(layer, a, w);
}

template <typename Scalar>
lora_factors<Scalar> convert_to_lora(const adapter<Scalar>& trained, const initial_factors<Scalar>& initial) {
  const index r = trained.rank(), in = trained.a().cols(), out = trained.b().rows();
  if (trained.is_dora())
    throw config_error(detail::cat("convert_to_lora: adapter '", trained.name(),
                                   "': expected a plain LoRA adapter, got a DoRA adapter (its trained magnitude has no "
                                   "rank-2r LoRA equivalent)"));
  if (initial.a.rows() != r || initial.a.cols() != in || initial.b.rows() != out || initial.b.cols() != r)
    throw shape_error(detail::cat("convert_to_lora: adapter '", trained.name(), "': expected initial factors A0 ",
                                  detail::shape_str(r, in), " and B0 ", detail::shape_str(out, r), ", got ",
                                  detail::shape_str(initial.a.rows(), initial.a.cols()), " and ",
                                  detail::shape_str(initial.b.rows(), initial.b.cols())));
  lora_factors<Scalar> f;
  f.config = trained.config();
  f.config.rank = 2 * r;
  f.config.alpha *= f.config.use_rslora ? std::sqrt(2.0) : 2.0;  // keeps s = alpha / r (or alpha / √r)
  f.config.init = init_method::zeros;
  f.a.resize(2 * r, in);
  f.a << trained.a(), initial.a;
  f.b.resize(out, 2 * r);
  f.b << trained.b(), -initial.b;
  return f;
}

template <typename Scalar>
adapter<Scalar>& add_lora_adapter(linear<Scalar>& layer, const std::string& name, const lora_factors<Scalar>& factors) {
  return layer.add_adapter(name, factors.config, factors.a, factors.b);  // shapes checked before anything is added
}

}  // namespace lora
