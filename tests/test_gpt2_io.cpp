// tests/test_gpt2_io.cpp: GPT-2 checkpoint folders (models/gpt2_io.hpp). config.json parsing and its
// errors; round trips in F32 (bit-identical, zero-copy through a copy-on-write mapping), F16 and BF16
// (exactly the rounded values), with and without the "transformer." prefix; the tied LM head and the
// attention buffers; one malformed file per rule, each with its error class and a message naming the
// file and the tensor or key; and saves that fail without leaving anything half-written.
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <lora/models/gpt2_io.hpp>
#include <string>
#include <vector>

#include "file_support.hpp"
#include "support.hpp"

namespace {

namespace io = lora::io;
namespace models = lora::models;
using lora::index;
using lora_test::expect_error;
using lora_test::read_file;
using lora_test::temp_dir;
using lora_test::write_file;
using bytes = std::vector<unsigned char>;

/// 2 layers, 2 heads, width 8, context 16, vocabulary 20: 4 + 12 x 2 = 28 tensors.
models::gpt2_config tiny() {
  models::gpt2_config c;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 8;
  c.n_positions = 16;
  c.vocab_size = 20;
  return c;
}

/// Every tensor of `w` with `prefix`, in `type`, ready for extra tensors before it is written.
io::safetensors_writer tensors_of(const models::gpt2_weights<float>& w, const std::string& prefix = "transformer.",
                                  io::dtype type = io::dtype::f32, const std::string& skip = "") {
  io::safetensors_writer out;
  for (index id = 0; id < w.num_tensors(); ++id) {
    const auto& s = w.spec(id);
    if (s.name == skip) continue;
    if (s.is_vector()) {
      out.add(prefix + s.name, w.flat(id), type, {s.rows});
    } else {
      out.add(prefix + s.name, w.matrix(id), type, {s.rows, s.cols});
    }
  }
  return out;
}

/// A folder with config.json for `config` and model.safetensors from `tensors`.
void write_folder(const temp_dir& dir, const models::gpt2_config& config, const io::safetensors_writer& tensors) {
  write_file(dir.file("config.json"), models::gpt2_config_json(config));
  tensors.write(dir.file("model.safetensors"));
}

/// Expects every tensor of `a` and `b` to hold the same bits.
template <typename Scalar>
void expect_bit_identical(const models::gpt2_weights<Scalar>& a, const models::gpt2_weights<Scalar>& b) {
  ASSERT_EQ(a.num_tensors(), b.num_tensors());
  for (index id = 0; id < a.num_tensors(); ++id) {
    const auto n = static_cast<std::size_t>(a.spec(id).size());
    EXPECT_EQ(std::memcmp(a.data(id), b.data(id), n * sizeof(Scalar)), 0) << a.spec(id).name;
  }
}

// --- config.json -------------------------------------------------------------------------------------

/// GPT-2 small's config.json as the Hugging Face hub serves it.
constexpr const char* gpt2_small_json = R"({
  "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
  "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
  "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
  "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": null,
  "summary_first_dropout": 0.1, "summary_proj_to_labels": true, "summary_type": "cls_index",
  "summary_use_proj": true, "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}},
  "vocab_size": 50257})";

TEST(Gpt2Config, ReadsHuggingFaceGpt2Small) {
  const models::gpt2_config c = models::parse_gpt2_config(gpt2_small_json);
  EXPECT_EQ(c.n_layer, 12);
  EXPECT_EQ(c.n_head, 12);
  EXPECT_EQ(c.n_embd, 768);
  EXPECT_EQ(c.n_positions, 1024);
  EXPECT_EQ(c.vocab_size, 50257);
  EXPECT_EQ(c.layer_norm_epsilon, 1e-5);
  EXPECT_EQ(c.num_parameters(), 124439808);
}

