// lora/io/adapter_registry.hpp: adapters that are loaded, replaced and unloaded while other threads serve
// batches with them (docs/CONVENTIONS.md §registry).
//
// The registry holds the model's layers (module path -> layer, as attach() takes them) and publishes
// *snapshots*: immutable maps name -> adapter_version, each version the factors (A, B, s) of one adapter
// for every layer part it covers, kept outside the layers. Writers (load, replace, unload) serialise on
// a mutex, build the new version without it held, and publish a new snapshot with one atomic store.
// A reader takes the current snapshot with one atomic load (the only synchronisation on the inference
// path) and binds it to a routing; every layer then takes that routing's factors from the snapshot
// (adapter_source), so a batch runs on the versions it started with from its first layer to its last,
// whatever is published meanwhile. Versions are reference-counted: an unloaded or replaced adapter's
// memory goes when the last routing bound to a snapshot holding it goes.
//
//   io::adapter_registry<float> reg(model.named_layers());     // the layers must outlive reg
//   reg.load("legal", io::peft_adapter::load("adapters/legal"));          // writer thread
//   adapter_routing r = adapter_routing::from_runs({{"legal", 5}, {"chat", 3}});
//   reg.bind(r);                                                // reader: one atomic load
//   layer.infer(x, r, y, ws);                                   // or model.infer_batch(..., r, ...)
//
// The layers' own adapters play no part in a bound routing (a layer with a merged adapter still refuses
// it: W would hold that adapter for every row). Versions are built against the layers' shapes once, at
// load; nothing is checked per batch beyond the names, at bind.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../adapter_routing.hpp"
#include "../error.hpp"
#include "../linear.hpp"
#include "peft_file.hpp"
#include "peft_layers.hpp"

namespace lora::io {

template <typename Scalar>
class adapter_registry;

/// One published version of one adapter: its factors on every layer part it covers. Immutable.
template <typename Scalar>
class adapter_version {
 public:
  using part_factors = std::pair<const linear<Scalar>*, routed_factors<Scalar>>;

  const std::string& name() const noexcept { return m_name; }
  /// 1, 2, ... in the order the registry made versions (a replaced adapter's new version is larger).
  std::uint64_t version() const noexcept { return m_version; }
  /// The factors on layer part `part` (layer.adapted_part(i)), or null when the adapter does not cover it.
  const routed_factors<Scalar>* find(const linear<Scalar>* part) const noexcept;
  /// Layer parts covered.
  std::size_t num_parts() const noexcept { return m_parts.size(); }
  /// Values in A and B over every part.
  std::int64_t parameter_count() const noexcept;

 private:
  friend class adapter_registry<Scalar>;
  std::string m_name;
  std::uint64_t m_version = 0;
  std::vector<part_factors> m_parts;  // sorted by part address (std::less), for find()
};

template <typename Scalar>
class adapter_registry {
 public:
  using version_ptr = std::shared_ptr<const adapter_version<Scalar>>;

  /// The adapters published at one instant: name -> version. Immutable; readers share it.
  class snapshot {
   public:
    /// 0 for the empty registry, then +1 per publication.
    std::uint64_t generation() const noexcept { return m_generation; }
    /// The version published as `name`, or null.
    const adapter_version<Scalar>* find(const std::string& name) const;
    /// The same, shared (null if none).
    version_ptr version(const std::string& name) const;
    std::vector<std::string> names() const;
    std::size_t size() const noexcept { return m_adapters.size(); }

   private:
    friend class adapter_registry;
    std::map<std::string, version_ptr> m_adapters;
    std::uint64_t m_generation = 0;
  };
  using snapshot_ptr = std::shared_ptr<const snapshot>;

  /// `layers`: a range of (module path, pointer to a LoRA layer or module_ref), as attach() takes it.
  /// The layers must outlive the registry and every routing bound by it, and must not move.
  template <typename Layers>
  explicit adapter_registry(const Layers& layers);
  adapter_registry(const adapter_registry&) = delete;
  adapter_registry& operator=(const adapter_registry&) = delete;

  // --- readers (any thread, no lock) -----------------------------------------------------------------

  /// The current snapshot (one atomic load).
  snapshot_ptr current() const { return std::atomic_load(&m_current); }
  /// Binds `routing` to the current snapshot and returns that snapshot. Every routed name must be
  /// published there: name_error naming the published ones, unless routing.missing() is
  /// missing_adapter::base (then those rows run the base alone).
  snapshot_ptr bind(adapter_routing& routing) const;
  /// Binds `routing` to a snapshot taken before (e.g. one per request, kept across decoding steps).
  static void bind(adapter_routing& routing, snapshot_ptr snap);

