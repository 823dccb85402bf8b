// bench_layers: lora::embedding, lora::conv2d and lora::merged_linear against the frozen work each one
// cannot avoid, timed back to back in one loop on the same operands; counters are ratios of medians, so
// they hold on a noisy shared machine.
//
//  bm_embedding      the frozen lookup Y = E[ids] (the layer's own row gather) against the adapted forward
//                    and a training step (forward, sparse backward, sparse zero_grad); dense_zero_grad_us is
//                    what clearing the whole r x vocab dA once would cost, for scale.
//  bm_conv2d         the frozen convolution by im2col + GEMM (Yp = Col Wᵀ) against the layer's forward and
//                    infer (adapter unmerged: + s (Col Aᵀ) Bᵀ, NCHW rearranged), and the frozen training
//                    pass (forward, dCol = dYp W, col2im) against the layer's train step (+ dA, dB).
//  bm_merged_linear  the fused frozen projection's two GEMMs (Y = X W, dX = dY Wᵀ, W stored in x out) against
//                    a merged_linear training step with LoRA on q and v.
//
// Sizes: GPT-2 small's wte (vocab 50257, dim 768) with a 512-token micro-batch, where a dense r x vocab
// sweep per step would cost as much as the lookups; a ResNet stage-1 convolution (64 -> 64 channels,
// 32x32, 3x3, padding 1) on 8 images; GPT-2 small's c_attn (768 -> 3 x 768) on 512 tokens. r = 8.
#include <benchmark/benchmark.h>

#include <lora/conv2d.hpp>
#include <lora/embedding.hpp>
#include <lora/merged_linear.hpp>
#include <vector>

#include "bench_common.hpp"

