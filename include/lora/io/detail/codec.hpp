// lora/io/detail/codec.hpp: the number formats of tensor files and their conversions to and from
// float and double, and little-endian loads and stores independent of the host's byte order
// (docs/CONVENTIONS.md §safetensors). Every encoder rounds to nearest, ties to even, directly from
// double (never through float, which would round twice); every decoder is exact except F64 -> float
// and wide integers -> float or double, which round to nearest.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../../config.hpp"
#include "../../error.hpp"
#include "../dtype.hpp"
#include "../ggml_types.hpp"

namespace lora::io::detail {

/// Bytes converted per step when tensors are read or written in chunks.
inline constexpr std::size_t chunk_bytes = std::size_t{1} << 20;

/// Rounds x to the IEEE-754 binary format with E exponent bits and M stored mantissa bits (f16: 5, 10;
/// bf16: 8, 7; f32: 8, 23) and returns its bit pattern: sign at bit E+M, biased exponent, mantissa.
/// Correctly rounded from double (no double rounding through float); overflow gives Inf, values
/// below half the smallest subnormal give a signed zero, NaN stays NaN (quiet, top payload bits kept).
template <int E, int M>
std::uint32_t round_to_binary(double x) noexcept;
/// The exact value of a bit pattern of that format (Inf and NaN where the exponent is all ones).
template <int E, int M>
double binary_to_double(std::uint32_t bits) noexcept;

/// IEEE binary16 bit pattern nearest to x.
std::uint16_t to_half_bits(double x) noexcept;
/// bfloat16 bit pattern nearest to x.
std::uint16_t to_bfloat16_bits(double x) noexcept;
/// The binary16 value of bits (exact in float; a NaN keeps its payload).
float from_half_bits(std::uint16_t bits) noexcept;
/// The bfloat16 value of bits (exact in float).
float from_bfloat16_bits(std::uint16_t bits) noexcept;
/// float8_e4m3fn (exact in float).
float from_f8_e4m3_bits(std::uint8_t bits) noexcept;
/// float8_e5m2 (exact in float).
float from_f8_e5m2_bits(std::uint8_t bits) noexcept;
/// float8_e8m0fnu (exact in float).
float from_f8_e8m0_bits(std::uint8_t bits) noexcept;
/// double to float, rounding to nearest even and overflowing to Inf without undefined behaviour.
float narrow_to_float(double x) noexcept;

/// Little-endian load and store of an unsigned integer, independent of the host's byte order.
template <typename U>
U load_le(const unsigned char* p) noexcept;
template <typename U>
void store_le(U value, unsigned char* p) noexcept;

/// Converts n stored elements of `type` (not c64) to Scalar; dtype_error for c64.
template <typename Scalar>
void decode(dtype type, const unsigned char* src, std::size_t n, Scalar* dst);
/// Converts n values to `type` (is_writable_from_real) and stores them; dtype_error for other types.
template <typename Scalar>
void encode(dtype type, const Scalar* src, std::size_t n, unsigned char* dst);
/// Throws dtype_error unless is_writable_from_real(type).
void require_writable(dtype type);
/// Streams the entries of `values` in row-major order, converted to `type`, to
/// sink(const unsigned char* bytes, std::size_t count) in chunks of at most ~chunk_bytes.
template <typename Derived, typename Sink>
void encode_row_major(const Eigen::MatrixBase<Derived>& values, dtype type, Sink&& sink);

// ================================================================================================
// Implementation
// ================================================================================================

template <int E, int M>
std::uint32_t round_to_binary(double x) noexcept {
  static_assert(E >= 2 && E <= 8 && M >= 1 && M <= 23, "a binary format no wider than binary32");
  constexpr int bias = (1 << (E - 1)) - 1;
  constexpr int emin = 1 - bias;  // exponent of the smallest normal
  constexpr std::uint32_t inf_bits = ((std::uint32_t{1} << E) - 1) << M;
  std::uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const std::uint32_t sign = static_cast<std::uint32_t>(bits >> 63) << (E + M);
  const int biased = static_cast<int>((bits >> 52) & 0x7FF);
  const std::uint64_t fraction = bits & ((std::uint64_t{1} << 52) - 1);
  if (biased == 0x7FF) {
    if (fraction == 0) return sign | inf_bits;
    return sign | inf_bits | static_cast<std::uint32_t>(fraction >> (52 - M)) | (std::uint32_t{1} << (M - 1));
  }
  // Zero, or a double subnormal (< 2^-1022): below half the smallest subnormal of any format with E <= 8.
  if (biased == 0) return sign;
  const int e = biased - 1023;  // |x| = sig * 2^(e - 52), sig in [2^52, 2^53)
  if (e > bias) return sign | inf_bits;
  const std::uint64_t sig = fraction | (std::uint64_t{1} << 52);
  // The result is q * 2^(max(e, emin) - M) with q an integer: drop `shift` bits of sig, rounding.
  const int shift = 52 - M + (e < emin ? emin - e : 0);
  if (shift > 53) return sign;  // |x| < 2^(emin - M - 1), half the smallest subnormal: rounds to zero
  std::uint64_t q = sig >> shift;
  const std::uint64_t rest = sig & ((std::uint64_t{1} << shift) - 1);
  const std::uint64_t half = std::uint64_t{1} << (shift - 1);
  if (rest > half || (rest == half && (q & 1) != 0)) ++q;
  // Normal: q in [2^M, 2^(M+1)] carries the implicit bit, so adding it to (e + bias - 1) << M both
  // sets the mantissa and carries into the exponent when rounding reached 2^(M+1). Subnormal: q is
  // the mantissa, and q = 2^M is exactly the smallest normal.
  std::uint64_t magnitude = e < emin ? q : (static_cast<std::uint64_t>(e + bias - 1) << M) + q;
  if (magnitude > inf_bits) magnitude = inf_bits;
  return sign | static_cast<std::uint32_t>(magnitude);
}

template <int E, int M>
double binary_to_double(std::uint32_t bits) noexcept {
  constexpr int bias = (1 << (E - 1)) - 1;
  constexpr std::uint32_t exp_ones = (std::uint32_t{1} << E) - 1;
  const bool negative = ((bits >> (E + M)) & 1) != 0;
  const std::uint32_t exponent = (bits >> M) & exp_ones;
  const std::uint32_t mantissa = bits & ((std::uint32_t{1} << M) - 1);
  double magnitude;
  if (exponent == exp_ones) {
    magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<double>(mantissa), 1 - bias - M);
  } else {
    magnitude =
        std::ldexp(static_cast<double>(mantissa | (std::uint32_t{1} << M)), static_cast<int>(exponent) - bias - M);
  }
  return negative ? -magnitude : magnitude;
}

