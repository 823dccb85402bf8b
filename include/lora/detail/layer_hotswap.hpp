// lora/detail/layer_hotswap.hpp: layer_base's hot-swap (declared in layer.hpp; docs/CONVENTIONS.md
// §registry). Replacing an adapter's factors in place keeps its memory, its name and its place in the
// active set, so a server that swaps adapters often does not allocate; zero-padding every adapter to one
// rank first (prepare_for_hotswap) makes every later swap up to that rank fit. The zero rows of A and
// columns of B add nothing: s B A = s [B 0] [A; 0].
#pragma once

#include <string>
#include <vector>

#include "../layer.hpp"

namespace lora {

template <typename Derived, typename Scalar>
template <typename DA, typename DB>
bool layer_base<Derived, Scalar>::hotswap_adapter(const std::string& name, const adapter_config& config,
                                                  const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b) {
  static_assert(!Derived::multi_part,
                "lora: this layer holds one adapter per part; use hotswap_adapter(name, part, ...)");
  return hotswap_adapter(name, index{0}, config, a, b);
}

template <typename Derived, typename Scalar>
template <typename DA, typename DB>
bool layer_base<Derived, Scalar>::hotswap_adapter(const std::string& name, index part, const adapter_config& config,
                                                  const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b) {
  check_part(part);
  const adapter_type& old = checked(name);
  const std::string who = detail::cat(derived().where(), " adapter '", name, "'");
  if (old.merged())
    throw state_error(who +
                      ": is merged, so W holds it; hot-swapping it would leave the old adapter in the "
                      "weight. unmerge() first");
  if (old.is_dora() || config.use_dora)
    throw config_error(who + ": DoRA adapters cannot be hot-swapped (their magnitude depends on W and B A); " +
                       "remove it and add the new one");
  if (config.use_rslora != old.config().use_rslora || config.dropout != old.config().dropout)
    throw config_error(detail::cat(who,
                                   ": a hot-swapped adapter must keep use_rslora and dropout (PEFT's rule); "
                                   "the adapter has use_rslora = ",
                                   old.config().use_rslora, ", dropout = ", old.config().dropout, ", the new one ",
                                   config.use_rslora, ", ", config.dropout));
  validate(config, who);
  check_factors(name, part, config.rank, a, b);
  const bool in_place = derived().part(part).core_hotswap(name, a.derived(), b.derived(), config);
  changed();
  return in_place;
}

template <typename Derived, typename Scalar>
void layer_base<Derived, Scalar>::prepare_for_hotswap(index target_rank) {
  const std::string who = derived().where();
  if (merged()) throw state_error(who + ": prepare_for_hotswap while adapters are merged; unmerge() first");
  const std::vector<std::string> names = adapter_names();
  for_each_adapted([&](const linear<Scalar>& p, index) {  // every check before any change
    for (const auto& n : names)
      if (const index r = p.core_find(n)->rank(); target_rank < r)
        throw config_error(detail::cat(who, ": prepare_for_hotswap target rank ", target_rank, " is below adapter '", n,
                                       "''s rank ", r, " (padding cannot shrink an adapter)"));
  });
  for_each_adapted([&](linear<Scalar>& p, index) {
    for (const auto& n : names) p.core_pad_rank(n, target_rank);
  });
  changed();
}

}  // namespace lora
