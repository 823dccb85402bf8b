// lora/models/gpt2_weights.hpp: every tensor of a GPT-2 model, named and shaped as Hugging Face stores
// them, in one table (docs/CONVENTIONS.md §gpt2).
//
//   id  name (HF, without "transformer.")   shape                 meaning
//   0   wte.weight                          [vocab, d]            token embeddings; also the LM head
//   1   wpe.weight                          [n_positions, d]      position embeddings
//   then for block l, 12 tensors from 2 + 12 l, in block_tensor order:
//       h.l.ln_1.weight / .bias             [d]                   LayerNorm before attention
//       h.l.attn.c_attn.weight / .bias      [d, 3d] / [3d]        fused q | k | v, Conv1D: in x out
//       h.l.attn.c_proj.weight / .bias      [d, d] / [d]          attention output projection
//       h.l.ln_2.weight / .bias             [d]                   LayerNorm before the MLP
//       h.l.mlp.c_fc.weight / .bias         [d, 4d] / [4d]        MLP up projection
//       h.l.mlp.c_proj.weight / .bias       [4d, d] / [d]         MLP down projection
//   2 + 12 L, 3 + 12 L: ln_f.weight / .bias [d]                   final LayerNorm
//
// Matrices are row-major as stored, so a Conv1D weight [in, out] is W (out x in) column-major: a
// lora::linear views it (as a row-major [in, out] map with weight_layout::in_out, the same memory) without
// a copy. The storage is either owned (one zeroed arena) or borrowed: a loader may point the tensors into a
// memory-mapped file and hand over a keep-alive handle.
//
// Layers view the tensors, so the storage never moves once made: a move hands the same storage over, a
// copy is a deep copy into a new owned arena, and assignment copies the values into the existing tensors
// (shape_error unless both have the same config) instead of replacing the storage. The one exception is
// release(): a model whose projections hold their weights quantized (gpt2::set_base_storage) drops those
// float tensors, and the rest move to a smaller arena. A released tensor keeps its spec; has(id) is false
// and reading it is a state_error.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../random.hpp"
#include "gpt2_config.hpp"

namespace lora::models {

/// The tensors of one block, in their order within the table.
enum class block_tensor : int {
  ln_1_weight,
  ln_1_bias,
  c_attn_weight,
  c_attn_bias,
  attn_c_proj_weight,
  attn_c_proj_bias,
  ln_2_weight,
  ln_2_bias,
  c_fc_weight,
  c_fc_bias,
  mlp_c_proj_weight,
  mlp_c_proj_bias,
};
inline constexpr index block_tensor_count = 12;

/// Name and shape of one tensor. A vector has cols == 0 (shape [rows]); a matrix is [rows, cols].
struct gpt2_tensor_spec {
  std::string name;
  index rows = 0;
  index cols = 0;
  bool is_vector() const noexcept { return cols == 0; }
  index size() const noexcept { return is_vector() ? rows : rows * cols; }
};

/// The table above for `config` (validated).
std::vector<gpt2_tensor_spec> gpt2_tensor_specs(const gpt2_config& config);
/// Table id of tensor `t` of block `layer`.
inline index gpt2_tensor_id(index layer, block_tensor t) noexcept {
  return 2 + layer * block_tensor_count + static_cast<index>(t);
}

template <typename Scalar_>
class gpt2_weights {
 public:
  using Scalar = Scalar_;
  using row_matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using matrix_map = Eigen::Map<row_matrix>;
  using const_matrix_map = Eigen::Map<const row_matrix>;
  using vector_map = Eigen::Map<vector<Scalar>>;
  using const_vector_map = Eigen::Map<const vector<Scalar>>;

  /// Owned storage, every tensor zero.
  explicit gpt2_weights(const gpt2_config& config);
  /// Owned storage, every tensor zero, without the tensors whose `released` entry is true.
  gpt2_weights(const gpt2_config& config, std::vector<bool> released);
  /// Borrowed storage: data[i] holds tensor i (spec size elements, any alignment); `keep_alive` owns it.
  gpt2_weights(const gpt2_config& config, std::vector<Scalar*> data, std::shared_ptr<void> keep_alive);
  /// A deep copy, always into owned storage.
  gpt2_weights(const gpt2_weights& other);
  gpt2_weights(gpt2_weights&&) noexcept = default;
  /// Copies the values into this object's tensors (the storage stays where views see it).
  gpt2_weights& operator=(const gpt2_weights& other);
  gpt2_weights& operator=(gpt2_weights&& other) { return *this = static_cast<const gpt2_weights&>(other); }

