// Every public and internal header under include/, in one translation unit, for scripts/lint.sh: clang-tidy
// sees each header's functions (templates included, instantiated or not) once. Not part of any build
// target; scripts/lint.sh fails when a header under include/ is missing from this list.
#include <lora/accounting.hpp>
#include <lora/adapter.hpp>
#include <lora/config.hpp>
#include <lora/conv2d.hpp>
#include <lora/dora.hpp>
#include <lora/detail/exact_merge.hpp>
#include <lora/detail/input_cache.hpp>
#include <lora/detail/layer_checks.hpp>
#include <lora/detail/linear_core.hpp>
#include <lora/detail/row_blocks.hpp>
#include <lora/embedding.hpp>
#include <lora/error.hpp>
#include <lora/init.hpp>
#include <lora/io/checkpoint.hpp>
#include <lora/io/detail/regex.hpp>
#include <lora/io/merge.hpp>
#include <lora/io/peft.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/layer.hpp>
#include <lora/linear.hpp>
#include <lora/lora.hpp>
#include <lora/merged_linear.hpp>
#include <lora/optim.hpp>
#include <lora/optim/adam.hpp>
#include <lora/optim/clip.hpp>
#include <lora/optim/grad_accumulator.hpp>
#include <lora/optim/lora_plus.hpp>
#include <lora/optim/optimizer.hpp>
#include <lora/optim/schedule.hpp>
#include <lora/optim/sgd.hpp>
#include <lora/optim/step_guard.hpp>
#include <lora/parameter.hpp>
#include <lora/random.hpp>
