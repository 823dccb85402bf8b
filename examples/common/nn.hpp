// examples/common/nn.hpp: the few neural-network ops the examples train with, written the llm.c way:
// every op is a forward/backward pair whose comment gives the shapes. A batch holds one sample per row
// (X: n x in); weights use the PyTorch orientation (W: out x in), so a dense layer is Y = X Wᵀ + 1 bᵀ.
// Backward passes accumulate parameter gradients (+=) and overwrite input gradients (=), as in llm.c;
// call zero_grad() before each step.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <lora/config.hpp>
#include <lora/error.hpp>
#include <lora/parameter.hpp>
#include <lora/random.hpp>
#include <string>
#include <vector>

#include "strings.hpp"

namespace ex {

/// A fully connected layer Y = X Wᵀ + 1 bᵀ, PyTorch's nn.Linear. X: n x in, W: out x in, b: out, Y: n x out.
template <typename Scalar_>
class dense {
 public:
  using Scalar = Scalar_;

  dense() = default;
  /// An in -> out layer initialised by init(gen).
  dense(lora::index in_features, lora::index out_features, lora::rng& gen);

  /// PyTorch's nn.Linear default: kaiming_uniform(a = √5) for W, i.e. W ~ U(-1/√in, 1/√in), and
  /// b ~ U(-1/√in, 1/√in); W drawn row by row, then b. Zeroes the gradients.
  void init(lora::rng& gen);

  lora::index in_features() const noexcept { return weight.cols(); }
  lora::index out_features() const noexcept { return weight.rows(); }

  /// y = x Wᵀ + 1 bᵀ. x: n x in, y: n x out (resized; must not alias x). Caches x for backward.
  void forward(const Eigen::Ref<const lora::matrix<Scalar>>& x, lora::matrix<Scalar>& y);
  /// forward without caching x, for evaluation.
  void apply(const Eigen::Ref<const lora::matrix<Scalar>>& x, lora::matrix<Scalar>& y) const;
  /// dW += dyᵀ x (out x in), db += dyᵀ 1 (out), dx = dy W (n x in). dy: n x out, from the last forward.
  void backward(const Eigen::Ref<const lora::matrix<Scalar>>& dy, lora::matrix<Scalar>& dx);
  /// backward without dx, for a first layer whose input needs no gradient.
  void backward(const Eigen::Ref<const lora::matrix<Scalar>>& dy);
  /// dW = 0, db = 0.
  void zero_grad();

  /// "<prefix>.weight" (role dense, out x in, column-major) and "<prefix>.bias" (role vector, out x 1).
  lora::parameter_list<Scalar> parameters(const std::string& prefix);

  lora::matrix<Scalar> weight;       ///< W: out x in
  lora::vector<Scalar> bias;         ///< b: out
  lora::matrix<Scalar> weight_grad;  ///< dL/dW: out x in
  lora::vector<Scalar> bias_grad;    ///< dL/db: out

 private:
  void check_input(lora::index cols) const;
  void accumulate_grads(const Eigen::Ref<const lora::matrix<Scalar>>& dy);

