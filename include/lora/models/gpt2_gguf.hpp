// lora/models/gpt2_gguf.hpp: GPT-2 models and their LoRA adapters in llama.cpp's GGUF form
// (docs/CONVENTIONS.md §gguf), so that what this library trains runs in llama.cpp and what llama.cpp
// users have trains further here.
//
// Models: general.architecture "gpt2" with gpt2.context_length, .embedding_length, .block_count,
// .feed_forward_length, .attention.head_count (UINT32) and .attention.layer_norm_epsilon (FLOAT32), and
//   HF name (without "transformer.")      GGUF name                    stored as
//   wte.weight [V, d]                     token_embd.weight            ne [d, V]
//   wpe.weight [P, d]                     position_embd.weight         ne [d, P]
//   h.N.ln_1 / ln_2 .weight .bias         blk.N.attn_norm / ffn_norm   ne [d]
//   h.N.attn.c_attn.weight [d, 3d]        blk.N.attn_qkv.weight        ne [d, 3d]: W = Conv1Dᵀ, 3d x d
//   h.N.attn.c_proj.weight [d, d]         blk.N.attn_output.weight     ne [d, d]
//   h.N.mlp.c_fc.weight [d, 4d]           blk.N.ffn_up.weight          ne [d, 4d]
//   h.N.mlp.c_proj.weight [4d, d]         blk.N.ffn_down.weight        ne [4d, d]
//   (biases alike, .bias)                 ln_f -> output_norm          no output.weight: the head is tied
// Matrices are stored in the chosen type (F32, F16, BF16, Q8_0, Q4_0), vectors always F32, as llama.cpp's
// converter does. The tokenizer goes in as tokenizer.ggml.*: GPT-2's BPE (model "gpt2", pre "gpt-2",
// tokens and merges in GPT-2's alphabet) or the 257-token byte vocabulary (pre "default", token k < 256 =
// the GPT-2 alphabet character of byte k, no merges, token 256 "<|endoftext|>" of type control); BOS and
// EOS are <|endoftext|>. A model loads dequantized to float (load_gpt2_gguf), or with its projections kept
// in the file's blocks (load_gpt2_gguf_quantized: F16, BF16, Q8_0, Q4_0 or F32 as quant::quantized_matrix),
// so that adapters train over a llama.cpp-quantized base as it is (docs/CONVENTIONS.md §quant).
//
// Adapters: a PEFT adapter on GPT-2 (module paths transformer.h.N.attn.c_attn, attn.c_proj, mlp.c_fc,
// mlp.c_proj, fan_in_fan_out) maps module by module onto the tensors above; A and B are written as PEFT
// stores them (fan_in_fan_out only transposes B A in PEFT's merge, never the factors).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <system_error>
#include <tuple>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../io/gguf.hpp"
#include "../io/gguf_lora.hpp"
#include "../io/peft.hpp"
#include "../quant/quantized_matrix.hpp"
#include "byte_tokenizer.hpp"
#include "detail/bpe_files.hpp"
#include "gpt2_config.hpp"
#include "gpt2_io.hpp"
#include "gpt2_weights.hpp"
#include "tokenizer.hpp"

