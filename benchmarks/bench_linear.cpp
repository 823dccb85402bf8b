// bench_linear: forward, inference and a full training step of lora::linear over rank, beside the
// frozen layer's own GEMMs computed in the same binary on the same operands, so that ratios are
// meaningful on a noisy shared machine.
//
// Arguments: d = in = out features, n = rows in the batch, r = rank.
// Sizes: d = 1024 is a small transformer projection (fits L2/L3 poorly, realistic); n = 64 is a
// decode-sized batch where the rank-r work weighs most, n = 512 a training micro-batch.
#include <benchmark/benchmark.h>

#include <lora/lora.hpp>

namespace {

using mat = lora::matrix<float>;

mat random(lora::index r, lora::index c, std::uint64_t seed) {
  lora::rng gen(seed);
  mat m(r, c);
  for (lora::index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(gen.uniform(-1, 1));
  return m;
}

struct fixture {
  lora::index d, n, r;
  mat w, x, dy, y, dx;
  lora::linear<float> layer;
  fixture(lora::index d_, lora::index n_, lora::index r_)
      : d(d_),
        n(n_),
        r(r_),
        w(random(d, d, 1)),
        x(random(n, d, 2)),
        dy(random(n, d, 3)),
        y(n, d),
        dx(n, d),
        layer(lora::view, w, "bench") {
    lora::adapter_config c;
    c.rank = r;
    c.init = lora::init_method::random_ab;
    layer.add_adapter("default", c);
  }
};

// FLOPs: each GEMM of m x k by k x n is 2 m n k.
double base_flops(const fixture& f) { return 2.0 * f.n * f.d * f.d; }
double lora_flops(const fixture& f) { return 2.0 * f.n * f.r * (2.0 * f.d); }

void set_counters(benchmark::State& st, double flops) {
  st.counters["FLOPS"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

// The frozen layer alone: Y = X Wᵀ.
void bm_base_forward(benchmark::State& st) {
  fixture f(st.range(0), st.range(1), st.range(2));
  for (auto _ : st) {
    f.y.noalias() = f.x * f.w.transpose();
    benchmark::DoNotOptimize(f.y.data());
  }
  set_counters(st, base_flops(f));
}

// The two GEMMs a LoRA training step cannot avoid: Y = X Wᵀ and dX = dY W.
void bm_gemm2(benchmark::State& st) {
  fixture f(st.range(0), st.range(1), st.range(2));
  for (auto _ : st) {
    f.y.noalias() = f.x * f.w.transpose();
    f.dx.noalias() = f.dy * f.w;
    benchmark::DoNotOptimize(f.y.data());
    benchmark::DoNotOptimize(f.dx.data());
  }
  set_counters(st, 2 * base_flops(f));
}

void bm_infer(benchmark::State& st) {
  fixture f(st.range(0), st.range(1), st.range(2));
  lora::inference_workspace<float> ws;
  for (auto _ : st) {
    f.layer.infer(f.x, f.y, ws);
    benchmark::DoNotOptimize(f.y.data());
  }
  set_counters(st, base_flops(f) + lora_flops(f));
}

// Forward + backward (dX, dA, dB).
void bm_train_step(benchmark::State& st) {
  fixture f(st.range(0), st.range(1), st.range(2));
  for (auto _ : st) {
    f.layer.forward(f.x, f.y);
    f.layer.backward(f.dy, f.dx);
    benchmark::DoNotOptimize(f.dx.data());
  }
  set_counters(st, 2 * base_flops(f) + 3 * lora_flops(f));
}

void grid(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "n", "r"});
  for (long d : {1024})
    for (long n : {64, 512})
      for (long r : {4, 16, 64}) b->Args({d, n, r});
  b->Unit(benchmark::kMicrosecond);
}

BENCHMARK(bm_base_forward)->Apply(grid);
BENCHMARK(bm_gemm2)->Apply(grid);
BENCHMARK(bm_infer)->Apply(grid);
BENCHMARK(bm_train_step)->Apply(grid);

}  // namespace

BENCHMARK_MAIN();
