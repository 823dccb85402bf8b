// Tests for the examples' shared helpers: the nn ops (examples/common/nn.hpp: every backward against
// central finite differences in double, softmax cross-entropy against hand-computed values), the
// minibatch helpers, the target domains (examples/common/domains.hpp) and the progress bar
// (examples/common/progress.hpp), and the string helpers (examples/common/strings.hpp).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iterator>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "common/domains.hpp"
#include "common/nn.hpp"
#include "common/progress.hpp"
#include "common/strings.hpp"
#include "support.hpp"

namespace {

using lora::index;
using lora::matrix;
using lora_test::expect_error;
using lora_test::numeric_gradient;
using lora_test::rel_error;

/// An n x d matrix of N(0, 1) draws.
matrix<double> normal_matrix(index n, index d, lora::rng& gen) {
  matrix<double> m(n, d);
  for (index j = 0; j < d; ++j) {
    for (index i = 0; i < n; ++i) m(i, j) = gen.normal();
  }
  return m;
}

/// Σ_ij a_ij b_ij, the linear probe L = <G, Y> whose gradient with respect to Y is G.
double dot(const matrix<double>& a, const matrix<double>& b) { return (a.array() * b.array()).sum(); }

// Finite differences of a function linear or piecewise smooth in its input are exact up to rounding
// at h = 1e-6, so analytic and numeric gradients agree to about 1e-8 relative.
constexpr double fd_tolerance = 1e-7;

// ----- dense --------------------------------------------------------------------------------------

TEST(nn_dense, backward_matches_finite_differences) {
  lora::rng gen(1);
  ex::dense<double> layer(5, 4, gen);
  matrix<double> x = normal_matrix(3, 5, gen);
  const matrix<double> g = normal_matrix(3, 4, gen);  // dL/dY for L = <G, Y>
  matrix<double> y, dx;
  layer.forward(x, y);
  layer.zero_grad();
  layer.backward(g, dx);

  const auto loss = [&] {
    matrix<double> out;
    layer.apply(x, out);
    return dot(g, out);
  };
  EXPECT_LT(rel_error(dx, numeric_gradient(x, loss)), fd_tolerance);
  EXPECT_LT(rel_error(layer.weight_grad, numeric_gradient(layer.weight, loss)), fd_tolerance);
  EXPECT_LT(rel_error(layer.bias_grad, numeric_gradient(layer.bias.data(), 4, 1, loss)), fd_tolerance);
}

TEST(nn_dense, forward_is_x_times_w_transposed_plus_bias) {
  lora::rng gen(2);
  ex::dense<double> layer(3, 2, gen);
  layer.weight << 1, 2, 3, 4, 5, 6;  // out x in
  layer.bias << 10, 20;
  matrix<double> x(2, 3), y;
  x << 1, 0, 0, 1, 1, 1;
  layer.forward(x, y);
  matrix<double> expected(2, 2);
  expected << 11, 24, 16, 35;
  EXPECT_EQ(y, expected);
}

TEST(nn_dense, backward_accumulates_until_zero_grad) {
  lora::rng gen(3);
  ex::dense<double> layer(4, 3, gen);
  const matrix<double> x = normal_matrix(5, 4, gen), g = normal_matrix(5, 3, gen);
  matrix<double> y;
  layer.forward(x, y);
  layer.backward(g);
  const matrix<double> once = layer.weight_grad;
  const lora::vector<double> once_b = layer.bias_grad;
  layer.backward(g);
  EXPECT_LT(rel_error(layer.weight_grad, 2 * once), 1e-14);
  EXPECT_LT(rel_error(layer.bias_grad, 2 * once_b), 1e-14);
  layer.zero_grad();
  EXPECT_EQ(layer.weight_grad.cwiseAbs().maxCoeff(), 0.0);
  EXPECT_EQ(layer.bias_grad.cwiseAbs().maxCoeff(), 0.0);
}

TEST(nn_dense, init_is_pytorch_uniform_within_one_over_sqrt_in) {
  lora::rng gen(4);
  ex::dense<float> layer(400, 300, gen);
  const double bound = 1.0 / std::sqrt(400.0);  // 0.05
  EXPECT_LE(layer.weight.cwiseAbs().maxCoeff(), bound);
  EXPECT_LE(layer.bias.cwiseAbs().maxCoeff(), bound);
  EXPECT_GT(layer.weight.cwiseAbs().maxCoeff(), 0.99 * bound);
  // U(-a, a) has mean 0 and variance a²/3.
  const matrix<double> w = layer.weight.cast<double>();
  const double mean = w.mean();
  const double var = (w.array() - mean).square().mean();
  EXPECT_NEAR(mean, 0.0, 0.01 * bound);
  EXPECT_NEAR(var, bound * bound / 3, 0.02 * bound * bound / 3);
  EXPECT_EQ(layer.weight_grad.rows(), 300);
  EXPECT_EQ(layer.weight_grad.cwiseAbs().maxCoeff(), 0.0f);
  // Deterministic from the seed.
  lora::rng same(4);
  ex::dense<float> again(400, 300, same);
  EXPECT_EQ(again.weight, layer.weight);
  EXPECT_EQ(again.bias, layer.bias);
}

TEST(nn_dense, parameters_are_named_views_of_weight_and_bias) {
  lora::rng gen(5);
  ex::dense<float> layer(6, 4, gen);
  lora::parameter_list<float> ps = layer.parameters("fc1");
  ASSERT_EQ(ps.size(), 2u);
  EXPECT_EQ(ps[0].name, "fc1.weight");
  EXPECT_EQ(ps[0].role, lora::param_role::dense);
  EXPECT_EQ(ps[0].rows, 4);
  EXPECT_EQ(ps[0].cols, 6);
  EXPECT_EQ(ps[0].value_data, layer.weight.data());
  EXPECT_EQ(ps[0].grad_data, layer.weight_grad.data());
  EXPECT_EQ(ps[1].name, "fc1.bias");
  EXPECT_EQ(ps[1].role, lora::param_role::vector);
  EXPECT_EQ(ps[1].size(), 4);
  EXPECT_EQ(ps[1].grad_data, layer.bias_grad.data());
  ps[1].value().setConstant(7.0f);
  EXPECT_EQ(layer.bias(3), 7.0f);
}

TEST(nn_dense, wrong_shapes_are_shape_errors) {
  lora::rng gen(6);
  ex::dense<double> layer(5, 4, gen);
  matrix<double> y;
  expect_error<lora::shape_error>([&] { layer.forward(matrix<double>::Zero(2, 6), y); },
                                  {"dense layer 5->4", "6 columns", "expected 5"});
  layer.forward(matrix<double>::Zero(2, 5), y);
  expect_error<lora::shape_error>([&] { layer.backward(matrix<double>::Zero(3, 4)); },
                                  {"dense layer 5->4", "3x4", "2x4"});
  expect_error<lora::config_error>([&] { ex::dense<double>(0, 4, gen); }, {"0->4"});
}

// ----- relu ---------------------------------------------------------------------------------------

TEST(nn_relu, forward_and_backward_match_finite_differences) {
  lora::rng gen(7);
  matrix<double> x = normal_matrix(4, 6, gen);
  // Keep every entry at least 0.1 from the kink at 0, where the derivative jumps.
  x = x.unaryExpr([](double v) { return v + (v >= 0 ? 0.1 : -0.1); });
  const matrix<double> g = normal_matrix(4, 6, gen);
  matrix<double> y, dx;
  ex::relu_forward(x, y);
  EXPECT_EQ(y, x.cwiseMax(0.0));
  ex::relu_backward(y, g, dx);
  const auto loss = [&] {
    matrix<double> out;
    ex::relu_forward(x, out);
    return dot(g, out);
  };
  EXPECT_LT(rel_error(dx, numeric_gradient(x, loss)), fd_tolerance);
}

TEST(nn_relu, works_in_place) {
  matrix<double> x(1, 4), dy(1, 4);
  x << -1, 2, 0, 3;
  dy << 5, 6, 7, 8;
  ex::relu_forward(x, x);
  ex::relu_backward(x, dy, dy);
  matrix<double> ex_y(1, 4), ex_dy(1, 4);
  ex_y << 0, 2, 0, 3;
  ex_dy << 0, 6, 0, 8;  // the gradient at exactly 0 is taken as 0
  EXPECT_EQ(x, ex_y);
  EXPECT_EQ(dy, ex_dy);
}

// ----- softmax cross-entropy ----------------------------------------------------------------------

TEST(nn_softmax_cross_entropy, matches_hand_computed_values) {
  matrix<double> logits(2, 3), probs;
  logits << 1, 2, 3, 0, 0, 0;
  // Row 0: log(e + e² + e³) - 3 = 0.40760596444438013; row 1: log 3 = 1.0986122886681098.
  const double loss = ex::softmax_cross_entropy_forward(logits, {2, 0}, probs);
  EXPECT_NEAR(loss, 0.753109126556245, 1e-15);
  EXPECT_NEAR(probs(0, 0), 0.09003057317038046, 1e-15);
  EXPECT_NEAR(probs(0, 1), 0.24472847105479767, 1e-15);
  EXPECT_NEAR(probs(0, 2), 0.6652409557748219, 1e-15);
  EXPECT_NEAR(probs(1, 1), 1.0 / 3, 1e-15);
  matrix<double> dlogits;
  ex::softmax_cross_entropy_backward(probs, {2, 0}, dlogits);
  EXPECT_NEAR(dlogits(0, 2), (0.6652409557748219 - 1) / 2, 1e-15);
  EXPECT_NEAR(dlogits(1, 0), (1.0 / 3 - 1) / 2, 1e-15);
  EXPECT_NEAR(dlogits(1, 2), (1.0 / 3) / 2, 1e-15);
}

TEST(nn_softmax_cross_entropy, is_stable_for_large_logits) {
  matrix<float> logits(2, 2), probs;
  logits << 1000, 0, -1000, 0;
  // Row 0: log(e¹⁰⁰⁰ + 1) - 0 = 1000; row 1: log(e⁻¹⁰⁰⁰ + 1) - 0 = 0.
  const double loss = ex::softmax_cross_entropy_forward(logits, {1, 1}, probs);
  EXPECT_NEAR(loss, 500.0, 1e-3);
  EXPECT_TRUE(probs.allFinite());
  EXPECT_EQ(probs(0, 0), 1.0f);
  EXPECT_EQ(probs(1, 1), 1.0f);
}

TEST(nn_softmax_cross_entropy, backward_matches_finite_differences) {
  lora::rng gen(8);
  matrix<double> logits = 3 * normal_matrix(5, 4, gen);
  const std::vector<int> labels = {0, 3, 1, 1, 2};
  matrix<double> probs, dlogits;
  ex::softmax_cross_entropy_forward(logits, labels, probs);
  ex::softmax_cross_entropy_backward(probs, labels, dlogits);
  const auto loss = [&] {
    matrix<double> p;
    return ex::softmax_cross_entropy_forward(logits, labels, p);
  };
  EXPECT_LT(rel_error(dlogits, numeric_gradient(logits, loss)), fd_tolerance);
}

TEST(nn_softmax_cross_entropy, bad_labels_are_shape_errors) {
  matrix<double> logits = matrix<double>::Zero(2, 3), probs;
  expect_error<lora::shape_error>([&] { ex::softmax_cross_entropy_forward(logits, {0}, probs); },
                                  {"1 labels for 2 rows"});
  expect_error<lora::shape_error>(
      [&] {
        ex::softmax_cross_entropy_forward(logits, {0, 3}, probs);
      },
      {"label 3 at row 1", "[0, 3)"});
  expect_error<lora::shape_error>([&] { ex::count_correct(logits, {-1, 0}); }, {"label -1 at row 0"});
}

// The ops composed into a two-layer MLP, fc2(relu(fc1(x))) under softmax cross-entropy: the chain of
// backward passes gives the gradient of the loss with respect to every parameter and the input.
TEST(nn_mlp, end_to_end_gradients_match_finite_differences) {
  lora::rng gen(9);
  ex::dense<double> fc1(6, 5, gen), fc2(5, 3, gen);
  matrix<double> x = normal_matrix(4, 6, gen);
  const std::vector<int> labels = {2, 0, 1, 2};
  matrix<double> h, a, logits, probs, dlogits, da, dh, dx;
  const auto loss = [&] {
    fc1.forward(x, h);
    ex::relu_forward(h, a);
    fc2.forward(a, logits);
    return ex::softmax_cross_entropy_forward(logits, labels, probs);
  };
  loss();
  fc1.zero_grad();
  fc2.zero_grad();
  ex::softmax_cross_entropy_backward(probs, labels, dlogits);
  fc2.backward(dlogits, da);
  ex::relu_backward(a, da, dh);
  fc1.backward(dh, dx);
  const matrix<double> g1 = fc1.weight_grad, g2 = fc2.weight_grad;
  const lora::vector<double> b1 = fc1.bias_grad, b2 = fc2.bias_grad;
  EXPECT_LT(rel_error(dx, numeric_gradient(x, loss)), fd_tolerance);
  EXPECT_LT(rel_error(g1, numeric_gradient(fc1.weight, loss)), fd_tolerance);
  EXPECT_LT(rel_error(b1, numeric_gradient(fc1.bias.data(), 5, 1, loss)), fd_tolerance);
  EXPECT_LT(rel_error(g2, numeric_gradient(fc2.weight, loss)), fd_tolerance);
  EXPECT_LT(rel_error(b2, numeric_gradient(fc2.bias.data(), 3, 1, loss)), fd_tolerance);
}

TEST(nn_accuracy, counts_rows_whose_argmax_is_the_label) {
  matrix<float> logits(4, 3);
  logits << 0, 1, 0,  // argmax 1
      5, 1, 2,        // argmax 0
      1, 1, 0,        // tie: the first, 0
      0, 0, 9;        // argmax 2
  EXPECT_EQ(ex::count_correct(logits, {1, 0, 1, 1}), 2);
  EXPECT_DOUBLE_EQ(ex::accuracy(logits, {1, 0, 0, 2}), 1.0);
  EXPECT_DOUBLE_EQ(ex::accuracy(matrix<float>(0, 3), {}), 0.0);
}

// ----- minibatches --------------------------------------------------------------------------------

TEST(nn_minibatches, every_epoch_visits_each_sample_once_in_a_fresh_order) {
  ex::minibatches batches(10, 4, 11);
  EXPECT_EQ(batches.count(), 3);
  EXPECT_EQ(batches.size(0), 4);
  EXPECT_EQ(batches.size(2), 2);
  std::vector<std::vector<index>> epochs;
  for (int e = 0; e < 3; ++e) {
    batches.shuffle();
    std::vector<index> seen;
    for (index k = 0; k < batches.count(); ++k)
      seen.insert(seen.end(), batches.rows(k), batches.rows(k) + batches.size(k));
    EXPECT_EQ(seen, batches.order());
    std::vector<index> sorted = seen;
    std::sort(sorted.begin(), sorted.end());
    std::vector<index> all(10);
    std::iota(all.begin(), all.end(), 0);
    EXPECT_EQ(sorted, all);
    epochs.push_back(seen);
  }
  EXPECT_NE(epochs[0], epochs[1]);
  EXPECT_NE(epochs[1], epochs[2]);
  // The same seed replays the same epochs.
  ex::minibatches replay(10, 4, 11);
  for (int e = 0; e < 3; ++e) {
    replay.shuffle();
    EXPECT_EQ(replay.order(), epochs[e]);
  }
  expect_error<lora::config_error>([] { ex::minibatches(10, 0, 1); }, {"batches of 0"});
}

TEST(nn_minibatches, gather_copies_the_chosen_rows_and_labels) {
  matrix<double> x(4, 3);
  x << 0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32;
  const std::vector<int> y = {5, 6, 7, 8};
  const index rows[] = {3, 1, 3};
  matrix<double> bx;
  std::vector<int> by;
  ex::gather_rows(x, rows, 3, bx);
  ex::gather_labels(y, rows, 3, by);
  matrix<double> expected(3, 3);
  expected << 30, 31, 32, 10, 11, 12, 30, 31, 32;
  EXPECT_EQ(bx, expected);
  EXPECT_EQ(by, (std::vector<int>{8, 6, 8}));
}

// ----- domains ------------------------------------------------------------------------------------

/// n synthetic 28 x 28 "garments": a few Gaussian blobs (σ 2.5 to 4 pixels) near the centre, in [0, 1].
matrix<float> blob_images(index n, std::uint64_t seed) {
  lora::rng gen(seed);
  matrix<float> x = matrix<float>::Zero(n, ex::image_pixels);
  for (index i = 0; i < n; ++i) {
    for (int b = 0; b < 3; ++b) {
      const double cr = gen.uniform(8, 20), cc = gen.uniform(8, 20), s = gen.uniform(2.5, 4);
      for (index r = 0; r < ex::image_side; ++r) {
        for (index c = 0; c < ex::image_side; ++c) {
          const double dr = static_cast<double>(r) - cr, dc = static_cast<double>(c) - cc;
          const double d2 = dr * dr + dc * dc;
          x(i, r * ex::image_side + c) += static_cast<float>(std::exp(-d2 / (2 * s * s)));
        }
      }
    }
  }
  return x.cwiseMin(1.0f);
}

/// Pearson correlation of all entries of a and b.
double correlation(const matrix<float>& a, const matrix<float>& b) {
  const Eigen::ArrayXd u = Eigen::Map<const Eigen::ArrayXf>(a.data(), a.size()).cast<double>();
  const Eigen::ArrayXd v = Eigen::Map<const Eigen::ArrayXf>(b.data(), b.size()).cast<double>();
  const Eigen::ArrayXd du = u - u.mean(), dv = v - v.mean();
  return (du * dv).sum() / std::sqrt(du.square().sum() * dv.square().sum());
}

TEST(example_domains, preserve_shape_and_range) {
  const matrix<float> x = blob_images(6, 1);
  for (const ex::domain d : {ex::domain::mild, ex::domain::extreme}) {
    SCOPED_TRACE(ex::to_string(d));
    const matrix<float> y = ex::shift_domain(x, d);
    EXPECT_EQ(y.rows(), 6);
    EXPECT_EQ(y.cols(), 784);
    EXPECT_GE(y.minCoeff(), 0.0f);
    EXPECT_LE(y.maxCoeff(), 1.0f + 1e-6f);  // bilinear weights sum to 1 up to float rounding
    EXPECT_EQ(ex::shift_domain(x, d), y);   // deterministic
  }
  const matrix<float> inverted = ex::extreme_shift(x, {0x5eedf00du, true});
  EXPECT_GE(inverted.minCoeff(), 0.0f);
  EXPECT_LE(inverted.maxCoeff(), 1.0f);
  expect_error<lora::shape_error>([] { ex::mild_shift(matrix<float>::Zero(2, 783)); }, {"2x783", "n x 784"});
}

TEST(example_domains, mild_shift_is_a_small_change_and_extreme_is_not) {
  const matrix<float> x = blob_images(16, 2);
  const matrix<float> mild = ex::mild_shift(x);
  const matrix<float> extreme = ex::extreme_shift(x);
  const double mild_corr = correlation(x, mild);
  const double extreme_corr = correlation(x, extreme);
  EXPECT_GT(mild_corr, 0.7);
  EXPECT_LT(mild_corr, 0.999);  // but a change
  EXPECT_LT(std::abs(extreme_corr), 0.3);
  // Mass is kept: the blobs stay inside the frame, so little ink is lost to the border.
  EXPECT_NEAR(mild.sum() / x.sum(), 1.0, 0.02);
}

TEST(example_domains, zero_rotation_and_whole_pixel_shifts_are_exact) {
  const matrix<float> x = blob_images(3, 3);
  EXPECT_EQ(ex::mild_shift(x, {0.0, 0.0, 0.0}), x);
  // Shifting right by 2 and down by 1: out(r, c) = in(r - 1, c - 2), zero where that is outside.
  const matrix<float> y = ex::mild_shift(x, {0.0, 2.0, 1.0});
  for (index r = 0; r < 28; ++r) {
    for (index c = 0; c < 28; ++c) {
      const bool inside = r >= 1 && c >= 2;
      for (index i = 0; i < 3; ++i) {
        ASSERT_EQ(y(i, r * 28 + c), inside ? x(i, (r - 1) * 28 + c - 2) : 0.0f) << r << "," << c;
      }
    }
  }
}

TEST(example_domains, rotation_turns_clockwise_as_displayed) {
  // A single lit pixel right of the centre (row 13.5, column 20 in bilinear terms: rows 13 and 14)
  // rotated by +90 degrees lands below the centre.
  matrix<float> x = matrix<float>::Zero(1, 784);
  x(0, 13 * 28 + 20) = 1.0f;
  x(0, 14 * 28 + 20) = 1.0f;
  const matrix<float> y = ex::mild_shift(x, {90.0, 0.0, 0.0});
  index best = 0;
  y.row(0).maxCoeff(&best);
  EXPECT_EQ(best / 28, 20);  // row 20: below the centre
  EXPECT_TRUE(best % 28 == 13 || best % 28 == 14);
}

TEST(example_domains, permutation_is_a_deterministic_invertible_bijection) {
  const std::vector<index> perm = ex::pixel_permutation(784, 42);
  EXPECT_EQ(perm, ex::pixel_permutation(784, 42));
  EXPECT_NE(perm, ex::pixel_permutation(784, 43));
  EXPECT_EQ(std::set<index>(perm.begin(), perm.end()).size(), 784u);
  EXPECT_GE(*std::min_element(perm.begin(), perm.end()), 0);
  EXPECT_LT(*std::max_element(perm.begin(), perm.end()), 784);
  index fixed = 0;
  for (index p = 0; p < 784; ++p) fixed += perm[p] == p;
  EXPECT_LT(fixed, 10);  // a random permutation has about one fixed point

  const std::vector<index> inv = ex::inverse_permutation(perm);
  for (index p = 0; p < 784; ++p) EXPECT_EQ(inv[perm[p]], p);
  const matrix<float> x = blob_images(4, 4);
  const matrix<float> y = ex::permutation_map(perm).apply(x);
  EXPECT_EQ(ex::permutation_map(inv).apply(y), x);
  // The extreme domain is exactly this permutation (with the default seed), optionally inverted.
  const ex::extreme_shift_options options;
  const matrix<float> permuted = ex::permutation_map(ex::pixel_permutation(784, options.seed)).apply(x);
  EXPECT_EQ(ex::extreme_shift(x), permuted);
  EXPECT_EQ(ex::extreme_shift(x, {options.seed, true}), (1.0f - permuted.array()).matrix());

  expect_error<lora::config_error>([] { ex::inverse_permutation({0, 2, 2}); }, {"entry 2 = 2", "repeated"});
}

TEST(example_domains, names_round_trip) {
  EXPECT_EQ(ex::parse_domain("mild"), ex::domain::mild);
  EXPECT_EQ(ex::parse_domain(ex::to_string(ex::domain::extreme)), ex::domain::extreme);
  expect_error<lora::config_error>([] { ex::parse_domain("medium"); }, {"'medium'", "'mild' or 'extreme'"});
}

// ----- progress -----------------------------------------------------------------------------------

TEST(example_progress, forced_bar_draws_label_counts_loss_and_ends_the_line) {
  std::FILE* out = std::tmpfile();
  ASSERT_NE(out, nullptr);
  {
    ex::progress_bar bar(false, true, out);
    EXPECT_TRUE(bar.enabled());
    bar.begin(2, 5, 4);
    bar.step(100, 0.5);
    bar.step(100, 0.3);
    bar.step(100, 0.4);
    bar.step(50, 1.0);  // the last step always draws
    EXPECT_EQ(bar.steps_done(), 4);
    EXPECT_EQ(bar.samples_done(), 350);
    EXPECT_NEAR(bar.mean_loss(), (50 + 30 + 40 + 50) / 350.0, 1e-12);
    bar.finish();
  }
  std::rewind(out);
  std::string text;
  for (int c; (c = std::fgetc(out)) != EOF;) text += static_cast<char>(c);
  std::fclose(out);
  EXPECT_NE(text.find("\repoch 2/5 [####################] 4/4 loss 0.4857"), std::string::npos) << text;
  EXPECT_NE(text.find("samples/s in 00:00"), std::string::npos) << text;
  EXPECT_EQ(text.back(), '\n');
}

TEST(example_progress, quiet_or_non_terminal_bar_draws_nothing_but_counts) {
  std::FILE* out = std::tmpfile();
  ASSERT_NE(out, nullptr);
  {
    ex::progress_bar quiet(true, true, out);
    ex::progress_bar file(false, false, out);  // a file is not a terminal
    EXPECT_FALSE(quiet.enabled());
    EXPECT_FALSE(file.enabled());
    quiet.begin("eval", 1);
    quiet.step(10, 2.0);
    quiet.finish();
    file.begin("eval", 1);
    file.step(10, 2.0);
    file.finish();
    EXPECT_EQ(quiet.mean_loss(), 2.0);
  }
  EXPECT_EQ(std::ftell(out), 0);
  std::fclose(out);
}

TEST(example_progress, durations_read_as_minutes_and_seconds) {
  EXPECT_EQ(ex::format_duration(7.2), "00:07");
  EXPECT_EQ(ex::format_duration(125), "02:05");
  EXPECT_EQ(ex::format_duration(3725), "1:02:05");
  EXPECT_EQ(ex::format_duration(-1), "00:00");
}

TEST(example_progress, rss_figures_come_from_proc_self_status) {
  const std::uint64_t now = ex::current_rss_bytes();
  const std::uint64_t peak = ex::peak_rss_bytes();  // read second: the process may grow in between
#ifdef __linux__
  EXPECT_GT(now, 0u);
  EXPECT_GE(peak, now);
  EXPECT_EQ(peak % 1024, 0u);
#endif
  (void)peak;
  (void)now;
}

// ----- strings and files --------------------------------------------------------------------------

TEST(example_strings, cat_streams_every_part_and_shape_str_prints_rows_x_cols) {
  EXPECT_EQ(ex::cat("layer ", 3, ": ", 0.5, ' ', std::string("ok")), "layer 3: 0.5 ok");
  EXPECT_EQ(ex::shape_str(28, 784), "28x784");
}

}  // namespace