TEST(Gpt2Config, NCtxStandsInForNPositionsAndEpsilonDefaults) {
  const auto c = models::parse_gpt2_config(R"({"n_layer": 1, "n_head": 2, "n_embd": 4, "n_ctx": 7, "vocab_size": 3})");
  EXPECT_EQ(c.n_positions, 7);
  EXPECT_EQ(c.layer_norm_epsilon, 1e-5);
  const auto both = models::parse_gpt2_config(
      R"({"n_layer": 1, "n_head": 2, "n_embd": 4, "n_ctx": 7, "n_positions": 9, "vocab_size": 3})");
  EXPECT_EQ(both.n_positions, 9);
}

TEST(Gpt2Config, WrittenFormIsHuggingFacesAndReadsBack) {
  models::gpt2_config c = tiny();
  c.layer_norm_epsilon = 1e-6;
  const auto j = nlohmann::json::parse(models::gpt2_config_json(c, io::dtype::bf16));
  EXPECT_EQ(j.at("model_type"), "gpt2");
  EXPECT_EQ(j.at("architectures"), nlohmann::json::array({"GPT2LMHeadModel"}));
  EXPECT_EQ(j.at("activation_function"), "gelu_new");
  EXPECT_EQ(j.at("n_ctx"), 16);
  EXPECT_EQ(j.at("bos_token_id"), 19);
  EXPECT_EQ(j.at("eos_token_id"), 19);
  EXPECT_EQ(j.at("tie_word_embeddings"), true);
  EXPECT_EQ(j.at("resid_pdrop"), 0.1);
  EXPECT_EQ(j.at("initializer_range"), 0.02);
  EXPECT_EQ(j.at("torch_dtype"), "bfloat16");
  const auto back = models::parse_gpt2_config(j.dump());
  EXPECT_EQ(back.n_layer, c.n_layer);
  EXPECT_EQ(back.n_head, c.n_head);
  EXPECT_EQ(back.n_embd, c.n_embd);
  EXPECT_EQ(back.n_positions, c.n_positions);
  EXPECT_EQ(back.vocab_size, c.vocab_size);
  EXPECT_EQ(back.layer_norm_epsilon, c.layer_norm_epsilon);
}

/// config.json text with one key replaced (or removed when `value` is empty).
std::string config_with(const std::string& key, const std::string& value) {
  nlohmann::json j = nlohmann::json::parse(models::gpt2_config_json(tiny()));
  if (value.empty()) {
    j.erase(key);
  } else {
    j[key] = nlohmann::json::parse(value);
  }
  return j.dump();
}

TEST(Gpt2Config, MalformedFilesAreFormatErrorsNamingFileAndKey) {
  temp_dir dir;
  const std::string path = dir.file("config.json");
  const auto check = [&](const std::string& text, std::initializer_list<std::string> fragments) {
    write_file(path, text);
    SCOPED_TRACE(text);
    expect_error<lora::format_error>([&] { models::read_gpt2_config(path); }, fragments);
    expect_error<lora::format_error>([&] { models::read_gpt2_config(path); }, {path});
  };
  check("{\"n_layer\": 2,", {"not valid JSON"});
  check("[1, 2]", {"expected a JSON object, got array"});
  check(config_with("n_embd", ""), {"missing key 'n_embd'"});
}

TEST(Gpt2Config, EachBadKeyGivesItsErrorClassNamingFileAndKey) {
  temp_dir dir;
  const std::string path = dir.file("config.json");
  const auto format = [&](const std::string& key, const std::string& value, const std::string& fragment) {
    write_file(path, config_with(key, value));
    expect_error<lora::format_error>([&] { models::read_gpt2_config(path); }, {path, "'" + key + "'", fragment});
  };
  const auto config = [&](const std::string& key, const std::string& value, const std::string& fragment) {
    write_file(path, config_with(key, value));
    expect_error<lora::config_error>([&] { models::read_gpt2_config(path); }, {path, key, fragment});
  };
  format("n_head", "\"2\"", "must be an integer, got string");
  format("n_layer", "2.5", "must be an integer, got number");
  format("vocab_size", "18446744073709551615", "too large");
  format("layer_norm_epsilon", "\"small\"", "must be a number");
  format("activation_function", "3", "must be a string");
  format("n_inner", "\"32\"", "must be an integer");
  config("model_type", "\"llama\"", "\"gpt2\"");
  config("activation_function", "\"relu\"", "gelu_new");
  config("tie_word_embeddings", "false", "true");
  config("scale_attn_by_inverse_layer_idx", "true", "false");
  config("n_inner", "33", "4 n_embd = 4 x 8");
  config("n_layer", "0", "must be positive");
  config("n_head", "3", "multiple of n_head");
  config("layer_norm_epsilon", "-1", "(0, 1]");
}

