// lora/optim/sgd.hpp: stochastic gradient descent with momentum, dampening, Nesterov momentum and L2
// weight decay, with the semantics of torch.optim.SGD (PyTorch 2.x, _single_tensor_sgd). Per element,
// with g the gradient, p the parameter, b the momentum buffer, lr the parameter's learning rate:
//
//   g = g + weight_decay * p                        (if weight_decay != 0)
//   b = g                                           (first step)
//   b = momentum * b + (1 - dampening) * g          (later steps)           } if momentum != 0
//   g = nesterov ? g + momentum * b : b                                     }
//   p = p - lr * g
#pragma once

#include <string>
#include <vector>

#include "optimizer.hpp"

namespace lora::optim {

/// Hyper-parameters of sgd, with PyTorch's defaults.
struct sgd_options {
  double lr = 1e-3;
  double momentum = 0.0;      ///< >= 0; 0 keeps no state.
  double dampening = 0.0;     ///< In [0, 1]; scales the new gradient in the buffer by (1 - dampening).
  double weight_decay = 0.0;  ///< >= 0, L2: added to the gradient as weight_decay * p.
  bool nesterov = false;      ///< Needs momentum > 0 and dampening = 0, as in PyTorch.
};

/// torch.optim.SGD. State: one "momentum_buffer" per parameter when momentum != 0, none otherwise.
template <typename Scalar_>
class sgd : public optimizer<Scalar_> {
 public:
  using Scalar = Scalar_;

  /// Throws config_error for an invalid option (the messages name the option and its value).
  explicit sgd(parameter_list<Scalar> params, const sgd_options& options = {});

  const sgd_options& options() const noexcept { return m_options; }

 protected:
  void update(std::size_t k, double lr) override;

 private:
  /// Checks the options (config_error) and returns the names of the state tensors they need.
  static std::vector<std::string> validated_slots(const sgd_options& o);

  sgd_options m_options;
};

// ---------------------------------------------------------------------------------------------------

template <typename Scalar>
std::vector<std::string> sgd<Scalar>::validated_slots(const sgd_options& o) {
  detail::check_hyper("sgd", "momentum", o.momentum, 0.0);
  detail::check_hyper("sgd", "dampening", o.dampening, 0.0, 1.0);
  detail::check_hyper("sgd", "weight_decay", o.weight_decay, 0.0);
  if (o.nesterov && (o.momentum <= 0.0 || o.dampening != 0.0)) {
    throw config_error(detail::cat("sgd: nesterov momentum requires momentum > 0 and dampening = 0, got momentum ",
                                   o.momentum, " and dampening ", o.dampening));
  }
  if (o.momentum == 0.0) return {};
  return {"momentum_buffer"};
}

template <typename Scalar>
sgd<Scalar>::sgd(parameter_list<Scalar> params, const sgd_options& options)
    : optimizer<Scalar>("sgd", std::move(params), options.lr, validated_slots(options)), m_options(options) {}

template <typename Scalar>
void sgd<Scalar>::update(std::size_t k, double lr) {
  const parameter<Scalar>& p = this->parameters()[k];
  Scalar* value = p.value_data;
  const Scalar* grad = p.grad_data;
  const Scalar wd = static_cast<Scalar>(m_options.weight_decay);
  const Scalar momentum = static_cast<Scalar>(m_options.momentum);
  const Scalar keep = static_cast<Scalar>(1.0 - m_options.dampening);
  const Scalar rate = static_cast<Scalar>(lr);
  const bool use_momentum = m_options.momentum != 0.0;
  const bool first = this->step_count() == 1;  // PyTorch: the buffer is None before the first step
  Scalar* buf = use_momentum ? this->state_of(k, 0).data() : nullptr;
  for (index i = 0; i < p.size(); ++i) {
    Scalar g = grad[i];
    if (m_options.weight_decay != 0.0) g = g + wd * value[i];
    if (use_momentum) {
      buf[i] = first ? g : momentum * buf[i] + keep * g;
      g = m_options.nesterov ? g + momentum * buf[i] : buf[i];
    }
    value[i] = value[i] - rate * g;
  }
}

}  // namespace lora::optim
