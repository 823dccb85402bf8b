// A GPT-2-shaped block with LoRA on every projection: token embedding (lora::embedding), fused c_attn stored
// in x out (GPT-2's Conv1D, weight_layout::in_out) as PEFT's single linear or as loralib's merged_linear
// {q, v}, attn c_proj, MLP c_fc / c_proj, pre-LayerNorms, causal multi-head attention, GELU and a tied LM
// head. The whole block's adapter gradients match finite differences; SGD steps lower the loss and change
// only the adapters; merging every layer leaves the logits unchanged and unmerging restores every frozen
// weight bit for bit.
#include <cmath>
#include <lora/embedding.hpp>
#include <lora/merged_linear.hpp>

#include "layer_support.hpp"
#include "support.hpp"

namespace {

using lora::index;
using lora_test::bitwise_equal;
using lora_test::random_config;
using lora_test::random_matrix;
using mat = lora::matrix<double>;

constexpr index k_vocab = 20, k_ctx = 6, k_d = 16, k_heads = 2, k_rank = 2;

/// y = (x − mean) / sqrt(var + eps) per row (GPT-2's LayerNorm with its frozen gain 1 and bias 0).
mat layer_norm(const mat& x) {
  mat y(x.rows(), x.cols());
  for (index i = 0; i < x.rows(); ++i) {
    const double mu = x.row(i).mean();
    const double var = (x.row(i).array() - mu).square().mean();
    y.row(i) = (x.row(i).array() - mu) / std::sqrt(var + 1e-5);
  }
  return y;
}

/// dx = (dy − mean(dy) − y mean(dy ⊙ y)) / sqrt(var + eps) per row.
mat layer_norm_backward(const mat& x, const mat& dy) {
  const mat y = layer_norm(x);
  mat dx(x.rows(), x.cols());
  for (index i = 0; i < x.rows(); ++i) {
    const double mu = x.row(i).mean();
    const double inv = 1.0 / std::sqrt((x.row(i).array() - mu).square().mean() + 1e-5);
    const double mean_dy = dy.row(i).mean();
    const double mean_dyy = dy.row(i).cwiseProduct(y.row(i)).mean();
    dx.row(i) = inv * (dy.row(i).array() - mean_dy - y.row(i).array() * mean_dyy);
  }
  return dx;
}

/// GELU, tanh approximation (GPT-2's gelu_new), and its derivative.
double gelu(double f) { return 0.5 * f * (1 + std::tanh(0.7978845608028654 * (f + 0.044715 * f * f * f))); }
double gelu_grad(double f) {
  const double t = std::tanh(0.7978845608028654 * (f + 0.044715 * f * f * f));
  return 0.5 * (1 + t) + 0.5 * f * (1 - t * t) * 0.7978845608028654 * (1 + 3 * 0.044715 * f * f);
}

/// The block. Attn is lora::linear (PEFT: one adapter over q|k|v) or lora::merged_linear (loralib).
template <typename Attn>
struct gpt2_block {
  // Frozen weights in the user's memory, as a checkpoint would hold them (Conv1D weights are in x out).
  mat wte, wpe, c_attn_w, attn_proj_w, fc_w, mlp_proj_w;
  lora::embedding<double> embed;
  Attn c_attn;
  lora::linear<double> attn_proj, fc, mlp_proj;
  // Forward state for backward.
  mat x0, x1, x2, qkv, att_out, f, logits_cache;
  std::vector<mat> probs;  // per head, T x T

  static Attn make_attn(mat& w);

  explicit gpt2_block(lora::rng& gen)
      : wte(random_matrix<double>(gen, k_vocab, k_d, 0.5)),
        wpe(random_matrix<double>(gen, k_ctx, k_d, 0.1)),
        c_attn_w(random_matrix<double>(gen, k_d, 3 * k_d, 0.3)),
        attn_proj_w(random_matrix<double>(gen, k_d, k_d, 0.3)),
        fc_w(random_matrix<double>(gen, k_d, 4 * k_d, 0.3)),
        mlp_proj_w(random_matrix<double>(gen, 4 * k_d, k_d, 0.2)),
        embed(lora::view, wte, "wte"),
        c_attn(make_attn(c_attn_w)),
        attn_proj(lora::view, attn_proj_w, "attn.c_proj", lora::weight_layout::in_out),
        fc(lora::view, fc_w, "mlp.c_fc", lora::weight_layout::in_out),
        mlp_proj(lora::view, mlp_proj_w, "mlp.c_proj", lora::weight_layout::in_out) {
    embed.add_adapter("default", random_config(k_rank, 4.0, 1));
    c_attn.add_adapter("default", random_config(k_rank, 4.0, 2));
    attn_proj.add_adapter("default", random_config(k_rank, 4.0, 3));
    fc.add_adapter("default", random_config(k_rank, 4.0, 4));
    mlp_proj.add_adapter("default", random_config(k_rank, 4.0, 5));
  }

