// lora/models/parallel.hpp: the threads of the model's own loops (LayerNorm, GELU, the LM head's softmax):
// the library's fork-join threads of lora/detail/parallel.hpp under the names the models use.
#pragma once

#include "../detail/parallel.hpp"

namespace lora::models {

using lora::num_threads;
using lora::set_num_threads;

namespace detail {
using lora::detail::parallel_for;
using lora::detail::parallel_parts;
using lora::detail::thread_setting;
using lora::detail::threads_from_environment;
}  // namespace detail

}  // namespace lora::models