TEST(Gpt2Config, KeysThatAreNullOrAbsentTakeDefaults) {
  EXPECT_EQ(models::parse_gpt2_config(config_with("n_inner", "32")).n_embd, 8);
  EXPECT_EQ(models::parse_gpt2_config(config_with("model_type", "")).n_embd, 8);
  EXPECT_EQ(models::parse_gpt2_config(config_with("activation_function", "null")).n_embd, 8);
  EXPECT_EQ(models::parse_gpt2_config(config_with("layer_norm_epsilon", "")).layer_norm_epsilon, 1e-5);
  const std::string neither = [] {
    nlohmann::json j = nlohmann::json::parse(config_with("n_ctx", ""));
    j.erase("n_positions");
    return j.dump();
  }();
  expect_error<lora::format_error>([&] { models::parse_gpt2_config(neither, "cfg"); }, {"cfg", "'n_positions'"});
}

TEST(Gpt2Config, MissingFileIsIoError) {
  temp_dir dir;
  expect_error<lora::io_error>([&] { models::read_gpt2_config(dir.file("config.json")); }, {dir.file("config.json")});
}

// --- round trips ---------------------------------------------------------------------------------------

TEST(Gpt2Io, F32RoundTripIsBitIdenticalAndZeroCopy) {
  temp_dir dir;
  const auto w = models::gpt2_weights<float>::random(tiny(), 7);
  models::save_gpt2(dir.path(), w);
  const auto ck = models::load_gpt2<float>(dir.path());
  EXPECT_FALSE(ck.weights.owns_storage());
  EXPECT_EQ(ck.config.vocab_size, 20);
  EXPECT_EQ(ck.weights.config().n_layer, 2);
  expect_bit_identical(w, ck.weights);

  const auto file = io::safetensors_file::open(dir.file("model.safetensors"));
  EXPECT_EQ(file.metadata().at("format"), "pt");
  EXPECT_EQ(file.tensors().size(), 28u);
  EXPECT_TRUE(file.contains("transformer.h.1.mlp.c_proj.weight"));
  EXPECT_FALSE(file.contains("lm_head.weight"));
  EXPECT_EQ(file.info("transformer.h.0.attn.c_attn.weight").shape, (std::vector<std::int64_t>{8, 24}));
  EXPECT_EQ(file.info("transformer.h.0.mlp.c_fc.bias").shape, (std::vector<std::int64_t>{32}));
}

TEST(Gpt2Io, WritingBorrowedWeightsNeverReachesTheFile) {
  temp_dir dir;
  models::save_gpt2(dir.path(), models::gpt2_weights<float>::random(tiny(), 1));
  const bytes before = read_file(dir.file("model.safetensors"));
  auto ck = models::load_gpt2<float>(dir.path());
  ASSERT_FALSE(ck.weights.owns_storage());
  ck.weights.wte()(3, 4) = 42.0f;
  ck.weights.block(1, models::block_tensor::c_fc_weight).setConstant(-1.0f);
  EXPECT_EQ(ck.weights.wte()(3, 4), 42.0f);
  EXPECT_EQ(read_file(dir.file("model.safetensors")), before);
  const auto again = models::load_gpt2<float>(dir.path());
  EXPECT_NE(again.weights.wte()(3, 4), 42.0f);
}

