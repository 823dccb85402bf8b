// tests/test_quant.cpp: quantized frozen weights (quant/nf4.hpp, quant/quantized_matrix.hpp): NF4's code
// book and packing worked by hand, the midpoint rule, double quantization and its dynamic map, the bits
// per weight of every format, round-trip error bounds, and the panel products against the dense product
// of the dequantized weight in float and double.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <lora/quant/quantized_matrix.hpp>
#include <random>
#include <vector>

#include "support.hpp"

namespace {

namespace q = lora::quant;
using lora_test::expect_error;

lora::matrix<float> random_weight(lora::index rows, lora::index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  lora::matrix<float> w(rows, cols);
  for (auto& x : w.reshaped()) x = normal(rng);
  return w;
}

TEST(QuantNf4, CodesMapToThemselvesAndMidpointsTakeTheLowerIndex) {
  for (std::uint8_t k = 0; k < 16; ++k) EXPECT_EQ(q::nf4_index(q::nf4_code[k]), k);
  EXPECT_EQ(q::nf4_index(0.03979014977812767f), 7);  // the midpoint of codes 7 and 8 itself
  EXPECT_EQ(q::nf4_index(std::nextafter(0.03979014977812767f, 1.0f)), 8);
  EXPECT_EQ(q::nf4_index(0.8614784181118011f), 14);
  EXPECT_EQ(q::nf4_index(-0.99f), 0);
}

TEST(QuantNf4, ABlockWorkedByHand) {
  // absmax 2; scaled 1, -1, 0.05 (above the 7|8 midpoint 0.0398, below 8|9's 0.1203) and 0.5 (below
  // 12|13's 0.50166, above 11|12's 0.3893): codes 15, 0, 8, 12; element 2j in the high nibble.
  const float x[] = {2.0f, -2.0f, 0.1f, 1.0f, 0.0f};
  const q::nf4_blocks b = q::nf4_quantize(x, 5);
  ASSERT_EQ(b.absmax.size(), 1u);
  EXPECT_EQ(b.absmax[0], 2.0f);
  EXPECT_EQ(b.packed, (std::vector<std::uint8_t>{0xF0, 0x8C, 0x70}));  // odd count: low nibble of the pad is 0
  float y[5];
  q::nf4_dequantize(b, 0, 5, y);
  EXPECT_EQ(y[0], 2.0f);
  EXPECT_EQ(y[1], -2.0f);
  EXPECT_EQ(y[2], q::nf4_code[8] * 2.0f);
  EXPECT_EQ(y[3], q::nf4_code[12] * 2.0f);
  EXPECT_EQ(y[4], 0.0f);
}

TEST(QuantNf4, BlocksSpanRowsAndTheLastOneMayBeShort) {
  std::vector<float> x(100);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = i < 64 ? 1.0f : 3.0f;
  const q::nf4_blocks b = q::nf4_quantize(x.data(), x.size());
  EXPECT_EQ(b.absmax, (std::vector<float>{1.0f, 3.0f}));
  expect_error<lora::config_error>([&] { q::nf4_quantize(x.data(), x.size(), 48); }, {"48", "power of two"});
}

TEST(QuantNf4, RowsStartingInTheMiddleOfAByteDecodeElementByElement) {
  // 3 x 33: rows 1 and 2 start at odd flat offsets and blocks of 64 span rows.
  const lora::matrix<float> w = random_weight(3, 33, 6);
  const Eigen::Matrix<float, 3, 33, Eigen::RowMajor> rm = w;
  const q::nf4_blocks b = q::nf4_quantize(rm.data(), 99);
  const lora::matrix<float> d = q::quantized_matrix::quantize(w, q::qtype::nf4).dequantize<float>();
  for (std::size_t i = 0; i < 99; ++i) {
    const std::uint8_t byte = b.packed[i / 2];
    const float want = q::nf4_code[i % 2 == 0 ? byte >> 4 : byte & 15] * b.absmax[i / 64];
    EXPECT_EQ(d(static_cast<lora::index>(i / 33), static_cast<lora::index>(i % 33)), want) << i;
  }
}

TEST(QuantNf4, DynamicMapAndDoubleQuantization) {
  const auto& map = q::nf4_dynamic_map();
  for (std::size_t k = 1; k < map.size(); ++k) EXPECT_LT(map[k - 1], map[k]) << k;
  EXPECT_NEAR(map.front(), -0.99297f, 1e-5f);
  EXPECT_EQ(map.back(), 1.0f);
  EXPECT_NE(std::find(map.begin(), map.end(), 0.0f), map.end());
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(0.01f, 0.05f);
  std::vector<float> absmax(1000);
  for (auto& a : absmax) a = u(rng);
  const q::nf4_double_quant dq = q::nf4_double_quantize(absmax);
  EXPECT_EQ(dq.absmax2.size(), 4u);
  double max_rel = 0;
  for (std::size_t b = 0; b < absmax.size(); ++b)
    max_rel = std::max(max_rel, std::abs(static_cast<double>(dq.absmax(b) - absmax[b])) / absmax[b]);
  EXPECT_LT(max_rel, 0.02);  // 8-bit dynamic codes on values within ±0.02 of their mean
}

TEST(QuantNf4, BitsPerWeight) {
  EXPECT_DOUBLE_EQ(q::nf4_bits_per_weight(64 * 1024), 4.5);
  EXPECT_NEAR(q::nf4_bits_per_weight(std::size_t{64} * 256 * 64, 64, true), 4.127, 5e-4);
}

TEST(QuantMatrix, EveryFormatStoresWhatItShouldAndRoundTripsWithinItsStep) {
  const lora::matrix<float> w = random_weight(48, 256, 2);
  const double amax = w.cwiseAbs().maxCoeff();
  struct expect_row {
    q::qtype type;
    double bits;       // storage bits per weight for this 48 x 256 weight
    double max_error;  // bound on |deq(W) - W|
  };
  const expect_row rows[] = {
      {q::qtype::f32, 32, 0},
      {q::qtype::bf16, 16, amax / 256},
      {q::qtype::f16, 16, amax / 2048},
      {q::qtype::int8, 8 + 32.0 / 256, amax / 127 * 0.5 + 1e-9},
      {q::qtype::q8_0, 8.5, amax / 127 * (0.5 + 127.0 / 2048)},
      {q::qtype::q4_0, 4.5, amax / 8 * (1.0 + 8.0 / 2048)},
      {q::qtype::nf4, 4.5, amax * 0.17},  // half the widest NF4 gap (0.304 / 2) of the block absmax
      {q::qtype::nf4_dq, 4 + 8.0 / 64 + (32.0 + 32.0) / (48 * 256), amax * 0.2},  // + absmax2 and the mean
  };
  for (const auto& r : rows) {
    const q::quantized_matrix m = q::quantized_matrix::quantize(w, r.type);
    EXPECT_EQ(m.rows(), 48);
    EXPECT_NEAR(m.bits_per_weight(), r.bits, 1e-9) << q::qtype_name(r.type);
    const lora::matrix<float> d = m.dequantize<float>();
    EXPECT_LE((d - w).cwiseAbs().maxCoeff(), r.max_error) << q::qtype_name(r.type);
    EXPECT_EQ(m.dequantize<double>(), d.cast<double>()) << q::qtype_name(r.type);
    EXPECT_EQ(q::parse_qtype(q::qtype_name(r.type)), r.type);
  }
  expect_error<lora::shape_error>([&] { q::quantized_matrix::quantize(random_weight(2, 48, 1), q::qtype::q4_0); },
                                  {"q4_0", "48", "32"});
  expect_error<lora::config_error>([] { q::parse_qtype("nf8"); }, {"nf8", "nf4_dq"});
}

template <typename Scalar>
void check_products(q::qtype type, Scalar tol, lora::index n) {
  // cols 8192: panels of 64 rows (float) or 32 (double), so 150 rows take several panels and a short one;
  // in float, up to 4 input rows go through the fused kernels (quant/fused.hpp) where they apply.
  const lora::index rows = 150, cols = 8192;
  const q::quantized_matrix w = q::quantized_matrix::quantize(random_weight(rows, cols, 3), type);
  const lora::matrix<Scalar> dense = w.dequantize<Scalar>();
  std::mt19937 rng(4);
  std::normal_distribution<double> normal;
  lora::matrix<Scalar> x(n, cols), dy(n, rows);
  for (auto& v : x.reshaped()) v = static_cast<Scalar>(normal(rng));
  for (auto& v : dy.reshaped()) v = static_cast<Scalar>(normal(rng));
  q::qgemm_workspace<Scalar> ws;
  lora::matrix<Scalar> y(n, rows);
  q::qgemm_forward<Scalar>(x, w, y, ws);
  const lora::matrix<Scalar> y_ref = x * dense.transpose();
  EXPECT_LE((y - y_ref).cwiseAbs().maxCoeff(), tol * y_ref.cwiseAbs().maxCoeff()) << q::qtype_name(type) << " n " << n;
  lora::matrix<Scalar> dx = lora::matrix<Scalar>::Ones(n, cols);
  q::qgemm_backward_input<Scalar>(dy, w, dx, ws);
  const lora::matrix<Scalar> dx_ref = lora::matrix<Scalar>::Ones(n, cols) + dy * dense;
  EXPECT_LE((dx - dx_ref).cwiseAbs().maxCoeff(), tol * dx_ref.cwiseAbs().maxCoeff()) << q::qtype_name(type);
}

TEST(QuantMatrix, PanelProductsEqualTheDenseProductOfTheDequantizedWeight) {
  for (auto t : {q::qtype::f32, q::qtype::bf16, q::qtype::f16, q::qtype::int8, q::qtype::nf4, q::qtype::nf4_dq,
                 q::qtype::q8_0, q::qtype::q4_0}) {
    for (lora::index n : {1, 3, 4, 5}) check_products<float>(t, 1e-5f, n);
    check_products<double>(t, 1e-12, 3);
  }
}

TEST(QuantMatrix, FusedKernelsApplyWhereRowsAreWholeBlocks) {
  const lora::matrix<float> x = lora::matrix<float>::Random(2, 64);
  float* ys[2];
  const float* xs[2];
  std::vector<float> y0(8), y1(8);
  const Eigen::Matrix<float, 2, 64, Eigen::RowMajor> xr = x;
  xs[0] = xr.row(0).data();
  xs[1] = xr.row(1).data();
  ys[0] = y0.data();
  ys[1] = y1.data();
  for (auto t : {q::qtype::nf4, q::qtype::nf4_dq, q::qtype::q8_0, q::qtype::q4_0, q::qtype::int8, q::qtype::f32,
                 q::qtype::bf16, q::qtype::f16}) {
    const q::quantized_matrix w = q::quantized_matrix::quantize(random_weight(8, 64, 7), t);
    EXPECT_EQ(w.fused_forward(2, xs, ys), LORA_QUANT_FUSED == 1) << q::qtype_name(t);
    if (LORA_QUANT_FUSED) {
      const lora::matrix<float> ref = x * w.dequantize<float>().transpose();
      for (int r = 0; r < 8; ++r) EXPECT_NEAR(y1[static_cast<std::size_t>(r)], ref(1, r), 1e-5f) << q::qtype_name(t);
    }
  }
  // Not whole blocks (NF4: 64, the others: 32), or more than 4 inputs: the caller takes the panel products.
  EXPECT_FALSE(q::quantized_matrix::quantize(random_weight(8, 96, 8), q::qtype::nf4).fused_forward(2, xs, ys));
  EXPECT_FALSE(q::quantized_matrix::quantize(random_weight(8, 60, 8), q::qtype::int8).fused_forward(2, xs, ys));
  EXPECT_FALSE(q::quantized_matrix::quantize(random_weight(8, 48, 8), q::qtype::f32).fused_forward(2, xs, ys));
  EXPECT_FALSE(q::quantized_matrix::quantize(random_weight(8, 64, 8), q::qtype::f32).fused_forward(5, xs, ys));
}

TEST(QuantMatrix, ProductsCheckShapes) {
  const q::quantized_matrix w = q::quantized_matrix::quantize(random_weight(4, 32, 5), q::qtype::nf4);
  q::qgemm_workspace<float> ws;
  lora::matrix<float> x(2, 31), y(2, 4);
  expect_error<lora::shape_error>([&] { q::qgemm_forward<float>(x, w, y, ws); }, {"qgemm_forward", "2x31", "4x32"});
  lora::matrix<float> dy(2, 4), dx(2, 30);
  expect_error<lora::shape_error>([&] { q::qgemm_backward_input<float>(dy, w, dx, ws); }, {"dX", "2x30"});
}

}  // namespace
