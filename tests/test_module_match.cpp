// tests/test_module_match.cpp: how PEFT names pick modules (io/module_match.hpp): the Python `re`
// subset behind rank_pattern / alpha_pattern / target_modules (semantics, refusals, linear time),
// PEFT's pattern keys, and matching paths that differ by a leading prefix (suffix_index).
#include <chrono>
#include <lora/io/module_match.hpp>
#include <string>
#include <vector>

#include "support.hpp"

namespace {

namespace io = lora::io;
using lora_test::expect_error;

// --- the regex subset -------------------------------------------------------------------------------

TEST(PeftRegex, PythonSemantics) {
  using io::detail::regex;
  struct row {
    const char* pattern;
    const char* text;
    bool full;
  };
  const row rows[] = {
      {"a|b", "b", true},
      {"h\\.[0-9]+\\.attn", "h.12.attn", true},
      {"h\\.[0-9]+\\.attn", "h.x.attn", false},
      {"[^x]+", "abc", true},
      {"[^x]+", "axc", false},
      {"a{2,3}", "aaa", true},
      {"a{2,3}", "aaaa", false},
      {"a{2}", "aa", true},
      {"a{,2}", "", true},
      {"a{1,}b", "aaab", true},
      {"x{}", "x{}", true},  // "{}" is literal in Python
      {"x{a}", "x{a}", true},
      {"(?:ab)+", "ababab", true},
      {"(?P<name>q|k)_proj", "k_proj", true},
      {"q(?#comment)_proj", "q_proj", true},
      {"\\d+\\w*", "12ab_", true},
      {"\\s", " ", true},
      {"[\\d.]+", "1.2.3", true},
      {".", "\n", false},
      {"a.*?z", "abcz", true},
      {"()*a", "a", true},
      {"(a*)*b", "aaab", true},
      {"\\x41", "A", true},
      {"[a-c-]+", "a-b", true},
      {"\\.", ".", true},
  };
  for (const row& r : rows) EXPECT_EQ(regex(r.pattern).match_full(r.text), r.full) << r.pattern << " ~ " << r.text;
  // re.match: prefix, anchored at the start; $ before a final newline.
  EXPECT_TRUE(regex("ab").match_prefix("abc"));
  EXPECT_FALSE(regex("bc").match_prefix("abc"));
  EXPECT_TRUE(regex("ab$").match_prefix("ab\n"));
  EXPECT_FALSE(regex("ab\\Z").match_prefix("ab\n"));
  EXPECT_TRUE(regex("^a|^b").match_prefix("b"));
}

TEST(PeftRegex, RefusesWhatItCannotDoAndStaysLinear) {
  using io::detail::regex;
  for (const char* bad :
       {"a**", "*a", "(a", "a)", "[a", "(?=a)", "(?i)a", "\\1", "\\b", "a{3,2}", "(?P=x)", "\\q", "[z-a]", "^*"}) {
    EXPECT_THROW(regex{bad}, lora::format_error) << bad;
  }
  expect_error<lora::format_error>([] { regex("(a{100}){1000}"); }, {"too complex", "(a{100}){1000}"});
  expect_error<lora::format_error>([] { regex(std::string(200, '(') + std::string(200, ')')); }, {"nest"});
  // A repeated empty group compiles to nothing, however large the count (it once looped 4e9 times).
  EXPECT_TRUE(regex("(){4000000000}").match_full(""));
  EXPECT_TRUE(regex("a(?:){99999}b").match_full("ab"));
  EXPECT_TRUE(regex("a{0}b").match_full("b"));
  // A pattern that is exponential for a backtracking matcher finishes at once here.
  const auto start = std::chrono::steady_clock::now();
  EXPECT_FALSE(regex("(a|a)*(a|aa)*c").match_full(std::string(3000, 'a')));
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 5.0);
}

