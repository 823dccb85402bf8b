// lora/conv2d.hpp: a frozen 2-D convolution carrying named LoRA adapters (PEFT's lora.Conv2d).
//
// Layout: a batch X holds one image per row, each flattened in NCHW order (PyTorch's contiguous layout):
// X is n x (C H W) with X(s, (c H + y) W + x) = image s, channel c, pixel (y, x). The output Y is n x
// (O Ho Wo) in the same order. The kernel W is O x (C/g · kh · kw), PyTorch's (O, C/g, kh, kw) weight
// read as a matrix (a row-major view of a PyTorch tensor needs no copy).
//
// The convolution is im2col + GEMM. Unfolding X gives Col (n Ho Wo x C kh kw): row p = (s, y, x) holds
// the receptive field of output pixel (y, x) of image s, column (c kh + i) kw + j holds
// X_s(c, y sh − ph + i dh, x sw − pw + j dw), zero in the padding. Then, per group γ (O/g output channels
// reading C/g input channels),
//   Yp[:, γ] = Col[:, γ] W_γᵀ + b_γ                     (n Ho Wo x O/g)
// and Y is Yp with its rows (s, pixel) and columns (channel) rearranged to NCHW. So the layer runs at GEMM
// speed, and each group is a lora::linear over Col's rows: training, merging and accounting are linear's.
//
// LoRA (PEFT, groups = 1): A is a conv with the base kernel, stride, padding and dilation (C -> r,
// r x C kh kw as a matrix), B a 1x1 conv (r -> O, O x r). On Col that is exactly a linear adapter:
//   Yp += s (drop(Col) Aᵀ) Bᵀ,   ΔW = s B A   (O x C kh kw, PEFT's get_delta_weight reshaped),
// so dA, dB and dCol come from linear, and dX = col2im(dCol) sums each patch gradient back into the pixels
// it was read from. DoRA (use_dora) comes from linear too: its norm per row of W + s B A is PEFT's conv
// DoRA norm per output channel over (C, kh, kw). Differences from PEFT, by design: PEFT's lora_A does not take the base
// layer's dilation (so for a dilated layer its path is not a delta of the dilated kernel); here A uses it, so dilated
// convolutions merge like any other. PEFT's dropout
// drops input pixels before lora_A; here it drops entries of Col (each use of a pixel independently, the
// same expectation). Grouped convolutions (groups > 1) run and backpropagate, but take no adapters:
// PEFT's grouped form (a full-channel A with a grouped B) cannot be merged into the grouped kernel, and
// PEFT refuses to merge it; a layer here must merge exactly.
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
#include "detail/layer_checks.hpp"
#include "detail/row_blocks.hpp"
#include "error.hpp"
#include "layer.hpp"
#include "linear.hpp"
#include "parameter.hpp"

