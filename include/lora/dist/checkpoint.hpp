// lora/dist/checkpoint.hpp: checkpoints of data-parallel training. Part of <lora/dist/mpi.hpp>;
// docs/CONVENTIONS.md §dist.
//
// Rank 0 alone writes, through io::save_checkpoint (a temporary file fsynced and renamed over the
// target), then tells every rank the outcome; no rank returns before the file is complete, and a failure
// throws on every rank. Every rank loads the same file (it must be visible to all of them) and the ranks
// agree on the outcome and on a hash of what they loaded. A checkpoint holds nothing that depends on the
// number of ranks (the reducer keeps no state between windows and shards are a function of the global
// batch), so a run may resume with another number of ranks.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../io/checkpoint.hpp"
#include "collectives.hpp"
#include "context.hpp"

namespace lora::dist {

/// Rank 0 saves the optimizer's parameters, its state and `info` to `path` atomically; collective.
/// io_error (or what rank 0 hit) on every rank when rank 0 fails.
template <typename Scalar>
void save_checkpoint(const mpi_context& ctx, const std::string& path, const optim::optimizer<Scalar>& opt,
                     const io::checkpoint_info& info);

/// Every rank loads `path` into `opt` (parameters and state); collective. io_error on every rank when
/// any rank fails (naming the lowest failing rank; that rank adds its own message), comm_error when the
/// ranks loaded different contents.
template <typename Scalar>
io::checkpoint_info load_checkpoint(const mpi_context& ctx, const std::string& path, optim::optimizer<Scalar>& opt);

}  // namespace lora::dist

namespace lora::dist::detail {

/// Broadcasts rank 0's string to every rank (length, then bytes).
inline std::string broadcast_string(const mpi_context& ctx, std::string s) {
  std::uint64_t n = s.size();
  MPI_Request req = MPI_REQUEST_NULL;
  ctx.check(MPI_Ibcast(&n, 1, MPI_UINT64_T, 0, ctx.comm(), &req), "MPI_Ibcast of a length");
  ctx.wait(req, "the broadcast of a message length");
  s.resize(static_cast<std::size_t>(n));
  if (n == 0) return s;
  ctx.check(MPI_Ibcast(s.data(), static_cast<int>(n), MPI_CHAR, 0, ctx.comm(), &req), "MPI_Ibcast of a message");
  ctx.wait(req, "the broadcast of a message");
  return s;
}

/// A hash of an optimizer's parameter values, state and step.
template <typename Scalar>
std::uint64_t content_fingerprint(const optim::optimizer<Scalar>& opt) {
  std::uint64_t h = layout_fingerprint(opt.parameters());
  for (const auto& p : opt.parameters())
    h = fnv1a(p.value_data, static_cast<std::size_t>(p.size()) * sizeof(Scalar), h);
  for (std::size_t i = 0; i < opt.state_tensor_count(); ++i) {
    const auto& t = opt.state_tensor_data(i);
    h = fnv1a(t.data(), static_cast<std::size_t>(t.size()) * sizeof(Scalar), h);
  }
  const std::int64_t step = opt.step_count();
  return fnv1a(&step, sizeof step, h);
}

}  // namespace lora::dist::detail

// ---------------------------------------------------------------------------------------------------

namespace lora::dist {

template <typename Scalar>
void save_checkpoint(const mpi_context& ctx, const std::string& path, const optim::optimizer<Scalar>& opt,
                     const io::checkpoint_info& info) {
  std::string failure;  // empty: saved
  if (ctx.is_root()) {
    try {
      io::save_checkpoint(path, opt, info);
    } catch (const std::exception& e) {
      failure = e.what();
      if (failure.empty()) failure = "unknown error";
    }
  }
  failure = detail::broadcast_string(ctx, failure);  // also the barrier: the file is complete (or absent)
  if (!failure.empty()) {
    throw io_error(lora::detail::cat("dist::save_checkpoint: rank 0 could not save '", path, "': ", failure));
  }
}

template <typename Scalar>
io::checkpoint_info load_checkpoint(const mpi_context& ctx, const std::string& path, optim::optimizer<Scalar>& opt) {
  io::checkpoint_info info;
  std::string failure;
  try {
    info = io::load_checkpoint(path, opt);
  } catch (const std::exception& e) {
    failure = e.what();
  }
  const int failed = detail::first_failed_rank(ctx, failure.empty(), "the agreement on a checkpoint load");
  if (failed >= 0) {
    throw io_error(lora::detail::cat("dist::load_checkpoint: rank ", failed, " could not load '", path, "'",
                                     failure.empty() ? std::string() : ": " + failure));
  }
  detail::require_same(ctx, detail::content_fingerprint(opt),
                       lora::detail::cat("the contents loaded from '", path, "'"));
  return info;
}

}  // namespace lora::dist
