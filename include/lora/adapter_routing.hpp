// lora/adapter_routing.hpp: which adapter each row of a batch uses, for inference over a batch whose rows
// belong to different adapters (PEFT's `adapter_names`; docs/CONVENTIONS.md §mixed).
//
// Row i names an adapter, or the base alone (base_adapter, "__base__", or an empty name), and optionally a
// scale c_i. A layer serving the batch computes
//
//   Y = X Wᵀ + b  (one product over every row)  +  for each adapter a, over its rows R_a:
//       Y[R_a] += diag(c[R_a]) · s_a · (X[R_a] A_aᵀ) B_aᵀ
//
// (SGMV-style: gather the rows of each adapter, two thin products, scatter-add). The routing is computed
// once per batch, grouped by adapter, and shared by every layer of a model. The layers' active-adapter
// setting plays no part; disabled adapters (disable_adapters()) make every row run the base alone.
//
// A routing may be bound to an adapter_source (io/adapter_registry.hpp): its groups then take their
// factors from the source instead of the layers' own adapters, so that adapters can be published and
// withdrawn by other threads while batches run (docs/CONVENTIONS.md §registry).
#pragma once

#include <memory>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include "config.hpp"
#include "error.hpp"

namespace lora {

/// PEFT's name for "no adapter": rows so named run the base alone.
inline constexpr const char* base_adapter = "__base__";

/// What a layer does with a routed name it does not hold.
enum class missing_adapter {
  error,  ///< name_error: the name is unknown (the default for a single layer: a typo is not silent)
  base,   ///< the rows run the base alone in that layer (models, where adapters cover some modules only)
};

template <typename Scalar_>
class linear;

/// The factors a routed group applies on one layer part: Y[R] += s · (X[R] Aᵀ) Bᵀ, A r x in, B out x r.
template <typename Scalar>
struct routed_factors {
  matrix<Scalar> a;  // r x in
  matrix<Scalar> b;  // out x r
  Scalar scaling = Scalar(1);
};

/// Adapters held outside the layers, bound to one routing (io/adapter_registry.hpp makes them). For group
/// g of that routing and a layer part, the factors to apply there, or none when g's adapter has no module
/// on that part (the rows then run the base alone in it). Immutable while bound: readers share it freely.
class adapter_source {
 public:
  virtual ~adapter_source() = default;
  /// The factors of group `group` on `part`, or null; dtype_error when the source holds another Scalar.
  template <typename Scalar>
  const routed_factors<Scalar>* find(std::size_t group, const linear<Scalar>& part) const {
    if (scalar_type() != typeid(Scalar))
      throw dtype_error(std::string("adapter_source: the adapters are ") + scalar_type().name() +
                        ", the layer computes in " + typeid(Scalar).name());
    return static_cast<const routed_factors<Scalar>*>(find_erased(group, &part));
  }
  /// Groups the source was bound for (the routing's groups().size()).
  virtual std::size_t groups() const noexcept = 0;

 protected:
  virtual const std::type_info& scalar_type() const noexcept = 0;
  virtual const void* find_erased(std::size_t group, const void* part) const = 0;
};

class adapter_routing {
 public:
  /// The rows of one adapter: ascending row indices, and their scales (empty when every scale is 1).
  /// When the rows are consecutive, `first` is the first of them (else -1): layers then skip the gather.
  struct group {
    std::string adapter;
    std::vector<index> rows;
    std::vector<double> scales;
    index first = -1;
  };

  adapter_routing() = default;
  /// One adapter name per row (base_adapter or "" for the base alone) and, optionally, one scale per row
  /// (empty: all 1). shape_error when the scales' count differs from the rows'.
  explicit adapter_routing(const std::vector<std::string>& row_adapters, const std::vector<double>& row_scales = {},
                           missing_adapter missing = missing_adapter::error);
  /// Runs of rows: runs[k] = {name, count} covers the next `count` rows (e.g. the tokens of one sequence),
  /// with scales[k] (empty: all 1) for all of them.
  static adapter_routing from_runs(const std::vector<std::pair<std::string, index>>& runs,
                                   const std::vector<double>& scales = {},
                                   missing_adapter missing = missing_adapter::error);

  /// Rows of the batch this routing describes.
  index rows() const noexcept { return m_rows; }
  /// The adapters' groups, in order of first appearance; rows of the base alone are in none.
  const std::vector<group>& groups() const noexcept { return m_groups; }
  missing_adapter missing() const noexcept { return m_missing; }
  void set_missing(missing_adapter m) noexcept { m_missing = m; }
  /// Each row repeated `times` times (row i becomes rows i·times .. i·times + times − 1): a per-sample
  /// routing for a layer that turns each sample into several rows (conv2d's output pixels).
  adapter_routing repeat_rows(index times) const;
  /// The same into `out`, reusing its memory (allocates nothing once `out` has held as large a routing).
  void repeat_rows(index times, adapter_routing& out) const;
  /// True when a name means the base alone.
  static bool is_base(const std::string& name) noexcept { return name.empty() || name == base_adapter; }

