// lora/adapter.hpp: one named low-rank adapter, dW = s * B A, with its hyper-parameters, its
// factors, their gradients and the state its forward pass caches for backward.
//
// Shapes (PyTorch orientation, see REFERENCE.md §1): A is r x in, B is out x r, the cache H = drop(X) Aᵀ
// is n x r. Scaling s = alpha / r, or alpha / sqrt(r) with rsLoRA.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "config.hpp"
#include "error.hpp"
#include "random.hpp"

namespace lora {

/// How A and B start (REFERENCE.md §2).
enum class init_method {
  peft_default,  ///< A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a = sqrt(5)), B = 0.
  gaussian,      ///< A ~ N(0, (1/r)^2), B = 0.
  random_ab,     ///< A and B both random (A as peft_default, B ~ N(0, 1/r)): for tests; dW != 0.
  zeros,         ///< A = B = 0, for loading weights afterwards.
};

/// Hyper-parameters of one adapter. Defaults are PEFT's LoraConfig defaults (r = 8, lora_alpha = 8).
struct adapter_config {
  index rank = 8;           ///< r >= 1; may exceed min(in, out).
  double alpha = 8.0;       ///< lora_alpha > 0.
  double dropout = 0.0;     ///< Adapter-input dropout probability, in [0, 1).
  bool use_rslora = false;  ///< s = alpha / sqrt(r) instead of alpha / r.
  bool use_dora = false;    ///< DoRA: a trainable magnitude per output row (see linear.hpp).
  init_method init = init_method::peft_default;
  std::uint64_t seed = 0;  ///< Seeds the initialisation and the dropout stream.
};

/// s = alpha / r, or alpha / sqrt(r) with rsLoRA.
inline double scaling_of(const adapter_config& c) {
  return c.use_rslora ? c.alpha / std::sqrt(static_cast<double>(c.rank)) : c.alpha / static_cast<double>(c.rank);
}

/// Throws config_error unless rank >= 1, alpha > 0 and finite, 0 <= dropout < 1. `where` names the layer.
void validate(const adapter_config& c, const std::string& where);

template <typename Scalar_>
class linear;

/// One adapter of a layer. Created by a layer (add_adapter); exposes its factors and gradients.
template <typename Scalar_>
class adapter {
 public:
  using Scalar = Scalar_;
  using matrix_type = matrix<Scalar>;

  adapter(std::string name, const adapter_config& config, index in, index out);

  const std::string& name() const noexcept { return m_name; }
  const adapter_config& config() const noexcept { return m_config; }
  index rank() const noexcept { return m_config.rank; }
  Scalar scaling() const noexcept { return m_scaling; }
  bool merged() const noexcept { return m_merged; }

  matrix_type& a() noexcept { return m_a; }  ///< r x in
  matrix_type& b() noexcept { return m_b; }  ///< out x r
  const matrix_type& a() const noexcept { return m_a; }
  const matrix_type& b() const noexcept { return m_b; }
  matrix_type& grad_a() noexcept { return m_grad_a; }
  matrix_type& grad_b() noexcept { return m_grad_b; }
  const matrix_type& grad_a() const noexcept { return m_grad_a; }
  const matrix_type& grad_b() const noexcept { return m_grad_b; }
  /// DoRA magnitude m (length out) and its gradient; empty unless config().use_dora.
  vector<Scalar>& magnitude() noexcept { return m_magnitude; }
  const vector<Scalar>& magnitude() const noexcept { return m_magnitude; }
  vector<Scalar>& grad_magnitude() noexcept { return m_grad_magnitude; }
  const vector<Scalar>& grad_magnitude() const noexcept { return m_grad_magnitude; }
  bool is_dora() const noexcept { return m_config.use_dora; }

  /// The dropout stream; its state belongs in checkpoints for bit-identical resumption.
  rng& dropout_rng() noexcept { return m_dropout_rng; }

  /// Sets dropout probability (0 <= p < 1); takes effect on the next forward.
  void set_dropout(double p);

  /// Fills A and B according to config().init, drawing from a stream seeded by config().seed.
  void reset_parameters();

  /// Zeroes the gradients of A and B.
  void zero_grad() {
    m_grad_a.setZero();
    m_grad_b.setZero();
    m_grad_magnitude.setZero();
  }

 private:
  friend class linear<Scalar>;

  std::string m_name;
  adapter_config m_config;
  Scalar m_scaling;
  matrix_type m_a, m_b;                          // r x in, out x r
  matrix_type m_grad_a, m_grad_b;                // same shapes
  vector<Scalar> m_magnitude, m_grad_magnitude;  // DoRA: out
  vector<Scalar> m_dora_norm;  // DoRA: ‖W + s B A‖ per output row, from the cached forward (a constant)
  matrix_type m_h;             // n x r cache: drop(X) Aᵀ from the last training forward
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

template <typename Scalar>
adapter<Scalar>::adapter(std::string name, const adapter_config& config, index in, index out)
    : m_name(std::move(name)),
      m_config(config),
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
  validate(c, "adapter '" + m_name + "'");
  m_config.dropout = p;
}

template <typename Scalar>
void adapter<Scalar>::reset_parameters() {
  rng gen(m_config.seed);
  const double in = static_cast<double>(m_a.cols());
  const double r = static_cast<double>(m_config.rank);
  const double bound = 1.0 / std::sqrt(in);  // kaiming_uniform(a = sqrt(5)): gain * sqrt(3 / in) = 1 / sqrt(in)
  // Fills in storage order, so the values depend only on the seed and the shape.
  auto fill = [](matrix_type& m, auto&& draw) {
    for (index k = 0; k < m.size(); ++k) m.data()[k] = static_cast<Scalar>(draw());
  };
  auto uniform_a = [&] { fill(m_a, [&] { return gen.uniform(-bound, bound); }); };
  switch (m_config.init) {
    case init_method::peft_default:
      uniform_a();
      m_b.setZero();
      break;
    case init_method::gaussian:
      fill(m_a, [&] { return gen.normal() / r; });
      m_b.setZero();
      break;
    case init_method::random_ab:
      uniform_a();
      fill(m_b, [&] { return gen.normal() / std::sqrt(r); });
      break;
    case init_method::zeros:
      m_a.setZero();
      m_b.setZero();
      break;
  }
}

}  // namespace lora
