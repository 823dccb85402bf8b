// tests/test_gguf_lora.cpp: GPT-2 models and LoRA adapters in llama.cpp's GGUF form (io/gguf_lora.hpp,
// models/gpt2_gguf.hpp): the model's keys, types, names and shapes as llama.cpp checks them, exact round
// trips, the PEFT <-> GGUF name mapping, scalings kept (folded where one alpha cannot express them),
// refusals with reasons, malformed adapters, and merging into a GGUF base. (llama.cpp itself checks the
// files in tests/llama/.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <lora/io/gguf.hpp>
#include <lora/io/gguf_lora.hpp>
#include <lora/io/peft.hpp>
#include <lora/models/gpt2_gguf.hpp>
#include <lora/quant/requant_error.hpp>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "file_support.hpp"
#include "requant_support.hpp"
#include "support.hpp"

namespace {

namespace io = lora::io;
namespace models = lora::models;
using lora_test::expect_error;
using lora_test::temp_dir;
using bytes = std::vector<unsigned char>;

models::gpt2_config tiny() {
  models::gpt2_config c;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = 32;
  c.n_positions = 16;
  c.vocab_size = 257;
  return c;
}

models::gguf_vocab byte_vocab() { return models::gguf_vocab_from_folder("/nonexistent-folder", 257); }

lora::matrix<double> random_matrix(lora::index rows, lora::index cols, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal;
  lora::matrix<double> m(rows, cols);
  for (auto& x : m.reshaped()) x = normal(rng);
  return m;
}

/// A PEFT module on GPT-2 with random factors of rank r.
io::peft_module peft_module(const std::string& path, lora::index in, lora::index out, lora::index r, unsigned seed) {
  io::peft_module m;
  m.path = path;
  m.a = random_matrix(r, in, seed);
  m.b = random_matrix(out, r, seed + 1);
  return m;
}

/// An adapter on both attention projections of layer 0 and the MLP up projection of layer 1.
io::peft_adapter peft_adapter(lora::index r_attn = 4, lora::index r_mlp = 4) {
  io::peft_adapter a;
  a.config.r = r_attn;
  a.config.lora_alpha = 8;
  a.config.fan_in_fan_out = true;
  a.modules.push_back(peft_module("transformer.h.0.attn.c_attn", 32, 96, r_attn, 1));
  a.modules.push_back(peft_module("transformer.h.0.attn.c_proj", 32, 32, r_attn, 3));
  a.modules.push_back(peft_module("transformer.h.1.mlp.c_fc", 32, 128, r_mlp, 5));
  if (r_mlp != r_attn) a.config.rank_pattern.push_back({"mlp.c_fc", r_mlp});
  return a;
}

/// ΔW = s B A of every module, by base tensor name.
std::map<std::string, lora::matrix<double>> deltas(const std::vector<io::gguf_lora_module>& modules) {
  std::map<std::string, lora::matrix<double>> out;
  for (const auto& m : modules) out[m.base] = m.scaling * m.b * m.a;
  return out;
}

/// E = stored − exact (out x in) by explicit loops: max |E|, RMS E, RMS E / RMS W*, and the relative RMS of
/// X Eᵀ with X = quant::probe_batch(p, in); sums kept for pooling by hand.
using lora_test::by_hand;
using lora_test::hand_error;

void expect_figures(const lora::quant::requant_error& got, const hand_error& want, const std::string& what) {
  EXPECT_NEAR(got.max_weight, want.max_weight, 1e-12 * want.max_weight) << what;
  EXPECT_NEAR(got.rms_weight, want.rms_weight, 1e-9 * want.rms_weight) << what;
  EXPECT_NEAR(got.rel_rms_weight, want.rel_rms_weight, 1e-9 * want.rel_rms_weight) << what;
  EXPECT_NEAR(got.rel_rms_output, want.rel_rms_output, 1e-9 * want.rel_rms_output) << what;
}

/// The largest |E| each element of a row-block of 32 may have when W* is stored as `type`: rounding to
/// nearest for the float types (unit roundoff 2^-24, 2^-8 for BF16, 2^-11 for F16, whose subnormals are
/// 2^-24 apart; the writer rounds to float first, so those two round twice); for Q8_0 half a step d = amax / 127 plus
/// the F16 rounding of d (127 steps of it); for Q4_0 half a step |d| = |max| / 8 plus 8 steps of d's F16 rounding, or a
/// whole step for the elements beyond 7.5 |d| on the far side of the block's extreme, which ggml clamps to 7 |d|.
lora::matrix<double> error_bound(const lora::matrix<double>& exact, io::ggml_type type) {
  lora::matrix<double> bound(exact.rows(), exact.cols());
  for (lora::index i = 0; i < exact.rows(); ++i) {
    for (lora::index b = 0; b < exact.cols(); b += 32) {
      double amax = 0, max = 0;
      for (lora::index j = b; j < b + 32; ++j) {
        const double v = static_cast<float>(exact(i, j));
        if (std::abs(v) > amax) std::tie(amax, max) = std::make_tuple(std::abs(v), v);
      }
      for (lora::index j = b; j < b + 32; ++j) {
        const double x = exact(i, j), f32 = std::ldexp(std::abs(x), -24);
        if (type == io::ggml_type::f32) bound(i, j) = f32;
        if (type == io::ggml_type::bf16) bound(i, j) = std::ldexp(std::abs(x), -8) + f32;
        if (type == io::ggml_type::f16) bound(i, j) = std::ldexp(std::abs(x), -11) + std::ldexp(1.0, -25) + f32;
        if (type == io::ggml_type::q8_0) bound(i, j) = amax / 127 * (0.5 + 0x1p-4) + 2 * f32;
        if (type == io::ggml_type::q4_0) {
          const double d = max / -8;
          const bool clamped = d != 0 && x / d >= 7.5;
          bound(i, j) = std::abs(d) * ((clamped ? 1.0 : 0.5) + 0x1p-7) + 2 * f32;
        }
      }
    }
  }
  return bound;
}

// --- models ----------------------------------------------------------------------------------------

TEST(Gpt2Gguf, ModelHasTheKeysTypesNamesAndShapesLlamaCppChecks) {
  const auto weights = models::gpt2_weights<float>::random(tiny(), 1);
  const io::gguf_file f = io::gguf_file::from_bytes(models::gpt2_gguf_writer(weights, byte_vocab()).to_bytes(), "m");
  EXPECT_EQ(f.get_string("general.architecture"), "gpt2");
  EXPECT_EQ(f.get<std::uint32_t>("gpt2.context_length"), 16u);
  EXPECT_EQ(f.get<std::uint32_t>("gpt2.embedding_length"), 32u);
  EXPECT_EQ(f.get<std::uint32_t>("gpt2.feed_forward_length"), 128u);
  EXPECT_EQ(f.get<std::uint32_t>("gpt2.block_count"), 2u);
  EXPECT_EQ(f.get<std::uint32_t>("gpt2.attention.head_count"), 2u);
  EXPECT_EQ(f.get<float>("gpt2.attention.layer_norm_epsilon"), 1e-5f);
  EXPECT_EQ(f.get<std::uint32_t>("general.file_type"), 0u);
  EXPECT_EQ(f.get_string("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(f.get_string("tokenizer.ggml.pre"), "default");
  const auto& tokens = f.value("tokenizer.ggml.tokens").strings();
  ASSERT_EQ(tokens.size(), 257u);
  EXPECT_EQ(tokens[65], "A");
  EXPECT_EQ(tokens[32], "\xc4\xa0");  // byte 0x20 is U+0120 in GPT-2's alphabet
  EXPECT_EQ(tokens[256], "<|endoftext|>");
  EXPECT_EQ(f.value("tokenizer.ggml.token_type").array_of<std::int32_t>()[256], 3);
  EXPECT_EQ(f.value("tokenizer.ggml.merges").element_type(), io::gguf_type::string);
  EXPECT_EQ(f.value("tokenizer.ggml.merges").size(), 0u);
  EXPECT_EQ(f.get<std::uint32_t>("tokenizer.ggml.eos_token_id"), 256u);
  EXPECT_EQ(f.tensors().size(), 28u);
  EXPECT_FALSE(f.contains("output.weight"));  // tied head
  EXPECT_EQ(f.info("token_embd.weight").ne, (std::vector<std::uint64_t>{32, 257}));
  EXPECT_EQ(f.info("blk.1.attn_qkv.weight").ne, (std::vector<std::uint64_t>{32, 96}));
  EXPECT_EQ(f.info("blk.1.ffn_down.weight").ne, (std::vector<std::uint64_t>{128, 32}));
  EXPECT_EQ(f.info("output_norm.bias").ne, (std::vector<std::uint64_t>{32}));
  // The GGUF weight is nn.Linear's W (out x in): the transpose of HF's Conv1D [in, out].
  const auto w = f.read_matrix<float>("blk.0.attn_qkv.weight");
  EXPECT_EQ(w, weights.block(0, models::block_tensor::c_attn_weight).transpose());
}

TEST(Gpt2Gguf, ModelRoundTripsExactlyInF32AndClosely_InQ8_0) {
  temp_dir dir;
  const auto weights = models::gpt2_weights<float>::random(tiny(), 2);
  models::gpt2_gguf_writer(weights, byte_vocab()).write(dir.file("f32.gguf"));
  const auto back = models::load_gpt2_gguf<float>(dir.file("f32.gguf"));
  EXPECT_EQ(back.config.n_embd, 32);
  for (lora::index id = 0; id < weights.num_tensors(); ++id) EXPECT_EQ(back.weights.flat(id), weights.flat(id)) << id;
  models::gpt2_gguf_options q8;
  q8.type = io::ggml_type::q8_0;
  models::gpt2_gguf_writer(weights, byte_vocab(), q8).write(dir.file("q8.gguf"));
  const io::gguf_file f = io::gguf_file::open(dir.file("q8.gguf"));
  EXPECT_EQ(f.info("blk.0.ffn_up.weight").type, io::ggml_type::q8_0);
  EXPECT_EQ(f.info("blk.0.ffn_up.bias").type, io::ggml_type::f32);  // vectors stay F32
  EXPECT_EQ(f.get<std::uint32_t>("general.file_type"), 7u);
  const auto q = models::load_gpt2_gguf<double>(dir.file("q8.gguf"));
  // Each value is within half a step d = block amax / 127 of the original, plus the rounding of d to f16
  // (up to 127 steps of 2^-11 d).
  for (lora::index id = 0; id < weights.num_tensors(); ++id) {
    const double amax = weights.flat(id).cwiseAbs().maxCoeff();
    EXPECT_LE((q.weights.flat(id) - weights.flat(id).cast<double>()).cwiseAbs().maxCoeff(),
              amax / 127 * (0.5 + 127.0 / 2048) + 1e-9)
        << id;
  }
}

TEST(Gpt2Gguf, LoadingRefusesWhatIsNotThisModel) {
  temp_dir dir;
  auto weights = models::gpt2_weights<float>::random(tiny(), 3);
  auto w = models::gpt2_gguf_writer(weights, byte_vocab());
  w.add_vector("output.weight", lora::vector<float>::Ones(32), io::ggml_type::f32);
  w.write(dir.file("extra.gguf"));
  expect_error<lora::format_error>([&] { models::load_gpt2_gguf<float>(dir.file("extra.gguf")); },
                                   {"29 tensors", "28"});
  auto v = models::gpt2_gguf_writer(weights, byte_vocab());
  v.set("gpt2.feed_forward_length", io::gguf_value::of(std::uint32_t{100}));
  v.write(dir.file("ff.gguf"));
  expect_error<lora::format_error>([&] { models::load_gpt2_gguf<float>(dir.file("ff.gguf")); },
                                   {"feed_forward_length", "100"});
  auto t = models::gpt2_gguf_writer(weights, byte_vocab());
  t.set("gpt2.block_count", io::gguf_value::of(std::int32_t{2}));
  t.write(dir.file("type.gguf"));
  expect_error<lora::format_error>([&] { models::load_gpt2_gguf<float>(dir.file("type.gguf")); },
                                   {"block_count", "INT32", "UINT32"});
  models::gguf_vocab small = byte_vocab();
  small.tokens.pop_back();
  expect_error<lora::config_error>([&] { models::gpt2_gguf_writer(weights, small); }, {"257", "256"});
  models::gpt2_gguf_options q4;
  q4.type = io::ggml_type::q4_0;
  auto narrow = tiny();
  narrow.n_embd = 16;
  narrow.n_head = 1;
  expect_error<lora::shape_error>(
      [&] { models::gpt2_gguf_writer(models::gpt2_weights<float>::random(narrow, 1), byte_vocab(), q4); },
      {"16", "32"});
}

TEST(Gpt2Gguf, GgufModelsBecomeHuggingFaceFoldersWithTheirBpeVocabulary) {
  temp_dir dir;
  // A small BPE: the 256 byte tokens, "he" from the merge "h e", and <|endoftext|>.
  models::gguf_vocab bpe = byte_vocab();
  bpe.tokens.back() = "he";
  bpe.tokens.push_back("<|endoftext|>");
  bpe.eot = 257;
  bpe.merges = {"h e"};
  bpe.bpe = true;
  auto config = tiny();
  config.vocab_size = 258;
  const auto weights = models::gpt2_weights<float>::random(config, 7);
  models::gpt2_gguf_options f16;
  f16.type = io::ggml_type::f16;
  models::gpt2_gguf_writer(weights, bpe, f16).write(dir.file("m.gguf"));
  EXPECT_EQ(io::gguf_file::open(dir.file("m.gguf")).get_string("tokenizer.ggml.pre"), "gpt-2");
  models::convert_gguf_to_gpt2(dir.file("m.gguf"), dir.file("hf"));
  const auto hf = models::load_gpt2<float>(dir.file("hf"));
  EXPECT_EQ(hf.config.vocab_size, 258);
  EXPECT_EQ(hf.weights.wpe(), weights.wpe().cast<Eigen::half>().cast<float>());  // F16 in the GGUF file
  const auto tok = models::tokenizer::from_folder(dir.file("hf"), 258);
  ASSERT_TRUE(tok.is_bpe());
  EXPECT_EQ(tok.encode("he"), (std::vector<std::int32_t>{256}));
  EXPECT_EQ(tok.eot_id(), 257);
  // And back: the folder converts to the same GGUF vocabulary.
  const models::gguf_vocab again = models::gguf_vocab_from_folder(dir.file("hf"), 258);
  EXPECT_EQ(again.tokens, bpe.tokens);
  EXPECT_EQ(again.merges, bpe.merges);
  // The byte vocabulary writes no tokenizer files: the folder reads as the byte tokenizer.
  models::gpt2_gguf_writer(models::gpt2_weights<float>::random(tiny(), 8), byte_vocab()).write(dir.file("b.gguf"));
  models::convert_gguf_to_gpt2(dir.file("b.gguf"), dir.file("hf_bytes"));
  EXPECT_FALSE(models::tokenizer::from_folder(dir.file("hf_bytes"), 257).is_bpe());
}

TEST(Gpt2Gguf, ModulePathsMapToTensorNamesAndBack) {
  EXPECT_EQ(models::gpt2_gguf_name_of_module("transformer.h.0.attn.c_attn"), "blk.0.attn_qkv.weight");
  EXPECT_EQ(models::gpt2_gguf_name_of_module("h.11.attn.c_proj"), "blk.11.attn_output.weight");
  EXPECT_EQ(models::gpt2_gguf_name_of_module("transformer.h.3.mlp.c_fc"), "blk.3.ffn_up.weight");
  EXPECT_EQ(models::gpt2_gguf_name_of_module("transformer.h.3.mlp.c_proj"), "blk.3.ffn_down.weight");
  for (const char* bad : {"transformer.wte", "transformer.h.01.attn.c_attn", "transformer.h.1.attn.c_attnx",
                          "transformer.h.x.mlp.c_fc", "h..mlp.c_fc", "transformer.h.1"}) {
    EXPECT_FALSE(models::gpt2_gguf_name_of_module(bad)) << bad;
  }
  EXPECT_EQ(models::gpt2_module_of_gguf_name("blk.7.ffn_down.weight"), "transformer.h.7.mlp.c_proj");
  EXPECT_FALSE(models::gpt2_module_of_gguf_name("blk.7.attn_norm.weight"));
  EXPECT_FALSE(models::gpt2_module_of_gguf_name("token_embd.weight"));
}

// --- adapters --------------------------------------------------------------------------------------

TEST(GgufLora, UniformScalingIsOneAlphaAndNothingIsFolded) {
  temp_dir dir;
  const io::peft_adapter peft = peft_adapter();
  const auto modules = models::gpt2_peft_to_gguf_modules(peft, tiny());
  ASSERT_EQ(modules.size(), 3u);
  EXPECT_EQ(modules[0].base, "blk.0.attn_qkv.weight");
  const auto report = io::write_gguf_lora(dir.file("a.gguf"), "gpt2", modules);
  EXPECT_EQ(report.alpha, 8.0);
  EXPECT_TRUE(report.folded.empty());
  const io::gguf_file f = io::gguf_file::open(dir.file("a.gguf"));
  EXPECT_EQ(f.get_string("general.type"), "adapter");
  EXPECT_EQ(f.get_string("adapter.type"), "lora");
  EXPECT_EQ(f.get<float>("adapter.lora.alpha"), 8.0f);
  // lora_a is PEFT's lora_A (r x in) as stored: ne [in, r]; lora_b is lora_B (out x r): ne [r, out].
  EXPECT_EQ(f.info("blk.0.attn_qkv.weight.lora_a").ne, (std::vector<std::uint64_t>{32, 4}));
  EXPECT_EQ(f.info("blk.0.attn_qkv.weight.lora_b").ne, (std::vector<std::uint64_t>{4, 96}));
  EXPECT_EQ(f.read_matrix<double>("blk.0.attn_qkv.weight.lora_a"), peft.modules[0].a.cast<float>().cast<double>());
}

TEST(GgufLora, ScalingsOneAlphaCannotExpressAreFoldedIntoB) {
  temp_dir dir;
  io::peft_adapter peft = peft_adapter(4, 16);  // rsLoRA with two ranks: alpha / sqrt(r) per module
  peft.config.use_rslora = true;
  const auto modules = models::gpt2_peft_to_gguf_modules(peft, tiny());
  EXPECT_DOUBLE_EQ(modules[0].scaling, 8.0 / 2.0);
  EXPECT_DOUBLE_EQ(modules[2].scaling, 8.0 / 4.0);
  const auto report = io::write_gguf_lora(dir.file("a.gguf"), "gpt2", modules);
  EXPECT_EQ(report.alpha, 16.0);  // 4 · 4 for the two rank-4 modules
  EXPECT_EQ(report.folded, (std::vector<std::string>{"blk.1.ffn_up.weight"}));
  // llama.cpp's alpha / r with the folded B gives back every module's ΔW.
  const auto read = io::read_gguf_lora(io::gguf_file::open(dir.file("a.gguf")));
  const auto want = deltas(modules), got = deltas(read.modules);
  for (const auto& [name, dw] : want) {
    EXPECT_LT((got.at(name) - dw).norm(), 1e-6 * dw.norm()) << name;
  }
}

TEST(GgufLora, ToPeftAndBackKeepsEveryDelta) {
  temp_dir dir;
  io::peft_adapter peft = peft_adapter(4, 8);
  peft.config.alpha_pattern.push_back({"attn.c_proj", 2.0});
  const auto modules = models::gpt2_peft_to_gguf_modules(peft, tiny());
  io::write_gguf_lora(dir.file("a.gguf"), "gpt2", modules);
  const auto read = io::read_gguf_lora(io::gguf_file::open(dir.file("a.gguf")));
  const io::peft_adapter back = models::gpt2_gguf_lora_to_peft(read, "base.gguf");
  EXPECT_TRUE(back.config.fan_in_fan_out);
  EXPECT_EQ(back.config.task_type, "CAUSAL_LM");
  EXPECT_EQ(std::get<std::vector<std::string>>(back.config.target_modules),
            (std::vector<std::string>{"attn.c_attn", "attn.c_proj", "mlp.c_fc"}));
  back.save(dir.file("peft"));
  const io::peft_adapter reloaded = io::peft_adapter::load(dir.file("peft"));
  const auto want = deltas(modules), got = deltas(models::gpt2_peft_to_gguf_modules(reloaded, tiny()));
  ASSERT_EQ(got.size(), want.size());
  for (const auto& [name, dw] : want) EXPECT_LT((got.at(name) - dw).norm(), 1e-6 * dw.norm()) << name;
}

TEST(GgufLora, AlphaZeroMeansScaleOne) {
  io::gguf_writer w;
  w.set("general.architecture", io::gguf_value::of("gpt2"));
  w.set("general.type", io::gguf_value::of("adapter"));
  w.set("adapter.type", io::gguf_value::of("lora"));
  w.add("blk.0.attn_qkv.weight.lora_a", random_matrix(2, 32, 1), io::ggml_type::f32);
  w.add("blk.0.attn_qkv.weight.lora_b", random_matrix(96, 2, 2), io::ggml_type::f32);
  const auto read = io::read_gguf_lora(io::gguf_file::from_bytes(w.to_bytes()));
  EXPECT_EQ(read.alpha, 0.0);
  EXPECT_EQ(read.modules.at(0).scaling, 1.0);
  const auto peft = models::gpt2_gguf_lora_to_peft(read);
  EXPECT_EQ(peft.config.lora_alpha, 2.0);  // s = alpha / r = 1
  EXPECT_DOUBLE_EQ(peft.config.scaling_for("transformer.h.0.attn.c_attn"), 1.0);
}

TEST(GgufLora, WhatLlamaCppCannotApplyIsRefusedWithTheReason) {
  io::peft_adapter dora = peft_adapter();
  dora.config.use_dora = true;
  expect_error<lora::config_error>([&] { models::gpt2_peft_to_gguf_modules(dora, tiny()); }, {"DoRA", "lora-merge"});
  io::peft_adapter other = peft_adapter();
  other.modules.push_back(peft_module("transformer.h.0.attn.q_proj", 32, 32, 4, 9));
  expect_error<lora::config_error>([&] { models::gpt2_peft_to_gguf_modules(other, tiny()); }, {"q_proj", "c_attn"});
  io::peft_adapter emb = peft_adapter();
  emb.modules.push_back(peft_module("transformer.wte", 257, 32, 4, 9));
  emb.modules.back().embedding = true;
  expect_error<lora::config_error>([&] { models::gpt2_peft_to_gguf_modules(emb, tiny()); }, {"wte", "embedding"});
  io::peft_adapter saved = peft_adapter();
  saved.full_tensors.push_back({});
  saved.full_tensors.back().path = "transformer.ln_f.weight";
  expect_error<lora::config_error>([&] { models::gpt2_peft_to_gguf_modules(saved, tiny()); },
                                   {"ln_f", "whole tensors"});
  auto wide = tiny();
  wide.n_embd = 64;
  expect_error<lora::shape_error>([&] { models::gpt2_peft_to_gguf_modules(peft_adapter(), wide); },
                                  {"transformer.h.0.attn.c_attn", "in 64"});
  auto shallow = tiny();
  shallow.n_layer = 1;
  expect_error<lora::shape_error>([&] { models::gpt2_peft_to_gguf_modules(peft_adapter(), shallow); },
                                  {"transformer.h.1.mlp.c_fc", "1 layers"});
  auto mods = models::gpt2_peft_to_gguf_modules(peft_adapter(), tiny());
  temp_dir dir;
  expect_error<lora::shape_error>([&] { io::write_gguf_lora(dir.file("q.gguf"), "gpt2", mods, io::ggml_type::q8_0); },
                                  {"lora_b", "4", "32"});
  EXPECT_EQ(dir.entries(), 0u);  // nothing half-written
}

/// A GGUF adapter image with the given tensors (base name -> (a, b)) and metadata overrides.
std::vector<unsigned char> adapter_image(const std::vector<std::string>& names, const std::string& type = "adapter",
                                         const std::string& arch = "gpt2") {
  io::gguf_writer w;
  w.set("general.architecture", io::gguf_value::of(arch));
  w.set("general.type", io::gguf_value::of(type));
  w.set("adapter.type", io::gguf_value::of("lora"));
  w.set("adapter.lora.alpha", io::gguf_value::of(4.0f));
  for (const auto& n : names)
    w.add(n, random_matrix(n.back() == 'a' ? 2 : 96, n.back() == 'a' ? 32 : 2, 1), io::ggml_type::f32);
  return w.to_bytes();
}

TEST(GgufLora, MalformedAdaptersAreRefusedNamingTheTensor) {
  const std::string qkv = "blk.0.attn_qkv.weight";
  auto read = [](const std::vector<unsigned char>& b, const io::gguf_file* base = nullptr) {
    return io::read_gguf_lora(io::gguf_file::from_bytes(b, "adapter.gguf"), base);
  };
  expect_error<lora::format_error>([&] { read(adapter_image({qkv + ".lora_a"})); }, {"no partner", qkv + ".lora_b"});
  expect_error<lora::format_error>([&] { read(adapter_image({qkv + ".lora_b"})); }, {"no partner", qkv + ".lora_a"});
  expect_error<lora::format_error>(
      [&] {
        read(adapter_image({qkv + ".lora_a", qkv + ".lora_b"}, "model"));
      },
      {"general.type", "\"model\""});
  expect_error<lora::format_error>([&] { read(adapter_image({"blk.0.attn_qkv.weight"})); }, {"neither", "lora_a"});
  expect_error<lora::format_error>(
      [&] {
        read(adapter_image({"token_embd.weight.lora_a", "token_embd.weight.lora_b"}));
      },
      {"token_embd"});
  const auto norms = read(adapter_image({qkv + ".lora_a", qkv + ".lora_b", "blk.0.attn_norm.weight.lora_a"}));
  EXPECT_EQ(norms.ignored, (std::vector<std::string>{"blk.0.attn_norm.weight.lora_a"}));
  // Against a base: the adapted tensor must exist with ne [in, out], and the architecture must agree.
  const auto weights = models::gpt2_weights<float>::random(tiny(), 4);
  const io::gguf_file base = io::gguf_file::from_bytes(models::gpt2_gguf_writer(weights, byte_vocab()).to_bytes(), "b");
  EXPECT_EQ(read(adapter_image({qkv + ".lora_a", qkv + ".lora_b"}), &base).modules.size(), 1u);
  const std::string out = "blk.0.attn_output.weight";
  expect_error<lora::format_error>(
      [&] {
        read(adapter_image({out + ".lora_a", out + ".lora_b"}), &base);
      },
      {out, "[32, 32]", "96 x 32"});
  expect_error<lora::format_error>(
      [&] {
        read(adapter_image({"blk.9.attn_qkv.weight.lora_a", "blk.9.attn_qkv.weight.lora_b"}), &base);
      },
      {"blk.9.attn_qkv.weight", "does not have"});
  expect_error<lora::format_error>(
      [&] {
        read(adapter_image({qkv + ".lora_a", qkv + ".lora_b"}, "adapter", "llama"), &base);
      },
      {"\"llama\"", "\"gpt2\""});
}

TEST(GgufLora, RankOneAdaptersRoundTrip) {
  temp_dir dir;
  io::peft_adapter peft = peft_adapter(1, 1);
  peft.config.lora_alpha = 1;
  const auto modules = models::gpt2_peft_to_gguf_modules(peft, tiny());
  io::write_gguf_lora(dir.file("r1.gguf"), "gpt2", modules);
  const auto read = io::read_gguf_lora(io::gguf_file::open(dir.file("r1.gguf")));
  ASSERT_EQ(read.modules.size(), 3u);
  EXPECT_EQ(read.modules[0].rank(), 1);
  EXPECT_EQ(read.modules[0].a.cols(), 32);
  EXPECT_EQ(read.modules[0].scaling, 1.0);
  const auto back = models::gpt2_gguf_lora_to_peft(read);
  EXPECT_EQ(back.config.r, 1);
  EXPECT_TRUE(back.config.alpha_pattern.empty());
}

TEST(GgufLora, AlphaIsCarriedOverExactlyWithoutSpuriousPatterns) {
  io::gguf_writer w;  // alpha 1 with rank 49: (1 / 49) * 49 is not 1 in floating point
  w.set("general.architecture", io::gguf_value::of("gpt2"));
  w.set("general.type", io::gguf_value::of("adapter"));
  w.set("adapter.type", io::gguf_value::of("lora"));
  w.set("adapter.lora.alpha", io::gguf_value::of(1.0f));
  w.add("blk.0.attn_qkv.weight.lora_a", random_matrix(49, 32, 1), io::ggml_type::f32);
  w.add("blk.0.attn_qkv.weight.lora_b", random_matrix(96, 49, 2), io::ggml_type::f32);
  w.add("blk.0.ffn_up.weight.lora_a", random_matrix(49, 32, 3), io::ggml_type::f32);
  w.add("blk.0.ffn_up.weight.lora_b", random_matrix(128, 49, 4), io::ggml_type::f32);
  const auto peft = models::gpt2_gguf_lora_to_peft(io::read_gguf_lora(io::gguf_file::from_bytes(w.to_bytes())));
  EXPECT_EQ(peft.config.lora_alpha, 1.0);
  EXPECT_TRUE(peft.config.alpha_pattern.empty());
  EXPECT_TRUE(peft.config.rank_pattern.empty());
}

TEST(GgufLora, FactorsThatCannotBeReadAreFormatErrors) {
  const std::string qkv = "blk.0.attn_qkv.weight";
  auto with = [&](auto&& edit) {
    io::gguf_writer w;
    w.set("general.architecture", io::gguf_value::of("gpt2"));
    w.set("general.type", io::gguf_value::of("adapter"));
    w.set("adapter.type", io::gguf_value::of("lora"));
    edit(w);
    return io::gguf_file::from_bytes(w.to_bytes(), "adapter.gguf");
  };
  const auto q4k = with([&](io::gguf_writer& w) {
    const bytes zeros(144 * 2, 0);
    w.add_raw(qkv + ".lora_a", io::ggml_type::q4_k, {256, 2}, zeros.data(), zeros.size());
    w.add(qkv + ".lora_b", random_matrix(96, 2, 1), io::ggml_type::f32);
  });
  expect_error<lora::format_error>([&] { io::read_gguf_lora(q4k); }, {"adapter.gguf", qkv + ".lora_a", "Q4_K"});
  const auto rank0 = with([&](io::gguf_writer& w) {
    w.add_raw(qkv + ".lora_a", io::ggml_type::f32, {32, 0}, nullptr, 0);
    w.add_raw(qkv + ".lora_b", io::ggml_type::f32, {0, 96}, nullptr, 0);
  });
  expect_error<lora::format_error>([&] { io::read_gguf_lora(rank0); }, {"adapter.gguf", "r >= 1"});
  const auto nan = with([&](io::gguf_writer& w) {
    w.set("adapter.lora.alpha", io::gguf_value::of(std::nanf("")));
    w.add(qkv + ".lora_a", random_matrix(2, 32, 1), io::ggml_type::f32);
    w.add(qkv + ".lora_b", random_matrix(96, 2, 1), io::ggml_type::f32);
  });
  expect_error<lora::format_error>([&] { io::read_gguf_lora(nan); }, {"adapter.gguf", "adapter.lora.alpha", "nan"});
}

TEST(Gpt2Gguf, ModelFilesAreCheckedBeforeTheModelIsAllocated) {
  temp_dir dir;
  const io::gguf_file small = io::gguf_file::from_bytes(
      models::gpt2_gguf_writer(models::gpt2_weights<float>::random(tiny(), 1), byte_vocab()).to_bytes());
  io::gguf_writer w;  // a config of ~100 GB of weights and no tensors: refused without allocating them
  for (const auto& [key, value] : small.metadata()) w.set(key, value);
  w.set("gpt2.embedding_length", io::gguf_value::of(std::uint32_t{16384}));
  w.set("gpt2.feed_forward_length", io::gguf_value::of(std::uint32_t{65536}));
  w.set("gpt2.block_count", io::gguf_value::of(std::uint32_t{512}));
  w.write(dir.file("huge.gguf"));
  expect_error<lora::format_error>([&] { models::load_gpt2_gguf<float>(dir.file("huge.gguf")); }, {"0 tensors"});
  expect_error<lora::format_error>([&] { models::convert_gguf_to_gpt2(dir.file("huge.gguf"), dir.file("hf")); },
                                   {"0 tensors"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("hf")));
  // A vocabulary stored with the wrong type, or with a token twice, is refused before anything is written.
  auto weights = models::gpt2_weights<float>::random(tiny(), 2);
  auto typed = models::gpt2_gguf_writer(weights, byte_vocab());
  typed.set("tokenizer.ggml.tokens", io::gguf_value::array(std::vector<std::int32_t>(257, 0)));
  typed.write(dir.file("typed.gguf"));
  expect_error<lora::format_error>([&] { models::convert_gguf_to_gpt2(dir.file("typed.gguf"), dir.file("hf")); },
                                   {"tokenizer.ggml.tokens", "ARRAY of INT32"});
  models::gguf_vocab twice = byte_vocab();
  twice.tokens[10] = twice.tokens[11];
  twice.merges = {"a b"};
  twice.bpe = true;
  models::gpt2_gguf_writer(weights, twice).write(dir.file("twice.gguf"));
  expect_error<lora::format_error>([&] { models::convert_gguf_to_gpt2(dir.file("twice.gguf"), dir.file("hf")); },
                                   {"token 11", "twice"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("hf")));
}

// --- merging ---------------------------------------------------------------------------------------

TEST(GgufLora, MergeChangesOnlyTheAdaptedTensorsAndKeepsTheirType) {
  temp_dir dir;
  const auto weights = models::gpt2_weights<float>::random(tiny(), 5);
  models::gpt2_gguf_options q8;
  q8.type = io::ggml_type::q8_0;
  models::gpt2_gguf_writer(weights, byte_vocab(), q8).write(dir.file("base.gguf"));
  const io::gguf_file base = io::gguf_file::open(dir.file("base.gguf"));
  const auto modules = models::gpt2_peft_to_gguf_modules(peft_adapter(), tiny());
  io::gguf_merge_options options;
  options.scale = 0.5;
  const auto report = io::merge_gguf(base, modules, dir.file("merged.gguf"), options);
  EXPECT_EQ(report.merged.size(), 3u);
  EXPECT_EQ(report.copied, 25u);
  const io::gguf_file merged = io::gguf_file::open(dir.file("merged.gguf"));
  EXPECT_EQ(merged.metadata(), base.metadata());
  for (const auto& t : base.tensors()) {
    const auto& u = merged.info(t.name);
    EXPECT_EQ(u.type, t.type) << t.name;
    if (std::find(report.merged.begin(), report.merged.end(), t.name) != report.merged.end()) continue;
    const auto a = base.raw(t.name), b = merged.raw(t.name);
    EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end())) << t.name;
  }
  const auto& m = modules[0];
  const lora::matrix<double> want = base.read_matrix<double>(m.base) + 0.5 * m.scaling * m.b * m.a;
  const lora::matrix<double> got = merged.read_matrix<double>(m.base);
  EXPECT_LE((got - want).cwiseAbs().maxCoeff(), want.cwiseAbs().maxCoeff() / 127);  // one Q8_0 step
  options.out_type = io::ggml_type::f32;
  io::merge_gguf(base, modules, dir.file("merged32.gguf"), options);
  const io::gguf_file f32 = io::gguf_file::open(dir.file("merged32.gguf"));
  EXPECT_EQ(f32.info(m.base).type, io::ggml_type::f32);
  EXPECT_EQ(merged.get<std::uint32_t>("general.file_type"), 7u);  // kept: every tensor keeps its type
  EXPECT_EQ(f32.get<std::uint32_t>("general.file_type"), 0u);     // re-encoded as F32
  EXPECT_LT((f32.read_matrix<double>(m.base) - want).cwiseAbs().maxCoeff(), 1e-5);
}

TEST(GgufLora, MergeReportsWhatEachReEncodingLoses) {
  // An F32 base merged and stored as each type: the report's figures are E = stored − W* as the written
  // file decodes it, against W* = W + s B A in double, computed here by hand.
  temp_dir dir;
  const auto weights = models::gpt2_weights<float>::random(tiny(), 7);
  models::gpt2_gguf_writer(weights, byte_vocab()).write(dir.file("base.gguf"));
  const io::gguf_file base = io::gguf_file::open(dir.file("base.gguf"));
  const auto modules = models::gpt2_peft_to_gguf_modules(peft_adapter(), tiny());
  std::map<io::ggml_type, io::gguf_merge_report> reports;
  for (const io::ggml_type type :
       {io::ggml_type::f32, io::ggml_type::bf16, io::ggml_type::f16, io::ggml_type::q8_0, io::ggml_type::q4_0}) {
    io::gguf_merge_options options;
    options.out_type = type;
    const auto report = io::merge_gguf(base, modules, dir.file("merged.gguf"), options);
    const io::gguf_file merged = io::gguf_file::open(dir.file("merged.gguf"));
    ASSERT_EQ(report.errors.size(), 3u);
    ASSERT_EQ(report.stored_as.size(), 3u);
    double sum_e2 = 0, sum_w2 = 0, count = 0, max_weight = 0, max_rel_output = 0;
    for (std::size_t k = 0; k < 3; ++k) {
      const std::string what = report.merged[k] + " as " + io::ggml_type_name(type);
      EXPECT_EQ(report.stored_as[k], type) << what;
      const auto m =
          std::find_if(modules.begin(), modules.end(), [&](const auto& x) { return x.base == report.merged[k]; });
      ASSERT_NE(m, modules.end()) << what;
      const lora::matrix<double> exact = base.read_matrix<double>(m->base) + m->scaling * m->b * m->a;
      const lora::matrix<double> stored = merged.read_matrix<double>(m->base);
      const hand_error h = by_hand(exact, stored, 64);
      expect_figures(report.errors[k], h, what);
      EXPECT_EQ(report.errors[k].probe_rows, 64) << what;
      EXPECT_GT(h.max_weight, 0.0) << what;  // no type stores these sums exactly
      const lora::matrix<double> bound = error_bound(exact, type);
      for (lora::index i = 0; i < exact.size(); ++i)
        ASSERT_LE(std::abs(stored.data()[i] - exact.data()[i]), bound.data()[i]) << what << " element " << i;
      sum_e2 += h.sum_e2, sum_w2 += h.sum_w2, count += h.count;
      max_weight = std::max(max_weight, h.max_weight);
      max_rel_output = std::max(max_rel_output, h.rel_rms_output);
    }
    EXPECT_DOUBLE_EQ(report.pooled.max_weight, max_weight);
    EXPECT_NEAR(report.pooled.rms_weight, std::sqrt(sum_e2 / count), 1e-9 * report.pooled.rms_weight);
    EXPECT_NEAR(report.pooled.rel_rms_weight, std::sqrt(sum_e2 / sum_w2), 1e-9 * report.pooled.rel_rms_weight);
    EXPECT_EQ(report.pooled.weights, static_cast<lora::index>(count));
    EXPECT_DOUBLE_EQ(report.worst.max_weight, max_weight);
    EXPECT_NEAR(report.worst.rel_rms_output, max_rel_output, 1e-9 * max_rel_output);
    reports[type] = report;
  }
  // The scale of each: float rounding of a double (2^-24 at most per element), bf16's 8 significant bits,
  // then the block formats, coarser with fewer bits.
  EXPECT_LT(reports[io::ggml_type::f32].pooled.rel_rms_output, 1e-7);
  EXPECT_LE(reports[io::ggml_type::bf16].worst.rel_rms_weight, 0x1p-8);
  EXPECT_LE(reports[io::ggml_type::bf16].worst.rel_rms_output, 0x1p-8);
  EXPECT_LT(reports[io::ggml_type::f16].pooled.rel_rms_weight, reports[io::ggml_type::bf16].pooled.rel_rms_weight);
  EXPECT_LT(reports[io::ggml_type::q8_0].pooled.rel_rms_output, reports[io::ggml_type::q4_0].pooled.rel_rms_output);
  EXPECT_GT(reports[io::ggml_type::q4_0].pooled.rel_rms_output, 8 * reports[io::ggml_type::q8_0].pooled.rel_rms_output);
}

TEST(GgufLora, MergeReportWithoutProbeAndKeepingTypes) {
  // Kept Q8_0 tensors are re-quantized (errors measured); probe_rows = 0 gives the weight figures only.
  temp_dir dir;
  const auto weights = models::gpt2_weights<float>::random(tiny(), 8);
  models::gpt2_gguf_options q8;
  q8.type = io::ggml_type::q8_0;
  models::gpt2_gguf_writer(weights, byte_vocab(), q8).write(dir.file("base.gguf"));
  const io::gguf_file base = io::gguf_file::open(dir.file("base.gguf"));
  const auto modules = models::gpt2_peft_to_gguf_modules(peft_adapter(), tiny());
  io::gguf_merge_options options;
  options.probe_rows = 0;
  const auto report = io::merge_gguf(base, modules, dir.file("merged.gguf"), options);
  const io::gguf_file merged = io::gguf_file::open(dir.file("merged.gguf"));
  ASSERT_EQ(report.errors.size(), 3u);
  for (std::size_t k = 0; k < 3; ++k) {
    const auto& m =
        *std::find_if(modules.begin(), modules.end(), [&](const auto& x) { return x.base == report.merged[k]; });
    EXPECT_EQ(report.stored_as[k], io::ggml_type::q8_0);
    const lora::matrix<double> exact = base.read_matrix<double>(m.base) + m.scaling * m.b * m.a;
    const lora::matrix<double> e = merged.read_matrix<double>(m.base) - exact;
    EXPECT_DOUBLE_EQ(report.errors[k].max_weight, e.cwiseAbs().maxCoeff()) << m.base;
    EXPECT_GT(report.errors[k].rel_rms_weight, 1e-4) << m.base;  // a Q8_0 step is ~1% of a block's max
    EXPECT_LT(report.errors[k].rel_rms_weight, 2e-2) << m.base;
    EXPECT_EQ(report.errors[k].outputs, 0) << m.base;
    EXPECT_EQ(report.errors[k].rel_rms_output, 0.0) << m.base;
  }
}

TEST(RequantError, PoolingTwoTensorsIsMeasuringThemStacked) {
  // Two weights with the same input width: stacking them stacks their outputs on the same probe batch, so
  // every pooled figure equals the figure of the stacked pair.
  const lora::matrix<double> w1 = random_matrix(5, 8, 1), w2 = random_matrix(3, 8, 2);
  const lora::matrix<double> q1 = w1 + 1e-3 * random_matrix(5, 8, 3), q2 = w2 + 4e-3 * random_matrix(3, 8, 4);
  lora::quant::requant_error pooled = lora::quant::measure_requant_error(w1, q1, 16);
  pooled.pool(lora::quant::measure_requant_error(w2, q2, 16));
  lora::matrix<double> w(8, 8), q(8, 8);
  w << w1, w2;
  q << q1, q2;
  const lora::quant::requant_error stacked = lora::quant::measure_requant_error(w, q, 16);
  EXPECT_DOUBLE_EQ(pooled.max_weight, stacked.max_weight);
  EXPECT_NEAR(pooled.rms_weight, stacked.rms_weight, 1e-14);
  EXPECT_NEAR(pooled.rel_rms_weight, stacked.rel_rms_weight, 1e-14);
  EXPECT_DOUBLE_EQ(pooled.max_output, stacked.max_output);
  EXPECT_NEAR(pooled.rms_output, stacked.rms_output, 1e-14);
  EXPECT_NEAR(pooled.rel_rms_output, stacked.rel_rms_output, 1e-14);
  EXPECT_EQ(pooled.weights, 64);
  EXPECT_EQ(pooled.outputs, 16 * 8);
  // The worst case is not the pooled one: w2's larger error dominates absorb's RMS.
  lora::quant::requant_error worst = lora::quant::measure_requant_error(w1, q1, 16);
  worst.absorb(lora::quant::measure_requant_error(w2, q2, 16));
  EXPECT_GT(worst.rms_weight, pooled.rms_weight);
  const hand_error h = by_hand(w, q, 16);
  expect_figures(stacked, h, "stacked");
}

TEST(GgufLora, MergeRefusesUnknownTensorsAndNonFiniteResults) {
  temp_dir dir;
  const auto weights = models::gpt2_weights<float>::random(tiny(), 6);
  const io::gguf_file base = io::gguf_file::from_bytes(models::gpt2_gguf_writer(weights, byte_vocab()).to_bytes(), "b");
  auto modules = models::gpt2_peft_to_gguf_modules(peft_adapter(), tiny());
  auto unknown = modules;
  unknown[0].base = "blk.5.attn_qkv.weight";
  expect_error<lora::name_error>([&] { io::merge_gguf(base, unknown, dir.file("x.gguf")); }, {"blk.5.attn_qkv.weight"});
  auto huge = modules;
  huge[1].scaling = 1e300;
  huge[1].b *= 1e300;
  expect_error<lora::numeric_error>([&] { io::merge_gguf(base, huge, dir.file("x.gguf")); },
                                    {"attn_output", "non-finite"});
  auto vec = modules;
  vec[0].base = "output_norm.weight";
  expect_error<lora::shape_error>([&] { io::merge_gguf(base, vec, dir.file("x.gguf")); },
                                  {"output_norm.weight", "not a matrix"});
  EXPECT_EQ(dir.entries(), 0u);
}

}  // namespace
