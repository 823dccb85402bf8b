// lora/io/module_ref.hpp: any LoRA layer as PEFT sees one module: what kind of module it is, how one of
// its adapters is written as PEFT tensors, and how a PEFT module is checked against it and attached.
// from_layers and attach (io/peft_layers.hpp) work through it, so they take every layer kind, mixed.
//
// The forms (docs/CONVENTIONS.md §peft):
//   linear         lora_A.weight [r, in], lora_B.weight [out, r] (also fan_in_fan_out: the base weight is
//                  stored in x out, the factors are not), lora_magnitude_vector [out] for DoRA;
//   embedding      lora_embedding_A [r, num], lora_embedding_B [dim, r];
//   conv2d         lora_A.weight [r, C, kh, kw], lora_B.weight [O, r, 1, 1] (and DoRA's magnitude [O]);
//   merged_linear  PEFT's single fused linear (GPT-2's c_attn): with R = Σ_enabled r, A = [A_0; A_1; ...]
//                  (R x in) and B block-diagonal (out x R, zero rows for the frozen slices), rank R and
//                  alpha chosen so that the scaling s is unchanged. Attaching a fused module gives every
//                  enabled slice i rank R with A_i = A and B_i = B[rows of i]: exactly the same ΔW; rows of B
//                  of a frozen slice must be zero.
#pragma once

#include <cmath>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "../conv2d.hpp"
#include "../embedding.hpp"
#include "../error.hpp"
#include "../linear.hpp"
#include "../merged_linear.hpp"
#include "peft_file.hpp"

namespace lora::io {

/// A non-owning handle to one LoRA layer of any kind, built implicitly from a pointer to it.
template <typename Scalar_>
class module_ref {
 public:
  using Scalar = Scalar_;

  module_ref(linear<Scalar>* layer) : m_layer(layer) {}         // NOLINT(google-explicit-constructor)
  module_ref(embedding<Scalar>* layer) : m_layer(layer) {}      // NOLINT(google-explicit-constructor)
  module_ref(merged_linear<Scalar>* layer) : m_layer(layer) {}  // NOLINT(google-explicit-constructor)
  module_ref(conv2d<Scalar>* layer) : m_layer(layer) {}         // NOLINT(google-explicit-constructor)

  bool is_null() const {
    return std::visit([](auto* p) { return p == nullptr; }, m_layer);
  }
  /// "linear 'q'", "embedding 'wte'", ...
  std::string label() const;
  bool has_adapter(const std::string& name) const {
    return std::visit([&](auto* p) { return p->has_adapter(name); }, m_layer);
  }
  /// The config adapter `name` was made with, with rank and alpha as its PEFT module states them.
  adapter_config exported_config(const std::string& name) const;
  /// Adapter `name` as a PEFT module (path left empty).
  peft_module export_adapter(const std::string& name) const;
  /// Throws (naming `where`) unless `m` attaches to this layer as `name` with config `c`; changes nothing.
  void check(const peft_module& m, const adapter_config& c, const std::string& where, const std::string& name) const;
  /// Adds adapter `name` with the factors of `m` (checked by check() before).
  void attach(const peft_module& m, const adapter_config& c, const std::string& name) const;
  /// What attach() would add, held outside the layer: for each part that takes adapters, the part and
  /// the factors and scaling it would get (io/adapter_registry.hpp). `m` checked by check() before;
  /// config_error for a DoRA module (a routed batch cannot serve one).
  std::vector<std::pair<const linear<Scalar>*, routed_factors<Scalar>>> detach(const peft_module& m,
                                                                               const adapter_config& c,
                                                                               const std::string& where) const;
  void remove(const std::string& name) const {
    std::visit([&](auto* p) { p->remove_adapter(name); }, m_layer);
  }

