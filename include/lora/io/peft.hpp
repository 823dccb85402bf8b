// lora/io/peft.hpp: Hugging Face PEFT LoRA adapters (docs/CONVENTIONS.md §peft): the adapter_config.json
// schema, the tensors of adapter_model.safetensors, and the bridge to the library's layers.
//
// The pieces, one concept per header:
//   io/peft_config.hpp   adapter_config.json: schema, parse, validate, to_json, effective rank/alpha
//   io/module_match.hpp  which modules a name or pattern picks (target_modules, rank_pattern, suffixes)
//   io/peft_file.hpp     adapter_model.safetensors and the adapter directory: peft_adapter_file,
//                        peft_adapter (load, save, validate)
//   io/peft_layers.hpp   peft_adapter::from_layers and attach(adapter, layers, name)
//
// POSIX only, like io/safetensors.hpp.
#pragma once

#include "module_match.hpp"
#include "peft_config.hpp"
#include "peft_file.hpp"
#include "peft_layers.hpp"
