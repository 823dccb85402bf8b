// bench_gpt2_step: one full LoRA (or full fine-tuning) training step of GPT-2 small in this library:
// zero_grad, forward + backward (lora::models::gpt2::forward_backward, loss over all B·T positions),
// AdamW over the trainable parameters. The counterpart of benchmarks/torch_gpt2_step.py; scripts/bench_gpt2.sh
// runs the two as separate processes, at each thread count, and tabulates them side by side.
//
// Weights are random (gpt2_weights::random, GPT-2's initialisation) and frozen; LoRA as PEFT applies it
// with target_modules = ["c_attn", "c_proj", "c_fc"] (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj),
// r = 8, alpha = 16, dropout 0, PEFT's initialisation; AdamW with lr 1e-4 and torch's defaults otherwise.
//
// Reports the median step time after --warmup untimed steps as tokens/s (B·T / median), the process's peak
// RSS (getrusage ru_maxrss, model construction included), the machine's load average before the first step and where
// the time goes: the model's own per-phase profile (embedding, projections' GEMMs, attention, pointwise:
// LayerNorm/GELU/bias/residual, LM head with softmax cross-entropy) and the optimizer, as milliseconds per step
// averaged over the timed steps. Threads: OpenBLAS reads OPENBLAS_NUM_THREADS when the program loads (1 unless set);
// scripts/bench_gpt2.sh sets it.
//
// --base-dtype D stores the projections as D (nf4, q4_0, int8 ...: gpt2::set_base_storage, their float tensors
// released) before the adapters are added; the run then also reports the peak RSS of the steps alone
// ("train peak": VmHWM reset after setup), since construction held the float weights first.
//
// Usage: bench_gpt2_step [--ctx 256] [--batch 4] [--steps 10] [--warmup 2] [--full] [--rank 8] [--layers 12]
//                        [--base-dtype f32] [--no-profile] [--json OUT]
#include <sys/resource.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <lora/lora.hpp>
#include <lora/models/gpt2.hpp>
#include <lora/optim.hpp>
#include <string>
#include <utility>
#include <vector>

#include "bench_common.hpp"

namespace {

using lora_bench::median;
using lora_bench::seconds;

struct options {
  lora::index ctx = 256, batch = 4, rank = 8, layers = 12;
  int steps = 10, warmup = 2;
  bool full = false, profile = true;
  std::string json;
  lora::quant::qtype storage = lora::quant::qtype::f32;
};

[[noreturn]] void usage(const std::string& bad) {
  std::cerr << "bench_gpt2_step: unknown or incomplete argument '" << bad
            << "'\nusage: bench_gpt2_step [--ctx N] [--batch N] [--steps N] [--warmup N] [--full] [--rank N] "
               "[--layers N] [--base-dtype D] [--no-profile] [--json OUT]\n";
  std::exit(2);
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(a);
      return argv[++i];
    };
    if (a == "--ctx")
      o.ctx = std::stol(value());
    else if (a == "--batch")
      o.batch = std::stol(value());
    else if (a == "--steps")
      o.steps = std::stoi(value());
    else if (a == "--warmup")
      o.warmup = std::stoi(value());
    else if (a == "--rank")
      o.rank = std::stol(value());
    else if (a == "--layers")
      o.layers = std::stol(value());
    else if (a == "--json")
      o.json = value();
    else if (a == "--base-dtype")
      try {
        o.storage = lora::quant::parse_qtype(value());
      } catch (const lora::error&) {
        usage(a);
      }
    else if (a == "--full")
      o.full = true;
    else if (a == "--no-profile")
      o.profile = false;
    else
      usage(a);
  }
  if (o.steps < 1 || o.warmup < 0) usage("--steps/--warmup");
  return o;
}

/// OPENBLAS_NUM_THREADS, 1 unless set.
int threads() {
  const char* env = std::getenv("OPENBLAS_NUM_THREADS");
  return env ? std::max(1, std::atoi(env)) : 1;
}

/// Peak resident set of this process in MiB (ru_maxrss is KiB on Linux).
double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

/// The resident set's high-water mark in MiB (VmHWM, which reset_peak() lowers to the current RSS).
double hwm_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::atof(line.c_str() + 6) / 1024.0;  // kB
  return 0;
}
void reset_peak() { std::ofstream("/proc/self/clear_refs") << "5"; }

/// batch·ctx ids uniform in [0, vocab).
std::vector<std::int32_t> random_ids(lora::index count, lora::index vocab, std::uint64_t seed) {
  lora::rng gen(seed);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(count));
  for (auto& id : ids) id = static_cast<std::int32_t>(gen.below(static_cast<std::uint64_t>(vocab)));
  return ids;
}

std::string json_number(double x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", x);
  return buf;
}

/// What one run measured.
struct result {
  double load_avg_start = -1;  ///< The machine's 1-minute load average before the first step (-1: unknown).
  double step_median_s = 0, step_min_s = 0, tokens_per_s = 0, peak_rss_mib = 0;
  double train_peak_rss_mib = 0;  ///< VmHWM after a reset once the model was set up: the steps' own peak
  lora::index trainable = 0;
  std::vector<std::pair<std::string, double>> breakdown_ms;  ///< ms per step, averaged over the timed steps
};

