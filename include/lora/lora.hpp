// <lora/lora.hpp>: the core of the library. Needs nothing but Eigen.
//
//   lora::linear<Scalar>   a frozen linear layer with named LoRA adapters (train, infer, merge)
//   lora::adapter<Scalar>  one adapter's factors, gradients and hyper-parameters
//   lora::parameter        the (value, grad) views optimizers work on
//   lora::parameter_report trainable-parameter and memory accounting
//   lora::error            the exception hierarchy
//
// Opt-in headers: <lora/optim.hpp> (optimizers, schedules, clipping), <lora/io/...> (files).
#pragma once

#include "accounting.hpp"
#include "adapter.hpp"
#include "config.hpp"
#include "error.hpp"
#include "linear.hpp"
#include "parameter.hpp"
#include "random.hpp"
