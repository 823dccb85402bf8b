// tests/fuzz/fuzz_peft.cpp: libFuzzer target for the PEFT adapter loader (<lora/io/peft.hpp>).
//
// Input: a 4-byte little-endian length L, then L bytes of adapter_config.json, then the bytes of
// adapter_model.safetensors (L is clamped to what is there). Any input must either load or raise a
// lora::error; whatever loads must be valid, survive a save/load round trip with the same values
// (NaN payloads aside) and config, give finite scalings, attach to matching lora::linear layers all or
// nothing, and come back from those layers unchanged.
//
//   clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude -I/usr/include/eigen3 \
//       tests/fuzz/fuzz_peft.cpp -o fuzz_peft
//   ./fuzz_peft -max_total_time=60 -timeout=10 tests/fuzz/corpus_peft
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <list>
#include <lora/io/peft.hpp>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace {

namespace io = lora::io;

void require(bool ok) {
  if (!ok) std::abort();
}

bool same_values(const lora::matrix<double>& x, const lora::matrix<double>& y) {
  if (x.rows() != y.rows() || x.cols() != y.cols()) return false;
  for (lora::index k = 0; k < x.size(); ++k) {
    const double a = x.data()[k], b = y.data()[k];
    if (!(a == b || (std::isnan(a) && std::isnan(b)))) return false;
  }
  return true;
}

void check_same(const io::peft_adapter& a, const io::peft_adapter& b) {
  require(a.modules.size() == b.modules.size() && a.full_tensors.size() == b.full_tensors.size());
  for (std::size_t k = 0; k < a.modules.size(); ++k) {
    const io::peft_module &x = a.modules[k], &y = b.modules[k];
    require(x.path == y.path && x.embedding == y.embedding && x.type == y.type);
    require(same_values(x.a, y.a) && same_values(x.b, y.b));
    require(same_values(x.b_bias, y.b_bias) && same_values(x.magnitude, y.magnitude));
  }
  for (std::size_t k = 0; k < a.full_tensors.size(); ++k) {
    const io::peft_full_tensor &x = a.full_tensors[k], &y = b.full_tensors[k];
    require(x.path == y.path && x.type == y.type && x.shape == y.shape && x.size() == y.size());
  }
}

// Layers shaped for every plain LoRA module, attached, then read back into a new adapter.
void check_layers(const io::peft_adapter& a) {
  std::list<lora::linear<double>> storage;
  std::map<std::string, lora::linear<double>*> layers;
  for (const io::peft_module& m : a.modules) {
    if (m.embedding || m.b_bias.size() != 0 || m.magnitude.size() != 0) return;
    if (m.in_features() * m.out_features() > (1 << 16)) return;
    storage.emplace_back(lora::matrix<double>::Zero(m.out_features(), m.in_features()), m.path);
    layers.emplace(m.path, &storage.back());
  }
  try {
    io::attach(a, layers, "fuzz");
  } catch (const lora::error&) {
    // Refused as a whole (alpha <= 0, dropout 1, paths that match ambiguously ...): nothing changed.
    for (const auto& entry : layers) require(!entry.second->has_adapter("fuzz"));
    return;
  }
  for (const auto& entry : layers) require(entry.second->has_adapter("fuzz"));
  std::map<std::string, const lora::linear<double>*> by_module;
  for (const io::peft_module& m : a.modules) {
    lora::linear<double>* layer = layers.at(m.path);
    require(same_values(layer->adapter("fuzz").a(), m.a) && same_values(layer->adapter("fuzz").b(), m.b));
    by_module.emplace(m.path, layer);
  }
  if (by_module.empty()) return;
  const io::peft_adapter back = io::peft_adapter::from_layers(by_module, "fuzz", a.config);
  for (const io::peft_module& m : back.modules) {
    const io::peft_module* original = a.find(m.path);
    require(original != nullptr && same_values(m.a, original->a) && same_values(m.b, original->b));
    require(back.config.rank_for(m.path) == original->rank());
  }
}

void exercise(const io::peft_adapter& a) {
  a.validate();  // what loads is valid
  for (const io::peft_module& m : a.modules) {
    require(a.config.rank_for(m.path) == m.rank());
    require(std::isfinite(a.config.scaling_for(m.path)));
    (void)a.config.targets(m.path);
  }
  // Round trip: the first save may canonicalise NaN payloads; values and config survive, and a second
  // round trip is byte-identical.
  const std::string json = a.config.to_json();
  const std::vector<unsigned char> bytes = a.safetensors_bytes();
  const io::peft_adapter b = io::peft_adapter::from_memory(json, bytes);
  check_same(a, b);
  require(b.config.to_json() == json);
  const std::vector<unsigned char> again = b.safetensors_bytes();
  require(io::peft_adapter::from_memory(json, again).safetensors_bytes() == again);
  check_layers(a);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 4) return 0;
  const std::uint32_t declared = static_cast<std::uint32_t>(data[0]) | static_cast<std::uint32_t>(data[1]) << 8 |
                                 static_cast<std::uint32_t>(data[2]) << 16 | static_cast<std::uint32_t>(data[3]) << 24;
  const std::size_t length = std::min<std::size_t>(declared, size - 4);
  const std::string_view config(reinterpret_cast<const char*>(data + 4), length);
  std::vector<unsigned char> weights(data + 4 + length, data + size);
  io::peft_adapter adapter;
  try {
    adapter = io::peft_adapter::from_memory(config, std::move(weights));
  } catch (const lora::error&) {
    return 0;  // the expected outcome for most inputs
  }
  try {
    exercise(adapter);
  } catch (const lora::error&) {
    std::abort();  // a loaded adapter must save, reload and attach without errors (attach refusals aside)
  }
  return 0;
}
