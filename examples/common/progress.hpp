// examples/common/progress.hpp: a one-line training progress bar and the process's memory figures.
//
//   epoch 2/5 [##########..........] 312/469 loss 0.4123 12345 samples/s ETA 00:07
//
// The bar redraws in place (carriage return) at most ten times a second, and only when its stream is a
// terminal or it was forced to (so logs and pipes stay clean); quiet silences it. Its counters (steps,
// samples, mean loss, time) run whether or not it draws, so a caller can report them either way.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <lora/config.hpp>
#include <string>

namespace ex {

class progress_bar {
 public:
  /// Draws on `out` when it is a terminal or `force` is set, never when `quiet` is set.
  explicit progress_bar(bool quiet = false, bool force = false, std::FILE* out = stderr);
  progress_bar(const progress_bar&) = delete;
  progress_bar& operator=(const progress_bar&) = delete;
  /// Ends an unfinished line.
  ~progress_bar();

  /// Starts a run of `steps` steps, labelled `label`; resets the counters and the clock.
  void begin(const std::string& label, lora::index steps);
  /// begin("epoch <epoch>/<epochs>", steps), epoch counted from 1.
  void begin(int epoch, int epochs, lora::index steps);
  /// Records one finished step over `samples` samples whose mean loss was `loss`; redraws if 0.1 s
  /// have passed since the last drawing or this was the last step.
  void step(lora::index samples, double loss);
  /// Draws the final state (elapsed time in place of the ETA) and ends the line.
  void finish();

  bool enabled() const noexcept { return m_enabled; }
  lora::index steps_done() const noexcept { return m_step; }
  lora::index samples_done() const noexcept { return m_samples; }
  /// Sample-weighted mean of the losses given to step() since begin().
  double mean_loss() const noexcept { return m_samples > 0 ? m_loss_sum / static_cast<double>(m_samples) : 0.0; }
  /// Seconds since begin().
  double elapsed_seconds() const;
  double samples_per_second() const;

 private:
  using clock = std::chrono::steady_clock;
  void draw(bool final);

  std::FILE* m_out;
  bool m_enabled;
  bool m_open = false;  ///< A line is drawn and not yet ended.
  std::string m_label;
  lora::index m_steps = 0;
  lora::index m_step = 0;
  lora::index m_samples = 0;
  double m_loss_sum = 0.0;
  clock::time_point m_start{};
  clock::time_point m_last_draw{};
  std::size_t m_last_width = 0;
};

/// The process's peak resident set size (VmHWM in /proc/self/status) in bytes; 0 where unavailable.
std::uint64_t peak_rss_bytes();
/// The process's current resident set size (VmRSS) in bytes; 0 where unavailable.
std::uint64_t current_rss_bytes();
/// "mm:ss", or "h:mm:ss" from an hour on; negative durations read as "00:00".
std::string format_duration(double seconds);

// ---------------------------------------------------------------------------------------------------

inline std::string format_duration(double seconds) {
  const long long s = seconds > 0 ? static_cast<long long>(seconds + 0.5) : 0;
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", s / 3600, s / 60 % 60, s % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%02lld:%02lld", s / 60, s % 60);
  }
  return buf;
}

namespace detail {

/// The value of a "Key:   123 kB" line of /proc/self/status in bytes; 0 if absent.
inline std::uint64_t proc_status_bytes(const char* key) {
  std::ifstream status("/proc/self/status");
  const std::size_t key_length = std::strlen(key);
  std::string line;
  while (std::getline(status, line)) {
    if (line.compare(0, key_length, key) == 0 && line.size() > key_length && line[key_length] == ':') {
      return 1024 * std::strtoull(line.c_str() + key_length + 1, nullptr, 10);
    }
  }
  return 0;
}

}  // namespace detail

inline progress_bar::progress_bar(bool quiet, bool force, std::FILE* out)
    : m_out(out), m_enabled(!quiet && out != nullptr && (force || ::isatty(::fileno(out)) == 1)) {}

inline progress_bar::~progress_bar() {
  if (m_open) std::fputc('\n', m_out);
}

inline void progress_bar::begin(const std::string& label, lora::index steps) {
  if (m_open) finish();
  m_label = label;
  m_steps = steps;
  m_step = 0;
  m_samples = 0;
  m_loss_sum = 0.0;
  m_start = clock::now();
  m_last_draw = m_start;
  m_last_width = 0;
}

inline void progress_bar::begin(int epoch, int epochs, lora::index steps) {
  begin("epoch " + std::to_string(epoch) + "/" + std::to_string(epochs), steps);
}

inline void progress_bar::step(lora::index samples, double loss) {
  ++m_step;
  m_samples += samples;
  m_loss_sum += loss * static_cast<double>(samples);
  if (!m_enabled) return;
  const clock::time_point now = clock::now();
  if (now - m_last_draw >= std::chrono::milliseconds(100) || m_step == m_steps) {
    m_last_draw = now;
    draw(false);
  }
}

inline void progress_bar::finish() {
  if (!m_enabled) return;
  draw(true);
  std::fputc('\n', m_out);
  std::fflush(m_out);
  m_open = false;
}

inline double progress_bar::elapsed_seconds() const {
  return std::chrono::duration<double>(clock::now() - m_start).count();
}

inline double progress_bar::samples_per_second() const {
  const double t = elapsed_seconds();
  return t > 0 ? static_cast<double>(m_samples) / t : 0.0;
}

inline void progress_bar::draw(bool final) {
  constexpr int width = 20;
  const double fraction = m_steps > 0 ? std::min(1.0, static_cast<double>(m_step) / static_cast<double>(m_steps)) : 1.0;
  const int filled = static_cast<int>(fraction * width);
  const double elapsed = elapsed_seconds();
  // ETA: the remaining steps at the mean pace so far.
  const double eta = m_step > 0 ? elapsed * static_cast<double>(m_steps - m_step) / static_cast<double>(m_step) : 0.0;
  const std::string when = final ? "in " + format_duration(elapsed) : "ETA " + format_duration(eta);
  char line[256];
  const int n = std::snprintf(line, sizeof line, "\r%s [%s%s] %lld/%lld loss %.4f %.0f samples/s %s", m_label.c_str(),
                              std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                              static_cast<long long>(m_step), static_cast<long long>(m_steps), mean_loss(),
                              samples_per_second(), when.c_str());
  const std::size_t length = n > 0 ? std::min<std::size_t>(static_cast<std::size_t>(n), sizeof line - 1) : 0;
  std::fputs(line, m_out);
  // Blank out what is left of a longer previous line.
  if (m_last_width > length) std::fprintf(m_out, "%*s", static_cast<int>(m_last_width - length), "");
  m_last_width = length;
  std::fflush(m_out);
  m_open = true;
}

inline std::uint64_t peak_rss_bytes() { return detail::proc_status_bytes("VmHWM"); }

inline std::uint64_t current_rss_bytes() { return detail::proc_status_bytes("VmRSS"); }

}  // namespace ex
