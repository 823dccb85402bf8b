// lora/io/safetensors_reader.hpp: reading safetensors files (Hugging Face), the file format of PEFT
// adapters and of most checkpoints; the layout is described in io/safetensors.hpp and
// docs/CONVENTIONS.md §safetensors. Files come from strangers, so the reader enforces every rule of
// the reference loader (huggingface/safetensors, Rust) plus a few of its own, each violation a
// lora::format_error naming the file, the tensor and the rule, and it never reads, allocates or
// trusts a size before checking it against the size of the file.
//
// Matrices: a 2-D tensor of shape [rows, cols] reads as a lora::matrix (column-major in memory) of
// rows x cols with the same (i, j) entries; a 1-D tensor of shape [n] reads as an n x 1 matrix.
//
// The file is memory-mapped where possible (io/file_storage.hpp), so taking one tensor from a
// multi-GB file touches only that tensor's pages. Every const member of safetensors_file may be
// called from several threads at once.
//
// POSIX only (Linux, macOS).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "detail/codec.hpp"
#include "detail/utf8.hpp"
#include "dtype.hpp"
#include "file_storage.hpp"
#include "tensor_info.hpp"

namespace lora::io {

/// A safetensors file opened for reading: validated completely at open, then read tensor by tensor.
/// Copies share the underlying mapping.
class safetensors_file {
 public:
  /// Opens and validates `path`. io_error when it cannot be opened or is not a regular file,
  /// format_error when it breaks a rule of the format.
  static safetensors_file open(const std::string& path, read_mode mode = read_mode::map);
  /// Validates an in-memory image of a file (same rules as open); `label` names it in messages.
  static safetensors_file from_bytes(std::vector<unsigned char> bytes, std::string label = "<memory>");

  /// The path (or label) given at open, as used in messages.
  const std::string& path() const noexcept { return m_label; }
  /// Every tensor, in file order (ascending data offset; zero-byte tensors at one offset by name).
  const std::vector<tensor_info>& tensors() const noexcept { return m_tensors; }
  bool contains(const std::string& name) const;
  /// The tensor called `name`; name_error listing a few available names if there is none.
  const tensor_info& info(const std::string& name) const;
  /// The "__metadata__" map (empty if the file has none).
  const std::map<std::string, std::string>& metadata() const noexcept { return m_metadata; }
  /// 8 + N: the file offset of the data area.
  std::uint64_t data_offset() const noexcept { return m_data_offset; }
  /// Whether the whole file is addressable in memory (mapped, or opened from bytes), so that raw()
  /// is zero-copy.
  bool is_memory_resident() const noexcept;

  /// A 2-D tensor [rows, cols] as a rows x cols matrix, or a 1-D tensor [n] as n x 1, converted to
  /// Scalar (float or double) from any dtype but c64. shape_error for other ranks, dtype_error for c64.
  template <typename Scalar>
  matrix<Scalar> read_matrix(const std::string& name) const;
  /// A tensor of any rank flattened in row-major order and converted to Scalar.
  template <typename Scalar>
  vector<Scalar> read_vector(const std::string& name) const;
  /// The stored bytes of a tensor, for copying it through unchanged; zero-copy when memory-resident.
  tensor_bytes raw(const std::string& name) const;

 private:
  safetensors_file() = default;
  static safetensors_file from_storage(std::shared_ptr<const detail::file_storage> storage, std::string label);
  // Calls fn(const unsigned char* bytes, std::size_t count) over consecutive pieces of a tensor's
  // bytes, each a whole number of elements and at most ~1 MiB, so that unmapped files are read in
  // bounded chunks.
  template <typename Fn>
  void for_each_chunk(const tensor_info& t, Fn&& fn) const;
  void check_readable(const tensor_info& t) const;

