// lora/layer.hpp: the adapter API every LoRA layer shares, written once (Eigen's dense_xpr_base idiom).
//
// A layer is one or more frozen weights, its *parts*, each a lora::linear (the engine). A dense layer is
// its own single part; an embedding's part is its table seen as a linear (in = num, out = dim); a fused
// q|k|v projection has one part per slice; a grouped convolution one per group. Parts that take adapters
// hold the same adapters by name (with factors of their own shapes), so adding, selecting, merging or
// removing an adapter is the same call on every such part. layer_base<Derived> makes those calls, checks
// them once beforehand, and words every error with the layer's own name ("embedding 'wte'").
//
// Derived provides (privately; it befriends layer_base):
//   linear<Scalar>& part(index) (+const)  part i
//   std::string where() const            "embedding 'wte'"
//   void on_adapters_changed()           forget cached forwards
//   matrix weight() const                the frozen weight (merged adapters included), what unload returns
// and, where the defaults below (one part that takes adapters, nothing else to check or count) do not fit:
//   static constexpr bool multi_part      several parts take adapters (adapter(name) then needs a part)
//   static constexpr const char* part_noun "slice", "group": what a part is called in messages
//   static constexpr const char* part_rule " (enable_lora set)": which parts take adapters, for messages
//   index num_parts() const              every part, whether it takes adapters or not
//   bool takes_adapters(index) const
//   void check_adapter_config(const std::string& name, const adapter_config&) const   refusals of its own
//   adapter_config part_config(const adapter_config&, index part) const              e.g. seeds per slice
//   void add_cache_bytes(parameter_report&) const                                   caches the parts miss
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "accounting.hpp"
#include "adapter.hpp"
#include "adapter_routing.hpp"
#include "config.hpp"
#include "error.hpp"
#include "parameter.hpp"

namespace lora {

template <typename Derived, typename Scalar_>
class layer_base;
template <typename Scalar_>
class linear;

namespace detail {
template <typename Derived, typename Scalar>
std::true_type is_layer_test(const layer_base<Derived, Scalar>*);
std::false_type is_layer_test(const void*);
}  // namespace detail

/// True for every LoRA layer type (linear, embedding, merged_linear, conv2d, and layers built the same way).
template <typename T>
struct is_lora_layer : decltype(detail::is_layer_test(static_cast<const T*>(nullptr))) {};
template <typename T>
inline constexpr bool is_lora_layer_v = is_lora_layer<T>::value;

template <typename Derived, typename Scalar_>
class layer_base {
 public:
  using Scalar = Scalar_;
  using adapter_type = lora::adapter<Scalar>;
  using matrix_type = matrix<Scalar>;
  using vector_type = vector<Scalar>;

  // --- adapters ----------------------------------------------------------------------------------

  /// Adds an adapter to every part that takes adapters. The first adapter of a layer becomes active;
  /// later ones wait for set_active() (as PEFT's add_adapter). name_error on an empty or duplicate name,
  /// config_error on an invalid config. Returns the adapter (single-part layers) or nothing.
  decltype(auto) add_adapter(const std::string& name, const adapter_config& config = {});
  /// Adds an adapter with given factors A (r x in) and B (out x r), r = config.rank; a DoRA adapter gets
  /// m = ‖W + s B A‖. shape_error on a shape mismatch, and then nothing is added. Single-part layers.
  template <typename DA, typename DB>
  adapter_type& add_adapter(const std::string& name, const adapter_config& config, const Eigen::MatrixBase<DA>& a,
                            const Eigen::MatrixBase<DB>& b);
  /// As above with a given DoRA magnitude m (length out).
  template <typename DA, typename DB, typename DM>
  adapter_type& add_adapter(const std::string& name, const adapter_config& config, const Eigen::MatrixBase<DA>& a,
                            const Eigen::MatrixBase<DB>& b, const Eigen::MatrixBase<DM>& m);
  /// Removes an adapter; state_error if it is merged (unmerge first).
  void remove_adapter(const std::string& name);
  bool has_adapter(const std::string& name) const { return find(name) != nullptr; }
  /// The adapter of a single-part layer; name_error if unknown.
  adapter_type& adapter(const std::string& name);
  const adapter_type& adapter(const std::string& name) const;
  /// The adapter on part i; shape_error if part i takes no adapters.
  adapter_type& adapter(const std::string& name, index part);
  const adapter_type& adapter(const std::string& name, index part) const;
  std::vector<std::string> adapter_names() const;

