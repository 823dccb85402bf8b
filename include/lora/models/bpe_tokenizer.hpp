// lora/models/bpe_tokenizer.hpp: GPT-2's byte-level BPE tokenizer, built from its vocab.json and
// merges.txt (detail/bpe_files.hpp reads them), encoding exactly as GPT-2's encoder.py:
//
//   1. the text is split into pieces by GPT-2's regex (detail/gpt2_pretokenize.hpp);
//   2. each piece starts as one token per byte; while some adjacent pair (a, b) is a merge, the pair of
//      lowest rank (earliest line of merges.txt) is merged into the token a+b at every place it occurs,
//      left to right without overlaps; the ids of the remaining tokens are the piece's ids.
//
// Any bytes can be encoded (ill-formed UTF-8 included: see detail/gpt2_pretokenize.hpp), and decode
// gives them back. Step 2 is quadratic in the length of a piece, as in encoder.py; a cache shared by
// the copies of a tokenizer keeps the ids of pieces already seen.
//
// Loading checks the files: every id in [0, n) used exactly once, every merge made of tokens of the
// vocabulary whose concatenation is a token too, one token per byte, and "<|endoftext|>" present.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "byte_tokenizer.hpp"
#include "detail/bpe_files.hpp"
#include "detail/gpt2_pretokenize.hpp"

namespace lora::models {

namespace detail {

/// Piece bytes -> ids, shared by the copies of a tokenizer; cleared when it reaches max_entries.
struct bpe_cache {
  static constexpr std::size_t max_entries = 1u << 16;
  std::mutex mutex;
  std::unordered_map<std::string, std::vector<std::int32_t>> ids;
};

}  // namespace detail

/// GPT-2's byte-level BPE. Copies share one cache of encoded pieces (behind a mutex): encode is thread-safe.
class bpe_tokenizer {
 public:
  /// `dir`/vocab.json and `dir`/merges.txt.
  static bpe_tokenizer load(const std::string& dir);
  /// io_error when a file cannot be read, format_error (naming the file and the key or line) when it
  /// breaks the rules above.
  static bpe_tokenizer load(const std::string& vocab_path, const std::string& merges_path);

  /// The ids of `text`; "<|endoftext|>" in the text is plain text unless `special` is allowed.
  std::vector<std::int32_t> encode(std::string_view text, special_tokens special = special_tokens::as_text) const;
  /// The bytes of the tokens, concatenated. Throws name_error for an id outside [0, vocab_size()).
  std::string decode(const std::vector<std::int32_t>& ids) const;
  /// The bytes of one token (not its text in GPT-2's alphabet: id 220 is " ", not "Ġ").
  const std::string& token_bytes(std::int32_t id) const;

  std::int32_t vocab_size() const noexcept { return static_cast<std::int32_t>(m_tokens.size()); }
  /// The id of "<|endoftext|>" (50256 in GPT-2's files).
  std::int32_t eot_id() const noexcept { return m_eot; }
  /// The rank of merge (left, right), or -1 when the pair is not a merge.
  std::int32_t merge_rank(std::int32_t left, std::int32_t right) const;

 private:
  struct merge_rule {
    std::int32_t rank;
    std::int32_t id;  ///< the token left+right
  };
  static std::uint64_t pair_key(std::int32_t left, std::int32_t right) noexcept {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(left)) << 32) | static_cast<std::uint32_t>(right);
  }

  bpe_tokenizer() = default;
  void index_tokens(const std::string& vocab_path);
  void index_merges(const std::string& merges_path, const std::vector<detail::merge_line>& merges);
  std::int32_t token_id(const std::string& merges_path, std::size_t line, const std::string& bytes) const;
  /// Step 2 on one piece, appending its ids to `out`.
  void encode_piece(std::string_view piece, std::vector<std::int32_t>& out) const;
  std::vector<std::int32_t> merge_piece(std::string_view piece) const;

  std::vector<std::string> m_tokens;                    ///< id -> bytes
  std::unordered_map<std::string, std::int32_t> m_ids;  ///< bytes -> id
  std::array<std::int32_t, 256> m_byte_ids{};           ///< the token of each single byte
  std::unordered_map<std::uint64_t, merge_rule> m_merges;
  std::int32_t m_eot = -1;
  std::shared_ptr<detail::bpe_cache> m_cache = std::make_shared<detail::bpe_cache>();
};

// ---------------------------------------------------------------------------------------------------

inline bpe_tokenizer bpe_tokenizer::load(const std::string& dir) {
  const std::filesystem::path base(dir);
  return load((base / "vocab.json").string(), (base / "merges.txt").string());
}

inline bpe_tokenizer bpe_tokenizer::load(const std::string& vocab_path, const std::string& merges_path) {
  bpe_tokenizer t;
  t.m_tokens = detail::read_gpt2_vocab(vocab_path);
  t.index_tokens(vocab_path);
  t.index_merges(merges_path, detail::read_gpt2_merges(merges_path));
  return t;
}

