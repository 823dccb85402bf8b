// tests/test_peft.cpp: PEFT adapters. The config schema (parse, serialise, unknown keys, wrong types,
// PEFT's rank_pattern / alpha_pattern semantics), the regex subset behind the patterns, a GPT-2 style
// adapter assembled byte by byte from the format description (fan_in_fan_out, modules_to_save), load
// validation one rule at a time, save/load round trips, attaching to lora::linear layers all or
// nothing, and building an adapter from trained layers.
#include <stdlib.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <lora/io/peft.hpp>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "file_support.hpp"
#include "support.hpp"

namespace {

namespace io = lora::io;
using bytes = std::vector<unsigned char>;
using lora_test::expect_error;
using lora_test::temp_dir;

// --- helpers ---------------------------------------------------------------------------------------

void write_file(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  ASSERT_TRUE(out.good()) << path;
}

void write_file(const std::string& path, const bytes& data) { write_file(path, std::string(data.begin(), data.end())); }

bytes read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// Appends the 4 little-endian bytes of an IEEE binary32.
void put_f32(bytes& out, float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, 4);
  for (int k = 0; k < 4; ++k) out.push_back(static_cast<unsigned char>(bits >> (8 * k)));
}

/// 8-byte little-endian header length, the header, the data.
bytes file_image(const std::string& header, const bytes& data) {
  bytes out;
  for (int k = 0; k < 8; ++k)
    out.push_back(static_cast<unsigned char>(static_cast<std::uint64_t>(header.size()) >> (8 * k)));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

const char* const minimal_config = R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]})";

/// An adapter_model.safetensors image holding the given F32 tensors (name, shape, values).
struct tensor_def {
  std::string name;
  std::vector<std::int64_t> shape;
  std::vector<double> values;
};
bytes make_weights(const std::vector<tensor_def>& defs, io::dtype type = io::dtype::f32) {
  io::safetensors_writer w;
  using row_major = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  for (const auto& d : defs) {
    const bool two_d = d.shape.size() == 2;
    const Eigen::Map<const row_major> v(d.values.data(), two_d ? d.shape[0] : static_cast<lora::index>(d.values.size()),
                                        two_d ? d.shape[1] : 1);
    w.add(d.name, v, type, d.shape);
  }
  return w.to_bytes();
}

std::vector<double> iota(std::size_t n, double start = 0.25, double step = 0.5) {
  std::vector<double> v(n);
  for (std::size_t k = 0; k < n; ++k) v[k] = start + step * static_cast<double>(k);
  return v;
}

const std::string prefix = "base_model.model.";

// --- the regex subset -------------------------------------------------------------------------------

TEST(PeftRegex, PythonSemantics) {
  using io::detail::regex;
  struct row {
    const char* pattern;
    const char* text;
    bool full;
  };
  const row rows[] = {
      {"a|b", "b", true},
      {"h\\.[0-9]+\\.attn", "h.12.attn", true},
      {"h\\.[0-9]+\\.attn", "h.x.attn", false},
      {"[^x]+", "abc", true},
      {"[^x]+", "axc", false},
      {"a{2,3}", "aaa", true},
      {"a{2,3}", "aaaa", false},
      {"a{2}", "aa", true},
      {"a{,2}", "", true},
      {"a{1,}b", "aaab", true},
      {"x{}", "x{}", true},  // "{}" is literal in Python
      {"x{a}", "x{a}", true},
      {"(?:ab)+", "ababab", true},
      {"(?P<name>q|k)_proj", "k_proj", true},
      {"q(?#comment)_proj", "q_proj", true},
      {"\\d+\\w*", "12ab_", true},
      {"\\s", " ", true},
      {"[\\d.]+", "1.2.3", true},
      {".", "\n", false},
      {"a.*?z", "abcz", true},
      {"()*a", "a", true},
      {"(a*)*b", "aaab", true},
      {"\\x41", "A", true},
      {"[a-c-]+", "a-b", true},
      {"\\.", ".", true},
  };
  for (const row& r : rows) EXPECT_EQ(regex(r.pattern).match_full(r.text), r.full) << r.pattern << " ~ " << r.text;
  // re.match: prefix, anchored at the start; $ before a final newline.
  EXPECT_TRUE(regex("ab").match_prefix("abc"));
  EXPECT_FALSE(regex("bc").match_prefix("abc"));
  EXPECT_TRUE(regex("ab$").match_prefix("ab\n"));
  EXPECT_FALSE(regex("ab\\Z").match_prefix("ab\n"));
  EXPECT_TRUE(regex("^a|^b").match_prefix("b"));
}

