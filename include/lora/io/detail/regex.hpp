// lora/io/detail/regex.hpp: the subset of Python's `re` syntax that PEFT configs use (rank_pattern and
// alpha_pattern keys, a target_modules string), compiled to a Thompson NFA and run as a Pike VM.
//
// Why not std::regex: its libstdc++ executor backtracks (exponential time on patterns such as
// "(a|a)*c") and recurses once per input character (stack overflow on long inputs), and these
// patterns come from files written by strangers. Here matching costs O(|text| x |program|) steps,
// never recurses, and the program is capped at max_regex_program instructions, so any pattern either
// compiles into a bounded matcher or is refused with a format_error.
//
// Why not RE2 (linear time too, and well kept), decided on the merits:
//   - lora::io is header-only: an INTERFACE target whose one dependency is nlohmann/json (itself
//     header-only). RE2 is a compiled library that, since 2023, also pulls in Abseil; every consumer
//     of find_package(lora) would have to find and link both, for a feature that matches module
//     names of a few dozen characters.
//   - PEFT evaluates these patterns with Python's `re`, and RE2's syntax differs where it matters
//     here: `$` matches only at the very end (Python also before a final "\n"), `\Z` and `(?#...)`
//     are refused, `{,n}` is a literal (a quantifier in Python). A translation layer in front of RE2
//     would be a parser of its own.
//   - The matcher below is ~600 lines with no recursion at match time, tested against Python's
//     semantics (tests/test_module_match.cpp) and fuzzed, on its own (tests/fuzz/fuzz_regex.cpp) and
//     inside whole adapter configs (tests/fuzz/fuzz_peft.cpp).
//
// Syntax (Python semantics): literals; `.` (any code point but '\n'); classes `[...]`, `[^...]` with
// ranges and \d \w \s \D \W \S; groups `(...)`, `(?:...)`, `(?P<name>...)`, comments `(?#...)`;
// alternation `|`; quantifiers `* + ? {m} {m,} {,n} {m,n}`, each optionally lazy (`*?` ...; laziness
// does not change whether a match exists); anchors `^ $ \A \Z`; escapes \n \t \r \f \v \a \xhh and
// escaped punctuation. Refused as unsupported: backreferences, lookaround, inline flags, \b \B, \u,
// \U, \N, octal escapes, possessive quantifiers. Text and pattern are UTF-8 and are matched code point
// by code point (a byte that is not well-formed UTF-8 is a code point of its own, detail::decode_utf8); \d is ASCII
// digits, \s ASCII white space, and \w ASCII letters, digits, '_' and every code point from U+0080 up (Python's Unicode
// tables are finer; module names are ASCII in practice).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "../../error.hpp"
#include "utf8.hpp"

namespace lora::io::detail {

/// Largest compiled program accepted, in instructions; a counted repetition is expanded in full.
inline constexpr std::size_t max_regex_program = 20000;
/// Deepest group nesting accepted.
inline constexpr int max_regex_depth = 100;

class regex {
 public:
  /// Compiles `pattern`; format_error("invalid regular expression '<pattern>': <why> at position <k>").
  explicit regex(std::string_view pattern);

  /// Python's re.match: does a prefix of `text` match (the pattern may end with `$` to require all)?
  bool match_prefix(std::string_view text) const { return run(text, false); }
  /// Python's re.fullmatch: does all of `text` match?
  bool match_full(std::string_view text) const { return run(text, true); }
  const std::string& pattern() const noexcept { return m_pattern; }
  std::size_t program_size() const noexcept { return m_program.size(); }

