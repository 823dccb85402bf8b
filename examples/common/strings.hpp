// examples/common/strings.hpp: the string helpers the examples' messages are built with.
#pragma once

#include <sstream>
#include <string>

namespace ex {

/// The parts streamed one after another: cat("layer ", 3, ": ", 0.5) == "layer 3: 0.5".
template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

/// "rowsxcols", the way the examples' messages print a matrix shape.
inline std::string shape_str(long long rows, long long cols) { return cat(rows, "x", cols); }

}  // namespace ex
