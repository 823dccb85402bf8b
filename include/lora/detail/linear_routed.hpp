// lora/detail/linear_routed.hpp: linear's inference of a batch whose rows use different adapters
// (declared in linear.hpp; adapter_routing.hpp, docs/CONVENTIONS.md §mixed).
//
// One product with W for every row, then per routed adapter a, over its rows R (SGMV-style):
//   H = X[R] Aᵀ          (m x r: the rows gathered, or viewed in place when consecutive)
//   H ← s_a · diag(c[R]) H
//   Y[R] += H Bᵀ         (m x out: added in place when consecutive, else computed then scattered)
// The rows of different adapters never meet in a product, so row i equals infer() of row i alone with its
// adapter active, up to the order of float additions inside the products. A routing bound to an
// adapter_source takes each group's (A, B, s) from the source instead of the layer's own adapters.
#pragma once

#include "../linear.hpp"

namespace lora {

namespace detail {

/// A group's rows as an index vector for Eigen's indexed views, without a copy (an indexed view keeps its
/// index container by value: a std::vector would be copied, an allocation per call).
inline Eigen::Map<const Eigen::Matrix<index, Eigen::Dynamic, 1>> rows_of(const adapter_routing::group& g) {
  return {g.rows.data(), static_cast<index>(g.rows.size())};
}

}  // namespace detail

template <typename Scalar>
template <typename Derived>
void linear<Scalar>::infer(const Eigen::MatrixBase<Derived>& x, const adapter_routing& routing,
                           Eigen::Ref<matrix_type> y, inference_workspace<Scalar>& ws) const {
  check_same_scalar<Derived>();
  check_input(x.rows(), x.cols(), "input X");
  if (y.rows() != x.rows() || y.cols() != m_out)
    throw shape_error(detail::cat(where(), ": output Y must be ", detail::shape_str(x.rows(), m_out), ", got ",
                                  detail::shape_str(y.rows(), y.cols())));
  this->check_routing(routing, x.rows());
  detail::input_cache<Scalar> view;
  view.bind(x);
  run_infer_routed(view, routing, y, ws);
}

template <typename Scalar>
void linear<Scalar>::run_infer_routed(const detail::input_cache<Scalar>& view, const adapter_routing& routing,
                                      Eigen::Ref<matrix_type> y, inference_workspace<Scalar>& ws) const {
  view.visit([&](const auto& x) {
    base_product(x, y, ws.quant);  // the base alone for every row: no DoRA gain, nothing merged (checked)
    if (has_bias()) y.rowwise() += m_bias.transpose();
    if (m_disabled) return;  // disable_adapters() wins over the routing, as in PEFT
    add_routed_terms(routing, y, ws, [&](const matrix_type& a, const adapter_routing::group& g, auto& h) {
      const auto m = static_cast<index>(g.rows.size());
      if (g.first >= 0) {
        h.noalias() = x.middleRows(g.first, m) * a.transpose();
        return;
      }
      if (ws.rows_in.size() < static_cast<std::size_t>(m * m_in)) ws.rows_in.resize(static_cast<std::size_t>(m * m_in));
      Eigen::Map<matrix_type> xg(ws.rows_in.data(), m, m_in);  // X[R]
      xg = x(detail::rows_of(g), Eigen::all);  // column by column: each column of X read in row order, not row by row
      h.noalias() = xg * a.transpose();
    });
  });
}

template <typename Scalar>
template <typename HOf>
void linear<Scalar>::add_routed_terms(const adapter_routing& routing, Eigen::Ref<matrix_type> y,
                                      inference_workspace<Scalar>& ws, HOf&& h_of) const {
  const adapter_source* source = routing.source();
  const auto& groups = routing.groups();
  for (std::size_t gi = 0; gi < groups.size(); ++gi) {
    const adapter_routing::group& g = groups[gi];
    const matrix_type *fa = nullptr, *fb = nullptr;  // A (r x in), B (out x r)
    Scalar s{};
    if (source != nullptr) {
      const routed_factors<Scalar>* f = source->find<Scalar>(gi, *this);
      if (f == nullptr) continue;  // the adapter has no module on this part
      fa = &f->a, fb = &f->b, s = f->scaling;
    } else {
      const adapter_type* a = core_find(g.adapter);
      if (a == nullptr) continue;  // checked by the layer: missing_adapter::base, or a part without adapters
      fa = &a->m_a, fb = &a->m_b, s = a->m_scaling;
    }
    const auto m = static_cast<index>(g.rows.size()), r = fa->rows();
    if (ws.buffer.size() < static_cast<std::size_t>(m * r)) ws.buffer.resize(static_cast<std::size_t>(m * r));
    Eigen::Map<matrix_type> h(ws.buffer.data(), m, r);
    h_of(*fa, g, h);  // H = X[R] Aᵀ   (m x r)
    h *= s;
    for (std::size_t k = 0; k < g.scales.size(); ++k) h.row(static_cast<index>(k)) *= static_cast<Scalar>(g.scales[k]);
    if (g.first >= 0) {
      y.middleRows(g.first, m).noalias() += h * fb->transpose();  // Y[R] += (s c H) Bᵀ
      continue;
    }
    if (ws.rows_out.size() < static_cast<std::size_t>(m * m_out))
      ws.rows_out.resize(static_cast<std::size_t>(m * m_out));
    Eigen::Map<matrix_type> yg(ws.rows_out.data(), m, m_out);
    yg.noalias() = h * fb->transpose();
    y(detail::rows_of(g), Eigen::all) += yg;  // scatter-add, column by column
  }
}

}  // namespace lora