  /// Replaces the factors of an adapter of a single-part layer (shapes checked, shape_error); a DoRA
  /// adapter's magnitude becomes ‖W + s B A‖. state_error while it is merged.
  template <typename DA, typename DB>
  void set_factors(const std::string& name, const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b);
  /// As above with a given DoRA magnitude (length out).
  template <typename DA, typename DB, typename DM>
  void set_factors(const std::string& name, const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b,
                   const Eigen::MatrixBase<DM>& m);
  /// Replaces the factors of an adapter on part i.
  template <typename DA, typename DB>
  void set_factors(const std::string& name, index part, const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b);

  /// PEFT's hotswap_adapter on one layer: adapter `name` takes factors A (r' x in), B (out x r') and the
  /// scaling of `config` (rank r', alpha, use_rslora), in place when r' <= its stored rank (zeroed, then A
  /// fills the leading rows and B the leading columns; prepare_for_hotswap pads ahead), else grown. Its
  /// name, active state and dropout stream stay. name_error if unknown; state_error while merged (W holds
  /// the old adapter); config_error for DoRA on either side or a use_rslora / dropout that differs (PEFT's
  /// rule); shape_error for factors of other shapes. Returns true when done without reallocating.
  template <typename DA, typename DB>
  bool hotswap_adapter(const std::string& name, const adapter_config& config, const Eigen::MatrixBase<DA>& a,
                       const Eigen::MatrixBase<DB>& b);
  /// The same on part i of a multi-part layer.
  template <typename DA, typename DB>
  bool hotswap_adapter(const std::string& name, index part, const adapter_config& config,
                       const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b);
  /// PEFT's prepare_model_for_compiled_hotswap on one layer: zero-pads every adapter to rank `target_rank`
  /// (A rows, B columns; outputs and scalings unchanged), so that hot-swaps up to that rank run in place.
  /// config_error if target_rank is below an adapter's rank; state_error while any adapter is merged.
  /// Parameter views and optimizer state taken before are invalidated.
  void prepare_for_hotswap(index target_rank);

  /// Part i's engine: the lora::linear holding its adapters, e.g. to key adapters kept outside the layer
  /// (io/adapter_registry.hpp). shape_error unless part i takes adapters.
  const linear<Scalar>& adapted_part(index part) const {
    check_part(part);
    return derived().part(part);
  }

  /// Makes exactly these adapters active (their outputs add up). Merged adapters are always in effect and
  /// must stay in the active set.
  void set_active(const std::vector<std::string>& names);
  const std::vector<std::string>& active_adapters() const;
  /// Runs the base alone until enable_adapters(); state_error while any adapter is merged.
  void disable_adapters();
  void enable_adapters();
  bool adapters_disabled() const;

  // --- training ----------------------------------------------------------------------------------

  /// Training mode draws adapter dropout masks; eval mode does not. Layers start in training mode.
  void train(bool on = true);
  void eval() { train(false); }
  bool training() const { return derived().part(0).core_training(); }

  /// Trainable parameters of the active, unmerged adapters, part after part, named as PEFT names them.
  parameter_list<Scalar> parameters();
  /// Parameters of one adapter; state_error if it is merged.
  parameter_list<Scalar> parameters(const std::string& adapter_name);
  /// Zeroes every adapter's gradients.
  void zero_grad();

  // --- merging -----------------------------------------------------------------------------------

