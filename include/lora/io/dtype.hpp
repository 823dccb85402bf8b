// lora/io/dtype.hpp: the element types of tensor files (safetensors' dtype names), their sizes and
// names, and which of them convert to and from float and double (docs/CONVENTIONS.md §safetensors).
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>
#include <string_view>
#include <type_traits>

#include "../error.hpp"

namespace lora::io {

/// Element types of the format, declared in the order of the reference implementation's enum, which
/// is ascending alignment; the writer sorts tensors by this order, descending. Sub-byte types (F4,
/// F6_*) are not supported and read as unknown dtypes.
enum class dtype : std::uint8_t {
  boolean,  ///< BOOL, 1 byte, 0 = false, anything else = true.
  u8,       ///< U8
  i8,       ///< I8
  f8_e5m2,  ///< F8_E5M2: 1 sign, 5 exponent (bias 15), 2 mantissa bits; has Inf and NaN.
  f8_e4m3,  ///< F8_E4M3 (float8_e4m3fn): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no Inf, NaN = S.1111.111.
  f8_e8m0,  ///< F8_E8M0 (float8_e8m0fnu): unsigned power of two 2^(byte - 127); 0xFF is NaN.
  i16,      ///< I16
  u16,      ///< U16
  f16,      ///< F16: IEEE binary16.
  bf16,     ///< BF16: bfloat16, the top 16 bits of a binary32.
  i32,      ///< I32
  u32,      ///< U32
  f32,      ///< F32: IEEE binary32.
  c64,      ///< C64: complex of two binary32 (real, imaginary); raw access only.
  f64,      ///< F64: IEEE binary64.
  i64,      ///< I64
  u64,      ///< U64
};

/// Bytes per element (0 for a value outside the enum).
std::size_t dtype_size(dtype type) noexcept;
/// The name the format uses ("F32", "BF16", "BOOL", ...); "?" for a value outside the enum.
const char* dtype_name(dtype type) noexcept;
/// The dtype named `name`; format_error for a name the format does not define (or that is sub-byte).
dtype parse_dtype(std::string_view name);
/// Whether read_matrix / read_vector can convert this dtype to float or double: every dtype but c64.
bool is_readable_as_real(dtype type) noexcept;
/// Whether the writer can convert float or double values to this dtype: f64, f32, f16, bf16. Other
/// dtypes are written with add_raw / write_raw.
bool is_writable_from_real(dtype type) noexcept;
/// The dtype that stores Scalar without loss: f32 for float, f64 for double.
template <typename Scalar>
constexpr dtype dtype_of() noexcept;

namespace detail {

using lora::detail::cat;
using lora::detail::shape_str;

/// One row of the dtype table: the enum value, its name in files and its size in bytes.
struct dtype_entry {
  dtype type;
  const char* name;
  std::size_t size;
};

/// Every dtype, in the order of the enum (dtype_table[k].type == dtype(k)).
inline constexpr dtype_entry dtype_table[] = {
    {dtype::boolean, "BOOL", 1},    {dtype::u8, "U8", 1},           {dtype::i8, "I8", 1},
    {dtype::f8_e5m2, "F8_E5M2", 1}, {dtype::f8_e4m3, "F8_E4M3", 1}, {dtype::f8_e8m0, "F8_E8M0", 1},
    {dtype::i16, "I16", 2},         {dtype::u16, "U16", 2},         {dtype::f16, "F16", 2},
    {dtype::bf16, "BF16", 2},       {dtype::i32, "I32", 4},         {dtype::u32, "U32", 4},
    {dtype::f32, "F32", 4},         {dtype::c64, "C64", 8},         {dtype::f64, "F64", 8},
    {dtype::i64, "I64", 8},         {dtype::u64, "U64", 8},
};

/// Whether row k of the table describes dtype(k), checked at compile time below.
constexpr bool dtype_table_is_ordered() noexcept {
  for (std::size_t k = 0; k < std::size(dtype_table); ++k) {
    if (static_cast<std::size_t>(dtype_table[k].type) != k) return false;
  }
  return true;
}
static_assert(dtype_table_is_ordered(), "dtype_table must list the dtypes in the order of the enum");

/// The table row of `type`, or nullptr for a value outside the enum.
const dtype_entry* find_dtype(dtype type) noexcept;
/// Whether a dtype is one LoRA factors and mergeable weights may be stored in (F16, BF16, F32, F64).
bool is_float_dtype(dtype type) noexcept;

}  // namespace detail

// ================================================================================================
// Implementation
// ================================================================================================

template <typename Scalar>
constexpr dtype dtype_of() noexcept {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "lora::io converts tensors to and from float or double only");
  return std::is_same_v<Scalar, float> ? dtype::f32 : dtype::f64;
}

namespace detail {

inline const dtype_entry* find_dtype(dtype type) noexcept {
  const auto k = static_cast<std::size_t>(type);
  return k < std::size(dtype_table) ? &dtype_table[k] : nullptr;
}

inline bool is_float_dtype(dtype type) noexcept {
  return type == dtype::f16 || type == dtype::bf16 || type == dtype::f32 || type == dtype::f64;
}

}  // namespace detail

inline std::size_t dtype_size(dtype type) noexcept {
  const detail::dtype_entry* e = detail::find_dtype(type);
  return e != nullptr ? e->size : 0;
}

inline const char* dtype_name(dtype type) noexcept {
  const detail::dtype_entry* e = detail::find_dtype(type);
  return e != nullptr ? e->name : "?";
}

inline dtype parse_dtype(std::string_view name) {
  for (const detail::dtype_entry& e : detail::dtype_table) {
    if (name == e.name) return e.type;
  }
  std::string known;
  for (const detail::dtype_entry& e : detail::dtype_table) known += (known.empty() ? "" : " ") + std::string(e.name);
  throw format_error(detail::cat("unknown dtype '", name, "' (known: ", known, ")"));
}

inline bool is_readable_as_real(dtype type) noexcept { return type != dtype::c64; }

inline bool is_writable_from_real(dtype type) noexcept { return detail::is_float_dtype(type); }

}  // namespace lora::io
