// lora/detail/parallel.hpp: the library's own threads (the fused quantized products, the models' LayerNorm,
// GELU and softmax loops).
//
// GEMMs run on the BLAS's threads (or Eigen's); the work between them runs here, fork-join on std::threads
// created per call and joined before returning. Nothing spins between calls, so these threads never compete
// with a BLAS pool for the cores (a pool that busy-waits between calls would). A call costs tens of
// microseconds per thread, so callers split only work of a millisecond or more (min_chunk below).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"

namespace lora {

/// Threads for the library's own loops: set_num_threads(), else the environment's LORA_NUM_THREADS,
/// OPENBLAS_NUM_THREADS or OMP_NUM_THREADS (the first set), else the hardware's count.
int num_threads();
/// config_error unless n >= 1.
void set_num_threads(int n);

namespace detail {

/// Calls fn(begin, end, part) on up to num_threads() contiguous parts of [0, n), each at least
/// `min_chunk` long, part 0 on the calling thread; returns when all are done. An exception thrown by any
/// part is rethrown (the first one) after every thread has joined.
template <typename Fn>
void parallel_for(index n, index min_chunk, Fn&& fn);

/// How many parts parallel_for(n, min_chunk, ...) makes: callers size per-part buffers with it.
inline index parallel_parts(index n, index min_chunk) {
  return std::max<index>(1, std::min<index>(num_threads(), n / std::max<index>(1, min_chunk)));
}

inline std::atomic<int>& thread_setting() {
  static std::atomic<int> setting{0};  // 0: not set, read the environment
  return setting;
}

inline int threads_from_environment() {
  for (const char* name : {"LORA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"}) {
    if (const char* v = std::getenv(name)) {
      const int n = std::atoi(v);
      if (n >= 1) return n;
    }
  }
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
}

}  // namespace detail

// ------------------------------------------------------------------------------------------------

inline int num_threads() {
  const int n = detail::thread_setting().load(std::memory_order_relaxed);
  if (n > 0) return n;
  static const int from_environment = detail::threads_from_environment();
  return from_environment;
}

inline void set_num_threads(int n) {
  if (n < 1) throw config_error("lora::set_num_threads: expected at least 1 thread, got " + std::to_string(n));
  detail::thread_setting().store(n, std::memory_order_relaxed);
}

template <typename Fn>
void detail::parallel_for(index n, index min_chunk, Fn&& fn) {
  const index parts = parallel_parts(n, min_chunk);
  if (parts == 1) {
    if (n > 0) fn(index{0}, n, index{0});
    return;
  }
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(parts));
  const auto run = [&](index p) {
    try {
      fn(n * p / parts, n * (p + 1) / parts, p);
    } catch (...) {
      errors[static_cast<std::size_t>(p)] = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(parts - 1));
  for (index p = 1; p < parts; ++p) threads.emplace_back(run, p);
  run(0);
  for (auto& t : threads) t.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace lora
