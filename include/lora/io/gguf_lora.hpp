// lora/io/gguf_lora.hpp: LoRA adapters in llama.cpp's GGUF form, for any architecture, and merging them
// into a GGUF base (docs/CONVENTIONS.md §gguf):
//
//   metadata   general.type = "adapter", general.architecture = the base's, adapter.type = "lora",
//              adapter.lora.alpha FLOAT32
//   tensors    "<base tensor>.lora_a" with ne [in, r]  (= PEFT's lora_A.weight, r x in, as stored)
//              "<base tensor>.lora_b" with ne [r, out] (= PEFT's lora_B.weight, out x r, as stored)
//
// llama.cpp computes y = W x + s (B (A x)) with s = scale * alpha / r, r = lora_b's ne[0] per tensor, and
// s = scale when alpha is 0. One alpha serves every tensor, so a per-module scaling that alpha / r cannot
// express (rsLoRA with mixed ranks, rank or alpha patterns) is folded into lora_b when writing: B' = f B
// with f = s_module r / alpha. LoRA on token_embd (stored transposed by llama.cpp) is not read or written
// here; LoRA tensors on *_norm.weight, which llama.cpp ignores, are ignored on reading and reported.
//
// Reading checks each pair (both present, 2-D, ranks agree, matching a base tensor with ne [in, out] when
// a base is given); every violation is a format_error naming the file and tensor. Merging writes a new
// GGUF file: the base's metadata and tensors, the adapted ones re-encoded (their own type, or one chosen).
// A merged tensor stored in fewer bits than the exact W* = W + Σ s B A cannot be exact: the merge decodes
// the bytes it wrote and reports, per tensor and overall, E = stored − W* as quant::requant_error (the
// weight's change and the change X Eᵀ of the layer's output on a fixed probe batch). The base's own
// quantization error is not part of it: W is taken as the base stores it.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "../quant/requant_error.hpp"
#include "gguf_reader.hpp"
#include "gguf_writer.hpp"
#include "tensor_info.hpp"