namespace lora::models {

/// A tokenizer as llama.cpp's tokenizer.ggml.* keys hold it.
struct gguf_vocab {
  std::vector<std::string> tokens;  ///< in GPT-2's alphabet (vocab.json's keys), by id
  std::vector<std::string> merges;  ///< "left right" in rank order; empty for the byte vocabulary
  std::int32_t eot = 0;             ///< id of <|endoftext|>
  bool bpe = false;
};

/// The vocabulary of the model folder `dir` (vocab.json + merges.txt, else the byte vocabulary when the
/// model has 257 rows; config_error otherwise, as tokenizer::from_folder).
gguf_vocab gguf_vocab_from_folder(const std::string& dir, index model_vocab_size);

struct gpt2_gguf_options {
  io::ggml_type type = io::ggml_type::f32;  ///< of the matrices; vectors are F32
  std::string name;                         ///< general.name (omitted when empty)
};

/// The GGUF name of table tensor `id` of `config`, and whether its matrix is stored transposed (the
/// Conv1D weights, in x out in HF files, out x in in GGUF).
std::pair<std::string, bool> gpt2_gguf_tensor_name(const gpt2_config& config, index id);
/// "blk.N.attn_qkv.weight" for the PEFT module path "transformer.h.N.attn.c_attn" (the prefix is
/// optional), and so on for attn.c_proj, mlp.c_fc, mlp.c_proj; nullopt for any other path.
std::optional<std::string> gpt2_gguf_name_of_module(const std::string& module_path);
/// The inverse: "transformer.h.N.attn.c_attn" for "blk.N.attn_qkv.weight"; nullopt for other names.
std::optional<std::string> gpt2_module_of_gguf_name(const std::string& gguf_name);

/// Builds the GGUF image of a model and its vocabulary (writer not yet written). config_error when the
/// vocabulary's size differs from the model's; shape_error when a quantized type does not fit d.
template <typename Scalar>
io::gguf_writer gpt2_gguf_writer(const gpt2_weights<Scalar>& weights, const gguf_vocab& vocab,
                                 const gpt2_gguf_options& options = {});
/// The model folder `hf_dir` (config.json, model.safetensors, tokenizer files) as a GGUF file at `out`.
void convert_gpt2_to_gguf(const std::string& hf_dir, const std::string& out, const gpt2_gguf_options& options = {});

/// The config a GPT-2 GGUF describes; format_error naming the file and key when a key is missing, has the
/// wrong type or describes a variant this library does not run (feed_forward_length other than 4 d).
gpt2_config read_gpt2_gguf_config(const io::gguf_file& file);
/// A GPT-2 GGUF's weights (dequantized to Scalar): every tensor present with its exact ne, nothing else
/// (format_error naming the tensor otherwise).
template <typename Scalar>
gpt2_checkpoint<Scalar> load_gpt2_gguf(const std::string& path);

/// A GPT-2 GGUF whose projections stay in the file's ggml blocks (never a float copy of them).
template <typename Scalar>
struct gpt2_gguf_quantized {
  gpt2_config config;
  gpt2_weights<Scalar> weights;  ///< every tensor but the 4 L projections (released), dequantized to Scalar
  /// W (out x in) of each projection as stored: the file's bytes, F32, F16, BF16, Q8_0 or Q4_0 as qtype f32,
  /// f16, bf16, q8_0 or q4_0; block by block in gpt2_module order (c_attn, attn.c_proj, c_fc, mlp.c_proj),
  /// as gpt2's constructor taking projections wants them.
  std::vector<quant::quantized_matrix> projections;
};
/// Loads a GPT-2 GGUF for training over its projections as they are stored: the embeddings, norms and
/// biases dequantized as load_gpt2_gguf does, the projections' blocks copied into quantized_matrix'es
/// (GGUF stores Conv1D weights transposed, out x in with in contiguous: quantized_matrix's row layout).
/// The same checks as load_gpt2_gguf, before anything of the model's size is allocated (a tensor of a
/// type this library does not compute with is a format_error naming the tensor and the type).
///   gpt2<float> model(std::move(q.weights), std::move(q.projections));
template <typename Scalar>
gpt2_gguf_quantized<Scalar> load_gpt2_gguf_quantized(const std::string& path);

/// The vocabulary a GPT-2 GGUF carries (tokenizer.ggml.tokens, .merges, .eos_token_id); format_error when
/// the keys are missing or of the wrong type, or the tokenizer model is not "gpt2".
gguf_vocab read_gguf_vocab(const io::gguf_file& file);
/// Writes a GGUF vocabulary as Hugging Face's tokenizer files: DIR/vocab.json and DIR/merges.txt for a BPE
/// vocabulary (atomically), nothing for the 257-token byte vocabulary (tokenizer::from_folder picks the
/// byte tokenizer for a folder without them).
void save_gguf_vocab(const std::string& dir, const gguf_vocab& vocab);
/// The GPT-2 GGUF model `gguf_path` as a Hugging Face folder (config.json, model.safetensors in F32 and the
/// tokenizer files), so that a model served with llama.cpp can be fine-tuned here.
void convert_gguf_to_gpt2(const std::string& gguf_path, const std::string& hf_dir);

/// The LoRA modules of a PEFT adapter on GPT-2, with their scalings, for io::write_gguf_lora. Refuses,
/// naming the module and saying why: DoRA (llama.cpp has no magnitude vectors: merge instead), lora_B
/// biases, modules_to_save tensors, embedding LoRA, modules other than the four projections, layers or
/// shapes that disagree with `config`.
std::vector<io::gguf_lora_module> gpt2_peft_to_gguf_modules(const io::peft_adapter& adapter, const gpt2_config& config);
/// A GGUF LoRA adapter for GPT-2 as a PEFT adapter: fan_in_fan_out, task CAUSAL_LM, r and lora_alpha the
/// most common rank and scaling · rank, rank_pattern / alpha_pattern for the others, target_modules the
/// adapted projections ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"). format_error for a
/// tensor that is not one of the four projections.
io::peft_adapter gpt2_gguf_lora_to_peft(const io::gguf_lora_adapter& adapter, const std::string& base_name = "");

// ================================================================================================
// Implementation
// ================================================================================================

namespace detail {

/// GGUF names of the 12 tensors of a block, in block_tensor order, with "transposed" for Conv1D weights.
inline constexpr std::pair<const char*, bool> gguf_block_names[] = {
    {"attn_norm.weight", false},  {"attn_norm.bias", false},   {"attn_qkv.weight", true},  {"attn_qkv.bias", false},
    {"attn_output.weight", true}, {"attn_output.bias", false}, {"ffn_norm.weight", false}, {"ffn_norm.bias", false},
    {"ffn_up.weight", true},      {"ffn_up.bias", false},      {"ffn_down.weight", true},  {"ffn_down.bias", false},
};
/// PEFT module suffixes (after "h.N.") and GGUF tensor suffixes (after "blk.N.") of the four projections.
inline constexpr std::pair<const char*, const char*> gguf_projections[] = {
    {"attn.c_attn", "attn_qkv.weight"},
    {"attn.c_proj", "attn_output.weight"},
    {"mlp.c_fc", "ffn_up.weight"},
    {"mlp.c_proj", "ffn_down.weight"},
};

/// "N.rest" -> (N, rest) when the text starts with a decimal layer number and a dot.
inline std::optional<std::pair<index, std::string>> split_layer(const std::string& s) {
  std::size_t k = 0;
  while (k < s.size() && k < 9 && s[k] >= '0' && s[k] <= '9') ++k;
  if (k == 0 || k >= s.size() || s[k] != '.' || (k > 1 && s[0] == '0')) return std::nullopt;
  return std::make_pair(static_cast<index>(std::stol(s.substr(0, k))), s.substr(k + 1));
}

}  // namespace detail

inline gguf_vocab gguf_vocab_from_folder(const std::string& dir, index model_vocab_size) {
  const tokenizer tok = tokenizer::from_folder(dir, model_vocab_size);
  gguf_vocab v;
  v.bpe = tok.is_bpe();
  v.eot = tok.eot_id();
  for (std::int32_t id = 0; id < tok.vocab_size(); ++id) {
    v.tokens.push_back(id == v.eot ? std::string("<|endoftext|>") : detail::gpt2_bytes_to_text(tok.token_bytes(id)));
  }
  if (v.bpe) {
    for (const auto& m : detail::read_gpt2_merges((std::filesystem::path(dir) / "merges.txt").string()))
      v.merges.push_back(detail::gpt2_bytes_to_text(m.left) + " " + detail::gpt2_bytes_to_text(m.right));
  }
  return v;
}

inline std::pair<std::string, bool> gpt2_gguf_tensor_name(const gpt2_config& config, index id) {
  if (id == 0) return {"token_embd.weight", false};
  if (id == 1) return {"position_embd.weight", false};
  const index last = 2 + block_tensor_count * config.n_layer;
  if (id == last) return {"output_norm.weight", false};
  if (id == last + 1) return {"output_norm.bias", false};
  if (id < 0 || id > last + 1) throw name_error(lora::detail::cat("GPT-2 tensor id ", id, " is out of range"));
  const index layer = (id - 2) / block_tensor_count;
  const auto& [suffix, transposed] = detail::gguf_block_names[(id - 2) % block_tensor_count];
  return {lora::detail::cat("blk.", layer, ".", suffix), transposed};
}

inline std::optional<std::string> gpt2_gguf_name_of_module(const std::string& module_path) {
  std::string p = module_path;
  if (p.rfind("transformer.", 0) == 0) p = p.substr(12);
  if (p.rfind("h.", 0) != 0) return std::nullopt;
  const auto split = detail::split_layer(p.substr(2));
  if (!split) return std::nullopt;
  for (const auto& [peft, gguf] : detail::gguf_projections) {
    if (split->second == peft) return lora::detail::cat("blk.", split->first, ".", gguf);
  }
  return std::nullopt;
}

inline std::optional<std::string> gpt2_module_of_gguf_name(const std::string& gguf_name) {
  if (gguf_name.rfind("blk.", 0) != 0) return std::nullopt;
  const auto split = detail::split_layer(gguf_name.substr(4));
  if (!split) return std::nullopt;
  for (const auto& [peft, gguf] : detail::gguf_projections) {
    if (split->second == gguf) return lora::detail::cat("transformer.h.", split->first, ".", peft);
  }
  return std::nullopt;
}

template <typename Scalar>
io::gguf_writer gpt2_gguf_writer(const gpt2_weights<Scalar>& weights, const gguf_vocab& vocab,
                                 const gpt2_gguf_options& options) {
  const gpt2_config& c = weights.config();
  if (static_cast<index>(vocab.tokens.size()) != c.vocab_size)
    throw config_error(lora::detail::cat("GGUF export: the model has vocab_size ", c.vocab_size,
                                         " but its tokenizer has ", vocab.tokens.size(),
                                         " tokens; llama.cpp needs them equal"));
  io::gguf_writer w;
  auto u32 = [](index v) { return io::gguf_value::of(static_cast<std::uint32_t>(v)); };
  w.set("general.architecture", io::gguf_value::of("gpt2"));
  if (!options.name.empty()) w.set("general.name", io::gguf_value::of(options.name));
  w.set("general.file_type", io::gguf_value::of(io::llama_file_type(options.type)));
  w.set("gpt2.context_length", u32(c.n_positions));
  w.set("gpt2.embedding_length", u32(c.n_embd));
  w.set("gpt2.feed_forward_length", u32(c.n_inner()));
  w.set("gpt2.block_count", u32(c.n_layer));
  w.set("gpt2.attention.head_count", u32(c.n_head));
  w.set("gpt2.attention.layer_norm_epsilon", io::gguf_value::of(static_cast<float>(c.layer_norm_epsilon)));
  w.set("tokenizer.ggml.model", io::gguf_value::of("gpt2"));
  w.set("tokenizer.ggml.pre", io::gguf_value::of(vocab.bpe ? "gpt-2" : "default"));
  w.set("tokenizer.ggml.tokens", io::gguf_value::array(vocab.tokens));
  std::vector<std::int32_t> types(vocab.tokens.size(), 1);  // 1 normal, 3 control
  types[static_cast<std::size_t>(vocab.eot)] = 3;
  w.set("tokenizer.ggml.token_type", io::gguf_value::array(types));
  w.set("tokenizer.ggml.merges", io::gguf_value::array(vocab.merges));
  w.set("tokenizer.ggml.bos_token_id", u32(vocab.eot));
  w.set("tokenizer.ggml.eos_token_id", u32(vocab.eot));
  for (index id = 0; id < weights.num_tensors(); ++id) {
    const auto [name, transposed] = gpt2_gguf_tensor_name(c, id);
    if (weights.spec(id).is_vector()) {
      w.add_vector(name, weights.flat(id), io::ggml_type::f32);
    } else if (transposed) {
      w.add(name, weights.matrix(id).transpose(), options.type);
    } else {
      w.add(name, weights.matrix(id), options.type);
    }
  }
  return w;
}

inline void convert_gpt2_to_gguf(const std::string& hf_dir, const std::string& out, const gpt2_gguf_options& options) {
  const gpt2_checkpoint<float> model = load_gpt2<float>(hf_dir);
  const gguf_vocab vocab = gguf_vocab_from_folder(hf_dir, model.config.vocab_size);
  gpt2_gguf_writer(model.weights, vocab, options).write(out);
}

inline gpt2_config read_gpt2_gguf_config(const io::gguf_file& f) {
  const std::string& arch = f.get_string("general.architecture");
  if (arch != "gpt2")
    throw format_error(lora::detail::cat("GGUF file '", f.path(), "' holds a \"", arch, "\" model, expected \"gpt2\""));
  gpt2_config c;
  c.n_positions = f.get<std::uint32_t>("gpt2.context_length");
  c.n_embd = f.get<std::uint32_t>("gpt2.embedding_length");
  c.n_layer = f.get<std::uint32_t>("gpt2.block_count");
  c.n_head = f.get<std::uint32_t>("gpt2.attention.head_count");
  c.layer_norm_epsilon = f.get<float>("gpt2.attention.layer_norm_epsilon");
  c.vocab_size = f.has("gpt2.vocab_size") ? static_cast<index>(f.get<std::uint32_t>("gpt2.vocab_size"))
                                          : static_cast<index>(f.get_strings("tokenizer.ggml.tokens").size());
  if (f.has("gpt2.feed_forward_length") && f.get<std::uint32_t>("gpt2.feed_forward_length") != 4 * c.n_embd)
    throw format_error(lora::detail::cat("GGUF file '", f.path(), "': gpt2.feed_forward_length is ",
                                         f.get<std::uint32_t>("gpt2.feed_forward_length"), ", this library runs 4 x ",
                                         c.n_embd));
  c.validate(lora::detail::cat("GGUF file '", f.path(), "'"));
  return c;
}

namespace detail {

/// The GGUF ne of table tensor `spec` (vectors [n]; matrices [cols, rows] of the stored orientation).
inline std::vector<std::uint64_t> gguf_ne_of(const gpt2_tensor_spec& spec, bool transposed) {
  const auto rows = static_cast<std::uint64_t>(spec.rows), cols = static_cast<std::uint64_t>(spec.cols);
  if (spec.is_vector()) return {rows};
  return transposed ? std::vector<std::uint64_t>{rows, cols} : std::vector<std::uint64_t>{cols, rows};
}

/// Checks that `f` holds exactly the tensors of `config`, each with its ne (format_error naming the tensor),
/// before anything of the model's size is allocated.
inline void check_gpt2_gguf_tensors(const io::gguf_file& f, const gpt2_config& config) {
  const std::vector<gpt2_tensor_spec> specs = gpt2_tensor_specs(config);
  if (f.tensors().size() != specs.size())
    throw format_error(lora::detail::cat("GGUF file '", f.path(), "' has ", f.tensors().size(), " tensors, a GPT-2 of ",
                                         config.n_layer, " layers (tied head) has ", specs.size()));
  for (std::size_t id = 0; id < specs.size(); ++id) {
    const auto [name, transposed] = gpt2_gguf_tensor_name(config, static_cast<index>(id));
    const io::gguf_tensor_info& t = f.info(name);  // name_error naming the file when absent
    const std::vector<std::uint64_t> want = gguf_ne_of(specs[id], transposed);
    if (t.effective_ne() != want)
      throw format_error(lora::detail::cat("GGUF file '", f.path(), "': tensor '", name, "' has shape ",
                                           io::detail::shape_to_string(t.shape()), ", expected ",
                                           io::detail::shape_to_string({want.rbegin(), want.rend()})));
    if (!io::ggml_is_convertible(t.type))
      throw format_error(lora::detail::cat("GGUF file '", f.path(), "': tensor '", name, "' is ",
                                           io::ggml_type_name(t.type),
                                           "; this library reads F32, F16, BF16, Q8_0, Q4_0"));
  }
}

}  // namespace detail

namespace detail {

/// Reads every tensor `weights` holds from `f` (dequantized to Scalar, Conv1D weights transposed back).
template <typename Scalar>
void read_gpt2_gguf_tensors(const io::gguf_file& f, gpt2_weights<Scalar>& weights) {
  for (index id = 0; id < weights.num_tensors(); ++id) {
    if (!weights.has(id)) continue;
    const auto [name, transposed] = gpt2_gguf_tensor_name(weights.config(), id);
    if (weights.spec(id).is_vector()) {
      weights.flat(id) = f.read_vector<Scalar>(name);
    } else if (transposed) {
      weights.matrix(id) = f.read_matrix<Scalar>(name).transpose();
    } else {
      weights.matrix(id) = f.read_matrix<Scalar>(name);
    }
  }
}

/// Table ids of the projection weights of block l, in gpt2_module order.
inline std::array<index, 4> gpt2_projection_ids(index l) {
  return {gpt2_tensor_id(l, block_tensor::c_attn_weight), gpt2_tensor_id(l, block_tensor::attn_c_proj_weight),
          gpt2_tensor_id(l, block_tensor::c_fc_weight), gpt2_tensor_id(l, block_tensor::mlp_c_proj_weight)};
}

}  // namespace detail

template <typename Scalar>
gpt2_checkpoint<Scalar> load_gpt2_gguf(const std::string& path) {
  const io::gguf_file f = io::gguf_file::open(path);
  const gpt2_config config = read_gpt2_gguf_config(f);
  detail::check_gpt2_gguf_tensors(f, config);  // the file holds every byte the model needs
  gpt2_checkpoint<Scalar> out{config, gpt2_weights<Scalar>(config)};
  detail::read_gpt2_gguf_tensors(f, out.weights);
  return out;
}

template <typename Scalar>
gpt2_gguf_quantized<Scalar> load_gpt2_gguf_quantized(const std::string& path) {
  const io::gguf_file f = io::gguf_file::open(path);
  const gpt2_config config = read_gpt2_gguf_config(f);
  detail::check_gpt2_gguf_tensors(f, config);  // every tensor present, shaped and of a type we compute with
  std::vector<bool> released(static_cast<std::size_t>(gpt2_tensor_specs(config).size()), false);
  for (index l = 0; l < config.n_layer; ++l)
    for (const index id : detail::gpt2_projection_ids(l)) released[static_cast<std::size_t>(id)] = true;
  gpt2_gguf_quantized<Scalar> out{config, gpt2_weights<Scalar>(config, released), {}};
  detail::read_gpt2_gguf_tensors(f, out.weights);
  out.projections.reserve(static_cast<std::size_t>(4 * config.n_layer));
  for (index l = 0; l < config.n_layer; ++l) {
    for (const index id : detail::gpt2_projection_ids(l)) {
      const std::string name = gpt2_gguf_tensor_name(config, id).first;
      const gpt2_tensor_spec& s = out.weights.spec(id);  // HF [in, out]; the file's ne [in, out]: W out x in
      const io::tensor_bytes raw = f.raw(name);
      LORA_ASSERT(raw.size() == io::ggml_row_bytes(f.info(name).type, static_cast<std::uint64_t>(s.rows)) *
                                    static_cast<std::uint64_t>(s.cols));
      out.projections.push_back(quant::quantized_matrix::from_ggml(f.info(name).type, s.cols, s.rows, raw.data()));
    }
  }
  return out;
}

inline gguf_vocab read_gguf_vocab(const io::gguf_file& f) {
  if (f.get_string("tokenizer.ggml.model") != "gpt2")
    throw format_error(lora::detail::cat("GGUF file '", f.path(), "': tokenizer.ggml.model is \"",
                                         f.get_string("tokenizer.ggml.model"), "\", expected \"gpt2\""));
  gguf_vocab v;
  v.tokens = f.get_strings("tokenizer.ggml.tokens");
  if (f.has("tokenizer.ggml.merges")) v.merges = f.get_strings("tokenizer.ggml.merges");
  v.bpe = !v.merges.empty();
  const auto eot = std::find(v.tokens.begin(), v.tokens.end(), "<|endoftext|>");
  if (eot == v.tokens.end())
    throw format_error(lora::detail::cat("GGUF file '", f.path(), "': the vocabulary has no <|endoftext|> token"));
  v.eot = static_cast<std::int32_t>(eot - v.tokens.begin());
  return v;
}

namespace detail {

/// vocab.json and merges.txt texts of a BPE vocabulary; format_error for a token that is not UTF-8 or
/// appears twice (vocab.json maps each token to one id).
inline std::pair<std::string, std::string> bpe_files_text(const gguf_vocab& vocab) {
  nlohmann::ordered_json json = nlohmann::ordered_json::object();
  for (std::size_t id = 0; id < vocab.tokens.size(); ++id) {
    if (json.contains(vocab.tokens[id]))
      throw format_error(
          lora::detail::cat("GGUF vocabulary: token ", id, " (", json_quoted(vocab.tokens[id]), ") appears twice"));
    json[vocab.tokens[id]] = id;
  }
  std::string merges = "#version: 0.2\n";
  for (const std::string& m : vocab.merges) merges += m + "\n";
  try {
    return {json.dump(), merges};
  } catch (const nlohmann::json::exception& e) {  // a token that is not UTF-8
    throw format_error(lora::detail::cat("GGUF vocabulary: a token cannot be written to vocab.json: ", e.what()));
  }
}

}  // namespace detail

inline void save_gguf_vocab(const std::string& dir, const gguf_vocab& vocab) {
  if (!vocab.bpe) return;
  const auto [json, merges] = detail::bpe_files_text(vocab);
  std::filesystem::create_directories(dir);
  io::write_file_atomically(std::filesystem::path(dir) / "vocab.json", json);
  io::write_file_atomically(std::filesystem::path(dir) / "merges.txt", merges);
}

inline void convert_gguf_to_gpt2(const std::string& gguf_path, const std::string& hf_dir) {
  const gguf_vocab vocab = read_gguf_vocab(io::gguf_file::open(gguf_path));
  if (vocab.bpe) (void)detail::bpe_files_text(vocab);  // every check before anything is written
  const gpt2_checkpoint<float> model = load_gpt2_gguf<float>(gguf_path);
  if (!vocab.bpe && model.config.vocab_size != byte_tokenizer::vocab_size())
    throw format_error(lora::detail::cat("GGUF file '", gguf_path, "' has no merges and ", model.config.vocab_size,
                                         " tokens: neither GPT-2's BPE nor the byte vocabulary of ",
                                         byte_tokenizer::vocab_size()));
  save_gpt2(hf_dir, model.weights);
  save_gguf_vocab(hf_dir, vocab);
  (void)tokenizer::from_folder(hf_dir, model.config.vocab_size);  // the folder must load as it will be used
}

inline std::vector<io::gguf_lora_module> gpt2_peft_to_gguf_modules(const io::peft_adapter& adapter,
                                                                   const gpt2_config& config) {
  const io::peft_config& pc = adapter.config;
  auto refuse = [](const std::string& what) {
    throw config_error("cannot express in llama.cpp's LoRA format: " + what);
  };
  if (pc.use_dora)
    refuse(
        "the adapter uses DoRA, and llama.cpp has no magnitude vectors; merge it into the base instead "
        "(lora-merge, then lora-gguf model)");
  if (!adapter.full_tensors.empty())
    refuse(lora::detail::cat("the adapter saves whole tensors (modules_to_save or biases), e.g. '",
                             adapter.full_tensors.front().path, "'; llama.cpp adapters hold LoRA factors only"));
  std::vector<io::gguf_lora_module> out;
  for (const io::peft_module& m : adapter.modules) {
    if (m.embedding) refuse(lora::detail::cat("module '", m.path, "' is an embedding LoRA"));
    if (m.b_bias.size() != 0 || m.magnitude.size() != 0 || !m.a_shape.empty())
      refuse(lora::detail::cat("module '", m.path, "' has a lora_B bias, a DoRA magnitude or conv factors"));
    const auto name = gpt2_gguf_name_of_module(m.path);
    if (!name)
      refuse(lora::detail::cat("module '", m.path,
                               "' is not one of GPT-2's projections (attn.c_attn, attn.c_proj, "
                               "mlp.c_fc, mlp.c_proj)"));
    const index layer = detail::split_layer(name->substr(4))->first;
    const index d = config.n_embd;
    const bool up = name->find("attn_qkv") != std::string::npos || name->find("ffn_up") != std::string::npos;
    const index in = name->find("ffn_down") != std::string::npos ? 4 * d : d;
    const index outf = !up ? d : (name->find("attn_qkv") != std::string::npos ? 3 * d : 4 * d);
    if (layer >= config.n_layer || m.in_features() != in || m.out_features() != outf)
      throw shape_error(lora::detail::cat("module '", m.path, "': A is ",
                                          lora::detail::shape_str(m.a.rows(), m.a.cols()), " and B ",
                                          lora::detail::shape_str(m.b.rows(), m.b.cols()), ", the base (",
                                          config.n_layer, " layers, d ", d, ") needs in ", in, " and out ", outf));
    out.push_back({*name, m.a, m.b, pc.scaling_for(m.path)});
  }
  if (out.empty()) refuse("the adapter has no LoRA modules");
  return out;
}

namespace detail {

/// The value that occurs most often (the first on ties).
template <typename T>
T most_common(const std::vector<T>& values) {
  T best = values.front();
  std::size_t most = 0;
  for (const T& v : values) {
    const auto n = static_cast<std::size_t>(std::count(values.begin(), values.end(), v));
    if (n > most) std::tie(best, most) = std::make_pair(v, n);
  }
  return best;
}

}  // namespace detail

inline io::peft_adapter gpt2_gguf_lora_to_peft(const io::gguf_lora_adapter& adapter, const std::string& base_name) {
  if (adapter.architecture != "gpt2")
    throw format_error(lora::detail::cat("the GGUF adapter is for \"", adapter.architecture, "\", expected \"gpt2\""));
  if (adapter.modules.empty()) throw format_error("the GGUF adapter has no LoRA tensors");
  io::peft_adapter out;
  std::vector<index> ranks;
  std::vector<double> alphas;
  std::vector<std::string> targets;
  for (const io::gguf_lora_module& m : adapter.modules) {
    const auto path = gpt2_module_of_gguf_name(m.base);
    if (!path)
      throw format_error(lora::detail::cat("GGUF adapter tensor '", m.base,
                                           "' is not one of GPT-2's projections "
                                           "(attn_qkv, attn_output, ffn_up, ffn_down)"));
    io::peft_module pm;
    pm.path = *path;
    pm.a = m.a;
    pm.b = m.b;
    out.modules.push_back(std::move(pm));
    ranks.push_back(m.rank());
    // llama.cpp's s = alpha / r (alpha 0: s = 1, i.e. alpha = r); PEFT's s = lora_alpha / r.
    alphas.push_back(adapter.alpha != 0.0 ? adapter.alpha : static_cast<double>(m.rank()));
    const std::string t = path->substr(path->find('.', 14) + 1);  // "attn.c_attn" ...
    if (std::find(targets.begin(), targets.end(), t) == targets.end()) targets.push_back(t);
  }
  io::peft_config& c = out.config;
  c.r = detail::most_common(ranks);
  c.lora_alpha = detail::most_common(alphas);
  for (std::size_t k = 0; k < out.modules.size(); ++k) {
    if (ranks[k] != c.r) c.rank_pattern.push_back({out.modules[k].path, ranks[k]});
    if (alphas[k] != c.lora_alpha) c.alpha_pattern.push_back({out.modules[k].path, alphas[k]});
  }
  std::sort(targets.begin(), targets.end());
  c.target_modules = targets;
  c.fan_in_fan_out = true;
  c.task_type = "CAUSAL_LM";
  if (!base_name.empty()) c.base_model_name_or_path = base_name;
  std::sort(out.modules.begin(), out.modules.end(), [](const auto& a, const auto& b) { return a.path < b.path; });
  out.validate();
  return out;
}

}  // namespace lora::models
