// tests/test_quant_fused.cpp: the fused products of quant/fused.hpp (a few input rows times a quantized
// weight, codes decoded in registers) against the dense product of the dequantized weight, for every
// storage, 1 to 4 inputs, row counts that are not multiples of the kernels' row interleave, and rows split
// across threads (which must not change a single bit: each output element is summed by one thread in one
// order).
#include <gtest/gtest.h>

#include <cmath>
#include <lora/detail/parallel.hpp>
#include <lora/quant/quantized_matrix.hpp>
#include <random>
#include <vector>

namespace {

namespace q = lora::quant;
using rm_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr q::qtype every_storage[] = {q::qtype::f32, q::qtype::bf16,   q::qtype::f16,  q::qtype::int8,
                                      q::qtype::nf4, q::qtype::nf4_dq, q::qtype::q8_0, q::qtype::q4_0};

rm_matrix normal_matrix(lora::index rows, lora::index cols, unsigned seed, float sd) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, sd);
  rm_matrix m(rows, cols);
  for (auto& v : m.reshaped()) v = normal(rng);
  return m;
}

/// Y (n x rows) from fused_forward; false (nothing written) when the kernels did not apply.
bool fused(const q::quantized_matrix& w, const rm_matrix& x, rm_matrix& y) {
  y.resize(x.rows(), w.rows());
  std::vector<const float*> xs;
  std::vector<float*> ys;
  for (lora::index j = 0; j < x.rows(); ++j) {
    xs.push_back(x.row(j).data());
    ys.push_back(y.row(j).data());
  }
  return w.fused_forward(static_cast<int>(x.rows()), xs.data(), ys.data());
}

/// Y from the fused kernels, which must apply exactly when they are compiled in (AVX2 + FMA); from
/// qgemm_forward's panels in a build without them.
void fused_or_panels(const q::quantized_matrix& w, const rm_matrix& x, rm_matrix& y) {
  const bool applied = fused(w, x, y);
  ASSERT_EQ(applied, LORA_QUANT_FUSED == 1) << q::qtype_name(w.type()) << " " << w.rows() << "x" << w.cols();
  if (applied) return;
  q::qgemm_workspace<float> ws;
  lora::matrix<float> yc(x.rows(), w.rows());
  q::qgemm_forward<float>(x, w, yc, ws);
  y = yc;
}

/// Every element of the fused product within float32 summation error of the dense product of deq(W),
/// computed in double: |y - ref| ≤ 1e-5 · Σ_c |deq(W)[r, c] x[c]|.
void expect_dense(const q::quantized_matrix& w, const rm_matrix& x, const rm_matrix& y, const char* what) {
  const Eigen::MatrixXd d = w.dequantize<double>();
  const Eigen::MatrixXd xd = x.cast<double>();
  const Eigen::MatrixXd ref = xd * d.transpose(), bound = 1e-5 * (xd.cwiseAbs() * d.cwiseAbs().transpose());
  for (lora::index j = 0; j < y.rows(); ++j)
    for (lora::index r = 0; r < y.cols(); ++r)
      ASSERT_LE(std::abs(static_cast<double>(y(j, r)) - ref(j, r)), bound(j, r))
          << what << " " << q::qtype_name(w.type()) << " n " << y.rows() << " row " << r << " of " << w.rows();
}

TEST(QuantFused, EveryStorageEveryInputCountAndRowCountEqualsTheDenseProduct) {
  for (q::qtype t : every_storage) {
    for (lora::index rows : {1, 2, 3, 5, 7, 13}) {
      for (lora::index cols : {64, 192}) {
        const q::quantized_matrix w = q::quantized_matrix::quantize(normal_matrix(rows, cols, 11, 0.02f), t);
        for (int n = 1; n <= 4; ++n) {
          const rm_matrix x = normal_matrix(n, cols, 12 + static_cast<unsigned>(n), 1.0f);
          rm_matrix y;
          ASSERT_NO_FATAL_FAILURE(fused_or_panels(w, x, y));
          expect_dense(w, x, y, "fused");
        }
      }
    }
  }
}

TEST(QuantFused, EachElementIsReadFromItsOwnPlaceInTheBlock) {
  // x a unit vector e_c: y = column c of deq(W) (one product, the rest adds zeros); a wrong
  // permutation of the 4-bit codes or of x within a block picks another column.
  const lora::index rows = 5, cols = 128;
  for (q::qtype t : every_storage) {
    const q::quantized_matrix w = q::quantized_matrix::quantize(normal_matrix(rows, cols, 21, 1.0f), t);
    const Eigen::MatrixXf d = w.dequantize<float>();
    for (lora::index c = 0; c < cols; ++c) {
      rm_matrix x = rm_matrix::Zero(1, cols), y;
      x(0, c) = 1.0f;
      ASSERT_NO_FATAL_FAILURE(fused_or_panels(w, x, y));
      for (lora::index r = 0; r < rows; ++r)  // within an ulp: nf4_dq's absmax may round once or twice
        ASSERT_NEAR(y(0, r), d(r, c), 1e-6f * std::abs(d(r, c))) << q::qtype_name(t) << " col " << c;
    }
  }
}

