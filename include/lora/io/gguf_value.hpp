// lora/io/gguf_value.hpp: one metadata value of a GGUF file (docs/CONVENTIONS.md §gguf): a scalar of
// one of the twelve value types, a string, or an array of either (never an array of arrays).
//
// Numbers are kept as their little-endian bytes and strings as std::string, so a value read from a file
// costs about as much memory as its bytes in the file (an array of n strings: n std::strings, each of
// which took at least 8 bytes in the file). Reading a value asks for its exact type, as llama.cpp does:
// get<std::uint32_t>() of an INT32 value is a dtype_error naming both types.
//
//   auto v = lora::io::gguf_value::of(std::uint32_t{12});
//   auto tokens = lora::io::gguf_value::array(std::vector<std::string>{"a", "b"});
//   v.get<std::uint32_t>();              // 12
//   tokens.strings().size();             // 2
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"

namespace lora::io {

/// The value types of GGUF metadata, with their codes in files.
enum class gguf_type : std::uint32_t {
  u8 = 0,
  i8 = 1,
  u16 = 2,
  i16 = 3,
  u32 = 4,
  i32 = 5,
  f32 = 6,
  boolean = 7,  ///< one byte, 0 or 1
  string = 8,   ///< u64 byte length + bytes (no terminator)
  array = 9,    ///< element type u32 + u64 count + elements
  u64 = 10,
  i64 = 11,
  f64 = 12,
};

/// "UINT8", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY", ... as gguf-py names them; "?" for other codes.
const char* gguf_type_name(gguf_type type) noexcept;
/// Whether `code` is one of the thirteen type codes.
bool is_gguf_type(std::uint32_t code) noexcept;
/// Bytes of one scalar of this type in a file; 0 for string and array.
std::size_t gguf_scalar_size(gguf_type type) noexcept;

/// The gguf_type that stores T: std::uint8_t ... std::int64_t, float, double, bool, std::string.
template <typename T>
constexpr gguf_type gguf_type_of() noexcept;

/// A metadata value: a scalar, a string or an array of scalars or strings. Regular (copyable, equality).
class gguf_value {
 public:
  /// An empty string.
  gguf_value() : m_strings(1) {}
  /// A scalar of the type that stores T (an arithmetic type listed for gguf_type_of).
  template <typename T>
  static gguf_value of(T value);
  static gguf_value of(std::string value);
  static gguf_value of(const char* value) { return of(std::string(value)); }
  /// An array of scalars of the type that stores T.
  template <typename T>
  static gguf_value array(const std::vector<T>& values);
  static gguf_value array(std::vector<std::string> values);

  /// The value's type (gguf_type::array for arrays).
  gguf_type type() const noexcept { return m_type; }
  bool is_array() const noexcept { return m_type == gguf_type::array; }
  /// The element type of an array, or type() for a scalar or string.
  gguf_type element_type() const noexcept { return m_element; }
  /// The number of elements of an array; 1 for a scalar or string.
  std::uint64_t size() const noexcept { return m_count; }

  /// The scalar, whose type must be exactly gguf_type_of<T>() (dtype_error naming both types otherwise).
  template <typename T>
  T get() const;
  /// The string; dtype_error for any other type.
  const std::string& string() const;
  /// The elements of an array of gguf_type_of<T>(); dtype_error for anything else.
  template <typename T>
  std::vector<T> array_of() const;
  /// The elements of an array of strings; dtype_error for anything else.
  const std::vector<std::string>& strings() const;
  /// A short human-readable rendering: numbers, "quoted" strings, [first items, ... (n)] for arrays.
  std::string to_display_string(std::size_t max_items = 8) const;

  /// Bytes of the scalar or numeric array as stored (little-endian); empty for strings.
  const std::vector<unsigned char>& raw_bytes() const noexcept { return m_bytes; }
  /// Built by the reader from bytes it has checked: count elements of `element` (not string).
  static gguf_value from_raw(gguf_type type, gguf_type element, std::uint64_t count, std::vector<unsigned char> bytes);
  /// Built by the reader: an array of strings.
  static gguf_value from_strings(std::vector<std::string> strings);

  friend bool operator==(const gguf_value& a, const gguf_value& b) noexcept {
    return a.m_type == b.m_type && a.m_element == b.m_element && a.m_count == b.m_count && a.m_bytes == b.m_bytes &&
           a.m_strings == b.m_strings;
  }
  friend bool operator!=(const gguf_value& a, const gguf_value& b) noexcept { return !(a == b); }

 private:
  struct empty_tag {};
  explicit gguf_value(empty_tag) noexcept {}
  void expect(gguf_type type, gguf_type element) const;

