// The reduction overlaps GPT-2's backward: gpt2::set_backward_hook calls its function after each block's
// backward, from the last block to the first, and marking that block's adapter parameters ready there
// launches the buckets of the later blocks before the earlier blocks' backward runs. The reduced
// gradients of sharded sequences equal one process's gradient of the whole batch. Usage: under mpirun.
#include <cmath>
#include <cstdio>
#include <lora/dist/mpi.hpp>
#include <lora/models/gpt2.hpp>
#include <lora/optim/sgd.hpp>
#include <memory>
#include <string>
#include <vector>

#include "mpi_support.hpp"

namespace {

using lora::index;
using model = lora::models::gpt2<double>;

std::unique_ptr<model> make_model() {
  lora::models::gpt2_config c;
  c.n_layer = 3;
  c.n_head = 2;
  c.n_embd = 16;
  c.n_positions = 8;
  c.vocab_size = 20;
  auto m = std::make_unique<model>(lora::models::gpt2_weights<double>::random(c, 5));
  lora::adapter_config a;
  a.rank = 2;
  a.seed = 9;
  m->add_adapter("default", a, {"c_attn", "c_proj", "c_fc"});
  // B starts at 0; make it non-zero so that every adapter gradient is non-trivial.
  for (auto& p : m->parameters())
    for (index k = 0; k < p.size(); ++k) p.value_data[k] = 0.1 * std::sin(static_cast<double>(k) + 1.0);
  return m;
}

/// Block l's trainable parameters: its four projections' adapters, in parameters() order.
lora::parameter_list<double> block_parameters(model& m, index l) {
  lora::parameter_list<double> out;
  for (int k = 0; k < lora::models::gpt2_module_count; ++k)
    for (const auto& p : m.layer(l, static_cast<lora::models::gpt2_module>(k)).parameters()) out.push_back(p);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  lora::dist::mpi_context ctx(&argc, &argv);
  return lora::dist::run_or_abort(ctx, [&] {
    using lora::index;  // not ::index from <strings.h>
    mpi_test::checks check{ctx.rank()};
    constexpr index batch = 5, seq = 8;
    std::vector<std::int32_t> tokens(batch * seq), targets(batch * seq);
    for (index i = 0; i < batch * seq; ++i) {
      tokens[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((7 * i + 3) % 20);
      targets[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((5 * i + 1) % 20);
    }
    // The reference: one process, the whole batch.
    const auto reference_model = make_model();
    model& reference = *reference_model;
    reference.train(true);
    reference.zero_grad();
    reference.forward_backward(tokens, targets, batch, seq);
    const auto expected = reference.parameters();

    const auto model_ptr = make_model();
    model& m = *model_ptr;
    m.train(true);
    m.zero_grad();
    const auto params = m.parameters();
    lora::optim::sgd<double> opt(params, {});
    // Buckets of at most one block's adapters (a block holds 2 x (2x16 + 48x2 + ...) doubles): several.
    lora::dist::gradient_reducer<double> reducer(ctx, params, 1024);
    const index L = m.config().n_layer;
    std::vector<index> order;
    std::vector<std::int64_t> launched_at;  // allreduces launched when each hook returns
    m.set_backward_hook([&](index l) {
      order.push_back(l);
      reducer.mark_ready(block_parameters(m, l));
      launched_at.push_back(reducer.stats().allreduces);
    });
    const auto local = lora::dist::shard(static_cast<std::size_t>(batch), ctx.rank(), ctx.size());
    reducer.begin(local.weight());
    const auto first = static_cast<std::ptrdiff_t>(local.begin * seq),
               last = static_cast<std::ptrdiff_t>(local.end * seq);
    m.forward_backward({tokens.begin() + first, tokens.begin() + last},
                       {targets.begin() + first, targets.begin() + last}, static_cast<index>(local.size()), seq);
    reducer.finish();
    m.set_backward_hook({});

    bool descending = static_cast<index>(order.size()) == L;
    for (index i = 0; descending && i < L; ++i) descending = order[static_cast<std::size_t>(i)] == L - 1 - i;
    check.expect(descending, "the hook ran once per block, from the last block to the first");
    check.expect(reducer.bucket_count() >= 3, "several buckets (" + std::to_string(reducer.bucket_count()) + ")");
    check.expect(!launched_at.empty() && launched_at.front() > 0 && launched_at.front() < launched_at.back(),
                 "buckets of the last block launched before the earlier blocks' backward");
    double worst = 0;
    for (std::size_t k = 0; k < params.size(); ++k) {
      const double scale = expected[k].grad().cwiseAbs().maxCoeff();
      worst = std::max(worst, (params[k].grad() - expected[k].grad()).cwiseAbs().maxCoeff() / scale);
    }
    char what[128];
    std::snprintf(what, sizeof what, "reduced gradients equal one process's (largest relative difference %.3g)", worst);
    check.expect(worst < 1e-12, what);
    return check.failed == 0 ? 0 : 1;
  });
}