TEST(Gpt2Io, SavingOverTheFolderOfBorrowedWeightsIsSafe) {
  temp_dir dir;
  models::save_gpt2(dir.path(), models::gpt2_weights<float>::random(tiny(), 2));
  auto ck = models::load_gpt2<float>(dir.path());
  const float old_value = ck.weights.wpe()(0, 0);
  ck.weights.ln_f_bias()[1] = 5.0f;
  models::save_gpt2(dir.path(), ck.weights);  // replaces the file the weights are mapped from
  EXPECT_EQ(ck.weights.wpe()(0, 0), old_value);
  const auto back = models::load_gpt2<float>(dir.path());
  EXPECT_EQ(back.weights.ln_f_bias()[1], 5.0f);
  expect_bit_identical(ck.weights, back.weights);
}

template <typename Scalar>
class Gpt2IoRoundTrip : public ::testing::Test {};
TYPED_TEST_SUITE(Gpt2IoRoundTrip, lora_test::scalar_types);

TYPED_TEST(Gpt2IoRoundTrip, EveryDtypeGivesExactlyTheRoundedValues) {
  using Scalar = TypeParam;
  const auto w = models::gpt2_weights<Scalar>::random(tiny(), 3);
  for (const io::dtype type : {io::dtype::f32, io::dtype::f16, io::dtype::bf16}) {
    SCOPED_TRACE(io::dtype_name(type));
    temp_dir dir;
    models::save_gpt2(dir.path(), w, {type, "transformer."});
    EXPECT_EQ(nlohmann::json::parse(read_file(dir.file("config.json"))).at("torch_dtype"),
              type == io::dtype::f32   ? "float32"
              : type == io::dtype::f16 ? "float16"
                                       : "bfloat16");
    const auto ck = models::load_gpt2<Scalar>(dir.path());
    const bool borrowed = type == io::dtype::f32 && std::is_same_v<Scalar, float>;
    EXPECT_EQ(ck.weights.owns_storage(), !borrowed);
    for (index id = 0; id < w.num_tensors(); ++id) {
      const auto a = w.flat(id);
      const auto b = ck.weights.flat(id);
      std::vector<unsigned char> stored(static_cast<std::size_t>(a.size()) * io::dtype_size(type));
      io::detail::encode<Scalar>(type, a.data(), stored.size() / io::dtype_size(type), stored.data());
      std::vector<Scalar> expected(static_cast<std::size_t>(a.size()));
      io::detail::decode<Scalar>(type, stored.data(), expected.size(), expected.data());
      for (index i = 0; i < a.size(); ++i) ASSERT_EQ(b[i], expected[static_cast<std::size_t>(i)]) << w.spec(id).name;
    }
  }
}

TYPED_TEST(Gpt2IoRoundTrip, FilesWithoutThePrefixLoadToo) {
  using Scalar = TypeParam;
  temp_dir dir;
  const auto w = models::gpt2_weights<Scalar>::random(tiny(), 4);
  models::save_gpt2(dir.path(), w, {io::dtype::f32, ""});
  const auto file = io::safetensors_file::open(dir.file("model.safetensors"));
  EXPECT_TRUE(file.contains("wte.weight"));
  EXPECT_FALSE(file.contains("transformer.wte.weight"));
  const auto ck = models::load_gpt2<Scalar>(dir.path());
  using vector_t = lora::vector<Scalar>;
  for (index id = 0; id < w.num_tensors(); ++id) {
    const vector_t expected = w.flat(id).template cast<float>().template cast<Scalar>();
    EXPECT_EQ(vector_t(ck.weights.flat(id)), expected) << w.spec(id).name;
  }
}

