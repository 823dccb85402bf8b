// lora/adapter.hpp: one named low-rank adapter, ΔW = s · B A, with its hyper-parameters, its factors,
// their gradients and the state its forward pass caches for backward.
//
// Shapes (docs/CONVENTIONS.md §orientation): A is r x in, B is out x r, the cache H = drop(X) Aᵀ is n x r.
// Scaling s = alpha / r, or alpha / sqrt(r) with rsLoRA (§scaling).
//
// Factors are shape-safe: a(), b(), magnitude() and the gradients return views that read and write like
// an Eigen::Map but never resize; assigning a matrix of another shape throws shape_error. Layers set whole
// factors with set_factors(), which also re-derives a DoRA magnitude.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "config.hpp"
#include "error.hpp"
#include "parameter.hpp"
#include "random.hpp"

namespace lora {

/// How A and B start (docs/CONVENTIONS.md §init). The layer kind picks the convention: dense layers
/// follow PEFT's Linear, embeddings PEFT's Embedding.
enum class init_method {
  peft_default,  ///< Dense: A ~ U(±1/√in) (kaiming-uniform, a = √5), B = 0. Embedding: A = 0, B ~ N(0, 1).
  gaussian,      ///< Dense: A ~ N(0, (1/r)²), B = 0. Embedding: as peft_default.
  random_ab,     ///< Both random (tests; ΔW ≠ 0). Dense: A as peft_default, B ~ N(0, 1/r). Embedding: N(0, 1).
  zeros,         ///< A = B = 0, for loading weights afterwards.
};

/// Hyper-parameters of one adapter. Defaults are PEFT's LoraConfig defaults (r = 8, lora_alpha = 8).
struct adapter_config {
  index rank = 8;           ///< r >= 1; may exceed min(in, out).
  double alpha = 8.0;       ///< lora_alpha > 0.
  double dropout = 0.0;     ///< Adapter-input dropout probability, in [0, 1).
  bool use_rslora = false;  ///< s = alpha / sqrt(r) instead of alpha / r.
  bool use_dora = false;    ///< DoRA: a trainable magnitude per output row (see dora.hpp).
  init_method init = init_method::peft_default;
  std::uint64_t seed = 0;  ///< Seeds the initialisation and the dropout stream.
};

/// Which PEFT module an adapter belongs to: it fixes the initialisation and the parameter names.
enum class adapter_kind {
  dense,      ///< Linear, Conv1D, Conv2d: "<layer>.lora_A.<adapter>.weight", "<layer>.lora_B.<adapter>.weight".
  embedding,  ///< Embedding: "<layer>.lora_embedding_A.<adapter>", "<layer>.lora_embedding_B.<adapter>";
              ///< dA is written sparsely (only the columns of the ids seen).
};

/// s = alpha / r, or alpha / sqrt(r) with rsLoRA.
inline double scaling_of(const adapter_config& c) {
  return c.use_rslora ? c.alpha / std::sqrt(static_cast<double>(c.rank)) : c.alpha / static_cast<double>(c.rank);
}

/// Throws config_error unless rank >= 1, alpha > 0 and finite, 0 <= dropout < 1. `where` names the layer.
void validate(const adapter_config& c, const std::string& where);

/// A fixed-shape view of a factor (A, B, the DoRA magnitude) or of a gradient. Reads and writes like an
/// Eigen::Map; assigning (=, +=, -=) an operand of another shape throws shape_error instead of resizing.
template <typename Plain>
class factor_view : public Eigen::Map<Plain> {
 public:
  using base_type = Eigen::Map<Plain>;
  using Scalar = typename Plain::Scalar;

  factor_view(Scalar* data, index rows, index cols, const std::string& owner, const char* what)
      : base_type(data, rows, cols), m_owner(&owner), m_what(what) {}
  factor_view(const factor_view&) = default;

  factor_view& operator=(const factor_view& other) {
    return assign(other, [](auto& l, const auto& r) { l = r; });
  }
  template <typename Other>
  factor_view& operator=(const Eigen::DenseBase<Other>& other) {
    return assign(other, [](auto& l, const auto& r) { l = r; });
  }
  template <typename Other>
  factor_view& operator+=(const Eigen::DenseBase<Other>& other) {
    return assign(other, [](auto& l, const auto& r) { l += r; });
  }
  template <typename Other>
  factor_view& operator-=(const Eigen::DenseBase<Other>& other) {
    return assign(other, [](auto& l, const auto& r) { l -= r; });
  }

