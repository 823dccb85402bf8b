// gpt2_small_check: GPT-2 small (124M parameters) end to end through the code path real checkpoints take,
// with the peak memory after each stage. Real GPT-2 files cannot be fetched here, so the weights are random
// with GPT-2 small's shape; they go through the same files a Hugging Face folder holds:
//   1. random weights saved as a Hugging Face GPT-2 folder (config.json + model.safetensors, F32);
//   2. loaded back with load_gpt2 (F32: the tensors are used in place from a copy-on-write mapping);
//   3. LoRA r = 8 on c_attn, c_proj, c_fc (all four projections), AdamW, `--steps` training steps of
//      `--batch` sequences of `--ctx` tokens;
//   4. evaluation: nll of one n_positions (1024) token window through the KV-cached inference path;
//   5. the adapter saved as a PEFT folder, reloaded onto a fresh model, and evaluated again (equal);
//   6. the base written as GGUF (llama.cpp's format, F32 and Q8_0, with a stand-in vocabulary of 50257
//      tokens), read back (F32: equal), and the adapter through GGUF and back to PEFT (equal).
// With --base-dtype D (nf4, q4_0, int8 ...) the projections are stored as D after stage 2 and their float
// tensors released (QLoRA's setting), and stage 6 (which exports the float base) is skipped. The peak RSS
// is reset after stage 2 either way, so that stages 3-5 report the peak of training and evaluation.
// Prints one line per stage (seconds, peak RSS so far) and exits 1 if a reloaded model or adapter disagrees.
//
// Usage: gpt2_small_check [--dir DIR] [--ctx 256] [--batch 4] [--steps 3] [--base-dtype f32]
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <lora/io/peft.hpp>
#include <lora/models/gpt2.hpp>
#include <lora/models/gpt2_gguf.hpp>
#include <lora/models/gpt2_io.hpp>
#include <lora/optim.hpp>
#include <string>
#include <vector>

namespace {

using lora::models::gpt2;
using clock_type = std::chrono::steady_clock;

/// The resident set's high-water mark (VmHWM), in GiB.
double peak_gib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) / (1024.0 * 1024.0);  // kB
  return 0;
}

/// Resets VmHWM to the current RSS (Linux: "5" to /proc/self/clear_refs).
void reset_peak() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
}

/// Bytes of the projections' frozen weights as the layers hold them.
double projection_mib(gpt2<float>& model) {
  double bytes = 0;
  for (auto& [path, layer] : model.named_layers())
    bytes += layer->is_quantized() ? static_cast<double>(layer->quantized_weight().storage_bytes())
                                   : 4.0 * static_cast<double>(layer->in_features() * layer->out_features());
  return bytes / (1024.0 * 1024.0);
}

void stage(const char* what, clock_type::time_point since) {
  const double s = std::chrono::duration<double>(clock_type::now() - since).count();
  std::printf("%-58s %8.2f s   peak RSS %6.2f GiB\n", what, s, peak_gib());
  std::fflush(stdout);
}

std::vector<std::int32_t> pseudo_text(std::size_t n, std::uint64_t seed) {
  lora::rng gen(seed);
  std::vector<std::int32_t> ids(n);
  for (auto& id : ids) id = static_cast<std::int32_t>(gen.below(50257));
  return ids;
}

}  // namespace

/// Stage 6: the base to GGUF (F32, Q8_0) and back, the adapter to a GGUF adapter and back to PEFT; true when
/// the F32 model and the adapter come back exact.
bool gguf_round_trip(const std::string& dir, const std::vector<std::int32_t>& window, double trained_nll) {
  namespace models = lora::models;
  auto t = clock_type::now();
  const auto base = models::load_gpt2<float>(dir + "/base");
  models::gguf_vocab vocab;  // GPT-2's own files are not available here: a stand-in of the same size
  for (int k = 0; k < 50256; ++k) vocab.tokens.push_back("t" + std::to_string(k));
  vocab.tokens.push_back("<|endoftext|>");
  vocab.eot = 50256;
  models::gpt2_gguf_writer(base.weights, vocab).write(dir + "/base.gguf");
  models::gpt2_gguf_options q8;
  q8.type = lora::io::ggml_type::q8_0;
  models::gpt2_gguf_writer(base.weights, vocab, q8).write(dir + "/base_q8_0.gguf");
  std::printf("   GGUF F32 %.1f MiB, Q8_0 %.1f MiB\n", std::filesystem::file_size(dir + "/base.gguf") / 1048576.0,
              std::filesystem::file_size(dir + "/base_q8_0.gguf") / 1048576.0);
  stage("6a. base written as GGUF (F32 and Q8_0)", t);

  t = clock_type::now();
  const auto adapter = lora::io::peft_adapter::load(dir + "/adapter");
  lora::io::write_gguf_lora(dir + "/adapter.gguf", "gpt2", models::gpt2_peft_to_gguf_modules(adapter, base.config));
  const lora::io::gguf_file base_file = lora::io::gguf_file::open(dir + "/base.gguf");
  const auto back = models::gpt2_gguf_lora_to_peft(
      lora::io::read_gguf_lora(lora::io::gguf_file::open(dir + "/adapter.gguf"), &base_file));
  gpt2<float> from_gguf(models::load_gpt2_gguf<float>(dir + "/base.gguf").weights);
  lora::io::attach(back, from_gguf.named_layers(), "default");
  auto cache = from_gguf.make_cache();
  const double nll = from_gguf.nll(window, cache);
  gpt2<float> q(models::load_gpt2_gguf<float>(dir + "/base_q8_0.gguf").weights);
  lora::io::attach(back, q.named_layers(), "default");
  auto cache_q = q.make_cache();
  const double nll_q = q.nll(window, cache_q);
  std::printf("   GGUF base + GGUF adapter: %.6f nats/token (trained: %.6f); Q8_0 base: %.6f\n", nll / 1023,
              trained_nll / 1023, nll_q / 1023);
  stage("6b. read back; adapter -> GGUF -> PEFT; evaluated", t);
  return std::abs(nll - trained_nll) <= 1e-5 * std::abs(trained_nll);
}

