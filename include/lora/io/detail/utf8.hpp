// lora/io/detail/utf8.hpp: UTF-8 validation (safetensors headers and tensor names must be well-formed
// UTF-8) and decoding to code points (the PEFT regex matcher works code point by code point).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace lora::io::detail {

/// Offset of the first byte that is not part of well-formed UTF-8 (no overlongs, surrogates or code
/// points above U+10FFFF; Unicode Table 3-7), or n if all of it is.
std::size_t utf8_error_offset(const unsigned char* s, std::size_t n) noexcept;
/// Whether all of `s` is well-formed UTF-8.
bool is_utf8(std::string_view s) noexcept;
/// UTF-8 to code points. A byte that does not start a well-formed sequence becomes U+DC00 + byte (a
/// lone surrogate, as Python's surrogateescape does), which no well-formed text decodes to: an
/// overlong or truncated sequence can never pass for an ASCII metacharacter such as '+'.
std::u32string decode_utf8(std::string_view s);

// ---------------------------------------------------------------------------------------------------

/// Length of the sequence that lead byte `c` starts (0 if it starts none), and the allowed range
/// [lo, hi] of its second byte, which rules out overlongs, surrogates and code points past U+10FFFF.
inline std::size_t utf8_sequence(unsigned char c, unsigned char& lo, unsigned char& hi) noexcept {
  lo = 0x80;
  hi = 0xBF;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return 2;
  if (c >= 0xE0 && c <= 0xEF) {
    if (c == 0xE0) lo = 0xA0;  // no overlongs
    if (c == 0xED) hi = 0x9F;  // no surrogates
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (c == 0xF0) lo = 0x90;  // no overlongs
    if (c == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
    return 4;
  }
  return 0;
}

inline std::size_t utf8_error_offset(const unsigned char* s, std::size_t n) noexcept {
  std::size_t i = 0;
  while (i < n) {
    unsigned char lo, hi;
    const std::size_t len = utf8_sequence(s[i], lo, hi);
    if (len == 0 || n - i < len) return i;
    if (len > 1 && (s[i + 1] < lo || s[i + 1] > hi)) return i;
    for (std::size_t k = 2; k < len; ++k) {
      if (s[i + k] < 0x80 || s[i + k] > 0xBF) return i;
    }
    i += len;
  }
  return n;
}

inline bool is_utf8(std::string_view s) noexcept {
  return utf8_error_offset(reinterpret_cast<const unsigned char*>(s.data()), s.size()) == s.size();
}

/// The code point of the well-formed sequence starting at s[i] and its length, or 0 when none starts
/// there.
inline std::size_t decode_utf8_at(std::string_view s, std::size_t i, char32_t& cp) noexcept {
  static constexpr unsigned char lead_bits[] = {0, 0x7F, 0x1F, 0x0F, 0x07};
  unsigned char lo, hi;
  const auto b = static_cast<unsigned char>(s[i]);
  const std::size_t len = utf8_sequence(b, lo, hi);
  if (len == 0 || len > s.size() - i) return 0;
  cp = b & lead_bits[len];
  for (std::size_t k = 1; k < len; ++k) {
    const auto t = static_cast<unsigned char>(s[i + k]);
    if (t < (k == 1 ? lo : 0x80) || t > (k == 1 ? hi : 0xBF)) return 0;
    cp = (cp << 6) | (t & 0x3F);
  }
  return len;
}

inline std::u32string decode_utf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    char32_t cp = 0;
    const std::size_t len = decode_utf8_at(s, i, cp);
    out.push_back(len != 0 ? cp : 0xDC00 + static_cast<unsigned char>(s[i]));  // as Python's surrogateescape
    i += len != 0 ? len : 1;
  }
  return out;
}

}  // namespace lora::io::detail