  lora::parameter_list<double> parameters() {
    return lora::collect_parameters<double>(embed, c_attn, attn_proj, fc, mlp_proj);
  }
  void zero_grad() {
    embed.zero_grad();
    c_attn.zero_grad();
    attn_proj.zero_grad();
    fc.zero_grad();
    mlp_proj.zero_grad();
  }
  std::vector<mat> frozen() const { return {wte, wpe, c_attn_w, attn_proj_w, fc_w, mlp_proj_w}; }

  /// Logits (T x vocab) of the tied head, logits = LN(x2) wteᵀ (the frozen table, not its adapter).
  mat forward(const std::vector<index>& ids, const mat& head) {
    const index t = static_cast<index>(ids.size()), hd = k_d / k_heads;
    x0 = embed.forward(ids) + wpe.topRows(t);
    qkv = c_attn.forward(layer_norm(x0));
    att_out.resize(t, k_d);
    probs.assign(k_heads, mat());
    for (index h = 0; h < k_heads; ++h) {
      const auto q = qkv.middleCols(h * hd, hd), k = qkv.middleCols(k_d + h * hd, hd),
                 v = qkv.middleCols(2 * k_d + h * hd, hd);
      mat s = q * k.transpose() / std::sqrt(double(hd));
      for (index i = 0; i < t; ++i) {  // causal softmax over j <= i
        const double m = s.row(i).head(i + 1).maxCoeff();
        s.row(i).head(i + 1) = (s.row(i).head(i + 1).array() - m).exp();
        s.row(i).head(i + 1) /= s.row(i).head(i + 1).sum();
        s.row(i).tail(t - i - 1).setZero();
      }
      att_out.middleCols(h * hd, hd) = s * v;
      probs[static_cast<std::size_t>(h)] = s;
    }
    x1 = x0 + attn_proj.forward(att_out);
    f = fc.forward(layer_norm(x1));
    x2 = x1 + mlp_proj.forward(mat(f.unaryExpr(&gelu)));
    return layer_norm(x2) * head.transpose();
  }

  /// Mean next-token cross-entropy of the logits against `targets`; fills dlogits.
  static double cross_entropy(const mat& logits, const std::vector<index>& targets, mat& dlogits) {
    const index t = logits.rows();
    dlogits.resize(t, logits.cols());
    double loss = 0;
    for (index i = 0; i < t; ++i) {
      const double m = logits.row(i).maxCoeff();
      const Eigen::RowVectorXd e = (logits.row(i).array() - m).exp();
      const double z = e.sum();
      loss += std::log(z) + m - logits(i, targets[static_cast<std::size_t>(i)]);
      dlogits.row(i) = e / z;
      dlogits(i, targets[static_cast<std::size_t>(i)]) -= 1;
    }
    dlogits /= double(t);
    return loss / double(t);
  }

  void backward(const mat& dlogits, const mat& head) {
    const index t = x0.rows(), hd = k_d / k_heads;
    mat dx2 = layer_norm_backward(x2, dlogits * head);
    const mat dg = mlp_proj.backward(dx2);
    mat df = dg.cwiseProduct(mat(f.unaryExpr(&gelu_grad)));
    mat dx1 = dx2 + layer_norm_backward(x1, fc.backward(df));
    const mat datt = attn_proj.backward(dx1);
    mat dqkv(t, 3 * k_d);
    for (index h = 0; h < k_heads; ++h) {
      const mat& p = probs[static_cast<std::size_t>(h)];
      const auto q = qkv.middleCols(h * hd, hd), k = qkv.middleCols(k_d + h * hd, hd),
                 v = qkv.middleCols(2 * k_d + h * hd, hd);
      const auto dout = datt.middleCols(h * hd, hd);
      const mat dp = dout * v.transpose();
      dqkv.middleCols(2 * k_d + h * hd, hd) = p.transpose() * dout;
      // dS = P ⊙ (dP − rowsum(dP ⊙ P)) / sqrt(hd)   (zero where P is masked)
      mat ds = p.cwiseProduct((dp.colwise() - dp.cwiseProduct(p).rowwise().sum()).eval()) / std::sqrt(double(hd));
      dqkv.middleCols(h * hd, hd) = ds * k;
      dqkv.middleCols(k_d + h * hd, hd) = ds.transpose() * q;
    }
    const mat dx0 = dx1 + layer_norm_backward(x0, c_attn.backward(dqkv));
    embed.backward(dx0);
  }

