// tests/test_merge_tool.cpp: lora::io::merge_checkpoint, the logic behind lora-merge. Merged tensors
// against an independent element-by-element computation of W + s·B·A (transposed for fan_in_fan_out
// and embeddings), the DoRA formula, lora_B.bias, rsLoRA and rank/alpha patterns, modules_to_save
// replacements; name matching across prefixes with its ambiguous and missing cases; dtype conversion;
// untouched tensors and metadata copied byte for byte; refusals that leave no output behind; the report
// of what rounding the merged tensors to the output dtype lost, against a hand computation.
#include <stdlib.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <lora/io/merge.hpp>
#include <lora/quant/requant_error.hpp>
#include <map>
#include <string>
#include <vector>

#include "file_support.hpp"
#include "requant_support.hpp"
#include "support.hpp"

namespace {

namespace io = lora::io;
using lora_test::expect_error;
using lora_test::temp_dir;
using mat = lora::matrix<double>;
using vec = lora::vector<double>;

/// Deterministic, non-trivial values: entry k of a matrix is f(seed, k).
mat filled(lora::index rows, lora::index cols, double seed) {
  mat m(rows, cols);
  for (lora::index i = 0; i < rows; ++i) {
    for (lora::index j = 0; j < cols; ++j)
      m(i, j) = std::sin(seed + 0.7 * static_cast<double>(i) + 1.3 * static_cast<double>(j));
  }
  return m;
}

/// Σ_k b(i,k) a(k,j) by explicit loops: the reference the merge is checked against.
mat naive_ba(const mat& b, const mat& a) {
  mat out(b.rows(), a.cols());
  for (lora::index i = 0; i < b.rows(); ++i) {
    for (lora::index j = 0; j < a.cols(); ++j) {
      double s = 0;
      for (lora::index k = 0; k < a.rows(); ++k) s += b(i, k) * a(k, j);
      out(i, j) = s;
    }
  }
  return out;
}

io::peft_module module(const std::string& path, lora::index r, lora::index in, lora::index out, double seed) {
  io::peft_module m;
  m.path = path;
  m.a = filled(r, in, seed);
  m.b = filled(out, r, seed + 10);
  return m;
}

/// E = stored − exact (out x in) by explicit loops: max |E|, RMS E / RMS W* and the relative RMS of X Eᵀ
/// with X = quant::probe_batch(p, in).
using lora_test::by_hand;
using lora_test::hand_error;

const std::string base_name = "base.safetensors";

// GPT-2 names its original checkpoint's tensors without the "transformer." prefix that the adapter
// (trained on GPT2LMHeadModel) uses; Conv1D weights are stored in x out.
struct gpt2_fixture {
  temp_dir dir;
  mat c_attn = filled(3, 6, 1.0);  // h.0.attn.c_attn.weight, in 3 x out 6
  vec c_attn_bias = filled(6, 1, 2.0);
  mat c_proj = filled(2, 3, 3.0);  // h.0.attn.c_proj.weight, in 2 x out 3
  mat wte = filled(5, 3, 4.0);     // vocab 5 x dim 3
  mat score = filled(2, 3, 5.0);   // classification head, out 2 x in 3

  std::string base() const { return dir.file(base_name); }
  std::string adapter_dir() const { return dir.file("adapter"); }
  std::string out() const { return dir.file("merged.safetensors"); }

  void write_base(io::dtype type = io::dtype::f32) const {
    io::safetensors_writer w;
    w.add("h.0.attn.c_attn.weight", c_attn, type);
    w.add("h.0.attn.c_attn.bias", c_attn_bias, type);
    w.add("h.0.attn.c_proj.weight", c_proj, type);
    w.add("wte.weight", wte, type);
    w.add("score.weight", score, type);
    const std::vector<unsigned char> ids = {1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0};
    w.add_raw("position_ids", io::dtype::i64, {1, 2}, ids);
    w.set_metadata({{"format", "pt"}, {"note", "gpt-2 fixture"}});
    w.write(base());
  }

