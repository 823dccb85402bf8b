// lora/optim/optimizer.hpp: the base every optimizer derives from, and what they share: the parameter
// list they update in place, a learning rate with one multiplier per parameter role (PyTorch's
// param_groups, one group per role, so LoRA+ is a configuration: lora_plus.hpp), the step count, and
// per-parameter state tensors that can be measured (state_bytes), exported and imported (checkpoints).
//
// An optimizer keeps views, not copies: step() reads each parameter's grad and writes its value where
// the layer keeps it. Its state is sized at construction, keyed by position, and named
// "<parameter name>.<slot>" with PyTorch's slot names (momentum_buffer, exp_avg, exp_avg_sq, ...).
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../parameter.hpp"

namespace lora::detail {

/// Checks a parameter list the way every consumer needs it: names non-empty and unique (name_error),
/// dimensions >= 0 (shape_error), storage present when the size is non-zero (config_error).
/// `who` starts the messages ("sgd", "checkpoint 'run.ckpt'").
template <typename Scalar>
void check_parameters(const parameter_list<Scalar>& params, const std::string& who);

/// Throws config_error "<who>: <what> must be in [lo, hi], got <value>" unless value is finite and
/// lo <= value <= hi (value < hi when hi_open); an infinite hi reads "must be >= lo".
inline void check_hyper(const std::string& who, const char* what, double value, double lo,
                        double hi = std::numeric_limits<double>::infinity(), bool hi_open = false);

}  // namespace lora::detail

namespace lora::optim {

/// One state tensor of one parameter, named "<parameter name>.<slot>", e.g. "fc1.lora_A.exp_avg".
template <typename Scalar>
struct state_tensor {
  std::string name;
  vector<Scalar> data;  ///< As many elements as the parameter, in its storage order.
};

/// What an optimizer needs to resume exactly: PyTorch's optimizer.state_dict() less the
/// hyper-parameters, which the code that builds the optimizer supplies again.
template <typename Scalar>
struct optimizer_state {
  std::string kind;                           ///< "sgd", "adam" or "adamw": load_state refuses another.
  std::int64_t step = 0;                      ///< Optimizer steps taken.
  double lr = 0.0;                            ///< The base learning rate in force (schedules set it).
  std::vector<state_tensor<Scalar>> tensors;  ///< Parameter-major, slot-minor.
};

/// Base class of the optimizers. Derived classes implement update() for one parameter; the base owns
/// the parameter views, the learning rate and its per-role multipliers, the step count and the state.
template <typename Scalar_>
class optimizer {
 public:
  using Scalar = Scalar_;
  static_assert(std::is_floating_point_v<Scalar>, "optimizers work on floating-point parameters");

  virtual ~optimizer() = default;
  optimizer(const optimizer&) = delete;
  optimizer& operator=(const optimizer&) = delete;

  /// "sgd", "adam", "adamw": the kind recorded with the exported state and used in messages.
  const std::string& kind() const noexcept { return m_kind; }

  /// One update of every parameter from its gradient, in place. Increments step_count() first, so
  /// the first update sees step 1 (PyTorch's state['step'] after its increment).
  void step();
  /// Sets every gradient to zero (PyTorch's zero_grad(set_to_none=False)).
  void zero_grad();

  const parameter_list<Scalar>& parameters() const noexcept { return m_params; }
  std::int64_t step_count() const noexcept { return m_step; }

  /// The base learning rate; parameter k is updated with lr() * lr_scale(role of k).
  double lr() const noexcept { return m_lr; }
  /// Sets the base learning rate (what a schedule does before each step). Finite, >= 0.
  void set_lr(double lr);
  /// The multiplier of one role's learning rate (1 unless set).
  double lr_scale(param_role role) const noexcept { return m_lr_scale[role_slot(role)]; }
  /// Sets one role's multiplier. Finite, > 0.
  void set_lr_scale(param_role role, double scale);
  /// lr() * lr_scale(role): the learning rate that parameters of that role see.
  double lr_of(param_role role) const noexcept { return m_lr * lr_scale(role); }

  /// Bytes of optimizer state (the accounting API adds these to a parameter_report).
  std::size_t state_bytes() const noexcept;

