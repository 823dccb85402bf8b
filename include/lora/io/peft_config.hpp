// lora/io/peft_config.hpp: adapter_config.json of a Hugging Face PEFT LoRA adapter: its schema, parsing
// (every error names the file, the key, the expected and the actual JSON type), validation,
// serialisation as PEFT writes it, and the effective hyper-parameters of a module
// (docs/CONVENTIONS.md §peft).
//
// Effective hyper-parameters of a module follow PEFT's get_pattern_key: the keys of rank_pattern (then
// alpha_pattern) are tried in order and the first key k for which re.match(r"(.*\.)?(k)$", path)
// succeeds gives the value; otherwise r (lora_alpha). Scaling s = alpha / r, or alpha / sqrt(r) with
// use_rslora (docs/CONVENTIONS.md §scaling). Matching is in io/module_match.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "../adapter.hpp"
#include "../config.hpp"
#include "../error.hpp"
#include "detail/regex.hpp"
#include "module_match.hpp"

namespace lora::io {

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

namespace detail {

using ojson = nlohmann::ordered_json;

/// Deepest nesting accepted in adapter_config.json (a valid one needs 2).
inline constexpr int max_config_depth = 64;

/// One value of adapter_config.json and its key, read as the type the schema wants; every error names
/// the file, the key, the expected and the actual JSON type.
class config_value {
 public:
  config_value(const std::string& label, std::string key, const ojson& json)
      : m_label(label), m_key(std::move(key)), m_json(json) {}
  const std::string& key() const noexcept { return m_key; }
  const ojson& json() const noexcept { return m_json; }

  [[noreturn]] void type_error(const char* expected) const;
  [[noreturn]] void value_error(const std::string& rule) const;
  bool boolean() const;
  std::string string() const;
  std::optional<std::string> optional_string() const;
  double number() const;  ///< finite
  index rank() const;     ///< an integer in [1, 2^30]
  std::vector<std::string> string_list(bool allow_null) const;
  /// An object of (pattern, value) pairs, in file order, each value read by `read`; null is empty.
  template <typename T>
  pattern_list<T> patterns(T (config_value::*read)() const) const;

