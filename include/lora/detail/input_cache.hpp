// lora/detail/input_cache.hpp: how a training forward keeps its input X (n x in) for backward.
//
// When X is a plain matrix, a Map, a Ref or a block with unit inner stride, the cache is a view: a
// pointer, a leading dimension and an orientation (a row-major X is read as the column-major Xᵀ), so no
// copy is made. Any other expression, and any rvalue plain matrix, is evaluated into owned storage.
// A viewed X must stay alive and unchanged until backward() returns.
#pragma once

#include <Eigen/Core>
#include <utility>

#include "../config.hpp"

namespace lora::detail {

template <typename Scalar>
class input_cache {
 public:
  using const_map = Eigen::Map<const matrix<Scalar>, Eigen::Unaligned, Eigen::OuterStride<>>;

  /// Views x when its memory layout allows, else copies it.
  template <typename Derived>
  void bind(const Eigen::MatrixBase<Derived>& x);
  /// Takes ownership of x (for rvalues, whose memory would not outlive the call).
  void bind_owned(matrix<Scalar>&& x);
  /// Forgets the input (and frees an owned copy's memory only if asked to).
  void clear() { m_valid = false; }

  bool valid() const noexcept { return m_valid; }
  index rows() const noexcept { return m_rows; }
  index cols() const noexcept { return m_cols; }
  /// Bytes held beyond a view (0 when X is viewed).
  std::size_t owned_bytes() const noexcept { return m_uses_owned ? sizeof(Scalar) * m_owned.size() : 0; }

  /// Calls f with an Eigen expression of X (n x in): a Map, or the transpose of a Map.
  template <typename F>
  void visit(F&& f) const;

 private:
  const Scalar* m_ptr = nullptr;
  index m_rows = 0, m_cols = 0, m_stride = 0;
  bool m_transposed = false;  // memory holds Xᵀ column-major (X was row-major)
  bool m_uses_owned = false;
  bool m_valid = false;
  matrix<Scalar> m_owned;
};

// ---------------------------------------------------------------------------------------------------

template <typename Scalar>
template <typename Derived>
void input_cache<Scalar>::bind(const Eigen::MatrixBase<Derived>& x) {
  using D = Derived;
  constexpr bool direct =
      (int(Eigen::internal::traits<D>::Flags) & Eigen::DirectAccessBit) != 0 && int(D::InnerStrideAtCompileTime) == 1;
  m_rows = x.rows();
  m_cols = x.cols();
  m_valid = true;
  if constexpr (direct) {
    const D& d = x.derived();
    m_ptr = d.data();
    m_stride = d.outerStride();
    m_transposed = D::IsRowMajor;
    m_uses_owned = false;
    if (m_stride < (m_transposed ? m_cols : m_rows)) m_stride = m_transposed ? m_cols : m_rows;  // vectors
  } else {
    m_owned = x;
    m_ptr = m_owned.data();
    m_stride = m_rows;
    m_transposed = false;
    m_uses_owned = true;
  }
}

template <typename Scalar>
void input_cache<Scalar>::bind_owned(matrix<Scalar>&& x) {
  m_owned = std::move(x);
  m_rows = m_owned.rows();
  m_cols = m_owned.cols();
  m_ptr = m_owned.data();
  m_stride = m_rows;
  m_transposed = false;
  m_uses_owned = true;
  m_valid = true;
}

template <typename Scalar>
template <typename F>
void input_cache<Scalar>::visit(F&& f) const {
  LORA_ASSERT(m_valid);
  if (m_transposed) {
    const_map xt(m_ptr, m_cols, m_rows, Eigen::OuterStride<>(m_stride));
    f(xt.transpose());
  } else {
    const_map x(m_ptr, m_rows, m_cols, Eigen::OuterStride<>(m_stride));
    f(x);
  }
}

}  // namespace lora::detail
