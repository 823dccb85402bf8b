// tools/cli.hpp: what the command-line tools share: usage errors, one-line error messages, a progress bar
// for per-tensor work, and number parsing for flags.
#pragma once

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>

namespace lora_cli {

/// A usage mistake: reported with a hint to --help, exit status 2.
struct usage_error {
  std::string message;
};

/// Prints "<tool>: error: <message>" on one line (newlines inside the message become spaces).
inline void print_error(const char* tool, const std::string& message) {
  std::string line = message;
  for (char& c : line) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  std::fprintf(stderr, "%s: error: %s\n", tool, line.c_str());
}

/// The value after flag argv[i] (advancing i past it); usage_error when the command line ends first.
inline std::string flag_value(int argc, char** argv, int& i) {
  if (i + 1 >= argc) throw usage_error{std::string(argv[i]) + " needs a value"};
  return argv[++i];
}

/// A finite number from a flag's text; usage_error naming the flag otherwise.
inline double parse_number(const std::string& flag, const std::string& text) {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !std::isfinite(v))
    throw usage_error{flag + " needs a finite number, got '" + text + "'"};
  return v;
}

/// "[#########...........] 12/148 tensors", redrawn in place on a terminal, at most every 1%.
class tensor_bar {
 public:
  explicit tensor_bar(bool enabled) : m_enabled(enabled && ::isatty(STDERR_FILENO) == 1) {}
  tensor_bar(const tensor_bar&) = delete;
  tensor_bar& operator=(const tensor_bar&) = delete;
  ~tensor_bar() {
    if (m_open) std::fputc('\n', stderr);
  }
  void update(std::size_t done, std::size_t total) {
    if (!m_enabled || total == 0) return;
    const int percent = static_cast<int>(100 * done / total);
    if (percent == m_last && done != total) return;
    m_last = percent;
    constexpr int width = 30;
    const int filled =
        static_cast<int>(static_cast<double>(width) * static_cast<double>(done) / static_cast<double>(total));
    std::fprintf(stderr, "\r[%s%s] %zu/%zu tensors", std::string(static_cast<std::size_t>(filled), '#').c_str(),
                 std::string(static_cast<std::size_t>(width - filled), '.').c_str(), done, total);
    std::fflush(stderr);
    m_open = done != total;
    if (done == total) std::fputc('\n', stderr);
  }

 private:
  bool m_enabled;
  bool m_open = false;
  int m_last = -1;
};

}  // namespace lora_cli
