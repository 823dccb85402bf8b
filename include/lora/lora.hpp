// <lora/lora.hpp>: the core of the library. Needs nothing but Eigen.
//
//   lora::linear<Scalar>   a frozen linear layer with named LoRA adapters (train, infer, merge)
//   lora::embedding, lora::merged_linear, lora::conv2d   the same for embeddings, fused QKV, convolutions
//   lora::layer_base       the adapter API every layer gets from one place; lora::is_lora_layer_v<T>
//   lora::adapter<Scalar>  one adapter's factors (shape-safe views), gradients and hyper-parameters
//   lora::adapter_routing  a batch whose rows use different adapters (PEFT's adapter_names): infer(x, routing)
//   lora::add_weighted_adapter, combine_factors   adapter arithmetic (PEFT's add_weighted_adapter; Eigen's SVD)
//   lora::parameter        the (value, grad) views optimizers work on
//   lora::parameter_report trainable-parameter and memory accounting
//   lora::error            the exception hierarchy
//
// Opt-in headers: <lora/optim.hpp> (optimizers, schedules, clipping), <lora/init.hpp> (PiSSA, OLoRA:
// Eigen's SVD and QR), <lora/io/...> (files; nlohmann/json).
#pragma once

#include "accounting.hpp"
#include "adapter.hpp"
#include "adapter_routing.hpp"
#include "combine.hpp"
#include "config.hpp"
#include "conv2d.hpp"
#include "dora.hpp"
#include "embedding.hpp"
#include "error.hpp"
#include "layer.hpp"
#include "linear.hpp"
#include "merged_linear.hpp"
#include "parameter.hpp"
#include "random.hpp"
