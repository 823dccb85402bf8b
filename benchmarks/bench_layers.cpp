// bench_layers: lora::embedding, lora::conv2d and lora::merged_linear beside the frozen operation each one
// cannot avoid, computed in the same binary on the same operands, so that ratios are meaningful on a
// noisy shared machine.
//
// Sizes: the embedding is GPT-2 small's wte (vocab 50257, dim 768) with a 512-token micro-batch, where a
// dense r x vocab sweep per step would cost more than the lookups themselves; the convolution is a ResNet
// stage-1 block (64 -> 64 channels, 32x32, 3x3, padding 1) on a batch of 8; the merged linear is GPT-2
// small's c_attn (768 -> 3 x 768, stored in x out) with LoRA on q and v, on 512 tokens.
#include <benchmark/benchmark.h>

#include <lora/conv2d.hpp>
#include <lora/embedding.hpp>
#include <lora/merged_linear.hpp>

namespace {

using mat = lora::matrix<float>;

mat random(lora::index r, lora::index c, std::uint64_t seed) {
  lora::rng gen(seed);
  mat m(r, c);
  for (lora::index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(gen.uniform(-1, 1));
  return m;
}

lora::adapter_config config(lora::index r) {
  lora::adapter_config c;
  c.rank = r;
  c.init = lora::init_method::random_ab;
  return c;
}

void set_counters(benchmark::State& st, double flops, double bytes) {
  st.counters["FLOPS"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  st.counters["bytes/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
}

// --- embedding: arguments vocab, dim, r, n ----------------------------------------------------------

struct embedding_fixture {
  lora::index vocab, dim, r, n;
  Eigen::Matrix<float, -1, -1, Eigen::RowMajor> table;  // PyTorch's wte layout
  std::vector<lora::index> ids;
  mat y, dy;
  lora::embedding<float> layer;
  explicit embedding_fixture(const benchmark::State& st)
      : vocab(st.range(0)),
        dim(st.range(1)),
        r(st.range(2)),
        n(st.range(3)),
        table(random(vocab, dim, 1)),
        y(n, dim),
        dy(random(n, dim, 3)),
        layer(lora::view, table, "wte") {
    lora::rng gen(2);
    for (lora::index k = 0; k < n; ++k)
      ids.push_back(static_cast<lora::index>(gen.below(static_cast<std::uint64_t>(vocab))));
    layer.add_adapter("default", config(r));
  }
  double lookup_bytes() const { return 2.0 * n * dim * sizeof(float); }  // read rows, write Y
};

// The frozen lookup alone, Y = E[ids], with the layer's own row gather.
void bm_embedding_gather(benchmark::State& st) {
  embedding_fixture f(st);
  for (auto _ : st) {
    lora::detail::gather_rows<float>(f.table.data(), f.table.outerStride(), 1, f.ids, f.y);
    benchmark::DoNotOptimize(f.y.data());
  }
  set_counters(st, 0, f.lookup_bytes());
}

void bm_embedding_forward(benchmark::State& st) {
  embedding_fixture f(st);
  for (auto _ : st) {
    f.layer.forward(f.ids, f.y);
    benchmark::DoNotOptimize(f.y.data());
  }
  set_counters(st, 2.0 * f.n * f.r * f.dim, f.lookup_bytes());
}

// Forward, backward (sparse dA, dense dB) and zero_grad: one step's work on the layer.
void bm_embedding_step(benchmark::State& st) {
  embedding_fixture f(st);
  for (auto _ : st) {
    f.layer.forward(f.ids, f.y);
    f.layer.backward(f.dy);
    f.layer.zero_grad();
    benchmark::DoNotOptimize(f.layer.adapter("default").grad_a().data());
  }
  set_counters(st, 3 * 2.0 * f.n * f.r * f.dim, f.lookup_bytes());
}

void embedding_grid(benchmark::internal::Benchmark* b) {
  b->ArgNames({"vocab", "dim", "r", "n"});
  b->Args({50257, 768, 8, 512});
  b->Unit(benchmark::kMicrosecond);
}

BENCHMARK(bm_embedding_gather)->Apply(embedding_grid);
BENCHMARK(bm_embedding_forward)->Apply(embedding_grid);
BENCHMARK(bm_embedding_step)->Apply(embedding_grid);

// --- conv2d: arguments n, c (= out channels), hw, k, r ----------------------------------------------

struct conv_fixture {
  lora::index n, c, hw, k, r;
  lora::conv2d_options opt;
  mat w, x, y, dy, dx, xt, col, yp;
  lora::conv2d<float> layer;
  static lora::conv2d_options options(const benchmark::State& st) {
    lora::conv2d_options o;
    o.in_channels = st.range(1);
    o.input = {st.range(2), st.range(2)};
    o.kernel = {st.range(3), st.range(3)};
    o.padding = {st.range(3) / 2, st.range(3) / 2};
    return o;
  }
  explicit conv_fixture(const benchmark::State& st)
      : n(st.range(0)),
        c(st.range(1)),
        hw(st.range(2)),
        k(st.range(3)),
        r(st.range(4)),
        opt(options(st)),
        w(random(c, c * k * k, 1)),
        x(random(n, c * hw * hw, 2)),
        y(n, c * hw * hw),
        dy(random(n, c * hw * hw, 3)),
        dx(n, c * hw * hw),
        layer(lora::view, w, opt, "conv") {
    layer.add_adapter("default", config(r));
  }
  double gemm_flops() const { return 2.0 * n * hw * hw * c * (c * k * k); }
  double lora_flops() const { return 2.0 * n * hw * hw * r * (c * k * k + c); }
};

// The frozen convolution alone by im2col + GEMM, the way the layer computes it, without the NCHW rearranging:
// Xᵀ, Col = im2col(X), Yp = Col Wᵀ.
void bm_conv_im2col_gemm(benchmark::State& st) {
  conv_fixture f(st);
  lora::detail::conv_geometry g;
  g.c = f.c;
  g.h = g.w = f.hw;
  g.kh = g.kw = f.k;
  g.ph = g.pw = f.k / 2;
  g.oh = g.ow = f.hw;
  for (auto _ : st) {
    f.xt.noalias() = f.x.transpose();
    f.col.resize(f.n * g.pixels(), g.patch());
    lora::detail::unfold<true>(g, f.n, static_cast<const float*>(f.xt.data()), f.col.data());
    f.yp.noalias() = f.col * f.w.transpose();
    benchmark::DoNotOptimize(f.yp.data());
  }
  set_counters(st, f.gemm_flops(), 0);
}

void bm_conv_forward(benchmark::State& st) {
  conv_fixture f(st);
  for (auto _ : st) {
    f.layer.forward(f.x, f.y);
    benchmark::DoNotOptimize(f.y.data());
  }
  set_counters(st, f.gemm_flops() + f.lora_flops(), 0);
}

void bm_conv_infer(benchmark::State& st) {
  conv_fixture f(st);
  lora::conv2d_workspace<float> ws;
  for (auto _ : st) {
    f.layer.infer(f.x, f.y, ws);
    benchmark::DoNotOptimize(f.y.data());
  }
  set_counters(st, f.gemm_flops() + f.lora_flops(), 0);
}

// Forward + backward (dX through col2im, dA, dB): two base GEMMs and the rank-r work.
void bm_conv_train_step(benchmark::State& st) {
  conv_fixture f(st);
  for (auto _ : st) {
    f.layer.forward(f.x, f.y);
    f.layer.backward(f.dy, f.dx);
    benchmark::DoNotOptimize(f.dx.data());
  }
  set_counters(st, 2 * f.gemm_flops() + 3 * f.lora_flops(), 0);
}

void conv_grid(benchmark::internal::Benchmark* b) {
  b->ArgNames({"n", "c", "hw", "k", "r"});
  b->Args({8, 64, 32, 3, 8});
  b->Unit(benchmark::kMillisecond);
}

BENCHMARK(bm_conv_im2col_gemm)->Apply(conv_grid);
BENCHMARK(bm_conv_forward)->Apply(conv_grid);
BENCHMARK(bm_conv_infer)->Apply(conv_grid);
BENCHMARK(bm_conv_train_step)->Apply(conv_grid);

// --- merged_linear: arguments d (in; out = 3 d), n, r -----------------------------------------------

struct merged_fixture {
  lora::index d, n, r;
  mat w_t, x, y, dy, dx;  // w_t: in x out, GPT-2's Conv1D
  lora::merged_linear<float> layer;
  explicit merged_fixture(const benchmark::State& st)
      : d(st.range(0)),
        n(st.range(1)),
        r(st.range(2)),
        w_t(random(d, 3 * d, 1)),
        x(random(n, d, 2)),
        y(n, 3 * d),
        dy(random(n, 3 * d, 3)),
        dx(n, d),
        layer(lora::view, w_t, {true, false, true}, "c_attn", lora::weight_layout::in_out) {
    layer.add_adapter("default", config(r));
  }
  double base_flops() const { return 2.0 * n * d * 3 * d; }
  double lora_flops() const { return 2 * 2.0 * n * r * (d + d); }  // two enabled slices
};

// The two GEMMs of the fused frozen layer a training step cannot avoid: Y = X W and dX = dY Wᵀ (W in x out).
void bm_merged_gemm2(benchmark::State& st) {
  merged_fixture f(st);
  for (auto _ : st) {
    f.y.noalias() = f.x * f.w_t;
    f.dx.noalias() = f.dy * f.w_t.transpose();
    benchmark::DoNotOptimize(f.y.data());
    benchmark::DoNotOptimize(f.dx.data());
  }
  set_counters(st, 2 * f.base_flops(), 0);
}

void bm_merged_train_step(benchmark::State& st) {
  merged_fixture f(st);
  for (auto _ : st) {
    f.layer.forward(f.x, f.y);
    f.layer.backward(f.dy, f.dx);
    benchmark::DoNotOptimize(f.dx.data());
  }
  set_counters(st, 2 * f.base_flops() + 3 * f.lora_flops(), 0);
}

void merged_grid(benchmark::internal::Benchmark* b) {
  b->ArgNames({"d", "n", "r"});
  b->Args({768, 512, 8});
  b->Unit(benchmark::kMillisecond);
}

BENCHMARK(bm_merged_gemm2)->Apply(merged_grid);
BENCHMARK(bm_merged_train_step)->Apply(merged_grid);

}  // namespace

BENCHMARK_MAIN();
