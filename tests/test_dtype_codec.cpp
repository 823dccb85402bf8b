// tests/test_dtype_codec.cpp: the element types of tensor files (io/dtype.hpp) and their number
// formats (io/detail/codec.hpp): names, sizes and parsing; F16 and BF16 rounding to nearest even
// directly from double, against hand-computed bit patterns and over all 65,536 patterns of each;
// double to float narrowing; the F8 decoders.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <lora/io/detail/codec.hpp>
#include <lora/io/dtype.hpp>
#include <utility>

#include "support.hpp"

namespace {

namespace io = lora::io;
namespace detail = lora::io::detail;
using lora_test::expect_error;

double pow2(int e) { return std::ldexp(1.0, e); }

/// Equal as values, with NaN equal to NaN and -0 distinct from +0.
template <typename Scalar>
bool same(Scalar a, Scalar b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return a == b && std::signbit(a) == std::signbit(b);
}

constexpr io::dtype all_dtypes[] = {
    io::dtype::boolean, io::dtype::u8,  io::dtype::i8,  io::dtype::f8_e5m2, io::dtype::f8_e4m3, io::dtype::f8_e8m0,
    io::dtype::i16,     io::dtype::u16, io::dtype::f16, io::dtype::bf16,    io::dtype::i32,     io::dtype::u32,
    io::dtype::f32,     io::dtype::c64, io::dtype::f64, io::dtype::i64,     io::dtype::u64};

TEST(SafetensorsDtype, NamesSizesAndParsing) {
  const std::pair<const char*, std::size_t> expected[] = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1}, {"F8_E8M0", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},     {"U32", 4},
      {"F32", 4},  {"C64", 8}, {"F64", 8}, {"I64", 8},     {"U64", 8}};
  ASSERT_EQ(std::size(expected), std::size(all_dtypes));
  for (std::size_t k = 0; k < std::size(all_dtypes); ++k) {
    EXPECT_STREQ(io::dtype_name(all_dtypes[k]), expected[k].first);
    EXPECT_EQ(io::dtype_size(all_dtypes[k]), expected[k].second) << expected[k].first;
    EXPECT_EQ(io::parse_dtype(expected[k].first), all_dtypes[k]);
  }
  for (const char* bad : {"F17", "f32", "", "F4", "F6_E2M3", "float32", "F32 "}) {
    expect_error<lora::format_error>([&] { io::parse_dtype(bad); }, {"unknown dtype"});
  }
  EXPECT_EQ(io::dtype_of<float>(), io::dtype::f32);
  EXPECT_EQ(io::dtype_of<double>(), io::dtype::f64);
}

TEST(SafetensorsHalf, RoundsToNearestEven) {
  EXPECT_EQ(detail::to_half_bits(1.0), 0x3C00);
  EXPECT_EQ(detail::to_half_bits(-2.0), 0xC000);
  EXPECT_EQ(detail::to_half_bits(0.5), 0x3800);
  EXPECT_EQ(detail::to_half_bits(1.0 / 3.0), 0x3555);  // 0x3555 = 0.333251953..., error 8e-5 < half ulp
  EXPECT_EQ(detail::to_half_bits(0.0), 0x0000);
  EXPECT_EQ(detail::to_half_bits(-0.0), 0x8000);
  // Between 1 (0x3C00) and 1 + 2^-10 (0x3C01) the tie 1 + 2^-11 goes to the even 0x3C00; between
  // 0x3C01 and 0x3C02 the tie 1 + 3 * 2^-11 goes to the even 0x3C02.
  EXPECT_EQ(detail::to_half_bits(1.0 + pow2(-11)), 0x3C00);
  EXPECT_EQ(detail::to_half_bits(1.0 + 3 * pow2(-11)), 0x3C02);
  EXPECT_EQ(detail::to_half_bits(1.0 + pow2(-11) + pow2(-30)), 0x3C01);  // just above the tie
  EXPECT_EQ(detail::to_half_bits(1.0 + pow2(-11) - pow2(-30)), 0x3C00);  // just below it
  EXPECT_EQ(detail::to_half_bits(-(1.0 + 3 * pow2(-11))), 0xBC02);
}

