// lora/error.hpp: the exception hierarchy. Every mistake a user can make at run time (shapes, ranks,
// names, files, dtypes, state) raises a class derived from lora::error, whose what() reads
// "[lora.<kind>] <sentence naming the object, the expected and the actual value>".
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace lora {

/// Base of every exception the library throws on purpose.
class error : public std::runtime_error {
 public:
  /// The short identifier ("shape_error", "format_error", ...), also the prefix of what().
  const std::string& kind() const noexcept { return m_kind; }

 protected:
  error(std::string kind, const std::string& message)
      : std::runtime_error("[lora." + kind + "] " + message), m_kind(std::move(kind)) {}

 private:
  std::string m_kind;
};

#define LORA_DEFINE_ERROR(name)                                          \
  class name : public error {                                            \
   public:                                                               \
    explicit name(const std::string& message) : error(#name, message) {} \
  }

/// Operand shapes do not agree with the layer or with each other.
LORA_DEFINE_ERROR(shape_error);
/// An invalid hyper-parameter: rank 0, alpha <= 0, dropout outside [0,1).
LORA_DEFINE_ERROR(config_error);
/// An unknown or duplicate adapter, module or tensor name.
LORA_DEFINE_ERROR(name_error);
/// A call in the wrong state: backward without forward, training a merged adapter.
LORA_DEFINE_ERROR(state_error);
/// Mismatched or unsupported element types.
LORA_DEFINE_ERROR(dtype_error);
/// A non-finite loss, gradient or merge result.
LORA_DEFINE_ERROR(numeric_error);
/// A file that cannot be opened, read, written or renamed.
LORA_DEFINE_ERROR(io_error);
/// A file whose contents break the rules of its format.
LORA_DEFINE_ERROR(format_error);

#undef LORA_DEFINE_ERROR

namespace detail {

/// Builds a message from streamable parts: detail::cat("expected ", 3, " got ", 4).
template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

/// "rows×cols", the way every shape message prints a matrix shape.
inline std::string shape_str(long long rows, long long cols) { return cat(rows, "x", cols); }

}  // namespace detail
}  // namespace lora
