// lora/io/peft_file.hpp: the tensors of a Hugging Face PEFT LoRA adapter (adapter_model.safetensors)
// and the adapter directory: reading, validating against the config, writing (docs/CONVENTIONS.md
// §peft).
//
// An adapter directory holds
//   adapter_config.json        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
//   adapter_model.safetensors  metadata {"format": "pt"}; for each adapted module <path> (a dotted module
//                              name of the wrapped model, e.g. "model.layers.0.self_attn.q_proj"):
//     base_model.model.<path>.lora_A.weight          [r, in]     (linear, Conv1D)
//     base_model.model.<path>.lora_B.weight          [out, r]
//     base_model.model.<path>.lora_B.bias            [out]       (lora_bias = true only)
//     base_model.model.<path>.lora_magnitude_vector  [out]       (DoRA only; no ".weight")
//     base_model.model.<path>.lora_embedding_A       [r, num_embeddings]   (embeddings; no ".weight")
//     base_model.model.<path>.lora_embedding_B       [embedding_dim, r]
//   and whole tensors that replace the base model's tensor of the same path when merged:
//     base_model.model.<path>.weight / .bias ...     (modules_to_save, bias = "all" | "lora_only",
//                                                      saved embedding layers)
// Orientation (docs/CONVENTIONS.md §orientation): lora_A / lora_B are [r, in] / [out, r] whatever
// fan_in_fan_out says; fan_in_fan_out only says that the *base* weight is stored [in, out] (GPT-2's
// Conv1D).
//
// Reading validates everything it can before any tensor data is read (keys, shapes, ranks against the
// config, dtypes) and raises lora::format_error, shape_error or dtype_error naming the module.
//
// POSIX only, like io/safetensors.hpp.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "atomic_file.hpp"
#include "peft_config.hpp"
#include "safetensors.hpp"

namespace lora::io {

/// The prefix of every key in a PEFT adapter file ("base_model.model." + module path).
inline constexpr std::string_view peft_key_prefix = "base_model.model.";
/// File names inside an adapter directory.
inline constexpr std::string_view peft_config_file = "adapter_config.json";
inline constexpr std::string_view peft_weights_file = "adapter_model.safetensors";

/// Where one adapted module's tensors are in a file, and their shapes.
struct peft_module_info {
  std::string path;        ///< Module path, without "base_model.model."
  bool embedding = false;  ///< lora_embedding_A / _B rather than lora_A / lora_B
  index rank = 0;
  index in = 0;               ///< in_features (num_embeddings for an embedding)
  index out = 0;              ///< out_features (embedding_dim for an embedding)
  std::string a_key, b_key;   ///< Full tensor names in the file.
  bool conv = false;          ///< 4-D conv factors: lora_A [r, C, kh, kw], lora_B [out, r, 1, 1]
  std::string bias_key;       ///< lora_B.bias, empty when absent.
  std::string magnitude_key;  ///< lora_magnitude_vector, empty when absent.
  /// The narrowest dtype holding every tensor of the module exactly: their common dtype, else F64 if
  /// one is F64, else F32 (F16 and BF16 mixed).
  dtype type = dtype::f32;
};

/// One adapted module's tensors in memory (double holds f16, bf16, f32 and f64 values exactly).
struct peft_module {
  std::string path;
  bool embedding = false;
  matrix<double> a;          ///< r x in (lora_A.weight), or r x num_embeddings (lora_embedding_A)
  matrix<double> b;          ///< out x r (lora_B.weight), or embedding_dim x r (lora_embedding_B)
  vector<double> b_bias;     ///< out (lora_B.bias); empty when absent
  vector<double> magnitude;  ///< out (DoRA lora_magnitude_vector); empty when absent
  dtype type = dtype::f32;   ///< The dtype save() writes every tensor of the module in (see peft_module_info).
  /// Conv2d modules: the stored shapes [r, C, kh, kw] and [out, r, 1, 1] (a and b hold them flattened,
  /// r x C kh kw and out x r); empty for 2-D factors.
  std::vector<std::int64_t> a_shape, b_shape;