TEST(SafetensorsHalf, RoundsDirectlyFromDouble) {
  // 1 + 2^-11 + 2^-40 lies above the tie, so binary16 gives 0x3C01; going through float first would
  // drop the 2^-40, land on the tie and give 0x3C00.
  const double x = 1.0 + pow2(-11) + pow2(-40);
  EXPECT_EQ(detail::to_half_bits(x), 0x3C01);
  EXPECT_EQ(detail::to_half_bits(static_cast<float>(x)), 0x3C00);
}

TEST(SafetensorsHalf, OverflowInfinityAndNaN) {
  EXPECT_EQ(detail::to_half_bits(65504.0), 0x7BFF);   // largest finite
  EXPECT_EQ(detail::to_half_bits(65519.99), 0x7BFF);  // below the tie with 65536
  EXPECT_EQ(detail::to_half_bits(65520.0), 0x7C00);   // the tie: even is 2^16 = Inf
  EXPECT_EQ(detail::to_half_bits(1e10), 0x7C00);
  EXPECT_EQ(detail::to_half_bits(-1e300), 0xFC00);
  EXPECT_EQ(detail::to_half_bits(std::numeric_limits<double>::infinity()), 0x7C00);
  EXPECT_EQ(detail::to_half_bits(-std::numeric_limits<double>::infinity()), 0xFC00);
  EXPECT_EQ(detail::to_half_bits(std::numeric_limits<double>::quiet_NaN()), 0x7E00);
  EXPECT_EQ(detail::to_half_bits(-std::numeric_limits<double>::quiet_NaN()), 0xFE00);
  // A NaN whose payload lies only in bits that do not fit must not become Inf.
  double nan_low_payload;
  const std::uint64_t nan_bits = 0x7FF0000000000001ull;
  std::memcpy(&nan_low_payload, &nan_bits, sizeof nan_bits);
  const std::uint16_t h = detail::to_half_bits(nan_low_payload);
  EXPECT_EQ(h & 0x7C00, 0x7C00);
  EXPECT_NE(h & 0x03FF, 0);
}

TEST(SafetensorsHalf, Subnormals) {
  EXPECT_EQ(detail::to_half_bits(pow2(-24)), 0x0001);              // smallest subnormal
  EXPECT_EQ(detail::to_half_bits(pow2(-25)), 0x0000);              // tie between 0 and 2^-24: even is 0
  EXPECT_EQ(detail::to_half_bits(pow2(-25) + pow2(-40)), 0x0001);  // above that tie
  EXPECT_EQ(detail::to_half_bits(3 * pow2(-25)), 0x0002);          // tie between 1 and 2 units: 2
  EXPECT_EQ(detail::to_half_bits(5 * pow2(-25)), 0x0002);          // tie between 2 and 3 units: 2
  EXPECT_EQ(detail::to_half_bits(pow2(-26)), 0x0000);
  EXPECT_EQ(detail::to_half_bits(-pow2(-24)), 0x8001);
  EXPECT_EQ(detail::to_half_bits(-pow2(-26)), 0x8000);             // signed zero
  EXPECT_EQ(detail::to_half_bits(pow2(-14) - pow2(-24)), 0x03FF);  // largest subnormal
  EXPECT_EQ(detail::to_half_bits(pow2(-14) - pow2(-25)), 0x0400);  // tie with the smallest normal: even
  EXPECT_EQ(detail::to_half_bits(pow2(-14)), 0x0400);              // smallest normal
  EXPECT_EQ(detail::to_half_bits(std::numeric_limits<double>::denorm_min()), 0x0000);
  EXPECT_EQ(detail::from_half_bits(0x0001), static_cast<float>(pow2(-24)));
  EXPECT_EQ(detail::from_half_bits(0x03FF), static_cast<float>(pow2(-14) - pow2(-24)));
}

