// lora/quant/quantized_matrix.hpp: a frozen weight W (out x in, PyTorch orientation) stored in fewer bits,
// and the products a LoRA layer needs from it without ever forming the whole dequantized W
// (docs/CONVENTIONS.md §quant).
//
// Storage formats (rows of W contiguous, as PyTorch, bitsandbytes and ggml store them):
//   f32      4 bytes a weight (the reference)
//   bf16/f16 2 bytes; computed in float32
//   int8     one int8 per weight and one float32 scale per output row: scale = absmax / 127,
//            q = round-half-away(x / scale)  (symmetric absmax, per row)
//   nf4      NF4 in blocks of 64 with float32 absmax (quant/nf4.hpp); nf4_dq: the absmax values
//            double-quantized (≈ 4.127 bits a weight)
//   q8_0     ggml's Q8_0 (blocks of 32 along a row, f16 scale: 8.5 bits), q4_0 ggml's Q4_0 (4.5 bits);
//            rows must be multiples of 32 long (io/ggml_types.hpp)
//
// Products (quant/qgemm below): Y = X deq(W)ᵀ (forward) and dX += dY deq(W) (backward to the input), by
// panels of rows of W dequantized into a workspace of about 2 MiB (thinner panels make thin, slow GEMMs) and multiplied
// with Eigen's GEMM; the workspace is kept, so repeated calls allocate nothing. Forward calls of at most 8 rows of X
// (token-by-token decoding) in float take the fused kernels of quant/fused.hpp instead, where they apply.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../io/ggml_types.hpp"
#include "fused.hpp"
#include "nf4.hpp"

namespace lora::quant {

/// How a quantized_matrix stores its weights.
enum class qtype { f32, bf16, f16, int8, nf4, nf4_dq, q8_0, q4_0 };

/// "f32", "bf16", "f16", "int8", "nf4", "nf4_dq", "q8_0", "q4_0".
const char* qtype_name(qtype type) noexcept;
/// The qtype named `name`; config_error listing the names otherwise.
qtype parse_qtype(std::string_view name);

/// A frozen rows x cols weight in one of the formats above.
class quantized_matrix {
 public:
  quantized_matrix() = default;
  /// Quantizes W (any Eigen expression, float or double; converted to float32 first). shape_error for
  /// q8_0 / q4_0 when cols is not a multiple of 32.
  template <typename Derived>
  static quantized_matrix quantize(const Eigen::MatrixBase<Derived>& w, qtype type);
  /// W from rows exactly as ggml stores them (row r = output r: cols values in ggml_row_bytes(type, cols)
  /// bytes), copied byte for byte, never decoded: F32, F16, BF16, Q8_0 and Q4_0 become qtype f32, f16, bf16,
  /// q8_0 and q4_0. dtype_error naming the type for any other ggml type; shape_error when cols is not a
  /// multiple of the type's block size (32 for Q8_0 / Q4_0).
  static quantized_matrix from_ggml(io::ggml_type type, index rows, index cols, const std::uint8_t* bytes);
  /// The stored rows as ggml lays them out (f32, bf16, f16, q8_0, q4_0: rows · ggml_row_bytes bytes), the
  /// inverse of from_ggml; dtype_error for int8 and the NF4 formats, which are no ggml formats.
  const std::vector<std::uint8_t>& ggml_bytes() const;

  qtype type() const noexcept { return m_type; }
  index rows() const noexcept { return m_rows; }
  index cols() const noexcept { return m_cols; }
  /// Bytes held: codes, scales and every second-level statistic.
  std::size_t storage_bytes() const noexcept;
  /// storage_bytes() · 8 / (rows · cols).
  double bits_per_weight() const noexcept;

  /// Rows [r0, r1) of deq(W), row-major, into out ((r1 - r0) · cols values).
  template <typename Scalar>
  void dequantize_rows(index r0, index r1, Scalar* out) const;
  /// The whole deq(W) (for tests and merges; the products below never form it).
  template <typename Scalar>
  matrix<Scalar> dequantize() const;

  /// y[j][0 .. rows) = deq(W) · x[j] for j < n ≤ 4, x[j] contiguous cols floats, by the fused kernels of
  /// quant/fused.hpp (rows split across lora::num_threads() threads when the call is large); false
  /// (nothing written) where they do not apply: rows not made of whole blocks (cols % 32; NF4: cols % 64),
  /// f16 without F16C, or a build without AVX2 + FMA.
  bool fused_forward(int n, const float* const* x, float* const* y) const;

