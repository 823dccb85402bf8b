// lora/dist/reducer.hpp: gradient averaging over ranks, overlapped with backward. Part of
// <lora/dist/mpi.hpp>; docs/CONVENTIONS.md §dist.
//
// Buckets: the parameters, taken in reverse order (backward finishes the last layers first), are cut
// into runs of consecutive parameters of at most bucket_bytes each (a larger parameter is a bucket of its
// own). Each bucket owns one flat buffer holding its parameters' gradients back to back, in that reverse
// order. The buffers are also the accumulation storage of a window of micro-batches.
//
// Arithmetic: begin(w) starts a micro-batch whose gradients count with weight w; mark_ready(p) adds
// w * grad(p) into p's slot (assigns, on the first micro-batch of a window) and zeroes grad(p), so
// backward may overwrite or add. On the last micro-batch of the window (begin(w, true)), a bucket whose
// parameters are all ready is summed over ranks at once by MPI_Iallreduce(MPI_SUM) in place; buckets
// start strictly in bucket order, so every rank issues the collectives in the same order whatever order
// mark_ready() sees. finish() marks the rest ready, waits (bounded), and writes the sums into the grads:
//
//     grad(p) = sum over ranks r, micro-batches j of w_rj * g_rj(p).
//
// With w_rj = n_rj / N_j / k (shard_range::weight() divided by the k micro-batches of a mean), this is
// exactly the gradient of the single-process mean loss over the global batches; equal shards give the
// plain average (1/S) sum_r. A weight of 0 (an empty shard) contributes exact zeros whatever its gradient
// holds (a mean over no samples is 0/0). A non-finite element on any rank makes the summed element
// non-finite on every rank, so a step_guard after finish() refuses the step on all ranks alike.
//
// OpenMPI progresses non-blocking collectives only inside MPI calls: mark_ready() tests the buckets in
// flight, which moves them on between layers.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <unordered_map>
#include <vector>

#include "../optim/optimizer.hpp"
#include "../parameter.hpp"
#include "collectives.hpp"
#include "context.hpp"

namespace lora::dist {

/// 1 MiB: a LoRA model's adapters fit a few buckets, so reductions start while backward still runs.
inline constexpr std::size_t default_bucket_bytes = std::size_t{1} << 20;

/// Counters of a gradient_reducer (this rank's view).
struct reducer_stats {
  std::int64_t windows = 0;     ///< Windows reduced (optimizer steps prepared).
  std::int64_t allreduces = 0;  ///< MPI_Iallreduce calls on buckets.
  std::uint64_t bytes = 0;      ///< Payload bytes handed to those calls (each rank's buffer size).
  double wait_seconds = 0.0;    ///< Time spent blocked in finish() waiting for buckets.
  double reduce_seconds = 0.0;  ///< Time from the first bucket's launch to the end of finish().
};

/// Sums weighted gradients over the ranks of a communicator (rules above).
template <typename Scalar_>
class gradient_reducer {
 public:
  using Scalar = Scalar_;

  /// Buckets `params` (validated as optimizers do) by `bucket_bytes` (> 0). Collective: comm_error on
  /// every rank when the ranks' parameter lists or bucket sizes differ.
  gradient_reducer(const mpi_context& ctx, parameter_list<Scalar> params,
                   std::size_t bucket_bytes = default_bucket_bytes);
  /// Waits (bounded) for buckets still in flight: their buffers must outlive the collectives.
  ~gradient_reducer();
  gradient_reducer(const gradient_reducer&) = delete;
  gradient_reducer& operator=(const gradient_reducer&) = delete;

  /// Starts a micro-batch whose gradients count with `weight` (finite, >= 0); `last`: it ends the window
  /// and is reduced. state_error while a micro-batch is open (finish() it first).
  void begin(double weight, bool last = true);
  /// Parameter k's gradient for this micro-batch is complete (after its layer's backward). state_error
  /// outside begin()/finish() or when k is marked twice; config_error for k out of range.
  void mark_ready(std::size_t k);
  /// The same by view (matched by its gradient storage); name_error for a parameter not in the list.
  void mark_ready(const parameter<Scalar>& p);
  /// Every parameter of a layer (`layer.parameters()`), in reverse order.
  void mark_ready(const parameter_list<Scalar>& ps);
  /// Marks the rest ready and closes the micro-batch. After the last one of a window: waits for every
  /// bucket and writes the reduced sums into the gradients (identical on every rank). Otherwise the
  /// gradients are left at zero and the weighted sums stay in the buffers.
  void finish();
  /// Drops a half-finished window (between micro-batches only; state_error inside one).
  void reset();

  const parameter_list<Scalar>& parameters() const noexcept { return m_params; }
  const mpi_context& context() const noexcept { return m_ctx; }
  std::size_t bucket_count() const noexcept { return m_buckets.size(); }
  /// The parameter indices of bucket b, in buffer order (descending).
  const std::vector<std::size_t>& bucket_parameters(std::size_t b) const { return m_buckets.at(b).params; }
  /// Elements in bucket b's buffer.
  std::size_t bucket_elements(std::size_t b) const { return m_buckets.at(b).buffer.size(); }
  /// Bytes reduced per optimizer step on each rank (the sum of the buffers).
  std::size_t bytes_per_step() const noexcept;
  const reducer_stats& stats() const noexcept { return m_stats; }
  bool in_micro_batch() const noexcept { return m_open; }

