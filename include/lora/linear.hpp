// lora/linear.hpp: a frozen linear layer carrying any number of named LoRA adapters, and the engine
// every other layer is built from (embedding, merged_linear and conv2d are views onto linears).
//
//   Y = X Wᵀ + b + Σ_{a active, unmerged} s_a · (drop_a(X) A_aᵀ) B_aᵀ
//
// Shapes (docs/CONVENTIONS.md §orientation): W is out x in, b is out, X is n x in (one sample per row),
// Y is n x out, A_a is r_a x in, B_a is out x r_a. B A is never formed except to merge.
//
// Backward, with H_a = drop_a(X) A_aᵀ (n x r_a, the only activation cached besides a view of X):
//   dB_a += s_a dYᵀ H_a                    (out x r_a)
//   dH_a  = s_a dY B_a                     (n x r_a)
//   dA_a += dH_aᵀ drop_a(X)                (r_a x in)
//   dX    = dY W + Σ_a mask_a ⊙ (dH_a A_a)  (n x in)
// W is frozen: dW is never computed. DoRA adapters change the base term and their own; see dora.hpp.
//
// The weight is owned (a copy) or viewed (the user's memory, row- or column-major, or stored in x out as
// GPT-2's Conv1D does, `fan_in_fan_out`). Either way it is read through one column-major map that holds
// W (out x in) or Wᵀ (in x out); a row-major W is the same memory as a column-major Wᵀ, so nothing is
// transposed or copied.
//
// Or the weight is quantized (quant/quantized_matrix.hpp: bf16, f16, int8, NF4, Q8_0, Q4_0 ...): the layer
// owns the codes, and the products X deq(W)ᵀ and dY deq(W) run by panels or fused kernels without ever
// forming deq(W) whole (QLoRA's setting; docs/CONVENTIONS.md §quant). The adapter API is the same. A merge
// into a quantized weight re-quantizes W + s B A (it cannot be exact; merge_error() says by how much) and
// keeps the original codes, so that unmerge restores them byte for byte. Definitions: detail/linear_quant.hpp.
//
// The adapter API (add/select/merge/parameters/report...) comes from layer_base (layer.hpp); the private
// core_* primitives below are what it calls on each part. Their definitions are in detail/linear_core.hpp.
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
#include "adapter_routing.hpp"
#include "config.hpp"
#include "detail/exact_merge.hpp"
#include "detail/input_cache.hpp"
#include "dora.hpp"
#include "error.hpp"
#include "layer.hpp"
#include "parameter.hpp"
#include "quant/quantized_matrix.hpp"
#include "quant/requant_error.hpp"

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

/// Scratch memory for infer(); one per thread. Grows to the largest batch seen, then never allocates again.
template <typename Scalar>
struct inference_workspace {
  std::vector<Scalar> buffer;
  quant::qgemm_workspace<Scalar> quant;   // a quantized weight's panels
  std::vector<Scalar> rows_in, rows_out;  // a routed batch: one adapter's rows gathered, and their term
};

template <typename Scalar_>
class embedding;
template <typename Scalar_>
class merged_linear;
template <typename Scalar_>
class conv2d;

template <typename Scalar_>
class linear : public layer_base<linear<Scalar_>, Scalar_> {
 public:
  using Scalar = Scalar_;
  using base_type = layer_base<linear<Scalar_>, Scalar_>;
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

  /// Owns a quantized frozen weight W (out x in).
  explicit linear(quant::quantized_matrix weight, std::string name = "linear");

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
  /// The storage the layer reads: W (out x in) or, when weight_is_transposed(), Wᵀ (in x out). state_error
  /// for a quantized weight (see quantized_weight()).
  const_stored_map stored_weight() const {
    if (m_quantized)
      throw state_error(where() + ": the weight is quantized; read it with weight() or quantized_weight()");
    return const_stored_map(data(), m_rows, m_cols, Eigen::OuterStride<>(m_stride));
  }
  bool weight_is_transposed() const noexcept { return m_transposed; }
  /// Overwrites the frozen weight (out x in) in place, in the layer's storage (a view's memory too);
  /// used by initialisations that move part of W into the adapter (PiSSA, OLoRA). state_error while any
  /// adapter is merged, shape_error on a shape mismatch.
  template <typename Derived>
  void set_weight(const Eigen::MatrixBase<Derived>& w);

