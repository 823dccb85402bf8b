// lora/models/gpt2_infer.hpp: GPT-2 inference with a KV cache (included by gpt2.hpp).
//
// Feeding m tokens at positions t0 .. t0 + m − 1 computes, for each block, their q, k, v rows through the
// projections' const infer(), appends k and v to the cache (rows t0 .. t0 + m − 1), and attends each new
// query i to cache rows 0 .. t0 + i: the same scores, mask and softmax as the training forward, so the
// logits equal it for the same prefix (up to rounding). Generation feeds the prompt once, then one
// token at a time: each step costs one row through every projection plus O(t d) attention.
//
// The model is not modified: one model can serve many threads, each with its own cache (which also
// holds the scratch buffers and the projections' inference workspace).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "gpt2.hpp"

namespace lora::models {

/// Keys and values of every block for one sequence, plus scratch. Reusable: clear() starts over.
template <typename Scalar>
struct gpt2_kv_cache {
  std::vector<matrix<Scalar>> k, v;  ///< Per block, n_positions x d (row t = position t).
  index length = 0;                  ///< Positions filled.
  inference_workspace<Scalar> ws;
  matrix<Scalar> x, h, qkv, a, y, big, logits;
  layer_norm_stats<Scalar> stats;
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> scores;

  void clear() noexcept { length = 0; }
};

namespace detail {

/// Attention of m new queries (rows of qkv's first third) over cache rows 0 .. t0 + m − 1; query i sees
/// rows up to t0 + i. Writes a (m x d).
template <typename Scalar>
void cached_attention(gpt2_kv_cache<Scalar>& c, index l, index t0, index heads) {
  const index m = c.qkv.rows(), d = c.qkv.cols() / 3, hd = d / heads, t = t0 + m;
  const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(hd));
  c.a.resize(m, d);
  const auto& keys = c.k[static_cast<std::size_t>(l)];
  const auto& values = c.v[static_cast<std::size_t>(l)];
  for (index h = 0; h < heads; ++h) {
    c.scores.resize(m, t);
    c.scores.noalias() = (c.qkv.block(0, h * hd, m, hd) * keys.block(0, h * hd, t, hd).transpose()) * scale;
    for (index i = 0; i < m; ++i) {
      softmax_in_place(c.scores.row(i).data(), t0 + i + 1);
      c.scores.row(i).tail(m - i - 1).setZero();
    }
    c.a.block(0, h * hd, m, hd).noalias() = c.scores * values.block(0, h * hd, t, hd);
  }
}

}  // namespace detail

template <typename Scalar>
gpt2_kv_cache<Scalar> gpt2<Scalar>::make_cache() const {
  cache_type c;
  const auto& cfg = config();
  c.k.assign(static_cast<std::size_t>(cfg.n_layer), matrix_type::Zero(cfg.n_positions, cfg.n_embd));
  c.v.assign(static_cast<std::size_t>(cfg.n_layer), matrix_type::Zero(cfg.n_positions, cfg.n_embd));
  return c;
}

template <typename Scalar>
void gpt2<Scalar>::infer(const token_list& ids, cache_type& c, matrix_type* logits) const {
  const auto& cfg = config();
  const index m = static_cast<index>(ids.size()), t0 = c.length, d = cfg.n_embd;
  const auto fits = [&](const std::vector<matrix_type>& m) {
    return static_cast<index>(m.size()) == cfg.n_layer && std::all_of(m.begin(), m.end(), [&](const matrix_type& x) {
             return x.rows() == cfg.n_positions && x.cols() == d;
           });
  };
  if (!fits(c.k) || !fits(c.v) || t0 < 0 || t0 > cfg.n_positions)
    throw shape_error("gpt2: the KV cache was not made by this model's make_cache() (expected " +
                      std::to_string(cfg.n_layer) + " blocks of " + std::to_string(cfg.n_positions) + " x " +
                      std::to_string(d) + " keys and values)");
  if (m == 0 || t0 + m > cfg.n_positions)
    throw shape_error("gpt2: expected 1 to " + std::to_string(cfg.n_positions - t0) + " tokens at position " +
                      std::to_string(t0) + " (n_positions = " + std::to_string(cfg.n_positions) + "), got " +
                      std::to_string(m));
  check_ids(ids, "token ids");
  c.x.resize(m, d);
  for (index i = 0; i < m; ++i)
    c.x.row(i) = m_weights.wte().row(ids[static_cast<std::size_t>(i)]) + m_weights.wpe().row(t0 + i);
  const auto run = [&](index l, gpt2_module mod, const matrix_type& in, matrix_type& out) {
    const auto& lin = layer(l, mod);
    out.resize(in.rows(), lin.out_features());
    lin.infer(in, out, c.ws);
    detail::add_bias(out, m_weights.flat(tensor_of(l, mod, true)));
  };
  const double eps = cfg.layer_norm_epsilon;
  for (index l = 0; l < cfg.n_layer; ++l) {
    const auto& w = m_weights;
    layer_norm_forward(c.x, w.block_vector(l, block_tensor::ln_1_weight), w.block_vector(l, block_tensor::ln_1_bias),
                       eps, c.h, c.stats);
    run(l, gpt2_module::c_attn, c.h, c.qkv);
    c.k[static_cast<std::size_t>(l)].middleRows(t0, m) = c.qkv.middleCols(d, d);
    c.v[static_cast<std::size_t>(l)].middleRows(t0, m) = c.qkv.middleCols(2 * d, d);
    detail::cached_attention(c, l, t0, cfg.n_head);
    run(l, gpt2_module::attn_c_proj, c.a, c.y);
    c.x += c.y;
    layer_norm_forward(c.x, w.block_vector(l, block_tensor::ln_2_weight), w.block_vector(l, block_tensor::ln_2_bias),
                       eps, c.h, c.stats);
    run(l, gpt2_module::c_fc, c.h, c.big);
    gelu_forward(c.big.data(), c.big.data(), c.big.size());
    run(l, gpt2_module::mlp_c_proj, c.big, c.y);
    c.x += c.y;
  }
  layer_norm_forward(c.x, m_weights.ln_f_weight(), m_weights.ln_f_bias(), eps, c.h, c.stats);
  c.length = t0 + m;
  if (logits != nullptr) {
    logits->resize(cfg.vocab_size, m);
    logits->noalias() = m_weights.wte() * c.h.transpose();
  }
}

template <typename Scalar>
double gpt2<Scalar>::nll(const token_list& ids, cache_type& c) const {
  c.clear();
  if (ids.size() < 2) return 0.0;
  infer(ids, c, nullptr);  // leaves LN_f(x) in c.h
  const index m = static_cast<index>(ids.size()), v = config().vocab_size;
  constexpr index chunk = 128;
  double total = 0.0;
  for (index r0 = 0; r0 + 1 < m; r0 += chunk) {
    const index rows = std::min(chunk, m - 1 - r0);
    c.logits.resize(v, rows);
    c.logits.noalias() = m_weights.wte() * c.h.middleRows(r0, rows).transpose();
    for (index j = 0; j < rows; ++j) {
      auto col = c.logits.col(j);
      const Scalar z = col(ids[static_cast<std::size_t>(r0 + j + 1)]);
      total += softmax_in_place(col.data(), v) - static_cast<double>(z);
    }
  }
  return total;
}

}  // namespace lora::models
