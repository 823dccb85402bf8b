// lora/detail/layer_checks.hpp: the run-time checks every layer's forward/backward makes, worded once:
// "<layer>: <what> must be <rows>x<cols><note>, got <rows>x<cols>" and "backward() needs a forward()".
#pragma once

#include <string>

#include "../config.hpp"
#include "../error.hpp"

namespace lora::detail {

/// shape_error unless (rows, cols) == (want_rows, want_cols). `who` names the layer ("conv2d 'c1'"), `what`
/// the operand ("dY"), `note` says where the expected shape comes from.
inline void expect_shape(const std::string& who, const char* what, index want_rows, index want_cols, index rows,
                         index cols, const std::string& note = "") {
  if (rows != want_rows || cols != want_cols)
    throw shape_error(
        cat(who, ": ", what, " must be ", shape_str(want_rows, want_cols), note, ", got ", shape_str(rows, cols)));
}

/// state_error unless a training forward is cached for backward.
inline void expect_forward_cache(const std::string& who, bool cached) {
  if (!cached)
    throw state_error(who +
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
