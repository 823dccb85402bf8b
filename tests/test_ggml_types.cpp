// tests/test_ggml_types.cpp: the ggml tensor types of GGUF files (io/ggml_types.hpp): the type table,
// row sizes and parsing; F16 and BF16 bit patterns (ties to even, subnormals, overflow, NaN, and every
// F16 midpoint); Q8_0 and Q4_0 blocks worked by hand byte by byte, including roundf's ties, the fused
// multiply-add of Q4_0 and all-zero blocks; and round-trip error bounds on random rows.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <lora/io/ggml_types.hpp>
#include <random>
#include <vector>

#include "support.hpp"

namespace {

namespace io = lora::io;
namespace detail = lora::io::detail;
using io::ggml_type;
using lora_test::expect_error;
using bytes = std::vector<unsigned char>;

float from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

bytes quantize(ggml_type type, const std::vector<float>& x) {
  bytes out(io::ggml_row_bytes(type, x.size()));
  io::ggml_quantize_row(type, x.data(), x.size(), out.data());
  return out;
}

std::vector<float> dequantize(ggml_type type, const bytes& b, std::size_t n) {
  std::vector<float> out(n);
  io::ggml_dequantize_row(type, b.data(), n, out.data());
  return out;
}

/// A 32-element block: `head` followed by zeros.
std::vector<float> block_of(std::initializer_list<float> head) {
  std::vector<float> x(head);
  x.resize(32, 0.0f);
  return x;
}

TEST(GgmlTypesTable, CodesNamesAndSizes) {
  struct row {
    std::uint32_t code;
    const char* name;
    std::uint32_t block, size;
    bool convertible;
  };
  const row expected[] = {{0, "F32", 1, 4, true},
                          {1, "F16", 1, 2, true},
                          {2, "Q4_0", 32, 18, true},
                          {3, "Q4_1", 32, 20, false},
                          {6, "Q5_0", 32, 22, false},
                          {7, "Q5_1", 32, 24, false},
                          {8, "Q8_0", 32, 34, true},
                          {9, "Q8_1", 32, 36, false},
                          {10, "Q2_K", 256, 84, false},
                          {11, "Q3_K", 256, 110, false},
                          {12, "Q4_K", 256, 144, false},
                          {13, "Q5_K", 256, 176, false},
                          {14, "Q6_K", 256, 210, false},
                          {15, "Q8_K", 256, 292, false},
                          {24, "I8", 1, 1, false},
                          {25, "I16", 1, 2, false},
                          {26, "I32", 1, 4, false},
                          {27, "I64", 1, 8, false},
                          {28, "F64", 1, 8, false},
                          {30, "BF16", 1, 2, true},
                          // block sizes and bytes of ggml-common.h's block_iq*, block_tq*, block_mxfp4
                          {16, "IQ2_XXS", 256, 66, false},
                          {17, "IQ2_XS", 256, 74, false},
                          {18, "IQ3_XXS", 256, 98, false},
                          {19, "IQ1_S", 256, 50, false},
                          {20, "IQ4_NL", 32, 18, false},
                          {21, "IQ3_S", 256, 110, false},
                          {22, "IQ2_S", 256, 82, false},
                          {23, "IQ4_XS", 256, 136, false},
                          {29, "IQ1_M", 256, 56, false},
                          {34, "TQ1_0", 256, 54, false},
                          {35, "TQ2_0", 256, 66, false},
                          {39, "MXFP4", 32, 17, false}};
  std::size_t known = 0;
  for (std::uint32_t code = 0; code < 64; ++code) {
    const io::ggml_type_traits* traits = io::find_ggml_type(code);
    const row* want = nullptr;
    for (const row& r : expected) {
      if (r.code == code) want = &r;
    }
    if (want == nullptr) {
      EXPECT_EQ(traits, nullptr) << code;
      EXPECT_STREQ(io::ggml_type_name(static_cast<ggml_type>(code)), "?");
      EXPECT_FALSE(io::ggml_is_convertible(static_cast<ggml_type>(code)));
      continue;
    }
    ++known;
    ASSERT_NE(traits, nullptr) << code;
    EXPECT_EQ(static_cast<std::uint32_t>(traits->type), code);
    EXPECT_STREQ(traits->name, want->name);
    EXPECT_EQ(traits->block_size, want->block);
    EXPECT_EQ(traits->type_size, want->size);
    EXPECT_EQ(traits->convertible, want->convertible);
    EXPECT_EQ(&io::ggml_traits(traits->type), traits);
    EXPECT_STREQ(io::ggml_type_name(traits->type), want->name);
    EXPECT_EQ(io::ggml_is_convertible(traits->type), want->convertible);
  }
  EXPECT_EQ(known, std::size(expected));
  EXPECT_EQ(io::find_ggml_type(0xFFFFFFFFu), nullptr);
  expect_error<lora::format_error>([] { io::ggml_traits(static_cast<ggml_type>(4)); }, {"unknown ggml", "code 4"});
}

TEST(GgmlTypesTable, ParsesCommandLineSpellings) {
  EXPECT_EQ(io::parse_ggml_type("f32"), ggml_type::f32);
  EXPECT_EQ(io::parse_ggml_type("F16"), ggml_type::f16);
  EXPECT_EQ(io::parse_ggml_type("Bf16"), ggml_type::bf16);
  EXPECT_EQ(io::parse_ggml_type("Q8_0"), ggml_type::q8_0);
  EXPECT_EQ(io::parse_ggml_type("q4_0"), ggml_type::q4_0);
  for (const char* bad : {"q5_k", "Q4_K", "f64", "i8", "", "q8_0 ", "q8", "float32"}) {
    expect_error<lora::config_error>([&] { io::parse_ggml_type(bad); },
                                     {"'" + std::string(bad) + "'", "f32, f16, bf16, q8_0, q4_0"});
  }
}

TEST(GgmlTypesRowBytes, WholeBlocksOnly) {
  EXPECT_EQ(io::ggml_row_bytes(ggml_type::f32, 3), 12u);
  EXPECT_EQ(io::ggml_row_bytes(ggml_type::f16, 5), 10u);
  EXPECT_EQ(io::ggml_row_bytes(ggml_type::bf16, 0), 0u);
  EXPECT_EQ(io::ggml_row_bytes(ggml_type::q8_0, 64), 68u);
  EXPECT_EQ(io::ggml_row_bytes(ggml_type::q4_0, 32), 18u);
  EXPECT_EQ(io::ggml_row_bytes(ggml_type::q4_k, 512), 288u);
  EXPECT_EQ(io::ggml_row_bytes(ggml_type::q8_k, 256), 292u);
  EXPECT_EQ(io::ggml_row_bytes(ggml_type::f64, 7), 56u);
  expect_error<lora::format_error>([] { io::ggml_row_bytes(ggml_type::q8_0, 33); }, {"Q8_0", "32", "33"});
  expect_error<lora::format_error>([] { io::ggml_row_bytes(ggml_type::q6_k, 32); }, {"Q6_K", "256", "32"});
  expect_error<lora::format_error>([] { io::ggml_row_bytes(ggml_type::f32, std::uint64_t{1} << 62); }, {"2^64"});
  EXPECT_EQ(io::ggml_row_bytes(ggml_type::f32, (std::uint64_t{1} << 62) - 1),
            std::numeric_limits<std::uint64_t>::max() - 3);
  expect_error<lora::format_error>([] { io::ggml_row_bytes(static_cast<ggml_type>(31), 1); }, {"code 31"});
}

TEST(GgmlTypesRowBytes, ConversionsRejectOtherTypesAndPartialBlocks) {
  std::vector<float> x(256, 1.0f);
  bytes b(1024);
  expect_error<lora::dtype_error>([&] { io::ggml_quantize_row(ggml_type::q4_k, x.data(), 256, b.data()); },
                                  {"quantize", "Q4_K", "F32, F16, BF16, Q8_0 and Q4_0"});
  expect_error<lora::dtype_error>([&] { io::ggml_dequantize_row(ggml_type::q4_1, b.data(), 32, x.data()); },
                                  {"dequantize", "Q4_1"});
  expect_error<lora::dtype_error>([&] { io::ggml_quantize_row(ggml_type::i32, x.data(), 4, b.data()); }, {"I32"});
  expect_error<lora::format_error>([&] { io::ggml_quantize_row(ggml_type::q8_0, x.data(), 31, b.data()); },
                                   {"Q8_0", "31"});
  expect_error<lora::format_error>([&] { io::ggml_dequantize_row(ggml_type::q4_0, b.data(), 48, x.data()); },
                                   {"Q4_0", "48"});
  expect_error<lora::format_error>([&] { io::ggml_quantize_row(static_cast<ggml_type>(5), x.data(), 32, b.data()); },
                                   {"code 5"});
}

TEST(GgmlTypesHalf, KnownBitPatterns) {
  EXPECT_EQ(detail::ggml_fp32_to_fp16(1.0f), 0x3C00);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(-2.0f), 0xC000);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(0.0f), 0x0000);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(-0.0f), 0x8000);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(1.0f / 3.0f), 0x3555);
  // 1 + 2^-11 lies halfway between 0x3C00 and 0x3C01: ties go to the even 0x3C00; 1 + 3*2^-11 lies
  // between 0x3C01 and 0x3C02 and goes to 0x3C02; one float ulp above a tie rounds up.
  EXPECT_EQ(detail::ggml_fp32_to_fp16(1.0f + 0x1p-11f), 0x3C00);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(1.0f + 3 * 0x1p-11f), 0x3C02);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(std::nextafter(1.0f + 0x1p-11f, 2.0f)), 0x3C01);
  // 65504 is the largest half; 65520 is halfway to 2^16 and rounds (to even) to Inf.
  EXPECT_EQ(detail::ggml_fp32_to_fp16(65504.0f), 0x7BFF);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(std::nextafter(65520.0f, 0.0f)), 0x7BFF);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(65520.0f), 0x7C00);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(-1e30f), 0xFC00);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(-std::numeric_limits<float>::infinity()), 0xFC00);
  // Subnormals: 2^-24 is the smallest; 2^-25 is a tie with 0 (even); 3*2^-25 a tie between 1 and 2.
  EXPECT_EQ(detail::ggml_fp32_to_fp16(0x1p-24f), 0x0001);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(0x1p-25f), 0x0000);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(-0x1p-25f), 0x8000);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(std::nextafter(0x1p-25f, 1.0f)), 0x0001);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(3 * 0x1p-25f), 0x0002);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(0x1p-14f - 0x1p-25f), 0x0400);  // tie between 0x3FF and 0x400
  EXPECT_EQ(detail::ggml_fp32_to_fp16(1e-40f), 0x0000);               // a float subnormal
  // NaN stays NaN, quiet, sign and top payload bits kept.
  EXPECT_EQ(detail::ggml_fp32_to_fp16(from_bits(0x7FC00000)), 0x7E00);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(from_bits(0xFF800001)), 0xFE00);
  EXPECT_EQ(detail::ggml_fp32_to_fp16(from_bits(0x7FA02000)), 0x7F01);
  EXPECT_TRUE(std::isnan(detail::ggml_fp16_to_fp32(0x7E00)));
  EXPECT_EQ(detail::ggml_fp16_to_fp32(0x0001), 0x1p-24f);
  EXPECT_EQ(detail::ggml_fp16_to_fp32(0xBC00), -1.0f);
}

