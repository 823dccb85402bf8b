// lora/parameter.hpp: the view through which optimizers, clipping, checkpoints and accounting see
// trainable tensors. Layers own their parameters and gradients; a parameter is a non-owning,
// named (value, grad) pair of equal size, flat in memory (each tensor is contiguous).
#pragma once

#include <Eigen/Core>
#include <string>
#include <vector>

#include "config.hpp"

namespace lora {

/// What a trainable tensor is, so that optimizers can treat groups differently (LoRA+ gives
/// lora_b and vector parameters lambda times the learning rate of lora_a).
enum class param_role {
  lora_a,  ///< A factor, r x in.
  lora_b,  ///< B factor, out x r.
  vector,  ///< A 1-D trainable: DoRA magnitude, bias.
  dense,   ///< A full weight being fine-tuned (full or head-only fine-tuning).
};

/// Human-readable role name.
inline const char* to_string(param_role role) {
  switch (role) {
    case param_role::lora_a:
      return "lora_a";
    case param_role::lora_b:
      return "lora_b";
    case param_role::vector:
      return "vector";
    case param_role::dense:
      return "dense";
  }
  return "unknown";
}

/// A named (value, grad) pair. value and grad point to rows*cols contiguous scalars owned by a
/// layer; the view stays valid while the layer and its adapter exist and are not reshaped.
template <typename Scalar_>
struct parameter {
  using Scalar = Scalar_;
  using flat_map = Eigen::Map<vector<Scalar>>;

  std::string name;  ///< Unique within a model, e.g. "fc1.default.lora_A".
  param_role role = param_role::dense;
  Scalar* value_data = nullptr;
  Scalar* grad_data = nullptr;
  index rows = 0;
  index cols = 0;

  index size() const noexcept { return rows * cols; }
  flat_map value() const { return flat_map(value_data, size()); }
  flat_map grad() const { return flat_map(grad_data, size()); }
};

/// A list of parameters, as layers hand them out and optimizers take them.
template <typename Scalar>
using parameter_list = std::vector<parameter<Scalar>>;

/// Appends every parameter of each source (anything with parameters() returning a parameter_list).
template <typename Scalar, typename... Sources>
parameter_list<Scalar> collect_parameters(Sources&... sources) {
  parameter_list<Scalar> out;
  (
      [&] {
        auto ps = sources.parameters();
        out.insert(out.end(), ps.begin(), ps.end());
      }(),
      ...);
  return out;
}

}  // namespace lora
