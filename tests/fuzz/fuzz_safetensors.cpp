// tests/fuzz/fuzz_safetensors.cpp: libFuzzer target for the safetensors reader. Any input must either
// open or raise lora::format_error; an opened file must read every tensor without crashing; and
// whatever opened must survive a round trip through the writer byte for byte, tensor by tensor.
//
//   clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude -I/usr/include/eigen3 \
//       tests/fuzz/fuzz_safetensors.cpp -o fuzz_safetensors
//   ./fuzz_safetensors -max_total_time=60 tests/fuzz/corpus_safetensors
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <lora/io/safetensors.hpp>
#include <vector>

namespace {

// Reads everything an application could read; conversions a dtype does not have are allowed to fail.
void read_everything(const lora::io::safetensors_file& file) {
  for (const auto& t : file.tensors()) {
    try {
      const lora::vector<float> v = file.read_vector<float>(t.name);
      if (static_cast<std::int64_t>(v.size()) != t.numel()) std::abort();
      if (t.rank() == 1 || t.rank() == 2) {
        const lora::matrix<double> m = file.read_matrix<double>(t.name);
        if (static_cast<std::int64_t>(m.size()) != t.numel()) std::abort();
      }
    } catch (const lora::dtype_error&) {
      if (lora::io::is_readable_as_real(t.type)) std::abort();
    }
    const lora::io::tensor_bytes raw = file.raw(t.name);
    if (raw.size() != t.byte_size()) std::abort();
  }
}

// Whatever the reader accepts, the writer must reproduce: same names, dtypes, shapes, bytes, metadata.
void check_round_trip(const lora::io::safetensors_file& file) {
  lora::io::safetensors_writer writer;
  for (const auto& t : file.tensors()) {
    const lora::io::tensor_bytes raw = file.raw(t.name);
    writer.add_raw(t.name, t.type, t.shape, raw.data(), raw.size());
  }
  writer.set_metadata(file.metadata());
  const auto again = lora::io::safetensors_file::from_bytes(writer.to_bytes());
  if (again.tensors().size() != file.tensors().size() || again.metadata() != file.metadata()) std::abort();
  for (const auto& t : file.tensors()) {
    const auto& u = again.info(t.name);
    const lora::io::tensor_bytes a = file.raw(t.name);
    const lora::io::tensor_bytes b = again.raw(t.name);
    if (u.type != t.type || u.shape != t.shape || a.size() != b.size()) std::abort();
    if (a.size() != 0 && std::memcmp(a.data(), b.data(), a.size()) != 0) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto file = lora::io::safetensors_file::from_bytes(std::vector<unsigned char>(data, data + size), "fuzz");
    read_everything(file);
    check_round_trip(file);
  } catch (const lora::format_error&) {
    // The expected outcome for almost every input.
  }
  return 0;
}