  /// Number of state tensors: parameters().size() times the slots per parameter.
  std::size_t state_tensor_count() const noexcept { return m_state.size(); }
  /// "<parameter name>.<slot>" of state tensor i.
  std::string state_tensor_name(std::size_t i) const;
  /// State tensor i, as large as its parameter.
  const vector<Scalar>& state_tensor_data(std::size_t i) const {
    LORA_ASSERT(i < m_state.size());
    return m_state[i];
  }

  /// A copy of the whole state, for a checkpoint.
  optimizer_state<Scalar> state() const;
  /// Throws what load_state(s) would throw and changes nothing: name_error when the kind or the
  /// tensor names differ, shape_error when a tensor's size differs, config_error for a bad step or lr.
  void check_state(const optimizer_state<Scalar>& s) const;
  /// Restores a state exported by state(). Tensors are matched by name, not by position. All or
  /// nothing: everything is checked (check_state) before anything is changed.
  void load_state(const optimizer_state<Scalar>& s);

 protected:
  /// `params` is validated (detail::check_parameters); each parameter gets one state tensor per
  /// name in `slots`, zero-initialised. `kind` names the optimizer ("sgd").
  optimizer(std::string kind, parameter_list<Scalar> params, double lr, std::vector<std::string> slots);

  /// Updates parameter k with learning rate lr (already multiplied by its role's scale; kept in double
  /// like PyTorch's Python floats); step_count() is the number of this step, 1 for the first.
  virtual void update(std::size_t k, double lr) = 0;

  /// State tensor `slot` of parameter k.
  vector<Scalar>& state_of(std::size_t k, std::size_t slot) { return m_state[k * m_slots.size() + slot]; }

 private:
  static constexpr std::size_t role_count = static_cast<std::size_t>(param_role::dense) + 1;
  static std::size_t role_slot(param_role role) noexcept { return static_cast<std::size_t>(role); }
  /// Checks s against this optimizer (kind, step, lr, names, sizes) and returns, for each of its
  /// tensors, the index of the state tensor it restores.
  std::vector<std::size_t> match_state(const optimizer_state<Scalar>& s) const;

  std::string m_kind;
  parameter_list<Scalar> m_params;
  std::vector<std::string> m_slots;     // slot names, e.g. {"exp_avg", "exp_avg_sq"}
  std::vector<vector<Scalar>> m_state;  // m_state[k * slots + s]
  std::array<double, role_count> m_lr_scale;
  double m_lr;
  std::int64_t m_step = 0;
};

}  // namespace lora::optim

// ---------------------------------------------------------------------------------------------------

namespace lora::detail {

template <typename Scalar>
void check_parameters(const parameter_list<Scalar>& params, const std::string& who) {
  std::unordered_set<std::string> seen;
  for (const auto& p : params) {
    if (p.name.empty()) throw name_error(cat(who, ": a parameter has an empty name"));
    if (!seen.insert(p.name).second) throw name_error(cat(who, ": duplicate parameter name '", p.name, "'"));
    if (p.rows < 0 || p.cols < 0)
      throw shape_error(cat(who, ": parameter '", p.name, "' has a negative shape ", shape_str(p.rows, p.cols)));
    if (p.size() > 0 && (p.value_data == nullptr || p.grad_data == nullptr))
      throw config_error(
          cat(who, ": parameter '", p.name, "' (", shape_str(p.rows, p.cols), ") has no value or gradient storage"));
  }
}

inline void check_hyper(const std::string& who, const char* what, double value, double lo, double hi, bool hi_open) {
  if (std::isfinite(value) && value >= lo && (hi_open ? value < hi : value <= hi)) return;
  const std::string rule = std::isinf(hi) ? cat("finite and >= ", lo) : cat("in [", lo, ", ", hi, hi_open ? ")" : "]");
  throw config_error(cat(who, ": ", what, " must be ", rule, ", got ", value));
}

}  // namespace lora::detail