TEST(PeftRegex, RefusesWhatItCannotDoAndStaysLinear) {
  using io::detail::regex;
  for (const char* bad :
       {"a**", "*a", "(a", "a)", "[a", "(?=a)", "(?i)a", "\\1", "\\b", "a{3,2}", "(?P=x)", "\\q", "[z-a]", "^*"}) {
    EXPECT_THROW(regex{bad}, lora::format_error) << bad;
  }
  expect_error<lora::format_error>([] { regex("(a{100}){1000}"); }, {"too complex", "(a{100}){1000}"});
  expect_error<lora::format_error>([] { regex(std::string(200, '(') + std::string(200, ')')); }, {"nest"});
  // A repeated empty group compiles to nothing, however large the count (it once looped 4e9 times).
  EXPECT_TRUE(regex("(){4000000000}").match_full(""));
  EXPECT_TRUE(regex("a(?:){99999}b").match_full("ab"));
  EXPECT_TRUE(regex("a{0}b").match_full("b"));
  // A pattern that is exponential for a backtracking matcher finishes at once here.
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(regex("(a|a)*(a|aa)*c").match_full(std::string(3000, 'a')));
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
}

TEST(PeftRegex, PeftPatternKeys) {
  using io::detail::pattern_key_matches;
  // get_pattern_key: re.match(r"(.*\.)?(key)$", path).
  EXPECT_TRUE(pattern_key_matches("q_proj", "model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(pattern_key_matches("q_proj", "q_proj"));
  EXPECT_FALSE(pattern_key_matches("proj", "model.q_proj"));  // a whole trailing component
  EXPECT_TRUE(pattern_key_matches("layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"));
  EXPECT_FALSE(pattern_key_matches("layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj"));
  EXPECT_TRUE(pattern_key_matches("layers\\.[0-3]\\..*", "model.layers.2.mlp.up_proj"));
  EXPECT_FALSE(pattern_key_matches("layers\\.[0-3]\\..*", "model.layers.5.mlp.up_proj"));
  EXPECT_FALSE(pattern_key_matches("q_proj", "model.q_proj.sub"));  // anchored at the end
  // The key is spliced in unescaped, so "." matches any character, as in PEFT.
  EXPECT_TRUE(pattern_key_matches("h.0.attn", "transformer.hx0.attn"));
  EXPECT_EQ(io::detail::regex_escape("h.0(x)"), "h\\.0\\(x\\)");
  EXPECT_TRUE(pattern_key_matches(io::detail::regex_escape("h.0.attn"), "transformer.h.0.attn"));
  EXPECT_FALSE(pattern_key_matches(io::detail::regex_escape("h.0.attn"), "transformer.hx0.attn"));
}

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

// --- a GPT-2 adapter written byte by byte -------------------------------------------------------------

// GPT2ForSequenceClassification with r = 2 on c_attn (Conv1D, stored in x out: fan_in_fan_out) and the
// classification head "score" in modules_to_save. in = 3, out = 4, 2 labels.
const char* const gpt2_config = R"({
  "base_model_name_or_path": "gpt2", "bias": "none", "fan_in_fan_out": true, "inference_mode": true,
  "init_lora_weights": true, "lora_alpha": 4, "lora_dropout": 0.1, "modules_to_save": ["score"],
  "peft_type": "LORA", "r": 2, "rank_pattern": {}, "alpha_pattern": {},
  "target_modules": ["c_attn"], "task_type": "SEQ_CLS", "use_dora": false, "use_rslora": false
})";

bytes gpt2_weights() {
  // Tensors in the reference writer's order (names ascending for one dtype), offsets tiling the data.
  const std::string header =
      R"({"__metadata__":{"format":"pt"},)"
      R"("base_model.model.score.weight":{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]},)"
      R"("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[32,56]},)"
      R"("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight":{"dtype":"F32","shape":[4,2],"data_offsets":[56,88]}})";
  bytes data;
  for (float v : {0.5f, -1.0f, 1.5f, -2.0f, 2.5f, -3.0f, 3.5f, -4.0f}) put_f32(data, v);  // score [2, 4]
  for (float v : {0.125f, 0.25f, 0.375f, -0.125f, -0.25f, -0.375f}) put_f32(data, v);     // A [2, 3]
  for (float v : {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f, 8.0f}) put_f32(data, v);      // B [4, 2]
  return file_image(header, data);
}

