// lora/linear.hpp: a frozen linear layer carrying any number of named LoRA adapters.
//
//   Y = X Wᵀ + b + Σ_{a active, unmerged} s_a · (drop_a(X) A_aᵀ) B_aᵀ
//
// Shapes (REFERENCE.md §1): W is out x in, b is out, X is n x in (one sample per row), Y is n x out,
// A_a is r_a x in, B_a is out x r_a. B A is never formed except to merge.
//
// Backward, with H_a = drop_a(X) A_aᵀ (n x r_a, the only activation cached besides a view of X):
//   dB_a += s_a dYᵀ H_a                    (out x r_a)
//   dH_a  = s_a dY B_a                     (n x r_a)
//   dA_a += dH_aᵀ drop_a(X)                (r_a x in)
//   dX    = dY W + Σ_a mask_a ⊙ (dH_a A_a)  (n x in)
// W is frozen: dW is never computed.
//
// DoRA (use_dora), as PEFT implements it, with the norm treated as a constant in backward (DoRA paper
// §4.3): with n_a = ‖W + s_a B_a A_a‖ per output row and g_a = m_a / n_a,
//   Y = (X Wᵀ) ⊙ c + b + Σ_{DoRA a} g_a ⊙ s_a H_a B_aᵀ + Σ_{plain a} s_a H_a B_aᵀ,   c = 1 + Σ_{DoRA a} (g_a - 1)
//   dm_a = (Σ_i dY ⊙ X Wᵀ + s_a rowsum(B_a ⊙ dYᵀ H_a)) / n_a,  dB_a += s_a diag(g_a) dYᵀ H_a,
//   dH_a = s_a dY diag(g_a) B_a,  dX = (dY ⊙ c) W + Σ_a dH_a A_a.
// n_a is computed without forming B A: ‖W_o‖² + 2 s B_o·(W Aᵀ)_o + s² B_o (A Aᵀ) B_oᵀ. The forward caches
// X Wᵀ (n x out) besides H when a DoRA adapter takes part.
//
// The weight is owned (a copy) or viewed (the user's memory, row- or column-major, or stored in x out as
// GPT-2's Conv1D does, `fan_in_fan_out`). Either way it is read through one column-major map that holds
// W (out x in) or Wᵀ (in x out); a row-major W is the same memory as a column-major Wᵀ, so nothing is
// transposed or copied.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <list>
#include <string>
#include <utility>
#include <vector>

#include "accounting.hpp"
#include "adapter.hpp"
#include "config.hpp"
#include "detail/exact_merge.hpp"
#include "detail/input_cache.hpp"
#include "error.hpp"
#include "parameter.hpp"

namespace lora {

/// How a weight's elements are arranged relative to (out, in).
enum class weight_layout {
  out_in,  ///< W is out x in (PyTorch nn.Linear).
  in_out,  ///< W is stored transposed, in x out (GPT-2 Conv1D, PEFT's fan_in_fan_out = true).
};

/// Tag selecting the non-owning constructors.
struct view_t {
  explicit view_t() = default;
};
inline constexpr view_t view{};

/// Scratch memory for linear::infer; one per thread. Grows to the largest batch seen, then never
/// allocates again.
template <typename Scalar>
struct inference_workspace {
  std::vector<Scalar> buffer;
};

template <typename Scalar_>
class linear {
 public:
  using Scalar = Scalar_;
  using matrix_type = matrix<Scalar>;
  using vector_type = vector<Scalar>;
  using adapter_type = lora::adapter<Scalar>;
  using row_major_matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using stored_map = Eigen::Map<matrix_type, Eigen::Unaligned, Eigen::OuterStride<>>;
  using const_stored_map = Eigen::Map<const matrix_type, Eigen::Unaligned, Eigen::OuterStride<>>;
  static_assert(std::is_floating_point_v<Scalar>, "lora::linear needs a floating-point Scalar (float, double)");

  // --- construction ------------------------------------------------------------------------------

  /// Owns a copy of `weight` (any Eigen expression). With weight_layout::in_out, `weight` is in x out.
  template <typename Derived>
  explicit linear(const Eigen::MatrixBase<Derived>& weight, std::string name = "linear",
                  weight_layout layout = weight_layout::out_in);
  /// Owns copies of `weight` and `bias` (length out).
  template <typename Derived, typename BiasDerived>
  linear(const Eigen::MatrixBase<Derived>& weight, const Eigen::MatrixBase<BiasDerived>& bias,
         std::string name = "linear", weight_layout layout = weight_layout::out_in);
  /// Views a column-major weight in the user's memory (merge writes into it).
  linear(view_t, Eigen::Ref<matrix_type, 0, Eigen::OuterStride<>> weight, std::string name = "linear",
         weight_layout layout = weight_layout::out_in);
  /// Views a row-major weight in the user's memory (merge writes into it).
  linear(view_t, Eigen::Ref<row_major_matrix, 0, Eigen::OuterStride<>> weight, std::string name = "linear",
         weight_layout layout = weight_layout::out_in);

  /// Sets (copies) the frozen bias, length out.
  template <typename BiasDerived>
  void set_bias(const Eigen::MatrixBase<BiasDerived>& bias);
  void remove_bias() { m_bias.resize(0); }

  // --- shape and weight access -------------------------------------------------------------------

