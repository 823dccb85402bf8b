// lora/embedding.hpp: a frozen embedding table carrying named LoRA adapters (PEFT's lora.Embedding).
//
//   Y = E[ids] + Σ_{a active, unmerged} s_a · (A_a[:, ids])ᵀ B_aᵀ
//
// Shapes: E is num x dim (num_embeddings x embedding_dim), ids holds n values in [0, num), Y is n x dim,
// A_a is r_a x num (PEFT's lora_embedding_A), B_a is dim x r_a (lora_embedding_B).
//
// In PEFT's orientation a table is a linear layer with in = num and out = dim whose weight is stored in x
// out: E[ids] = onehot(ids) E, and the delta s (B A)ᵀ is added to E like a fan_in_fan_out delta. The layer
// is exactly that: a lora::linear over E with weight_layout::in_out, whose adapters are this layer's
// adapters. Merging (bit-exact unmerge, safe_merge), activation and accounting are linear's; only the
// lookups and their gradients are sparse.
//
// Backward, with H_a = (A_a[:, ids])ᵀ (n x r_a) cached by forward:
//   dB_a += s_a dYᵀ H_a                 (dim x r_a, dense)
//   dH_a  = s_a dY B_a                  (n x r_a)
//   dA_a[:, ids[k]] += dH_a[k, :]ᵀ     (scatter-add into the columns of the ids used, nothing else)
// The table is frozen and ids are not differentiable: there is no dX. The columns of dA that backward
// wrote since the last zero_grad() are listed by touched_ids(); zero_grad() clears only those, so a step
// costs O(n r + n dim r), never O(num r).
//
// Init (docs/CONVENTIONS.md §init): A = 0, B ~ N(0, 1), so the layer starts equal to its base table (the
// adapters are adapter_kind::embedding). PEFT's Embedding ignores lora_dropout; so does this layer. The
// adapter API (add/select/merge/parameters/report) comes from layer_base (layer.hpp).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "accounting.hpp"
#include "adapter.hpp"
#include "adapter_routing.hpp"
#include "config.hpp"
#include "detail/layer_checks.hpp"
#include "error.hpp"
#include "layer.hpp"
#include "linear.hpp"
#include "parameter.hpp"

namespace lora {

namespace detail {

/// y.row(k) = row ids[k] of a table whose element (id, j) lies at table[id id_step + j j_step], for a
/// column-major y (n x dim). Ids are taken in blocks so that each cache line of y is written once, not
/// once per id.
template <typename Scalar>
void gather_rows(const Scalar* table, index id_step, index j_step, const std::vector<index>& ids,
                 Eigen::Ref<matrix<Scalar>> y);

}  // namespace detail

template <typename Scalar_>
class embedding : public layer_base<embedding<Scalar_>, Scalar_> {
 public:
  using Scalar = Scalar_;
  using base_type = layer_base<embedding<Scalar_>, Scalar_>;
  using matrix_type = matrix<Scalar>;
  using adapter_type = lora::adapter<Scalar>;
  using row_major_matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using id_list = std::vector<index>;
  static_assert(std::is_floating_point_v<Scalar>, "lora::embedding needs a floating-point Scalar (float, double)");

  // --- construction ------------------------------------------------------------------------------

  /// Owns a copy of `table` (num x dim, any Eigen expression).
  template <typename Derived>
  explicit embedding(const Eigen::MatrixBase<Derived>& table, std::string name = "embedding");
  /// Views a row-major table (num x dim, PyTorch's layout) in the user's memory; merge writes into it.
  embedding(view_t, Eigen::Ref<row_major_matrix, 0, Eigen::OuterStride<>> table, std::string name = "embedding");
  /// Views a column-major table (num x dim) in the user's memory; merge writes into it.
  embedding(view_t, Eigen::Ref<matrix_type, 0, Eigen::OuterStride<>> table, std::string name = "embedding");

  // --- shape and table access --------------------------------------------------------------------