void check_gpt2(const io::peft_adapter& a) {
  EXPECT_TRUE(a.config.fan_in_fan_out);
  EXPECT_EQ(a.config.modules_to_save, std::vector<std::string>{"score"});
  EXPECT_EQ(a.config.task_type, std::optional<std::string>("SEQ_CLS"));
  ASSERT_EQ(a.modules.size(), 1u);
  const io::peft_module& m = a.modules[0];
  EXPECT_EQ(m.path, "transformer.h.0.attn.c_attn");
  EXPECT_FALSE(m.embedding);
  EXPECT_EQ(m.type, io::dtype::f32);
  lora::matrix<double> A(2, 3), B(4, 2);
  A << 0.125, 0.25, 0.375, -0.125, -0.25, -0.375;  // row-major on disk: A(0, :) first
  B << 1, 2, 3, 4, 5, 6, 7, 8;
  EXPECT_EQ(m.a, A);
  EXPECT_EQ(m.b, B);
  EXPECT_EQ(m.rank(), 2);
  EXPECT_EQ(m.in_features(), 3);
  EXPECT_EQ(m.out_features(), 4);
  ASSERT_EQ(a.full_tensors.size(), 1u);
  const io::peft_full_tensor& s = a.full_tensors[0];
  EXPECT_EQ(s.path, "score.weight");
  EXPECT_EQ(s.shape, (std::vector<std::int64_t>{2, 4}));
  lora::vector<double> expected(8);
  expected << 0.5, -1.0, 1.5, -2.0, 2.5, -3.0, 3.5, -4.0;
  EXPECT_EQ(s.values<double>(), expected);
  EXPECT_EQ(a.parameter_count(), 8 + 6 + 8);
  EXPECT_DOUBLE_EQ(a.config.scaling_for(m.path), 2.0);
}

TEST(PeftAdapter, ReadsAGpt2AdapterBuiltByteByByte) {
  const bytes weights = gpt2_weights();
  check_gpt2(io::peft_adapter::from_memory(gpt2_config, weights));
  // The same from a directory, and the layout view used by the tools.
  temp_dir dir;
  write_file(dir.file("adapter_config.json"), std::string(gpt2_config));
  write_file(dir.file("adapter_model.safetensors"), weights);
  check_gpt2(io::peft_adapter::load(dir.path()));
  const io::peft_adapter_file file = io::peft_adapter_file::open(dir.path());
  ASSERT_EQ(file.modules().size(), 1u);
  EXPECT_EQ(file.modules()[0].a_key, prefix + "transformer.h.0.attn.c_attn.lora_A.weight");
  EXPECT_EQ(file.modules()[0].rank, 2);
  EXPECT_EQ(file.modules()[0].in, 3);
  EXPECT_EQ(file.modules()[0].out, 4);
  EXPECT_EQ(file.parameter_count(), 22);
  ASSERT_EQ(file.full_tensors().size(), 1u);
  EXPECT_EQ(file.full_tensors()[0].name, prefix + "score.weight");
  EXPECT_EQ(file.tensors().metadata().at("format"), "pt");
}

