// lora/models/gpt2.hpp: GPT-2 (Radford et al. 2019) built from the library's layers, with LoRA on any of
// its projections, trained on a CPU (docs/CONVENTIONS.md §gpt2).
//
// For B sequences of T tokens (n = B T rows, one token per row, d = n_embd):
//   x_0   = wte[ids] + wpe[0..T)                                         n x d
//   block l = 0..L−1 (pre-LayerNorm):
//     h     = LN_1(x);  qkv = c_attn(h) + b           (n x 3d: q | k | v)
//     a     = causal multi-head attention(qkv)        (n x d; nn.hpp)
//     x'    = x + c_proj(a) + b
//     f     = c_fc(LN_2(x')) + b                      (n x 4d)
//     x     = x' + mlp.c_proj(gelu_new(f)) + b
//   logits = LN_f(x_L) wteᵀ                                              n x V (the head is tied to wte)
//   loss   = mean over targets ≥ 0 of −log softmax(logits)[target]        (nats per token)
//
// Each projection is a lora::linear viewing its Conv1D weight (stored in x out, as GPT-2 keeps it) in the
// model's gpt2_weights: no copy, and LoRA adapters, merging and PEFT export are the linear's. Biases,
// LayerNorms, attention, GELU and the tied head are the model's own (nn.hpp). There is no dropout in the
// model itself (adapters have their own lora_dropout).
//
// What trains: the active adapters always; with set_base_training(full) also every base tensor, with
// norms_and_head the LayerNorm gains and biases and the tied wte (the LM head). LoRA on wte is refused:
// the head shares its table, so a merged embedding adapter would change the head as well.
//
// Training is one call, forward_backward(), which computes the loss and accumulates every gradient; the
// LM head's gradient is formed chunk by chunk while its logits are at hand, so no n x V matrix is kept.
// Inference (infer(), the KV cache, nll()) lives in gpt2_infer.hpp and is const: one model, many threads,
// a cache per thread.
#pragma once

#include <Eigen/Core>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../adapter_routing.hpp"
#include "../config.hpp"
#include "../error.hpp"
#include "../linear.hpp"
#include "../parameter.hpp"
#include "gpt2_config.hpp"
#include "gpt2_weights.hpp"
#include "nn.hpp"
#include "parallel.hpp"

namespace lora::models {

/// The four projections of a block that take adapters.
enum class gpt2_module : int { c_attn, attn_c_proj, c_fc, mlp_c_proj };
inline constexpr index gpt2_module_count = 4;

/// The module's path as PEFT names it in GPT2LMHeadModel: "transformer.h.<l>.attn.c_attn", ...
std::string gpt2_module_path(index layer, gpt2_module m);

/// Which frozen base tensors train besides the adapters.
enum class gpt2_base_training {
  frozen,          ///< None: LoRA.
  full,            ///< All of them: full fine-tuning.
  norms_and_head,  ///< LayerNorm gains and biases, and wte (the tied LM head).
};

/// Seconds spent per kind of work in forward_backward(), when profiling is on.
struct gpt2_profile {
  double embed = 0;      ///< Embedding lookup and its gradient.
  double gemm = 0;       ///< The projections: base GEMMs and adapters, forward and backward.
  double attention = 0;  ///< Attention scores, softmax and their backward.
  double pointwise = 0;  ///< LayerNorm, GELU, biases, residuals.
  double head = 0;       ///< LM head, softmax cross-entropy and their backward.
  double total() const noexcept { return embed + gemm + attention + pointwise + head; }
};

template <typename Scalar>
struct gpt2_kv_cache;
template <typename Scalar>
struct gpt2_batch_workspace;

template <typename Scalar_>
class gpt2 {
 public:
  using Scalar = Scalar_;
  using weights_type = gpt2_weights<Scalar>;
  using matrix_type = matrix<Scalar>;
  using layer_type = linear<Scalar>;
  using token_list = std::vector<std::int32_t>;
  using cache_type = gpt2_kv_cache<Scalar>;
  static_assert(std::is_floating_point_v<Scalar>, "lora::models::gpt2 needs a floating-point Scalar");