TEST(Gpt2Io, MisalignedOrUnmappedF32IsCopiedIntoOwnedStorage) {
  temp_dir dir;
  const auto w = models::gpt2_weights<float>::random(tiny(), 5);
  // Two more spaces after the header put every tensor at an offset of 2 mod 4.
  bytes image = tensors_of(w).to_bytes();
  const std::uint64_t n = io::detail::load_le<std::uint64_t>(image.data());
  image.insert(image.begin() + static_cast<std::ptrdiff_t>(8 + n), {' ', ' '});
  io::detail::store_le<std::uint64_t>(n + 2, image.data());
  write_file(dir.file("config.json"), models::gpt2_config_json(tiny()));
  write_file(dir.file("model.safetensors"), image);
  const auto misaligned = models::load_gpt2<float>(dir.path());
  EXPECT_TRUE(misaligned.weights.owns_storage());
  expect_bit_identical(w, misaligned.weights);

  models::save_gpt2(dir.path(), w);
  const auto unmapped = models::load_gpt2<float>(dir.path(), {false});
  EXPECT_TRUE(unmapped.weights.owns_storage());
  expect_bit_identical(w, unmapped.weights);
}

TEST(Gpt2Io, TiedLmHeadAndAttentionBuffersAreIgnored) {
  temp_dir dir;
  const auto w = models::gpt2_weights<float>::random(tiny(), 6);
  for (const std::string prefix : {"transformer.", ""}) {
    SCOPED_TRACE(prefix);
    io::safetensors_writer t = tensors_of(w, prefix);
    t.add("lm_head.weight", w.wte(), io::dtype::f32, {20, 8});
    const Eigen::MatrixXf mask = Eigen::MatrixXf::Ones(16, 16);
    t.add(prefix + "h.0.attn.bias", mask, io::dtype::f32, {1, 1, 16, 16});
    t.add(prefix + "h.1.attn.masked_bias", Eigen::VectorXf::Constant(1, -1e4f), io::dtype::f32, {});
    write_folder(dir, tiny(), t);
    const auto ck = models::load_gpt2<float>(dir.path());
    expect_bit_identical(w, ck.weights);
  }
  // A tied head stored in another dtype than wte compares after conversion.
  io::safetensors_writer half = tensors_of(w, "transformer.", io::dtype::f16);
  half.add("lm_head.weight", w.wte(), io::dtype::f16, {20, 8});
  write_folder(dir, tiny(), half);
  EXPECT_NO_THROW(models::load_gpt2<double>(dir.path()));
}

TEST(Gpt2Io, UntiedLmHeadIsRefused) {
  temp_dir dir;
  const auto w = models::gpt2_weights<float>::random(tiny(), 8);
  Eigen::MatrixXf head = w.wte();
  head(19, 7) += 1.0f;
  io::safetensors_writer t = tensors_of(w);
  t.add("lm_head.weight", head, io::dtype::f32, {20, 8});
  write_folder(dir, tiny(), t);
  const std::string file = dir.file("model.safetensors");
  expect_error<lora::format_error>([&] { models::load_gpt2<float>(dir.path()); },
                                   {file, "'lm_head.weight'", "untied", "element 159"});
  io::safetensors_writer wide = tensors_of(w);
  wide.add("lm_head.weight", Eigen::MatrixXf::Zero(21, 8), io::dtype::f32, {21, 8});
  write_folder(dir, tiny(), wide);
  expect_error<lora::format_error>([&] { models::load_gpt2<float>(dir.path()); },
                                   {file, "'lm_head.weight' has shape [21, 8], expected [20, 8]"});
}

// --- malformed files -----------------------------------------------------------------------------------

/// Writes the folder and expects load_gpt2 to throw E naming model.safetensors and each fragment.
template <typename E>
void expect_load_error(const models::gpt2_config& config, const io::safetensors_writer& tensors,
                       std::initializer_list<std::string> fragments) {
  temp_dir dir;
  write_folder(dir, config, tensors);
  expect_error<E>([&] { models::load_gpt2<float>(dir.path()); }, {dir.file("model.safetensors")});
  expect_error<E>([&] { models::load_gpt2<float>(dir.path()); }, fragments);
}

