// lora/dist/data_parallel.hpp: one optimizer step of data-parallel training: gradient
// accumulation over micro-batches, one reduction per window, then the step guard (non-finite check,
// clipping on the reduced gradients) and the optimizer, identically on every rank. Part of
// <lora/dist/mpi.hpp>; docs/CONVENTIONS.md §dist.
//
// It plays the role that optim::grad_accumulator plays in one process, with the same contract: every
// accumulate() call leaves the gradients at zero, and a window of k micro-batches with reduction::mean
// steps like one batch of all their samples with the mean loss. The loop per micro-batch is
//
//     dp.begin_micro_batch(dist::shard(global_count, rank, size));   // this rank's share of the mean
//     forward on the local block, local mean loss L
//     backward of the last layer;  dp.mark_ready(last.parameters());  // optional: starts reductions early
//     ...
//     dp.accumulate(L);                                               // true when the optimizer stepped
//
// and a rank whose block is empty still makes every call (with weight 0).
#pragma once

#include <cmath>
#include <cstdint>

#include "../optim/grad_accumulator.hpp"
#include "../optim/step_guard.hpp"
#include "collectives.hpp"
#include "reducer.hpp"
#include "shard.hpp"

namespace lora::dist {

/// Options of data_parallel.
struct data_parallel_options {
  std::int64_t micro_batches = 1;                   ///< >= 1 micro-batches per optimizer step.
  optim::reduction how = optim::reduction::mean;    ///< mean: losses are means over their samples.
  std::size_t bucket_bytes = default_bucket_bytes;  ///< gradient_reducer's bucket size.
  bool broadcast_initial = true;                    ///< Copy rank 0's parameter values to all at construction.
};

/// Data-parallel steps of one optimizer (through its step_guard).
template <typename Scalar_>
class data_parallel {
 public:
  using Scalar = Scalar_;

  /// `guard` (and its optimizer) must outlive this object. Collective: builds the reducer over the
  /// optimizer's parameters and, with broadcast_initial, broadcasts rank 0's values.
  data_parallel(const mpi_context& ctx, optim::step_guard<Scalar>& guard, const data_parallel_options& options = {});

  /// Opens a micro-batch whose local samples weigh `weight` in the global loss: n_local / n_global for
  /// mean losses (shard_range::weight()), 1 for sum losses. state_error while one is open.
  void begin_micro_batch(double weight);
  void begin_micro_batch(const shard_range& local) { begin_micro_batch(local.weight()); }
  /// Forwarded to the reducer: these gradients are final for this micro-batch.
  void mark_ready(const parameter<Scalar>& p) { m_reducer.mark_ready(p); }
  void mark_ready(const parameter_list<Scalar>& ps) { m_reducer.mark_ready(ps); }

  /// Closes the micro-batch with its local loss. On the window's last micro-batch: reduces gradients and
  /// loss over the ranks, then steps through the guard on every rank with the global loss; returns true
  /// when the optimizer stepped (false while accumulating, and when the guard skipped on every rank).
  /// Leaves the gradients at zero unless the guard throws (then on every rank alike).
  bool accumulate(double local_loss);

  std::int64_t micro_batches() const noexcept { return m_options.micro_batches; }
  std::int64_t pending() const noexcept { return m_pending; }
  /// The global loss of the last completed window (as grad_accumulator::last_loss() would see it).
  double last_loss() const noexcept { return m_last_loss; }
  const gradient_reducer<Scalar>& reducer() const noexcept { return m_reducer; }
  optim::step_guard<Scalar>& guard() const noexcept { return m_guard; }

 private:
  const mpi_context& m_ctx;
  optim::step_guard<Scalar>& m_guard;
  data_parallel_options m_options;
  gradient_reducer<Scalar> m_reducer;
  std::int64_t m_pending = 0;
  double m_scale = 0.0;       // weight of the open micro-batch, divided by k for means
  double m_local_loss = 0.0;  // sum of scale * loss over this window's micro-batches
  double m_last_loss = 0.0;
};

// ---------------------------------------------------------------------------------------------------

namespace detail {

inline const data_parallel_options& checked(const data_parallel_options& o) {
  if (o.micro_batches < 1) {
    throw config_error(lora::detail::cat("dist::data_parallel: micro_batches must be >= 1, got ", o.micro_batches));
  }
  return o;
}

}  // namespace detail

template <typename Scalar>
data_parallel<Scalar>::data_parallel(const mpi_context& ctx, optim::step_guard<Scalar>& guard,
                                     const data_parallel_options& options)
    : m_ctx(ctx),
      m_guard(guard),
      m_options(detail::checked(options)),
      m_reducer(ctx, guard.wrapped().parameters(), options.bucket_bytes) {
  if (options.broadcast_initial) broadcast_parameters(ctx, guard.wrapped().parameters());
}

template <typename Scalar>
void data_parallel<Scalar>::begin_micro_batch(double weight) {
  if (!(std::isfinite(weight) && weight >= 0.0)) {
    throw config_error(
        lora::detail::cat("dist::data_parallel: a micro-batch weight must be finite and >= 0, got ", weight));
  }
  const bool mean = m_options.how == optim::reduction::mean;
  const double scale = mean ? weight / static_cast<double>(m_options.micro_batches) : weight;
  m_reducer.begin(scale, m_pending + 1 == m_options.micro_batches);  // state_error while one is open
  m_scale = scale;
}

template <typename Scalar>
bool data_parallel<Scalar>::accumulate(double local_loss) {
  if (!m_reducer.in_micro_batch()) {
    throw state_error("dist::data_parallel::accumulate: no micro-batch is open; call begin_micro_batch() first");
  }
  // An empty shard's loss (0/0) contributes nothing, like its gradients.
  const double share = m_scale == 0.0 ? 0.0 : m_scale * local_loss;
  m_local_loss = m_pending == 0 ? share : m_local_loss + share;
  m_reducer.finish();
  if (++m_pending < m_options.micro_batches) return false;
  m_pending = 0;  // the window is over whatever the guard decides
  m_last_loss = allreduce_sum(m_ctx, m_local_loss, "the allreduce of the loss");
  const bool stepped = m_guard.step(m_last_loss);
  if (stepped) m_guard.wrapped().zero_grad();  // a skip has zeroed them already
  return stepped;
}

}  // namespace lora::dist
