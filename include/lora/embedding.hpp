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
// Init (REFERENCE.md §2): A = 0, B ~ N(0, 1), so the layer starts equal to its base table. PEFT's
// Embedding ignores lora_dropout; so does this layer.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "accounting.hpp"
#include "adapter.hpp"
#include "config.hpp"
#include "detail/layer_checks.hpp"
#include "error.hpp"
#include "linear.hpp"
#include "parameter.hpp"
#include "random.hpp"

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
class embedding {
 public:
  using Scalar = Scalar_;
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
  // The sparse states point into the table layer's adapter list, which a move hands over; a copy would not.
  embedding(embedding&&) = default;
  embedding& operator=(embedding&&) = default;
  embedding(const embedding&) = delete;
  embedding& operator=(const embedding&) = delete;

  // --- shape and table access --------------------------------------------------------------------

  const std::string& name() const noexcept { return m_name; }
  index num_embeddings() const noexcept { return m_table.in_features(); }
  index embedding_dim() const noexcept { return m_table.out_features(); }
  bool is_view() const noexcept { return m_table.is_view(); }
  /// The frozen table (including merged adapters) as a fresh num x dim matrix.
  matrix_type table() const { return m_table.weight().transpose(); }
  /// The table as PEFT sees it: a linear layer with in = num, out = dim, stored in x out.
  const linear<Scalar>& as_linear() const noexcept { return m_table; }

  // --- adapters ----------------------------------------------------------------------------------

  /// Adds an adapter, A (r x num) and B (dim x r) drawn from config.seed: init_method::peft_default and
  /// gaussian give PEFT's A = 0, B ~ N(0, 1); random_ab gives A, B ~ N(0, 1) (tests); zeros gives 0.
  /// config.dropout is accepted and ignored, as in PEFT; use_dora is refused (config_error). The first
  /// adapter becomes active.
  adapter_type& add_adapter(const std::string& name, const adapter_config& config = {});
  void remove_adapter(const std::string& name);
  bool has_adapter(const std::string& name) const { return m_table.has_adapter(name); }
  adapter_type& adapter(const std::string& name) { return m_table.adapter(name); }
  const adapter_type& adapter(const std::string& name) const { return m_table.adapter(name); }
  std::vector<std::string> adapter_names() const { return m_table.adapter_names(); }
  void set_active(const std::vector<std::string>& names);
  const std::vector<std::string>& active_adapters() const noexcept { return m_table.active_adapters(); }
  void disable_adapters();
  void enable_adapters();
  bool adapters_disabled() const noexcept { return m_table.adapters_disabled(); }

  // --- training ----------------------------------------------------------------------------------

  /// Training forward: returns Y (n x dim) and caches ids and every H_a for backward.
  matrix_type forward(const id_list& ids);
  /// Training forward into a caller-sized y (n x dim).
  void forward(const id_list& ids, Eigen::Ref<matrix_type> y);
  /// Accumulates dA (sparse: the columns of the forward's ids) and dB of the adapters that took part in
  /// the last forward. dY is n x dim.
  template <typename Derived>
  void backward(const Eigen::MatrixBase<Derived>& dy);

  /// Trainable parameters of the active, unmerged adapters, named "<layer>.lora_embedding_A.<adapter>"
  /// (r x num, role lora_a) and "<layer>.lora_embedding_B.<adapter>" (dim x r, role lora_b), PEFT's keys.
  parameter_list<Scalar> parameters();
  /// Parameters of one adapter; state_error if it is merged.
  parameter_list<Scalar> parameters(const std::string& adapter_name);
  /// Zeroes dB and the columns of dA listed by touched_ids(), then empties those lists.
  void zero_grad();
  /// The ids whose column of dA backward has written since the last zero_grad(), in first-touch order.
  const id_list& touched_ids(const std::string& adapter_name) const;

  // --- inference ---------------------------------------------------------------------------------

  /// Const inference forward (no cache) into a caller-sized y (n x dim); thread-safe with one workspace
  /// per thread.
  void infer(const id_list& ids, Eigen::Ref<matrix_type> y, inference_workspace<Scalar>& ws) const;
  matrix_type infer(const id_list& ids) const;

