// lora/io/merge.hpp: PEFT's merge_and_unload applied to a checkpoint on disk: a base model in
// safetensors plus a PEFT LoRA adapter give a new safetensors file with the adapter folded in.
//
// For a module with effective scaling s (peft_config::scaling_for, times merge_options::scale):
//   linear, W stored out x in:                 W <- W + s B A
//   linear, fan_in_fan_out (W stored in x out): W <- W + s (B A)ᵀ  = W + s Aᵀ Bᵀ
//   embedding (W stored num_embeddings x dim):  W <- W + s (B A)ᵀ
//   DoRA (lora_magnitude_vector m, length out): W <- m ⊙ V / ‖V‖ with V = W + s B A, one L2 norm per
//     output row of the out x in matrix (per column of a stored in x out matrix), as PEFT's merge does
//   lora_B.bias:                               bias <- bias + s · lora_B.bias (PEFT's lora_bias merge)
//   whole tensors (modules_to_save ...):       the base tensor is replaced
// Every other tensor, and the "__metadata__" map, is copied through unchanged.
//
// Names: an adapter module "<path>" merges into the base tensor "<p>.weight" where <p> and <path> are
// the same dotted path up to a leading prefix (one is a whole dotted suffix of the other), e.g.
// "transformer.h.0.attn.c_attn" -> "h.0.attn.c_attn.weight", "model.model.layers.0.mlp.up_proj" ->
// "model.layers.0.mlp.up_proj.weight"; the candidate sharing the most trailing components wins, a tie
// is refused as ambiguous, and a module with no candidate is an error (detail::suffix_index).
//
// Arithmetic is in double (every f16/bf16/f32 value is exact in double), rounded once to the output
// dtype. That rounding is the merge's only error: the report gives, for every merged tensor, E = stored −
// W* (W* the exact merged value in double, stored what the written bytes decode to) as a
// quant::requant_error, with the output change X Eᵀ on a fixed probe batch for weights (in the module's
// out x in orientation, whatever the stored one) and the weight figures alone for lora_B biases.
//
// The output is written tensor by tensor through safetensors_stream_writer into a temporary renamed over
// the target, so peak memory stays near the largest merged tensor (held in double, twice: exact and as
// stored, for the report) while the base is memory-mapped, and a failure leaves no partial file.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../quant/requant_error.hpp"
#include "module_match.hpp"
#include "peft_config.hpp"
#include "peft_file.hpp"
#include "safetensors.hpp"