  void merge() {
    embed.merge();
    c_attn.merge();
    attn_proj.merge();
    fc.merge();
    mlp_proj.merge();
  }
  void unmerge() {
    embed.unmerge();
    c_attn.unmerge();
    attn_proj.unmerge();
    fc.unmerge();
    mlp_proj.unmerge();
  }
};

template <>
lora::linear<double> gpt2_block<lora::linear<double>>::make_attn(mat& w) {
  return lora::linear<double>(lora::view, w, "attn.c_attn", lora::weight_layout::in_out);
}

template <>
lora::merged_linear<double> gpt2_block<lora::merged_linear<double>>::make_attn(mat& w) {
  return lora::merged_linear<double>(lora::view, w, {true, false, true}, "attn.c_attn", lora::weight_layout::in_out);
}

template <typename Attn>
class gpt2_block_test : public ::testing::Test {};
using attn_types = ::testing::Types<lora::linear<double>, lora::merged_linear<double>>;
TYPED_TEST_SUITE(gpt2_block_test, attn_types);

const std::vector<index> k_ids{3, 17, 0, 9, 9, 12};
const std::vector<index> k_targets{17, 0, 9, 9, 12, 5};

TYPED_TEST(gpt2_block_test, adapter_gradients_of_the_whole_block_match_finite_differences) {
  lora::rng gen(1);
  gpt2_block<TypeParam> block(gen);
  const mat head = block.wte;  // tied head, frozen
  mat dlogits;
  auto loss = [&] { return block.cross_entropy(block.forward(k_ids, head), k_targets, dlogits); };
  block.zero_grad();
  loss();
  block.backward(dlogits, head);
  for (const auto& p : block.parameters()) {
    const mat analytic = Eigen::Map<const mat>(p.grad_data, p.rows, p.cols);
    const mat numeric = lora_test::numeric_gradient(p.value_data, p.rows, p.cols, loss);
    EXPECT_LT(lora_test::rel_error(analytic, numeric), 1e-7) << p.name;
    EXPECT_GT(analytic.norm(), 0.0) << p.name;
  }
}

TYPED_TEST(gpt2_block_test, training_changes_only_the_adapters_and_merging_is_exact) {
  lora::rng gen(2);
  gpt2_block<TypeParam> block(gen);
  const mat head = block.wte;
  const std::vector<mat> frozen = block.frozen();
  auto params = block.parameters();
  std::vector<mat> before;
  for (const auto& p : params) before.push_back(Eigen::Map<const mat>(p.value_data, p.rows, p.cols));
  constexpr bool fused = std::is_same_v<TypeParam, lora::merged_linear<double>>;
  EXPECT_EQ(params.size(), fused ? 12u : 10u);  // merged_linear: q and v each carry A and B

  mat dlogits;
  const double loss0 = block.cross_entropy(block.forward(k_ids, head), k_targets, dlogits);
  double loss = loss0;
  for (int step = 0; step < 20; ++step) {
    block.zero_grad();
    loss = block.cross_entropy(block.forward(k_ids, head), k_targets, dlogits);
    block.backward(dlogits, head);
    for (auto& p : params) p.value() -= 0.05 * p.grad();  // plain SGD
  }
  EXPECT_LT(loss, loss0);
  const auto after_training = block.frozen();
  for (std::size_t i = 0; i < frozen.size(); ++i) EXPECT_TRUE(bitwise_equal(after_training[i], frozen[i])) << i;
  for (std::size_t i = 0; i < params.size(); ++i)
    EXPECT_FALSE(Eigen::Map<const mat>(params[i].value_data, params[i].rows, params[i].cols).isApprox(before[i]))
        << params[i].name;

  // Merged logits equal the adapter path; unmerging restores every frozen weight exactly, many times over.
  const mat logits = block.forward(k_ids, head);
  block.merge();
  EXPECT_LT(lora_test::rel_error(block.forward(k_ids, head), logits), 1e-12);
  EXPECT_FALSE(bitwise_equal(block.c_attn_w, frozen[2]));
  block.unmerge();
  for (int cycle = 0; cycle < 25; ++cycle) {
    block.merge();
    block.unmerge();
  }
  const auto restored = block.frozen();
  for (std::size_t i = 0; i < frozen.size(); ++i) EXPECT_TRUE(bitwise_equal(restored[i], frozen[i])) << i;
  EXPECT_LT(lora_test::rel_error(block.forward(k_ids, head), logits), 1e-12);
}

}  // namespace
