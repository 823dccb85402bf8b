// lora/optim/clip.hpp: global gradient-norm clipping and the non-finite check of gradients.
//
// clip_grad_norm follows torch.nn.utils.clip_grad_norm_ (norm_type 2): with the total norm
// N = sqrt(sum over parameters and elements of g^2), every gradient is multiplied by
// max_norm / (N + 1e-6) when that factor is below 1, and N is returned. Differences: N is accumulated
// in double whatever Scalar is (PyTorch sums in the gradients' dtype), and a non-finite N leaves the
// gradients alone (PyTorch, with error_if_nonfinite=False, multiplies them by NaN or 0).
#pragma once

#include <cmath>
#include <cstddef>
#include <string>

#include "../error.hpp"
#include "../parameter.hpp"

namespace lora::optim {

/// Where the first non-finite gradient element is; param == nullptr when every element is finite.
template <typename Scalar>
struct nonfinite_grad {
  const parameter<Scalar>* param = nullptr;
  index at = 0;      ///< Flat index into the parameter (storage order).
  Scalar value = 0;  ///< The offending NaN or infinity.

  explicit operator bool() const noexcept { return param != nullptr; }
  /// "gradient of parameter 'fc1.lora_A' (4x8) is nan at element 3".
  std::string describe() const;
};

/// The total L2 norm of all gradients, accumulated in double.
template <typename Scalar>
double grad_norm(const parameter_list<Scalar>& params);

/// Scales all gradients so that their total L2 norm is at most max_norm (PyTorch's clip_grad_norm_).
/// Returns the norm before clipping. Throws config_error unless max_norm is finite and >= 0.
template <typename Scalar>
double clip_grad_norm(const parameter_list<Scalar>& params, double max_norm);

/// The first non-finite gradient element, in parameter order (empty result when all are finite).
template <typename Scalar>
nonfinite_grad<Scalar> find_nonfinite_grad(const parameter_list<Scalar>& params);

/// Throws numeric_error naming the parameter, the element and the value of the first non-finite
/// gradient element; does nothing when every gradient is finite.
template <typename Scalar>
void check_grads_finite(const parameter_list<Scalar>& params);

// ---------------------------------------------------------------------------------------------------

template <typename Scalar>
std::string nonfinite_grad<Scalar>::describe() const {
  if (param == nullptr) return "every gradient is finite";
  return detail::cat("gradient of parameter '", param->name, "' (", detail::shape_str(param->rows, param->cols),
                     ") is ", value, " at element ", at);
}

template <typename Scalar>
double grad_norm(const parameter_list<Scalar>& params) {
  double sum_sq = 0.0;
  for (const auto& p : params) sum_sq += p.grad().template cast<double>().squaredNorm();
  return std::sqrt(sum_sq);
}

template <typename Scalar>
double clip_grad_norm(const parameter_list<Scalar>& params, double max_norm) {
  if (!(std::isfinite(max_norm) && max_norm >= 0.0)) {
    throw config_error(detail::cat("clip_grad_norm: max_norm must be finite and >= 0, got ", max_norm));
  }
  const double total = grad_norm(params);
  const double coef = max_norm / (total + 1e-6);  // torch: clip_coef = max_norm / (total_norm + 1e-6)
  if (std::isfinite(total) && coef < 1.0) {
    for (const auto& p : params) p.grad() *= static_cast<Scalar>(coef);
  }
  return total;
}

template <typename Scalar>
nonfinite_grad<Scalar> find_nonfinite_grad(const parameter_list<Scalar>& params) {
  for (const auto& p : params) {
    if (p.grad().allFinite()) continue;  // vectorised; the element loop below runs only to name the culprit
    const Scalar* g = p.grad_data;
    for (index i = 0; i < p.size(); ++i) {
      if (!std::isfinite(g[i])) return {&p, i, g[i]};
    }
  }
  return {};
}

template <typename Scalar>
void check_grads_finite(const parameter_list<Scalar>& params) {
  if (const auto bad = find_nonfinite_grad(params)) throw numeric_error(bad.describe());
}

}  // namespace lora::optim
