// lora/io/ggml_types.hpp: the tensor element types of ggml as GGUF files store them
// (docs/CONVENTIONS.md §gguf): each type's code, name, block size (elements per block) and block
// bytes, and row conversions between float and the five types this library writes and reads: F32,
// F16, BF16, Q8_0 and Q4_0. A row of n elements is n / block_size consecutive blocks; blocks run
// along ne[0], the contiguous dimension. Every multi-byte field is little-endian. The quantizers
// reproduce ggml's reference code bit for bit (quantize_row_q8_0_ref, quantize_row_q4_0_ref,
// ggml_fp32_to_fp16, ggml_compute_fp32_to_bf16), so files written here match files ggml writes
// from the same floats. Needs neither Eigen nor a JSON library.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <utility>

#include "../error.hpp"

namespace lora::io {

/// ggml's type codes (the numbers GGUF tensor infos store). Codes ggml retired (4, 5) or that this
/// library does not know (the IQ and TQ families, ...) are absent.
enum class ggml_type : std::uint32_t {
  f32 = 0,       ///< F32: IEEE binary32.
  f16 = 1,       ///< F16: IEEE binary16.
  q4_0 = 2,      ///< Q4_0: 32 elements in 18 bytes { f16 d; u8 qs[16] }, x = d * (q - 8).
  q4_1 = 3,      ///< Q4_1: 32 elements in 20 bytes.
  q5_0 = 6,      ///< Q5_0: 32 elements in 22 bytes.
  q5_1 = 7,      ///< Q5_1: 32 elements in 24 bytes.
  q8_0 = 8,      ///< Q8_0: 32 elements in 34 bytes { f16 d; i8 qs[32] }, x = d * q.
  q8_1 = 9,      ///< Q8_1: 32 elements in 36 bytes.
  q2_k = 10,     ///< Q2_K: 256 elements in 84 bytes.
  q3_k = 11,     ///< Q3_K: 256 elements in 110 bytes.
  q4_k = 12,     ///< Q4_K: 256 elements in 144 bytes.
  q5_k = 13,     ///< Q5_K: 256 elements in 176 bytes.
  q6_k = 14,     ///< Q6_K: 256 elements in 210 bytes.
  q8_k = 15,     ///< Q8_K: 256 elements in 292 bytes.
  iq2_xxs = 16,  ///< IQ2_XXS: 256 elements in 66 bytes.
  iq2_xs = 17,   ///< IQ2_XS: 256 elements in 74 bytes.
  iq3_xxs = 18,  ///< IQ3_XXS: 256 elements in 98 bytes.
  iq1_s = 19,    ///< IQ1_S: 256 elements in 50 bytes.
  iq4_nl = 20,   ///< IQ4_NL: 32 elements in 18 bytes.
  iq3_s = 21,    ///< IQ3_S: 256 elements in 110 bytes.
  iq2_s = 22,    ///< IQ2_S: 256 elements in 82 bytes.
  iq4_xs = 23,   ///< IQ4_XS: 256 elements in 136 bytes.
  i8 = 24,       ///< I8
  i16 = 25,      ///< I16
  i32 = 26,      ///< I32
  i64 = 27,      ///< I64
  f64 = 28,      ///< F64: IEEE binary64.
  iq1_m = 29,    ///< IQ1_M: 256 elements in 56 bytes.
  bf16 = 30,     ///< BF16: bfloat16, the top 16 bits of a binary32.
  tq1_0 = 34,    ///< TQ1_0: 256 elements in 54 bytes.
  tq2_0 = 35,    ///< TQ2_0: 256 elements in 66 bytes.
  mxfp4 = 39,    ///< MXFP4: 32 elements in 17 bytes.
};

/// One row of the type table.
struct ggml_type_traits {
  ggml_type type;
  const char* name;          ///< "F32", "Q8_0", "Q4_K", ... (upper case, as GGUF tools print them)
  std::uint32_t block_size;  ///< elements per block
  std::uint32_t type_size;   ///< bytes per block
  bool convertible;          ///< ggml_quantize_row and ggml_dequantize_row handle it (F32, F16, BF16, Q8_0, Q4_0)
};

/// Traits of the type with this code, or nullptr for a code this library does not know.
const ggml_type_traits* find_ggml_type(std::uint32_t code) noexcept;
/// Traits of `type`; format_error for a value outside the table.
const ggml_type_traits& ggml_traits(ggml_type type);
/// "F32", "F16", "Q4_0", "Q8_0", "BF16", "Q4_K", ...; "?" for a value outside the table.
const char* ggml_type_name(ggml_type type) noexcept;
/// "f32", "f16", "bf16", "q8_0", "q4_0" (case-insensitive, as command-line flags spell them) -> the
/// type; config_error naming the accepted spellings otherwise.
ggml_type parse_ggml_type(std::string_view name);
/// True for the types the row conversions handle: F32, F16, BF16, Q8_0, Q4_0.
bool ggml_is_convertible(ggml_type type) noexcept;
/// Bytes of a row of n elements: n / block_size * type_size. format_error when n is not a multiple
/// of block_size (the message names the type, the block size and n), when the byte count overflows
/// 64 bits, or for a type outside the table.
std::uint64_t ggml_row_bytes(ggml_type type, std::uint64_t n);
/// Converts n floats to the bytes of `type` (ggml_row_bytes(type, n) of them at dst), exactly as
/// ggml's reference code does. dtype_error for a type that is not convertible; format_error when
/// n % block_size != 0.
void ggml_quantize_row(ggml_type type, const float* x, std::size_t n, unsigned char* dst);
/// Decodes the n elements stored at src (ggml_row_bytes(type, n) bytes) into floats, as ggml's
/// dequantize_row_* do. Same errors as ggml_quantize_row.
void ggml_dequantize_row(ggml_type type, const unsigned char* src, std::size_t n, float* dst);

namespace detail {

using lora::detail::cat;

/// The type table, in code order.
inline constexpr ggml_type_traits ggml_type_table[] = {
    {ggml_type::f32, "F32", 1, 4, true},
    {ggml_type::f16, "F16", 1, 2, true},
    {ggml_type::q4_0, "Q4_0", 32, 18, true},
    {ggml_type::q4_1, "Q4_1", 32, 20, false},
    {ggml_type::q5_0, "Q5_0", 32, 22, false},
    {ggml_type::q5_1, "Q5_1", 32, 24, false},
    {ggml_type::q8_0, "Q8_0", 32, 34, true},
    {ggml_type::q8_1, "Q8_1", 32, 36, false},
    {ggml_type::q2_k, "Q2_K", 256, 84, false},
    {ggml_type::q3_k, "Q3_K", 256, 110, false},
    {ggml_type::q4_k, "Q4_K", 256, 144, false},
    {ggml_type::q5_k, "Q5_K", 256, 176, false},
    {ggml_type::q6_k, "Q6_K", 256, 210, false},
    {ggml_type::q8_k, "Q8_K", 256, 292, false},
    {ggml_type::i8, "I8", 1, 1, false},
    {ggml_type::i16, "I16", 1, 2, false},
    {ggml_type::i32, "I32", 1, 4, false},
    {ggml_type::i64, "I64", 1, 8, false},
    {ggml_type::f64, "F64", 1, 8, false},
    {ggml_type::bf16, "BF16", 1, 2, true},
    // Types this library only copies (their blocks are not decoded), listed so that files holding them open.
    {ggml_type::iq2_xxs, "IQ2_XXS", 256, 66, false},
    {ggml_type::iq2_xs, "IQ2_XS", 256, 74, false},
    {ggml_type::iq3_xxs, "IQ3_XXS", 256, 98, false},
    {ggml_type::iq1_s, "IQ1_S", 256, 50, false},
    {ggml_type::iq4_nl, "IQ4_NL", 32, 18, false},
    {ggml_type::iq3_s, "IQ3_S", 256, 110, false},
    {ggml_type::iq2_s, "IQ2_S", 256, 82, false},
    {ggml_type::iq4_xs, "IQ4_XS", 256, 136, false},
    {ggml_type::iq1_m, "IQ1_M", 256, 56, false},
    {ggml_type::tq1_0, "TQ1_0", 256, 54, false},
    {ggml_type::tq2_0, "TQ2_0", 256, 66, false},
    {ggml_type::mxfp4, "MXFP4", 32, 17, false},
};

/// Elements per Q8_0 and Q4_0 block (ggml's QK8_0 and QK4_0).
inline constexpr std::size_t ggml_qk = 32;

/// f32 -> IEEE binary16 bits, rounding to nearest even; overflow gives Inf, values at or below half
/// the smallest subnormal give a signed zero, NaN stays a quiet NaN with its sign and top payload
/// bits, as x86's F16C conversion does (ggml's portable fallback gives sign | 0x7E00 for every NaN).
std::uint16_t ggml_fp32_to_fp16(float f) noexcept;
/// IEEE binary16 bits -> f32, exact.
float ggml_fp16_to_fp32(std::uint16_t h) noexcept;
/// f32 -> bfloat16 bits as ggml_compute_fp32_to_bf16: NaN -> (u >> 16) | 64 (quieted), else
/// (u + 0x7FFF + ((u >> 16) & 1)) >> 16, round to nearest even (overflow carries into Inf).
std::uint16_t ggml_fp32_to_bf16(float f) noexcept;
/// bfloat16 bits -> f32: bits << 16, exact.
float ggml_bf16_to_fp32(std::uint16_t h) noexcept;

/// Quantizes 32 floats into one Q8_0 block (34 bytes): d = max|x| / 127 stored as f16, then
/// qs[j] = round(x[j] / d), half away from zero (qs = 0 when d = 0).
void ggml_quantize_block_q8_0(const float* x, unsigned char* block) noexcept;
/// Quantizes 32 floats into one Q4_0 block (18 bytes): d = m / -8 with m the element of largest |x|
/// (the first on ties), stored as f16; q = min(15, trunc(x / d + 8.5)); byte j holds q[j] in its
/// low nibble and q[j + 16] in its high nibble.
void ggml_quantize_block_q4_0(const float* x, unsigned char* block) noexcept;
/// One Q8_0 block -> 32 floats: x[j] = f16(d) * qs[j].
void ggml_dequantize_block_q8_0(const unsigned char* block, float* x) noexcept;
/// One Q4_0 block -> 32 floats: x[j] = f16(d) * (low nibble of qs[j] - 8), x[j + 16] from the high nibble.
void ggml_dequantize_block_q4_0(const unsigned char* block, float* x) noexcept;
/// The traits of a convertible type, after checking that n fills whole blocks; dtype_error naming
/// `verb` ("quantize", "dequantize") for a type that is not convertible, format_error otherwise.
const ggml_type_traits& ggml_convertible_row(ggml_type type, std::size_t n, const char* verb);

}  // namespace detail

// ================================================================================================
// Implementation
// ================================================================================================

inline const ggml_type_traits* find_ggml_type(std::uint32_t code) noexcept {
  for (const ggml_type_traits& traits : detail::ggml_type_table) {
    if (static_cast<std::uint32_t>(traits.type) == code) return &traits;
  }
  return nullptr;
}

inline const ggml_type_traits& ggml_traits(ggml_type type) {
  const ggml_type_traits* traits = find_ggml_type(static_cast<std::uint32_t>(type));
  if (traits == nullptr) {
    throw format_error(detail::cat("unknown ggml tensor type code ", static_cast<std::uint32_t>(type),
                                   " (this library knows F32, F16, BF16, F64, I8-I64, Q4_0-Q8_1 and Q2_K-Q8_K)"));
  }
  return *traits;
}

inline const char* ggml_type_name(ggml_type type) noexcept {
  const ggml_type_traits* traits = find_ggml_type(static_cast<std::uint32_t>(type));
  return traits != nullptr ? traits->name : "?";
}

inline ggml_type parse_ggml_type(std::string_view name) {
  std::string lower(name);
  for (char& c : lower) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  constexpr std::pair<std::string_view, ggml_type> accepted[] = {{"f32", ggml_type::f32},
                                                                 {"f16", ggml_type::f16},
                                                                 {"bf16", ggml_type::bf16},
                                                                 {"q8_0", ggml_type::q8_0},
                                                                 {"q4_0", ggml_type::q4_0}};
  for (const auto& [spelling, type] : accepted) {
    if (lower == spelling) return type;
  }
  throw config_error(
      detail::cat("unknown tensor type '", name, "' (expected one of f32, f16, bf16, q8_0, q4_0; case-insensitive)"));
}

inline bool ggml_is_convertible(ggml_type type) noexcept {
  const ggml_type_traits* traits = find_ggml_type(static_cast<std::uint32_t>(type));
  return traits != nullptr && traits->convertible;
}

inline std::uint64_t ggml_row_bytes(ggml_type type, std::uint64_t n) {
  const ggml_type_traits& traits = ggml_traits(type);
  if (n % traits.block_size != 0) {
    throw format_error(detail::cat("a row of ", traits.name, " holds whole blocks of ", traits.block_size,
                                   " elements, but has ", n, " elements (not a multiple of ", traits.block_size, ")"));
  }
  const std::uint64_t blocks = n / traits.block_size;
  if (blocks > std::numeric_limits<std::uint64_t>::max() / traits.type_size) {
    throw format_error(detail::cat("a row of ", n, " ", traits.name, " elements takes more than 2^64 bytes"));
  }
  return blocks * traits.type_size;
}

inline void ggml_quantize_row(ggml_type type, const float* x, std::size_t n, unsigned char* dst) {
  const ggml_type_traits& traits = detail::ggml_convertible_row(type, n, "quantize");
  switch (type) {
    case ggml_type::f32:
      for (std::size_t k = 0; k < n; ++k) {
        std::uint32_t bits;
        std::memcpy(&bits, x + k, sizeof bits);
        for (std::size_t b = 0; b < 4; ++b) dst[4 * k + b] = static_cast<unsigned char>(bits >> (8 * b));
      }
      return;
    case ggml_type::f16:
    case ggml_type::bf16:
      for (std::size_t k = 0; k < n; ++k) {
        const std::uint16_t h =
            type == ggml_type::f16 ? detail::ggml_fp32_to_fp16(x[k]) : detail::ggml_fp32_to_bf16(x[k]);
        dst[2 * k] = static_cast<unsigned char>(h);
        dst[2 * k + 1] = static_cast<unsigned char>(h >> 8);
      }
      return;
    case ggml_type::q8_0:
    case ggml_type::q4_0: {
      const auto block = type == ggml_type::q8_0 ? detail::ggml_quantize_block_q8_0 : detail::ggml_quantize_block_q4_0;
      for (std::size_t b = 0; b < n / detail::ggml_qk; ++b) block(x + b * detail::ggml_qk, dst + b * traits.type_size);
      return;
    }
    default:
      return;  // ggml_convertible_row has thrown
  }
}

inline void ggml_dequantize_row(ggml_type type, const unsigned char* src, std::size_t n, float* dst) {
  const ggml_type_traits& traits = detail::ggml_convertible_row(type, n, "dequantize");
  switch (type) {
    case ggml_type::f32:
      for (std::size_t k = 0; k < n; ++k) {
        std::uint32_t bits = 0;
        for (std::size_t b = 0; b < 4; ++b) bits |= static_cast<std::uint32_t>(src[4 * k + b]) << (8 * b);
        std::memcpy(dst + k, &bits, sizeof bits);
      }
      return;
    case ggml_type::f16:
    case ggml_type::bf16:
      for (std::size_t k = 0; k < n; ++k) {
        const auto h = static_cast<std::uint16_t>(src[2 * k] | (src[2 * k + 1] << 8));
        dst[k] = type == ggml_type::f16 ? detail::ggml_fp16_to_fp32(h) : detail::ggml_bf16_to_fp32(h);
      }
      return;
    case ggml_type::q8_0:
    case ggml_type::q4_0: {
      const auto block =
          type == ggml_type::q8_0 ? detail::ggml_dequantize_block_q8_0 : detail::ggml_dequantize_block_q4_0;
      for (std::size_t b = 0; b < n / detail::ggml_qk; ++b)
        block(src + b * traits.type_size, dst + b * detail::ggml_qk);
      return;
    }
    default:
      return;  // ggml_convertible_row has thrown
  }
}

namespace detail {

inline std::uint16_t ggml_fp32_to_fp16(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000);
  const std::uint32_t a = u & 0x7FFFFFFF;
  if (a > 0x7F800000) return static_cast<std::uint16_t>(sign | 0x7E00 | ((a >> 13) & 0x3FF));  // NaN
  if (a >= 0x477FF000) return static_cast<std::uint16_t>(sign | 0x7C00);  // >= 65520 = 65504 + half ulp: Inf
  if (a < 0x38800000) {
    // Below 2^-14, the smallest normal: the result is the subnormal q = round(|f| * 2^24). With
    // |f| = m * 2^(e - 150) (m with its implicit bit), q = m >> (126 - e), rounded to nearest even.
    const int e = static_cast<int>(a >> 23);
    const int shift = 126 - e;
    if (e == 0 || shift > 24) return sign;  // |f| <= 2^-25, half the smallest subnormal: rounds to zero
    const std::uint32_t m = (a & 0x7FFFFF) | 0x800000;
    std::uint32_t q = m >> shift;
    const std::uint32_t rest = m & ((std::uint32_t{1} << shift) - 1);
    const std::uint32_t half = std::uint32_t{1} << (shift - 1);
    if (rest > half || (rest == half && (q & 1) != 0)) ++q;  // q = 0x400 is the smallest normal's pattern
    return static_cast<std::uint16_t>(sign | q);
  }
  // Normal: rebias the exponent (127 -> 15), keep 10 mantissa bits and round the 13 dropped ones to
  // nearest even; a carry out of the mantissa correctly increments the exponent (never to Inf here).
  std::uint32_t h = (a >> 13) - ((127 - 15) << 10);
  const std::uint32_t rest = a & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1) != 0)) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

