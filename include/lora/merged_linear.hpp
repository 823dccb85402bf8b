// lora/merged_linear.hpp: loralib's MergedLinear, one frozen fused projection (q | k | v) whose output
// rows are split into k equal slices, with LoRA on the slices chosen by enable_lora.
//
//   Y[:, slice i] = X W_iᵀ + b_i + [enable_lora[i]] Σ_{a active, unmerged} s_a · (drop_a(X) A_{a,i}ᵀ) B_{a,i}ᵀ
//
// Shapes: W is out x in (or stored in x out, GPT-2's Conv1D / fan_in_fan_out), X is n x in, Y is n x out;
// slice i is rows [i m, (i+1) m) of W with m = out / k; A_{a,i} is r x in, B_{a,i} is m x r. With
// enable_lora = {true, false, true} a GPT-2 c_attn adapts q and v and leaves k frozen, as loralib does.
//
// Each slice is a lora::linear viewing its rows of the one fused weight (a block of the same memory: no
// copy, no transposition), so forward, backward, dropout, exact merge/unmerge and accounting are linear's,
// slice by slice. Merging adapter a writes s B_{a,i} A_{a,i} into the rows of slice i only. DoRA adapters
// (use_dora) work too: DoRA's norm is per output row, so a slice's magnitudes are its rows' (as for PEFT
// over the fused weight, restricted to the enabled slices).
//
// Differences from loralib, by design: loralib stores lora_A as one (r k') x in tensor and lora_B as one
// (m k') x r tensor over the k' enabled slices; here slice i's factors are separate parameters, named
// "<layer>.<i>.lora_A.<adapter>.weight" (stack them in slice order to get loralib's tensors). Each slice
// draws its own initialisation and dropout mask from seed config.seed + i (loralib shares one mask). With a
// single slice the slice linear is named "<layer>" itself.
//
// The same fused weight can also be adapted as one PEFT linear layer: lora::linear over it with
// weight_layout::in_out gives one A (r x in) and one B (out x r) spanning q, k and v (PEFT's view of c_attn).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "accounting.hpp"
#include "adapter.hpp"
#include "adapter_routing.hpp"
#include "config.hpp"
#include "detail/input_cache.hpp"
#include "detail/layer_checks.hpp"
#include "detail/row_blocks.hpp"
#include "error.hpp"
#include "layer.hpp"
#include "linear.hpp"
#include "parameter.hpp"

namespace lora {

template <typename Scalar_>
class merged_linear : public layer_base<merged_linear<Scalar_>, Scalar_> {
 public:
  using Scalar = Scalar_;
  using base_type = layer_base<merged_linear<Scalar_>, Scalar_>;
  using matrix_type = matrix<Scalar>;
  using vector_type = vector<Scalar>;
  using adapter_type = lora::adapter<Scalar>;
  using slice_type = linear<Scalar>;
  using row_major_matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  static_assert(std::is_floating_point_v<Scalar>, "lora::merged_linear needs a floating-point Scalar (float, double)");

  // --- construction ------------------------------------------------------------------------------

  /// Owns a copy of `weight` (out x in, or in x out with weight_layout::in_out). enable_lora has one entry
  /// per slice; out must be divisible by its length.
  template <typename Derived>
  merged_linear(const Eigen::MatrixBase<Derived>& weight, std::vector<bool> enable_lora,
                std::string name = "merged_linear", weight_layout layout = weight_layout::out_in);
  /// Owns copies of `weight` and `bias` (length out).
  template <typename Derived, typename BiasDerived>
  merged_linear(const Eigen::MatrixBase<Derived>& weight, const Eigen::MatrixBase<BiasDerived>& bias,
                std::vector<bool> enable_lora, std::string name = "merged_linear",
                weight_layout layout = weight_layout::out_in);
  /// Views a column-major weight in the user's memory (merge writes into it).
  merged_linear(view_t, Eigen::Ref<matrix_type, 0, Eigen::OuterStride<>> weight, std::vector<bool> enable_lora,
                std::string name = "merged_linear", weight_layout layout = weight_layout::out_in);
  /// Views a row-major weight in the user's memory (merge writes into it).
  merged_linear(view_t, Eigen::Ref<row_major_matrix, 0, Eigen::OuterStride<>> weight, std::vector<bool> enable_lora,
                std::string name = "merged_linear", weight_layout layout = weight_layout::out_in);
  // Slices view the owned weight's heap block, which a move hands over intact; a copy would not.
  merged_linear(merged_linear&&) = default;
  merged_linear& operator=(merged_linear&&) = default;
  merged_linear(const merged_linear&) = delete;
  merged_linear& operator=(const merged_linear&) = delete;

  /// Sets (copies) the frozen bias, length out.
  template <typename BiasDerived>
  void set_bias(const Eigen::MatrixBase<BiasDerived>& bias);