inline std::uint16_t to_half_bits(double x) noexcept { return static_cast<std::uint16_t>(round_to_binary<5, 10>(x)); }

inline std::uint16_t to_bfloat16_bits(double x) noexcept {
  return static_cast<std::uint16_t>(round_to_binary<8, 7>(x));
}

inline float from_half_bits(std::uint16_t bits) noexcept { return ggml_fp16_to_fp32(bits); }  // io/ggml_types.hpp

inline float from_bfloat16_bits(std::uint16_t bits) noexcept {
  const std::uint32_t out = static_cast<std::uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &out, sizeof value);
  return value;
}

inline float from_f8_e4m3_bits(std::uint8_t bits) noexcept {
  if ((bits & 0x7F) == 0x7F) return std::numeric_limits<float>::quiet_NaN();  // S.1111.111; no Inf
  const bool negative = (bits & 0x80) != 0;
  const int exponent = (bits >> 3) & 0xF;
  const int mantissa = bits & 0x7;
  const float magnitude = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                                        : std::ldexp(static_cast<float>(mantissa | 8), exponent - 10);
  return negative ? -magnitude : magnitude;
}

inline float from_f8_e5m2_bits(std::uint8_t bits) noexcept { return static_cast<float>(binary_to_double<5, 2>(bits)); }

inline float from_f8_e8m0_bits(std::uint8_t bits) noexcept {
  if (bits == 0xFF) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(bits) - 127);
}

inline float narrow_to_float(double x) noexcept {
  if (!(std::fabs(x) > static_cast<double>(FLT_MAX))) return static_cast<float>(x);  // in range, or NaN
  const std::uint32_t bits = round_to_binary<8, 23>(x);
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

template <typename U>
U load_le(const unsigned char* p) noexcept {
  static_assert(std::is_unsigned_v<U>, "unsigned integers only");
  U value = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i) value = static_cast<U>(value | (static_cast<U>(p[i]) << (8 * i)));
  return value;
}

template <typename U>
void store_le(U value, unsigned char* p) noexcept {
  static_assert(std::is_unsigned_v<U>, "unsigned integers only");
  for (std::size_t i = 0; i < sizeof(U); ++i) p[i] = static_cast<unsigned char>(value >> (8 * i));
}