 private:
  struct bucket {
    std::vector<std::size_t> params;  // descending parameter indices
    std::vector<Scalar> buffer;
    std::size_t pending = 0;  // parameters not yet ready in the reducing micro-batch
    MPI_Request request = MPI_REQUEST_NULL;
  };
  struct slot {
    std::size_t bucket = 0;
    std::size_t offset = 0;
  };

  void build_buckets(std::size_t bucket_bytes);
  void take(std::size_t k);  // adds w * grad(k) into its slot, zeroes grad(k)
  void launch_ready();
  void progress();
  void write_back();
  void check_open(const char* who) const;

  const mpi_context& m_ctx;
  parameter_list<Scalar> m_params;
  std::vector<bucket> m_buckets;
  std::vector<slot> m_slots;  // per parameter
  std::unordered_map<const Scalar*, std::size_t> m_by_grad;
  std::vector<char> m_ready;  // per parameter, this micro-batch
  std::size_t m_next_launch = 0;
  double m_weight = 0.0;
  bool m_open = false;  // inside begin()/finish()
  bool m_last = false;  // the open micro-batch ends the window
  bool m_fresh = true;  // the open (or next) micro-batch starts a window
  std::chrono::steady_clock::time_point m_first_launch;
  reducer_stats m_stats;
};

// ---------------------------------------------------------------------------------------------------

template <typename Scalar>
gradient_reducer<Scalar>::gradient_reducer(const mpi_context& ctx, parameter_list<Scalar> params,
                                           std::size_t bucket_bytes)
    : m_ctx(ctx), m_params(std::move(params)) {
  lora::detail::check_parameters(m_params, "dist::gradient_reducer");
  if (bucket_bytes == 0) throw config_error("dist::gradient_reducer: bucket_bytes must be > 0, got 0");
  build_buckets(bucket_bytes);
  m_ready.assign(m_params.size(), 0);
  for (std::size_t k = 0; k < m_params.size(); ++k) m_by_grad.emplace(m_params[k].grad_data, k);
  const std::uint64_t layout = detail::layout_fingerprint(m_params);
  detail::require_same(ctx, detail::fnv1a(&bucket_bytes, sizeof bucket_bytes, layout),
                       "the reducer's parameters and bucket size");
}

template <typename Scalar>
gradient_reducer<Scalar>::~gradient_reducer() {
  for (auto& b : m_buckets) {
    if (b.request == MPI_REQUEST_NULL) continue;
    try {
      m_ctx.wait(b.request, "a gradient bucket in flight while its reducer is destroyed");
    } catch (const std::exception& e) {
      m_ctx.abort(e.what());
    }
  }
}

template <typename Scalar>
void gradient_reducer<Scalar>::build_buckets(std::size_t bucket_bytes) {
  m_slots.assign(m_params.size(), slot{});
  std::size_t bytes = 0;
  for (std::size_t k = m_params.size(); k-- > 0;) {
    const std::size_t n = static_cast<std::size_t>(m_params[k].size());
    if (m_buckets.empty() || (bytes > 0 && bytes + n * sizeof(Scalar) > bucket_bytes)) {
      m_buckets.emplace_back();
      bytes = 0;
    }
    bucket& b = m_buckets.back();
    m_slots[k] = {m_buckets.size() - 1, b.buffer.size()};
    b.params.push_back(k);
    b.buffer.resize(b.buffer.size() + n);
    bytes += n * sizeof(Scalar);
    if (b.buffer.size() > static_cast<std::size_t>(std::numeric_limits<int>::max())) {
      throw config_error(lora::detail::cat("dist::gradient_reducer: parameter '", m_params[k].name,
                                           "' makes a bucket of ", b.buffer.size(),
                                           " elements, beyond MPI's int count"));
    }
  }
}

template <typename Scalar>
std::size_t gradient_reducer<Scalar>::bytes_per_step() const noexcept {
  std::size_t n = 0;
  for (const auto& b : m_buckets) n += b.buffer.size() * sizeof(Scalar);
  return n;
}

template <typename Scalar>
void gradient_reducer<Scalar>::check_open(const char* who) const {
  if (!m_open) {
    throw state_error(
        lora::detail::cat("dist::gradient_reducer::", who, ": no micro-batch is open; call begin() first"));
  }
}

template <typename Scalar>
void gradient_reducer<Scalar>::begin(double weight, bool last) {
  if (m_open) throw state_error("dist::gradient_reducer::begin: the previous micro-batch is still open; finish() it");
  if (!(std::isfinite(weight) && weight >= 0.0)) {
    throw config_error(
        lora::detail::cat("dist::gradient_reducer::begin: weight must be finite and >= 0, got ", weight));
  }
  m_weight = weight;
  m_last = last;
  m_open = true;
  std::fill(m_ready.begin(), m_ready.end(), 0);
  for (auto& b : m_buckets) b.pending = b.params.size();
  m_next_launch = 0;
}

template <typename Scalar>
void gradient_reducer<Scalar>::take(std::size_t k) {
  const parameter<Scalar>& p = m_params[k];
  bucket& b = m_buckets[m_slots[k].bucket];
  Eigen::Map<vector<Scalar>> dst(b.buffer.data() + m_slots[k].offset, p.size());
  if (m_weight == 0.0) {  // an empty shard: exact zeros, even if its "mean" gradient is 0/0
    if (m_fresh) dst.setZero();
  } else if (m_fresh) {
    dst = p.grad() * static_cast<Scalar>(m_weight);
  } else {
    dst += p.grad() * static_cast<Scalar>(m_weight);
  }
  p.grad().setZero();
}

template <typename Scalar>
void gradient_reducer<Scalar>::mark_ready(std::size_t k) {
  check_open("mark_ready");
  if (k >= m_params.size()) {
    throw config_error(lora::detail::cat("dist::gradient_reducer::mark_ready: parameter index ", k,
                                         " is out of range (", m_params.size(), " parameters)"));
  }
  if (m_ready[k]) {
    throw state_error(lora::detail::cat("dist::gradient_reducer::mark_ready: parameter '", m_params[k].name,
                                        "' is already marked ready in this micro-batch"));
  }
  take(k);
  m_ready[k] = 1;
  if (!m_last) return;
  --m_buckets[m_slots[k].bucket].pending;
  launch_ready();
  progress();
}

template <typename Scalar>
void gradient_reducer<Scalar>::mark_ready(const parameter<Scalar>& p) {
  const auto it = m_by_grad.find(p.grad_data);
  if (it == m_by_grad.end()) {
    throw name_error(lora::detail::cat("dist::gradient_reducer::mark_ready: parameter '", p.name,
                                       "' is not one of the reducer's parameters"));
  }
  mark_ready(it->second);
}

template <typename Scalar>
void gradient_reducer<Scalar>::mark_ready(const parameter_list<Scalar>& ps) {
  for (std::size_t i = ps.size(); i-- > 0;) mark_ready(ps[i]);
}

template <typename Scalar>
void gradient_reducer<Scalar>::launch_ready() {
  while (m_next_launch < m_buckets.size() && m_buckets[m_next_launch].pending == 0) {
    bucket& b = m_buckets[m_next_launch];
    if (m_next_launch == 0) m_first_launch = std::chrono::steady_clock::now();
    m_ctx.check(MPI_Iallreduce(MPI_IN_PLACE, b.buffer.data(), static_cast<int>(b.buffer.size()),
                               detail::mpi_type<Scalar>(), MPI_SUM, m_ctx.comm(), &b.request),
                "MPI_Iallreduce of a gradient bucket");
    ++m_stats.allreduces;
    m_stats.bytes += b.buffer.size() * sizeof(Scalar);
    ++m_next_launch;
  }
}

template <typename Scalar>
void gradient_reducer<Scalar>::progress() {
  for (std::size_t i = 0; i < m_next_launch; ++i) {
    bucket& b = m_buckets[i];
    if (b.request == MPI_REQUEST_NULL) continue;
    int done = 0;
    m_ctx.check(MPI_Test(&b.request, &done, MPI_STATUS_IGNORE), "MPI_Test of a gradient bucket");
  }
}

template <typename Scalar>
void gradient_reducer<Scalar>::finish() {
  check_open("finish");
  for (std::size_t b = 0; b < m_buckets.size(); ++b) {
    for (const std::size_t k : m_buckets[b].params) {
      if (!m_ready[k]) mark_ready(k);
    }
  }
  m_open = false;
  if (!m_last) {
    m_fresh = false;
    return;
  }
  const auto start = std::chrono::steady_clock::now();
  for (auto& b : m_buckets) m_ctx.wait(b.request, "the allreduce of a gradient bucket");
  const auto end = std::chrono::steady_clock::now();
  m_stats.wait_seconds += std::chrono::duration<double>(end - start).count();
  if (!m_buckets.empty()) m_stats.reduce_seconds += std::chrono::duration<double>(end - m_first_launch).count();
  ++m_stats.windows;
  write_back();
  m_fresh = true;
}

template <typename Scalar>
void gradient_reducer<Scalar>::write_back() {
  for (std::size_t k = 0; k < m_params.size(); ++k) {
    const bucket& b = m_buckets[m_slots[k].bucket];
    m_params[k].grad() = Eigen::Map<const vector<Scalar>>(b.buffer.data() + m_slots[k].offset, m_params[k].size());
  }
}

template <typename Scalar>
void gradient_reducer<Scalar>::reset() {
  if (m_open) throw state_error("dist::gradient_reducer::reset: a micro-batch is open; finish() it first");
  m_fresh = true;
}

}  // namespace lora::dist