  index rank() const noexcept { return a.rows(); }
  index in_features() const noexcept { return a.cols(); }
  index out_features() const noexcept { return b.rows(); }
};

/// A tensor stored whole, which replaces the base model's tensor `path` when merged (modules_to_save,
/// trained biases, saved embedding layers). Its bytes are kept as stored: owned, or a zero-copy view
/// of the file it was read from.
struct peft_full_tensor {
  std::string path;  ///< e.g. "score.weight"; saved as "base_model.model." + path
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> bytes;  ///< Owned little-endian row-major bytes, or empty and:
  tensor_bytes mapped;               ///< the bytes in the file it was read from.

  const unsigned char* data() const noexcept { return bytes.empty() ? mapped.data() : bytes.data(); }
  std::size_t size() const noexcept { return bytes.empty() ? mapped.size() : bytes.size(); }
  /// The values flattened in row-major order; dtype_error for C64.
  template <typename Scalar>
  vector<Scalar> values() const;
  /// A tensor of `values` (any Eigen matrix; 2-D shape [rows, cols]) converted to `type`.
  template <typename Derived>
  static peft_full_tensor from_matrix(std::string path, const Eigen::MatrixBase<Derived>& values,
                                      dtype type = dtype::f32);
};

/// An adapter directory opened for reading: config parsed, tensor layout indexed and validated, data
/// read on demand (the safetensors file is memory-mapped). lora-inspect and lora-merge work on this, so
/// that peak memory stays near one module's tensors.
class peft_adapter_file {
 public:
  /// Opens `dir`/adapter_config.json and `dir`/adapter_model.safetensors. io_error when they cannot be
  /// read; format_error for a directory holding only adapter_model.bin (pickle is not supported).
  static peft_adapter_file open(const std::string& dir, bool print_warnings = false);
  /// The same from memory: adapter_config.json text and the bytes of adapter_model.safetensors.
  static peft_adapter_file from_memory(std::string_view config_json, std::vector<unsigned char> safetensors_bytes,
                                       bool print_warnings = false);

  const peft_config& config() const noexcept { return m_config; }
  const safetensors_file& tensors() const noexcept { return m_file; }
  /// Adapted modules, sorted by path.
  const std::vector<peft_module_info>& modules() const noexcept { return m_modules; }
  /// Whole tensors (names as in the file, "base_model.model." + path), sorted by name.
  const std::vector<tensor_info>& full_tensors() const noexcept { return m_full; }
  /// Reads one module's tensors.
  peft_module read_module(const peft_module_info& info) const;
  /// Elements in every tensor of the file (the adapter's trainable parameters).
  std::int64_t parameter_count() const;

 private:
  peft_adapter_file(peft_config config, safetensors_file file);
  peft_config m_config;
  safetensors_file m_file;
  std::vector<peft_module_info> m_modules;
  std::vector<tensor_info> m_full;
};

/// A PEFT LoRA adapter in memory.
struct peft_adapter {
  peft_config config;
  std::vector<peft_module> modules;            ///< sorted by path after load
  std::vector<peft_full_tensor> full_tensors;  ///< sorted by path after load

  /// Loads a directory (see peft_adapter_file::open), reading every tensor.
  static peft_adapter load(const std::string& dir, bool print_warnings = false);
  /// Loads from adapter_config.json text and adapter_model.safetensors bytes.
  static peft_adapter from_memory(std::string_view config_json, std::vector<unsigned char> safetensors_bytes,
                                  bool print_warnings = false);
  /// Reads every tensor of an opened file.
  static peft_adapter read(const peft_adapter_file& file);

  /// Builds an adapter from the adapter `adapter_name` of named layers: `layers` is any range of
  /// std::pair<std::string, P> (std::map, std::vector of pairs, ...) with P a pointer to a
  /// lora::linear<Scalar>, keyed by module path. Takes fan_in_fan_out, task_type,
  /// base_model_name_or_path, modules_to_save ... from `base`; sets r and lora_alpha to the most common
  /// rank and alpha, rank_pattern / alpha_pattern for the modules that differ, target_modules to the
  /// sorted last components of the paths, use_rslora (which must agree across layers, else
  /// config_error) and lora_dropout (of the first layer). name_error naming the module for a layer
  /// without that adapter.
  /// Defined in io/peft_layers.hpp (included by io/peft.hpp).
  template <typename Layers>
  static peft_adapter from_layers(const Layers& layers, const std::string& adapter_name, peft_config base = {});

