// tests/fuzz/make_corpus_peft.cpp: writes the seed corpus of fuzz_peft (tests/fuzz/corpus_peft/), one
// file per kind of adapter the loader handles: each is a 4-byte little-endian config length, the
// adapter_config.json text, then the adapter_model.safetensors bytes.
//
//   g++ -std=c++17 -Iinclude -I/usr/include/eigen3 tests/fuzz/make_corpus_peft.cpp -o make_corpus_peft
//   ./make_corpus_peft tests/fuzz/corpus_peft
#include <cmath>
#include <cstdio>
#include <fstream>
#include <lora/io/peft.hpp>
#include <string>
#include <vector>

namespace {

namespace io = lora::io;

lora::matrix<double> filled(lora::index rows, lora::index cols, double seed) {
  lora::matrix<double> m(rows, cols);
  for (lora::index k = 0; k < m.size(); ++k) m.data()[k] = std::sin(seed + 0.37 * static_cast<double>(k));
  return m;
}

io::peft_module module(const std::string& path, lora::index r, lora::index in, lora::index out, double seed,
                       io::dtype type = io::dtype::f32) {
  io::peft_module m;
  m.path = path;
  m.a = filled(r, in, seed);
  m.b = filled(out, r, seed + 1);
  m.type = type;
  return m;
}

void write(const std::string& dir, const std::string& name, const std::string& config,
           const std::vector<unsigned char>& weights) {
  std::vector<unsigned char> out;
  for (int k = 0; k < 4; ++k) out.push_back(static_cast<unsigned char>(config.size() >> (8 * k)));
  out.insert(out.end(), config.begin(), config.end());
  out.insert(out.end(), weights.begin(), weights.end());
  std::ofstream file(dir + "/" + name, std::ios::binary | std::ios::trunc);
  file.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size()));
  if (!file) throw std::runtime_error("cannot write " + dir + "/" + name);
}

void write(const std::string& dir, const std::string& name, const io::peft_adapter& a) {
  write(dir, name, a.config.to_json(-1), a.safetensors_bytes());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fputs("usage: make_corpus_peft DIR\n", stderr);
    return 2;
  }
  const std::string dir = argv[1];

  // GPT-2 sequence classification: Conv1D (fan_in_fan_out), modules_to_save, a rank pattern.
  io::peft_adapter gpt2;
  gpt2.config.r = 2;
  gpt2.config.lora_alpha = 4;
  gpt2.config.fan_in_fan_out = true;
  gpt2.config.target_modules = std::vector<std::string>{"c_attn"};
  gpt2.config.rank_pattern = {{"h\\.1\\..*", 1}};
  gpt2.config.modules_to_save = {"score"};
  gpt2.config.task_type = "SEQ_CLS";
  gpt2.modules = {module("transformer.h.0.attn.c_attn", 2, 3, 4, 0.1),
                  module("transformer.h.1.attn.c_attn", 1, 3, 4, 0.2)};
  gpt2.full_tensors.push_back(io::peft_full_tensor::from_matrix("score.weight", filled(2, 4, 0.3)));
  write(dir, "gpt2_fan_in_fan_out.bin", gpt2);

  // Llama-style: rsLoRA, alpha_pattern, a target_modules regex, BF16 and F16 factors.
  io::peft_adapter llama;
  llama.config.r = 4;
  llama.config.lora_alpha = 8;
  llama.config.use_rslora = true;
  llama.config.target_modules = std::string(".*\\.(q|v)_proj");
  llama.config.alpha_pattern = {{"v_proj", 16}};
  llama.modules = {module("model.layers.0.self_attn.q_proj", 4, 4, 4, 0.4, io::dtype::bf16),
                   module("model.layers.0.self_attn.v_proj", 4, 4, 2, 0.5, io::dtype::f16)};
  write(dir, "llama_rslora_patterns.bin", llama);

  // DoRA magnitudes.
  io::peft_adapter dora;
  dora.config.r = 2;
  dora.config.use_dora = true;
  dora.modules = {module("encoder.layer.0.attention.query", 2, 3, 3, 0.6)};
  dora.modules[0].magnitude = filled(3, 1, 0.7).cwiseAbs();
  write(dir, "dora.bin", dora);

  // lora_bias and bias = "lora_only" with a saved bias tensor.
  io::peft_adapter bias;
  bias.config.r = 1;
  bias.config.lora_bias = true;
  bias.config.bias = "lora_only";
  bias.modules = {module("fc", 1, 2, 3, 0.8, io::dtype::f64)};
  bias.modules[0].b_bias = filled(3, 1, 0.9);
  bias.full_tensors.push_back(io::peft_full_tensor::from_matrix("fc.bias", filled(1, 3, 1.0)));
  bias.full_tensors.back().shape = {3};
  write(dir, "lora_bias.bin", bias);

  // An embedding adapter.
  io::peft_adapter embedding;
  embedding.config.r = 2;
  embedding.config.target_modules = std::vector<std::string>{"embed_tokens"};
  embedding.modules = {module("model.embed_tokens", 2, 5, 3, 1.1)};
  embedding.modules[0].embedding = true;
  write(dir, "embedding.bin", embedding);

  // No tensors; a config with every kind of key, unknown ones included.
  write(dir, "empty.bin",
        R"({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": null,
            "modules_to_save": null, "init_lora_weights": "gaussian", "task_type": null, "layers_to_transform": [0],
            "layer_replication": [[0, 2]], "unknown": {"nested": [1, 2, {"x": null}]}, "use_dora": false})",
        io::safetensors_writer().to_bytes());
  return 0;
}