namespace lora {

/// A (height, width) pair: kernel size, stride, padding, dilation, image size.
struct size2d {
  index h = 1;
  index w = 1;
};

/// Everything of an nn.Conv2d besides its weight and bias, plus the input image size.
struct conv2d_options {
  index in_channels = 1;  ///< C
  size2d input{};         ///< H x W of every input image
  size2d kernel{};        ///< kh x kw
  size2d stride{};
  size2d padding{0, 0};  ///< zeros added on each side
  size2d dilation{};
  index groups = 1;  ///< C and O must both be divisible by it
};

/// Scratch memory for conv2d::infer; one per thread.
template <typename Scalar>
struct conv2d_workspace {
  matrix<Scalar> xt, col, yp;
  inference_workspace<Scalar> linear;
  adapter_routing pixels;  // a routed batch: each sample's routing repeated over its output pixels
};

namespace detail {

/// One convolution's sizes, checked: C x H x W images, kh x kw kernel, Ho x Wo outputs.
struct conv_geometry {
  index c = 0, h = 0, w = 0, kh = 0, kw = 0, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1, oh = 0, ow = 0;
  index image() const { return c * h * w; }    // features of one input image
  index patch() const { return c * kh * kw; }  // columns of Col
  index pixels() const { return oh * ow; }     // output pixels of one image
};

/// Unfolds (Gather) or folds back (!Gather) between images and Col, for n images:
///   Gather:  Col(s Ho Wo + y Wo + x, (c kh + i) kw + j) = X_s(c, y sh − ph + i dh, x sw − pw + j dw), 0 in
///            the padding (im2col);
///   !Gather: X_s(c, ...) += Col(...) over the same pairs (col2im, the adjoint: Σ over every patch use).
/// xt is Xᵀ (C H W x n, one image per column, column-major), col is n Ho Wo x C kh kw column-major.
template <bool Gather, typename ImagePtr, typename ColPtr>
void unfold(const conv_geometry& g, index n, ImagePtr xt, ColPtr col);

}  // namespace detail

template <typename Scalar_>
class conv2d : public layer_base<conv2d<Scalar_>, Scalar_> {
 public:
  using Scalar = Scalar_;
  using base_type = layer_base<conv2d<Scalar_>, Scalar_>;
  using matrix_type = matrix<Scalar>;
  using vector_type = vector<Scalar>;
  using adapter_type = lora::adapter<Scalar>;
  using group_type = linear<Scalar>;
  using row_major_matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  static_assert(std::is_floating_point_v<Scalar>, "lora::conv2d needs a floating-point Scalar (float, double)");

  // --- construction ------------------------------------------------------------------------------

  /// Owns a copy of `weight` (O x C/g kh kw).
  template <typename Derived>
  conv2d(const Eigen::MatrixBase<Derived>& weight, const conv2d_options& options, std::string name = "conv2d");
  /// Owns copies of `weight` and `bias` (length O).
  template <typename Derived, typename BiasDerived>
  conv2d(const Eigen::MatrixBase<Derived>& weight, const Eigen::MatrixBase<BiasDerived>& bias,
         const conv2d_options& options, std::string name = "conv2d");
  /// Views a row-major kernel (PyTorch's contiguous (O, C/g, kh, kw) weight) in the user's memory.
  conv2d(view_t, Eigen::Ref<row_major_matrix, 0, Eigen::OuterStride<>> weight, const conv2d_options& options,
         std::string name = "conv2d");
  /// Views a column-major kernel (O x C/g kh kw) in the user's memory.
  conv2d(view_t, Eigen::Ref<matrix_type, 0, Eigen::OuterStride<>> weight, const conv2d_options& options,
         std::string name = "conv2d");
  // Groups view the owned kernel's heap block, which a move hands over intact; a copy would not.
  conv2d(conv2d&&) = default;
  conv2d& operator=(conv2d&&) = default;
  conv2d(const conv2d&) = delete;
  conv2d& operator=(const conv2d&) = delete;

  /// Sets (copies) the frozen bias, length O.
  template <typename BiasDerived>
  void set_bias(const Eigen::MatrixBase<BiasDerived>& bias);
  /// Changes the input image size (kernel and adapters stay); shape_error if no output pixel remains.
  void set_input_size(size2d input);

  // --- shape and weight access -------------------------------------------------------------------

  const std::string& name() const noexcept { return m_name; }
  const conv2d_options& options() const noexcept { return m_options; }
  index in_channels() const noexcept { return m_geom.c; }
  index out_channels() const noexcept { return m_out; }
  size2d output_size() const noexcept { return {m_geom.oh, m_geom.ow}; }
  /// Columns of X: C H W.
  index in_features() const noexcept { return m_geom.image(); }
  /// Columns of Y: O Ho Wo.
  index out_features() const noexcept { return m_out * m_geom.pixels(); }
  bool is_view() const noexcept { return m_owned.size() == 0; }
  /// The frozen kernel (including merged adapters) as a fresh O x C/g kh kw matrix.
  matrix_type weight() const;