  io::peft_adapter adapter() const {
    io::peft_adapter a;
    a.config.r = 2;
    a.config.lora_alpha = 4;
    a.config.fan_in_fan_out = true;
    a.config.rank_pattern = {{"c_proj", 1}};
    a.config.alpha_pattern = {{"c_proj", 3}};
    a.modules.push_back(module("transformer.h.0.attn.c_attn", 2, 3, 6, 0.5));
    a.modules.push_back(module("transformer.h.0.attn.c_proj", 1, 2, 3, 1.5));
    return a;
  }
};

TEST(MergeCheckpoint, Gpt2FanInFanOutWithPrefixesAndPatterns) {
  gpt2_fixture f;
  f.write_base();
  const io::peft_adapter a = f.adapter();
  a.save(f.adapter_dir());
  const io::merge_report report = io::merge_checkpoint(f.base(), f.adapter_dir(), f.out());

  const io::safetensors_file out = io::safetensors_file::open(f.out());
  // c_attn: s = 4 / 2; the stored weight is in x out, so it receives (B A)ᵀ.
  const mat expected_attn = f.c_attn + 2.0 * naive_ba(a.modules[0].b, a.modules[0].a).transpose();
  EXPECT_LT(lora_test::rel_error(out.read_matrix<double>("h.0.attn.c_attn.weight"), expected_attn), 1e-6);
  // c_proj: rank 1 and alpha 3 from the patterns, s = 3.
  const mat expected_proj = f.c_proj + 3.0 * naive_ba(a.modules[1].b, a.modules[1].a).transpose();
  EXPECT_LT(lora_test::rel_error(out.read_matrix<double>("h.0.attn.c_proj.weight"), expected_proj), 1e-6);
  ASSERT_EQ(report.merged.size(), 2u);
  EXPECT_EQ(report.merged[0],
            (std::pair<std::string, std::string>{"transformer.h.0.attn.c_attn", "h.0.attn.c_attn.weight"}));
  EXPECT_EQ(report.copied, 4u);
  EXPECT_EQ(report.tensors, 6u);

  // Untouched tensors and metadata: byte for byte, same dtypes and order.
  const io::safetensors_file base = io::safetensors_file::open(f.base());
  EXPECT_EQ(out.metadata(), base.metadata());
  ASSERT_EQ(out.tensors().size(), base.tensors().size());
  for (std::size_t k = 0; k < base.tensors().size(); ++k) {
    const io::tensor_info& t = base.tensors()[k];
    EXPECT_EQ(out.tensors()[k].name, t.name);
    EXPECT_EQ(out.tensors()[k].type, t.type);
    EXPECT_EQ(out.tensors()[k].shape, t.shape);
    if (t.name.find("c_attn.weight") != std::string::npos || t.name.find("c_proj.weight") != std::string::npos)
      continue;
    const io::tensor_bytes x = base.raw(t.name), y = out.raw(t.name);
    ASSERT_EQ(x.size(), y.size()) << t.name;
    EXPECT_EQ(std::memcmp(x.data(), y.data(), x.size()), 0) << t.name;
  }
}

TEST(MergeCheckpoint, PlainLinearRsloraScaleBiasAndModulesToSave) {
  // A Llama-style checkpoint ("model.layers...") and an adapter saved from a wrapper that adds one more
  // "model." ("model.model.layers..."): W out x in, lora_B.bias, rsLoRA, --scale, and the head replaced.
  temp_dir dir;
  const mat w = filled(4, 3, 0.1), head = filled(2, 4, 0.2);
  const vec bias = filled(4, 1, 0.3);
  io::safetensors_writer bw;
  bw.add("model.layers.0.mlp.up_proj.weight", w);
  bw.add("model.layers.0.mlp.up_proj.bias", bias);
  bw.add("score.weight", head);
  bw.write(dir.file("base.safetensors"));

  io::peft_adapter a;
  a.config.r = 4;
  a.config.lora_alpha = 6;
  a.config.use_rslora = true;
  a.config.lora_bias = true;
  a.config.modules_to_save = {"score"};
  io::peft_module m = module("model.model.layers.0.mlp.up_proj", 4, 3, 4, 2.0);
  m.b_bias = filled(4, 1, 7.0);
  a.modules.push_back(m);
  const mat new_head = filled(2, 4, 9.0);
  a.full_tensors.push_back(io::peft_full_tensor::from_matrix("score.weight", new_head));
  a.save(dir.file("adapter"));

  io::merge_options options;
  options.scale = 0.5;
  std::size_t calls = 0;
  options.progress = [&](std::size_t done, std::size_t total, const std::string&) {
    ++calls;
    EXPECT_EQ(done, calls);
    EXPECT_EQ(total, 3u);
  };
  const io::merge_report report =
      io::merge_checkpoint(dir.file("base.safetensors"), dir.file("adapter"), dir.file("out.safetensors"), options);
  EXPECT_EQ(calls, 3u);
  const double s = 0.5 * 6.0 / std::sqrt(4.0);
  const io::safetensors_file out = io::safetensors_file::open(dir.file("out.safetensors"));
  EXPECT_LT(
      lora_test::rel_error(out.read_matrix<double>("model.layers.0.mlp.up_proj.weight"), w + s * naive_ba(m.b, m.a)),
      1e-6);
  EXPECT_LT(lora_test::rel_error(out.read_matrix<double>("model.layers.0.mlp.up_proj.bias"), bias + s * m.b_bias),
            1e-6);
  EXPECT_LT(lora_test::rel_error(out.read_matrix<double>("score.weight"), new_head), 1e-7);
  ASSERT_EQ(report.replaced.size(), 1u);
  EXPECT_EQ(report.replaced[0].second, "score.weight");
  ASSERT_EQ(report.merged.size(), 2u);  // the weight and the bias
  // Both measured against the exact sums of what the files hold (the adapter saved its factors as F32);
  // the bias, which has no layer output of its own, by its values only. The base is F64, kept: the merge's
  // double result is stored as it is, and the report says nothing was lost.
  ASSERT_EQ(report.errors.size(), 2u);
  const io::peft_adapter saved = io::peft_adapter::load(dir.file("adapter"));
  const io::peft_module& sm = saved.modules[0];
  const std::size_t kb = report.merged[0].second == "model.layers.0.mlp.up_proj.bias" ? 0 : 1, kw = 1 - kb;
  EXPECT_EQ(report.merged[kb].second, "model.layers.0.mlp.up_proj.bias");
  const vec stored_bias = out.read_vector<double>("model.layers.0.mlp.up_proj.bias");
  EXPECT_DOUBLE_EQ(report.errors[kb].max_weight, (stored_bias - (bias + s * sm.b_bias)).cwiseAbs().maxCoeff());
  EXPECT_EQ(report.errors[kb].weights, 4);
  EXPECT_EQ(report.errors[kb].outputs, 0);
  const hand_error h =
      by_hand(w + s * naive_ba(sm.b, sm.a), out.read_matrix<double>("model.layers.0.mlp.up_proj.weight"), 64);
  EXPECT_NEAR(report.errors[kw].rel_rms_output, h.rel_rms_output, 1e-9 * h.rel_rms_output);
  EXPECT_EQ(report.errors[kw].weights, 12);
  EXPECT_EQ(report.errors[kw].outputs, 64 * 4);
  for (std::size_t k = 0; k < 2; ++k) {
    EXPECT_EQ(report.stored_as[k], io::dtype::f64);
    EXPECT_EQ(report.errors[k].max_weight, 0.0);
    EXPECT_EQ(report.errors[k].max_output, 0.0);
  }
  EXPECT_EQ(report.pooled.rms_weight, 0.0);
  EXPECT_EQ(report.pooled.weights, 16);
}

TEST(MergeCheckpoint, DoraFollowsPeft) {
  // W' = m ⊙ V / ‖V‖ row-wise, V = W + s B A; with fan_in_fan_out the rows are the stored columns.
  for (const bool fan_in_fan_out : {false, true}) {
    SCOPED_TRACE(fan_in_fan_out ? "fan_in_fan_out" : "out x in");
    temp_dir dir;
    const mat w = filled(5, 3, 0.4);  // out 5 x in 3
    io::safetensors_writer bw;
    bw.add("layer.weight", fan_in_fan_out ? mat(w.transpose()) : w);
    bw.write(dir.file("base.safetensors"));
    io::peft_adapter a;
    a.config.r = 2;
    a.config.lora_alpha = 3;
    a.config.use_dora = true;
    a.config.fan_in_fan_out = fan_in_fan_out;
    io::peft_module m = module("layer", 2, 3, 5, 3.0);
    m.magnitude = filled(5, 1, 8.0).cwiseAbs();
    a.modules.push_back(m);
    a.save(dir.file("adapter"));
    io::merge_checkpoint(dir.file("base.safetensors"), dir.file("adapter"), dir.file("out.safetensors"));

    const mat v = w + 1.5 * naive_ba(m.b, m.a);
    mat expected(5, 3);
    for (lora::index i = 0; i < 5; ++i) {
      double norm = 0;
      for (lora::index j = 0; j < 3; ++j) norm += v(i, j) * v(i, j);
      norm = std::sqrt(norm);
      for (lora::index j = 0; j < 3; ++j) expected(i, j) = m.magnitude(i) * v(i, j) / norm;
    }
    const mat got = io::safetensors_file::open(dir.file("out.safetensors")).read_matrix<double>("layer.weight");
    EXPECT_LT(lora_test::rel_error(fan_in_fan_out ? mat(got.transpose()) : got, expected), 1e-6);
  }
}

TEST(MergeCheckpoint, EmbeddingsMergeTransposed) {
  temp_dir dir;
  const mat wte = filled(6, 4, 0.9);  // num_embeddings 6 x dim 4
  io::safetensors_writer bw;
  bw.add("transformer.wte.weight", wte);
  bw.write(dir.file("base.safetensors"));
  io::peft_adapter a;
  a.config.r = 2;
  a.config.lora_alpha = 2;
  io::peft_module e = module("transformer.wte", 2, 6, 4, 4.0);  // A: r x num_embeddings, B: dim x r
  e.embedding = true;
  a.modules.push_back(e);
  a.save(dir.file("adapter"));
  io::merge_checkpoint(dir.file("base.safetensors"), dir.file("adapter"), dir.file("out.safetensors"));
  const mat got = io::safetensors_file::open(dir.file("out.safetensors")).read_matrix<double>("transformer.wte.weight");
  EXPECT_LT(lora_test::rel_error(got, wte + naive_ba(e.b, e.a).transpose()), 1e-6);
}

TEST(MergeCheckpoint, DtypesAreKeptOrConverted) {
  gpt2_fixture f;
  f.write_base(io::dtype::f16);
  const io::peft_adapter a = f.adapter();
  a.save(f.adapter_dir());
  {  // keep: f16 stays f16; the merged value is the f16 rounding of the exact sum.
    const io::merge_report report = io::merge_checkpoint(f.base(), f.adapter_dir(), f.out());
    EXPECT_EQ(report.converted, 0u);
    const io::safetensors_file base = io::safetensors_file::open(f.base());
    const io::safetensors_file out = io::safetensors_file::open(f.out());
    EXPECT_EQ(out.info("h.0.attn.c_attn.weight").type, io::dtype::f16);
    const mat exact =
        base.read_matrix<double>("h.0.attn.c_attn.weight") + 2.0 * naive_ba(a.modules[0].b, a.modules[0].a).transpose();
    const mat got = out.read_matrix<double>("h.0.attn.c_attn.weight");
    for (lora::index k = 0; k < exact.size(); ++k) {
      EXPECT_EQ(io::detail::to_half_bits(got.data()[k]), io::detail::to_half_bits(exact.data()[k])) << k;
    }
  }
  for (const io::dtype to : {io::dtype::f32, io::dtype::bf16}) {
    io::merge_options options;
    options.out_dtype = to;
    const io::merge_report report = io::merge_checkpoint(f.base(), f.adapter_dir(), f.out(), options);
    const io::safetensors_file base = io::safetensors_file::open(f.base());
    const io::safetensors_file out = io::safetensors_file::open(f.out());
    EXPECT_EQ(report.converted, 3u);  // c_attn.bias, wte, score; position_ids stays I64
    for (const io::tensor_info& t : out.tensors()) {
      EXPECT_EQ(t.type, t.name == "position_ids" ? io::dtype::i64 : to) << t.name;
    }
    EXPECT_EQ(base.raw("position_ids").size(), out.raw("position_ids").size());
    EXPECT_EQ(std::memcmp(base.raw("position_ids").data(), out.raw("position_ids").data(), 16), 0);
    // f16 -> f32 is exact; f16 -> bf16 rounds once.
    const mat wte = base.read_matrix<double>("wte.weight");
    const mat got = out.read_matrix<double>("wte.weight");
    for (lora::index k = 0; k < wte.size(); ++k) {
      const double want =
          to == io::dtype::f32
              ? wte.data()[k]
              : static_cast<double>(io::detail::from_bfloat16_bits(io::detail::to_bfloat16_bits(wte.data()[k])));
      EXPECT_EQ(got.data()[k], want) << k;
    }
    EXPECT_EQ(out.metadata(), base.metadata());
  }
}

TEST(MergeCheckpoint, ReportsWhatRoundingToTheOutputDtypeLoses) {
  // GPT-2 Conv1D weights (stored in x out) merged in double and written as F32, F16 and BF16: the report
  // measures E = stored − W* in the modules' out x in orientation, per tensor and pooled.
  gpt2_fixture f;
  f.write_base();
  f.adapter().save(f.adapter_dir());
  const io::peft_adapter a = io::peft_adapter::load(f.adapter_dir());  // the factors as saved (F32)
  const double scales[2] = {2.0, 3.0};  // alpha / r: 4 / 2 for c_attn (module 0), 3 / 1 for c_proj (1)
  std::map<io::dtype, io::merge_report> reports;
  for (const io::dtype to : {io::dtype::f32, io::dtype::f16, io::dtype::bf16}) {
    io::merge_options options;
    options.out_dtype = to;
    const io::merge_report report = io::merge_checkpoint(f.base(), f.adapter_dir(), f.out(), options);
    const io::safetensors_file base = io::safetensors_file::open(f.base());
    const io::safetensors_file out = io::safetensors_file::open(f.out());
    ASSERT_EQ(report.merged.size(), 2u);
    ASSERT_EQ(report.errors.size(), 2u);
    double sum_e2 = 0, sum_w2 = 0, max_weight = 0;
    for (std::size_t k = 0; k < 2; ++k) {
      const std::string& name = report.merged[k].second;
      EXPECT_EQ(report.stored_as[k], to) << name;
      const std::size_t j = report.merged[k].first == "transformer.h.0.attn.c_attn" ? 0 : 1;
      ASSERT_EQ(a.modules[j].path, report.merged[k].first);
      const mat exact =
          (base.read_matrix<double>(name) + scales[j] * naive_ba(a.modules[j].b, a.modules[j].a).transpose())
              .transpose();  // out x in
      const mat stored = out.read_matrix<double>(name).transpose();
      const hand_error h = by_hand(exact, stored, 64);
      const lora::quant::requant_error& e = report.errors[k];
      EXPECT_NEAR(e.max_weight, h.max_weight, 1e-12 * h.max_weight) << name;
      EXPECT_NEAR(e.rel_rms_weight, h.rel_rms_weight, 1e-9 * h.rel_rms_weight) << name;
      EXPECT_NEAR(e.rel_rms_output, h.rel_rms_output, 1e-9 * h.rel_rms_output) << name;
      EXPECT_EQ(e.weights, exact.size()) << name;
      EXPECT_EQ(e.outputs, 64 * exact.rows()) << name;  // out rows of X Eᵀ per probe row
      // Round to nearest: 2^-24 (F32), 2^-11 (F16, or 2^-25 below its normal range), 2^-8 (BF16) of each value.
      const int bits = to == io::dtype::f32 ? 24 : to == io::dtype::f16 ? 11 : 8;
      for (lora::index i = 0; i < exact.size(); ++i) {
        const double subnormal = to == io::dtype::f16 ? 0x1p-25 : 0.0;  // half of F16's smallest step
        EXPECT_LE(std::abs(stored.data()[i] - exact.data()[i]),
                  std::ldexp(std::abs(exact.data()[i]), -bits) + subnormal)
            << name << " element " << i;
      }
      EXPECT_GT(h.max_weight, 0.0) << name;  // the sums of sines are not all representable
      sum_e2 += h.sum_e2, sum_w2 += h.sum_w2, max_weight = std::max(max_weight, h.max_weight);
    }
    EXPECT_DOUBLE_EQ(report.pooled.max_weight, max_weight);
    EXPECT_DOUBLE_EQ(report.worst.max_weight, max_weight);
    EXPECT_NEAR(report.pooled.rel_rms_weight, std::sqrt(sum_e2 / sum_w2), 1e-9 * report.pooled.rel_rms_weight);
    EXPECT_EQ(report.pooled.weights, 18 + 6);
    reports[to] = report;
  }
  EXPECT_LT(reports[io::dtype::f32].worst.rel_rms_output, 1e-7);
  EXPECT_LE(reports[io::dtype::bf16].worst.rel_rms_output, 0x1p-8);
  EXPECT_LT(reports[io::dtype::f16].pooled.rel_rms_weight, reports[io::dtype::bf16].pooled.rel_rms_weight / 2);
  EXPECT_LT(reports[io::dtype::f32].pooled.rel_rms_weight, reports[io::dtype::f16].pooled.rel_rms_weight / 100);
}

TEST(MergeCheckpoint, RefusesBadPairsNamingTheModuleAndWritesNothing) {
  gpt2_fixture f;
  f.write_base();
  auto expect_refusal = [&](const io::peft_adapter& a, auto error_tag, std::initializer_list<std::string> fragments) {
    using E = decltype(error_tag);
    std::error_code ec;
    std::filesystem::remove_all(f.adapter_dir(), ec);
    a.save(f.adapter_dir());
    const std::size_t before = f.dir.entries();
    expect_error<E>([&] { io::merge_checkpoint(f.base(), f.adapter_dir(), f.out()); }, fragments);
    EXPECT_EQ(f.dir.entries(), before);  // no output, no temporary
  };
  io::peft_adapter a = f.adapter();
  a.modules[1].path = "transformer.h.9.attn.c_proj";  // missing
  expect_refusal(a, lora::name_error{""}, {"transformer.h.9.attn.c_proj", "matches no"});

  a = f.adapter();
  a.modules[0] = module("transformer.h.0.attn.c_attn", 2, 3, 5, 0.5);  // out 5, base says 6
  expect_refusal(a, lora::shape_error{""}, {"transformer.h.0.attn.c_attn", "[3, 5]", "[3, 6]", "fan_in_fan_out"});

  a = f.adapter();
  a.config.fan_in_fan_out = false;  // the stored orientation no longer fits
  expect_refusal(a, lora::shape_error{""}, {"transformer.h.0.attn.c_attn", "[6, 3]"});

  a = f.adapter();
  a.full_tensors.push_back(io::peft_full_tensor::from_matrix("classifier.weight", mat::Zero(2, 3)));
  expect_refusal(a, lora::name_error{""}, {"classifier.weight", "matches no tensor"});

  a = f.adapter();
  a.full_tensors.push_back(io::peft_full_tensor::from_matrix("score.weight", mat::Zero(3, 3)));
  expect_refusal(a, lora::shape_error{""}, {"score.weight", "[3, 3]", "[2, 3]"});

  a = f.adapter();
  a.config.lora_bias = true;
  a.modules[0].b_bias = vec::Ones(6);
  a.modules[1].b_bias = vec::Ones(3);  // h.0.attn.c_proj has no bias in the base
  expect_refusal(a, lora::name_error{""}, {"transformer.h.0.attn.c_proj", "h.0.attn.c_proj.bias"});

  a = f.adapter();
  a.modules[0].b *= 1e300;  // overflows the f32 base
  a.modules[0].a *= 1e300;
  expect_refusal(a, lora::numeric_error{""}, {"transformer.h.0.attn.c_attn", "non-finite"});

  // Two modules landing on one base tensor.
  a = f.adapter();
  a.modules.push_back(module("h.0.attn.c_attn", 2, 3, 6, 0.5));
  expect_refusal(a, lora::name_error{""}, {"h.0.attn.c_attn.weight", "targeted by both"});
}

TEST(MergeCheckpoint, AmbiguousMatchesAreRefused) {
  temp_dir dir;
  io::safetensors_writer bw;
  bw.add("encoder.layers.0.q.weight", filled(2, 2, 0.1));
  bw.add("decoder.layers.0.q.weight", filled(2, 2, 0.2));
  bw.write(dir.file("base.safetensors"));
  io::peft_adapter a;
  a.config.r = 1;
  a.modules.push_back(module("layers.0.q", 1, 2, 2, 0.3));
  a.save(dir.file("adapter"));
  expect_error<lora::name_error>(
      [&] { io::merge_checkpoint(dir.file("base.safetensors"), dir.file("adapter"), dir.file("out.safetensors")); },
      {"adapter module 'layers.0.q'", "ambiguous", "encoder.layers.0.q", "decoder.layers.0.q"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("out.safetensors")));
  // The exact path wins over a shorter shared suffix.
  a.modules[0].path = "decoder.layers.0.q";
  a.save(dir.file("adapter"));
  const io::merge_report r =
      io::merge_checkpoint(dir.file("base.safetensors"), dir.file("adapter"), dir.file("out.safetensors"));
  ASSERT_EQ(r.merged.size(), 1u);
  EXPECT_EQ(r.merged[0].second, "decoder.layers.0.q.weight");
}

TEST(MergeCheckpoint, NonFloatBaseAndBadOptions) {
  temp_dir dir;
  io::safetensors_writer bw;
  bw.add_raw("q.weight", io::dtype::i8, {2, 2}, std::vector<unsigned char>(4, 1));
  bw.write(dir.file("base.safetensors"));
  io::peft_adapter a;
  a.config.r = 1;
  a.modules.push_back(module("q", 1, 2, 2, 0.3));
  a.save(dir.file("adapter"));
  expect_error<lora::dtype_error>(
      [&] { io::merge_checkpoint(dir.file("base.safetensors"), dir.file("adapter"), dir.file("out.safetensors")); },
      {"adapter module 'q'", "I8"});
  io::merge_options options;
  options.out_dtype = io::dtype::i32;
  expect_error<lora::dtype_error>(
      [&] {
        io::merge_checkpoint(dir.file("base.safetensors"), dir.file("adapter"), dir.file("out.safetensors"), options);
      },
      {"I32"});
}

}  // namespace
