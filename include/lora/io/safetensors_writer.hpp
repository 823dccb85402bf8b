// lora/io/safetensors_writer.hpp: writing safetensors files (layout in io/safetensors.hpp and
// docs/CONVENTIONS.md §safetensors), byte for byte as the reference writer (huggingface/safetensors)
// lays them out: tensors sorted by dtype alignment then name, the header padded with spaces to a
// multiple of 8. Values are converted to F64, F32, F16 or BF16, rounding to nearest, ties to even
// (io/detail/codec.hpp); other dtypes are written from their stored bytes. Every file is written
// atomically (io/atomic_file.hpp): `path` is either the old file or the complete new one.
//
// POSIX only (Linux, macOS).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "atomic_file.hpp"
#include "detail/codec.hpp"
#include "detail/utf8.hpp"
#include "dtype.hpp"
#include "tensor_info.hpp"

namespace lora::io {

/// Sorts specs into the order the reference writer uses: dtype descending in the order of the enum
/// (so 8-byte types first and every tensor aligned to its element size when N is a multiple of 8),
/// then name ascending (bytewise).
void sort_like_reference(std::vector<tensor_spec>& specs);

/// Writes a file whose layout (names, dtypes, shapes and their order in the data area) is fixed up
/// front, then receives each tensor's data, in any order, straight into the file: peak memory stays
/// near one tensor, however large the checkpoint. The data goes to a temporary file next to `path`
/// (".<name>.tmp.<pid>.<n>"), which commit() flushes, fsyncs and renames over `path`; until then
/// `path` is untouched, and a writer destroyed or failing before commit removes its temporary.
class safetensors_stream_writer {
 public:
  /// Creates the temporary and writes the header. Tensors lie in the data area in the order given
  /// (call sort_like_reference first for the reference order). name_error for duplicate or reserved
  /// names, shape_error for negative dimensions, io_error when the temporary cannot be created.
  safetensors_stream_writer(const std::string& path, const std::vector<tensor_spec>& layout,
                            const std::map<std::string, std::string>& metadata = {});
  safetensors_stream_writer(safetensors_stream_writer&&) noexcept;
  safetensors_stream_writer& operator=(safetensors_stream_writer&&) noexcept;
  ~safetensors_stream_writer();

  /// The layout with its offsets, in data-area order.
  const std::vector<tensor_info>& tensors() const noexcept { return m_tensors; }
  /// How many tensors still await their data.
  std::size_t remaining() const noexcept { return m_remaining; }

  /// Converts `values` (any Eigen expression, either storage order) to the declared dtype and writes
  /// them in row-major order. A declared rank-2 shape must equal rows x cols; rank 1 takes a row or
  /// column vector of that length; other ranks take any matrix of as many entries (flattened
  /// row-major). Each tensor is written once (state_error otherwise).
  template <typename Derived>
  void write(const std::string& name, const Eigen::MatrixBase<Derived>& values);
  /// Writes a tensor's stored bytes; `size` must equal its byte size.
  void write_raw(const std::string& name, const unsigned char* data, std::size_t size);
  /// Checks that every tensor was written (state_error naming a missing one), then makes the file
  /// durable and atomically replaces `path`. io_error (temporary removed) on any failure.
  void commit();