 private:
  enum class op : std::uint8_t { chr, any, cls, split, jmp, bol, eol, eos, match };
  struct inst {
    op code;
    char32_t c = 0;    // chr: the code point; cls: index into m_classes
    int x = 0, y = 0;  // split: both targets; jmp: x
  };
  struct char_class {
    std::vector<std::pair<char32_t, char32_t>> ranges;  // inclusive
    bool digit = false, word = false, space = false;    // \d \w \s
    bool not_digit = false, not_word = false, not_space = false;
    bool negated = false;
    bool contains(char32_t c) const;
  };
  // Parse tree: a node is a leaf (chr, any, cls, anchor), a concatenation, an alternation or a repeat.
  struct node {
    enum kind_t : std::uint8_t { empty, chr, any, cls, bol, eol, eos, cat, alt, repeat } kind = empty;
    char32_t c = 0;
    std::uint32_t min = 0, max = 0;  // repeat bounds; max == unbounded for no upper bound
    std::vector<node> kids;
  };
  static constexpr std::uint32_t unbounded = 0xFFFFFFFFu;
  class parser;
  class pike_vm;

  bool run(std::string_view text, bool full) const;
  static std::size_t size_of(const node& n);
  void emit(const node& n);
  void emit_alt(const node& n);
  void emit_repeat(const node& n);
  int add(op code, char32_t c = 0, int x = 0, int y = 0);

  std::string m_pattern;
  std::vector<inst> m_program;
  std::vector<char_class> m_classes;
};

// ---------------------------------------------------------------------------------------------------

inline bool regex::char_class::contains(char32_t c) const {
  const bool is_digit = c >= U'0' && c <= U'9';
  const bool is_word = is_digit || (c >= U'a' && c <= U'z') || (c >= U'A' && c <= U'Z') || c == U'_' || c >= 0x80;
  const bool is_space = c == U' ' || (c >= U'\t' && c <= U'\r');
  bool hit = (digit && is_digit) || (word && is_word) || (space && is_space) || (not_digit && !is_digit) ||
             (not_word && !is_word) || (not_space && !is_space);
  for (std::size_t k = 0; !hit && k < ranges.size(); ++k) hit = c >= ranges[k].first && c <= ranges[k].second;
  return hit != negated;
}

/// Recursive descent over the code points of a pattern; depth is bounded by max_regex_depth.
class regex::parser {
 public:
  parser(const std::string& pattern, std::vector<char_class>& classes)
      : m_source(pattern), m_text(decode_utf8(pattern)), m_classes(classes) {}

  node parse() {
    node n = alternation(0);
    if (m_pos < m_text.size()) fail("unbalanced parenthesis");  // a ')' with no '('
    return n;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw format_error(lora::detail::cat("invalid regular expression '", m_source, "': ", why, " at position ", m_pos));
  }
  bool at_end() const { return m_pos >= m_text.size(); }
  char32_t peek() const { return m_text[m_pos]; }
  bool eat(char32_t c) {
    if (at_end() || peek() != c) return false;
    ++m_pos;
    return true;
  }

  node alternation(int depth) {
    if (depth > max_regex_depth) fail("groups nest too deeply");
    node first = concatenation(depth);
    if (at_end() || peek() != U'|') return first;
    node alt;
    alt.kind = node::alt;
    alt.kids.push_back(std::move(first));
    while (eat(U'|')) alt.kids.push_back(concatenation(depth));
    return alt;
  }

  node concatenation(int depth) {
    node cat;
    cat.kind = node::cat;
    while (!at_end() && peek() != U'|' && peek() != U')') {
      node atom_node = atom(depth);
      if (atom_node.kind == node::empty) continue;  // a comment group
      quantifiers(atom_node);
      cat.kids.push_back(std::move(atom_node));
    }
    if (cat.kids.size() == 1) return std::move(cat.kids.front());
    if (cat.kids.empty()) cat.kind = node::empty;
    return cat;
  }

  // Reads the quantifier at m_pos into [lo, hi] (hi = unbounded for none); false, with m_pos
  // unchanged, when none follows ('{' that does not start a counted repeat is a literal).
  bool quantifier(std::uint32_t& lo, std::uint32_t& hi) {
    if (at_end()) return false;
    const std::size_t here = m_pos;
    lo = 0;
    hi = unbounded;
    switch (peek()) {
      case U'*':
        break;
      case U'+':
        lo = 1;
        break;
      case U'?':
        hi = 1;
        break;
      case U'{':
        if (counted(lo, hi)) return true;
        m_pos = here;
        return false;
      default:
        return false;
    }
    ++m_pos;
    return true;
  }