TEST(QuantFused, TwoThreadsGiveTheSameBitsAsOne) {
  // 1029 x 4096: enough work (4.2M weight elements) for 2 threads to split the rows.
  const lora::index rows = 1029, cols = 4096;
  const rm_matrix w0 = normal_matrix(rows, cols, 31, 0.02f);
  const rm_matrix x = normal_matrix(1, cols, 32, 1.0f);
  for (q::qtype t : {q::qtype::nf4, q::qtype::q4_0, q::qtype::bf16}) {
    const q::quantized_matrix w = q::quantized_matrix::quantize(w0, t);
    rm_matrix y1, y2;
    lora::set_num_threads(1);
    ASSERT_NO_FATAL_FAILURE(fused_or_panels(w, x, y1));
    lora::set_num_threads(2);
    EXPECT_EQ(lora::detail::parallel_parts(rows, q::detail::fused_min_rows(cols, 1)), 2);
    ASSERT_NO_FATAL_FAILURE(fused_or_panels(w, x, y2));
    lora::set_num_threads(1);
    EXPECT_TRUE(y1 == y2) << q::qtype_name(t);
    expect_dense(w, x, y2, "2 threads");
  }
  // A decode step of a small layer stays on the calling thread.
  lora::set_num_threads(2);
  EXPECT_EQ(lora::detail::parallel_parts(1024, q::detail::fused_min_rows(1024, 1)), 1);
  lora::set_num_threads(1);
}

TEST(QuantFused, QgemmForwardTakesTheFusedPathUpToEightRowsAndThePanelsAbove) {
  // The same weight through qgemm_forward with 1..10 rows: one fused pass (1-4), two (5-8: the second
  // pass of 1-4 rows), the panels (9, 10); every result equals the dense product.
  static_assert(q::qgemm_fused_max_rows == 8 && q::detail::fused_max_inputs == 4);
  const lora::index rows = 37, cols = 256;
  for (q::qtype t : every_storage) {
    const q::quantized_matrix w = q::quantized_matrix::quantize(normal_matrix(rows, cols, 41, 0.02f), t);
    q::qgemm_workspace<float> ws;
    for (lora::index n = 1; n <= 10; ++n) {
      const lora::matrix<float> x = normal_matrix(n, cols, 42 + static_cast<unsigned>(n), 1.0f);
      lora::matrix<float> y = lora::matrix<float>::Constant(n, rows, 1e30f);
      q::qgemm_forward<float>(x, w, y, ws);
      expect_dense(w, x, y, "qgemm_forward");
    }
  }
}

TEST(QuantFused, RowsOfPartialBlocksAreLeftToThePanels) {
  const rm_matrix x = normal_matrix(1, 96, 51, 1.0f);
  rm_matrix y;
  EXPECT_FALSE(fused(q::quantized_matrix::quantize(normal_matrix(3, 96, 52, 0.02f), q::qtype::nf4), x, y));
  const rm_matrix x48 = normal_matrix(1, 48, 53, 1.0f);
  for (q::qtype t : {q::qtype::f32, q::qtype::bf16, q::qtype::f16, q::qtype::int8})
    EXPECT_FALSE(fused(q::quantized_matrix::quantize(normal_matrix(3, 48, 54, 0.02f), t), x48, y)) << q::qtype_name(t);
  EXPECT_EQ(fused(q::quantized_matrix::quantize(normal_matrix(3, 96, 55, 0.02f), q::qtype::q4_0), x, y),
            LORA_QUANT_FUSED == 1);
}

}  // namespace

// The panels' rows (dequantize_rows<float>, decoded in registers where the kernels are compiled in) equal
// the scalar decoders' values bit for bit (dequantize<double> decodes each row with them, then widens),
// for whole matrices and for row ranges that start inside.
TEST(QuantFused, DecodedRowsEqualTheScalarDecodersBitForBit) {
  const rm_matrix w = normal_matrix(13, 192, 21, 0.05f);
  for (const q::qtype t : every_storage) {
    const auto qm = q::quantized_matrix::quantize(w, t);
    const Eigen::MatrixXf scalar = qm.dequantize<double>().cast<float>();
    rm_matrix rows(13, 192);
    qm.dequantize_rows(0, 13, rows.data());
    EXPECT_TRUE((rows.array() == scalar.array()).all()) << q::qtype_name(t);
    rm_matrix part(5, 192);
    qm.dequantize_rows(7, 12, part.data());
    EXPECT_TRUE((part.array() == scalar.middleRows(7, 5).array()).all()) << q::qtype_name(t) << " rows 7..12";
  }
}
