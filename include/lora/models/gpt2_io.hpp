// lora/models/gpt2_io.hpp: GPT-2 checkpoints in Hugging Face's folder layout (docs/CONVENTIONS.md §gpt2):
//
//   DIR/config.json         GPT2Config: n_layer, n_head, n_embd, n_positions (or n_ctx), vocab_size,
//                           layer_norm_epsilon (default 1e-5), ...
//   DIR/model.safetensors   the tensors of models/gpt2_weights.hpp, named with the "transformer." prefix
//                           (GPT2LMHeadModel) or without it (GPT2Model), in F32, F16 or BF16
//
// Reading trusts nothing in either file: every error is a lora::error naming the file and the key or
// tensor, with what was expected and what came (format_error for a malformed file or one that disagrees
// with its config, config_error for a shape or variant the model does not implement, dtype_error for a
// dtype other than F32, F16, BF16), and no size is allocated before the file is known to hold it.
// Loading is all-or-nothing.
//
// Zero copy: Conv1D weights are stored in x out, row-major, which is exactly gpt2_weights' layout, so a
// float model loads an F32 file (little-endian host, tensors 4-byte aligned, as every writer lays them
// out) without a copy: the weights point into a private, writable memory mapping of the file
// (io::read_mode::map_copy_on_write) that the weights keep alive. The kernel copies a page on its first
// write (full fine-tuning, merging), never touching the file; untouched pages are shared with the page
// cache. Other files (F16, BF16, misaligned, or mmap unavailable) are converted once into owned storage.
// The file must not be rewritten in place while borrowed weights live (io/file_storage.hpp); this
// library's writers, save_gpt2 included, replace files instead, so saving over the folder a model was
// loaded from is safe.
//
// Writing: config.json in Hugging Face's form and model.safetensors (metadata {"format": "pt"}, the
// tied LM head omitted as save_pretrained omits it), both staged as temporaries and renamed into place
// (io/atomic_file.hpp). Other files in the folder (tokenizer files) are left alone.
//
// POSIX only (Linux, macOS).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../io/atomic_file.hpp"
#include "../io/peft_config.hpp"
#include "../io/safetensors.hpp"
#include "gpt2_config.hpp"
#include "gpt2_weights.hpp"

