// lora/io/module_match.hpp: how PEFT names pick modules (docs/CONVENTIONS.md §peft):
//   - target_modules as a list: a module is targeted when its dotted path equals an entry or ends
//     with "." + entry; as one string: re.fullmatch(pattern, path);
//   - rank_pattern / alpha_pattern keys: PEFT's get_pattern_key, re.match(r"(.*\.)?(key)$", path);
//   - adapter modules to model layers or checkpoint tensors whose paths differ by a leading prefix
//     ("transformer.h.0.attn.c_attn" vs "h.0.attn.c_attn"): suffix_index.
// The regular expressions come from files written by strangers and run on detail::regex
// (io/detail/regex.hpp, which says why it is not std::regex nor RE2): Python syntax, linear time.
#pragma once

#include <algorithm>
#include <cstddef>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "detail/regex.hpp"

namespace lora::io::detail {

using lora::detail::cat;

/// "a.b.c" -> {"a", "b", "c"} (views into `path`).
std::vector<std::string_view> split_dots(std::string_view path);
/// Whether `path` equals an entry of `targets` or ends with "." + an entry (a list target_modules).
bool module_in_list(const std::vector<std::string>& targets, const std::string& path);
/// Whether `text` matches the PEFT pattern key `key`: re.match(r"(.*\.)?(key)$", text).
bool pattern_key_matches(const std::string& key, const std::string& text);
/// The regex of a pattern key as get_pattern_key splices it, for matching and for validation.
std::string pattern_key_regex(const std::string& key);
/// The regex that matches exactly `text` (every metacharacter escaped).
std::string regex_escape(const std::string& text);
/// "'a', 'b', 'c'" of at most `shown` names, then ", ... (N more)"; "none" for no names.
std::string list_names(const std::vector<std::string>& names, std::size_t shown = 5);

/// Dotted paths split into components, for matching names that differ by a leading prefix
/// ("transformer.h.0.attn.c_attn" vs "h.0.attn.c_attn"; "model.model.layers.0" vs "model.layers.0").
/// Two paths match when one is a whole dotted suffix of the other; among the candidates that match a
/// path, an identical one wins, else the one sharing the most trailing components, and a tie is refused
/// as ambiguous.
class suffix_index {
 public:
  explicit suffix_index(std::vector<std::string> candidates);
  suffix_index(const suffix_index&) = delete;  // m_parts views m_names
  suffix_index& operator=(const suffix_index&) = delete;
  suffix_index(suffix_index&&) noexcept = default;
  suffix_index& operator=(suffix_index&&) noexcept = default;

  /// The index of the candidate matching `path`, or -1 if none; name_error naming `what` (e.g.
  /// "adapter module 'x'") and both candidates when two match equally well.
  std::ptrdiff_t find(const std::string& path, const std::string& what) const;
  const std::vector<std::string>& candidates() const noexcept { return m_names; }

 private:
  /// Twice the trailing components `parts` shares with candidate k, plus one when the paths are
  /// identical (which therefore beats a longer path that merely ends with it); 0 when neither is a
  /// whole dotted suffix of the other.
  std::size_t score(const std::vector<std::string_view>& parts, std::size_t k) const;

  std::vector<std::string> m_names;
  std::vector<std::vector<std::string_view>> m_parts;
  std::unordered_map<std::string_view, std::vector<std::size_t>> m_by_last;
};

// ---------------------------------------------------------------------------------------------------

inline std::vector<std::string_view> split_dots(std::string_view path) {
  std::vector<std::string_view> parts;
  std::size_t start = 0;
  for (;;) {
    const std::size_t dot = path.find('.', start);
    parts.push_back(path.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start));
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return parts;
}

inline bool module_in_list(const std::vector<std::string>& targets, const std::string& path) {
  for (const std::string& t : targets) {
    if (path == t) return true;
    if (path.size() > t.size() && path.compare(path.size() - t.size(), t.size(), t) == 0 &&
        path[path.size() - t.size() - 1] == '.') {
      return true;
    }
  }
  return false;
}

inline std::string pattern_key_regex(const std::string& key) { return "(.*\\.)?(" + key + ")$"; }

inline bool pattern_key_matches(const std::string& key, const std::string& text) {
  // PEFT's get_pattern_key: re.match(rf"(.*\.)?({key})$", text), the key spliced in unescaped.
  return regex(pattern_key_regex(key)).match_prefix(text);
}

inline std::string regex_escape(const std::string& text) {
  std::string out;
  for (const char c : text) {
    if (std::string_view("\\.^$|?*+()[]{}-#&~ \t\n\r\v\f").find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

inline std::string list_names(const std::vector<std::string>& names, std::size_t shown) {
  std::string out;
  const std::size_t n = std::min(shown, names.size());
  for (std::size_t k = 0; k < n; ++k) out += (k ? ", '" : "'") + names[k] + "'";
  if (names.size() > n) out += cat(", ... (", names.size() - n, " more)");
  return out.empty() ? "none" : out;
}

inline suffix_index::suffix_index(std::vector<std::string> candidates) : m_names(std::move(candidates)) {
  m_parts.reserve(m_names.size());
  for (std::size_t k = 0; k < m_names.size(); ++k) {
    m_parts.push_back(split_dots(m_names[k]));
    m_by_last[m_parts.back().back()].push_back(k);
  }
}

inline std::size_t suffix_index::score(const std::vector<std::string_view>& parts, std::size_t k) const {
  const auto& other = m_parts[k];
  std::size_t common = 0;
  while (common < parts.size() && common < other.size() &&
         parts[parts.size() - 1 - common] == other[other.size() - 1 - common]) {
    ++common;
  }
  if (common != parts.size() && common != other.size()) return 0;  // neither is a whole suffix
  return 2 * common + (parts.size() == other.size() ? 1 : 0);
}

inline std::ptrdiff_t suffix_index::find(const std::string& path, const std::string& what) const {
  const std::vector<std::string_view> parts = split_dots(path);
  const auto it = m_by_last.find(parts.back());
  if (it == m_by_last.end()) return -1;
  std::ptrdiff_t best = -1, tied = -1;
  std::size_t best_score = 0;
  for (const std::size_t k : it->second) {
    const std::size_t s = score(parts, k);
    if (s == 0) continue;
    if (s > best_score) {
      best = static_cast<std::ptrdiff_t>(k);
      best_score = s;
      tied = -1;
    } else if (s == best_score) {
      tied = static_cast<std::ptrdiff_t>(k);
    }
  }
  if (tied >= 0) {
    throw name_error(cat(what, " matches '", m_names[static_cast<std::size_t>(best)], "' and '",
                         m_names[static_cast<std::size_t>(tied)], "' equally well (", best_score / 2,
                         " trailing components each); the match is ambiguous"));
  }
  return best;
}

}  // namespace lora::io::detail