 private:
  std::size_t claim(const std::string& name, std::size_t size_hint_bytes, bool check_size);
  std::unique_ptr<atomic_file> m_file;
  std::string m_path;
  std::vector<tensor_info> m_tensors;
  std::unordered_map<std::string, std::size_t> m_index;
  std::vector<bool> m_written;
  std::size_t m_remaining = 0;
  std::uint64_t m_data_offset = 0;
};

/// Collects tensors in memory, then writes them in the reference order (sort_like_reference) as one
/// file, atomically. Stored already converted to their dtype, so memory is the size of the file.
class safetensors_writer {
 public:
  /// Adds `values` (any Eigen expression) converted to `type` (f64, f32, f16 or bf16; rounding to
  /// nearest, ties to even). The shape is [size] for a compile-time vector type, [rows, cols]
  /// otherwise. name_error for a duplicate name, the reserved "__metadata__" or a name that is not
  /// UTF-8; dtype_error for a dtype the writer cannot convert to.
  template <typename Derived>
  safetensors_writer& add(const std::string& name, const Eigen::MatrixBase<Derived>& values,
                          dtype type = dtype_of<typename Derived::Scalar>());
  /// Same with an explicit shape, checked as in safetensors_stream_writer::write.
  template <typename Derived>
  safetensors_writer& add(const std::string& name, const Eigen::MatrixBase<Derived>& values, dtype type,
                          std::vector<std::int64_t> shape);
  /// Adds stored bytes unchanged; `bytes.size()` must equal the byte size of (type, shape).
  safetensors_writer& add_raw(const std::string& name, dtype type, std::vector<std::int64_t> shape,
                              std::vector<unsigned char> bytes);
  safetensors_writer& add_raw(const std::string& name, dtype type, std::vector<std::int64_t> shape,
                              const unsigned char* data, std::size_t size);
  /// Replaces the "__metadata__" map (written only when non-empty). Keys and values must be UTF-8.
  safetensors_writer& set_metadata(std::map<std::string, std::string> metadata);

  bool contains(const std::string& name) const { return m_names.count(name) != 0; }
  std::size_t size() const noexcept { return m_entries.size(); }

  /// Writes the file atomically (see safetensors_stream_writer): `path` is either the old file or
  /// the complete new one, never a mixture. io_error on failure.
  void write(const std::string& path) const;
  /// The complete file as bytes.
  std::vector<unsigned char> to_bytes() const;