  // Applies any quantifier that follows; `target` is the item just parsed.
  void quantifiers(node& target) {
    for (bool quantified = false;; quantified = true) {
      const std::size_t here = m_pos;
      std::uint32_t lo = 0, hi = 0;
      if (!quantifier(lo, hi)) return;
      const bool anchor = target.kind == node::bol || target.kind == node::eol || target.kind == node::eos;
      if (quantified || anchor) {
        m_pos = here;
        fail(quantified ? "multiple repeat (possessive quantifiers are not supported)" : "nothing to repeat");
      }
      eat(U'?');  // lazy: same set of matches
      node rep;
      rep.kind = node::repeat;
      rep.min = lo;
      rep.max = hi;
      rep.kids.push_back(std::move(target));
      target = std::move(rep);
    }
  }

  // Parses "{m}", "{m,}", "{,n}", "{m,n}" or "{,}" at m_pos (which holds '{'); false if it is not one.
  bool counted(std::uint32_t& lo, std::uint32_t& hi) {
    ++m_pos;                                        // '{'
    if (!at_end() && peek() == U'}') return false;  // "{}" is literal
    auto number = [&](bool& any) {
      std::uint64_t v = 0;
      while (!at_end() && peek() >= U'0' && peek() <= U'9') {
        v = std::min<std::uint64_t>(v * 10 + (peek() - U'0'), 0xFFFFFFFEull);
        any = true;
        ++m_pos;
      }
      return static_cast<std::uint32_t>(v);
    };
    bool has_lo = false, has_hi = false;
    const std::uint32_t a = number(has_lo);
    std::uint32_t b = a;
    bool comma = false;
    if (eat(U',')) {
      comma = true;
      b = number(has_hi);
    }
    if (!eat(U'}')) return false;
    lo = has_lo ? a : 0;
    hi = comma ? (has_hi ? b : unbounded) : a;
    if (hi < lo) fail("min repeat greater than max repeat");
    return true;
  }

  node leaf(node::kind_t kind, char32_t c = 0) {
    node n;
    n.kind = kind;
    n.c = c;
    return n;
  }

  node class_leaf(char_class cls) {
    m_classes.push_back(std::move(cls));
    return leaf(node::cls, static_cast<char32_t>(m_classes.size() - 1));
  }

  node atom(int depth) {
    const char32_t c = m_text[m_pos++];
    switch (c) {
      case U'(':
        return group(depth);
      case U'[':
        return class_leaf(bracket());
      case U'.':
        return leaf(node::any);
      case U'^':
        return leaf(node::bol);
      case U'$':
        return leaf(node::eol);
      case U'\\':
        return escape();
      case U'*':
      case U'+':
      case U'?':
        --m_pos;
        fail("nothing to repeat");
      case U'{': {
        const std::size_t here = m_pos - 1;
        std::uint32_t lo = 0, hi = 0;
        m_pos = here;
        if (counted(lo, hi)) {
          m_pos = here;
          fail("nothing to repeat");
        }
        m_pos = here + 1;
        return leaf(node::chr, c);
      }
      default:
        return leaf(node::chr, c);
    }
  }

  // The "(?...)" extension after '(': false for a comment, which is consumed whole; true for a group
  // whose body follows ("(?:", "(?P<name>"); format_error for what is not supported.
  bool group_extension() {
    if (eat(U':')) return true;  // non-capturing group
    if (eat(U'#')) {
      while (!at_end() && peek() != U')') ++m_pos;
      if (!eat(U')')) fail("missing ), unterminated comment");
      return false;
    }
    if (!eat(U'P')) fail("lookaround assertions and inline flags are not supported");
    if (!eat(U'<')) fail("named backreferences (?P=...) are not supported");
    const std::size_t name = m_pos;
    while (!at_end() && peek() != U'>') ++m_pos;
    if (at_end() || m_pos == name) fail("bad group name");
    ++m_pos;  // '>'
    return true;
  }

