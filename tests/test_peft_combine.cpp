// tests/test_peft_combine.cpp: PEFT's add_weighted_adapter on adapter directories (io/peft_combine.hpp):
// the new config (rank, alpha, patterns, target_modules, rsLoRA), modules present in some adapters only,
// zero-padding to the new rank, conv and embedding modules, a round trip through directories (what
// lora-combine runs), and the refusals.
#include <cmath>
#include <lora/io/peft.hpp>
#include <lora/io/peft_combine.hpp>
#include <optional>
#include <string>
#include <vector>

#include "file_support.hpp"
#include "support.hpp"

namespace {

namespace io = lora::io;
using lora::combination_type;
using lora::index;
using lora_test::expect_error;
using mat = lora::matrix<double>;

/// A module of rank r (in 4, out 3) with F64 values from `seed` (so files hold them exactly).
io::peft_module module(const std::string& path, index r, double seed) {
  io::peft_module m;
  m.path = path;
  m.type = io::dtype::f64;
  lora::rng gen(static_cast<std::uint64_t>(seed * 1000));
  m.a = lora_test::random_matrix(gen, r, 4);
  m.b = lora_test::random_matrix(gen, 3, r);
  return m;
}

/// An adapter with rank r, alpha and one module per path.
io::peft_adapter adapter(index r, double alpha, const std::vector<std::string>& paths, double seed,
                         std::vector<std::string> targets) {
  io::peft_adapter a;
  a.config.r = r;
  a.config.lora_alpha = alpha;
  a.config.target_modules = std::move(targets);
  for (const auto& p : paths) a.modules.push_back(module(p, r, seed += 1));
  return a;
}

lora::combine_options with_type(combination_type type, std::optional<double> density = std::nullopt) {
  lora::combine_options o;
  o.type = type;
  o.density = density;
  return o;
}

/// Σ_i w_i s_i^power B_i A_i over the adapters that have module `path`.
mat weighted_delta(const std::vector<io::peft_adapter>& adapters, const std::vector<double>& weights,
                   const std::string& path, int power) {
  mat sum;
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    const io::peft_module* m = adapters[i].find(path);
    if (m == nullptr) continue;
    const mat d = weights[i] * std::pow(adapters[i].config.scaling_for(path), power) * (m->b * m->a);
    sum = sum.size() == 0 ? d : mat(sum + d);
  }
  return sum;
}

// --- through directories (lora-combine's function) ----------------------------------------------------

TEST(PeftCombine, CatRoundTripThroughDirectories) {
  lora_test::temp_dir dir;
  std::vector<io::peft_adapter> inputs = {
      adapter(2, 4, {"model.layers.0.q_proj", "model.layers.0.v_proj"}, 1, {"q_proj", "v_proj"}),  // s = 2
      adapter(4, 2, {"model.layers.0.q_proj", "model.layers.1.k_proj"}, 7, {"q_proj", "k_proj"})};
  inputs[1].config.use_rslora = true;  // s = 2 / √4 = 1
  inputs[0].save(dir.file("x"));
  inputs[1].save(dir.file("y"));
  const std::vector<double> weights = {1.5, -0.5};
  const auto r =
      io::combine_peft_dirs({dir.file("x"), dir.file("y")}, weights, dir.file("xy"), with_type(combination_type::cat));
  EXPECT_EQ(r.type, combination_type::cat);
  EXPECT_EQ(r.rank, 6);
  const io::peft_adapter out = io::peft_adapter::load(dir.file("xy"));
  EXPECT_EQ(out.config.r, 6);
  EXPECT_EQ(out.config.lora_alpha, 6.0);
  EXPECT_FALSE(out.config.use_rslora);  // scaling exactly 1 (PEFT would copy use_rslora: √6)
  EXPECT_TRUE(out.config.rank_pattern.empty());
  EXPECT_EQ(std::get<0>(out.config.target_modules), (std::vector<std::string>{"k_proj", "q_proj", "v_proj"}));
  ASSERT_EQ(out.modules.size(), 3u);  // the union; k_proj and v_proj from one adapter each
  for (const io::peft_module& m : out.modules) {
    EXPECT_EQ(m.rank(), 6) << m.path;  // Σ ranks everywhere, zero-padded where a source lacks the module
    EXPECT_EQ(m.type, io::dtype::f64);
    EXPECT_LT(
        lora_test::rel_error(out.config.scaling_for(m.path) * (m.b * m.a), weighted_delta(inputs, weights, m.path, 1)),
        1e-14)
        << m.path;
  }
  EXPECT_EQ(mat(out.find("model.layers.0.v_proj")->a.bottomRows(4)), mat::Zero(4, 4));
}

