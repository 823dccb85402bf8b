// lora/dist/shard.hpp: which samples of a global batch each rank computes. Needs no MPI (part of
// <lora/dist/mpi.hpp>; docs/CONVENTIONS.md §dist).
//
// Rule: rank r of S takes a contiguous block of the N global samples. With q = N / S and e = N % S,
// ranks 0..e-1 take q + 1 samples and the others q; rank r starts at r*q + min(r, e). Concatenating the
// blocks of ranks 0..S-1 gives the global batch in its order, whatever S is. weight() = n_r / N is the
// share of rank r in a mean over the global batch: if every rank's loss is the mean over its own block,
// the global mean loss is sum_r (n_r / N) L_r, and so is its gradient.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "../error.hpp"

namespace lora::dist {

/// The block [begin, end) of a global batch of `global` samples that one rank computes.
struct shard_range {
  std::size_t begin = 0;
  std::size_t end = 0;
  std::size_t global = 0;

  std::size_t size() const noexcept { return end - begin; }
  bool empty() const noexcept { return end == begin; }
  /// n_r / N: this block's share of a mean over the global batch (0 when the global batch is empty).
  double weight() const noexcept {
    return global == 0 ? 0.0 : static_cast<double>(size()) / static_cast<double>(global);
  }
};

/// Rank `rank`'s block of `global_count` samples among `size` ranks (rule above). config_error unless
/// 0 <= rank < size.
inline shard_range shard(std::size_t global_count, int rank, int size);

/// The elements of `global_batch` (sample indices, rows, anything) in rank `rank`'s block.
template <typename T>
std::vector<T> shard(const std::vector<T>& global_batch, int rank, int size);

// ---------------------------------------------------------------------------------------------------

inline shard_range shard(std::size_t global_count, int rank, int size) {
  if (size < 1 || rank < 0 || rank >= size) {
    throw config_error(
        lora::detail::cat("dist::shard: rank must be in [0, size) with size >= 1, got rank ", rank, " of size ", size));
  }
  const auto r = static_cast<std::size_t>(rank);
  const auto s = static_cast<std::size_t>(size);
  const std::size_t q = global_count / s, e = global_count % s;
  shard_range out;
  out.begin = r * q + (r < e ? r : e);
  out.end = out.begin + q + (r < e ? 1 : 0);
  out.global = global_count;
  return out;
}

template <typename T>
std::vector<T> shard(const std::vector<T>& global_batch, int rank, int size) {
  const shard_range range = shard(global_batch.size(), rank, size);
  const auto first = global_batch.begin() + static_cast<std::ptrdiff_t>(range.begin);
  return std::vector<T>(first, first + static_cast<std::ptrdiff_t>(range.size()));
}

}  // namespace lora::dist
