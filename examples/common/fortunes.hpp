// examples/common/fortunes.hpp: the text corpora of gpt2_finetune, from Debian's fortune packages.
//
// A fortune file is plain UTF-8 text whose records (one fortune each) are separated by lines holding
// only "%". Every record of every file goes to one split, decided by a stable hash of the file's name
// and the record's index (FNV-1a 64, the same on every machine and every run):
//
//   h = fnv1a64(file name + '\0' + decimal record index);   h mod 10 in 0..7: train, 8: validation, 9: test
//
// and the text of a split is its records, in file order then record order, joined with "\n%\n" (the
// format of a fortune file, so `gpt2_finetune eval --text` on a written split reads the same bytes).
//
// The corpora (the files of the Debian packages fortunes, fortunes-min, fortunes-es, fortunes-ru; the
// offensive off/ files are never used):
//   english   every English file except the mild shift's: the base model is pretrained on its train split
//   mild      English categories held out of pretraining: startrek, zippy, literature, riddles (~143 KB)
//   larger    Spanish (fortunes-es, es/*.fortunes)
//   extreme   Russian (fortunes-ru, ru/*): Cyrillic, two bytes per letter in UTF-8, bytes the base has
//             barely seen
// Each split's text may be capped (a byte budget): the records are then taken in a fixed pseudo-random
// order (by their hash) until the next one would not fit, and written in file order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <lora/error.hpp>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "strings.hpp"