TEST(PeftCombine, OneAdapterIsLinearAndExact) {
  const std::vector<io::peft_adapter> inputs = {adapter(2, 4, {"q"}, 1, {"q"})};  // s = 2
  const auto r = io::combine_peft(inputs, {2.0}, with_type(combination_type::svd));
  EXPECT_EQ(r.type, combination_type::linear);
  EXPECT_EQ(r.rank, 2);
  const io::peft_module& m = r.adapter.modules.at(0);
  EXPECT_EQ(m.a, mat(2 * inputs[0].modules[0].a));  // c = 4: √4 on each side
  EXPECT_EQ(m.b, mat(2 * inputs[0].modules[0].b));
}

TEST(PeftCombine, RankPatternModulesArePaddedToTheNewRank) {
  std::vector<io::peft_adapter> inputs;
  for (const double seed : {1.0, 5.0}) {
    io::peft_adapter a = adapter(4, 4, {"l.0.o_proj"}, seed, {"q_proj", "o_proj"});
    a.config.rank_pattern = {{"q_proj", 2}};
    a.modules.push_back(module("l.0.q_proj", 2, seed + 9));  // s = 4 / 2 = 2
    inputs.push_back(a);
  }
  const auto r = io::combine_peft(inputs, {1.0, 1.0}, with_type(combination_type::linear));
  EXPECT_EQ(r.rank, 4);  // max(r, rank_pattern values) of each, equal
  EXPECT_TRUE(r.adapter.config.rank_pattern.empty());
  const io::peft_module* q = r.adapter.find("l.0.q_proj");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(q->rank(), 4);
  EXPECT_EQ(mat(q->a.bottomRows(2)), mat::Zero(2, 4));
  EXPECT_EQ(mat(q->b.rightCols(2)), mat::Zero(3, 2));
  // linear: A = Σ √c A_i, B = Σ √c B_i with c = 2 for both.
  const mat a = std::sqrt(2.0) * (inputs[0].modules[1].a + inputs[1].modules[1].a);
  EXPECT_LT(lora_test::rel_error(mat(q->a.topRows(2)), a), 1e-14);
}

TEST(PeftCombine, ConvModulesKeepTheirKernelShape) {
  std::vector<io::peft_adapter> inputs;
  for (const double seed : {1.0, 2.0}) {
    io::peft_adapter a;
    a.config.r = 2;
    a.config.lora_alpha = 2;
    a.config.target_modules = std::vector<std::string>{"conv"};
    io::peft_module m;
    m.path = "unet.conv";
    m.type = io::dtype::f64;
    lora::rng gen(static_cast<std::uint64_t>(seed));
    m.a = lora_test::random_matrix(gen, 2, 18);  // [2, C 2, kh 3, kw 3] flattened
    m.b = lora_test::random_matrix(gen, 3, 2);   // [3, 2, 1, 1]
    m.a_shape = {2, 2, 3, 3};
    m.b_shape = {3, 2, 1, 1};
    a.modules.push_back(m);
    inputs.push_back(a);
  }
  auto o = with_type(combination_type::svd);
  o.svd_rank = 3;  // = min(out 3, C kh kw 18): the sum of the deltas exactly
  lora_test::temp_dir dir;
  io::combine_peft(inputs, {1.0, -1.0}, o).adapter.save(dir.file("conv"));
  const io::peft_adapter out = io::peft_adapter::load(dir.file("conv"));
  const io::peft_module& m = out.modules.at(0);
  EXPECT_EQ(m.a_shape, (std::vector<std::int64_t>{3, 2, 3, 3}));
  EXPECT_EQ(m.b_shape, (std::vector<std::int64_t>{3, 3, 1, 1}));
  EXPECT_LT(lora_test::rel_error(m.b * m.a, weighted_delta(inputs, {1.0, -1.0}, "unet.conv", 2)), 1e-13);
}

TEST(PeftCombine, EmbeddingModulesAndRegexTargets) {
  std::vector<io::peft_adapter> inputs;
  double seed = 1;
  for (const char* target : {".*embed_tokens", ".*lm_head"}) {
    io::peft_adapter a = adapter(2, 2, {"model.embed_tokens"}, seed++, {});
    a.config.target_modules = std::string(target);
    a.modules[0].embedding = true;  // A: r x num (4), B: dim (3) x r
    inputs.push_back(a);
  }
  const auto r = io::combine_peft(inputs, {1.0, 1.0}, with_type(combination_type::cat));
  EXPECT_EQ(std::get<1>(r.adapter.config.target_modules), "(.*embed_tokens)|(.*lm_head)");
  ASSERT_EQ(r.adapter.modules.size(), 1u);
  EXPECT_TRUE(r.adapter.modules[0].embedding);
  EXPECT_LT(lora_test::rel_error(r.adapter.modules[0].b * r.adapter.modules[0].a,
                                 weighted_delta(inputs, {1.0, 1.0}, "model.embed_tokens", 1)),
            1e-15);
}