  /// Writes `dir`/adapter_config.json and `dir`/adapter_model.safetensors (metadata {"format":"pt"}),
  /// creating `dir` if needed. Each file is written atomically (io/atomic_file.hpp): both go to
  /// temporaries first and are renamed over their targets back to back once both are complete, so a
  /// failure leaves the old files in place.
  void save(const std::string& dir) const;
  /// The adapter_model.safetensors image save() would write.
  std::vector<unsigned char> safetensors_bytes() const;
  /// Applies the rules of loading (both factors, ranks agreeing with each other and with the config,
  /// vector lengths, consistency with use_dora / lora_bias); throws naming the module.
  void validate() const;
  const peft_module* find(const std::string& path) const;
  /// Elements in every tensor.
  std::int64_t parameter_count() const;
};

namespace detail {

/// A key suffix of a LoRA tensor and where it goes: slot 0 A, 1 B, 2 lora_B.bias, 3 magnitude.
struct peft_suffix_rule {
  std::string_view suffix;
  int slot;
  bool embedding;
};
inline constexpr peft_suffix_rule peft_suffix_rules[] = {
    {".lora_A.weight", 0, false},   {".lora_B.weight", 1, false},   {".lora_B.bias", 2, false},
    {".lora_embedding_A", 0, true}, {".lora_embedding_B", 1, true}, {".lora_magnitude_vector", 3, false},
};

/// The tensors of one module found in a file, by slot (see peft_suffix_rule).
struct peft_module_keys {
  const tensor_info* slots[4] = {nullptr, nullptr, nullptr, nullptr};
  int linear_keys = 0, embedding_keys = 0;
};

/// Names an adapter file and one of its modules in error messages.
struct peft_module_context {
  const std::string& label;
  const std::string& path;
  /// "PEFT adapter '<label>': module '<path>'"
  std::string where() const { return cat("PEFT adapter '", label, "': module '", path, "'"); }
  [[noreturn]] void fail(const std::string& what) const { throw format_error(cat(where(), ": ", what)); }
};

/// The rule whose suffix ends `rest` (a key without the prefix) after a non-empty path, or nullptr.
const peft_suffix_rule* find_suffix_rule(std::string_view rest) noexcept;
/// Sorts the tensors of an adapter file into LoRA modules (by path) and whole tensors (sorted by
/// name); format_error for a key PEFT does not write.
void index_peft_keys(const safetensors_file& file, std::map<std::string, peft_module_keys>& modules,
                     std::vector<tensor_info>& full);
/// Checks one module's tensors against each other and against the config; its info.
peft_module_info check_peft_module(const peft_module_keys& keys, const peft_config& config,
                                   const peft_module_context& ctx);
/// Calls fn(name in the file, values) for each tensor of a module: A, B, then lora_B.bias and the
/// magnitude vector when present.
template <typename Fn>
void for_each_module_tensor(const peft_module& m, Fn&& fn);

}  // namespace detail

// ===================================================================================================
// Implementation
// ===================================================================================================

// --- peft_full_tensor ------------------------------------------------------------------------------------

template <typename Scalar>
vector<Scalar> peft_full_tensor::values() const {
  if (!is_readable_as_real(type)) {
    throw dtype_error(detail::cat("PEFT tensor '", path, "' is ", dtype_name(type), ", which has no real values"));
  }
  const std::size_t width = dtype_size(type);
  vector<Scalar> out(static_cast<index>(size() / width));
  detail::decode<Scalar>(type, data(), static_cast<std::size_t>(out.size()), out.data());
  return out;
}

template <typename Derived>
peft_full_tensor peft_full_tensor::from_matrix(std::string path, const Eigen::MatrixBase<Derived>& values, dtype type) {
  peft_full_tensor t;
  t.path = std::move(path);
  t.type = type;
  t.shape = {static_cast<std::int64_t>(values.rows()), static_cast<std::int64_t>(values.cols())};
  detail::encode_row_major(values, type, [&](const unsigned char* bytes, std::size_t n) {
    t.bytes.insert(t.bytes.end(), bytes, bytes + n);
  });
  return t;
}

namespace detail {

inline const peft_suffix_rule* find_suffix_rule(std::string_view rest) noexcept {
  for (const peft_suffix_rule& r : peft_suffix_rules) {
    if (rest.size() > r.suffix.size() && rest.substr(rest.size() - r.suffix.size()) == r.suffix) return &r;
  }
  return nullptr;
}

inline void index_peft_keys(const safetensors_file& file, std::map<std::string, peft_module_keys>& modules,
                            std::vector<tensor_info>& full) {
  auto fail = [&](const std::string& what) { throw format_error(cat("PEFT adapter '", file.path(), "': ", what)); };
  for (const tensor_info& t : file.tensors()) {
    const std::string_view name = t.name;
    if (name.substr(0, peft_key_prefix.size()) != peft_key_prefix) {
      fail(cat("tensor '", t.name, "' does not start with '", peft_key_prefix, "' (PEFT's key prefix)"));
    }
    const std::string_view rest = name.substr(peft_key_prefix.size());
    const peft_suffix_rule* rule = find_suffix_rule(rest);
    if (rule == nullptr && (rest.rfind("lora_", 0) == 0 || rest.find(".lora_") != std::string_view::npos)) {
      fail(cat("tensor '", t.name,
               "' is not a LoRA tensor PEFT saves (lora_A.weight, lora_B.weight, lora_B.bias, lora_embedding_A, "
               "lora_embedding_B, lora_magnitude_vector); keys holding an adapter name come from a raw "
               "state_dict, not from save_pretrained"));
    }
    if (rule == nullptr && rest.empty()) fail(cat("tensor '", t.name, "' names no module"));
    if (rule == nullptr) {
      full.push_back(t);
      continue;
    }
    const std::string path(rest.substr(0, rest.size() - rule->suffix.size()));
    peft_module_keys& keys = modules[path];
    if (keys.slots[rule->slot] != nullptr) {
      fail(cat("module '", path, "' has both '", keys.slots[rule->slot]->name, "' and '", t.name, "'"));
    }
    keys.slots[rule->slot] = &t;
    (rule->embedding ? keys.embedding_keys : keys.linear_keys) += rule->slot <= 1 ? 1 : 0;
  }
  std::sort(full.begin(), full.end(), [](const tensor_info& x, const tensor_info& y) { return x.name < y.name; });
}

/// True for PEFT's Conv2d factors: lora_A [r, C, kh, kw] and lora_B [out, r, 1, 1].
inline bool is_conv_pair(const tensor_info& a, const tensor_info& b) {
  return a.rank() == 4 && b.rank() == 4 && b.shape[2] == 1 && b.shape[3] == 1;
}

/// in_features of lora_A: its second dimension, or C kh kw for a conv kernel.
inline std::int64_t conv_features(const tensor_info& a) {
  std::int64_t n = 1;
  for (std::size_t d = 1; d < a.shape.size(); ++d) n *= a.shape[d];  // sizes validated by the reader
  return n;
}

/// Checks the factors A (r x in) and B (out x r) of a module: 2-D, agreeing on the rank, the rank the
/// config gives the module, no empty dimension.
inline void check_peft_factors(const tensor_info& a, const tensor_info& b, const char* a_name, const char* b_name,
                               const peft_config& config, const peft_module_context& ctx) {
  const bool conv = is_conv_pair(a, b);
  if ((a.rank() != 2 || b.rank() != 2) && !conv) {
    throw shape_error(cat(ctx.where(), ": ", a_name, " and ", b_name, " must be 2-D (or a conv pair [r, C, kh, kw], ",
                          "[out, r, 1, 1]), got ", shape_to_string(a.shape), " and ", shape_to_string(b.shape)));
  }
  if (a.shape[0] != b.shape[1]) {
    throw shape_error(cat(ctx.where(), ": ", a_name, " ", shape_to_string(a.shape), " and ", b_name, " ",
                          shape_to_string(b.shape), " disagree on the rank (", a.shape[0], " vs ", b.shape[1], ")"));
  }
  const index expected = config.rank_for(ctx.path);
  if (a.shape[0] != expected) {
    throw shape_error(cat(ctx.where(), " has rank ", a.shape[0], " but the config gives it r = ", expected,
                          config.rank_pattern.empty() ? "" : " (after rank_pattern)"));
  }
  if (conv_features(a) < 1 || b.shape[0] < 1) {
    throw shape_error(cat(ctx.where(), " has an empty dimension: ", a_name, " ", shape_to_string(a.shape), ", ", b_name,
                          " ", shape_to_string(b.shape)));
  }
}

/// Checks lora_B.bias and the magnitude vector: [out] each, present exactly when the config says so
/// (embeddings may lack them).
inline void check_peft_vectors(const peft_module_keys& keys, bool embedding, std::int64_t out,
                               const peft_config& config, const peft_module_context& ctx) {
  for (int slot : {2, 3}) {
    const tensor_info* v = keys.slots[slot];
    if (v != nullptr && (v->rank() != 1 || (!embedding && v->shape[0] != out))) {
      throw shape_error(
          cat(ctx.where(), ": '", v->name, "' must be [", out, "] (out_features), got ", shape_to_string(v->shape)));
    }
  }
  const bool has_bias = keys.slots[2] != nullptr, has_magnitude = keys.slots[3] != nullptr;
  if (has_bias && !config.lora_bias) ctx.fail("has lora_B.bias but the config says lora_bias = false");
  if (!has_bias && config.lora_bias && !embedding) ctx.fail("has no lora_B.bias but the config says lora_bias = true");
  if (has_magnitude && !config.use_dora) ctx.fail("has lora_magnitude_vector but the config says use_dora = false");
  if (!has_magnitude && config.use_dora && !embedding) {
    ctx.fail("has no lora_magnitude_vector but the config says use_dora = true");
  }
}

/// Checks that a module has both factors, of one kind (linear or embedding), every tensor a float
/// dtype; whether it is an embedding.
inline bool check_peft_keys(const peft_module_keys& keys, const peft_module_context& ctx) {
  if (keys.linear_keys != 0 && keys.embedding_keys != 0) ctx.fail("mixes lora_A/lora_B and lora_embedding_A/_B keys");
  const bool embedding = keys.embedding_keys != 0;
  const char* a_name = embedding ? "lora_embedding_A" : "lora_A.weight";
  const char* b_name = embedding ? "lora_embedding_B" : "lora_B.weight";
  if (keys.slots[0] == nullptr || keys.slots[1] == nullptr) {
    ctx.fail(cat("has ",
                 keys.slots[0]   ? a_name
                 : keys.slots[1] ? b_name
                                 : "a bias or magnitude",
                 " but no ", keys.slots[0] ? b_name : a_name));
  }
  for (const tensor_info* t : keys.slots) {
    if (t != nullptr && !is_float_dtype(t->type)) {
      throw dtype_error(cat(ctx.where(), ": tensor '", t->name, "' is ", dtype_name(t->type),
                            "; LoRA tensors must be F16, BF16, F32 or F64"));
    }
  }
  return embedding;
}

inline peft_module_info check_peft_module(const peft_module_keys& keys, const peft_config& config,
                                          const peft_module_context& ctx) {
  const bool embedding = check_peft_keys(keys, ctx);
  const tensor_info& a = *keys.slots[0];
  const tensor_info& b = *keys.slots[1];
  check_peft_factors(a, b, embedding ? "lora_embedding_A" : "lora_A.weight",
                     embedding ? "lora_embedding_B" : "lora_B.weight", config, ctx);
  check_peft_vectors(keys, embedding, b.shape[0], config, ctx);
  peft_module_info info;
  info.path = ctx.path;
  info.embedding = embedding;
  info.rank = static_cast<index>(a.shape[0]);
  info.in = static_cast<index>(conv_features(a));
  info.conv = is_conv_pair(a, b);
  info.out = static_cast<index>(b.shape[0]);
  info.a_key = a.name;
  info.b_key = b.name;
  if (keys.slots[2] != nullptr) info.bias_key = keys.slots[2]->name;
  if (keys.slots[3] != nullptr) info.magnitude_key = keys.slots[3]->name;
  info.type = a.type;
  for (const tensor_info* t : keys.slots) {
    if (t != nullptr && t->type != info.type) {
      info.type = t->type == dtype::f64 || info.type == dtype::f64 ? dtype::f64 : dtype::f32;
    }
  }
  return info;
}

/// The stored shape of one of a module's tensors: a conv module's 4-D factor shapes, else rows x cols.
template <typename Derived>
std::vector<std::int64_t> module_shape(const peft_module& m, const std::string& name,
                                       const Eigen::MatrixBase<Derived>& values) {
  const bool a = name.size() > 15 && name.compare(name.size() - 14, 14, ".lora_A.weight") == 0;
  const bool b = name.size() > 15 && name.compare(name.size() - 14, 14, ".lora_B.weight") == 0;
  if (a && !m.a_shape.empty()) return m.a_shape;
  if (b && !m.b_shape.empty()) return m.b_shape;
  return default_shape(values);
}

template <typename Fn>
void for_each_module_tensor(const peft_module& m, Fn&& fn) {
  const std::string base = std::string(peft_key_prefix) + m.path;
  fn(base + (m.embedding ? ".lora_embedding_A" : ".lora_A.weight"), m.a);
  fn(base + (m.embedding ? ".lora_embedding_B" : ".lora_B.weight"), m.b);
  if (m.b_bias.size() != 0) fn(base + ".lora_B.bias", m.b_bias);
  if (m.magnitude.size() != 0) fn(base + ".lora_magnitude_vector", m.magnitude);
}

/// A conv module's stored shapes [r, C, kh, kw] and [out, r, 1, 1] must hold its A and B.
inline void check_conv_shapes(const peft_module& m, const std::string& where) {
  if (m.a_shape.empty() && m.b_shape.empty()) return;
  std::int64_t in = 1;
  for (std::size_t d = 1; d < m.a_shape.size(); ++d) in *= m.a_shape[d];
  const std::vector<std::int64_t> b_shape = {m.b.rows(), m.b.cols(), 1, 1};
  if (m.a_shape.size() != 4 || m.a_shape[0] != m.a.rows() || in != m.a.cols() || m.b_shape != b_shape)
    throw shape_error(cat(where, ": conv factor shapes ", shape_to_string(m.a_shape), " and ",
                          shape_to_string(m.b_shape), " do not hold A ", shape_str(m.a.rows(), m.a.cols()), " and B ",
                          shape_str(m.b.rows(), m.b.cols())));
}

/// Applies the rules of loading to one module of an adapter in memory.
inline void validate_peft_module(const peft_module& m, const peft_config& config) {
  const std::string where = cat("PEFT adapter module '", m.path, "'");
  if (!is_float_dtype(m.type)) {
    throw dtype_error(cat(where, ": dtype ", dtype_name(m.type), " is not one of F16, BF16, F32, F64"));
  }
  if (m.a.rows() != m.b.cols()) {
    throw shape_error(cat(where, ": A is ", shape_str(m.a.rows(), m.a.cols()), " and B is ",
                          shape_str(m.b.rows(), m.b.cols()), "; the ranks disagree"));
  }
  if (m.a.rows() != config.rank_for(m.path)) {
    throw shape_error(cat(where, " has rank ", m.a.rows(), " but the config gives it r = ", config.rank_for(m.path)));
  }
  if (m.a.cols() < 1 || m.b.rows() < 1) throw shape_error(cat(where, ": A and B must be non-empty"));
  check_conv_shapes(m, where);
  for (const vector<double>* v : {&m.b_bias, &m.magnitude}) {
    if (v->size() != 0 && !m.embedding && v->size() != m.b.rows()) {
      throw shape_error(cat(where, ": lora_B.bias and lora_magnitude_vector must have out_features = ", m.b.rows(),
                            " entries, got ", v->size()));
    }
  }
  const bool has_bias = m.b_bias.size() != 0, has_magnitude = m.magnitude.size() != 0;
  if (has_bias ? !config.lora_bias : (config.lora_bias && !m.embedding)) {
    throw format_error(cat(where, (has_bias ? " has" : " lacks"), " a lora_B bias but config.lora_bias is ",
                           config.lora_bias ? "true" : "false"));
  }
  if (has_magnitude ? !config.use_dora : (config.use_dora && !m.embedding)) {
    throw format_error(cat(where, (has_magnitude ? " has" : " lacks"),
                           " a DoRA magnitude vector but config.use_dora is ", config.use_dora ? "true" : "false"));
  }
}

}  // namespace detail

// --- peft_adapter_file -----------------------------------------------------------------------------------

inline peft_adapter_file peft_adapter_file::open(const std::string& dir, bool print_warnings) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw io_error(detail::cat("PEFT adapter '", dir, "' is not a directory"));
  const std::string weights = (fs::path(dir) / std::string(peft_weights_file)).string();
  if (!fs::exists(weights, ec)) {
    if (fs::exists(fs::path(dir) / "adapter_model.bin", ec)) {
      throw format_error(
          detail::cat("PEFT adapter '", dir,
                      "' holds adapter_model.bin (a PyTorch pickle); only adapter_model.safetensors is "
                      "supported (re-save it with PEFT's save_pretrained(..., safe_serialization=True))"));
    }
    throw io_error(detail::cat("PEFT adapter '", dir, "' has no ", peft_weights_file));
  }
  const std::string config_path = (fs::path(dir) / std::string(peft_config_file)).string();
  peft_config config = peft_config::load(config_path, print_warnings);
  return peft_adapter_file(std::move(config), safetensors_file::open(weights));
}

