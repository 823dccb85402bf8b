// examples/common/dist.hpp: what gpt2_finetune and fashion_mnist need to run under mpirun unchanged
// (docs/CONVENTIONS.md §dist).
//
// A program calls start_dist(&argc, &argv) first thing in main. Only when it was launched by an MPI
// launcher with more than one rank (OMPI_COMM_WORLD_SIZE from OpenMPI's mpirun, PMI_SIZE from MPICH's
// and Slurm's) and was built with MPI (LORA_WITH_MPI) does that initialise MPI: a plain run never
// touches it and behaves exactly as a program built without MPI. Then:
//   - dist_context() is the job's communicator (null in a single process);
//   - rank 0 alone prints: start_dist() points every other rank's stdout at /dev/null, and the programs
//     keep their progress bars and stderr notes to is_root();
//   - rank 0 alone writes files: on_root(what, fn) runs fn on rank 0 and makes the others wait for it;
//   - an error on one rank ends the job (fail_job), since the others may be waiting in a collective.
// The training loops (train_lm in lm.hpp, fashion_mnist's train()) use lora::dist::data_parallel over
// dist_context() and return a comm_report of what the gradient reduction cost.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>

#ifdef LORA_WITH_MPI
#include <lora/dist/mpi.hpp>
#include <memory>
#endif

#include "strings.hpp"

namespace ex {

/// The number of ranks the launcher announced in the environment (1 when none did).
inline int launched_ranks() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE"}) {
    if (const char* v = std::getenv(name)) {
      const int n = std::atoi(v);
      if (n >= 1) return n;
    }
  }
  return 1;
}

/// What the gradient reduction of one training run cost (ranks == 1: nothing was reduced).
struct comm_report {
  int ranks = 1;
  std::int64_t steps = 0;            ///< optimizer steps reduced
  std::uint64_t bytes_per_step = 0;  ///< payload each rank hands to MPI per step (every bucket once)
  std::int64_t buckets = 0;
  double wait_seconds = 0;    ///< blocked in the reducer waiting for buckets, summed over steps
  double reduce_seconds = 0;  ///< from each step's first bucket launch to the end of its reduction
  double train_seconds = 0;   ///< the whole training loop (wall clock)

  /// One line for rank 0's output, or "" for a single process.
  std::string describe() const {
    if (ranks <= 1 || steps == 0) return "";
    const double n = static_cast<double>(steps), t = train_seconds > 0 ? train_seconds : 1.0;
    char line[512];
    std::snprintf(line, sizeof line,
                  "data parallel over %d ranks: %llu bytes reduced per optimizer step by each rank (%lld bucket%s); "
                  "communication %.3f ms per step from the first bucket's launch to the sums (%.1f%% of the "
                  "training time), %.3f ms of it blocked (%.1f%%); %.3f ms per step in all, %lld steps",
                  ranks, static_cast<unsigned long long>(bytes_per_step), static_cast<long long>(buckets),
                  buckets == 1 ? "" : "s", 1e3 * reduce_seconds / n, 100 * reduce_seconds / t, 1e3 * wait_seconds / n,
                  100 * wait_seconds / t, 1e3 * train_seconds / n, static_cast<long long>(steps));
    return line;
  }
};

/// A comm_report as the programs' --json "data_parallel" object (tokens_per_second < 0: left out).
inline nlohmann::ordered_json comm_json(const comm_report& c, double tokens_per_second = -1) {
  const double steps = static_cast<double>(std::max<std::int64_t>(1, c.steps));
  nlohmann::ordered_json j = {{"ranks", c.ranks},
                              {"steps", c.steps},
                              {"bytes_per_step", c.bytes_per_step},
                              {"buckets", c.buckets},
                              {"comm_seconds_per_step", c.reduce_seconds / steps},
                              {"comm_blocked_seconds_per_step", c.wait_seconds / steps},
                              {"comm_seconds", c.reduce_seconds},
                              {"comm_blocked_seconds", c.wait_seconds},
                              {"train_seconds", c.train_seconds},
                              {"comm_fraction", c.train_seconds > 0 ? c.reduce_seconds / c.train_seconds : 0.0},
                              {"comm_blocked_fraction", c.train_seconds > 0 ? c.wait_seconds / c.train_seconds : 0.0}};
  if (tokens_per_second >= 0) j["tokens_per_second"] = tokens_per_second;
  return j;
}

#ifdef LORA_WITH_MPI

namespace detail {
inline std::unique_ptr<lora::dist::mpi_context>& dist_holder() {
  static std::unique_ptr<lora::dist::mpi_context> ctx;  // freed (and MPI finalised) at exit
  return ctx;
}
}  // namespace detail

/// The job's communicator, or null in a single process.
inline lora::dist::mpi_context* dist_context() { return detail::dist_holder().get(); }

/// Initialises MPI when launched on more than one rank (see the top of this file); silences stdout on
/// ranks other than 0.
inline void start_dist(int* argc, char*** argv) {
  if (launched_ranks() <= 1 || dist_context() != nullptr) return;
  detail::dist_holder() = std::make_unique<lora::dist::mpi_context>(argc, argv);
  if (!dist_context()->is_root() && std::freopen("/dev/null", "w", stdout) == nullptr) {
    std::fprintf(stderr, "rank %d: cannot silence stdout\n", dist_context()->rank());
  }
}

/// The comm_report of a finished data-parallel run.
template <typename Scalar>
comm_report report_of(const lora::dist::data_parallel<Scalar>& dp, double train_seconds) {
  const auto& r = dp.reducer();
  comm_report c;
  c.ranks = r.context().size();
  c.steps = r.stats().windows;
  c.bytes_per_step = r.bytes_per_step();
  c.buckets = static_cast<std::int64_t>(r.bucket_count());
  c.wait_seconds = r.stats().wait_seconds;
  c.reduce_seconds = r.stats().reduce_seconds;
  c.train_seconds = train_seconds;
  return c;
}

#else

/// Built without MPI: every run is a single process.
inline void start_dist(int* argc, char*** argv) {
  (void)argc;
  (void)argv;
}

#endif  // LORA_WITH_MPI

/// True on rank 0, and in a single process.
inline bool is_root() {
#ifdef LORA_WITH_MPI
  return dist_context() == nullptr || dist_context()->is_root();
#else
  return true;
#endif
}

/// Runs fn() on rank 0 only (writing a file, say), then makes every rank wait until it is done, so that
/// they may read what it wrote. In a single process: fn().
template <typename Fn>
void on_root(const char* what, Fn&& fn) {
  if (is_root()) fn();
#ifdef LORA_WITH_MPI
  if (dist_context() != nullptr) dist_context()->barrier(what);
#else
  (void)what;
#endif
}

/// Whether `ok` holds on every rank (collective over MPI; `ok` itself in a single process), so that the
/// ranks take the same branch.
inline bool all_ranks(bool ok, const char* what) {
#ifdef LORA_WITH_MPI
  if (dist_context() != nullptr) return lora::dist::allreduce_sum(*dist_context(), ok ? 0.0 : 1.0, what) == 0.0;
#else
  (void)what;
#endif
  return ok;
}

/// Ends the program after an error: in a job of several ranks the error is printed (by the rank that met
/// it) and the whole job aborted, since the other ranks may be waiting for this one in a collective.
/// In a single process: returns `code`.
inline int fail_job(const std::string& message, int code) {
  std::fprintf(stderr, "%s\n", message.c_str());
#ifdef LORA_WITH_MPI
  if (dist_context() != nullptr) dist_context()->abort("the error above");
#endif
  return code;
}

}  // namespace ex