template <typename Scalar>
void decode(dtype type, const unsigned char* src, std::size_t n, Scalar* dst) {
  // One loop per dtype, so that the switch is outside the loop. Every conversion is exact except
  // F64 -> float (rounded by narrow_to_float) and 32/64-bit integers -> float or 64-bit -> double.
  auto each = [&](std::size_t width, auto convert) {
    for (std::size_t k = 0; k < n; ++k) dst[k] = static_cast<Scalar>(convert(src + k * width));
  };
  switch (type) {
    case dtype::boolean:
      return each(1, [](const unsigned char* p) { return *p != 0 ? 1 : 0; });
    case dtype::u8:
      return each(1, [](const unsigned char* p) { return *p; });
    case dtype::i8:
      return each(1, [](const unsigned char* p) { return static_cast<std::int8_t>(*p); });
    case dtype::f8_e5m2:
      return each(1, [](const unsigned char* p) { return from_f8_e5m2_bits(*p); });
    case dtype::f8_e4m3:
      return each(1, [](const unsigned char* p) { return from_f8_e4m3_bits(*p); });
    case dtype::f8_e8m0:
      return each(1, [](const unsigned char* p) { return from_f8_e8m0_bits(*p); });
    case dtype::i16:
      return each(2, [](const unsigned char* p) { return static_cast<std::int16_t>(load_le<std::uint16_t>(p)); });
    case dtype::u16:
      return each(2, [](const unsigned char* p) { return load_le<std::uint16_t>(p); });
    case dtype::f16:
      return each(2, [](const unsigned char* p) { return from_half_bits(load_le<std::uint16_t>(p)); });
    case dtype::bf16:
      return each(2, [](const unsigned char* p) { return from_bfloat16_bits(load_le<std::uint16_t>(p)); });
    case dtype::i32:
      return each(4, [](const unsigned char* p) { return static_cast<std::int32_t>(load_le<std::uint32_t>(p)); });
    case dtype::u32:
      return each(4, [](const unsigned char* p) { return load_le<std::uint32_t>(p); });
    case dtype::f32:
      return each(4, [](const unsigned char* p) {
        const std::uint32_t bits = load_le<std::uint32_t>(p);
        float value;
        std::memcpy(&value, &bits, sizeof value);
        return value;
      });
    case dtype::f64:
      return each(8, [](const unsigned char* p) {
        const std::uint64_t bits = load_le<std::uint64_t>(p);
        double value;
        std::memcpy(&value, &bits, sizeof value);
        if constexpr (std::is_same_v<Scalar, float>) {
          return narrow_to_float(value);
        } else {
          return value;
        }
      });
    case dtype::i64:
      return each(8, [](const unsigned char* p) { return static_cast<std::int64_t>(load_le<std::uint64_t>(p)); });
    case dtype::u64:
      return each(8, [](const unsigned char* p) { return load_le<std::uint64_t>(p); });
    case dtype::c64:
      break;
  }
  throw dtype_error(cat("cannot convert ", dtype_name(type), " to a real scalar"));
}

template <typename Scalar>
void encode(dtype type, const Scalar* src, std::size_t n, unsigned char* dst) {
  switch (type) {
    case dtype::f64:
      for (std::size_t k = 0; k < n; ++k) {
        const double value = static_cast<double>(src[k]);
        std::uint64_t bits;
        std::memcpy(&bits, &value, sizeof bits);
        store_le(bits, dst + 8 * k);
      }
      return;
    case dtype::f32:
      for (std::size_t k = 0; k < n; ++k) {
        float value;
        if constexpr (std::is_same_v<Scalar, float>) {
          value = src[k];
        } else {
          value = narrow_to_float(src[k]);
        }
        std::uint32_t bits;
        std::memcpy(&bits, &value, sizeof bits);
        store_le(bits, dst + 4 * k);
      }
      return;
    case dtype::f16:
      for (std::size_t k = 0; k < n; ++k) store_le(to_half_bits(static_cast<double>(src[k])), dst + 2 * k);
      return;
    case dtype::bf16:
      for (std::size_t k = 0; k < n; ++k) store_le(to_bfloat16_bits(static_cast<double>(src[k])), dst + 2 * k);
      return;
    default:
      break;
  }
  require_writable(type);  // throws
}

inline void require_writable(dtype type) {
  if (!is_writable_from_real(type)) {
    throw dtype_error(cat("cannot write ", dtype_name(type),
                          " from floating-point values (the writer converts to F64, F32, F16 or BF16; use add_raw "
                          "for other dtypes)"));
  }
}

template <typename Derived, typename Sink>
void encode_row_major(const Eigen::MatrixBase<Derived>& values, dtype type, Sink&& sink) {
  using Scalar = typename Derived::Scalar;
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "lora::io writes float or double matrices");
  require_writable(type);
  // Bind without copying when `values` already lies in memory in its own storage order (a matrix,
  // block, map or transpose); any other expression is evaluated once into the Ref's own matrix.
  constexpr int order = Derived::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor;
  using plain = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, order>;
  const Eigen::Ref<const plain, 0, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>> m(values.derived());
  const std::size_t total = static_cast<std::size_t>(m.rows()) * static_cast<std::size_t>(m.cols());
  const std::size_t step = std::max<std::size_t>(1, std::min(total, chunk_bytes / sizeof(Scalar)));
  std::vector<Scalar> buffer(std::min(total, step));
  std::vector<unsigned char> bytes(buffer.size() * dtype_size(type));
  std::size_t filled = 0;
  auto flush = [&] {
    encode<Scalar>(type, buffer.data(), filled, bytes.data());
    sink(bytes.data(), filled * dtype_size(type));
    filled = 0;
  };
  for (index i = 0; i < m.rows(); ++i) {
    for (index j = 0; j < m.cols(); ++j) {
      buffer[filled++] = m(i, j);
      if (filled == buffer.size()) flush();
    }
  }
  if (filled != 0) flush();
}

}  // namespace lora::io::detail