inline peft_adapter_file peft_adapter_file::from_memory(std::string_view config_json,
                                                        std::vector<unsigned char> safetensors_bytes,
                                                        bool print_warnings) {
  peft_config config = peft_config::parse(config_json, print_warnings);
  return peft_adapter_file(std::move(config),
                           safetensors_file::from_bytes(std::move(safetensors_bytes), std::string(peft_weights_file)));
}

// Indexes the file's keys by module and checks the layout against the config without reading data.
inline peft_adapter_file::peft_adapter_file(peft_config config, safetensors_file file)
    : m_config(std::move(config)), m_file(std::move(file)) {
  std::map<std::string, detail::peft_module_keys> found;
  detail::index_peft_keys(m_file, found, m_full);
  for (const auto& [path, keys] : found) {
    m_modules.push_back(detail::check_peft_module(keys, m_config, detail::peft_module_context{m_file.path(), path}));
  }
}

inline peft_module peft_adapter_file::read_module(const peft_module_info& info) const {
  peft_module m;
  m.path = info.path;
  m.embedding = info.embedding;
  m.type = info.type;
  if (info.conv) {  // flattened row-major: A (r x C kh kw), B (out x r)
    using row_major = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const vector<double> a = m_file.read_vector<double>(info.a_key), b = m_file.read_vector<double>(info.b_key);
    m.a = Eigen::Map<const row_major>(a.data(), info.rank, info.in);
    m.b = Eigen::Map<const row_major>(b.data(), info.out, info.rank);
    m.a_shape = m_file.info(info.a_key).shape;
    m.b_shape = m_file.info(info.b_key).shape;
  } else {
    m.a = m_file.read_matrix<double>(info.a_key);
    m.b = m_file.read_matrix<double>(info.b_key);
  }
  if (!info.bias_key.empty()) m.b_bias = m_file.read_vector<double>(info.bias_key);
  if (!info.magnitude_key.empty()) m.magnitude = m_file.read_vector<double>(info.magnitude_key);
  return m;
}

