// Shared by the MPI test programs: a two-layer LoRA model, a fixed stream of global batches, the
// single-process reference and a per-rank check counter. Plain mains (no GoogleTest): every check
// prints PASS or FAIL with the rank, and the program returns non-zero when any rank failed one.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include <lora/dist/mpi.hpp>
#include <lora/linear.hpp>
#include <lora/optim/adam.hpp>
#include <lora/optim/grad_accumulator.hpp>
#include <lora/optim/sgd.hpp>
#include <lora/random.hpp>

namespace mpi_test {

using lora::index;

/// Counts failed checks of this rank; rank 0 prints passes, every rank prints its failures.
struct checks {
  int rank = 0;
  int failed = 0;
  int passed = 0;
  void expect(bool ok, const std::string& what) {
    if (ok) {
      ++passed;
      if (rank == 0) std::printf("PASS %s\n", what.c_str());
    } else {
      ++failed;
      std::printf("FAIL (rank %d) %s\n", rank, what.c_str());
    }
    std::fflush(stdout);
  }
};

/// Sizes of the test model: X (n x in) -> fc1 (hidden x in) -> tanh -> fc2 (out x hidden).
inline constexpr index in_features = 6, hidden = 5, out_features = 3, adapter_rank = 2;
inline constexpr index total_samples = 200;

/// Dataset rows and targets: the same on every rank (seeded).
template <typename Scalar>
struct dataset {
  lora::matrix<Scalar> x, y;
  dataset() : x(total_samples, in_features), y(total_samples, out_features) {
    lora::rng gen(7);
    for (index k = 0; k < x.size(); ++k) x.data()[k] = static_cast<Scalar>(gen.normal());
    for (index k = 0; k < y.size(); ++k) y.data()[k] = static_cast<Scalar>(0.5 * gen.normal());
  }
};

/// The global micro-batches: micro-batch m (over the whole run) has 5 + m % 4 samples, consecutive
/// rows, so shards are uneven for 2 and 3 ranks.
inline index micro_size(index m) { return 5 + m % 4; }
inline index micro_first(index m) {
  index first = 0;
  for (index j = 0; j < m; ++j) first += micro_size(j);
  return first % (total_samples - 16);
}

template <typename Scalar>
struct model {
  using matrix = lora::matrix<Scalar>;
  lora::linear<Scalar> fc1, fc2;

  /// Frozen weights from a fixed seed (the same everywhere); adapters from `adapter_seed`.
  explicit model(std::uint64_t adapter_seed)
      : fc1(frozen(hidden, in_features, 11), "fc1"), fc2(frozen(out_features, hidden, 12), "fc2") {
    lora::adapter_config c;
    c.rank = adapter_rank;
    c.alpha = 4.0;
    c.init = lora::init_method::random_ab;
    c.seed = adapter_seed;
    fc1.add_adapter("default", c);
    c.seed = adapter_seed + 1;
    fc2.add_adapter("default", c);
  }
  static matrix frozen(index rows, index cols, std::uint64_t seed) {
    lora::rng gen(seed);
    matrix w(rows, cols);
    for (index k = 0; k < w.size(); ++k) w.data()[k] = static_cast<Scalar>(0.4 * gen.normal());
    return w;
  }
  lora::parameter_list<Scalar> params() { return lora::collect_parameters<Scalar>(fc1, fc2); }

  /// Forward and backward of rows [first, first + n) with the mean loss 1/(2n) ||f(X) - Y||^2. When
  /// `ready` is given, each layer's parameters are handed to it as soon as its backward is done; with
  /// `poison`, one gradient element of fc2 turns NaN before that. Returns the loss.
  template <typename Ready>
  double step(const dataset<Scalar>& d, index first, index n, bool poison, Ready&& ready) {
    const matrix x = d.x.middleRows(first, n);
    const matrix h = fc1.forward(x).array().tanh().matrix();
    const matrix r = fc2.forward(h) - d.y.middleRows(first, n);
    const double loss = 0.5 * static_cast<double>(r.squaredNorm()) / static_cast<double>(n);
    const matrix dh = fc2.backward(r / static_cast<Scalar>(n));
    if (poison) fc2.parameters()[0].grad_data[0] = std::numeric_limits<Scalar>::quiet_NaN();
    ready(fc2.parameters());
    const matrix dz = (dh.array() * (Scalar(1) - h.array().square())).matrix();
    fc1.backward_params_only(dz);
    ready(fc1.parameters());
    return loss;
  }
};

/// Which optimizer a scenario uses.
enum class opt_kind { adamw, sgd };

template <typename Scalar>
std::unique_ptr<lora::optim::optimizer<Scalar>> make_optimizer(opt_kind kind, lora::parameter_list<Scalar> ps) {
  if (kind == opt_kind::adamw) {
    lora::optim::adamw_options o;
    o.lr = 0.05;
    return std::make_unique<lora::optim::adamw<Scalar>>(std::move(ps), o);
  }
  lora::optim::sgd_options o;
  o.lr = 0.1;
  o.momentum = 0.9;
  return std::make_unique<lora::optim::sgd<Scalar>>(std::move(ps), o);
}

/// A training run's settings.
struct run_config {
  opt_kind kind = opt_kind::adamw;
  std::int64_t micro_batches = 2;
  double max_grad_norm = 0.5;       ///< Small enough that clipping acts.
  std::int64_t poison_window = -1;  ///< This window's first micro-batch has a NaN (last rank only).
  std::size_t bucket_bytes = 64;    ///< Several buckets for the tiny model.
};

/// Flattened parameter values.
template <typename Scalar>
std::vector<double> flat_values(const lora::parameter_list<Scalar>& ps) {
  std::vector<double> out;
  for (const auto& p : ps)
    for (index i = 0; i < p.size(); ++i) out.push_back(static_cast<double>(p.value_data[i]));
  return out;
}

inline double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double m = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::fmax(m, std::fabs(a[i] - b[i]));
  return m;
}

/// The single-process reference: windows [first, last) of the global batches through grad_accumulator,
/// from the adapters of `adapter_seed` (or from a model and optimizer already trained).
template <typename Scalar>
struct reference {
  model<Scalar> net;
  std::unique_ptr<lora::optim::optimizer<Scalar>> opt;
  lora::optim::step_guard<Scalar> guard;
  lora::optim::grad_accumulator<Scalar> acc;

  reference(const run_config& c, std::uint64_t adapter_seed)
      : net(adapter_seed),
        opt(make_optimizer<Scalar>(c.kind, net.params())),
        guard(*opt, {lora::optim::nonfinite_policy::skip, c.max_grad_norm}),
        acc(guard, c.micro_batches) {}

  void train(const dataset<Scalar>& d, const run_config& c, std::int64_t first, std::int64_t last) {
    for (std::int64_t w = first; w < last; ++w) {
      for (std::int64_t j = 0; j < c.micro_batches; ++j) {
        const index m = w * c.micro_batches + j;
        const bool poison = w == c.poison_window && j == 0;
        acc.accumulate(net.step(d, micro_first(m), micro_size(m), poison, [](const auto&) {}));
      }
    }
  }
};

}  // namespace mpi_test