  // --- merging -----------------------------------------------------------------------------------

  /// E += Σ s (B A)ᵀ over `names` (default: the active, unmerged adapters); see linear::merge.
  void merge(const std::vector<std::string>& names = {}, bool safe = false);
  void safe_merge(const std::vector<std::string>& names = {}) { merge(names, true); }
  /// Undoes every merge, restoring E bit for bit.
  void unmerge();
  std::vector<std::string> merged_adapters() const { return m_table.merged_adapters(); }
  bool merged() const noexcept { return m_table.merged(); }
  /// Merges the active adapters, removes every adapter and returns the merged table (num x dim).
  matrix_type merge_and_unload(bool safe = false);

  // --- accounting --------------------------------------------------------------------------------

  parameter_report report() const;

 private:
  /// What the sparse path keeps per adapter beside linear's adapter object.
  struct sparse_state {
    adapter_type* adapter = nullptr;  // linear keeps adapters in a list: the pointer stays valid
    matrix_type h;                    // n x r: (A[:, ids])ᵀ from the last training forward
    bool in_cache = false;
    id_list touched;                   // columns of dA written since zero_grad()
    std::vector<std::uint8_t> marked;  // num flags, allocated at the first backward: id is in `touched`
  };

  std::string where() const { return "embedding '" + m_name + "'"; }
  sparse_state& state(const std::string& name);
  const sparse_state& state(const std::string& name) const;
  /// Active and unmerged: has parameters(); runs in forward unless adapters are disabled.
  bool trainable(const adapter_type& a) const;
  bool participates(const adapter_type& a) const { return !m_table.adapters_disabled() && trainable(a); }
  void check_ids(const id_list& ids) const;
  void invalidate_cache();
  /// y = E[ids] + Σ s (A[:, ids])ᵀ Bᵀ; h_of(i, n, r) gives the n x r buffer that H of m_states[i] goes to.
  template <typename HOf>
  void lookup(const id_list& ids, Eigen::Ref<matrix_type> y, HOf&& h_of) const;
  void run_backward(Eigen::Ref<const matrix_type> dy);
  /// Draws the PEFT initialisation of a new adapter from its seed.
  static void init_factors(adapter_type& a);