  std::shared_ptr<const detail::file_storage> m_storage;
  std::string m_label;
  std::vector<tensor_info> m_tensors;
  std::unordered_map<std::string, std::size_t> m_index;
  std::map<std::string, std::string> m_metadata;
  std::uint64_t m_data_offset = 0;
};

namespace detail {

/// Deepest JSON nesting accepted in a header (serde_json's default recursion limit); a valid header
/// needs 3.
inline constexpr int max_header_depth = 128;

/// The validated contents of a header.
struct parsed_header {
  std::vector<tensor_info> tensors;  // in file order
  std::map<std::string, std::string> metadata;
  std::uint64_t data_offset = 0;  // 8 + N
};
/// Applies every loader rule to the file in `storage`; format_error naming `label` on the first broken.
parsed_header parse_header(const file_storage& storage, const std::string& label);

/// Throws format_error("safetensors file '<label>': <rule>").
[[noreturn]] void throw_format_error(const std::string& label, const std::string& rule);

/// Names the file (and the tensor) in the format_errors of parse_header.
struct header_context {
  const std::string& label;
  [[noreturn]] void fail(const std::string& rule) const { throw_format_error(label, rule); }
  [[noreturn]] void fail_tensor(const std::string& name, const std::string& rule) const {
    throw_format_error(label, cat("tensor '", name, "': ", rule));
  }
};

/// A reader of one field of a tensor's header entry ("dtype", "shape", "data_offsets").
struct entry_field {
  const char* name;
  void (*read)(const nlohmann::json& value, tensor_info& t, const header_context& ctx);
};

}  // namespace detail

// ================================================================================================
// Implementation
// ================================================================================================

namespace detail {

inline void throw_format_error(const std::string& label, const std::string& rule) {
  throw format_error(cat("safetensors file '", label, "': ", rule));
}

/// The N header bytes at [8, 8 + N) of the file, in place when mapped, else copied (N is bounded and
/// inside the file by then): checked to be UTF-8 without a NUL byte.
struct header_bytes {
  std::vector<unsigned char> copy;
  const unsigned char* data = nullptr;
  std::size_t size = 0;
};

inline header_bytes read_header_bytes(const file_storage& storage, const header_context& ctx) {
  const std::uint64_t file_size = storage.size();
  if (file_size < 8) ctx.fail(cat("file is ", file_size, " bytes, shorter than the 8-byte header length"));
  unsigned char prefix[8];
  storage.read(0, 8, prefix, ctx.label);
  const std::uint64_t n = load_le<std::uint64_t>(prefix);
  if (n > max_header_size) ctx.fail(cat("header length ", n, " exceeds the limit of ", max_header_size, " bytes"));
  if (n > file_size - 8) {
    ctx.fail(cat("header length ", n, " runs past the end of the file (8 + ", n, " > ", file_size, " bytes)"));
  }
  header_bytes out;
  out.size = static_cast<std::size_t>(n);
  out.data = storage.data() != nullptr ? storage.data() + 8 : nullptr;
  if (out.data == nullptr) {
    out.copy.resize(out.size);
    storage.read(8, out.size, out.copy.data(), ctx.label);
    out.data = out.copy.data();
  }
  const std::size_t bad = utf8_error_offset(out.data, out.size);
  if (bad != out.size) ctx.fail(cat("header is not valid UTF-8 (byte ", 8 + bad, " of the file)"));
  // nlohmann/json stops at a NUL byte as if the input ended there, which would let anything follow
  // it; no JSON text contains a raw NUL, so reject it here.
  if (const void* nul = out.size != 0 ? std::memchr(out.data, 0, out.size) : nullptr) {
    ctx.fail(cat("header is not valid JSON: NUL byte at byte ", 8 + (static_cast<const unsigned char*>(nul) - out.data),
                 " of the file"));
  }
  return out;
}

/// The parser callback that refuses duplicate keys (which the DOM would collapse, as serde does
/// silently) and nesting deeper than max_header_depth, as they arrive.
class header_watch {
 public:
  explicit header_watch(const header_context& ctx) : m_ctx(ctx) {}
  bool operator()(int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using event_t = nlohmann::json::parse_event_t;
    if (event == event_t::object_start || event == event_t::array_start) {
      if (depth >= max_header_depth) m_ctx.fail(cat("header nests deeper than ", max_header_depth, " levels"));
      if (event == event_t::object_start) m_open_objects.emplace_back();
    } else if (event == event_t::object_end) {
      if (!m_open_objects.empty()) m_open_objects.pop_back();
    } else if (event == event_t::key) {
      on_key(depth, parsed.get_ref<const std::string&>());
    }
    return true;
  }

