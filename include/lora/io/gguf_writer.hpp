// lora/io/gguf_writer.hpp: writing GGUF v3 files that llama.cpp loads (docs/CONVENTIONS.md §gguf):
// metadata in the order it was set, tensor infos in the order tensors were added, each tensor's data
// padded to the alignment (the last one too, as ggml writes it). Matrices are given in PyTorch
// orientation (rows x cols) and stored with ne = [cols, rows]; F32, F16, BF16, Q8_0 and Q4_0 are encoded
// with ggml's reference rounding (io/ggml_types.hpp). Files are written atomically (io/atomic_file.hpp).
//
//   lora::io::gguf_writer out;
//   out.set("general.architecture", lora::io::gguf_value::of("gpt2"));
//   out.add("blk.0.attn_qkv.weight", w, lora::io::ggml_type::q8_0);   // w: 3d x d
//   out.write("model.gguf");
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "atomic_file.hpp"
#include "file_storage.hpp"
#include "ggml_types.hpp"
#include "gguf_value.hpp"

namespace lora::io {

/// Collects metadata and tensors (encoded as they are added), then writes them as one GGUF file.
class gguf_writer {
 public:
  /// Sets `key` (replacing its value in place if it was set before). name_error for an empty key;
  /// general.alignment must be a UINT32 power of two (format_error otherwise).
  gguf_writer& set(const std::string& key, gguf_value value);
  /// The value set for `key`, or nullptr.
  const gguf_value* find(const std::string& key) const;
  /// Adds a rows x cols matrix (PyTorch orientation) as a 2-D tensor, ne = [cols, rows], encoded as `type`.
  /// name_error for an empty, over-long (> 63 bytes) or duplicate name; shape_error when cols is not a
  /// multiple of the type's block size; dtype_error for a type this library does not encode.
  template <typename Derived>
  gguf_writer& add(const std::string& name, const Eigen::MatrixBase<Derived>& values, ggml_type type);
  /// Adds the coefficients of a vector expression as a 1-D tensor, ne = [n].
  template <typename Derived>
  gguf_writer& add_vector(const std::string& name, const Eigen::MatrixBase<Derived>& values, ggml_type type);
  /// Adds bytes already encoded as `type` with extents `ne` (ne[0] contiguous); format_error when their
  /// number is not what (type, ne) takes.
  gguf_writer& add_raw(const std::string& name, ggml_type type, std::vector<std::uint64_t> ne,
                       const unsigned char* data, std::size_t size);
  /// The same without a copy: the writer keeps `bytes` (and the file mapping it holds) until destroyed.
  gguf_writer& add_raw(const std::string& name, ggml_type type, std::vector<std::uint64_t> ne, tensor_bytes bytes);

  std::size_t tensor_count() const noexcept { return m_tensors.size(); }
  /// The whole file.
  std::vector<unsigned char> to_bytes() const;
  /// Writes the file atomically (io_error on failure; an existing file is untouched then).
  void write(const std::string& path) const;

 private:
  struct entry {
    std::string name;
    std::vector<std::uint64_t> ne;
    ggml_type type;
    std::vector<unsigned char> bytes;  ///< owned, or empty and:
    tensor_bytes borrowed;
    const unsigned char* data() const noexcept { return bytes.empty() ? borrowed.data() : bytes.data(); }
    std::size_t size() const noexcept { return bytes.empty() ? borrowed.size() : bytes.size(); }
  };
  void check_raw_size(const std::string& name, ggml_type type, const std::vector<std::uint64_t>& ne,
                      std::size_t size) const;
  void check_new_name(const std::string& name) const;
  entry& new_entry(const std::string& name, ggml_type type, std::vector<std::uint64_t> ne);
  /// Magic, counts, metadata and tensor infos, padded to the alignment.
  std::vector<unsigned char> header() const;
  template <typename Sink>
  void emit(Sink&& sink) const;