  node group(int depth) {
    if (eat(U'?') && !group_extension()) return node{};  // a comment
    node inner = alternation(depth + 1);
    if (!eat(U')')) fail("missing ), unterminated subpattern");
    if (inner.kind == node::empty) {
      node n;
      n.kind = node::cat;  // "()" matches the empty string and can be repeated
      return n;
    }
    return inner;
  }

  // The value of \xhh; m_pos is just past the 'x'.
  char32_t hex_escape() {
    char32_t v = 0;
    for (int k = 0; k < 2; ++k) {
      if (at_end()) fail("incomplete escape \\x");
      const char32_t h = m_text[m_pos++];
      const int d = h >= U'0' && h <= U'9'   ? static_cast<int>(h - U'0')
                    : h >= U'a' && h <= U'f' ? static_cast<int>(h - U'a' + 10)
                    : h >= U'A' && h <= U'F' ? static_cast<int>(h - U'A' + 10)
                                             : -1;
      if (d < 0) fail("incomplete escape \\x");
      v = v * 16 + static_cast<char32_t>(d);
    }
    return v;
  }

  // The code point or class of an escape; m_pos is just past the backslash.
  // Returns true with `cls` filled for \d \w \s and their negations.
  bool escape_code(char32_t& out, char_class& cls, bool in_class) {
    struct class_escape {
      char32_t letter;
      bool char_class::*flag;
    };
    static constexpr class_escape class_escapes[] = {
        {U'd', &char_class::digit},    {U'D', &char_class::not_digit}, {U'w', &char_class::word},
        {U'W', &char_class::not_word}, {U's', &char_class::space},     {U'S', &char_class::not_space},
    };
    static constexpr std::pair<char32_t, char32_t> char_escapes[] = {
        {U'n', U'\n'}, {U't', U'\t'}, {U'r', U'\r'}, {U'f', U'\f'}, {U'v', U'\v'}, {U'a', U'\a'},
    };
    if (at_end()) fail("bad escape (end of pattern)");
    const char32_t c = m_text[m_pos++];
    for (const class_escape& e : class_escapes) {
      if (c != e.letter) continue;
      cls.*e.flag = true;
      return true;
    }
    for (const auto& [letter, code] : char_escapes) {
      if (c != letter) continue;
      out = code;
      return false;
    }
    if (c == U'x') {
      out = hex_escape();
      return false;
    }
    if (c == U'b' && in_class) {  // [\b] is a backspace; \b outside a class (a word boundary) is refused
      out = U'\b';
      return false;
    }
    if ((c >= U'0' && c <= U'9') || (c >= U'a' && c <= U'z') || (c >= U'A' && c <= U'Z')) {
      --m_pos;
      fail(lora::detail::cat("unsupported or bad escape \\", static_cast<char>(c)));
    }
    out = c;  // escaped punctuation (or any non-ASCII code point) stands for itself
    return false;
  }

  node escape() {
    if (!at_end() && (peek() == U'A' || peek() == U'Z')) {
      const char32_t c = m_text[m_pos++];
      return leaf(c == U'A' ? node::bol : node::eos);
    }
    char32_t code = 0;
    char_class cls;
    if (escape_code(code, cls, false)) return class_leaf(std::move(cls));
    return leaf(node::chr, code);
  }

  // A bracket expression; m_pos is just past '['.
  char_class bracket() {
    const std::size_t start = m_pos - 1;
    char_class cls;
    if (eat(U'^')) cls.negated = true;
    for (bool first = true;; first = false) {
      if (at_end()) {
        m_pos = start;
        fail("unterminated character set");
      }
      const char32_t c = m_text[m_pos++];
      if (c == U']' && !first) return cls;
      char32_t lo = c;
      if (c == U'\\' && escape_code(lo, cls, true)) continue;  // \d etc. inside the set
      cls.ranges.emplace_back(lo, range_end(lo));
    }
  }