namespace lora::models {

/// Largest config.json read (GPT-2's is under 1 KB).
inline constexpr std::uintmax_t max_gpt2_config_bytes = 16u << 20;

/// A loaded checkpoint: its config and its weights (weights.config() == config).
template <typename Scalar>
struct gpt2_checkpoint {
  gpt2_config config;
  gpt2_weights<Scalar> weights;
};

struct gpt2_load_options {
  /// float weights from an F32 file borrow a copy-on-write mapping of it when possible (see the top of
  /// this file). false: always owned storage, read with bounded pread() calls.
  bool zero_copy = true;
};

struct gpt2_save_options {
  io::dtype dtype = io::dtype::f32;  ///< F32, F16 or BF16 (rounded to nearest, ties to even).
  /// "transformer." (GPT2LMHeadModel, as Hugging Face's own files) or "" (GPT2Model).
  std::string key_prefix = "transformer.";
};

/// Parses config.json text; `label` names it in messages. format_error for invalid JSON, a missing key
/// or a wrong JSON type; config_error for values gpt2_config::validate refuses and for a variant the
/// model does not implement (model_type other than "gpt2", activation_function other than "gelu_new",
/// untied embeddings, n_inner other than 4 n_embd, non-default attention scaling).
gpt2_config parse_gpt2_config(std::string_view json_text, const std::string& label = "config.json");
/// Reads and parses a config.json; io_error when it cannot be read.
gpt2_config read_gpt2_config(const std::string& config_json_path);
/// Hugging Face's GPT2Config JSON for `config` (sorted keys, indent 2); torch_dtype names `dtype`.
std::string gpt2_config_json(const gpt2_config& config, io::dtype dtype = io::dtype::f32);

/// The tensors of `config` from a safetensors file (rules above).
template <typename Scalar>
gpt2_weights<Scalar> load_gpt2_weights(const std::string& safetensors_path, const gpt2_config& config,
                                       const gpt2_load_options& options = {});
/// DIR/config.json and DIR/model.safetensors.
template <typename Scalar>
gpt2_checkpoint<Scalar> load_gpt2(const std::string& dir, const gpt2_load_options& options = {});

/// Writes DIR/model.safetensors and DIR/config.json, creating DIR if missing. Both files are written
/// to temporaries first and then renamed, model first: a failure before the renames (a full disk, a
/// read-only folder) leaves the folder as it was; only a failed second rename leaves the new weights
/// beside the old config. io_error on failure, dtype_error or config_error for bad options.
template <typename Scalar>
void save_gpt2(const std::string& dir, const gpt2_weights<Scalar>& weights, const gpt2_save_options& options = {});

namespace detail {

using lora::detail::cat;

/// The prefix GPT2LMHeadModel puts before every name of the GPT2Model it wraps.
inline constexpr std::string_view transformer_prefix = "transformer.";
/// The LM head's name in GPT2LMHeadModel files (never prefixed); only its tied form is accepted.
inline constexpr std::string_view lm_head_name = "lm_head.weight";

/// A key of config.json that changes the computation: accepted when absent, null, or equal to `value`,
/// the one variant the model implements.
struct fixed_key {
  const char* name;
  nlohmann::json value;
};
const std::vector<fixed_key>& gpt2_fixed_keys();

/// Integer `key` of `root`, required; format_error naming `label` when missing, not an integer or
/// beyond 64 bits.
index config_integer(const nlohmann::json& root, const std::string& key, const std::string& label);
void check_fixed_keys(const nlohmann::json& root, const gpt2_config& config, const std::string& label);

/// How the tensors of a file map onto the table of gpt2_tensor_specs.
struct gpt2_file_plan {
  std::string prefix;                           ///< "transformer." or ""
  std::vector<const io::tensor_info*> tensors;  ///< per table id, none null
  const io::tensor_info* lm_head = nullptr;     ///< "lm_head.weight" when present
};

/// "GPT-2 weights '<path>': "
std::string where(const io::safetensors_file& file);
/// Refuses a config whose sizes the file cannot hold before anything is sized from them.
void check_config_fits(const io::safetensors_file& file, const gpt2_config& config);
/// "transformer." or "", the one convention of every name but lm_head.weight; format_error on a mix.
std::string gpt2_key_prefix(const io::safetensors_file& file);
/// h.<l>.attn.bias and h.<l>.attn.masked_bias (l < n_layer): causal-mask buffers, not parameters.
bool is_attention_buffer(const std::string& name, index n_layer);
/// Shape, then dtype, of tensor `t` against `spec`.
void check_tensor(const io::safetensors_file& file, const io::tensor_info& t, const gpt2_tensor_spec& spec,
                  const gpt2_config& config);
gpt2_file_plan plan_gpt2_file(const io::safetensors_file& file, const gpt2_config& config);
bool host_is_little_endian() noexcept;
/// Whether float weights can point straight into the (memory-resident) file.
bool can_borrow(const io::safetensors_file& file, const gpt2_file_plan& plan);
gpt2_weights<float> borrow_weights(const io::safetensors_file& file, const gpt2_file_plan& plan,
                                   const gpt2_config& config);
template <typename Scalar>
gpt2_weights<Scalar> convert_weights(const io::safetensors_file& file, const gpt2_file_plan& plan,
                                     const gpt2_config& config);
/// format_error unless lm_head.weight equals the loaded wte bit for bit (after conversion to Scalar).
template <typename Scalar>
void check_tied_head(const io::safetensors_file& file, const gpt2_file_plan& plan, const gpt2_weights<Scalar>& w);

void check_save_options(const gpt2_save_options& options);
void create_folder(const std::string& dir);

}  // namespace detail

// ================================================================================================
// Implementation
// ================================================================================================

namespace detail {

inline const std::vector<fixed_key>& gpt2_fixed_keys() {
  static const std::vector<fixed_key> keys = {
      {"model_type", "gpt2"},
      {"activation_function", "gelu_new"},         // GELU, tanh approximation
      {"tie_word_embeddings", true},               // the LM head is wte
      {"scale_attn_weights", true},                // scores / sqrt(head_dim)
      {"scale_attn_by_inverse_layer_idx", false},  // no extra 1 / (layer + 1)
      {"add_cross_attention", false},              // decoder only
  };
  return keys;
}

inline index config_integer(const nlohmann::json& root, const std::string& key, const std::string& label) {
  const auto it = root.find(key);
  if (it == root.end()) throw format_error(cat("GPT-2 config '", label, "': missing key '", key, "'"));
  if (!it->is_number_integer()) {
    throw format_error(
        cat("GPT-2 config '", label, "': key '", key, "' must be an integer, got ", it->type_name(), " ", it->dump()));
  }
  if (it->is_number_unsigned() && it->get<std::uint64_t>() > std::uint64_t{std::numeric_limits<index>::max()}) {
    throw format_error(cat("GPT-2 config '", label, "': key '", key, "' is too large (", it->dump(), ")"));
  }
  return static_cast<index>(it->get<std::int64_t>());
}

inline void check_fixed_keys(const nlohmann::json& root, const gpt2_config& config, const std::string& label) {
  for (const fixed_key& k : gpt2_fixed_keys()) {
    const auto it = root.find(k.name);
    if (it == root.end() || it->is_null() || *it == k.value) continue;
    if (it->type() != k.value.type()) {
      throw format_error(cat("GPT-2 config '", label, "': key '", k.name, "' must be a ", k.value.type_name(), ", got ",
                             it->type_name(), " ", it->dump()));
    }
    throw config_error(cat("GPT-2 config '", label, "': key '", k.name, "' is ", it->dump(),
                           "; the model implements only ", k.value.dump()));
  }
  const auto inner = root.find("n_inner");
  if (inner == root.end() || inner->is_null()) return;
  const index n_inner = config_integer(root, "n_inner", label);
  if (n_inner % 4 != 0 || n_inner / 4 != config.n_embd) {  // not n_inner != 4 n_embd, which may overflow
    throw config_error(cat("GPT-2 config '", label, "': key 'n_inner' is ", inner->dump(),
                           "; the model implements only 4 n_embd = 4 x ", config.n_embd, " (or null)"));
  }
}

}  // namespace detail

inline gpt2_config parse_gpt2_config(std::string_view json_text, const std::string& label) {
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(json_text.begin(), json_text.end());
  } catch (const nlohmann::json::parse_error& e) {
    throw format_error(detail::cat("GPT-2 config '", label, "': not valid JSON: ", e.what()));
  }
  if (!root.is_object()) {
    throw format_error(detail::cat("GPT-2 config '", label, "': expected a JSON object, got ", root.type_name()));
  }
  gpt2_config c;
  c.n_layer = detail::config_integer(root, "n_layer", label);
  c.n_head = detail::config_integer(root, "n_head", label);
  c.n_embd = detail::config_integer(root, "n_embd", label);
  const bool legacy = !root.contains("n_positions") && root.contains("n_ctx");  // old configs name it n_ctx
  c.n_positions = detail::config_integer(root, legacy ? "n_ctx" : "n_positions", label);
  c.vocab_size = detail::config_integer(root, "vocab_size", label);
  if (const auto eps = root.find("layer_norm_epsilon"); eps != root.end()) {
    if (!eps->is_number()) {
      throw format_error(detail::cat("GPT-2 config '", label, "': key 'layer_norm_epsilon' must be a number, got ",
                                     eps->type_name(), " ", eps->dump()));
    }
    c.layer_norm_epsilon = eps->get<double>();
  }
  c.validate(detail::cat("GPT-2 config '", label, "'"));
  detail::check_fixed_keys(root, c, label);
  return c;
}

