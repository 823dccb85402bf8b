// bench_step: the LoRA training step against the two GEMMs it cannot avoid, and against libtorch.
//
// With W frozen, a step needs Y = X Wᵀ and dX = dY W (the "gemm2" baseline, 4 n·in·out FLOPs). On top
// of those the adapter adds six thin products of inner size r (H = X Aᵀ, Y += s H Bᵀ, dB += s dYᵀ H,
// dH = s dY B, dA += dHᵀ X, dX += dH A), 2·r·(in + out)·n·3 FLOPs: so step/gemm2 can never go below
// 1 + 3 r (in + out) / (2 in·out) at equal efficiency (1 + 3r/d for square layers). The counters report
// that bound beside the measurement.
//
// Every iteration times the three contenders back to back on the same operands (gemm2, our step,
// libtorch's step with autograd) and the counters are ratios of per-contender medians, so a noisy
// shared machine moves all three together. Both libraries run on OPENBLAS_NUM_THREADS threads (scripts/bench.sh
// sets 1).
//
// Arguments: in, out = layer shape, n = batch rows, r = rank.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <lora/lora.hpp>

#include <vector>
#include "bench_common.hpp"

#ifdef LORA_HAVE_TORCH
#include <torch/torch.h>
#endif

namespace {

using lora_bench::median;
using lora_bench::random;
using lora_bench::random_adapter;
using lora_bench::seconds;

using mat = lora::matrix<float>;

void bm_step(benchmark::State& st) {
  const lora::index in = st.range(0), out = st.range(1), n = st.range(2), r = st.range(3);
  // Row-major X (n x in) as users hold batches; W (out x in) column-major as Eigen stores it.
  mat w = random(out, in, 1);
  const mat x = random(n, in, 2), dy = random(n, out, 3);
  mat y(n, out), dx(n, in);
  lora::linear<float> layer(lora::view, w, "bench");
  layer.add_adapter("default", random_adapter(r));

#ifdef LORA_HAVE_TORCH
  // The same thread count as BLAS (OPENBLAS_NUM_THREADS, 1 unless set), which both libraries call.
  const char* threads = std::getenv("OPENBLAS_NUM_THREADS");
  torch::set_num_threads(threads ? std::max(1, std::atoi(threads)) : 1);
  // Same operands. torch is row-major: our column-major W (out x in) is torch's Wᵀ (in x out) memory.
  auto opts = torch::TensorOptions().dtype(torch::kFloat32);
  torch::Tensor tw = torch::from_blob(w.data(), {in, out}, opts).t().clone();  // out x in, frozen
  torch::Tensor tx = torch::from_blob(const_cast<float*>(x.data()), {in, n}, opts).t().clone().requires_grad_(true);
  torch::Tensor tdy = torch::from_blob(const_cast<float*>(dy.data()), {out, n}, opts).t().clone();
  const auto& ad = layer.adapter("default");
  torch::Tensor ta =
      torch::from_blob(const_cast<float*>(ad.a().data()), {in, r}, opts).t().clone().requires_grad_(true);
  torch::Tensor tb =
      torch::from_blob(const_cast<float*>(ad.b().data()), {r, out}, opts).t().clone().requires_grad_(true);
  const double s = ad.scaling();
  auto torch_step = [&] {
    // PEFT's forward: base(x) + lora_B(lora_A(dropout(x))) * scaling.
    torch::Tensor ty = torch::nn::functional::linear(tx, tw) +
                       torch::nn::functional::linear(torch::nn::functional::linear(tx, ta), tb) * s;
    ty.backward(tdy);
    tx.mutable_grad().reset();
    ta.mutable_grad().reset();
    tb.mutable_grad().reset();
  };
#endif

  std::vector<double> t_gemm, t_step, t_torch;
  for (auto _ : st) {
    t_gemm.push_back(seconds([&] {
      y.noalias() = x * w.transpose();
      dx.noalias() = dy * w;
    }));
    t_step.push_back(seconds([&] {
      layer.zero_grad();
      layer.forward(x, y);
      layer.backward(dy, dx);
    }));
#ifdef LORA_HAVE_TORCH
    t_torch.push_back(seconds(torch_step));
#endif
    benchmark::DoNotOptimize(dx.data());
    benchmark::ClobberMemory();
  }
  const double g = median(t_gemm), ours = median(t_step);
  st.counters["gemm2_ms"] = 1e3 * g;
  st.counters["step_ms"] = 1e3 * ours;
  st.counters["step_over_gemm2"] = ours / g;
  st.counters["flop_bound"] = 1.0 + 3.0 * static_cast<double>(r) * static_cast<double>(in + out) /
                                        (2.0 * static_cast<double>(in) * static_cast<double>(out));
  const double nd = static_cast<double>(n), ind = static_cast<double>(in), outd = static_cast<double>(out);
  st.counters["step_GFLOPS"] = (4.0 * nd * ind * outd + 6.0 * nd * static_cast<double>(r) * (ind + outd)) / ours * 1e-9;
#ifdef LORA_HAVE_TORCH
  const double t = median(t_torch);
  st.counters["torch_ms"] = 1e3 * t;
  st.counters["vs_libtorch"] = t / ours;
#endif
}

// The grid of the performance issue: square d ∈ {1024, 4096}, n ∈ {64, 512, 2048}, r ∈ {4, 8, 16, 64, 256},
// plus LLaMA-7B's MLP up-projection 4096 -> 11008 at a training micro-batch.
void grid(benchmark::internal::Benchmark* b) {
  b->ArgNames({"in", "out", "n", "r"});
  for (long d : {1024, 4096})
    for (long n : {64, 512, 2048})
      for (long r : {4, 8, 16, 64, 256}) b->Args({d, d, n, r});
  for (long r : {8, 64}) b->Args({4096, 11008, 512, r});
  b->Unit(benchmark::kMillisecond);
  b->MinTime(0.5);
}

BENCHMARK(bm_step)->Apply(grid);

}  // namespace

BENCHMARK_MAIN();
