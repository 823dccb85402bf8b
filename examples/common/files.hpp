// examples/common/files.hpp: writing the examples' text outputs (the results JSON).
#pragma once

#include <fstream>
#include <lora/error.hpp>
#include <string>

#include "strings.hpp"

namespace ex {

/// Writes `text` to `path`, replacing the file; lora::io_error when it cannot be written.
// TODO(atomic_file): use lora::io::write_file_atomically, so that `path` is either the old file or the
// complete new one.
inline void save_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  if (!out.flush()) throw lora::io_error(cat("cannot write '", path, "'"));
}

}  // namespace ex
