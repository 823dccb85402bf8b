// lora/optim/adam.hpp: Adam and AdamW with the semantics and defaults of torch.optim.Adam and
// torch.optim.AdamW (PyTorch 2.x, _single_tensor_adam; AdamW is Adam with decoupled weight decay).
// Per element, with g the gradient, p the parameter, t the step number (1 for the first step), lr the
// parameter's learning rate, m, v (and v_max with amsgrad) the state:
//
//   g = g + weight_decay * p                         (Adam, L2 penalty, if weight_decay != 0)
//   p = p * (1 - lr * weight_decay)                  (AdamW, decoupled, before the update)
//   m = m + (1 - beta1) * (g - m)                    (exp_avg.lerp_(g, 1 - beta1))
//   v = beta2 * v + (1 - beta2) * g * g              (exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2))
//   v_max = max(v_max, v)                            (amsgrad only; then v_max replaces v below)
//   denom = sqrt(v) / sqrt(1 - beta2^t) + eps        (eps outside the root, after bias correction)
//   p = p - (lr / (1 - beta1^t)) * m / denom
//
// The step-dependent constants are computed in double and rounded to Scalar once per step, as
// PyTorch does with its Python-float hyper-parameters.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "optimizer.hpp"

namespace lora::optim {

/// Hyper-parameters of adam, with torch.optim.Adam's defaults.
struct adam_options {
  double lr = 1e-3;
  double beta1 = 0.9;         ///< In [0, 1).
  double beta2 = 0.999;       ///< In [0, 1).
  double eps = 1e-8;          ///< >= 0, added to the bias-corrected sqrt(v).
  double weight_decay = 0.0;  ///< >= 0. Adam: L2 added to the gradient; AdamW: decoupled decay.
  bool amsgrad = false;       ///< Use the running maximum of v (Reddi et al. 2018).
};

/// Hyper-parameters of adamw: adam's, with torch.optim.AdamW's weight_decay = 1e-2.
struct adamw_options : adam_options {
  adamw_options() { weight_decay = 1e-2; }
};

/// torch.optim.Adam. State per parameter: "exp_avg", "exp_avg_sq", and "max_exp_avg_sq" with amsgrad.
template <typename Scalar_>
class adam : public optimizer<Scalar_> {
 public:
  using Scalar = Scalar_;

  /// Throws config_error for an invalid option (the messages name the option and its value).
  explicit adam(parameter_list<Scalar> params, const adam_options& options = {})
      : adam("adam", std::move(params), options, false) {}

  const adam_options& options() const noexcept { return m_options; }
  /// True for AdamW: weight decay shrinks p directly instead of being added to the gradient.
  bool decoupled_weight_decay() const noexcept { return m_decoupled; }

 protected:
  adam(std::string kind, parameter_list<Scalar> params, const adam_options& options, bool decoupled);
  void update(std::size_t k, double lr) override;

 private:
  /// Checks the options (config_error) and returns the names of the state tensors they need.
  static std::vector<std::string> validated_slots(const std::string& kind, const adam_options& o);

  adam_options m_options;
  bool m_decoupled;
};

/// torch.optim.AdamW: adam with decoupled weight decay (Loshchilov & Hutter 2019) and its defaults.
template <typename Scalar_>
class adamw : public adam<Scalar_> {
 public:
  using Scalar = Scalar_;

  explicit adamw(parameter_list<Scalar> params, const adamw_options& options = {})
      : adam<Scalar>("adamw", std::move(params), options, true) {}
};

// ---------------------------------------------------------------------------------------------------

template <typename Scalar>
std::vector<std::string> adam<Scalar>::validated_slots(const std::string& kind, const adam_options& o) {
  detail::check_hyper(kind, "beta1", o.beta1, 0.0, 1.0, true);
  detail::check_hyper(kind, "beta2", o.beta2, 0.0, 1.0, true);
  detail::check_hyper(kind, "eps", o.eps, 0.0);
  detail::check_hyper(kind, "weight_decay", o.weight_decay, 0.0);
  if (o.amsgrad) return {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  return {"exp_avg", "exp_avg_sq"};
}

template <typename Scalar>
adam<Scalar>::adam(std::string kind, parameter_list<Scalar> params, const adam_options& options, bool decoupled)
    : optimizer<Scalar>(kind, std::move(params), options.lr, validated_slots(kind, options)),
      m_options(options),
      m_decoupled(decoupled) {}

template <typename Scalar>
void adam<Scalar>::update(std::size_t k, double lr) {
  const parameter<Scalar>& p = this->parameters()[k];
  Scalar* value = p.value_data;
  const Scalar* grad = p.grad_data;
  Scalar* m = this->state_of(k, 0).data();
  Scalar* v = this->state_of(k, 1).data();
  Scalar* v_max = m_options.amsgrad ? this->state_of(k, 2).data() : nullptr;

  const double t = static_cast<double>(this->step_count());
  const double bias_correction1 = 1.0 - std::pow(m_options.beta1, t);
  const double bias_correction2 = 1.0 - std::pow(m_options.beta2, t);
  const Scalar step_size = static_cast<Scalar>(lr / bias_correction1);
  const Scalar bias_correction2_sqrt = static_cast<Scalar>(std::sqrt(bias_correction2));
  const Scalar one_minus_beta1 = static_cast<Scalar>(1.0 - m_options.beta1);
  const Scalar beta2 = static_cast<Scalar>(m_options.beta2);
  const Scalar one_minus_beta2 = static_cast<Scalar>(1.0 - m_options.beta2);
  const Scalar eps = static_cast<Scalar>(m_options.eps);
  const Scalar wd = static_cast<Scalar>(m_options.weight_decay);
  const bool l2 = !m_decoupled && m_options.weight_decay != 0.0;
  const bool decay = m_decoupled && m_options.weight_decay != 0.0;
  const Scalar decay_factor = static_cast<Scalar>(1.0 - lr * m_options.weight_decay);

  for (index i = 0; i < p.size(); ++i) {
    Scalar g = grad[i];
    if (l2) g = g + wd * value[i];
    if (decay) value[i] = value[i] * decay_factor;
    m[i] = m[i] + one_minus_beta1 * (g - m[i]);
    v[i] = beta2 * v[i] + one_minus_beta2 * g * g;
    Scalar second = v[i];
    if (v_max != nullptr) second = v_max[i] = std::max(v_max[i], v[i]);
    const Scalar denom = std::sqrt(second) / bias_correction2_sqrt + eps;
    value[i] = value[i] - step_size * m[i] / denom;
  }
}

}  // namespace lora::optim
