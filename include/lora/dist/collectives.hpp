// lora/dist/collectives.hpp: the small collectives of data-parallel training: agreement checks,
// broadcast of the initial parameters from rank 0, "any rank non-finite", a summed scalar. Part of
// <lora/dist/mpi.hpp>. Every wait is bounded (mpi_context::wait).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../optim/clip.hpp"
#include "../optim/optimizer.hpp"
#include "../parameter.hpp"
#include "context.hpp"

namespace lora::dist {

/// Copies every parameter's value from rank `root` to all ranks (one flat MPI_Ibcast), so that training
/// starts from the same adapters everywhere. comm_error on every rank when the ranks' parameter lists
/// differ in names, roles or shapes (checked first, collectively).
template <typename Scalar>
void broadcast_parameters(const mpi_context& ctx, const parameter_list<Scalar>& params, int root = 0);

/// True on every rank when any rank has a non-finite gradient element in `params` (one MPI_Iallreduce
/// of a flag). gradient_reducer needs no such call: a non-finite value survives the summed reduction.
template <typename Scalar>
bool any_nonfinite(const mpi_context& ctx, const parameter_list<Scalar>& params);

/// The sum over ranks of `value` (MPI_SUM on doubles), the same on every rank.
inline double allreduce_sum(const mpi_context& ctx, double value, const char* what = "allreduce of a double");

}  // namespace lora::dist

namespace lora::dist::detail {

/// FNV-1a, 64 bits, chainable.
inline std::uint64_t fnv1a(const void* data, std::size_t n, std::uint64_t h = 0xcbf29ce484222325ull);

/// A hash of the names, roles and shapes of `params` (not their values).
template <typename Scalar>
std::uint64_t layout_fingerprint(const parameter_list<Scalar>& params);

/// Throws comm_error on every rank unless `value` is the same on all of them (MIN and MAX reductions);
/// `what` names the value in the message.
inline void require_same(const mpi_context& ctx, std::uint64_t value, const std::string& what);

/// The lowest rank whose `ok` is false, or -1 when every rank is ok (one MIN reduction).
inline int first_failed_rank(const mpi_context& ctx, bool ok, const char* what);

}  // namespace lora::dist::detail

// ---------------------------------------------------------------------------------------------------

namespace lora::dist::detail {

inline std::uint64_t fnv1a(const void* data, std::size_t n, std::uint64_t h) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ bytes[i]) * 0x100000001b3ull;
  return h;
}

template <typename Scalar>
std::uint64_t layout_fingerprint(const parameter_list<Scalar>& params) {
  std::uint64_t h = fnv1a("lora.params", 11);
  for (const auto& p : params) {
    const std::int64_t dims[4] = {static_cast<std::int64_t>(p.name.size()), static_cast<std::int64_t>(p.role),
                                  static_cast<std::int64_t>(p.rows), static_cast<std::int64_t>(p.cols)};
    h = fnv1a(p.name.data(), p.name.size(), h);
    h = fnv1a(dims, sizeof dims, h);
  }
  return h;
}

inline void require_same(const mpi_context& ctx, std::uint64_t value, const std::string& what) {
  std::uint64_t lo = value, hi = value;
  MPI_Request req[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
  ctx.check(MPI_Iallreduce(MPI_IN_PLACE, &lo, 1, MPI_UINT64_T, MPI_MIN, ctx.comm(), &req[0]), "MPI_Iallreduce (min)");
  ctx.check(MPI_Iallreduce(MPI_IN_PLACE, &hi, 1, MPI_UINT64_T, MPI_MAX, ctx.comm(), &req[1]), "MPI_Iallreduce (max)");
  ctx.wait(req[0], "the agreement check (min)");
  ctx.wait(req[1], "the agreement check (max)");
  if (lo != hi) {
    throw comm_error(lora::detail::cat("rank ", ctx.rank(), " of ", ctx.size(), ": the ranks disagree about ", what,
                                       " (this rank's fingerprint ", value, ", lowest ", lo, ", highest ", hi, ")"));
  }
}

inline int first_failed_rank(const mpi_context& ctx, bool ok, const char* what) {
  int first = ok ? ctx.size() : ctx.rank();
  MPI_Request req = MPI_REQUEST_NULL;
  ctx.check(MPI_Iallreduce(MPI_IN_PLACE, &first, 1, MPI_INT, MPI_MIN, ctx.comm(), &req), what);
  ctx.wait(req, what);
  return first == ctx.size() ? -1 : first;
}

}  // namespace lora::dist::detail

namespace lora::dist {

template <typename Scalar>
void broadcast_parameters(const mpi_context& ctx, const parameter_list<Scalar>& params, int root) {
  lora::detail::check_parameters(params, "dist::broadcast_parameters");
  if (root < 0 || root >= ctx.size()) {
    throw config_error(
        lora::detail::cat("dist::broadcast_parameters: root must be in [0, ", ctx.size(), "), got ", root));
  }
  detail::require_same(ctx, detail::layout_fingerprint(params), "the parameter names, roles and shapes");
  std::size_t total = 0;
  for (const auto& p : params) total += static_cast<std::size_t>(p.size());
  std::vector<Scalar> flat(total);
  std::size_t at = 0;
  for (const auto& p : params) {  // packing on every rank keeps the code simple; the root's copy is sent
    if (p.size() > 0) std::memcpy(flat.data() + at, p.value_data, static_cast<std::size_t>(p.size()) * sizeof(Scalar));
    at += static_cast<std::size_t>(p.size());
  }
  if (total > static_cast<std::size_t>(std::numeric_limits<int>::max())) {
    throw config_error(lora::detail::cat("dist::broadcast_parameters: ", total, " elements exceed MPI's int count"));
  }
  MPI_Request req = MPI_REQUEST_NULL;
  ctx.check(MPI_Ibcast(flat.data(), static_cast<int>(total), detail::mpi_type<Scalar>(), root, ctx.comm(), &req),
            "MPI_Ibcast of the parameters");
  ctx.wait(req, "the broadcast of the parameters");
  at = 0;
  for (const auto& p : params) {
    if (p.size() > 0) std::memcpy(p.value_data, flat.data() + at, static_cast<std::size_t>(p.size()) * sizeof(Scalar));
    at += static_cast<std::size_t>(p.size());
  }
}

template <typename Scalar>
bool any_nonfinite(const mpi_context& ctx, const parameter_list<Scalar>& params) {
  int flag = optim::find_nonfinite_grad(params) ? 1 : 0;
  MPI_Request req = MPI_REQUEST_NULL;
  ctx.check(MPI_Iallreduce(MPI_IN_PLACE, &flag, 1, MPI_INT, MPI_MAX, ctx.comm(), &req), "MPI_Iallreduce (non-finite)");
  ctx.wait(req, "the non-finite gradient check");
  return flag != 0;
}

inline double allreduce_sum(const mpi_context& ctx, double value, const char* what) {
  MPI_Request req = MPI_REQUEST_NULL;
  ctx.check(MPI_Iallreduce(MPI_IN_PLACE, &value, 1, MPI_DOUBLE, MPI_SUM, ctx.comm(), &req), what);
  ctx.wait(req, what);
  return value;
}

}  // namespace lora::dist
