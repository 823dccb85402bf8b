// tests/test_peft_config.cpp: adapter_config.json of PEFT LoRA adapters (io/peft_config.hpp): every
// key parsed, serialised and parsed back, unknown keys warned about, wrong types named with the key,
// the expected and the actual type, values PEFT refuses, and PEFT's rank_pattern / alpha_pattern
// semantics for the effective rank, alpha and scaling.
#include <lora/io/peft_config.hpp>
#include <optional>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "support.hpp"

namespace {

namespace io = lora::io;
using lora_test::expect_error;

// --- config ---------------------------------------------------------------------------------------------

const char* const full_config = R"({
  "alpha_pattern": {"c_proj": 32},
  "auto_mapping": null,
  "base_model_name_or_path": "gpt2",
  "bias": "lora_only",
  "fan_in_fan_out": true,
  "inference_mode": true,
  "init_lora_weights": "gaussian",
  "layers_pattern": null,
  "layers_to_transform": null,
  "lora_alpha": 16,
  "lora_bias": false,
  "lora_dropout": 0.05,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": ["score"],
  "peft_type": "LORA",
  "r": 8,
  "rank_pattern": {"h\\.0\\..*": 4, "c_attn": 6},
  "revision": null,
  "target_modules": ["c_attn", "c_proj"],
  "task_type": "SEQ_CLS",
  "use_dora": false,
  "use_rslora": true
})";

TEST(PeftConfig, ParsesEveryKey) {
  const io::peft_config c = io::peft_config::parse(full_config);
  EXPECT_EQ(c.peft_type, "LORA");
  EXPECT_EQ(c.r, 8);
  EXPECT_EQ(c.lora_alpha, 16.0);
  EXPECT_EQ(c.lora_dropout, 0.05);
  EXPECT_EQ(std::get<std::vector<std::string>>(c.target_modules), (std::vector<std::string>{"c_attn", "c_proj"}));
  EXPECT_TRUE(c.fan_in_fan_out);
  EXPECT_EQ(c.bias, "lora_only");
  EXPECT_TRUE(c.use_rslora);
  EXPECT_FALSE(c.use_dora);
  ASSERT_EQ(c.rank_pattern.size(), 2u);
  EXPECT_EQ(c.rank_pattern[0], (std::pair<std::string, lora::index>{"h\\.0\\..*", 4}));  // file order kept
  EXPECT_EQ(c.rank_pattern[1], (std::pair<std::string, lora::index>{"c_attn", 6}));
  ASSERT_EQ(c.alpha_pattern.size(), 1u);
  EXPECT_EQ(c.alpha_pattern[0].second, 32.0);
  EXPECT_EQ(c.modules_to_save, std::vector<std::string>{"score"});
  EXPECT_EQ(std::get<std::string>(c.init_lora_weights), "gaussian");
  EXPECT_EQ(c.task_type, std::optional<std::string>("SEQ_CLS"));
  EXPECT_EQ(c.base_model_name_or_path, std::optional<std::string>("gpt2"));
  EXPECT_TRUE(c.inference_mode);
  EXPECT_FALSE(c.lora_bias);
  EXPECT_TRUE(c.warnings.empty()) << c.warnings.front();  // PEFT's own keys at neutral values are quiet
}

TEST(PeftConfig, SerialisesAndParsesBack) {
  const io::peft_config c = io::peft_config::parse(full_config);
  const std::string json = c.to_json();
  const io::peft_config d = io::peft_config::parse(json);
  EXPECT_EQ(d.to_json(), json);
  EXPECT_EQ(d.rank_pattern, c.rank_pattern);
  EXPECT_EQ(d.alpha_pattern, c.alpha_pattern);
  EXPECT_EQ(d.target_modules, c.target_modules);
  EXPECT_EQ(d.init_lora_weights, c.init_lora_weights);
  EXPECT_EQ(d.lora_dropout, c.lora_dropout);
  // What PEFT expects to find: integers stay integers, empty modules_to_save is null, keys sorted.
  io::peft_config e;
  e.target_modules = std::string(".*\\.(q|v)_proj");
  e.lora_alpha = 16;
  const nlohmann::json j = nlohmann::json::parse(e.to_json());
  EXPECT_TRUE(j["lora_alpha"].is_number_integer());
  EXPECT_TRUE(j["r"].is_number_integer());
  EXPECT_TRUE(j["modules_to_save"].is_null());
  EXPECT_TRUE(j["task_type"].is_null());
  EXPECT_EQ(j["target_modules"], ".*\\.(q|v)_proj");
  EXPECT_EQ(io::peft_config::parse(e.to_json()).target_modules, e.target_modules);
  e.lora_alpha = 2.5;
  EXPECT_TRUE(nlohmann::json::parse(e.to_json())["lora_alpha"].is_number_float());
}

