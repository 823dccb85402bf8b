// tests/file_support.hpp: what the file-format tests (safetensors, PEFT, merge tool, checkpoints,
// atomic writes) share: a scratch directory removed with everything in it, and whole-file reads and
// writes.
#pragma once

#include <stdlib.h>  // mkdtemp

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

namespace lora_test {

/// A fresh directory under the system temp directory, removed with everything in it.
class temp_dir {
 public:
  temp_dir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "lora-test-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    m_path = pattern;
  }
  ~temp_dir() {
    std::error_code ec;  // a test may have made the directory read-only
    std::filesystem::permissions(m_path, std::filesystem::perms::owner_all, std::filesystem::perm_options::add, ec);
    std::filesystem::remove_all(m_path, ec);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;

  std::string file(const std::string& name) const { return m_path + "/" + name; }
  const std::string& path() const { return m_path; }
  /// Names of the entries in the directory (hidden ones included), sorted.
  std::vector<std::string> list() const {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(m_path)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }
  /// Number of entries in the directory.
  std::size_t entries() const { return list().size(); }

 private:
  std::string m_path;
};

/// The bytes of a file (empty when it cannot be read).
inline std::vector<unsigned char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<unsigned char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// Replaces a file with `data` (a test failure when it cannot be written).
inline void write_file(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  ASSERT_TRUE(out.good()) << path;
}

inline void write_file(const std::string& path, const std::vector<unsigned char>& data) {
  write_file(path, std::string(data.begin(), data.end()));
}

}  // namespace lora_test