 private:
  const std::string& m_label;
  std::string m_key;
  const ojson& m_json;
};

/// A key of adapter_config.json this library models, and how it reads into a peft_config.
struct config_key {
  const char* name;
  void (*read)(peft_config& c, const config_value& v);
};

/// Parses adapter_config.json text into a JSON object, refusing nesting deeper than max_config_depth.
ojson parse_config_json(std::string_view json_text, const std::string& label);
/// Warns about a key that is not in peft_config_keys (see ignored_peft_keys).
void note_ignored_key(peft_config& c, const config_value& v, const std::string& label);
/// Warns when init_lora_weights names a method that changes the base weights (PiSSA, OLoRA ...).
void warn_if_init_changes_base(peft_config& c, const std::string& label);
/// Reads a whole (small) file; io_error naming `what` on failure, format_error above `limit` bytes.
std::string read_text_file(const std::string& path, std::uintmax_t limit, const std::string& what);

}  // namespace detail

// ===================================================================================================
// Implementation
// ===================================================================================================

namespace detail {

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

inline void config_value::type_error(const char* expected) const {
  throw format_error(
      cat(m_label, ": key '", m_key, "' must be ", expected, ", got ", json_kind(m_json), " ", json_excerpt(m_json)));
}

inline void config_value::value_error(const std::string& rule) const {
  throw format_error(cat(m_label, ": key '", m_key, "' ", rule));
}

inline bool config_value::boolean() const {
  if (!m_json.is_boolean()) type_error("a boolean");
  return m_json.get<bool>();
}

inline std::string config_value::string() const {
  if (!m_json.is_string()) type_error("a string");
  return m_json.get<std::string>();
}

inline std::optional<std::string> config_value::optional_string() const {
  if (m_json.is_null()) return std::nullopt;
  if (!m_json.is_string()) type_error("a string or null");
  return m_json.get<std::string>();
}

inline double config_value::number() const {
  if (!m_json.is_number()) type_error("a number");
  const double x = m_json.get<double>();
  if (!std::isfinite(x)) value_error(cat("must be finite, got ", json_excerpt(m_json)));
  return x;
}

inline index config_value::rank() const {
  if (!m_json.is_number_integer()) type_error("an integer");
  const bool too_big =
      m_json.is_number_unsigned() ? m_json.get<std::uint64_t>() > (1u << 30) : m_json.get<std::int64_t>() > (1 << 30);
  if (too_big || (!m_json.is_number_unsigned() && m_json.get<std::int64_t>() < 1)) {
    value_error(cat("must be a rank between 1 and 2^30, got ", json_excerpt(m_json)));
  }
  return static_cast<index>(m_json.get<std::int64_t>());
}

inline std::vector<std::string> config_value::string_list(bool allow_null) const {
  std::vector<std::string> out;
  if (allow_null && m_json.is_null()) return out;
  if (!m_json.is_array()) type_error(allow_null ? "a list of strings or null" : "a list of strings");
  for (const ojson& item : m_json) out.push_back(config_value(m_label, m_key + "[]", item).string());
  return out;
}

template <typename T>
pattern_list<T> config_value::patterns(T (config_value::*read)() const) const {
  pattern_list<T> out;
  if (m_json.is_null()) return out;
  if (!m_json.is_object()) type_error("an object mapping module patterns to values");
  for (const auto& [pattern, value] : m_json.items()) {
    out.emplace_back(pattern, (config_value(m_label, m_key + "['" + pattern + "']", value).*read)());
  }
  return out;
}

inline void read_target_modules(peft_config& c, const config_value& v) {
  if (v.json().is_string()) {
    c.target_modules = v.string();
  } else {
    c.target_modules = v.string_list(true);
  }
}

inline void read_init_lora_weights(peft_config& c, const config_value& v) {
  if (v.json().is_boolean()) {
    c.init_lora_weights = v.boolean();
  } else if (v.json().is_string()) {
    c.init_lora_weights = v.string();
  } else {
    v.type_error("a boolean or a string");
  }
}

/// The keys this library models, each with its reader: the key -> reader map of peft_config::parse.
inline constexpr config_key peft_config_keys[] = {
    {"peft_type", [](peft_config& c, const config_value& v) { c.peft_type = v.string(); }},
    {"r", [](peft_config& c, const config_value& v) { c.r = v.rank(); }},
    {"lora_alpha", [](peft_config& c, const config_value& v) { c.lora_alpha = v.number(); }},
    {"lora_dropout", [](peft_config& c, const config_value& v) { c.lora_dropout = v.number(); }},
    {"target_modules", read_target_modules},
    {"fan_in_fan_out", [](peft_config& c, const config_value& v) { c.fan_in_fan_out = v.boolean(); }},
    {"bias", [](peft_config& c, const config_value& v) { c.bias = v.string(); }},
    {"use_rslora", [](peft_config& c, const config_value& v) { c.use_rslora = v.boolean(); }},
    {"use_dora", [](peft_config& c, const config_value& v) { c.use_dora = v.boolean(); }},
    {"rank_pattern", [](peft_config& c, const config_value& v) { c.rank_pattern = v.patterns(&config_value::rank); }},
    {"alpha_pattern",
     [](peft_config& c, const config_value& v) { c.alpha_pattern = v.patterns(&config_value::number); }},
    {"modules_to_save", [](peft_config& c, const config_value& v) { c.modules_to_save = v.string_list(true); }},
    {"init_lora_weights", read_init_lora_weights},
    {"task_type", [](peft_config& c, const config_value& v) { c.task_type = v.optional_string(); }},
    {"base_model_name_or_path",
     [](peft_config& c, const config_value& v) { c.base_model_name_or_path = v.optional_string(); }},
    {"inference_mode", [](peft_config& c, const config_value& v) { c.inference_mode = v.boolean(); }},
    {"lora_bias", [](peft_config& c, const config_value& v) { c.lora_bias = v.boolean(); }},
};

inline ojson parse_config_json(std::string_view json_text, const std::string& label) {
  const ojson::parser_callback_t limit_depth = [&](int depth, ojson::parse_event_t event, ojson&) {
    if ((event == ojson::parse_event_t::object_start || event == ojson::parse_event_t::array_start) &&
        depth >= max_config_depth) {
      throw format_error(cat(label, ": JSON nests deeper than ", max_config_depth, " levels"));
    }
    return true;
  };
  ojson root;
  try {
    root = ojson::parse(json_text.begin(), json_text.end(), limit_depth, /*allow_exceptions=*/true,
                        /*ignore_comments=*/false);
  } catch (const ojson::exception& e) {
    throw format_error(cat(label, ": not valid JSON: ", e.what()));
  }
  if (!root.is_object()) throw format_error(cat(label, ": expected a JSON object, got ", json_kind(root)));
  if (!root.contains("peft_type")) throw format_error(cat(label, ": missing key 'peft_type' (\"LORA\")"));
  return root;
}

inline void note_ignored_key(peft_config& c, const config_value& v, const std::string& label) {
  const auto known = std::find_if(std::begin(ignored_peft_keys), std::end(ignored_peft_keys),
                                  [&](const known_key& k) { return v.key() == k.name; });
  if (known == std::end(ignored_peft_keys)) {
    c.warnings.push_back(cat(label, ": unknown key '", v.key(), "' ignored"));
  } else if (known->semantic && !is_neutral(v.json())) {
    c.warnings.push_back(cat(label, ": key '", v.key(), "' = ", json_excerpt(v.json()),
                             " is not supported and was ignored; results may differ from PEFT's"));
  }
}

inline void warn_if_init_changes_base(peft_config& c, const std::string& label) {
  const auto* init = std::get_if<std::string>(&c.init_lora_weights);
  if (init == nullptr) return;
  std::string lower = *init;
  for (char& ch : lower) ch = static_cast<char>(ch >= 'A' && ch <= 'Z' ? ch - 'A' + 'a' : ch);
  for (const char* changes_base : {"pissa", "olora", "corda", "loftq"}) {
    if (lower.rfind(changes_base, 0) == 0) {
      c.warnings.push_back(cat(label, ": init_lora_weights = \"", *init,
                               "\" changes the base weights at initialisation; merge this adapter only into the "
                               "matching modified base model (or convert it with PEFT first)"));
      return;
    }
  }
}

inline std::string read_text_file(const std::string& path, std::uintmax_t limit, const std::string& what) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status)) throw io_error(cat("cannot read ", what, " '", path, "': no such file"));
  if (!std::filesystem::is_regular_file(status)) {
    throw io_error(cat("cannot read ", what, " '", path, "': not a regular file"));
  }
  const std::uintmax_t size = std::filesystem::file_size(path, ec);
  if (!ec && size > limit) {
    throw format_error(cat(what, " '", path, "' is ", size, " bytes, more than the ", limit, "-byte limit"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error(cat("cannot open ", what, " '", path, "'"));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw io_error(cat("cannot read ", what, " '", path, "'"));
  return text;
}

}  // namespace detail

// --- peft_config -------------------------------------------------------------------------------------

inline peft_config peft_config::parse(std::string_view json_text, bool print_warnings, const std::string& label) {
  const detail::ojson root = detail::parse_config_json(json_text, label);
  peft_config c;
  c.inference_mode = false;  // PEFT's LoraConfig default; saved configs say true
  for (const auto& item : root.items()) {
    const detail::config_value v(label, item.key(), item.value());
    const auto known = std::find_if(std::begin(detail::peft_config_keys), std::end(detail::peft_config_keys),
                                    [&](const detail::config_key& k) { return item.key() == k.name; });
    if (known != std::end(detail::peft_config_keys)) {
      known->read(c, v);
    } else {
      detail::note_ignored_key(c, v, label);
    }
  }
  detail::warn_if_init_changes_base(c, label);
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
      detail::regex re(spliced ? detail::pattern_key_regex(pattern) : pattern);
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
  return detail::module_in_list(std::get<std::vector<std::string>>(target_modules), module_path);
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

}  // namespace lora::io