  // --- writers (serialised among themselves; readers never wait for them) ---------------------------

  /// Publishes `adapter` as `name` and returns its version. Checked against the layers first, all or
  /// nothing (attach()'s rules, and no DoRA: config_error); name_error if `name` is published already.
  std::uint64_t load(const std::string& name, const peft_adapter& adapter);
  /// The same from a PEFT adapter directory.
  std::uint64_t load_dir(const std::string& name, const std::string& dir);
  /// Publishes a new version of `name` (name_error unless published). Batches bound before keep the
  /// old version to their end.
  std::uint64_t replace(const std::string& name, const peft_adapter& adapter);
  /// Withdraws `name` (name_error unless published). Its memory goes with the last snapshot holding it.
  void unload(const std::string& name);

  bool contains(const std::string& name) const { return current()->find(name) != nullptr; }
  std::vector<std::string> names() const { return current()->names(); }

 private:
  enum class mode { add, replace };
  /// Builds a version from `adapter`: every module matched to a layer and checked (plan_attach), then
  /// copied. Takes no lock.
  version_ptr make_version(const std::string& name, const peft_adapter& adapter);
  std::uint64_t publish(const std::string& name, version_ptr v, mode m);
  /// name_error: `name` is (or is not) published; lists what is.
  [[noreturn]] static void name_problem(const snapshot& s, const std::string& name, const char* what);

  std::vector<std::pair<std::string, module_ref<Scalar>>> m_layers;
  std::mutex m_write;                        // serialises writers
  snapshot_ptr m_current;                    // only through std::atomic_load / std::atomic_store
  std::atomic<std::uint64_t> m_versions{0};  // versions made so far
};

namespace detail {

/// A snapshot bound to one routing: group g's version, or null for a name not published.
template <typename Scalar>
class bound_snapshot final : public adapter_source {
 public:
  using snapshot_ptr = typename adapter_registry<Scalar>::snapshot_ptr;
  bound_snapshot(snapshot_ptr snap, std::vector<const adapter_version<Scalar>*> per_group)
      : m_snapshot(std::move(snap)), m_groups(std::move(per_group)) {}
  std::size_t groups() const noexcept override { return m_groups.size(); }

 protected:
  const std::type_info& scalar_type() const noexcept override { return typeid(Scalar); }
  const void* find_erased(std::size_t group, const void* part) const override {
    const adapter_version<Scalar>* v = m_groups[group];
    return v == nullptr ? nullptr : v->find(static_cast<const linear<Scalar>*>(part));
  }

