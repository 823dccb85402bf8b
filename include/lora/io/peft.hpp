// lora/io/peft.hpp: Hugging Face PEFT LoRA adapters (REFERENCE.md §5): the adapter_config.json
// schema, the tensors of adapter_model.safetensors, and the bridge to lora::linear layers.
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
// Orientation: lora_A / lora_B are [r, in] / [out, r] whatever fan_in_fan_out says; fan_in_fan_out only
// says that the *base* weight is stored [in, out] (GPT-2's Conv1D).
//
// Effective hyper-parameters of a module follow PEFT's get_pattern_key: the keys of rank_pattern (then
// alpha_pattern) are tried in order and the first key k for which re.match(r"(.*\.)?(k)$", path)
// succeeds gives the value; otherwise r (lora_alpha). Scaling s = alpha / r, or alpha / sqrt(r) with
// use_rslora. The regular expressions run on lora::io::detail::regex (Python syntax subset, linear time).
//
// Reading validates everything it can before any tensor data is read (keys, shapes, ranks against the
// config, dtypes) and raises lora::format_error, shape_error or dtype_error naming the module.
//
// POSIX only, like safetensors.hpp.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "../adapter.hpp"
#include "../config.hpp"
#include "../error.hpp"
#include "../linear.hpp"
#include "detail/regex.hpp"
#include "safetensors.hpp"

namespace lora::io {

/// The prefix of every key in a PEFT adapter file ("base_model.model." + module path).
inline constexpr std::string_view peft_key_prefix = "base_model.model.";
/// File names inside an adapter directory.
inline constexpr std::string_view peft_config_file = "adapter_config.json";
inline constexpr std::string_view peft_weights_file = "adapter_model.safetensors";
/// Largest adapter_config.json read (it is a few hundred bytes in practice).
inline constexpr std::uintmax_t max_peft_config_bytes = 16u << 20;

/// Ordered (regex, value) pairs: PEFT tries the keys of rank_pattern / alpha_pattern in order.
template <typename T>
using pattern_list = std::vector<std::pair<std::string, T>>;

/// adapter_config.json of a LoRA adapter. Defaults are PEFT's LoraConfig defaults.
struct peft_config {
  std::string peft_type = "LORA";
  index r = 8;
  double lora_alpha = 8.0;
  double lora_dropout = 0.0;
  /// A list (a module is targeted when its path equals an entry or ends with "." + entry) or one regex
  /// string (re.fullmatch against the path). null reads as an empty list.
  std::variant<std::vector<std::string>, std::string> target_modules;
  bool fan_in_fan_out = false;  ///< The base weights are stored in x out (GPT-2 Conv1D).
  std::string bias = "none";    ///< "none" | "all" | "lora_only"
  bool use_rslora = false;
  bool use_dora = false;
  pattern_list<index> rank_pattern;
  pattern_list<double> alpha_pattern;
  std::vector<std::string> modules_to_save;  ///< null reads (and writes) as empty
  std::variant<bool, std::string> init_lora_weights = true;
  std::optional<std::string> task_type;
  std::optional<std::string> base_model_name_or_path;
  bool inference_mode = true;  ///< What save_pretrained writes; parse() defaults to false when absent.
  bool lora_bias = false;      ///< lora_B carries a bias
  /// Set by parse(): keys it did not honour, and other things a user should know.
  std::vector<std::string> warnings;

  /// Parses adapter_config.json text. Unknown keys are ignored with a warning (printed to stderr too
  /// when print_warnings). format_error naming `label`, the key, the expected and the actual JSON type
  /// for a wrong type; format_error for a value PEFT would refuse (r < 1, unknown bias, a bad regex,
  /// lora_bias with use_dora, a peft_type other than "LORA").
  static peft_config parse(std::string_view json_text, bool print_warnings = false,
                           const std::string& label = "adapter_config.json");
  /// Reads and parses a file; io_error when it cannot be read.
  static peft_config load(const std::string& path, bool print_warnings = false);
  /// The JSON PEFT writes (sorted keys, indent 2), loadable by PEFT's LoraConfig.from_pretrained.
  std::string to_json(int indent = 2) const;
  /// Throws format_error if a value breaks a rule parse() enforces (for configs built in code).
  void validate(const std::string& label = "peft_config") const;

  /// Whether target_modules selects `module_path`.
  bool targets(const std::string& module_path) const;
  /// Effective rank and alpha of a module (rank_pattern / alpha_pattern, else r / lora_alpha).
  index rank_for(const std::string& module_path) const;
  double alpha_for(const std::string& module_path) const;
  /// s = alpha / r, or alpha / sqrt(r) with use_rslora, with the effective rank and alpha.
  double scaling_for(const std::string& module_path) const;
  /// The lora::adapter_config of a module: effective rank and alpha, lora_dropout, use_rslora, zeros init.
  adapter_config adapter_config_for(const std::string& module_path) const;
};

/// Where one adapted module's tensors are in a file, and their shapes.
struct peft_module_info {
  std::string path;        ///< Module path, without "base_model.model."
  bool embedding = false;  ///< lora_embedding_A / _B rather than lora_A / lora_B
  index rank = 0;
  index in = 0;               ///< in_features (num_embeddings for an embedding)
  index out = 0;              ///< out_features (embedding_dim for an embedding)
  std::string a_key, b_key;   ///< Full tensor names in the file.
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
  template <typename Layers>
  static peft_adapter from_layers(const Layers& layers, const std::string& adapter_name, peft_config base = {});