TEST(PeftAdapter, SaveThenLoadRoundTrips) {
  io::peft_adapter a = io::peft_adapter::from_memory(gpt2_config, gpt2_weights());
  // Add an embedding module and a second, bf16, linear module under rank_pattern.
  io::peft_module e;
  e.path = "transformer.wte";
  e.embedding = true;
  e.a = lora::matrix<double>::Constant(2, 5, 0.5);
  e.b = lora::matrix<double>::Constant(3, 2, -0.25);
  a.modules.push_back(e);
  io::peft_module q;
  q.path = "transformer.h.1.attn.c_attn";
  q.a = lora::matrix<double>::Constant(1, 3, 1.5);
  q.b = lora::matrix<double>::Constant(4, 1, 0.75);
  q.type = io::dtype::bf16;
  a.modules.push_back(q);
  a.config.rank_pattern = {{"h\\.1\\.attn\\.c_attn", 1}};
  a.full_tensors.push_back(io::peft_full_tensor::from_matrix("score.bias", lora::matrix<double>::Constant(1, 2, 0.5)));
  a.full_tensors.back().shape = {2};

  temp_dir dir;
  const std::string out = dir.file("saved/adapter");  // created on demand
  a.save(out);
  const io::peft_adapter b = io::peft_adapter::load(out);
  EXPECT_EQ(b.config.to_json(), a.config.to_json());
  ASSERT_EQ(b.modules.size(), 3u);
  for (const io::peft_module& m : b.modules) {
    const io::peft_module* original = a.find(m.path);
    ASSERT_NE(original, nullptr) << m.path;
    EXPECT_EQ(m.a, original->a) << m.path;
    EXPECT_EQ(m.b, original->b) << m.path;
    EXPECT_EQ(m.embedding, original->embedding);
    EXPECT_EQ(m.type, original->type);
  }
  ASSERT_EQ(b.full_tensors.size(), 2u);
  EXPECT_EQ(b.full_tensors[0].path, "score.bias");
  EXPECT_EQ(b.full_tensors[0].values<double>(), lora::vector<double>::Constant(2, 0.5));
  EXPECT_EQ(b.full_tensors[1].values<double>(), a.full_tensors[0].values<double>());
  // Keys as PEFT names them, metadata {"format": "pt"}, nothing left behind.
  const io::safetensors_file st = io::safetensors_file::open(out + "/adapter_model.safetensors");
  EXPECT_EQ(st.metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
  EXPECT_TRUE(st.contains(prefix + "transformer.wte.lora_embedding_A"));
  EXPECT_TRUE(st.contains(prefix + "transformer.h.1.attn.c_attn.lora_B.weight"));
  EXPECT_EQ(st.info(prefix + "transformer.h.1.attn.c_attn.lora_B.weight").type, io::dtype::bf16);
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(out)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors"}));
  // The bytes save() writes are the bytes safetensors_bytes() returns.
  EXPECT_EQ(read_file(out + "/adapter_model.safetensors"), a.safetensors_bytes());
  // Saving over an existing adapter replaces it.
  a.modules.pop_back();
  a.config.rank_pattern.clear();
  a.save(out);
  EXPECT_EQ(io::peft_adapter::load(out).modules.size(), 2u);
}

TEST(PeftAdapter, LoadRefusesBrokenFilesNamingTheModule) {
  const std::string q = prefix + "model.q";
  struct row {
    std::string config;
    std::vector<tensor_def> tensors;
    std::vector<std::string> fragments;
  };
  const std::vector<row> rows = {
      {minimal_config, {{q + ".lora_A.weight", {2, 3}, iota(6)}}, {"module 'model.q'", "no lora_B.weight"}},
      {minimal_config, {{q + ".lora_B.weight", {4, 2}, iota(8)}}, {"module 'model.q'", "no lora_A.weight"}},
      {minimal_config,
       {{q + ".lora_A.weight", {2, 3}, iota(6)}, {q + ".lora_B.weight", {4, 3}, iota(12)}},
       {"module 'model.q'", "disagree on the rank", "2 vs 3"}},
      {minimal_config,
       {{q + ".lora_A.weight", {3, 3}, iota(9)}, {q + ".lora_B.weight", {4, 3}, iota(12)}},
       {"module 'model.q'", "rank 3", "r = 2"}},
      {R"({"peft_type": "LORA", "r": 2, "rank_pattern": {"q": 3}})",
       {{q + ".lora_A.weight", {2, 3}, iota(6)}, {q + ".lora_B.weight", {4, 2}, iota(8)}},
       {"module 'model.q'", "rank 2", "r = 3", "rank_pattern"}},
      {minimal_config,
       {{q + ".lora_A.weight", {6}, iota(6)}, {q + ".lora_B.weight", {4, 2}, iota(8)}},
       {"module 'model.q'", "2-D"}},
      {minimal_config,
       {{q + ".lora_A.weight", {2, 3}, iota(6)},
        {q + ".lora_B.weight", {4, 2}, iota(8)},
        {q + ".lora_B.bias", {4}, iota(4)}},
       {"module 'model.q'", "lora_bias = false"}},
      {minimal_config,
       {{q + ".lora_A.weight", {2, 3}, iota(6)},
        {q + ".lora_B.weight", {4, 2}, iota(8)},
        {q + ".lora_magnitude_vector", {4}, iota(4)}},
       {"module 'model.q'", "use_dora = false"}},
      {R"({"peft_type": "LORA", "r": 2, "use_dora": true})",
       {{q + ".lora_A.weight", {2, 3}, iota(6)},
        {q + ".lora_B.weight", {4, 2}, iota(8)},
        {q + ".lora_magnitude_vector", {3}, iota(3)}},
       {"module 'model.q'", "lora_magnitude_vector", "[4]"}},
      {R"({"peft_type": "LORA", "r": 2, "use_dora": true})",
       {{q + ".lora_A.weight", {2, 3}, iota(6)}, {q + ".lora_B.weight", {4, 2}, iota(8)}},
       {"module 'model.q'", "no lora_magnitude_vector"}},
      {minimal_config,
       {{q + ".lora_A.weight", {2, 3}, iota(6)}, {q + ".lora_embedding_B", {4, 2}, iota(8)}},
       {"module 'model.q'", "mixes"}},
      {minimal_config, {{"model.q.lora_A.weight", {2, 3}, iota(6)}}, {"model.q.lora_A.weight", "base_model.model."}},
      {minimal_config, {{q + ".lora_A.default.weight", {2, 3}, iota(6)}}, {"lora_A.default.weight", "raw state_dict"}},
  };
  for (const row& r : rows) {
    SCOPED_TRACE(r.fragments.front() + " / " + r.fragments.back());
    try {
      io::peft_adapter::from_memory(r.config, make_weights(r.tensors));
      ADD_FAILURE() << "no exception";
    } catch (const lora::error& e) {
      for (const auto& f : r.fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
    }
  }
  // A module whose tensors mix dtypes keeps every value: it is saved in a dtype that holds them all.
  {
    io::safetensors_writer mixed;
    mixed.add(q + ".lora_A.weight", lora::matrix<double>::Constant(2, 3, 1.0 + 1.0 / 1024), io::dtype::f16);
    mixed.add(q + ".lora_B.weight", lora::matrix<double>::Constant(4, 2, 1.0 + 1.0 / 128), io::dtype::bf16);
    const io::peft_adapter m = io::peft_adapter::from_memory(minimal_config, mixed.to_bytes());
    ASSERT_EQ(m.modules.size(), 1u);
    EXPECT_EQ(m.modules[0].type, io::dtype::f32);
    const io::peft_adapter back = io::peft_adapter::from_memory(m.config.to_json(), m.safetensors_bytes());
    EXPECT_EQ(back.modules[0].a, m.modules[0].a);
    EXPECT_EQ(back.modules[0].b, m.modules[0].b);
  }
  // Integer factors are a dtype error.
  io::safetensors_writer w;
  const std::vector<unsigned char> raw(6 * 4, 0), raw_b(8 * 4, 0);
  w.add_raw(q + ".lora_A.weight", io::dtype::i32, {2, 3}, raw);
  w.add_raw(q + ".lora_B.weight", io::dtype::f32, {4, 2}, raw_b);
  expect_error<lora::dtype_error>([&] { io::peft_adapter::from_memory(minimal_config, w.to_bytes()); },
                                  {"module 'model.q'", "I32"});
  // Directories: only safetensors; missing pieces are io errors.
  temp_dir dir;
  expect_error<lora::io_error>([&] { io::peft_adapter::load(dir.file("nope")); }, {"not a directory"});
  write_file(dir.file("adapter_model.bin"), std::string("pickle"));
  expect_error<lora::format_error>([&] { io::peft_adapter::load(dir.path()); },
                                   {"adapter_model.bin", "only adapter_model.safetensors is supported"});
  write_file(dir.file("adapter_model.safetensors"), gpt2_weights());
  expect_error<lora::io_error>([&] { io::peft_adapter::load(dir.path()); }, {"adapter_config.json"});
}

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
    bad.modules[1].magnitude = lora::vector<double>::Ones(4);
    expect_error<lora::config_error>([&] { io::attach(bad, layers, "peft"); }, {"h.1.attn.c_attn", "DoRA"});
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

TEST(PeftPatterns, SuffixIndex) {
  const io::detail::suffix_index index({"h.0.attn.c_attn", "h.1.attn.c_attn", "model.layers.0.q", "x.layers.0.q"});
  EXPECT_EQ(index.find("transformer.h.0.attn.c_attn", "m"), 0);
  EXPECT_EQ(index.find("h.1.attn.c_attn", "m"), 1);
  EXPECT_THROW(index.find("attn.c_attn", "m"), lora::name_error);  // a suffix of both, equally
  EXPECT_EQ(index.find("h.2.attn.c_attn", "m"), -1);
  EXPECT_EQ(index.find("model.model.layers.0.q", "m"), 2);
  // An identical path beats a longer one that ends with it.
  const io::detail::suffix_index nested({"x.a.b", "a.b"});
  EXPECT_EQ(nested.find("a.b", "m"), 1);
  EXPECT_EQ(nested.find("x.a.b", "m"), 0);
  EXPECT_EQ(nested.find("y.x.a.b", "m"), 0);
  expect_error<lora::name_error>([&] { index.find("layers.0.q", "adapter module 'layers.0.q'"); },
                                 {"adapter module 'layers.0.q'", "ambiguous", "model.layers.0.q", "x.layers.0.q"});
}

}  // namespace