  // --- quantized weights (detail/linear_quant.hpp) --------------------------------------------------

  /// Re-stores the frozen weight as `type`: quantized from the current weight (a view stops reading the
  /// user's memory), or, for qtype::f32, a quantized weight becomes a plain owned Scalar matrix holding
  /// deq(W), the "dequantized copy" that merges exactly (a plain weight stays as it is). state_error while adapters are
  /// merged; shape_error for a format whose rows must be whole blocks (q8_0, q4_0: in a multiple of 32).
  void set_weight_storage(quant::qtype type);
  /// qtype::f32 for a plain Scalar weight (float or double), else the quantized format.
  quant::qtype weight_storage() const noexcept { return m_quantized ? m_quant.type() : quant::qtype::f32; }
  bool is_quantized() const noexcept { return m_quantized; }
  /// The quantized weight; state_error for a plain one.
  const quant::quantized_matrix& quantized_weight() const;
  /// What re-quantizing W + Σ s B A changed when the merged adapters went into a quantized weight (zeros
  /// when nothing is merged, or the weight is plain: then merges are exact).
  const quant::requant_error& merge_error() const noexcept { return m_merge_error; }

  // --- training ----------------------------------------------------------------------------------

  using workspace_type = inference_workspace<Scalar>;
  // forward(x) -> Y, backward(dy) -> dX and infer(x) -> Y, allocating their results, come from layer_base.
  using base_type::backward;
  using base_type::forward;
  using base_type::infer;

  /// Training forward taking ownership of X (safe for temporaries).
  matrix_type forward(matrix_type&& x);
  /// Training forward into a caller-sized y (n x out), no allocation once workspaces are warm; caches a
  /// view of X (X must outlive backward) and H.
  template <typename Derived>
  void forward(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y);

  /// Backward into a caller-sized dx (n x in): accumulates dA, dB of the adapters that took part in the
  /// last forward.
  template <typename Derived>
  void backward(const Eigen::MatrixBase<Derived>& dy, Eigen::Ref<matrix_type> dx);
  /// Backward for the adapters' gradients only, skipping the n x out x in GEMM for dX (first layers).
  template <typename Derived>
  void backward_params_only(const Eigen::MatrixBase<Derived>& dy);

  // --- inference ---------------------------------------------------------------------------------

  /// Const inference forward (no dropout, no cache) into a caller-sized y (n x out). Safe to call from
  /// many threads at once with one workspace each; allocates nothing once the workspace is warm.
  template <typename Derived>
  void infer(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y, inference_workspace<Scalar>& ws) const;
  /// Const inference of a batch whose rows use different adapters (adapter_routing.hpp, docs/CONVENTIONS.md
  /// §mixed): Y = X Wᵀ + b over every row, then each routed adapter's term s (X[R] Aᵀ) Bᵀ (times the rows'
  /// scales) added to its rows R only. Row i equals infer() of row i alone with its adapter the only
  /// active one. Checks: layer_base::check_routing. Allocates nothing once the workspace is warm.
  template <typename Derived>
  void infer(const Eigen::MatrixBase<Derived>& x, const adapter_routing& routing, Eigen::Ref<matrix_type> y,
             inference_workspace<Scalar>& ws) const;

 private:
  friend base_type;
  template <typename, typename>
  friend class layer_base;
  friend class embedding<Scalar>;
  friend class merged_linear<Scalar>;
  friend class conv2d<Scalar>;

  // --- what layer_base asks of a layer (a linear is its own single part) ---------------------------
  linear& part(index) noexcept { return *this; }
  const linear& part(index) const noexcept { return *this; }
  std::string where() const { return "linear '" + m_name + "'"; }
  void on_adapters_changed() { invalidate_cache(); }