inline gpt2_config read_gpt2_config(const std::string& config_json_path) {
  return parse_gpt2_config(io::detail::read_text_file(config_json_path, max_gpt2_config_bytes, "GPT-2 config"),
                           config_json_path);
}

inline std::string gpt2_config_json(const gpt2_config& config, io::dtype dtype) {
  detail::check_save_options({dtype, ""});
  const char* torch_dtype = dtype == io::dtype::f32 ? "float32" : dtype == io::dtype::f16 ? "float16" : "bfloat16";
  const nlohmann::json j = {
      {"activation_function", "gelu_new"},
      {"architectures", {"GPT2LMHeadModel"}},
      {"attn_pdrop", 0.1},
      {"bos_token_id", config.vocab_size - 1},
      {"embd_pdrop", 0.1},
      {"eos_token_id", config.vocab_size - 1},
      {"initializer_range", 0.02},
      {"layer_norm_epsilon", config.layer_norm_epsilon},
      {"model_type", "gpt2"},
      {"n_ctx", config.n_positions},
      {"n_embd", config.n_embd},
      {"n_head", config.n_head},
      {"n_inner", nullptr},
      {"n_layer", config.n_layer},
      {"n_positions", config.n_positions},
      {"reorder_and_upcast_attn", false},
      {"resid_pdrop", 0.1},
      {"scale_attn_by_inverse_layer_idx", false},
      {"scale_attn_weights", true},
      {"summary_activation", nullptr},
      {"summary_first_dropout", 0.1},
      {"summary_proj_to_labels", true},
      {"summary_type", "cls_index"},
      {"summary_use_proj", true},
      {"tie_word_embeddings", true},
      {"torch_dtype", torch_dtype},
      {"use_cache", true},
      {"vocab_size", config.vocab_size},
  };
  return j.dump(2) + "\n";
}