 private:
  void on_key(int depth, const std::string& key) {
    if (!m_open_objects.empty() && !m_open_objects.back().insert(key).second) {
      if (depth == 1) m_ctx.fail(cat("duplicate tensor name '", key, "' in the header"));
      m_ctx.fail_tensor(m_entry, cat("duplicate key '", key, "' in its header entry"));
    }
    if (depth == 1) m_entry = key;
  }
  const header_context& m_ctx;
  std::vector<std::unordered_set<std::string>> m_open_objects;  // the keys of each open object
  std::string m_entry;                                          // the tensor entry being parsed
};

inline nlohmann::json parse_header_json(const header_bytes& header, const header_context& ctx) {
  using json = nlohmann::json;
  header_watch watch(ctx);
  json root;
  try {
    const char* text = reinterpret_cast<const char*>(header.data);
    root = json::parse(text, text + header.size, std::ref(watch), /*allow_exceptions=*/true,
                       /*ignore_comments=*/false);
  } catch (const json::exception& e) {
    ctx.fail(cat("header is not valid JSON: ", e.what()));
  }
  if (!root.is_object()) ctx.fail(cat("header is not a JSON object (it is ", root.type_name(), ")"));
  return root;
}

/// A non-negative integer that fits 64 bits ("-0" included, as serde accepts it); no floats.
inline bool as_u64(const nlohmann::json& v, std::uint64_t& out) {
  if (v.is_number_unsigned()) {
    out = v.get<std::uint64_t>();
    return true;
  }
  if (v.is_number_integer() && v.get<std::int64_t>() >= 0) {
    out = static_cast<std::uint64_t>(v.get<std::int64_t>());
    return true;
  }
  return false;
}

inline void read_metadata(const nlohmann::json& entry, std::map<std::string, std::string>& out,
                          const header_context& ctx) {
  if (!entry.is_object()) {
    ctx.fail(cat("__metadata__ is not a JSON object mapping strings to strings (it is ", entry.type_name(), ")"));
  }
  for (const auto& [key, value] : entry.items()) {
    if (!value.is_string()) {
      ctx.fail(
          cat("__metadata__ is not a map of strings to strings: the value of '", key, "' is a ", value.type_name()));
    }
    out.emplace(key, value.get<std::string>());
  }
}

inline void read_dtype_field(const nlohmann::json& v, tensor_info& t, const header_context& ctx) {
  if (!v.is_string()) ctx.fail_tensor(t.name, cat("field 'dtype' is not a string (it is ", v.type_name(), ")"));
  try {
    t.type = parse_dtype(v.get_ref<const std::string&>());
  } catch (const format_error&) {
    ctx.fail_tensor(t.name, cat("unknown dtype '", v.get_ref<const std::string&>(), "'"));
  }
}

inline void read_shape_field(const nlohmann::json& v, tensor_info& t, const header_context& ctx) {
  if (!v.is_array()) ctx.fail_tensor(t.name, cat("field 'shape' is not an array (it is ", v.type_name(), ")"));
  t.shape.reserve(v.size());
  for (const nlohmann::json& d : v) {
    std::uint64_t dim = 0;
    if (d.is_number_integer() && !d.is_number_unsigned() && d.get<std::int64_t>() < 0) {
      ctx.fail_tensor(t.name, cat("negative dimension ", d.get<std::int64_t>(), " in shape ", v.dump()));
    }
    if (!as_u64(d, dim)) ctx.fail_tensor(t.name, cat("shape ", v.dump(), " holds a non-integer (", d.dump(), ")"));
    if (dim > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      ctx.fail_tensor(t.name, cat("dimension ", dim, " in shape ", v.dump(), " is larger than 2^63 - 1"));
    }
    t.shape.push_back(static_cast<std::int64_t>(dim));
  }
}

inline void read_offsets_field(const nlohmann::json& v, tensor_info& t, const header_context& ctx) {
  if (!v.is_array() || v.size() != 2 || !as_u64(v[0], t.begin) || !as_u64(v[1], t.end)) {
    ctx.fail_tensor(
        t.name,
        cat("field 'data_offsets' is not an array [begin, end] of two non-negative integers (it is ", v.dump(), ")"));
  }
  if (t.end < t.begin) ctx.fail_tensor(t.name, cat("data_offsets end ", t.end, " is before begin ", t.begin));
}

/// The fields a tensor entry must have, each with its reader; other members are ignored, as serde
/// does in the reference.
inline constexpr entry_field entry_fields[] = {
    {"dtype", read_dtype_field},
    {"shape", read_shape_field},
    {"data_offsets", read_offsets_field},
};

inline tensor_info read_tensor_entry(const std::string& name, const nlohmann::json& entry, const header_context& ctx) {
  if (!entry.is_object()) {
    ctx.fail_tensor(name, cat("header entry is not a JSON object (it is ", entry.type_name(), ")"));
  }
  for (const entry_field& field : entry_fields) {
    if (!entry.contains(field.name)) ctx.fail_tensor(name, cat("header entry is missing field '", field.name, "'"));
  }
  tensor_info t;
  t.name = name;
  for (const entry_field& field : entry_fields) field.read(entry.at(field.name), t, ctx);
  const std::string shape = entry.at("shape").dump();
  std::uint64_t bytes = 0;
  if (!checked_byte_size(t.type, t.shape, bytes)) {
    ctx.fail_tensor(name, cat("element count of shape ", shape, " times the ", dtype_size(t.type), "-byte size of ",
                              dtype_name(t.type), " overflows 64 bits"));
  }
  if (t.end - t.begin != bytes) {
    ctx.fail_tensor(name, cat("data_offsets [", t.begin, ", ", t.end, "] span ", t.end - t.begin, " bytes but shape ",
                              shape, " of ", dtype_name(t.type), " needs ", bytes, " bytes"));
  }
  return t;
}

/// Sorts the tensors by data offset and checks that they tile [0, data_size) exactly: no hole, no
/// overlap, nothing left over.
inline void check_tiling(std::vector<tensor_info>& tensors, std::uint64_t data_size, const header_context& ctx) {
  std::sort(tensors.begin(), tensors.end(), [](const tensor_info& a, const tensor_info& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  std::uint64_t expected = 0;
  for (std::size_t k = 0; k < tensors.size(); ++k) {
    const tensor_info& t = tensors[k];
    if (t.begin > expected && k == 0) {
      ctx.fail_tensor(t.name, cat("data_offsets begin at ", t.begin, " but the first tensor must begin at 0 (a hole)"));
    }
    if (t.begin > expected) {
      ctx.fail_tensor(t.name, cat("data_offsets begin at ", t.begin, " but the previous tensor '", tensors[k - 1].name,
                                  "' ends at ", expected, " (a hole of ", t.begin - expected, " bytes)"));
    }
    if (t.begin < expected) {
      ctx.fail_tensor(t.name, cat("data_offsets [", t.begin, ", ", t.end, "] overlap the previous tensor '",
                                  tensors[k - 1].name, "', which ends at ", expected));
    }
    expected = t.end;
  }
  if (expected != data_size) {
    ctx.fail(cat("the tensors end at byte ", expected, " of the data area but the data area holds ", data_size,
                 " bytes (the data must end exactly at the end of the file)"));
  }
}

// The accepted header is a JSON object mapping "__metadata__" to an object of strings and every other
// key (a tensor name) to an object with at least the entry_fields. Beyond the reference: duplicate
// keys, nesting deeper than max_header_depth, raw NUL bytes, and dimensions above 2^63 - 1 are
// rejected. Memory: the parsed DOM costs a small multiple of N (itself at most 100 MB and never more
// than the file holds); nothing is sized from a number in the header.
inline parsed_header parse_header(const file_storage& storage, const std::string& label) {
  const header_context ctx{label};
  const header_bytes header = read_header_bytes(storage, ctx);
  const nlohmann::json root = parse_header_json(header, ctx);
  parsed_header result;
  result.data_offset = 8 + header.size;
  result.tensors.reserve(root.size());
  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      read_metadata(entry, result.metadata, ctx);
    } else {
      result.tensors.push_back(read_tensor_entry(name, entry, ctx));
    }
  }
  check_tiling(result.tensors, storage.size() - result.data_offset, ctx);
  return result;
}

}  // namespace detail

inline safetensors_file safetensors_file::open(const std::string& path, read_mode mode) {
  return from_storage(detail::file_storage::open(path, mode), path);
}

inline safetensors_file safetensors_file::from_bytes(std::vector<unsigned char> bytes, std::string label) {
  return from_storage(detail::file_storage::from_bytes(std::move(bytes)), std::move(label));
}

inline safetensors_file safetensors_file::from_storage(std::shared_ptr<const detail::file_storage> storage,
                                                       std::string label) {
  detail::parsed_header header = detail::parse_header(*storage, label);
  safetensors_file file;
  file.m_storage = std::move(storage);
  file.m_label = std::move(label);
  file.m_tensors = std::move(header.tensors);
  file.m_metadata = std::move(header.metadata);
  file.m_data_offset = header.data_offset;
  file.m_index.reserve(file.m_tensors.size());
  for (std::size_t k = 0; k < file.m_tensors.size(); ++k) file.m_index.emplace(file.m_tensors[k].name, k);
  return file;
}

inline bool safetensors_file::contains(const std::string& name) const { return m_index.count(name) != 0; }

inline const tensor_info& safetensors_file::info(const std::string& name) const {
  const auto it = m_index.find(name);
  if (it != m_index.end()) return m_tensors[it->second];
  std::string available;
  const std::size_t shown = std::min<std::size_t>(m_tensors.size(), 5);
  for (std::size_t k = 0; k < shown; ++k) available += (k ? ", '" : "'") + m_tensors[k].name + "'";
  if (m_tensors.size() > shown) available += detail::cat(", ... (", m_tensors.size() - shown, " more)");
  throw name_error(detail::cat("no tensor '", name, "' in safetensors file '", m_label, "'; it holds ",
                               m_tensors.size(), " tensors", m_tensors.empty() ? "" : ": ", available));
}

inline bool safetensors_file::is_memory_resident() const noexcept { return m_storage->data() != nullptr; }

inline void safetensors_file::check_readable(const tensor_info& t) const {
  if (!is_readable_as_real(t.type)) {
    throw dtype_error(detail::cat("safetensors file '", m_label, "': tensor '", t.name, "' is ", dtype_name(t.type),
                                  ", which has no conversion to a real scalar (use raw())"));
  }
}

template <typename Fn>
void safetensors_file::for_each_chunk(const tensor_info& t, Fn&& fn) const {
  const std::size_t width = dtype_size(t.type);
  const std::size_t step = std::max(width, detail::chunk_bytes / width * width);
  const std::uint64_t start = m_data_offset + t.begin;
  const std::uint64_t total = t.byte_size();
  std::vector<unsigned char> buffer;
  for (std::uint64_t done = 0; done < total;) {
    const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(step, total - done));
    if (const unsigned char* data = m_storage->data()) {
      fn(data + start + done, n);
    } else {
      buffer.resize(n);
      m_storage->read(start + done, n, buffer.data(), m_label);
      fn(buffer.data(), n);
    }
    done += n;
  }
}