  const std::string& name() const noexcept { return m_name; }
  index in_features() const noexcept { return m_in; }
  index out_features() const noexcept { return m_out; }
  bool has_bias() const noexcept { return m_bias.size() > 0; }
  const vector_type& bias() const noexcept { return m_bias; }
  /// True when the layer views user memory rather than owning a copy.
  bool is_view() const noexcept { return m_view_data != nullptr; }
  /// The frozen weight (including merged adapters) as a fresh out x in matrix.
  matrix_type weight() const;
  /// The storage the layer reads: W (out x in) or, when weight_is_transposed(), Wᵀ (in x out).
  const_stored_map stored_weight() const {
    return const_stored_map(data(), m_rows, m_cols, Eigen::OuterStride<>(m_stride));
  }
  bool weight_is_transposed() const noexcept { return m_transposed; }
  /// Overwrites the frozen weight (out x in) in place, in the layer's storage (a view's memory too);
  /// used by initialisations that move part of W into the adapter (PiSSA, OLoRA). state_error while any
  /// adapter is merged, shape_error on a shape mismatch.
  template <typename Derived>
  void set_weight(const Eigen::MatrixBase<Derived>& w);

  // --- adapters ----------------------------------------------------------------------------------

  /// Adds an adapter. The first adapter of a layer becomes active; later ones wait for set_active()
  /// (PEFT's add_adapter behaves the same). Throws name_error on an empty or duplicate name,
  /// config_error on an invalid config.
  adapter_type& add_adapter(const std::string& name, const adapter_config& config = {});
  /// Removes an adapter; state_error if it is merged (unmerge first).
  void remove_adapter(const std::string& name);
  bool has_adapter(const std::string& name) const { return find(name) != nullptr; }
  adapter_type& adapter(const std::string& name);
  const adapter_type& adapter(const std::string& name) const;
  std::vector<std::string> adapter_names() const;

  /// Makes exactly these adapters active (their outputs add up). Merged adapters are always in effect
  /// and must stay in the active set.
  void set_active(const std::vector<std::string>& names);
  const std::vector<std::string>& active_adapters() const noexcept { return m_active; }
  /// Runs the base layer alone until enable_adapters(); state_error while any adapter is merged.
  void disable_adapters();
  void enable_adapters() {
    m_disabled = false;
    invalidate_cache();
  }
  bool adapters_disabled() const noexcept { return m_disabled; }

  // --- training ----------------------------------------------------------------------------------

  /// Training mode draws adapter dropout masks; eval mode does not. Layers start in training mode.
  void train(bool on = true) { m_training = on; }
  void eval() { m_training = false; }
  bool training() const noexcept { return m_training; }

  /// Training forward: returns Y (n x out) and caches a view of X (X must outlive backward) and H.
  template <typename Derived>
  matrix_type forward(const Eigen::MatrixBase<Derived>& x);
  /// Training forward taking ownership of X (safe for temporaries).
  matrix_type forward(matrix_type&& x);
  /// Training forward into a caller-sized y (n x out), no allocation once workspaces are warm.
  template <typename Derived>
  void forward(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y);

  /// Backward: accumulates dA, dB of the adapters that took part in the last forward and returns dX.
  template <typename Derived>
  matrix_type backward(const Eigen::MatrixBase<Derived>& dy);
  /// Backward into a caller-sized dx (n x in).
  template <typename Derived>
  void backward(const Eigen::MatrixBase<Derived>& dy, Eigen::Ref<matrix_type> dx);
  /// Backward for the adapters' gradients only, skipping the n x out x in GEMM for dX (first layers).
  template <typename Derived>
  void backward_params_only(const Eigen::MatrixBase<Derived>& dy);

  /// Trainable parameters of the active, unmerged adapters, named "<layer>.lora_A.<adapter>.weight".
  parameter_list<Scalar> parameters();
  /// Parameters of one adapter; state_error if it is merged.
  parameter_list<Scalar> parameters(const std::string& adapter_name);
  /// Zeroes every adapter's gradients.
  void zero_grad();

  // --- inference ---------------------------------------------------------------------------------

  /// Const inference forward (no dropout, no cache) into a caller-sized y (n x out). Safe to call from
  /// many threads at once with one workspace each; allocates nothing once the workspace is warm.
  template <typename Derived>
  void infer(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y, inference_workspace<Scalar>& ws) const;
  /// Convenience form that allocates its output and workspace.
  template <typename Derived>
  matrix_type infer(const Eigen::MatrixBase<Derived>& x) const;

  // --- merging -----------------------------------------------------------------------------------

  /// W += Σ s B A over `names` (default: the active, unmerged adapters). With safe = true, a merge whose
  /// result would hold a non-finite value throws numeric_error and leaves W untouched (PEFT's safe_merge).
  void merge(const std::vector<std::string>& names = {}, bool safe = false);
  void safe_merge(const std::vector<std::string>& names = {}) { merge(names, true); }
  /// Undoes every merge, restoring W bit for bit.
  void unmerge();
  std::vector<std::string> merged_adapters() const;
  bool merged() const noexcept { return !m_records.empty(); }
  /// Merges the active adapters, removes every adapter, and returns the merged weight (out x in).
  /// The layer keeps the merged weight (a view's memory holds it too).
  matrix_type merge_and_unload(bool safe = false);

  // --- accounting --------------------------------------------------------------------------------

  parameter_report report() const;