 private:
  struct entry {
    tensor_spec spec;
    std::vector<unsigned char> bytes;
  };
  std::vector<const entry*> ordered() const;
  void check_new_name(const std::string& name) const;
  std::vector<entry> m_entries;
  std::unordered_set<std::string> m_names;
  std::map<std::string, std::string> m_metadata;
};

namespace detail {

/// Validates specs and lays them out back to back in the given order. `who` prefixes messages.
std::vector<tensor_info> plan_layout(const std::vector<tensor_spec>& specs, const std::string& who);
/// The header for a layout: compact JSON ("__metadata__" first when non-empty, then the tensors in
/// layout order, each {"dtype", "shape", "data_offsets"}), padded with spaces to a multiple of 8.
std::string build_header(const std::vector<tensor_info>& layout, const std::map<std::string, std::string>& metadata,
                         const std::string& who);
/// The shape safetensors_writer::add gives `values`: [size] for a compile-time vector type, [rows, cols]
/// otherwise.
template <typename Derived>
std::vector<std::int64_t> default_shape(const Eigen::MatrixBase<Derived>& values);
/// Throws unless a matrix of rows x cols can fill `shape` (see safetensors_stream_writer::write).
void check_fits(const tensor_spec& spec, index rows, index cols, const std::string& who);

}  // namespace detail

// ================================================================================================
// Implementation
// ================================================================================================

namespace detail {

inline std::vector<tensor_info> plan_layout(const std::vector<tensor_spec>& specs, const std::string& who) {
  std::vector<tensor_info> layout;
  layout.reserve(specs.size());
  std::unordered_set<std::string> seen;
  std::uint64_t offset = 0;
  for (const tensor_spec& spec : specs) {
    if (spec.name == "__metadata__") throw name_error(cat(who, ": '__metadata__' is reserved, not a tensor name"));
    if (!is_utf8(spec.name)) {
      throw name_error(cat(who, ": tensor name '", spec.name, "' is not valid UTF-8"));
    }
    if (!seen.insert(spec.name).second) throw name_error(cat(who, ": duplicate tensor name '", spec.name, "'"));
    for (std::int64_t d : spec.shape) {
      if (d < 0)
        throw shape_error(
            cat(who, ": tensor '", spec.name, "': negative dimension in shape ", shape_to_string(spec.shape)));
    }
    std::uint64_t bytes;
    if (!checked_byte_size(spec.type, spec.shape, bytes) || offset + bytes < offset) {
      throw shape_error(
          cat(who, ": tensor '", spec.name, "': shape ", shape_to_string(spec.shape), " overflows 64-bit byte counts"));
    }
    layout.push_back(tensor_info{spec.name, spec.type, spec.shape, offset, offset + bytes});
    offset += bytes;
  }
  return layout;
}

inline std::string build_header(const std::vector<tensor_info>& layout,
                                const std::map<std::string, std::string>& metadata, const std::string& who) {
  nlohmann::ordered_json root = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    root["__metadata__"] = std::move(meta);
  }
  for (const tensor_info& t : layout) {
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = dtype_name(t.type);
    entry["shape"] = t.shape;
    entry["data_offsets"] = {t.begin, t.end};
    root[t.name] = std::move(entry);
  }
  std::string header;
  try {
    header = root.dump();
  } catch (const nlohmann::json::exception& e) {  // a metadata string that is not UTF-8
    throw format_error(cat(who, ": cannot encode the header: ", e.what()));
  }
  header.append((8 - header.size() % 8) % 8, ' ');
  if (header.size() > max_header_size) {
    throw format_error(cat(who, ": the header would be ", header.size(), " bytes, over the ", max_header_size,
                           "-byte limit of readers"));
  }
  return header;
}

template <typename Derived>
std::vector<std::int64_t> default_shape(const Eigen::MatrixBase<Derived>& values) {
  if constexpr (Derived::IsVectorAtCompileTime) {
    return {static_cast<std::int64_t>(values.size())};
  } else {
    return {static_cast<std::int64_t>(values.rows()), static_cast<std::int64_t>(values.cols())};
  }
}

inline void check_fits(const tensor_spec& spec, index rows, index cols, const std::string& who) {
  const std::uint64_t size = static_cast<std::uint64_t>(rows) * static_cast<std::uint64_t>(cols);
  bool ok;
  if (spec.shape.size() == 2) {
    ok = spec.shape[0] == rows && spec.shape[1] == cols;
  } else if (spec.shape.size() == 1) {
    ok = (rows == 1 || cols == 1) && static_cast<std::uint64_t>(spec.shape[0]) == size;
  } else {
    std::uint64_t n = 1;
    for (std::int64_t d : spec.shape) n *= static_cast<std::uint64_t>(d);  // validated by plan_layout
    ok = n == size;
  }
  if (!ok) {
    throw shape_error(cat(who, ": tensor '", spec.name, "' has shape ", shape_to_string(spec.shape),
                          " but the values are ", shape_str(rows, cols)));
  }
}

}  // namespace detail

inline void sort_like_reference(std::vector<tensor_spec>& specs) {
  std::stable_sort(specs.begin(), specs.end(), [](const tensor_spec& a, const tensor_spec& b) {
    if (a.type != b.type) return a.type > b.type;
    return a.name < b.name;
  });
}

inline safetensors_stream_writer::safetensors_stream_writer(const std::string& path,
                                                            const std::vector<tensor_spec>& layout,
                                                            const std::map<std::string, std::string>& metadata)
    : m_path(path) {
  const std::string who = detail::cat("safetensors writer for '", path, "'");
  m_tensors = detail::plan_layout(layout, who);
  const std::string header = detail::build_header(m_tensors, metadata, who);
  m_data_offset = 8 + header.size();
  m_written.assign(m_tensors.size(), false);
  for (std::size_t k = 0; k < m_tensors.size(); ++k) {
    m_index.emplace(m_tensors[k].name, k);
    if (m_tensors[k].byte_size() == 0) {
      m_written[k] = true;  // nothing to write
    } else {
      ++m_remaining;
    }
  }
  m_file = std::make_unique<atomic_file>(path);
  unsigned char prefix[8];
  detail::store_le<std::uint64_t>(header.size(), prefix);
  m_file->write_at(0, prefix, 8);
  m_file->write_at(8, header.data(), header.size());
}

