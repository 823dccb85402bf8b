// lora/models/gpt2_config.hpp: the shape of a GPT-2-family model, as Hugging Face's config.json gives it.
//
// GPT-2 small is {n_layer 12, n_head 12, n_embd 768, n_positions 1024, vocab_size 50257}: 124M parameters
// (docs/CONVENTIONS.md §gpt2). The built-in byte-level model of examples/gpt2_finetune has vocab_size 257.
#pragma once

#include <string>

#include "../config.hpp"
#include "../error.hpp"

namespace lora::models {

struct gpt2_config {
  index n_layer = 12;                ///< Transformer blocks.
  index n_head = 12;                 ///< Attention heads; divides n_embd.
  index n_embd = 768;                ///< Model width d.
  index n_positions = 1024;          ///< Context length (rows of wpe).
  index vocab_size = 50257;          ///< Rows of wte (the LM head is tied to it).
  double layer_norm_epsilon = 1e-5;  ///< LayerNorm's ε.

  /// Width of one head, n_embd / n_head.
  index head_dim() const noexcept { return n_head > 0 ? n_embd / n_head : 0; }
  /// Width of the MLP, 4 n_embd (GPT-2's n_inner default).
  index n_inner() const noexcept { return 4 * n_embd; }
  /// Every parameter counted once (wte is the LM head too):
  ///   V d + P d + L (12 d² + 13 d) + 2 d.
  index num_parameters() const noexcept;
  /// config_error naming `where` and the offending field unless every size is positive, n_embd is a
  /// multiple of n_head and ε is positive and finite.
  void validate(const std::string& where = "gpt2_config") const;
};

/// GPT-2 small's shape.
inline gpt2_config gpt2_small() { return {}; }

// ------------------------------------------------------------------------------------------------

inline index gpt2_config::num_parameters() const noexcept {
  const index d = n_embd;
  return vocab_size * d + n_positions * d + n_layer * (12 * d * d + 13 * d) + 2 * d;
}

inline void gpt2_config::validate(const std::string& where) const {
  const auto positive = [&](const char* field, index v) {
    if (v <= 0) throw config_error(where + ": " + field + " must be positive, got " + std::to_string(v));
  };
  positive("n_layer", n_layer);
  positive("n_head", n_head);
  positive("n_embd", n_embd);
  positive("n_positions", n_positions);
  positive("vocab_size", vocab_size);
  // Upper bounds far above any GPT-2-family model, so that sizes and the parameter count never overflow.
  const auto at_most = [&](const char* field, index v, index max) {
    if (v > max)
      throw config_error(where + ": " + field + " must be at most " + std::to_string(max) + ", got " +
                         std::to_string(v));
  };
  at_most("n_layer", n_layer, index{1} << 12);
  at_most("n_head", n_head, index{1} << 12);
  at_most("n_embd", n_embd, index{1} << 16);
  at_most("n_positions", n_positions, index{1} << 20);
  at_most("vocab_size", vocab_size, index{1} << 22);
  if (n_embd % n_head != 0)
    throw config_error(where + ": n_embd must be a multiple of n_head, got n_embd " + std::to_string(n_embd) +
                       " and n_head " + std::to_string(n_head));
  if (!(layer_norm_epsilon > 0.0) || layer_norm_epsilon > 1.0)
    throw config_error(where + ": layer_norm_epsilon must be in (0, 1], got " + std::to_string(layer_norm_epsilon));
}

}  // namespace lora::models
