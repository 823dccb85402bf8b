// tests/fuzz/fuzz_gguf.cpp: libFuzzer target for the GGUF reader. Any input must either open or raise
// lora::format_error; an opened file must read every tensor (or refuse a type it does not convert with
// dtype_error / a tensor of more than two dimensions as a matrix with shape_error); and whatever opened
// must survive a round trip through the writer: same metadata, same tensors, same bytes.
//
//   clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude -I/usr/include/eigen3 \
//       tests/fuzz/fuzz_gguf.cpp -o fuzz_gguf
//   ./fuzz_gguf -max_total_time=60 tests/fuzz/corpus_gguf
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <lora/io/gguf.hpp>
#include <vector>

namespace {

void read_everything(const lora::io::gguf_file& file) {
  for (const auto& t : file.tensors()) {
    try {
      const lora::vector<float> v = file.read_vector<float>(t.name);
      if (static_cast<std::uint64_t>(v.size()) != t.numel()) std::abort();
      if (t.effective_ne().size() <= 2 && file.read_matrix<double>(t.name).size() != v.size()) std::abort();
    } catch (const lora::dtype_error&) {
      if (lora::io::ggml_is_convertible(t.type)) std::abort();
    }
    if (file.raw(t.name).size() != t.byte_size) std::abort();
  }
  for (const auto& kv : file.metadata()) (void)kv.second.to_display_string();
}

void check_round_trip(const lora::io::gguf_file& file) {
  lora::io::gguf_writer writer;
  for (const auto& [key, value] : file.metadata()) writer.set(key, value);
  for (const auto& t : file.tensors()) {
    const lora::io::tensor_bytes raw = file.raw(t.name);
    writer.add_raw(t.name, t.type, t.ne, raw.data(), raw.size());
  }
  const auto again = lora::io::gguf_file::from_bytes(writer.to_bytes());
  if (again.metadata() != file.metadata() || again.tensors().size() != file.tensors().size()) std::abort();
  for (const auto& t : file.tensors()) {
    const auto& u = again.info(t.name);
    const lora::io::tensor_bytes a = file.raw(t.name);
    const lora::io::tensor_bytes b = again.raw(t.name);
    if (u.type != t.type || u.ne != t.ne || a.size() != b.size()) std::abort();
    if (a.size() != 0 && std::memcmp(a.data(), b.data(), a.size()) != 0) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto file = lora::io::gguf_file::from_bytes(std::vector<unsigned char>(data, data + size), "fuzz");
    read_everything(file);
    check_round_trip(file);
  } catch (const lora::format_error&) {
    // The expected outcome for almost every input.
  }
  return 0;
}