  /// W += Σ s B A over `names` (default: the active, unmerged adapters), on every part. With safe = true,
  /// a merge whose result would hold a non-finite value throws numeric_error and leaves every part as it
  /// was (PEFT's safe_merge). A DoRA adapter merges alone and before any other.
  void merge(const std::vector<std::string>& names = {}, bool safe = false);
  void safe_merge(const std::vector<std::string>& names = {}) { merge(names, true); }
  /// Undoes every merge, restoring W bit for bit.
  void unmerge();
  std::vector<std::string> merged_adapters() const;
  bool merged() const;
  /// Merges the active adapters, removes every adapter and returns the merged weight (Derived::weight()).
  matrix_type merge_and_unload(bool safe = false);

  // --- accounting --------------------------------------------------------------------------------

  parameter_report report() const;

  // --- allocating forms of a layer's own forward, backward and infer ---------------------------------
  // For layers whose input is a matrix (Derived defines the caller-sized forms forward(x, y),
  // backward(dy, dx), infer(x, y, ws) with its workspace_type, and brings these in with `using`).

  /// Training forward returning Y (n x out_features).
  template <typename X>
  matrix_type forward(const Eigen::MatrixBase<X>& x);
  /// Backward returning dX (n x in_features).
  template <typename DY>
  matrix_type backward(const Eigen::MatrixBase<DY>& dy);
  /// Const inference returning Y, with a workspace of its own.
  template <typename X>
  matrix_type infer(const Eigen::MatrixBase<X>& x) const;
  /// Const inference of a batch whose rows use different adapters (adapter_routing.hpp), returning Y.
  template <typename X>
  matrix_type infer(const Eigen::MatrixBase<X>& x, const adapter_routing& routing) const;

  /// Checks a routing before a layer serves it: rows() == `rows` (shape_error); every routed adapter
  /// known to the layer (name_error, unless routing.missing() is missing_adapter::base) and not DoRA
  /// (config_error: a DoRA adapter rescales the base output, which the rows share); no adapter merged
  /// (state_error: W would hold it for every row). Layers call it; so may a model, once per batch.
  void check_routing(const adapter_routing& routing, index rows) const;

 protected:
  layer_base() = default;

  // The defaults of the hooks a layer may redefine (see the top of this file).
  static constexpr bool multi_part = false;
  static constexpr const char* part_noun = "part";
  static constexpr const char* part_rule = "";
  index num_parts() const noexcept { return 1; }
  bool takes_adapters(index) const noexcept { return true; }
  void check_adapter_config(const std::string&, const adapter_config&) const {}
  adapter_config part_config(const adapter_config& c, index) const { return c; }
  void add_cache_bytes(parameter_report&) const {}

  Derived& derived() { return static_cast<Derived&>(*this); }
  const Derived& derived() const { return static_cast<const Derived&>(*this); }