 private:
  snapshot_ptr m_snapshot;  // keeps the versions alive
  std::vector<const adapter_version<Scalar>*> m_groups;
};

}  // namespace detail

// ---------------------------------------------------------------------------------------------------

template <typename Scalar>
const routed_factors<Scalar>* adapter_version<Scalar>::find(const linear<Scalar>* part) const noexcept {
  const auto it = std::lower_bound(m_parts.begin(), m_parts.end(), part, [](const part_factors& e, const auto* p) {
    return std::less<const linear<Scalar>*>()(e.first, p);
  });
  return it != m_parts.end() && it->first == part ? &it->second : nullptr;
}

template <typename Scalar>
std::int64_t adapter_version<Scalar>::parameter_count() const noexcept {
  std::int64_t n = 0;
  for (const auto& [part, f] : m_parts) n += static_cast<std::int64_t>(f.a.size() + f.b.size());
  return n;
}

template <typename Scalar>
const adapter_version<Scalar>* adapter_registry<Scalar>::snapshot::find(const std::string& name) const {
  const auto it = m_adapters.find(name);
  return it == m_adapters.end() ? nullptr : it->second.get();
}

template <typename Scalar>
typename adapter_registry<Scalar>::version_ptr adapter_registry<Scalar>::snapshot::version(
    const std::string& name) const {
  const auto it = m_adapters.find(name);
  return it == m_adapters.end() ? nullptr : it->second;
}

template <typename Scalar>
std::vector<std::string> adapter_registry<Scalar>::snapshot::names() const {
  std::vector<std::string> out;
  for (const auto& e : m_adapters) out.push_back(e.first);
  return out;
}

template <typename Scalar>
template <typename Layers>
adapter_registry<Scalar>::adapter_registry(const Layers& layers)
    : m_layers(detail::module_refs(layers, "adapter_registry")), m_current(std::make_shared<const snapshot>()) {
  static_assert(std::is_same_v<typename detail::module_scalar<detail::layer_pointer_of<Layers>>::type, Scalar>,
                "adapter_registry<Scalar> takes layers of the same Scalar");
}

template <typename Scalar>
typename adapter_registry<Scalar>::snapshot_ptr adapter_registry<Scalar>::bind(adapter_routing& routing) const {
  snapshot_ptr snap = current();
  bind(routing, snap);
  return snap;
}

template <typename Scalar>
void adapter_registry<Scalar>::bind(adapter_routing& routing, snapshot_ptr snap) {
  if (!snap) throw state_error("adapter_registry::bind: the snapshot is null");
  std::vector<const adapter_version<Scalar>*> per_group;
  per_group.reserve(routing.groups().size());
  for (const auto& g : routing.groups()) {
    const adapter_version<Scalar>* v = snap->find(g.adapter);
    if (v == nullptr && routing.missing() != missing_adapter::base) name_problem(*snap, g.adapter, "is not published");
    per_group.push_back(v);
  }
  routing.bind(std::make_shared<const detail::bound_snapshot<Scalar>>(std::move(snap), std::move(per_group)));
}

template <typename Scalar>
typename adapter_registry<Scalar>::version_ptr adapter_registry<Scalar>::make_version(const std::string& name,
                                                                                      const peft_adapter& adapter) {
  if (adapter_routing::is_base(name))
    throw name_error(detail::cat("adapter_registry: '", name, "' names the base model; choose another name"));
  auto v = std::make_shared<adapter_version<Scalar>>();
  v->m_name = name;
  for (const auto& step : detail::plan_attach(adapter, m_layers, std::string()))  // checks every module first
    for (auto& part : step.layer.detach(
             *step.module, step.config,
             detail::cat("adapter_registry: '", name, "' module '", step.module->path, "' (", step.layer.label(), ")")))
      v->m_parts.push_back(std::move(part));
  std::sort(v->m_parts.begin(), v->m_parts.end(),
            [](const auto& x, const auto& y) { return std::less<const linear<Scalar>*>()(x.first, y.first); });
  v->m_version = ++m_versions;
  return v;
}

template <typename Scalar>
std::uint64_t adapter_registry<Scalar>::publish(const std::string& name, version_ptr v, mode m) {
  const std::lock_guard<std::mutex> lock(m_write);
  const snapshot_ptr old = std::atomic_load(&m_current);
  const bool present = old->find(name) != nullptr;
  if (m == mode::add && present) name_problem(*old, name, "is published already (replace() publishes a new version)");
  if (m == mode::replace && !present) name_problem(*old, name, "is not published");
  auto next = std::make_shared<snapshot>(*old);  // copies the map of shared pointers, not the factors
  next->m_generation = old->m_generation + 1;
  const std::uint64_t version = v->version();
  next->m_adapters[name] = std::move(v);
  std::atomic_store(&m_current, snapshot_ptr(std::move(next)));
  return version;
}

template <typename Scalar>
std::uint64_t adapter_registry<Scalar>::load(const std::string& name, const peft_adapter& adapter) {
  return publish(name, make_version(name, adapter), mode::add);
}

template <typename Scalar>
std::uint64_t adapter_registry<Scalar>::load_dir(const std::string& name, const std::string& dir) {
  return load(name, peft_adapter::load(dir));
}

template <typename Scalar>
std::uint64_t adapter_registry<Scalar>::replace(const std::string& name, const peft_adapter& adapter) {
  return publish(name, make_version(name, adapter), mode::replace);
}

template <typename Scalar>
void adapter_registry<Scalar>::unload(const std::string& name) {
  const std::lock_guard<std::mutex> lock(m_write);
  const snapshot_ptr old = std::atomic_load(&m_current);
  if (old->find(name) == nullptr) name_problem(*old, name, "is not published");
  auto next = std::make_shared<snapshot>(*old);
  next->m_generation = old->m_generation + 1;
  next->m_adapters.erase(name);
  std::atomic_store(&m_current, snapshot_ptr(std::move(next)));
}

template <typename Scalar>
void adapter_registry<Scalar>::name_problem(const snapshot& s, const std::string& name, const char* what) {
  std::string known;
  for (const auto& n : s.names()) known += (known.empty() ? "'" : ", '") + n + "'";
  throw name_error(detail::cat("adapter_registry: adapter '", name, "' ", what,
                               " (published: ", known.empty() ? std::string("none") : known, ")"));
}

}  // namespace lora::io
