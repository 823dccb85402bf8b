// examples/common/flags.hpp: command-line flags for the examples' verbs: a table from flag to what it
// sets, a one-line error (exit 2) for anything else, and the number parsers the tables use.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "strings.hpp"

namespace ex {

/// Flags without a value (switches) and flags with one (setters), for one program or verb.
class flag_table {
 public:
  using setter = std::function<void(const std::string& value)>;

  /// `program` prefixes error messages ("gpt2_finetune finetune"); `usage` is printed by --help.
  flag_table(std::string program, std::string usage) : m_program(std::move(program)), m_usage(std::move(usage)) {}

  void on(const std::string& flag, std::function<void()> action) { m_switches[flag] = std::move(action); }
  void on(const std::string& flag, setter action) { m_setters[flag] = std::move(action); }
  /// Binds a switch to a bool and a setter to a string.
  void bind(const std::string& flag, bool& target) {
    on(flag, std::function<void()>([&target] { target = true; }));
  }
  void bind(const std::string& flag, std::string& target) {
    on(flag, setter([&target](const std::string& v) { target = v; }));
  }
  /// A number >= lo (an integer when T is integral).
  template <typename T>
  void bind(const std::string& flag, T& target, double lo) {
    on(flag, setter([this, flag, &target, lo](const std::string& v) { target = static_cast<T>(number(flag, v, lo)); }));
  }
  /// A comma-separated list of numbers >= lo.
  template <typename T>
  void bind_list(const std::string& flag, std::vector<T>& target, double lo) {
    on(flag, setter([this, flag, &target, lo](const std::string& v) { target = list<T>(flag, v, lo); }));
  }

  /// Applies args in order; --help / -h prints the usage and exits 0; anything unknown exits 2.
  void parse(const std::vector<std::string>& args) const;

  [[noreturn]] void fail(const std::string& message) const {
    std::fprintf(stderr, "%s: %s (try --help)\n", m_program.c_str(), message.c_str());
    std::exit(2);
  }
  double number(const std::string& flag, const std::string& text, double lo) const;
  template <typename T>
  std::vector<T> list(const std::string& flag, const std::string& text, double lo) const {
    std::vector<T> out;
    std::stringstream in(text);
    for (std::string item; std::getline(in, item, ',');) out.push_back(static_cast<T>(number(flag, item, lo)));
    if (out.empty()) fail(flag + " needs at least one value");
    return out;
  }
  std::vector<std::string> words(const std::string& flag, const std::string& text) const {
    std::vector<std::string> out;
    std::stringstream in(text);
    for (std::string item; std::getline(in, item, ',');)
      if (!item.empty()) out.push_back(item);
    if (out.empty()) fail(flag + " needs at least one value");
    return out;
  }

 private:
  std::string m_program, m_usage;
  std::map<std::string, std::function<void()>> m_switches;
  std::map<std::string, setter> m_setters;
};

// ---------------------------------------------------------------------------------------------------

inline double flag_table::number(const std::string& flag, const std::string& text, double lo) const {
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !std::isfinite(v) || !(v >= lo))
    fail(cat(flag, " expects a number >= ", lo, ", got '", text, "'"));
  return v;
}

inline void flag_table::parse(const std::vector<std::string>& args) const {
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a == "--help" || a == "-h") {
      std::fputs(m_usage.c_str(), stdout);
      std::exit(0);
    }
    if (const auto s = m_switches.find(a); s != m_switches.end()) {
      s->second();
    } else if (const auto set = m_setters.find(a); set != m_setters.end()) {
      if (i + 1 >= args.size()) fail(a + " needs a value");
      set->second(args[++i]);
    } else {
      fail("unknown option '" + a + "'");
    }
  }
}

}  // namespace ex
