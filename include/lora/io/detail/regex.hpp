// lora/io/detail/regex.hpp: the subset of Python's `re` syntax that PEFT configs use (rank_pattern and
// alpha_pattern keys, a target_modules string), compiled to a Thompson NFA and run as a Pike VM.
//
// Why not std::regex: its libstdc++ executor backtracks (exponential time on patterns such as
// "(a|a)*c") and recurses once per input character (stack overflow on long inputs), and these
// patterns come from files written by strangers. Here matching costs O(|text| x |program|) steps,
// never recurses, and the program is capped at max_regex_program instructions, so any pattern either
// compiles into a bounded matcher or is refused with a format_error.
//
// Syntax (Python semantics): literals; `.` (any code point but '\n'); classes `[...]`, `[^...]` with
// ranges and \d \w \s \D \W \S; groups `(...)`, `(?:...)`, `(?P<name>...)`, comments `(?#...)`;
// alternation `|`; quantifiers `* + ? {m} {m,} {,n} {m,n}`, each optionally lazy (`*?` ...; laziness
// does not change whether a match exists); anchors `^ $ \A \Z`; escapes \n \t \r \f \v \a \xhh and
// escaped punctuation. Refused as unsupported: backreferences, lookaround, inline flags, \b \B, \u,
// \U, \N, octal escapes, possessive quantifiers. Text and pattern are UTF-8 and are matched code point
// by code point; \d is ASCII digits, \s ASCII white space, and \w ASCII letters, digits, '_' and every
// code point from U+0080 up (Python's Unicode tables are finer; module names are ASCII in practice).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "../../error.hpp"

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

  bool run(std::string_view text, bool full) const;
  static std::size_t size_of(const node& n);
  void emit(const node& n);
  int add(op code, char32_t c = 0, int x = 0, int y = 0);

  std::string m_pattern;
  std::vector<inst> m_program;
  std::vector<char_class> m_classes;
};

/// UTF-8 to code points; a byte that does not start a well-formed sequence stands for itself.
std::u32string decode_utf8(std::string_view s);

// ---------------------------------------------------------------------------------------------------

