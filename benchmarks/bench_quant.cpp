// bench_quant: the frozen weight stored quantized (quant/quantized_matrix.hpp) against the same product on
// the float32 weight, back to back on the same operands in one loop; counters are ratios of medians.
//
//  bm_forward   Y = X deq(W)ᵀ (inference, and the first product of a training step) against Y = X Wᵀ
//  bm_backward  dX += dY deq(W) (what the layers below need in training) against dX += dY W
//  bm_step      a lora::linear training step (forward, backward with dX; r = 16) over deq(W) against W
//  bm_decode    one input row through a stack of layers whose float32 weights total 256 MiB (64 layers at
//               d 1024, 4 at d 4096), as a decoding step passes through a model: every weight is read
//               once per pass and no stack fits this machine's caches (NF4: 36 MiB), so the pass is
//               memory-bound. bm_forward at n = 1 repeats one d x d weight instead, which stays in the L3
//               cache between calls at d 1024 (4 MiB as float32).
//
// Arguments: d = in = out, n = rows per call (1 = a decode step, 512 = a training micro-batch), and the
// storage (0 bf16, 1 int8, 2 q8_0, 3 q4_0, 4 nf4, 5 nf4_dq). Counters: base_us (float32), quant_over_f32,
// bits_per_weight. One thread unless OPENBLAS_NUM_THREADS says otherwise; the fused kernels of quant/ (up to
// 8 input rows) take as many as lora::num_threads() (LORA_NUM_THREADS, else OPENBLAS_NUM_THREADS) when a
// call is large enough, the panels' decoding stays on the calling thread. Results: 1 and 2 threads in
// benchmarks/results/bench_quant_1thread.json and bench_quant_2threads.json.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <lora/linear.hpp>
#include <lora/quant/quantized_matrix.hpp>
#include <vector>

#include "bench_common.hpp"

namespace {

using lora_bench::median;
using lora_bench::random;
using lora_bench::seconds;
using mat = lora::matrix<float>;

constexpr lora::quant::qtype storages[] = {lora::quant::qtype::bf16, lora::quant::qtype::int8,
                                           lora::quant::qtype::q8_0, lora::quant::qtype::q4_0,
                                           lora::quant::qtype::nf4,  lora::quant::qtype::nf4_dq};

void report(benchmark::State& st, const std::vector<double>& base, const std::vector<double>& quant,
            const lora::quant::quantized_matrix& w) {
  st.counters["base_us"] = 1e6 * median(base);
  st.counters["quant_over_f32"] = median(quant) / median(base);
  st.counters["bits_per_weight"] = w.bits_per_weight();
  st.SetLabel(lora::quant::qtype_name(w.type()));
}

void bm_forward(benchmark::State& st) {
  const lora::index d = st.range(0), n = st.range(1);
  const mat w = random(d, d, 1) * 0.02f, x = random(n, d, 2);
  const auto q = lora::quant::quantized_matrix::quantize(w, storages[st.range(2)]);
  lora::quant::qgemm_workspace<float> ws;
  mat y(n, d);
  std::vector<double> t_base, t_quant;
  for (auto _ : st) {
    t_base.push_back(seconds([&] { y.noalias() = x * w.transpose(); }));
    t_quant.push_back(seconds([&] { lora::quant::qgemm_forward<float>(x, q, y, ws); }));
    benchmark::DoNotOptimize(y.data());
  }
  report(st, t_base, t_quant, q);
}

void bm_backward(benchmark::State& st) {
  const lora::index d = st.range(0), n = st.range(1);
  const mat w = random(d, d, 3) * 0.02f, dy = random(n, d, 4);
  const auto q = lora::quant::quantized_matrix::quantize(w, storages[st.range(2)]);
  lora::quant::qgemm_workspace<float> ws;
  mat dx = mat::Zero(n, d);
  std::vector<double> t_base, t_quant;
  for (auto _ : st) {
    t_base.push_back(seconds([&] { dx.noalias() += dy * w; }));
    t_quant.push_back(seconds([&] { lora::quant::qgemm_backward_input<float>(dy, q, dx, ws); }));
    benchmark::DoNotOptimize(dx.data());
  }
  report(st, t_base, t_quant, q);
}

// One LoRA training step of a layer (r = 16 adapter on W, d x d): forward into Y, backward into dX with the
// adapter's gradients, over the quantized W against the same layer over float32 W.
void bm_step(benchmark::State& st) {
  const lora::index d = st.range(0), n = st.range(1);
  const mat w = random(d, d, 5) * 0.02f, x = random(n, d, 6), dy = random(n, d, 7);
  lora::linear<float> plain(w, "plain");
  lora::linear<float> quant(lora::quant::quantized_matrix::quantize(w, storages[st.range(2)]), "quant");
  lora::adapter_config c;
  c.rank = 16;
  c.alpha = 32;
  c.init = lora::init_method::random_ab;
  plain.add_adapter("a", c);
  quant.add_adapter("a", c);
  mat y(n, d), dx(n, d);
  const auto step = [&](lora::linear<float>& layer) {
    layer.forward(x, y);
    layer.backward(dy, dx);
  };
  std::vector<double> t_base, t_quant;
  for (auto _ : st) {
    t_base.push_back(seconds([&] { step(plain); }));
    t_quant.push_back(seconds([&] { step(quant); }));
    benchmark::DoNotOptimize(dx.data());
  }
  report(st, t_base, t_quant, quant.quantized_weight());
}

void bm_decode(benchmark::State& st) {
  const lora::index d = st.range(0);
  const lora::index layers = std::max<lora::index>(1, (lora::index{256} << 20) / (d * d * 4));
  std::vector<mat> w;
  std::vector<lora::quant::quantized_matrix> q;
  for (lora::index l = 0; l < layers; ++l) {
    w.push_back(random(d, d, 100 + static_cast<std::uint64_t>(l)) * 0.02f);
    q.push_back(lora::quant::quantized_matrix::quantize(w.back(), storages[st.range(1)]));
  }
  const mat x = random(1, d, 8);
  lora::quant::qgemm_workspace<float> ws;
  mat y(1, d);
  std::vector<double> t_base, t_quant;
  for (auto _ : st) {
    t_base.push_back(seconds([&] {
      for (const auto& wl : w) y.noalias() = x * wl.transpose();
    }));
    t_quant.push_back(seconds([&] {
      for (const auto& ql : q) lora::quant::qgemm_forward<float>(x, ql, y, ws);
    }));
    benchmark::DoNotOptimize(y.data());
  }
  report(st, t_base, t_quant, q.front());
  st.counters["layers"] = static_cast<double>(layers);
}

BENCHMARK(bm_forward)
    ->ArgNames({"d", "n", "storage"})
    ->ArgsProduct({{1024, 4096}, {1, 8, 64, 512}, {0, 1, 2, 3, 4, 5}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.2);
BENCHMARK(bm_backward)
    ->ArgNames({"d", "n", "storage"})
    ->ArgsProduct({{1024, 4096}, {8, 64, 512}, {0, 1, 2, 3, 4, 5}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.2);

BENCHMARK(bm_step)
    ->ArgNames({"d", "n", "storage"})
    ->ArgsProduct({{1024, 4096}, {8, 64, 512}, {0, 1, 2, 3, 4, 5}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.2);

BENCHMARK(bm_decode)
    ->ArgNames({"d", "storage"})
    ->ArgsProduct({{1024, 4096}, {0, 1, 2, 3, 4, 5}})
    ->Unit(benchmark::kMicrosecond)
    ->MinTime(0.5);

}  // namespace

BENCHMARK_MAIN();
