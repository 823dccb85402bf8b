// lora/io/tensor_info.hpp: what the header of a tensor file says about one tensor: name, dtype,
// row-major shape and, once laid out, its byte range in the data area (docs/CONVENTIONS.md
// §safetensors); and the header's size limit. Sizes are computed with checked 64-bit arithmetic,
// since shapes come from files.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "dtype.hpp"

namespace lora::io {

/// Where one tensor lies in a file. Offsets are relative to the start of the data area.
struct tensor_info {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;  ///< Row-major dimensions; empty for a scalar.
  std::uint64_t begin = 0;          ///< First byte, relative to the data area.
  std::uint64_t end = 0;            ///< One past the last byte; end - begin = numel() * dtype_size(type).

  /// Product of the dimensions (1 for a scalar, 0 if any dimension is 0).
  std::int64_t numel() const noexcept;
  std::uint64_t byte_size() const noexcept { return end - begin; }
  std::size_t rank() const noexcept { return shape.size(); }
};

/// What the writers need to know of a tensor before its data: its name, dtype and shape.
struct tensor_spec {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
};

namespace detail {

/// The largest header the reference loader accepts; the writers refuse to write a larger one.
inline constexpr std::uint64_t max_header_size = 100'000'000;

/// a * b, or false on 64-bit overflow.
bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept;
/// "[2, 3]"
std::string shape_to_string(const std::vector<std::int64_t>& shape);
/// Byte size of (type, shape) by the reference's rule: the element count folded left to right with
/// checked multiplication, then times the element size. False on overflow or a negative dimension.
bool checked_byte_size(dtype type, const std::vector<std::int64_t>& shape, std::uint64_t& out) noexcept;

}  // namespace detail

// ================================================================================================
// Implementation
// ================================================================================================

inline std::int64_t tensor_info::numel() const noexcept {
  // Unsigned so that a hand-made info cannot overflow into undefined behaviour; for validated
  // infos every partial product fits (checked at open) and the result is at most the file size.
  std::uint64_t n = 1;
  for (std::int64_t d : shape) n *= static_cast<std::uint64_t>(d);
  return static_cast<std::int64_t>(n);
}

namespace detail {

inline bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  out = a * b;
  return true;
}

inline std::string shape_to_string(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t k = 0; k < shape.size(); ++k) out += (k ? ", " : "") + std::to_string(shape[k]);
  return out + "]";
}

inline bool checked_byte_size(dtype type, const std::vector<std::int64_t>& shape, std::uint64_t& out) noexcept {
  std::uint64_t n = 1;
  for (std::int64_t d : shape) {
    if (d < 0 || !checked_mul(n, static_cast<std::uint64_t>(d), n)) return false;
  }
  return checked_mul(n, dtype_size(type), out);
}

}  // namespace detail
}  // namespace lora::io