TEST(PeftConfig, UnknownKeysAreWarnedAndIgnored) {
  const io::peft_config c = io::peft_config::parse(
      R"({"peft_type": "LORA", "r": 4, "my_extension": {"x": [1, 2]}, "layer_replication": [[0, 4]],
          "revision": "main", "exclude_modules": ["lm_head"]})");
  EXPECT_EQ(c.r, 4);
  ASSERT_EQ(c.warnings.size(), 2u);
  EXPECT_NE(c.warnings[0].find("unknown key 'my_extension'"), std::string::npos) << c.warnings[0];
  EXPECT_NE(c.warnings[1].find("layer_replication"), std::string::npos) << c.warnings[1];
  // Initialisations that rewrite the base weights draw a warning too.
  const io::peft_config pissa =
      io::peft_config::parse(R"({"peft_type": "LORA", "init_lora_weights": "pissa_niter_4"})");
  ASSERT_EQ(pissa.warnings.size(), 1u);
  EXPECT_NE(pissa.warnings[0].find("base weights"), std::string::npos);
  // Missing keys take PEFT's defaults.
  const io::peft_config d = io::peft_config::parse(R"({"peft_type": "LORA"})");
  EXPECT_EQ(d.r, 8);
  EXPECT_EQ(d.lora_alpha, 8.0);
  EXPECT_EQ(d.bias, "none");
  EXPECT_FALSE(d.inference_mode);
  EXPECT_TRUE(std::get<bool>(d.init_lora_weights));
}