  // --- training ----------------------------------------------------------------------------------
  // The adapter API comes from layer_base (groups = 1 only): A (r x C kh kw, PEFT's [r, C, kh, kw],
  // kaiming-uniform bound 1/sqrt(C kh kw)) and B (O x r, PEFT's [O, r, 1, 1]), named
  // "<layer>.lora_A.<adapter>.weight" and "<layer>.lora_B.<adapter>.weight".

  using workspace_type = conv2d_workspace<Scalar>;
  // forward(x) -> Y, backward(dy) -> dX and infer(x) -> Y, allocating their results, come from layer_base.
  using base_type::backward;
  using base_type::forward;
  using base_type::infer;

  /// Training forward into a caller-sized y (n x O Ho Wo); caches Col for backward.
  template <typename Derived>
  void forward(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y);

  /// Backward: accumulates dA, dB and writes dX (n x C H W).
  template <typename Derived>
  void backward(const Eigen::MatrixBase<Derived>& dy, Eigen::Ref<matrix_type> dx);
  /// Backward for the adapters' gradients only (no dCol GEMM, no col2im).
  template <typename Derived>
  void backward_params_only(const Eigen::MatrixBase<Derived>& dy);

  // --- inference ---------------------------------------------------------------------------------

  template <typename Derived>
  void infer(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y, conv2d_workspace<Scalar>& ws) const;
  /// Const inference of a batch whose images (rows of X) use different adapters (adapter_routing.hpp, one
  /// entry per image): each group's rows of im2col(X) as linear::infer with the routing.
  template <typename Derived>
  void infer(const Eigen::MatrixBase<Derived>& x, const adapter_routing& routing, Eigen::Ref<matrix_type> y,
             conv2d_workspace<Scalar>& ws) const;

 private:
  friend base_type;

  // --- what layer_base asks of a layer: one part per group; only an ungrouped kernel takes adapters -
  static constexpr const char* part_noun = "group";
  static constexpr const char* part_rule = " (groups = 1)";
  index num_parts() const noexcept { return static_cast<index>(m_groups.size()); }
  linear<Scalar>& part(index i) { return m_groups[static_cast<std::size_t>(i)]; }
  const linear<Scalar>& part(index i) const { return m_groups[static_cast<std::size_t>(i)]; }
  bool takes_adapters(index) const noexcept { return m_options.groups == 1; }
  std::string where() const { return "conv2d '" + m_name + "'"; }
  void on_adapters_changed() { m_has_cache = false; }
  void check_adapter_config(const std::string& name, const adapter_config& config) const;
  void add_cache_bytes(parameter_report& r) const {
    if (m_has_cache) r.cache_bytes += static_cast<std::int64_t>(m_col.size() * sizeof(Scalar));
  }

  /// Checks the options against the kernel (O x cols) and sets m_geom.
  void set_geometry(index out, index cols);
  template <typename StoredRef>
  void make_groups(StoredRef stored);
  void check_input(index rows, index cols) const;
  /// Y = conv(X) through apply(γ, Col[:, γ], Yp[:, γ]) per group, with xt, col, yp as workspaces: the
  /// steps forward and infer share.
  template <typename Derived, typename Apply>
  void convolve(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y, matrix_type& xt, matrix_type& col,
                matrix_type& yp, Apply&& apply) const;
  void invalidate_cache() { m_has_cache = false; }
  /// xt = Xᵀ, col = im2col(X).
  template <typename Derived>
  void unfold_input(const Eigen::MatrixBase<Derived>& x, matrix_type& xt, matrix_type& col) const;
  /// Y (n x O Ho Wo, NCHW) from Yp (n Ho Wo x O), and back.
  void to_images(const matrix_type& yp, index n, Eigen::Ref<matrix_type> y) const;
  void to_pixels(const Eigen::Ref<const matrix_type>& dy, matrix_type& dyp) const;
  void run_backward(Eigen::Ref<const matrix_type> dy, Eigen::Ref<matrix_type>* dx);

