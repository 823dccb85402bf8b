// lora/io/safetensors.hpp: the safetensors format (Hugging Face), the file format of PEFT adapters and
// of most checkpoints: reading (safetensors_file) and writing (safetensors_writer,
// safetensors_stream_writer). docs/CONVENTIONS.md §safetensors has the full description.
//
// Layout of a file of S bytes:
//   [0, 8)       N, unsigned 64-bit little-endian: the length of the header, N <= 100,000,000.
//   [8, 8+N)     a UTF-8 JSON object, possibly followed by spaces (the reference writer pads N to a
//                multiple of 8):
//                  {"__metadata__": {"<key>": "<value>", ...},          (optional, string -> string)
//                   "<name>": {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}
//   [8+N, S)     the data area. Tensor t occupies bytes [8+N+begin, 8+N+end) (end exclusive): its
//                prod(shape) elements, little-endian, row-major (C order; the last index varies
//                fastest). Sorted by begin, the tensors tile the data area exactly: the first begins
//                at 0, each begins where the previous ended, and the last ends at S - 8 - N.
//
// The pieces, one concept per header:
//   io/dtype.hpp               element types, sizes, names
//   io/tensor_info.hpp         name, dtype, shape and byte range of one tensor
//   io/detail/codec.hpp        number formats (F16, BF16, F8 ...) and little-endian loads and stores
//   io/file_storage.hpp        the bytes of a file: memory-mapped, or bounded pread()
//   io/atomic_file.hpp         temporary, fsync, rename: files are replaced, never rewritten in place
//   io/safetensors_reader.hpp  safetensors_file: validated at open, read tensor by tensor
//   io/safetensors_writer.hpp  safetensors_writer (in memory), safetensors_stream_writer (streaming)
//
// POSIX only (Linux, macOS).
#pragma once

#include "safetensors_reader.hpp"
#include "safetensors_writer.hpp"
