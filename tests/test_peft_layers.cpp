// tests/test_peft_layers.cpp: PEFT adapters and the library's layers (io/peft_layers.hpp): attaching
// to lora::linear layers all or nothing, and building an adapter from trained layers (rank_pattern /
// alpha_pattern for the layers that differ) that loads back bit for bit.
#include <lora/io/peft.hpp>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "file_support.hpp"
#include "support.hpp"

namespace {

namespace io = lora::io;
using lora_test::expect_error;
using lora_test::temp_dir;

// --- attaching to layers ------------------------------------------------------------------------------

template <typename Scalar>
class PeftAttach : public ::testing::Test {};
TYPED_TEST_SUITE(PeftAttach, lora_test::scalar_types, );  // the empty argument keeps clang -Wpedantic quiet

/// Two c_attn layers of a tiny GPT-2 (in 3, out 4), one with a different rank through rank_pattern.
io::peft_adapter two_layer_adapter() {
  io::peft_adapter a;
  a.config.r = 2;
  a.config.lora_alpha = 4;
  a.config.fan_in_fan_out = true;
  a.config.rank_pattern = {{"h\\.1\\..*", 1}};
  a.config.alpha_pattern = {{"h\\.1\\..*", 3}};
  for (int layer = 0; layer < 2; ++layer) {
    io::peft_module m;
    m.path = "transformer.h." + std::to_string(layer) + ".attn.c_attn";
    const lora::index r = layer == 0 ? 2 : 1;
    m.a = lora::matrix<double>(r, 3);
    m.b = lora::matrix<double>(4, r);
    for (lora::index k = 0; k < m.a.size(); ++k) m.a.data()[k] = 0.1 * static_cast<double>(k + 1 + layer);
    for (lora::index k = 0; k < m.b.size(); ++k) m.b.data()[k] = -0.2 * static_cast<double>(k + 1) + layer;
    a.modules.push_back(m);
  }
  return a;
}

TYPED_TEST(PeftAttach, AttachesEveryModuleWithItsConfig) {
  using Scalar = TypeParam;
  using layer = lora::linear<Scalar>;
  const lora::matrix<Scalar> w_t = lora::matrix<Scalar>::Constant(3, 4, Scalar(0.5));  // stored in x out
  layer h0(w_t, "h0", lora::weight_layout::in_out), h1(w_t, "h1", lora::weight_layout::in_out);
  layer other(lora::matrix<Scalar>::Constant(4, 3, Scalar(1)), "other");
  // Paths without the "transformer." prefix still match (whole dotted suffix).
  const std::map<std::string, layer*> layers = {
      {"h.0.attn.c_attn", &h0}, {"h.1.attn.c_attn", &h1}, {"h.0.mlp.c_fc", &other}};
  const io::peft_adapter a = two_layer_adapter();
  io::attach(a, layers, "peft");

  ASSERT_TRUE(h0.has_adapter("peft"));
  ASSERT_TRUE(h1.has_adapter("peft"));
  EXPECT_FALSE(other.has_adapter("peft"));
  EXPECT_EQ(h0.adapter("peft").rank(), 2);
  EXPECT_EQ(h1.adapter("peft").rank(), 1);
  EXPECT_EQ(h0.adapter("peft").scaling(), Scalar(2));  // 4 / 2
  EXPECT_EQ(h1.adapter("peft").scaling(), Scalar(3));  // 3 / 1
  EXPECT_EQ(h0.adapter("peft").a(), a.modules[0].a.template cast<Scalar>());
  EXPECT_EQ(h1.adapter("peft").b(), a.modules[1].b.template cast<Scalar>());
  EXPECT_EQ(h0.active_adapters(), std::vector<std::string>{"peft"});
  // The adapted layer computes X Wᵀ + s X Aᵀ Bᵀ.
  lora::matrix<Scalar> x(2, 3);
  x << 1, 2, 3, -1, 0.5, 2;
  const lora::matrix<double> expected =
      x.template cast<double>() * w_t.template cast<double>() +
      2.0 * x.template cast<double>() * a.modules[0].a.transpose() * a.modules[0].b.transpose();
  EXPECT_LT(lora_test::rel_error(h0.infer(x), expected), lora_test::tolerance<Scalar>());
}

TYPED_TEST(PeftAttach, AnyMismatchLeavesEveryLayerUnchanged) {
  using Scalar = TypeParam;
  using layer = lora::linear<Scalar>;
  const io::peft_adapter a = two_layer_adapter();
  auto check_untouched = [](std::initializer_list<const layer*> ls) {
    for (const layer* l : ls) {
      EXPECT_FALSE(l->has_adapter("peft")) << l->name();
      EXPECT_TRUE(l->adapter_names().empty() || l->adapter_names() == std::vector<std::string>{"mine"}) << l->name();
    }
  };
  {  // The second layer has the wrong in_features: the first must not get its adapter either.
    layer h0(lora::matrix<Scalar>::Zero(4, 3), "h0"), h1(lora::matrix<Scalar>::Zero(4, 5), "h1");
    const std::vector<std::pair<std::string, layer*>> layers = {{"transformer.h.0.attn.c_attn", &h0},
                                                                {"transformer.h.1.attn.c_attn", &h1}};
    expect_error<lora::shape_error>([&] { io::attach(a, layers, "peft"); },
                                    {"transformer.h.1.attn.c_attn", "3x4", "5x4"});
    check_untouched({&h0, &h1});
  }
  {  // A module with no layer.
    layer h0(lora::matrix<Scalar>::Zero(4, 3), "h0");
    const std::map<std::string, layer*> layers = {{"transformer.h.0.attn.c_attn", &h0}};
    expect_error<lora::name_error>([&] { io::attach(a, layers, "peft"); }, {"no layer", "transformer.h.1.attn.c_attn"});
    check_untouched({&h0});
  }
  {  // The name is taken on the second layer.
    layer h0(lora::matrix<Scalar>::Zero(4, 3), "h0"), h1(lora::matrix<Scalar>::Zero(4, 3), "h1");
    h1.add_adapter("peft");
    const std::map<std::string, layer*> layers = {{"h.0.attn.c_attn", &h0}, {"h.1.attn.c_attn", &h1}};
    expect_error<lora::name_error>([&] { io::attach(a, layers, "peft"); }, {"h.1.attn.c_attn", "already has"});
    EXPECT_FALSE(h0.has_adapter("peft"));
    EXPECT_EQ(h1.adapter_names(), std::vector<std::string>{"peft"});
  }
  {  // A rank that disagrees with the config, DoRA, lora_B bias, an ambiguous match.
    layer h0(lora::matrix<Scalar>::Zero(4, 3), "h0"), h1(lora::matrix<Scalar>::Zero(4, 3), "h1");
    h0.add_adapter("mine");
    const std::map<std::string, layer*> layers = {{"h.0.attn.c_attn", &h0}, {"h.1.attn.c_attn", &h1}};
    io::peft_adapter bad = a;
    bad.config.rank_pattern.clear();
    expect_error<lora::shape_error>([&] { io::attach(bad, layers, "peft"); }, {"h.1.attn.c_attn", "r = 2"});
    bad = a;
    bad.modules[1].magnitude = lora::vector<double>::Ones(3);  // DoRA attaches to a linear, with [out] entries
    expect_error<lora::shape_error>([&] { io::attach(bad, layers, "peft"); },
                                    {"h.1.attn.c_attn", "lora_magnitude_vector", "got 3"});
    bad = a;
    bad.modules[1].b_bias = lora::vector<double>::Ones(4);
    expect_error<lora::config_error>([&] { io::attach(bad, layers, "peft"); }, {"h.1.attn.c_attn", "bias"});
    layer dup(lora::matrix<Scalar>::Zero(4, 3), "dup");
    const std::map<std::string, layer*> ambiguous = {
        {"a.h.0.attn.c_attn", &h0}, {"b.h.0.attn.c_attn", &dup}, {"h.1.attn.c_attn", &h1}};
    bad = a;
    bad.modules[0].path = "h.0.attn.c_attn";  // a whole suffix of both a.h.0... and b.h.0...
    expect_error<lora::name_error>([&] { io::attach(bad, ambiguous, "peft"); }, {"ambiguous", "a.h.0.attn.c_attn"});
    check_untouched({&h0, &h1, &dup});
    EXPECT_EQ(h0.adapter_names(), std::vector<std::string>{"mine"});
  }
}

TYPED_TEST(PeftAttach, FromLayersThenLoadGivesIdenticalTensorsAndConfig) {
  using Scalar = TypeParam;
  using layer = lora::linear<Scalar>;
  layer q0(lora::matrix<Scalar>::Zero(4, 3), "q0"), v0(lora::matrix<Scalar>::Zero(5, 3), "v0"),
      q1(lora::matrix<Scalar>::Zero(4, 3), "q1");
  lora::adapter_config c;
  c.rank = 2;
  c.alpha = 4;
  c.dropout = 0.1;
  c.init = lora::init_method::random_ab;
  c.seed = 7;
  q0.add_adapter("task", c);
  v0.add_adapter("task", c);
  c.rank = 3;  // q1 differs in rank and alpha: rank_pattern / alpha_pattern
  c.alpha = 9;
  q1.add_adapter("task", c);
  const std::map<std::string, const layer*> layers = {{"model.layers.0.self_attn.q_proj", &q0},
                                                      {"model.layers.0.self_attn.v_proj", &v0},
                                                      {"model.layers.1.self_attn.q_proj", &q1}};
  io::peft_config base;
  base.task_type = "CAUSAL_LM";
  base.base_model_name_or_path = "tiny-llama";
  const io::peft_adapter a = io::peft_adapter::from_layers(layers, "task", base);
  EXPECT_EQ(a.config.r, 2);
  EXPECT_EQ(a.config.lora_alpha, 4.0);
  EXPECT_EQ(a.config.lora_dropout, 0.1);
  EXPECT_EQ(std::get<std::vector<std::string>>(a.config.target_modules),
            (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(a.config.rank_for("model.layers.1.self_attn.q_proj"), 3);
  EXPECT_EQ(a.config.alpha_for("model.layers.1.self_attn.q_proj"), 9.0);
  EXPECT_EQ(a.config.rank_for("model.layers.0.self_attn.q_proj"), 2);
  EXPECT_EQ(a.config.task_type, std::optional<std::string>("CAUSAL_LM"));

  temp_dir dir;
  a.save(dir.path());
  const io::peft_adapter b = io::peft_adapter::load(dir.path());
  EXPECT_EQ(b.config.to_json(), a.config.to_json());
  ASSERT_EQ(b.modules.size(), 3u);
  for (const auto& [path, l] : layers) {
    const io::peft_module* m = b.find(path);
    ASSERT_NE(m, nullptr) << path;
    EXPECT_EQ(m->a.template cast<Scalar>(), l->adapter("task").a()) << path;  // bit for bit
    EXPECT_EQ(m->b.template cast<Scalar>(), l->adapter("task").b()) << path;
    EXPECT_EQ(m->type, io::dtype_of<Scalar>());
  }
  // And back onto fresh layers: the same function.
  layer r0(lora::matrix<Scalar>::Zero(4, 3), "r0"), r1(lora::matrix<Scalar>::Zero(5, 3), "r1"),
      r2(lora::matrix<Scalar>::Zero(4, 3), "r2");
  const std::map<std::string, layer*> fresh = {{"model.layers.0.self_attn.q_proj", &r0},
                                               {"model.layers.0.self_attn.v_proj", &r1},
                                               {"model.layers.1.self_attn.q_proj", &r2}};
  io::attach(b, fresh, "task");
  EXPECT_EQ(r2.adapter("task").scaling(), q1.adapter("task").scaling());
  EXPECT_EQ(r2.adapter("task").a(), q1.adapter("task").a());

  // A layer without the adapter, and rsLoRA disagreeing, are refused.
  layer bare(lora::matrix<Scalar>::Zero(4, 3), "bare");
  const std::map<std::string, const layer*> missing = {{"x.q", &q0}, {"x.k", &bare}};
  expect_error<lora::name_error>([&] { io::peft_adapter::from_layers(missing, "task"); }, {"'x.k'", "task"});
  lora::adapter_config rs;
  rs.use_rslora = true;
  bare.add_adapter("task", rs);
  expect_error<lora::config_error>([&] { io::peft_adapter::from_layers(missing, "task"); }, {"use_rslora"});
}

TEST(PeftPatterns, FromLayersDisambiguatesNestedPaths) {
  // "a.b" differs from r while "c.a.b" (which ends with "a.b") does not: c.a.b needs its own entry.
  using layer = lora::linear<double>;
  layer x(lora::matrix<double>::Zero(2, 2), "x"), y(lora::matrix<double>::Zero(2, 2), "y"),
      z(lora::matrix<double>::Zero(2, 2), "z");
  lora::adapter_config c;
  c.rank = 1;
  x.add_adapter("t", c);
  z.add_adapter("t", c);
  c.rank = 2;
  y.add_adapter("t", c);
  const std::map<std::string, const layer*> layers = {{"c.a.b", &x}, {"a.b", &y}, {"d.e", &z}};
  const io::peft_adapter a = io::peft_adapter::from_layers(layers, "t");
  EXPECT_EQ(a.config.r, 1);
  EXPECT_EQ(a.config.rank_for("a.b"), 2);
  EXPECT_EQ(a.config.rank_for("c.a.b"), 1);
  EXPECT_EQ(a.config.rank_for("d.e"), 1);
}

}  // namespace