  /// Takes the weights (owned or borrowed storage); the projections view them.
  explicit gpt2(weights_type weights);
  /// A model whose projections own quantized weights from the start (a GGUF base kept in its blocks:
  /// gpt2_gguf.hpp): `weights` without the 4 L projection tensors (released), and `projections` their
  /// weights W (out x in), block by block in gpt2_module order. shape_error on a wrong count or shape;
  /// state_error when a projection tensor is still held in `weights` or another tensor is released.
  gpt2(weights_type weights, std::vector<quant::quantized_matrix> projections);
  gpt2(const gpt2&) = delete;
  gpt2& operator=(const gpt2&) = delete;

  const gpt2_config& config() const noexcept { return m_weights.config(); }
  /// The base tensors (merged adapters included). Full fine-tuning updates them in place; assigning to them
  /// copies values into the same storage (gpt2_weights.hpp), so the projections' views stay valid.
  weights_type& weights() noexcept { return m_weights; }
  const weights_type& weights() const noexcept { return m_weights; }

  // --- the projections --------------------------------------------------------------------------

  layer_type& layer(index l, gpt2_module m);
  const layer_type& layer(index l, gpt2_module m) const;
  /// Every projection with its PEFT path, block by block.
  std::vector<std::pair<std::string, layer_type*>> named_layers();
  /// The projections whose path matches a target by PEFT's rule for a list of names: the path equals it
  /// or ends with "." + target ("c_proj" matches attn.c_proj and mlp.c_proj). name_error for a target
  /// that matches nothing (and for "wte", see above).
  std::vector<std::pair<std::string, layer_type*>> match(const std::vector<std::string>& targets);
  /// Adds adapter `name` to every projection matching `targets`; on any error nothing is added.
  void add_adapter(const std::string& name, const adapter_config& config, const std::vector<std::string>& targets);
  /// Every adapter name some projection holds, in order of first appearance.
  std::vector<std::string> adapter_names() const;
  /// Makes `names` the active adapters of every projection that has all of them (others run the base).
  void set_active(const std::vector<std::string>& names);
  /// Merges / unmerges the active adapters of every projection (exact unmerge, see lora::linear).
  void merge();
  void unmerge();
  /// Training mode (adapter dropout) or eval mode, on every projection.
  void train(bool on = true);
  /// Stores every projection's frozen weight as `type` (lora::linear::set_weight_storage: NF4, int8, Q8_0,
  /// Q4_0, bf16 ...) and releases their float tensors from weights(), which keeps the embeddings, norms
  /// and biases (QLoRA's setting: the adapters train over a base in fewer bits). qtype::f32 turns quantized
  /// projections back into plain ones, each owning deq(W) (weights() does not get them back). state_error
  /// while adapters are merged or the base trains in full; shape_error when d is no multiple of 32 for
  /// q8_0 / q4_0 (nothing changes then).
  void set_base_storage(quant::qtype type);
  /// The projections' storage (qtype::f32: plain).
  quant::qtype base_storage() const noexcept { return m_layers.front().weight_storage(); }

  // --- training ---------------------------------------------------------------------------------

  void set_base_training(gpt2_base_training mode);
  gpt2_base_training base_training() const noexcept { return m_base_training; }
  /// The adapters' parameters (lora_a / lora_b roles), then the base tensors that train, named
  /// "transformer.<HF name>" (dense for matrices, vector for vectors).
  parameter_list<Scalar> parameters();
  /// Zeroes every gradient (adapters and base).
  void zero_grad();

  /// One training forward and backward over `batch` sequences of `seq` tokens (tokens, targets: batch ·
  /// seq values, sequence after sequence; target −1 = not predicted). Returns the mean cross-entropy
  /// (nats) over the predicted positions and adds the gradient of loss_scale · loss to every trainable
  /// parameter. shape_error on sizes, seq > n_positions or ids out of range.
  double forward_backward(const token_list& tokens, const token_list& targets, index batch, index seq,
                          double loss_scale = 1.0);
  /// Called by forward_backward() right after block l's backward, for l = L−1 down to 0 (empty: none, the
  /// default). Block l's adapter gradients (layer(l, m).parameters()) are final for this call then, so
  /// data-parallel training can start reducing them while earlier blocks still run backward (lora/dist).
  void set_backward_hook(std::function<void(index block)> hook) { m_backward_hook = std::move(hook); }

  /// Turns the per-phase timer on (and resets it) or off.
  void set_profiling(bool on);
  const gpt2_profile& profile() const noexcept { return m_profile; }

  // --- inference (gpt2_infer.hpp) ---------------------------------------------------------------

