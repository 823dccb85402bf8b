// lora/detail/layer_checks.hpp: the run-time checks every layer's forward/backward makes, worded once:
// "<layer>: <what> must be <rows>x<cols><note>, got <rows>x<cols>" and "backward() needs a forward()".
#pragma once

#include <string>
#include <type_traits>

#include "../config.hpp"
#include "../error.hpp"

namespace lora::detail {

/// A message part given as text, or as a callable returning it (evaluated only when a check fails, so that
/// a passing check builds no string: the inference paths allocate nothing once warm).
template <typename Part>
std::string message_part(const Part& part) {
  if constexpr (std::is_invocable_v<const Part&>) {
    return std::string(part());
  } else {
    return std::string(part);
  }
}

/// shape_error unless (rows, cols) == (want_rows, want_cols). `who` names the layer ("conv2d 'c1'"), `what`
/// the operand ("dY"), `note` says where the expected shape comes from; `who` and `note` are text or
/// callables returning it (message_part).
template <typename Who, typename Note = const char*>
void expect_shape(const Who& who, const char* what, index want_rows, index want_cols, index rows, index cols,
                  const Note& note = "") {
  if (rows != want_rows || cols != want_cols)
    throw shape_error(cat(message_part(who), ": ", what, " must be ", shape_str(want_rows, want_cols),
                          message_part(note), ", got ", shape_str(rows, cols)));
}

/// state_error unless a training forward is cached for backward.
template <typename Who>
void expect_forward_cache(const Who& who, bool cached) {
  if (!cached)
    throw state_error(message_part(who) +
                      ": backward() needs a preceding training forward() (each forward allows one backward; "
                      "changing adapters discards the cached forward)");
}

/// Compile-time check that an operand has the layer's scalar type.
template <typename Layer, typename Operand>
constexpr void expect_same_scalar() {
  static_assert(std::is_same_v<Layer, Operand>,
                "lora: the operand's scalar type differs from the layer's (mismatched dtypes); cast it with "
                ".template cast<Scalar>()");
}

}  // namespace lora::detail