inline std::int64_t peft_adapter_file::parameter_count() const {
  std::int64_t n = 0;
  for (const tensor_info& t : m_file.tensors()) n += t.numel();
  return n;
}

// --- peft_adapter ----------------------------------------------------------------------------------------

inline peft_adapter peft_adapter::load(const std::string& dir, bool print_warnings) {
  return read(peft_adapter_file::open(dir, print_warnings));
}

inline peft_adapter peft_adapter::from_memory(std::string_view config_json,
                                              std::vector<unsigned char> safetensors_bytes, bool print_warnings) {
  return read(peft_adapter_file::from_memory(config_json, std::move(safetensors_bytes), print_warnings));
}

inline peft_adapter peft_adapter::read(const peft_adapter_file& file) {
  peft_adapter out;
  out.config = file.config();
  out.modules.reserve(file.modules().size());
  for (const peft_module_info& info : file.modules()) out.modules.push_back(file.read_module(info));
  for (const tensor_info& t : file.full_tensors()) {
    peft_full_tensor f;
    f.path = t.name.substr(peft_key_prefix.size());
    f.type = t.type;
    f.shape = t.shape;
    f.mapped = file.tensors().raw(t.name);
    out.full_tensors.push_back(std::move(f));
  }
  return out;
}

inline const peft_module* peft_adapter::find(const std::string& path) const {
  for (const peft_module& m : modules) {
    if (m.path == path) return &m;
  }
  return nullptr;
}