 private:
  Scalar* data() noexcept { return m_view_data ? m_view_data : m_owned.data(); }
  const Scalar* data() const noexcept { return m_view_data ? m_view_data : m_owned.data(); }
  stored_map stored() { return stored_map(data(), m_rows, m_cols, Eigen::OuterStride<>(m_stride)); }
  std::string where() const { return "linear '" + m_name + "'"; }

  adapter_type* find(const std::string& name);
  const adapter_type* find(const std::string& name) const;
  bool is_active(const std::string& name) const;
  /// Adapters that the unmerged low-rank path runs: active, unmerged, adapters enabled.
  bool participates(const adapter_type& a) const { return !m_disabled && !a.m_merged && is_active(a.m_name); }
  void invalidate_cache();
  void check_input(index rows, index cols, const char* what) const;
  template <typename Derived>
  void check_same_scalar() const {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "lora::linear: the operand's scalar type differs from the layer's (mismatched dtypes); "
                  "cast it with .template cast<Scalar>()");
  }

  /// Y = X Wᵀ (+ b), whichever way W is stored.
  template <typename X, typename Y>
  void base_forward(const X& x, Y& y) const;
  /// P = X Wᵀ without the bias.
  template <typename X, typename Y>
  void base_product(const X& x, Y& y) const;
  /// DoRA: ‖W + s B A‖ per output row (length out), without forming B A.
  vector_type dora_norm(const adapter_type& a) const;
  /// True when a participating adapter uses DoRA.
  bool dora_participates() const;
  /// dX = dY W, whichever way W is stored.
  template <typename DY, typename DX>
  void base_backward(const DY& dy, DX& dx) const;
  /// The training forward once X is bound.
  void run_forward(Eigen::Ref<matrix_type> y);
  /// Draws adapter a's inverted-dropout mask (n x in, values 0 or 1/(1-p)) into m_mask from `gen`.
  void draw_mask(rng& gen, double p, index n);
  void run_backward(Eigen::Ref<const matrix_type> dy, Eigen::Ref<matrix_type>* dx);
  /// The inference forward once X is viewed.
  void run_infer(const detail::input_cache<Scalar>& x, Eigen::Ref<matrix_type> y,
                 inference_workspace<Scalar>& ws) const;

  std::string m_name;
  index m_in = 0, m_out = 0;
  // The stored matrix, column-major m_rows x m_cols with leading dimension m_stride: W, or Wᵀ.
  matrix_type m_owned;
  Scalar* m_view_data = nullptr;
  index m_rows = 0, m_cols = 0, m_stride = 0;
  bool m_transposed = false;
  vector_type m_bias;

  std::list<adapter_type> m_adapters;  // a list: references to adapters stay valid as others come and go
  std::vector<std::string> m_active;
  std::vector<detail::merge_record<Scalar>> m_records;
  bool m_disabled = false;
  bool m_training = true;

  // Training state: the cached input and workspaces reused across steps.
  detail::input_cache<Scalar> m_x;
  bool m_has_cache = false;
  matrix_type m_mask, m_xd;
  bool m_cached_dora = false;  // the cached forward ran the DoRA path
  matrix_type m_base;          // DoRA: X Wᵀ (n x out) from the cached forward
  vector_type m_base_scale;    // DoRA: c = 1 + Σ (g_a - 1), length out
  matrix_type m_dyc;           // DoRA: dY ⊙ c
  matrix_type m_g_b, m_dyt_h;  // DoRA: diag(g) B and dYᵀ H (out x r)
  vector_type m_dh_buffer;     // dH (n x r) of each adapter in turn; grows to the largest n * r, then stays
};

// ---------------------------------------------------------------------------------------------------
// construction

template <typename Scalar>
template <typename Derived>
linear<Scalar>::linear(const Eigen::MatrixBase<Derived>& weight, std::string name, weight_layout layout)
    : m_name(std::move(name)) {
  check_same_scalar<Derived>();
  if (layout == weight_layout::out_in) {
    m_owned = weight;
  } else {
    m_owned = weight.transpose();
  }
  m_out = m_owned.rows();
  m_in = m_owned.cols();
  m_rows = m_out;
  m_cols = m_in;
  m_stride = std::max<index>(m_rows, 1);
  if (m_in == 0 || m_out == 0)
    throw shape_error(detail::cat(where(), ": weight must be non-empty, got ", detail::shape_str(m_out, m_in)));
}

template <typename Scalar>
template <typename Derived, typename BiasDerived>
linear<Scalar>::linear(const Eigen::MatrixBase<Derived>& weight, const Eigen::MatrixBase<BiasDerived>& bias,
                       std::string name, weight_layout layout)
    : linear(weight, std::move(name), layout) {
  set_bias(bias);
}

template <typename Scalar>
linear<Scalar>::linear(view_t, Eigen::Ref<matrix_type, 0, Eigen::OuterStride<>> weight, std::string name,
                       weight_layout layout)
    : m_name(std::move(name)) {
  // Column-major memory of an out x in W is W itself; of an in x out (fan_in_fan_out) W it is Wᵀ.
  m_view_data = weight.data();
  m_rows = weight.rows();
  m_cols = weight.cols();
  m_stride = weight.outerStride();
  m_transposed = layout == weight_layout::in_out;
  m_out = m_transposed ? m_cols : m_rows;
  m_in = m_transposed ? m_rows : m_cols;
  if (m_in == 0 || m_out == 0)
    throw shape_error(detail::cat(where(), ": weight must be non-empty, got ", detail::shape_str(m_rows, m_cols)));
}