  /// Writes `dir`/adapter_config.json and `dir`/adapter_model.safetensors (metadata {"format":"pt"}),
  /// creating `dir` if needed. Both files are written to temporaries first and renamed over their
  /// targets back to back once both are complete; a failure leaves the old files in place.
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

/// Attaches `adapter` as `adapter_name` to matching layers: `layers` is any range of
/// std::pair<std::string, P> with P a pointer to lora::linear<Scalar>, keyed by module path. Every
/// module of the adapter must match one layer (exact path, or the longest common dotted suffix as in
/// detail::suffix_index); layers without a module are left alone. All or nothing: every module is
/// checked first (a layer for it, in and out features, rank against the config, a free adapter name,
/// a plain LoRA module: no DoRA magnitude, no lora_B bias, no embedding) and only then are adapters
/// added, each with the module's effective rank, alpha, use_rslora and lora_dropout and with A and B
/// copied in. On any error nothing changes and the message names the module. The new adapter becomes
/// active only on layers that had no adapter (lora::linear::add_adapter).
template <typename Layers>
void attach(const peft_adapter& adapter, const Layers& layers, const std::string& adapter_name);

namespace detail {

/// Dotted paths split into components, for matching names that differ by a leading prefix
/// ("transformer.h.0.attn.c_attn" vs "h.0.attn.c_attn"; "model.model.layers.0" vs "model.layers.0").
/// Two paths match when one is a whole dotted suffix of the other; among the candidates that match a
/// path, an identical one wins, else the one sharing the most trailing components, and a tie is refused
/// as ambiguous.
class suffix_index {
 public:
  explicit suffix_index(std::vector<std::string> candidates);
  suffix_index(const suffix_index&) = delete;  // m_parts views m_names
  suffix_index& operator=(const suffix_index&) = delete;
  suffix_index(suffix_index&&) noexcept = default;
  suffix_index& operator=(suffix_index&&) noexcept = default;
  /// The index of the candidate matching `path`, or -1 if none; name_error naming `what` (e.g.
  /// "adapter module 'x'") and both candidates when two match equally well.
  std::ptrdiff_t find(const std::string& path, const std::string& what) const;
  const std::vector<std::string>& candidates() const noexcept { return m_names; }