inline float ggml_fp16_to_fp32(std::uint16_t h) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000) << 16;
  const std::uint32_t exponent = (h >> 10) & 0x1F;
  const std::uint32_t mantissa = h & 0x3FF;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign != 0 ? -magnitude : magnitude;
  }
  // Normal: rebias 15 -> 127; Inf and NaN (payload kept) map to exponent 255.
  const std::uint32_t bits = sign | ((exponent == 0x1F ? 0xFFu : exponent + 112) << 23) | (mantissa << 13);
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline std::uint16_t ggml_fp32_to_bf16(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFF) > 0x7F800000) return static_cast<std::uint16_t>((u >> 16) | 64);  // NaN: force quiet
  return static_cast<std::uint16_t>((u + (0x7FFF + ((u >> 16) & 1))) >> 16);
}

inline float ggml_bf16_to_fp32(std::uint16_t h) noexcept {
  const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline void ggml_quantize_block_q8_0(const float* x, unsigned char* block) noexcept {
  float amax = 0.0f;
  for (std::size_t j = 0; j < ggml_qk; ++j) {
    const float v = std::fabs(x[j]);
    amax = amax > v ? amax : v;  // ggml's MAX(amax, v), NaN handling included
  }
  const float d = amax / 127;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;  // ggml's `d ? 1/d : 0`: a NaN d is true
  const std::uint16_t dh = ggml_fp32_to_fp16(d);
  block[0] = static_cast<unsigned char>(dh);
  block[1] = static_cast<unsigned char>(dh >> 8);
  for (std::size_t j = 0; j < ggml_qk; ++j) {
    const float q = std::round(x[j] * id);  // roundf: halves away from zero; |q| <= 127 for finite x
    // NaN (from a non-finite input) stores 0, what ggml's int8 conversion gives on x86.
    const int qi = q >= -128.0f && q <= 127.0f ? static_cast<int>(q) : 0;
    block[2 + j] = static_cast<unsigned char>(static_cast<std::int8_t>(qi));
  }
}

inline void ggml_quantize_block_q4_0(const float* x, unsigned char* block) noexcept {
  float amax = 0.0f;
  float max = 0.0f;  // the signed value of the first element of largest |x|
  for (std::size_t j = 0; j < ggml_qk; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8;  // the extreme element maps to q = 0, i.e. x = d * (0 - 8) = max
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const std::uint16_t dh = ggml_fp32_to_fp16(d);  // an all-zero block has d = 0 / -8 = -0: bits 0x8000
  block[0] = static_cast<unsigned char>(dh);
  block[1] = static_cast<unsigned char>(dh >> 8);
  // ggml computes `(int8_t)(x*id + 8.5f)` and is compiled with floating-point contraction (GCC's
  // default), so on FMA hardware the multiply-add rounds once; std::fma gives that single rounding on
  // every machine. t lies in (-1, 17) when 1/d is finite, where truncation toward zero and clamping
  // to [0, 15] is ggml's MIN(15, (int8_t)t); otherwise t is +-Inf or NaN (non-finite input, or a
  // subnormal d whose inverse overflows) and x86's conversion gives 0, which we store.
  auto nibble = [id](float v) -> unsigned {
    const float t = std::fma(v, id, 8.5f);
    if (!(t >= 1.0f && t < 0x1p31f)) return 0;  // [0, 1), NaN; +Inf (id overflowed) converts to 0 on x86
    return t >= 15.0f ? 15u : static_cast<unsigned>(t);
  };
  for (std::size_t j = 0; j < ggml_qk / 2; ++j) {
    block[2 + j] = static_cast<unsigned char>(nibble(x[j]) | (nibble(x[j + ggml_qk / 2]) << 4));
  }
}

inline void ggml_dequantize_block_q8_0(const unsigned char* block, float* x) noexcept {
  const float d = ggml_fp16_to_fp32(static_cast<std::uint16_t>(block[0] | (block[1] << 8)));
  for (std::size_t j = 0; j < ggml_qk; ++j) x[j] = static_cast<float>(static_cast<std::int8_t>(block[2 + j])) * d;
}

inline void ggml_dequantize_block_q4_0(const unsigned char* block, float* x) noexcept {
  const float d = ggml_fp16_to_fp32(static_cast<std::uint16_t>(block[0] | (block[1] << 8)));
  for (std::size_t j = 0; j < ggml_qk / 2; ++j) {
    x[j] = static_cast<float>((block[2 + j] & 0x0F) - 8) * d;
    x[j + ggml_qk / 2] = static_cast<float>((block[2 + j] >> 4) - 8) * d;
  }
}

inline const ggml_type_traits& ggml_convertible_row(ggml_type type, std::size_t n, const char* verb) {
  const ggml_type_traits& traits = ggml_traits(type);
  if (!traits.convertible) {
    throw dtype_error(cat("cannot ", verb, " a row of ", traits.name,
                          ": the row conversions handle F32, F16, BF16, Q8_0 and Q4_0 only"));
  }
  ggml_row_bytes(type, n);  // format_error unless n fills whole blocks
  return traits;
}

}  // namespace detail
}  // namespace lora::io