 private:
  template <typename Other, typename Op>
  factor_view& assign(const Eigen::DenseBase<Other>& other, Op&& op);

  const std::string* m_owner;  // the adapter's label, for messages
  const char* m_what;          // "A (r x in)", ...
};

template <typename Scalar_>
class linear;
template <typename Scalar_>
class embedding;

/// One adapter of a layer. Created by a layer (add_adapter); exposes fixed-shape views of its factors and
/// gradients. Layers reach the caches below through friendship: they are not part of the public API.
template <typename Scalar_>
class adapter {
 public:
  using Scalar = Scalar_;
  using matrix_type = matrix<Scalar>;
  using vector_type = vector<Scalar>;
  using matrix_view = factor_view<matrix_type>;
  using vector_view = factor_view<vector_type>;

  /// A (r x in) and B (out x r) drawn from config.seed by the convention of `kind`. `label` names the
  /// adapter in messages ("linear 'q' adapter 'a'").
  adapter(std::string name, const adapter_config& config, index in, index out, adapter_kind kind, std::string label);

  const std::string& name() const noexcept { return m_name; }
  const adapter_config& config() const noexcept { return m_config; }
  adapter_kind kind() const noexcept { return m_kind; }
  index rank() const noexcept { return m_config.rank; }
  index in_features() const noexcept { return m_a.cols(); }
  index out_features() const noexcept { return m_b.rows(); }
  Scalar scaling() const noexcept { return m_scaling; }
  bool merged() const noexcept { return m_merged; }
  bool is_dora() const noexcept { return m_config.use_dora; }

  matrix_view a() { return view(m_a, "A (rank x in_features)"); }
  matrix_view b() { return view(m_b, "B (out_features x rank)"); }
  const matrix_type& a() const noexcept { return m_a; }  ///< r x in
  const matrix_type& b() const noexcept { return m_b; }  ///< out x r
  matrix_view grad_a() { return view(m_grad_a, "dA (rank x in_features)"); }
  matrix_view grad_b() { return view(m_grad_b, "dB (out_features x rank)"); }
  const matrix_type& grad_a() const noexcept { return m_grad_a; }
  const matrix_type& grad_b() const noexcept { return m_grad_b; }
  /// DoRA magnitude m (length out) and its gradient; empty unless is_dora().
  vector_view magnitude() { return view(m_magnitude, "magnitude (out_features)"); }
  vector_view grad_magnitude() { return view(m_grad_magnitude, "dm (out_features)"); }
  const vector_type& magnitude() const noexcept { return m_magnitude; }
  const vector_type& grad_magnitude() const noexcept { return m_grad_magnitude; }

  /// The dropout stream; its state belongs in checkpoints for bit-identical resumption.
  rng& dropout_rng() noexcept { return m_dropout_rng; }
  /// Sets dropout probability (0 <= p < 1); takes effect on the next forward.
  void set_dropout(double p);
  /// Redraws A and B from config().seed by the layer kind's convention (a DoRA magnitude is left as is).
  void reset_parameters();
  /// Zeroes the gradients (for an embedding adapter, only the columns of dA that backward wrote).
  void zero_grad();
  /// The (value, grad) views of A, B (and m), named as PEFT names them under `layer` (adapter_kind).
  parameter_list<Scalar> parameters(const std::string& layer);

 private:
  friend class linear<Scalar>;
  friend class embedding<Scalar>;

  template <typename Plain>
  factor_view<Plain> view(Plain& m, const char* what) {
    return factor_view<Plain>(m.data(), m.rows(), m.cols(), m_label, what);
  }
  /// Embedding adapters: records that backward wrote column `id` of dA.
  void touch(index id);
  /// Hot-swap (layer.hpp): factors a' (r' x in), b' (out x r') and scaling s' take this adapter's place.
  /// When r' <= the stored rank the storage stays: zeroed, a' fills A's leading rows and b' B's leading
  /// columns (ΔW = s' b' a': the zero rows and columns add nothing). Otherwise the factors grow to r'.
  /// Gradients are zeroed, caches dropped, and config's rank and alpha restated so that scaling_of(config)
  /// is s' at the stored rank. Returns true when no storage was reallocated.
  template <typename DA, typename DB>
  bool swap_in(const DA& a, const DB& b, const adapter_config& config);
  /// Zero-pads A and B to rank r >= rank() (PEFT's prepare_model_for_compiled_hotswap); ΔW and the scaling
  /// are unchanged.
  void pad_rank(index r);
  /// Sizes the gradients to the factors, zeroed, and forgets the forward cache and touched columns.
  void reset_state();