inline safetensors_stream_writer::safetensors_stream_writer(safetensors_stream_writer&&) noexcept = default;
inline safetensors_stream_writer& safetensors_stream_writer::operator=(safetensors_stream_writer&&) noexcept = default;
inline safetensors_stream_writer::~safetensors_stream_writer() = default;

inline std::size_t safetensors_stream_writer::claim(const std::string& name, std::size_t size, bool check_size) {
  if (!m_file) throw state_error(detail::cat("safetensors writer for '", m_path, "' was moved from"));
  const auto it = m_index.find(name);
  if (it == m_index.end()) {
    throw name_error(detail::cat("safetensors writer for '", m_path, "': no tensor '", name, "' in the layout"));
  }
  const tensor_info& t = m_tensors[it->second];
  if (check_size && size != t.byte_size()) {
    throw shape_error(detail::cat("safetensors writer for '", m_path, "': tensor '", name, "' (", dtype_name(t.type),
                                  " ", detail::shape_to_string(t.shape), ") needs ", t.byte_size(), " bytes, got ",
                                  size));
  }
  if (t.byte_size() != 0 && m_written[it->second]) {
    throw state_error(detail::cat("safetensors writer for '", m_path, "': tensor '", name, "' was already written"));
  }
  return it->second;
}

template <typename Derived>
void safetensors_stream_writer::write(const std::string& name, const Eigen::MatrixBase<Derived>& values) {
  const std::size_t k = claim(name, 0, false);
  const tensor_info& t = m_tensors[k];
  const std::string who = detail::cat("safetensors writer for '", m_path, "'");
  detail::check_fits(tensor_spec{t.name, t.type, t.shape}, values.rows(), values.cols(), who);
  std::uint64_t offset = m_data_offset + t.begin;
  detail::encode_row_major(values, t.type, [&](const unsigned char* bytes, std::size_t n) {
    m_file->write_at(offset, bytes, n);
    offset += n;
  });
  if (!m_written[k]) {
    m_written[k] = true;
    --m_remaining;
  }
}

inline void safetensors_stream_writer::write_raw(const std::string& name, const unsigned char* data, std::size_t size) {
  const std::size_t k = claim(name, size, true);
  m_file->write_at(m_data_offset + m_tensors[k].begin, data, size);
  if (!m_written[k]) {
    m_written[k] = true;
    --m_remaining;
  }
}

inline void safetensors_stream_writer::commit() {
  if (!m_file) throw state_error(detail::cat("safetensors writer for '", m_path, "' was moved from"));
  if (m_remaining != 0) {
    const auto missing = std::find(m_written.begin(), m_written.end(), false) - m_written.begin();
    throw state_error(detail::cat("safetensors writer for '", m_path, "': ", m_remaining,
                                  " tensor(s) not written yet, e.g. '",
                                  m_tensors[static_cast<std::size_t>(missing)].name, "'"));
  }
  m_file->commit();
}

inline void safetensors_writer::check_new_name(const std::string& name) const {
  if (name == "__metadata__") throw name_error("safetensors writer: '__metadata__' is reserved, not a tensor name");
  if (!detail::is_utf8(name)) {
    throw name_error(detail::cat("safetensors writer: tensor name '", name, "' is not valid UTF-8"));
  }
  if (m_names.count(name) != 0) throw name_error(detail::cat("safetensors writer: duplicate tensor name '", name, "'"));
}

template <typename Derived>
safetensors_writer& safetensors_writer::add(const std::string& name, const Eigen::MatrixBase<Derived>& values,
                                            dtype type) {
  return add(name, values, type, detail::default_shape(values));
}

template <typename Derived>
safetensors_writer& safetensors_writer::add(const std::string& name, const Eigen::MatrixBase<Derived>& values,
                                            dtype type, std::vector<std::int64_t> shape) {
  check_new_name(name);
  tensor_spec spec{name, type, std::move(shape)};
  std::uint64_t bytes = 0;
  if (!detail::checked_byte_size(spec.type, spec.shape, bytes)) {
    throw shape_error(
        detail::cat("safetensors writer: tensor '", name, "': invalid shape ", detail::shape_to_string(spec.shape)));
  }
  detail::check_fits(spec, values.rows(), values.cols(), "safetensors writer");
  entry e{std::move(spec), {}};
  e.bytes.reserve(static_cast<std::size_t>(bytes));
  detail::encode_row_major(
      values, type, [&](const unsigned char* data, std::size_t n) { e.bytes.insert(e.bytes.end(), data, data + n); });
  m_entries.push_back(std::move(e));
  m_names.insert(name);
  return *this;
}