namespace lora::io {

/// One adapted tensor: ΔW = scaling · B A, W being the base tensor `base` (out x in in PyTorch terms).
struct gguf_lora_module {
  std::string base;  ///< base tensor name, e.g. "blk.0.attn_qkv.weight"
  matrix<double> a;  ///< r x in
  matrix<double> b;  ///< out x r
  double scaling = 1.0;
  index rank() const noexcept { return a.rows(); }
};

/// A LoRA adapter as llama.cpp reads it.
struct gguf_lora_adapter {
  std::string architecture;               ///< general.architecture of the adapter (and of its base)
  double alpha = 0.0;                     ///< adapter.lora.alpha (0: s = 1 for every tensor)
  std::vector<gguf_lora_module> modules;  ///< in file order; scaling = alpha / r, or 1 when alpha is 0
  std::vector<std::string> ignored;       ///< LoRA tensors llama.cpp ignores (on *_norm.weight)
};

/// Reads a LoRA adapter GGUF. With `base`, every module must name a 2-D tensor of the base whose ne is
/// [in, out] and the architectures must agree (format_error naming both files otherwise).
gguf_lora_adapter read_gguf_lora(const gguf_file& file, const gguf_file* base = nullptr);

/// What write_gguf_lora did.
struct gguf_lora_write_report {
  double alpha = 0.0;               ///< adapter.lora.alpha written
  std::vector<std::string> folded;  ///< modules whose scaling was folded into lora_b
  std::size_t tensors = 0;
};

/// Writes `modules` as a llama.cpp LoRA adapter for `architecture`, factors encoded as `type` (F32, F16,
/// BF16 or Q8_0; Q8_0 needs in and r multiples of 32). alpha is chosen so that most modules need no
/// folding (the most common scaling · rank); the others are folded (see above). The file is written
/// atomically. shape_error / dtype_error for factors that cannot be stored so.
gguf_lora_write_report write_gguf_lora(const std::string& path, const std::string& architecture,
                                       const std::vector<gguf_lora_module>& modules, ggml_type type = ggml_type::f32,
                                       const std::string& name = "");

/// llama.cpp's general.file_type for a model whose matrices are `type` (LLAMA_FTYPE_ALL_F32 0, MOSTLY_F16
/// 1, MOSTLY_Q4_0 2, MOSTLY_Q8_0 7, MOSTLY_BF16 32; 0 for others).
std::uint32_t llama_file_type(ggml_type type) noexcept;

struct gguf_merge_options {
  double scale = 1.0;                 ///< multiplies every module's scaling
  std::optional<ggml_type> out_type;  ///< type of the merged tensors; nullopt keeps each base tensor's
  index probe_rows = 64;              ///< rows of the probe batch for the output error (0: weights only)
  std::function<void(std::size_t, std::size_t, const std::string&)> progress;
};

struct gguf_merge_report {
  std::vector<std::string> merged;           ///< base tensors changed
  std::vector<ggml_type> stored_as;          ///< the type each merged tensor was written in (order of merged)
  std::vector<quant::requant_error> errors;  ///< stored − W* of each merged tensor (order of merged)
  quant::requant_error worst;                ///< every error absorbed: the worst tensor's figure each
  quant::requant_error pooled;               ///< every error pooled: all merged tensors as one
  std::size_t copied = 0;                    ///< tensors copied byte for byte
};

/// Writes base + Σ scaling · B A as a new GGUF file at `out` (which may be the base's path): metadata and
/// untouched tensors byte for byte, merged tensors dequantized, merged in double, re-encoded. Everything
/// is checked (names, shapes, types) before the file is written. numeric_error when a merged weight is
/// not finite. The report holds, per merged tensor, the error of its re-encoding against W* in double.
gguf_merge_report merge_gguf(const gguf_file& base, const std::vector<gguf_lora_module>& modules,
                             const std::string& out, const gguf_merge_options& options = {});

// ================================================================================================
// Implementation
// ================================================================================================

namespace detail {

inline constexpr std::string_view lora_a_suffix = ".lora_a";
inline constexpr std::string_view lora_b_suffix = ".lora_b";

inline bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// The metadata every llama.cpp adapter carries; format_error naming the file otherwise.
inline void check_lora_metadata(const gguf_file& f) {
  const std::string& type = f.get_string("general.type");
  if (type != "adapter")
    throw format_error(cat("GGUF file '", f.path(), "': general.type is \"", type, "\", expected \"adapter\""));
  const std::string& kind = f.get_string("adapter.type");
  if (kind != "lora")
    throw format_error(cat("GGUF file '", f.path(), "': adapter.type is \"", kind, "\", expected \"lora\""));
}

/// The pair (a, b) of one base tensor, checked against each other and the base.
inline gguf_lora_module read_lora_pair(const gguf_file& f, const std::string& base_name, const gguf_file* base) {
  const gguf_tensor_info& a = f.info(base_name + std::string(lora_a_suffix));
  const std::string b_name = base_name + std::string(lora_b_suffix);
  if (!f.contains(b_name))
    throw format_error(cat("GGUF file '", f.path(), "': tensor '", a.name, "' has no partner '", b_name, "'"));
  const gguf_tensor_info& b = f.info(b_name);
  if (a.ne.size() != 2 || b.ne.size() != 2 || a.ne[1] != b.ne[0] || a.ne[1] == 0)
    throw format_error(cat("GGUF file '", f.path(), "': '", a.name, "' ne ", shape_to_string(a.shape()), " and '",
                           b.name, "' ", shape_to_string(b.shape()), " are not [in, r] and [r, out] with r >= 1"));
  for (const gguf_tensor_info* t : {&a, &b}) {
    if (!ggml_is_convertible(t->type))
      throw format_error(cat("GGUF file '", f.path(), "': LoRA factor '", t->name, "' is ", ggml_type_name(t->type),
                             "; this library reads F32, F16, BF16, Q8_0 and Q4_0 factors"));
  }
  if (base != nullptr) {
    if (!base->contains(base_name))
      throw format_error(cat("GGUF file '", f.path(), "': '", a.name, "' adapts '", base_name, "', which the base '",
                             base->path(), "' does not have"));
    const gguf_tensor_info& w = base->info(base_name);
    if (w.effective_ne().size() != 2 || w.ne[0] != a.ne[0] || w.ne[1] != b.ne[1])
      throw format_error(cat("GGUF file '", f.path(), "': '", base_name, "' is ", shape_to_string(w.shape()),
                             " in the base but its LoRA factors make ", b.ne[1], " x ", a.ne[0]));
  }
  gguf_lora_module m;
  m.base = base_name;
  m.a = f.read_matrix<double>(a.name);  // ne [in, r] -> r x in
  m.b = f.read_matrix<double>(b.name);  // ne [r, out] -> out x r
  return m;
}

}  // namespace detail

inline gguf_lora_adapter read_gguf_lora(const gguf_file& f, const gguf_file* base) {
  detail::check_lora_metadata(f);
  gguf_lora_adapter out;
  out.architecture = f.get_string("general.architecture");
  if (base != nullptr && base->get_string("general.architecture") != out.architecture)
    throw format_error(detail::cat("GGUF adapter '", f.path(), "' is for architecture \"", out.architecture,
                                   "\" but the base '", base->path(), "' is \"",
                                   base->get_string("general.architecture"), "\""));
  out.alpha = f.has("adapter.lora.alpha") ? f.get<float>("adapter.lora.alpha") : 0.0;
  if (!std::isfinite(out.alpha) || out.alpha < 0.0)
    throw format_error(detail::cat("GGUF file '", f.path(), "': adapter.lora.alpha is ", out.alpha,
                                   " (expected a finite value >= 0)"));
  for (const gguf_tensor_info& t : f.tensors()) {
    const bool is_a = detail::ends_with(t.name, detail::lora_a_suffix);
    if (!is_a && !detail::ends_with(t.name, detail::lora_b_suffix))
      throw format_error(
          detail::cat("GGUF file '", f.path(), "': tensor '", t.name, "' is neither a .lora_a nor a .lora_b tensor"));
    const std::string base_name = t.name.substr(0, t.name.size() - detail::lora_a_suffix.size());
    if (detail::ends_with(base_name, "_norm.weight")) {
      out.ignored.push_back(t.name);
      continue;
    }
    if (base_name.rfind("token_embd", 0) == 0)
      throw format_error(detail::cat("GGUF file '", f.path(), "': LoRA on '", base_name,
                                     "' (token embeddings) is not supported by this library"));
    if (!is_a) {
      if (!f.contains(base_name + std::string(detail::lora_a_suffix)))
        throw format_error(detail::cat("GGUF file '", f.path(), "': tensor '", t.name, "' has no partner '", base_name,
                                       detail::lora_a_suffix, "'"));
      continue;
    }
    gguf_lora_module m = detail::read_lora_pair(f, base_name, base);
    m.scaling = out.alpha != 0.0 ? out.alpha / static_cast<double>(m.rank()) : 1.0;
    out.modules.push_back(std::move(m));
  }
  return out;
}

namespace detail {

/// The alpha that makes the most modules exact: the most common scaling · rank (ties: the first seen).
inline double choose_lora_alpha(const std::vector<gguf_lora_module>& modules) {
  std::vector<std::pair<double, int>> counts;
  for (const auto& m : modules) {
    const double a = static_cast<double>(static_cast<float>(m.scaling * static_cast<double>(m.rank())));
    auto it = std::find_if(counts.begin(), counts.end(), [&](const auto& c) { return c.first == a; });
    if (it == counts.end()) {
      counts.emplace_back(a, 1);
    } else {
      ++it->second;
    }
  }
  double best = 0.0;
  int most = 0;
  for (const auto& [a, n] : counts) {
    if (n > most) std::tie(best, most) = std::make_pair(a, n);
  }
  return best;
}

}  // namespace detail

inline gguf_lora_write_report write_gguf_lora(const std::string& path, const std::string& architecture,
                                              const std::vector<gguf_lora_module>& modules, ggml_type type,
                                              const std::string& name) {
  gguf_lora_write_report report;
  report.alpha = detail::choose_lora_alpha(modules);
  if (!(report.alpha > 0.0) || !std::isfinite(report.alpha))
    throw numeric_error(detail::cat("GGUF adapter '", path, "': the scalings give alpha = ", report.alpha,
                                    ", which llama.cpp cannot use (expected a positive finite value)"));
  gguf_writer w;
  w.set("general.architecture", gguf_value::of(architecture));
  w.set("general.type", gguf_value::of("adapter"));
  if (!name.empty()) w.set("general.name", gguf_value::of(name));
  w.set("adapter.type", gguf_value::of("lora"));
  w.set("adapter.lora.alpha", gguf_value::of(static_cast<float>(report.alpha)));
  for (const gguf_lora_module& m : modules) {
    if (m.b.cols() != m.rank())
      throw shape_error(detail::cat("LoRA module '", m.base, "': A is ", detail::shape_str(m.a.rows(), m.a.cols()),
                                    " but B is ", detail::shape_str(m.b.rows(), m.b.cols())));
    // llama.cpp scales by alpha / r with the alpha written as FLOAT32; fold whatever differs into B.
    const double applied = static_cast<double>(static_cast<float>(report.alpha)) / static_cast<double>(m.rank());
    const double fold = m.scaling / applied;
    if (std::abs(fold - 1.0) > 1e-12) report.folded.push_back(m.base);
    w.add(m.base + std::string(detail::lora_a_suffix), m.a, type);  // r x in -> ne [in, r]
    if (fold == 1.0) {
      w.add(m.base + std::string(detail::lora_b_suffix), m.b, type);  // out x r -> ne [r, out]
    } else {
      w.add(m.base + std::string(detail::lora_b_suffix), (fold * m.b).eval(), type);
    }
  }
  report.tensors = w.tensor_count();
  w.write(path);
  return report;
}

inline std::uint32_t llama_file_type(ggml_type type) noexcept {
  switch (type) {
    case ggml_type::f16:
      return 1;
    case ggml_type::q4_0:
      return 2;
    case ggml_type::q8_0:
      return 7;
    case ggml_type::bf16:
      return 32;
    default:
      return 0;
  }
}

namespace detail {

/// The merged values of base tensor `name`: W (out x in) + Σ scale · scaling · B A over its modules.
inline matrix<double> merged_weight(const gguf_file& base, const std::string& name,
                                    const std::vector<const gguf_lora_module*>& mods, double scale) {
  matrix<double> w = base.read_matrix<double>(name);
  for (const gguf_lora_module* m : mods) {
    if (m->b.rows() != w.rows() || m->a.cols() != w.cols() || m->b.cols() != m->rank())
      throw shape_error(cat("merging into '", name, "' (", shape_str(w.rows(), w.cols()), " in ", base.path(),
                            "): its LoRA factors are B ", shape_str(m->b.rows(), m->b.cols()), " and A ",
                            shape_str(m->a.rows(), m->a.cols())));
    w.noalias() += (scale * m->scaling) * m->b * m->a;
  }
  if (!w.allFinite()) throw numeric_error(cat("merging into '", name, "' gives non-finite weights"));
  return w;
}

/// `w` (out x in) encoded as `type` row by row, ne [in, out], as gguf_writer::add encodes it: each row
/// rounded to float, then quantized.
inline std::vector<unsigned char> encode_ggml_rows(const std::string& name, const matrix<double>& w, ggml_type type) {
  check_encodable(name, type, w.cols());
  const auto cols = static_cast<std::size_t>(w.cols());
  const std::size_t row_bytes = static_cast<std::size_t>(ggml_row_bytes(type, cols));
  std::vector<unsigned char> bytes(row_bytes * static_cast<std::size_t>(w.rows()));
  Eigen::Matrix<float, 1, Eigen::Dynamic> row(w.cols());
  for (index i = 0; i < w.rows(); ++i) {
    row = w.row(i).cast<float>();
    ggml_quantize_row(type, row.data(), cols, &bytes[static_cast<std::size_t>(i) * row_bytes]);
  }
  return bytes;
}

/// The out x in values that encode_ggml_rows' bytes decode to.
inline matrix<double> decode_ggml_rows(const std::vector<unsigned char>& bytes, ggml_type type, index rows,
                                       index cols) {
  const auto n = static_cast<std::size_t>(cols);
  const std::size_t row_bytes = static_cast<std::size_t>(ggml_row_bytes(type, n));
  matrix<double> out(rows, cols);
  Eigen::Matrix<float, 1, Eigen::Dynamic> row(cols);
  for (index i = 0; i < rows; ++i) {
    ggml_dequantize_row(type, &bytes[static_cast<std::size_t>(i) * row_bytes], n, row.data());
    out.row(i) = row.cast<double>();
  }
  return out;
}

/// Merges base tensor `t`, adds it to `w` encoded as `type`, and records what the encoding lost.
inline void merge_gguf_tensor(const gguf_file& base, const gguf_tensor_info& t,
                              const std::vector<const gguf_lora_module*>& mods, ggml_type type,
                              const gguf_merge_options& options, gguf_writer& w, gguf_merge_report& report) {
  const matrix<double> exact = merged_weight(base, t.name, mods, options.scale);
  const std::vector<unsigned char> bytes = encode_ggml_rows(t.name, exact, type);
  w.add_raw(t.name, type, {static_cast<std::uint64_t>(exact.cols()), static_cast<std::uint64_t>(exact.rows())},
            bytes.data(), bytes.size());
  const quant::requant_error e = quant::measure_requant_error(
      exact, decode_ggml_rows(bytes, type, exact.rows(), exact.cols()), options.probe_rows);
  report.merged.push_back(t.name);
  report.stored_as.push_back(type);
  report.errors.push_back(e);
  report.worst.absorb(e);
  report.pooled.pool(e);
}

}  // namespace detail

inline gguf_merge_report merge_gguf(const gguf_file& base, const std::vector<gguf_lora_module>& modules,
                                    const std::string& out, const gguf_merge_options& options) {
  std::map<std::string, std::vector<const gguf_lora_module*>> by_tensor;
  for (const gguf_lora_module& m : modules) {
    const gguf_tensor_info& t = base.info(m.base);  // name_error when the base lacks it
    if (t.effective_ne().size() != 2)
      throw shape_error(
          detail::cat("'", m.base, "' in ", base.path(), " is not a matrix; LoRA cannot be merged into it"));
    by_tensor[m.base].push_back(&m);
  }
  gguf_writer w;
  for (const auto& [key, value] : base.metadata()) w.set(key, value);
  // llama.cpp's general.file_type names the type most tensors have; re-encoding changes it.
  if (options.out_type && base.has("general.file_type") && base.value("general.file_type").type() == gguf_type::u32)
    w.set("general.file_type", gguf_value::of(llama_file_type(*options.out_type)));
  gguf_merge_report report;
  std::size_t done = 0;
  for (const gguf_tensor_info& t : base.tensors()) {
    const auto it = by_tensor.find(t.name);
    if (it == by_tensor.end()) {
      w.add_raw(t.name, t.type, t.ne, base.raw(t.name));  // borrowed: the base's mapping, not a copy
      ++report.copied;
    } else {
      detail::merge_gguf_tensor(base, t, it->second, options.out_type.value_or(t.type), options, w, report);
    }
    if (options.progress) options.progress(++done, base.tensors().size(), t.name);
  }
  w.write(out);
  return report;
}

}  // namespace lora::io
