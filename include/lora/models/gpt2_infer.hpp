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

/// Scratch of infer_batch (the rows of every sequence of a batch together); one per thread, reused.
template <typename Scalar>
struct gpt2_batch_workspace {
  inference_workspace<Scalar> ws;
  matrix<Scalar> x, h, qkv, a, y, big;
  layer_norm_stats<Scalar> stats;
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
void gpt2<Scalar>::check_feed(const token_list& ids, const cache_type& c) const {
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
}

template <typename Scalar>
template <typename Scratch, typename Run, typename Attend>
void gpt2<Scalar>::run_blocks(Scratch& s, Run&& run, Attend&& attend) const {
  const auto& cfg = config();
  const double eps = cfg.layer_norm_epsilon;
  const auto& w = m_weights;
  for (index l = 0; l < cfg.n_layer; ++l) {
    layer_norm_forward(s.x, w.block_vector(l, block_tensor::ln_1_weight), w.block_vector(l, block_tensor::ln_1_bias),
                       eps, s.h, s.stats);
    run(l, gpt2_module::c_attn, s.h, s.qkv);
    attend(l);  // s.qkv -> s.a, keys and values into the cache(s)
    run(l, gpt2_module::attn_c_proj, s.a, s.y);
    s.x += s.y;
    layer_norm_forward(s.x, w.block_vector(l, block_tensor::ln_2_weight), w.block_vector(l, block_tensor::ln_2_bias),
                       eps, s.h, s.stats);
    run(l, gpt2_module::c_fc, s.h, s.big);
    gelu_forward(s.big.data(), s.big.data(), s.big.size());
    run(l, gpt2_module::mlp_c_proj, s.big, s.y);
    s.x += s.y;
  }
  layer_norm_forward(s.x, w.ln_f_weight(), w.ln_f_bias(), eps, s.h, s.stats);
}

template <typename Scalar>
void gpt2<Scalar>::infer(const token_list& ids, cache_type& c, matrix_type* logits) const {
  check_feed(ids, c);
  const auto& cfg = config();
  const index m = static_cast<index>(ids.size()), t0 = c.length, d = cfg.n_embd;
  c.x.resize(m, d);
  for (index i = 0; i < m; ++i)
    c.x.row(i) = m_weights.wte().row(ids[static_cast<std::size_t>(i)]) + m_weights.wpe().row(t0 + i);
  const auto run = [&](index l, gpt2_module mod, const matrix_type& in, matrix_type& out) {
    const auto& lin = layer(l, mod);
    out.resize(in.rows(), lin.out_features());
    lin.infer(in, out, c.ws);
    detail::add_bias(out, m_weights.flat(tensor_of(l, mod, true)));
  };
  run_blocks(c, run, [&](index l) {
    c.k[static_cast<std::size_t>(l)].middleRows(t0, m) = c.qkv.middleCols(d, d);
    c.v[static_cast<std::size_t>(l)].middleRows(t0, m) = c.qkv.middleCols(2 * d, d);
    detail::cached_attention(c, l, t0, cfg.n_head);
  });
  c.length = t0 + m;
  if (logits != nullptr) {
    logits->resize(cfg.vocab_size, m);
    logits->noalias() = m_weights.wte() * c.h.transpose();
  }
}

template <typename Scalar>
void gpt2<Scalar>::infer_batch(const std::vector<token_list>& seqs, const std::vector<cache_type*>& caches,
                               const adapter_routing& routing, gpt2_batch_workspace<Scalar>& s,
                               std::vector<matrix_type>* logits) const {
  const auto& cfg = config();
  const index d = cfg.n_embd, n_seq = static_cast<index>(seqs.size());
  if (caches.size() != seqs.size())
    throw shape_error("gpt2::infer_batch: expected one cache per sequence (" + std::to_string(n_seq) + "), got " +
                      std::to_string(caches.size()));
  std::vector<index> offset(seqs.size() + 1, 0), t0(seqs.size());  // sequence k: rows offset[k] .. offset[k+1]
  for (std::size_t k = 0; k < seqs.size(); ++k) {
    if (caches[k] == nullptr) throw shape_error("gpt2::infer_batch: cache " + std::to_string(k) + " is null");
    check_feed(seqs[k], *caches[k]);
    offset[k + 1] = offset[k] + static_cast<index>(seqs[k].size());
    t0[k] = caches[k]->length;
  }
  if (routing.rows() != offset.back())
    throw shape_error("gpt2::infer_batch: the routing covers " + std::to_string(routing.rows()) +
                      " rows, the sequences feed " + std::to_string(offset.back()) + " tokens");
  s.x.resize(offset.back(), d);
  for (std::size_t k = 0; k < seqs.size(); ++k)
    for (std::size_t i = 0; i < seqs[k].size(); ++i)
      s.x.row(offset[k] + static_cast<index>(i)) =
          m_weights.wte().row(seqs[k][i]) + m_weights.wpe().row(t0[k] + static_cast<index>(i));
  const auto run = [&](index l, gpt2_module mod, const matrix_type& in, matrix_type& out) {
    const auto& lin = layer(l, mod);
    out.resize(in.rows(), lin.out_features());
    lin.infer(in, routing, out, s.ws);
    detail::add_bias(out, m_weights.flat(tensor_of(l, mod, true)));
  };
  s.a.resize(offset.back(), d);
  run_blocks(s, run, [&](index l) {
    for (std::size_t k = 0; k < seqs.size(); ++k) {
      cache_type& c = *caches[k];
      const index m = offset[k + 1] - offset[k];
      c.qkv = s.qkv.middleRows(offset[k], m);
      c.k[static_cast<std::size_t>(l)].middleRows(t0[k], m) = c.qkv.middleCols(d, d);
      c.v[static_cast<std::size_t>(l)].middleRows(t0[k], m) = c.qkv.middleCols(2 * d, d);
      detail::cached_attention(c, l, t0[k], cfg.n_head);
      s.a.middleRows(offset[k], m) = c.a;
    }
  });
  if (logits != nullptr) logits->resize(seqs.size());
  for (std::size_t k = 0; k < seqs.size(); ++k) {
    const index m = offset[k + 1] - offset[k];
    caches[k]->length = t0[k] + m;
    if (logits == nullptr) continue;
    (*logits)[k].resize(cfg.vocab_size, m);
    (*logits)[k].noalias() = m_weights.wte() * s.h.middleRows(offset[k], m).transpose();
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