namespace detail {

inline std::string where(const io::safetensors_file& file) { return cat("GPT-2 weights '", file.path(), "': "); }

inline void check_config_fits(const io::safetensors_file& file, const gpt2_config& config) {
  const std::uint64_t count = file.tensors().size();
  std::uint64_t bytes = 0;
  for (const io::tensor_info& t : file.tensors()) bytes = std::max(bytes, t.end);
  const auto refuse = [&](const char* key, index value, const char* why) {
    throw format_error(cat(where(file), "the config's ", key, " ", value, " cannot fit a file of ", count,
                           " tensors and ", bytes, " data bytes (", why, ")"));
  };
  // A matching file has 4 + 12 n_layer tensors, and wte (vocab_size x n_embd) and wpe (n_positions x
  // n_embd) of at least 2 bytes an element: each size is at most bytes / 2, so no product below overflows.
  if (static_cast<std::uint64_t>(config.n_layer) > count / 12) refuse("n_layer", config.n_layer, "12 tensors a layer");
  const std::pair<const char*, index> sizes[] = {
      {"n_embd", config.n_embd}, {"vocab_size", config.vocab_size}, {"n_positions", config.n_positions}};
  for (const auto& [key, value] : sizes) {
    if (static_cast<std::uint64_t>(value) > bytes / 2) refuse(key, value, "at least 2 bytes an element");
  }
}

inline std::string gpt2_key_prefix(const io::safetensors_file& file) {
  const io::tensor_info* with = nullptr;
  const io::tensor_info* without = nullptr;
  for (const io::tensor_info& t : file.tensors()) {
    if (t.name == lm_head_name) continue;
    (t.name.compare(0, transformer_prefix.size(), transformer_prefix) == 0 ? with : without) = &t;
  }
  if (with != nullptr && without != nullptr) {
    throw format_error(cat(where(file), "tensor names mix two conventions: '", with->name, "' has the \"",
                           transformer_prefix, "\" prefix but '", without->name, "' does not"));
  }
  return with != nullptr ? std::string(transformer_prefix) : std::string();
}

inline bool is_attention_buffer(const std::string& name, index n_layer) {
  for (const std::string_view suffix : {std::string_view(".attn.bias"), std::string_view(".attn.masked_bias")}) {
    if (name.size() <= 2 + suffix.size() || name.compare(0, 2, "h.") != 0 ||
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
      continue;
    }
    const std::string layer = name.substr(2, name.size() - 2 - suffix.size());
    for (index l = 0; l < n_layer; ++l) {
      if (layer == std::to_string(l)) return true;
    }
  }
  return false;
}

inline void check_tensor(const io::safetensors_file& file, const io::tensor_info& t, const gpt2_tensor_spec& spec,
                         const gpt2_config& config) {
  const std::vector<std::int64_t> expected =
      spec.is_vector() ? std::vector<std::int64_t>{spec.rows} : std::vector<std::int64_t>{spec.rows, spec.cols};
  if (t.shape != expected) {
    throw format_error(cat(where(file), "tensor '", t.name, "' has shape ", io::detail::shape_to_string(t.shape),
                           ", expected ", io::detail::shape_to_string(expected), " from the config (n_layer ",
                           config.n_layer, ", n_embd ", config.n_embd, ", n_positions ", config.n_positions,
                           ", vocab_size ", config.vocab_size, ")"));
  }
  if (t.type != io::dtype::f32 && t.type != io::dtype::f16 && t.type != io::dtype::bf16) {
    throw dtype_error(cat(where(file), "tensor '", t.name, "' is ", io::dtype_name(t.type),
                          "; GPT-2 weights load from F32, F16 or BF16"));
  }
}

inline gpt2_file_plan plan_gpt2_file(const io::safetensors_file& file, const gpt2_config& config) {
  const std::vector<gpt2_tensor_spec> specs = gpt2_tensor_specs(config);
  std::unordered_map<std::string, std::size_t> ids;
  for (std::size_t id = 0; id < specs.size(); ++id) ids.emplace(specs[id].name, id);
  gpt2_file_plan plan;
  plan.prefix = gpt2_key_prefix(file);
  plan.tensors.assign(specs.size(), nullptr);
  for (const io::tensor_info& t : file.tensors()) {
    if (t.name == lm_head_name) {
      check_tensor(file, t, specs[0], config);  // shaped like wte
      plan.lm_head = &t;
      continue;
    }
    const std::string name = t.name.substr(plan.prefix.size());
    if (is_attention_buffer(name, config.n_layer)) continue;
    const auto id = ids.find(name);
    if (id == ids.end()) {
      throw format_error(cat(where(file), "unexpected tensor '", t.name, "' (not a parameter of a GPT-2 of ",
                             config.n_layer, " layers)"));
    }
    check_tensor(file, t, specs[id->second], config);
    plan.tensors[id->second] = &t;
  }
  for (std::size_t id = 0; id < specs.size(); ++id) {
    if (plan.tensors[id] != nullptr) continue;
    const gpt2_tensor_spec& s = specs[id];
    throw format_error(cat(where(file), "missing tensor '", plan.prefix, s.name, "' (expected shape [", s.rows,
                           s.is_vector() ? std::string() : cat(", ", s.cols), "])"));
  }
  return plan;
}

inline bool host_is_little_endian() noexcept {
  const std::uint32_t one = 1;
  unsigned char first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

inline bool can_borrow(const io::safetensors_file& file, const gpt2_file_plan& plan) {
  if (!host_is_little_endian() || !file.is_memory_resident()) return false;
  // The mapping starts on a page boundary, so a tensor's alignment is that of its file offset.
  return std::all_of(plan.tensors.begin(), plan.tensors.end(), [&](const io::tensor_info* t) {
    return t->type == io::dtype::f32 && (file.data_offset() + t->begin) % alignof(float) == 0;
  });
}

inline gpt2_weights<float> borrow_weights(const io::safetensors_file& file, const gpt2_file_plan& plan,
                                          const gpt2_config& config) {
  std::vector<float*> data;
  data.reserve(plan.tensors.size());
  for (const io::tensor_info* t : plan.tensors) {
    // The file was opened with read_mode::map_copy_on_write: the mapping is private and writable, so a
    // write through this pointer copies the page and never reaches the file.
    auto* bytes = const_cast<unsigned char*>(file.raw(t->name).data());
    LORA_ASSERT(reinterpret_cast<std::uintptr_t>(bytes) % alignof(float) == 0);
    data.push_back(reinterpret_cast<float*>(bytes));
  }
  // Copies of a safetensors_file share its mapping: this one keeps it alive as long as the weights.
  return gpt2_weights<float>(config, std::move(data), std::make_shared<io::safetensors_file>(file));
}

template <typename Scalar>
gpt2_weights<Scalar> convert_weights(const io::safetensors_file& file, const gpt2_file_plan& plan,
                                     const gpt2_config& config) {
  gpt2_weights<Scalar> w(config);  // every size was checked against the file by plan_gpt2_file
  for (index id = 0; id < w.num_tensors(); ++id) {
    const io::tensor_info& t = *plan.tensors[static_cast<std::size_t>(id)];
    const io::tensor_bytes bytes = file.raw(t.name);
    io::detail::decode<Scalar>(t.type, bytes.data(), static_cast<std::size_t>(t.numel()), w.data(id));
  }
  return w;
}

template <typename Scalar>
void check_tied_head(const io::safetensors_file& file, const gpt2_file_plan& plan, const gpt2_weights<Scalar>& w) {
  const io::tensor_info& head = *plan.lm_head;
  const io::tensor_bytes bytes = file.raw(head.name);
  const std::size_t n = static_cast<std::size_t>(head.numel());
  const std::size_t width = io::dtype_size(head.type);
  std::vector<Scalar> buffer(std::min<std::size_t>(n, 4096));
  for (std::size_t k = 0; k < n; k += buffer.size()) {
    const std::size_t m = std::min(buffer.size(), n - k);
    io::detail::decode<Scalar>(head.type, bytes.data() + k * width, m, buffer.data());
    if (std::memcmp(buffer.data(), w.data(0) + k, m * sizeof(Scalar)) == 0) continue;
    std::size_t i = 0;
    while (std::memcmp(&buffer[i], w.data(0) + k + i, sizeof(Scalar)) == 0) ++i;
    throw format_error(cat(where(file), "tensor '", head.name, "' differs from '", plan.prefix,
                           "wte.weight' at element ", k + i, ": an untied LM head is not supported (GPT-2 ties ",
                           "lm_head.weight to the token embedding)"));
  }
}

}  // namespace detail

template <typename Scalar>
gpt2_weights<Scalar> load_gpt2_weights(const std::string& safetensors_path, const gpt2_config& config,
                                       const gpt2_load_options& options) {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>, "GPT-2 weights are float or double");
  config.validate(detail::cat("GPT-2 weights '", safetensors_path, "'"));
  constexpr bool is_float = std::is_same_v<Scalar, float>;
  const io::read_mode mode = !options.zero_copy ? io::read_mode::pread
                             : is_float         ? io::read_mode::map_copy_on_write
                                                : io::read_mode::map;
  const io::safetensors_file file = io::safetensors_file::open(safetensors_path, mode);
  detail::check_config_fits(file, config);
  const detail::gpt2_file_plan plan = detail::plan_gpt2_file(file, config);
  gpt2_weights<Scalar> weights = [&] {
    if constexpr (is_float) {
      if (mode == io::read_mode::map_copy_on_write && detail::can_borrow(file, plan)) {
        return detail::borrow_weights(file, plan, config);
      }
    }
    return detail::convert_weights<Scalar>(file, plan, config);
  }();
  if (plan.lm_head != nullptr) detail::check_tied_head(file, plan, weights);
  return weights;
}