 private:
  /// The first part that takes adapters (every such part holds the same names and states), or null.
  const linear<Scalar>* reference() const;
  /// Calls f(part, i) for each part that takes adapters.
  template <typename F>
  void for_each_adapted(F&& f);
  template <typename F>
  void for_each_adapted(F&& f) const;
  const adapter_type* find(const std::string& name) const;
  /// name_error naming the known adapters.
  [[noreturn]] void unknown(const std::string& name) const;
  const adapter_type& checked(const std::string& name) const;
  /// shape_error unless part i takes adapters.
  void check_part(index part) const;
  /// The adapters merge() would merge, checked (known, unmerged, listed once, DoRA rules).
  std::vector<std::string> merge_choice(const std::vector<std::string>& names) const;
  template <typename DA, typename DB>
  void check_factors(const std::string& name, index part, index rank, const Eigen::MatrixBase<DA>& a,
                     const Eigen::MatrixBase<DB>& b) const;
  /// The DoRA magnitude `m` as a vector of length out_features; shape_error (naming `who`) otherwise.
  template <typename DM>
  vector_type checked_magnitude(const std::string& who, const Eigen::MatrixBase<DM>& m) const;
  void changed();
};

// ---------------------------------------------------------------------------------------------------
// looking adapters up

template <typename Derived, typename Scalar>
const linear<Scalar>* layer_base<Derived, Scalar>::reference() const {
  for (index i = 0; i < derived().num_parts(); ++i)
    if (derived().takes_adapters(i)) return &derived().part(i);
  return nullptr;
}

template <typename Derived, typename Scalar>
template <typename F>
void layer_base<Derived, Scalar>::for_each_adapted(F&& f) {
  for (index i = 0; i < derived().num_parts(); ++i)
    if (derived().takes_adapters(i)) f(derived().part(i), i);
}

template <typename Derived, typename Scalar>
template <typename F>
void layer_base<Derived, Scalar>::for_each_adapted(F&& f) const {
  for (index i = 0; i < derived().num_parts(); ++i)
    if (derived().takes_adapters(i)) f(derived().part(i), i);
}

template <typename Derived, typename Scalar>
const typename layer_base<Derived, Scalar>::adapter_type* layer_base<Derived, Scalar>::find(
    const std::string& name) const {
  const linear<Scalar>* ref = reference();
  return ref ? ref->core_find(name) : nullptr;
}

template <typename Derived, typename Scalar>
void layer_base<Derived, Scalar>::unknown(const std::string& name) const {
  std::string known;
  for (const auto& n : adapter_names()) known += (known.empty() ? "'" : ", '") + n + "'";
  throw name_error(detail::cat(derived().where(), ": no adapter named '", name,
                               "' (adapters: ", known.empty() ? "none" : known, ")"));
}

template <typename Derived, typename Scalar>
const typename layer_base<Derived, Scalar>::adapter_type& layer_base<Derived, Scalar>::checked(
    const std::string& name) const {
  const adapter_type* a = find(name);
  if (!a) unknown(name);
  return *a;
}

template <typename Derived, typename Scalar>
void layer_base<Derived, Scalar>::check_part(index part) const {
  if (part < 0 || part >= derived().num_parts() || !derived().takes_adapters(part))
    throw shape_error(detail::cat(derived().where(), ": expected a ", Derived::part_noun, " in [0, ",
                                  derived().num_parts(), ") that takes adapters", Derived::part_rule, ", got ",
                                  Derived::part_noun, " ", part));
}

template <typename Derived, typename Scalar>
std::vector<std::string> layer_base<Derived, Scalar>::adapter_names() const {
  const linear<Scalar>* ref = reference();
  return ref ? ref->core_names() : std::vector<std::string>{};
}

template <typename Derived, typename Scalar>
typename layer_base<Derived, Scalar>::adapter_type& layer_base<Derived, Scalar>::adapter(const std::string& name) {
  return const_cast<adapter_type&>(static_cast<const layer_base&>(*this).adapter(name));
}

template <typename Derived, typename Scalar>
const typename layer_base<Derived, Scalar>::adapter_type& layer_base<Derived, Scalar>::adapter(
    const std::string& name) const {
  static_assert(!Derived::multi_part, "lora: this layer holds one adapter per part; use adapter(name, part)");
  return checked(name);
}

template <typename Derived, typename Scalar>
typename layer_base<Derived, Scalar>::adapter_type& layer_base<Derived, Scalar>::adapter(const std::string& name,
                                                                                         index part) {
  return const_cast<adapter_type&>(static_cast<const layer_base&>(*this).adapter(name, part));
}

template <typename Derived, typename Scalar>
const typename layer_base<Derived, Scalar>::adapter_type& layer_base<Derived, Scalar>::adapter(const std::string& name,
                                                                                               index part) const {
  check_part(part);
  checked(name);
  return *derived().part(part).core_find(name);
}

template <typename Derived, typename Scalar>
const std::vector<std::string>& layer_base<Derived, Scalar>::active_adapters() const {
  static const std::vector<std::string> none;
  const linear<Scalar>* ref = reference();
  return ref ? ref->core_active() : none;
}

template <typename Derived, typename Scalar>
std::vector<std::string> layer_base<Derived, Scalar>::merged_adapters() const {
  const linear<Scalar>* ref = reference();
  return ref ? ref->core_merged_names() : std::vector<std::string>{};
}

template <typename Derived, typename Scalar>
bool layer_base<Derived, Scalar>::adapters_disabled() const {
  const linear<Scalar>* ref = reference();
  return ref && ref->core_disabled();
}

template <typename Derived, typename Scalar>
bool layer_base<Derived, Scalar>::merged() const {
  const linear<Scalar>* ref = reference();
  return ref && ref->core_merged();
}

// ---------------------------------------------------------------------------------------------------
// adding, replacing and removing adapters

template <typename Derived, typename Scalar>
void layer_base<Derived, Scalar>::changed() {
  derived().on_adapters_changed();
}

template <typename Derived, typename Scalar>
decltype(auto) layer_base<Derived, Scalar>::add_adapter(const std::string& name, const adapter_config& config) {
  const std::string who = derived().where();
  if (name.empty()) throw name_error(who + ": adapter names must be non-empty");
  if (find(name)) throw name_error(detail::cat(who, ": an adapter named '", name, "' already exists"));
  validate(config, detail::cat(who, " adapter '", name, "'"));
  derived().check_adapter_config(name, config);
  if (!reference()) throw config_error(who + ": no part of this layer takes adapters");
  const std::string label = detail::cat(who, " adapter '", name, "'");
  for_each_adapted([&](linear<Scalar>& p, index i) { p.core_add(name, derived().part_config(config, i), label); });
  changed();
  if constexpr (!Derived::multi_part) {
    return static_cast<adapter_type&>(*derived().part(0).core_find(name));
  }
}

template <typename Derived, typename Scalar>
template <typename DA, typename DB>
void layer_base<Derived, Scalar>::check_factors(const std::string& name, index part, index rank,
                                                const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b) const {
  static_assert(std::is_same_v<typename DA::Scalar, Scalar> && std::is_same_v<typename DB::Scalar, Scalar>,
                "lora: the factors' scalar type differs from the layer's (mismatched dtypes); cast them with "
                ".template cast<Scalar>()");
  const linear<Scalar>& p = derived().part(part);
  const std::string who = detail::cat(derived().where(), " adapter '", name, "'");
  if (a.rows() != rank || a.cols() != p.in_features())
    throw shape_error(detail::cat(who, ": A must be ", detail::shape_str(rank, p.in_features()),
                                  " (rank x in_features), got ", detail::shape_str(a.rows(), a.cols())));
  if (b.rows() != p.out_features() || b.cols() != rank)
    throw shape_error(detail::cat(who, ": B must be ", detail::shape_str(p.out_features(), rank),
                                  " (out_features x rank), got ", detail::shape_str(b.rows(), b.cols())));
}

template <typename Derived, typename Scalar>
template <typename DM>
typename layer_base<Derived, Scalar>::vector_type layer_base<Derived, Scalar>::checked_magnitude(
    const std::string& who, const Eigen::MatrixBase<DM>& m) const {
  static_assert(std::is_same_v<typename DM::Scalar, Scalar>,
                "lora: the magnitude's scalar type differs from the layer's (mismatched dtypes)");
  const index out = derived().part(0).out_features();
  if (m.size() != out || (m.rows() != 1 && m.cols() != 1))
    throw shape_error(detail::cat(who, ": the magnitude must be a vector of length out_features = ", out, ", got ",
                                  detail::shape_str(m.rows(), m.cols())));
  return m.reshaped();
}

template <typename Derived, typename Scalar>
template <typename DA, typename DB>
void layer_base<Derived, Scalar>::set_factors(const std::string& name, index part, const Eigen::MatrixBase<DA>& a,
                                              const Eigen::MatrixBase<DB>& b) {
  check_part(part);
  const adapter_type& ad = checked(name);
  if (ad.merged())
    throw state_error(detail::cat(derived().where(), ": adapter '", name, "' is merged; unmerge() before setting it"));
  check_factors(name, part, ad.rank(), a, b);
  derived().part(part).core_set_factors(name, a, b, static_cast<const vector_type*>(nullptr));
  changed();
}

template <typename Derived, typename Scalar>
template <typename DA, typename DB>
void layer_base<Derived, Scalar>::set_factors(const std::string& name, const Eigen::MatrixBase<DA>& a,
                                              const Eigen::MatrixBase<DB>& b) {
  static_assert(!Derived::multi_part, "lora: this layer holds one adapter per part; use set_factors(name, part, ...)");
  set_factors(name, index{0}, a, b);
}

template <typename Derived, typename Scalar>
template <typename DA, typename DB, typename DM>
void layer_base<Derived, Scalar>::set_factors(const std::string& name, const Eigen::MatrixBase<DA>& a,
                                              const Eigen::MatrixBase<DB>& b, const Eigen::MatrixBase<DM>& m) {
  static_assert(!Derived::multi_part, "lora: this layer holds one adapter per part; use set_factors(name, part, ...)");
  const adapter_type& ad = checked(name);
  const std::string who = detail::cat(derived().where(), " adapter '", name, "'");
  if (!ad.is_dora()) throw config_error(who + ": a magnitude was given, but the adapter does not use DoRA");
  if (ad.merged()) throw state_error(who + ": is merged; unmerge() before setting it");
  check_factors(name, 0, ad.rank(), a, b);
  const vector_type mv = checked_magnitude(who, m);
  derived().part(0).core_set_factors(name, a, b, &mv);
  changed();
}

template <typename Derived, typename Scalar>
template <typename DA, typename DB>
typename layer_base<Derived, Scalar>::adapter_type& layer_base<Derived, Scalar>::add_adapter(
    const std::string& name, const adapter_config& config, const Eigen::MatrixBase<DA>& a,
    const Eigen::MatrixBase<DB>& b) {
  static_assert(!Derived::multi_part, "lora: add factors per part with set_factors(name, part, A, B)");
  check_factors(name, 0, config.rank, a, b);  // before anything is added
  adapter_type& added = add_adapter(name, config);
  derived().part(0).core_set_factors(name, a, b, static_cast<const vector_type*>(nullptr));
  return added;
}

template <typename Derived, typename Scalar>
template <typename DA, typename DB, typename DM>
typename layer_base<Derived, Scalar>::adapter_type& layer_base<Derived, Scalar>::add_adapter(
    const std::string& name, const adapter_config& config, const Eigen::MatrixBase<DA>& a,
    const Eigen::MatrixBase<DB>& b, const Eigen::MatrixBase<DM>& m) {
  static_assert(!Derived::multi_part, "lora: add factors per part with set_factors(name, part, A, B)");
  const std::string who = detail::cat(derived().where(), " adapter '", name, "'");
  if (!config.use_dora) throw config_error(who + ": a magnitude was given, but config.use_dora is false");
  check_factors(name, 0, config.rank, a, b);
  const vector_type mv = checked_magnitude(who, m);  // before anything is added
  adapter_type& added = add_adapter(name, config);
  derived().part(0).core_set_factors(name, a, b, &mv);
  return added;
}

template <typename Derived, typename Scalar>
void layer_base<Derived, Scalar>::remove_adapter(const std::string& name) {
  if (checked(name).merged())
    throw state_error(detail::cat(derived().where(), ": adapter '", name, "' is merged; unmerge() before removing it"));
  for_each_adapted([&](linear<Scalar>& p, index) { p.core_remove(name); });
  changed();
}

// ---------------------------------------------------------------------------------------------------
// selecting adapters and modes

template <typename Derived, typename Scalar>
void layer_base<Derived, Scalar>::set_active(const std::vector<std::string>& names) {
  for (std::size_t i = 0; i < names.size(); ++i) {
    checked(names[i]);
    if (std::find(names.begin(), names.begin() + static_cast<std::ptrdiff_t>(i), names[i]) !=
        names.begin() + static_cast<std::ptrdiff_t>(i))
      throw name_error(detail::cat(derived().where(), ": adapter '", names[i], "' is listed twice in set_active"));
  }
  for (const auto& n : merged_adapters())
    if (std::find(names.begin(), names.end(), n) == names.end())
      throw state_error(detail::cat(derived().where(), ": adapter '", n,
                                    "' is merged into the weight and cannot be deactivated; unmerge() first"));
  for_each_adapted([&](linear<Scalar>& p, index) { p.core_set_active(names); });
  changed();
}

template <typename Derived, typename Scalar>
void layer_base<Derived, Scalar>::disable_adapters() {
  if (merged())
    throw state_error(derived().where() +
                      ": cannot disable adapters while some are merged into the weight; unmerge() first");
  for_each_adapted([&](linear<Scalar>& p, index) { p.core_set_disabled(true); });
  changed();
}

template <typename Derived, typename Scalar>
void layer_base<Derived, Scalar>::enable_adapters() {
  for_each_adapted([&](linear<Scalar>& p, index) { p.core_set_disabled(false); });
  changed();
}

template <typename Derived, typename Scalar>
void layer_base<Derived, Scalar>::train(bool on) {
  for (index i = 0; i < derived().num_parts(); ++i) derived().part(i).core_set_training(on);
}

// ---------------------------------------------------------------------------------------------------
// parameters

template <typename Derived, typename Scalar>
parameter_list<Scalar> layer_base<Derived, Scalar>::parameters() {
  parameter_list<Scalar> out;
  for_each_adapted([&](linear<Scalar>& p, index) {
    for (const auto& n : p.core_active()) {
      if (p.core_find(n)->merged()) continue;
      auto ps = p.core_parameters(n);
      out.insert(out.end(), ps.begin(), ps.end());
    }
  });
  return out;
}

template <typename Derived, typename Scalar>
parameter_list<Scalar> layer_base<Derived, Scalar>::parameters(const std::string& adapter_name) {
  if (checked(adapter_name).merged())
    throw state_error(detail::cat(derived().where(), ": adapter '", adapter_name,
                                  "' is merged into the weight and cannot be trained; unmerge() first"));
  parameter_list<Scalar> out;
  for_each_adapted([&](linear<Scalar>& p, index) {
    auto ps = p.core_parameters(adapter_name);
    out.insert(out.end(), ps.begin(), ps.end());
  });
  return out;
}

template <typename Derived, typename Scalar>
void layer_base<Derived, Scalar>::zero_grad() {
  for_each_adapted([&](linear<Scalar>& p, index) { p.core_zero_grad(); });
}

// ---------------------------------------------------------------------------------------------------
// merging

template <typename Derived, typename Scalar>
std::vector<std::string> layer_base<Derived, Scalar>::merge_choice(const std::vector<std::string>& names) const {
  const std::string who = derived().where();
  std::vector<std::string> chosen;
  if (names.empty()) {
    for (const auto& n : active_adapters())
      if (!checked(n).merged()) chosen.push_back(n);
  }
  for (const auto& n : names) {
    if (checked(n).merged()) throw state_error(detail::cat(who, ": adapter '", n, "' is already merged"));
    if (std::find(chosen.begin(), chosen.end(), n) != chosen.end())
      throw name_error(detail::cat(who, ": adapter '", n, "' is listed twice in merge"));
    chosen.push_back(n);
  }
  // DoRA rescales rows by m / ‖W + s B A‖, which depends on W: such an adapter merges alone, first.
  std::vector<std::string> dora;
  for (const auto& n : chosen)
    if (checked(n).is_dora()) dora.push_back(n);
  if (dora.size() > 1)
    throw state_error(detail::cat(who, ": merge DoRA adapters one at a time ('", dora[0], "' and '", dora[1],
                                  "' were given together)"));
  if (!dora.empty() && merged())
    throw state_error(detail::cat(who, ": DoRA adapter '", dora[0],
                                  "' must be merged before any other adapter (its norm is taken of the unmerged W); "
                                  "unmerge() first"));
  return chosen;
}

template <typename Derived, typename Scalar>
void layer_base<Derived, Scalar>::merge(const std::vector<std::string>& names, bool safe) {
  const std::vector<std::string> chosen = merge_choice(names);
  if (chosen.empty()) return;
  std::vector<std::pair<linear<Scalar>*, int>> done;  // parts merged by this call, and their record counts
  bool refused = false;
  for_each_adapted([&](linear<Scalar>& p, index) {
    if (refused) return;
    const int records = p.core_merge(chosen, safe);
    if (records < 0) {
      refused = true;
    } else {
      done.emplace_back(&p, records);
    }
  });
  if (refused) {
    for (auto& [p, records] : done) p->core_pop_merges(records);  // every part back, bit for bit
    std::string list;
    for (const auto& n : chosen) list += (list.empty() ? "'" : ", '") + n + "'";
    throw numeric_error(detail::cat(derived().where(), ": merging adapter(s) ", list,
                                    " would put non-finite values in the weight; the weight is unchanged"));
  }
  changed();
}

template <typename Derived, typename Scalar>
void layer_base<Derived, Scalar>::unmerge() {
  for_each_adapted([&](linear<Scalar>& p, index) { p.core_unmerge(); });
  changed();
}

template <typename Derived, typename Scalar>
typename layer_base<Derived, Scalar>::matrix_type layer_base<Derived, Scalar>::merge_and_unload(bool safe) {
  merge({}, safe);  // every part or none
  for_each_adapted([&](linear<Scalar>& p, index) { p.core_unload(); });
  changed();
  return derived().weight();
}

// ---------------------------------------------------------------------------------------------------
// accounting

template <typename Derived, typename Scalar>
template <typename X>
typename layer_base<Derived, Scalar>::matrix_type layer_base<Derived, Scalar>::forward(const Eigen::MatrixBase<X>& x) {
  matrix_type y(x.rows(), derived().out_features());
  derived().forward(x, y);
  return y;
}

template <typename Derived, typename Scalar>
template <typename DY>
typename layer_base<Derived, Scalar>::matrix_type layer_base<Derived, Scalar>::backward(
    const Eigen::MatrixBase<DY>& dy) {
  matrix_type dx(dy.rows(), derived().in_features());
  derived().backward(dy, dx);
  return dx;
}

template <typename Derived, typename Scalar>
template <typename X>
typename layer_base<Derived, Scalar>::matrix_type layer_base<Derived, Scalar>::infer(
    const Eigen::MatrixBase<X>& x) const {
  matrix_type y(x.rows(), derived().out_features());
  typename Derived::workspace_type ws;
  derived().infer(x, y, ws);
  return y;
}

template <typename Derived, typename Scalar>
template <typename X>
typename layer_base<Derived, Scalar>::matrix_type layer_base<Derived, Scalar>::infer(
    const Eigen::MatrixBase<X>& x, const adapter_routing& routing) const {
  matrix_type y(x.rows(), derived().out_features());
  typename Derived::workspace_type ws;
  derived().infer(x, routing, y, ws);
  return y;
}

template <typename Derived, typename Scalar>
void layer_base<Derived, Scalar>::check_routing(const adapter_routing& routing, index rows) const {
  if (routing.rows() != rows)
    throw shape_error(
        detail::cat(derived().where(), ": the adapter routing covers ", routing.rows(), " rows, the batch has ", rows));
  if (merged()) {
    std::string names;
    for (const auto& n : merged_adapters()) names += (names.empty() ? "'" : ", '") + n + "'";
    throw state_error(derived().where() + ": a batch routed to adapters cannot run while adapters are merged (" +
                      names + "): W holds them for every row; unmerge() first");
  }
  if (routing.source() != nullptr) return;  // names, DoRA: checked when the source was made and bound
  for (const auto& g : routing.groups()) {
    const adapter_type* a = find(g.adapter);
    if (a == nullptr) {
      if (routing.missing() == missing_adapter::base) continue;
      unknown(g.adapter);
    }
    if (a->is_dora())
      throw config_error(derived().where() + ": adapter '" + g.adapter +
                         "' is a DoRA adapter, which rescales the base output that a routed batch shares; "
                         "run its rows in a batch of their own");
  }
}

template <typename Derived, typename Scalar>
parameter_report layer_base<Derived, Scalar>::report() const {
  parameter_report r;
  for (index i = 0; i < derived().num_parts(); ++i) r += derived().part(i).core_report();
  derived().add_cache_bytes(r);
  return r;
}

}  // namespace lora

#include "detail/layer_hotswap.hpp"
