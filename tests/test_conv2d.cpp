// lora::conv2d: im2col + GEMM against a naive direct convolution over stride/padding/dilation/groups,
// LoRA against the same convolution with the merged kernel W + s B A, gradients (dX, dA, dB) against
// finite differences, exact merge/unmerge on PyTorch's row-major kernel layout, and errors.
#include <lora/conv2d.hpp>

#include "layer_support.hpp"
#include "support.hpp"

namespace {

using lora::index;
using lora_test::bitwise_equal;
using lora_test::expect_error;
using lora_test::random_matrix;

struct conv_case {
  index c, o, h, w, kh, kw, stride, pad, dil, groups;
  const char* label;
};

lora::conv2d_options options_of(const conv_case& k) {
  lora::conv2d_options o;
  o.in_channels = k.c;
  o.input = {k.h, k.w};
  o.kernel = {k.kh, k.kw};
  o.stride = {k.stride, k.stride};
  o.padding = {k.pad, k.pad};
  o.dilation = {k.dil, k.dil};
  o.groups = k.groups;
  return o;
}

/// Y(s, (o Ho + y) Wo + x) = b_o + Σ_{c in o's group, i, j} W(o, (c' kh + i) kw + j) X(s, c, y sh − ph + i dh,
/// x sw − pw + j dw), straight from the definition, in double.
template <typename Scalar>
lora::matrix<double> direct_conv(const lora::matrix<Scalar>& x, const lora::matrix<double>& w,
                                 const lora::vector<double>& b, const lora::conv2d_options& o) {
  const index n = x.rows(), C = o.in_channels, O = w.rows(), H = o.input.h, W = o.input.w;
  const index kh = o.kernel.h, kw = o.kernel.w, cg = C / o.groups, og = O / o.groups;
  const index oh = (H + 2 * o.padding.h - o.dilation.h * (kh - 1) - 1) / o.stride.h + 1;
  const index ow = (W + 2 * o.padding.w - o.dilation.w * (kw - 1) - 1) / o.stride.w + 1;
  lora::matrix<double> y(n, O * oh * ow);
  for (index s = 0; s < n; ++s)
    for (index out = 0; out < O; ++out)
      for (index y0 = 0; y0 < oh; ++y0)
        for (index x0 = 0; x0 < ow; ++x0) {
          double acc = b.size() ? b(out) : 0.0;
          for (index cc = 0; cc < cg; ++cc)
            for (index i = 0; i < kh; ++i)
              for (index j = 0; j < kw; ++j) {
                const index iy = y0 * o.stride.h - o.padding.h + i * o.dilation.h;
                const index ix = x0 * o.stride.w - o.padding.w + j * o.dilation.w;
                if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
                const index c = out / og * cg + cc;
                acc += w(out, (cc * kh + i) * kw + j) * double(x(s, (c * H + iy) * W + ix));
              }
          y(s, (out * oh + y0) * ow + x0) = acc;
        }
  return y;
}

const conv_case k_cases[] = {
    {3, 4, 6, 5, 3, 3, 1, 0, 1, 1, "3x3 valid"},
    {3, 4, 6, 5, 3, 3, 1, 1, 1, 1, "3x3 same"},
    {2, 3, 7, 8, 3, 2, 2, 1, 1, 1, "stride 2, 3x2 kernel"},
    {2, 2, 9, 9, 3, 3, 1, 2, 2, 1, "dilation 2"},
    {4, 6, 7, 6, 3, 3, 2, 1, 2, 2, "groups 2, stride 2, dilation 2"},
    {4, 4, 5, 5, 3, 3, 1, 1, 1, 4, "depthwise"},
    {3, 5, 4, 4, 1, 1, 1, 0, 1, 1, "1x1"},
    {1, 2, 5, 4, 4, 4, 3, 3, 1, 1, "padding wider than the stride"},
};

template <typename Scalar>
class conv2d_typed : public ::testing::Test {};
TYPED_TEST_SUITE(conv2d_typed, lora_test::scalar_types);

TYPED_TEST(conv2d_typed, base_matches_a_direct_convolution) {
  using S = TypeParam;
  lora::rng gen(1);
  for (const auto& k : k_cases) {
    const auto o = options_of(k);
    const lora::matrix<S> w = random_matrix<S>(gen, k.o, k.c / k.groups * k.kh * k.kw);
    const lora::vector<S> b = random_matrix<S>(gen, k.o, 1).col(0);
    const lora::matrix<S> x = random_matrix<S>(gen, 3, k.c * k.h * k.w);
    lora::conv2d<S> conv(w, b, o, "conv");
    const auto expected = direct_conv(x, w.template cast<double>(), b.template cast<double>(), o);
    EXPECT_LT(lora_test::rel_error(conv.forward(x), expected), 10 * lora_test::tolerance<S>()) << k.label;
    EXPECT_LT(lora_test::rel_error(conv.infer(x), expected), 10 * lora_test::tolerance<S>()) << k.label;
    EXPECT_EQ(conv.out_features(), expected.cols()) << k.label;
  }
}

TYPED_TEST(conv2d_typed, lora_equals_the_convolution_with_kernel_w_plus_s_b_a_and_merges_exactly) {
  using S = TypeParam;
  using row_major = Eigen::Matrix<S, -1, -1, Eigen::RowMajor>;
  lora::rng gen(2);
  for (const auto& k : k_cases) {
    if (k.groups != 1) continue;
    const auto o = options_of(k);
    const lora::matrix<S> w = random_matrix<S>(gen, k.o, k.c * k.kh * k.kw);
    row_major torch_weight = w;  // PyTorch's contiguous (O, C, kh, kw)
    lora::conv2d<S> conv(lora::view, torch_weight, o, "conv");
    lora::adapter_config cfg;
    cfg.rank = 2;
    cfg.alpha = 4.0;
    cfg.init = lora::init_method::random_ab;
    const auto& a = conv.add_adapter("default", cfg);
    EXPECT_EQ(a.a().cols(), k.c * k.kh * k.kw);
    const lora::matrix<S> x = random_matrix<S>(gen, 2, k.c * k.h * k.w);
    const lora::matrix<double> merged_kernel =
        w.template cast<double>() + double(a.scaling()) * a.b().template cast<double>() * a.a().template cast<double>();
    const auto expected = direct_conv(x, merged_kernel, lora::vector<double>(), o);
    const auto y = conv.forward(x);
    EXPECT_LT(lora_test::rel_error(y, expected), 10 * lora_test::tolerance<S>()) << k.label;
    conv.merge();
    EXPECT_LT(lora_test::rel_error(lora::matrix<S>(torch_weight), merged_kernel), 10 * lora_test::tolerance<S>());
    EXPECT_LT(lora_test::rel_error(conv.infer(x), expected), 10 * lora_test::tolerance<S>()) << k.label;
    conv.unmerge();
    for (int cycle = 0; cycle < 50; ++cycle) {
      conv.merge();
      conv.unmerge();
    }
    EXPECT_TRUE(bitwise_equal(lora::matrix<S>(torch_weight), w)) << k.label;
  }
}

struct grad_case {
  conv_case shape;
  bool adapters;
  double dropout;
};

class conv2d_gradients : public ::testing::TestWithParam<grad_case> {};

// Loss L = Σ (Y ⊙ G), so dL/dY = G.
TEST_P(conv2d_gradients, match_finite_differences) {
  const grad_case c = GetParam();
  lora::rng gen(3);
  const auto o = options_of(c.shape);
  lora::conv2d<double> conv(random_matrix<double>(gen, c.shape.o, c.shape.c / c.shape.groups * c.shape.kh * c.shape.kw),
                            random_matrix<double>(gen, c.shape.o, 1).col(0), o, "conv");
  std::vector<std::string> names;
  if (c.adapters) {
    for (int i = 0; i < 2; ++i) {
      lora::adapter_config cfg;
      cfg.rank = 2 + i;
      cfg.alpha = 3.0 + i;
      cfg.seed = static_cast<std::uint64_t>(i);
      cfg.dropout = c.dropout;
      cfg.init = lora::init_method::random_ab;
      names.push_back("ad" + std::to_string(i));
      conv.add_adapter(names.back(), cfg);
    }
    conv.set_active(names);
  }
  std::vector<lora::rng::state_type> states;
  for (const auto& n : names) states.push_back(conv.adapter(n).dropout_rng().state());
  auto rewind = [&] {
    for (std::size_t i = 0; i < names.size(); ++i) conv.adapter(names[i]).dropout_rng().set_state(states[i]);
  };
  lora::matrix<double> x = random_matrix<double>(gen, 2, conv.in_features());
  const lora::matrix<double> g = random_matrix<double>(gen, 2, conv.out_features());
  auto loss = [&] {
    rewind();
    return conv.forward(x).cwiseProduct(g).sum();
  };
  rewind();
  conv.forward(x);
  const lora::matrix<double> dx = conv.backward(g);
  EXPECT_LT(lora_test::rel_error(dx, lora_test::numeric_gradient(x, loss)), 1e-8) << c.shape.label;
  for (const auto& n : names) {
    auto& a = conv.adapter(n);
    const lora::matrix<double> da = a.grad_a(), db = a.grad_b();
    EXPECT_LT(lora_test::rel_error(da, lora_test::numeric_gradient(a.a(), loss)), 1e-8) << c.shape.label << " dA";
    EXPECT_LT(lora_test::rel_error(db, lora_test::numeric_gradient(a.b(), loss)), 1e-8) << c.shape.label << " dB";
    EXPECT_GT(da.norm(), 0.0);
    // backward_params_only accumulates the same gradients.
    conv.zero_grad();
    rewind();
    conv.forward(x);
    conv.backward_params_only(g);
    EXPECT_LT(lora_test::rel_error(a.grad_a(), da), 1e-12);
    EXPECT_LT(lora_test::rel_error(a.grad_b(), db), 1e-12);
  }
}

INSTANTIATE_TEST_SUITE_P(shapes, conv2d_gradients,
                         ::testing::Values(grad_case{{2, 3, 5, 4, 3, 3, 1, 1, 1, 1, "3x3 same"}, true, 0.0},
                                           grad_case{{2, 2, 7, 6, 3, 2, 2, 1, 2, 1, "stride 2, dilation 2"}, true, 0.0},
                                           grad_case{{2, 2, 5, 5, 3, 3, 2, 2, 1, 1, "with dropout"}, true, 0.4},
                                           grad_case{{4, 4, 5, 4, 3, 3, 1, 1, 1, 2, "groups 2 (frozen)"}, false, 0.0}));

// PEFT's conv DoRA normalises each output channel's kernel (its row of W + s B A); on Col that is linear's
// DoRA, so the layer is the convolution with kernel diag(m / ‖W + s B A‖) (W + s B A). The norm is a
// constant in backward, so dX and dm (not dA, dB) are exact derivatives of the loss.
TEST(conv2d, dora_is_the_convolution_with_the_rescaled_kernel) {
  lora::rng gen(4);
  const conv_case k{2, 3, 6, 5, 3, 3, 2, 1, 1, 1, "dora"};
  const auto o = options_of(k);
  const lora::matrix<double> w = random_matrix<double>(gen, 3, 18);
  lora::matrix<double> storage = w;
  lora::conv2d<double> conv(lora::view, storage, o, "conv");
  lora::adapter_config cfg = lora_test::random_config(2, 4.0, 1);
  cfg.use_dora = true;
  auto& a = conv.add_adapter("default", cfg);
  a.magnitude() = (random_matrix<double>(gen, 3, 1).array() + 2.0).matrix();
  const lora::matrix<double> v = w + a.scaling() * a.b() * a.a();
  const lora::matrix<double> kernel = a.magnitude().cwiseQuotient(v.rowwise().norm()).asDiagonal() * v;
  lora::matrix<double> x = random_matrix<double>(gen, 2, conv.in_features());
  const lora::matrix<double> g = random_matrix<double>(gen, 2, conv.out_features());
  EXPECT_LT(lora_test::rel_error(conv.forward(x), direct_conv(x, kernel, lora::vector<double>(), o)), 1e-12);
  const lora::matrix<double> dx = conv.backward(g);
  auto loss = [&] { return conv.infer(x).cwiseProduct(g).sum(); };
  EXPECT_LT(lora_test::rel_error(dx, lora_test::numeric_gradient(x, loss)), 1e-8);
  const lora::matrix<double> dm = a.grad_magnitude();
  EXPECT_LT(lora_test::rel_error(dm, lora_test::numeric_gradient(a.magnitude().data(), 3, 1, loss)), 1e-8);
  conv.merge();
  EXPECT_LT(lora_test::rel_error(storage, kernel), 1e-12);
  conv.unmerge();
  EXPECT_TRUE(bitwise_equal(storage, w));
}

TEST(conv2d, errors_name_the_layer_and_the_shapes) {
  lora::conv2d_options o;
  o.in_channels = 4;
  o.input = {5, 5};
  o.kernel = {3, 3};
  o.groups = 2;
  lora::conv2d<double> grouped(lora::matrix<double>::Ones(6, 18), o, "dw");
  expect_error<lora::config_error>([&] { grouped.add_adapter("default"); }, {"conv2d 'dw'", "groups = 2", "merged"});
  expect_error<lora::shape_error>([&] { lora::conv2d<double>(lora::matrix<double>::Ones(6, 36), o, "c"); },
                                  {"conv2d 'c'", "6x18", "6x36"});
  o.groups = 3;
  expect_error<lora::config_error>([&] { lora::conv2d<double>(lora::matrix<double>::Ones(6, 12), o, "c"); },
                                   {"divisible by groups", "groups = 3"});
  o.groups = 1;
  o.kernel = {7, 7};
  expect_error<lora::shape_error>([&] { lora::conv2d<double>(lora::matrix<double>::Ones(2, 196), o, "c"); },
                                  {"does not fit", "5x5"});
  o.kernel = {3, 3};
  lora::conv2d<double> conv(lora::matrix<double>::Ones(2, 36), o, "c1");
  expect_error<lora::shape_error>([&] { conv.forward(lora::matrix<double>::Ones(1, 99)); }, {"c1", "= 100", "1x99"});
  expect_error<lora::state_error>([&] { conv.backward(lora::matrix<double>::Ones(1, 18)); }, {"c1", "forward"});
  conv.forward(lora::matrix<double>::Ones(1, 100));
  expect_error<lora::shape_error>([&] { conv.backward(lora::matrix<double>::Ones(2, 18)); }, {"dY", "1x18", "2x18"});
}

TEST(conv2d, report_input_size_and_parameters) {
  lora::conv2d_options o;
  o.in_channels = 3;
  o.input = {8, 8};
  o.kernel = {3, 3};
  o.padding = {1, 1};
  lora::conv2d<double> conv(lora::matrix<double>::Ones(4, 27), lora::vector<double>::Zero(4), o, "conv1");
  lora::adapter_config cfg;
  cfg.rank = 2;
  conv.add_adapter("default", cfg);
  const auto ps = conv.parameters();
  ASSERT_EQ(ps.size(), 2u);
  EXPECT_EQ(ps[0].name, "conv1.lora_A.default.weight");
  EXPECT_EQ(ps[0].cols, 27);
  EXPECT_EQ(ps[1].rows, 4);
  auto r = conv.report();
  EXPECT_EQ(r.frozen_params, 4 * 27 + 4);
  EXPECT_EQ(r.trainable_params, 2 * 27 + 4 * 2);
  conv.forward(lora::matrix<double>::Ones(2, 3 * 64));
  EXPECT_GE(conv.report().cache_bytes, static_cast<std::int64_t>(2 * 64 * 27 * sizeof(double)));
  conv.set_input_size({4, 6});
  EXPECT_EQ(conv.output_size().h, 4);
  EXPECT_EQ(conv.output_size().w, 6);
  EXPECT_EQ(conv.infer(lora::matrix<double>::Ones(1, 3 * 24)).cols(), 4 * 24);
  expect_error<lora::config_error>([&] { conv.set_input_size({0, 0}); }, {"conv1", "input size"});
  EXPECT_EQ(conv.options().input.w, 6);
}

}  // namespace