  /// An empty KV cache for this model (n_positions x d per layer for keys and values, allocated once).
  cache_type make_cache() const;
  /// Feeds `ids` at positions cache.length, ..., appending their keys and values to the cache, and writes
  /// their logits into `logits` (V x m, one column per fed token) unless null. Equal to the training
  /// forward's logits for the same prefix. shape_error past n_positions or for ids out of range.
  void infer(const token_list& ids, cache_type& cache, matrix_type* logits) const;
  /// Σ over i of −log p(ids[i + 1] | ids[0..i]) in nats (ids.size() − 1 terms), one fresh window.
  double nll(const token_list& ids, cache_type& cache) const;

  // --- many sequences, many adapters (gpt2_infer.hpp; docs/CONVENTIONS.md §mixed) ----------------

  /// The routing of a batch of sequences: sequence k feeds lengths[k] tokens through adapter names[k]
  /// (an adapter, or base_adapter / "" for the base alone). As PEFT: name_error for a name that no
  /// projection holds; a projection without the adapter runs the base for those rows
  /// (missing_adapter::base). shape_error when the counts differ.
  adapter_routing routing(const std::vector<std::string>& names, const std::vector<index>& lengths) const;
  /// Feeds several sequences at once: seqs[k] appended to *caches[k] at its own position. Every projection
  /// runs once over the rows of all of them, each sequence's rows through its adapter (`routing`, from
  /// routing() with the same lengths); attention runs per sequence over its own cache. Each sequence's
  /// logits (V x m_k) go to (*logits)[k] unless null. Equal, sequence by sequence, to infer() with that
  /// sequence's adapter the only active one. Errors as infer() and linear's routed infer (merged or DoRA
  /// adapters refused).
  void infer_batch(const std::vector<token_list>& seqs, const std::vector<cache_type*>& caches,
                   const adapter_routing& routing, gpt2_batch_workspace<Scalar>& ws,
                   std::vector<matrix_type>* logits) const;

 private:
  /// The checks of infer(): the cache fits the model, m tokens fit at its position, ids in range.
  void check_feed(const token_list& ids, const cache_type& c) const;
  /// The blocks and the final LayerNorm over the rows in s.x (s: a cache or a batch workspace):
  /// run(l, module, in, out) applies a projection and its bias; attend(l) turns s.qkv into s.a.
  template <typename Scratch, typename Run, typename Attend>
  void run_blocks(Scratch& s, Run&& run, Attend&& attend) const;

  /// What one block keeps from forward for backward (n rows).
  struct block_cache {
    matrix_type x;    ///< Block input (residual stream), n x d.
    matrix_type h1;   ///< LN_1(x), n x d.
    matrix_type qkv;  ///< n x 3d.
    matrix_type a;    ///< Attention output, n x d.
    matrix_type x2;   ///< x' = x + attention branch, n x d.
    matrix_type h2;   ///< LN_2(x'), n x d.
    matrix_type f;    ///< c_fc output before GELU, n x 4d.
    matrix_type g;    ///< gelu(f), n x 4d.
    layer_norm_stats<Scalar> ln1, ln2;
    std::vector<Scalar> probs;  ///< Attention probabilities, B H T².
  };

  void check_batch(const token_list& tokens, const token_list& targets, index batch, index seq) const;
  void check_ids(const token_list& ids, const char* what) const;
  void embed(const token_list& tokens, index batch, index seq, matrix_type& x) const;
  void block_forward(index l, block_cache& c, index batch, index seq);
  double head_forward_backward(const token_list& targets, double loss_scale, matrix_type& dhf);
  void block_backward(index l, block_cache& c, index batch, index seq, matrix_type& dx);
  /// y = layer(x) + b in training mode (caches a view of x).
  void project(index l, gpt2_module m, const matrix_type& x, matrix_type& y);
  /// dx = dy ∂layer/∂x (unless params_only), adapters' gradients, and in full training dW, db.
  void project_backward(index l, gpt2_module m, const matrix_type& x, const matrix_type& dy, matrix_type* dx);
  void embed_backward(const matrix_type& dx);
  Scalar* grad_of(index tensor_id);
  bool trains_tensor(index tensor_id) const;
  index tensor_of(index l, gpt2_module m, bool bias) const;