  // The end of a range "lo-hi" in a set, or lo when none follows ('-' last in the set is a literal).
  char32_t range_end(char32_t lo) {
    if (m_pos + 1 >= m_text.size() || m_text[m_pos] != U'-' || m_text[m_pos + 1] == U']') return lo;
    ++m_pos;  // '-'
    char32_t hi = m_text[m_pos++];
    char_class not_a_range;
    if (hi == U'\\' && escape_code(hi, not_a_range, true)) fail("bad character range");
    if (hi < lo) fail("bad character range");
    return hi;
  }

  const std::string& m_source;
  std::u32string m_text;
  std::vector<char_class>& m_classes;
  std::size_t m_pos = 0;
};

inline regex::regex(std::string_view pattern) : m_pattern(pattern) {
  parser p(m_pattern, m_classes);
  const node root = p.parse();
  const std::size_t size = size_of(root);
  if (size + 1 > max_regex_program) {
    throw format_error(lora::detail::cat("invalid regular expression '", m_pattern,
                                         "': too complex (it would compile to more than ", max_regex_program,
                                         " instructions)"));
  }
  m_program.reserve(size + 1);
  emit(root);
  add(op::match);
}

// Instructions emit(n) produces, saturating at max_regex_program + 1 so that products cannot overflow.
inline std::size_t regex::size_of(const node& n) {
  constexpr std::size_t cap = max_regex_program + 1;
  auto sat = [](std::size_t v) { return v > cap ? cap : v; };
  switch (n.kind) {
    case node::empty:
      return 0;
    case node::cat: {
      std::size_t s = 0;
      for (const node& k : n.kids) s = sat(s + size_of(k));
      return s;
    }
    case node::alt: {
      std::size_t s = 0;
      for (const node& k : n.kids) s = sat(s + size_of(k) + 2);
      return s;
    }
    case node::repeat: {
      const std::size_t body = size_of(n.kids.front());
      const std::size_t lo = std::min<std::size_t>(n.min, cap);
      std::size_t s = sat(lo * body);
      if (n.max == unbounded) return sat(s + body + 2);
      const std::size_t extra = std::min<std::size_t>(n.max - n.min, cap);
      return sat(s + extra * (body + 1));
    }
    default:
      return 1;
  }
}

inline int regex::add(op code, char32_t c, int x, int y) {
  m_program.push_back(inst{code, c, x, y});
  return static_cast<int>(m_program.size() - 1);
}

// Thompson construction. Recursion follows the parse tree, whose depth the parser bounded
// (max_regex_depth groups; a quantifier cannot follow a quantifier).
inline void regex::emit(const node& n) {
  switch (n.kind) {
    case node::empty:
      return;
    case node::cat:
      for (const node& k : n.kids) emit(k);
      return;
    case node::alt:
      return emit_alt(n);
    case node::repeat:
      return emit_repeat(n);
    default:
      break;
  }
  // A leaf: one instruction.
  static constexpr std::pair<node::kind_t, op> leaves[] = {
      {node::chr, op::chr}, {node::any, op::any}, {node::cls, op::cls},
      {node::bol, op::bol}, {node::eol, op::eol}, {node::eos, op::eos},
  };
  for (const auto& [kind, code] : leaves) {
    if (n.kind == kind) add(code, n.c);
  }
}

// split L1, next; L1: kid0; jmp end; next: split L2, next2; ... last kid; end:
inline void regex::emit_alt(const node& n) {
  std::vector<int> jumps;
  for (std::size_t k = 0; k + 1 < n.kids.size(); ++k) {
    const int split = add(op::split);
    m_program[split].x = split + 1;
    emit(n.kids[k]);
    jumps.push_back(add(op::jmp));
    m_program[split].y = static_cast<int>(m_program.size());
  }
  emit(n.kids.back());
  for (int j : jumps) m_program[j].x = static_cast<int>(m_program.size());
}

inline void regex::emit_repeat(const node& n) {
  const node& body = n.kids.front();
  // A body that emits nothing matches only the empty string, however often it repeats; skipping
  // it also keeps "(){4000000000}" from looping (its size, 0, passed the size check).
  if (size_of(body) == 0) return;
  for (std::uint32_t k = 0; k < n.min; ++k) emit(body);
  if (n.max == unbounded) {
    // L: split body, end; body; jmp L; end:
    const int split = add(op::split);
    m_program[split].x = split + 1;
    emit(body);
    add(op::jmp, 0, split);
    m_program[split].y = static_cast<int>(m_program.size());
    return;
  }
  // Optional copies: split body, end_k; body; ... each nested in the previous.
  std::vector<int> splits;
  for (std::uint32_t k = n.min; k < n.max; ++k) {
    const int split = add(op::split);
    m_program[split].x = split + 1;
    splits.push_back(split);
    emit(body);
  }
  for (int s : splits) m_program[s].y = static_cast<int>(m_program.size());
}

// Pike VM without captures: the set of live program counters advances one code point at a time.
// Epsilon closure uses an explicit stack; `m_mark` stamps each pc once per position.
class regex::pike_vm {
 public:
  pike_vm(const regex& re, std::string_view text)
      : m_re(re), m_text(decode_utf8(text)), m_mark(re.m_program.size(), static_cast<std::size_t>(-1)) {
    m_current.reserve(re.m_program.size());
    m_next.reserve(re.m_program.size());
  }

