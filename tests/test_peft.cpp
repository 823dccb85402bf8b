// tests/test_peft.cpp: the tensors of PEFT LoRA adapters (io/peft_file.hpp): a GPT-2 style adapter
// assembled byte by byte from the format description (fan_in_fan_out, modules_to_save), load
// validation one rule at a time, and save/load round trips.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <lora/io/peft.hpp>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "file_support.hpp"
#include "support.hpp"

namespace {

namespace io = lora::io;
using bytes = std::vector<unsigned char>;
using lora_test::expect_error;
using lora_test::read_file;
using lora_test::temp_dir;
using lora_test::write_file;

// --- helpers ---------------------------------------------------------------------------------------

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

}  // namespace
