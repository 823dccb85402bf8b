// bench_memory: what one LoRA layer keeps for training, by rank, against full fine-tuning of the same
// layer, read from the library's own accounting (parameter_report) after a real forward/backward and
// Adam step, so the numbers are the bytes the library actually holds.
//
//   adapter parameters  r (in + out)        gradients  r (in + out)
//   Adam state          2 r (in + out)      activation cache  n r (H) beyond a view of X
//   full fine-tuning: parameters, gradients and Adam state of W itself, 4 in·out, plus the X it caches
//   (a dense layer that trains W must keep X for dW = dYᵀ X; LoRA only views it).
//
// Arguments: d = in = out (4096, a 7B-class projection), n = batch rows (512), r = rank.
#include <benchmark/benchmark.h>

#include <lora/lora.hpp>
#include <lora/optim.hpp>

namespace {

using mat = lora::matrix<float>;

void bm_memory(benchmark::State& st) {
  const lora::index d = st.range(0), n = st.range(1), r = st.range(2);
  mat w = mat::Zero(d, d);
  const mat x = mat::Ones(n, d), dy = mat::Ones(n, d);
  mat y(n, d), dx(n, d);
  lora::linear<float> layer(lora::view, w, "proj");
  lora::adapter_config c;
  c.rank = r;
  layer.add_adapter("default", c);
  auto params = layer.parameters();
  lora::optim::adam<float> opt(params);
  lora::parameter_report rep;
  for (auto _ : st) {
    layer.forward(x, y);
    rep = layer.report();  // with the forward's cache alive
    layer.backward(dy, dx);
    opt.step();
    benchmark::DoNotOptimize(dx.data());
  }
  rep.add_optimizer_state(opt);
  const double bytes = sizeof(float);
  const double full_state = 4.0 * static_cast<double>(d) * static_cast<double>(d) * bytes;  // W, dW, 2 moments
  const double full_cache = static_cast<double>(n) * static_cast<double>(d) * bytes;        // X kept for dW
  const double lora_total = static_cast<double>(rep.train_state_bytes() + rep.cache_bytes);
  st.counters["params_bytes"] = static_cast<double>(rep.trainable_bytes);
  st.counters["grad_bytes"] = static_cast<double>(rep.grad_bytes);
  st.counters["adam_bytes"] = static_cast<double>(rep.optimizer_bytes);
  st.counters["cache_bytes"] = static_cast<double>(rep.cache_bytes);
  st.counters["lora_total_bytes"] = lora_total;
  st.counters["full_total_bytes"] = full_state + full_cache;
  st.counters["full_over_lora"] = (full_state + full_cache) / lora_total;
}

// d = 4096 with a micro-batch of 512 rows; r over the powers of two a user chooses among.
BENCHMARK(bm_memory)
    ->ArgNames({"d", "n", "r"})
    ->ArgsProduct({{4096}, {512}, {1, 2, 4, 8, 16, 32, 64, 128, 256}})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