namespace lora::optim {

template <typename Scalar>
optimizer<Scalar>::optimizer(std::string kind, parameter_list<Scalar> params, double lr, std::vector<std::string> slots)
    : m_kind(std::move(kind)), m_params(std::move(params)), m_slots(std::move(slots)), m_lr(0.0) {
  detail::check_parameters(m_params, m_kind);
  set_lr(lr);
  m_lr_scale.fill(1.0);
  m_state.reserve(m_params.size() * m_slots.size());
  for (const auto& p : m_params) {
    for (std::size_t s = 0; s < m_slots.size(); ++s) m_state.push_back(vector<Scalar>::Zero(p.size()));
  }
}

template <typename Scalar>
void optimizer<Scalar>::step() {
  ++m_step;
  for (std::size_t k = 0; k < m_params.size(); ++k) update(k, lr_of(m_params[k].role));
}

template <typename Scalar>
void optimizer<Scalar>::zero_grad() {
  for (const auto& p : m_params) p.grad().setZero();
}

template <typename Scalar>
void optimizer<Scalar>::set_lr(double lr) {
  detail::check_hyper(m_kind, "lr", lr, 0.0);
  m_lr = lr;
}

template <typename Scalar>
void optimizer<Scalar>::set_lr_scale(param_role role, double scale) {
  if (!(std::isfinite(scale) && scale > 0.0)) {
    throw config_error(
        detail::cat(m_kind, ": the lr scale of role ", to_string(role), " must be finite and > 0, got ", scale));
  }
  m_lr_scale[role_slot(role)] = scale;
}

template <typename Scalar>
std::size_t optimizer<Scalar>::state_bytes() const noexcept {
  std::size_t n = 0;
  for (const auto& t : m_state) n += static_cast<std::size_t>(t.size()) * sizeof(Scalar);
  return n;
}

template <typename Scalar>
std::string optimizer<Scalar>::state_tensor_name(std::size_t i) const {
  LORA_ASSERT(i < m_state.size());
  return m_params[i / m_slots.size()].name + "." + m_slots[i % m_slots.size()];
}

template <typename Scalar>
optimizer_state<Scalar> optimizer<Scalar>::state() const {
  optimizer_state<Scalar> s;
  s.kind = kind();
  s.step = m_step;
  s.lr = m_lr;
  s.tensors.reserve(m_state.size());
  for (std::size_t i = 0; i < m_state.size(); ++i) s.tensors.push_back({state_tensor_name(i), m_state[i]});
  return s;
}

template <typename Scalar>
std::vector<std::size_t> optimizer<Scalar>::match_state(const optimizer_state<Scalar>& s) const {
  if (s.kind != m_kind) throw name_error(detail::cat(m_kind, ": the state was saved by a '", s.kind, "' optimizer"));
  if (s.step < 0) throw config_error(detail::cat(m_kind, ": the state's step count is negative (", s.step, ")"));
  detail::check_hyper(m_kind, "the state's lr", s.lr, 0.0);
  std::unordered_map<std::string, std::size_t> expected;
  for (std::size_t i = 0; i < m_state.size(); ++i) expected.emplace(state_tensor_name(i), i);
  std::vector<std::size_t> target;
  target.reserve(s.tensors.size());
  std::vector<bool> seen(m_state.size(), false);
  for (const auto& t : s.tensors) {
    const auto it = expected.find(t.name);
    if (it == expected.end()) {
      throw name_error(detail::cat(m_kind, ": the state has a tensor '", t.name, "' that this optimizer does not"));
    }
    const std::size_t i = it->second;
    if (seen[i]) throw name_error(detail::cat(m_kind, ": the state has tensor '", t.name, "' twice"));
    seen[i] = true;
    if (t.data.size() != m_state[i].size()) {
      throw shape_error(detail::cat(m_kind, ": state tensor '", t.name, "' has ", t.data.size(), " elements, expected ",
                                    m_state[i].size()));
    }
    target.push_back(i);
  }
  for (std::size_t i = 0; i < seen.size(); ++i) {
    if (!seen[i]) throw name_error(detail::cat(m_kind, ": the state lacks tensor '", state_tensor_name(i), "'"));
  }
  return target;
}

template <typename Scalar>
void optimizer<Scalar>::check_state(const optimizer_state<Scalar>& s) const {
  match_state(s);
}

template <typename Scalar>
void optimizer<Scalar>::load_state(const optimizer_state<Scalar>& s) {
  const std::vector<std::size_t> target = match_state(s);
  for (std::size_t j = 0; j < target.size(); ++j) m_state[target[j]] = s.tensors[j].data;  // same size: no allocation
  m_step = s.step;
  m_lr = s.lr;
}

}  // namespace lora::optim