inline void bpe_tokenizer::index_tokens(const std::string& vocab_path) {
  m_ids.reserve(m_tokens.size());
  for (std::size_t id = 0; id < m_tokens.size(); ++id) m_ids.emplace(m_tokens[id], static_cast<std::int32_t>(id));
  for (std::size_t b = 0; b < 256; ++b) {
    const auto it = m_ids.find(std::string(1, static_cast<char>(b)));
    if (it == m_ids.end()) {
      const std::string key = detail::gpt2_bytes_to_text(std::string(1, static_cast<char>(b)));
      throw format_error(lora::detail::cat(vocab_path, ": no key ", detail::json_quoted(key), " (the token of byte ", b,
                                           "): a byte-level vocabulary needs all 256 bytes"));
    }
    m_byte_ids[b] = it->second;
  }
  const auto eot = m_ids.find(std::string(end_of_text));
  if (eot == m_ids.end()) throw format_error(vocab_path + ": no key \"<|endoftext|>\"");
  m_eot = eot->second;
}

inline std::int32_t bpe_tokenizer::token_id(const std::string& merges_path, std::size_t line,
                                            const std::string& bytes) const {
  const auto it = m_ids.find(bytes);
  if (it == m_ids.end()) {
    throw format_error(lora::detail::cat(merges_path, ":", line, ": token ",
                                         detail::json_quoted(detail::gpt2_bytes_to_text(bytes)),
                                         " is not in the vocabulary"));
  }
  return it->second;
}

inline void bpe_tokenizer::index_merges(const std::string& merges_path, const std::vector<detail::merge_line>& merges) {
  if (merges.size() > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max())) {
    throw format_error(merges_path + ": too many merges");
  }
  m_merges.reserve(merges.size());
  for (std::size_t rank = 0; rank < merges.size(); ++rank) {
    const detail::merge_line& m = merges[rank];
    const std::int32_t left = token_id(merges_path, m.line, m.left);
    const std::int32_t right = token_id(merges_path, m.line, m.right);
    const std::int32_t merged = token_id(merges_path, m.line, m.left + m.right);
    const auto [it, fresh] =
        m_merges.emplace(pair_key(left, right), merge_rule{static_cast<std::int32_t>(rank), merged});
    if (!fresh) {
      throw format_error(lora::detail::cat(merges_path, ":", m.line, ": duplicate merge (also line ",
                                           merges[static_cast<std::size_t>(it->second.rank)].line, ")"));
    }
  }
}

inline std::int32_t bpe_tokenizer::merge_rank(std::int32_t left, std::int32_t right) const {
  const auto it = m_merges.find(pair_key(left, right));
  return it == m_merges.end() ? -1 : it->second.rank;
}

inline std::vector<std::int32_t> bpe_tokenizer::merge_piece(std::string_view piece) const {
  std::vector<std::int32_t> word;
  word.reserve(piece.size());
  for (const char c : piece) word.push_back(m_byte_ids[static_cast<unsigned char>(c)]);
  std::vector<std::int32_t> next;
  while (word.size() > 1) {
    const merge_rule* best = nullptr;  // the adjacent pair of lowest rank
    std::int32_t first = 0, second = 0;
    for (std::size_t i = 0; i + 1 < word.size(); ++i) {
      const auto it = m_merges.find(pair_key(word[i], word[i + 1]));
      if (it != m_merges.end() && (best == nullptr || it->second.rank < best->rank)) {
        best = &it->second;
        first = word[i];
        second = word[i + 1];
      }
    }
    if (best == nullptr) break;
    next.clear();  // every (first, second), left to right, without overlaps
    for (std::size_t i = 0; i < word.size(); ++i) {
      const bool merge = i + 1 < word.size() && word[i] == first && word[i + 1] == second;
      next.push_back(merge ? best->id : word[i]);
      i += merge ? 1 : 0;
    }
    word.swap(next);
  }
  return word;
}

inline void bpe_tokenizer::encode_piece(std::string_view piece, std::vector<std::int32_t>& out) const {
  const std::string key(piece);
  {
    const std::lock_guard<std::mutex> lock(m_cache->mutex);
    const auto it = m_cache->ids.find(key);
    if (it != m_cache->ids.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<std::int32_t> ids = merge_piece(piece);
  out.insert(out.end(), ids.begin(), ids.end());
  const std::lock_guard<std::mutex> lock(m_cache->mutex);
  if (m_cache->ids.size() >= detail::bpe_cache::max_entries) m_cache->ids.clear();
  m_cache->ids.emplace(key, std::move(ids));
}

inline std::vector<std::int32_t> bpe_tokenizer::encode(std::string_view text, special_tokens special) const {
  std::vector<std::int32_t> ids;
  ids.reserve(text.size() / 3 + 1);
  detail::split_special(
      text, special,
      [&](std::string_view part) {
        for (const std::string_view piece : detail::gpt2_pretokenize(part)) encode_piece(piece, ids);
      },
      [&] { ids.push_back(m_eot); });
  return ids;
}

inline const std::string& bpe_tokenizer::token_bytes(std::int32_t id) const {
  detail::check_token_id(id, vocab_size());
  return m_tokens[static_cast<std::size_t>(id)];
}

inline std::string bpe_tokenizer::decode(const std::vector<std::int32_t>& ids) const {
  std::string out;
  for (const std::int32_t id : ids) out += token_bytes(id);
  return out;
}

}  // namespace lora::models