namespace lora::io {

struct merge_options {
  /// Multiplies every module's scaling (1 = PEFT's merge_and_unload).
  double scale = 1.0;
  /// Output dtype of every floating-point tensor (F16, BF16, F32 or F64); nullopt keeps each base
  /// tensor's dtype, so untouched tensors are copied byte for byte. Integer and boolean tensors are
  /// always copied unchanged.
  std::optional<dtype> out_dtype;
  /// Refuse (numeric_error naming the module) a merge that turns finite base values non-finite, as
  /// PEFT's safe_merge does.
  bool safe = true;
  /// Rows of the probe batch on which each merged weight's output error is measured (0: weights only).
  index probe_rows = 64;
  /// Called after each output tensor with (tensors done, total, tensor name).
  std::function<void(std::size_t, std::size_t, const std::string&)> progress;
};

/// What a merge did.
struct merge_report {
  /// (adapter module path, base tensor name) for every merged module; bias targets are "<p>.bias".
  std::vector<std::pair<std::string, std::string>> merged;
  /// Dtype each merged tensor was written in, and stored − exact merged value (both in the order of merged).
  std::vector<dtype> stored_as;
  std::vector<quant::requant_error> errors;
  quant::requant_error worst;   ///< every error absorbed: the worst tensor's figure each
  quant::requant_error pooled;  ///< every error pooled: all merged tensors as one
  /// (adapter tensor path, base tensor name) for every replaced tensor.
  std::vector<std::pair<std::string, std::string>> replaced;
  std::size_t copied = 0;     ///< untouched tensors copied byte for byte
  std::size_t converted = 0;  ///< untouched tensors converted to out_dtype
  std::size_t tensors = 0;    ///< tensors written
};

/// How each adapter item maps onto the base checkpoint, checked completely (names, shapes, dtypes)
/// before anything is written.
struct merge_plan {
  struct module_target {
    std::size_t module;    ///< index into peft_adapter_file::modules()
    std::string weight;    ///< base tensor name
    std::string bias;      ///< base bias tensor (lora_B.bias only), else empty
    double scaling = 1.0;  ///< effective s, merge_options::scale included
  };
  struct replacement {
    std::string key;   ///< adapter tensor name
    std::string base;  ///< base tensor name
  };
  std::vector<module_target> modules;
  std::vector<replacement> replacements;
};

/// Matches the adapter against the base and checks every pair: name_error for a missing or ambiguous
/// match (naming the module) or a base tensor claimed twice, shape_error for a base tensor whose shape
/// disagrees with the adapter (expected and actual), dtype_error for a base tensor that is not F16,
/// BF16, F32 or F64, config_error for what cannot be merged (DoRA on an embedding).
merge_plan plan_merge(const safetensors_file& base, const peft_adapter_file& adapter,
                      const merge_options& options = {});

/// Merges `adapter` into `base` and writes `out_path` atomically. Throws as plan_merge does before
/// writing, numeric_error (safe) naming the module, io_error if the output cannot be written.
merge_report merge_checkpoint(const safetensors_file& base, const peft_adapter_file& adapter,
                              const std::string& out_path, const merge_options& options = {});
/// Same, opening the files: the base checkpoint and the adapter directory.
merge_report merge_checkpoint(const std::string& base_path, const std::string& adapter_dir, const std::string& out_path,
                              const merge_options& options = {});

namespace detail {

/// The merged weight in its stored orientation: W (out x in), or Wᵀ when `transposed` (fan_in_fan_out,
/// embeddings). `w` holds the base weight on entry. DoRA when `magnitude` is non-empty.
void merge_weight(matrix<double>& w, const peft_module& m, double s, bool transposed);
/// Output dtype of a base tensor of dtype `type`.
dtype merged_dtype(dtype type, const merge_options& options) noexcept;

/// plan_merge's state: the base checkpoint's names as match candidates, and which base tensor each
/// adapter item has claimed.
class merge_planner {
 public:
  merge_planner(const safetensors_file& base, const peft_adapter_file& adapter, const merge_options& options);
  /// Where adapter module k merges, checked (name, shape, dtype; its bias too).
  merge_plan::module_target plan_module(std::size_t k);
  /// Which base tensor a whole adapter tensor replaces, checked.
  merge_plan::replacement plan_replacement(const tensor_info& t);

 private:
  void claim(const std::string& tensor, const std::string& item);
  void require_float(const tensor_info& t, const std::string& what) const;
  std::string plan_bias(const peft_module_info& m, const std::string& module_path, const std::string& what);

  const safetensors_file& m_base;
  const peft_adapter_file& m_adapter;
  const merge_options& m_options;
  std::vector<std::string> m_weight_modules;  ///< "<p>" of every base tensor "<p>.weight"
  std::vector<std::string> m_all_names;       ///< every base tensor name
  suffix_index m_by_module;
  suffix_index m_by_name;
  std::map<std::string, std::string> m_claimed;  ///< base tensor -> adapter item
};

/// merge_checkpoint's output side: writes each base tensor merged, replaced, copied or converted.
class merge_writer {
 public:
  merge_writer(const safetensors_file& base, const peft_adapter_file& adapter, const merge_plan& plan,
               const merge_options& options, const std::string& out_path);
  /// Writes base tensor `t` in the output, as the plan says.
  void write(const tensor_info& t);
  /// Makes the output durable and replaces out_path.
  merge_report commit();