  // --- core primitives: one part's share of the adapter API, called after layer_base checked the call ---
  adapter_type* core_find(const std::string& name);
  const adapter_type* core_find(const std::string& name) const;
  std::vector<std::string> core_names() const;
  const std::vector<std::string>& core_active() const noexcept { return m_active; }
  bool core_merged() const noexcept { return !m_records.empty(); }
  std::vector<std::string> core_merged_names() const;
  adapter_type& core_add(const std::string& name, const adapter_config& config, const std::string& label);
  template <typename DA, typename DB>
  void core_set_factors(const std::string& name, const DA& a, const DB& b, const vector_type* magnitude);
  /// adapter::swap_in on adapter `name` (known); true when done in place.
  template <typename DA, typename DB>
  bool core_hotswap(const std::string& name, const DA& a, const DB& b, const adapter_config& config);
  void core_pad_rank(const std::string& name, index rank);
  void core_remove(const std::string& name);
  void core_set_active(const std::vector<std::string>& names);
  void core_set_disabled(bool disabled);
  void core_set_training(bool on) { m_training = on; }
  bool core_training() const noexcept { return m_training; }
  bool core_disabled() const noexcept { return m_disabled; }
  parameter_list<Scalar> core_parameters(const std::string& name) { return core_find(name)->parameters(m_name); }
  void core_zero_grad();
  /// Merges `chosen` (checked); returns the merge records pushed, or -1 (weight untouched) when `safe` and
  /// the result would not be finite.
  int core_merge(const std::vector<std::string>& chosen, bool safe);
  /// Undoes the last `records` merge records exactly.
  void core_pop_merges(int records);
  void core_unmerge() { core_pop_merges(static_cast<int>(m_records.size())); }
  /// After a merge: forgets every record and adapter, keeping the merged weight.
  void core_unload();
  parameter_report core_report() const;