  std::string m_name;
  conv2d_options m_options;
  detail::conv_geometry m_geom;
  index m_out = 0;
  matrix_type m_owned;               // the kernel, when owned; empty for a view
  std::vector<group_type> m_groups;  // group γ: rows [γ O/g, (γ+1) O/g) of W
  // Training state: Col (viewed by the groups until backward) and workspaces reused across steps.
  matrix_type m_xt, m_col, m_yp, m_dcol;
  index m_n = 0;
  bool m_has_cache = false;
};

// ---------------------------------------------------------------------------------------------------
// im2col / col2im

namespace detail {

/// The output columns x of kernel column j whose input column x sw − pw + j dw lies in [0, W): [lo, hi).
inline std::pair<index, index> valid_columns(const conv_geometry& g, index j) {
  const index left = g.pw - j * g.dw;             // x sw >= left
  const index right = g.w - 1 + g.pw - j * g.dw;  // x sw <= right
  const index lo = std::min(g.ow, left <= 0 ? index{0} : (left + g.sw - 1) / g.sw);
  const index hi = std::max(lo, std::min(g.ow, right < 0 ? index{0} : right / g.sw + 1));
  return {lo, hi};
}

/// One output row (ow entries of Col) of one kernel tap: Gather copies input row `row` (null in the padding)
/// at columns x sw + shift for x in [lo, hi), zeros elsewhere; !Gather adds the row back into the image.
template <bool Gather, typename RunPtr, typename RowPtr>
void unfold_row(RunPtr run, RowPtr row, index ow, std::pair<index, index> valid, index sw, index shift) {
  const auto [lo, hi] = valid;
  if constexpr (Gather) {
    if (!row) {
      std::fill(run, run + ow, 0);
      return;
    }
    std::fill(run, run + lo, 0);
    for (index x = lo; x < hi; ++x) run[x] = row[x * sw + shift];
    std::fill(run + hi, run + ow, 0);
  } else {
    if (!row) return;
    for (index x = lo; x < hi; ++x) row[x * sw + shift] += run[x];
  }
}

/// The column of Col for kernel tap (c, i, j), over every image and output row.
template <bool Gather, typename ImagePtr, typename ColPtr>
void unfold_tap(const conv_geometry& g, index n, ImagePtr xt, ColPtr col, index c, index i, index j) {
  const index rows = n * g.pixels();
  const auto colk = col + ((c * g.kh + i) * g.kw + j) * rows;
  const auto valid = valid_columns(g, j);
  const index shift = j * g.dw - g.pw;
  for (index s = 0; s < n; ++s) {
    const auto plane = xt + s * g.image() + c * g.h * g.w;
    for (index y = 0; y < g.oh; ++y) {
      const index iy = y * g.sh - g.ph + i * g.dh;
      const auto row = iy >= 0 && iy < g.h ? plane + iy * g.w : nullptr;
      unfold_row<Gather>(colk + (s * g.oh + y) * g.ow, row, g.ow, valid, g.sw, shift);
    }
  }
}

template <bool Gather, typename ImagePtr, typename ColPtr>
void unfold(const conv_geometry& g, index n, ImagePtr xt, ColPtr col) {
  for (index c = 0; c < g.c; ++c)
    for (index i = 0; i < g.kh; ++i)
      for (index j = 0; j < g.kw; ++j) unfold_tap<Gather>(g, n, xt, col, c, i, j);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------------
// construction

template <typename Scalar>
void conv2d<Scalar>::set_geometry(index out, index cols) {
  const conv2d_options& o = m_options;
  const index g = o.groups;
  auto positive = [&](const char* what, size2d v, index min) {
    if (v.h < min || v.w < min)
      throw config_error(detail::cat(where(), ": expected ", what, " >= ", min, ", got ", v.h, "x", v.w));
  };
  positive("kernel", o.kernel, 1);
  positive("stride", o.stride, 1);
  positive("dilation", o.dilation, 1);
  positive("padding", o.padding, 0);
  positive("input size", o.input, 1);
  if (g < 1 || o.in_channels < 1 || o.in_channels % g != 0 || out % g != 0)
    throw config_error(detail::cat(where(), ": expected in_channels and out_channels divisible by groups >= 1, got ",
                                   o.in_channels, " and ", out, " with groups = ", g));
  const index patch = o.in_channels / g * o.kernel.h * o.kernel.w;
  if (cols != patch || out < 1)
    throw shape_error(detail::cat(where(), ": expected a kernel of O x (C/g kh kw) = ", out, "x", patch,
                                  " (C = ", o.in_channels, ", g = ", g, ", ", o.kernel.h, "x", o.kernel.w,
                                  " kernel), got ", detail::shape_str(out, cols)));
  detail::conv_geometry geo;
  geo.c = o.in_channels;
  geo.h = o.input.h;
  geo.w = o.input.w;
  geo.kh = o.kernel.h;
  geo.kw = o.kernel.w;
  geo.sh = o.stride.h;
  geo.sw = o.stride.w;
  geo.ph = o.padding.h;
  geo.pw = o.padding.w;
  geo.dh = o.dilation.h;
  geo.dw = o.dilation.w;
  // PyTorch: Ho = floor((H + 2 ph − dh (kh − 1) − 1) / sh) + 1.
  const index span_h = geo.h + 2 * geo.ph - geo.dh * (geo.kh - 1) - 1;
  const index span_w = geo.w + 2 * geo.pw - geo.dw * (geo.kw - 1) - 1;
  if (span_h < 0 || span_w < 0)
    throw shape_error(detail::cat(where(), ": the dilated ", geo.kh, "x", geo.kw, " kernel does not fit the padded ",
                                  geo.h, "x", geo.w, " input"));
  geo.oh = span_h / geo.sh + 1;
  geo.ow = span_w / geo.sw + 1;
  m_geom = geo;
  m_out = out;
}

template <typename Scalar>
template <typename StoredRef>
void conv2d<Scalar>::make_groups(StoredRef stored) {
  set_geometry(stored.rows(), stored.cols());
  m_groups = detail::row_blocks<Scalar>(stored, weight_layout::out_in, m_options.groups, m_name);
}

template <typename Scalar>
template <typename Derived>
conv2d<Scalar>::conv2d(const Eigen::MatrixBase<Derived>& weight, const conv2d_options& options, std::string name)
    : m_name(std::move(name)), m_options(options), m_owned(weight) {
  detail::expect_same_scalar<Scalar, typename Derived::Scalar>();
  make_groups(Eigen::Ref<matrix_type, 0, Eigen::OuterStride<>>(m_owned));
}

template <typename Scalar>
template <typename Derived, typename BiasDerived>
conv2d<Scalar>::conv2d(const Eigen::MatrixBase<Derived>& weight, const Eigen::MatrixBase<BiasDerived>& bias,
                       const conv2d_options& options, std::string name)
    : conv2d(weight, options, std::move(name)) {
  set_bias(bias);
}

template <typename Scalar>
conv2d<Scalar>::conv2d(view_t, Eigen::Ref<row_major_matrix, 0, Eigen::OuterStride<>> weight,
                       const conv2d_options& options, std::string name)
    : m_name(std::move(name)), m_options(options) {
  make_groups(weight);
}

template <typename Scalar>
conv2d<Scalar>::conv2d(view_t, Eigen::Ref<matrix_type, 0, Eigen::OuterStride<>> weight, const conv2d_options& options,
                       std::string name)
    : m_name(std::move(name)), m_options(options) {
  make_groups(weight);
}

template <typename Scalar>
template <typename BiasDerived>
void conv2d<Scalar>::set_bias(const Eigen::MatrixBase<BiasDerived>& bias) {
  if (bias.size() != m_out || (bias.rows() != 1 && bias.cols() != 1))
    throw shape_error(detail::cat(where(), ": bias must be a vector of length out_channels = ", m_out, ", got ",
                                  detail::shape_str(bias.rows(), bias.cols())));
  const vector_type b = bias.reshaped();
  const index per = m_out / m_options.groups;
  for (index g = 0; g < m_options.groups; ++g) m_groups[static_cast<std::size_t>(g)].set_bias(b.segment(g * per, per));
}

template <typename Scalar>
void conv2d<Scalar>::set_input_size(size2d input) {
  const conv2d_options old = m_options;
  m_options.input = input;
  try {
    set_geometry(m_out, m_groups.front().in_features());  // sets m_geom only once every check passed
  } catch (...) {
    m_options = old;
    throw;
  }
  invalidate_cache();
}

template <typename Scalar>
typename conv2d<Scalar>::matrix_type conv2d<Scalar>::weight() const {
  const index per = m_out / m_options.groups;
  matrix_type w(m_out, m_groups.front().in_features());
  for (index g = 0; g < m_options.groups; ++g)
    w.middleRows(g * per, per) = m_groups[static_cast<std::size_t>(g)].weight();
  return w;
}

// ---------------------------------------------------------------------------------------------------
// adapters

template <typename Scalar>
void conv2d<Scalar>::check_adapter_config(const std::string&, const adapter_config&) const {
  if (m_options.groups != 1)
    throw config_error(detail::cat(
        where(), ": expected groups = 1 for LoRA, got groups = ", m_options.groups,
        "; PEFT's grouped form (a full-channel lora_A with a grouped lora_B) cannot be merged into a grouped "
        "kernel, so this layer stays frozen"));
}

// ---------------------------------------------------------------------------------------------------
// forward and backward

template <typename Scalar>
void conv2d<Scalar>::check_input(index rows, index cols) const {
  if (cols != in_features())
    throw shape_error(detail::cat(where(), ": input X must have C H W = ", m_geom.c, "*", m_geom.h, "*", m_geom.w,
                                  " = ", in_features(), " columns (one NCHW image per row), got ",
                                  detail::shape_str(rows, cols)));
}

template <typename Scalar>
template <typename Derived>
void conv2d<Scalar>::unfold_input(const Eigen::MatrixBase<Derived>& x, matrix_type& xt, matrix_type& col) const {
  xt.noalias() = x.transpose();  // one image per column: each channel plane is contiguous
  col.resize(x.rows() * m_geom.pixels(), m_geom.patch());
  detail::unfold<true>(m_geom, x.rows(), static_cast<const Scalar*>(xt.data()), col.data());
}

template <typename Scalar>
void conv2d<Scalar>::to_images(const matrix_type& yp, index n, Eigen::Ref<matrix_type> y) const {
  // Column o of Yp, read as pixels x n, is channel o of every image.
  const index pixels = m_geom.pixels();
  for (index o = 0; o < m_out; ++o)
    y.middleCols(o * pixels, pixels) = Eigen::Map<const matrix_type>(yp.col(o).data(), pixels, n).transpose();
}

template <typename Scalar>
void conv2d<Scalar>::to_pixels(const Eigen::Ref<const matrix_type>& dy, matrix_type& dyp) const {
  const index pixels = m_geom.pixels();
  dyp.resize(dy.rows() * pixels, m_out);
  for (index o = 0; o < m_out; ++o)
    Eigen::Map<matrix_type>(dyp.col(o).data(), pixels, dy.rows()) = dy.middleCols(o * pixels, pixels).transpose();
}

template <typename Scalar>
template <typename Derived, typename Apply>
void conv2d<Scalar>::convolve(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y, matrix_type& xt,
                              matrix_type& col, matrix_type& yp, Apply&& apply) const {
  detail::expect_same_scalar<Scalar, typename Derived::Scalar>();
  check_input(x.rows(), x.cols());
  detail::expect_shape([this] { return where(); }, "output Y", x.rows(), out_features(), y.rows(), y.cols(),
                       [this] { return detail::cat(" (n x O Ho Wo = ", m_out, "*", m_geom.oh, "*", m_geom.ow, ")"); });
  unfold_input(x, xt, col);
  yp.resize(col.rows(), m_out);
  const index k = m_groups.front().in_features(), per = m_out / m_options.groups;
  for (index g = 0; g < m_options.groups; ++g) apply(g, col.middleCols(g * k, k), yp.middleCols(g * per, per));
  to_images(yp, x.rows(), y);
}

template <typename Scalar>
template <typename Derived>
void conv2d<Scalar>::forward(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y) {
  // Each group keeps a view of its columns of m_col for backward.
  convolve(x, y, m_xt, m_col, m_yp,
           [this](index g, const auto& col, auto yp) { m_groups[static_cast<std::size_t>(g)].forward(col, yp); });
  m_n = x.rows();
  m_has_cache = true;
}

template <typename Scalar>
template <typename Derived>
void conv2d<Scalar>::backward(const Eigen::MatrixBase<Derived>& dy, Eigen::Ref<matrix_type> dx) {
  detail::expect_same_scalar<Scalar, typename Derived::Scalar>();
  detail::expect_shape([this] { return where(); }, "dX", dy.rows(), in_features(), dx.rows(), dx.cols());
  run_backward(dy, &dx);
}

template <typename Scalar>
template <typename Derived>
void conv2d<Scalar>::backward_params_only(const Eigen::MatrixBase<Derived>& dy) {
  detail::expect_same_scalar<Scalar, typename Derived::Scalar>();
  run_backward(dy, nullptr);
}

template <typename Scalar>
void conv2d<Scalar>::run_backward(Eigen::Ref<const matrix_type> dy, Eigen::Ref<matrix_type>* dx) {
  detail::expect_forward_cache([this] { return where(); }, m_has_cache);
  detail::expect_shape([this] { return where(); }, "dY", m_n, out_features(), dy.rows(), dy.cols(),
                       " (the forward's n x O Ho Wo)");
  matrix_type& dyp = m_yp;  // Yp is no longer needed: reuse it for dYp (n Ho Wo x O)
  to_pixels(dy, dyp);
  const index k = m_groups.front().in_features(), per = m_out / m_options.groups;
  if (!dx) {
    for (index g = 0; g < m_options.groups; ++g)
      m_groups[static_cast<std::size_t>(g)].backward_params_only(dyp.middleCols(g * per, per));
  } else {
    // dCol = dYp W (+ adapter terms) per group, then dX = col2im(dCol).
    m_dcol.resize(m_col.rows(), m_col.cols());
    for (index g = 0; g < m_options.groups; ++g)
      m_groups[static_cast<std::size_t>(g)].backward(dyp.middleCols(g * per, per), m_dcol.middleCols(g * k, k));
    m_xt.setZero(in_features(), m_n);
    detail::unfold<false>(m_geom, m_n, m_xt.data(), static_cast<const Scalar*>(m_dcol.data()));
    *dx = m_xt.transpose();
  }
  m_has_cache = false;
}

// ---------------------------------------------------------------------------------------------------
// inference

template <typename Scalar>
template <typename Derived>
void conv2d<Scalar>::infer(const Eigen::MatrixBase<Derived>& x, Eigen::Ref<matrix_type> y,
                           conv2d_workspace<Scalar>& ws) const {
  convolve(x, y, ws.xt, ws.col, ws.yp,
           [&](index g, const auto& col, auto yp) { m_groups[static_cast<std::size_t>(g)].infer(col, yp, ws.linear); });
}

template <typename Scalar>
template <typename Derived>
void conv2d<Scalar>::infer(const Eigen::MatrixBase<Derived>& x, const adapter_routing& routing,
                           Eigen::Ref<matrix_type> y, conv2d_workspace<Scalar>& ws) const {
  this->check_routing(routing, x.rows());
  routing.repeat_rows(m_geom.pixels(), ws.pixels);  // rows of im2col(X): image i's pixels are rows i·pixels ...
  convolve(x, y, ws.xt, ws.col, ws.yp, [&](index g, const auto& col, auto yp) {
    detail::input_cache<Scalar> view;
    view.bind(col);
    m_groups[static_cast<std::size_t>(g)].run_infer_routed(view, ws.pixels, yp, ws.linear);
  });
}

}  // namespace lora