  bool run(bool full) {
    const std::size_t n = m_text.size();
    closure(m_current, 0, 0);
    for (std::size_t pos = 0;; ++pos) {
      ++m_stamp;
      m_next.clear();
      for (const int pc : m_current) {
        const inst& in = m_re.m_program[static_cast<std::size_t>(pc)];
        if (in.code == op::match && (!full || pos == n)) return true;
        if (pos < n && steps(in, m_text[pos])) closure(m_next, pc + 1, pos + 1);
      }
      if (pos == n || m_next.empty()) return false;
      m_current.swap(m_next);
    }
  }

 private:
  bool steps(const inst& in, char32_t c) const {
    return (in.code == op::chr && c == in.c) || (in.code == op::any && c != U'\n') ||
           (in.code == op::cls && m_re.m_classes[in.c].contains(c));
  }

  // Whether the zero-width assertion `code` holds at `pos`.
  bool holds(op code, std::size_t pos) const {
    const std::size_t n = m_text.size();
    if (code == op::bol) return pos == 0;
    if (code == op::eos) return pos == n;
    return pos == n || (pos + 1 == n && m_text[pos] == U'\n');  // eol: the end, or before a final '\n'
  }

  // Adds to `list` every consuming (or match) instruction reachable from `start` without input.
  void closure(std::vector<int>& list, int start, std::size_t pos) {
    m_stack.push_back(start);
    while (!m_stack.empty()) {
      const int pc = m_stack.back();
      m_stack.pop_back();
      if (m_mark[static_cast<std::size_t>(pc)] == m_stamp) continue;
      m_mark[static_cast<std::size_t>(pc)] = m_stamp;
      const inst& in = m_re.m_program[static_cast<std::size_t>(pc)];
      if (in.code == op::jmp) {
        m_stack.push_back(in.x);
      } else if (in.code == op::split) {
        m_stack.push_back(in.y);
        m_stack.push_back(in.x);
      } else if (in.code == op::bol || in.code == op::eol || in.code == op::eos) {
        if (holds(in.code, pos)) m_stack.push_back(pc + 1);
      } else {
        list.push_back(pc);
      }
    }
  }

  const regex& m_re;
  const std::u32string m_text;
  std::vector<int> m_current, m_next, m_stack;
  std::vector<std::size_t> m_mark;
  std::size_t m_stamp = 0;
};

inline bool regex::run(std::string_view text, bool full) const { return pike_vm(*this, text).run(full); }

}  // namespace lora::io::detail
