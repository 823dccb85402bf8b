// lora/models/byte_tokenizer.hpp: the byte tokenizer (257 tokens: ids 0..255 are the bytes, 256 is
// <|endoftext|>), and what every tokenizer shares: the end-of-text token and how text that spells it
// is read.
//
// Special tokens: encode treats text as plain text by default, so the 13 bytes "<|endoftext|>" in a
// document are encoded like any other bytes (as GPT-2's encoder.py and the JS port gpt-3-encoder do);
// with special_tokens::allowed each occurrence becomes the single end-of-text id. decode writes the
// end-of-text id as those 13 bytes, so decode(encode(t, allowed)) == t and decode(encode(t)) == t.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "../error.hpp"

namespace lora::models {

/// The text of the end-of-text token, GPT-2's document separator.
inline constexpr std::string_view end_of_text = "<|endoftext|>";

/// Whether encode reads "<|endoftext|>" in the text as the end-of-text token or as plain text.
enum class special_tokens { as_text, allowed };

/// Bytes in, bytes out: id b < 256 is the byte b, id 256 is <|endoftext|>. Encodes any bytes.
class byte_tokenizer {
 public:
  /// The ids of the bytes of `text` (one per byte), and eot_id() for each "<|endoftext|>" when
  /// `special` is allowed.
  std::vector<std::int32_t> encode(std::string_view text, special_tokens special = special_tokens::as_text) const;
  /// The bytes of the tokens, concatenated. Throws name_error for an id outside [0, 257).
  std::string decode(const std::vector<std::int32_t>& ids) const;
  /// The bytes of one token: one byte, or "<|endoftext|>" for eot_id().
  std::string token_bytes(std::int32_t id) const;

  static constexpr std::int32_t vocab_size() noexcept { return 257; }
  static constexpr std::int32_t eot_id() noexcept { return 256; }
};

namespace detail {

/// When `special` is allowed, calls on_text(segment) for each stretch of text between occurrences of
/// "<|endoftext|>" (empty ones skipped) and on_eot() for each occurrence, in order; otherwise calls
/// on_text(text) once.
template <typename OnText, typename OnEot>
void split_special(std::string_view text, special_tokens special, OnText&& on_text, OnEot&& on_eot);

/// Throws name_error unless 0 <= id < vocab_size.
void check_token_id(std::int32_t id, std::int32_t vocab_size);

}  // namespace detail

// ---------------------------------------------------------------------------------------------------

namespace detail {

template <typename OnText, typename OnEot>
void split_special(std::string_view text, special_tokens special, OnText&& on_text, OnEot&& on_eot) {
  if (special == special_tokens::as_text) {
    if (!text.empty()) on_text(text);
    return;
  }
  std::size_t start = 0;
  for (std::size_t at = text.find(end_of_text); at != std::string_view::npos; at = text.find(end_of_text, start)) {
    if (at > start) on_text(text.substr(start, at - start));
    on_eot();
    start = at + end_of_text.size();
  }
  if (start < text.size()) on_text(text.substr(start));
}

inline void check_token_id(std::int32_t id, std::int32_t vocab_size) {
  if (id < 0 || id >= vocab_size) {
    throw name_error(
        lora::detail::cat("token id ", id, " is not in the vocabulary: expected an id in [0, ", vocab_size, ")"));
  }
}

}  // namespace detail

inline std::vector<std::int32_t> byte_tokenizer::encode(std::string_view text, special_tokens special) const {
  std::vector<std::int32_t> ids;
  ids.reserve(text.size());
  detail::split_special(
      text, special,
      [&](std::string_view part) {
        for (const char c : part) ids.push_back(static_cast<unsigned char>(c));
      },
      [&] { ids.push_back(eot_id()); });
  return ids;
}

inline std::string byte_tokenizer::token_bytes(std::int32_t id) const {
  detail::check_token_id(id, vocab_size());
  return id == eot_id() ? std::string(end_of_text) : std::string(1, static_cast<char>(static_cast<unsigned char>(id)));
}

inline std::string byte_tokenizer::decode(const std::vector<std::int32_t>& ids) const {
  std::string out;
  out.reserve(ids.size());
  for (const std::int32_t id : ids) {
    detail::check_token_id(id, vocab_size());
    if (id == eot_id()) {
      out += end_of_text;
    } else {
      out.push_back(static_cast<char>(static_cast<unsigned char>(id)));
    }
  }
  return out;
}

}  // namespace lora::models