  weights_type m_weights;
  std::unique_ptr<weights_type> m_grads;  ///< Base gradients, allocated unless frozen.
  std::vector<layer_type> m_layers;       ///< 4 per block, gpt2_module order.
  gpt2_base_training m_base_training = gpt2_base_training::frozen;

  // Training state of the last forward_backward (reused: no allocation once sizes repeat).
  std::vector<block_cache> m_blocks;
  token_list m_tokens;
  index m_seq = 0;         ///< T of the last forward.
  matrix_type m_xf, m_hf;  ///< x_L and LN_f(x_L), n x d.
  layer_norm_stats<Scalar> m_lnf;
  matrix_type m_dx, m_dh, m_da, m_dqkv, m_dbig, m_scratch, m_logits;
  std::vector<Scalar> m_att_scratch;
  bool m_profiling = false;
  gpt2_profile m_profile;
  std::function<void(index)> m_backward_hook;
};

// ------------------------------------------------------------------------------------------------

namespace detail {

/// Adds the seconds of its lifetime to `slot` when `on`.
class phase_timer {
 public:
  phase_timer(bool on, double& slot) : m_on(on), m_slot(slot) {
    if (m_on) m_start = std::chrono::steady_clock::now();
  }
  ~phase_timer() {
    if (m_on) m_slot += std::chrono::duration<double>(std::chrono::steady_clock::now() - m_start).count();
  }
  phase_timer(const phase_timer&) = delete;
  phase_timer& operator=(const phase_timer&) = delete;

