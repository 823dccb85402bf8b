// lora/io/gguf_reader.hpp: reading GGUF files (llama.cpp's format; layout in io/gguf.hpp and
// docs/CONVENTIONS.md §gguf). Files come from strangers, so the whole header is validated when the file
// is opened, by ggml's rules and a few of our own: magic, version (2 or 3), counts, string and array
// lengths, known value and tensor types, unique keys and tensor names, general.alignment, overflow-checked
// tensor sizes, each tensor's offset exactly where ggml expects it (in info order, each padded to the
// alignment: so offsets are aligned, inside the file and never overlap). Each violation is a
// lora::format_error naming the file, the key or tensor, and the rule. No count or length is trusted
// before it is checked against the bytes left in the file, so a malformed file cannot make the reader
// allocate more than a small multiple of its own size.
//
// Matrices are read in PyTorch orientation: a tensor with ne = [cols, rows] (ne[0] contiguous) reads as
// a rows x cols lora::matrix; ne = [n] reads as n x 1. F32, F16, BF16, Q8_0 and Q4_0 are converted
// (dequantized) to float or double; other ggml types can be copied through raw() only.
//
// The file is memory-mapped where possible (io/file_storage.hpp). Every const member of gguf_file may be
// called from several threads at once. POSIX only.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <system_error>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "file_storage.hpp"
#include "ggml_types.hpp"
#include "gguf_value.hpp"

namespace lora::io {

/// One tensor of a GGUF file, as its info record describes it.
struct gguf_tensor_info {
  std::string name;
  std::vector<std::uint64_t> ne;  ///< n_dims extents, ne[0] the contiguous one (PyTorch's last dimension)
  ggml_type type = ggml_type::f32;
  std::uint64_t offset = 0;     ///< from the start of the data section
  std::uint64_t byte_size = 0;  ///< without the padding that follows

  /// The number of elements (product of ne).
  std::uint64_t numel() const noexcept;
  /// The PyTorch shape: ne reversed, e.g. ne [768, 2304] -> [2304, 768].
  std::vector<std::int64_t> shape() const;
  /// ne without trailing 1s beyond the second extent: [768, 1, 1] -> [768, 1]; [768] and [4, 1] stay as they
  /// are (a 2-D tensor is a matrix even when one extent is 1, e.g. a rank-1 LoRA factor).
  std::vector<std::uint64_t> effective_ne() const;
};

/// A GGUF file opened for reading: validated completely at open, then read tensor by tensor. Copies share
/// the underlying mapping.
class gguf_file {
 public:
  /// Opens and validates `path`. io_error when it cannot be opened, format_error when it breaks a rule.
  static gguf_file open(const std::string& path, read_mode mode = read_mode::map);
  /// Validates an in-memory image of a file (same rules); `label` names it in messages.
  static gguf_file from_bytes(std::vector<unsigned char> bytes, std::string label = "<memory>");

  const std::string& path() const noexcept { return m_label; }
  std::uint32_t version() const noexcept { return m_version; }
  /// general.alignment, or 32 when the file does not set it.
  std::uint32_t alignment() const noexcept { return m_alignment; }
  /// File offset of the data section.
  std::uint64_t data_offset() const noexcept { return m_data_offset; }

  /// Every key and value, in file order.
  const std::vector<std::pair<std::string, gguf_value>>& metadata() const noexcept { return m_metadata; }
  bool has(const std::string& key) const { return find(key) != nullptr; }
  /// The value of `key`, or nullptr.
  const gguf_value* find(const std::string& key) const;
  /// The value of `key`; format_error naming the file and the key when it is absent.
  const gguf_value& value(const std::string& key) const;
  /// The scalar of `key`, which must have exactly the type that stores T; format_error naming the file,
  /// the key, and both types otherwise (llama.cpp refuses such files the same way).
  template <typename T>
  T get(const std::string& key) const;
  /// The string of `key` (format_error when absent or not a string).
  const std::string& get_string(const std::string& key) const;
  /// The strings of the array `key` (format_error naming both types when absent or not an array of strings).
  const std::vector<std::string>& get_strings(const std::string& key) const;