namespace ex {

inline constexpr const char* fortunes_default_dir = "/usr/share/games/fortunes";

/// The three splits of a corpus.
enum class split { train, validation, test };

/// One corpus: a name, and its files relative to the fortunes folder.
struct corpus_spec {
  std::string name;
  std::string description;
  std::vector<std::string> files;
};

/// One record and where it came from.
struct fortune_record {
  std::string file;  ///< name relative to the fortunes folder
  std::size_t index = 0;
  std::uint64_t hash = 0;
  std::string text;
};

/// The splits of a corpus as text, with counts.
struct corpus_splits {
  std::string train, validation, test;
  std::size_t records[3] = {0, 0, 0};
  std::size_t bytes_before_cap[3] = {0, 0, 0};
  const std::string& text(split s) const {
    return s == split::train ? train : s == split::validation ? validation : test;
  }
};

/// FNV-1a, 64 bits.
inline std::uint64_t fnv1a64(const std::string& s) {
  std::uint64_t h = 14695981039346656037ull;
  for (const unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

/// The split of record `index` of `file` (see the top of this file).
inline split split_of(const std::string& file, std::size_t index) {
  const std::uint64_t h = fnv1a64(file + '\0' + std::to_string(index)) % 10;
  return h < 8 ? split::train : h == 8 ? split::validation : split::test;
}

/// The records of a fortune file: the text between lines that hold only "%" (a trailing "\r" is
/// allowed), without the newline before the separator; empty records are skipped (their index still
/// counts). io_error naming the file when it cannot be read.
inline std::vector<fortune_record> read_fortune_file(const std::string& dir, const std::string& file) {
  const std::string path = (std::filesystem::path(dir) / file).string();
  std::ifstream in(path, std::ios::binary);
  if (!in) throw lora::io_error(cat("cannot read fortune file '", path, "'"));
  std::vector<fortune_record> out;
  std::string line, current;
  std::size_t index = 0;
  const auto flush = [&] {
    if (!current.empty() && current.back() == '\n') current.pop_back();
    if (!current.empty()) {
      fortune_record r;
      r.file = file;
      r.index = index;
      r.hash = fnv1a64(file + '\0' + std::to_string(index));
      r.text = std::move(current);
      out.push_back(std::move(r));
    }
    current.clear();
    ++index;
  };
  while (std::getline(in, line)) {
    if (line == "%" || line == "%\r") {
      flush();
    } else {
      current += line;
      current += '\n';
    }
  }
  if (in.bad()) throw lora::io_error(cat("error while reading fortune file '", path, "'"));
  flush();
  return out;
}

/// The English files of Debian's fortunes and fortunes-min packages (the offensive ones excluded).
inline std::vector<std::string> english_fortune_files() {
  return {"art",         "ascii-art", "computers",  "cookie",        "debian",       "definitions", "disclaimer",
          "drugs",       "education", "ethnic",     "food",          "fortunes",     "goedel",      "humorists",
          "kids",        "knghtbrd",  "law",        "linux",         "linuxcookie",  "literature",  "love",
          "magic",       "medicine",  "men-women",  "miscellaneous", "news",         "paradoxum",   "people",
          "perl",        "pets",      "platitudes", "politics",      "pratchett",    "riddles",     "science",
          "songs-poems", "sports",    "startrek",   "tao",           "translate-me", "wisdom",      "work",
          "zippy"};
}

/// The English categories held out of pretraining: the mild shift.
inline std::vector<std::string> mild_shift_files() { return {"literature", "riddles", "startrek", "zippy"}; }

/// The files of `subdir` (relative to dir) whose names pass `keep`, sorted; empty when it is missing.
template <typename Keep>
std::vector<std::string> list_fortune_dir(const std::string& dir, const std::string& subdir, Keep keep) {
  std::vector<std::string> out;
  std::error_code ec;
  const std::filesystem::path base = std::filesystem::path(dir) / subdir;
  for (std::filesystem::directory_iterator it(base, ec), end; !ec && it != end; it.increment(ec)) {
    if (!it->is_regular_file(ec) || it->is_symlink(ec)) continue;
    const std::string name = it->path().filename().string();
    if (keep(name)) out.push_back(subdir + "/" + name);
  }
  std::sort(out.begin(), out.end());
  return out;
}

/// The corpus called `name`: english, mild, larger (Spanish) or extreme (Russian). config_error for
/// another name; io_error when its files are missing (naming the Debian package to install).
inline corpus_spec fortune_corpus(const std::string& dir, const std::string& name) {
  corpus_spec c;
  c.name = name;
  if (name == "english") {
    const auto held_out = mild_shift_files();
    for (const auto& f : english_fortune_files())
      if (std::find(held_out.begin(), held_out.end(), f) == held_out.end()) c.files.push_back(f);
    c.description = "English fortunes except the mild shift's categories (fortunes, fortunes-min)";
  } else if (name == "mild") {
    c.files = mild_shift_files();
    c.description = "English categories held out of pretraining: literature, riddles, startrek, zippy";
  } else if (name == "larger") {
    c.files = list_fortune_dir(
        dir, "es", [](const std::string& f) { return f.size() > 9 && f.compare(f.size() - 9, 9, ".fortunes") == 0; });
    c.description = "Spanish (fortunes-es, es/*.fortunes)";
  } else if (name == "extreme") {
    c.files = list_fortune_dir(dir, "ru", [](const std::string& f) {
      const auto ends_with = [&](const char* x) {
        const std::string t(x);
        return f.size() >= t.size() && f.compare(f.size() - t.size(), t.size(), t) == 0;
      };
      return !ends_with(".dat") && !ends_with(".u8");
    });
    c.description = "Russian (fortunes-ru, ru/*): Cyrillic";
  } else {
    throw lora::config_error(cat("unknown corpus '", name, "': expected english, mild, larger or extreme"));
  }
  if (c.files.empty())
    throw lora::io_error(cat("no fortune files for corpus '", name, "' under ", dir,
                             " (install the Debian packages fortunes, fortunes-min, fortunes-es, fortunes-ru)"));
  return c;
}

/// Reads a corpus and cuts it into its splits; each split's text is capped at cap[split] bytes when
/// that is positive (see the top of this file).
inline corpus_splits read_corpus(const std::string& dir, const corpus_spec& c, const std::size_t cap[3]) {
  std::vector<fortune_record> parts[3];
  for (const auto& file : c.files) {
    for (auto& r : read_fortune_file(dir, file))
      parts[static_cast<int>(split_of(r.file, r.index))].push_back(std::move(r));
  }
  corpus_splits out;
  std::string* texts[3] = {&out.train, &out.validation, &out.test};
  for (int s = 0; s < 3; ++s) {
    auto& records = parts[s];
    for (const auto& r : records) out.bytes_before_cap[s] += r.text.size() + 3;
    if (cap[s] > 0) {
      std::vector<std::size_t> order(records.size());
      for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
      std::sort(order.begin(), order.end(),
                [&](std::size_t x, std::size_t y) { return records[x].hash < records[y].hash; });
      std::vector<bool> keep(records.size(), false);
      std::size_t used = 0;
      for (const std::size_t i : order) {
        if (used + records[i].text.size() + 3 > cap[s]) break;
        used += records[i].text.size() + 3;
        keep[i] = true;
      }
      std::vector<fortune_record> kept;
      for (std::size_t i = 0; i < records.size(); ++i)
        if (keep[i]) kept.push_back(std::move(records[i]));
      records = std::move(kept);
    }
    std::string& text = *texts[s];
    for (std::size_t i = 0; i < records.size(); ++i) {
      if (i > 0) text += "\n%\n";
      text += records[i].text;
    }
    out.records[s] = records.size();
  }
  return out;
}

/// The first byte offset at which `text` is not well-formed UTF-8 (RFC 3629: no overlongs, no
/// surrogates, nothing above U+10FFFF), or npos.
inline std::size_t first_invalid_utf8(const std::string& text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = s[i];
    std::size_t len = 0;
    unsigned lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k)
      if (s[i + k] < 0x80 || s[i + k] > 0xBF) return i;
    i += len;
  }
  return std::string::npos;
}

/// "line L, column C (byte B)" of byte offset `at` in `text`, for messages.
inline std::string text_position(const std::string& text, std::size_t at) {
  std::size_t line = 1, column = 1;
  for (std::size_t i = 0; i < at && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
  }
  return cat("line ", line, ", column ", column, " (byte ", at, ")");
}

/// A whole file as bytes; io_error naming it when it cannot be read.
inline std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw lora::io_error(cat("cannot read text file '", path, "'"));
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) throw lora::io_error(cat("error while reading text file '", path, "'"));
  return s.str();
}

}  // namespace ex
