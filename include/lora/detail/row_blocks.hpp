// lora/detail/row_blocks.hpp: k equal blocks of rows of one frozen weight, each a lora::linear viewing its
// block of the same memory. merged_linear's slices (q | k | v) and conv2d's groups are built this way, so
// that each block trains, merges (bit-exactly) and reports as a linear layer without copying the weight.
#pragma once

#include <string>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../linear.hpp"

namespace lora::detail {

/// Views rows [i m, (i+1) m) of W (out x in, m = out / k) as linear i, for i < k. `stored` is the memory of
/// W (out x in), or of Wᵀ (in x out) with weight_layout::in_out: a column-major or row-major Ref with unit
/// inner stride, whose blocks are again such Refs. Linear i is named "<name>.<i>", or `name` when k = 1.
/// out must be divisible by k (callers check it, to word the message for their layer).
template <typename Scalar, typename StoredRef>
std::vector<linear<Scalar>> row_blocks(StoredRef stored, weight_layout layout, index k, const std::string& name) {
  const bool in_out = layout == weight_layout::in_out;
  const index out = in_out ? stored.cols() : stored.rows();
  LORA_ASSERT(k > 0 && out % k == 0);
  const index m = out / k;
  std::vector<linear<Scalar>> blocks;
  blocks.reserve(static_cast<std::size_t>(k));
  for (index i = 0; i < k; ++i) {
    StoredRef rows = in_out ? StoredRef(stored.middleCols(i * m, m)) : StoredRef(stored.middleRows(i * m, m));
    blocks.emplace_back(view, rows, k == 1 ? name : cat(name, ".", i), layout);
  }
  return blocks;
}

}  // namespace lora::detail