template <typename Scalar>
linear<Scalar>::linear(view_t, Eigen::Ref<row_major_matrix, 0, Eigen::OuterStride<>> weight, std::string name,
                       weight_layout layout)
    : m_name(std::move(name)) {
  // Row-major memory of an R x C matrix is the column-major C x R transpose.
  m_view_data = weight.data();
  m_rows = weight.cols();
  m_cols = weight.rows();
  m_stride = weight.outerStride();
  m_transposed = layout == weight_layout::out_in;
  m_out = m_transposed ? m_cols : m_rows;
  m_in = m_transposed ? m_rows : m_cols;
  if (m_in == 0 || m_out == 0)
    throw shape_error(
        detail::cat(where(), ": weight must be non-empty, got ", detail::shape_str(weight.rows(), weight.cols())));
}

template <typename Scalar>
template <typename BiasDerived>
void linear<Scalar>::set_bias(const Eigen::MatrixBase<BiasDerived>& bias) {
  check_same_scalar<BiasDerived>();
  if (bias.size() != m_out || (bias.rows() != 1 && bias.cols() != 1))
    throw shape_error(detail::cat(where(), ": bias must be a vector of length out_features = ", m_out, ", got ",
                                  detail::shape_str(bias.rows(), bias.cols())));
  m_bias = bias.reshaped();
}

template <typename Scalar>
typename linear<Scalar>::matrix_type linear<Scalar>::weight() const {
  if (m_transposed) return stored_weight().transpose();
  return stored_weight();
}

template <typename Scalar>
template <typename Derived>
void linear<Scalar>::set_weight(const Eigen::MatrixBase<Derived>& w) {
  check_same_scalar<Derived>();
  if (merged()) throw state_error(where() + ": cannot replace the weight while adapters are merged; unmerge() first");
  if (w.rows() != m_out || w.cols() != m_in)
    throw shape_error(detail::cat(where(), ": new weight must be ", detail::shape_str(m_out, m_in), " (out x in), got ",
                                  detail::shape_str(w.rows(), w.cols())));
  if (m_transposed) {
    stored() = w.transpose();
  } else {
    stored() = w;
  }
  invalidate_cache();
}

// ---------------------------------------------------------------------------------------------------
// adapters

template <typename Scalar>
typename linear<Scalar>::adapter_type* linear<Scalar>::find(const std::string& name) {
  for (auto& a : m_adapters)
    if (a.m_name == name) return &a;
  return nullptr;
}

template <typename Scalar>
const typename linear<Scalar>::adapter_type* linear<Scalar>::find(const std::string& name) const {
  for (const auto& a : m_adapters)
    if (a.m_name == name) return &a;
  return nullptr;
}

template <typename Scalar>
bool linear<Scalar>::is_active(const std::string& name) const {
  return std::find(m_active.begin(), m_active.end(), name) != m_active.end();
}

template <typename Scalar>
std::vector<std::string> linear<Scalar>::adapter_names() const {
  std::vector<std::string> names;
  for (const auto& a : m_adapters) names.push_back(a.m_name);
  return names;
}

template <typename Scalar>
typename linear<Scalar>::adapter_type& linear<Scalar>::adapter(const std::string& name) {
  return const_cast<adapter_type&>(static_cast<const linear&>(*this).adapter(name));
}

template <typename Scalar>
const typename linear<Scalar>::adapter_type& linear<Scalar>::adapter(const std::string& name) const {
  if (const adapter_type* a = find(name)) return *a;
  std::string known;
  for (const auto& a : m_adapters) known += (known.empty() ? "'" : ", '") + a.m_name + "'";
  throw name_error(
      detail::cat(where(), ": no adapter named '", name, "' (adapters: ", known.empty() ? "none" : known, ")"));
}

template <typename Scalar>
typename linear<Scalar>::adapter_type& linear<Scalar>::add_adapter(const std::string& name,
                                                                   const adapter_config& config) {
  if (name.empty()) throw name_error(where() + ": adapter names must be non-empty");
  if (find(name)) throw name_error(detail::cat(where(), ": an adapter named '", name, "' already exists"));
  validate(config, where() + " adapter '" + name + "'");
  m_adapters.emplace_back(name, config, m_in, m_out);
  adapter_type& added = m_adapters.back();
  if (config.use_dora) {
    // PEFT: the magnitude starts at ‖W + s B A‖, so the adapted layer starts equal to W + s B A.
    added.m_magnitude = dora_norm(added);
    added.m_grad_magnitude = vector_type::Zero(m_out);
  }
  if (m_active.empty() && m_adapters.size() == 1) m_active.push_back(name);
  invalidate_cache();
  return m_adapters.back();
}

template <typename Scalar>
void linear<Scalar>::remove_adapter(const std::string& name) {
  adapter_type& a = adapter(name);
  if (a.m_merged)
    throw state_error(detail::cat(where(), ": adapter '", name, "' is merged; unmerge() before removing it"));
  m_active.erase(std::remove(m_active.begin(), m_active.end(), name), m_active.end());
  m_adapters.remove_if([&](const adapter_type& x) { return &x == &a; });
  invalidate_cache();
}