 private:
  void write_weight(const tensor_info& t, const merge_plan::module_target& target);
  void write_bias(const tensor_info& t, const merge_plan::module_target& target);
  void write_replacement(const tensor_info& t, const merge_plan::replacement& r, dtype to);
  void write_base(const tensor_info& t, dtype to);
  // Writes `values` (rows x cols, row-major as `t`'s entries) in `t`'s output dtype and returns what the
  // written bytes decode to (rows x cols).
  matrix<double> write_exact(const tensor_info& t, const Eigen::Ref<const matrix<double>>& values);
  // Records a merged entry and its rounding error.
  void record(const std::string& module, const tensor_info& t, const quant::requant_error& e);
  // Converts stored bytes of dtype `from` to dtype `to` in bounded chunks (no double copy of the tensor).
  void write_converted(const std::string& name, const unsigned char* data, std::size_t size, dtype from, dtype to);
  void check_finite(bool before_finite, const Eigen::Ref<const matrix<double>>& after, const std::string& what) const;
  static std::vector<tensor_spec> output_layout(const safetensors_file& base, const merge_options& options);

  const safetensors_file& m_base;
  const peft_adapter_file& m_adapter;
  const merge_options& m_options;
  std::map<std::string, const merge_plan::module_target*> m_by_weight, m_by_bias;
  std::map<std::string, const merge_plan::replacement*> m_by_replaced;
  safetensors_stream_writer m_out;
  merge_report m_report;
};

}  // namespace detail

// ===================================================================================================
// Implementation
// ===================================================================================================

namespace detail {

inline dtype merged_dtype(dtype type, const merge_options& options) noexcept {
  return options.out_dtype && is_float_dtype(type) ? *options.out_dtype : type;
}

inline void merge_weight(matrix<double>& w, const peft_module& m, double s, bool transposed) {
  if (transposed) {
    w.noalias() += (s * m.a.transpose()) * m.b.transpose();  // in x out += (in x r)(r x out)
  } else {
    w.noalias() += (s * m.b) * m.a;  // out x in += (out x r)(r x in)
  }
  if (m.magnitude.size() == 0) return;
  // DoRA: scale each output row (stored column when transposed) of V = W + s B A to length m_i.
  if (transposed) {
    for (index j = 0; j < w.cols(); ++j) w.col(j) *= m.magnitude(j) / w.col(j).norm();
  } else {
    const vector<double> norms = w.rowwise().norm();
    for (index i = 0; i < w.rows(); ++i) w.row(i) *= m.magnitude(i) / norms(i);
  }
}

/// "<p>" of every base tensor named "<p>.weight".
inline std::vector<std::string> weight_module_paths(const safetensors_file& base) {
  std::vector<std::string> paths;
  constexpr std::string_view suffix = ".weight";
  for (const tensor_info& t : base.tensors()) {
    if (t.name.size() > suffix.size() && t.name.compare(t.name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      paths.push_back(t.name.substr(0, t.name.size() - suffix.size()));
    }
  }
  return paths;
}

inline std::vector<std::string> tensor_names(const safetensors_file& file) {
  std::vector<std::string> names;
  for (const tensor_info& t : file.tensors()) names.push_back(t.name);
  return names;
}

inline merge_planner::merge_planner(const safetensors_file& base, const peft_adapter_file& adapter,
                                    const merge_options& options)
    : m_base(base),
      m_adapter(adapter),
      m_options(options),
      m_weight_modules(weight_module_paths(base)),
      m_all_names(tensor_names(base)),
      m_by_module(m_weight_modules),
      m_by_name(m_all_names) {}

inline void merge_planner::claim(const std::string& tensor, const std::string& item) {
  const auto [it, fresh] = m_claimed.emplace(tensor, item);
  if (!fresh) {
    throw name_error(cat("merge: base tensor '", tensor, "' is targeted by both ", it->second, " and ", item));
  }
}

inline void merge_planner::require_float(const tensor_info& t, const std::string& what) const {
  if (!is_float_dtype(t.type)) {
    throw dtype_error(cat("merge: ", what, ": base tensor '", t.name, "' is ", dtype_name(t.type),
                          "; only F16, BF16, F32 and F64 weights can be merged into"));
  }
}

inline merge_plan::module_target merge_planner::plan_module(std::size_t k) {
  const peft_module_info& m = m_adapter.modules()[k];
  const peft_config& config = m_adapter.config();
  const std::string what = cat("adapter module '", m.path, "'");
  const std::ptrdiff_t found = m_by_module.find(m.path, what);
  if (found < 0) {
    throw name_error(cat("merge: ", what, " matches no '<module>.weight' tensor of the base checkpoint '",
                         m_base.path(), "' (", m_base.tensors().size(), " tensors, e.g. ", list_names(m_all_names, 3),
                         ")"));
  }
  const std::string& module_path = m_weight_modules[static_cast<std::size_t>(found)];
  merge_plan::module_target target;
  target.module = k;
  target.weight = module_path + ".weight";
  target.scaling = m_options.scale * config.scaling_for(m.path);
  const tensor_info& w = m_base.info(target.weight);
  require_float(w, what);
  // Stored shape: [out, in], or [in, out] with fan_in_fan_out; an embedding is [num_embeddings, dim].
  const bool transposed = m.embedding || config.fan_in_fan_out;
  const std::vector<std::int64_t> expected =
      transposed ? std::vector<std::int64_t>{m.in, m.out} : std::vector<std::int64_t>{m.out, m.in};
  if (w.shape != expected) {
    throw shape_error(cat("merge: ", what, " (", m.embedding ? "embedding" : "linear", ", in = ", m.in,
                          ", out = ", m.out, config.fan_in_fan_out && !m.embedding ? ", fan_in_fan_out" : "",
                          ") needs base tensor '", target.weight, "' to be ", shape_to_string(expected), ", got ",
                          shape_to_string(w.shape)));
  }
  if (!m.magnitude_key.empty() && m.embedding) {
    throw config_error(cat("merge: ", what, ": DoRA on an embedding cannot be merged by this tool"));
  }
  claim(target.weight, what);
  if (!m.bias_key.empty()) target.bias = plan_bias(m, module_path, what);
  return target;
}

inline std::string merge_planner::plan_bias(const peft_module_info& m, const std::string& module_path,
                                            const std::string& what) {
  const std::string bias = module_path + ".bias";
  if (!m_base.contains(bias)) {
    throw name_error(cat("merge: ", what, " has lora_B.bias but the base has no '", bias,
                         "' to add it to (PEFT cannot merge it either)"));
  }
  const tensor_info& b = m_base.info(bias);
  require_float(b, what);
  if (b.numel() != m.out || b.rank() != 1) {
    throw shape_error(
        cat("merge: ", what, ": base bias '", bias, "' must be [", m.out, "], got ", shape_to_string(b.shape)));
  }
  claim(bias, what + " (lora_B.bias)");
  return bias;
}

inline merge_plan::replacement merge_planner::plan_replacement(const tensor_info& t) {
  const std::string path = t.name.substr(peft_key_prefix.size());
  const std::string what = cat("adapter tensor '", path, "'");
  const std::ptrdiff_t found = m_by_name.find(path, what);
  if (found < 0) {
    throw name_error(cat("merge: ", what,
                         " (modules_to_save or a saved bias) matches no tensor of the base checkpoint '", m_base.path(),
                         "'"));
  }
  const tensor_info& b = m_base.info(m_all_names[static_cast<std::size_t>(found)]);
  if (b.shape != t.shape) {
    throw shape_error(cat("merge: ", what, " is ", shape_to_string(t.shape), " but base tensor '", b.name, "' is ",
                          shape_to_string(b.shape)));
  }
  if (t.type != b.type && !(is_float_dtype(t.type) && is_float_dtype(b.type))) {
    throw dtype_error(cat("merge: ", what, " is ", dtype_name(t.type), " but base tensor '", b.name, "' is ",
                          dtype_name(b.type), "; only floating-point tensors are converted"));
  }
  claim(b.name, what);
  return merge_plan::replacement{t.name, b.name};
}

inline std::vector<tensor_spec> merge_writer::output_layout(const safetensors_file& base,
                                                            const merge_options& options) {
  // Same names, shapes and order as the base; floating-point dtypes as asked.
  std::vector<tensor_spec> layout;
  for (const tensor_info& t : base.tensors())
    layout.push_back(tensor_spec{t.name, merged_dtype(t.type, options), t.shape});
  return layout;
}

inline merge_writer::merge_writer(const safetensors_file& base, const peft_adapter_file& adapter,
                                  const merge_plan& plan, const merge_options& options, const std::string& out_path)
    : m_base(base),
      m_adapter(adapter),
      m_options(options),
      m_out(out_path, output_layout(base, options), base.metadata()) {
  for (const auto& m : plan.modules) {
    m_by_weight.emplace(m.weight, &m);
    if (!m.bias.empty()) m_by_bias.emplace(m.bias, &m);
  }
  for (const auto& r : plan.replacements) m_by_replaced.emplace(r.base, &r);
}

inline void merge_writer::write(const tensor_info& t) {
  const dtype to = merged_dtype(t.type, m_options);
  if (const auto it = m_by_weight.find(t.name); it != m_by_weight.end()) {
    write_weight(t, *it->second);
  } else if (const auto ib = m_by_bias.find(t.name); ib != m_by_bias.end()) {
    write_bias(t, *ib->second);
  } else if (const auto ir = m_by_replaced.find(t.name); ir != m_by_replaced.end()) {
    write_replacement(t, *ir->second, to);
  } else {
    write_base(t, to);
  }
  ++m_report.tensors;
  if (m_options.progress) m_options.progress(m_report.tensors, m_base.tensors().size(), t.name);
}

inline merge_report merge_writer::commit() {
  m_out.commit();
  return m_report;
}

inline void merge_writer::write_weight(const tensor_info& t, const merge_plan::module_target& target) {
  const peft_module_info& info = m_adapter.modules()[target.module];
  const peft_module m = m_adapter.read_module(info);
  matrix<double> w = m_base.read_matrix<double>(t.name);
  const bool finite = w.allFinite();
  const bool transposed = info.embedding || m_adapter.config().fan_in_fan_out;
  merge_weight(w, m, target.scaling, transposed);
  check_finite(finite, w, cat("adapter module '", info.path, "'"));
  const matrix<double> stored = write_exact(t, w);
  // Measured out x in: the stored matrix is in x out when transposed.
  record(info.path, t,
         transposed ? quant::measure_requant_error(w.transpose(), stored.transpose(), m_options.probe_rows)
                    : quant::measure_requant_error(w, stored, m_options.probe_rows));
}

inline void merge_writer::write_bias(const tensor_info& t, const merge_plan::module_target& target) {
  const peft_module_info& info = m_adapter.modules()[target.module];
  vector<double> bias = m_base.read_vector<double>(t.name);
  const bool finite = bias.allFinite();
  bias += target.scaling * m_adapter.tensors().read_vector<double>(info.bias_key);
  check_finite(finite, bias, cat("adapter module '", info.path, "' (lora_B.bias)"));
  const matrix<double> stored = write_exact(t, bias.transpose());  // 1 x out
  record(info.path, t, quant::measure_requant_error(bias.transpose(), stored, 0));
}

inline void merge_writer::write_replacement(const tensor_info& t, const merge_plan::replacement& r, dtype to) {
  const tensor_info& source = m_adapter.tensors().info(r.key);
  const tensor_bytes bytes = m_adapter.tensors().raw(source.name);
  if (source.type == to) {
    m_out.write_raw(t.name, bytes.data(), bytes.size());
  } else {
    write_converted(t.name, bytes.data(), bytes.size(), source.type, to);
  }
  m_report.replaced.emplace_back(source.name.substr(peft_key_prefix.size()), t.name);
}

inline void merge_writer::write_base(const tensor_info& t, dtype to) {
  const tensor_bytes bytes = m_base.raw(t.name);
  if (to == t.type) {
    if (bytes.size() != 0) m_out.write_raw(t.name, bytes.data(), bytes.size());
    ++m_report.copied;
  } else {
    if (bytes.size() != 0) write_converted(t.name, bytes.data(), bytes.size(), t.type, to);
    ++m_report.converted;
  }
}

inline matrix<double> merge_writer::write_exact(const tensor_info& t, const Eigen::Ref<const matrix<double>>& values) {
  using row_major = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const dtype to = merged_dtype(t.type, m_options);
  std::vector<unsigned char> bytes;
  bytes.reserve(static_cast<std::size_t>(values.size()) * dtype_size(to));
  encode_row_major(values, to, [&](const unsigned char* p, std::size_t n) { bytes.insert(bytes.end(), p, p + n); });
  m_out.write_raw(t.name, bytes.data(), bytes.size());
  row_major stored(values.rows(), values.cols());
  decode<double>(to, bytes.data(), static_cast<std::size_t>(stored.size()), stored.data());
  return stored;
}

inline void merge_writer::record(const std::string& module, const tensor_info& t, const quant::requant_error& e) {
  m_report.merged.emplace_back(module, t.name);
  m_report.stored_as.push_back(merged_dtype(t.type, m_options));
  m_report.errors.push_back(e);
  m_report.worst.absorb(e);
  m_report.pooled.pool(e);
}

inline void merge_writer::write_converted(const std::string& name, const unsigned char* data, std::size_t size,
                                          dtype from, dtype to) {
  const std::size_t in_width = dtype_size(from), out_width = dtype_size(to);
  const std::size_t count = size / in_width;
  std::vector<unsigned char> bytes(count * out_width);
  std::vector<double> buffer;
  const std::size_t step = chunk_bytes / sizeof(double);
  for (std::size_t done = 0; done < count; done += step) {
    const std::size_t n = std::min(step, count - done);
    buffer.resize(n);
    decode<double>(from, data + done * in_width, n, buffer.data());
    encode<double>(to, buffer.data(), n, bytes.data() + done * out_width);
  }
  m_out.write_raw(name, bytes.data(), bytes.size());
}

inline void merge_writer::check_finite(bool before_finite, const Eigen::Ref<const matrix<double>>& after,
                                       const std::string& what) const {
  if (m_options.safe && before_finite && !after.allFinite()) {
    throw numeric_error(
        cat("merge: ", what, " would put non-finite values in a finite base tensor; nothing was written"));
  }
}

}  // namespace detail

inline merge_plan plan_merge(const safetensors_file& base, const peft_adapter_file& adapter,
                             const merge_options& options) {
  if (options.out_dtype && !detail::is_float_dtype(*options.out_dtype)) {
    throw dtype_error(
        detail::cat("merge: the output dtype must be F16, BF16, F32 or F64, got ", dtype_name(*options.out_dtype)));
  }
  if (!std::isfinite(options.scale)) {
    throw config_error(detail::cat("merge: scale must be finite, got ", options.scale));
  }
  detail::merge_planner planner(base, adapter, options);
  merge_plan plan;
  for (std::size_t k = 0; k < adapter.modules().size(); ++k) plan.modules.push_back(planner.plan_module(k));
  for (const tensor_info& t : adapter.full_tensors()) plan.replacements.push_back(planner.plan_replacement(t));
  return plan;
}

inline merge_report merge_checkpoint(const safetensors_file& base, const peft_adapter_file& adapter,
                                     const std::string& out_path, const merge_options& options) {
  const merge_plan plan = plan_merge(base, adapter, options);
  detail::merge_writer out(base, adapter, plan, options, out_path);
  for (const tensor_info& t : base.tensors()) out.write(t);
  return out.commit();
}

inline merge_report merge_checkpoint(const std::string& base_path, const std::string& adapter_dir,
                                     const std::string& out_path, const merge_options& options) {
  const peft_adapter_file adapter = peft_adapter_file::open(adapter_dir);
  const safetensors_file base = safetensors_file::open(base_path);
  return merge_checkpoint(base, adapter, out_path, options);
}

}  // namespace lora::io
