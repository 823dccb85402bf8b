// PEFT save → load → attach round trips for every layer kind PEFT can hold: linear, fan_in_fan_out linear,
// embedding, conv2d (4-D factors), and the fused q|k|v (exported as PEFT's single c_attn linear), mixed in
// one model; DoRA on linear and conv2d; refusals that leave the fresh model untouched.
#include <lora/io/peft.hpp>
#include <lora/lora.hpp>

#include "file_support.hpp"
#include "layer_support.hpp"
#include "support.hpp"

namespace {

namespace io = lora::io;
using lora::index;
using lora_test::expect_error;
using lora_test::random_matrix;
using mat = lora::matrix<float>;

/// A small model holding one layer of every kind over fixed frozen weights (each model owns copies).
struct model {
  explicit model(std::uint64_t seed) : model(weights(seed)) {}

  struct frozen {
    mat wte, fc, conv1d, qkv, kernel;
  };
  static frozen weights(std::uint64_t seed) {
    lora::rng gen(seed);
    return {random_matrix<float>(gen, 11, 6), random_matrix<float>(gen, 5, 6), random_matrix<float>(gen, 6, 7),
            random_matrix<float>(gen, 6, 9), random_matrix<float>(gen, 3, 2 * 3 * 3)};
  }
  static lora::conv2d_options conv_options() {
    lora::conv2d_options o;
    o.in_channels = 2;
    o.input = {5, 4};
    o.kernel = {3, 3};
    o.padding = {1, 0};
    return o;
  }
  explicit model(const frozen& w)
      : wte(w.wte, "wte"),
        fc(w.fc, "fc"),
        c_proj(w.conv1d, "c_proj", lora::weight_layout::in_out),  // GPT-2 Conv1D: stored in x out (6 x 7)
        c_attn(w.qkv, {true, false, true}, "c_attn", lora::weight_layout::in_out),
        conv(w.kernel, conv_options(), "conv") {}

  std::vector<std::pair<std::string, io::module_ref<float>>> modules(bool with_fused = true) {
    std::vector<std::pair<std::string, io::module_ref<float>>> out{{"transformer.wte", &wte},
                                                                   {"transformer.h.0.mlp.c_fc", &fc},
                                                                   {"transformer.h.0.mlp.c_proj", &c_proj},
                                                                   {"vision.conv", &conv}};
    if (with_fused) out.emplace_back("transformer.h.0.attn.c_attn", &c_attn);
    return out;
  }

  /// Every layer's inference output on fixed inputs, concatenated.
  std::vector<mat> outputs() const {
    lora::rng gen(99);
    const mat x6 = random_matrix<float>(gen, 4, 6);
    const mat images = random_matrix<float>(gen, 2, 2 * 5 * 4);
    return {wte.infer({0, 3, 10, 3}), fc.infer(x6), c_proj.infer(x6), c_attn.infer(x6), conv.infer(images)};
  }