  lora::matrix<Scalar> m_input;  ///< x of the last forward: n x in
};

/// y = max(x, 0). x, y: n x d (y resized; may be x itself).
template <typename Derived>
void relu_forward(const Eigen::MatrixBase<Derived>& x, lora::matrix<typename Derived::Scalar>& y);
/// dx = dy ⊙ [y > 0], from relu's output y. y, dy, dx: n x d (dx resized; may be dy itself).
template <typename DerivedY, typename DerivedDy>
void relu_backward(const Eigen::MatrixBase<DerivedY>& y, const Eigen::MatrixBase<DerivedDy>& dy,
                   lora::matrix<typename DerivedY::Scalar>& dx);

/// Softmax cross-entropy, the mean over the batch:
///   loss = (1/n) Σ_i [ log Σ_j exp(z_ij) − z_i,y_i ],  probs_ij = exp(z_ij) / Σ_k exp(z_ik),
/// both computed through m_i = max_j z_ij (log-sum-exp), so large logits neither overflow nor lose
/// the loss. logits: n x C, labels: n values in [0, C), probs: n x C (resized). Returns the loss.
template <typename Derived>
double softmax_cross_entropy_forward(const Eigen::MatrixBase<Derived>& logits, const std::vector<int>& labels,
                                     lora::matrix<typename Derived::Scalar>& probs);
/// dlogits = (probs − onehot(labels)) / n. probs, dlogits: n x C (dlogits resized; may be probs itself).
template <typename Scalar>
void softmax_cross_entropy_backward(const lora::matrix<Scalar>& probs, const std::vector<int>& labels,
                                    lora::matrix<Scalar>& dlogits);

/// Rows whose largest logit (the first, on ties) is at the label. logits: n x C, labels: n.
template <typename Derived>
lora::index count_correct(const Eigen::MatrixBase<Derived>& logits, const std::vector<int>& labels);
/// count_correct / n, 0 for an empty batch.
template <typename Derived>
double accuracy(const Eigen::MatrixBase<Derived>& logits, const std::vector<int>& labels);

/// The order in which an epoch visits `samples` samples in batches of batch_size (the last one may be
/// short). shuffle() draws a fresh Fisher-Yates permutation from a seeded lora::rng, so a run's
/// epochs are reproducible from its seed; call it at the start of every epoch.
class minibatches {
 public:
  minibatches(lora::index samples, lora::index batch_size, std::uint64_t seed);

  /// A fresh uniformly random order of [0, samples).
  void shuffle();

  lora::index samples() const noexcept { return static_cast<lora::index>(m_order.size()); }
  lora::index batch_size() const noexcept { return m_batch_size; }
  /// Batches per epoch, ⌈samples / batch_size⌉.
  lora::index count() const noexcept { return (samples() + m_batch_size - 1) / m_batch_size; }
  /// Samples in batch k < count().
  lora::index size(lora::index k) const noexcept { return std::min(m_batch_size, samples() - k * m_batch_size); }
  /// The size(k) sample indices of batch k.
  const lora::index* rows(lora::index k) const noexcept { return m_order.data() + k * m_batch_size; }
  /// The whole epoch's order.
  const std::vector<lora::index>& order() const noexcept { return m_order; }

 private:
  std::vector<lora::index> m_order;
  lora::index m_batch_size;
  lora::rng m_rng;
};

/// out = x[rows[0..count), :], count x x.cols(). out is resized only when its shape changes, so a
/// training loop reuses one buffer (reallocating only for a short last batch).
template <typename Scalar>
void gather_rows(const lora::matrix<Scalar>& x, const lora::index* rows, lora::index count, lora::matrix<Scalar>& out);
/// out = y[rows[0..count)].
inline void gather_labels(const std::vector<int>& y, const lora::index* rows, lora::index count, std::vector<int>& out);

// ---------------------------------------------------------------------------------------------------

template <typename Scalar>
dense<Scalar>::dense(lora::index in_features, lora::index out_features, lora::rng& gen) {
  if (in_features <= 0 || out_features <= 0) {
    throw lora::config_error(cat("dense layer ", in_features, "->", out_features, ": both sizes must be positive"));
  }
  weight.resize(out_features, in_features);
  bias.resize(out_features);
  init(gen);
}

template <typename Scalar>
void dense<Scalar>::init(lora::rng& gen) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_features()));
  for (lora::index o = 0; o < out_features(); ++o) {
    for (lora::index i = 0; i < in_features(); ++i) weight(o, i) = static_cast<Scalar>(gen.uniform(-bound, bound));
  }
  for (lora::index o = 0; o < out_features(); ++o) bias(o) = static_cast<Scalar>(gen.uniform(-bound, bound));
  weight_grad.setZero(out_features(), in_features());
  bias_grad.setZero(out_features());
}

