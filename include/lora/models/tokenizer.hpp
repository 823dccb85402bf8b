// lora/models/tokenizer.hpp: the tokenizers of the GPT-2 language model, and `tokenizer`, which holds
// either and picks one for a model folder:
//   - byte_tokenizer (byte_tokenizer.hpp): 257 tokens, ids 0..255 the bytes, 256 <|endoftext|>;
//   - bpe_tokenizer (bpe_tokenizer.hpp): GPT-2's byte-level BPE from vocab.json + merges.txt.
// Both encode any bytes (ill-formed UTF-8 included) and decode gives them back; both read
// "<|endoftext|>" in text as plain text unless special_tokens::allowed is passed.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <variant>
#include <vector>

#include "../error.hpp"
#include "bpe_tokenizer.hpp"
#include "byte_tokenizer.hpp"

namespace lora::models {

/// A byte_tokenizer or a bpe_tokenizer behind one interface.
class tokenizer {
 public:
  // Implicit on purpose: a byte_tokenizer or a bpe_tokenizer is a tokenizer.
  tokenizer(byte_tokenizer t) : m_impl(t) {}            // NOLINT(google-explicit-constructor)
  tokenizer(bpe_tokenizer t) : m_impl(std::move(t)) {}  // NOLINT(google-explicit-constructor)

  /// The tokenizer of the model in `dir` whose embedding has `model_vocab_size` rows:
  ///   - GPT-2's BPE when `dir` holds vocab.json and merges.txt (config_error when the model has fewer
  ///     rows than the BPE has tokens; more rows, e.g. a vocabulary padded to a multiple of 64, are
  ///     fine: the extra ids are never produced);
  ///   - otherwise the byte tokenizer when model_vocab_size is 257;
  ///   - otherwise config_error (as when only one of the two BPE files is there).
  static tokenizer from_folder(const std::string& dir, std::int64_t model_vocab_size);

  std::vector<std::int32_t> encode(std::string_view text, special_tokens special = special_tokens::as_text) const;
  std::string decode(const std::vector<std::int32_t>& ids) const;
  std::string token_bytes(std::int32_t id) const;
  std::int32_t vocab_size() const noexcept;
  std::int32_t eot_id() const noexcept;

  /// "byte" or "gpt2_bpe".
  std::string_view kind() const noexcept { return is_bpe() ? "gpt2_bpe" : "byte"; }
  bool is_bpe() const noexcept { return std::holds_alternative<bpe_tokenizer>(m_impl); }
  /// The BPE tokenizer (state_error when this is the byte tokenizer).
  const bpe_tokenizer& bpe() const;

 private:
  std::variant<byte_tokenizer, bpe_tokenizer> m_impl;
};

// ---------------------------------------------------------------------------------------------------

inline tokenizer tokenizer::from_folder(const std::string& dir, std::int64_t model_vocab_size) {
  const std::filesystem::path base(dir);
  std::error_code ec;
  const bool has_vocab = std::filesystem::is_regular_file(base / "vocab.json", ec);
  const bool has_merges = std::filesystem::is_regular_file(base / "merges.txt", ec);
  if (has_vocab && has_merges) {
    bpe_tokenizer bpe = bpe_tokenizer::load(dir);
    if (model_vocab_size < bpe.vocab_size()) {
      throw config_error(lora::detail::cat("the model in ", dir, " has vocab_size ", model_vocab_size,
                                           " but its tokenizer (vocab.json + merges.txt) has ", bpe.vocab_size(),
                                           " tokens: expected vocab_size >= ", bpe.vocab_size()));
    }
    return tokenizer(std::move(bpe));
  }
  if (has_vocab || has_merges) {
    throw config_error(lora::detail::cat(dir, " has ",
                                         has_vocab ? "vocab.json but no merges.txt" : "merges.txt but no vocab.json",
                                         ": GPT-2's BPE tokenizer needs both"));
  }
  if (model_vocab_size == byte_tokenizer::vocab_size()) return tokenizer(byte_tokenizer{});
  throw config_error(lora::detail::cat(dir,
                                       " has no vocab.json + merges.txt, so the tokenizer would be the byte tokenizer, "
                                       "but the model has vocab_size ",
                                       model_vocab_size, ": expected ", byte_tokenizer::vocab_size()));
}

inline std::vector<std::int32_t> tokenizer::encode(std::string_view text, special_tokens special) const {
  return std::visit([&](const auto& t) { return t.encode(text, special); }, m_impl);
}

inline std::string tokenizer::decode(const std::vector<std::int32_t>& ids) const {
  return std::visit([&](const auto& t) { return t.decode(ids); }, m_impl);
}

inline std::string tokenizer::token_bytes(std::int32_t id) const {
  return std::visit([&](const auto& t) { return std::string(t.token_bytes(id)); }, m_impl);
}

inline std::int32_t tokenizer::vocab_size() const noexcept {
  return std::visit([](const auto& t) { return t.vocab_size(); }, m_impl);
}

inline std::int32_t tokenizer::eot_id() const noexcept {
  return std::visit([](const auto& t) { return t.eot_id(); }, m_impl);
}

inline const bpe_tokenizer& tokenizer::bpe() const {
  if (const auto* b = std::get_if<bpe_tokenizer>(&m_impl)) return *b;
  throw state_error("this tokenizer is the byte tokenizer, not GPT-2's BPE");
}

}  // namespace lora::models