 private:
  /// Row r decoded to float32 (cols values).
  void decode_row(index r, float* out) const;
  /// fn(format) with the fused kernels' format of this storage (quant/fused.hpp), and true; false (fn not
  /// called) where they do not apply (see fused_forward).
  template <typename Fn>
  bool with_fused_format(Fn&& fn) const;

  qtype m_type = qtype::f32;
  index m_rows = 0, m_cols = 0;
  std::vector<std::uint8_t> m_bytes;  ///< f32/bf16/f16/int8/q8_0/q4_0 data, row after row
  std::vector<float> m_scales;        ///< int8: one per row
  nf4_blocks m_nf4;                   ///< nf4 (absmax emptied for nf4_dq)
  nf4_double_quant m_dq;              ///< nf4_dq
};

/// The buffers of the products, kept between calls so that they allocate nothing once warm: the panel of
/// dequantized rows, and contiguous copies of a few input and output rows for the fused kernels.
template <typename Scalar>
struct qgemm_workspace {
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> panel;
  Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> x_rows, y_rows;
};

/// Inputs of at most this many rows go through the fused kernels (quant/fused.hpp) where they apply,
/// detail::fused_max_inputs rows a pass; each pass decodes W again, so larger batches take the panels (one
/// decode, then a GEMM).
inline constexpr index qgemm_fused_max_rows = 8;

/// Rows of W per panel: about 2 MiB of Scalars, at least 8 rows.
index qgemm_panel_rows(index cols, std::size_t scalar_size) noexcept;

/// Y (n x rows) = X (n x cols) · deq(W)ᵀ. shape_error when X has other than cols columns.
namespace detail {

/// The fused forward of a few rows: X's rows copied contiguous, the kernels, Y's rows copied back; false
/// when the kernels do not apply to `w`.
inline bool qgemm_fused(const Eigen::Ref<const matrix<float>>& x, const quantized_matrix& w,
                        Eigen::Ref<matrix<float>> y, qgemm_workspace<float>& ws) {
  ws.x_rows.resize(x.rows(), x.cols());  // no allocation when the shape repeats
  ws.y_rows.resize(y.rows(), y.cols());
  ws.x_rows = x;
  for (index j0 = 0; j0 < x.rows(); j0 += fused_max_inputs) {
    const float* xs[fused_max_inputs];
    float* ys[fused_max_inputs];
    const index m = std::min<index>(fused_max_inputs, x.rows() - j0);
    for (index j = 0; j < m; ++j) {
      xs[j] = ws.x_rows.row(j0 + j).data();
      ys[j] = ws.y_rows.row(j0 + j).data();
    }
    if (!w.fused_forward(static_cast<int>(m), xs, ys)) return false;  // the same answer for every pass
  }
  y = ws.y_rows;
  return true;
}

}  // namespace detail

template <typename Scalar>
void qgemm_forward(const Eigen::Ref<const matrix<Scalar>>& x, const quantized_matrix& w, Eigen::Ref<matrix<Scalar>> y,
                   qgemm_workspace<Scalar>& ws);
/// dX (n x cols) += dY (n x rows) · deq(W).
template <typename Scalar>
void qgemm_backward_input(const Eigen::Ref<const matrix<Scalar>>& dy, const quantized_matrix& w,
                          Eigen::Ref<matrix<Scalar>> dx, qgemm_workspace<Scalar>& ws);

// ================================================================================================
// Implementation
// ================================================================================================

namespace detail {

inline constexpr const char* qtype_names[] = {"f32", "bf16", "f16", "int8", "nf4", "nf4_dq", "q8_0", "q4_0"};

/// ggml's type for the formats that are ggml row formats (f32, bf16, f16, q8_0, q4_0).
inline io::ggml_type ggml_of(qtype t) noexcept {
  switch (t) {
    case qtype::bf16:
      return io::ggml_type::bf16;
    case qtype::f16:
      return io::ggml_type::f16;
    case qtype::q8_0:
      return io::ggml_type::q8_0;
    case qtype::q4_0:
      return io::ggml_type::q4_0;
    default:
      return io::ggml_type::f32;
  }
}
inline bool is_ggml_row_format(qtype t) noexcept {
  return t == qtype::f32 || t == qtype::bf16 || t == qtype::f16 || t == qtype::q8_0 || t == qtype::q4_0;
}

}  // namespace detail

inline const char* qtype_name(qtype type) noexcept {
  const auto k = static_cast<std::size_t>(type);
  return k < std::size(detail::qtype_names) ? detail::qtype_names[k] : "?";
}

inline qtype parse_qtype(std::string_view name) {
  for (std::size_t k = 0; k < std::size(detail::qtype_names); ++k)
    if (name == detail::qtype_names[k]) return static_cast<qtype>(k);
  throw config_error(
      detail::cat("unknown weight storage '", name, "' (expected f32, bf16, f16, int8, nf4, nf4_dq, q8_0 or q4_0)"));
}

template <typename Derived>
quantized_matrix quantized_matrix::quantize(const Eigen::MatrixBase<Derived>& w, qtype type) {
  quantized_matrix q;
  q.m_type = type;
  q.m_rows = w.rows();
  q.m_cols = w.cols();
  const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> rm = w.template cast<float>();
  const auto cols = static_cast<std::size_t>(q.m_cols);
  if (detail::is_ggml_row_format(type)) {
    const io::ggml_type g = detail::ggml_of(type);
    if (cols % io::ggml_traits(g).block_size != 0)
      throw shape_error(detail::cat("quantizing a ", detail::shape_str(w.rows(), w.cols()), " weight as ",
                                    qtype_name(type), ": rows must be multiples of ", io::ggml_traits(g).block_size,
                                    " long, got ", cols));
    const std::size_t row_bytes = static_cast<std::size_t>(io::ggml_row_bytes(g, cols));
    q.m_bytes.resize(row_bytes * static_cast<std::size_t>(q.m_rows));
    for (index r = 0; r < q.m_rows; ++r)
      io::ggml_quantize_row(g, rm.row(r).data(), cols, &q.m_bytes[static_cast<std::size_t>(r) * row_bytes]);
  } else if (type == qtype::int8) {
    q.m_bytes.resize(static_cast<std::size_t>(rm.size()));
    q.m_scales.resize(static_cast<std::size_t>(q.m_rows));
    for (index r = 0; r < q.m_rows; ++r) {
      const float scale = rm.row(r).cwiseAbs().maxCoeff() / 127.0f;
      const float inv = scale > 0 ? 1.0f / scale : 0.0f;
      q.m_scales[static_cast<std::size_t>(r)] = scale;
      for (index c = 0; c < q.m_cols; ++c)
        q.m_bytes[static_cast<std::size_t>(r * q.m_cols + c)] =
            static_cast<std::uint8_t>(static_cast<std::int8_t>(std::round(rm(r, c) * inv)));
    }
  } else {
    q.m_nf4 = nf4_quantize(rm.data(), static_cast<std::size_t>(rm.size()));
    if (type == qtype::nf4_dq) {
      q.m_dq = nf4_double_quantize(q.m_nf4.absmax);
      q.m_nf4.absmax.clear();
      q.m_nf4.absmax.shrink_to_fit();
    }
  }
  return q;
}

inline quantized_matrix quantized_matrix::from_ggml(io::ggml_type type, index rows, index cols,
                                                    const std::uint8_t* bytes) {
  static constexpr qtype row_formats[] = {qtype::f32, qtype::bf16, qtype::f16, qtype::q8_0, qtype::q4_0};
  const auto* it = std::find_if(std::begin(row_formats), std::end(row_formats),
                                [type](qtype t) { return detail::ggml_of(t) == type; });
  if (it == std::end(row_formats))
    throw dtype_error(detail::cat("quantized_matrix::from_ggml: ggml type ", io::ggml_type_name(type), " (code ",
                                  static_cast<std::uint32_t>(type),
                                  ") is not one this library computes with (F32, F16, BF16, Q8_0, Q4_0)"));
  const std::uint32_t block = io::ggml_traits(type).block_size;
  if (rows < 0 || cols < 0 || static_cast<std::uint64_t>(cols) % block != 0)
    throw shape_error(detail::cat("quantized_matrix::from_ggml: a ", detail::shape_str(rows, cols), " ",
                                  io::ggml_type_name(type), " weight needs rows of a multiple of ", block,
                                  " values, got ", cols));
  quantized_matrix q;
  q.m_type = *it;
  q.m_rows = rows;
  q.m_cols = cols;
  const auto size = static_cast<std::size_t>(io::ggml_row_bytes(type, static_cast<std::uint64_t>(cols))) *
                    static_cast<std::size_t>(rows);
  q.m_bytes.assign(bytes, bytes + size);
  return q;
}

inline const std::vector<std::uint8_t>& quantized_matrix::ggml_bytes() const {
  if (!detail::is_ggml_row_format(m_type))
    throw dtype_error(detail::cat("quantized_matrix::ggml_bytes: ", qtype_name(m_type),
                                  " is no ggml format (f32, bf16, f16, q8_0 and q4_0 are)"));
  return m_bytes;
}

inline std::size_t quantized_matrix::storage_bytes() const noexcept {
  return m_bytes.size() + 4 * m_scales.size() + m_nf4.packed.size() + 4 * m_nf4.absmax.size() + m_dq.codes.size() +
         4 * m_dq.absmax2.size() + (m_type == qtype::nf4_dq ? 4 : 0);
}

inline double quantized_matrix::bits_per_weight() const noexcept {
  const double n = static_cast<double>(m_rows) * static_cast<double>(m_cols);
  return n > 0 ? 8.0 * static_cast<double>(storage_bytes()) / n : 0.0;
}

inline void quantized_matrix::decode_row(index r, float* out) const {
  const auto cols = static_cast<std::size_t>(m_cols);
  if (detail::is_ggml_row_format(m_type)) {
    const io::ggml_type g = detail::ggml_of(m_type);
    const std::size_t row_bytes = static_cast<std::size_t>(io::ggml_row_bytes(g, cols));
    io::ggml_dequantize_row(g, &m_bytes[static_cast<std::size_t>(r) * row_bytes], cols, out);
  } else if (m_type == qtype::int8) {
    const float scale = m_scales[static_cast<std::size_t>(r)];
    const std::uint8_t* q = &m_bytes[static_cast<std::size_t>(r) * cols];
    for (std::size_t c = 0; c < cols; ++c) out[c] = scale * static_cast<float>(static_cast<std::int8_t>(q[c]));
  } else if (m_type == qtype::nf4) {
    nf4_dequantize(m_nf4, static_cast<std::size_t>(r) * cols, static_cast<std::size_t>(r + 1) * cols, out);
  } else {  // nf4_dq: each block's absmax rebuilt from its 8-bit code
    const std::size_t begin = static_cast<std::size_t>(r) * cols;
    detail::nf4_decode(m_nf4.packed.data(), m_nf4.block, begin, begin + cols, out,
                       [&](std::size_t b) { return m_dq.absmax(b); });
  }
}

template <typename Fn>
bool quantized_matrix::with_fused_format(Fn&& fn) const {
#if LORA_QUANT_FUSED
  const std::uint8_t* bytes = m_bytes.data();
  const index cols = m_cols;
  if (cols % 32 != 0) return false;
  switch (m_type) {
    case qtype::nf4:
    case qtype::nf4_dq: {
      if (m_nf4.block != 64 || cols % 64 != 0) return false;
      const detail::nf4_format f{m_nf4.packed.data(), m_nf4.absmax.data(), cols / 64,
                                 detail::make_lut16(nf4_code.data())};
      if (m_type == qtype::nf4) return fn(f), true;
      return fn(detail::nf4_dq_format{f, m_dq.codes.data(), m_dq.absmax2.data(), nf4_dynamic_map().data(),
                                      m_dq.offset}),
             true;
    }
    case qtype::q8_0:
      return fn(detail::q8_0_format{bytes, cols / 32 * 34}), true;
    case qtype::q4_0:
      return fn(detail::q4_0_format{bytes, cols / 32 * 18}), true;
    case qtype::int8:
      return fn(detail::int8_format{bytes, m_scales.data(), cols}), true;
    case qtype::f32:
      return fn(detail::f32_format{{bytes, cols}}), true;
    case qtype::bf16:
      return fn(detail::bf16_format{{bytes, cols}}), true;
    case qtype::f16:
#if defined(__F16C__)
      return fn(detail::f16_format{{bytes, cols}}), true;
#else
      return false;
#endif
  }
#else
  (void)fn;
#endif
  return false;
}

inline bool quantized_matrix::fused_forward(int n, const float* const* x, float* const* y) const {
  if (n < 1 || n > detail::fused_max_inputs) return false;
#if LORA_QUANT_FUSED
  return with_fused_format([&](const auto& format) { detail::fused_forward_rows(format, n, m_rows, m_cols, x, y); });
#else
  (void)x, (void)y;
  return false;
#endif
}

template <typename Scalar>
void quantized_matrix::dequantize_rows(index r0, index r1, Scalar* out) const {
  LORA_ASSERT(0 <= r0 && r0 <= r1 && r1 <= m_rows);
  if constexpr (std::is_same_v<Scalar, float>) {
#if LORA_QUANT_FUSED
    if (with_fused_format([&](const auto& format) {
          using format_t = std::decay_t<decltype(format)>;
          detail::decode_rows(format, r0, r1, m_cols / format_t::block, out);
        }))
      return;
#endif
    for (index r = r0; r < r1; ++r) decode_row(r, out + (r - r0) * m_cols);
  } else {
    std::vector<float> row(static_cast<std::size_t>(m_cols));
    for (index r = r0; r < r1; ++r) {
      decode_row(r, row.data());
      for (index c = 0; c < m_cols; ++c)
        out[(r - r0) * m_cols + c] = static_cast<Scalar>(row[static_cast<std::size_t>(c)]);
    }
  }
}

template <typename Scalar>
matrix<Scalar> quantized_matrix::dequantize() const {
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> rm(m_rows, m_cols);
  dequantize_rows(0, m_rows, rm.data());
  return rm;
}

inline index qgemm_panel_rows(index cols, std::size_t scalar_size) noexcept {
  const auto budget = static_cast<index>((std::size_t{2048} << 10) / scalar_size);
  return std::max<index>(8, budget / std::max<index>(cols, 1));
}

template <typename Scalar>
void qgemm_forward(const Eigen::Ref<const matrix<Scalar>>& x, const quantized_matrix& w, Eigen::Ref<matrix<Scalar>> y,
                   qgemm_workspace<Scalar>& ws) {
  if (x.cols() != w.cols() || y.rows() != x.rows() || y.cols() != w.rows())
    throw shape_error(detail::cat("qgemm_forward: X ", detail::shape_str(x.rows(), x.cols()), " · W ",
                                  detail::shape_str(w.rows(), w.cols()), "ᵀ into Y ",
                                  detail::shape_str(y.rows(), y.cols())));
  if constexpr (std::is_same_v<Scalar, float>) {
    if (x.rows() >= 1 && x.rows() <= qgemm_fused_max_rows && detail::qgemm_fused(x, w, y, ws)) return;
  }
  const index p = qgemm_panel_rows(w.cols(), sizeof(Scalar));
  for (index r0 = 0; r0 < w.rows(); r0 += p) {
    const index m = std::min(p, w.rows() - r0);
    if (ws.panel.rows() < m || ws.panel.cols() != w.cols()) ws.panel.resize(std::max(m, ws.panel.rows()), w.cols());
    w.dequantize_rows(r0, r0 + m, ws.panel.data());
    y.middleCols(r0, m).noalias() = x * ws.panel.topRows(m).transpose();
  }
}

template <typename Scalar>
void qgemm_backward_input(const Eigen::Ref<const matrix<Scalar>>& dy, const quantized_matrix& w,
                          Eigen::Ref<matrix<Scalar>> dx, qgemm_workspace<Scalar>& ws) {
  if (dy.cols() != w.rows() || dx.rows() != dy.rows() || dx.cols() != w.cols())
    throw shape_error(detail::cat("qgemm_backward_input: dY ", detail::shape_str(dy.rows(), dy.cols()), " · W ",
                                  detail::shape_str(w.rows(), w.cols()), " into dX ",
                                  detail::shape_str(dx.rows(), dx.cols())));
  const index p = qgemm_panel_rows(w.cols(), sizeof(Scalar));
  for (index r0 = 0; r0 < w.rows(); r0 += p) {
    const index m = std::min(p, w.rows() - r0);
    if (ws.panel.rows() < m || ws.panel.cols() != w.cols()) ws.panel.resize(std::max(m, ws.panel.rows()), w.cols());
    w.dequantize_rows(r0, r0 + m, ws.panel.data());
    dx.noalias() += dy.middleCols(r0, m) * ws.panel.topRows(m);
  }
}

}  // namespace lora::quant