inline safetensors_writer& safetensors_writer::add_raw(const std::string& name, dtype type,
                                                       std::vector<std::int64_t> shape,
                                                       std::vector<unsigned char> bytes) {
  check_new_name(name);
  std::uint64_t expected = 0;
  if (!detail::checked_byte_size(type, shape, expected)) {
    throw shape_error(
        detail::cat("safetensors writer: tensor '", name, "': invalid shape ", detail::shape_to_string(shape)));
  }
  if (bytes.size() != expected) {
    throw shape_error(detail::cat("safetensors writer: tensor '", name, "' (", dtype_name(type), " ",
                                  detail::shape_to_string(shape), ") needs ", expected, " bytes, got ", bytes.size()));
  }
  m_entries.push_back(entry{tensor_spec{name, type, std::move(shape)}, std::move(bytes)});
  m_names.insert(name);
  return *this;
}

inline safetensors_writer& safetensors_writer::add_raw(const std::string& name, dtype type,
                                                       std::vector<std::int64_t> shape, const unsigned char* data,
                                                       std::size_t size) {
  return add_raw(name, type, std::move(shape), std::vector<unsigned char>(data, data + size));
}

inline safetensors_writer& safetensors_writer::set_metadata(std::map<std::string, std::string> metadata) {
  for (const auto& [key, value] : metadata) {
    for (const std::string* s : {&key, &value}) {
      if (!detail::is_utf8(*s)) {
        throw format_error(detail::cat("safetensors writer: metadata entry '", key, "' is not valid UTF-8"));
      }
    }
  }
  m_metadata = std::move(metadata);
  return *this;
}

inline std::vector<const safetensors_writer::entry*> safetensors_writer::ordered() const {
  std::vector<const entry*> order;
  order.reserve(m_entries.size());
  for (const entry& e : m_entries) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](const entry* a, const entry* b) {
    if (a->spec.type != b->spec.type) return a->spec.type > b->spec.type;
    return a->spec.name < b->spec.name;
  });
  return order;
}

inline void safetensors_writer::write(const std::string& path) const {
  const std::vector<const entry*> order = ordered();
  std::vector<tensor_spec> specs;
  specs.reserve(order.size());
  for (const entry* e : order) specs.push_back(e->spec);
  safetensors_stream_writer out(path, specs, m_metadata);
  for (const entry* e : order) out.write_raw(e->spec.name, e->bytes.data(), e->bytes.size());
  out.commit();
}

inline std::vector<unsigned char> safetensors_writer::to_bytes() const {
  const std::vector<const entry*> order = ordered();
  std::vector<tensor_spec> specs;
  specs.reserve(order.size());
  for (const entry* e : order) specs.push_back(e->spec);
  const std::vector<tensor_info> layout = detail::plan_layout(specs, "safetensors writer");
  const std::string header = detail::build_header(layout, m_metadata, "safetensors writer");
  // Sized once and filled with memcpy (GCC 12 at -O3 misreports vector::insert into a fresh vector).
  std::size_t total = 8 + header.size();
  for (const entry* e : order) total += e->bytes.size();
  std::vector<unsigned char> out(total);
  detail::store_le<std::uint64_t>(header.size(), out.data());
  std::size_t at = 8;
  std::memcpy(out.data() + at, header.data(), header.size());
  at += header.size();
  for (const entry* e : order) {
    if (!e->bytes.empty()) std::memcpy(out.data() + at, e->bytes.data(), e->bytes.size());
    at += e->bytes.size();
  }
  return out;
}

}  // namespace lora::io