  std::string m_name, m_label;
  adapter_config m_config;
  adapter_kind m_kind;
  Scalar m_scaling;
  matrix_type m_a, m_b;                       // r x in, out x r
  matrix_type m_grad_a, m_grad_b;             // same shapes
  vector_type m_magnitude, m_grad_magnitude;  // DoRA: out
  vector_type m_dora_norm;                    // DoRA: ‖W + s B A‖ per output row, from the cached forward
  matrix_type m_h;                            // n x r cache: drop(X) Aᵀ from the last training forward
  std::vector<index> m_touched;               // embedding: columns of dA written since zero_grad()
  std::vector<std::uint8_t> m_marked;         // embedding: in = num flags, id is in m_touched
  rng m_dropout_rng;
  rng::state_type m_mask_state{};  // dropout stream state when the cached mask was drawn
  bool m_merged = false;
  bool m_in_cache = false;  // took part in the cached forward
  bool m_masked = false;    // the cached forward applied a dropout mask
};

// ---------------------------------------------------------------------------------------------------

inline void validate(const adapter_config& c, const std::string& where) {
  if (c.rank < 1) throw config_error(detail::cat(where, ": rank must be >= 1, got ", c.rank));
  if (!(c.alpha > 0.0) || !std::isfinite(c.alpha))
    throw config_error(detail::cat(where, ": alpha must be a finite value > 0, got ", c.alpha));
  if (!(c.dropout >= 0.0 && c.dropout < 1.0))
    throw config_error(detail::cat(where, ": dropout must be in [0, 1), got ", c.dropout));
}

template <typename Plain>
template <typename Other, typename Op>
factor_view<Plain>& factor_view<Plain>::assign(const Eigen::DenseBase<Other>& other, Op&& op) {
  static_assert(std::is_same_v<typename Other::Scalar, Scalar>,
                "lora::factor_view: the operand's scalar type differs from the adapter's (mismatched dtypes); "
                "cast it with .template cast<Scalar>()");
  if (other.rows() != this->rows() || other.cols() != this->cols())
    throw shape_error(detail::cat(*m_owner, ": ", m_what, " must stay ", detail::shape_str(this->rows(), this->cols()),
                                  ", got ", detail::shape_str(other.rows(), other.cols()),
                                  " (factors never resize; add a new adapter for another rank)"));
  base_type& self = *this;
  op(self, other.derived());
  return *this;
}

template <typename Scalar>
adapter<Scalar>::adapter(std::string name, const adapter_config& config, index in, index out, adapter_kind kind,
                         std::string label)
    : m_name(std::move(name)),
      m_label(std::move(label)),
      m_config(config),
      m_kind(kind),
      m_scaling(static_cast<Scalar>(scaling_of(config))),
      m_a(config.rank, in),
      m_b(out, config.rank),
      m_grad_a(matrix_type::Zero(config.rank, in)),
      m_grad_b(matrix_type::Zero(out, config.rank)),
      m_dropout_rng(config.seed ^ 0xd50f5a4c3b2e1d0full) {
  reset_parameters();
}

template <typename Scalar>
void adapter<Scalar>::set_dropout(double p) {
  adapter_config c = m_config;
  c.dropout = p;
  validate(c, m_label);
  m_config.dropout = p;
}

template <typename Scalar>
void adapter<Scalar>::reset_parameters() {
  rng gen(m_config.seed);
  const double in = static_cast<double>(m_a.cols());
  const double r = static_cast<double>(m_config.rank);
  const double bound = 1.0 / std::sqrt(in);  // kaiming_uniform(a = √5): gain · √(3 / in) = 1 / √in
  // Fills in storage order, so the values depend only on the seed and the shape.
  auto fill = [](matrix_type& m, auto&& draw) {
    for (index k = 0; k < m.size(); ++k) m.data()[k] = static_cast<Scalar>(draw());
  };
  auto uniform = [&] { return gen.uniform(-bound, bound); };
  auto normal = [&] { return gen.normal(); };
  const bool dense = m_kind == adapter_kind::dense;
  switch (m_config.init) {
    case init_method::peft_default:
    case init_method::gaussian:
      if (!dense) {  // PEFT's Embedding: A = 0, B ~ N(0, 1)
        m_a.setZero();
        fill(m_b, normal);
      } else {
        if (m_config.init == init_method::gaussian) {
          fill(m_a, [&] { return gen.normal() / r; });
        } else {
          fill(m_a, uniform);
        }
        m_b.setZero();
      }
      break;
    case init_method::random_ab:
      if (dense) {
        fill(m_a, uniform);
        fill(m_b, [&] { return gen.normal() / std::sqrt(r); });
      } else {
        fill(m_a, normal);
        fill(m_b, normal);
      }
      break;
    case init_method::zeros:
      m_a.setZero();
      m_b.setZero();
      break;
  }
}

template <typename Scalar>
void adapter<Scalar>::zero_grad() {
  m_grad_b.setZero();
  m_grad_magnitude.setZero();
  if (m_kind == adapter_kind::dense) {
    m_grad_a.setZero();
    return;
  }
  for (const index id : m_touched) {  // O(touched · r), never O(num · r)
    m_grad_a.col(id).setZero();
    m_marked[static_cast<std::size_t>(id)] = 0;
  }
  m_touched.clear();
}

template <typename Scalar>
void adapter<Scalar>::touch(index id) {
  if (m_marked.empty()) m_marked.assign(static_cast<std::size_t>(m_a.cols()), 0);
  auto& flag = m_marked[static_cast<std::size_t>(id)];
  if (!flag) {
    flag = 1;
    m_touched.push_back(id);
  }
}

template <typename Scalar>
template <typename DA, typename DB>
bool adapter<Scalar>::swap_in(const DA& a, const DB& b, const adapter_config& config) {
  const index r_new = a.rows(), stored = std::max(r_new, m_a.rows());
  const bool in_place = r_new <= m_a.rows();
  if (in_place) {
    m_a.setZero();
    m_b.setZero();
  } else {
    m_a.resize(r_new, m_a.cols());
    m_b.resize(m_b.rows(), r_new);
  }
  m_a.topRows(r_new) = a;
  m_b.leftCols(r_new) = b;
  m_scaling = static_cast<Scalar>(scaling_of(config));
  const double s = scaling_of(config), rs = static_cast<double>(stored);
  m_config.rank = stored;
  m_config.alpha = config.use_rslora ? s * std::sqrt(rs) : s * rs;  // scaling_of(m_config) == s at the stored rank
  reset_state();
  return in_place;
}

template <typename Scalar>
void adapter<Scalar>::pad_rank(index r) {
  const index r0 = m_a.rows();
  if (r == r0) return;
  const double s = scaling_of(m_config), rr = static_cast<double>(r);
  m_a.conservativeResize(r, Eigen::NoChange);
  m_a.bottomRows(r - r0).setZero();
  m_b.conservativeResize(Eigen::NoChange, r);
  m_b.rightCols(r - r0).setZero();
  m_config.alpha = m_config.use_rslora ? s * std::sqrt(rr) : s * rr;  // the scaling stays s
  m_config.rank = r;
  reset_state();
}

template <typename Scalar>
void adapter<Scalar>::reset_state() {
  m_grad_a.setZero(m_a.rows(), m_a.cols());
  m_grad_b.setZero(m_b.rows(), m_b.cols());
  m_h.resize(0, 0);
  m_touched.clear();
  std::fill(m_marked.begin(), m_marked.end(), std::uint8_t{0});
  m_in_cache = false;
  m_masked = false;
}

template <typename Scalar>
parameter_list<Scalar> adapter<Scalar>::parameters(const std::string& layer) {
  const bool dense = m_kind == adapter_kind::dense;
  auto param = [](std::string name, param_role role, auto& value, auto& grad) {
    return parameter<Scalar>{std::move(name), role, value.data(), grad.data(), value.rows(), value.cols()};
  };
  parameter_list<Scalar> out;
  if (dense) {
    out.push_back(param(layer + ".lora_A." + m_name + ".weight", param_role::lora_a, m_a, m_grad_a));
    out.push_back(param(layer + ".lora_B." + m_name + ".weight", param_role::lora_b, m_b, m_grad_b));
  } else {
    out.push_back(param(layer + ".lora_embedding_A." + m_name, param_role::lora_a, m_a, m_grad_a));
    out.push_back(param(layer + ".lora_embedding_B." + m_name, param_role::lora_b, m_b, m_grad_b));
  }
  if (is_dora())
    out.push_back(param(layer + ".lora_magnitude_vector." + m_name, param_role::vector, m_magnitude, m_grad_magnitude));
  return out;
}

}  // namespace lora