  // --- shape and weight access -------------------------------------------------------------------

  const std::string& name() const noexcept { return m_name; }
  index in_features() const noexcept { return m_in; }
  index out_features() const noexcept { return m_slice_out * num_slices(); }
  index num_slices() const noexcept { return static_cast<index>(m_slices.size()); }
  /// Rows per slice, out / k.
  index slice_features() const noexcept { return m_slice_out; }
  const std::vector<bool>& enable_lora() const noexcept { return m_enabled; }
  bool is_view() const noexcept { return m_owned.size() == 0 && slice(0).is_view(); }
  /// Re-stores every slice's rows as `type` (lora::linear::set_weight_storage: quantized, or qtype::f32 for
  /// plain owned rows); the fused float weight this layer owned is released. state_error while merged.
  void set_weight_storage(quant::qtype type);
  quant::qtype weight_storage() const noexcept { return m_slices.front().weight_storage(); }
  /// The frozen weight (including merged adapters) as a fresh out x in matrix.
  matrix_type weight() const;
  /// Slice i as a lora::linear over its rows of the fused weight (for inspection, DoRA-free extensions).
  const slice_type& slice(index i) const { return m_slices.at(static_cast<std::size_t>(i)); }

  // --- training (the adapter API, train/eval, parameters and merging come from layer_base) -------

  using workspace_type = inference_workspace<Scalar>;
  // forward(x) -> Y, backward(dy) -> dX and infer(x) -> Y, allocating their results, come from layer_base.
  using base_type::backward;
  using base_type::forward;
  using base_type::infer;

  /// Training forward taking ownership of X (safe for temporaries).
  matrix_type forward(matrix_type&& x);
  /// Training forward into a caller-sized y (n x out); caches a view of X (X must outlive backward).
  template <typename Derived>
  void forward(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y);

  /// Backward: accumulates every slice's dA, dB and writes dX = Σ_i dX_i (n x in).
  template <typename Derived>
  void backward(const Eigen::MatrixBase<Derived>& dy, Eigen::Ref<matrix_type> dx);
  /// Backward for the adapters' gradients only (no dX GEMMs).
  template <typename Derived>
  void backward_params_only(const Eigen::MatrixBase<Derived>& dy);

  // --- inference ---------------------------------------------------------------------------------

  template <typename Derived>
  void infer(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y, inference_workspace<Scalar>& ws) const;
  /// Const inference of a batch whose rows use different adapters (adapter_routing.hpp): each slice as
  /// linear::infer with the routing; slices without adapters run the base alone.
  template <typename Derived>
  void infer(const Eigen::MatrixBase<Derived>& x, const adapter_routing& routing, Eigen::Ref<matrix_type> y,
             inference_workspace<Scalar>& ws) const;

 private:
  friend base_type;

  // --- what layer_base asks of a layer: one part per slice; the enabled ones take adapters -------
  static constexpr bool multi_part = true;
  static constexpr const char* part_noun = "slice";
  static constexpr const char* part_rule = " (enable_lora set)";
  index num_parts() const noexcept { return num_slices(); }
  linear<Scalar>& part(index i) { return m_slices[static_cast<std::size_t>(i)]; }
  const linear<Scalar>& part(index i) const { return m_slices[static_cast<std::size_t>(i)]; }
  bool takes_adapters(index i) const { return m_enabled[static_cast<std::size_t>(i)]; }
  std::string where() const { return "merged_linear '" + m_name + "'"; }
  void on_adapters_changed() { m_has_cache = false; }
  void check_adapter_config(const std::string& name, const adapter_config& config) const;
  /// Slice i draws its initialisation and dropout from seed + i.
  adapter_config part_config(const adapter_config& c, index i) const {
    adapter_config out = c;
    out.seed = c.seed + static_cast<std::uint64_t>(i);
    return out;
  }
  void add_cache_bytes(parameter_report& r) const {
    if (m_has_cache) r.cache_bytes += static_cast<std::int64_t>(m_x.owned_bytes());
  }

  /// Checks enable_lora against out and builds one view linear per slice over `stored`, the memory of W
  /// (out x in) or, with in_out, of Wᵀ (in x out).
  template <typename StoredRef>
  void make_slices(StoredRef stored, weight_layout layout);
  void check_input(index rows, index cols) const;
  /// The training forward once X is bound.
  void run_forward(Eigen::Ref<matrix_type> y);
  void run_backward(Eigen::Ref<const matrix_type> dy, Eigen::Ref<matrix_type>* dx);