TEST(Gpt2IoMalformed, MissingExtraAndMisShapedTensors) {
  const auto w = models::gpt2_weights<float>::random(tiny(), 9);
  expect_load_error<lora::format_error>(tiny(), tensors_of(w, "transformer.", io::dtype::f32, "h.1.mlp.c_fc.bias"),
                                        {"missing tensor 'transformer.h.1.mlp.c_fc.bias'", "[32]"});
  expect_load_error<lora::format_error>(tiny(), tensors_of(w, "", io::dtype::f32, "ln_f.weight"),
                                        {"missing tensor 'ln_f.weight'"});
  auto extra = tensors_of(w);
  extra.add("transformer.h.0.attn.q_proj.weight", Eigen::MatrixXf::Zero(8, 8));
  expect_load_error<lora::format_error>(tiny(), extra, {"unexpected tensor 'transformer.h.0.attn.q_proj.weight'"});
  auto buffer_of_layer_two = tensors_of(w);
  buffer_of_layer_two.add("transformer.h.2.attn.bias", Eigen::MatrixXf::Zero(1, 1));
  expect_load_error<lora::format_error>(tiny(), buffer_of_layer_two, {"unexpected tensor 'transformer.h.2.attn.bias'"});
  auto shaped = tensors_of(w, "transformer.", io::dtype::f32, "h.0.ln_2.bias");
  shaped.add("transformer.h.0.ln_2.bias", Eigen::VectorXf::Zero(9), io::dtype::f32, {9});
  expect_load_error<lora::format_error>(tiny(), shaped, {"'transformer.h.0.ln_2.bias' has shape [9], expected [8]"});
  auto transposed = tensors_of(w, "transformer.", io::dtype::f32, "h.1.attn.c_attn.weight");
  transposed.add("transformer.h.1.attn.c_attn.weight", Eigen::MatrixXf::Zero(24, 8));
  expect_load_error<lora::format_error>(tiny(), transposed, {"has shape [24, 8], expected [8, 24]"});
}

TEST(Gpt2IoMalformed, ConfigDisagreeingWithTheTensors) {
  const auto w = models::gpt2_weights<float>::random(tiny(), 10);
  models::gpt2_config more_words = tiny();
  more_words.vocab_size = 21;
  expect_load_error<lora::format_error>(
      more_words, tensors_of(w), {"'transformer.wte.weight' has shape [20, 8], expected [21, 8]", "vocab_size 21"});
  models::gpt2_config fewer_layers = tiny();
  fewer_layers.n_layer = 1;
  expect_load_error<lora::format_error>(fewer_layers, tensors_of(w), {"unexpected tensor 'transformer.h.1."});
  models::gpt2_config more_layers = tiny();
  more_layers.n_layer = 3;
  expect_load_error<lora::format_error>(more_layers, tensors_of(w), {"n_layer 3", "28 tensors"});
}

TEST(Gpt2IoMalformed, AbsurdConfigIsRefusedBeforeAllocating) {
  const auto w = models::gpt2_weights<float>::random(tiny(), 11);
  // Within gpt2_config's bounds but far more than the file holds: refused by the file check.
  models::gpt2_config huge = tiny();
  huge.vocab_size = index{1} << 22;
  expect_load_error<lora::format_error>(huge, tensors_of(w), {"vocab_size 4194304", "data bytes"});
  huge = tiny();
  huge.n_layer = index{1} << 12;
  expect_load_error<lora::format_error>(huge, tensors_of(w), {"n_layer 4096"});
  // Beyond the bounds (sizes that would overflow): refused by the config itself, naming config.json.
  const auto refused = [&](const models::gpt2_config& c, std::initializer_list<std::string> fragments) {
    temp_dir dir;
    write_folder(dir, c, tensors_of(w));
    expect_error<lora::config_error>([&] { models::load_gpt2<float>(dir.path()); }, {dir.file("config.json")});
    expect_error<lora::config_error>([&] { models::load_gpt2<float>(dir.path()); }, fragments);
  };
  huge = tiny();
  huge.vocab_size = index{1} << 50;
  refused(huge, {"vocab_size must be at most", "1125899906842624"});
  huge = tiny();
  huge.n_embd = index{1} << 61;
  huge.n_head = 1;
  refused(huge, {"n_embd must be at most"});
  huge = tiny();
  huge.n_layer = index{1} << 40;
  refused(huge, {"n_layer must be at most", "1099511627776"});
}