 private:
  std::vector<std::string> m_names;
  std::vector<std::vector<std::string_view>> m_parts;
  std::unordered_map<std::string_view, std::vector<std::size_t>> m_by_last;
};

std::vector<std::string_view> split_dots(std::string_view path);
/// Whether `text` matches the PEFT pattern key `key`: re.match(r"(.*\.)?(key)$", text).
bool pattern_key_matches(const std::string& key, const std::string& text);
/// The regex that matches exactly `text` (every metacharacter escaped).
std::string regex_escape(const std::string& text);
/// Reads a whole (small) file; io_error naming `what` on failure, format_error above `limit` bytes.
std::string read_text_file(const std::string& path, std::uintmax_t limit, const std::string& what);
/// Whether a dtype is one LoRA factors may be stored in (F16, BF16, F32, F64).
bool is_float_dtype(dtype type) noexcept;
/// "a, b, c" of at most `shown` names, then "... (N more)".
std::string list_names(const std::vector<std::string>& names, std::size_t shown = 5);

}  // namespace detail

// ===================================================================================================
// Implementation
// ===================================================================================================

namespace detail {

using ojson = nlohmann::ordered_json;

/// Deepest nesting accepted in adapter_config.json (a valid one needs 2).
inline constexpr int max_config_depth = 64;

inline bool is_float_dtype(dtype type) noexcept {
  return type == dtype::f16 || type == dtype::bf16 || type == dtype::f32 || type == dtype::f64;
}

inline std::string list_names(const std::vector<std::string>& names, std::size_t shown) {
  std::string out;
  const std::size_t n = std::min(shown, names.size());
  for (std::size_t k = 0; k < n; ++k) out += (k ? ", '" : "'") + names[k] + "'";
  if (names.size() > n) out += detail::cat(", ... (", names.size() - n, " more)");
  return out.empty() ? "none" : out;
}

inline std::vector<std::string_view> split_dots(std::string_view path) {
  std::vector<std::string_view> parts;
  std::size_t start = 0;
  for (;;) {
    const std::size_t dot = path.find('.', start);
    parts.push_back(path.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start));
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return parts;
}

inline suffix_index::suffix_index(std::vector<std::string> candidates) : m_names(std::move(candidates)) {
  m_parts.reserve(m_names.size());
  for (std::size_t k = 0; k < m_names.size(); ++k) {
    m_parts.push_back(split_dots(m_names[k]));
    m_by_last[m_parts.back().back()].push_back(k);
  }
}

inline std::ptrdiff_t suffix_index::find(const std::string& path, const std::string& what) const {
  const std::vector<std::string_view> parts = split_dots(path);
  const auto it = m_by_last.find(parts.back());
  if (it == m_by_last.end()) return -1;
  // Score: twice the shared trailing components, plus one for an identical path, which therefore
  // beats a longer path that merely ends with it.
  std::ptrdiff_t best = -1, tied = -1;
  std::size_t best_score = 0;
  for (const std::size_t k : it->second) {
    const auto& other = m_parts[k];
    std::size_t common = 0;
    while (common < parts.size() && common < other.size() &&
           parts[parts.size() - 1 - common] == other[other.size() - 1 - common]) {
      ++common;
    }
    if (common != parts.size() && common != other.size()) continue;  // neither is a whole suffix
    const std::size_t score = 2 * common + (parts.size() == other.size() ? 1 : 0);
    if (score > best_score) {
      best = static_cast<std::ptrdiff_t>(k);
      best_score = score;
      tied = -1;
    } else if (score == best_score) {
      tied = static_cast<std::ptrdiff_t>(k);
    }
  }
  if (tied >= 0) {
    throw name_error(cat(what, " matches '", m_names[static_cast<std::size_t>(best)], "' and '",
                         m_names[static_cast<std::size_t>(tied)], "' equally well (", best_score / 2,
                         " trailing components each); the match is ambiguous"));
  }
  return best;
}

inline bool pattern_key_matches(const std::string& key, const std::string& text) {
  // PEFT's get_pattern_key: re.match(rf"(.*\.)?({key})$", text), the key spliced in unescaped.
  const regex re("(.*\\.)?(" + key + ")$");
  return re.match_prefix(text);
}

inline std::string regex_escape(const std::string& text) {
  std::string out;
  for (const char c : text) {
    if (std::string_view("\\.^$|?*+()[]{}-#&~ \t\n\r\v\f").find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

inline std::string read_text_file(const std::string& path, std::uintmax_t limit, const std::string& what) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status))
    throw io_error(detail::cat("cannot read ", what, " '", path, "': no such file"));
  if (!std::filesystem::is_regular_file(status)) {
    throw io_error(detail::cat("cannot read ", what, " '", path, "': not a regular file"));
  }
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  if (!ec && size > limit) {
    throw format_error(detail::cat(what, " '", path, "' is ", size, " bytes, more than the ", limit, "-byte limit"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error(detail::cat("cannot open ", what, " '", path, "'"));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw io_error(detail::cat("cannot read ", what, " '", path, "'"));
  return text;
}

/// "integer", "number" (with a fraction or exponent), "string", "boolean", "null", "array", "object".
inline const char* json_kind(const ojson& v) {
  if (v.is_number_integer()) return "integer";
  if (v.is_number_float()) return "number";
  return v.type_name();
}

/// A short rendering of a JSON value for messages.
inline std::string json_excerpt(const ojson& v) {
  std::string s = v.dump(-1, ' ', true, nlohmann::json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

/// Reads the typed values of adapter_config.json, each error naming the file, the key, the expected
/// and the actual JSON type.
class config_reader {
 public:
  explicit config_reader(const std::string& label) : m_label(label) {}

  [[noreturn]] void type_error(const std::string& key, const char* expected, const ojson& v) const {
    throw format_error(
        detail::cat(m_label, ": key '", key, "' must be ", expected, ", got ", json_kind(v), " ", json_excerpt(v)));
  }
  [[noreturn]] void value_error(const std::string& key, const std::string& rule) const {
    throw format_error(detail::cat(m_label, ": key '", key, "' ", rule));
  }

  bool boolean(const std::string& key, const ojson& v) const {
    if (!v.is_boolean()) type_error(key, "a boolean", v);
    return v.get<bool>();
  }
  std::string string(const std::string& key, const ojson& v) const {
    if (!v.is_string()) type_error(key, "a string", v);
    return v.get<std::string>();
  }
  std::optional<std::string> optional_string(const std::string& key, const ojson& v) const {
    if (v.is_null()) return std::nullopt;
    if (!v.is_string()) type_error(key, "a string or null", v);
    return v.get<std::string>();
  }
  double number(const std::string& key, const ojson& v) const {
    if (!v.is_number()) type_error(key, "a number", v);
    const double x = v.get<double>();
    if (!std::isfinite(x)) value_error(key, detail::cat("must be finite, got ", json_excerpt(v)));
    return x;
  }
  index rank(const std::string& key, const ojson& v) const {
    if (!v.is_number_integer()) type_error(key, "an integer", v);
    const bool too_big =
        v.is_number_unsigned() ? v.get<std::uint64_t>() > (1u << 30) : v.get<std::int64_t>() > (1 << 30);
    if (too_big || (!v.is_number_unsigned() && v.get<std::int64_t>() < 1)) {
      value_error(key, detail::cat("must be a rank between 1 and 2^30, got ", json_excerpt(v)));
    }
    return static_cast<index>(v.get<std::int64_t>());
  }
  std::vector<std::string> string_list(const std::string& key, const ojson& v, bool allow_null) const {
    std::vector<std::string> out;
    if (allow_null && v.is_null()) return out;
    if (!v.is_array()) type_error(key, allow_null ? "a list of strings or null" : "a list of strings", v);
    for (const ojson& item : v) {
      if (!item.is_string()) type_error(key + "[]", "a string", item);
      out.push_back(item.get<std::string>());
    }
    return out;
  }
  template <typename T, typename Read>
  pattern_list<T> patterns(const std::string& key, const ojson& v, Read&& read) const {
    pattern_list<T> out;
    if (v.is_null()) return out;
    if (!v.is_object()) type_error(key, "an object mapping module patterns to values", v);
    for (const auto& [pattern, value] : v.items()) out.emplace_back(pattern, read(key + "['" + pattern + "']", value));
    return out;
  }

 private:
  const std::string& m_label;
};

/// Keys PEFT's LoraConfig (or PeftConfig) defines that this library does not model. `semantic` ones
/// change what an adapter computes or which modules it has, so a non-neutral value draws a warning;
/// the others are informational.
struct known_key {
  const char* name;
  bool semantic;
};
inline constexpr known_key ignored_peft_keys[] = {
    {"auto_mapping", false},
    {"revision", false},
    {"megatron_core", false},
    {"runtime_config", false},
    {"peft_version", false},
    {"qalora_group_size", false},
    {"ensure_weight_tying", false},
    {"exclude_modules", false},
    {"layers_to_transform", false},
    {"layers_pattern", false},
    {"loftq_config", false},
    {"eva_config", false},
    {"corda_config", false},
    {"lora_ga_config", false},
    {"megatron_config", true},
    {"layer_replication", true},
    {"trainable_token_indices", true},
    {"target_parameters", true},
    {"use_qalora", true},
    {"alora_invocation_tokens", true},
    {"arrow_config", true},
};

inline bool is_neutral(const ojson& v) {
  return v.is_null() || (v.is_boolean() && !v.get<bool>()) || ((v.is_array() || v.is_object()) && v.empty());
}

}  // namespace detail

// --- peft_config -------------------------------------------------------------------------------------

inline peft_config peft_config::parse(std::string_view json_text, bool print_warnings, const std::string& label) {
  using detail::ojson;
  detail::config_reader read(label);
  ojson root;
  const ojson::parser_callback_t limit_depth = [&](int depth, ojson::parse_event_t event, ojson&) {
    if ((event == ojson::parse_event_t::object_start || event == ojson::parse_event_t::array_start) &&
        depth >= detail::max_config_depth) {
      throw format_error(detail::cat(label, ": JSON nests deeper than ", detail::max_config_depth, " levels"));
    }
    return true;
  };
  try {
    root = ojson::parse(json_text.begin(), json_text.end(), limit_depth, /*allow_exceptions=*/true,
                        /*ignore_comments=*/false);
  } catch (const ojson::exception& e) {
    throw format_error(detail::cat(label, ": not valid JSON: ", e.what()));
  }
  if (!root.is_object())
    throw format_error(detail::cat(label, ": expected a JSON object, got ", detail::json_kind(root)));
  if (!root.contains("peft_type")) throw format_error(detail::cat(label, ": missing key 'peft_type' (\"LORA\")"));

  peft_config c;
  c.inference_mode = false;  // PEFT's LoraConfig default; saved configs say true
  for (const auto& item : root.items()) {
    const std::string& key = item.key();  // a plain reference: lambdas below capture it (C++17)
    const ojson& v = item.value();
    if (key == "peft_type") {
      c.peft_type = read.string(key, v);
    } else if (key == "r") {
      c.r = read.rank(key, v);
    } else if (key == "lora_alpha") {
      c.lora_alpha = read.number(key, v);
    } else if (key == "lora_dropout") {
      c.lora_dropout = read.number(key, v);
    } else if (key == "target_modules") {
      if (v.is_string()) {
        c.target_modules = v.get<std::string>();
      } else {
        c.target_modules = read.string_list(key, v, true);
      }
    } else if (key == "fan_in_fan_out") {
      c.fan_in_fan_out = read.boolean(key, v);
    } else if (key == "bias") {
      c.bias = read.string(key, v);
    } else if (key == "use_rslora") {
      c.use_rslora = read.boolean(key, v);
    } else if (key == "use_dora") {
      c.use_dora = read.boolean(key, v);
    } else if (key == "rank_pattern") {
      c.rank_pattern =
          read.patterns<index>(key, v, [&](const std::string& k, const ojson& x) { return read.rank(k, x); });
    } else if (key == "alpha_pattern") {
      c.alpha_pattern =
          read.patterns<double>(key, v, [&](const std::string& k, const ojson& x) { return read.number(k, x); });
    } else if (key == "modules_to_save") {
      c.modules_to_save = read.string_list(key, v, true);
    } else if (key == "init_lora_weights") {
      if (v.is_boolean()) {
        c.init_lora_weights = v.get<bool>();
      } else if (v.is_string()) {
        c.init_lora_weights = v.get<std::string>();
      } else {
        read.type_error(key, "a boolean or a string", v);
      }
    } else if (key == "task_type") {
      c.task_type = read.optional_string(key, v);
    } else if (key == "base_model_name_or_path") {
      c.base_model_name_or_path = read.optional_string(key, v);
    } else if (key == "inference_mode") {
      c.inference_mode = read.boolean(key, v);
    } else if (key == "lora_bias") {
      c.lora_bias = read.boolean(key, v);
    } else {
      const auto known = std::find_if(std::begin(detail::ignored_peft_keys), std::end(detail::ignored_peft_keys),
                                      [&](const detail::known_key& k) { return key == k.name; });
      if (known == std::end(detail::ignored_peft_keys)) {
        c.warnings.push_back(detail::cat(label, ": unknown key '", key, "' ignored"));
      } else if (known->semantic && !detail::is_neutral(v)) {
        c.warnings.push_back(detail::cat(label, ": key '", key, "' = ", detail::json_excerpt(v),
                                         " is not supported and was ignored; results may differ from PEFT's"));
      }
    }
  }
  if (const auto* init = std::get_if<std::string>(&c.init_lora_weights)) {
    std::string lower = *init;
    for (char& ch : lower) ch = static_cast<char>(ch >= 'A' && ch <= 'Z' ? ch - 'A' + 'a' : ch);
    for (const char* changes_base : {"pissa", "olora", "corda", "loftq"}) {
      if (lower.rfind(changes_base, 0) == 0) {
        c.warnings.push_back(
            detail::cat(label, ": init_lora_weights = \"", *init,
                        "\" changes the base weights at initialisation; merge this adapter only into the "
                        "matching modified base model (or convert it with PEFT first)"));
        break;
      }
    }
  }
  c.validate(label);
  if (print_warnings) {
    for (const std::string& w : c.warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  }
  return c;
}

inline peft_config peft_config::load(const std::string& path, bool print_warnings) {
  return parse(detail::read_text_file(path, max_peft_config_bytes, "PEFT config"), print_warnings, path);
}

inline void peft_config::validate(const std::string& label) const {
  auto fail = [&](const std::string& what) { throw format_error(detail::cat(label, ": ", what)); };
  if (peft_type != "LORA") {
    fail(detail::cat("peft_type is '", peft_type, "'; only LoRA adapters (\"LORA\") are supported"));
  }
  if (r < 1) fail(detail::cat("key 'r' must be >= 1, got ", r));
  if (!std::isfinite(lora_alpha)) fail(detail::cat("key 'lora_alpha' must be finite, got ", lora_alpha));
  if (!(lora_dropout >= 0.0 && lora_dropout <= 1.0)) {
    fail(detail::cat("key 'lora_dropout' must be in [0, 1], got ", lora_dropout));
  }
  if (bias != "none" && bias != "all" && bias != "lora_only") {
    fail(detail::cat("key 'bias' must be \"none\", \"all\" or \"lora_only\", got \"", bias, "\""));
  }
  if (lora_bias && use_dora) fail("lora_bias = true is not supported with use_dora = true (PEFT refuses it too)");
  for (const auto& [pattern, rank] : rank_pattern) {
    if (rank < 1) fail(detail::cat("rank_pattern['", pattern, "'] must be >= 1, got ", rank));
  }
  for (const auto& [pattern, alpha] : alpha_pattern) {
    if (!std::isfinite(alpha)) fail(detail::cat("alpha_pattern['", pattern, "'] must be finite, got ", alpha));
  }
  // Compile every regex now, so that a bad one is reported here rather than at first use.
  auto check_regex = [&](const std::string& key, const std::string& pattern, bool spliced) {
    try {
      detail::regex re(spliced ? "(.*\\.)?(" + pattern + ")$" : pattern);
    } catch (const format_error& e) {
      fail(detail::cat(key, " holds a regular expression this library cannot use: ", e.what()));
    }
  };
  for (const auto& entry : rank_pattern) check_regex("rank_pattern['" + entry.first + "']", entry.first, true);
  for (const auto& entry : alpha_pattern) check_regex("alpha_pattern['" + entry.first + "']", entry.first, true);
  if (const auto* re = std::get_if<std::string>(&target_modules)) check_regex("target_modules", *re, false);
}

inline std::string peft_config::to_json(int indent) const {
  using detail::ojson;
  auto number = [](double x) -> ojson {
    if (std::floor(x) == x && std::fabs(x) < 9007199254740992.0) return static_cast<std::int64_t>(x);
    return x;
  };
  // Keys sorted, as PEFT's save_pretrained writes them (json.dumps(..., sort_keys=True)); the pattern
  // maps keep their order, which decides the first match.
  ojson root = ojson::object();
  ojson alphas = ojson::object();
  for (const auto& [pattern, alpha] : alpha_pattern) alphas[pattern] = number(alpha);
  root["alpha_pattern"] = std::move(alphas);
  root["base_model_name_or_path"] = base_model_name_or_path ? ojson(*base_model_name_or_path) : ojson(nullptr);
  root["bias"] = bias;
  root["fan_in_fan_out"] = fan_in_fan_out;
  root["inference_mode"] = inference_mode;
  root["init_lora_weights"] = std::holds_alternative<bool>(init_lora_weights)
                                  ? ojson(std::get<bool>(init_lora_weights))
                                  : ojson(std::get<std::string>(init_lora_weights));
  root["lora_alpha"] = number(lora_alpha);
  root["lora_bias"] = lora_bias;
  root["lora_dropout"] = lora_dropout;
  root["modules_to_save"] = modules_to_save.empty() ? ojson(nullptr) : ojson(modules_to_save);
  root["peft_type"] = peft_type;
  root["r"] = static_cast<std::int64_t>(r);
  ojson ranks = ojson::object();
  for (const auto& [pattern, rank] : rank_pattern) ranks[pattern] = static_cast<std::int64_t>(rank);
  root["rank_pattern"] = std::move(ranks);
  root["target_modules"] = std::holds_alternative<std::string>(target_modules)
                               ? ojson(std::get<std::string>(target_modules))
                               : ojson(std::get<std::vector<std::string>>(target_modules));
  root["task_type"] = task_type ? ojson(*task_type) : ojson(nullptr);
  root["use_dora"] = use_dora;
  root["use_rslora"] = use_rslora;
  try {
    return root.dump(indent, ' ', false, nlohmann::json::error_handler_t::strict);
  } catch (const ojson::exception& e) {
    throw format_error(detail::cat("peft_config: cannot write JSON (a string is not valid UTF-8): ", e.what()));
  }
}

inline bool peft_config::targets(const std::string& module_path) const {
  if (const auto* re = std::get_if<std::string>(&target_modules)) return detail::regex(*re).match_full(module_path);
  for (const std::string& t : std::get<std::vector<std::string>>(target_modules)) {
    if (module_path == t) return true;
    if (module_path.size() > t.size() && module_path.compare(module_path.size() - t.size(), t.size(), t) == 0 &&
        module_path[module_path.size() - t.size() - 1] == '.') {
      return true;
    }
  }
  return false;
}

inline index peft_config::rank_for(const std::string& module_path) const {
  for (const auto& [pattern, rank] : rank_pattern) {
    if (detail::pattern_key_matches(pattern, module_path)) return rank;
  }
  return r;
}

inline double peft_config::alpha_for(const std::string& module_path) const {
  for (const auto& [pattern, alpha] : alpha_pattern) {
    if (detail::pattern_key_matches(pattern, module_path)) return alpha;
  }
  return lora_alpha;
}

inline double peft_config::scaling_for(const std::string& module_path) const {
  const double rank = static_cast<double>(rank_for(module_path));
  const double alpha = alpha_for(module_path);
  return use_rslora ? alpha / std::sqrt(rank) : alpha / rank;
}

inline adapter_config peft_config::adapter_config_for(const std::string& module_path) const {
  adapter_config c;
  c.rank = rank_for(module_path);
  c.alpha = alpha_for(module_path);
  c.dropout = lora_dropout;
  c.use_rslora = use_rslora;
  c.init = init_method::zeros;
  return c;
}

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
  const std::string& label = m_file.path();
  auto fail = [&](const std::string& what) { throw format_error(detail::cat("PEFT adapter '", label, "': ", what)); };
  struct suffix_rule {
    std::string_view suffix;
    int slot;  // 0 a, 1 b, 2 bias, 3 magnitude
    bool embedding;
  };
  static constexpr suffix_rule rules[] = {
      {".lora_A.weight", 0, false},   {".lora_B.weight", 1, false},   {".lora_B.bias", 2, false},
      {".lora_embedding_A", 0, true}, {".lora_embedding_B", 1, true}, {".lora_magnitude_vector", 3, false},
  };
  struct pending {
    const tensor_info* slots[4] = {nullptr, nullptr, nullptr, nullptr};
    int linear_keys = 0, embedding_keys = 0;
  };
  std::map<std::string, pending> found;
  for (const tensor_info& t : m_file.tensors()) {
    const std::string_view name = t.name;
    if (name.substr(0, peft_key_prefix.size()) != peft_key_prefix) {
      fail(detail::cat("tensor '", t.name, "' does not start with '", peft_key_prefix, "' (PEFT's key prefix)"));
    }
    const std::string_view rest = name.substr(peft_key_prefix.size());
    const suffix_rule* rule = nullptr;
    for (const suffix_rule& r : rules) {
      if (rest.size() > r.suffix.size() && rest.substr(rest.size() - r.suffix.size()) == r.suffix) {
        rule = &r;
        break;
      }
    }
    if (rule == nullptr) {
      if (rest.rfind("lora_", 0) == 0 || rest.find(".lora_") != std::string_view::npos) {
        fail(detail::cat(
            "tensor '", t.name,
            "' is not a LoRA tensor PEFT saves (lora_A.weight, lora_B.weight, lora_B.bias, lora_embedding_A, "
            "lora_embedding_B, lora_magnitude_vector); keys holding an adapter name come from a raw "
            "state_dict, not from save_pretrained"));
      }
      if (rest.empty()) fail(detail::cat("tensor '", t.name, "' names no module"));
      m_full.push_back(t);
      continue;
    }
    const std::string path(rest.substr(0, rest.size() - rule->suffix.size()));
    pending& p = found[path];
    if (p.slots[rule->slot] != nullptr) {
      fail(detail::cat("module '", path, "' has both '", p.slots[rule->slot]->name, "' and '", t.name, "'"));
    }
    p.slots[rule->slot] = &t;
    (rule->embedding ? p.embedding_keys : p.linear_keys) += rule->slot <= 1 ? 1 : 0;
  }

  for (const auto& entry : found) {
    const std::string& path = entry.first;  // a plain reference: lambdas below capture it (C++17)
    const pending& p = entry.second;
    auto fail_module = [&](const std::string& what) { fail(detail::cat("module '", path, "': ", what)); };
    if (p.linear_keys != 0 && p.embedding_keys != 0) fail_module("mixes lora_A/lora_B and lora_embedding_A/_B keys");
    const bool embedding = p.embedding_keys != 0;
    const char* a_name = embedding ? "lora_embedding_A" : "lora_A.weight";
    const char* b_name = embedding ? "lora_embedding_B" : "lora_B.weight";
    if (p.slots[0] == nullptr || p.slots[1] == nullptr) {
      fail_module(detail::cat("has ",
                              p.slots[0]   ? a_name
                              : p.slots[1] ? b_name
                                           : "a bias or magnitude",
                              " but no ", p.slots[0] ? b_name : a_name));
    }
    const tensor_info& a = *p.slots[0];
    const tensor_info& b = *p.slots[1];
    for (const tensor_info* t : p.slots) {
      if (t != nullptr && !detail::is_float_dtype(t->type)) {
        throw dtype_error(detail::cat("PEFT adapter '", label, "': module '", path, "': tensor '", t->name, "' is ",
                                      dtype_name(t->type), "; LoRA tensors must be F16, BF16, F32 or F64"));
      }
    }
    if (a.rank() != 2 || b.rank() != 2) {
      throw shape_error(detail::cat("PEFT adapter '", label, "': module '", path, "': ", a_name, " and ", b_name,
                                    " must be 2-D, got ", detail::shape_to_string(a.shape), " and ",
                                    detail::shape_to_string(b.shape)));
    }
    if (a.shape[0] != b.shape[1]) {
      throw shape_error(detail::cat("PEFT adapter '", label, "': module '", path, "': ", a_name, " ",
                                    detail::shape_to_string(a.shape), " and ", b_name, " ",
                                    detail::shape_to_string(b.shape), " disagree on the rank (", a.shape[0], " vs ",
                                    b.shape[1], ")"));
    }
    const index expected = m_config.rank_for(path);
    if (a.shape[0] != expected) {
      throw shape_error(detail::cat("PEFT adapter '", label, "': module '", path, "' has rank ", a.shape[0],
                                    " but the config gives it r = ", expected,
                                    m_config.rank_pattern.empty() ? "" : " (after rank_pattern)"));
    }
    if (a.shape[1] < 1 || b.shape[0] < 1) {
      throw shape_error(detail::cat("PEFT adapter '", label, "': module '", path, "' has an empty dimension: ", a_name,
                                    " ", detail::shape_to_string(a.shape), ", ", b_name, " ",
                                    detail::shape_to_string(b.shape)));
    }
    for (int slot : {2, 3}) {
      const tensor_info* v = p.slots[slot];
      if (v == nullptr) continue;
      if (v->rank() != 1 || (!embedding && v->shape[0] != b.shape[0])) {
        throw shape_error(detail::cat("PEFT adapter '", label, "': module '", path, "': '", v->name, "' must be [",
                                      b.shape[0], "] (out_features), got ", detail::shape_to_string(v->shape)));
      }
    }
    if (p.slots[2] != nullptr && !m_config.lora_bias) {
      fail_module("has lora_B.bias but the config says lora_bias = false");
    }
    if (p.slots[2] == nullptr && m_config.lora_bias && !embedding) {
      fail_module("has no lora_B.bias but the config says lora_bias = true");
    }
    if (p.slots[3] != nullptr && !m_config.use_dora) {
      fail_module("has lora_magnitude_vector but the config says use_dora = false");
    }
    if (p.slots[3] == nullptr && m_config.use_dora && !embedding) {
      fail_module("has no lora_magnitude_vector but the config says use_dora = true");
    }
    peft_module_info info;
    info.path = path;
    info.embedding = embedding;
    info.rank = static_cast<index>(a.shape[0]);
    info.in = static_cast<index>(a.shape[1]);
    info.out = static_cast<index>(b.shape[0]);
    info.a_key = a.name;
    info.b_key = b.name;
    if (p.slots[2] != nullptr) info.bias_key = p.slots[2]->name;
    if (p.slots[3] != nullptr) info.magnitude_key = p.slots[3]->name;
    info.type = a.type;
    for (const tensor_info* t : p.slots) {
      if (t != nullptr && t->type != info.type) {
        info.type = t->type == dtype::f64 || info.type == dtype::f64 ? dtype::f64 : dtype::f32;
      }
    }
    m_modules.push_back(std::move(info));
  }
  std::sort(m_full.begin(), m_full.end(), [](const tensor_info& x, const tensor_info& y) { return x.name < y.name; });
}

inline peft_module peft_adapter_file::read_module(const peft_module_info& info) const {
  peft_module m;
  m.path = info.path;
  m.embedding = info.embedding;
  m.type = info.type;
  m.a = m_file.read_matrix<double>(info.a_key);
  m.b = m_file.read_matrix<double>(info.b_key);
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
    const std::string where = detail::cat("PEFT adapter module '", m.path, "'");
    if (m.path.empty()) throw name_error("PEFT adapter: a module has an empty path");
    if (!seen.insert(m.path).second) throw name_error(detail::cat(where, " appears twice"));
    if (!detail::is_float_dtype(m.type)) {
      throw dtype_error(detail::cat(where, ": dtype ", dtype_name(m.type), " is not one of F16, BF16, F32, F64"));
    }
    if (m.a.rows() != m.b.cols()) {
      throw shape_error(detail::cat(where, ": A is ", detail::shape_str(m.a.rows(), m.a.cols()), " and B is ",
                                    detail::shape_str(m.b.rows(), m.b.cols()), "; the ranks disagree"));
    }
    if (m.a.rows() != config.rank_for(m.path)) {
      throw shape_error(
          detail::cat(where, " has rank ", m.a.rows(), " but the config gives it r = ", config.rank_for(m.path)));
    }
    if (m.a.cols() < 1 || m.b.rows() < 1) throw shape_error(detail::cat(where, ": A and B must be non-empty"));
    for (const vector<double>* v : {&m.b_bias, &m.magnitude}) {
      if (v->size() != 0 && !m.embedding && v->size() != m.b.rows()) {
        throw shape_error(detail::cat(where, ": lora_B.bias and lora_magnitude_vector must have out_features = ",
                                      m.b.rows(), " entries, got ", v->size()));
      }
    }
    const bool has_bias = m.b_bias.size() != 0;
    if (has_bias ? !config.lora_bias : (config.lora_bias && !m.embedding)) {
      throw format_error(detail::cat(where, (has_bias ? " has" : " lacks"), " a lora_B bias but config.lora_bias is ",
                                     config.lora_bias ? "true" : "false"));
    }
    if (m.magnitude.size() != 0 ? !config.use_dora : (config.use_dora && !m.embedding)) {
      throw format_error(detail::cat(where, (m.magnitude.size() != 0 ? " has" : " lacks"),
                                     " a DoRA magnitude vector but config.use_dora is ",
                                     config.use_dora ? "true" : "false"));
    }
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
  const std::string prefix(peft_key_prefix);
  safetensors_writer writer;
  for (const peft_module& m : modules) {
    const std::string base = prefix + m.path;
    writer.add(base + (m.embedding ? ".lora_embedding_A" : ".lora_A.weight"), m.a, m.type);
    writer.add(base + (m.embedding ? ".lora_embedding_B" : ".lora_B.weight"), m.b, m.type);
    if (m.b_bias.size() != 0) writer.add(base + ".lora_B.bias", m.b_bias, m.type);
    if (m.magnitude.size() != 0) writer.add(base + ".lora_magnitude_vector", m.magnitude, m.type);
  }
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
  auto spec2 = [&](const std::string& name, dtype type, index rows, index cols) {
    specs.push_back(tensor_spec{name, type, {static_cast<std::int64_t>(rows), static_cast<std::int64_t>(cols)}});
  };
  auto spec1 = [&](const std::string& name, dtype type, index n) {
    specs.push_back(tensor_spec{name, type, {static_cast<std::int64_t>(n)}});
  };
  for (const peft_module& m : modules) {
    const std::string base = prefix + m.path;
    spec2(base + (m.embedding ? ".lora_embedding_A" : ".lora_A.weight"), m.type, m.a.rows(), m.a.cols());
    spec2(base + (m.embedding ? ".lora_embedding_B" : ".lora_B.weight"), m.type, m.b.rows(), m.b.cols());
    if (m.b_bias.size() != 0) spec1(base + ".lora_B.bias", m.type, m.b_bias.size());
    if (m.magnitude.size() != 0) spec1(base + ".lora_magnitude_vector", m.type, m.magnitude.size());
  }
  for (const peft_full_tensor& f : full_tensors) specs.push_back(tensor_spec{prefix + f.path, f.type, f.shape});
  sort_like_reference(specs);

  safetensors_stream_writer weights((fs::path(dir) / std::string(peft_weights_file)).string(), specs,
                                    {{"format", "pt"}});
  for (const peft_module& m : modules) {
    const std::string base = prefix + m.path;
    weights.write(base + (m.embedding ? ".lora_embedding_A" : ".lora_A.weight"), m.a);
    weights.write(base + (m.embedding ? ".lora_embedding_B" : ".lora_B.weight"), m.b);
    if (m.b_bias.size() != 0) weights.write(base + ".lora_B.bias", m.b_bias);
    if (m.magnitude.size() != 0) weights.write(base + ".lora_magnitude_vector", m.magnitude);
  }
  for (const peft_full_tensor& f : full_tensors) {
    if (f.size() != 0) weights.write_raw(prefix + f.path, f.data(), f.size());
  }
  const std::string json = config.to_json() + "\n";
  detail::atomic_file config_file((fs::path(dir) / std::string(peft_config_file)).string());
  config_file.write_at(0, reinterpret_cast<const unsigned char*>(json.data()), json.size());
  // Both temporaries are complete: rename them back to back.
  weights.commit();
  config_file.commit();
}

template <typename Layers>
peft_adapter peft_adapter::from_layers(const Layers& layers, const std::string& adapter_name, peft_config base) {
  using pointer = std::decay_t<decltype(std::begin(layers)->second)>;
  using layer_type = std::remove_cv_t<std::remove_pointer_t<pointer>>;
  static_assert(std::is_pointer_v<pointer>, "from_layers takes pairs of (module path, pointer to lora::linear)");
  using Scalar = typename layer_type::Scalar;
  static_assert(std::is_same_v<layer_type, linear<Scalar>>,
                "from_layers takes pairs of (module path, pointer to lora::linear)");

  peft_adapter out;
  out.config = std::move(base);
  out.config.warnings.clear();
  std::map<index, std::size_t> rank_votes;
  std::map<double, std::size_t> alpha_votes;
  std::vector<double> alphas;
  std::set<std::string> last_components;
  bool first = true;
  for (const auto& [path, layer] : layers) {
    if (layer == nullptr) throw name_error(detail::cat("from_layers: the layer for module '", path, "' is null"));
    if (path.empty()) throw name_error("from_layers: a module path is empty");
    if (!layer->has_adapter(adapter_name)) {
      throw name_error(detail::cat("from_layers: module '", path, "' (linear '", layer->name(),
                                   "') has no adapter named '", adapter_name, "'"));
    }
    const auto& ad = layer->adapter(adapter_name);
    const adapter_config& c = ad.config();
    if (first) {
      out.config.use_rslora = c.use_rslora;
      out.config.lora_dropout = c.dropout;
      first = false;
    } else if (c.use_rslora != out.config.use_rslora) {
      throw config_error(detail::cat("from_layers: module '", path, "' has use_rslora = ",
                                     c.use_rslora ? "true" : "false", " but an earlier module has ",
                                     out.config.use_rslora ? "true" : "false", "; a PEFT config holds one use_rslora"));
    }
    peft_module m;
    m.path = path;
    m.a = ad.a().template cast<double>();
    m.b = ad.b().template cast<double>();
    m.type = dtype_of<Scalar>();
    out.modules.push_back(std::move(m));
    ++rank_votes[c.rank];
    ++alpha_votes[c.alpha];
    alphas.push_back(c.alpha);
    last_components.insert(std::string(detail::split_dots(path).back()));
  }
  // The most common rank and alpha become r and lora_alpha (ties: the smallest).
  auto most_common = [](const auto& votes) {
    auto best = votes.begin();
    for (auto it = votes.begin(); it != votes.end(); ++it) {
      if (it->second > best->second) best = it;
    }
    return best->first;
  };
  if (!rank_votes.empty()) {
    out.config.r = most_common(rank_votes);
    out.config.lora_alpha = most_common(alpha_votes);
  }
  out.config.target_modules = std::vector<std::string>(last_components.begin(), last_components.end());
  out.config.use_dora = false;
  out.config.lora_bias = false;
  out.config.peft_type = "LORA";

  // Patterns for the modules that differ, each its own escaped path, longest first so that a path is
  // matched by its own entry before one of its suffixes; then entries for modules that a shorter
  // pattern would capture wrongly, until every module reads back its own values.
  auto settle = [&](auto& patterns, auto value_of, auto effective, auto default_value) {
    patterns.clear();
    std::vector<std::pair<std::string, std::decay_t<decltype(value_of(std::size_t{0}))>>> own;
    std::vector<bool> has(out.modules.size(), false);
    for (std::size_t k = 0; k < out.modules.size(); ++k) {
      if (value_of(k) != default_value) {
        own.emplace_back(out.modules[k].path, value_of(k));
        has[k] = true;
      }
    }
    for (bool changed = true; changed;) {
      std::sort(own.begin(), own.end(), [](const auto& x, const auto& y) {
        return x.first.size() != y.first.size() ? x.first.size() > y.first.size() : x.first < y.first;
      });
      patterns.clear();
      for (const auto& [path, value] : own) patterns.emplace_back(detail::regex_escape(path), value);
      changed = false;
      for (std::size_t k = 0; k < out.modules.size(); ++k) {
        if (!has[k] && effective(out.modules[k].path) != value_of(k)) {
          own.emplace_back(out.modules[k].path, value_of(k));
          has[k] = true;
          changed = true;
        }
      }
    }
  };
  settle(
      out.config.rank_pattern, [&](std::size_t k) { return out.modules[k].rank(); },
      [&](const std::string& p) { return out.config.rank_for(p); }, out.config.r);
  settle(
      out.config.alpha_pattern, [&](std::size_t k) { return alphas[k]; },
      [&](const std::string& p) { return out.config.alpha_for(p); }, out.config.lora_alpha);
  std::sort(out.modules.begin(), out.modules.end(),
            [](const peft_module& x, const peft_module& y) { return x.path < y.path; });
  out.validate();
  return out;
}

// --- attach ------------------------------------------------------------------------------------------------

template <typename Layers>
void attach(const peft_adapter& adapter, const Layers& layers, const std::string& adapter_name) {
  using pointer = std::decay_t<decltype(std::begin(layers)->second)>;
  using layer_type = std::remove_pointer_t<pointer>;
  static_assert(std::is_pointer_v<pointer> && !std::is_const_v<layer_type>,
                "attach takes pairs of (module path, non-const pointer to lora::linear)");
  using Scalar = typename layer_type::Scalar;
  static_assert(std::is_same_v<layer_type, linear<Scalar>>, "attach takes pairs of (module path, lora::linear*)");

  std::vector<std::string> names;
  std::vector<layer_type*> targets;
  for (const auto& [path, layer] : layers) {
    if (layer == nullptr) throw name_error(detail::cat("attach: the layer for '", path, "' is null"));
    names.push_back(path);
    targets.push_back(layer);
  }
  const detail::suffix_index index_of(names);

  // Phase 1: check everything; nothing changes.
  struct planned {
    layer_type* layer;
    const peft_module* module;
    adapter_config config;
  };
  std::vector<planned> plan;
  std::map<const layer_type*, const peft_module*> claimed;
  for (const peft_module& m : adapter.modules) {
    const std::string what = detail::cat("adapter module '", m.path, "'");
    const std::ptrdiff_t k = index_of.find(m.path, what);
    if (k < 0) {
      throw name_error(detail::cat("attach: no layer for ", what, " (layers: ", detail::list_names(names), ")"));
    }
    layer_type* layer = targets[static_cast<std::size_t>(k)];
    const std::string where = detail::cat("attach: ", what, " -> layer '", names[static_cast<std::size_t>(k)], "'");
    if (!claimed.emplace(layer, &m).second) {
      throw name_error(detail::cat(where, ": the layer is already matched by module '", claimed[layer]->path, "'"));
    }
    if (m.embedding) throw config_error(detail::cat(where, ": an embedding adapter cannot attach to a linear layer"));
    if (m.magnitude.size() != 0) {
      throw config_error(detail::cat(where, ": DoRA (lora_magnitude_vector) is not supported by lora::linear"));
    }
    if (m.b_bias.size() != 0) throw config_error(detail::cat(where, ": lora_B.bias is not supported by lora::linear"));
    if (m.in_features() != layer->in_features() || m.out_features() != layer->out_features()) {
      throw shape_error(
          detail::cat(where, ": the adapter is for in x out = ", detail::shape_str(m.in_features(), m.out_features()),
                      " but the layer is ", detail::shape_str(layer->in_features(), layer->out_features())));
    }
    const adapter_config c = adapter.config.adapter_config_for(m.path);
    if (m.a.rows() != m.b.cols() || m.a.rows() != c.rank) {
      throw shape_error(detail::cat(where, ": A has rank ", m.a.rows(), ", B has rank ", m.b.cols(),
                                    " and the config gives r = ", c.rank));
    }
    if (layer->has_adapter(adapter_name)) {
      throw name_error(detail::cat(where, ": the layer already has an adapter named '", adapter_name, "'"));
    }
    lora::validate(c, where);
    plan.push_back(planned{layer, &m, c});
  }
  if (adapter_name.empty()) throw name_error("attach: adapter names must be non-empty");

  // Phase 2: add. Only allocation can fail now; undo what was added if it does.
  std::size_t done = 0;
  try {
    for (; done < plan.size(); ++done) {
      auto& ad = plan[done].layer->add_adapter(adapter_name, plan[done].config);
      ad.a() = plan[done].module->a.template cast<Scalar>();
      ad.b() = plan[done].module->b.template cast<Scalar>();
    }
  } catch (...) {
    for (std::size_t k = 0; k < done; ++k) plan[k].layer->remove_adapter(adapter_name);
    if (done < plan.size() && plan[done].layer->has_adapter(adapter_name)) {
      plan[done].layer->remove_adapter(adapter_name);
    }
    throw;
  }
}

}  // namespace lora::io