TEST(SafetensorsHalf, DecodesAndRoundTripsAllPatterns) {
  EXPECT_EQ(detail::from_half_bits(0x3C00), 1.0f);
  EXPECT_EQ(detail::from_half_bits(0xC000), -2.0f);
  EXPECT_EQ(detail::from_half_bits(0x7BFF), 65504.0f);
  EXPECT_TRUE(std::signbit(detail::from_half_bits(0x8000)));
  EXPECT_EQ(detail::from_half_bits(0x7C00), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(detail::from_half_bits(0x7E00)));
  for (std::uint32_t h = 0; h <= 0xFFFF; ++h) {
    const bool nan = (h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0;
    const float f = detail::from_half_bits(static_cast<std::uint16_t>(h));
    ASSERT_EQ(std::isnan(f), nan) << h;
    // Every pattern survives decode then encode; a signalling NaN comes back quieted.
    ASSERT_EQ(detail::to_half_bits(f), nan ? (h | 0x200) : h) << h;
    ASSERT_TRUE(same(detail::binary_to_double<5, 10>(h), static_cast<double>(f))) << h;  // the generic decoder agrees
  }
}

TEST(SafetensorsBFloat16, RoundsToNearestEven) {
  EXPECT_EQ(detail::to_bfloat16_bits(1.0), 0x3F80);
  EXPECT_EQ(detail::to_bfloat16_bits(-0.5), 0xBF00);
  EXPECT_EQ(detail::to_bfloat16_bits(1.0 + pow2(-8)), 0x3F80);              // tie: even
  EXPECT_EQ(detail::to_bfloat16_bits(1.0 + 3 * pow2(-8)), 0x3F82);          // tie: even
  EXPECT_EQ(detail::to_bfloat16_bits(1.0 + pow2(-8) + pow2(-30)), 0x3F81);  // above the tie
  // Through float the 2^-30 would be lost (float keeps 23 bits) and the tie would round down.
  EXPECT_EQ(detail::to_bfloat16_bits(static_cast<float>(1.0 + pow2(-8) + pow2(-30))), 0x3F80);
  EXPECT_EQ(detail::to_bfloat16_bits(-0.0), 0x8000);
  EXPECT_EQ(detail::from_bfloat16_bits(0x3F80), 1.0f);
  EXPECT_EQ(detail::from_bfloat16_bits(0xC0A0), -5.0f);
}

TEST(SafetensorsBFloat16, OverflowSubnormalsInfinityAndNaN) {
  const double max_finite = (2.0 - pow2(-7)) * pow2(127);  // 0x7F7F
  EXPECT_EQ(detail::to_bfloat16_bits(max_finite), 0x7F7F);
  EXPECT_EQ(detail::to_bfloat16_bits((2.0 - pow2(-8)) * pow2(127)), 0x7F80);              // tie: even = Inf
  EXPECT_EQ(detail::to_bfloat16_bits((2.0 - pow2(-8)) * pow2(127) - pow2(110)), 0x7F7F);  // below the tie
  EXPECT_EQ(detail::to_bfloat16_bits(FLT_MAX), 0x7F80);
  EXPECT_EQ(detail::to_bfloat16_bits(1e300), 0x7F80);
  EXPECT_EQ(detail::to_bfloat16_bits(-1e300), 0xFF80);
  EXPECT_EQ(detail::to_bfloat16_bits(std::numeric_limits<double>::infinity()), 0x7F80);
  EXPECT_EQ(detail::to_bfloat16_bits(std::numeric_limits<double>::quiet_NaN()), 0x7FC0);
  EXPECT_EQ(detail::to_bfloat16_bits(pow2(-126)), 0x0080);      // smallest normal
  EXPECT_EQ(detail::to_bfloat16_bits(pow2(-133)), 0x0001);      // smallest subnormal
  EXPECT_EQ(detail::to_bfloat16_bits(pow2(-134)), 0x0000);      // tie with 0: even
  EXPECT_EQ(detail::to_bfloat16_bits(3 * pow2(-134)), 0x0002);  // tie between 1 and 2 units: 2
  EXPECT_EQ(detail::to_bfloat16_bits(pow2(-149)), 0x0000);      // float's smallest subnormal
  EXPECT_EQ(detail::to_bfloat16_bits(-pow2(-133)), 0x8001);
  for (std::uint32_t b = 0; b <= 0xFFFF; ++b) {
    const bool nan = (b & 0x7F80) == 0x7F80 && (b & 0x7F) != 0;
    const float f = detail::from_bfloat16_bits(static_cast<std::uint16_t>(b));
    ASSERT_EQ(std::isnan(f), nan) << b;
    ASSERT_EQ(detail::to_bfloat16_bits(f), nan ? (b | 0x40) : b) << b;
  }
}

TEST(SafetensorsFloat, NarrowsDoubleWithoutUndefinedBehaviour) {
  EXPECT_EQ(detail::narrow_to_float(1e300), std::numeric_limits<float>::infinity());
  EXPECT_EQ(detail::narrow_to_float(-1e300), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(detail::narrow_to_float(static_cast<double>(FLT_MAX)), FLT_MAX);
  EXPECT_EQ(detail::narrow_to_float(static_cast<double>(FLT_MAX) + pow2(102)), FLT_MAX);  // below the tie
  EXPECT_EQ(detail::narrow_to_float(static_cast<double>(FLT_MAX) + pow2(103)),            // the tie: even = Inf
            std::numeric_limits<float>::infinity());
  EXPECT_EQ(detail::narrow_to_float(1.0 / 3.0), 1.0f / 3.0f);
  EXPECT_TRUE(std::isnan(detail::narrow_to_float(std::numeric_limits<double>::quiet_NaN())));
  EXPECT_EQ((detail::round_to_binary<8, 23>(1.0)), 0x3F800000u);
  EXPECT_EQ((detail::round_to_binary<8, 23>(pow2(-149))), 0x00000001u);
  EXPECT_EQ((detail::round_to_binary<8, 23>(pow2(-150))), 0x00000000u);  // tie with 0: even
}

TEST(SafetensorsFloat8, Decodes) {
  // F8_E4M3 (e4m3fn): bias 7, no Inf, S.1111.111 is NaN.
  EXPECT_EQ(detail::from_f8_e4m3_bits(0x38), 1.0f);
  EXPECT_EQ(detail::from_f8_e4m3_bits(0x7E), 448.0f);
  EXPECT_EQ(detail::from_f8_e4m3_bits(0xFE), -448.0f);
  EXPECT_EQ(detail::from_f8_e4m3_bits(0x78), 256.0f);  // exponent all ones is finite
  EXPECT_EQ(detail::from_f8_e4m3_bits(0x01), static_cast<float>(pow2(-9)));
  EXPECT_EQ(detail::from_f8_e4m3_bits(0x08), static_cast<float>(pow2(-6)));
  EXPECT_TRUE(std::isnan(detail::from_f8_e4m3_bits(0x7F)));
  EXPECT_TRUE(std::isnan(detail::from_f8_e4m3_bits(0xFF)));
  // F8_E5M2: bias 15, IEEE-like.
  EXPECT_EQ(detail::from_f8_e5m2_bits(0x3C), 1.0f);
  EXPECT_EQ(detail::from_f8_e5m2_bits(0x7B), 57344.0f);
  EXPECT_EQ(detail::from_f8_e5m2_bits(0x7C), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(detail::from_f8_e5m2_bits(0x7D)));
  EXPECT_EQ(detail::from_f8_e5m2_bits(0x01), static_cast<float>(pow2(-16)));
  // F8_E8M0: 2^(b - 127), 0xFF is NaN.
  EXPECT_EQ(detail::from_f8_e8m0_bits(127), 1.0f);
  EXPECT_EQ(detail::from_f8_e8m0_bits(128), 2.0f);
  EXPECT_EQ(detail::from_f8_e8m0_bits(0), static_cast<float>(pow2(-127)));
  EXPECT_TRUE(std::isnan(detail::from_f8_e8m0_bits(0xFF)));
}

}  // namespace
