// PiSSA and OLoRA initialisation of lora::linear: residual + adapter reproduces the original weight and the
// layer starts equal to its base; the randomized SVD against the exact one; PEFT's conversion of a trained
// adapter into a rank-2r plain LoRA adapter against the original weight.
#include <cmath>
#include <lora/init.hpp>

#include "layer_support.hpp"
#include "support.hpp"

namespace {

using lora::index;
using lora_test::expect_error;
using lora_test::random_matrix;

/// U diag(σ) Vᵀ with σ_j = decay^j and random orthonormal U (m x k), V (n x k), k = min(m, n).
lora::matrix<double> decaying_spectrum(lora::rng& gen, index m, index n, double decay) {
  const index k = std::min(m, n);
  const auto u = lora::detail::orthonormal_basis<double>(random_matrix<double>(gen, m, k));
  const auto v = lora::detail::orthonormal_basis<double>(random_matrix<double>(gen, n, k));
  lora::vector<double> s(k);
  for (index j = 0; j < k; ++j) s(j) = std::pow(decay, static_cast<double>(j));
  return u * s.asDiagonal() * v.transpose();
}

lora::adapter_config config(index rank, double alpha, bool rslora = false) {
  lora::adapter_config c;
  c.rank = rank;
  c.alpha = alpha;
  c.use_rslora = rslora;
  return c;
}

/// Largest singular value.
template <typename Scalar>
double spectral_norm(const lora::matrix<Scalar>& m) {
  Eigen::JacobiSVD<lora::matrix<double>> svd(m.template cast<double>());
  return svd.singularValues()(0);
}

template <typename Scalar>
class init_typed : public ::testing::Test {};
TYPED_TEST_SUITE(init_typed, lora_test::scalar_types);

TYPED_TEST(init_typed, pissa_residual_plus_adapter_is_the_original_weight) {
  using S = TypeParam;
  lora::rng gen(1);
  const lora::matrix<S> w = random_matrix<S>(gen, 9, 7);
  const lora::matrix<S> x = random_matrix<S>(gen, 4, 7);
  lora::linear<S> layer(w, "fc");
  layer.add_adapter("default", config(3, 6.0));
  const auto y_base = layer.infer(x);  // B = 0: the base output
  const auto init = lora::init_pissa(layer, "default");
  const auto& a = layer.adapter("default");
  EXPECT_EQ(init.a, a.a());
  EXPECT_EQ(init.b, a.b());
  const lora::matrix<S> rebuilt = layer.weight() + a.scaling() * a.b() * a.a();
  EXPECT_LT(lora_test::rel_error(rebuilt, w), 10 * lora_test::tolerance<S>());
  EXPECT_LT(lora_test::rel_error(layer.infer(x), y_base), 10 * lora_test::tolerance<S>());
  // s B A is the best rank-r approximation: the residual's norm is σ_{r+1} of W.
  Eigen::JacobiSVD<lora::matrix<double>> svd(w.template cast<double>());
  EXPECT_NEAR(spectral_norm(layer.weight()), svd.singularValues()(3), 1e-3 * svd.singularValues()(0));
  // A's rows are orthogonal, B's columns too, with equal norms √(σ_i / s).
  const lora::matrix<double> aat = a.a().template cast<double>() * a.a().template cast<double>().transpose();
  const lora::matrix<double> btb = a.b().template cast<double>().transpose() * a.b().template cast<double>();
  EXPECT_LT(lora_test::rel_error(aat, lora::matrix<double>(aat.diagonal().asDiagonal())), 1e-4);
  EXPECT_LT(lora_test::rel_error(aat, btb), 1e-4);
  EXPECT_NEAR(aat(0, 0), svd.singularValues()(0) / double(a.scaling()), 1e-4);
}

TYPED_TEST(init_typed, olora_residual_plus_adapter_is_the_original_weight) {
  using S = TypeParam;
  lora::rng gen(2);
  const lora::matrix<S> w = random_matrix<S>(gen, 6, 10);
  const lora::matrix<S> x = random_matrix<S>(gen, 3, 10);
  lora::linear<S> layer(w, "fc");
  layer.add_adapter("default", config(4, 2.0));
  const auto y_base = layer.infer(x);
  lora::init_olora(layer, "default");
  const auto& a = layer.adapter("default");
  EXPECT_LT(lora_test::rel_error(lora::matrix<S>(layer.weight() + a.scaling() * a.b() * a.a()), w),
            10 * lora_test::tolerance<S>());
  EXPECT_LT(lora_test::rel_error(layer.infer(x), y_base), 10 * lora_test::tolerance<S>());
  // B = Q[:, :r] has orthonormal columns, A = R[:r, :] is upper triangular, and B A is W's first r columns'
  // projection: (Q_r R_r)[:, :r] = W[:, :r].
  EXPECT_LT(lora_test::rel_error(lora::matrix<S>(a.b().transpose() * a.b()), lora::matrix<S>::Identity(4, 4)),
            10 * lora_test::tolerance<S>());
  for (index i = 0; i < 4; ++i)
    for (index j = 0; j < i; ++j) EXPECT_EQ(a.a()(i, j), S(0));
  EXPECT_LT(lora_test::rel_error(lora::matrix<S>((a.b() * a.a()).leftCols(4)), lora::matrix<S>(w.leftCols(4))),
            10 * lora_test::tolerance<S>());
}

// GPT-2's Conv1D stores W as in x out; PiSSA decomposes W (out x in) and writes the residual into the
// user's in x out memory.
TEST(init_pissa, fan_in_fan_out_view_gets_the_residual_in_its_own_layout) {
  lora::rng gen(3);
  const lora::matrix<double> w_t = random_matrix<double>(gen, 8, 5);  // in x out
  lora::matrix<double> storage = w_t;
  lora::linear<double> layer(lora::view, storage, "c_fc", lora::weight_layout::in_out);
  layer.add_adapter("default", config(2, 4.0));
  lora::init_pissa(layer, "default");
  const auto& a = layer.adapter("default");
  EXPECT_LT(lora_test::rel_error(lora::matrix<double>(storage.transpose() + a.scaling() * a.b() * a.a()),
                                 lora::matrix<double>(w_t.transpose())),
            1e-12);
  EXPECT_EQ(a.a().cols(), 8);  // r x in
  EXPECT_EQ(a.b().rows(), 5);  // out x r
}

TEST(randomized_svd, matches_the_exact_svd_on_a_decaying_spectrum) {
  lora::rng gen(4);
  const lora::matrix<double> w = decaying_spectrum(gen, 60, 40, 0.7);
  const index k = 5;
  const auto exact = lora::exact_svd(w, k);
  lora::randomized_svd_options opt;
  opt.oversampling = 5;
  opt.power_iterations = 2;
  const auto fast = lora::randomized_svd(w, k, opt);
  EXPECT_LT(lora_test::rel_error(fast.s, exact.s), 1e-6);
  // Same subspaces: the projections agree.
  EXPECT_LT(lora_test::rel_error(lora::matrix<double>(fast.u * fast.u.transpose()),
                                 lora::matrix<double>(exact.u * exact.u.transpose())),
            1e-5);
  // The error is close to the optimum σ_{k+1} = 0.7^k.
  const lora::matrix<double> approx = fast.u * fast.s.asDiagonal() * fast.v.transpose();
  EXPECT_LT(spectral_norm<double>(w - approx), 1.01 * std::pow(0.7, static_cast<double>(k)));
  // With no oversampling and no power iteration (a plain range finder) the bound of Halko et al. still holds
  // comfortably on this matrix, but the estimate is visibly worse.
  opt.oversampling = 0;
  opt.power_iterations = 0;
  const auto crude = lora::randomized_svd(w, k, opt);
  EXPECT_GT(lora_test::rel_error(crude.s, exact.s), 1e-6);
  expect_error<lora::config_error>([&] { lora::randomized_svd(w, 41, opt); }, {"rank", "40"});
}

TEST(init_pissa, randomized_option_reproduces_the_weight_and_nearly_the_exact_factors) {
  lora::rng gen(5);
  const lora::matrix<double> w = decaying_spectrum(gen, 30, 24, 0.6);
  lora::linear<double> exact(w, "exact"), fast(w, "fast");
  exact.add_adapter("default", config(4, 8.0));
  fast.add_adapter("default", config(4, 8.0));
  lora::init_pissa(exact, "default");
  lora::randomized_svd_options opt;
  opt.power_iterations = 4;
  lora::init_pissa(fast, "default", opt);
  const auto& a = fast.adapter("default");
  EXPECT_LT(lora_test::rel_error(lora::matrix<double>(fast.weight() + a.scaling() * a.b() * a.a()), w), 1e-12);
  EXPECT_LT(lora_test::rel_error(fast.weight(), exact.weight()), 1e-6);
}

// A trained PiSSA/OLoRA adapter converted to rank 2r against the ORIGINAL weight gives the same layer.
TEST(convert_to_lora, reproduces_the_trained_delta_against_the_original_weight) {
  for (const bool pissa : {true, false}) {
    for (const bool rslora : {false, true}) {
      lora::rng gen(6);
      const lora::matrix<double> w = random_matrix<double>(gen, 7, 9);
      const lora::matrix<double> x = random_matrix<double>(gen, 5, 9);
      lora::linear<double> tuned(w, "fc");
      tuned.add_adapter("default", config(3, 5.0, rslora));
      const auto init = pissa ? lora::init_pissa(tuned, "default") : lora::init_olora(tuned, "default");
      // "Training": any change of A and B.
      auto& a = tuned.adapter("default");
      a.a() += 0.1 * random_matrix<double>(gen, 3, 9);
      a.b() += 0.1 * random_matrix<double>(gen, 7, 3);
      const auto factors = lora::convert_to_lora(a, init);
      EXPECT_EQ(factors.config.rank, 6);
      EXPECT_DOUBLE_EQ(factors.config.alpha, rslora ? 5.0 * std::sqrt(2.0) : 10.0);
      lora::linear<double> plain(w, "fc");  // the original weight
      auto& converted = lora::add_lora_adapter(plain, "converted", factors);
      EXPECT_NEAR(converted.scaling(), a.scaling(), 1e-15);
      EXPECT_LT(lora_test::rel_error(plain.infer(x), tuned.infer(x)), 1e-12);
      // ΔW = s (B A − B0 A0): W + ΔW equals the tuned residual layer's effective weight.
      const lora::matrix<double> delta = a.scaling() * (a.b() * a.a() - init.b * init.a);
      EXPECT_LT(lora_test::rel_error(lora::matrix<double>(converted.scaling() * converted.b() * converted.a()), delta),
                1e-12);
      EXPECT_LT(lora_test::rel_error(plain.merge_and_unload(), tuned.merge_and_unload()), 1e-12);
    }
  }
}

// A DoRA adapter starts with m = ‖W_res + s B A‖ = ‖W‖ per row, so the layer still starts equal to the base;
// its trained magnitude has no plain-LoRA form, so conversion refuses it.
TEST(init_pissa, dora_adapters_start_at_the_base_and_refuse_conversion) {
  lora::rng gen(7);
  const lora::matrix<double> w = random_matrix<double>(gen, 6, 8);
  const lora::matrix<double> x = random_matrix<double>(gen, 3, 8);
  for (const bool pissa : {true, false}) {
    lora::linear<double> layer(w, "fc");
    lora::adapter_config cfg = config(2, 4.0);
    cfg.use_dora = true;
    layer.add_adapter("dora", cfg);
    const auto init = pissa ? lora::init_pissa(layer, "dora") : lora::init_olora(layer, "dora");
    EXPECT_LT(lora_test::rel_error(layer.infer(x), lora::matrix<double>(x * w.transpose())), 1e-12);
    EXPECT_LT(lora_test::rel_error(layer.adapter("dora").magnitude(), lora::vector<double>(w.rowwise().norm())), 1e-15);
    expect_error<lora::config_error>([&] { lora::convert_to_lora(layer.adapter("dora"), init); }, {"'dora'", "DoRA"});
  }
}

TEST(init_pissa, errors_name_the_layer_the_adapter_and_the_limit) {
  lora::linear<double> layer(lora::matrix<double>::Ones(4, 6), "fc");
  layer.add_adapter("big", config(5, 1.0));
  expect_error<lora::config_error>([&] { lora::init_pissa(layer, "big"); },
                                   {"linear 'fc'", "PiSSA", "'big'", "min(out, in) = 4", "rank 5"});
  expect_error<lora::config_error>([&] { lora::init_olora(layer, "big"); }, {"OLoRA", "rank 5"});
  expect_error<lora::name_error>([&] { lora::init_pissa(layer, "nope"); }, {"nope"});
  layer.add_adapter("small", config(2, 1.0));
  layer.set_active({"big", "small"});
  layer.merge({"big"});
  expect_error<lora::state_error>([&] { lora::init_pissa(layer, "small"); }, {"fc", "merged", "unmerge"});
  layer.unmerge();
  const auto init = lora::init_olora(layer, "small");
  lora::initial_factors<double> wrong{init.a.leftCols(3), init.b};
  expect_error<lora::shape_error>([&] { lora::convert_to_lora(layer.adapter("small"), wrong); },
                                  {"'small'", "2x6", "2x3"});
  auto factors = lora::convert_to_lora(layer.adapter("small"), init);
  lora::linear<double> other(lora::matrix<double>::Ones(4, 5), "other");
  expect_error<lora::shape_error>([&] { lora::add_lora_adapter(other, "c", factors); }, {"other", "4x5", "4x6"});
  EXPECT_FALSE(other.has_adapter("c"));
}

}  // namespace