  gguf_type m_type = gguf_type::string;
  gguf_type m_element = gguf_type::string;
  std::uint64_t m_count = 1;
  std::vector<unsigned char> m_bytes;  // numbers, little-endian
  std::vector<std::string> m_strings;  // the string, or the array's strings; empty for numbers
};

namespace detail {

using lora::detail::cat;

/// Little-endian load and store of an arithmetic value (bool as one byte).
template <typename T>
T gguf_load(const unsigned char* p) noexcept;
template <typename T>
void gguf_store(T value, unsigned char* p) noexcept;
/// a rounded up to a multiple of the power of two `align` (a <= 2^64 - align).
constexpr std::uint64_t gguf_pad(std::uint64_t a, std::uint64_t align) noexcept {
  return (a + align - 1) & ~(align - 1);
}

}  // namespace detail

// ================================================================================================
// Implementation
// ================================================================================================

namespace detail {

/// Name and byte size of each gguf_type, indexed by code.
struct gguf_type_entry {
  const char* name;
  std::size_t size;
};
inline constexpr gguf_type_entry gguf_type_table[] = {
    {"UINT8", 1}, {"INT8", 1},   {"UINT16", 2}, {"INT16", 2},  {"UINT32", 4}, {"INT32", 4},   {"FLOAT32", 4},
    {"BOOL", 1},  {"STRING", 0}, {"ARRAY", 0},  {"UINT64", 8}, {"INT64", 8},  {"FLOAT64", 8},
};

template <typename T>
T gguf_load(const unsigned char* p) noexcept {
  if constexpr (std::is_same_v<T, bool>) {
    return *p != 0;
  } else {
    // Values are little-endian in files; this library runs on little-endian machines (config.hpp).
    T value;
    std::memcpy(&value, p, sizeof(T));
    return value;
  }
}

template <typename T>
void gguf_store(T value, unsigned char* p) noexcept {
  if constexpr (std::is_same_v<T, bool>) {
    *p = value ? 1 : 0;
  } else {
    std::memcpy(p, &value, sizeof(T));
  }
}

}  // namespace detail

inline const char* gguf_type_name(gguf_type type) noexcept {
  const auto k = static_cast<std::uint32_t>(type);
  return is_gguf_type(k) ? detail::gguf_type_table[k].name : "?";
}

inline bool is_gguf_type(std::uint32_t code) noexcept { return code <= static_cast<std::uint32_t>(gguf_type::f64); }

inline std::size_t gguf_scalar_size(gguf_type type) noexcept {
  const auto k = static_cast<std::uint32_t>(type);
  return is_gguf_type(k) ? detail::gguf_type_table[k].size : 0;
}

template <typename T>
constexpr gguf_type gguf_type_of() noexcept {
  if constexpr (std::is_same_v<T, std::uint8_t>)
    return gguf_type::u8;
  else if constexpr (std::is_same_v<T, std::int8_t>)
    return gguf_type::i8;
  else if constexpr (std::is_same_v<T, std::uint16_t>)
    return gguf_type::u16;
  else if constexpr (std::is_same_v<T, std::int16_t>)
    return gguf_type::i16;
  else if constexpr (std::is_same_v<T, std::uint32_t>)
    return gguf_type::u32;
  else if constexpr (std::is_same_v<T, std::int32_t>)
    return gguf_type::i32;
  else if constexpr (std::is_same_v<T, float>)
    return gguf_type::f32;
  else if constexpr (std::is_same_v<T, bool>)
    return gguf_type::boolean;
  else if constexpr (std::is_same_v<T, std::string>)
    return gguf_type::string;
  else if constexpr (std::is_same_v<T, std::uint64_t>)
    return gguf_type::u64;
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return gguf_type::i64;
  else {
    static_assert(std::is_same_v<T, double>, "GGUF values are 8- to 64-bit integers, float, double, bool or strings");
    return gguf_type::f64;
  }
}

template <typename T>
gguf_value gguf_value::of(T value) {
  constexpr gguf_type type = gguf_type_of<T>();
  gguf_value v{empty_tag{}};
  v.m_type = v.m_element = type;
  v.m_bytes.resize(gguf_scalar_size(type));
  detail::gguf_store(value, v.m_bytes.data());
  return v;
}

inline gguf_value gguf_value::of(std::string value) {
  gguf_value v{empty_tag{}};
  v.m_strings.push_back(std::move(value));
  return v;
}

template <typename T>
gguf_value gguf_value::array(const std::vector<T>& values) {
  constexpr gguf_type type = gguf_type_of<T>();
  gguf_value v{empty_tag{}};
  v.m_type = gguf_type::array;
  v.m_element = type;
  v.m_count = values.size();
  v.m_bytes.resize(values.size() * gguf_scalar_size(type));
  for (std::size_t k = 0; k < values.size(); ++k) detail::gguf_store<T>(values[k], &v.m_bytes[k * sizeof(T)]);
  return v;
}

inline gguf_value gguf_value::array(std::vector<std::string> values) { return from_strings(std::move(values)); }

inline gguf_value gguf_value::from_raw(gguf_type type, gguf_type element, std::uint64_t count,
                                       std::vector<unsigned char> bytes) {
  LORA_ASSERT(element != gguf_type::string && element != gguf_type::array);
  LORA_ASSERT(bytes.size() == count * gguf_scalar_size(element));
  gguf_value v{empty_tag{}};
  v.m_type = type;
  v.m_element = element;
  v.m_count = count;
  v.m_bytes = std::move(bytes);
  return v;
}

inline gguf_value gguf_value::from_strings(std::vector<std::string> strings) {
  gguf_value v{empty_tag{}};
  v.m_type = gguf_type::array;
  v.m_element = gguf_type::string;
  v.m_count = strings.size();
  v.m_strings = std::move(strings);
  return v;
}

inline void gguf_value::expect(gguf_type type, gguf_type element) const {
  if (m_type == type && m_element == element) return;
  auto describe = [](gguf_type t, gguf_type e) {
    return t == gguf_type::array ? detail::cat("ARRAY of ", gguf_type_name(e)) : std::string(gguf_type_name(t));
  };
  throw dtype_error(
      detail::cat("GGUF value: expected ", describe(type, element), ", got ", describe(m_type, m_element)));
}

template <typename T>
T gguf_value::get() const {
  expect(gguf_type_of<T>(), gguf_type_of<T>());
  return detail::gguf_load<T>(m_bytes.data());
}

inline const std::string& gguf_value::string() const {
  expect(gguf_type::string, gguf_type::string);
  return m_strings[0];
}

template <typename T>
std::vector<T> gguf_value::array_of() const {
  expect(gguf_type::array, gguf_type_of<T>());
  std::vector<T> out(static_cast<std::size_t>(m_count));
  for (std::size_t k = 0; k < out.size(); ++k) out[k] = detail::gguf_load<T>(&m_bytes[k * gguf_scalar_size(m_element)]);
  return out;
}

inline const std::vector<std::string>& gguf_value::strings() const {
  expect(gguf_type::array, gguf_type::string);
  return m_strings;
}

namespace detail {

/// One scalar of `type` at p, as text.
inline std::string gguf_scalar_text(gguf_type type, const unsigned char* p) {
  switch (type) {
    case gguf_type::u8:
      return std::to_string(gguf_load<std::uint8_t>(p));
    case gguf_type::i8:
      return std::to_string(gguf_load<std::int8_t>(p));
    case gguf_type::u16:
      return std::to_string(gguf_load<std::uint16_t>(p));
    case gguf_type::i16:
      return std::to_string(gguf_load<std::int16_t>(p));
    case gguf_type::u32:
      return std::to_string(gguf_load<std::uint32_t>(p));
    case gguf_type::i32:
      return std::to_string(gguf_load<std::int32_t>(p));
    case gguf_type::f32:
      return cat(gguf_load<float>(p));
    case gguf_type::boolean:
      return gguf_load<bool>(p) ? "true" : "false";
    case gguf_type::u64:
      return std::to_string(gguf_load<std::uint64_t>(p));
    case gguf_type::i64:
      return std::to_string(gguf_load<std::int64_t>(p));
    case gguf_type::f64:
      return cat(gguf_load<double>(p));
    default:
      return "?";
  }
}

}  // namespace detail

inline std::string gguf_value::to_display_string(std::size_t max_items) const {
  auto quoted = [](const std::string& s) { return "\"" + (s.size() > 60 ? s.substr(0, 57) + "..." : s) + "\""; };
  if (m_type == gguf_type::string) return quoted(m_strings[0]);
  if (m_type != gguf_type::array) return detail::gguf_scalar_text(m_type, m_bytes.data());
  std::string out = "[";
  const std::size_t shown = static_cast<std::size_t>(std::min<std::uint64_t>(m_count, max_items));
  for (std::size_t k = 0; k < shown; ++k) {
    if (k != 0) out += ", ";
    out += m_element == gguf_type::string
               ? quoted(m_strings[k])
               : detail::gguf_scalar_text(m_element, &m_bytes[k * gguf_scalar_size(m_element)]);
  }
  if (shown < m_count) out += detail::cat(", ... (", m_count, " in all)");
  return out + "]";
}

}  // namespace lora::io