  /// Every tensor, in file order.
  const std::vector<gguf_tensor_info>& tensors() const noexcept { return m_tensors; }
  bool contains(const std::string& name) const { return m_index.count(name) != 0; }
  /// The tensor called `name`; name_error naming the file when there is none.
  const gguf_tensor_info& info(const std::string& name) const;

  /// A tensor of at most two effective dimensions (see gguf_tensor_info::effective_ne), ne [cols, rows]
  /// as rows x cols, converted to Scalar (float or double). shape_error for more dimensions, dtype_error
  /// for a ggml type this library does not convert.
  template <typename Scalar>
  matrix<Scalar> read_matrix(const std::string& name) const;
  /// Any tensor, flattened (ne[0] fastest), converted to Scalar.
  template <typename Scalar>
  vector<Scalar> read_vector(const std::string& name) const;
  /// The stored bytes of a tensor (blocks as ggml lays them out); zero-copy when memory-resident.
  tensor_bytes raw(const std::string& name) const;

 private:
  gguf_file() = default;
  static gguf_file from_storage(std::shared_ptr<const detail::file_storage> storage, std::string label);
  /// Calls fn(row_index, const float* row) for each row of ne[0] elements, decoded.
  template <typename Fn>
  void for_each_row(const gguf_tensor_info& t, Fn&& fn) const;

  std::shared_ptr<const detail::file_storage> m_storage;
  std::string m_label;
  std::uint32_t m_version = 3;
  std::uint32_t m_alignment = 32;
  std::uint64_t m_data_offset = 0;
  std::vector<std::pair<std::string, gguf_value>> m_metadata;
  std::unordered_map<std::string, std::size_t> m_keys;
  std::vector<gguf_tensor_info> m_tensors;
  std::unordered_map<std::string, std::size_t> m_index;
};

/// Whether `path` is a regular file that starts with GGUF's magic (no other check; never throws).
bool is_gguf_file(const std::string& path) noexcept;

namespace detail {

/// GGUF's limits (ggml's gguf.cpp): tensor names shorter than 64 bytes, at most 4 dimensions, strings and
/// arrays of at most 2^30 bytes / elements, the default alignment 32.
inline constexpr std::size_t gguf_max_name = 63;
inline constexpr std::uint32_t gguf_max_dims = 4;
inline constexpr std::uint64_t gguf_max_length = std::uint64_t{1} << 30;
inline constexpr std::uint32_t gguf_default_alignment = 32;
/// Our own cap on metadata keys (real files have tens; a tokenizer is one key), so that a file of tiny
/// keys cannot make the reader hold many times its size in small objects.
inline constexpr std::uint64_t gguf_max_keys = 65536;

/// Reads the header of a GGUF file front to back, each read checked against the bytes left.
class gguf_cursor {
 public:
  gguf_cursor(const file_storage& storage, const std::string& label) : m_storage(storage), m_label(label) {}
  std::uint64_t position() const noexcept { return m_pos; }
  std::uint64_t remaining() const noexcept { return m_storage.size() - m_pos; }
  [[noreturn]] void fail(const std::string& rule) const;
  /// The next n bytes (valid until the next call); format_error when fewer are left.
  const unsigned char* take(std::uint64_t n, const char* what);
  template <typename T>
  T scalar(const char* what) {
    return gguf_load<T>(take(sizeof(T), what));
  }
  std::string string(const char* what);
  /// A count that must leave at least `min_bytes_each` bytes per element in the file.
  std::uint64_t count(const char* what, std::uint64_t min_bytes_each, std::uint64_t limit);