template <typename Scalar>
void linear<Scalar>::set_active(const std::vector<std::string>& names) {
  for (std::size_t i = 0; i < names.size(); ++i) {
    adapter(names[i]);  // throws name_error for unknown names
    if (std::find(names.begin(), names.begin() + static_cast<std::ptrdiff_t>(i), names[i]) !=
        names.begin() + static_cast<std::ptrdiff_t>(i))
      throw name_error(detail::cat(where(), ": adapter '", names[i], "' is listed twice in set_active"));
  }
  for (const auto& a : m_adapters)
    if (a.m_merged && std::find(names.begin(), names.end(), a.m_name) == names.end())
      throw state_error(detail::cat(where(), ": adapter '", a.m_name,
                                    "' is merged into the weight and cannot be deactivated; unmerge() first"));
  m_active = names;
  invalidate_cache();
}

template <typename Scalar>
void linear<Scalar>::disable_adapters() {
  if (merged())
    throw state_error(where() + ": cannot disable adapters while some are merged into the weight; unmerge() first");
  m_disabled = true;
  invalidate_cache();
}

template <typename Scalar>
void linear<Scalar>::invalidate_cache() {
  m_has_cache = false;
  m_x.clear();
  for (auto& a : m_adapters) a.m_in_cache = false;
}

// ---------------------------------------------------------------------------------------------------
// forward and backward

template <typename Scalar>
void linear<Scalar>::check_input(index rows, index cols, const char* what) const {
  if (cols != m_in)
    throw shape_error(detail::cat(where(), ": ", what, " must have in_features = ", m_in, " columns (n x ", m_in,
                                  "), got ", detail::shape_str(rows, cols)));
}

template <typename Scalar>
template <typename X, typename Y>
void linear<Scalar>::base_product(const X& x, Y& y) const {
  if (m_transposed) {
    y.noalias() = x * stored_weight();  // stored Wᵀ is in x out
  } else {
    y.noalias() = x * stored_weight().transpose();
  }
}

template <typename Scalar>
template <typename X, typename Y>
void linear<Scalar>::base_forward(const X& x, Y& y) const {
  base_product(x, y);
  if (has_bias()) y.rowwise() += m_bias.transpose();
}

template <typename Scalar>
typename linear<Scalar>::vector_type linear<Scalar>::dora_norm(const adapter_type& a) const {
  const Scalar s = a.m_scaling;
  matrix_type w_at;  // W Aᵀ: out x r
  vector_type w_sq;  // ‖W_o‖²
  if (m_transposed) {
    w_at.noalias() = stored_weight().transpose() * a.m_a.transpose();
    w_sq = stored_weight().colwise().squaredNorm().transpose();
  } else {
    w_at.noalias() = stored_weight() * a.m_a.transpose();
    w_sq = stored_weight().rowwise().squaredNorm();
  }
  const matrix_type a_at = a.m_a * a.m_a.transpose();  // r x r
  const matrix_type b_aat = a.m_b * a_at;              // out x r
  const vector_type sq =
      w_sq + (2 * s) * a.m_b.cwiseProduct(w_at).rowwise().sum() + (s * s) * b_aat.cwiseProduct(a.m_b).rowwise().sum();
  return sq.cwiseMax(Scalar(0)).cwiseSqrt();
}

template <typename Scalar>
bool linear<Scalar>::dora_participates() const {
  for (const auto& a : m_adapters)
    if (a.is_dora() && participates(a)) return true;
  return false;
}

template <typename Scalar>
template <typename DY, typename DX>
void linear<Scalar>::base_backward(const DY& dy, DX& dx) const {
  if (m_transposed) {
    dx.noalias() = dy * stored_weight().transpose();
  } else {
    dx.noalias() = dy * stored_weight();
  }
}

template <typename Scalar>
template <typename Derived>
typename linear<Scalar>::matrix_type linear<Scalar>::forward(const Eigen::MatrixBase<Derived>& x) {
  check_same_scalar<Derived>();
  check_input(x.rows(), x.cols(), "input X");
  matrix_type y(x.rows(), m_out);
  m_x.bind(x);
  run_forward(y);
  return y;
}

template <typename Scalar>
typename linear<Scalar>::matrix_type linear<Scalar>::forward(matrix_type&& x) {
  check_input(x.rows(), x.cols(), "input X");
  matrix_type y(x.rows(), m_out);
  m_x.bind_owned(std::move(x));
  run_forward(y);
  return y;
}

template <typename Scalar>
template <typename Derived>
void linear<Scalar>::forward(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y) {
  check_same_scalar<Derived>();
  check_input(x.rows(), x.cols(), "input X");
  if (y.rows() != x.rows() || y.cols() != m_out)
    throw shape_error(detail::cat(where(), ": output Y must be ", detail::shape_str(x.rows(), m_out), ", got ",
                                  detail::shape_str(y.rows(), y.cols())));
  m_x.bind(x);
  run_forward(y);
}

template <typename Scalar>
void linear<Scalar>::draw_mask(rng& gen, double p, index n) {
  const Scalar keep_scale = static_cast<Scalar>(1.0 / (1.0 - p));
  m_mask.resize(n, m_in);
  Scalar* out = m_mask.data();
  for (index k = 0; k < m_mask.size(); ++k) out[k] = gen.uniform() < p ? Scalar(0) : keep_scale;
}