  // --- the engine ----------------------------------------------------------------------------------
  /// Views column-major storage (rows x cols, leading dimension stride) holding W, or Wᵀ when transposed.
  void bind_view(Scalar* data, index rows, index cols, index stride, bool transposed);
  Scalar* data() noexcept { return m_view_data ? m_view_data : m_owned.data(); }
  const Scalar* data() const noexcept { return m_view_data ? m_view_data : m_owned.data(); }
  stored_map stored() { return stored_map(data(), m_rows, m_cols, Eigen::OuterStride<>(m_stride)); }
  bool is_active(const std::string& name) const;
  /// Adapters that the unmerged low-rank path runs: active, unmerged, adapters enabled.
  bool participates(const adapter_type& a) const { return !m_disabled && !a.m_merged && is_active(a.m_name); }
  bool dora_participates() const;
  /// ‖W + s B A‖ per output row (DoRA); over a quantized W from W Aᵀ = (A deq(W)ᵀ)ᵀ and the cached row norms.
  vector_type dora_norm(const adapter_type& a) const;
  void invalidate_cache();
  void check_input(index rows, index cols, const char* what) const;
  template <typename Derived>
  static void check_same_scalar() {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "lora::linear: the operand's scalar type differs from the layer's (mismatched dtypes); "
                  "cast it with .template cast<Scalar>()");
  }
  /// P = X Wᵀ without the bias, whichever way W is stored (qws: a quantized W's panels).
  template <typename X, typename Y>
  void base_product(const X& x, Y& y, quant::qgemm_workspace<Scalar>& qws) const;
  /// dX = dY W, whichever way W is stored.
  template <typename DY, typename DX>
  void base_backward(const DY& dy, DX& dx, quant::qgemm_workspace<Scalar>& qws) const;
  /// Y = X Wᵀ + b, or with DoRA adapters taking part (X Wᵀ) ⊙ c + b (dora.hpp).
  template <typename X>
  void forward_base(const X& x, Eigen::Ref<matrix_type> y);
  /// The training forward once X is bound.
  void run_forward(Eigen::Ref<matrix_type> y);
  /// Draws an inverted-dropout mask (n x in, values 0 or 1/(1-p)) into m_mask from `gen`.
  void draw_mask(rng& gen, double p, index n);
  void run_backward(Eigen::Ref<const matrix_type> dy, Eigen::Ref<matrix_type>* dx);
  template <typename X>
  void adapter_backward(adapter_type& a, const X& x, Eigen::Ref<const matrix_type> dy, Eigen::Ref<matrix_type>* dx);
  /// The inference forward once X is viewed.
  void run_infer(const detail::input_cache<Scalar>& x, Eigen::Ref<matrix_type> y,
                 inference_workspace<Scalar>& ws) const;
  /// The routed inference once X is viewed and the routing checked; routed names this part lacks are
  /// skipped (a multi-part layer checked them against its reference part).
  void run_infer_routed(const detail::input_cache<Scalar>& x, const adapter_routing& routing, Eigen::Ref<matrix_type> y,
                        inference_workspace<Scalar>& ws) const;
  /// Adds each routed adapter's term to y: h_of(A, group, H) writes H (rows x r) for the group's rows
  /// (X[R] Aᵀ for a dense layer, A[:, ids[R]]ᵀ for an embedding); then H is scaled and H Bᵀ added to y[R].
  template <typename HOf>
  void add_routed_terms(const adapter_routing& routing, Eigen::Ref<matrix_type> y, inference_workspace<Scalar>& ws,
                        HOf&& h_of) const;
  /// The merge record of `group` (their stacked factors, and DoRA's gain).
  detail::merge_record<Scalar> make_record(const std::vector<std::string>& group) const;
  /// Takes a quantized_matrix as the weight (the shape checked, the row norms cached).
  void adopt_quantized(quant::quantized_matrix q);
  /// deq(original codes) with the records applied in order, then `extra`: the exact merged weight.
  matrix_type quant_merged_weight(const std::vector<detail::merge_record<Scalar>>& extra) const;
  /// core_merge / core_pop_merges for a quantized weight: re-quantize from the kept codes.
  int quant_merge(std::vector<detail::merge_record<Scalar>> records, const std::vector<std::string>& chosen, bool safe);
  void quant_pop_merges(int records);

  std::string m_name;
  adapter_kind m_kind = adapter_kind::dense;  // an embedding's table creates embedding adapters
  index m_in = 0, m_out = 0;
  // The stored matrix, column-major m_rows x m_cols with leading dimension m_stride: W, or Wᵀ.
  matrix_type m_owned;
  Scalar* m_view_data = nullptr;
  index m_rows = 0, m_cols = 0, m_stride = 0;
  bool m_transposed = false;
  vector_type m_bias;
  // A quantized weight (m_quantized): its codes, the original codes while adapters are merged, the row norms
  // ‖deq(W)_o‖² (DoRA), the error of the last re-quantizing merge, and the training products' panels.
  bool m_quantized = false;
  quant::quantized_matrix m_quant, m_quant_kept;
  vector_type m_quant_row_sq;
  quant::requant_error m_merge_error;
  quant::qgemm_workspace<Scalar> m_qws;

  std::list<adapter_type> m_adapters;  // a list: references to adapters stay valid as others come and go
  std::vector<std::string> m_active;
  std::vector<detail::merge_record<Scalar>> m_records;
  bool m_disabled = false;
  bool m_training = true;

  // Training state: the cached input and workspaces reused across steps.
  detail::input_cache<Scalar> m_x;
  bool m_has_cache = false;
  matrix_type m_mask, m_xd;
  detail::dora_pass<Scalar> m_dora;
  vector_type m_dh_buffer;  // dH (n x r) of each adapter in turn; grows to the largest n * r, then stays
};

}  // namespace lora

namespace lora {

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
  bind_view(weight.data(), weight.rows(), weight.cols(), weight.outerStride(), layout == weight_layout::in_out);
}

template <typename Scalar>
linear<Scalar>::linear(view_t, Eigen::Ref<row_major_matrix, 0, Eigen::OuterStride<>> weight, std::string name,
                       weight_layout layout)
    : m_name(std::move(name)) {
  // Row-major memory of an R x C matrix is the column-major C x R transpose.
  bind_view(weight.data(), weight.cols(), weight.rows(), weight.outerStride(), layout == weight_layout::out_in);
}

template <typename Scalar>
void linear<Scalar>::bind_view(Scalar* data, index rows, index cols, index stride, bool transposed) {
  m_view_data = data;
  m_rows = rows;
  m_cols = cols;
  m_stride = stride;
  m_transposed = transposed;
  m_out = m_transposed ? m_cols : m_rows;
  m_in = m_transposed ? m_rows : m_cols;
  if (m_in == 0 || m_out == 0)
    throw shape_error(
        detail::cat(where(), ": weight must be non-empty, got ", detail::shape_str(m_out, m_in), " (out x in)"));
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
  if (m_quantized) return m_quant.template dequantize<Scalar>();
  if (m_transposed) return stored_weight().transpose();
  return stored_weight();
}

