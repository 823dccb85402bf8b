// lora/dora.hpp: DoRA (weight-decomposed low-rank adaptation) as PEFT implements it, for lora::linear.
//
// A DoRA adapter a keeps a trainable magnitude m_a (one value per output row) besides A_a and B_a. With
// n_a = ‖W + s_a B_a A_a‖ per output row (treated as a constant in backward, the DoRA paper's §4.3 and
// PEFT's detach) and the gain g_a = m_a / n_a (docs/CONVENTIONS.md §dora):
//   Y  = (X Wᵀ) ⊙ c + b + Σ_{DoRA a} s_a H_a (diag(g_a) B_a)ᵀ + Σ_{plain a} s_a H_a B_aᵀ,
//        c = 1 + Σ_{DoRA a} (g_a − 1)                                     (length out, per column of Y)
//   dm_a  = (Σ_i dY ⊙ X Wᵀ + s_a rowsum(B_a ⊙ dYᵀ H_a)) / n_a
//   dB_a += s_a diag(g_a) dYᵀ H_a,   dH_a = s_a dY diag(g_a) B_a,   dX = (dY ⊙ c) W + Σ_a dH_a A_a.
// n_a is computed without forming B A: ‖W_o‖² + 2 s B_o·(W Aᵀ)_o + s² B_o (A Aᵀ) B_oᵀ. The forward caches
// X Wᵀ (n x out) besides H when a DoRA adapter takes part. Merging a DoRA adapter writes g ⊙ (W + s B A)
// and unmerges exactly through a scaled merge record (detail/exact_merge.hpp).
#pragma once

#include <Eigen/Core>

#include "adapter.hpp"
#include "config.hpp"

namespace lora::detail {

/// ‖W + s B A‖ per output row (length out), without forming B A. `w` is the stored weight: W (out x in),
/// or Wᵀ (in x out) when `transposed`.
template <typename Scalar, typename Stored>
vector<Scalar> dora_norm(const Stored& w, bool transposed, const matrix<Scalar>& a, const matrix<Scalar>& b, Scalar s);

/// What a training forward with DoRA adapters keeps for backward, and the steps that differ from plain
/// LoRA. One per layer; its buffers are reused across steps.
template <typename Scalar>
struct dora_pass {
  using matrix_type = matrix<Scalar>;
  using vector_type = vector<Scalar>;

  bool active = false;      // the cached forward ran the DoRA path
  matrix_type base;         // X Wᵀ (n x out)
  vector_type scale;        // c = 1 + Σ (g_a − 1), length out
  matrix_type dyc;          // dY ⊙ c
  matrix_type g_b, dyt_h;   // diag(g) B and dYᵀ H (out x r)
  vector_type dy_dot_base;  // Σ_i dY ⊙ X Wᵀ, length out

  /// y = base ⊙ c (+ bias later), once base = X Wᵀ is set and every DoRA adapter's norm is known.
  template <typename Y>
  void scale_base(Y& y) const {
    y.noalias() = base * scale.asDiagonal();
  }
  /// y += s H (diag(g) B)ᵀ for one DoRA adapter, g = m / norm (norm: n_a from this forward).
  template <typename H, typename Y>
  void add_output(const adapter<Scalar>& a, const vector_type& norm, const H& h, Y& y) {
    g_b.noalias() = a.magnitude().cwiseQuotient(norm).asDiagonal() * a.b();
    y.noalias() += (a.scaling() * h) * g_b.transpose();
  }
  /// Backward of one DoRA adapter: accumulates dB and dm, writes dH (n x r).
  template <typename DY, typename DH>
  void adapter_backward(const adapter<Scalar>& a, const vector_type& norm, const matrix_type& h, const DY& dy, DH& dh,
                        matrix_type& grad_b, vector_type& grad_m) {
    const Scalar s = a.scaling();
    const auto g = a.magnitude().cwiseQuotient(norm);  // an expression: no allocation
    dyt_h.noalias() = dy.transpose() * h;              // out x r
    grad_b.noalias() += s * (g.asDiagonal() * dyt_h);  // out x r
    grad_m += (dy_dot_base + s * a.b().cwiseProduct(dyt_h).rowwise().sum()).cwiseQuotient(norm);
    g_b.noalias() = g.asDiagonal() * a.b();
    dh.noalias() = (s * dy) * g_b;  // n x r
  }
};

// ---------------------------------------------------------------------------------------------------

template <typename Scalar, typename Stored>
vector<Scalar> dora_norm(const Stored& w, bool transposed, const matrix<Scalar>& a, const matrix<Scalar>& b, Scalar s) {
  matrix<Scalar> w_at;  // W Aᵀ: out x r
  vector<Scalar> w_sq;  // ‖W_o‖²
  if (transposed) {
    w_at.noalias() = w.transpose() * a.transpose();
    w_sq = w.colwise().squaredNorm().transpose();
  } else {
    w_at.noalias() = w * a.transpose();
    w_sq = w.rowwise().squaredNorm();
  }
  const matrix<Scalar> a_at = a * a.transpose();  // r x r
  const matrix<Scalar> b_aat = b * a_at;          // out x r
  const vector<Scalar> sq =
      w_sq + (2 * s) * b.cwiseProduct(w_at).rowwise().sum() + (s * s) * b_aat.cwiseProduct(b).rowwise().sum();
  return sq.cwiseMax(Scalar(0)).cwiseSqrt();
}

}  // namespace lora::detail