namespace {

using lora_bench::median;
using lora_bench::random;
using lora_bench::random_adapter;
using lora_bench::seconds;

using mat = lora::matrix<float>;

// Arguments: vocab, dim, r, n.
void bm_embedding(benchmark::State& st) {
  const lora::index vocab = st.range(0), dim = st.range(1), r = st.range(2), n = st.range(3);
  Eigen::Matrix<float, -1, -1, Eigen::RowMajor> table = random(vocab, dim, 1);  // PyTorch's wte layout
  lora::rng gen(2);
  std::vector<lora::index> ids;
  for (lora::index k = 0; k < n; ++k)
    ids.push_back(static_cast<lora::index>(gen.below(static_cast<std::uint64_t>(vocab))));
  const mat dy = random(n, dim, 3);
  mat y(n, dim);
  lora::embedding<float> layer(lora::view, table, "wte");
  auto& a = layer.add_adapter("default", random_adapter(r));
  std::vector<double> t_base, t_forward, t_step, t_dense_zero;
  for (auto _ : st) {
    t_base.push_back(seconds([&] { lora::detail::gather_rows<float>(table.data(), table.outerStride(), 1, ids, y); }));
    t_forward.push_back(seconds([&] { layer.forward(ids, y); }));
    t_step.push_back(seconds([&] {
      layer.forward(ids, y);
      layer.backward(dy);
      layer.zero_grad();
    }));
    t_dense_zero.push_back(seconds([&] { a.grad_a().setZero(); }));
    benchmark::DoNotOptimize(y.data());
  }
  const double base = median(t_base);
  st.counters["base_us"] = 1e6 * base;
  st.counters["forward_over_base"] = median(t_forward) / base;
  st.counters["step_over_base"] = median(t_step) / base;
  st.counters["dense_zero_grad_us"] = 1e6 * median(t_dense_zero);
}

// Arguments: n images, c = in = out channels, hw = height = width, k = kernel size (padding k / 2), r.
void bm_conv2d(benchmark::State& st) {
  const lora::index n = st.range(0), c = st.range(1), hw = st.range(2), k = st.range(3), r = st.range(4);
  lora::conv2d_options opt;
  opt.in_channels = c;
  opt.input = {hw, hw};
  opt.kernel = {k, k};
  opt.padding = {k / 2, k / 2};
  mat w = random(c, c * k * k, 1);
  const mat x = random(n, c * hw * hw, 2), dy = random(n, c * hw * hw, 3);
  mat y(n, c * hw * hw), dx(n, c * hw * hw), xt, col, yp, dcol;
  lora::conv2d<float> layer(lora::view, w, opt, "conv");
  layer.add_adapter("default", random_adapter(r));
  lora::conv2d_workspace<float> ws;
  lora::detail::conv_geometry g;
  g.c = c;
  g.h = g.w = g.oh = g.ow = hw;
  g.kh = g.kw = k;
  g.ph = g.pw = k / 2;
  auto base_forward = [&] {
    xt.noalias() = x.transpose();
    col.resize(n * g.pixels(), g.patch());
    lora::detail::unfold<true>(g, n, static_cast<const float*>(xt.data()), col.data());
    yp.noalias() = col * w.transpose();
  };
  std::vector<double> t_base, t_base_step, t_forward, t_infer, t_step;
  for (auto _ : st) {
    t_base.push_back(seconds(base_forward));
    t_base_step.push_back(seconds([&] {
      base_forward();
      dcol.noalias() = yp * w;  // Yp stands in for dYp: same shape, same cost
      xt.setZero();
      lora::detail::unfold<false>(g, n, xt.data(), static_cast<const float*>(dcol.data()));
    }));
    t_forward.push_back(seconds([&] { layer.forward(x, y); }));
    t_infer.push_back(seconds([&] { layer.infer(x, y, ws); }));
    t_step.push_back(seconds([&] {
      layer.forward(x, y);
      layer.backward(dy, dx);
    }));
    benchmark::DoNotOptimize(y.data());
    benchmark::DoNotOptimize(dx.data());
  }
  const double base = median(t_base), base_step = median(t_base_step);
  st.counters["base_ms"] = 1e3 * base;
  st.counters["base_GFLOPS"] = 2.0 * n * hw * hw * c * (c * k * k) / base * 1e-9;
  st.counters["forward_over_base"] = median(t_forward) / base;
  st.counters["infer_over_base"] = median(t_infer) / base;
  st.counters["step_over_base_step"] = median(t_step) / base_step;
}

// Arguments: d (in; out = 3 d), n, r.
void bm_merged_linear(benchmark::State& st) {
  const lora::index d = st.range(0), n = st.range(1), r = st.range(2);
  mat w_t = random(d, 3 * d, 1);  // in x out, GPT-2's Conv1D
  const mat x = random(n, d, 2), dy = random(n, 3 * d, 3);
  mat y(n, 3 * d), dx(n, d);
  lora::merged_linear<float> layer(lora::view, w_t, {true, false, true}, "c_attn", lora::weight_layout::in_out);
  layer.add_adapter("default", random_adapter(r));
  std::vector<double> t_base, t_step;
  for (auto _ : st) {
    t_base.push_back(seconds([&] {
      y.noalias() = x * w_t;
      dx.noalias() = dy * w_t.transpose();
    }));
    t_step.push_back(seconds([&] {
      layer.forward(x, y);
      layer.backward(dy, dx);
    }));
    benchmark::DoNotOptimize(dx.data());
  }
  const double base = median(t_base);
  st.counters["gemm2_ms"] = 1e3 * base;
  st.counters["step_over_gemm2"] = median(t_step) / base;
  // Two enabled slices add 3 x 2 n r (in + out/3) FLOPs each to the 2 x 2 n in out of the two GEMMs.
  st.counters["ideal"] = 1.0 + 3.0 * 2.0 * static_cast<double>(r) * (d + d) / (2.0 * d * 3.0 * d);
}

BENCHMARK(bm_embedding)
    ->ArgNames({"vocab", "dim", "r", "n"})
    ->Args({50257, 768, 8, 512})
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(bm_conv2d)->ArgNames({"n", "c", "hw", "k", "r"})->Args({8, 64, 32, 3, 8})->Unit(benchmark::kMillisecond);
BENCHMARK(bm_merged_linear)->ArgNames({"d", "n", "r"})->Args({768, 512, 8})->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
