// lora/optim/schedule.hpp: learning-rate schedules, the formulas of Hugging Face transformers'
// get_constant_schedule_with_warmup, get_linear_schedule_with_warmup and
// get_cosine_schedule_with_warmup (with min_lr_rate, as get_cosine_with_min_lr_schedule_with_warmup).
//
// lr_at(t) = peak_lr * f(t), t = optimizer steps already taken, W = warmup_steps, T = total_steps:
//   warm-up (t < W):  f = t / max(1, W)                               (so the very first update has lr 0)
//   constant:         f = 1
//   linear:           f = max(0, (T - t) / max(1, T - W))
//   cosine:           f = floor + (1 - floor) * 0.5 * (1 + cos(pi * min(1, (t - W) / max(1, T - W))))
// As with transformers' LambdaLR, the update made after t completed steps uses lr_at(t). The one
// deliberate difference: past T, cosine stays at its floor (transformers' curve, with its default
// num_cycles = 0.5, would rise again).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../error.hpp"
#include "optimizer.hpp"

namespace lora::optim {

/// A learning-rate schedule: a small value type, built by its named constructors.
class lr_schedule {
 public:
  enum class kind { constant, linear, cosine };

  /// peak_lr after `warmup_steps` of linear warm-up from 0 (none by default).
  static lr_schedule constant(double peak_lr, std::int64_t warmup_steps = 0);
  /// Linear warm-up to peak_lr, then linear decay to 0 at total_steps.
  static lr_schedule linear(double peak_lr, std::int64_t warmup_steps, std::int64_t total_steps);
  /// Linear warm-up to peak_lr, then half a cosine down to min_lr_ratio * peak_lr at total_steps,
  /// where it stays. min_lr_ratio in [0, 1].
  static lr_schedule cosine(double peak_lr, std::int64_t warmup_steps, std::int64_t total_steps,
                            double min_lr_ratio = 0.0);

  /// The learning rate for the update made after `step` completed steps (step >= 0).
  double lr_at(std::int64_t step) const;
  /// lr_at(step) / peak_lr(): transformers' lr_lambda.
  double factor_at(std::int64_t step) const;
  /// Sets opt's base learning rate to lr_at(opt.step_count()), the rate of its next step.
  template <typename Scalar>
  void apply(optimizer<Scalar>& opt) const {
    opt.set_lr(lr_at(opt.step_count()));
  }

  kind type() const noexcept { return m_kind; }
  double peak_lr() const noexcept { return m_peak; }
  std::int64_t warmup_steps() const noexcept { return m_warmup; }
  std::int64_t total_steps() const noexcept { return m_total; }
  double min_lr_ratio() const noexcept { return m_floor; }

 private:
  lr_schedule(kind k, double peak_lr, std::int64_t warmup_steps, std::int64_t total_steps, double min_lr_ratio);

  kind m_kind;
  double m_peak;
  std::int64_t m_warmup;
  std::int64_t m_total;
  double m_floor;
};

// ---------------------------------------------------------------------------------------------------

inline lr_schedule::lr_schedule(kind k, double peak_lr, std::int64_t warmup_steps, std::int64_t total_steps,
                                double min_lr_ratio)
    : m_kind(k), m_peak(peak_lr), m_warmup(warmup_steps), m_total(total_steps), m_floor(min_lr_ratio) {
  detail::check_hyper("lr_schedule", "peak_lr", peak_lr, 0.0);
  detail::check_hyper("lr_schedule", "min_lr_ratio", min_lr_ratio, 0.0, 1.0);
  if (warmup_steps < 0) throw config_error(detail::cat("lr_schedule: warmup_steps must be >= 0, got ", warmup_steps));
  if (total_steps < 0) throw config_error(detail::cat("lr_schedule: total_steps must be >= 0, got ", total_steps));
}

inline lr_schedule lr_schedule::constant(double peak_lr, std::int64_t warmup_steps) {
  return lr_schedule(kind::constant, peak_lr, warmup_steps, 0, 0.0);
}

inline lr_schedule lr_schedule::linear(double peak_lr, std::int64_t warmup_steps, std::int64_t total_steps) {
  return lr_schedule(kind::linear, peak_lr, warmup_steps, total_steps, 0.0);
}

inline lr_schedule lr_schedule::cosine(double peak_lr, std::int64_t warmup_steps, std::int64_t total_steps,
                                       double min_lr_ratio) {
  return lr_schedule(kind::cosine, peak_lr, warmup_steps, total_steps, min_lr_ratio);
}

inline double lr_schedule::factor_at(std::int64_t step) const {
  if (step < 0) throw config_error(detail::cat("lr_schedule: step must be >= 0, got ", step));
  const auto as_double = [](std::int64_t n) { return static_cast<double>(n); };
  if (step < m_warmup) return as_double(step) / as_double(std::max<std::int64_t>(1, m_warmup));
  const double decay_steps = as_double(std::max<std::int64_t>(1, m_total - m_warmup));
  switch (m_kind) {
    case kind::constant:
      return 1.0;
    case kind::linear:
      return std::max(0.0, as_double(m_total - step) / decay_steps);
    case kind::cosine: {
      const double progress = std::min(1.0, as_double(step - m_warmup) / decay_steps);
      const double pi = 3.141592653589793238462643383279502884;
      return m_floor + (1.0 - m_floor) * 0.5 * (1.0 + std::cos(pi * progress));
    }
  }
  return 1.0;
}

inline double lr_schedule::lr_at(std::int64_t step) const { return m_peak * factor_at(step); }

}  // namespace lora::optim