 private:
  std::variant<linear<Scalar>*, embedding<Scalar>*, merged_linear<Scalar>*, conv2d<Scalar>*> m_layer;
};

namespace detail {

/// (in, out) of the factors of a layer's adapters: A is r x in, B is out x r.
template <typename S>
std::pair<index, index> factor_features(const linear<S>* p) {
  return {p->in_features(), p->out_features()};
}
template <typename S>
std::pair<index, index> factor_features(const embedding<S>* p) {
  return {p->num_embeddings(), p->embedding_dim()};
}
template <typename S>
std::pair<index, index> factor_features(const merged_linear<S>* p) {
  return {p->in_features(), p->out_features()};
}
template <typename S>
std::pair<index, index> factor_features(const conv2d<S>* p) {
  const conv2d_options& o = p->options();
  return {o.in_channels / o.groups * o.kernel.h * o.kernel.w, p->out_channels()};
}

/// Throws shape_error unless the module's A and B fit a layer of in x out features.
void check_features(const peft_module& m, index in, index out, const std::string& where);
/// The alpha that gives rank `rank` the scaling of `c` (α/r, or α/√r with rsLoRA).
double alpha_for_scaling(const adapter_config& c, index rank);

}  // namespace detail

// ---------------------------------------------------------------------------------------------------

namespace detail {

inline void check_features(const peft_module& m, index in, index out, const std::string& where) {
  if (m.in_features() != in || m.out_features() != out)
    throw shape_error(cat(where, ": the adapter is for in x out = ", shape_str(m.in_features(), m.out_features()),
                          " but the layer is ", shape_str(in, out)));
}

inline double alpha_for_scaling(const adapter_config& c, index rank) {
  const double r = static_cast<double>(rank);
  return scaling_of(c) * (c.use_rslora ? std::sqrt(r) : r);
}

}  // namespace detail

template <typename Scalar>
std::string module_ref<Scalar>::label() const {
  struct namer {
    std::string operator()(const linear<Scalar>* p) const { return "linear '" + p->name() + "'"; }
    std::string operator()(const embedding<Scalar>* p) const { return "embedding '" + p->name() + "'"; }
    std::string operator()(const merged_linear<Scalar>* p) const { return "merged_linear '" + p->name() + "'"; }
    std::string operator()(const conv2d<Scalar>* p) const { return "conv2d '" + p->name() + "'"; }
  };
  return std::visit(namer{}, m_layer);
}

template <typename Scalar>
adapter_config module_ref<Scalar>::exported_config(const std::string& name) const {
  if (const auto* const* fused = std::get_if<merged_linear<Scalar>*>(&m_layer)) {
    const merged_linear<Scalar>& m = **fused;
    adapter_config c;
    index total = 0;
    for (index i = 0; i < m.num_slices(); ++i) {
      if (!m.enable_lora()[static_cast<std::size_t>(i)]) continue;
      c = m.adapter(name, i).config();
      total += c.rank;
    }
    c.alpha = detail::alpha_for_scaling(c, total);
    c.rank = total;
    return c;
  }
  return std::visit(
      [&](auto* p) {
        if constexpr (std::is_same_v<decltype(p), merged_linear<Scalar>*>) {
          return adapter_config{};  // handled above
        } else {
          return p->adapter(name).config();
        }
      },
      m_layer);
}

template <typename Scalar>
peft_module module_ref<Scalar>::export_adapter(const std::string& name) const {
  peft_module out;
  out.type = dtype_of<Scalar>();
  if (const auto* const* fused = std::get_if<merged_linear<Scalar>*>(&m_layer)) {
    const merged_linear<Scalar>& m = **fused;
    const index total = exported_config(name).rank, rows = m.slice_features();
    out.a = matrix<double>::Zero(total, m.in_features());
    out.b = matrix<double>::Zero(m.out_features(), total);
    index col = 0;
    for (index i = 0; i < m.num_slices(); ++i) {
      if (!m.enable_lora()[static_cast<std::size_t>(i)]) continue;
      const auto& ad = m.adapter(name, i);  // const: factors as plain matrices
      if (ad.is_dora())
        throw config_error(detail::cat(label(), ": adapter '", name,
                                       "' uses DoRA; a fused merged_linear DoRA adapter has no PEFT form here"));
      out.a.middleRows(col, ad.rank()) = ad.a().template cast<double>();
      out.b.block(i * rows, col, rows, ad.rank()) = ad.b().template cast<double>();
      col += ad.rank();
    }
    return out;
  }
  std::visit(
      [&](auto* p) {
        if constexpr (!std::is_same_v<decltype(p), merged_linear<Scalar>*>) {
          const auto& ad = std::as_const(*p).adapter(name);
          out.a = ad.a().template cast<double>();
          out.b = ad.b().template cast<double>();
          out.magnitude = ad.magnitude().template cast<double>();
        }
      },
      m_layer);
  out.embedding = std::holds_alternative<embedding<Scalar>*>(m_layer);
  if (const auto* const* conv = std::get_if<conv2d<Scalar>*>(&m_layer)) {
    const conv2d_options& o = (*conv)->options();
    out.a_shape = {out.a.rows(), o.in_channels, o.kernel.h, o.kernel.w};
    out.b_shape = {out.b.rows(), out.b.cols(), 1, 1};
  }
  return out;
}

template <typename Scalar>
void module_ref<Scalar>::check(const peft_module& m, const adapter_config& c, const std::string& where,
                               const std::string& name) const {
  const bool is_embedding = std::holds_alternative<embedding<Scalar>*>(m_layer);
  if (m.embedding != is_embedding)
    throw config_error(detail::cat(where, ": ", m.embedding ? "an embedding" : "a linear",
                                   " adapter module cannot attach to ", label()));
  if (m.b_bias.size() != 0) throw config_error(detail::cat(where, ": lora_B.bias is not supported (", label(), ")"));
  const bool dora_ok =
      std::holds_alternative<linear<Scalar>*>(m_layer) || std::holds_alternative<conv2d<Scalar>*>(m_layer);
  if (m.magnitude.size() != 0 && !dora_ok)
    throw config_error(detail::cat(where, ": DoRA (lora_magnitude_vector) is not supported on ", label()));
  if (m.a.rows() != m.b.cols() || m.a.rows() != c.rank)
    throw shape_error(detail::cat(where, ": A has rank ", m.a.rows(), ", B has rank ", m.b.cols(),
                                  " and the config gives r = ", c.rank));
  if (!name.empty() && has_adapter(name))  // empty: adapters held outside the layer, whose names are not its own
    throw name_error(detail::cat(where, ": the layer already has an adapter named '", name, "'"));
  lora::validate(c, where);
  std::visit(
      [&](auto* p) {
        const auto [in, out] = detail::factor_features(p);
        detail::check_features(m, in, out, where);
        if (m.magnitude.size() != 0 && m.magnitude.size() != out)
          throw shape_error(detail::cat(where, ": lora_magnitude_vector must have out_features = ", out,
                                        " entries, got ", m.magnitude.size()));
      },
      m_layer);
  if (const auto* const* fused = std::get_if<merged_linear<Scalar>*>(&m_layer)) {
    const merged_linear<Scalar>& f = **fused;
    for (index i = 0; i < f.num_slices(); ++i)
      if (!f.enable_lora()[static_cast<std::size_t>(i)] &&
          !m.b.middleRows(i * f.slice_features(), f.slice_features()).isZero(0.0))
        throw config_error(detail::cat(where, ": lora_B has non-zero rows in slice ", i, ", which ", label(),
                                       " keeps frozen (enable_lora[", i, "] = false)"));
  }
}

template <typename Scalar>
void module_ref<Scalar>::attach(const peft_module& m, const adapter_config& config, const std::string& name) const {
  adapter_config c = config;
  c.init = init_method::zeros;
  c.use_dora = m.magnitude.size() != 0;
  const matrix<Scalar> a = m.a.template cast<Scalar>(), b = m.b.template cast<Scalar>();
  if (auto* const* fused = std::get_if<merged_linear<Scalar>*>(&m_layer)) {
    merged_linear<Scalar>& f = **fused;
    f.add_adapter(name, c);
    for (index i = 0; i < f.num_slices(); ++i)
      if (f.enable_lora()[static_cast<std::size_t>(i)])
        f.set_factors(name, i, a, matrix<Scalar>(b.middleRows(i * f.slice_features(), f.slice_features())));
    return;
  }
  std::visit(
      [&](auto* p) {
        if constexpr (!std::is_same_v<decltype(p), merged_linear<Scalar>*>) {
          if (c.use_dora) {
            p->add_adapter(name, c, a, b, vector<Scalar>(m.magnitude.template cast<Scalar>()));
          } else {
            p->add_adapter(name, c, a, b);
          }
        }
      },
      m_layer);
}

template <typename Scalar>
std::vector<std::pair<const linear<Scalar>*, routed_factors<Scalar>>> module_ref<Scalar>::detach(
    const peft_module& m, const adapter_config& c, const std::string& where) const {
  if (m.magnitude.size() != 0)
    throw config_error(detail::cat(where,
                                   ": a DoRA module (lora_magnitude_vector) rescales the base output "
                                   "that a routed batch shares; it cannot be served from a registry"));
  const auto s = static_cast<Scalar>(scaling_of(c));
  const matrix<Scalar> a = m.a.template cast<Scalar>(), b = m.b.template cast<Scalar>();
  std::vector<std::pair<const linear<Scalar>*, routed_factors<Scalar>>> out;
  if (const auto* const* fused = std::get_if<merged_linear<Scalar>*>(&m_layer)) {
    const merged_linear<Scalar>& f = **fused;  // as attach: every enabled slice i gets A and B's rows of i
    for (index i = 0; i < f.num_slices(); ++i)
      if (f.enable_lora()[static_cast<std::size_t>(i)])
        out.emplace_back(&f.adapted_part(i),
                         routed_factors<Scalar>{a, b.middleRows(i * f.slice_features(), f.slice_features()), s});
    return out;
  }
  std::visit([&](const auto* p) { out.emplace_back(&p->adapted_part(0), routed_factors<Scalar>{a, b, s}); }, m_layer);
  return out;
}

}  // namespace lora::io
