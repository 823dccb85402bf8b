// tests/fuzz/fuzz_regex.cpp: libFuzzer target for the regular expressions of PEFT configs
// (io/detail/regex.hpp, reached by fuzz_peft only through whole adapter configs). Input: a pattern, a
// NUL byte, then a text. Any pattern must compile or raise lora::format_error, within the program
// cap; a full match must also be a prefix match; and the escaped text must match itself exactly, as
// a pattern and as a PEFT pattern key. A pattern that is slow to match shows up as a timeout.
//
//   clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude tests/fuzz/fuzz_regex.cpp \
//       -o fuzz_regex
//   ./fuzz_regex -max_total_time=60 -timeout=10 tests/fuzz/corpus_regex
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <lora/io/module_match.hpp>
#include <string>
#include <string_view>

namespace {

namespace detail = lora::io::detail;

void require(bool ok) {
  if (!ok) std::abort();
}

void check_pattern(std::string_view pattern, std::string_view text) {
  try {
    const detail::regex re(pattern);
    require(re.program_size() <= detail::max_regex_program);
    const bool full = re.match_full(text);
    const bool prefix = re.match_prefix(text);
    require(!full || prefix);
  } catch (const lora::format_error&) {
  }
}

// regex_escape(text) matches exactly text, as re.fullmatch and as a get_pattern_key key.
void check_escape(std::string_view text) {
  if (text.size() > 1000) return;  // keeps the escaped pattern under the program cap
  const std::string s(text);
  const std::string escaped = detail::regex_escape(s);
  require(detail::regex(escaped).match_full(s));
  require(detail::pattern_key_matches(escaped, s));
  require(detail::pattern_key_matches(escaped, "prefix." + s));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::size_t nul = input.find('\0');
  const std::string_view pattern = input.substr(0, nul);
  const std::string_view text = nul == std::string_view::npos ? std::string_view() : input.substr(nul + 1);
  check_pattern(pattern, text);
  check_escape(text);
  return 0;
}