template <typename Scalar>
void linear<Scalar>::run_forward(Eigen::Ref<matrix_type> y) {
  m_cached_dora = dora_participates();
  m_x.visit([&](const auto& x) {
    if (m_cached_dora) {
      // Y = (X Wᵀ) ⊙ c + b with c = 1 + Σ (g_a - 1); X Wᵀ is kept for dm.
      base_product(x, m_base);
      m_base_scale.setOnes(m_out);
      for (auto& a : m_adapters) {
        if (!a.is_dora() || !participates(a)) continue;
        a.m_dora_norm = dora_norm(a);
        m_base_scale += a.m_magnitude.cwiseQuotient(a.m_dora_norm) - vector_type::Ones(m_out);
      }
      y.noalias() = m_base * m_base_scale.asDiagonal();
      if (has_bias()) y.rowwise() += m_bias.transpose();
    } else {
      base_forward(x, y);
    }
    for (auto& a : m_adapters) {
      a.m_in_cache = false;
      if (!participates(a)) continue;
      const double p = m_training ? a.m_config.dropout : 0.0;
      if (p > 0.0) {
        // Inverted dropout on the adapter input only; backward redraws the mask from the saved state.
        a.m_mask_state = a.m_dropout_rng.state();
        draw_mask(a.m_dropout_rng, p, x.rows());
        m_xd = x.cwiseProduct(m_mask);
        a.m_h.noalias() = m_xd * a.m_a.transpose();
      } else {
        a.m_h.noalias() = x * a.m_a.transpose();
      }
      a.m_masked = p > 0.0;
      if (a.is_dora()) {
        m_g_b.noalias() = a.m_magnitude.cwiseQuotient(a.m_dora_norm).asDiagonal() * a.m_b;  // diag(g) B
        y.noalias() += (a.m_scaling * a.m_h) * m_g_b.transpose();
      } else {
        y.noalias() += (a.m_scaling * a.m_h) * a.m_b.transpose();
      }
      a.m_in_cache = true;
    }
  });
  m_has_cache = true;
}

template <typename Scalar>
template <typename Derived>
typename linear<Scalar>::matrix_type linear<Scalar>::backward(const Eigen::MatrixBase<Derived>& dy) {
  check_same_scalar<Derived>();
  matrix_type dx(dy.rows(), m_in);
  Eigen::Ref<matrix_type> ref(dx);
  run_backward(dy, &ref);
  return dx;
}

template <typename Scalar>
template <typename Derived>
void linear<Scalar>::backward(const Eigen::MatrixBase<Derived>& dy, Eigen::Ref<matrix_type> dx) {
  check_same_scalar<Derived>();
  if (dx.rows() != dy.rows() || dx.cols() != m_in)
    throw shape_error(detail::cat(where(), ": dX must be ", detail::shape_str(dy.rows(), m_in), ", got ",
                                  detail::shape_str(dx.rows(), dx.cols())));
  run_backward(dy, &dx);
}

template <typename Scalar>
template <typename Derived>
void linear<Scalar>::backward_params_only(const Eigen::MatrixBase<Derived>& dy) {
  check_same_scalar<Derived>();
  run_backward(dy, nullptr);
}

template <typename Scalar>
void linear<Scalar>::run_backward(Eigen::Ref<const matrix_type> dy, Eigen::Ref<matrix_type>* dx) {
  if (!m_has_cache)
    throw state_error(where() +
                      ": backward() needs a preceding training forward() (each forward allows one backward; "
                      "adding, removing, activating or merging adapters discards the cached forward)");
  if (dy.rows() != m_x.rows() || dy.cols() != m_out)
    throw shape_error(detail::cat(where(), ": dY must be ", detail::shape_str(m_x.rows(), m_out),
                                  " (the forward's n x out_features), got ", detail::shape_str(dy.rows(), dy.cols())));
  m_x.visit([&](const auto& x) {
    vector_type dy_dot_base;  // DoRA: Σ_i dY ⊙ X Wᵀ, length out
    if (m_cached_dora) {
      m_dyc.noalias() = dy * m_base_scale.asDiagonal();
      if (dx) base_backward(m_dyc, *dx);
      dy_dot_base = dy.cwiseProduct(m_base).colwise().sum().transpose();
    } else if (dx) {
      base_backward(dy, *dx);
    }
    for (auto& a : m_adapters) {
      if (!a.m_in_cache) continue;
      const Scalar s = a.m_scaling;
      if (m_dh_buffer.size() < a.m_h.size()) m_dh_buffer.resize(a.m_h.size());
      Eigen::Map<matrix_type> dh(m_dh_buffer.data(), a.m_h.rows(), a.m_h.cols());
      if (a.is_dora()) {
        const vector_type g = a.m_magnitude.cwiseQuotient(a.m_dora_norm);
        m_dyt_h.noalias() = dy.transpose() * a.m_h;              // out x r
        a.m_grad_b.noalias() += s * (g.asDiagonal() * m_dyt_h);  // out x r
        a.m_grad_magnitude +=
            (dy_dot_base + s * a.m_b.cwiseProduct(m_dyt_h).rowwise().sum()).cwiseQuotient(a.m_dora_norm);  // out
        m_g_b.noalias() = g.asDiagonal() * a.m_b;
        dh.noalias() = (s * dy) * m_g_b;  // n x r
      } else {
        a.m_grad_b.noalias() += (s * dy.transpose()) * a.m_h;  // out x r
        dh.noalias() = (s * dy) * a.m_b;                       // n x r
      }
      if (a.m_masked) {
        rng replay;
        replay.set_state(a.m_mask_state);
        draw_mask(replay, a.m_config.dropout, x.rows());
        m_xd = x.cwiseProduct(m_mask);
        a.m_grad_a.noalias() += dh.transpose() * m_xd;  // r x in
        if (dx) {
          m_xd.noalias() = dh * a.m_a;
          *dx += m_xd.cwiseProduct(m_mask);
        }
      } else {
        a.m_grad_a.noalias() += dh.transpose() * x;
        if (dx) dx->noalias() += dh * a.m_a;
      }
    }
  });
  invalidate_cache();
}