TEST(PeftRegex, PeftPatternKeys) {
  using io::detail::pattern_key_matches;
  // get_pattern_key: re.match(r"(.*\.)?(key)$", path).
  EXPECT_TRUE(pattern_key_matches("q_proj", "model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(pattern_key_matches("q_proj", "q_proj"));
  EXPECT_FALSE(pattern_key_matches("proj", "model.q_proj"));  // a whole trailing component
  EXPECT_TRUE(pattern_key_matches("layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"));
  EXPECT_FALSE(pattern_key_matches("layers.0.self_attn.q_proj", "model.layers.10.self_attn.q_proj"));
  EXPECT_TRUE(pattern_key_matches("layers\\.[0-3]\\..*", "model.layers.2.mlp.up_proj"));
  EXPECT_FALSE(pattern_key_matches("layers\\.[0-3]\\..*", "model.layers.5.mlp.up_proj"));
  EXPECT_FALSE(pattern_key_matches("q_proj", "model.q_proj.sub"));  // anchored at the end
  // The key is spliced in unescaped, so "." matches any character, as in PEFT.
  EXPECT_TRUE(pattern_key_matches("h.0.attn", "transformer.hx0.attn"));
  EXPECT_EQ(io::detail::regex_escape("h.0(x)"), "h\\.0\\(x\\)");
  EXPECT_TRUE(pattern_key_matches(io::detail::regex_escape("h.0.attn"), "transformer.h.0.attn"));
  EXPECT_FALSE(pattern_key_matches(io::detail::regex_escape("h.0.attn"), "transformer.hx0.attn"));
}

TEST(PeftRegex, EscapesInAndOutOfClasses) {
  using io::detail::regex;
  EXPECT_TRUE(regex("\\x78").match_full("x"));   // \x78 is 'x', not a refused escape
  EXPECT_TRUE(regex("[\\b]").match_full("\b"));  // [\b] is a backspace
  EXPECT_TRUE(regex("\\t\\n\\r\\f\\v\\a").match_full("\t\n\r\f\v\a"));
  EXPECT_TRUE(regex("[\\S]+").match_full("ab"));
  EXPECT_FALSE(regex("[\\S]+").match_full("a b"));
  EXPECT_TRUE(regex("\\D\\W").match_full("a."));
  EXPECT_FALSE(regex("\\D").match_full("7"));
  EXPECT_TRUE(regex("\\-\\(").match_full("-("));
  for (const char* bad : {"\\x4", "\\xg1", "\\"}) EXPECT_THROW(regex{bad}, lora::format_error) << bad;
}

TEST(PeftRegex, BytesThatAreNotUtf8StandForThemselves) {
  using io::detail::regex;
  // C0 AB is an overlong encoding of '+': a literal here, never a quantifier (found by fuzz_regex).
  const std::string overlong = "a\xC0\xAB";
  EXPECT_TRUE(regex(overlong).match_full(overlong));
  EXPECT_FALSE(regex(overlong).match_full("aa"));
  EXPECT_FALSE(regex(overlong).match_full("a+"));
  EXPECT_TRUE(regex(io::detail::regex_escape(overlong + "(")).match_full(overlong + "("));
  // A stray byte E9 is not the code point U+00E9 ("\xC3\xA9"), and a truncated sequence is two bytes.
  EXPECT_FALSE(regex("\xE9").match_full("\xC3\xA9"));
  EXPECT_TRUE(regex(".").match_full("\xC3\xA9"));
  EXPECT_TRUE(regex("..").match_full("\xE2\x82"));
}

TEST(PeftPatterns, TargetModulesList) {
  using io::detail::module_in_list;
  const std::vector<std::string> targets = {"q_proj", "mlp.up"};
  EXPECT_TRUE(module_in_list(targets, "q_proj"));
  EXPECT_TRUE(module_in_list(targets, "model.layers.0.q_proj"));
  EXPECT_TRUE(module_in_list(targets, "layers.3.mlp.up"));
  EXPECT_FALSE(module_in_list(targets, "model.xq_proj"));  // a whole trailing component
  EXPECT_FALSE(module_in_list(targets, "q_proj.sub"));
  EXPECT_FALSE(module_in_list({}, "q_proj"));
}

TEST(PeftPatterns, SuffixIndex) {
  const io::detail::suffix_index index({"h.0.attn.c_attn", "h.1.attn.c_attn", "model.layers.0.q", "x.layers.0.q"});
  EXPECT_EQ(index.find("transformer.h.0.attn.c_attn", "m"), 0);
  EXPECT_EQ(index.find("h.1.attn.c_attn", "m"), 1);
  EXPECT_THROW(index.find("attn.c_attn", "m"), lora::name_error);  // a suffix of both, equally
  EXPECT_EQ(index.find("h.2.attn.c_attn", "m"), -1);
  EXPECT_EQ(index.find("model.model.layers.0.q", "m"), 2);
  // An identical path beats a longer one that ends with it.
  const io::detail::suffix_index nested({"x.a.b", "a.b"});
  EXPECT_EQ(nested.find("a.b", "m"), 1);
  EXPECT_EQ(nested.find("x.a.b", "m"), 0);
  EXPECT_EQ(nested.find("y.x.a.b", "m"), 0);
  expect_error<lora::name_error>([&] { index.find("layers.0.q", "adapter module 'layers.0.q'"); },
                                 {"adapter module 'layers.0.q'", "ambiguous", "model.layers.0.q", "x.layers.0.q"});
}

}  // namespace
