// A steady-state training step and an inference call allocate nothing: every workspace is reused.
//
// This binary is built on its own because it changes global behaviour: it replaces operator new to
// count allocations, and it defines eigen_assert and EIGEN_RUNTIME_NO_MALLOC before including Eigen,
// so that any heap allocation Eigen makes while allocation is forbidden is counted too (Eigen checks
// every aligned_malloc against set_is_malloc_allowed).
// GCC pairs the replaced operator new with std::free across inlining and warns; the pair is consistent.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

#include <atomic>
#include <cstdlib>
#include <new>

static std::atomic<long> g_eigen_mallocs{0};
static std::atomic<long> g_news{0};
static std::atomic<bool> g_counting{false};

static void lora_test_eigen_assert(bool ok) {
  if (!ok) ++g_eigen_mallocs;  // set a breakpoint here to find an allocation
}
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) lora_test_eigen_assert(static_cast<bool>(x))

#include <gtest/gtest.h>

#include <lora/lora.hpp>
#include <string>
#include <vector>

void* operator new(std::size_t n) {
  if (g_counting) ++g_news;
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

using mat = lora::matrix<float>;

mat random(lora::index r, lora::index c, std::uint64_t seed) {
  lora::rng gen(seed);
  mat m(r, c);
  for (lora::index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(gen.uniform(-1, 1));
  return m;
}

struct counting_scope {
  counting_scope() {
    g_news = 0;
    g_eigen_mallocs = 0;
    Eigen::internal::set_is_malloc_allowed(false);
    g_counting = true;
  }
  ~counting_scope() {
    g_counting = false;
    Eigen::internal::set_is_malloc_allowed(true);
  }
};

// Sizes whose GEMM packing buffers fit Eigen's stack limit (EIGEN_STACK_ALLOCATION_LIMIT, 128 KiB) when
// Eigen runs its own GEMM; with EIGEN_USE_BLAS the GEMMs go to BLAS and larger sizes are checked too.
#ifdef EIGEN_USE_BLAS
constexpr lora::index kD = 512, kN = 256;
#else
constexpr lora::index kD = 48, kN = 32;
#endif

TEST(no_alloc, steady_state_training_step) {
  mat w = random(kD, kD + 8, 1);
  const mat x = random(kN, kD + 8, 2), dy = random(kN, kD, 3);
  mat y(kN, kD), dx(kN, kD + 8);
  lora::linear<float> layer(lora::view, w, "fc");
  lora::adapter_config c;
  c.rank = 8;
  c.dropout = 0.1;
  c.init = lora::init_method::random_ab;
  layer.add_adapter("a", c);
  layer.add_adapter("b", {4, 4.0});
  layer.set_active({"a", "b"});
  for (int warm = 0; warm < 2; ++warm) {  // the first step sizes the workspaces
    layer.forward(x, y);
    layer.backward(dy, dx);
  }
  {
    counting_scope scope;
    for (int step = 0; step < 5; ++step) {
      layer.zero_grad();
      layer.forward(x, y);
      layer.backward(dy, dx);
      layer.forward(x, y);
      layer.backward_params_only(dy);
    }
  }
  EXPECT_EQ(g_news.load(), 0) << "operator new calls in steady-state steps";
  EXPECT_EQ(g_eigen_mallocs.load(), 0) << "Eigen heap allocations in steady-state steps";
}

TEST(no_alloc, inference_with_a_warm_workspace) {
  mat w = random(kD, kD, 4);
  const mat x = random(kN, kD, 5);
  mat y(kN, kD);
  lora::linear<float> layer(lora::view, w, "fc");
  layer.add_adapter("a", {16, 16.0});
  lora::inference_workspace<float> ws;
  layer.infer(x, y, ws);
  {
    counting_scope scope;
    for (int i = 0; i < 10; ++i) layer.infer(x, y, ws);
  }
  EXPECT_EQ(g_news.load(), 0);
  EXPECT_EQ(g_eigen_mallocs.load(), 0);
}

// Over a quantized weight (NF4 and Q8_0): the panel products (a batch) and the fused kernels (one row)
// reuse their workspaces too.
TEST(no_alloc, quantized_weight_training_step_and_inference) {
  for (auto type : {lora::quant::qtype::nf4, lora::quant::qtype::q8_0}) {
    lora::linear<float> layer(lora::quant::quantized_matrix::quantize(random(kD, 2 * kD, 6), type), "q");
    lora::adapter_config c;
    c.rank = 8;
    c.init = lora::init_method::random_ab;
    layer.add_adapter("a", c);
    const mat x = random(kN, 2 * kD, 7), dy = random(kN, kD, 8), x1 = random(1, 2 * kD, 9);
    mat y(kN, kD), dx(kN, 2 * kD), y1(1, kD);
    lora::inference_workspace<float> ws;
    for (int warm = 0; warm < 2; ++warm) {
      layer.forward(x, y);
      layer.backward(dy, dx);
      layer.infer(x, y, ws);
      layer.infer(x1, y1, ws);
    }
    {
      counting_scope scope;
      for (int step = 0; step < 3; ++step) {
        layer.zero_grad();
        layer.forward(x, y);
        layer.backward(dy, dx);
        layer.infer(x, y, ws);
        layer.infer(x1, y1, ws);
      }
    }
    EXPECT_EQ(g_news.load(), 0) << lora::quant::qtype_name(type);
    EXPECT_EQ(g_eigen_mallocs.load(), 0) << lora::quant::qtype_name(type);
  }
}

// A batch whose rows use different adapters of different ranks (scattered rows: gathered and scattered
// through the workspace; consecutive rows: in place; rows with scales; the base alone), over a plain and
// an NF4 weight, and an embedding's routed lookup.
TEST(no_alloc, routed_batch_inference_with_a_warm_workspace) {
  std::vector<std::string> rows;
  std::vector<double> scales;
  for (lora::index i = 0; i < kN; ++i) {
    rows.push_back(i % 5 == 4 ? lora::base_adapter : "a" + std::to_string(i % 3));
    scales.push_back(i % 7 == 0 ? 0.5 : 1.0);
  }
  const lora::adapter_routing scattered(rows, scales);
  const auto consecutive = lora::adapter_routing::from_runs({{"a0", kN / 2}, {"a2", kN - kN / 2}});
  const mat x = random(kN, kD, 10);
  mat y(kN, kD);
  for (bool quantized : {false, true}) {
    lora::linear<float> plain(random(kD, kD, 11), "fc");
    lora::linear<float> nf4(lora::quant::quantized_matrix::quantize(random(kD, kD, 11), lora::quant::qtype::nf4), "q");
    lora::linear<float>& layer = quantized ? nf4 : plain;
    for (int a = 0; a < 3; ++a) layer.add_adapter("a" + std::to_string(a), {4 + 6 * a, 8.0});
    lora::inference_workspace<float> ws;
    layer.infer(x, scattered, y, ws);
    layer.infer(x, consecutive, y, ws);
    {
      counting_scope scope;
      for (int i = 0; i < 3; ++i) {
        layer.infer(x, scattered, y, ws);
        layer.infer(x, consecutive, y, ws);
      }
    }
    EXPECT_EQ(g_news.load(), 0) << (quantized ? "nf4" : "f32");
    EXPECT_EQ(g_eigen_mallocs.load(), 0) << (quantized ? "nf4" : "f32");
  }
  lora::embedding<float> wte(random(50, kD, 12), "wte");
  for (int a = 0; a < 3; ++a) wte.add_adapter("a" + std::to_string(a), {4 + 6 * a, 8.0});
  std::vector<lora::index> ids;
  for (lora::index i = 0; i < kN; ++i) ids.push_back((7 * i) % 50);
  lora::inference_workspace<float> ws;
  wte.infer(ids, scattered, y, ws);
  {
    counting_scope scope;
    wte.infer(ids, scattered, y, ws);
  }
  EXPECT_EQ(g_news.load(), 0) << "embedding";
  EXPECT_EQ(g_eigen_mallocs.load(), 0) << "embedding";
}

// The counters work: an allocation inside the scope is seen.
TEST(no_alloc, counters_detect_allocations) {
  {
    counting_scope scope;
    mat m(64, 64);  // Eigen aligned_malloc while forbidden
    m.setZero();
    static int* volatile sink = nullptr;  // volatile: the compiler may not elide this new
    sink = new int(3);
    delete sink;
  }
  EXPECT_GE(g_news.load(), 1);
  EXPECT_GE(g_eigen_mallocs.load(), 1);
}

}  // namespace
