// tests/test_combine.cpp: adapter arithmetic (lora/combine.hpp): every combination type on small cases
// worked by hand, the prune / vote / merge steps of detail/combine_ops.hpp, the SVD path and its clamp,
// DARE's seeded masks, the rules and refusals, and add_weighted_adapter on each layer kind.
#include <algorithm>
#include <cmath>
#include <lora/lora.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "layer_support.hpp"
#include "support.hpp"

namespace {

using lora::combination_type;
using lora::index;
using lora_test::expect_error;
using mat = lora::matrix<double>;

/// A row-major literal: rows({{1, 2}, {3, 4}}).
mat rows(std::initializer_list<std::initializer_list<double>> values) {
  mat m(static_cast<index>(values.size()), static_cast<index>(values.begin()->size()));
  index i = 0;
  for (const auto& row : values) {
    index j = 0;
    for (const double v : row) m(i, j++) = v;
    ++i;
  }
  return m;
}

lora::combine_options with_type(combination_type type, std::optional<double> density = std::nullopt) {
  lora::combine_options o;
  o.type = type;
  o.density = density;
  return o;
}

// --- cat and linear: the factor path, by hand ---------------------------------------------------------

template <typename Scalar>
class CombineCat : public ::testing::Test {};
TYPED_TEST_SUITE(CombineCat, lora_test::scalar_types, );

// c1 = 0.5 * 2 = 1, c2 = -2 * 1 = -2: A = [c1 A1; c2 A2], B = [B1, B2], B A = Σ c_i B_i A_i exactly.
TYPED_TEST(CombineCat, StacksScaledRowsOfAAndColumnsOfB) {
  using S = TypeParam;
  const std::vector<lora::combine_source<S>> sources = {
      {rows({{1, 2, 0}}).cast<S>(), rows({{1}, {2}}).cast<S>(), 2.0, 0.5},
      {rows({{0, 1, -1}}).cast<S>(), rows({{3}, {-1}}).cast<S>(), 1.0, -2.0}};
  const auto f = lora::combine_factors(sources, with_type(combination_type::cat));
  EXPECT_EQ(f.rank(), 2);
  EXPECT_TRUE(lora_test::bitwise_equal(f.a, rows({{1, 2, 0}, {-0.0, -2, 2}}).cast<S>()));  // -2 · 0 = -0, as torch
  EXPECT_TRUE(lora_test::bitwise_equal(f.b, rows({{1, 3}, {2, -1}}).cast<S>()));
  EXPECT_TRUE(lora_test::bitwise_equal(lora::matrix<S>(f.b * f.a), rows({{1, -4, 6}, {2, 6, -2}}).cast<S>()));
}

TEST(CombineLinear, OneAdapterIsExactWithTheSignOnA) {
  const mat a1 = rows({{1, 2, 3}, {0, -1, 4}}), b1 = rows({{2, 1}, {-3, 5}});
  // c = w s = 2 * 2 = 4: A = 2 A1, B = 2 B1.
  auto f = lora::combine_factors<double>({{a1, b1, 2.0, 2.0}}, with_type(combination_type::linear));
  EXPECT_EQ(f.a, mat(2 * a1));
  EXPECT_EQ(f.b, mat(2 * b1));
  EXPECT_EQ(mat(f.b * f.a), mat(4 * (b1 * a1)));
  // c = -4: the sign goes on A only, so B A = -4 B1 A1.
  f = lora::combine_factors<double>({{a1, b1, 2.0, -2.0}}, with_type(combination_type::linear));
  EXPECT_EQ(f.a, mat(-2 * a1));
  EXPECT_EQ(f.b, mat(2 * b1));
  EXPECT_EQ(mat(f.b * f.a), mat(-4 * (b1 * a1)));
}

// c1 = 4 * 1 = 4 (A weight 2, B weight 2), c2 = -2 * 0.5 = -1 (A weight -1, B weight 1).
TEST(CombineLinear, TwoAdaptersSumFactorsWithRootWeights) {
  const auto f = lora::combine_factors<double>(
      {{rows({{1, 2}}), rows({{1}, {0}}), 1.0, 4.0}, {rows({{3, -1}}), rows({{0}, {1}}), 0.5, -2.0}},
      with_type(combination_type::linear));
  EXPECT_EQ(f.a, rows({{-1, 5}}));
  EXPECT_EQ(f.b, rows({{2}, {1}}));
}

// --- TIES: magnitude prune, sign election, disjoint merge ---------------------------------------------

// Three rank-1 sources (in 4, out 1, B = 1), density 1 (no pruning), c = (4, 1, 1): A weights (2, 1, 1).
// Column by column, total = sgn Σ τ: (1, 1, 0, 0) elects + everywhere (a sum of 0 elects +); zeros never
// agree. frequency = sgn Σ sgn τ: (0, -1, 0, 0) elects − in column 2, where the mean of the agreeing
// weighted entries is (2·(−1) + 1·(−1)) / 2.
std::vector<lora::combine_source<double>> vote_sources() {
  const mat b = rows({{1}});
  return {{rows({{2, -1, 0, 1}}), b, 1.0, 4.0},
          {rows({{-1, -1, 3, -1}}), b, 1.0, 1.0},
          {rows({{0, 3, -3, 0}}), b, 1.0, 1.0}};
}

TEST(CombineTies, TotalVoteWithATieAndZeros) {
  const auto f = lora::combine_factors(vote_sources(), with_type(combination_type::ties, 1.0));
  EXPECT_EQ(f.a, rows({{4, 3, 3, 2}}));
  EXPECT_EQ(f.b, rows({{4.0 / 3.0}}));  // every B agrees: (2 + 1 + 1) / 3
}

TEST(CombineTies, FrequencyVoteDiffersFromTotal) {
  auto o = with_type(combination_type::ties, 1.0);
  o.sign_method = lora::majority_sign::frequency;
  const auto f = lora::combine_factors(vote_sources(), o);
  EXPECT_EQ(f.a, rows({{4, -1.5, 3, 2}}));
}

TEST(CombineTies, NegativeWeightsDoNotVote) {
  // c2 = -1 puts −1 on A2's weight; the vote still sees A2 itself, so column 3 (0 + 3 − 3 = 0) elects +
  // and keeps A2's 3, which the weight then turns into −3.
  auto sources = vote_sources();
  sources[1].weight = -1.0;
  const auto f = lora::combine_factors(sources, with_type(combination_type::ties, 1.0));
  EXPECT_EQ(f.a, rows({{4, 3, -3, 2}}));
}

TEST(CombineTies, PrunesBeforeVoting) {
  // density 0.5 keeps 2 of 4 entries per A: A1 → (2, -1, 0, 0) (|2| and |-1| beat 1 by row-major order),
  // A2 → (0, 0, 3, 0) with the tie |-1| = |-1| = |-1| lost to |3| and the earliest -1: (-1, 0, 3, 0),
  // A3 → (0, 3, -3, 0). Total: (1, 2, 0, 0) → + everywhere; means of the agreeing weighted entries.
  const auto f = lora::combine_factors(vote_sources(), with_type(combination_type::ties, 0.5));
  EXPECT_EQ(f.a, rows({{4, 3, 3, 0}}));
}

TEST(CombineOps, MagnitudePruneKeepsIntOfDensityTimesNumel) {
  const mat t = rows({{1, -5, 2}, {4, -3, 0.5}});
  auto pruned = [&](double density) {
    mat x = t;
    lora::detail::magnitude_prune(x, density);
    return x;
  };
  EXPECT_EQ(pruned(0.5), rows({{0, -5, 0}, {4, -3, 0}}));  // int(3.0) = 3
  EXPECT_EQ(pruned(0.34), rows({{0, -5, 0}, {4, 0, 0}}));  // int(2.04) = 2
  EXPECT_EQ(pruned(0.0), mat::Zero(2, 3));
  EXPECT_EQ(pruned(1.0), t);
  EXPECT_EQ(pruned(7.0), t);  // density >= 1: no pruning
  mat ties = mat::Ones(2, 2);
  lora::detail::magnitude_prune(ties, 0.5);
  EXPECT_EQ(ties, rows({{1, 1}, {0, 0}}));  // equal magnitudes: the earlier entries, row-major
}

TEST(CombineOps, MagnitudePruneTypeSumsPrunedFactors) {
  // c = 1 for both; density 0.5 keeps 1 of A's 2 entries and B's 1 of 2.
  const auto f = lora::combine_factors<double>(
      {{rows({{3, -1}}), rows({{1}, {-2}}), 1.0, 1.0}, {rows({{1, 2}}), rows({{-4}, {0}}), 1.0, 1.0}},
      with_type(combination_type::magnitude_prune, 0.5));
  EXPECT_EQ(f.a, rows({{3, 2}}));
  EXPECT_EQ(f.b, rows({{-4}, {-2}}));
}

TEST(CombineOps, QuantileInterpolatesLikeTorch) {
  const std::vector<double> v = {4, 1, 3, 2};
  EXPECT_EQ(lora::detail::quantile(v, 0.0), 1.0);
  EXPECT_EQ(lora::detail::quantile(v, 0.5), 2.5);
  EXPECT_DOUBLE_EQ(lora::detail::quantile(v, 0.9), 3.7);  // torch.quantile([1, 2, 3, 4], 0.9)
  EXPECT_EQ(lora::detail::quantile(v, 1.0), 4.0);
  EXPECT_EQ(lora::detail::quantile(std::vector<double>{-2}, 0.3), -2.0);
}

// --- DARE ---------------------------------------------------------------------------------------------

TEST(CombineDare, RandomPruneKeepsAboutDensityAndRescales) {
  mat t = mat::Ones(40, 100);
  lora::rng gen(7);
  lora::detail::random_prune(t, 0.25, gen);
  for (index k = 0; k < t.size(); ++k) EXPECT_TRUE(t.data()[k] == 0.0 || t.data()[k] == 4.0) << t.data()[k];
  const double kept = static_cast<double>((t.array() != 0).count()) / static_cast<double>(t.size());
  EXPECT_NEAR(kept, 0.25, 0.035);    // 5 standard deviations of a binomial(4000, 0.25) fraction
  EXPECT_NEAR(t.mean(), 1.0, 0.14);  // the rescale keeps the mean
}

TEST(CombineDare, SeededAndDeterministic) {
  lora::rng gen(3);
  std::vector<lora::combine_source<double>> sources;
  for (int i = 0; i < 2; ++i)
    sources.push_back({lora_test::random_matrix(gen, 4, 6), lora_test::random_matrix(gen, 5, 4), 0.5, 1.0 + i});
  for (const auto type : {combination_type::dare_linear, combination_type::dare_ties, combination_type::dare_linear_svd,
                          combination_type::dare_ties_svd}) {
    auto o = with_type(type, 0.5);
    o.seed = 11;
    const auto x = lora::combine_factors(sources, o), y = lora::combine_factors(sources, o);
    EXPECT_EQ(x.a, y.a) << lora::combination_name(type);
    EXPECT_EQ(x.b, y.b) << lora::combination_name(type);
    o.seed = 12;
    const auto z = lora::combine_factors(sources, o);
    EXPECT_NE(mat(z.b * z.a), mat(x.b * x.a)) << lora::combination_name(type);
  }
}

TEST(CombineDare, DensityOneIsTheUnprunedMethod) {
  lora::rng gen(5);
  std::vector<lora::combine_source<double>> sources;
  for (int i = 0; i < 3; ++i)
    sources.push_back({lora_test::random_matrix(gen, 2, 5), lora_test::random_matrix(gen, 3, 2), 2.0, 0.5 - i});
  const auto lin = lora::combine_factors(sources, with_type(combination_type::linear));
  const auto dare = lora::combine_factors(sources, with_type(combination_type::dare_linear, 1.0));
  EXPECT_EQ(dare.a, lin.a);
  EXPECT_EQ(dare.b, lin.b);
  const auto ties = lora::combine_factors(sources, with_type(combination_type::ties, 1.0));
  const auto dare_ties = lora::combine_factors(sources, with_type(combination_type::dare_ties, 1.0));
  EXPECT_EQ(dare_ties.a, ties.a);
  EXPECT_EQ(dare_ties.b, ties.b);
}

// --- the SVD path -------------------------------------------------------------------------------------

TEST(CombineSvd, RecoversARankOneDeltaWithTheScalingSquared) {
  // Δ = s B A with s = 2, and the weight is w s = 2 again: the result is 4 B A, with A a unit row.
  const mat a = rows({{1, 2, 2}}), b = rows({{2}, {1}});
  const auto f = lora::combine_factors<double>({{a, b, 2.0, 1.0}}, with_type(combination_type::svd));
  EXPECT_EQ(f.rank(), 1);
  EXPECT_LT(lora_test::rel_error(f.b * f.a, 4 * (b * a)), 1e-14);
  EXPECT_NEAR(f.a.norm(), 1.0, 1e-14);
  EXPECT_NEAR(f.b.norm(), 4 * 3 * std::sqrt(5.0), 1e-13);  // the singular value: 4 |B| |A|
}

TEST(CombineSvd, SumOfDeltasTruncatedAndPadded) {
  lora::rng gen(9);
  const std::vector<lora::combine_source<double>> sources = {
      {lora_test::random_matrix(gen, 1, 4), lora_test::random_matrix(gen, 3, 1), 0.5, 2.0},
      {lora_test::random_matrix(gen, 2, 4), lora_test::random_matrix(gen, 3, 2), 1.5, -1.0}};
  mat want = mat::Zero(3, 4);
  for (const auto& s : sources) want += s.weight * s.scaling * s.scaling * (s.b * s.a);
  auto o = with_type(combination_type::svd);
  EXPECT_EQ(lora::combine_factors(sources, o).rank(), 2);  // the largest source rank
  o.svd_rank = 3;                                          // = min(out, in): exact
  const auto f = lora::combine_factors(sources, o);
  EXPECT_LT(lora_test::rel_error(f.b * f.a, want), 1e-13);
  o.svd_rank = 5;  // past min(out, in) = 3: zero columns of B and rows of A
  for (const bool full : {true, false}) {
    o.svd_full_matrices = full;
    const auto g = lora::combine_factors(sources, o);
    ASSERT_EQ(g.rank(), 5);
    EXPECT_EQ(mat(g.a.bottomRows(2)), mat::Zero(2, 4));
    EXPECT_EQ(mat(g.b.rightCols(2)), mat::Zero(3, 2));
    EXPECT_LT(lora_test::rel_error(g.b * g.a, want), 1e-13);
  }
}

TEST(CombineSvd, ClampAtTheQuantileOfBothFactors) {
  lora::rng gen(4);
  const std::vector<lora::combine_source<double>> sources = {
      {lora_test::random_matrix(gen, 2, 5), lora_test::random_matrix(gen, 4, 2, 3.0), 1.0, 1.0},
      {lora_test::random_matrix(gen, 2, 5), lora_test::random_matrix(gen, 4, 2), 1.0, 0.5}};
  auto o = with_type(combination_type::svd);
  const auto free = lora::combine_factors(sources, o);
  o.svd_clamp = 0.8;
  const auto clamped = lora::combine_factors(sources, o);
  // h = the 0.8 quantile of the 18 entries of B (4 x 2) and A (2 x 5), by linear interpolation.
  std::vector<double> all(free.b.data(), free.b.data() + free.b.size());
  all.insert(all.end(), free.a.data(), free.a.data() + free.a.size());
  std::sort(all.begin(), all.end());
  const double pos = 0.8 * 17, h = all[13] + (pos - 13) * (all[14] - all[13]);
  EXPECT_LT(h, all.back());  // some entries are clamped
  EXPECT_LT(lora_test::rel_error(clamped.b, free.b.cwiseMax(-h).cwiseMin(h)), 1e-15);
  EXPECT_LT(lora_test::rel_error(clamped.a, free.a.cwiseMax(-h).cwiseMin(h)), 1e-15);
}

TEST(CombineSvd, EveryPruningSvdTypeMergesDeltas) {
  // One source, density 1: each *_svd type is the plain svd of w s² B A.
  const mat a = rows({{1, 0, 2}, {0, 1, -1}}), b = rows({{1, 2}, {3, -1}});
  for (const auto type : {combination_type::ties_svd, combination_type::dare_linear_svd,
                          combination_type::dare_ties_svd, combination_type::magnitude_prune_svd}) {
    const auto f = lora::combine_factors<double>({{a, b, 2.0, 0.5}}, with_type(type, 1.0));
    EXPECT_LT(lora_test::rel_error(f.b * f.a, 2 * (b * a)), 1e-13) << lora::combination_name(type);
  }
  // magnitude_prune_svd with density 0.5 prunes the delta itself: B A = [[1, 2, 0], [3, -1, 7]] keeps 7, 3, 2.
  const auto f =
      lora::combine_factors<double>({{a, b, 1.0, 1.0}}, with_type(combination_type::magnitude_prune_svd, 0.5));
  EXPECT_LT(lora_test::rel_error(f.b * f.a, rows({{0, 2, 0}, {3, 0, 7}})), 1e-13);
}

// --- rules and refusals -------------------------------------------------------------------------------

TEST(CombineRules, NamesRanksAndTypes) {
  for (const auto& row : lora::detail::combination_table)
    EXPECT_EQ(lora::parse_combination(lora::combination_name(row.type)), row.type);
  expect_error<lora::config_error>([] { lora::parse_combination("average"); }, {"'average'", "dare_ties_svd"});
  expect_error<lora::config_error>([] { lora::parse_majority_sign("most"); }, {"'most'", "frequency"});
  EXPECT_EQ(lora::effective_type(combination_type::svd, 1), combination_type::linear);
  EXPECT_EQ(lora::effective_type(combination_type::svd, 2), combination_type::svd);
  EXPECT_EQ(lora::combined_rank(with_type(combination_type::cat), {2, 3}), 5);
  EXPECT_EQ(lora::combined_rank(with_type(combination_type::ties_svd), {2, 3}), 3);
  auto o = with_type(combination_type::svd);
  o.svd_rank = 7;
  EXPECT_EQ(lora::combined_rank(o, {2, 3}), 7);
  EXPECT_EQ(lora::combined_rank(with_type(combination_type::dare_linear), {4, 4}), 4);
}

TEST(CombineRules, Refusals) {
  const std::vector<lora::combine_source<double>> unequal = {{mat::Ones(1, 3), mat::Ones(2, 1), 1.0, 1.0},
                                                             {mat::Ones(2, 3), mat::Ones(2, 2), 1.0, 1.0}};
  for (const auto type : {combination_type::linear, combination_type::ties, combination_type::dare_linear,
                          combination_type::dare_ties, combination_type::magnitude_prune})
    expect_error<lora::config_error>([&] { lora::combine_factors(unequal, with_type(type, 0.5)); },
                                     {"one rank", "ranks 1, 2"});
  EXPECT_EQ(lora::combine_factors(unequal, with_type(combination_type::cat)).rank(), 3);
  expect_error<lora::config_error>([&] { lora::combine_factors(unequal, with_type(combination_type::ties_svd, -0.1)); },
                                   {"density must be >= 0", "-0.1"});
  expect_error<lora::config_error>([&] { lora::combine_factors(unequal, with_type(combination_type::ties_svd)); },
                                   {"needs a density"});
  expect_error<lora::config_error>([&] { lora::combine_factors(unequal, with_type(combination_type::dare_ties, 0.0)); },
                                   {"density > 0"});
  auto o = with_type(combination_type::svd);
  o.svd_clamp = 1.5;
  expect_error<lora::config_error>([&] { lora::combine_factors(unequal, o); }, {"[0, 1]", "1.5"});
  o = with_type(combination_type::svd);
  o.svd_rank = 0;
  expect_error<lora::config_error>([&] { lora::combine_factors(unequal, o); }, {"svd_rank must be >= 1"});
  expect_error<lora::config_error>([] { lora::combine_factors<double>({}, with_type(combination_type::cat)); },
                                   {"at least one"});
  expect_error<lora::shape_error>(
      [] {
        lora::combine_factors<double>(
            {{mat::Ones(1, 3), mat::Ones(2, 1), 1, 1}, {mat::Ones(1, 4), mat::Ones(2, 1), 1, 1}},
            with_type(combination_type::cat));
      },
      {"source 1", "1x4"});
  mat nan = mat::Ones(1, 3);
  nan(0, 1) = std::nan("");
  expect_error<lora::numeric_error>(
      [&] {
        lora::combine_factors<double>({{nan, mat::Ones(2, 1), 1, 1}}, with_type(combination_type::svd));
      },
      {"non-finite"});
}

// --- layers -------------------------------------------------------------------------------------------

/// Adds adapter `name` of rank r with random factors and alpha to a layer.
template <typename Layer>
void add_random(Layer& layer, const std::string& name, index rank, double alpha, std::uint64_t seed) {
  layer.add_adapter(name, lora_test::random_config(rank, alpha, seed));
}

TEST(AddWeightedAdapter, LinearLayerCatIsExactAndInactive) {
  lora::rng gen(1);
  lora::linear<double> layer(lora_test::random_matrix(gen, 5, 4), "q");
  add_random(layer, "a", 2, 4.0, 1);  // s = 2
  add_random(layer, "b", 3, 3.0, 2);  // s = 1
  lora::combine_options o = with_type(combination_type::cat);
  lora::add_weighted_adapter(layer, {{"a", 0.5}, {"b", -1.0}}, "ab", o);
  const auto& ab = layer.adapter("ab");
  EXPECT_EQ(ab.rank(), 5);
  EXPECT_EQ(ab.config().alpha, 5.0);
  EXPECT_EQ(ab.scaling(), 1.0);
  EXPECT_FALSE(ab.config().use_rslora);
  const auto& a = layer.adapter("a");
  const auto& b = layer.adapter("b");
  const mat want = 0.5 * a.scaling() * (a.b() * a.a()) - b.scaling() * (b.b() * b.a());
  EXPECT_LT(lora_test::rel_error(ab.scaling() * (ab.b() * ab.a()), want), 1e-15);
  EXPECT_EQ(layer.active_adapters(), std::vector<std::string>{"a"});  // not activated (PEFT)
}

TEST(AddWeightedAdapter, RsloraSourcesAndMergedSources) {
  lora::rng gen(2);
  lora::linear<double> layer(lora_test::random_matrix(gen, 3, 6), "v");
  auto c = lora_test::random_config(4, 8.0, 3);
  c.use_rslora = true;  // s = 8 / √4 = 4
  layer.add_adapter("a", c);
  layer.merge({"a"});  // factors are kept while merged
  lora::add_weighted_adapter(layer, {{"a", 0.25}}, "solo", with_type(combination_type::svd));  // → linear
  const auto& a = layer.adapter("a");
  const auto& solo = layer.adapter("solo");
  EXPECT_EQ(solo.rank(), 4);
  EXPECT_EQ(solo.scaling(), 1.0);
  EXPECT_FALSE(solo.config().use_rslora);  // never rsLoRA: the scaling stays 1 (PEFT would give √4)
  EXPECT_LT(lora_test::rel_error(solo.b() * solo.a(), 0.25 * 4.0 * (a.b() * a.a())), 1e-14);
}

TEST(AddWeightedAdapter, Refusals) {
  lora::linear<double> layer(mat::Ones(3, 4), "k");
  add_random(layer, "a", 2, 2.0, 1);
  add_random(layer, "b", 1, 2.0, 2);
  auto dora = lora_test::random_config(2, 2.0, 3);
  dora.use_dora = true;
  layer.add_adapter("d", dora);
  const auto linear = with_type(combination_type::linear);
  expect_error<lora::config_error>(
      [&] {
        lora::add_weighted_adapter(layer, {{"a", 1}, {"b", 1}}, "n", linear);
      },
      {"one rank", "'a' rank 2, 'b' rank 1"});
  expect_error<lora::name_error>(
      [&] {
        lora::add_weighted_adapter(layer, {{"a", 1}, {"zz", 1}}, "n", linear);
      },
      {"no adapter named 'zz'"});
  expect_error<lora::name_error>(
      [&] {
        lora::add_weighted_adapter(layer, {{"a", 1}}, "b", linear);
      },
      {"'b' already exists"});
  expect_error<lora::config_error>(
      [&] {
        lora::add_weighted_adapter(layer, {{"a", 1}, {"d", 1}}, "n", linear);
      },
      {"'d' uses DoRA"});
  expect_error<lora::config_error>(
      [&] {
        lora::add_weighted_adapter(layer, {{"a", 1}, {"b", 1}}, "n", with_type(combination_type::ties, -1.0));
      },
      {"density must be >= 0"});
  expect_error<lora::config_error>([&] { lora::add_weighted_adapter(layer, {}, "n", linear); }, {"at least one"});
  EXPECT_FALSE(layer.has_adapter("n"));  // nothing added by any refusal
}

TEST(AddWeightedAdapter, EmbeddingSvdWorksOnBA) {
  lora::rng gen(6);
  lora::embedding<double> emb(lora_test::random_matrix(gen, 7, 3), "wte");  // num 7, dim 3
  add_random(emb, "a", 1, 2.0, 1);                                          // A 1 x 7, B 3 x 1, s = 2
  add_random(emb, "b", 2, 2.0, 2);                                          // s = 1
  auto o = with_type(combination_type::svd);
  o.svd_rank = 3;  // = min(dim, num): the sum of the deltas exactly
  lora::add_weighted_adapter(emb, {{"a", 1.0}, {"b", 0.5}}, "mix", o);
  const auto& a = emb.adapter("a");
  const auto& b = emb.adapter("b");
  const auto& mix = emb.adapter("mix");
  EXPECT_EQ(mix.a().rows(), 3);
  EXPECT_EQ(mix.a().cols(), 7);                                                // r x num, as PEFT's lora_embedding_A
  const mat want = 1.0 * 4.0 * (a.b() * a.a()) + 0.5 * 1.0 * (b.b() * b.a());  // w s² B A
  EXPECT_LT(lora_test::rel_error(mix.b() * mix.a(), want), 1e-13);
  // The new adapter, activated, shifts the looked-up rows by (B A)ᵀ.
  emb.set_active({"mix"});
  const lora::embedding<double>::id_list ids = {0, 6, 3};
  const mat y = emb.infer(ids), base = emb.table();
  for (std::size_t k = 0; k < ids.size(); ++k) {
    const index id = ids[k];
    EXPECT_LT(lora_test::rel_error(y.row(static_cast<index>(k)), base.row(id) + want.col(id).transpose()), 1e-13);
  }
}

TEST(AddWeightedAdapter, Conv2dCombinesFlattenedKernels) {
  lora::conv2d_options opt;
  opt.in_channels = 2;
  opt.input = {4, 4};
  opt.kernel = {3, 3};
  lora::rng gen(8);
  lora::conv2d<double> conv(lora_test::random_matrix(gen, 3, 18), opt, "conv");  // O 3 x C kh kw 18
  add_random(conv, "a", 2, 2.0, 1);
  add_random(conv, "b", 2, 4.0, 2);
  lora::add_weighted_adapter(conv, {{"a", 1.0}, {"b", 1.0}}, "ab", with_type(combination_type::ties, 0.5));
  const auto& ab = conv.adapter("ab");
  EXPECT_EQ(ab.a().rows(), 2);
  EXPECT_EQ(ab.a().cols(), 18);
  // By hand from the sources: the factor path with weights √c: c = (1, 2).
  std::vector<mat> as = {conv.adapter("a").a(), conv.adapter("b").a()};
  lora::rng unused(0);
  const mat want_a =
      lora::detail::merge_stack(as, {1.0, std::sqrt(2.0)}, {lora::detail::merge_method::ties, 0.5, false}, unused);
  EXPECT_EQ(ab.a(), want_a);
}

TEST(AddWeightedAdapter, MergedLinearEverySlice) {
  lora::rng gen(10);
  lora::merged_linear<double> qkv(lora_test::random_matrix(gen, 9, 4), {true, false, true}, "qkv");
  qkv.add_adapter("a", lora_test::random_config(2, 2.0, 1));
  qkv.add_adapter("b", lora_test::random_config(1, 3.0, 2));
  lora::add_weighted_adapter(qkv, {{"a", 2.0}, {"b", -1.0}}, "ab", with_type(combination_type::cat));
  for (const index slice : {0, 2}) {
    const auto& a = qkv.adapter("a", slice);
    const auto& b = qkv.adapter("b", slice);
    const auto& ab = qkv.adapter("ab", slice);
    EXPECT_EQ(ab.rank(), 3);
    const mat want = 2.0 * a.scaling() * (a.b() * a.a()) - b.scaling() * (b.b() * b.a());
    EXPECT_LT(lora_test::rel_error(ab.b() * ab.a(), want), 1e-15) << "slice " << slice;
  }
}

TEST(AddWeightedAdapter, MergedLinearSlicesDrawTheirOwnMasks) {
  lora::merged_linear<double> qkv(mat::Ones(6, 50), {true, true}, "qkv");
  for (const char* name : {"a", "b"}) {
    qkv.add_adapter(name, lora_test::random_config(2, 2.0, 1));
    for (const index slice : {0, 1}) qkv.set_factors(name, slice, mat::Ones(2, 50), mat::Ones(3, 2));
  }
  lora::add_weighted_adapter(qkv, {{"a", 1.0}, {"b", 1.0}}, "ab", with_type(combination_type::dare_linear, 0.5));
  EXPECT_NE(qkv.adapter("ab", 0).a(), qkv.adapter("ab", 1).a());  // seeds seed + 0 and seed + 1
}

}  // namespace