  std::vector<std::pair<std::string, gguf_value>> m_metadata;
  std::unordered_map<std::string, std::size_t> m_keys;
  std::vector<entry> m_tensors;
  std::unordered_map<std::string, std::size_t> m_names;
  std::uint32_t m_alignment = 32;
};

// ================================================================================================
// Implementation
// ================================================================================================

namespace detail {

/// Appends GGUF's little-endian encodings to a byte vector.
struct gguf_bytes {
  std::vector<unsigned char>& out;
  template <typename T>
  void scalar(T v) {
    const std::size_t at = out.size();
    out.resize(at + (std::is_same_v<T, bool> ? 1 : sizeof(T)));
    gguf_store(v, &out[at]);
  }
  void string(const std::string& s) {
    scalar<std::uint64_t>(s.size());
    out.insert(out.end(), s.begin(), s.end());
  }
  void value(const gguf_value& v) {
    if (v.type() == gguf_type::string) return string(v.string());
    if (v.is_array()) {
      scalar<std::uint32_t>(static_cast<std::uint32_t>(v.element_type()));
      scalar<std::uint64_t>(v.size());
      if (v.element_type() == gguf_type::string) {
        for (const std::string& s : v.strings()) string(s);
        return;
      }
    }
    out.insert(out.end(), v.raw_bytes().begin(), v.raw_bytes().end());
  }
};

}  // namespace detail

inline gguf_writer& gguf_writer::set(const std::string& key, gguf_value value) {
  if (key.empty()) throw name_error("GGUF writer: metadata keys must not be empty");
  if (key == "general.alignment") {
    if (value.type() != gguf_type::u32)
      throw format_error(
          detail::cat("GGUF writer: general.alignment must be UINT32, got ", gguf_type_name(value.type())));
    const auto a = value.get<std::uint32_t>();
    if (a == 0 || (a & (a - 1)) != 0)
      throw format_error(detail::cat("GGUF writer: general.alignment = ", a, " is not a power of two"));
    m_alignment = a;
  }
  const auto it = m_keys.find(key);
  if (it != m_keys.end()) {
    m_metadata[it->second].second = std::move(value);
  } else {
    m_keys.emplace(key, m_metadata.size());
    m_metadata.emplace_back(key, std::move(value));
  }
  return *this;
}

inline const gguf_value* gguf_writer::find(const std::string& key) const {
  const auto it = m_keys.find(key);
  return it == m_keys.end() ? nullptr : &m_metadata[it->second].second;
}

inline void gguf_writer::check_new_name(const std::string& name) const {
  if (name.empty() || name.size() > 63)
    throw name_error(
        detail::cat("GGUF writer: tensor name '", name, "' must have 1 to 63 bytes, it has ", name.size()));
  if (m_names.count(name) != 0) throw name_error(detail::cat("GGUF writer: tensor '", name, "' was already added"));
}

inline gguf_writer::entry& gguf_writer::new_entry(const std::string& name, ggml_type type,
                                                  std::vector<std::uint64_t> ne) {
  check_new_name(name);
  m_names.emplace(name, m_tensors.size());
  m_tensors.push_back(entry{name, std::move(ne), type, {}, {}});
  return m_tensors.back();
}

namespace detail {

/// Checks that `type` can be encoded from floats with rows of `cols` elements (names the tensor).
inline void check_encodable(const std::string& name, ggml_type type, index cols) {
  if (!ggml_is_convertible(type))
    throw dtype_error(cat("GGUF writer: tensor '", name, "': cannot encode ", ggml_type_name(type),
                          " (this library encodes F32, F16, BF16, Q8_0, Q4_0)"));
  const std::uint32_t block = ggml_traits(type).block_size;
  if (cols % block != 0)
    throw shape_error(cat("GGUF writer: tensor '", name, "': rows of ", cols, " elements cannot be stored as ",
                          ggml_type_name(type), ", whose blocks hold ", block, " (ne[0] must be a multiple of ", block,
                          ")"));
}

}  // namespace detail

template <typename Derived>
gguf_writer& gguf_writer::add(const std::string& name, const Eigen::MatrixBase<Derived>& values, ggml_type type) {
  detail::check_encodable(name, type, values.cols());
  const index rows = values.rows(), cols = values.cols();
  const std::uint64_t row_bytes = ggml_row_bytes(type, static_cast<std::uint64_t>(cols));
  entry& e = new_entry(name, type, {static_cast<std::uint64_t>(cols), static_cast<std::uint64_t>(rows)});
  e.bytes.resize(static_cast<std::size_t>(row_bytes) * static_cast<std::size_t>(rows));
  Eigen::Matrix<float, 1, Eigen::Dynamic> row(cols);
  for (index i = 0; i < rows; ++i) {
    row = values.row(i).template cast<float>();
    ggml_quantize_row(type, row.data(), static_cast<std::size_t>(cols),
                      &e.bytes[static_cast<std::size_t>(i * row_bytes)]);
  }
  return *this;
}

template <typename Derived>
gguf_writer& gguf_writer::add_vector(const std::string& name, const Eigen::MatrixBase<Derived>& values,
                                     ggml_type type) {
  detail::check_encodable(name, type, values.size());
  const Eigen::VectorXf flat = values.reshaped().template cast<float>();
  entry& e = new_entry(name, type, {static_cast<std::uint64_t>(flat.size())});
  e.bytes.resize(static_cast<std::size_t>(ggml_row_bytes(type, static_cast<std::uint64_t>(flat.size()))));
  ggml_quantize_row(type, flat.data(), static_cast<std::size_t>(flat.size()), e.bytes.data());
  return *this;
}

inline void gguf_writer::check_raw_size(const std::string& name, ggml_type type, const std::vector<std::uint64_t>& ne,
                                        std::size_t size) const {
  const ggml_type_traits& traits = ggml_traits(type);
  if (ne.size() > 4)
    throw format_error(detail::cat("GGUF writer: tensor '", name, "' has ", ne.size(), " dimensions (at most 4)"));
  std::uint64_t rows = 1;
  for (std::size_t k = 1; k < ne.size(); ++k) rows *= ne[k];
  const std::uint64_t expected = ggml_row_bytes(type, ne.empty() ? 1 : ne[0]) * rows;
  if (expected != size)
    throw format_error(detail::cat("GGUF writer: tensor '", name, "' of type ", traits.name, ": ", size,
                                   " bytes given, its extents take ", expected));
}

inline gguf_writer& gguf_writer::add_raw(const std::string& name, ggml_type type, std::vector<std::uint64_t> ne,
                                         const unsigned char* data, std::size_t size) {
  check_raw_size(name, type, ne, size);
  entry& e = new_entry(name, type, std::move(ne));
  e.bytes.assign(data, data + size);
  return *this;
}

inline gguf_writer& gguf_writer::add_raw(const std::string& name, ggml_type type, std::vector<std::uint64_t> ne,
                                         tensor_bytes bytes) {
  check_raw_size(name, type, ne, bytes.size());
  new_entry(name, type, std::move(ne)).borrowed = std::move(bytes);
  return *this;
}

inline std::vector<unsigned char> gguf_writer::header() const {
  std::vector<unsigned char> out = {'G', 'G', 'U', 'F'};
  detail::gguf_bytes w{out};
  w.scalar<std::uint32_t>(3);
  w.scalar<std::uint64_t>(m_tensors.size());
  w.scalar<std::uint64_t>(m_metadata.size());
  for (const auto& [key, value] : m_metadata) {
    w.string(key);
    w.scalar<std::uint32_t>(static_cast<std::uint32_t>(value.type()));
    w.value(value);
  }
  std::uint64_t offset = 0;
  for (const entry& e : m_tensors) {
    w.string(e.name);
    w.scalar<std::uint32_t>(static_cast<std::uint32_t>(e.ne.size()));
    for (std::uint64_t d : e.ne) w.scalar<std::int64_t>(static_cast<std::int64_t>(d));
    w.scalar<std::uint32_t>(static_cast<std::uint32_t>(e.type));
    w.scalar<std::uint64_t>(offset);
    offset = detail::gguf_pad(offset + e.size(), m_alignment);
  }
  // The data section starts at the next multiple of the alignment; a file of no tensors has none.
  if (!m_tensors.empty()) out.resize(static_cast<std::size_t>(detail::gguf_pad(out.size(), m_alignment)), 0);
  return out;
}

template <typename Sink>
void gguf_writer::emit(Sink&& sink) const {
  const std::vector<unsigned char> head = header();
  sink(head.data(), head.size());
  static const unsigned char zeros[256] = {};
  for (const entry& e : m_tensors) {
    sink(e.data(), e.size());
    std::size_t pad = static_cast<std::size_t>(detail::gguf_pad(e.size(), m_alignment) - e.size());
    for (; pad > 0; pad -= std::min(pad, sizeof zeros)) sink(zeros, std::min(pad, sizeof zeros));
  }
}

inline std::vector<unsigned char> gguf_writer::to_bytes() const {
  std::vector<unsigned char> out;
  emit([&](const unsigned char* p, std::size_t n) { out.insert(out.end(), p, p + n); });
  return out;
}

inline void gguf_writer::write(const std::string& path) const {
  write_file_atomically(path,
                        [&](file_sink& out) { emit([&](const unsigned char* p, std::size_t n) { out.write(p, n); }); });
}

}  // namespace lora::io