template <typename Scalar>
template <typename Derived>
void linear<Scalar>::set_weight(const Eigen::MatrixBase<Derived>& w) {
  check_same_scalar<Derived>();
  if (core_merged())
    throw state_error(where() + ": cannot replace the weight while adapters are merged; unmerge() first");
  if (w.rows() != m_out || w.cols() != m_in)
    throw shape_error(detail::cat(where(), ": new weight must be ", detail::shape_str(m_out, m_in), " (out x in), got ",
                                  detail::shape_str(w.rows(), w.cols())));
  if (m_quantized) {
    adopt_quantized(quant::quantized_matrix::quantize(w, m_quant.type()));
  } else if (m_transposed) {
    stored() = w.transpose();
  } else {
    stored() = w;
  }
  invalidate_cache();
}

// ---------------------------------------------------------------------------------------------------
// forward

template <typename Scalar>
void linear<Scalar>::check_input(index rows, index cols, const char* what) const {
  if (cols != m_in)
    throw shape_error(detail::cat(where(), ": ", what, " must have in_features = ", m_in, " columns (n x ", m_in,
                                  "), got ", detail::shape_str(rows, cols)));
}

template <typename Scalar>
template <typename X, typename Y>
void linear<Scalar>::base_product(const X& x, Y& y, quant::qgemm_workspace<Scalar>& qws) const {
  if (m_quantized) {
    if constexpr (std::is_same_v<Y, matrix_type>) y.resize(x.rows(), m_out);
    quant::qgemm_forward<Scalar>(x, m_quant, y, qws);
  } else if (m_transposed) {
    y.noalias() = x * stored_weight();  // stored Wᵀ is in x out
  } else {
    y.noalias() = x * stored_weight().transpose();
  }
}

template <typename Scalar>
template <typename DY, typename DX>
void linear<Scalar>::base_backward(const DY& dy, DX& dx, quant::qgemm_workspace<Scalar>& qws) const {
  if (m_quantized) {
    dx.setZero();
    quant::qgemm_backward_input<Scalar>(dy, m_quant, dx, qws);
  } else if (m_transposed) {
    dx.noalias() = dy * stored_weight().transpose();
  } else {
    dx.noalias() = dy * stored_weight();
  }
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
template <typename X>
void linear<Scalar>::forward_base(const X& x, Eigen::Ref<matrix_type> y) {
  m_dora.active = dora_participates();
  if (m_dora.active) {
    // DoRA: Y = (X Wᵀ) ⊙ c with c = 1 + Σ (g_a − 1); X Wᵀ is kept for dm.
    base_product(x, m_dora.base, m_qws);
    m_dora.scale.setOnes(m_out);
    for (auto& a : m_adapters) {
      if (!a.is_dora() || !participates(a)) continue;
      a.m_dora_norm = dora_norm(a);
      m_dora.scale += a.m_magnitude.cwiseQuotient(a.m_dora_norm) - vector_type::Ones(m_out);
    }
    m_dora.scale_base(y);
  } else {
    base_product(x, y, m_qws);
  }
  if (has_bias()) y.rowwise() += m_bias.transpose();
}

template <typename Scalar>
void linear<Scalar>::run_forward(Eigen::Ref<matrix_type> y) {
  m_x.visit([&](const auto& x) {
    forward_base(x, y);  // Y = X Wᵀ + b
    for (auto& a : m_adapters) {
      a.m_in_cache = participates(a);
      if (!a.m_in_cache) continue;
      // H = drop(X) Aᵀ; backward redraws the dropout mask from the saved stream state.
      const double p = m_training ? a.m_config.dropout : 0.0;
      a.m_masked = p > 0.0;
      if (a.m_masked) {
        a.m_mask_state = a.m_dropout_rng.state();
        draw_mask(a.m_dropout_rng, p, x.rows());
        m_xd = x.cwiseProduct(m_mask);
        a.m_h.noalias() = m_xd * a.m_a.transpose();
      } else {
        a.m_h.noalias() = x * a.m_a.transpose();
      }
      if (a.is_dora()) {
        m_dora.add_output(a, a.m_dora_norm, a.m_h, y);
      } else {
        y.noalias() += (a.m_scaling * a.m_h) * a.m_b.transpose();  // Y += s H Bᵀ
      }
    }
  });
  m_has_cache = true;
}

// ---------------------------------------------------------------------------------------------------
// backward

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
    if (m_dora.active) {  // dX = (dY ⊙ c) W
      m_dora.dyc.noalias() = dy * m_dora.scale.asDiagonal();
      if (dx) base_backward(m_dora.dyc, *dx, m_qws);
      m_dora.dy_dot_base = dy.cwiseProduct(m_dora.base).colwise().sum().transpose();
    } else if (dx) {
      base_backward(dy, *dx, m_qws);  // dX = dY W
    }
    for (auto& a : m_adapters)
      if (a.m_in_cache) adapter_backward(a, x, dy, dx);
  });
  invalidate_cache();
}