template <typename Scalar>
void dense<Scalar>::check_input(lora::index cols) const {
  if (cols != in_features()) {
    throw lora::shape_error(cat("dense layer ", in_features(), "->", out_features(), ": input has ", cols,
                                " columns, expected ", in_features()));
  }
}

template <typename Scalar>
void dense<Scalar>::forward(const Eigen::Ref<const lora::matrix<Scalar>>& x, lora::matrix<Scalar>& y) {
  apply(x, y);
  m_input = x;
}

template <typename Scalar>
void dense<Scalar>::apply(const Eigen::Ref<const lora::matrix<Scalar>>& x, lora::matrix<Scalar>& y) const {
  check_input(x.cols());
  y.resize(x.rows(), out_features());
  y.noalias() = x * weight.transpose();  // n x out
  y.rowwise() += bias.transpose();
}

template <typename Scalar>
void dense<Scalar>::accumulate_grads(const Eigen::Ref<const lora::matrix<Scalar>>& dy) {
  if (dy.cols() != out_features() || dy.rows() != m_input.rows() || m_input.cols() != in_features()) {
    throw lora::shape_error(cat("dense layer ", in_features(), "->", out_features(), ": dy is ",
                                shape_str(dy.rows(), dy.cols()), ", expected ",
                                shape_str(m_input.rows(), out_features()), " (the batch of the last forward)"));
  }
  weight_grad.noalias() += dy.transpose() * m_input;  // out x in
  bias_grad.noalias() += dy.colwise().sum().transpose();
}

template <typename Scalar>
void dense<Scalar>::backward(const Eigen::Ref<const lora::matrix<Scalar>>& dy, lora::matrix<Scalar>& dx) {
  accumulate_grads(dy);
  dx.resize(dy.rows(), in_features());
  dx.noalias() = dy * weight;  // n x in
}

template <typename Scalar>
void dense<Scalar>::backward(const Eigen::Ref<const lora::matrix<Scalar>>& dy) {
  accumulate_grads(dy);
}

template <typename Scalar>
void dense<Scalar>::zero_grad() {
  weight_grad.setZero();
  bias_grad.setZero();
}

template <typename Scalar>
lora::parameter_list<Scalar> dense<Scalar>::parameters(const std::string& prefix) {
  return {
      {prefix + ".weight", lora::param_role::dense, weight.data(), weight_grad.data(), out_features(), in_features()},
      {prefix + ".bias", lora::param_role::vector, bias.data(), bias_grad.data(), out_features(), 1},
  };
}

template <typename Derived>
void relu_forward(const Eigen::MatrixBase<Derived>& x, lora::matrix<typename Derived::Scalar>& y) {
  y = x.cwiseMax(typename Derived::Scalar(0));
}

template <typename DerivedY, typename DerivedDy>
void relu_backward(const Eigen::MatrixBase<DerivedY>& y, const Eigen::MatrixBase<DerivedDy>& dy,
                   lora::matrix<typename DerivedY::Scalar>& dx) {
  using Scalar = typename DerivedY::Scalar;
  if (y.rows() != dy.rows() || y.cols() != dy.cols()) {
    throw lora::shape_error(cat("relu_backward: dy is ", shape_str(dy.rows(), dy.cols()), ", the forward output is ",
                                shape_str(y.rows(), y.cols())));
  }
  dx = (y.array() > Scalar(0)).select(dy, Scalar(0));
}

namespace detail {

inline void check_labels(const char* op, lora::index rows, lora::index classes, const std::vector<int>& labels) {
  if (static_cast<lora::index>(labels.size()) != rows) {
    throw lora::shape_error(cat(op, ": ", labels.size(), " labels for ", rows, " rows of logits"));
  }
  for (std::size_t i = 0; i < labels.size(); ++i) {
    if (labels[i] < 0 || labels[i] >= classes) {
      throw lora::shape_error(cat(op, ": label ", labels[i], " at row ", i, " is outside [0, ", classes, ")"));
    }
  }
}

}  // namespace detail

