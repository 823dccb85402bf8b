// lora/models/nn.hpp: the transformer operations around the LoRA layers, each a forward/backward pair
// written the llm.c way (docs/CONVENTIONS.md §gpt2). A batch holds one token per row: X is n x d,
// column-major, with n = B T rows, sequence b occupying rows [b T, (b + 1) T).
//
// Backward functions overwrite the input gradient unless their comment says "+=": LayerNorm's adds
// into dx (the residual stream's gradient already there) and every parameter gradient is accumulated.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../config.hpp"
#include "parallel.hpp"

namespace lora::models {

/// LayerNorm's saved statistics: per row mean μ and rstd = 1 / √(var + ε) (biased variance).
template <typename Scalar>
struct layer_norm_stats {
  vector<Scalar> mean;  ///< n
  vector<Scalar> rstd;  ///< n
};

/// y_ij = (x_ij − μ_i) rstd_i γ_j + β_j. x, y: n x d (y resized if needed; must not alias x); γ, β: d.
template <typename Scalar, typename DX, typename DG, typename DB>
void layer_norm_forward(const Eigen::MatrixBase<DX>& x, const Eigen::MatrixBase<DG>& gamma,
                        const Eigen::MatrixBase<DB>& beta, double eps, matrix<Scalar>& y,
                        layer_norm_stats<Scalar>& stats);

/// With x̂ = (x − μ) rstd and g = dy ⊙ γ (row-broadcast):
///   dγ_j += Σ_i dy_ij x̂_ij,  dβ_j += Σ_i dy_ij,
///   dx_i += rstd_i (g_i − mean_j(g_ij) − x̂_i mean_j(g_ij x̂_ij)).
/// dgamma / dbeta may be null (frozen LayerNorm). `scratch` (n x d) is resized as needed.
template <typename Scalar, typename DY, typename DX, typename DG>
void layer_norm_backward(const Eigen::MatrixBase<DY>& dy, const Eigen::MatrixBase<DX>& x,
                         const Eigen::MatrixBase<DG>& gamma, const layer_norm_stats<Scalar>& stats, matrix<Scalar>& dx,
                         Scalar* dgamma, Scalar* dbeta, matrix<Scalar>& scratch);

/// Hugging Face's gelu_new, the tanh approximation: y = ½ x (1 + tanh(√(2/π) (x + 0.044715 x³))).
/// Elementwise over `size` values; y may alias x.
template <typename Scalar>
void gelu_forward(const Scalar* x, Scalar* y, index size);
/// dx = dy ⊙ gelu'(x), gelu'(x) = ½ (1 + t) + ½ x (1 − t²) √(2/π) (1 + 3 · 0.044715 x²), t = tanh(...).
/// dx may alias dy.
template <typename Scalar>
void gelu_backward(const Scalar* x, const Scalar* dy, Scalar* dx, index size);

/// Causal multi-head self-attention over B sequences of T tokens. qkv: n x 3d holding q | k | v (head h
/// uses columns [h hd, (h + 1) hd) of each third, hd = d / H). For each sequence and head
///   S = q kᵀ / √hd (T x T),  P = softmax_row(S with S_ij = −∞ for j > i),  out = P v,
/// out written into columns [h hd, (h + 1) hd) of `out` (n x d, resized). `probs` keeps P per (b, h),
/// row-major T x T each (B H T² values; only the causal part j ≤ i is written), for backward.
template <typename Scalar>
void attention_forward(const matrix<Scalar>& qkv, index batch, index seq, index heads, matrix<Scalar>& out,
                       std::vector<Scalar>& probs);

/// Backward of attention_forward: with dP = dout vᵀ, dS_ij = P_ij (dP_ij − Σ_k P_ik dP_ik),
///   dq = dS k / √hd,  dk = dSᵀ q / √hd,  dv = Pᵀ dout,
/// written into dqkv (n x 3d, resized). `scratch` holds one block of dS (64 x T).
template <typename Scalar>
void attention_backward(const matrix<Scalar>& dout, const matrix<Scalar>& qkv, const std::vector<Scalar>& probs,
                        index batch, index seq, index heads, matrix<Scalar>& dqkv, std::vector<Scalar>& scratch);

/// In-place softmax of a column of `size` logits, returning log Σ exp (the log-partition), computed
/// through the maximum so that no exponent overflows.
template <typename Scalar>
double softmax_in_place(Scalar* z, index size);

// ------------------------------------------------------------------------------------------------

namespace detail {

template <typename Scalar>
using row_major = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Rows per part, at least, when LayerNorm splits over threads.
inline constexpr index rows_per_part = 64;

/// Query rows per block of the causal attention: rows [i0, i0 + 64) only meet keys [0, i0 + 64).
inline constexpr index attention_block = 64;

}  // namespace detail

template <typename Scalar, typename DX, typename DG, typename DB>
void layer_norm_forward(const Eigen::MatrixBase<DX>& x, const Eigen::MatrixBase<DG>& gamma,
                        const Eigen::MatrixBase<DB>& beta, double eps, matrix<Scalar>& y,
                        layer_norm_stats<Scalar>& stats) {
  const index n = x.rows(), d = x.cols();
  y.resize(n, d);
  stats.mean.resize(n);
  stats.rstd.resize(n);
  detail::parallel_for(n, detail::rows_per_part, [&](index r0, index r1, index) {
    const index m = r1 - r0;
    const auto xs = x.middleRows(r0, m);
    auto mean = stats.mean.segment(r0, m);
    auto rstd = stats.rstd.segment(r0, m);
    mean = xs.rowwise().sum() / Scalar(d);
    rstd.setZero();
    for (index j = 0; j < d; ++j) rstd.array() += (xs.col(j) - mean).array().square();
    rstd = (rstd.array() / Scalar(d) + static_cast<Scalar>(eps)).rsqrt().matrix();
    for (index j = 0; j < d; ++j)
      y.col(j).segment(r0, m) = ((xs.col(j) - mean).array() * rstd.array() * gamma(j) + beta(j)).matrix();
  });
}

template <typename Scalar, typename DY, typename DX, typename DG>
void layer_norm_backward(const Eigen::MatrixBase<DY>& dy, const Eigen::MatrixBase<DX>& x,
                         const Eigen::MatrixBase<DG>& gamma, const layer_norm_stats<Scalar>& stats, matrix<Scalar>& dx,
                         Scalar* dgamma, Scalar* dbeta, matrix<Scalar>& scratch) {
  const index n = x.rows(), d = x.cols();
  scratch.resize(n, d);  // x̂
  const index parts = detail::parallel_parts(n, detail::rows_per_part);
  matrix<Scalar> partial = matrix<Scalar>::Zero(2 * d, parts);  // per part: dγ then dβ
  detail::parallel_for(n, detail::rows_per_part, [&](index r0, index r1, index part) {
    const index m = r1 - r0;
    const auto rstd = stats.rstd.segment(r0, m);
    vector<Scalar> m1 = vector<Scalar>::Zero(m), m2 = vector<Scalar>::Zero(m);
    for (index j = 0; j < d; ++j) {
      const auto g = dy.col(j).segment(r0, m);
      auto xhat = scratch.col(j).segment(r0, m);
      xhat = ((x.col(j).segment(r0, m) - stats.mean.segment(r0, m)).array() * rstd.array()).matrix();
      partial(j, part) += g.dot(xhat);
      partial(d + j, part) += g.sum();
      m1.noalias() += gamma(j) * g;
      m2.array() += gamma(j) * g.array() * xhat.array();
    }
    m1 /= Scalar(d);
    m2 /= Scalar(d);
    for (index j = 0; j < d; ++j)
      dx.col(j).segment(r0, m).array() += rstd.array() * (gamma(j) * dy.col(j).segment(r0, m).array() - m1.array() -
                                                          scratch.col(j).segment(r0, m).array() * m2.array());
  });
  const vector<Scalar> total = partial.rowwise().sum();
  if (dgamma != nullptr) Eigen::Map<vector<Scalar>>(dgamma, d) += total.head(d);
  if (dbeta != nullptr) Eigen::Map<vector<Scalar>>(dbeta, d) += total.tail(d);
}

template <typename Scalar>
void gelu_forward(const Scalar* x, Scalar* y, index size) {
  using array = Eigen::Array<Scalar, Eigen::Dynamic, 1>;
  const Scalar c = static_cast<Scalar>(0.7978845608028654), k = static_cast<Scalar>(0.044715);
  constexpr index block = 4096;  // Eigen's vectorised tanh over cache-sized blocks; y may alias x
  detail::parallel_for(size, 16 * block, [&](index begin, index end, index) {
    for (index i0 = begin; i0 < end; i0 += block) {
      const index m = std::min(block, end - i0);
      Eigen::Map<const array> v(x + i0, m);
      Eigen::Map<array>(y + i0, m) = Scalar(0.5) * v * (Scalar(1) + (c * (v + k * v.cube())).tanh());
    }
  });
}

template <typename Scalar>
void gelu_backward(const Scalar* x, const Scalar* dy, Scalar* dx, index size) {
  using array = Eigen::Array<Scalar, Eigen::Dynamic, 1>;
  const Scalar c = static_cast<Scalar>(0.7978845608028654), k = static_cast<Scalar>(0.044715);
  constexpr index block = 4096;
  detail::parallel_for(size, 16 * block, [&](index begin, index end, index) {
    Eigen::Array<Scalar, block, 1> t;
    for (index i0 = begin; i0 < end; i0 += block) {
      const index m = std::min(block, end - i0);
      Eigen::Map<const array> v(x + i0, m), g(dy + i0, m);
      auto th = t.head(m);
      th = (c * (v + k * v.cube())).tanh();
      Eigen::Map<array>(dx + i0, m) =
          g * (Scalar(0.5) * (Scalar(1) + th) +
               Scalar(0.5) * v * (Scalar(1) - th.square()) * c * (Scalar(1) + 3 * k * v.square()));
    }
  });
}

template <typename Scalar>
double softmax_in_place(Scalar* z, index size) {
  Eigen::Map<vector<Scalar>> v(z, size);
  const Scalar m = v.maxCoeff();
  v.array() = (v.array() - m).exp();
  const Scalar total = v.sum();
  v /= total;
  return static_cast<double>(m) + std::log(static_cast<double>(total));
}

template <typename Scalar>
void attention_forward(const matrix<Scalar>& qkv, index batch, index seq, index heads, matrix<Scalar>& out,
                       std::vector<Scalar>& probs) {
  const index d = qkv.cols() / 3, hd = d / heads, T = seq;
  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(hd));
  out.resize(batch * T, d);
  probs.resize(static_cast<std::size_t>(batch * heads * T * T));
  for (index b = 0; b < batch; ++b) {
    for (index h = 0; h < heads; ++h) {
      const auto q = qkv.block(b * T, h * hd, T, hd);
      const auto k = qkv.block(b * T, d + h * hd, T, hd);
      const auto v = qkv.block(b * T, 2 * d + h * hd, T, hd);
      Eigen::Map<detail::row_major<Scalar>> p(probs.data() + (b * heads + h) * T * T, T, T);
      // Rows [i0, i1) see columns [0, i1): only the causal part of S and P is ever formed.
      for (index i0 = 0; i0 < T; i0 += detail::attention_block) {
        const index i1 = std::min(T, i0 + detail::attention_block), rows = i1 - i0;
        auto pb = p.block(i0, 0, rows, i1);
        pb.noalias() = (q.middleRows(i0, rows) * k.topRows(i1).transpose()) * scale;
        for (index i = i0; i < i1; ++i) {
          softmax_in_place(p.row(i).data(), i + 1);
          p.row(i).segment(i + 1, i1 - i - 1).setZero();
        }
        out.block(b * T + i0, h * hd, rows, hd).noalias() = pb * v.topRows(i1);
      }
    }
  }
}