template <typename Scalar>
template <typename X>
void linear<Scalar>::adapter_backward(adapter_type& a, const X& x, Eigen::Ref<const matrix_type> dy,
                                      Eigen::Ref<matrix_type>* dx) {
  const Scalar s = a.m_scaling;
  if (m_dh_buffer.size() < a.m_h.size()) m_dh_buffer.resize(a.m_h.size());
  Eigen::Map<matrix_type> dh(m_dh_buffer.data(), a.m_h.rows(), a.m_h.cols());
  if (a.is_dora()) {
    m_dora.adapter_backward(a, a.m_dora_norm, a.m_h, dy, dh, a.m_grad_b, a.m_grad_magnitude);
  } else {
    a.m_grad_b.noalias() += (s * dy.transpose()) * a.m_h;  // dB += s dYᵀ H   (out x r)
    dh.noalias() = (s * dy) * a.m_b;                       // dH  = s dY B    (n x r)
  }
  if (!a.m_masked) {
    a.m_grad_a.noalias() += dh.transpose() * x;  // dA += dHᵀ X   (r x in)
    if (dx) dx->noalias() += dh * a.m_a;         // dX += dH A
    return;
  }
  rng replay;  // the forward's mask, redrawn
  replay.set_state(a.m_mask_state);
  draw_mask(replay, a.m_config.dropout, x.rows());
  m_xd = x.cwiseProduct(m_mask);
  a.m_grad_a.noalias() += dh.transpose() * m_xd;  // dA += dHᵀ drop(X)
  if (dx) {
    m_xd.noalias() = dh * a.m_a;  // dX += mask ⊙ (dH A)
    *dx += m_xd.cwiseProduct(m_mask);
  }
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
    // DoRA (this path allocates): the gains g_a = m_a / ‖W + s B A‖ and c = 1 + Σ (g_a − 1).
    std::vector<vector_type> gains;
    vector_type c;
    if (dora_participates()) c = vector_type::Ones(m_out);
    for (const auto& a : m_adapters) {
      if (!a.is_dora() || !participates(a)) continue;
      gains.push_back(a.m_magnitude.cwiseQuotient(dora_norm(a)));
      c += gains.back() - vector_type::Ones(m_out);
    }
    base_product(x, y, ws.quant);
    if (c.size() > 0) y = y * c.asDiagonal();
    if (has_bias()) y.rowwise() += m_bias.transpose();
    std::size_t next_gain = 0;
    for (const auto& a : m_adapters) {
      if (!participates(a)) continue;
      const auto need = static_cast<std::size_t>(x.rows() * a.rank());
      if (ws.buffer.size() < need) ws.buffer.resize(need);
      Eigen::Map<matrix_type> h(ws.buffer.data(), x.rows(), a.rank());
      h.noalias() = x * a.m_a.transpose();
      h *= a.m_scaling;  // s H in place: (s H) Bᵀ as an expression copies a row into a temporary when n = 1
      if (a.is_dora()) {
        const matrix_type g_b = gains[next_gain++].asDiagonal() * a.m_b;
        y.noalias() += h * g_b.transpose();
      } else {
        y.noalias() += h * a.m_b.transpose();
      }
    }
  });
}

}  // namespace lora

#include "detail/linear_core.hpp"
#include "detail/linear_quant.hpp"
#include "detail/linear_routed.hpp"