  /// GPT-2's initialisation (Hugging Face's _init_weights): matrices ~ N(0, 0.02²), the two output
  /// projections (attn.c_proj, mlp.c_proj) ~ N(0, (0.02 / √(2 L))²), biases 0, LayerNorm gains 1.
  static gpt2_weights random(const gpt2_config& config, std::uint64_t seed);

  const gpt2_config& config() const noexcept { return m_config; }
  const std::vector<gpt2_tensor_spec>& specs() const noexcept { return m_specs; }
  index num_tensors() const noexcept { return static_cast<index>(m_specs.size()); }
  const gpt2_tensor_spec& spec(index id) const { return m_specs.at(static_cast<std::size_t>(id)); }
  /// Table id of `name` (HF name without the "transformer." prefix), or -1.
  index find(const std::string& name) const;
  bool owns_storage() const noexcept { return m_keep_alive == nullptr; }
  /// Elements over all tensors.
  index num_elements() const noexcept;

  /// Tensor id's storage; nullptr for a released tensor.
  Scalar* data(index id) noexcept { return m_data[static_cast<std::size_t>(id)]; }
  const Scalar* data(index id) const noexcept { return m_data[static_cast<std::size_t>(id)]; }
  /// False for a released tensor.
  bool has(index id) const { return data(id) != nullptr; }
  /// One entry per tensor, true where released (empty when none is).
  const std::vector<bool>& released() const noexcept { return m_released; }
  /// Drops tensors `ids` and moves the others into a new owned arena of their size (views of any tensor are
  /// invalidated). Done by gpt2::set_base_storage once its projections hold their own quantized weights.
  void release(const std::vector<index>& ids);
  /// Tensor `id` as its stored matrix (a vector is rows x 1).
  matrix_map matrix(index id);
  const_matrix_map matrix(index id) const;
  /// Tensor `id` as a flat vector of all its elements.
  vector_map flat(index id) {
    check_held(id);
    return vector_map(data(id), spec(id).size());
  }
  const_vector_map flat(index id) const {
    check_held(id);
    return const_vector_map(data(id), spec(id).size());
  }

  matrix_map wte() { return matrix(0); }
  const_matrix_map wte() const { return matrix(0); }
  matrix_map wpe() { return matrix(1); }
  const_matrix_map wpe() const { return matrix(1); }
  matrix_map block(index layer, block_tensor t) { return matrix(gpt2_tensor_id(layer, t)); }
  const_matrix_map block(index layer, block_tensor t) const { return matrix(gpt2_tensor_id(layer, t)); }
  vector_map block_vector(index layer, block_tensor t) { return flat(gpt2_tensor_id(layer, t)); }
  const_vector_map block_vector(index layer, block_tensor t) const { return flat(gpt2_tensor_id(layer, t)); }
  vector_map ln_f_weight() { return flat(2 + block_tensor_count * m_config.n_layer); }
  const_vector_map ln_f_weight() const { return flat(2 + block_tensor_count * m_config.n_layer); }
  vector_map ln_f_bias() { return flat(3 + block_tensor_count * m_config.n_layer); }
  const_vector_map ln_f_bias() const { return flat(3 + block_tensor_count * m_config.n_layer); }

  /// Sets every tensor to zero.
  void set_zero();

 private:
  gpt2_config m_config;
  std::vector<gpt2_tensor_spec> m_specs;
  std::vector<Scalar> m_arena;   ///< Owned storage (empty when borrowed).
  std::vector<Scalar*> m_data;   ///< Tensor i starts at m_data[i] (nullptr: released).
  std::vector<bool> m_released;  ///< Empty, or true for each released tensor.
  std::shared_ptr<void> m_keep_alive;

