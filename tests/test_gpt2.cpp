// The GPT-2 model (lora/models/gpt2.hpp): every gradient — adapters, and every base tensor under full and
// norms-and-head training — against central finite differences in double on a tiny config; the KV-cached
// inference equal to the one-shot forward and to the training loss; merge = unmerged; the error paths.
#include <gtest/gtest.h>

#include <cmath>
#include <lora/models/gpt2.hpp>
#include <lora/optim/adam.hpp>
#include <string>
#include <vector>

namespace {

using lora::index;
using lora::models::gpt2;
using lora::models::gpt2_base_training;
using lora::models::gpt2_config;
using lora::models::gpt2_module;
using lora::models::gpt2_weights;
using tokens = std::vector<std::int32_t>;

const gpt2_config k_tiny{2, 2, 8, 6, 11, 1e-5};

/// Random weights with non-trivial LayerNorm gains and biases (GPT-2's init leaves them at 1 and 0).
template <typename Scalar>
gpt2_weights<Scalar> tiny_weights(std::uint64_t seed = 7) {
  auto w = gpt2_weights<Scalar>::random(k_tiny, seed);
  lora::rng gen(seed + 100);
  for (index id = 0; id < w.num_tensors(); ++id) {
    auto x = w.flat(id);
    if (w.spec(id).is_vector())
      for (index i = 0; i < x.size(); ++i) x[i] += static_cast<Scalar>(0.3 * gen.normal());
    else
      x *= Scalar(10);  // larger than GPT-2's 0.02 so attention is far from uniform
  }
  return w;
}

struct batch_data {
  tokens in, target;
  index batch = 2, seq = 5;
};

batch_data tiny_batch() {
  batch_data b;
  b.in = {1, 4, 2, 9, 0, 3, 3, 7, 10, 5};
  b.target = {4, 2, 9, 0, 6, 3, -1, 10, 5, 8};  // one position not predicted
  return b;
}

/// Gives every adapter random non-zero factors so that both A's and B's gradients are exercised.
void randomise_adapters(gpt2<double>& model, const std::string& name, std::uint64_t seed) {
  lora::rng gen(seed);
  for (auto& [path, layer] : model.named_layers()) {
    if (!layer->has_adapter(name)) continue;
    auto& a = layer->adapter(name);
    lora::matrix<double> am(a.a().rows(), a.a().cols()), bm(a.b().rows(), a.b().cols());
    for (index i = 0; i < am.size(); ++i) am.data()[i] = 0.5 * gen.normal();
    for (index i = 0; i < bm.size(); ++i) bm.data()[i] = 0.5 * gen.normal();
    layer->set_factors(name, am, bm);
  }
}

/// Checks every parameter's gradient against central differences (all elements of small tensors, a
/// spread of 7 elsewhere).
void expect_gradients_match(gpt2<double>& model, const batch_data& b) {
  model.zero_grad();
  model.forward_backward(b.in, b.target, b.batch, b.seq);
  const auto params = model.parameters();
  ASSERT_FALSE(params.empty());
  std::vector<lora::vector<double>> analytic;
  for (const auto& p : params) analytic.emplace_back(p.grad());
  const double h = 1e-6;
  for (std::size_t k = 0; k < params.size(); ++k) {
    const auto& p = params[k];
    const index step = std::max<index>(1, p.size() / 7);
    for (index i = 0; i < p.size(); i += step) {
      const double saved = p.value_data[i];
      p.value_data[i] = saved + h;
      const double up = model.forward_backward(b.in, b.target, b.batch, b.seq);
      p.value_data[i] = saved - h;
      const double down = model.forward_backward(b.in, b.target, b.batch, b.seq);
      p.value_data[i] = saved;
      const double numeric = (up - down) / (2 * h);
      EXPECT_NEAR(analytic[k][i], numeric, 1e-6 * std::max(1.0, std::abs(numeric))) << p.name << "[" << i << "]";
    }
  }
}

TEST(Gpt2, AdapterGradientsMatchFiniteDifferences) {
  gpt2<double> model(tiny_weights<double>());
  model.add_adapter("a", {2, 4.0}, {"c_attn", "c_proj", "c_fc"});
  EXPECT_EQ(model.parameters().size(), 2u * 4 * 2);  // c_proj matches attn.c_proj and mlp.c_proj
  randomise_adapters(model, "a", 3);
  expect_gradients_match(model, tiny_batch());
}

TEST(Gpt2, FullFineTuningGradientsMatchFiniteDifferences) {
  gpt2<double> model(tiny_weights<double>());
  model.set_base_training(gpt2_base_training::full);
  EXPECT_EQ(model.parameters().size(), static_cast<std::size_t>(model.weights().num_tensors()));
  expect_gradients_match(model, tiny_batch());
}

TEST(Gpt2, NormsAndHeadGradientsMatchFiniteDifferences) {
  gpt2<double> model(tiny_weights<double>());
  model.set_base_training(gpt2_base_training::norms_and_head);
  const auto params = model.parameters();
  ASSERT_EQ(params.size(), 1u + 4 * 2 + 2);  // wte, four LayerNorm tensors per block, ln_f
  EXPECT_EQ(params[0].name, "transformer.wte.weight");
  for (std::size_t i = 1; i < params.size(); ++i) EXPECT_NE(params[i].name.find("ln_"), std::string::npos);
  expect_gradients_match(model, tiny_batch());
}

TEST(Gpt2, AdaptersAndBaseTogetherAndLossScale) {
  gpt2<double> model(tiny_weights<double>());
  model.add_adapter("a", {1, 2.0}, {"mlp.c_proj", "transformer.h.0.attn.c_attn"});
  randomise_adapters(model, "a", 5);
  model.set_base_training(gpt2_base_training::norms_and_head);
  expect_gradients_match(model, tiny_batch());
  // The gradient of loss_scale · loss is loss_scale times the gradient.
  const auto b = tiny_batch();
  model.zero_grad();
  model.forward_backward(b.in, b.target, b.batch, b.seq);
  const lora::vector<double> g1 = model.parameters()[0].grad();
  model.zero_grad();
  model.forward_backward(b.in, b.target, b.batch, b.seq, 0.25);
  EXPECT_LT((model.parameters()[0].grad() - 0.25 * g1).norm(), 1e-14 * (1 + g1.norm()));
}

TEST(Gpt2, KvCacheEqualsOneShotForwardAndTrainingLoss) {
  gpt2<double> model(tiny_weights<double>());
  model.add_adapter("a", {2, 4.0}, {"c_attn", "c_proj", "c_fc"});
  randomise_adapters(model, "a", 9);
  const tokens seq = {3, 1, 4, 1, 5, 9};
  auto cache = model.make_cache();
  lora::matrix<double> all, step;
  model.infer(seq, cache, &all);
  ASSERT_EQ(all.rows(), k_tiny.vocab_size);
  ASSERT_EQ(all.cols(), 6);
  cache.clear();
  model.infer({3, 1}, cache, &step);  // a prompt of two, then one token at a time
  EXPECT_LT((step - all.leftCols(2)).cwiseAbs().maxCoeff(), 1e-12);
  for (index t = 2; t < 6; ++t) {
    model.infer({seq[static_cast<std::size_t>(t)]}, cache, &step);
    EXPECT_LT((step.col(0) - all.col(t)).cwiseAbs().maxCoeff(), 1e-12) << "position " << t;
  }
  EXPECT_THROW(model.infer({1}, cache, &step), lora::shape_error);  // past n_positions
  // nll over the window equals the training loss (mean over the 5 predictions) times 5.
  const tokens in(seq.begin(), seq.end() - 1), target(seq.begin() + 1, seq.end());
  model.train(false);
  const double loss = model.forward_backward(in, target, 1, 5);
  EXPECT_NEAR(model.nll(seq, cache), 5 * loss, 1e-11);
}

TEST(Gpt2, MergedEqualsUnmergedAndUnmergeRestoresWeightsBitForBit) {
  gpt2<double> model(tiny_weights<double>());
  model.add_adapter("a", {2, 4.0}, {"c_attn", "c_proj", "c_fc"});
  randomise_adapters(model, "a", 11);
  const tokens seq = {1, 2, 3, 4, 5, 6};
  auto cache = model.make_cache();
  lora::matrix<double> before, merged, after;
  model.infer(seq, cache, &before);
  std::vector<lora::vector<double>> saved;
  for (index id = 0; id < model.weights().num_tensors(); ++id) saved.emplace_back(model.weights().flat(id));
  model.merge();
  cache.clear();
  model.infer(seq, cache, &merged);
  EXPECT_LT((merged - before).cwiseAbs().maxCoeff(), 1e-10);
  model.unmerge();
  for (index id = 0; id < model.weights().num_tensors(); ++id)
    EXPECT_TRUE((model.weights().flat(id).array() == saved[static_cast<std::size_t>(id)].array()).all())
        << model.weights().spec(id).name;
}

TEST(Gpt2, FloatAgreesWithDoubleAndAdamWLowersTheLoss) {
  const auto b = tiny_batch();
  gpt2<float> fresh(gpt2_weights<float>::random(k_tiny, 1));
  EXPECT_NEAR(fresh.forward_backward(b.in, b.target, b.batch, b.seq), std::log(11.0), 0.05);  // logits near 0
  gpt2<float> model(tiny_weights<float>());
  gpt2<double> reference(tiny_weights<double>());
  const double l0 = model.forward_backward(b.in, b.target, b.batch, b.seq);
  EXPECT_NEAR(l0, reference.forward_backward(b.in, b.target, b.batch, b.seq), 1e-4);
  model.add_adapter("a", {4, 8.0}, {"c_attn", "c_proj", "c_fc"});
  lora::optim::adamw_options o;
  o.lr = 2e-2;
  lora::optim::adamw<float> opt(model.parameters(), o);
  double last = l0;
  for (int step = 0; step < 60; ++step) {
    opt.zero_grad();
    last = model.forward_backward(b.in, b.target, b.batch, b.seq);
    opt.step();
  }
  EXPECT_LT(last, 0.7 * l0);  // 2.55 -> 1.43 nats here
}

TEST(Gpt2, BadInputIsRefusedWithClearErrors) {
  gpt2<double> model(tiny_weights<double>());
  const auto b = tiny_batch();
  EXPECT_THROW(model.forward_backward(b.in, b.target, 2, 4), lora::shape_error);   // sizes disagree
  EXPECT_THROW(model.forward_backward(b.in, b.target, 1, 10), lora::shape_error);  // seq > n_positions
  tokens bad = b.in;
  bad[3] = 11;
  try {
    model.forward_backward(bad, b.target, b.batch, b.seq);
    FAIL() << "no throw";
  } catch (const lora::shape_error& e) {
    EXPECT_NE(std::string(e.what()).find("got 11 at position 3"), std::string::npos) << e.what();
  }
  tokens bad_target = b.target;
  bad_target[0] = -2;
  EXPECT_THROW(model.forward_backward(b.in, bad_target, b.batch, b.seq), lora::shape_error);
  EXPECT_THROW(model.add_adapter("a", {}, {"q_proj"}), lora::name_error);
  EXPECT_THROW(model.add_adapter("a", {}, {"wte"}), lora::name_error);
  EXPECT_THROW(model.add_adapter("a", {0, 1.0}, {"c_fc"}), lora::config_error);
  for (auto& [path, layer] : model.named_layers()) EXPECT_FALSE(layer->has_adapter("a")) << path;
  EXPECT_THROW(model.layer(2, gpt2_module::c_fc), lora::shape_error);
  auto cache = model.make_cache();
  EXPECT_THROW(model.infer({}, cache, nullptr), lora::shape_error);
  EXPECT_THROW(gpt2_config({2, 3, 8, 6, 11, 1e-5}).validate(), lora::config_error);  // 8 % 3 != 0
}

/// L = Σ out ⊙ R for attention over qkv (naive: one head, one sequence at a time, full T x T scores).
double naive_attention_loss(const lora::matrix<double>& qkv, const lora::matrix<double>& r, index batch, index seq,
                            index heads) {
  const index d = qkv.cols() / 3, hd = d / heads;
  double loss = 0;
  for (index b = 0; b < batch; ++b)
    for (index h = 0; h < heads; ++h) {
      const lora::matrix<double> q = qkv.block(b * seq, h * hd, seq, hd), k = qkv.block(b * seq, d + h * hd, seq, hd),
                                 v = qkv.block(b * seq, 2 * d + h * hd, seq, hd);
      lora::matrix<double> s = q * k.transpose() / std::sqrt(double(hd));
      for (index i = 0; i < seq; ++i) {
        const double m = s.row(i).head(i + 1).maxCoeff();
        double z = 0;
        for (index j = 0; j <= i; ++j) z += std::exp(s(i, j) - m);
        for (index j = 0; j < seq; ++j) s(i, j) = j <= i ? std::exp(s(i, j) - m) / z : 0.0;
      }
      loss += ((s * v).array() * r.block(b * seq, h * hd, seq, hd).array()).sum();
    }
  return loss;
}

TEST(Gpt2, AttentionAcrossCausalBlocksMatchesNaiveAndFiniteDifferences) {
  const index batch = 2, seq = 150, heads = 2, d = 8;  // 150 rows: three blocks of 64, the last partial
  lora::rng gen(4);
  lora::matrix<double> qkv(batch * seq, 3 * d), r(batch * seq, d);
  for (index i = 0; i < qkv.size(); ++i) qkv.data()[i] = gen.normal();
  for (index i = 0; i < r.size(); ++i) r.data()[i] = gen.normal();
  lora::matrix<double> out, dqkv;
  std::vector<double> probs, scratch;
  lora::models::attention_forward(qkv, batch, seq, heads, out, probs);
  EXPECT_NEAR((out.array() * r.array()).sum(), naive_attention_loss(qkv, r, batch, seq, heads), 1e-9);
  lora::models::attention_backward(r, qkv, probs, batch, seq, heads, dqkv, scratch);
  const double h = 1e-6;
  for (index i = 0; i < qkv.size(); i += 97) {
    const double saved = qkv.data()[i];
    qkv.data()[i] = saved + h;
    const double up = naive_attention_loss(qkv, r, batch, seq, heads);
    qkv.data()[i] = saved - h;
    const double down = naive_attention_loss(qkv, r, batch, seq, heads);
    qkv.data()[i] = saved;
    EXPECT_NEAR(dqkv.data()[i], (up - down) / (2 * h), 1e-6) << "qkv element " << i;
  }
}

TEST(Gpt2, TwoThreadsGiveTheSameLossAndGradientsAsOne) {
  // 40 sequences of 6 tokens: 240 rows, enough for LayerNorm, GELU and the head to split over threads.
  batch_data b;
  b.batch = 40;
  b.seq = 6;
  lora::rng gen(12);
  for (index i = 0; i < b.batch * b.seq; ++i) {
    b.in.push_back(static_cast<std::int32_t>(gen.below(11)));
    b.target.push_back(static_cast<std::int32_t>(gen.below(11)));
  }
  const auto run = [&](int threads, std::vector<lora::vector<double>>& grads) {
    lora::models::set_num_threads(threads);
    gpt2<double> model(tiny_weights<double>());
    model.set_base_training(gpt2_base_training::full);
    const double loss = model.forward_backward(b.in, b.target, b.batch, b.seq);
    for (const auto& p : model.parameters()) grads.emplace_back(p.grad());
    return loss;
  };
  std::vector<lora::vector<double>> one, two;
  const double l1 = run(1, one), l2 = run(2, two);
  lora::models::set_num_threads(1);
  EXPECT_NEAR(l1, l2, 1e-12);
  ASSERT_EQ(one.size(), two.size());
  for (std::size_t k = 0; k < one.size(); ++k)
    EXPECT_LT((one[k] - two[k]).cwiseAbs().maxCoeff(), 1e-12 * (1 + one[k].cwiseAbs().maxCoeff())) << k;
  // GELU splits from 64K values: both directions give the same bits on 1 and 2 threads.
  std::vector<double> x(200000), dy(x.size()), y1(x.size()), y2(x.size()), dx1(x.size()), dx2(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = 4 * gen.normal();
    dy[i] = gen.normal();
  }
  const auto size = static_cast<index>(x.size());
  lora::models::gelu_forward(x.data(), y1.data(), size);
  lora::models::gelu_backward(x.data(), dy.data(), dx1.data(), size);
  lora::models::set_num_threads(2);
  lora::models::gelu_forward(x.data(), y2.data(), size);
  lora::models::gelu_backward(x.data(), dy.data(), dx2.data(), size);
  lora::models::set_num_threads(1);
  EXPECT_EQ(y1, y2);
  EXPECT_EQ(dx1, dx2);
  EXPECT_THROW(lora::models::set_num_threads(0), lora::config_error);
}

TEST(Gpt2, WeightsCopyDeepAndAssignInPlaceSoViewsStayValid) {
  const auto original = tiny_weights<double>();
  gpt2_weights<double> copy = original;  // deep: its own arena
  copy.wte()(0, 0) += 1.0;
  EXPECT_NE(copy.wte()(0, 0), original.wte()(0, 0));
  EXPECT_NE(copy.data(0), original.data(0));
  gpt2<double> model(gpt2_weights<double>::random(k_tiny, 3));
  const double* storage = model.weights().data(0);
  model.weights() = original;  // values copied into the storage the projections view
  EXPECT_EQ(model.weights().data(0), storage);
  EXPECT_EQ(model.weights().wte()(2, 3), original.wte()(2, 3));
  gpt2<double> reference(tiny_weights<double>());
  const auto b = tiny_batch();
  EXPECT_EQ(model.forward_backward(b.in, b.target, b.batch, b.seq),
            reference.forward_backward(b.in, b.target, b.batch, b.seq));
  const gpt2_config other{2, 2, 16, 6, 11, 1e-5};
  EXPECT_THROW(model.weights() = gpt2_weights<double>(other), lora::shape_error);
  // A KV cache of a model of another width is refused, not written out of bounds.
  gpt2<double> wide(gpt2_weights<double>::random(other, 1));
  auto wide_cache = wide.make_cache();
  EXPECT_THROW(model.infer({1, 2}, wide_cache, nullptr), lora::shape_error);
  // Sizes that would overflow the parameter count are refused up front.
  EXPECT_THROW(gpt2_config({2, 2, index{1} << 40, 6, 11, 1e-5}).validate(), lora::config_error);
  EXPECT_THROW(gpt2_config({2, 2, 8, 6, index{1} << 30, 1e-5}).validate(), lora::config_error);
}

TEST(Gpt2, ModulePathsAreGpt2LMHeadModelsAndTheParameterCountIsGpt2Smalls) {
  EXPECT_EQ(lora::models::gpt2_module_path(3, gpt2_module::attn_c_proj), "transformer.h.3.attn.c_proj");
  EXPECT_EQ(lora::models::gpt2_module_path(0, gpt2_module::mlp_c_proj), "transformer.h.0.mlp.c_proj");
  EXPECT_EQ(lora::models::gpt2_small().num_parameters(), 124439808);
  gpt2_weights<float> w(k_tiny);
  EXPECT_EQ(w.num_elements(), k_tiny.num_parameters());
}

}  // namespace