TEST(Gpt2IoMalformed, MixedKeyConventions) {
  const auto w = models::gpt2_weights<float>::random(tiny(), 12);
  auto mixed = tensors_of(w, "transformer.", io::dtype::f32, "ln_f.bias");
  mixed.add("ln_f.bias", w.ln_f_bias(), io::dtype::f32, {8});
  expect_load_error<lora::format_error>(tiny(), mixed, {"mix two conventions", "'ln_f.bias'"});
}

TEST(Gpt2IoMalformed, DtypesOtherThanF32F16Bf16) {
  const auto w = models::gpt2_weights<float>::random(tiny(), 13);
  auto f64 = tensors_of(w, "transformer.", io::dtype::f32, "wpe.weight");
  f64.add("transformer.wpe.weight", w.wpe(), io::dtype::f64, {16, 8});
  expect_load_error<lora::dtype_error>(tiny(), f64, {"'transformer.wpe.weight' is F64"});
  auto i32 = tensors_of(w, "transformer.", io::dtype::f32, "h.0.ln_1.bias");
  i32.add_raw("transformer.h.0.ln_1.bias", io::dtype::i32, {8}, bytes(32, 0));
  expect_load_error<lora::dtype_error>(tiny(), i32, {"'transformer.h.0.ln_1.bias' is I32"});

  // A dtype the format does not define is refused by the reader, naming the tensor.
  temp_dir dir;
  auto u16 = tensors_of(w, "transformer.", io::dtype::f32, "h.0.ln_1.bias");
  u16.add_raw("transformer.h.0.ln_1.bias", io::dtype::u16, {8}, bytes(16, 0));
  std::vector<unsigned char> image = u16.to_bytes();
  std::string text(image.begin(), image.end());
  text.replace(text.find("\"U16\""), 5, "\"X16\"");
  write_file(dir.file("config.json"), models::gpt2_config_json(tiny()));
  write_file(dir.file("model.safetensors"), text);
  expect_error<lora::format_error>([&] { models::load_gpt2<float>(dir.path()); },
                                   {dir.file("model.safetensors"), "'transformer.h.0.ln_1.bias'", "X16"});
}

TEST(Gpt2IoMalformed, TruncatedOrMissingFiles) {
  temp_dir dir;
  models::save_gpt2(dir.path(), models::gpt2_weights<float>::random(tiny(), 14));
  const std::string model = dir.file("model.safetensors");
  bytes image = read_file(model);
  image.resize(image.size() - 4);
  write_file(model, image);
  expect_error<lora::format_error>([&] { models::load_gpt2<float>(dir.path()); }, {model});
  std::filesystem::remove(model);
  expect_error<lora::io_error>([&] { models::load_gpt2<float>(dir.path()); }, {model});
  write_file(dir.file("config.json"), config_with("n_embd", "\"eight\""));
  expect_error<lora::format_error>([&] { models::load_gpt2<float>(dir.path()); },
                                   {dir.file("config.json"), "'n_embd'"});
}

// --- saving ---------------------------------------------------------------------------------------------

TEST(Gpt2IoSave, CreatesTheFolderAndLeavesOtherFilesAlone) {
  temp_dir dir;
  const std::string folder = dir.file("runs/gpt2");
  std::filesystem::create_directories(folder);
  write_file(folder + "/tokenizer.json", std::string("{}"));
  models::save_gpt2(folder, models::gpt2_weights<double>::random(tiny(), 15));
  EXPECT_EQ(read_file(folder + "/tokenizer.json"), (bytes{'{', '}'}));
  EXPECT_TRUE(std::filesystem::exists(folder + "/config.json"));
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(folder), std::filesystem::directory_iterator()), 3);
  models::save_gpt2(dir.file("fresh/a/b"), models::gpt2_weights<float>::random(tiny(), 15));
  EXPECT_NO_THROW(models::load_gpt2<float>(dir.file("fresh/a/b")));
  write_file(dir.file("plain"), std::string("x"));
  expect_error<lora::io_error>([&] { models::save_gpt2(dir.file("plain"), models::gpt2_weights<float>(tiny())); },
                               {dir.file("plain")});
}

