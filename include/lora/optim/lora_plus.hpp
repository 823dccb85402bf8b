// lora/optim/lora_plus.hpp: LoRA+ (Hayou, Ghosh & Yu 2024) as a configuration of any optimizer. With
// base learning rate eta, A factors (and dense weights) learn at eta and B factors and 1-D trainables
// (DoRA magnitudes, biases) at lambda * eta, as PEFT's create_loraplus_optimizer groups them
// ("lora_B" in the name or param.ndim == 1 goes to the lambda * eta group). PEFT's docs use lambda = 16.
//
// Differences from PEFT: there is no separate group for embedding B factors (PEFT gives them a fixed
// loraplus_lr_embedding = 1e-6), and weight decay is not switched off for 1-D parameters (PEFT's
// groupB_no_decay); with AdamW the decoupled decay of the lambda group is lambda * eta * weight_decay,
// as in PEFT's groupB.
#pragma once

#include <cmath>

#include "../error.hpp"
#include "optimizer.hpp"

namespace lora::optim {

/// PEFT's documented loraplus_lr_ratio.
inline constexpr double lora_plus_default_ratio = 16.0;

/// Sets the role multipliers of `opt` for LoRA+: lora_b and vector get `ratio`, lora_a and dense 1.
/// Schedules keep working: they set the base rate, the multipliers stay. Throws config_error unless
/// ratio is finite and > 0. Returns opt.
template <typename Scalar>
optimizer<Scalar>& apply_lora_plus(optimizer<Scalar>& opt, double ratio = lora_plus_default_ratio);

// ---------------------------------------------------------------------------------------------------

template <typename Scalar>
optimizer<Scalar>& apply_lora_plus(optimizer<Scalar>& opt, double ratio) {
  if (!(std::isfinite(ratio) && ratio > 0.0)) {
    throw config_error(detail::cat("LoRA+: the learning-rate ratio lambda must be finite and > 0, got ", ratio));
  }
  opt.set_lr_scale(param_role::lora_a, 1.0);
  opt.set_lr_scale(param_role::dense, 1.0);
  opt.set_lr_scale(param_role::lora_b, ratio);
  opt.set_lr_scale(param_role::vector, ratio);
  return opt;
}

}  // namespace lora::optim
