// <lora/io.hpp>: every file format of the library (docs/CONVENTIONS.md §safetensors, §peft, §gguf). Needs
// nlohmann/json besides Eigen (link lora::io); POSIX only.
//
//   lora::io::safetensors_file, safetensors_writer, safetensors_stream_writer   safetensors files
//   lora::io::peft_config, peft_adapter_file, peft_adapter, attach             PEFT LoRA adapters
//   lora::io::merge_checkpoint                                                  PEFT's merge_and_unload
//   lora::io::combine_peft, combine_peft_dirs                                   PEFT's add_weighted_adapter
//   lora::io::save_checkpoint, load_checkpoint                                  training checkpoints
//   lora::io::write_file_atomically, atomic_file                                temporary, fsync, rename
//   lora::io::gguf_file, gguf_writer, read_gguf_lora, merge_gguf                llama.cpp's GGUF
#pragma once

#include "io/adapter_registry.hpp"
#include "io/atomic_file.hpp"
#include "io/checkpoint.hpp"
#include "io/gguf.hpp"
#include "io/gguf_lora.hpp"
#include "io/merge.hpp"
#include "io/peft.hpp"
#include "io/peft_combine.hpp"
#include "io/safetensors.hpp"