template <typename Derived>
double softmax_cross_entropy_forward(const Eigen::MatrixBase<Derived>& logits, const std::vector<int>& labels,
                                     lora::matrix<typename Derived::Scalar>& probs) {
  using Scalar = typename Derived::Scalar;
  const lora::index n = logits.rows();
  const lora::index classes = logits.cols();
  detail::check_labels("softmax_cross_entropy_forward", n, classes, labels);
  probs.resize(n, classes);
  double loss = 0.0;
  for (lora::index i = 0; i < n; ++i) {
    Scalar m = logits(i, 0);
    for (lora::index j = 1; j < classes; ++j) m = std::max(m, logits(i, j));
    Scalar sum = 0;
    for (lora::index j = 0; j < classes; ++j) {
      probs(i, j) = std::exp(logits(i, j) - m);  // in (0, 1]
      sum += probs(i, j);                        // in [1, C]
    }
    for (lora::index j = 0; j < classes; ++j) probs(i, j) /= sum;
    loss += static_cast<double>(std::log(sum)) + static_cast<double>(m - logits(i, labels[i]));
  }
  return n > 0 ? loss / static_cast<double>(n) : 0.0;
}

template <typename Scalar>
void softmax_cross_entropy_backward(const lora::matrix<Scalar>& probs, const std::vector<int>& labels,
                                    lora::matrix<Scalar>& dlogits) {
  const lora::index n = probs.rows();
  detail::check_labels("softmax_cross_entropy_backward", n, probs.cols(), labels);
  dlogits = probs;
  for (lora::index i = 0; i < n; ++i) dlogits(i, labels[i]) -= Scalar(1);
  if (n > 0) dlogits /= static_cast<Scalar>(n);
}

template <typename Derived>
lora::index count_correct(const Eigen::MatrixBase<Derived>& logits, const std::vector<int>& labels) {
  detail::check_labels("count_correct", logits.rows(), logits.cols(), labels);
  lora::index correct = 0;
  for (lora::index i = 0; i < logits.rows(); ++i) {
    lora::index best = 0;
    logits.row(i).maxCoeff(&best);
    correct += best == labels[i];
  }
  return correct;
}

template <typename Derived>
double accuracy(const Eigen::MatrixBase<Derived>& logits, const std::vector<int>& labels) {
  const lora::index n = logits.rows();
  return n > 0 ? static_cast<double>(count_correct(logits, labels)) / static_cast<double>(n) : 0.0;
}

inline minibatches::minibatches(lora::index samples, lora::index batch_size, std::uint64_t seed)
    : m_order(static_cast<std::size_t>(std::max<lora::index>(samples, 0))), m_batch_size(batch_size), m_rng(seed) {
  if (samples <= 0 || batch_size <= 0) {
    throw lora::config_error(
        cat("minibatches: ", samples, " samples in batches of ", batch_size, "; both must be positive"));
  }
  for (lora::index i = 0; i < samples; ++i) m_order[i] = i;
}

inline void minibatches::shuffle() {
  for (std::size_t i = m_order.size() - 1; i > 0; --i) {
    std::swap(m_order[i], m_order[m_rng.below(i + 1)]);
  }
}

template <typename Scalar>
void gather_rows(const lora::matrix<Scalar>& x, const lora::index* rows, lora::index count, lora::matrix<Scalar>& out) {
  out.resize(count, x.cols());
  // Column by column: x is column-major, so each pass reads one contiguous column.
  for (lora::index j = 0; j < x.cols(); ++j) {
    const Scalar* src = x.col(j).data();
    Scalar* dst = out.col(j).data();
    for (lora::index i = 0; i < count; ++i) {
      LORA_ASSERT(rows[i] >= 0 && rows[i] < x.rows());
      dst[i] = src[rows[i]];
    }
  }
}

inline void gather_labels(const std::vector<int>& y, const lora::index* rows, lora::index count,
                          std::vector<int>& out) {
  out.resize(static_cast<std::size_t>(count));
  for (lora::index i = 0; i < count; ++i) out[i] = y[rows[i]];
}

}  // namespace ex