template <typename Scalar>
vector<Scalar> safetensors_file::read_vector(const std::string& name) const {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "read_vector converts to float or double");
  const tensor_info& t = info(name);
  check_readable(t);
  vector<Scalar> out(static_cast<index>(t.numel()));
  const std::size_t width = dtype_size(t.type);
  Scalar* dst = out.data();
  for_each_chunk(t, [&](const unsigned char* bytes, std::size_t n) {
    detail::decode<Scalar>(t.type, bytes, n / width, dst);
    dst += n / width;
  });
  return out;
}

template <typename Scalar>
matrix<Scalar> safetensors_file::read_matrix(const std::string& name) const {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "read_matrix converts to float or double");
  const tensor_info& t = info(name);
  if (t.rank() != 1 && t.rank() != 2) {
    throw shape_error(detail::cat("safetensors file '", m_label, "': tensor '", t.name, "' has shape ",
                                  detail::shape_to_string(t.shape), " (rank ", t.rank(),
                                  "); read_matrix takes rank 1 or 2 (read_vector takes any rank)"));
  }
  check_readable(t);
  const index rows = static_cast<index>(t.shape[0]);
  const index cols = t.rank() == 2 ? static_cast<index>(t.shape[1]) : 1;
  matrix<Scalar> out(rows, cols);
  const std::size_t width = dtype_size(t.type);
  if (rows == 1 || cols == 1) {  // row-major and column-major orders coincide
    Scalar* dst = out.data();
    for_each_chunk(t, [&](const unsigned char* bytes, std::size_t n) {
      detail::decode<Scalar>(t.type, bytes, n / width, dst);
      dst += n / width;
    });
    return out;
  }
  // Decode a chunk of the row-major stream, then scatter it into the column-major result.
  std::vector<Scalar> buffer;
  index i = 0, j = 0;
  for_each_chunk(t, [&](const unsigned char* bytes, std::size_t n) {
    buffer.resize(n / width);
    detail::decode<Scalar>(t.type, bytes, buffer.size(), buffer.data());
    for (const Scalar value : buffer) {
      out(i, j) = value;
      if (++j == cols) {
        j = 0;
        ++i;
      }
    }
  });
  return out;
}

inline tensor_bytes safetensors_file::raw(const std::string& name) const {
  const tensor_info& t = info(name);
  return detail::storage_slice(m_storage, m_data_offset + t.begin, static_cast<std::size_t>(t.byte_size()), m_label);
}

}  // namespace lora::io
