// lora/io/gguf.hpp: GGUF, the file format of llama.cpp and ggml (docs/CONVENTIONS.md §gguf): reading
// (io/gguf_reader.hpp), writing (io/gguf_writer.hpp), metadata values (io/gguf_value.hpp) and ggml's
// tensor types, quantized ones included (io/ggml_types.hpp). Needs nothing but Eigen.
//
// A file, all little-endian:
//   "GGUF" | version u32 (3) | tensor_count u64 | kv_count u64
//   kv_count x  { key: string | value type u32 | value }            string = u64 length + bytes
//   tensor_count x { name: string | n_dims u32 | ne[n_dims] u64 | ggml type u32 | offset u64 }
//   zero padding to general.alignment (default 32)
//   data: each tensor at its offset (from here), in info order, each padded to the alignment
// ne[0] is the contiguous extent: a PyTorch tensor of shape [out, in] has ne = [in, out]. Quantized
// types store blocks along ne[0] (Q8_0 and Q4_0: 32 elements per block).
//
//   auto f = lora::io::gguf_file::open("model.gguf");
//   auto arch = f.get_string("general.architecture");
//   lora::matrix<float> w = f.read_matrix<float>("blk.0.attn_qkv.weight");   // 3d x d, dequantized
#pragma once

#include "ggml_types.hpp"
#include "gguf_reader.hpp"
#include "gguf_value.hpp"
#include "gguf_writer.hpp"