template <typename Scalar>
parameter_list<Scalar> linear<Scalar>::parameters() {
  parameter_list<Scalar> out;
  for (auto& a : m_adapters) {
    if (a.m_merged || !is_active(a.m_name)) continue;
    auto ps = parameters(a.m_name);
    out.insert(out.end(), ps.begin(), ps.end());
  }
  return out;
}

template <typename Scalar>
parameter_list<Scalar> linear<Scalar>::parameters(const std::string& adapter_name) {
  adapter_type& a = adapter(adapter_name);
  if (a.m_merged)
    throw state_error(detail::cat(where(), ": adapter '", adapter_name,
                                  "' is merged into the weight and cannot be trained; unmerge() first"));
  parameter<Scalar> pa{m_name + ".lora_A." + a.m_name + ".weight",
                       param_role::lora_a,
                       a.m_a.data(),
                       a.m_grad_a.data(),
                       a.m_a.rows(),
                       a.m_a.cols()};
  parameter<Scalar> pb{m_name + ".lora_B." + a.m_name + ".weight",
                       param_role::lora_b,
                       a.m_b.data(),
                       a.m_grad_b.data(),
                       a.m_b.rows(),
                       a.m_b.cols()};
  if (!a.is_dora()) return {pa, pb};
  parameter<Scalar> pm{m_name + ".lora_magnitude_vector." + a.m_name,
                       param_role::vector,
                       a.m_magnitude.data(),
                       a.m_grad_magnitude.data(),
                       m_out,
                       1};
  return {pa, pb, pm};
}

template <typename Scalar>
void linear<Scalar>::zero_grad() {
  for (auto& a : m_adapters) a.zero_grad();
}

// ---------------------------------------------------------------------------------------------------
// inference

template <typename Scalar>
template <typename Derived>
void linear<Scalar>::infer(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y,
                           inference_workspace<Scalar>& ws) const {
  check_same_scalar<Derived>();
  check_input(x.rows(), x.cols(), "input X");
  if (y.rows() != x.rows() || y.cols() != m_out)
    throw shape_error(detail::cat(where(), ": output Y must be ", detail::shape_str(x.rows(), m_out), ", got ",
                                  detail::shape_str(y.rows(), y.cols())));
  detail::input_cache<Scalar> view;  // a view for matrices, maps and blocks; a copy for other expressions
  view.bind(x);
  run_infer(view, y, ws);
}

template <typename Scalar>
void linear<Scalar>::run_infer(const detail::input_cache<Scalar>& view, Eigen::Ref<matrix_type> y,
                               inference_workspace<Scalar>& ws) const {
  view.visit([&](const auto& x) {
    const bool dora = dora_participates();
    std::vector<vector_type> gains;  // DoRA only (this path allocates): g_a per DoRA adapter
    if (dora) {
      base_product(x, y);
      vector_type c = vector_type::Ones(m_out);
      for (const auto& a : m_adapters) {
        if (!a.is_dora() || !participates(a)) continue;
        gains.push_back(a.m_magnitude.cwiseQuotient(dora_norm(a)));
        c += gains.back() - vector_type::Ones(m_out);
      }
      y = y * c.asDiagonal();
      if (has_bias()) y.rowwise() += m_bias.transpose();
    } else {
      base_forward(x, y);
    }
    std::size_t next_gain = 0;
    for (const auto& a : m_adapters) {
      if (!participates(a)) continue;
      const auto need = static_cast<std::size_t>(x.rows() * a.rank());
      if (ws.buffer.size() < need) ws.buffer.resize(need);
      Eigen::Map<matrix_type> h(ws.buffer.data(), x.rows(), a.rank());
      h.noalias() = x * a.m_a.transpose();
      if (a.is_dora()) {
        const matrix_type g_b = gains[next_gain++].asDiagonal() * a.m_b;
        y.noalias() += (a.m_scaling * h) * g_b.transpose();
      } else {
        y.noalias() += (a.m_scaling * h) * a.m_b.transpose();
      }
    }
  });
}

template <typename Scalar>
template <typename Derived>
typename linear<Scalar>::matrix_type linear<Scalar>::infer(const Eigen::MatrixBase<Derived>& x) const {
  matrix_type y(x.rows(), m_out);
  inference_workspace<Scalar> ws;
  infer(x, y, ws);
  return y;
}

// ---------------------------------------------------------------------------------------------------
// merging