TEST(PeftCombine, DareMasksPerModuleAndSeeded) {
  std::vector<io::peft_adapter> inputs;
  for (int k = 0; k < 2; ++k) {
    io::peft_adapter a = adapter(2, 2, {"h.0.q", "h.1.q"}, 1, {"q"});
    a.modules[1].a = a.modules[0].a;  // two modules with the same factors
    a.modules[1].b = a.modules[0].b;
    inputs.push_back(a);
  }
  auto o = with_type(combination_type::dare_ties, 0.5);
  o.seed = 3;
  const auto x = io::combine_peft(inputs, {1.0, 0.5}, o), y = io::combine_peft(inputs, {1.0, 0.5}, o);
  EXPECT_EQ(x.adapter.modules[0].a, y.adapter.modules[0].a);
  EXPECT_EQ(x.adapter.modules[1].b, y.adapter.modules[1].b);
  EXPECT_NE(x.adapter.modules[0].a, x.adapter.modules[1].a);  // seed ^ fnv1a(path)
}

TEST(PeftCombine, WholeTensorsAreLeftOutWithANote) {
  std::vector<io::peft_adapter> inputs = {adapter(2, 2, {"q"}, 1, {"q"}), adapter(2, 2, {"q"}, 2, {"q"})};
  inputs[0].config.modules_to_save = {"score"};
  inputs[0].full_tensors.push_back(io::peft_full_tensor::from_matrix("score.weight", mat::Ones(2, 3)));
  const auto r = io::combine_peft(inputs, {1.0, 1.0}, with_type(combination_type::svd));
  EXPECT_TRUE(r.adapter.full_tensors.empty());
  ASSERT_EQ(r.notes.size(), 1u);
  EXPECT_NE(r.notes[0].find("modules_to_save"), std::string::npos);
  EXPECT_EQ(r.adapter.config.modules_to_save, std::vector<std::string>{"score"});  // the first adapter's config
}

// --- refusals -----------------------------------------------------------------------------------------

TEST(PeftCombine, Refusals) {
  const io::peft_adapter x = adapter(2, 2, {"q"}, 1, {"q"}), y4 = adapter(4, 2, {"q"}, 2, {"q"});
  const auto linear = with_type(combination_type::linear);
  expect_error<lora::config_error>(
      [&] {
        io::combine_peft({x, y4}, {1, 1}, linear);
      },
      {"one rank", "adapter 0 rank 2, adapter 1 rank 4"});
  io::peft_adapter patterned = adapter(4, 4, {}, 4, {"q"});  // rank 4, but 2 on module q
  patterned.config.rank_pattern = {{"q", 2}};
  patterned.modules.push_back(module("q", 2, 9));
  expect_error<lora::config_error>(
      [&] {
        io::combine_peft({patterned, adapter(4, 4, {"q"}, 5, {"q"})}, {1, 1}, linear);
      },
      {"module 'q'", "adapter 0 rank 2, adapter 1 rank 4"});
  expect_error<lora::config_error>([&] { io::combine_peft({x, x}, {1}, linear); }, {"one weight per adapter"});
  expect_error<lora::config_error>([&] { io::combine_peft({}, {}, linear); }, {"at least one"});
  io::peft_adapter dora = x, bias = x, regex = x, saved = x;
  dora.config.use_dora = true;
  expect_error<lora::config_error>([&] { io::combine_peft({x, dora}, {1, 1}, linear); }, {"adapter 1 uses DoRA"});
  bias.config.lora_bias = true;
  expect_error<lora::config_error>([&] { io::combine_peft({bias, x}, {1, 1}, linear); }, {"lora_B biases"});
  regex.config.target_modules = std::string(".*q");
  expect_error<lora::config_error>([&] { io::combine_peft({x, regex}, {1, 1}, linear); }, {"list with a string"});
  saved.full_tensors.push_back(io::peft_full_tensor::from_matrix("score.weight", mat::Ones(2, 3)));
  expect_error<lora::config_error>(
      [&] {
        io::combine_peft({saved, saved}, {1, 1}, linear);
      },
      {"both replace 'score.weight'"});
  io::peft_adapter embedding = x, wide = adapter(2, 2, {"q"}, 3, {"q"});
  embedding.modules[0].embedding = true;
  expect_error<lora::format_error>([&] { io::combine_peft({x, embedding}, {1, 1}, linear); }, {"module 'q'"});
  wide.modules[0].a = mat::Ones(2, 5);
  expect_error<lora::shape_error>([&] { io::combine_peft({x, wide}, {1, 1}, linear); }, {"module 'q'", "5x3"});
  expect_error<lora::config_error>(
      [&] {
        io::combine_peft({x, x}, {1, 1}, with_type(combination_type::magnitude_prune));
      },
      {"needs a density"});
}

}  // namespace