 private:
  const file_storage& m_storage;
  const std::string& m_label;
  std::uint64_t m_pos = 0;
  std::vector<unsigned char> m_buffer;  // for files reached through pread
};

/// One metadata value of `type` at the cursor (`key` for messages).
gguf_value read_gguf_value(gguf_cursor& in, std::uint32_t type, const std::string& key);
/// One tensor info record at the cursor; sizes checked, offset not yet.
gguf_tensor_info read_gguf_tensor_info(gguf_cursor& in);

}  // namespace detail

// ================================================================================================
// Implementation
// ================================================================================================

inline std::uint64_t gguf_tensor_info::numel() const noexcept {
  std::uint64_t n = 1;
  for (std::uint64_t d : ne) n *= d;
  return n;
}

inline std::vector<std::int64_t> gguf_tensor_info::shape() const {
  return std::vector<std::int64_t>(ne.rbegin(), ne.rend());
}

inline std::vector<std::uint64_t> gguf_tensor_info::effective_ne() const {
  std::vector<std::uint64_t> out = ne;
  while (out.size() > 2 && out.back() == 1) out.pop_back();
  if (out.empty()) out.push_back(1);
  return out;
}

namespace detail {

inline void gguf_cursor::fail(const std::string& rule) const {
  throw format_error(cat("GGUF file '", m_label, "': ", rule));
}

inline const unsigned char* gguf_cursor::take(std::uint64_t n, const char* what) {
  if (n > remaining()) fail(cat(what, " at byte ", m_pos, " needs ", n, " bytes, the file has ", remaining(), " left"));
  const std::uint64_t at = m_pos;
  m_pos += n;
  if (const unsigned char* data = m_storage.data()) return data + at;
  m_buffer.resize(static_cast<std::size_t>(n));
  m_storage.read(at, static_cast<std::size_t>(n), m_buffer.data(), m_label);
  return m_buffer.data();
}

inline std::string gguf_cursor::string(const char* what) {
  const auto n = scalar<std::uint64_t>(what);
  if (n > gguf_max_length) fail(cat(what, " has length ", n, ", more than GGUF's limit of 2^30 bytes"));
  const unsigned char* p = take(n, what);
  return std::string(reinterpret_cast<const char*>(p), static_cast<std::size_t>(n));
}

inline std::uint64_t gguf_cursor::count(const char* what, std::uint64_t min_bytes_each, std::uint64_t limit) {
  const auto n = scalar<std::uint64_t>(what);
  if (n > limit) fail(cat(what, " is ", n, ", more than the limit of ", limit));
  if (min_bytes_each != 0 && n > remaining() / min_bytes_each)
    fail(cat(what, " is ", n, " but the ", remaining(), " bytes left in the file hold at most ",
             remaining() / min_bytes_each));
  return n;
}

inline gguf_value read_gguf_value(gguf_cursor& in, std::uint32_t type, const std::string& key) {
  const std::string where = cat("key '", key, "'");
  if (!is_gguf_type(type)) in.fail(cat(where, ": unknown value type ", type));
  auto t = static_cast<gguf_type>(type);
  if (t == gguf_type::string) return gguf_value::of(in.string(where.c_str()));
  gguf_type element = t;
  std::uint64_t n = 1;
  if (t == gguf_type::array) {
    const auto e = in.scalar<std::uint32_t>(where.c_str());
    if (!is_gguf_type(e)) in.fail(cat(where, ": array of unknown value type ", e));
    element = static_cast<gguf_type>(e);
    if (element == gguf_type::array) in.fail(cat(where, ": arrays of arrays are not allowed"));
    const std::uint64_t each = element == gguf_type::string ? 8 : gguf_scalar_size(element);
    n = in.count(cat(where, ": array length").c_str(), each, gguf_max_length);
    if (element == gguf_type::string) {
      std::vector<std::string> items(static_cast<std::size_t>(n));
      for (auto& s : items) s = in.string(where.c_str());
      return gguf_value::from_strings(std::move(items));
    }
  }
  const std::uint64_t bytes = n * gguf_scalar_size(element);
  const unsigned char* p = in.take(bytes, where.c_str());
  if (element == gguf_type::boolean) {
    for (std::uint64_t k = 0; k < n; ++k)
      if (p[k] > 1) in.fail(cat(where, ": boolean byte ", int(p[k]), " (expected 0 or 1)"));
  }
  return gguf_value::from_raw(t, element, n, std::vector<unsigned char>(p, p + bytes));
}

inline gguf_tensor_info read_gguf_tensor_info(gguf_cursor& in) {
  gguf_tensor_info t;
  t.name = in.string("tensor name");
  const std::string where = cat("tensor '", t.name, "'");
  if (t.name.empty()) in.fail("a tensor has an empty name");
  if (t.name.size() > gguf_max_name)
    in.fail(cat(where, ": name of ", t.name.size(), " bytes (ggml allows at most ", gguf_max_name, ")"));
  const auto n_dims = in.scalar<std::uint32_t>(where.c_str());
  if (n_dims > gguf_max_dims) in.fail(cat(where, ": ", n_dims, " dimensions (at most ", gguf_max_dims, ")"));
  std::uint64_t numel = 1;
  for (std::uint32_t k = 0; k < n_dims; ++k) {
    const auto d = in.scalar<std::int64_t>(where.c_str());
    if (d < 0) in.fail(cat(where, ": negative extent ne[", k, "] = ", d));
    if (d != 0 && numel > static_cast<std::uint64_t>(INT64_MAX) / static_cast<std::uint64_t>(d))
      in.fail(cat(where, ": element count overflows 64 bits"));
    numel *= static_cast<std::uint64_t>(d);
    t.ne.push_back(static_cast<std::uint64_t>(d));
  }
  const auto code = in.scalar<std::uint32_t>(where.c_str());
  const ggml_type_traits* traits = find_ggml_type(code);
  if (traits == nullptr) in.fail(cat(where, ": unknown ggml type ", code));
  t.type = traits->type;
  const std::uint64_t ne0 = t.ne.empty() ? 1 : t.ne[0];
  if (ne0 % traits->block_size != 0)
    in.fail(
        cat(where, ": ne[0] = ", ne0, " is not a multiple of ", traits->name, "'s block size ", traits->block_size));
  // numel * type_size / block_size <= 2^63 * 292 / 1: computed as blocks * type_size, checked.
  const std::uint64_t blocks = numel / traits->block_size;
  if (blocks > static_cast<std::uint64_t>(INT64_MAX) / traits->type_size) in.fail(cat(where, ": byte size overflows"));
  t.byte_size = blocks * traits->type_size;
  t.offset = in.scalar<std::uint64_t>(where.c_str());
  return t;
}

}  // namespace detail

inline bool is_gguf_file(const std::string& path) noexcept {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return false;
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return false;
  char magic[4] = {};
  const bool ok = std::fread(magic, 1, 4, f) == 4 && std::memcmp(magic, "GGUF", 4) == 0;
  std::fclose(f);
  return ok;
}

inline gguf_file gguf_file::open(const std::string& path, read_mode mode) {
  return from_storage(detail::file_storage::open(path, mode, "GGUF"), path);
}

inline gguf_file gguf_file::from_bytes(std::vector<unsigned char> bytes, std::string label) {
  return from_storage(detail::file_storage::from_bytes(std::move(bytes)), std::move(label));
}

namespace detail {

/// Reads magic, version and the two counts; returns {version, tensor_count, kv_count}.
inline std::tuple<std::uint32_t, std::uint64_t, std::uint64_t> read_gguf_preamble(gguf_cursor& in) {
  const unsigned char* magic = in.take(4, "magic");
  if (std::memcmp(magic, "GGUF", 4) != 0) in.fail("not a GGUF file (the first 4 bytes are not \"GGUF\")");
  const auto version = in.scalar<std::uint32_t>("version");
  if ((version & 0xFFFFu) == 0) in.fail(cat("version ", version, " (a big-endian file? only little-endian is read)"));
  if (version < 2 || version > 3) in.fail(cat("version ", version, " (this reader reads versions 2 and 3)"));
  // The smallest tensor info takes 8 + 1 + 4 + 4 + 8 bytes, the smallest key/value 8 + 1 + 4 + 1.
  const std::uint64_t n_tensors = in.count("tensor count", 25, INT64_MAX);
  const std::uint64_t n_kv = in.count("metadata key count", 14, gguf_max_keys);
  return {version, n_tensors, n_kv};
}

/// general.alignment of the metadata, checked; 32 when absent.
inline std::uint32_t gguf_alignment_of(const gguf_cursor& in, const gguf_value* v) {
  if (v == nullptr) return gguf_default_alignment;
  if (v->type() != gguf_type::u32)
    in.fail(cat("key 'general.alignment' has type ", gguf_type_name(v->type()), ", expected UINT32"));
  const auto a = v->get<std::uint32_t>();
  if (a == 0 || (a & (a - 1)) != 0) in.fail(cat("general.alignment = ", a, " is not a power of two"));
  return a;
}

}  // namespace detail

inline gguf_file gguf_file::from_storage(std::shared_ptr<const detail::file_storage> storage, std::string label) {
  gguf_file f;
  f.m_storage = std::move(storage);
  f.m_label = std::move(label);
  detail::gguf_cursor in(*f.m_storage, f.m_label);
  std::uint64_t n_tensors = 0, n_kv = 0;
  std::tie(f.m_version, n_tensors, n_kv) = detail::read_gguf_preamble(in);
  for (std::uint64_t k = 0; k < n_kv; ++k) {
    std::string key = in.string("metadata key");
    if (key.empty()) in.fail(detail::cat("metadata key ", k, " is empty"));
    if (f.m_keys.count(key) != 0) in.fail(detail::cat("key '", key, "' appears twice"));
    const auto type = in.scalar<std::uint32_t>("value type");
    gguf_value v = detail::read_gguf_value(in, type, key);
    f.m_keys.emplace(key, f.m_metadata.size());
    f.m_metadata.emplace_back(std::move(key), std::move(v));
  }
  f.m_alignment = detail::gguf_alignment_of(in, f.find("general.alignment"));
  std::uint64_t expected = 0;  // where the next tensor must start: after the previous one, padded
  for (std::uint64_t k = 0; k < n_tensors; ++k) {
    gguf_tensor_info t = detail::read_gguf_tensor_info(in);
    if (f.m_index.count(t.name) != 0) in.fail(detail::cat("tensor '", t.name, "' appears twice"));
    if (t.offset != expected)
      in.fail(detail::cat("tensor '", t.name, "' has offset ", t.offset, ", expected ", expected,
                          " (tensors follow each other in info order, each padded to ", f.m_alignment, " bytes)"));
    if (t.offset > f.m_storage->size() || t.byte_size > f.m_storage->size() - t.offset)
      in.fail(detail::cat("tensor '", t.name, "' (", t.byte_size, " bytes at data offset ", t.offset,
                          ") does not fit in the file (", f.m_storage->size(), " bytes)"));
    expected = detail::gguf_pad(t.offset + t.byte_size, f.m_alignment);
    f.m_index.emplace(t.name, f.m_tensors.size());
    f.m_tensors.push_back(std::move(t));
  }
  f.m_data_offset = detail::gguf_pad(in.position(), f.m_alignment);
  // With tensors, the data section (even of zero-byte tensors) must start inside the file.
  if (!f.m_tensors.empty() && f.m_data_offset > f.m_storage->size())
    in.fail(detail::cat("the data section starts at byte ", f.m_data_offset, " (the header padded to ", f.m_alignment,
                        "), past the end of the file (", f.m_storage->size(), " bytes)"));
  for (const gguf_tensor_info& t : f.m_tensors) {
    if (t.offset + t.byte_size > f.m_storage->size() - std::min(f.m_storage->size(), f.m_data_offset))
      in.fail(detail::cat("tensor '", t.name, "' ends at byte ", f.m_data_offset + t.offset + t.byte_size,
                          ", past the end of the file (", f.m_storage->size(), " bytes)"));
  }
  return f;
}

inline const gguf_value* gguf_file::find(const std::string& key) const {
  const auto it = m_keys.find(key);
  return it == m_keys.end() ? nullptr : &m_metadata[it->second].second;
}

inline const gguf_value& gguf_file::value(const std::string& key) const {
  if (const gguf_value* v = find(key)) return *v;
  throw format_error(detail::cat("GGUF file '", m_label, "': key '", key, "' is missing"));
}

template <typename T>
T gguf_file::get(const std::string& key) const {
  const gguf_value& v = value(key);
  if (v.type() != gguf_type_of<T>())
    throw format_error(detail::cat("GGUF file '", m_label, "': key '", key, "' has type ", gguf_type_name(v.type()),
                                   ", expected ", gguf_type_name(gguf_type_of<T>())));
  return v.get<T>();
}

inline const std::string& gguf_file::get_string(const std::string& key) const {
  const gguf_value& v = value(key);
  if (v.type() != gguf_type::string)
    throw format_error(detail::cat("GGUF file '", m_label, "': key '", key, "' has type ", gguf_type_name(v.type()),
                                   ", expected STRING"));
  return v.string();
}

inline const std::vector<std::string>& gguf_file::get_strings(const std::string& key) const {
  const gguf_value& v = value(key);
  if (!v.is_array() || v.element_type() != gguf_type::string)
    throw format_error(detail::cat("GGUF file '", m_label, "': key '", key, "' has type ", gguf_type_name(v.type()),
                                   v.is_array() ? detail::cat(" of ", gguf_type_name(v.element_type())) : "",
                                   ", expected ARRAY of STRING"));
  return v.strings();
}

inline const gguf_tensor_info& gguf_file::info(const std::string& name) const {
  const auto it = m_index.find(name);
  if (it != m_index.end()) return m_tensors[it->second];
  std::string some;
  for (std::size_t k = 0; k < m_tensors.size() && k < 5; ++k) some += (k ? ", " : "") + m_tensors[k].name;
  throw name_error(detail::cat("GGUF file '", m_label, "' has no tensor '", name, "' (", m_tensors.size(),
                               " tensors: ", some, m_tensors.size() > 5 ? ", ..." : "", ")"));
}

inline tensor_bytes gguf_file::raw(const std::string& name) const {
  const gguf_tensor_info& t = info(name);
  return detail::storage_slice(m_storage, m_data_offset + t.offset, static_cast<std::size_t>(t.byte_size), m_label);
}

template <typename Fn>
void gguf_file::for_each_row(const gguf_tensor_info& t, Fn&& fn) const {
  if (!ggml_is_convertible(t.type))
    throw dtype_error(detail::cat("GGUF file '", m_label, "': tensor '", t.name, "' has type ", ggml_type_name(t.type),
                                  ", which this library does not convert (it converts F32, F16, BF16, Q8_0, Q4_0)"));
  if (t.numel() == 0) return;  // (ne[0] may still be huge: allocate nothing)
  const std::uint64_t cols = t.ne.empty() ? 1 : t.ne[0];
  const std::uint64_t rows = t.numel() / cols;
  const std::uint64_t row_bytes = ggml_row_bytes(t.type, cols);
  std::vector<float> row(static_cast<std::size_t>(cols));
  std::vector<unsigned char> copy;
  const unsigned char* base = m_storage->data();
  for (std::uint64_t i = 0; i < rows; ++i) {
    const std::uint64_t at = m_data_offset + t.offset + i * row_bytes;
    const unsigned char* src = base != nullptr ? base + at : nullptr;
    if (src == nullptr) {
      copy.resize(static_cast<std::size_t>(row_bytes));
      m_storage->read(at, copy.size(), copy.data(), m_label);
      src = copy.data();
    }
    ggml_dequantize_row(t.type, src, static_cast<std::size_t>(cols), row.data());
    fn(static_cast<index>(i), row.data());
  }
}

template <typename Scalar>
matrix<Scalar> gguf_file::read_matrix(const std::string& name) const {
  const gguf_tensor_info& t = info(name);
  const std::vector<std::uint64_t> ne = t.effective_ne();
  if (ne.size() > 2)
    throw shape_error(detail::cat("GGUF file '", m_label, "': tensor '", name, "' has ", ne.size(),
                                  " dimensions, expected a matrix (1 or 2)"));
  const auto cols = static_cast<index>(ne[0]);
  const auto rows = static_cast<index>(ne.size() == 2 ? ne[1] : 1);
  matrix<Scalar> out(ne.size() == 2 ? rows : cols, ne.size() == 2 ? cols : 1);
  for_each_row(t, [&](index i, const float* row) {
    const Eigen::Map<const Eigen::Matrix<float, 1, Eigen::Dynamic>> r(row, cols);
    if (ne.size() == 2) {
      out.row(i) = r.template cast<Scalar>();
    } else {
      out.col(0) = r.transpose().template cast<Scalar>();
    }
  });
  return out;
}

template <typename Scalar>
vector<Scalar> gguf_file::read_vector(const std::string& name) const {
  const gguf_tensor_info& t = info(name);
  vector<Scalar> out(static_cast<index>(t.numel()));
  const auto cols = static_cast<index>(t.ne.empty() ? 1 : t.ne[0]);
  for_each_row(t, [&](index i, const float* row) {
    out.segment(i * cols, cols) = Eigen::Map<const Eigen::VectorXf>(row, cols).template cast<Scalar>();
  });
  return out;
}

}  // namespace lora::io
