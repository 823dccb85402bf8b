// examples/common/serve.hpp: generation for many requests on one base, each request naming its adapter
// (gpt2_serve). Three ways to serve the same requests, for comparison:
//   mixed       every request in one batch: the prompts fed together, then one token per live request per
//               step, every projection run once over all of them with each row through its own adapter
//               (gpt2::infer_batch; docs/CONVENTIONS.md §mixed)
//   by adapter  one adapter at a time: the requests of each adapter as a batch of their own, one batch
//               after another (what a server that cannot mix adapters in a batch does)
//   one by one  each request alone with its adapter the only active one (gpt2::infer, no routing)
// Each request gets at most `length` tokens and stops at <|endoftext|>; it never slides its context: a
// prompt keeps its last n_positions − 1 tokens and generation stops when the context is full.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "lm.hpp"
#include "progress.hpp"

namespace ex {

struct serve_request {
  std::string adapter;  ///< an adapter's name, or lora::base_adapter
  token_list prompt;
};

/// What one way of serving produced: each request's generated tokens, and its time.
struct serve_run {
  std::vector<token_list> outputs;
  double seconds = 0;
  std::int64_t prompt_tokens = 0, generated_tokens = 0;
  double tokens_per_second() const { return seconds > 0 ? static_cast<double>(generated_tokens) / seconds : 0.0; }
};

/// The requests `which` (indices into reqs) as one mixed batch; outputs[k] for which[k].
serve_run serve_batch(const lm& model, const std::vector<serve_request>& reqs, const std::vector<std::size_t>& which,
                      const generate_options& o, const lora::models::tokenizer& tok, progress_bar* bar = nullptr);
/// Every request in one mixed batch.
serve_run serve_mixed(const lm& model, const std::vector<serve_request>& reqs, const generate_options& o,
                      const lora::models::tokenizer& tok, progress_bar* bar = nullptr);
/// One batch per adapter, in order of first appearance.
serve_run serve_by_adapter(const lm& model, const std::vector<serve_request>& reqs, const generate_options& o,
                           const lora::models::tokenizer& tok);
/// Each request alone with its adapter the only active one in every projection that holds it (the
/// model's active adapters are changed).
serve_run serve_one_by_one(lm& model, const std::vector<serve_request>& reqs, const generate_options& o,
                           const lora::models::tokenizer& tok);

// ---------------------------------------------------------------------------------------------------

namespace detail {

/// The part of a prompt that is fed (its last n_positions − 1 tokens; <|endoftext|> for an empty one) and
/// how many tokens may follow it.
inline token_list fed_prompt(const token_list& prompt, std::size_t ctx, std::int32_t eot) {
  if (prompt.empty()) return {eot};
  const std::size_t keep = std::min(prompt.size(), ctx - 1);
  return token_list(prompt.end() - static_cast<std::ptrdiff_t>(keep), prompt.end());
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace detail

inline serve_run serve_batch(const lm& model, const std::vector<serve_request>& reqs,
                             const std::vector<std::size_t>& which, const generate_options& o,
                             const lora::models::tokenizer& tok, progress_bar* bar) {
  const auto ctx = static_cast<std::size_t>(model.config().n_positions);
  const std::size_t n = which.size();
  serve_run run;
  run.outputs.assign(n, {});
  std::vector<lm::cache_type> caches;
  std::vector<lora::rng> gens;
  std::vector<token_list> feed(n);
  std::vector<std::size_t> budget(n);
  for (std::size_t k = 0; k < n; ++k) {
    caches.push_back(model.make_cache());
    gens.emplace_back(o.seed + which[k]);  // a request samples the same way however it is served
    feed[k] = detail::fed_prompt(reqs[which[k]].prompt, ctx, tok.eot_id());
    budget[k] = std::min(o.length, ctx - feed[k].size());
    run.prompt_tokens += static_cast<std::int64_t>(feed[k].size());
  }
  lora::models::gpt2_batch_workspace<float> ws;
  std::vector<lora::matrix<float>> logits;
  // Requests still generating, kept grouped by adapter (each adapter's rows consecutive: its products run
  // in place, nothing gathered); the routing is rebuilt only when the rows change (prefill, then a request
  // finishing).
  std::vector<std::size_t> live;
  for (std::size_t k = 0; k < n; ++k)
    if (budget[k] > 0) live.push_back(k);
  std::stable_sort(live.begin(), live.end(),
                   [&](std::size_t a, std::size_t b) { return reqs[which[a]].adapter < reqs[which[b]].adapter; });
  const auto t0 = std::chrono::steady_clock::now();
  lora::adapter_routing routing;
  bool prefill = true, rows_changed = true;
  std::vector<token_list> seqs;
  std::vector<lm::cache_type*> cs;
  while (!live.empty()) {
    seqs.clear();
    cs.clear();
    for (const std::size_t k : live) {
      seqs.push_back(feed[k]);
      cs.push_back(&caches[k]);
    }
    if (rows_changed) {
      std::vector<std::string> names;
      std::vector<lora::index> lengths;
      for (const std::size_t k : live) {
        names.push_back(reqs[which[k]].adapter);
        lengths.push_back(static_cast<lora::index>(feed[k].size()));
      }
      routing = model.routing(names, lengths);
    }
    model.infer_batch(seqs, cs, routing, ws, &logits);
    rows_changed = prefill;  // the prompts' lengths, then one token each
    prefill = false;
    std::vector<std::size_t> still;
    for (std::size_t j = 0; j < live.size(); ++j) {
      const std::size_t k = live[j];
      const std::int32_t next = pick_token(logits[j].col(logits[j].cols() - 1), o, gens[k], tok.vocab_size());
      const bool eot = o.stop_at_eot && next == tok.eot_id();
      if (!eot) {
        run.outputs[k].push_back(next);
        ++run.generated_tokens;
      }
      feed[k].assign(1, next);
      if (!eot && run.outputs[k].size() < budget[k]) still.push_back(k);
    }
    rows_changed = rows_changed || still.size() != live.size();
    live.swap(still);
    if (bar != nullptr) bar->step(static_cast<lora::index>(live.size()), 0.0);
  }
  run.seconds = detail::seconds_since(t0);
  return run;
}

inline serve_run serve_mixed(const lm& model, const std::vector<serve_request>& reqs, const generate_options& o,
                             const lora::models::tokenizer& tok, progress_bar* bar) {
  std::vector<std::size_t> all(reqs.size());
  for (std::size_t k = 0; k < all.size(); ++k) all[k] = k;
  return serve_batch(model, reqs, all, o, tok, bar);
}

inline serve_run serve_by_adapter(const lm& model, const std::vector<serve_request>& reqs, const generate_options& o,
                                  const lora::models::tokenizer& tok) {
  serve_run total;
  total.outputs.assign(reqs.size(), {});
  std::vector<std::string> order;
  for (const auto& r : reqs)
    if (std::find(order.begin(), order.end(), r.adapter) == order.end()) order.push_back(r.adapter);
  for (const auto& name : order) {
    std::vector<std::size_t> which;
    for (std::size_t k = 0; k < reqs.size(); ++k)
      if (reqs[k].adapter == name) which.push_back(k);
    const serve_run part = serve_batch(model, reqs, which, o, tok);
    for (std::size_t j = 0; j < which.size(); ++j) total.outputs[which[j]] = part.outputs[j];
    total.seconds += part.seconds;
    total.prompt_tokens += part.prompt_tokens;
    total.generated_tokens += part.generated_tokens;
  }
  return total;
}

inline serve_run serve_one_by_one(lm& model, const std::vector<serve_request>& reqs, const generate_options& o,
                                  const lora::models::tokenizer& tok) {
  const auto ctx = static_cast<std::size_t>(model.config().n_positions);
  serve_run run;
  for (std::size_t k = 0; k < reqs.size(); ++k) {
    const bool base = lora::adapter_routing::is_base(reqs[k].adapter);
    for (auto& [path, layer] : model.named_layers())
      layer->set_active(!base && layer->has_adapter(reqs[k].adapter) ? std::vector<std::string>{reqs[k].adapter}
                                                                     : std::vector<std::string>{});
    generate_options ok = o;
    ok.seed = o.seed + k;
    const token_list fed = detail::fed_prompt(reqs[k].prompt, ctx, tok.eot_id());
    ok.length = std::min(o.length, ctx - fed.size());  // no sliding window, as in serve_batch
    const auto t0 = std::chrono::steady_clock::now();
    run.outputs.push_back(ok.length > 0 ? generate(model, fed, ok, tok) : token_list{});
    run.seconds += detail::seconds_since(t0);
    run.prompt_tokens += static_cast<std::int64_t>(fed.size());
    run.generated_tokens += static_cast<std::int64_t>(run.outputs.back().size());
  }
  return run;
}

}  // namespace ex