TEST(Gpt2IoSave, BadOptionsAreRefusedBeforeWriting) {
  temp_dir dir;
  const models::gpt2_weights<float> w(tiny());
  expect_error<lora::dtype_error>([&] { models::save_gpt2(dir.path(), w, {io::dtype::f64, ""}); }, {"F64"});
  expect_error<lora::config_error>(
      [&] {
        models::save_gpt2(dir.path(), w, {io::dtype::f32, "model."});
      },
      {"\"model.\""});
  EXPECT_EQ(dir.entries(), 0u);
}

/// Fails every open() from the `fail_from`-th on (1-based) with EROFS, as a read-only folder does.
int opens_seen = 0;
int fail_from = 0;
constexpr io::detail::file_ops read_only_ops{
    [](const char* path, int flags, unsigned mode) {
      if (++opens_seen >= fail_from) {
        errno = EROFS;
        return -1;
      }
      return io::detail::system_file_ops().open(path, flags, mode);
    },
    io::detail::system_file_ops().pwrite,
    io::detail::system_file_ops().fsync,
    io::detail::system_file_ops().close,
    io::detail::system_file_ops().rename,
    io::detail::system_file_ops().unlink,
    io::detail::system_file_ops().open_directory,
};

TEST(Gpt2IoSave, FailedSaveLeavesTheFolderAsItWas) {
  temp_dir dir;
  models::save_gpt2(dir.path(), models::gpt2_weights<float>::random(tiny(), 16));
  const bytes model = read_file(dir.file("model.safetensors"));
  const bytes config = read_file(dir.file("config.json"));
  const auto other = models::gpt2_weights<float>::random(tiny(), 17);
  for (const int first_failure : {1, 2}) {  // the model's temporary, then config.json's
    SCOPED_TRACE(first_failure);
    opens_seen = 0;
    fail_from = first_failure;
    {
      const io::detail::scoped_file_ops ops(read_only_ops);
      expect_error<lora::io_error>(
          [&] {
            models::save_gpt2(dir.path(), other, {io::dtype::bf16, ""});
          },
          {dir.path(), "Read-only file system"});
    }
    EXPECT_EQ(dir.list(), (std::vector<std::string>{"config.json", "model.safetensors"}));
    EXPECT_EQ(read_file(dir.file("model.safetensors")), model);
    EXPECT_EQ(read_file(dir.file("config.json")), config);
  }
}

// --- copy-on-write mapping (io/file_storage.hpp) ---------------------------------------------------------

TEST(SafetensorsCopyOnWrite, WritesThroughRawCopyThePageAndNeverReachTheFile) {
  temp_dir dir;
  const std::string path = dir.file("t.safetensors");
  io::safetensors_writer().add("x", Eigen::VectorXf::LinSpaced(64, 0.0f, 63.0f)).write(path);
  const bytes before = read_file(path);
  const auto file = io::safetensors_file::open(path, io::read_mode::map_copy_on_write);
  ASSERT_TRUE(file.is_memory_resident());
  auto* x = reinterpret_cast<float*>(const_cast<unsigned char*>(file.raw("x").data()));
  x[5] = -1.0f;
  EXPECT_EQ(file.read_vector<float>("x")[5], -1.0f);  // the mapping holds the write
  EXPECT_EQ(read_file(path), before);
  EXPECT_EQ(io::safetensors_file::open(path).read_vector<float>("x")[5], 5.0f);
}

}  // namespace
