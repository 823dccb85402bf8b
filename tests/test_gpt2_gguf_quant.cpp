// tests/test_gpt2_gguf_quant.cpp: a GPT-2 GGUF trained over as it is stored (load_gpt2_gguf_quantized,
// gpt2's constructor taking quantized projections, quant::quantized_matrix::from_ggml): every projection
// keeps the file's blocks byte for byte, the model equals the one loaded dequantized, adapters train over
// it, and what cannot be used is refused naming the tensor and the type.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <lora/io/gguf.hpp>
#include <lora/models/gpt2.hpp>
#include <lora/models/gpt2_gguf.hpp>
#include <lora/optim.hpp>
#include <string>
#include <utility>
#include <vector>

#include "common/lm.hpp"
#include "file_support.hpp"
#include "support.hpp"

namespace {

namespace io = lora::io;
namespace models = lora::models;
using lora::index;
using lora::quant::qtype;
using lora_test::expect_error;
using lora_test::temp_dir;
using tokens = std::vector<std::int32_t>;

models::gpt2_config tiny(index d = 32) {
  models::gpt2_config c;
  c.n_layer = 2;
  c.n_head = 2;
  c.n_embd = d;  // 32: whole Q8_0 / Q4_0 blocks
  c.n_positions = 16;
  c.vocab_size = 257;
  return c;
}

models::gguf_vocab byte_vocab() { return models::gguf_vocab_from_folder("/nonexistent-folder", 257); }

/// A random tiny GPT-2 written as GGUF with matrices of `type`.
std::string write_model(const temp_dir& dir, io::ggml_type type, std::uint64_t seed = 1) {
  models::gpt2_gguf_options o;
  o.type = type;
  const std::string path = dir.file(std::string(io::ggml_type_name(type)) + ".gguf");
  models::gpt2_gguf_writer(models::gpt2_weights<float>::random(tiny(), seed), byte_vocab(), o).write(path);
  return path;
}

models::gpt2<float> quantized_model(const std::string& path) {
  auto q = models::load_gpt2_gguf_quantized<float>(path);
  return models::gpt2<float>(std::move(q.weights), std::move(q.projections));
}

const tokens k_text = {72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100, 33, 10, 256, 65};

struct kept_type {
  io::ggml_type file;
  qtype storage;
};

TEST(Gpt2GgufQuant, ProjectionsKeepTheFilesBlocksAndTheModelEqualsTheDequantizedOne) {
  temp_dir dir;
  for (const kept_type t : {kept_type{io::ggml_type::q8_0, qtype::q8_0}, kept_type{io::ggml_type::q4_0, qtype::q4_0},
                            kept_type{io::ggml_type::f16, qtype::f16}, kept_type{io::ggml_type::bf16, qtype::bf16},
                            kept_type{io::ggml_type::f32, qtype::f32}}) {
    SCOPED_TRACE(io::ggml_type_name(t.file));
    const std::string path = write_model(dir, t.file);
    const io::gguf_file f = io::gguf_file::open(path);
    const models::gpt2<float> q = quantized_model(path);
    const auto plain_ck = models::load_gpt2_gguf<float>(path);
    const models::gpt2<float> plain(models::gpt2_weights<float>(plain_ck.weights));
    std::size_t held = 0;
    for (index l = 0; l < tiny().n_layer; ++l) {
      for (int m = 0; m < models::gpt2_module_count; ++m) {
        const auto& layer = q.layer(l, static_cast<models::gpt2_module>(m));
        const std::string name = *models::gpt2_gguf_name_of_module(layer.name());
        ASSERT_TRUE(layer.is_quantized()) << name;
        EXPECT_EQ(layer.weight_storage(), t.storage) << name;
        const auto& bytes = layer.quantized_weight().ggml_bytes();
        const io::tensor_bytes raw = f.raw(name);
        ASSERT_EQ(bytes.size(), raw.size()) << name;
        EXPECT_EQ(std::memcmp(bytes.data(), raw.data(), raw.size()), 0) << name;
        const lora::matrix<float> deq = layer.quantized_weight().dequantize<float>(), want = f.read_matrix<float>(name);
        ASSERT_EQ(deq.rows(), want.rows());
        EXPECT_EQ(std::memcmp(deq.data(), want.data(), sizeof(float) * static_cast<std::size_t>(want.size())), 0)
            << name;
        held += bytes.size();
      }
    }
    const auto& w = q.weights();
    for (index id = 0; id < w.num_tensors(); ++id) {
      const bool projection = models::gpt2_gguf_tensor_name(tiny(), id).second;
      EXPECT_EQ(w.has(id), !projection) << w.spec(id).name;
      if (w.has(id)) {
        EXPECT_EQ(w.flat(id), plain_ck.weights.flat(id)) << w.spec(id).name;
      }
    }
    const std::size_t as_float = 2 * 12 * 32 * 32 * sizeof(float);  // 2 blocks of 3d² + d² + 4d² + 4d²
    std::cout << "  [" << io::ggml_type_name(t.file) << "] projections held: " << held << " bytes (float: " << as_float
              << ")\n";
    EXPECT_EQ(held, static_cast<std::size_t>(io::ggml_row_bytes(t.file, 32 * 12 * 32 * 2)));
    auto cq = q.make_cache();
    auto cp = plain.make_cache();
    const double nq = q.nll(k_text, cq), np = plain.nll(k_text, cp);
    EXPECT_NEAR(nq, np, 1e-5 * std::abs(np));
  }
}

double train_steps(models::gpt2<float>& model, int steps) {
  lora::adapter_config c;
  c.rank = 4;
  c.alpha = 8;
  model.add_adapter("default", c, {"c_attn", "c_proj", "c_fc"});
  lora::optim::adamw_options o;
  o.lr = 1e-2;
  lora::optim::adamw<float> opt(model.parameters(), o);
  const tokens in(k_text.begin(), k_text.end() - 1), target(k_text.begin() + 1, k_text.end());
  double first = 0, last = 0;
  for (int s = 0; s < steps; ++s) {
    model.zero_grad();
    last = model.forward_backward(in, target, 1, static_cast<index>(in.size()));
    if (s == 0) first = last;
    opt.step();
  }
  EXPECT_LT(last, first - 0.05) << "from " << first << " to " << last;
  return last;
}

TEST(Gpt2GgufQuant, AdaptersTrainOverTheBlocksWithoutChangingThem) {
  temp_dir dir;
  for (const io::ggml_type t : {io::ggml_type::q8_0, io::ggml_type::q4_0}) {
    SCOPED_TRACE(io::ggml_type_name(t));
    const std::string path = write_model(dir, t, 5);
    models::gpt2<float> q = quantized_model(path);
    const auto before = q.layer(1, models::gpt2_module::c_fc).quantized_weight().ggml_bytes();
    models::gpt2<float> plain(models::load_gpt2_gguf<float>(path).weights);
    const double lq = train_steps(q, 12), lp = train_steps(plain, 12);
    EXPECT_NEAR(lq, lp, 1e-3 * std::abs(lp));  // the same training, to float rounding over 12 steps
    EXPECT_EQ(q.layer(1, models::gpt2_module::c_fc).quantized_weight().ggml_bytes(), before);
    EXPECT_EQ(q.base_storage(), t == io::ggml_type::q8_0 ? qtype::q8_0 : qtype::q4_0);
  }
}

/// The image of `path` with tensor `name` replaced by `bytes` of `type` (ne unchanged).
void replace_tensor(const std::string& path, const std::string& out, const std::string& name, io::ggml_type type) {
  const io::gguf_file f = io::gguf_file::open(path);
  io::gguf_writer w;
  for (const auto& [key, value] : f.metadata()) w.set(key, value);
  for (const auto& t : f.tensors()) {
    if (t.name != name) {
      w.add_raw(t.name, t.type, t.ne, f.raw(t.name));
      continue;
    }
    const std::vector<unsigned char> junk(static_cast<std::size_t>(io::ggml_row_bytes(type, t.ne[0]) * t.ne[1]), 7);
    w.add_raw(t.name, type, t.ne, junk.data(), junk.size());
  }
  w.write(out);
}

TEST(Gpt2GgufQuant, ProjectionsOfTypesWeDoNotComputeWithAreRefusedNamingTensorAndType) {
  temp_dir dir;
  models::gpt2_gguf_writer(models::gpt2_weights<float>::random(tiny(64), 2), byte_vocab())
      .write(dir.file("wide.gguf"));  // d 64: ffn_down rows of 4 d = 256 values, one Q4_K block
  replace_tensor(dir.file("wide.gguf"), dir.file("k.gguf"), "blk.1.ffn_down.weight", io::ggml_type::q4_k);
  expect_error<lora::format_error>([&] { models::load_gpt2_gguf_quantized<float>(dir.file("k.gguf")); },
                                   {"blk.1.ffn_down.weight", "Q4_K"});
  const std::string q8 = write_model(dir, io::ggml_type::q8_0);
  replace_tensor(q8, dir.file("q5.gguf"), "blk.0.attn_qkv.weight", io::ggml_type::q5_0);
  expect_error<lora::format_error>([&] { models::load_gpt2_gguf_quantized<float>(dir.file("q5.gguf")); },
                                   {"blk.0.attn_qkv.weight", "Q5_0"});
  // A config of ~100 GB of weights and no tensors: refused before anything of the model's size is allocated.
  io::gguf_writer huge;
  const io::gguf_file small = io::gguf_file::open(q8);
  for (const auto& [key, value] : small.metadata()) huge.set(key, value);
  huge.set("gpt2.embedding_length", io::gguf_value::of(std::uint32_t{16384}));
  huge.set("gpt2.feed_forward_length", io::gguf_value::of(std::uint32_t{65536}));
  huge.set("gpt2.block_count", io::gguf_value::of(std::uint32_t{512}));
  huge.write(dir.file("huge.gguf"));
  expect_error<lora::format_error>([&] { models::load_gpt2_gguf_quantized<float>(dir.file("huge.gguf")); },
                                   {"0 tensors"});
}

TEST(QuantizedMatrixFromGgml, CopiesRowsAndRefusesOtherTypesAndShapes) {
  const lora::matrix<float> w = lora::matrix<float>::Random(3, 64);
  for (const qtype t : {qtype::q8_0, qtype::q4_0, qtype::f16, qtype::bf16, qtype::f32}) {
    const auto q = lora::quant::quantized_matrix::quantize(w, t);
    const auto g =
        lora::quant::quantized_matrix::from_ggml(lora::quant::detail::ggml_of(t), 3, 64, q.ggml_bytes().data());
    EXPECT_EQ(g.type(), t);
    EXPECT_EQ(g.ggml_bytes(), q.ggml_bytes());
    EXPECT_EQ(g.dequantize<float>(), q.dequantize<float>());
  }
  const std::vector<std::uint8_t> bytes(4096, 0);
  expect_error<lora::dtype_error>(
      [&] { lora::quant::quantized_matrix::from_ggml(io::ggml_type::q4_k, 2, 256, bytes.data()); }, {"Q4_K"});
  expect_error<lora::shape_error>(
      [&] { lora::quant::quantized_matrix::from_ggml(io::ggml_type::q8_0, 2, 48, bytes.data()); },
      {"Q8_0", "32", "48"});
  expect_error<lora::dtype_error>([&] { (void)lora::quant::quantized_matrix::quantize(w, qtype::int8).ggml_bytes(); },
                                  {"int8"});
}

TEST(Gpt2GgufQuant, TheConstructorChecksCountShapesAndReleasedTensors) {
  temp_dir dir;
  const std::string path = write_model(dir, io::ggml_type::q8_0);
  auto load = [&] { return models::load_gpt2_gguf_quantized<float>(path); };
  {
    auto q = load();
    q.projections.pop_back();
    expect_error<lora::shape_error>([&] { models::gpt2<float>(std::move(q.weights), std::move(q.projections)); },
                                    {"8", "7"});
  }
  {
    auto q = load();
    std::swap(q.projections[0], q.projections[1]);  // c_attn (96x32) where attn.c_proj (32x32) goes
    expect_error<lora::shape_error>([&] { models::gpt2<float>(std::move(q.weights), std::move(q.projections)); },
                                    {"transformer.h.0.attn.c_attn", "96x32", "32x32"});
  }
  {
    auto q = load();
    const models::gpt2_weights<float> full(tiny());  // every tensor held
    expect_error<lora::state_error>(
        [&] { models::gpt2<float>(models::gpt2_weights<float>(full), std::move(q.projections)); },
        {"h.0.attn.c_attn.weight", "held"});
  }
}

TEST(Gpt2GgufQuant, TheExamplesLoadAGgufBaseWithItsBpeVocabularyKeptOrDequantized) {
  temp_dir dir;
  models::gguf_vocab bpe = byte_vocab();  // the 256 byte tokens, "he" from the merge "h e", <|endoftext|>
  bpe.tokens.back() = "he";
  bpe.tokens.push_back("<|endoftext|>");
  bpe.eot = 257;
  bpe.merges = {"h e"};
  bpe.bpe = true;
  auto config = tiny();
  config.vocab_size = 258;
  models::gpt2_gguf_options f16;
  f16.type = io::ggml_type::f16;
  models::gpt2_gguf_writer(models::gpt2_weights<float>::random(config, 9), bpe, f16).write(dir.file("m.gguf"));
  ex::base_model kept = ex::load_base_model(dir.file("m.gguf"), true);
  ASSERT_TRUE(kept.tok.is_bpe());
  EXPECT_EQ(kept.tok.encode("he"), tokens{256});
  EXPECT_EQ(kept.tok.eot_id(), 257);
  EXPECT_EQ(kept.projections.size(), 8u);
  const auto model = ex::make_base_lm(kept);
  EXPECT_EQ(model->base_storage(), qtype::f16);
  ex::base_model plain = ex::load_base_model(dir.file("m.gguf"));
  EXPECT_TRUE(plain.projections.empty());
  const auto plain_model = ex::make_base_lm(plain);
  EXPECT_FALSE(plain_model->layer(0, models::gpt2_module::c_attn).is_quantized());
  auto c1 = model->make_cache();
  auto c2 = plain_model->make_cache();
  const tokens ids = kept.tok.encode("hello, he said");
  EXPECT_NEAR(model->nll(ids, c1), plain_model->nll(ids, c2), 1e-5 * plain_model->nll(ids, c2));
  ex::save_base_tokenizer(dir.file("m.gguf"), dir.path());
  EXPECT_EQ(models::tokenizer::from_folder(dir.path(), 258).encode("he"), tokens{256});
  // A vocabulary without merges must be the byte vocabulary, of the model's size.
  models::gguf_vocab odd = bpe;
  odd.merges.clear();
  odd.bpe = false;
  models::gpt2_gguf_writer(models::gpt2_weights<float>::random(config, 9), odd).write(dir.file("odd.gguf"));
  expect_error<lora::format_error>([&] { ex::load_base_model(dir.file("odd.gguf"), true); }, {"odd.gguf", "258"});
}

}  // namespace
