// lora/optim/grad_accumulator.hpp: gradient accumulation over k micro-batches per optimizer step.
//
// With micro-batch losses L_1..L_k, each the mean over its m samples, the loss of the whole batch of
// k*m samples is L = (1/k) sum_j L_j, so dL/dp = (1/k) sum_j dL_j/dp: summing the micro-batch
// gradients and dividing by k gives the gradient of the big batch (reduction::mean). reduction::sum
// keeps the plain sum, for losses that are sums over samples.
//
// The accumulator keeps its own running sum, so it works whether the layers' backward overwrites or
// adds to the gradients: after each micro-batch it takes the gradients into the sum and zeroes them.
// On the k-th call it writes the reduced sum into the gradients and steps through a step_guard, whose
// non-finite checks see the accumulated gradients and the reduced loss; then it zeroes the gradients
// again, so every call leaves them at zero (unless the guard throws). Save checkpoints between
// optimizer steps: the running sum of a half-finished window is not part of a checkpoint.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../error.hpp"
#include "step_guard.hpp"

namespace lora::optim {

/// How the k micro-batch gradients (and losses) combine.
enum class reduction {
  mean,  ///< (1/k) sum: micro-batch losses are means over their samples (the usual case).
  sum,   ///< sum: micro-batch losses are sums over their samples.
};

/// Accumulates gradients over micro_batches() calls of accumulate(), then steps.
template <typename Scalar_>
class grad_accumulator {
 public:
  using Scalar = Scalar_;

  /// `guard` (and its optimizer) must outlive the accumulator. Throws config_error unless
  /// micro_batches >= 1. Allocates one buffer per parameter when micro_batches > 1.
  grad_accumulator(step_guard<Scalar>& guard, std::int64_t micro_batches, reduction how = reduction::mean);

  /// Call after each micro-batch's backward, with its loss. Returns true when this call completed a
  /// window of micro_batches() calls and the optimizer stepped; false while accumulating, and when
  /// the guard skipped the step. Leaves the gradients at zero. If the guard throws, the window is
  /// dropped and the exception passes through, the gradients holding the reduced sum for inspection.
  bool accumulate(double loss);

  /// Drops a half-finished window (the gradients of the next call start a new one).
  void reset() noexcept { m_pending = 0; }

  std::int64_t micro_batches() const noexcept { return m_k; }
  /// Micro-batches taken into the current window so far.
  std::int64_t pending() const noexcept { return m_pending; }
  /// The reduced loss of the last completed window (mean or sum of its micro-batch losses).
  double last_loss() const noexcept { return m_last_loss; }
  /// Bytes of the running-sum buffers (for memory accounting).
  std::size_t buffer_bytes() const noexcept;

 private:
  step_guard<Scalar>& m_guard;
  std::int64_t m_k;
  reduction m_how;
  std::int64_t m_pending = 0;
  double m_loss_sum = 0.0;
  double m_last_loss = 0.0;
  std::vector<vector<Scalar>> m_sum;  // one per parameter; empty when m_k == 1
};

// ---------------------------------------------------------------------------------------------------

template <typename Scalar>
grad_accumulator<Scalar>::grad_accumulator(step_guard<Scalar>& guard, std::int64_t micro_batches, reduction how)
    : m_guard(guard), m_k(micro_batches), m_how(how) {
  if (micro_batches < 1) {
    throw config_error(detail::cat("grad_accumulator: micro_batches must be >= 1, got ", micro_batches));
  }
  if (m_k > 1) {
    for (const auto& p : guard.wrapped().parameters()) m_sum.push_back(vector<Scalar>::Zero(p.size()));
  }
}

template <typename Scalar>
bool grad_accumulator<Scalar>::accumulate(double loss) {
  const auto& params = m_guard.wrapped().parameters();
  m_loss_sum = m_pending == 0 ? loss : m_loss_sum + loss;
  ++m_pending;
  if (m_pending < m_k) {  // take this micro-batch into the running sum, leave clean grads for the next
    for (std::size_t j = 0; j < params.size(); ++j) {
      if (m_pending == 1) {
        m_sum[j] = params[j].grad();
      } else {
        m_sum[j] += params[j].grad();
      }
      params[j].grad().setZero();
    }
    return false;
  }
  const bool mean = m_how == reduction::mean;
  for (std::size_t j = 0; j < params.size(); ++j) {
    auto grad = params[j].grad();  // a map: writes go to the layer's gradient
    if (m_k > 1) grad += m_sum[j];
    if (mean) grad /= static_cast<Scalar>(m_k);
  }
  m_last_loss = mean ? m_loss_sum / static_cast<double>(m_k) : m_loss_sum;
  m_pending = 0;  // the window is over whatever the guard decides
  const bool stepped = m_guard.step(m_last_loss);
  if (stepped) m_guard.wrapped().zero_grad();  // a skip has zeroed them already
  return stepped;
}

template <typename Scalar>
std::size_t grad_accumulator<Scalar>::buffer_bytes() const noexcept {
  std::size_t n = 0;
  for (const auto& b : m_sum) n += static_cast<std::size_t>(b.size()) * sizeof(Scalar);
  return n;
}

}  // namespace lora::optim