template <typename Scalar>
gpt2_checkpoint<Scalar> load_gpt2(const std::string& dir, const gpt2_load_options& options) {
  const std::filesystem::path folder(dir);
  const gpt2_config config = read_gpt2_config((folder / "config.json").string());
  gpt2_weights<Scalar> weights = load_gpt2_weights<Scalar>((folder / "model.safetensors").string(), config, options);
  return gpt2_checkpoint<Scalar>{config, std::move(weights)};
}

namespace detail {

inline void check_save_options(const gpt2_save_options& options) {
  if (options.dtype != io::dtype::f32 && options.dtype != io::dtype::f16 && options.dtype != io::dtype::bf16) {
    throw dtype_error(cat("save_gpt2: dtype ", io::dtype_name(options.dtype), " is not F32, F16 or BF16"));
  }
  if (!options.key_prefix.empty() && options.key_prefix != transformer_prefix) {
    throw config_error(cat("save_gpt2: key_prefix is \"", options.key_prefix, "\"; expected \"", transformer_prefix,
                           "\" or \"\" (the two conventions load_gpt2 reads)"));
  }
}

inline void create_folder(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (!ec && std::filesystem::is_directory(dir, ec)) return;
  throw io_error(cat("cannot create GPT-2 checkpoint folder '", dir,
                     "': ", ec ? ec.message() : std::string("a file of that name is in the way")));
}

}  // namespace detail

template <typename Scalar>
void save_gpt2(const std::string& dir, const gpt2_weights<Scalar>& weights, const gpt2_save_options& options) {
  detail::check_save_options(options);
  detail::create_folder(dir);
  const std::filesystem::path folder(dir);
  std::vector<io::tensor_spec> layout;
  for (const gpt2_tensor_spec& s : weights.specs()) {
    layout.push_back({options.key_prefix + s.name, options.dtype,
                      s.is_vector() ? std::vector<std::int64_t>{s.rows} : std::vector<std::int64_t>{s.rows, s.cols}});
  }
  io::sort_like_reference(layout);
  // Both files are complete temporaries before either is renamed into place.
  io::safetensors_stream_writer model((folder / "model.safetensors").string(), layout, {{"format", "pt"}});
  for (index id = 0; id < weights.num_tensors(); ++id) {
    model.write(options.key_prefix + weights.spec(id).name, weights.matrix(id));
  }
  io::atomic_file config(folder / "config.json");
  const std::string text = gpt2_config_json(weights.config(), options.dtype);
  config.write_at(0, text.data(), text.size());
  model.commit();
  config.commit();
}

}  // namespace lora::models
