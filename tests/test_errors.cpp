// Every mistake a user can make with a layer raises a lora::error subclass naming the layer, the
// expected and the actual value.
#include <lora/lora.hpp>

#include "support.hpp"

namespace {

using lora_test::expect_error;
using mat = lora::matrix<double>;

lora::linear<double> make_layer() {
  lora::linear<double> layer(mat::Ones(3, 4), "fc1");
  layer.add_adapter("default");
  return layer;
}

TEST(errors, hierarchy_derives_from_std_exceptions) {
  try {
    throw lora::shape_error("x");
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "[lora.shape_error] x");
  }
  const lora::format_error f("y");
  EXPECT_EQ(f.kind(), "format_error");
  const lora::error& base = f;
  EXPECT_NE(std::string(base.what()).find("y"), std::string::npos);
}

TEST(errors, input_shape_mismatch_names_layer_and_shapes) {
  auto layer = make_layer();
  expect_error<lora::shape_error>([&] { layer.forward(mat::Ones(2, 5)); }, {"fc1", "in_features = 4", "2x5"});
  expect_error<lora::shape_error>([&] { layer.infer(mat::Ones(2, 3)); }, {"fc1", "2x3"});
  mat y(2, 2);
  lora::inference_workspace<double> ws;
  expect_error<lora::shape_error>([&] { layer.infer(mat::Ones(2, 4), y, ws); }, {"output Y", "2x3", "2x2"});
  expect_error<lora::shape_error>([&] { layer.forward(mat::Ones(2, 4), y); }, {"output Y"});
}

TEST(errors, grad_shape_mismatch) {
  auto layer = make_layer();
  layer.forward(mat::Ones(2, 4));
  expect_error<lora::shape_error>([&] { layer.backward(mat::Ones(3, 3)); }, {"fc1", "dY", "2x3", "3x3"});
  layer.forward(mat::Ones(2, 4));
  mat dx(2, 5);
  expect_error<lora::shape_error>([&] { layer.backward(mat::Ones(2, 3), dx); }, {"dX", "2x4", "2x5"});
}

TEST(errors, bad_weight_and_bias) {
  expect_error<lora::shape_error>([] { lora::linear<double> l(mat(0, 3), "empty"); }, {"empty", "non-empty", "0x3"});
  expect_error<lora::shape_error>([] { lora::linear<double> l(mat::Ones(3, 4), lora::vector<double>::Ones(4), "fc"); },
                                  {"fc", "bias", "length out_features = 3", "4x1"});
}

TEST(errors, invalid_configs) {
  auto layer = make_layer();
  lora::adapter_config c;
  c.rank = 0;
  expect_error<lora::config_error>([&] { layer.add_adapter("r0", c); }, {"fc1", "r0", "rank must be >= 1", "got 0"});
  c = {};
  c.alpha = 0;
  expect_error<lora::config_error>([&] { layer.add_adapter("a0", c); }, {"alpha", "got 0"});
  c.alpha = -1;
  expect_error<lora::config_error>([&] { layer.add_adapter("a1", c); }, {"alpha", "got -1"});
  c = {};
  c.dropout = 1.0;
  expect_error<lora::config_error>([&] { layer.add_adapter("d", c); }, {"dropout", "[0, 1)", "got 1"});
  expect_error<lora::config_error>([&] { layer.adapter("default").set_dropout(-0.5); }, {"dropout"});
  EXPECT_EQ(layer.adapter_names(), std::vector<std::string>{"default"});  // nothing half-added
}

TEST(errors, unknown_and_duplicate_names) {
  auto layer = make_layer();
  expect_error<lora::name_error>([&] { layer.add_adapter("default"); }, {"fc1", "'default'", "already exists"});
  expect_error<lora::name_error>([&] { layer.add_adapter(""); }, {"non-empty"});
  expect_error<lora::name_error>([&] { layer.adapter("nope"); }, {"fc1", "'nope'", "adapters: 'default'"});
  expect_error<lora::name_error>([&] { layer.set_active({"nope"}); }, {"'nope'"});
  expect_error<lora::name_error>([&] { layer.set_active({"default", "default"}); }, {"twice"});
  expect_error<lora::name_error>([&] { layer.remove_adapter("nope"); }, {"'nope'"});
  expect_error<lora::name_error>([&] { layer.merge({"nope"}); }, {"'nope'"});
  expect_error<lora::name_error>([&] { layer.merge({"default", "default"}); }, {"twice"});
  EXPECT_FALSE(layer.merged());
}

TEST(errors, backward_without_forward) {
  auto layer = make_layer();
  expect_error<lora::state_error>([&] { layer.backward(mat::Ones(2, 3)); }, {"fc1", "preceding training forward"});
  layer.forward(mat::Ones(2, 4));
  layer.backward(mat::Ones(2, 3));
  expect_error<lora::state_error>([&] { layer.backward(mat::Ones(2, 3)); }, {"one backward"});
  layer.forward(mat::Ones(2, 4));
  layer.add_adapter("other");
  expect_error<lora::state_error>([&] { layer.backward_params_only(mat::Ones(2, 3)); }, {"discards"});
}

TEST(errors, training_a_merged_adapter) {
  auto layer = make_layer();
  layer.forward(mat::Ones(2, 4));
  layer.merge();
  expect_error<lora::state_error>([&] { layer.backward(mat::Ones(2, 3)); }, {"preceding training forward"});
  expect_error<lora::state_error>([&] { layer.parameters("default"); }, {"fc1", "'default'", "merged", "unmerge"});
  EXPECT_TRUE(layer.parameters().empty());  // merged adapters are not offered to optimizers
  layer.unmerge();
  EXPECT_EQ(layer.parameters().size(), 2u);
}

}  // namespace