  /// state_error naming tensor `id` when it is released.
  void check_held(index id) const;
};

// ------------------------------------------------------------------------------------------------

inline std::vector<gpt2_tensor_spec> gpt2_tensor_specs(const gpt2_config& config) {
  config.validate();
  const index d = config.n_embd;
  std::vector<gpt2_tensor_spec> s;
  s.reserve(static_cast<std::size_t>(4 + block_tensor_count * config.n_layer));
  s.push_back({"wte.weight", config.vocab_size, d});
  s.push_back({"wpe.weight", config.n_positions, d});
  for (index l = 0; l < config.n_layer; ++l) {
    const std::string h = "h." + std::to_string(l) + ".";
    s.push_back({h + "ln_1.weight", d, 0});
    s.push_back({h + "ln_1.bias", d, 0});
    s.push_back({h + "attn.c_attn.weight", d, 3 * d});
    s.push_back({h + "attn.c_attn.bias", 3 * d, 0});
    s.push_back({h + "attn.c_proj.weight", d, d});
    s.push_back({h + "attn.c_proj.bias", d, 0});
    s.push_back({h + "ln_2.weight", d, 0});
    s.push_back({h + "ln_2.bias", d, 0});
    s.push_back({h + "mlp.c_fc.weight", d, 4 * d});
    s.push_back({h + "mlp.c_fc.bias", 4 * d, 0});
    s.push_back({h + "mlp.c_proj.weight", 4 * d, d});
    s.push_back({h + "mlp.c_proj.bias", d, 0});
  }
  s.push_back({"ln_f.weight", d, 0});
  s.push_back({"ln_f.bias", d, 0});
  return s;
}

template <typename Scalar>
gpt2_weights<Scalar>::gpt2_weights(const gpt2_config& config) : gpt2_weights(config, std::vector<bool>()) {}

template <typename Scalar>
gpt2_weights<Scalar>::gpt2_weights(const gpt2_config& config, std::vector<bool> released)
    : m_config(config), m_specs(gpt2_tensor_specs(config)), m_released(std::move(released)) {
  if (!m_released.empty() && m_released.size() != m_specs.size())
    throw shape_error("gpt2_weights: expected one released flag per tensor (" + std::to_string(m_specs.size()) +
                      "), got " + std::to_string(m_released.size()));
  const auto held = [&](std::size_t i) { return m_released.empty() || !m_released[i]; };
  index total = 0;
  for (std::size_t i = 0; i < m_specs.size(); ++i) total += held(i) ? m_specs[i].size() : 0;
  m_arena.assign(static_cast<std::size_t>(total), Scalar(0));
  m_data.reserve(m_specs.size());
  Scalar* p = m_arena.data();
  for (std::size_t i = 0; i < m_specs.size(); ++i) {
    m_data.push_back(held(i) ? p : nullptr);
    if (held(i)) p += m_specs[i].size();
  }
}

template <typename Scalar>
void gpt2_weights<Scalar>::release(const std::vector<index>& ids) {
  std::vector<bool> gone = m_released.empty() ? std::vector<bool>(m_specs.size(), false) : m_released;
  for (index id : ids) gone.at(static_cast<std::size_t>(id)) = true;
  gpt2_weights kept(m_config, gone);
  for (index id = 0; id < num_tensors(); ++id)
    if (kept.has(id)) kept.flat(id) = flat(id);
  m_arena = std::move(kept.m_arena);
  m_data = std::move(kept.m_data);
  m_released = std::move(gone);
  m_keep_alive.reset();  // borrowed storage (a mapped file) is let go
}

template <typename Scalar>
void gpt2_weights<Scalar>::check_held(index id) const {
  if (!has(id))
    throw state_error("gpt2_weights: tensor '" + spec(id).name +
                      "' is released: the model's layer holds it quantized (gpt2::set_base_storage); read it from "
                      "the layer (weight())");
}

template <typename Scalar>
gpt2_weights<Scalar>::gpt2_weights(const gpt2_config& config, std::vector<Scalar*> data,
                                   std::shared_ptr<void> keep_alive)
    : m_config(config),
      m_specs(gpt2_tensor_specs(config)),
      m_data(std::move(data)),
      m_keep_alive(std::move(keep_alive)) {
  if (m_data.size() != m_specs.size())
    throw shape_error("gpt2_weights: expected " + std::to_string(m_specs.size()) + " tensor pointers, got " +
                      std::to_string(m_data.size()));
  for (std::size_t i = 0; i < m_data.size(); ++i)
    if (m_data[i] == nullptr) throw shape_error("gpt2_weights: tensor '" + m_specs[i].name + "' has no storage");
}

template <typename Scalar>
gpt2_weights<Scalar>::gpt2_weights(const gpt2_weights& other) : gpt2_weights(other.m_config, other.m_released) {
  for (index id = 0; id < num_tensors(); ++id)
    if (has(id)) flat(id) = other.flat(id);
}

template <typename Scalar>
gpt2_weights<Scalar>& gpt2_weights<Scalar>::operator=(const gpt2_weights& other) {
  if (this == &other) return *this;
  if (other.num_tensors() != num_tensors() || other.num_elements() != num_elements())
    throw shape_error(
        "gpt2_weights: assignment copies values into the existing tensors, so both must have the "
        "same config; expected " +
        std::to_string(num_tensors()) + " tensors of " + std::to_string(num_elements()) + " values, got " +
        std::to_string(other.num_tensors()) + " of " + std::to_string(other.num_elements()));
  for (index id = 0; id < num_tensors(); ++id) {
    if (other.spec(id).rows != spec(id).rows || other.spec(id).cols != spec(id).cols)
      throw shape_error("gpt2_weights: tensor '" + spec(id).name +
                        "' differs in shape; assignment needs the same config");
  }
  if (other.m_released != m_released)
    throw shape_error("gpt2_weights: assignment needs the same released tensors on both sides");
  for (index id = 0; id < num_tensors(); ++id)
    if (has(id)) flat(id) = other.flat(id);
  return *this;
}

template <typename Scalar>
gpt2_weights<Scalar> gpt2_weights<Scalar>::random(const gpt2_config& config, std::uint64_t seed) {
  gpt2_weights w(config);
  rng gen(seed);
  const double proj_std = 0.02 / std::sqrt(2.0 * static_cast<double>(config.n_layer));
  for (index id = 0; id < w.num_tensors(); ++id) {
    const auto& s = w.spec(id);
    auto x = w.flat(id);
    const bool gain =
        s.is_vector() && s.name.find("ln_") != std::string::npos && s.name.find(".weight") != std::string::npos;
    if (gain) {
      x.setConstant(Scalar(1));
    } else if (!s.is_vector()) {
      const bool proj = s.name.find("c_proj.weight") != std::string::npos;
      const double sd = proj ? proj_std : 0.02;
      for (index i = 0; i < x.size(); ++i) x[i] = static_cast<Scalar>(sd * gen.normal());
    }
  }
  return w;
}

template <typename Scalar>
index gpt2_weights<Scalar>::find(const std::string& name) const {
  for (std::size_t i = 0; i < m_specs.size(); ++i)
    if (m_specs[i].name == name) return static_cast<index>(i);
  return -1;
}

template <typename Scalar>
index gpt2_weights<Scalar>::num_elements() const noexcept {
  index total = 0;
  for (const auto& s : m_specs) total += s.size();
  return total;
}

template <typename Scalar>
typename gpt2_weights<Scalar>::matrix_map gpt2_weights<Scalar>::matrix(index id) {
  check_held(id);
  const auto& s = spec(id);
  return matrix_map(data(id), s.rows, s.is_vector() ? 1 : s.cols);
}

template <typename Scalar>
typename gpt2_weights<Scalar>::const_matrix_map gpt2_weights<Scalar>::matrix(index id) const {
  check_held(id);
  const auto& s = spec(id);
  return const_matrix_map(data(id), s.rows, s.is_vector() ? 1 : s.cols);
}

template <typename Scalar>
void gpt2_weights<Scalar>::set_zero() {
  for (index id = 0; id < num_tensors(); ++id)
    if (has(id)) flat(id).setZero();
}

}  // namespace lora::models