inline std::int64_t peft_adapter::parameter_count() const {
  std::int64_t n = 0;
  for (const peft_module& m : modules) n += m.a.size() + m.b.size() + m.b_bias.size() + m.magnitude.size();
  for (const peft_full_tensor& f : full_tensors) {
    std::int64_t e = 1;
    for (const std::int64_t d : f.shape) e *= d;
    n += e;
  }
  return n;
}

inline void peft_adapter::validate() const {
  config.validate();
  std::set<std::string> seen;
  for (const peft_module& m : modules) {
    if (m.path.empty()) throw name_error("PEFT adapter: a module has an empty path");
    if (!seen.insert(m.path).second) throw name_error(detail::cat("PEFT adapter module '", m.path, "' appears twice"));
    detail::validate_peft_module(m, config);
  }
  for (const peft_full_tensor& f : full_tensors) {
    if (f.path.empty()) throw name_error("PEFT adapter: a whole tensor has an empty path");
    std::uint64_t bytes = 0;
    if (!detail::checked_byte_size(f.type, f.shape, bytes) || bytes != f.size()) {
      throw shape_error(detail::cat("PEFT adapter tensor '", f.path, "' (", dtype_name(f.type), " ",
                                    detail::shape_to_string(f.shape), ") holds ", f.size(), " bytes"));
    }
  }
}

