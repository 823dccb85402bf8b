// lora/models/detail/bpe_files.hpp: reading GPT-2's tokenizer files. vocab.json maps each token, written
// in GPT-2's byte-to-unicode alphabet, to its id; merges.txt lists the merges "left right", one a line,
// in rank order (rank 0 first), after an optional "#version: ..." first line.
//
// GPT-2's alphabet (encoder.py, bytes_to_unicode): the printable bytes '!'..'~', U+00A1..U+00AC and
// U+00AE..U+00FF stand for themselves; the other 68 bytes, in increasing order, stand for U+0100,
// U+0101, ... (so the space 0x20 is U+0120 'Ġ' and '\n' is U+010A 'Ċ'). Tokens are kept as raw bytes.
//
// Every error names the file, and the key (vocab.json) or the line (merges.txt).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../../error.hpp"
#include "../../io/detail/utf8.hpp"

namespace lora::models::detail {

/// GPT-2's bytes_to_unicode: the code point that stands for each byte.
std::array<char32_t, 256> gpt2_byte_to_unicode();
/// The bytes that the characters of `text` (in GPT-2's alphabet) stand for, or false when a character
/// (or ill-formed UTF-8) is outside the alphabet.
bool gpt2_text_to_bytes(std::string_view text, std::string& bytes);
/// `bytes` written in GPT-2's alphabet, as vocab.json and merges.txt write tokens (UTF-8).
std::string gpt2_bytes_to_text(std::string_view bytes);
/// A string as a JSON string literal, for messages (ill-formed UTF-8 shown as U+FFFD).
std::string json_quoted(std::string_view s);
/// The whole file; io_error naming the path when it cannot be read.
std::string read_text_file(const std::string& path);

/// vocab.json as token bytes indexed by id: the ids must be exactly 0..n-1, each used once.
std::vector<std::string> read_gpt2_vocab(const std::string& path);

/// One line of merges.txt, its two tokens as bytes.
struct merge_line {
  std::string left;
  std::string right;
  std::size_t line = 0;  ///< 1-based line number in the file
};
/// merges.txt in rank order. Blank lines (and a trailing '\r') are ignored; every other line after the
/// optional "#version" line must be two tokens separated by one space.
std::vector<merge_line> read_gpt2_merges(const std::string& path);

// ---------------------------------------------------------------------------------------------------

inline std::array<char32_t, 256> gpt2_byte_to_unicode() {
  std::array<char32_t, 256> map{};
  char32_t next = 256;
  for (std::size_t b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    map[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return map;
}

inline bool gpt2_text_to_bytes(std::string_view text, std::string& bytes) {
  static const std::array<std::int16_t, 324> to_byte = [] {  // 256 + 68 code points
    std::array<std::int16_t, 324> inverse{};
    inverse.fill(-1);
    const auto map = gpt2_byte_to_unicode();
    for (std::size_t b = 0; b < 256; ++b) inverse[map[b]] = static_cast<std::int16_t>(b);
    return inverse;
  }();
  bytes.clear();
  for (std::size_t i = 0; i < text.size();) {
    char32_t cp = 0;
    const std::size_t len = io::detail::decode_utf8_at(text, i, cp);
    if (len == 0 || cp >= to_byte.size() || to_byte[cp] < 0) return false;
    bytes.push_back(static_cast<char>(to_byte[cp]));
    i += len;
  }
  return true;
}

inline std::string gpt2_bytes_to_text(std::string_view bytes) {
  static const std::array<char32_t, 256> map = gpt2_byte_to_unicode();
  std::string text;
  for (const char c : bytes) {
    const char32_t cp = map[static_cast<unsigned char>(c)];  // < U+0144: one or two UTF-8 bytes
    if (cp < 0x80) {
      text.push_back(static_cast<char>(cp));
    } else {
      text.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      text.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }
  return text;
}

inline std::string json_quoted(std::string_view s) {
  return nlohmann::json(std::string(s)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

inline std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error("cannot open " + path + " for reading");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw io_error("cannot read " + path);
  return text;
}

/// vocab.json's id for `key`, checked to be an integer in [0, n).
inline std::int32_t vocab_id(const std::string& path, const std::string& key, const nlohmann::json& value,
                             std::size_t n) {
  if (!value.is_number_integer()) {
    throw format_error(path + ": key " + json_quoted(key) + ": expected an integer id, got " + value.dump());
  }
  const auto id = value.get<std::int64_t>();
  if (id < 0 || static_cast<std::uint64_t>(id) >= n) {
    throw format_error(lora::detail::cat(path, ": key ", json_quoted(key), ": id ", id, " is out of range: the ", n,
                                         " tokens must have the ids 0..", n - 1));
  }
  return static_cast<std::int32_t>(id);
}

inline std::vector<std::string> read_gpt2_vocab(const std::string& path) {
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    throw format_error(path + ": not valid JSON: " + e.what());
  }
  if (!doc.is_object() || doc.empty()) {
    throw format_error(path + ": expected a non-empty JSON object {token: id}, got " + std::string(doc.type_name()));
  }
  if (doc.size() > static_cast<std::size_t>(INT32_MAX)) throw format_error(path + ": too many tokens");
  std::vector<std::string> tokens(doc.size());
  std::vector<std::string> owner(doc.size());  // the key that took each id
  std::vector<bool> taken(doc.size(), false);
  for (const auto& [key, value] : doc.items()) {
    const std::int32_t id = vocab_id(path, key, value, doc.size());
    if (taken[id]) {
      throw format_error(
          lora::detail::cat(path, ": keys ", json_quoted(owner[id]), " and ", json_quoted(key), " both have id ", id));
    }
    if (!gpt2_text_to_bytes(key, tokens[id])) {
      throw format_error(path + ": key " + json_quoted(key) +
                         " has a character outside GPT-2's byte-to-unicode alphabet");
    }
    owner[id] = key;
    taken[id] = true;
  }
  return tokens;
}

/// One merges.txt line "left right" (without its line break) as bytes; format_error naming the line.
inline merge_line parse_merge_line(const std::string& path, std::string_view text, std::size_t line) {
  const std::size_t space = text.find(' ');
  const bool two_tokens = space != std::string_view::npos && space > 0 && space + 1 < text.size() &&
                          text.find(' ', space + 1) == std::string_view::npos;
  if (!two_tokens) {
    throw format_error(
        lora::detail::cat(path, ":", line, ": expected two tokens separated by one space, got ", json_quoted(text)));
  }
  merge_line m;
  m.line = line;
  for (auto [part, out] : {std::pair{text.substr(0, space), &m.left}, std::pair{text.substr(space + 1), &m.right}}) {
    if (!gpt2_text_to_bytes(part, *out)) {
      throw format_error(lora::detail::cat(path, ":", line, ": token ", json_quoted(part),
                                           " has a character outside GPT-2's byte-to-unicode alphabet"));
    }
  }
  return m;
}

inline std::vector<merge_line> read_gpt2_merges(const std::string& path) {
  const std::string text = read_text_file(path);
  std::vector<merge_line> merges;
  std::size_t line = 0;
  for (std::size_t start = 0; start < text.size();) {
    const std::size_t end = std::min(text.find('\n', start), text.size());
    std::string_view row(text.data() + start, end - start);
    start = end + 1;
    ++line;
    if (!row.empty() && row.back() == '\r') row.remove_suffix(1);
    if (row.find_first_not_of(" \t") == std::string_view::npos) continue;  // blank
    if (line == 1 && row.substr(0, 8) == "#version") continue;
    merges.push_back(parse_merge_line(path, row, line));
  }
  return merges;
}

}  // namespace lora::models::detail
