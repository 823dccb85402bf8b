// lora/optim/step_guard.hpp: an optimizer step that refuses to run on a non-finite loss or gradient.
//
// A NaN or an infinity that reaches an optimizer spreads into every parameter it updates and into the
// moment estimates, which outlive the bad batch. step_guard checks the loss and every gradient element
// before anything is written; by default it throws lora::numeric_error naming the offending parameter,
// element and value, with parameters, gradients and optimizer state as they were (the grads are kept
// for inspection). With nonfinite_policy::skip it drops the batch instead: zeroes the gradients, counts
// the skip and returns false, as mixed-precision trainers do when a loss-scaled step overflows.
// Optionally it clips the global gradient norm (clip.hpp) between the check and the step.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "../error.hpp"
#include "clip.hpp"
#include "optimizer.hpp"

namespace lora::optim {

/// What step_guard does when the loss or a gradient is not finite.
enum class nonfinite_policy {
  raise,  ///< Throw numeric_error; nothing changes.
  skip,   ///< Zero the gradients, count the skip, return false.
};

/// Options of step_guard.
struct guard_options {
  nonfinite_policy on_nonfinite = nonfinite_policy::raise;
  double max_grad_norm = 0.0;  ///< > 0: clip_grad_norm to this before stepping; 0: no clipping.
};

/// Wraps an optimizer (by reference; it must outlive the guard) with the checks above.
template <typename Scalar_>
class step_guard {
 public:
  using Scalar = Scalar_;

  /// Throws config_error unless options.max_grad_norm is finite and >= 0.
  explicit step_guard(optim::optimizer<Scalar>& opt, const guard_options& options = {});

  /// Steps the optimizer when `loss` and every gradient are finite (clipping first when asked) and
  /// returns true. Otherwise changes no parameter and no optimizer state, and either throws
  /// numeric_error (raise) or zeroes the gradients and returns false (skip).
  bool step(double loss);

  /// Steps refused under nonfinite_policy::skip since construction.
  std::int64_t skipped_steps() const noexcept { return m_skipped; }
  /// The total gradient norm before clipping at the last accepted step; NaN while clipping is off or
  /// before the first accepted step.
  double last_grad_norm() const noexcept { return m_last_norm; }
  const guard_options& options() const noexcept { return m_options; }
  optim::optimizer<Scalar>& wrapped() const noexcept { return m_opt; }

 private:
  /// Applies the policy to a refused step described by `why`.
  bool refuse(const std::string& why);

  optim::optimizer<Scalar>& m_opt;
  guard_options m_options;
  std::int64_t m_skipped = 0;
  double m_last_norm = std::numeric_limits<double>::quiet_NaN();
};

// ---------------------------------------------------------------------------------------------------

template <typename Scalar>
step_guard<Scalar>::step_guard(optim::optimizer<Scalar>& opt, const guard_options& options)
    : m_opt(opt), m_options(options) {
  detail::check_hyper("step_guard", "max_grad_norm", options.max_grad_norm, 0.0);
}

template <typename Scalar>
bool step_guard<Scalar>::step(double loss) {
  if (!std::isfinite(loss)) return refuse(detail::cat("the loss is ", loss));
  const auto& params = m_opt.parameters();
  if (const auto bad = find_nonfinite_grad(params)) return refuse(bad.describe());
  if (m_options.max_grad_norm > 0.0) {
    const double norm = clip_grad_norm(params, m_options.max_grad_norm);
    // Every element is finite here, but for double gradients the sum of squares can still overflow.
    if (!std::isfinite(norm)) return refuse(detail::cat("the total gradient norm overflows (", norm, ")"));
    m_last_norm = norm;
  }
  m_opt.step();
  return true;
}

template <typename Scalar>
bool step_guard<Scalar>::refuse(const std::string& why) {
  if (m_options.on_nonfinite == nonfinite_policy::raise) {
    throw numeric_error(detail::cat(m_opt.kind(), " step ", m_opt.step_count() + 1, " refused: ", why,
                                    "; parameters and optimizer state are unchanged"));
  }
  m_opt.zero_grad();
  ++m_skipped;
  return false;
}

}  // namespace lora::optim
