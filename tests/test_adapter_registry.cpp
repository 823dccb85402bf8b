// The adapter registry (io/adapter_registry.hpp): adapters published outside the layers serve routed
// batches exactly as the same adapters held by the layers do (every layer kind, float and double);
// a routing bound to a snapshot keeps its versions whatever is published after; unloaded and replaced
// versions are freed with the last snapshot holding them; refusals (names, shapes, DoRA, merged layers,
// dtypes) change nothing.
#include <lora/io/adapter_registry.hpp>
#include <lora/lora.hpp>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "file_support.hpp"
#include "layer_support.hpp"
#include "support.hpp"

namespace {

using lora::index;
using lora::io::adapter_registry;
using lora::io::peft_adapter;
using lora_test::expect_error;
using lora_test::random_config;
using lora_test::random_matrix;
using lora_test::rel_error;

const std::vector<std::string>& row_names = lora_test::mixed_row_names;
const std::vector<double>& row_scales = lora_test::mixed_row_scales;
using lora_test::add_three;

/// Adapter `name` of `layer` as a PEFT adapter with one module, "m".
template <typename Layer>
peft_adapter exported(Layer& layer, const std::string& name) {
  return peft_adapter::from_layers(std::vector<std::pair<std::string, Layer*>>{{"m", &layer}}, name);
}

/// A registry over `served` (module "m") holding the three adapters of `owner`.
template <typename Layer>
std::unique_ptr<adapter_registry<typename Layer::Scalar>> registry_of(Layer& owner, Layer& served) {
  auto reg = std::make_unique<adapter_registry<typename Layer::Scalar>>(
      std::vector<std::pair<std::string, Layer*>>{{"m", &served}});
  for (const char* n : {"a", "b", "c"}) reg->load(n, exported(owner, n));
  return reg;
}

template <typename Scalar>
class registry_typed : public ::testing::Test {};
TYPED_TEST_SUITE(registry_typed, lora_test::scalar_types);

TYPED_TEST(registry_typed, linear_served_from_the_registry_equals_its_own_adapters) {
  using S = TypeParam;
  lora::rng gen(1);
  const lora::matrix<S> w = random_matrix<S>(gen, 6, 10);
  lora::linear<S> owner(w, "fc"), served(w, "fc");
  add_three(owner);
  auto reg = registry_of(owner, served);
  const lora::matrix<S> x = random_matrix<S>(gen, 9, 10);
  lora::adapter_routing bound(row_names, row_scales);
  reg->bind(bound);
  const lora::matrix<S> expected = owner.infer(x, lora::adapter_routing(row_names, row_scales));
  // The same factors, scalings and products: equal bit for bit.
  EXPECT_TRUE(lora_test::bitwise_equal(served.infer(x, bound), expected));
  EXPECT_FALSE(served.has_adapter("a"));  // nothing was added to the layer
}

TYPED_TEST(registry_typed, merged_linear_embedding_and_conv2d_served_from_the_registry) {
  using S = TypeParam;
  const double tol = 10 * lora_test::tolerance<S>();
  lora::rng gen(2);
  {
    const lora::matrix<S> w = random_matrix<S>(gen, 12, 8);
    lora::merged_linear<S> owner(w, {true, false, true}, "qkv"), served(w, {true, false, true}, "qkv");
    add_three(owner);
    auto reg = registry_of(owner, served);
    const lora::matrix<S> x = random_matrix<S>(gen, 9, 8);
    lora::adapter_routing bound(row_names, row_scales);
    reg->bind(bound);
    EXPECT_LT(rel_error(served.infer(x, bound), owner.infer(x, lora::adapter_routing(row_names, row_scales))), tol);
  }
  {
    const lora::matrix<S> table = random_matrix<S>(gen, 20, 6);
    lora::embedding<S> owner(table, "wte"), served(table, "wte");
    add_three(owner);
    auto reg = registry_of(owner, served);
    const std::vector<index> ids = {3, 19, 3, 0, 7, 7, 12, 5, 3};
    lora::adapter_routing bound(row_names, row_scales);
    reg->bind(bound);
    EXPECT_LT(rel_error(served.infer(ids, bound), owner.infer(ids, lora::adapter_routing(row_names, row_scales))), tol);
  }
  {
    lora::conv2d_options o;
    o.in_channels = 4;
    o.input = {5, 6};
    o.kernel = {3, 2};
    o.padding = {1, 0};
    const lora::matrix<S> w = random_matrix<S>(gen, 6, 4 * 3 * 2);
    lora::conv2d<S> owner(w, o, "conv"), served(w, o, "conv");
    add_three(owner);
    auto reg = registry_of(owner, served);
    const std::vector<std::string> names = {"b", "__base__", "a", "c", "a"};
    const lora::matrix<S> x = random_matrix<S>(gen, 5, 4 * 5 * 6);
    lora::adapter_routing bound(names);
    reg->bind(bound);
    EXPECT_LT(rel_error(served.infer(x, bound), owner.infer(x, lora::adapter_routing(names))), tol);
  }
}

TEST(adapter_registry, a_bound_routing_keeps_its_versions_while_others_are_published) {
  lora::rng gen(3);
  const lora::matrix<double> w = random_matrix<double>(gen, 5, 7);
  lora::linear<double> owner(w, "fc"), served(w, "fc");
  add_three(owner);
  adapter_registry<double> reg(std::vector<std::pair<std::string, lora::linear<double>*>>{{"m", &served}});
  EXPECT_EQ(reg.current()->generation(), 0U);
  EXPECT_EQ(reg.load("x", exported(owner, "a")), 1U);
  const lora::matrix<double> x = random_matrix<double>(gen, 4, 7);
  const std::vector<std::string> names = {"x", "x", "", "x"};
  lora::adapter_routing before(names);
  const auto snap = reg.bind(before);
  const lora::matrix<double> y_a = served.infer(x, before);

  EXPECT_EQ(reg.replace("x", exported(owner, "b")), 2U);  // a new version of x, of another rank
  EXPECT_EQ(reg.current()->generation(), 2U);
  EXPECT_EQ(snap->find("x")->version(), 1U);
  EXPECT_EQ(reg.current()->find("x")->version(), 2U);
  EXPECT_TRUE(lora_test::bitwise_equal(served.infer(x, before), y_a));  // still version 1
  lora::adapter_routing after(names);
  reg.bind(after);
  EXPECT_TRUE(
      lora_test::bitwise_equal(served.infer(x, after), owner.infer(x, lora::adapter_routing({"b", "b", "", "b"}))));

  reg.unload("x");
  EXPECT_FALSE(reg.contains("x"));
  EXPECT_TRUE(
      lora_test::bitwise_equal(served.infer(x, after), owner.infer(x, lora::adapter_routing({"b", "b", "", "b"}))));
  lora::adapter_routing gone(names);
  expect_error<lora::name_error>([&] { reg.bind(gone); }, {"adapter 'x' is not published", "published: none"});
  // A model-wide routing may name what is not published: those rows run the base.
  lora::adapter_routing lenient(names, {}, lora::missing_adapter::base);
  reg.bind(lenient);
  EXPECT_TRUE(lora_test::bitwise_equal(served.infer(x, lenient), served.infer(x)));
}

TEST(adapter_registry, unloaded_and_replaced_versions_are_freed_with_the_last_snapshot_holding_them) {
  lora::rng gen(4);
  const lora::matrix<double> w = random_matrix<double>(gen, 5, 7);
  lora::linear<double> owner(w, "fc"), served(w, "fc");
  add_three(owner);
  adapter_registry<double> reg(std::vector<std::pair<std::string, lora::linear<double>*>>{{"m", &served}});
  reg.load("x", exported(owner, "a"));
  reg.load("y", exported(owner, "c"));
  std::weak_ptr<const lora::io::adapter_version<double>> v1 = reg.current()->version("x");
  {
    lora::adapter_routing r({"x", "y"});
    reg.bind(r);  // r shares the snapshot holding version 1 of x
    reg.replace("x", exported(owner, "b"));
    EXPECT_FALSE(v1.expired());
    std::weak_ptr<const lora::io::adapter_version<double>> v2 = reg.current()->version("x");
    reg.unload("x");
    EXPECT_TRUE(v2.expired());  // no routing was bound to the snapshot that held it
    EXPECT_FALSE(v1.expired());
  }
  EXPECT_TRUE(v1.expired());
  EXPECT_EQ(reg.names(), (std::vector<std::string>{"y"}));
  EXPECT_EQ(reg.current()->find("y")->parameter_count(), 8 * (7 + 5));
}

TEST(adapter_registry, an_adapter_covers_some_modules_and_the_other_layers_run_the_base) {
  lora::rng gen(5);
  const lora::matrix<double> w1 = random_matrix<double>(gen, 6, 5), w2 = random_matrix<double>(gen, 4, 6);
  lora::linear<double> o1(w1, "l1"), o2(w2, "l2"), s1(w1, "l1"), s2(w2, "l2");
  o2.add_adapter("a", random_config(3, 3.0, 9));
  o1.add_adapter("other", random_config(2, 2.0, 8));
  adapter_registry<double> reg(std::vector<std::pair<std::string, lora::linear<double>*>>{{"l1", &s1}, {"l2", &s2}});
  reg.load("a",
           peft_adapter::from_layers(std::vector<std::pair<std::string, lora::linear<double>*>>{{"l2", &o2}}, "a"));
  EXPECT_EQ(reg.current()->find("a")->num_parts(), 1U);
  const lora::matrix<double> x = random_matrix<double>(gen, 3, 5);
  lora::adapter_routing r({"a", "", "a"});
  reg.bind(r);
  const lora::matrix<double> h = s1.infer(x, r);
  EXPECT_TRUE(lora_test::bitwise_equal(h, s1.infer(x)));
  EXPECT_TRUE(lora_test::bitwise_equal(s2.infer(h, r), o2.infer(h, lora::adapter_routing({"a", "", "a"}))));
}

TEST(adapter_registry, refusals_change_nothing_and_name_what_was_expected) {
  lora::rng gen(6);
  const lora::matrix<double> w = random_matrix<double>(gen, 5, 7);
  lora::linear<double> owner(w, "fc"), served(w, "fc"), wrong(random_matrix<double>(gen, 5, 6), "fc");
  add_three(owner);
  lora::adapter_config dora = random_config(2, 2.0, 5);
  dora.use_dora = true;
  owner.add_adapter("d", dora);
  adapter_registry<double> reg(std::vector<std::pair<std::string, lora::linear<double>*>>{{"m", &served}});
  reg.load("x", exported(owner, "a"));
  expect_error<lora::name_error>([&] { reg.load("x", exported(owner, "b")); }, {"'x' is published already", "'x'"});
  expect_error<lora::name_error>([&] { reg.replace("nope", exported(owner, "b")); },
                                 {"'nope' is not published", "'x'"});
  expect_error<lora::name_error>([&] { reg.unload("nope"); }, {"'nope' is not published"});
  expect_error<lora::name_error>([&] { reg.load(lora::base_adapter, exported(owner, "b")); }, {"names the base model"});
  expect_error<lora::config_error>([&] { reg.load("d", exported(owner, "d")); }, {"DoRA", "cannot be served"});
  // An adapter for a layer of other shape: checked against the layers, nothing published.
  lora::adapter_config c6 = random_config(2, 2.0, 4);
  wrong.add_adapter("w", c6);
  expect_error<lora::shape_error>([&] { reg.load("w", exported(wrong, "w")); }, {"in x out = 6x5", "7x5"});
  expect_error<lora::name_error>(
      [&] {
        reg.load("q", peft_adapter::from_layers(
                          std::vector<std::pair<std::string, lora::linear<double>*>>{{"zz", &wrong}}, "w"));
      },
      {"no layer for adapter module 'zz'"});
  EXPECT_EQ(reg.names(), (std::vector<std::string>{"x"}));
  EXPECT_EQ(reg.current()->generation(), 1U);

  // A routing bound to the registry cannot run while the layer holds a merged adapter of its own.
  served.add_adapter("own", random_config(2, 2.0, 7));
  served.merge({"own"});
  lora::adapter_routing r({"x"});
  reg.bind(r);
  expect_error<lora::state_error>([&] { served.infer(random_matrix<double>(gen, 1, 7), r); }, {"merged ('own')"});
  served.unmerge();
  EXPECT_NO_THROW(served.infer(random_matrix<double>(gen, 1, 7), r));

  // Factors of one Scalar served to a layer of another: dtype_error, not garbage.
  lora::linear<float> other(random_matrix<float>(gen, 5, 7), "fc");
  expect_error<lora::dtype_error>([&] { other.infer(random_matrix<float>(gen, 1, 7), r); }, {"adapter_source"});
  // A source made for other groups cannot be bound.
  lora::adapter_routing two({"x", "y"}, {}, lora::missing_adapter::base);
  reg.bind(two);
  lora::adapter_routing one({"x"});
  expect_error<lora::shape_error>([&] { one.bind(two.shared_source()); }, {"made for 2 adapter groups", "has 1"});
}

TEST(adapter_registry, loads_peft_directories) {
  lora::rng gen(7);
  const lora::matrix<float> w = random_matrix<float>(gen, 5, 7);
  lora::linear<float> owner(w, "fc"), served(w, "fc");
  add_three(owner);
  lora_test::temp_dir dir;
  exported(owner, "c").save(dir.path() + "/c");
  adapter_registry<float> reg(std::vector<std::pair<std::string, lora::linear<float>*>>{{"m", &served}});
  reg.load_dir("c", dir.path() + "/c");
  const lora::matrix<float> x = random_matrix<float>(gen, 2, 7);
  lora::adapter_routing r({"c", "c"});
  reg.bind(r);
  EXPECT_TRUE(lora_test::bitwise_equal(served.infer(x, r), owner.infer(x, lora::adapter_routing({"c", "c"}))));
  expect_error<lora::io_error>([&] { reg.load_dir("e", dir.path() + "/missing"); }, {"missing"});
}

}  // namespace