  lora::embedding<float> wte;
  lora::linear<float> fc, c_proj;
  lora::merged_linear<float> c_attn;
  lora::conv2d<float> conv;
};

void add_adapters(model& m, bool dora) {
  lora::adapter_config c = lora_test::random_config(2, 4.0, 11);
  m.wte.add_adapter("tuned", c);
  c.seed = 12;
  c.use_dora = dora;
  m.fc.add_adapter("tuned", c);
  c.rank = 3;  // a rank_pattern entry
  c.seed = 13;
  m.c_proj.add_adapter("tuned", c);
  c.use_dora = false;  // PEFT's use_dora is one flag: a DoRA adapter leaves the fused layer out (see below)
  c.rank = 2;
  c.alpha = 6.0;  // an alpha_pattern entry
  if (!dora) m.c_attn.add_adapter("tuned", c);
  c.alpha = 4.0;
  c.use_dora = dora;
  m.conv.add_adapter("tuned", c);
}

void expect_same_outputs(const model& a, const model& b) {
  const auto ya = a.outputs(), yb = b.outputs();
  for (std::size_t k = 0; k < ya.size(); ++k) EXPECT_LT(lora_test::rel_error(yb[k], ya[k]), 2e-6) << "layer " << k;
}

TEST(peft_roundtrip, every_layer_kind_through_a_folder) {
  for (const bool dora : {false, true}) {
    model trained(1);
    add_adapters(trained, dora);
    const io::peft_adapter exported = io::peft_adapter::from_layers(trained.modules(!dora), "tuned");
    EXPECT_EQ(exported.config.use_dora, dora);
    const lora_test::temp_dir dir;
    exported.save(dir.file("adapter"));
    const io::peft_adapter loaded = io::peft_adapter::load(dir.file("adapter"));
    ASSERT_EQ(loaded.modules.size(), dora ? 4U : 5U);
    // PEFT's key forms: embedding keys, 4-D conv factors, the fused module of rank 2 + 2.
    const io::peft_module* wte = loaded.find("transformer.wte");
    ASSERT_NE(wte, nullptr);
    EXPECT_TRUE(wte->embedding);
    const io::peft_module* conv = loaded.find("vision.conv");
    ASSERT_NE(conv, nullptr);
    EXPECT_EQ(conv->a_shape, (std::vector<std::int64_t>{2, 2, 3, 3}));
    EXPECT_EQ(conv->b_shape, (std::vector<std::int64_t>{3, 2, 1, 1}));
    EXPECT_EQ(loaded.config.rank_for("transformer.h.0.mlp.c_proj"), 3);

    model fresh(1);
    const auto before = fresh.outputs();
    io::attach(loaded, fresh.modules(!dora), "tuned");
    expect_same_outputs(trained, fresh);
    if (dora) continue;
    EXPECT_EQ(loaded.find("transformer.h.0.attn.c_attn")->rank(), 4);
    // The fused slices and the frozen one: only q and v changed.
    const auto after = fresh.outputs();
    EXPECT_GT(lora_test::rel_error(after[3].leftCols(3), before[3].leftCols(3)), 1e-4);
    EXPECT_LT(lora_test::rel_error(after[3].middleCols(3, 3), before[3].middleCols(3, 3)), 1e-7);
  }
}

TEST(peft_roundtrip, single_kind_ranges_and_merge_after_attach) {
  model trained(2);
  add_adapters(trained, false);
  std::map<std::string, lora::embedding<float>*> embeddings{{"wte", &trained.wte}};
  const auto exported = io::peft_adapter::from_layers(embeddings, "tuned");
  model fresh(2);
  std::map<std::string, lora::embedding<float>*> targets{{"wte", &fresh.wte}};
  io::attach(io::peft_adapter::from_memory(exported.config.to_json(), exported.safetensors_bytes()), targets, "tuned");
  EXPECT_LT(lora_test::rel_error(fresh.wte.infer({1, 2, 3}), trained.wte.infer({1, 2, 3})), 1e-7);
  fresh.wte.merge();
  EXPECT_LT(lora_test::rel_error(fresh.wte.infer({1, 2, 3}), trained.wte.infer({1, 2, 3})), 1e-6);
}

TEST(peft_roundtrip, refusals_change_nothing) {
  model trained(3);
  add_adapters(trained, false);
  io::peft_adapter exported = io::peft_adapter::from_layers(trained.modules(), "tuned");

  // A fused module whose B writes into the frozen k slice.
  io::peft_adapter bad = exported;
  for (auto& m : bad.modules)
    if (m.path == "transformer.h.0.attn.c_attn") m.b(4, 0) = 1.0;
  model fresh(3);
  expect_error<lora::config_error>([&] { io::attach(bad, fresh.modules(), "tuned"); },
                                   {"c_attn", "slice 1", "enable_lora[1] = false"});
  // An embedding module pointed at a linear layer.
  std::vector<std::pair<std::string, io::module_ref<float>>> swapped{{"transformer.wte", &fresh.fc}};
  io::peft_adapter only_wte;
  only_wte.config = exported.config;
  only_wte.modules = {*exported.find("transformer.wte")};
  expect_error<lora::config_error>([&] { io::attach(only_wte, swapped, "tuned"); },
                                   {"an embedding adapter module cannot attach to linear 'fc'"});
  for (const auto& [path, layer] : fresh.modules()) EXPECT_FALSE(layer.has_adapter("tuned")) << path;
}

}  // namespace