  const std::string& name() const noexcept { return m_table.name(); }
  index num_embeddings() const noexcept { return m_table.in_features(); }
  index embedding_dim() const noexcept { return m_table.out_features(); }
  bool is_view() const noexcept { return m_table.is_view(); }
  /// The frozen table (including merged adapters) as a fresh num x dim matrix (nn.Embedding.weight).
  matrix_type weight() const { return m_table.weight().transpose(); }
  matrix_type table() const { return weight(); }
  /// The table as PEFT sees it: a linear layer with in = num, out = dim, stored in x out.
  const linear<Scalar>& as_linear() const noexcept { return m_table; }

  // --- training ----------------------------------------------------------------------------------

  /// Training forward: returns Y (n x dim) and caches ids and every H_a for backward.
  matrix_type forward(const id_list& ids);
  /// Training forward into a caller-sized y (n x dim).
  void forward(const id_list& ids, Eigen::Ref<matrix_type> y);
  /// Accumulates dA (sparse: the columns of the forward's ids) and dB of the adapters that took part in
  /// the last forward. dY is n x dim.
  template <typename Derived>
  void backward(const Eigen::MatrixBase<Derived>& dy);
  /// The ids whose column of dA backward has written since the last zero_grad(), in first-touch order.
  const id_list& touched_ids(const std::string& adapter_name) const { return this->adapter(adapter_name).m_touched; }

  // --- inference ---------------------------------------------------------------------------------

  /// Const inference forward (no cache) into a caller-sized y (n x dim); thread-safe with one workspace
  /// per thread.
  void infer(const id_list& ids, Eigen::Ref<matrix_type> y, inference_workspace<Scalar>& ws) const;
  matrix_type infer(const id_list& ids) const;
  /// Const inference of a batch whose ids use different adapters (adapter_routing.hpp, one entry per id):
  /// Y = E[ids] + for each routed adapter, s (A[:, ids[R]])ᵀ Bᵀ on its rows R only.
  void infer(const id_list& ids, const adapter_routing& routing, Eigen::Ref<matrix_type> y,
             inference_workspace<Scalar>& ws) const;
  matrix_type infer(const id_list& ids, const adapter_routing& routing) const;

 private:
  friend base_type;

  // --- what layer_base asks of a layer: one part, the table seen as a linear ---------------------
  linear<Scalar>& part(index) noexcept { return m_table; }
  const linear<Scalar>& part(index) const noexcept { return m_table; }
  std::string where() const { return "embedding '" + name() + "'"; }
  void on_adapters_changed() { m_has_cache = false; }
  void check_adapter_config(const std::string& adapter_name, const adapter_config& config) const;
  void add_cache_bytes(parameter_report& r) const {
    if (m_has_cache) r.cache_bytes += static_cast<std::int64_t>(m_ids.size() * sizeof(index));
  }

  void check_ids(const id_list& ids) const;
  /// y = E[ids] + Σ s (A[:, ids])ᵀ Bᵀ; h_of(a, n, r) gives the n x r buffer that H of adapter a goes to.
  /// Self is embedding or const embedding (training or inference).
  template <typename Self, typename HOf>
  static void lookup(Self& self, const id_list& ids, Eigen::Ref<matrix_type> y, HOf&& h_of);
  void run_backward(Eigen::Ref<const matrix_type> dy);