template <typename Scalar>
void attention_backward(const matrix<Scalar>& dout, const matrix<Scalar>& qkv, const std::vector<Scalar>& probs,
                        index batch, index seq, index heads, matrix<Scalar>& dqkv, std::vector<Scalar>& scratch) {
  const index d = qkv.cols() / 3, hd = d / heads, T = seq;
  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(hd));
  dqkv.setZero(batch * T, 3 * d);
  scratch.resize(static_cast<std::size_t>(detail::attention_block * T));
  for (index b = 0; b < batch; ++b) {
    for (index h = 0; h < heads; ++h) {
      const auto q = qkv.block(b * T, h * hd, T, hd);
      const auto k = qkv.block(b * T, d + h * hd, T, hd);
      const auto v = qkv.block(b * T, 2 * d + h * hd, T, hd);
      auto dq = dqkv.block(b * T, h * hd, T, hd);
      auto dk = dqkv.block(b * T, d + h * hd, T, hd);
      auto dv = dqkv.block(b * T, 2 * d + h * hd, T, hd);
      Eigen::Map<const detail::row_major<Scalar>> p(probs.data() + (b * heads + h) * T * T, T, T);
      for (index i0 = 0; i0 < T; i0 += detail::attention_block) {
        const index i1 = std::min(T, i0 + detail::attention_block), rows = i1 - i0;
        const auto dy = dout.block(b * T + i0, h * hd, rows, hd);
        const auto pb = p.block(i0, 0, rows, i1);
        Eigen::Map<detail::row_major<Scalar>> ds(scratch.data(), rows, i1);
        dv.topRows(i1).noalias() += pb.transpose() * dy;
        ds.noalias() = dy * v.topRows(i1).transpose();  // dP
        for (index i = 0; i < rows; ++i) {
          const index seen = i0 + i + 1;
          auto row = ds.row(i).head(seen);
          const Scalar dot = row.dot(p.row(i0 + i).head(seen));
          row = (p.row(i0 + i).head(seen).array() * (row.array() - dot) * scale).matrix();
          ds.row(i).tail(i1 - seen).setZero();
        }
        dq.middleRows(i0, rows).noalias() = ds * k.topRows(i1);
        dk.topRows(i1).noalias() += ds.transpose() * q.middleRows(i0, rows);
      }
    }
  }
}

}  // namespace lora::models
