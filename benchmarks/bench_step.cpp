// bench_step: the LoRA training step against the two GEMMs it cannot avoid, and against libtorch.
//
// With W frozen, a step needs Y = X Wᵀ and dX = dY W (the "gemm2" baseline, 4 n·in·out FLOPs). On top
// of those the adapter adds six thin products of inner size r (H = X Aᵀ, Y += s H Bᵀ, dB += s dYᵀ H,
// dH = s dY B, dA += dHᵀ X, dX += dH A), 2·r·(in + out)·n·3 FLOPs: so step/gemm2 can never go below
// 1 + 3 r (in + out) / (2 in·out) at equal efficiency (1 + 3r/d for square layers). The counters report
// that bound beside the measurement.
//
// The three contenders are three benchmarks over the same grid and the same seeded operands:
//   bm_step_gemm2  the two GEMMs alone,
//   bm_step_ours   our step (zero_grad, forward, backward),
//   bm_step_torch  libtorch's step with autograd (only with LORA_HAVE_TORCH).
// Run each in its own process (scripts/bench.sh does: --benchmark_filter='^bm_step_ours/'): with more than
// one thread, the thread pools of OpenBLAS and libtorch spin after each call, and contenders timed back to
// back in one process slow each other down. scripts/bench_report.py computes step/gemm2 and vs_libtorch
// afterwards from the per-contender medians (counter `ms`: median of the per-iteration times).
//
// Threads: OpenBLAS reads OPENBLAS_NUM_THREADS (both libraries call it); libtorch's own pool is set to the
// same number here. scripts/bench.sh runs 1 and 2.
//
// Arguments: in, out = layer shape, n = batch rows, r = rank.
#include <benchmark/benchmark.h>

#include <algorithm>
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

/// OPENBLAS_NUM_THREADS, 1 unless set: the thread count every library in this process is given.
int threads() {
  const char* env = std::getenv("OPENBLAS_NUM_THREADS");
  return env ? std::max(1, std::atoi(env)) : 1;
}

/// The seeded operands of one grid point, shared by the three contenders (same seeds, same values).
struct operands {
  lora::index in, out, n, r;
  mat w, x, dy, y, dx;

  explicit operands(const benchmark::State& st)
      : in(st.range(0)),
        out(st.range(1)),
        n(st.range(2)),
        r(st.range(3)),
        w(random(out, in, 1)),  // W (out x in) column-major as Eigen stores it
        x(random(n, in, 2)),    // X (n x in) as users hold batches
        dy(random(n, out, 3)),
        y(n, out),
        dx(n, in) {}
};

/// Times f once per iteration and reports the median in milliseconds as counter `ms`, with the
/// thread count and the FLOP bound of step/gemm2 for this shape; returns the median in seconds.
template <typename F>
double time_contender(benchmark::State& st, const operands& o, F&& f) {
  std::vector<double> t;
  for (auto _ : st) {
    t.push_back(seconds(f));
    benchmark::ClobberMemory();
  }
  const double in = static_cast<double>(o.in), out = static_cast<double>(o.out), r = static_cast<double>(o.r);
  st.counters["ms"] = 1e3 * median(t);
  st.counters["threads"] = threads();
  st.counters["flop_bound"] = 1.0 + 3.0 * r * (in + out) / (2.0 * in * out);
  return median(t);
}

void bm_step_gemm2(benchmark::State& st) {
  operands o(st);
  time_contender(st, o, [&] {
    o.y.noalias() = o.x * o.w.transpose();
    o.dx.noalias() = o.dy * o.w;
    benchmark::DoNotOptimize(o.dx.data());
  });
}

void bm_step_ours(benchmark::State& st) {
  operands o(st);
  lora::linear<float> layer(lora::view, o.w, "bench");
  layer.add_adapter("default", random_adapter(o.r));
  const double t = time_contender(st, o, [&] {
    layer.zero_grad();
    layer.forward(o.x, o.y);
    layer.backward(o.dy, o.dx);
    benchmark::DoNotOptimize(o.dx.data());
  });
  const double in = static_cast<double>(o.in), out = static_cast<double>(o.out);
  const double n = static_cast<double>(o.n), r = static_cast<double>(o.r);
  st.counters["step_GFLOPS"] = (4.0 * n * in * out + 6.0 * n * r * (in + out)) / t * 1e-9;
}

#ifdef LORA_HAVE_TORCH
void bm_step_torch(benchmark::State& st) {
  operands o(st);
  // The adapter's A and B as ours draws them, so both libraries multiply the same numbers.
  lora::linear<float> layer(lora::view, o.w, "bench");
  layer.add_adapter("default", random_adapter(o.r));
  const auto& ad = layer.adapter("default");
  torch::set_num_threads(threads());
  // torch is row-major: our column-major W (out x in) is torch's Wᵀ (in x out) memory.
  const auto opts = torch::TensorOptions().dtype(torch::kFloat32);
  const auto blob = [&](const mat& m, std::int64_t rows, std::int64_t cols) {
    return torch::from_blob(const_cast<float*>(m.data()), {cols, rows}, opts).t().clone();
  };
  torch::Tensor tw = blob(o.w, o.out, o.in);  // out x in, frozen
  torch::Tensor tx = blob(o.x, o.n, o.in).requires_grad_(true);
  torch::Tensor tdy = blob(o.dy, o.n, o.out);
  torch::Tensor ta = blob(ad.a(), o.r, o.in).requires_grad_(true);
  torch::Tensor tb = blob(ad.b(), o.out, o.r).requires_grad_(true);
  const double s = ad.scaling();
  time_contender(st, o, [&] {
    // PEFT's forward: base(x) + lora_B(lora_A(dropout(x))) * scaling.
    torch::Tensor ty = torch::nn::functional::linear(tx, tw) +
                       torch::nn::functional::linear(torch::nn::functional::linear(tx, ta), tb) * s;
    ty.backward(tdy);
    tx.mutable_grad().reset();
    ta.mutable_grad().reset();
    tb.mutable_grad().reset();
  });
}
#endif

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

BENCHMARK(bm_step_gemm2)->Apply(grid);
BENCHMARK(bm_step_ours)->Apply(grid);
#ifdef LORA_HAVE_TORCH
BENCHMARK(bm_step_torch)->Apply(grid);
#endif

}  // namespace

BENCHMARK_MAIN();