template <typename Scalar>
void linear<Scalar>::merge(const std::vector<std::string>& names, bool safe) {
  std::vector<std::string> chosen;
  if (names.empty()) {
    for (const auto& a : m_adapters)
      if (is_active(a.m_name) && !a.m_merged) chosen.push_back(a.m_name);
  } else {
    for (const auto& n : names) {
      const adapter_type& a = adapter(n);
      if (a.m_merged) throw state_error(detail::cat(where(), ": adapter '", n, "' is already merged"));
      if (std::find(chosen.begin(), chosen.end(), n) != chosen.end())
        throw name_error(detail::cat(where(), ": adapter '", n, "' is listed twice in merge"));
      chosen.push_back(n);
    }
  }
  if (chosen.empty()) return;

  // DoRA rescales rows by m / ‖W + s B A‖, which depends on W: such an adapter merges alone, before any
  // other merge, in a record of its own; the plain adapters follow in one more record.
  std::vector<std::string> dora, plain;
  for (const auto& n : chosen) (find(n)->is_dora() ? dora : plain).push_back(n);
  if (dora.size() > 1)
    throw state_error(detail::cat(where(), ": merge DoRA adapters one at a time ('", dora[0], "' and '", dora[1],
                                  "' were given together)"));
  if (!dora.empty() && !m_records.empty())
    throw state_error(detail::cat(where(), ": DoRA adapter '", dora[0],
                                  "' must be merged before any other adapter (its norm is taken of the unmerged W); "
                                  "unmerge() first"));

  // Stack the factors as in PEFT's "cat" combination: Σ s_a B_a A_a = [s_1 B_1 | s_2 B_2 ...][A_1; A_2 ...].
  // For a stored W (out x in) the record holds P = [s B] (out x R), Q = [Aᵀ] (in x R); for a stored Wᵀ the
  // roles swap, so that the stored matrix always receives P Qᵀ.
  auto make_record = [&](const std::vector<std::string>& group) {
    index total_rank = 0;
    for (const auto& n : group) total_rank += find(n)->rank();
    detail::merge_record<Scalar> rec;
    rec.adapters = group;
    matrix_type sb(m_out, total_rank), at(m_in, total_rank);
    index col = 0;
    for (const auto& n : group) {
      const adapter_type& a = *find(n);
      sb.middleCols(col, a.rank()) = a.m_scaling * a.m_b;
      at.middleCols(col, a.rank()) = a.m_a.transpose();
      col += a.rank();
      if (a.is_dora()) {
        rec.scale = a.m_magnitude.cwiseQuotient(dora_norm(a));  // g = m / ‖W + s B A‖
        rec.scale_columns = m_transposed;
      }
    }
    rec.p = m_transposed ? std::move(at) : std::move(sb);
    rec.q = m_transposed ? std::move(sb) : std::move(at);
    return rec;
  };
  std::vector<detail::merge_record<Scalar>> records;
  if (!dora.empty()) records.push_back(make_record(dora));
  if (!plain.empty()) records.push_back(make_record(plain));

  stored_map w = stored();
  for (std::size_t k = 0; k < records.size(); ++k) {
    if (safe && !detail::merge_is_finite(w, records[k])) {
      for (std::size_t undo = k; undo-- > 0;) detail::unmerge_exact(w, records[undo]);  // W back, bit for bit
      std::string list;
      for (const auto& n : chosen) list += (list.empty() ? "'" : ", '") + n + "'";
      throw numeric_error(detail::cat(where(), ": merging adapter(s) ", list,
                                      " would put non-finite values in the weight; the weight is unchanged"));
    }
    detail::merge_exact(w, records[k]);
  }
  for (const auto& n : chosen) {
    find(n)->m_merged = true;
    if (!is_active(n)) m_active.push_back(n);
  }
  for (auto& rec : records) m_records.push_back(std::move(rec));
  invalidate_cache();
}

template <typename Scalar>
void linear<Scalar>::unmerge() {
  stored_map w = stored();
  while (!m_records.empty()) {
    detail::unmerge_exact(w, m_records.back());
    for (const auto& n : m_records.back().adapters)
      if (adapter_type* a = find(n)) a->m_merged = false;
    m_records.pop_back();
  }
  invalidate_cache();
}

template <typename Scalar>
std::vector<std::string> linear<Scalar>::merged_adapters() const {
  std::vector<std::string> names;
  for (const auto& rec : m_records) names.insert(names.end(), rec.adapters.begin(), rec.adapters.end());
  return names;
}

template <typename Scalar>
typename linear<Scalar>::matrix_type linear<Scalar>::merge_and_unload(bool safe) {
  merge({}, safe);
  m_records.clear();
  m_adapters.clear();
  m_active.clear();
  m_disabled = false;
  invalidate_cache();
  return weight();
}

// ---------------------------------------------------------------------------------------------------
// accounting

template <typename Scalar>
parameter_report linear<Scalar>::report() const {
  parameter_report r;
  const auto bytes = static_cast<std::int64_t>(sizeof(Scalar));
  r.frozen_params = m_in * m_out + m_bias.size();
  for (const auto& a : m_adapters) {
    const std::int64_t n = a.m_a.size() + a.m_b.size() + a.m_magnitude.size();
    if (a.m_merged) {
      r.frozen_params += n;
    } else {
      r.trainable_params += n;
      r.trainable_bytes += n * bytes;
      r.grad_bytes += (a.m_grad_a.size() + a.m_grad_b.size() + a.m_grad_magnitude.size()) * bytes;
    }
    if (a.m_in_cache) r.cache_bytes += a.m_h.size() * bytes;
  }
  r.frozen_bytes = r.frozen_params * bytes;  // merged adapters keep their factors for unmerge
  if (m_has_cache) r.cache_bytes += static_cast<std::int64_t>(m_x.owned_bytes());
  if (m_has_cache && m_cached_dora) r.cache_bytes += m_base.size() * bytes;
  for (const auto& rec : m_records) r.merge_bytes += static_cast<std::int64_t>(rec.bytes());
  return r;
}

}  // namespace lora