TEST(PeftConfig, WrongTypesNameKeyExpectedAndActual) {
  struct row {
    const char* json;
    std::vector<std::string> fragments;
  };
  const row rows[] = {
      {R"({"peft_type": "LORA", "r": "8"})", {"'r'", "an integer", "got string"}},
      {R"({"peft_type": "LORA", "r": 8.0})", {"'r'", "an integer", "got number"}},
      {R"({"peft_type": "LORA", "lora_alpha": "16"})", {"'lora_alpha'", "a number", "got string"}},
      {R"({"peft_type": "LORA", "lora_dropout": null})", {"'lora_dropout'", "a number", "got null"}},
      {R"({"peft_type": "LORA", "fan_in_fan_out": 1})", {"'fan_in_fan_out'", "a boolean", "got integer"}},
      {R"({"peft_type": "LORA", "target_modules": 3})", {"'target_modules'", "a list of strings or null", "integer"}},
      {R"({"peft_type": "LORA", "target_modules": ["q", 1]})", {"'target_modules[]'", "a string", "integer"}},
      {R"({"peft_type": "LORA", "rank_pattern": []})", {"'rank_pattern'", "an object", "got array"}},
      {R"({"peft_type": "LORA", "rank_pattern": {"q": "4"}})", {"rank_pattern['q']", "an integer", "string"}},
      {R"({"peft_type": "LORA", "alpha_pattern": {"q": true}})", {"alpha_pattern['q']", "a number", "boolean"}},
      {R"({"peft_type": "LORA", "modules_to_save": "score"})", {"'modules_to_save'", "list", "got string"}},
      {R"({"peft_type": "LORA", "init_lora_weights": 1})", {"'init_lora_weights'", "a boolean or a string", "integer"}},
      {R"({"peft_type": "LORA", "task_type": 7})", {"'task_type'", "a string or null", "integer"}},
      {R"({"peft_type": 1})", {"'peft_type'", "a string", "integer"}},
      {R"({"peft_type": "LORA", "use_dora": "no"})", {"'use_dora'", "a boolean", "string"}},
  };
  for (const row& r : rows) {
    SCOPED_TRACE(r.json);
    std::vector<std::string> fragments = r.fragments;
    fragments.push_back("adapter_config.json");
    try {
      io::peft_config::parse(r.json);
      ADD_FAILURE() << "no exception";
    } catch (const lora::format_error& e) {
      for (const auto& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
    }
  }
}

TEST(PeftConfig, RefusesValuesPeftRefuses) {
  expect_error<lora::format_error>([] { io::peft_config::parse(R"({"peft_type": "LORA", "r": 0})"); }, {"'r'", "0"});
  expect_error<lora::format_error>([] { io::peft_config::parse(R"({"peft_type": "IA3"})"); }, {"IA3", "LORA"});
  expect_error<lora::format_error>([] { io::peft_config::parse(R"({"peft_type": "LORA", "bias": "some"})"); },
                                   {"'bias'", "some"});
  expect_error<lora::format_error>(
      [] { io::peft_config::parse(R"({"peft_type": "LORA", "lora_bias": true, "use_dora": true})"); },
      {"lora_bias", "use_dora"});
  expect_error<lora::format_error>(
      [] { io::peft_config::parse(R"({"peft_type": "LORA", "rank_pattern": {"q(": 4}})"); }, {"rank_pattern['q(']"});
  expect_error<lora::format_error>(
      [] { io::peft_config::parse(R"j({"peft_type": "LORA", "target_modules": "(?=q)"})j"); }, {"target_modules"});
  expect_error<lora::format_error>([] { io::peft_config::parse(R"({"r": 4})"); }, {"missing key 'peft_type'"});
  expect_error<lora::format_error>([] { io::peft_config::parse("[1]"); }, {"JSON object", "array"});
  expect_error<lora::format_error>([] { io::peft_config::parse("{\"peft_type\": "); }, {"not valid JSON"});
  expect_error<lora::format_error>([] { io::peft_config::parse(std::string(1000, '[') + std::string(1000, ']')); },
                                   {"deeper"});
  expect_error<lora::format_error>([] { io::peft_config::parse(R"({"peft_type": "LORA", "lora_dropout": 1.5})"); },
                                   {"lora_dropout"});
}

TEST(PeftConfig, EffectiveRankAlphaAndScaling) {
  io::peft_config c = io::peft_config::parse(full_config);  // r 8, alpha 16, rslora
  // The first matching key wins: h.0.* before c_attn.
  EXPECT_EQ(c.rank_for("transformer.h.0.attn.c_attn"), 4);
  EXPECT_EQ(c.rank_for("transformer.h.1.attn.c_attn"), 6);
  EXPECT_EQ(c.rank_for("transformer.h.1.attn.c_proj"), 8);
  EXPECT_EQ(c.alpha_for("transformer.h.1.attn.c_proj"), 32.0);
  EXPECT_EQ(c.alpha_for("transformer.h.1.attn.c_attn"), 16.0);
  EXPECT_DOUBLE_EQ(c.scaling_for("transformer.h.1.attn.c_proj"), 32.0 / std::sqrt(8.0));
  EXPECT_DOUBLE_EQ(c.scaling_for("transformer.h.0.attn.c_attn"), 16.0 / 2.0);
  c.use_rslora = false;
  EXPECT_DOUBLE_EQ(c.scaling_for("transformer.h.1.attn.c_attn"), 16.0 / 6.0);
  const lora::adapter_config a = c.adapter_config_for("transformer.h.1.attn.c_proj");
  EXPECT_EQ(a.rank, 8);
  EXPECT_EQ(a.alpha, 32.0);
  EXPECT_EQ(a.dropout, 0.05);
  EXPECT_EQ(a.init, lora::init_method::zeros);
  // target_modules: names match whole trailing components; a string is a full-match regex.
  EXPECT_TRUE(c.targets("transformer.h.3.attn.c_attn"));
  EXPECT_TRUE(c.targets("c_proj"));
  EXPECT_FALSE(c.targets("transformer.h.3.attn.xc_attn"));
  c.target_modules = std::string(".*\\.h\\.[01]\\.attn\\.c_attn");
  EXPECT_TRUE(c.targets("transformer.h.1.attn.c_attn"));
  EXPECT_FALSE(c.targets("transformer.h.2.attn.c_attn"));
}

}  // namespace