  std::string m_name;
  index m_in = 0, m_slice_out = 0;
  std::vector<bool> m_enabled;
  matrix_type m_owned;  // the fused weight as given, when owned; empty for a view
  std::vector<slice_type> m_slices;
  detail::input_cache<Scalar> m_x;
  bool m_has_cache = false;
  matrix_type m_dx_slice;  // n x in workspace
};

// ---------------------------------------------------------------------------------------------------
// construction

template <typename Scalar>
template <typename StoredRef>
void merged_linear<Scalar>::make_slices(StoredRef stored, weight_layout layout) {
  const bool in_out = layout == weight_layout::in_out;
  const index out = in_out ? stored.cols() : stored.rows();
  m_in = in_out ? stored.rows() : stored.cols();
  const auto k = static_cast<index>(m_enabled.size());
  if (k == 0) throw config_error(where() + ": enable_lora must have one entry per slice, got an empty list");
  if (out == 0 || m_in == 0 || out % k != 0)
    throw shape_error(detail::cat(where(), ": expected out_features divisible by len(enable_lora) = ", k,
                                  " and a non-empty weight, got ", detail::shape_str(out, m_in), " (out x in)"));
  m_slice_out = out / k;
  m_slices = detail::row_blocks<Scalar>(stored, layout, k, m_name);
}

template <typename Scalar>
template <typename Derived>
merged_linear<Scalar>::merged_linear(const Eigen::MatrixBase<Derived>& weight, std::vector<bool> enable_lora,
                                     std::string name, weight_layout layout)
    : m_name(std::move(name)), m_enabled(std::move(enable_lora)), m_owned(weight) {
  detail::expect_same_scalar<Scalar, typename Derived::Scalar>();
  make_slices(Eigen::Ref<matrix_type, 0, Eigen::OuterStride<>>(m_owned), layout);
}

template <typename Scalar>
template <typename Derived, typename BiasDerived>
merged_linear<Scalar>::merged_linear(const Eigen::MatrixBase<Derived>& weight,
                                     const Eigen::MatrixBase<BiasDerived>& bias, std::vector<bool> enable_lora,
                                     std::string name, weight_layout layout)
    : merged_linear(weight, std::move(enable_lora), std::move(name), layout) {
  set_bias(bias);
}

template <typename Scalar>
merged_linear<Scalar>::merged_linear(view_t, Eigen::Ref<matrix_type, 0, Eigen::OuterStride<>> weight,
                                     std::vector<bool> enable_lora, std::string name, weight_layout layout)
    : m_name(std::move(name)), m_enabled(std::move(enable_lora)) {
  make_slices(weight, layout);
}

template <typename Scalar>
merged_linear<Scalar>::merged_linear(view_t, Eigen::Ref<row_major_matrix, 0, Eigen::OuterStride<>> weight,
                                     std::vector<bool> enable_lora, std::string name, weight_layout layout)
    : m_name(std::move(name)), m_enabled(std::move(enable_lora)) {
  make_slices(weight, layout);
}

template <typename Scalar>
template <typename BiasDerived>
void merged_linear<Scalar>::set_bias(const Eigen::MatrixBase<BiasDerived>& bias) {
  if (bias.size() != out_features() || (bias.rows() != 1 && bias.cols() != 1))
    throw shape_error(detail::cat(where(), ": bias must be a vector of length out_features = ", out_features(),
                                  ", got ", detail::shape_str(bias.rows(), bias.cols())));
  const vector_type b = bias.reshaped();
  for (index i = 0; i < num_slices(); ++i)
    m_slices[static_cast<std::size_t>(i)].set_bias(b.segment(i * m_slice_out, m_slice_out));
}

template <typename Scalar>
typename merged_linear<Scalar>::matrix_type merged_linear<Scalar>::weight() const {
  matrix_type w(out_features(), m_in);
  for (index i = 0; i < num_slices(); ++i) w.middleRows(i * m_slice_out, m_slice_out) = slice(i).weight();
  return w;
}

template <typename Scalar>
void merged_linear<Scalar>::set_weight_storage(quant::qtype type) {
  if (this->merged())
    throw state_error(detail::cat(where(), ": cannot change the weight's storage to ", quant::qtype_name(type),
                                  " while adapters are merged; unmerge() first"));
  // Check the format on the first slice's shape before any slice changes (all slices share it).
  if (type != quant::qtype::f32) (void)quant::quantized_matrix::quantize(slice(0).weight().topRows(1), type);
  for (auto& s : m_slices) s.set_weight_storage(type);
  // Quantized slices own their codes (and back in f32 their own rows): nothing views m_owned any more.
  if (type != quant::qtype::f32) m_owned.resize(0, 0);
}

template <typename Scalar>
void merged_linear<Scalar>::check_adapter_config(const std::string&, const adapter_config&) const {
  if (std::find(m_enabled.begin(), m_enabled.end(), true) == m_enabled.end())
    throw config_error(where() + ": no slice has enable_lora set, so there is nothing to adapt");
}

// ---------------------------------------------------------------------------------------------------
// forward and backward

template <typename Scalar>
void merged_linear<Scalar>::check_input(index rows, index cols) const {
  if (cols != m_in)
    throw shape_error(detail::cat(where(), ": input X must have in_features = ", m_in, " columns (n x ", m_in,
                                  "), got ", detail::shape_str(rows, cols)));
}

template <typename Scalar>
typename merged_linear<Scalar>::matrix_type merged_linear<Scalar>::forward(matrix_type&& x) {
  check_input(x.rows(), x.cols());
  matrix_type y(x.rows(), out_features());
  m_x.bind_owned(std::move(x));
  run_forward(y);
  return y;
}

template <typename Scalar>
template <typename Derived>
void merged_linear<Scalar>::forward(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y) {
  detail::expect_same_scalar<Scalar, typename Derived::Scalar>();
  check_input(x.rows(), x.cols());
  detail::expect_shape([this] { return where(); }, "output Y", x.rows(), out_features(), y.rows(), y.cols());
  m_x.bind(x);  // one view (or one copy of an expression) that every slice then views
  run_forward(y);
}

template <typename Scalar>
void merged_linear<Scalar>::run_forward(Eigen::Ref<matrix_type> y) {
  m_x.visit([&](const auto& x) {
    for (index i = 0; i < num_slices(); ++i)
      m_slices[static_cast<std::size_t>(i)].forward(x, y.middleCols(i * m_slice_out, m_slice_out));
  });
  m_has_cache = true;
}

template <typename Scalar>
template <typename Derived>
void merged_linear<Scalar>::backward(const Eigen::MatrixBase<Derived>& dy, Eigen::Ref<matrix_type> dx) {
  detail::expect_same_scalar<Scalar, typename Derived::Scalar>();
  detail::expect_shape([this] { return where(); }, "dX", dy.rows(), m_in, dx.rows(), dx.cols());
  run_backward(dy, &dx);
}

template <typename Scalar>
template <typename Derived>
void merged_linear<Scalar>::backward_params_only(const Eigen::MatrixBase<Derived>& dy) {
  detail::expect_same_scalar<Scalar, typename Derived::Scalar>();
  run_backward(dy, nullptr);
}

template <typename Scalar>
void merged_linear<Scalar>::run_backward(Eigen::Ref<const matrix_type> dy, Eigen::Ref<matrix_type>* dx) {
  detail::expect_forward_cache([this] { return where(); }, m_has_cache);
  detail::expect_shape([this] { return where(); }, "dY", m_x.rows(), out_features(), dy.rows(), dy.cols(),
                       " (the forward's n x out_features)");
  // dX = Σ_i dY[:, slice i] W_i (+ slice i's adapter terms).
  for (index i = 0; i < num_slices(); ++i) {
    slice_type& s = m_slices[static_cast<std::size_t>(i)];
    const auto dy_i = dy.middleCols(i * m_slice_out, m_slice_out);
    if (!dx) {
      s.backward_params_only(dy_i);
    } else if (i == 0) {
      s.backward(dy_i, *dx);
    } else {
      m_dx_slice.resize(dy.rows(), m_in);
      s.backward(dy_i, m_dx_slice);
      *dx += m_dx_slice;
    }
  }
  m_has_cache = false;
  m_x.clear();
}

// ---------------------------------------------------------------------------------------------------
// inference

template <typename Scalar>
template <typename Derived>
void merged_linear<Scalar>::infer(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y,
                                  inference_workspace<Scalar>& ws) const {
  check_input(x.rows(), x.cols());
  detail::expect_shape([this] { return where(); }, "output Y", x.rows(), out_features(), y.rows(), y.cols());
  detail::input_cache<Scalar> view;  // a view for matrices, maps and blocks; one copy for other expressions
  view.bind(x);
  view.visit([&](const auto& xv) {
    for (index i = 0; i < num_slices(); ++i) slice(i).infer(xv, y.middleCols(i * m_slice_out, m_slice_out), ws);
  });
}

template <typename Scalar>
template <typename Derived>
void merged_linear<Scalar>::infer(const Eigen::MatrixBase<Derived>& x, const adapter_routing& routing,
                                  Eigen::Ref<matrix_type> y, inference_workspace<Scalar>& ws) const {
  check_input(x.rows(), x.cols());
  detail::expect_shape([this] { return where(); }, "output Y", x.rows(), out_features(), y.rows(), y.cols());
  this->check_routing(routing, x.rows());  // once, against the slices that take adapters
  detail::input_cache<Scalar> view;
  view.bind(x);
  for (index i = 0; i < num_slices(); ++i)
    slice(i).run_infer_routed(view, routing, y.middleCols(i * m_slice_out, m_slice_out), ws);
}

}  // namespace lora
