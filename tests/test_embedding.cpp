// lora::embedding: lookups against a dense reference, PEFT's init, gradients against finite differences,
// the sparse dA (only the columns of the ids used), errors on out-of-range ids, exact merge/unmerge.
#include <lora/embedding.hpp>

#include "layer_support.hpp"
#include "support.hpp"

namespace {

using lora::index;
using lora_test::bitwise_equal;
using lora_test::expect_error;
using lora_test::random_matrix;
using ids_t = std::vector<index>;

lora::adapter_config config(index rank, double alpha, std::uint64_t seed,
                            lora::init_method init = lora::init_method::random_ab) {
  lora::adapter_config c = lora_test::random_config(rank, alpha, seed);
  c.init = init;
  return c;
}

/// E[ids] + Σ s (A[:, ids])ᵀ Bᵀ in double, through one-hot rows: an independent formula.
template <typename Scalar>
lora::matrix<double> reference(const lora::embedding<Scalar>& emb, const lora::matrix<Scalar>& table, const ids_t& ids,
                               const std::vector<std::string>& active) {
  lora::matrix<double> onehot = lora::matrix<double>::Zero(static_cast<index>(ids.size()), table.rows());
  for (std::size_t k = 0; k < ids.size(); ++k) onehot(static_cast<index>(k), ids[k]) = 1.0;
  lora::matrix<double> y = onehot * table.template cast<double>();
  for (const auto& n : active) {
    const auto& a = emb.adapter(n);
    y += double(a.scaling()) * onehot * a.a().template cast<double>().transpose() *
         a.b().template cast<double>().transpose();
  }
  return y;
}

template <typename Scalar>
class embedding_typed : public ::testing::Test {};
TYPED_TEST_SUITE(embedding_typed, lora_test::scalar_types);

TYPED_TEST(embedding_typed, peft_init_starts_at_the_base_table) {
  using S = TypeParam;
  lora::rng gen(1);
  const auto table = random_matrix<S>(gen, 11, 6);
  lora::embedding<S> emb(table, "wte");
  auto& a = emb.add_adapter("default", config(4, 8.0, 3, lora::init_method::peft_default));
  EXPECT_EQ(a.a().rows(), 4);
  EXPECT_EQ(a.a().cols(), 11);  // r x num_embeddings
  EXPECT_EQ(a.b().rows(), 6);   // embedding_dim x r
  EXPECT_TRUE(a.a().isZero(0));
  EXPECT_GT(a.b().cwiseAbs().maxCoeff(), S(0.5));  // N(0, 1), not the linear layer's zero B
  const ids_t ids{3, 0, 10, 3};
  const auto y = emb.forward(ids);
  for (std::size_t k = 0; k < ids.size(); ++k)
    EXPECT_TRUE(bitwise_equal(lora::matrix<S>(y.row(static_cast<index>(k))), lora::matrix<S>(table.row(ids[k]))));
}

TYPED_TEST(embedding_typed, forward_and_infer_match_a_one_hot_reference_on_every_storage) {
  using S = TypeParam;
  lora::rng gen(2);
  const lora::matrix<S> table = random_matrix<S>(gen, 13, 5);
  lora::matrix<S> cm = table;
  Eigen::Matrix<S, -1, -1, Eigen::RowMajor> rm = table;
  std::vector<lora::embedding<S>> layers;
  layers.emplace_back(table, "owned");
  layers.emplace_back(lora::view, cm, "col-major view");
  layers.emplace_back(lora::view, rm, "row-major view");
  const ids_t ids{12, 0, 5, 5, 7, 1};
  for (auto& emb : layers) {
    emb.add_adapter("a", config(3, 6.0, 1));
    emb.add_adapter("b", config(2, 1.0, 2));
    emb.set_active({"a", "b"});
    const auto expected = reference(emb, table, ids, {"a", "b"});
    EXPECT_LT(lora_test::rel_error(emb.forward(ids), expected), 10 * lora_test::tolerance<S>()) << emb.name();
    EXPECT_LT(lora_test::rel_error(emb.infer(ids), expected), 10 * lora_test::tolerance<S>()) << emb.name();
    emb.disable_adapters();
    EXPECT_LT(lora_test::rel_error(emb.infer(ids), reference(emb, table, ids, {})), lora_test::tolerance<S>());
    emb.enable_adapters();
  }
}

TYPED_TEST(embedding_typed, merge_equals_unmerged_and_unmerge_is_bit_exact) {
  using S = TypeParam;
  lora::rng gen(3);
  const lora::matrix<S> table = random_matrix<S>(gen, 17, 9);
  Eigen::Matrix<S, -1, -1, Eigen::RowMajor> rm = table;
  lora::embedding<S> emb(lora::view, rm, "wte");
  emb.add_adapter("a", config(3, 6.0, 1));
  emb.add_adapter("b", config(2, 2.0, 2));
  emb.set_active({"a", "b"});
  const ids_t ids{16, 2, 2, 9, 0};
  const auto y = emb.infer(ids);
  emb.merge();
  EXPECT_TRUE(emb.merged());
  EXPECT_LT(lora_test::rel_error(emb.infer(ids), y), 10 * lora_test::tolerance<S>());
  EXPECT_LT(lora_test::rel_error(emb.forward(ids), y), 10 * lora_test::tolerance<S>());
  // The merge wrote E + s (B A)ᵀ into the user's row-major memory.
  lora::matrix<double> expected = table.template cast<double>();
  for (const auto& n : {"a", "b"}) {
    const auto& a = emb.adapter(n);
    expected += double(a.scaling()) * (a.b().template cast<double>() * a.a().template cast<double>()).transpose();
  }
  EXPECT_LT(lora_test::rel_error(lora::matrix<S>(rm), expected), 10 * lora_test::tolerance<S>());
  emb.unmerge();
  EXPECT_TRUE(bitwise_equal(lora::matrix<S>(rm), table));
  for (int cycle = 0; cycle < 200; ++cycle) {
    emb.merge({cycle % 2 ? "a" : "b"});
    emb.merge();
    emb.unmerge();
  }
  EXPECT_TRUE(bitwise_equal(lora::matrix<S>(rm), table));
  EXPECT_TRUE(bitwise_equal(emb.table(), table));
}

// Loss L = Σ (Y ⊙ G), so dL/dY = G; repeated ids accumulate into one column of dA.
TEST(embedding, gradients_match_finite_differences) {
  lora::rng gen(4);
  const lora::matrix<double> table = random_matrix<double>(gen, 10, 4);
  lora::embedding<double> emb(table, "wte");
  emb.add_adapter("a", config(3, 6.0, 1));
  emb.add_adapter("b", config(2, 1.0, 2));
  emb.set_active({"a", "b"});
  const ids_t ids{7, 1, 7, 4, 0, 7};
  const lora::matrix<double> g = random_matrix<double>(gen, 6, 4);
  auto loss = [&] { return emb.infer(ids).cwiseProduct(g).sum(); };
  emb.forward(ids);
  emb.backward(g);
  for (const auto& n : {"a", "b"}) {
    auto& a = emb.adapter(n);
    const lora::matrix<double> da = a.grad_a(), db = a.grad_b();
    EXPECT_LT(lora_test::rel_error(da, lora_test::numeric_gradient(a.a(), loss)), 1e-8) << n;
    EXPECT_LT(lora_test::rel_error(db, lora_test::numeric_gradient(a.b(), loss)), 1e-8) << n;
    EXPECT_GT(da.norm(), 0.0);
  }
}

TEST(embedding, sparse_gradient_touches_only_the_ids_used) {
  lora::rng gen(5);
  lora::embedding<double> emb(random_matrix<double>(gen, 50, 8), "wte");
  auto& a = emb.add_adapter("default", config(4, 8.0, 1));
  const ids_t ids{42, 3, 42, 17};
  emb.forward(ids);
  emb.backward(random_matrix<double>(gen, 4, 8));
  EXPECT_EQ(emb.touched_ids("default"), (ids_t{42, 3, 17}));
  for (index id = 0; id < 50; ++id) {
    const bool used = id == 42 || id == 3 || id == 17;
    EXPECT_EQ(a.grad_a().col(id).isZero(0), !used) << id;
  }
  // A second step accumulates; a new id joins the list once.
  emb.forward({3, 5});
  emb.backward(random_matrix<double>(gen, 2, 8));
  EXPECT_EQ(emb.touched_ids("default"), (ids_t{42, 3, 17, 5}));
  emb.zero_grad();
  EXPECT_TRUE(a.grad_a().isZero(0));
  EXPECT_TRUE(a.grad_b().isZero(0));
  EXPECT_TRUE(emb.touched_ids("default").empty());
  emb.forward({9});
  emb.backward(random_matrix<double>(gen, 1, 8));
  EXPECT_EQ(emb.touched_ids("default"), (ids_t{9}));
}

TEST(embedding, out_of_range_ids_name_the_id_position_and_vocabulary) {
  lora::embedding<double> emb(lora::matrix<double>::Ones(5, 3), "wte");
  emb.add_adapter("default");
  expect_error<lora::shape_error>(
      [&] {
        emb.forward({0, 4, 5});
      },
      {"embedding 'wte'", "id 5", "position 2", "num_embeddings = 5"});
  expect_error<lora::shape_error>([&] { emb.infer({-1}); }, {"id -1", "position 0"});
  lora::matrix<double> y(2, 4);
  lora::inference_workspace<double> ws;
  expect_error<lora::shape_error>([&] { emb.infer({1, 2}, y, ws); }, {"output Y", "2x3", "2x4"});
  expect_error<lora::state_error>([&] { emb.backward(lora::matrix<double>::Ones(1, 3)); }, {"wte", "forward"});
  emb.forward({1, 2});
  expect_error<lora::shape_error>([&] { emb.backward(lora::matrix<double>::Ones(3, 3)); }, {"dY", "2x3", "3x3"});
  expect_error<lora::name_error>([&] { emb.touched_ids("nope"); }, {"nope"});
  lora::adapter_config dora;
  dora.use_dora = true;
  expect_error<lora::config_error>([&] { emb.add_adapter("dora", dora); }, {"wte", "'dora'", "use_dora"});
  EXPECT_FALSE(emb.has_adapter("dora"));
}

TEST(embedding, parameters_use_peft_keys_and_report_counts) {
  lora::embedding<double> emb(lora::matrix<double>::Ones(20, 6), "wte");
  emb.add_adapter("a", config(2, 2.0, 1));
  emb.add_adapter("b", config(3, 3.0, 2));
  emb.set_active({"a", "b"});
  auto ps = emb.parameters();
  ASSERT_EQ(ps.size(), 4u);
  EXPECT_EQ(ps[0].name, "wte.lora_embedding_A.a");
  EXPECT_EQ(ps[0].role, lora::param_role::lora_a);
  EXPECT_EQ(ps[0].rows, 2);
  EXPECT_EQ(ps[0].cols, 20);
  EXPECT_EQ(ps[1].name, "wte.lora_embedding_B.a");
  EXPECT_EQ(ps[1].rows, 6);
  EXPECT_EQ(ps[1].cols, 2);
  const auto r = emb.report();
  EXPECT_EQ(r.frozen_params, 20 * 6);
  EXPECT_EQ(r.trainable_params, (2 + 3) * (20 + 6));
  emb.merge({"a"});
  EXPECT_EQ(emb.parameters().size(), 2u);
  expect_error<lora::state_error>([&] { emb.parameters("a"); }, {"merged"});
  const auto table = emb.merge_and_unload();
  EXPECT_EQ(table.rows(), 20);
  EXPECT_TRUE(emb.adapter_names().empty());
}

}  // namespace