inline std::u32string decode_utf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    std::size_t len = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 0;
    char32_t cp = len == 1 ? b : len == 2 ? (b & 0x1F) : len == 3 ? (b & 0x0F) : (b & 0x07);
    bool ok = len != 0 && i + len <= s.size();
    for (std::size_t k = 1; ok && k < len; ++k) {
      const auto t = static_cast<unsigned char>(s[i + k]);
      if ((t & 0xC0) != 0x80) ok = false;
      cp = (cp << 6) | (t & 0x3F);
    }
    if (!ok) {
      out.push_back(b);
      ++i;
    } else {
      out.push_back(cp);
      i += len;
    }
  }
  return out;
}

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

  // Applies any quantifier that follows; `target` is the item just parsed.
  void quantifiers(node& target) {
    bool quantified = false;
    while (!at_end()) {
      const std::size_t here = m_pos;
      std::uint32_t lo = 0, hi = unbounded;
      const char32_t c = peek();
      if (c == U'*') {
        ++m_pos;
      } else if (c == U'+') {
        ++m_pos;
        lo = 1;
      } else if (c == U'?') {
        ++m_pos;
        hi = 1;
      } else if (c == U'{') {
        if (!counted(lo, hi)) {
          m_pos = here;  // not a quantifier: '{' is a literal, parsed as the next atom
          return;
        }
      } else {
        return;
      }
      if (quantified) {
        m_pos = here;
        fail("multiple repeat (possessive quantifiers are not supported)");
      }
      if (target.kind == node::bol || target.kind == node::eol || target.kind == node::eos) {
        m_pos = here;
        fail("nothing to repeat");
      }
      eat(U'?');  // lazy: same set of matches
      node rep;
      rep.kind = node::repeat;
      rep.min = lo;
      rep.max = hi;
      rep.kids.push_back(std::move(target));
      target = std::move(rep);
      quantified = true;
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

  node group(int depth) {
    if (eat(U'?')) {
      if (eat(U':')) {
        // non-capturing group
      } else if (eat(U'P')) {
        if (!eat(U'<')) fail("named backreferences (?P=...) are not supported");
        std::size_t length = 0;
        while (!at_end() && peek() != U'>') {
          ++m_pos;
          ++length;
        }
        if (at_end() || length == 0) fail("bad group name");
        ++m_pos;  // '>'
      } else if (eat(U'#')) {
        while (!at_end() && peek() != U')') ++m_pos;
        if (!eat(U')')) fail("missing ), unterminated comment");
        return node{};
      } else {
        fail("lookaround assertions and inline flags are not supported");
      }
    }
    node inner = alternation(depth + 1);
    if (!eat(U')')) fail("missing ), unterminated subpattern");
    if (inner.kind == node::empty) {
      node n;
      n.kind = node::cat;  // "()" matches the empty string and can be repeated
      return n;
    }
    return inner;
  }

  // The code point or class of an escape; m_pos is just past the backslash.
  // Returns true with `cls` filled for \d \w \s and their negations.
  bool escape_code(char32_t& out, char_class& cls, bool in_class) {
    if (at_end()) fail("bad escape (end of pattern)");
    const char32_t c = m_text[m_pos++];
    switch (c) {
      case U'd':
        cls.digit = true;
        return true;
      case U'D':
        cls.not_digit = true;
        return true;
      case U'w':
        cls.word = true;
        return true;
      case U'W':
        cls.not_word = true;
        return true;
      case U's':
        cls.space = true;
        return true;
      case U'S':
        cls.not_space = true;
        return true;
      case U'n':
        out = U'\n';
        return false;
      case U't':
        out = U'\t';
        return false;
      case U'r':
        out = U'\r';
        return false;
      case U'f':
        out = U'\f';
        return false;
      case U'v':
        out = U'\v';
        return false;
      case U'a':
        out = U'\a';
        return false;
      case U'b':
        if (in_class) {
          out = U'\b';
          return false;
        }
        break;
      case U'x': {
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
        out = v;
        return false;
      }
      default:
        break;
    }
    const bool ascii_alnum = (c >= U'0' && c <= U'9') || (c >= U'a' && c <= U'z') || (c >= U'A' && c <= U'Z');
    if (ascii_alnum) {
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
    bool first = true;
    for (;;) {
      if (at_end()) {
        m_pos = start;
        fail("unterminated character set");
      }
      char32_t c = m_text[m_pos++];
      if (c == U']' && !first) break;
      first = false;
      char32_t lo = c;
      if (c == U'\\') {
        if (escape_code(lo, cls, true)) continue;  // \d etc. inside the set
      }
      // A range "lo-hi", unless '-' is the last character of the set.
      if (m_pos + 1 < m_text.size() && m_text[m_pos] == U'-' && m_text[m_pos + 1] != U']') {
        ++m_pos;  // '-'
        char32_t hi = m_text[m_pos++];
        if (hi == U'\\') {
          char_class dummy;
          if (escape_code(hi, dummy, true)) fail("bad character range");
        }
        if (hi < lo) fail("bad character range");
        cls.ranges.emplace_back(lo, hi);
      } else {
        cls.ranges.emplace_back(lo, lo);
      }
    }
    return cls;
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
    case node::chr:
      add(op::chr, n.c);
      return;
    case node::any:
      add(op::any);
      return;
    case node::cls:
      add(op::cls, n.c);
      return;
    case node::bol:
      add(op::bol);
      return;
    case node::eol:
      add(op::eol);
      return;
    case node::eos:
      add(op::eos);
      return;
    case node::cat:
      for (const node& k : n.kids) emit(k);
      return;
    case node::alt: {
      // split L1, next; L1: kid0; jmp end; next: split L2, next2; ... last kid; end:
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
      return;
    }
    case node::repeat: {
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
      return;
    }
  }
}

// Pike VM without captures: the set of live program counters advances one code point at a time.
// Epsilon closure uses an explicit stack; `mark` stamps each pc once per position.
inline bool regex::run(std::string_view text_utf8, bool full) const {
  const std::u32string text = decode_utf8(text_utf8);
  const std::size_t n = text.size();
  const std::size_t size = m_program.size();
  std::vector<int> current, next, stack;
  current.reserve(size);
  next.reserve(size);
  std::vector<std::size_t> mark(size, static_cast<std::size_t>(-1));
  std::size_t stamp = 0;

  auto closure = [&](std::vector<int>& list, int start, std::size_t pos) {
    stack.push_back(start);
    while (!stack.empty()) {
      const int pc = stack.back();
      stack.pop_back();
      if (mark[static_cast<std::size_t>(pc)] == stamp) continue;
      mark[static_cast<std::size_t>(pc)] = stamp;
      const inst& in = m_program[static_cast<std::size_t>(pc)];
      switch (in.code) {
        case op::jmp:
          stack.push_back(in.x);
          break;
        case op::split:
          stack.push_back(in.y);
          stack.push_back(in.x);
          break;
        case op::bol:
          if (pos == 0) stack.push_back(pc + 1);
          break;
        case op::eol:  // end of text, or just before a final '\n'
          if (pos == n || (pos + 1 == n && text[pos] == U'\n')) stack.push_back(pc + 1);
          break;
        case op::eos:
          if (pos == n) stack.push_back(pc + 1);
          break;
        default:
          list.push_back(pc);
          break;
      }
    }
  };

  closure(current, 0, 0);
  for (std::size_t pos = 0;; ++pos) {
    ++stamp;
    next.clear();
    for (const int pc : current) {
      const inst& in = m_program[static_cast<std::size_t>(pc)];
      if (in.code == op::match) {
        if (!full || pos == n) return true;
        continue;
      }
      if (pos == n) continue;
      const char32_t c = text[pos];
      const bool step = (in.code == op::chr && c == in.c) || (in.code == op::any && c != U'\n') ||
                        (in.code == op::cls && m_classes[in.c].contains(c));
      if (step) closure(next, pc + 1, pos + 1);
    }
    if (pos == n || next.empty()) return false;
    current.swap(next);
  }
}

}  // namespace lora::io::detail