  std::string m_name;
  linear<Scalar> m_table;  // W = Eᵀ (dim x num): in = num, out = dim, stored in x out
  std::vector<sparse_state> m_states;
  id_list m_ids;  // the last training forward's ids
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
    : m_name(name), m_table(table, std::move(name), weight_layout::in_out) {}

template <typename Scalar>
embedding<Scalar>::embedding(view_t, Eigen::Ref<row_major_matrix, 0, Eigen::OuterStride<>> table, std::string name)
    : m_name(name), m_table(view, table, std::move(name), weight_layout::in_out) {}

template <typename Scalar>
embedding<Scalar>::embedding(view_t, Eigen::Ref<matrix_type, 0, Eigen::OuterStride<>> table, std::string name)
    : m_name(name), m_table(view, table, std::move(name), weight_layout::in_out) {}

// ---------------------------------------------------------------------------------------------------
// adapters

template <typename Scalar>
void embedding<Scalar>::init_factors(adapter_type& a) {
  rng gen(a.config().seed);
  auto normal = [&](matrix_type& m) {
    for (index k = 0; k < m.size(); ++k) m.data()[k] = static_cast<Scalar>(gen.normal());
  };
  switch (a.config().init) {
    case init_method::peft_default:
    case init_method::gaussian:
      a.a().setZero();
      normal(a.b());
      break;
    case init_method::random_ab:
      normal(a.a());
      normal(a.b());
      break;
    case init_method::zeros:
      a.a().setZero();
      a.b().setZero();
      break;
  }
}

template <typename Scalar>
typename embedding<Scalar>::adapter_type& embedding<Scalar>::add_adapter(const std::string& name,
                                                                         const adapter_config& config) {
  if (config.use_dora)
    throw config_error(detail::cat(where(), ": adapter '", name,
                                   "': expected a plain LoRA adapter, got use_dora = true (DoRA is not supported on "
                                   "embeddings)"));
  adapter_type& a = m_table.add_adapter(name, config);
  init_factors(a);
  sparse_state st;
  st.adapter = &a;
  m_states.push_back(std::move(st));
  invalidate_cache();
  return a;
}

template <typename Scalar>
void embedding<Scalar>::remove_adapter(const std::string& name) {
  m_table.remove_adapter(name);
  m_states.erase(std::remove_if(m_states.begin(), m_states.end(),
                                [&](const sparse_state& s) { return s.adapter->name() == name; }),
                 m_states.end());
  invalidate_cache();
}

template <typename Scalar>
void embedding<Scalar>::set_active(const std::vector<std::string>& names) {
  m_table.set_active(names);
  invalidate_cache();
}

template <typename Scalar>
void embedding<Scalar>::disable_adapters() {
  m_table.disable_adapters();
  invalidate_cache();
}

template <typename Scalar>
void embedding<Scalar>::enable_adapters() {
  m_table.enable_adapters();
  invalidate_cache();
}

template <typename Scalar>
typename embedding<Scalar>::sparse_state& embedding<Scalar>::state(const std::string& name) {
  return const_cast<sparse_state&>(static_cast<const embedding&>(*this).state(name));
}

template <typename Scalar>
const typename embedding<Scalar>::sparse_state& embedding<Scalar>::state(const std::string& name) const {
  for (const auto& s : m_states)
    if (s.adapter->name() == name) return s;
  m_table.adapter(name);  // throws name_error listing the adapters
  throw name_error(detail::cat(where(), ": no adapter named '", name, "'"));
}

template <typename Scalar>
bool embedding<Scalar>::trainable(const adapter_type& a) const {
  const auto& active = m_table.active_adapters();
  return !a.merged() && std::find(active.begin(), active.end(), a.name()) != active.end();
}

template <typename Scalar>
void embedding<Scalar>::invalidate_cache() {
  m_has_cache = false;
  for (auto& s : m_states) s.in_cache = false;
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
template <typename HOf>
void embedding<Scalar>::lookup(const id_list& ids, Eigen::Ref<matrix_type> y, HOf&& h_of) const {
  const auto n = static_cast<index>(ids.size());
  // The stored matrix is W = Eᵀ (dim x num, one table row per column) or, for a column-major view, E itself:
  // E(id, j) lies at data[id * id_step + j * j_step].
  const auto w = m_table.stored_weight();
  const bool transposed = m_table.weight_is_transposed();
  detail::gather_rows(w.data(), transposed ? 1 : w.outerStride(), transposed ? w.outerStride() : 1, ids, y);
  for (std::size_t i = 0; i < m_states.size(); ++i) {
    const adapter_type& a = *m_states[i].adapter;
    if (!participates(a)) continue;
    auto&& h = h_of(i, n, a.rank());                                 // n x r
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
  detail::expect_shape(where(), "output Y", static_cast<index>(ids.size()), embedding_dim(), y.rows(), y.cols(),
                       " (n ids x embedding_dim)");
  invalidate_cache();
  m_ids = ids;
  lookup(ids, y, [this](std::size_t i, index n, index r) -> matrix_type& {
    sparse_state& st = m_states[i];
    st.h.resize(n, r);
    st.in_cache = true;
    return st.h;
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
  detail::expect_forward_cache(where(), m_has_cache);
  const auto n = static_cast<index>(m_ids.size());
  detail::expect_shape(where(), "dY", n, embedding_dim(), dy.rows(), dy.cols(), " (the forward's n x embedding_dim)");
  for (auto& st : m_states) {
    if (!st.in_cache) continue;
    adapter_type& a = *st.adapter;
    const Scalar s = a.scaling();
    a.grad_b().noalias() += (s * dy.transpose()) * st.h;  // dim x r
    m_dh.noalias() = (s * dy) * a.b();                    // n x r
    if (st.marked.empty()) st.marked.assign(static_cast<std::size_t>(num_embeddings()), 0);
    for (index k = 0; k < n; ++k) {
      const index id = m_ids[static_cast<std::size_t>(k)];
      a.grad_a().col(id) += m_dh.row(k).transpose();
      if (!st.marked[static_cast<std::size_t>(id)]) {
        st.marked[static_cast<std::size_t>(id)] = 1;
        st.touched.push_back(id);
      }
    }
  }
  invalidate_cache();
}

template <typename Scalar>
parameter_list<Scalar> embedding<Scalar>::parameters() {
  parameter_list<Scalar> out;
  for (auto& st : m_states) {
    if (!trainable(*st.adapter)) continue;
    auto ps = parameters(st.adapter->name());
    out.insert(out.end(), ps.begin(), ps.end());
  }
  return out;
}

template <typename Scalar>
parameter_list<Scalar> embedding<Scalar>::parameters(const std::string& adapter_name) {
  adapter_type& a = m_table.adapter(adapter_name);
  if (a.merged())
    throw state_error(detail::cat(where(), ": adapter '", adapter_name,
                                  "' is merged into the table and cannot be trained; unmerge() first"));
  parameter<Scalar> pa{m_name + ".lora_embedding_A." + adapter_name,
                       param_role::lora_a,
                       a.a().data(),
                       a.grad_a().data(),
                       a.a().rows(),
                       a.a().cols()};
  parameter<Scalar> pb{m_name + ".lora_embedding_B." + adapter_name,
                       param_role::lora_b,
                       a.b().data(),
                       a.grad_b().data(),
                       a.b().rows(),
                       a.b().cols()};
  return {pa, pb};
}

template <typename Scalar>
void embedding<Scalar>::zero_grad() {
  for (auto& st : m_states) {
    st.adapter->grad_b().setZero();
    for (const index id : st.touched) {
      st.adapter->grad_a().col(id).setZero();
      st.marked[static_cast<std::size_t>(id)] = 0;
    }
    st.touched.clear();
  }
}

template <typename Scalar>
const typename embedding<Scalar>::id_list& embedding<Scalar>::touched_ids(const std::string& adapter_name) const {
  return state(adapter_name).touched;
}

// ---------------------------------------------------------------------------------------------------
// inference

template <typename Scalar>
void embedding<Scalar>::infer(const id_list& ids, Eigen::Ref<matrix_type> y, inference_workspace<Scalar>& ws) const {
  check_ids(ids);
  detail::expect_shape(where(), "output Y", static_cast<index>(ids.size()), embedding_dim(), y.rows(), y.cols(),
                       " (n ids x embedding_dim)");
  lookup(ids, y, [&](std::size_t, index n, index r) {
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

// ---------------------------------------------------------------------------------------------------
// merging and accounting

template <typename Scalar>
void embedding<Scalar>::merge(const std::vector<std::string>& names, bool safe) {
  m_table.merge(names, safe);
  invalidate_cache();
}

template <typename Scalar>
void embedding<Scalar>::unmerge() {
  m_table.unmerge();
  invalidate_cache();
}

template <typename Scalar>
typename embedding<Scalar>::matrix_type embedding<Scalar>::merge_and_unload(bool safe) {
  matrix_type w = m_table.merge_and_unload(safe);
  m_states.clear();
  invalidate_cache();
  return w.transpose();
}

template <typename Scalar>
parameter_report embedding<Scalar>::report() const {
  parameter_report r = m_table.report();
  const auto bytes = static_cast<std::int64_t>(sizeof(Scalar));
  if (m_has_cache) r.cache_bytes += static_cast<std::int64_t>(m_ids.size() * sizeof(index));
  for (const auto& st : m_states) {
    if (st.in_cache) r.cache_bytes += st.h.size() * bytes;
    // The touched-id bookkeeping belongs to the gradient: one flag per id and the list.
    r.grad_bytes += static_cast<std::int64_t>(st.marked.size() + st.touched.capacity() * sizeof(index));
  }
  return r;
}

}  // namespace lora