  /// Binds adapters held outside the layers (one entry per group, in groups() order; shape_error
  /// otherwise); null unbinds. The routing shares ownership: what it names stays alive while it lives.
  void bind(std::shared_ptr<const adapter_source> source);
  /// The bound source, or null (the layers' own adapters serve the groups).
  const adapter_source* source() const noexcept { return m_source.get(); }
  const std::shared_ptr<const adapter_source>& shared_source() const noexcept { return m_source; }

 private:
  void add_row(const std::string& name, double scale);
  void finish();

  index m_rows = 0;
  std::vector<group> m_groups;
  missing_adapter m_missing = missing_adapter::error;
  std::shared_ptr<const adapter_source> m_source;
};

// ---------------------------------------------------------------------------------------------------

inline adapter_routing::adapter_routing(const std::vector<std::string>& row_adapters,
                                        const std::vector<double>& row_scales, missing_adapter missing)
    : m_missing(missing) {
  if (!row_scales.empty() && row_scales.size() != row_adapters.size())
    throw shape_error("adapter_routing: expected one scale per row (" + std::to_string(row_adapters.size()) +
                      "), got " + std::to_string(row_scales.size()));
  for (std::size_t i = 0; i < row_adapters.size(); ++i)
    add_row(row_adapters[i], row_scales.empty() ? 1.0 : row_scales[i]);
  finish();
}

inline adapter_routing adapter_routing::from_runs(const std::vector<std::pair<std::string, index>>& runs,
                                                  const std::vector<double>& scales, missing_adapter missing) {
  if (!scales.empty() && scales.size() != runs.size())
    throw shape_error("adapter_routing::from_runs: expected one scale per run (" + std::to_string(runs.size()) +
                      "), got " + std::to_string(scales.size()));
  adapter_routing r;
  r.m_missing = missing;
  for (std::size_t k = 0; k < runs.size(); ++k) {
    if (runs[k].second < 0)
      throw shape_error("adapter_routing::from_runs: run " + std::to_string(k) + " ('" + runs[k].first +
                        "') has a negative row count " + std::to_string(runs[k].second));
    for (index i = 0; i < runs[k].second; ++i) r.add_row(runs[k].first, scales.empty() ? 1.0 : scales[k]);
  }
  r.finish();
  return r;
}

inline void adapter_routing::add_row(const std::string& name, double scale) {
  const index row = m_rows++;
  if (is_base(name)) return;
  group* g = nullptr;
  for (auto& candidate : m_groups)
    if (candidate.adapter == name) g = &candidate;
  if (g == nullptr) g = &m_groups.emplace_back(group{name, {}, {}, -1});
  g->rows.push_back(row);
  // Scales are kept per row only once one differs from 1 (then the earlier rows' 1s are filled in).
  if (scale != 1.0 || !g->scales.empty()) {
    g->scales.resize(g->rows.size() - 1, 1.0);
    g->scales.push_back(scale);
  }
}

inline void adapter_routing::finish() {
  for (auto& g : m_groups) {
    const bool consecutive = g.rows.back() - g.rows.front() + 1 == static_cast<index>(g.rows.size());
    g.first = consecutive ? g.rows.front() : -1;
  }
}

inline void adapter_routing::bind(std::shared_ptr<const adapter_source> source) {
  if (source && source->groups() != m_groups.size())
    throw shape_error("adapter_routing::bind: the source was made for " + std::to_string(source->groups()) +
                      " adapter groups, the routing has " + std::to_string(m_groups.size()));
  m_source = std::move(source);
}

inline adapter_routing adapter_routing::repeat_rows(index times) const {
  adapter_routing r;
  repeat_rows(times, r);
  return r;
}

inline void adapter_routing::repeat_rows(index times, adapter_routing& out) const {
  if (times < 1) throw shape_error("adapter_routing::repeat_rows: expected times >= 1, got " + std::to_string(times));
  out.m_missing = m_missing;
  out.m_source = m_source;  // the groups keep their order, so the source's entries still match
  out.m_rows = m_rows * times;
  out.m_groups.resize(m_groups.size());
  for (std::size_t i = 0; i < m_groups.size(); ++i) {
    const group& g = m_groups[i];
    group& o = out.m_groups[i];
    o.adapter = g.adapter;
    o.rows.clear();
    o.scales.clear();
    for (std::size_t k = 0; k < g.rows.size(); ++k)
      for (index t = 0; t < times; ++t) {
        o.rows.push_back(g.rows[k] * times + t);
        if (!g.scales.empty()) o.scales.push_back(g.scales[k]);
      }
  }
  out.finish();
}

}  // namespace lora
