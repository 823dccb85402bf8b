// lora/accounting.hpp: trainable-parameter and memory accounting per layer and over collections of
// layers, the numbers PEFT's print_trainable_parameters() shows plus the bytes behind them.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

namespace lora {

/// Parameter counts and bytes of one layer or a sum of layers. Every byte count is exact for what
/// the library holds (Eigen storage), excluding small fixed-size members.
struct parameter_report {
  std::int64_t trainable_params = 0;  ///< Elements of unmerged adapters' A and B (and other trainables).
  std::int64_t frozen_params = 0;     ///< Elements of frozen weights and biases (merged adapters too).
  std::int64_t trainable_bytes = 0;   ///< Bytes of the trainable parameters.
  std::int64_t grad_bytes = 0;        ///< Bytes of their gradients.
  std::int64_t frozen_bytes = 0;      ///< Bytes of frozen weights, whether owned or viewed.
  std::int64_t cache_bytes = 0;       ///< Activation cache kept from forward for backward.
  std::int64_t merge_bytes = 0;       ///< Records that make unmerge exact.
  std::int64_t optimizer_bytes = 0;   ///< Optimizer state, when added with add_optimizer_state().

  /// trainable + frozen, PEFT's "all params".
  std::int64_t all_params() const { return trainable_params + frozen_params; }
  /// Parameters + gradients + optimizer state: what training keeps besides activations.
  std::int64_t train_state_bytes() const { return trainable_bytes + grad_bytes + optimizer_bytes; }
  /// 100 * trainable / all.
  double trainable_percent() const {
    return all_params() == 0 ? 0.0 : 100.0 * static_cast<double>(trainable_params) / static_cast<double>(all_params());
  }
  /// "trainable params: 294,912 || all params: 125,000,000 || trainable%: 0.2359", as PEFT prints it.
  std::string to_string() const;

  parameter_report& operator+=(const parameter_report& o);
  /// Adds an optimizer's state bytes (anything with state_bytes()).
  template <typename Optimizer>
  parameter_report& add_optimizer_state(const Optimizer& opt) {
    optimizer_bytes += static_cast<std::int64_t>(opt.state_bytes());
    return *this;
  }
};

inline parameter_report operator+(parameter_report a, const parameter_report& b) { return a += b; }

/// Sum of report() over any number of layers (anything with report()).
template <typename... Layers>
parameter_report summarize(const Layers&... layers) {
  parameter_report total;
  ((total += layers.report()), ...);
  return total;
}

/// Sum of report() over a range of layers or of pointers to layers.
template <typename Range>
parameter_report summarize_range(const Range& layers) {
  parameter_report total;
  for (const auto& l : layers) {
    if constexpr (std::is_pointer_v<std::decay_t<decltype(l)>>) {
      total += l->report();
    } else {
      total += l.report();
    }
  }
  return total;
}

// ---------------------------------------------------------------------------------------------------

namespace detail {
/// 1234567 -> "1,234,567".
inline std::string group_thousands(std::int64_t v) {
  std::string digits = std::to_string(v < 0 ? -v : v);
  std::string out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return v < 0 ? "-" + out : out;
}
}  // namespace detail

inline std::string parameter_report::to_string() const {
  char pct[32];
  std::snprintf(pct, sizeof pct, "%.4f", trainable_percent());
  return "trainable params: " + detail::group_thousands(trainable_params) +
         " || all params: " + detail::group_thousands(all_params()) + " || trainable%: " + pct;
}

inline parameter_report& parameter_report::operator+=(const parameter_report& o) {
  trainable_params += o.trainable_params;
  frozen_params += o.frozen_params;
  trainable_bytes += o.trainable_bytes;
  grad_bytes += o.grad_bytes;
  frozen_bytes += o.frozen_bytes;
  cache_bytes += o.cache_bytes;
  merge_bytes += o.merge_bytes;
  optimizer_bytes += o.optimizer_bytes;
  return *this;
}

}  // namespace lora