TEST(GgmlTypesHalf, EveryPatternAndEveryMidpoint) {
  // Each finite half decodes exactly and re-encodes to itself; the midpoint of two neighbours (exact in
  // float) goes to the one with an even pattern, and one float ulp either side to the nearer one.
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7C00) == 0x7C00) continue;  // Inf and NaN
    const float f = detail::ggml_fp16_to_fp32(static_cast<std::uint16_t>(h));
    ASSERT_EQ(detail::ggml_fp32_to_fp16(f), h) << std::hex << h;
    const std::uint32_t next = h + 1;  // the neighbour further from zero (0x7C00 is Inf)
    if ((h & 0x7FFF) == 0x7BFF) continue;
    const float g = detail::ggml_fp16_to_fp32(static_cast<std::uint16_t>(next));
    const float mid = f / 2 + g / 2;
    ASSERT_EQ(detail::ggml_fp32_to_fp16(mid), (h & 1) == 0 ? h : next) << std::hex << h;
    ASSERT_EQ(detail::ggml_fp32_to_fp16(std::nextafter(mid, f)), h) << std::hex << h;
    ASSERT_EQ(detail::ggml_fp32_to_fp16(std::nextafter(mid, g)), next) << std::hex << h;
  }
}

TEST(GgmlTypesBFloat16, KnownBitPatterns) {
  EXPECT_EQ(detail::ggml_fp32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(detail::ggml_fp32_to_bf16(-2.0f), 0xC000);
  EXPECT_EQ(detail::ggml_fp32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(detail::ggml_fp32_to_bf16(from_bits(0x3F808000)), 0x3F80);              // tie, to even
  EXPECT_EQ(detail::ggml_fp32_to_bf16(from_bits(0x3F818000)), 0x3F82);              // tie, to even
  EXPECT_EQ(detail::ggml_fp32_to_bf16(from_bits(0x3F808001)), 0x3F81);              // above the tie
  EXPECT_EQ(detail::ggml_fp32_to_bf16(from_bits(0x3F807FFF)), 0x3F80);              // below the tie
  EXPECT_EQ(detail::ggml_fp32_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // rounds up to Inf
  EXPECT_EQ(detail::ggml_fp32_to_bf16(-std::numeric_limits<float>::infinity()), 0xFF80);
  // NaN: the top half with the quiet bit (64) forced, so a signalling NaN cannot become Inf.
  EXPECT_EQ(detail::ggml_fp32_to_bf16(from_bits(0x7FC00000)), 0x7FC0);
  EXPECT_EQ(detail::ggml_fp32_to_bf16(from_bits(0x7F800001)), 0x7FC0);
  EXPECT_EQ(detail::ggml_fp32_to_bf16(from_bits(0xFFFFFFFF)), 0xFFFF);
  EXPECT_EQ(detail::ggml_bf16_to_fp32(0x3F80), 1.0f);
  EXPECT_EQ(detail::ggml_bf16_to_fp32(0xC0A0), -5.0f);
}

TEST(GgmlTypesRows, FloatRowsAreLittleEndian) {
  const std::vector<float> x = {1.0f, -2.5f, 0x1p-24f};
  EXPECT_EQ(quantize(ggml_type::f32, x),
            (bytes{0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x20, 0xC0, 0x00, 0x00, 0x80, 0x33}));
  EXPECT_EQ(quantize(ggml_type::f16, x), (bytes{0x00, 0x3C, 0x00, 0xC1, 0x01, 0x00}));
  EXPECT_EQ(quantize(ggml_type::bf16, x), (bytes{0x80, 0x3F, 0x20, 0xC0, 0x80, 0x33}));
  for (ggml_type type : {ggml_type::f32, ggml_type::f16, ggml_type::bf16}) {
    EXPECT_EQ(dequantize(type, quantize(type, x), x.size()), x) << io::ggml_type_name(type);
  }
  const float nan = from_bits(0x7FC00001);  // F32 keeps every bit, NaN payload included
  std::uint32_t back;
  const std::vector<float> decoded = dequantize(ggml_type::f32, quantize(ggml_type::f32, {nan}), 1);
  std::memcpy(&back, decoded.data(), sizeof back);
  EXPECT_EQ(back, 0x7FC00001u);
}

TEST(GgmlTypesQ80, BlockWorkedByHand) {
  // max|x| = 127, so d = 127 / 127 = 1 (f16 0x3C00, stored 00 3C) and 1/d = 1: q = roundf(x), halves
  // away from zero (0.5 -> 1, 2.5 -> 3, -0.5 -> -1, -2.5 -> -3; ties to even would give 0, 2, 0, -2).
  const std::vector<float> x = block_of({127.0f, -0.5f, 0.5f, 1.5f, 2.5f, -2.5f, 0.49f, -126.6f, 3.7f, -3.2f, -0.0f});
  bytes want = {0x00, 0x3C, 0x7F, 0xFF, 0x01, 0x02, 0x03, 0xFD, 0x00, 0x81, 0x04, 0xFD, 0x00};
  want.resize(34, 0x00);
  EXPECT_EQ(quantize(ggml_type::q8_0, x), want);
  const std::vector<float> back = dequantize(ggml_type::q8_0, want, 32);
  EXPECT_EQ(back, block_of({127, -1, 1, 2, 3, -3, 0, -127, 4, -3}));
}

TEST(GgmlTypesQ80, ScaleStoredAsHalfButQuantizedInFloat) {
  // max|x| = 1: d = 1/127 = 0.0078740..., whose f16 is 2^-7 * (1 + 8/1024) = 0.00787353515625 (0x2008,
  // stored 08 20); the q use the float d: 1/d = 127, so 0.25 -> roundf(31.75) = 32 (0x20), 0.1 -> 13
  // (0x0D), -0.3 -> roundf(-38.1) = -38 (0xDA). Decoding multiplies by the f16 d.
  const std::vector<float> x = block_of({1.0f, -1.0f, 0.25f, 0.1f, -0.3f});
  bytes want = {0x08, 0x20, 0x7F, 0x81, 0x20, 0x0D, 0xDA};
  want.resize(34, 0x00);
  EXPECT_EQ(quantize(ggml_type::q8_0, x), want);
  const float d = 0.00787353515625f;
  EXPECT_EQ(dequantize(ggml_type::q8_0, want, 32), block_of({127 * d, -127 * d, 32 * d, 13 * d, -38 * d}));
}

TEST(GgmlTypesQ80, QuantizesWithTheRoundedInverseOfTheScale) {
  // max|x| = 1.375: d = 1.375 / 127 (f16: 2^-7 * (1 + 395/1024), 0x218B), and ggml multiplies by
  // id = 1/d = 0x1.71745cp+6, a little below 127 / 1.375. x = 0.6875 is exactly 63.5 d, but
  // 0.6875 * id = 63.4999962 rounds to 63 (0x3F), not 64.
  bytes want = {0x8B, 0x21, 0x7F, 0x3F};
  want.resize(34, 0x00);
  EXPECT_EQ(quantize(ggml_type::q8_0, block_of({1.375f, 0.6875f})), want);
}

TEST(GgmlTypesQ40, BlockWithNegativeMaxWorkedByHand) {
  // The element of largest |x| is -8, so d = -8 / -8 = 1 (00 3C) and q = min(15, trunc(x + 8.5)):
  //   x:  0  0.5  -0.5  -8   7  7.9  -1.5  1.49 | x[16..19]: 3  -3  -7.6  2.5
  //   q:  8   9    8     0  15  15    7    9    |            11  5   0    11
  // (7.9 + 8.5 = 16.4 clamps to 15; -0.5 + 8.5 = 8 exactly). Byte j = q[j] | q[j + 16] << 4:
  // B8 59 08 B0 8F 8F 87 89, then 88 for j = 8..15 (both halves zero, q = 8).
  std::vector<float> x = block_of({0.0f, 0.5f, -0.5f, -8.0f, 7.0f, 7.9f, -1.5f, 1.49f});
  x[16] = 3.0f;
  x[17] = -3.0f;
  x[18] = -7.6f;
  x[19] = 2.5f;
  bytes want = {0x00, 0x3C, 0xB8, 0x59, 0x08, 0xB0, 0x8F, 0x8F, 0x87, 0x89};
  want.resize(18, 0x88);
  EXPECT_EQ(quantize(ggml_type::q4_0, x), want);
  std::vector<float> back = block_of({0, 1, 0, -8, 7, 7, -1, 1});  // d * (q - 8)
  back[16] = 3;
  back[17] = -3;
  back[18] = -8;
  back[19] = 3;
  EXPECT_EQ(dequantize(ggml_type::q4_0, want, 32), back);
}

TEST(GgmlTypesQ40, FirstOfEqualMagnitudesSetsTheSign) {
  // {8, -8}: the first, +8, is the max, d = -1 (f16 0xBC00): q = trunc(-x + 8.5) gives 0 for 8 and
  // 16 -> 15 for -8. {-8, 8}: d = +1, q = 0 for -8 and 15 for 8.
  bytes first = quantize(ggml_type::q4_0, block_of({8.0f, -8.0f}));
  EXPECT_EQ(first[0], 0x00);
  EXPECT_EQ(first[1], 0xBC);
  EXPECT_EQ(first[2], 0x80);  // q[0] = 0, q[16] = 8
  EXPECT_EQ(first[3], 0x8F);  // q[1] = 15
  bytes second = quantize(ggml_type::q4_0, block_of({-8.0f, 8.0f}));
  EXPECT_EQ(second[1], 0x3C);
  EXPECT_EQ(second[2], 0x80);
  EXPECT_EQ(second[3], 0x8F);
  EXPECT_EQ(dequantize(ggml_type::q4_0, first, 32)[1], -7.0f);  // -1 * (15 - 8)
}

TEST(GgmlTypesQ40, MultiplyAddRoundsOnce) {
  // max = -12: d = 1.5 (f16 0x3E00), 1/d = 0x1.555556p-1, a little above 2/3. For x = -9.75, x/d is
  // exactly -6.5 but x * (1/d) is a little below it: fused, -9.75 * id + 8.5 = 1.99999988 truncates
  // to 1; rounding the product first (-6.5) would give 2.
  const bytes b = quantize(ggml_type::q4_0, block_of({-12.0f, -9.75f}));
  EXPECT_EQ(b[0], 0x00);
  EXPECT_EQ(b[1], 0x3E);
  EXPECT_EQ(b[2], 0x80);  // q[0] = trunc(-12 * id + 8.5) = trunc(0.5) = 0
  EXPECT_EQ(b[3], 0x81);  // q[1] = 1
}

TEST(GgmlTypesQuant, AllZeroBlocks) {
  // Q8_0: d = 0 / 127 = +0, q = 0. Q4_0: d = max / -8 with max = +0 is -0 (f16 0x8000), nibbles 8.
  const std::vector<float> zeros(64, 0.0f);
  EXPECT_EQ(quantize(ggml_type::q8_0, zeros), bytes(68, 0x00));
  bytes q4(36, 0x88);
  q4[0] = q4[18] = 0x00;
  q4[1] = q4[19] = 0x80;
  EXPECT_EQ(quantize(ggml_type::q4_0, zeros), q4);
  for (ggml_type type : {ggml_type::q8_0, ggml_type::q4_0}) {
    EXPECT_EQ(dequantize(type, quantize(type, zeros), 64), zeros) << io::ggml_type_name(type);
  }
}

TEST(GgmlTypesQuant, NonFiniteInputsStoreZeroCodes) {
  // ggml's C converts x * (1/d) to an integer, undefined for Inf and NaN; x86 gives 0 and so do we.
  // Q8_0 {Inf, 1}: d = Inf (f16 0x7C00), 1/d = 0, Inf * 0 = NaN -> 0, 1 * 0 -> 0.
  bytes q8(34, 0x00);
  q8[1] = 0x7C;
  EXPECT_EQ(quantize(ggml_type::q8_0, block_of({std::numeric_limits<float>::infinity(), 1.0f})), q8);
  // Q4_0 {Inf, 1}: d = -Inf (0xFC00), 1/d = -0: NaN -> 0 for Inf, 8.5 -> 8 for the others.
  bytes q4(18, 0x88);
  q4[0] = 0x00;
  q4[1] = 0xFC;
  q4[2] = 0x80;
  EXPECT_EQ(quantize(ggml_type::q4_0, block_of({std::numeric_limits<float>::infinity(), 1.0f})), q4);
  // Q4_0 with a float-subnormal max: d = 1e-39 / 8 has an infinite inverse, so every x * (1/d) is
  // +-Inf or NaN and every code 0; d's f16 is 0, so the block decodes to zeros either way.
  bytes tiny(18, 0x00);
  EXPECT_EQ(quantize(ggml_type::q4_0, block_of({-1e-39f, 5e-40f})), tiny);
}

TEST(GgmlTypesQuant, BlocksOfARowAreIndependent) {
  std::vector<float> row = block_of({127.0f, 2.5f});
  const std::vector<float> second = block_of({-8.0f, 7.0f});
  row.insert(row.end(), second.begin(), second.end());
  for (ggml_type type : {ggml_type::q8_0, ggml_type::q4_0}) {
    const bytes whole = quantize(type, row);
    bytes parts = quantize(type, block_of({127.0f, 2.5f}));
    const bytes tail = quantize(type, second);
    parts.insert(parts.end(), tail.begin(), tail.end());
    EXPECT_EQ(whole, parts) << io::ggml_type_name(type);
  }
}

TEST(GgmlTypesQuant, RandomRoundTripErrorsAreBounded) {
  // Per block, with d the float scale and dh its f16: Q8_0 rounds x/d to the nearest integer, so
  // |x - dh*q| <= |d|/2 + 127 |d - dh|, plus float rounding. Q4_0 rounds x/d half up and clamps q - 8
  // to 7, so the bound is |d|/2 + 8 |d - dh| where x/d < 7.5 and |d| + 8 |d - dh| above (the side
  // opposite the max reaches x/d = +8).
  std::mt19937 rng(20240611);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> log_scale(-6.0f, 6.0f);
  const std::size_t blocks = 200;
  std::vector<float> x(32 * blocks);
  for (std::size_t b = 0; b < blocks; ++b) {
    const float scale = std::exp(log_scale(rng));
    for (std::size_t j = 0; j < 32; ++j) x[32 * b + j] = scale * normal(rng);
  }
  for (ggml_type type : {ggml_type::q8_0, ggml_type::q4_0}) {
    const bool q8 = type == ggml_type::q8_0;
    const bytes b = quantize(type, x);
    const std::vector<float> back = dequantize(type, b, x.size());
    const std::size_t stride = q8 ? 34 : 18;
    for (std::size_t k = 0; k < blocks; ++k) {
      float amax = 0.0f, max = 0.0f;
      for (std::size_t j = 0; j < 32; ++j) {
        if (std::fabs(x[32 * k + j]) > amax) amax = std::fabs(x[32 * k + j]), max = x[32 * k + j];
      }
      const float d = q8 ? amax / 127 : max / -8;
      const float dh = detail::ggml_fp16_to_fp32(static_cast<std::uint16_t>(b[stride * k] | (b[stride * k + 1] << 8)));
      ASSERT_EQ(dh, detail::ggml_fp16_to_fp32(detail::ggml_fp32_to_fp16(d)));
      const float half_error = std::fabs(d - dh) * (q8 ? 127.0f : 8.0f) + 1e-6f * amax;
      for (std::size_t j = 0; j < 32; ++j) {
        const float v = x[32 * k + j];
        const float step = !q8 && v / d > 7.5f ? std::fabs(d) : std::fabs(d) / 2;
        ASSERT_LE(std::fabs(v - back[32 * k + j]), step + half_error)
            << io::ggml_type_name(type) << " " << k << " " << j;
      }
    }
  }
}

}  // namespace
