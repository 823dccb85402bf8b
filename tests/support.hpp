// tests/support.hpp: shared helpers for the unit tests: the scalar types every typed suite runs
// over, tolerances per scalar, and central finite differences (run gradient checks in double).
#pragma once

#include <gtest/gtest.h>

#include <Eigen/Core>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <lora/config.hpp>
#include <lora/random.hpp>
#include <string>

namespace lora_test {

/// The scalar types every typed suite runs over.
using scalar_types = ::testing::Types<float, double>;

/// Relative tolerance for comparing two computations of the same quantity in Scalar.
template <typename Scalar>
constexpr double tolerance() {
  return std::is_same_v<Scalar, float> ? 2e-5 : 1e-12;
}

/// max |a - b| / max(1, max |b|): a scale-aware distance between two matrices.
template <typename A, typename B>
double rel_error(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  EXPECT_EQ(a.rows(), b.rows());
  EXPECT_EQ(a.cols(), b.cols());
  if (a.size() == 0) return 0.0;
  const double diff = (a.template cast<double>() - b.template cast<double>()).cwiseAbs().maxCoeff();
  const double scale = std::max(1.0, b.template cast<double>().cwiseAbs().maxCoeff());
  return diff / scale;
}

/// Same shape and the same bits (so +0 differs from -0, and NaNs compare by payload).
template <typename A, typename B>
bool bitwise_equal(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  using S = typename A::Scalar;
  static_assert(std::is_same_v<S, typename B::Scalar>, "bitwise_equal compares matrices of one scalar type");
  const lora::matrix<S> x = a, y = b;  // plain column-major copies, whatever the operands' layouts
  return x.rows() == y.rows() && x.cols() == y.cols() &&
         std::memcmp(x.data(), y.data(), sizeof(S) * static_cast<std::size_t>(x.size())) == 0;
}

/// rows x cols uniform in [-scale, scale), drawn from gen in storage order.
template <typename Scalar = double>
lora::matrix<Scalar> random_matrix(lora::rng& gen, lora::index rows, lora::index cols, double scale = 1.0) {
  lora::matrix<Scalar> m(rows, cols);
  for (lora::index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(scale * gen.uniform(-1, 1));
  return m;
}

/// Central finite differences of a scalar function of a matrix: d f / d p(i,j) approximated by
/// (f(p + h e_ij) - f(p - h e_ij)) / 2h, restoring p afterwards. Error O(h^2); use in double.
/// `p` is any writable view of a parameter: a matrix, or an adapter's factor view (a temporary).
template <typename Param>
lora::matrix<double> numeric_gradient(Param&& p, const std::function<double()>& f, double h = 1e-6) {
  lora::matrix<double> g(p.rows(), p.cols());
  for (lora::index j = 0; j < p.cols(); ++j) {
    for (lora::index i = 0; i < p.rows(); ++i) {
      const double saved = p(i, j);
      p(i, j) = saved + h;
      const double up = f();
      p(i, j) = saved - h;
      const double down = f();
      p(i, j) = saved;
      g(i, j) = (up - down) / (2 * h);
    }
  }
  return g;
}

/// Same over a raw buffer (for parameters exposed through lora::parameter views).
inline lora::matrix<double> numeric_gradient(double* data, lora::index rows, lora::index cols,
                                             const std::function<double()>& f, double h = 1e-6) {
  Eigen::Map<lora::matrix<double>> m(data, rows, cols);
  lora::matrix<double> g(rows, cols);
  for (lora::index k = 0; k < rows * cols; ++k) {
    const double saved = data[k];
    data[k] = saved + h;
    const double up = f();
    data[k] = saved - h;
    const double down = f();
    data[k] = saved;
    g(k % rows, k / rows) = (up - down) / (2 * h);
  }
  return g;
}

/// Expects a callable to throw E whose what() contains every given fragment.
template <typename E, typename F>
void expect_error(F&& f, std::initializer_list<std::string> fragments) {
  try {
    f();
    ADD_FAILURE() << "expected an exception, none was thrown";
  } catch (const E& e) {
    const std::string what = e.what();
    for (const auto& frag : fragments) {
      EXPECT_NE(what.find(frag), std::string::npos) << "message '" << what << "' lacks '" << frag << "'";
    }
  }
}

}  // namespace lora_test