inline std::vector<unsigned char> peft_adapter::safetensors_bytes() const {
  validate();
  safetensors_writer writer;
  for (const peft_module& m : modules) {
    detail::for_each_module_tensor(m, [&](const std::string& name, const auto& values) {
      writer.add(name, values, m.type, detail::module_shape(m, name, values));
    });
  }
  const std::string prefix(peft_key_prefix);
  for (const peft_full_tensor& f : full_tensors) writer.add_raw(prefix + f.path, f.type, f.shape, f.data(), f.size());
  writer.set_metadata({{"format", "pt"}});
  return writer.to_bytes();
}

inline void peft_adapter::save(const std::string& dir) const {
  namespace fs = std::filesystem;
  validate();
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (!fs::is_directory(dir)) throw io_error(detail::cat("cannot create PEFT adapter directory '", dir, "'"));
  const std::string prefix(peft_key_prefix);

  // Lay out every tensor, then stream them into the temporary (no second copy of the data).
  std::vector<tensor_spec> specs;
  for (const peft_module& m : modules) {
    detail::for_each_module_tensor(m, [&](const std::string& name, const auto& values) {
      specs.push_back(tensor_spec{name, m.type, detail::module_shape(m, name, values)});
    });
  }
  for (const peft_full_tensor& f : full_tensors) specs.push_back(tensor_spec{prefix + f.path, f.type, f.shape});
  sort_like_reference(specs);

  safetensors_stream_writer weights((fs::path(dir) / peft_weights_file).string(), specs, {{"format", "pt"}});
  for (const peft_module& m : modules) {
    detail::for_each_module_tensor(m,
                                   [&](const std::string& name, const auto& values) { weights.write(name, values); });
  }
  for (const peft_full_tensor& f : full_tensors) {
    if (f.size() != 0) weights.write_raw(prefix + f.path, f.data(), f.size());
  }
  const std::string json = config.to_json() + "\n";
  atomic_file config_file(fs::path(dir) / peft_config_file);
  config_file.write_at(0, json.data(), json.size());
  // Both temporaries are complete: rename them back to back.
  weights.commit();
  config_file.commit();
}

}  // namespace lora::io