  linear<Scalar> m_table;  // W = Eᵀ (dim x num): in = num, out = dim, stored in x out; embedding adapters
  id_list m_ids;           // the last training forward's ids
  bool m_has_cache = false;
  matrix_type m_dh;  // n x r workspace
};

// ---------------------------------------------------------------------------------------------------
// gathering rows

template <typename Scalar>
void detail::gather_rows(const Scalar* table, index id_step, index j_step, const std::vector<index>& ids,
                         Eigen::Ref<matrix<Scalar>> y) {
  constexpr index block = 16;  // ids per pass: one 64-byte line of a float column of y
  const auto n = static_cast<index>(ids.size());
  const index dim = y.cols(), ld = y.outerStride();
  const Scalar* rows[block];
  for (index k0 = 0; k0 < n; k0 += block) {
    const index nb = std::min(block, n - k0);
    for (index kk = 0; kk < nb; ++kk) rows[kk] = table + ids[static_cast<std::size_t>(k0 + kk)] * id_step;
    Scalar* out = y.data() + k0;
    for (index j = 0; j < dim; ++j, out += ld)
      for (index kk = 0; kk < nb; ++kk) out[kk] = rows[kk][j * j_step];
  }
}

// ---------------------------------------------------------------------------------------------------
// construction

template <typename Scalar>
template <typename Derived>
embedding<Scalar>::embedding(const Eigen::MatrixBase<Derived>& table, std::string name)
    : m_table(table, std::move(name), weight_layout::in_out) {
  m_table.m_kind = adapter_kind::embedding;
}

template <typename Scalar>
embedding<Scalar>::embedding(view_t, Eigen::Ref<row_major_matrix, 0, Eigen::OuterStride<>> table, std::string name)
    : m_table(view, table, std::move(name), weight_layout::in_out) {
  m_table.m_kind = adapter_kind::embedding;
}

template <typename Scalar>
embedding<Scalar>::embedding(view_t, Eigen::Ref<matrix_type, 0, Eigen::OuterStride<>> table, std::string name)
    : m_table(view, table, std::move(name), weight_layout::in_out) {
  m_table.m_kind = adapter_kind::embedding;
}

template <typename Scalar>
void embedding<Scalar>::check_adapter_config(const std::string& adapter_name, const adapter_config& config) const {
  if (config.use_dora)
    throw config_error(detail::cat(where(), ": adapter '", adapter_name,
                                   "': expected a plain LoRA adapter, got use_dora = true (DoRA is not supported on "
                                   "embeddings)"));
}

// ---------------------------------------------------------------------------------------------------
// forward and backward

template <typename Scalar>
void embedding<Scalar>::check_ids(const id_list& ids) const {
  const index num = num_embeddings();
  for (std::size_t k = 0; k < ids.size(); ++k)
    if (ids[k] < 0 || ids[k] >= num)
      throw shape_error(detail::cat(where(), ": expected ids in [0, ", num, ") (num_embeddings = ", num, "), got id ",
                                    ids[k], " at position ", k));
}

template <typename Scalar>
template <typename Self, typename HOf>
void embedding<Scalar>::lookup(Self& self, const id_list& ids, Eigen::Ref<matrix_type> y, HOf&& h_of) {
  const auto n = static_cast<index>(ids.size());
  // The stored matrix is W = Eᵀ (dim x num, one table row per column) or, for a column-major view, E itself:
  // E(id, j) lies at data[id * id_step + j * j_step].
  const auto w = self.m_table.stored_weight();
  const bool transposed = self.m_table.weight_is_transposed();
  detail::gather_rows(w.data(), transposed ? 1 : w.outerStride(), transposed ? w.outerStride() : 1, ids, y);
  for (auto& a : self.m_table.m_adapters) {
    if (!self.m_table.participates(a)) continue;
    auto&& h = h_of(a, n, a.rank());                                 // n x r
    detail::gather_rows<Scalar>(a.a().data(), a.rank(), 1, ids, h);  // H = (A[:, ids])ᵀ
    y.noalias() += (a.scaling() * h) * a.b().transpose();
  }
}

template <typename Scalar>
typename embedding<Scalar>::matrix_type embedding<Scalar>::forward(const id_list& ids) {
  matrix_type y(static_cast<index>(ids.size()), embedding_dim());
  forward(ids, y);
  return y;
}

template <typename Scalar>
void embedding<Scalar>::forward(const id_list& ids, Eigen::Ref<matrix_type> y) {
  check_ids(ids);
  detail::expect_shape([this] { return where(); }, "output Y", static_cast<index>(ids.size()), embedding_dim(),
                       y.rows(), y.cols(), " (n ids x embedding_dim)");
  m_table.invalidate_cache();
  m_ids = ids;
  lookup(*this, ids, y, [](adapter_type& a, index n, index r) -> matrix_type& {
    a.m_h.resize(n, r);
    a.m_in_cache = true;
    return a.m_h;
  });
  m_has_cache = true;
}

template <typename Scalar>
template <typename Derived>
void embedding<Scalar>::backward(const Eigen::MatrixBase<Derived>& dy) {
  detail::expect_same_scalar<Scalar, typename Derived::Scalar>();
  run_backward(dy);
}

template <typename Scalar>
void embedding<Scalar>::run_backward(Eigen::Ref<const matrix_type> dy) {
  detail::expect_forward_cache([this] { return where(); }, m_has_cache);
  const auto n = static_cast<index>(m_ids.size());
  detail::expect_shape([this] { return where(); }, "dY", n, embedding_dim(), dy.rows(), dy.cols(),
                       " (the forward's n x embedding_dim)");
  for (adapter_type& a : m_table.m_adapters) {
    if (!a.m_in_cache) continue;
    const Scalar s = a.scaling();
    a.m_grad_b.noalias() += (s * dy.transpose()) * a.m_h;  // dim x r
    m_dh.noalias() = (s * dy) * a.m_b;                     // n x r
    for (index k = 0; k < n; ++k) {                        // dA[:, ids[k]] += dH[k, :]ᵀ
      const index id = m_ids[static_cast<std::size_t>(k)];
      a.m_grad_a.col(id) += m_dh.row(k).transpose();
      a.touch(id);
    }
  }
  m_table.invalidate_cache();
  m_has_cache = false;
}

// ---------------------------------------------------------------------------------------------------
// inference

template <typename Scalar>
void embedding<Scalar>::infer(const id_list& ids, Eigen::Ref<matrix_type> y, inference_workspace<Scalar>& ws) const {
  check_ids(ids);
  detail::expect_shape([this] { return where(); }, "output Y", static_cast<index>(ids.size()), embedding_dim(),
                       y.rows(), y.cols(), " (n ids x embedding_dim)");
  lookup(*this, ids, y, [&](const adapter_type&, index n, index r) {
    if (ws.buffer.size() < static_cast<std::size_t>(n * r)) ws.buffer.resize(static_cast<std::size_t>(n * r));
    return Eigen::Map<matrix_type>(ws.buffer.data(), n, r);
  });
}

template <typename Scalar>
typename embedding<Scalar>::matrix_type embedding<Scalar>::infer(const id_list& ids) const {
  matrix_type y(static_cast<index>(ids.size()), embedding_dim());
  inference_workspace<Scalar> ws;
  infer(ids, y, ws);
  return y;
}

template <typename Scalar>
void embedding<Scalar>::infer(const id_list& ids, const adapter_routing& routing, Eigen::Ref<matrix_type> y,
                              inference_workspace<Scalar>& ws) const {
  check_ids(ids);
  detail::expect_shape([this] { return where(); }, "output Y", static_cast<index>(ids.size()), embedding_dim(),
                       y.rows(), y.cols(), " (n ids x embedding_dim)");
  this->check_routing(routing, static_cast<index>(ids.size()));
  const auto w = m_table.stored_weight();
  const bool transposed = m_table.weight_is_transposed();
  detail::gather_rows(w.data(), transposed ? 1 : w.outerStride(), transposed ? w.outerStride() : 1, ids, y);
  if (m_table.core_disabled()) return;
  m_table.add_routed_terms(routing, y, ws, [&](const matrix_type& a, const adapter_routing::group& g, auto& h) {
    for (std::size_t k = 0; k < g.rows.size(); ++k)  // H = (A[:, ids[R]])ᵀ
      h.row(static_cast<index>(k)) = a.col(ids[static_cast<std::size_t>(g.rows[k])]).transpose();
  });
}

template <typename Scalar>
typename embedding<Scalar>::matrix_type embedding<Scalar>::infer(const id_list& ids,
                                                                 const adapter_routing& routing) const {
  matrix_type y(static_cast<index>(ids.size()), embedding_dim());
  inference_workspace<Scalar> ws;
  infer(ids, routing, y, ws);
  return y;
}

}  // namespace lora