int main(int argc, char** argv) {
  std::string dir = "build/gpt2_small_check";
  lora::index ctx = 256, batch = 4;
  int steps = 3;
  lora::quant::qtype storage = lora::quant::qtype::f32;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::printf("usage: gpt2_small_check [--dir DIR] [--ctx N] [--batch N] [--steps N] [--base-dtype D]\n");
      return 0;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "gpt2_small_check: '%s' needs a value (try --help)\n", a.c_str());
      return 2;
    }
    const std::string v = argv[++i];
    if (a == "--dir")
      dir = v;
    else if (a == "--ctx")
      ctx = std::atol(v.c_str());
    else if (a == "--batch")
      batch = std::atol(v.c_str());
    else if (a == "--steps")
      steps = std::atoi(v.c_str());
    else if (a == "--base-dtype")
      try {
        storage = lora::quant::parse_qtype(v);
      } catch (const lora::error& e) {
        std::fprintf(stderr, "gpt2_small_check: --base-dtype: %s\n", e.what());
        return 2;
      }
    else {
      std::fprintf(stderr, "gpt2_small_check: unknown flag '%s' (try --help)\n", a.c_str());
      return 2;
    }
  }
  auto t = clock_type::now();
  lora::models::save_gpt2(dir + "/base", lora::models::gpt2_weights<float>::random(lora::models::gpt2_small(), 1));
  stage("1. random GPT-2 small saved as a Hugging Face folder", t);

  t = clock_type::now();
  auto ckpt = lora::models::load_gpt2<float>(dir + "/base");
  gpt2<float> model(std::move(ckpt.weights));
  std::printf("   %lld parameters, F32 tensors used in place: %s\n",
              static_cast<long long>(model.config().num_parameters()), model.weights().owns_storage() ? "no" : "yes");
  stage("2. loaded with load_gpt2", t);
  if (storage != lora::quant::qtype::f32) {
    t = clock_type::now();
    const double before = projection_mib(model);
    model.set_base_storage(storage);
    std::printf("   projections %.1f MiB -> %.1f MiB (%s); float tensors released\n", before, projection_mib(model),
                lora::quant::qtype_name(storage));
    stage("2b. projections quantized", t);
  }
  reset_peak();  // stages 3-5: the peak of training and evaluation (F32: the mapped tensors as they are touched)
  std::printf("   peak RSS reset to the current RSS (%.2f GiB)\n", peak_gib());

  t = clock_type::now();
  model.add_adapter("default", {8, 16.0}, {"c_attn", "c_proj", "c_fc"});
  lora::optim::adamw<float> opt(model.parameters());
  const auto text = pseudo_text(static_cast<std::size_t>(batch * ctx + 1), 2);
  const std::vector<std::int32_t> in(text.begin(), text.end() - 1), target(text.begin() + 1, text.end());
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    const double loss = model.forward_backward(in, target, batch, ctx);
    opt.step();
    std::printf("   step %d: loss %.4f nats/token\n", s + 1, loss);
  }
  stage("3. LoRA r=8 training steps (c_attn, c_proj, c_fc)", t);

  t = clock_type::now();
  const auto window = pseudo_text(1024, 3);
  auto cache = model.make_cache();
  const double nll = model.nll(window, cache);
  std::printf("   %.4f nats/token over 1023 predictions\n", nll / 1023);
  stage("4. evaluated one 1024-token window (KV-cached inference)", t);

  t = clock_type::now();
  lora::io::peft_config base;
  base.fan_in_fan_out = true;
  base.task_type = "CAUSAL_LM";
  base.base_model_name_or_path = dir + "/base";
  lora::io::peft_adapter::from_layers(model.named_layers(), "default", base).save(dir + "/adapter");
  gpt2<float> fresh(lora::models::load_gpt2<float>(dir + "/base").weights);
  fresh.set_base_storage(storage);
  lora::io::attach(lora::io::peft_adapter::load(dir + "/adapter"), fresh.named_layers(), "default");
  auto cache2 = fresh.make_cache();
  const double nll2 = fresh.nll(window, cache2);
  std::printf("   reloaded adapter: %.6f nats/token (trained: %.6f)\n", nll2 / 1023, nll / 1023);
  stage("5. adapter saved as PEFT, reloaded onto a fresh model, evaluated", t);
  const bool peft_ok = std::abs(nll2 - nll) <= 1e-5 * std::abs(nll);
  const bool gguf_ok = storage != lora::quant::qtype::f32 || gguf_round_trip(dir, window, nll);
  return peft_ok && gguf_ok ? 0 : 1;
}