/// GPT-2 with random frozen weights and either LoRA on the four projections or full fine-tuning.
void configure(lora::models::gpt2<float>& model, const options& o) {
  model.set_base_storage(o.storage);
  if (o.full) {
    model.set_base_training(lora::models::gpt2_base_training::full);
  } else {
    lora::adapter_config ac;  // PEFT's initialisation, dropout 0
    ac.rank = o.rank;
    ac.alpha = 2.0 * static_cast<double>(o.rank);
    model.add_adapter("default", ac, {"c_attn", "c_proj", "c_fc"});  // c_proj: attn.c_proj and mlp.c_proj
  }
  model.train(true);
}

/// Warm-up steps, then the timed ones: zero_grad, forward_backward, AdamW.
result run(lora::models::gpt2<float>& model, const options& o) {
  lora::parameter_list<float> params = model.parameters();
  lora::optim::adamw_options ao;
  ao.lr = 1e-4;
  lora::optim::adamw<float> opt(params, ao);
  result res;
  for (const auto& p : params) res.trainable += p.size();
  double load[1];
  if (getloadavg(load, 1) == 1) res.load_avg_start = load[0];

  reset_peak();
  const lora::index vocab = model.config().vocab_size;
  const auto tokens = random_ids(o.batch * o.ctx, vocab, 2), targets = random_ids(o.batch * o.ctx, vocab, 3);
  double t_opt = 0.0;
  const auto step = [&] {
    model.zero_grad();
    model.forward_backward(tokens, targets, o.batch, o.ctx);
    t_opt += seconds([&] { opt.step(); });
  };
  for (int i = 0; i < o.warmup; ++i) step();
  t_opt = 0.0;
  if (o.profile) model.set_profiling(true);  // resets the per-phase timer
  std::vector<double> times;
  for (int i = 0; i < o.steps; ++i) times.push_back(seconds(step));
  res.step_median_s = median(times);
  res.step_min_s = *std::min_element(times.begin(), times.end());
  res.tokens_per_s = static_cast<double>(o.batch * o.ctx) / res.step_median_s;
  res.peak_rss_mib = peak_rss_mib();
  res.train_peak_rss_mib = hwm_mib();
  if (o.profile) {
    const auto& p = model.profile();
    const double k = 1e3 / o.steps;  // the profile sums the timed steps
    double all = 0.0;
    for (double t : times) all += t;
    res.breakdown_ms = {{"embedding", k * p.embed},
                        {"projections (GEMMs + adapters)", k * p.gemm},
                        {"attention (scores, softmax)", k * p.attention},
                        {"LayerNorm, GELU, bias, residual", k * p.pointwise},
                        {"LM head + cross-entropy", k * p.head},
                        {"optimizer (AdamW)", k * t_opt},
                        {"rest (zero_grad, untimed)", std::max(0.0, k * (all - p.total() - t_opt))}};
  }
  return res;
}

/// The same fields as benchmarks/torch_gpt2_step.py writes, plus breakdown_ms.
bool write_json(const std::string& path, const options& o, const result& r) {
  std::ofstream f(path);
  f << "{\n  \"contender\": \"ours\",\n  \"mode\": \"" << (o.full ? "full" : "lora")
    << "\",\n  \"threads\": " << threads() << ",\n  \"ctx\": " << o.ctx << ",\n  \"batch\": " << o.batch
    << ",\n  \"layers\": " << o.layers << ",\n  \"rank\": " << (o.full ? std::string("null") : std::to_string(o.rank))
    << ",\n  \"warmup\": " << o.warmup << ",\n  \"steps\": " << o.steps << ",\n  \"trainable_params\": " << r.trainable
    << ",\n  \"step_s_median\": " << json_number(r.step_median_s)
    << ",\n  \"step_s_min\": " << json_number(r.step_min_s) << ",\n  \"tokens_per_s\": " << json_number(r.tokens_per_s)
    << ",\n  \"peak_rss_mib\": " << json_number(r.peak_rss_mib) << ",\n  \"base_dtype\": \""
    << lora::quant::qtype_name(o.storage) << "\""
    << ",\n  \"train_peak_rss_mib\": " << json_number(r.train_peak_rss_mib)
    << ",\n  \"load_avg_start\": " << json_number(r.load_avg_start);
  if (!r.breakdown_ms.empty()) {
    f << ",\n  \"breakdown_ms\": {";
    const char* sep = "\n";
    for (const auto& [name, ms] : r.breakdown_ms) {
      f << sep << "    \"" << name << "\": " << json_number(ms);
      sep = ",\n";
    }
    f << "\n  }";
  }
  f << "\n}\n";
  return static_cast<bool>(f);
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  lora::models::gpt2_config cfg = lora::models::gpt2_small();
  cfg.n_layer = o.layers;
  lora::models::gpt2<float> model(lora::models::gpt2_weights<float>::random(cfg, 1));
  configure(model, o);
  const result r = run(model, o);
  std::printf(
      "ours %s over %s: threads %d, ctx %ld, batch %ld: step %.0f ms (median of %d), %.1f tokens/s, peak RSS %.2f "
      "GiB (steps alone %.2f GiB), %ld trainable parameters\n",
      o.full ? "full" : "lora", lora::quant::qtype_name(o.storage), threads(), static_cast<long>(o.ctx),
      static_cast<long>(o.batch), 1e3 * r.step_median_s, o.steps, r.tokens_per_s, r.peak_rss_mib / 1024.0,
      r.train_peak_rss_mib / 1024.0, static_cast<long>(r.trainable));
  for (const auto& [name, ms] : r.breakdown_ms) std::printf("  %-34s %8.1f ms\n", name.c_str(), ms);
  if (!o.json.empty() && !write_json(o.json, o, r)) {
    std::cerr << "bench_gpt2_step: could not write " << o.json << "\n";
    return 1;
  }
  return 0;
}