 private:
  bool m_on;
  double& m_slot;
  std::chrono::steady_clock::time_point m_start;
};

inline const char* gpt2_module_suffix(gpt2_module m) {
  switch (m) {
    case gpt2_module::c_attn:
      return "attn.c_attn";
    case gpt2_module::attn_c_proj:
      return "attn.c_proj";
    case gpt2_module::c_fc:
      return "mlp.c_fc";
    default:
      return "mlp.c_proj";
  }
}

/// Columns added to the residual stream: y.col(j) += b(j).
template <typename Scalar, typename DB>
void add_bias(matrix<Scalar>& y, const Eigen::MatrixBase<DB>& b) {
  for (index j = 0; j < y.cols(); ++j) y.col(j).array() += b(j);
}

}  // namespace detail

inline std::string gpt2_module_path(index layer, gpt2_module m) {
  return "transformer.h." + std::to_string(layer) + "." + detail::gpt2_module_suffix(m);
}

template <typename Scalar>
gpt2<Scalar>::gpt2(weights_type weights) : m_weights(std::move(weights)) {
  const auto& c = config();
  using row_major = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  m_layers.reserve(static_cast<std::size_t>(c.n_layer * gpt2_module_count));
  for (index l = 0; l < c.n_layer; ++l) {
    for (int m = 0; m < gpt2_module_count; ++m) {
      const auto mod = static_cast<gpt2_module>(m);
      const index id = tensor_of(l, mod, false);
      const auto& s = m_weights.spec(id);  // [in, out], row-major: GPT-2's Conv1D
      Eigen::Map<row_major> w(m_weights.data(id), s.rows, s.cols);
      m_layers.emplace_back(view, w, gpt2_module_path(l, mod), weight_layout::in_out);
    }
  }
  m_blocks.resize(static_cast<std::size_t>(c.n_layer));
}

template <typename Scalar>
gpt2<Scalar>::gpt2(weights_type weights, std::vector<quant::quantized_matrix> projections)
    : m_weights(std::move(weights)) {
  const auto& c = config();
  const index count = c.n_layer * gpt2_module_count;
  if (static_cast<index>(projections.size()) != count)
    throw shape_error(lora::detail::cat("gpt2: expected ", count, " quantized projections (4 per block, ", c.n_layer,
                                        " blocks), got ", projections.size()));
  std::vector<bool> is_projection(static_cast<std::size_t>(m_weights.num_tensors()), false);
  for (index k = 0; k < count; ++k) {
    const auto mod = static_cast<gpt2_module>(k % gpt2_module_count);
    const index id = tensor_of(k / gpt2_module_count, mod, false);
    const auto& s = m_weights.spec(id);  // [in, out]: W is out x in
    const auto& q = projections[static_cast<std::size_t>(k)];
    if (q.rows() != s.cols || q.cols() != s.rows)
      throw shape_error(lora::detail::cat("gpt2: projection ", k, " (", gpt2_module_path(k / gpt2_module_count, mod),
                                          ") must be ", lora::detail::shape_str(s.cols, s.rows), " (out x in), got ",
                                          lora::detail::shape_str(q.rows(), q.cols())));
    is_projection[static_cast<std::size_t>(id)] = true;
  }
  for (index id = 0; id < m_weights.num_tensors(); ++id)
    if (m_weights.has(id) == is_projection[static_cast<std::size_t>(id)])
      throw state_error(lora::detail::cat("gpt2: tensor '", m_weights.spec(id).name, "' is ",
                                          m_weights.has(id) ? "held" : "released",
                                          "; a model built from quantized projections takes weights without exactly "
                                          "the projection tensors"));
  m_layers.reserve(static_cast<std::size_t>(count));
  for (index k = 0; k < count; ++k)
    m_layers.emplace_back(std::move(projections[static_cast<std::size_t>(k)]),
                          gpt2_module_path(k / gpt2_module_count, static_cast<gpt2_module>(k % gpt2_module_count)));
  m_blocks.resize(static_cast<std::size_t>(c.n_layer));
}

template <typename Scalar>
index gpt2<Scalar>::tensor_of(index l, gpt2_module m, bool bias) const {
  static constexpr block_tensor weights[] = {block_tensor::c_attn_weight, block_tensor::attn_c_proj_weight,
                                             block_tensor::c_fc_weight, block_tensor::mlp_c_proj_weight};
  return gpt2_tensor_id(l, weights[static_cast<int>(m)]) + (bias ? 1 : 0);
}

template <typename Scalar>
linear<Scalar>& gpt2<Scalar>::layer(index l, gpt2_module m) {
  if (l < 0 || l >= config().n_layer)
    throw shape_error("gpt2: expected a block in [0, " + std::to_string(config().n_layer) + "), got " +
                      std::to_string(l));
  return m_layers[static_cast<std::size_t>(l * gpt2_module_count + static_cast<int>(m))];
}

template <typename Scalar>
const linear<Scalar>& gpt2<Scalar>::layer(index l, gpt2_module m) const {
  return const_cast<gpt2*>(this)->layer(l, m);
}

template <typename Scalar>
void gpt2<Scalar>::set_base_training(gpt2_base_training mode) {
  if (mode == gpt2_base_training::full && !m_weights.released().empty())
    throw state_error(
        "gpt2: the projections' weights are stored quantized (set_base_storage), so the base "
        "cannot train in full; train adapters, or norms_and_head");
  // The gradient buffers, once made, stay (a parameters() list taken earlier keeps pointing into them).
  m_base_training = mode;
  if (mode != gpt2_base_training::frozen && !m_grads)
    m_grads = std::make_unique<weights_type>(config(), m_weights.released());
}

template <typename Scalar>
void gpt2<Scalar>::set_base_storage(quant::qtype type) {
  if (type != quant::qtype::f32 && m_base_training == gpt2_base_training::full)
    throw state_error(lora::detail::cat("gpt2: cannot store the base as ", quant::qtype_name(type),
                                        " while it trains in full (set_base_training(frozen) first)"));
  for (const auto& layer : m_layers)
    if (layer.merged()) throw state_error("gpt2: '" + layer.name() + "' has merged adapters; unmerge() first");
  for (auto& layer : m_layers) layer.set_weight_storage(type);  // the first refuses a bad shape, before any change
  if (type == quant::qtype::f32) return;
  std::vector<index> ids;
  for (index l = 0; l < config().n_layer; ++l)
    for (int m = 0; m < gpt2_module_count; ++m) ids.push_back(tensor_of(l, static_cast<gpt2_module>(m), false));
  m_weights.release(ids);
}

template <typename Scalar>
bool gpt2<Scalar>::trains_tensor(index id) const {
  switch (m_base_training) {
    case gpt2_base_training::full:
      return true;
    case gpt2_base_training::norms_and_head:
      return id == 0 || m_weights.spec(id).name.find("ln_") != std::string::npos;
    default:
      return false;
  }
}

template <typename Scalar>
Scalar* gpt2<Scalar>::grad_of(index id) {
  return trains_tensor(id) ? m_grads->data(id) : nullptr;
}

template <typename Scalar>
parameter_list<Scalar> gpt2<Scalar>::parameters() {
  parameter_list<Scalar> out;
  for (auto& layer : m_layers)
    for (auto& p : layer.parameters()) out.push_back(p);
  for (index id = 0; id < m_weights.num_tensors(); ++id) {
    if (!trains_tensor(id)) continue;
    const auto& s = m_weights.spec(id);
    parameter<Scalar> p;
    p.name = "transformer." + s.name;
    p.role = s.is_vector() ? param_role::vector : param_role::dense;
    p.value_data = m_weights.data(id);
    p.grad_data = m_grads->data(id);
    p.rows = s.rows;
    p.cols = s.is_vector() ? 1 : s.cols;
    out.push_back(std::move(p));
  }
  return out;
}

template <typename Scalar>
void gpt2<Scalar>::zero_grad() {
  for (auto& layer : m_layers) layer.zero_grad();
  if (m_grads) m_grads->set_zero();
}

template <typename Scalar>
void gpt2<Scalar>::set_profiling(bool on) {
  m_profiling = on;
  m_profile = gpt2_profile{};
}

template <typename Scalar>
void gpt2<Scalar>::check_ids(const token_list& ids, const char* what) const {
  const index v = config().vocab_size;
  for (std::size_t i = 0; i < ids.size(); ++i)
    if (ids[i] < 0 || ids[i] >= v)
      throw shape_error("gpt2: expected " + std::string(what) + " in [0, " + std::to_string(v) +
                        ") (vocab_size), got " + std::to_string(ids[i]) + " at position " + std::to_string(i));
}

template <typename Scalar>
void gpt2<Scalar>::check_batch(const token_list& tokens, const token_list& targets, index batch, index seq) const {
  if (batch <= 0 || seq <= 0 || seq > config().n_positions)
    throw shape_error("gpt2: expected batch >= 1 and 1 <= seq <= n_positions (" + std::to_string(config().n_positions) +
                      "), got batch " + std::to_string(batch) + ", seq " + std::to_string(seq));
  const auto n = static_cast<std::size_t>(batch * seq);
  if (tokens.size() != n || targets.size() != n)
    throw shape_error("gpt2: expected " + std::to_string(n) + " tokens and targets (batch x seq), got " +
                      std::to_string(tokens.size()) + " tokens and " + std::to_string(targets.size()) + " targets");
  check_ids(tokens, "token ids");
  const index v = config().vocab_size;
  for (std::size_t i = 0; i < n; ++i)
    if (targets[i] < -1 || targets[i] >= v)
      throw shape_error("gpt2: expected targets in [-1, " + std::to_string(v) + "), got " + std::to_string(targets[i]) +
                        " at position " + std::to_string(i));
}

template <typename Scalar>
void gpt2<Scalar>::embed(const token_list& tokens, index batch, index seq, matrix_type& x) const {
  const index d = config().n_embd;
  x.resize(batch * seq, d);
  const auto wte = m_weights.wte();
  const auto wpe = m_weights.wpe();
  for (index r = 0; r < batch * seq; ++r) x.row(r) = wte.row(tokens[static_cast<std::size_t>(r)]) + wpe.row(r % seq);
}

template <typename Scalar>
void gpt2<Scalar>::project(index l, gpt2_module m, const matrix_type& x, matrix_type& y) {
  auto& lin = layer(l, m);
  y.resize(x.rows(), lin.out_features());
  {
    detail::phase_timer t(m_profiling, m_profile.gemm);
    lin.forward(x, y);
  }
  detail::phase_timer t(m_profiling, m_profile.pointwise);
  detail::add_bias(y, m_weights.flat(tensor_of(l, m, true)));
}

template <typename Scalar>
void gpt2<Scalar>::project_backward(index l, gpt2_module m, const matrix_type& x, const matrix_type& dy,
                                    matrix_type* dx) {
  auto& lin = layer(l, m);
  detail::phase_timer t(m_profiling, m_profile.gemm);
  if (dx != nullptr) {
    dx->resize(dy.rows(), lin.in_features());
    lin.backward(dy, *dx);
  } else {
    lin.backward_params_only(dy);
  }
  const index wid = tensor_of(l, m, false);
  if (Scalar* dw = grad_of(wid)) {  // Conv1D storage [in, out] row-major = dW (out x in) column-major
    Eigen::Map<matrix_type>(dw, lin.out_features(), lin.in_features()).noalias() += dy.transpose() * x;
    Eigen::Map<vector<Scalar>>(grad_of(wid + 1), lin.out_features()) += dy.colwise().sum().transpose();
  }
}

template <typename Scalar>
void gpt2<Scalar>::block_forward(index l, block_cache& c, index batch, index seq) {
  const double eps = config().layer_norm_epsilon;
  const auto& w = m_weights;
  {
    detail::phase_timer t(m_profiling, m_profile.pointwise);
    layer_norm_forward(c.x, w.block_vector(l, block_tensor::ln_1_weight), w.block_vector(l, block_tensor::ln_1_bias),
                       eps, c.h1, c.ln1);
  }
  project(l, gpt2_module::c_attn, c.h1, c.qkv);
  {
    detail::phase_timer t(m_profiling, m_profile.attention);
    attention_forward(c.qkv, batch, seq, config().n_head, c.a, c.probs);
  }
  project(l, gpt2_module::attn_c_proj, c.a, c.x2);
  {
    detail::phase_timer t(m_profiling, m_profile.pointwise);
    c.x2 += c.x;
    layer_norm_forward(c.x2, w.block_vector(l, block_tensor::ln_2_weight), w.block_vector(l, block_tensor::ln_2_bias),
                       eps, c.h2, c.ln2);
  }
  project(l, gpt2_module::c_fc, c.h2, c.f);
  {
    detail::phase_timer t(m_profiling, m_profile.pointwise);
    c.g.resize(c.f.rows(), c.f.cols());
    gelu_forward(c.f.data(), c.g.data(), c.f.size());
  }
}

template <typename Scalar>
double gpt2<Scalar>::forward_backward(const token_list& tokens, const token_list& targets, index batch, index seq,
                                      double loss_scale) {
  check_batch(tokens, targets, batch, seq);
  const index L = config().n_layer;
  {
    detail::phase_timer t(m_profiling, m_profile.embed);
    m_tokens = tokens;
    m_seq = seq;
    embed(tokens, batch, seq, m_blocks[0].x);
  }
  for (index l = 0; l < L; ++l) {
    auto& c = m_blocks[static_cast<std::size_t>(l)];
    block_forward(l, c, batch, seq);
    matrix_type& next = l + 1 < L ? m_blocks[static_cast<std::size_t>(l + 1)].x : m_xf;
    project(l, gpt2_module::mlp_c_proj, c.g, next);
    detail::phase_timer t(m_profiling, m_profile.pointwise);
    next += c.x2;
  }
  {
    detail::phase_timer t(m_profiling, m_profile.pointwise);
    layer_norm_forward(m_xf, m_weights.ln_f_weight(), m_weights.ln_f_bias(), config().layer_norm_epsilon, m_hf, m_lnf);
  }
  const double loss = head_forward_backward(targets, loss_scale, m_dh);
  {
    detail::phase_timer t(m_profiling, m_profile.pointwise);
    const index lnf = 2 + block_tensor_count * L;
    m_dx.setZero(m_xf.rows(), m_xf.cols());
    layer_norm_backward(m_dh, m_xf, m_weights.ln_f_weight(), m_lnf, m_dx, grad_of(lnf), grad_of(lnf + 1), m_scratch);
  }
  for (index l = L - 1; l >= 0; --l) {
    block_backward(l, m_blocks[static_cast<std::size_t>(l)], batch, seq, m_dx);
    if (m_backward_hook) m_backward_hook(l);
  }
  embed_backward(m_dx);
  return loss;
}

template <typename Scalar>
double gpt2<Scalar>::head_forward_backward(const token_list& targets, double loss_scale, matrix_type& dhf) {
  detail::phase_timer t(m_profiling, m_profile.head);
  const index n = m_hf.rows(), v = config().vocab_size;
  index count = 0;
  for (const auto target : targets) count += target >= 0 ? 1 : 0;
  dhf.setZero(n, config().n_embd);
  if (count == 0) return 0.0;
  const auto wte = m_weights.wte();  // V x d
  Scalar* dwte = grad_of(0);
  const Scalar g = static_cast<Scalar>(loss_scale / static_cast<double>(count));
  constexpr index chunk = 128;
  double total = 0.0;
  for (index r0 = 0; r0 < n; r0 += chunk) {
    const index rows = std::min(chunk, n - r0);
    m_logits.resize(v, rows);                                          // logitsᵀ: one column per token
    m_logits.noalias() = wte * m_hf.middleRows(r0, rows).transpose();  // V x rows
    std::vector<double> part_loss(static_cast<std::size_t>(detail::parallel_parts(rows, 8)), 0.0);
    detail::parallel_for(rows, 8, [&](index j0, index j1, index part) {
      for (index j = j0; j < j1; ++j) {
        const std::int32_t target = targets[static_cast<std::size_t>(r0 + j)];
        auto col = m_logits.col(j);
        if (target < 0) {
          col.setZero();
          continue;
        }
        const Scalar z = col(target);
        part_loss[static_cast<std::size_t>(part)] += softmax_in_place(col.data(), v) - static_cast<double>(z);
        col(target) -= Scalar(1);
        col *= g;  // d(loss_scale · mean loss) / d logits
      }
    });
    for (const double l : part_loss) total += l;
    dhf.middleRows(r0, rows).noalias() = m_logits.transpose() * wte;
    if (dwte != nullptr)
      Eigen::Map<typename weights_type::row_matrix>(dwte, v, config().n_embd).noalias() +=
          m_logits * m_hf.middleRows(r0, rows);
  }
  return total / static_cast<double>(count);
}

template <typename Scalar>
void gpt2<Scalar>::block_backward(index l, block_cache& c, index batch, index seq, matrix_type& dx) {
  const auto& w = m_weights;
  // MLP branch: x_out = x' + mlp_c_proj(gelu(f)); dx holds dL/dx_out, which is also dL/dx' so far.
  project_backward(l, gpt2_module::mlp_c_proj, c.g, dx, &m_dbig);
  {
    detail::phase_timer t(m_profiling, m_profile.pointwise);
    gelu_backward(c.f.data(), m_dbig.data(), m_dbig.data(), m_dbig.size());
  }
  project_backward(l, gpt2_module::c_fc, c.h2, m_dbig, &m_dh);
  {
    detail::phase_timer t(m_profiling, m_profile.pointwise);
    layer_norm_backward(m_dh, c.x2, w.block_vector(l, block_tensor::ln_2_weight), c.ln2, dx,
                        grad_of(gpt2_tensor_id(l, block_tensor::ln_2_weight)),
                        grad_of(gpt2_tensor_id(l, block_tensor::ln_2_bias)), m_scratch);
  }
  // Attention branch: x' = x + attn_c_proj(attention(c_attn(LN_1(x)))).
  project_backward(l, gpt2_module::attn_c_proj, c.a, dx, &m_da);
  {
    detail::phase_timer t(m_profiling, m_profile.attention);
    attention_backward(m_da, c.qkv, c.probs, batch, seq, config().n_head, m_dqkv, m_att_scratch);
  }
  // The first block's input needs no gradient unless the embeddings or LayerNorms train.
  const bool need_dx = l > 0 || m_base_training != gpt2_base_training::frozen;
  project_backward(l, gpt2_module::c_attn, c.h1, m_dqkv, need_dx ? &m_dh : nullptr);
  if (!need_dx) return;
  detail::phase_timer t(m_profiling, m_profile.pointwise);
  layer_norm_backward(m_dh, c.x, w.block_vector(l, block_tensor::ln_1_weight), c.ln1, dx,
                      grad_of(gpt2_tensor_id(l, block_tensor::ln_1_weight)),
                      grad_of(gpt2_tensor_id(l, block_tensor::ln_1_bias)), m_scratch);
}

template <typename Scalar>
void gpt2<Scalar>::embed_backward(const matrix_type& dx) {
  detail::phase_timer t(m_profiling, m_profile.embed);
  Scalar* dwte = grad_of(0);
  Scalar* dwpe = grad_of(1);
  if (dwte == nullptr && dwpe == nullptr) return;
  const index d = config().n_embd, n = dx.rows(), T = m_seq;
  using row_map = Eigen::Map<typename weights_type::row_matrix>;
  for (index r = 0; r < n; ++r) {
    if (dwte != nullptr) row_map(dwte, config().vocab_size, d).row(m_tokens[static_cast<std::size_t>(r)]) += dx.row(r);
    if (dwpe != nullptr) row_map(dwpe, config().n_positions, d).row(r % T) += dx.row(r);
  }
}

}  // namespace lora::models

#include "gpt2_adapters.hpp"
#include "gpt2_infer.hpp"
