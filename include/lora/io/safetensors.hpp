// lora/io/safetensors.hpp: reader and writer of the safetensors format (Hugging Face), the file format of
// PEFT adapters and of most checkpoints. Files come from strangers, so the reader enforces every rule of
// the reference loader (huggingface/safetensors, Rust) plus a few of its own, each violation a
// lora::format_error naming the file, the tensor and the rule, and it never reads, allocates or
// trusts a size before checking it against the size of the file.
//
// Layout of a file of S bytes:
//   [0, 8)       N, unsigned 64-bit little-endian: the length of the header, N <= 100,000,000.
//   [8, 8+N)     a UTF-8 JSON object, possibly followed by spaces (the reference writer pads N to a
//                multiple of 8):
//                  {"__metadata__": {"<key>": "<value>", ...},          (optional, string -> string)
//                   "<name>": {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}
//   [8+N, S)     the data area. Tensor t occupies bytes [8+N+begin, 8+N+end) (end exclusive): its
//                prod(shape) elements, little-endian, row-major (C order; the last index varies
//                fastest). Sorted by begin, the tensors tile the data area exactly: the first begins
//                at 0, each begins where the previous ended, and the last ends at S - 8 - N.
//
// Matrices: a 2-D tensor of shape [rows, cols] is a lora::matrix (column-major in memory) of rows x cols
// with the same (i, j) entries; the conversion between the layouts happens here. A 1-D tensor of shape
// [n] reads as an n x 1 matrix.
//
// The reader memory-maps the file (POSIX mmap, read-only), so taking one tensor from a multi-GB file
// touches only that tensor's pages; where mapping fails it falls back to bounded pread() chunks. Every
// const member of safetensors_file may be called from several threads at once. A file truncated or
// rewritten in place by another process while it is mapped can raise SIGBUS: that is the one hazard
// of mmap no reader can rule out; the writer here never rewrites in place (it renames a finished
// temporary over the target), so files written by this library are safe to read while replaced.
//
// POSIX only (Linux, macOS).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"

namespace lora::io {

/// Element types of the format, declared in the order of the reference implementation's enum, which
/// is ascending alignment; the writer sorts tensors by this order, descending. Sub-byte types (F4,
/// F6_*) are not supported and read as unknown dtypes.
enum class dtype : std::uint8_t {
  boolean,  ///< BOOL, 1 byte, 0 = false, anything else = true.
  u8,       ///< U8
  i8,       ///< I8
  f8_e5m2,  ///< F8_E5M2: 1 sign, 5 exponent (bias 15), 2 mantissa bits; has Inf and NaN.
  f8_e4m3,  ///< F8_E4M3 (float8_e4m3fn): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no Inf, NaN = S.1111.111.
  f8_e8m0,  ///< F8_E8M0 (float8_e8m0fnu): unsigned power of two 2^(byte - 127); 0xFF is NaN.
  i16,      ///< I16
  u16,      ///< U16
  f16,      ///< F16: IEEE binary16.
  bf16,     ///< BF16: bfloat16, the top 16 bits of a binary32.
  i32,      ///< I32
  u32,      ///< U32
  f32,      ///< F32: IEEE binary32.
  c64,      ///< C64: complex of two binary32 (real, imaginary); raw access only.
  f64,      ///< F64: IEEE binary64.
  i64,      ///< I64
  u64,      ///< U64
};

/// Bytes per element.
std::size_t dtype_size(dtype type) noexcept;
/// The name the format uses ("F32", "BF16", "BOOL", ...).
const char* dtype_name(dtype type) noexcept;
/// The dtype named `name`; format_error for a name the format does not define (or that is sub-byte).
dtype parse_dtype(std::string_view name);
/// Whether read_matrix / read_vector can convert this dtype to float or double: every dtype but c64.
bool is_readable_as_real(dtype type) noexcept;
/// Whether the writer can convert float or double values to this dtype: f64, f32, f16, bf16. Other
/// dtypes are written with add_raw / write_raw.
bool is_writable_from_real(dtype type) noexcept;
/// The dtype that stores Scalar without loss: f32 for float, f64 for double.
template <typename Scalar>
constexpr dtype dtype_of() noexcept;

/// Where one tensor lies in a file. Offsets are relative to the start of the data area.
struct tensor_info {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;  ///< Row-major dimensions; empty for a scalar.
  std::uint64_t begin = 0;          ///< First byte, relative to the data area.
  std::uint64_t end = 0;            ///< One past the last byte; end - begin = numel() * dtype_size(type).

  /// Product of the dimensions (1 for a scalar, 0 if any dimension is 0).
  std::int64_t numel() const noexcept;
  std::uint64_t byte_size() const noexcept { return end - begin; }
  std::size_t rank() const noexcept { return shape.size(); }
};

/// What the writers need to know of a tensor before its data: its name, dtype and shape.
struct tensor_spec {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
};

/// How safetensors_file::open reaches the data.
enum class read_mode {
  map,    ///< Memory-map the file; fall back to pread when mmap fails. The default.
  pread,  ///< Never map; read each tensor with bounded pread() calls when asked for it.
};

/// The bytes of one tensor exactly as stored (little-endian, row-major). Holds a reference to the
/// mapping (or to its own copy when the file is not memory-resident), so it stays valid after the
/// safetensors_file it came from is destroyed.
class tensor_bytes {
 public:
  const unsigned char* data() const noexcept { return m_data; }
  std::size_t size() const noexcept { return m_size; }
  const unsigned char* begin() const noexcept { return m_data; }
  const unsigned char* end() const noexcept { return m_data + m_size; }

 private:
  friend class safetensors_file;
  std::shared_ptr<const void> m_owner;
  const unsigned char* m_data = nullptr;
  std::size_t m_size = 0;
};

namespace detail {
using lora::detail::cat;
using lora::detail::shape_str;
class file_storage;
class atomic_file;
}  // namespace detail

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
  std::unique_ptr<detail::atomic_file> m_file;
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

/// The largest header the reference loader accepts.
inline constexpr std::uint64_t max_header_size = 100'000'000;
/// Deepest JSON nesting accepted in a header (serde_json's default recursion limit); a valid header
/// needs 3.
inline constexpr int max_header_depth = 128;
/// Bytes converted per step when tensors are read or written in chunks.
inline constexpr std::size_t chunk_bytes = std::size_t{1} << 20;

// --- number formats: all conversions round to nearest, ties to even -----------------------------

/// Rounds x to the IEEE-754 binary format with E exponent bits and M stored mantissa bits (f16: 5, 10;
/// bf16: 8, 7; f32: 8, 23) and returns its bit pattern: sign at bit E+M, biased exponent, mantissa.
/// Correctly rounded from double (no double rounding through float); overflow gives Inf, values
/// below half the smallest subnormal give a signed zero, NaN stays NaN (quiet, top payload bits kept).
template <int E, int M>
std::uint32_t round_to_binary(double x) noexcept;
/// The exact value of a bit pattern of that format (Inf and NaN where the exponent is all ones).
template <int E, int M>
double binary_to_double(std::uint32_t bits) noexcept;

/// IEEE binary16 bit pattern nearest to x.
std::uint16_t to_half_bits(double x) noexcept;
/// bfloat16 bit pattern nearest to x.
std::uint16_t to_bfloat16_bits(double x) noexcept;
/// The binary16 value of bits (exact in float).
float from_half_bits(std::uint16_t bits) noexcept;
/// The bfloat16 value of bits (exact in float).
float from_bfloat16_bits(std::uint16_t bits) noexcept;
/// float8_e4m3fn (exact in float).
float from_f8_e4m3_bits(std::uint8_t bits) noexcept;
/// float8_e5m2 (exact in float).
float from_f8_e5m2_bits(std::uint8_t bits) noexcept;
/// float8_e8m0fnu (exact in float).
float from_f8_e8m0_bits(std::uint8_t bits) noexcept;
/// double to float, rounding to nearest even and overflowing to Inf without undefined behaviour.
float narrow_to_float(double x) noexcept;

/// Little-endian load and store of an unsigned integer, independent of the host's byte order.
template <typename U>
U load_le(const unsigned char* p) noexcept;
template <typename U>
void store_le(U value, unsigned char* p) noexcept;

/// Converts n stored elements of `type` (not c64) to Scalar.
template <typename Scalar>
void decode(dtype type, const unsigned char* src, std::size_t n, Scalar* dst);
/// Converts n values to `type` (is_writable_from_real) and stores them.
template <typename Scalar>
void encode(dtype type, const Scalar* src, std::size_t n, unsigned char* dst);

// --- validation helpers ---------------------------------------------------------------------------

/// Offset of the first byte that is not part of well-formed UTF-8 (no overlongs, surrogates or code
/// points above U+10FFFF), or n if all of it is.
std::size_t utf8_error_offset(const unsigned char* s, std::size_t n) noexcept;
/// a * b, or false on 64-bit overflow.
bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept;
/// "[2, 3]"
std::string shape_to_string(const std::vector<std::int64_t>& shape);
/// Byte size of (type, shape) by the reference's rule: the element count folded left to right with
/// checked multiplication, then times the element size. False on overflow or a negative dimension.
bool checked_byte_size(dtype type, const std::vector<std::int64_t>& shape, std::uint64_t& out) noexcept;

/// Throws format_error("safetensors file '<label>': <rule>").
[[noreturn]] void throw_format_error(const std::string& label, const std::string& rule);
/// Throws dtype_error unless is_writable_from_real(type).
void require_writable(dtype type);

/// Validates specs and lays them out back to back in the given order. `who` prefixes messages.
std::vector<tensor_info> plan_layout(const std::vector<tensor_spec>& specs, const std::string& who);
/// The header for a layout: compact JSON ("__metadata__" first when non-empty, then the tensors in
/// layout order, each {"dtype", "shape", "data_offsets"}), padded with spaces to a multiple of 8.
std::string build_header(const std::vector<tensor_info>& layout, const std::map<std::string, std::string>& metadata,
                         const std::string& who);
/// Throws unless a matrix of rows x cols can fill `shape` (see safetensors_stream_writer::write).
void check_fits(const tensor_spec& spec, index rows, index cols, const std::string& who);
/// Streams the entries of `values` in row-major order, converted to `type`, to
/// sink(const unsigned char* bytes, std::size_t count) in chunks.
template <typename Derived, typename Sink>
void encode_row_major(const Eigen::MatrixBase<Derived>& values, dtype type, Sink&& sink);

/// Read-only bytes of a file: memory-resident (mapped, or owned bytes) or reached through pread.
class file_storage {
 public:
  static std::shared_ptr<const file_storage> open(const std::string& path, read_mode mode);
  static std::shared_ptr<const file_storage> from_bytes(std::vector<unsigned char> bytes);
  file_storage(const file_storage&) = delete;
  file_storage& operator=(const file_storage&) = delete;
  ~file_storage();

  std::uint64_t size() const noexcept { return m_size; }
  /// The whole file, or nullptr when it is reached through pread.
  const unsigned char* data() const noexcept { return m_data; }
  /// Copies [offset, offset + n), which the caller has checked lies inside the file, to dst.
  void read(std::uint64_t offset, std::size_t n, unsigned char* dst, const std::string& label) const;

 private:
  file_storage() = default;
  std::vector<unsigned char> m_bytes;
  const unsigned char* m_data = nullptr;
  void* m_map = nullptr;
  std::size_t m_map_size = 0;
  int m_fd = -1;
  std::uint64_t m_size = 0;
};

/// The validated contents of a header.
struct parsed_header {
  std::vector<tensor_info> tensors;  // in file order
  std::map<std::string, std::string> metadata;
  std::uint64_t data_offset = 0;  // 8 + N
};
/// Applies every loader rule to the file in `storage`; format_error naming `label` on the first broken.
parsed_header parse_header(const file_storage& storage, const std::string& label);

/// A temporary file next to `target` that commit() renames over it. Destroying it, or any failure,
/// closes and removes the temporary.
class atomic_file {
 public:
  explicit atomic_file(std::string target);
  atomic_file(const atomic_file&) = delete;
  atomic_file& operator=(const atomic_file&) = delete;
  ~atomic_file() { discard(); }

  const std::string& temp_path() const noexcept { return m_temp; }
  /// pwrite()s all of [data, data + size) at `offset`; io_error (temporary removed) on failure.
  void write_at(std::uint64_t offset, const unsigned char* data, std::size_t size);
  /// fsync, close, rename over the target, then fsync the directory (best effort).
  void commit();
  /// Closes and removes the temporary unless committed. Idempotent.
  void discard() noexcept;

 private:
  [[noreturn]] void fail(const std::string& what, int err);
  std::string m_target;
  std::string m_dir;
  std::string m_temp;
  int m_fd = -1;
  bool m_done = false;
};

}  // namespace detail

// ================================================================================================
// Implementation
// ================================================================================================

template <typename Scalar>
constexpr dtype dtype_of() noexcept {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "lora::io converts tensors to and from float or double only");
  return std::is_same_v<Scalar, float> ? dtype::f32 : dtype::f64;
}

inline std::size_t dtype_size(dtype type) noexcept {
  switch (type) {
    case dtype::boolean:
    case dtype::u8:
    case dtype::i8:
    case dtype::f8_e5m2:
    case dtype::f8_e4m3:
    case dtype::f8_e8m0:
      return 1;
    case dtype::i16:
    case dtype::u16:
    case dtype::f16:
    case dtype::bf16:
      return 2;
    case dtype::i32:
    case dtype::u32:
    case dtype::f32:
      return 4;
    case dtype::c64:
    case dtype::f64:
    case dtype::i64:
    case dtype::u64:
      return 8;
  }
  return 0;
}

inline const char* dtype_name(dtype type) noexcept {
  switch (type) {
    case dtype::boolean:
      return "BOOL";
    case dtype::u8:
      return "U8";
    case dtype::i8:
      return "I8";
    case dtype::f8_e5m2:
      return "F8_E5M2";
    case dtype::f8_e4m3:
      return "F8_E4M3";
    case dtype::f8_e8m0:
      return "F8_E8M0";
    case dtype::i16:
      return "I16";
    case dtype::u16:
      return "U16";
    case dtype::f16:
      return "F16";
    case dtype::bf16:
      return "BF16";
    case dtype::i32:
      return "I32";
    case dtype::u32:
      return "U32";
    case dtype::f32:
      return "F32";
    case dtype::c64:
      return "C64";
    case dtype::f64:
      return "F64";
    case dtype::i64:
      return "I64";
    case dtype::u64:
      return "U64";
  }
  return "?";
}

inline dtype parse_dtype(std::string_view name) {
  static constexpr dtype all[] = {dtype::boolean, dtype::u8,  dtype::i8,  dtype::f8_e5m2, dtype::f8_e4m3,
                                  dtype::f8_e8m0, dtype::i16, dtype::u16, dtype::f16,     dtype::bf16,
                                  dtype::i32,     dtype::u32, dtype::f32, dtype::c64,     dtype::f64,
                                  dtype::i64,     dtype::u64};
  for (dtype type : all) {
    if (name == dtype_name(type)) return type;
  }
  throw format_error(detail::cat("unknown dtype '", name,
                                 "' (known: BOOL U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 I16 U16 F16 BF16 I32 U32 F32 C64 F64 "
                                 "I64 U64)"));
}

inline bool is_readable_as_real(dtype type) noexcept { return type != dtype::c64; }

inline bool is_writable_from_real(dtype type) noexcept {
  return type == dtype::f64 || type == dtype::f32 || type == dtype::f16 || type == dtype::bf16;
}

inline std::int64_t tensor_info::numel() const noexcept {
  // Unsigned so that a hand-made info cannot overflow into undefined behaviour; for validated
  // infos every partial product fits (checked at open) and the result is at most the file size.
  std::uint64_t n = 1;
  for (std::int64_t d : shape) n *= static_cast<std::uint64_t>(d);
  return static_cast<std::int64_t>(n);
}

namespace detail {

template <int E, int M>
std::uint32_t round_to_binary(double x) noexcept {
  static_assert(E >= 2 && E <= 8 && M >= 1 && M <= 23, "a binary format no wider than binary32");
  constexpr int bias = (1 << (E - 1)) - 1;
  constexpr int emin = 1 - bias;  // exponent of the smallest normal
  constexpr std::uint32_t inf_bits = ((std::uint32_t{1} << E) - 1) << M;
  std::uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const std::uint32_t sign = static_cast<std::uint32_t>(bits >> 63) << (E + M);
  const int biased = static_cast<int>((bits >> 52) & 0x7FF);
  const std::uint64_t fraction = bits & ((std::uint64_t{1} << 52) - 1);
  if (biased == 0x7FF) {
    if (fraction == 0) return sign | inf_bits;
    return sign | inf_bits | static_cast<std::uint32_t>(fraction >> (52 - M)) | (std::uint32_t{1} << (M - 1));
  }
  // Zero, or a double subnormal (< 2^-1022): below half the smallest subnormal of any format with E <= 8.
  if (biased == 0) return sign;
  const int e = biased - 1023;  // |x| = sig * 2^(e - 52), sig in [2^52, 2^53)
  if (e > bias) return sign | inf_bits;
  const std::uint64_t sig = fraction | (std::uint64_t{1} << 52);
  // The result is q * 2^(max(e, emin) - M) with q an integer: drop `shift` bits of sig, rounding.
  const int shift = 52 - M + (e < emin ? emin - e : 0);
  if (shift > 53) return sign;  // |x| < 2^(emin - M - 1), half the smallest subnormal: rounds to zero
  std::uint64_t q = sig >> shift;
  const std::uint64_t rest = sig & ((std::uint64_t{1} << shift) - 1);
  const std::uint64_t half = std::uint64_t{1} << (shift - 1);
  if (rest > half || (rest == half && (q & 1) != 0)) ++q;
  // Normal: q in [2^M, 2^(M+1)] carries the implicit bit, so adding it to (e + bias - 1) << M both
  // sets the mantissa and carries into the exponent when rounding reached 2^(M+1). Subnormal: q is
  // the mantissa, and q = 2^M is exactly the smallest normal.
  std::uint64_t magnitude = e < emin ? q : (static_cast<std::uint64_t>(e + bias - 1) << M) + q;
  if (magnitude > inf_bits) magnitude = inf_bits;
  return sign | static_cast<std::uint32_t>(magnitude);
}

template <int E, int M>
double binary_to_double(std::uint32_t bits) noexcept {
  constexpr int bias = (1 << (E - 1)) - 1;
  constexpr std::uint32_t exp_ones = (std::uint32_t{1} << E) - 1;
  const bool negative = ((bits >> (E + M)) & 1) != 0;
  const std::uint32_t exponent = (bits >> M) & exp_ones;
  const std::uint32_t mantissa = bits & ((std::uint32_t{1} << M) - 1);
  double magnitude;
  if (exponent == exp_ones) {
    magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<double>(mantissa), 1 - bias - M);
  } else {
    magnitude =
        std::ldexp(static_cast<double>(mantissa | (std::uint32_t{1} << M)), static_cast<int>(exponent) - bias - M);
  }
  return negative ? -magnitude : magnitude;
}

inline std::uint16_t to_half_bits(double x) noexcept { return static_cast<std::uint16_t>(round_to_binary<5, 10>(x)); }

inline std::uint16_t to_bfloat16_bits(double x) noexcept {
  return static_cast<std::uint16_t>(round_to_binary<8, 7>(x));
}

inline float from_half_bits(std::uint16_t bits) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000) << 16;
  const std::uint32_t exponent = (bits >> 10) & 0x1F;
  const std::uint32_t mantissa = bits & 0x3FF;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign != 0 ? -magnitude : magnitude;
  }
  // Normal: rebias 15 -> 127; Inf and NaN (payload kept) map to exponent 255.
  const std::uint32_t out = sign | ((exponent == 0x1F ? 0xFFu : exponent + 112) << 23) | (mantissa << 13);
  float value;
  std::memcpy(&value, &out, sizeof value);
  return value;
}

inline float from_bfloat16_bits(std::uint16_t bits) noexcept {
  const std::uint32_t out = static_cast<std::uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &out, sizeof value);
  return value;
}

inline float from_f8_e4m3_bits(std::uint8_t bits) noexcept {
  if ((bits & 0x7F) == 0x7F) return std::numeric_limits<float>::quiet_NaN();  // S.1111.111; no Inf
  const bool negative = (bits & 0x80) != 0;
  const int exponent = (bits >> 3) & 0xF;
  const int mantissa = bits & 0x7;
  const float magnitude = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -9)
                                        : std::ldexp(static_cast<float>(mantissa | 8), exponent - 10);
  return negative ? -magnitude : magnitude;
}

inline float from_f8_e5m2_bits(std::uint8_t bits) noexcept { return static_cast<float>(binary_to_double<5, 2>(bits)); }

inline float from_f8_e8m0_bits(std::uint8_t bits) noexcept {
  if (bits == 0xFF) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(bits) - 127);
}

inline float narrow_to_float(double x) noexcept {
  if (!(std::fabs(x) > static_cast<double>(FLT_MAX))) return static_cast<float>(x);  // in range, or NaN
  const std::uint32_t bits = round_to_binary<8, 23>(x);
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

template <typename U>
U load_le(const unsigned char* p) noexcept {
  static_assert(std::is_unsigned_v<U>, "unsigned integers only");
  U value = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i) value = static_cast<U>(value | (static_cast<U>(p[i]) << (8 * i)));
  return value;
}

template <typename U>
void store_le(U value, unsigned char* p) noexcept {
  static_assert(std::is_unsigned_v<U>, "unsigned integers only");
  for (std::size_t i = 0; i < sizeof(U); ++i) p[i] = static_cast<unsigned char>(value >> (8 * i));
}

template <typename Scalar>
void decode(dtype type, const unsigned char* src, std::size_t n, Scalar* dst) {
  // One loop per dtype, so that the switch is outside the loop. Every conversion is exact except
  // F64 -> float (rounded by narrow_to_float) and 32/64-bit integers -> float or 64-bit -> double.
  auto each = [&](std::size_t width, auto convert) {
    for (std::size_t k = 0; k < n; ++k) dst[k] = static_cast<Scalar>(convert(src + k * width));
  };
  switch (type) {
    case dtype::boolean:
      return each(1, [](const unsigned char* p) { return *p != 0 ? 1 : 0; });
    case dtype::u8:
      return each(1, [](const unsigned char* p) { return *p; });
    case dtype::i8:
      return each(1, [](const unsigned char* p) { return static_cast<std::int8_t>(*p); });
    case dtype::f8_e5m2:
      return each(1, [](const unsigned char* p) { return from_f8_e5m2_bits(*p); });
    case dtype::f8_e4m3:
      return each(1, [](const unsigned char* p) { return from_f8_e4m3_bits(*p); });
    case dtype::f8_e8m0:
      return each(1, [](const unsigned char* p) { return from_f8_e8m0_bits(*p); });
    case dtype::i16:
      return each(2, [](const unsigned char* p) { return static_cast<std::int16_t>(load_le<std::uint16_t>(p)); });
    case dtype::u16:
      return each(2, [](const unsigned char* p) { return load_le<std::uint16_t>(p); });
    case dtype::f16:
      return each(2, [](const unsigned char* p) { return from_half_bits(load_le<std::uint16_t>(p)); });
    case dtype::bf16:
      return each(2, [](const unsigned char* p) { return from_bfloat16_bits(load_le<std::uint16_t>(p)); });
    case dtype::i32:
      return each(4, [](const unsigned char* p) { return static_cast<std::int32_t>(load_le<std::uint32_t>(p)); });
    case dtype::u32:
      return each(4, [](const unsigned char* p) { return load_le<std::uint32_t>(p); });
    case dtype::f32:
      return each(4, [](const unsigned char* p) {
        const std::uint32_t bits = load_le<std::uint32_t>(p);
        float value;
        std::memcpy(&value, &bits, sizeof value);
        return value;
      });
    case dtype::f64:
      return each(8, [](const unsigned char* p) {
        const std::uint64_t bits = load_le<std::uint64_t>(p);
        double value;
        std::memcpy(&value, &bits, sizeof value);
        if constexpr (std::is_same_v<Scalar, float>) {
          return narrow_to_float(value);
        } else {
          return value;
        }
      });
    case dtype::i64:
      return each(8, [](const unsigned char* p) { return static_cast<std::int64_t>(load_le<std::uint64_t>(p)); });
    case dtype::u64:
      return each(8, [](const unsigned char* p) { return load_le<std::uint64_t>(p); });
    case dtype::c64:
      break;
  }
  throw dtype_error(cat("cannot convert ", dtype_name(type), " to a real scalar"));
}

template <typename Scalar>
void encode(dtype type, const Scalar* src, std::size_t n, unsigned char* dst) {
  switch (type) {
    case dtype::f64:
      for (std::size_t k = 0; k < n; ++k) {
        const double value = static_cast<double>(src[k]);
        std::uint64_t bits;
        std::memcpy(&bits, &value, sizeof bits);
        store_le(bits, dst + 8 * k);
      }
      return;
    case dtype::f32:
      for (std::size_t k = 0; k < n; ++k) {
        float value;
        if constexpr (std::is_same_v<Scalar, float>) {
          value = src[k];
        } else {
          value = narrow_to_float(src[k]);
        }
        std::uint32_t bits;
        std::memcpy(&bits, &value, sizeof bits);
        store_le(bits, dst + 4 * k);
      }
      return;
    case dtype::f16:
      for (std::size_t k = 0; k < n; ++k) store_le(to_half_bits(static_cast<double>(src[k])), dst + 2 * k);
      return;
    case dtype::bf16:
      for (std::size_t k = 0; k < n; ++k) store_le(to_bfloat16_bits(static_cast<double>(src[k])), dst + 2 * k);
      return;
    default:
      break;
  }
  require_writable(type);  // throws
}

inline std::size_t utf8_error_offset(const unsigned char* s, std::size_t n) noexcept {
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte (Unicode Table 3-7)
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // no overlongs
      if (c == 0xED) hi = 0x9F;  // no surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // no overlongs
      if (c == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
    } else {
      return i;
    }
    if (n - i < len) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (std::size_t k = 2; k < len; ++k) {
      if (s[i + k] < 0x80 || s[i + k] > 0xBF) return i;
    }
    i += len;
  }
  return n;
}

inline void throw_format_error(const std::string& label, const std::string& rule) {
  throw format_error(cat("safetensors file '", label, "': ", rule));
}

inline void require_writable(dtype type) {
  if (!is_writable_from_real(type)) {
    throw dtype_error(cat("cannot write ", dtype_name(type),
                          " from floating-point values (the writer converts to F64, F32, F16 or BF16; use add_raw "
                          "for other dtypes)"));
  }
}

inline bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) noexcept {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  out = a * b;
  return true;
}

inline std::string shape_to_string(const std::vector<std::int64_t>& shape) {
  std::string out = "[";
  for (std::size_t k = 0; k < shape.size(); ++k) out += (k ? ", " : "") + std::to_string(shape[k]);
  return out + "]";
}

inline bool checked_byte_size(dtype type, const std::vector<std::int64_t>& shape, std::uint64_t& out) noexcept {
  std::uint64_t n = 1;
  for (std::int64_t d : shape) {
    if (d < 0 || !checked_mul(n, static_cast<std::uint64_t>(d), n)) return false;
  }
  return checked_mul(n, dtype_size(type), out);
}

inline std::vector<tensor_info> plan_layout(const std::vector<tensor_spec>& specs, const std::string& who) {
  std::vector<tensor_info> layout;
  layout.reserve(specs.size());
  std::unordered_set<std::string> seen;
  std::uint64_t offset = 0;
  for (const tensor_spec& spec : specs) {
    if (spec.name == "__metadata__") throw name_error(cat(who, ": '__metadata__' is reserved, not a tensor name"));
    if (utf8_error_offset(reinterpret_cast<const unsigned char*>(spec.name.data()), spec.name.size()) !=
        spec.name.size()) {
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

template <typename Derived, typename Sink>
void encode_row_major(const Eigen::MatrixBase<Derived>& values, dtype type, Sink&& sink) {
  using Scalar = typename Derived::Scalar;
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "lora::io writes float or double matrices");
  require_writable(type);
  // Bind without copying when `values` already lies in memory in its own storage order (a matrix,
  // block, map or transpose); any other expression is evaluated once into the Ref's own matrix.
  constexpr int order = Derived::IsRowMajor ? Eigen::RowMajor : Eigen::ColMajor;
  using plain = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, order>;
  const Eigen::Ref<const plain, 0, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>> m(values.derived());
  const std::size_t total = static_cast<std::size_t>(m.rows()) * static_cast<std::size_t>(m.cols());
  const std::size_t step = std::max<std::size_t>(1, std::min(total, chunk_bytes / sizeof(Scalar)));
  std::vector<Scalar> buffer(std::min(total, step));
  std::vector<unsigned char> bytes(buffer.size() * dtype_size(type));
  std::size_t filled = 0;
  auto flush = [&] {
    encode<Scalar>(type, buffer.data(), filled, bytes.data());
    sink(bytes.data(), filled * dtype_size(type));
    filled = 0;
  };
  for (index i = 0; i < m.rows(); ++i) {
    for (index j = 0; j < m.cols(); ++j) {
      buffer[filled++] = m(i, j);
      if (filled == buffer.size()) flush();
    }
  }
  if (filled != 0) flush();
}

// --- file_storage ------------------------------------------------------------------------------------

inline std::shared_ptr<const file_storage> file_storage::open(const std::string& path, read_mode mode) {
  // O_NONBLOCK so that opening a FIFO cannot block; it has no effect on regular files.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    throw io_error(cat("cannot open safetensors file '", path, "': ", std::strerror(err)));
  }
  std::shared_ptr<file_storage> storage(new file_storage());
  storage->m_fd = fd;  // closed by the destructor from here on
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    throw io_error(cat("cannot stat safetensors file '", path, "': ", std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) throw io_error(cat("safetensors file '", path, "' is not a regular file"));
  storage->m_size = static_cast<std::uint64_t>(st.st_size);
  if (mode == read_mode::map && storage->m_size >= 8 &&
      storage->m_size <= static_cast<std::uint64_t>(std::numeric_limits<std::size_t>::max())) {
    const std::size_t length = static_cast<std::size_t>(storage->m_size);
    void* map = ::mmap(nullptr, length, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map != MAP_FAILED) {
      storage->m_map = map;
      storage->m_map_size = length;
      storage->m_data = static_cast<const unsigned char*>(map);
      ::close(fd);  // the mapping keeps the file alive
      storage->m_fd = -1;
    }
  }
  return storage;
}

inline std::shared_ptr<const file_storage> file_storage::from_bytes(std::vector<unsigned char> bytes) {
  std::shared_ptr<file_storage> storage(new file_storage());
  storage->m_bytes = std::move(bytes);
  storage->m_size = storage->m_bytes.size();
  static const unsigned char empty = 0;
  storage->m_data = storage->m_bytes.empty() ? &empty : storage->m_bytes.data();
  return storage;
}

inline file_storage::~file_storage() {
  if (m_map != nullptr) ::munmap(m_map, m_map_size);
  if (m_fd >= 0) ::close(m_fd);
}

inline void file_storage::read(std::uint64_t offset, std::size_t n, unsigned char* dst,
                               const std::string& label) const {
  LORA_ASSERT(offset <= m_size && n <= m_size - offset);
  if (m_data != nullptr) {
    if (n != 0) std::memcpy(dst, m_data + offset, n);
    return;
  }
  std::size_t done = 0;
  while (done < n) {
    const ssize_t got = ::pread(m_fd, dst + done, n - done, static_cast<off_t>(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      const int err = errno;
      throw io_error(cat("cannot read safetensors file '", label, "' at byte ", offset + done, ": ",
                         got == 0 ? "unexpected end of file (was it truncated while open?)" : std::strerror(err)));
    }
    done += static_cast<std::size_t>(got);
  }
}

// --- parse_header ------------------------------------------------------------------------------------

// The accepted header is a JSON object mapping "__metadata__" to an object of strings and every other
// key (a tensor name) to an object with at least "dtype" (a known dtype name), "shape" (an array of
// non-negative integers) and "data_offsets" (an array of two non-negative integers). Other members of
// a tensor entry are ignored, as serde does in the reference. Beyond the reference: duplicate keys
// (which serde would silently collapse), nesting deeper than max_header_depth, raw NUL bytes, and
// dimensions above 2^63 - 1 are rejected. Memory: the parsed DOM costs a small multiple of N (itself
// at most 100 MB and never more than the file holds); nothing is sized from a number in the header.
inline parsed_header parse_header(const file_storage& storage, const std::string& label) {
  using json = nlohmann::json;
  const auto fail = [&label](const std::string& rule) { throw_format_error(label, rule); };
  const auto fail_tensor = [&label](const std::string& name, const std::string& rule) {
    throw_format_error(label, cat("tensor '", name, "': ", rule));
  };
  const std::uint64_t file_size = storage.size();
  if (file_size < 8) {
    fail(cat("file is ", file_size, " bytes, shorter than the 8-byte header length"));
  }
  unsigned char prefix[8];
  storage.read(0, 8, prefix, label);
  const std::uint64_t n = load_le<std::uint64_t>(prefix);
  if (n > max_header_size) fail(cat("header length ", n, " exceeds the limit of ", max_header_size, " bytes"));
  if (n > file_size - 8) {
    fail(cat("header length ", n, " runs past the end of the file (8 + ", n, " > ", file_size, " bytes)"));
  }

  // The header bytes: in place when mapped, else read now (n is bounded and inside the file).
  std::vector<unsigned char> header_copy;
  const unsigned char* header = storage.data() != nullptr ? storage.data() + 8 : nullptr;
  if (header == nullptr) {
    header_copy.resize(static_cast<std::size_t>(n));
    storage.read(8, header_copy.size(), header_copy.data(), label);
    header = header_copy.data();
  }
  const std::size_t header_size = static_cast<std::size_t>(n);
  const std::size_t bad = utf8_error_offset(header, header_size);
  if (bad != header_size) fail(cat("header is not valid UTF-8 (byte ", 8 + bad, " of the file)"));
  // nlohmann/json stops at a NUL byte as if the input ended there, which would let anything follow
  // it; no JSON text contains a raw NUL, so reject it here.
  if (const void* nul = header_size != 0 ? std::memchr(header, 0, header_size) : nullptr) {
    fail(cat("header is not valid JSON: NUL byte at byte ", 8 + (static_cast<const unsigned char*>(nul) - header),
             " of the file"));
  }

  // Parse, rejecting duplicate keys (which the DOM would collapse) and excessive depth as they arrive.
  std::vector<std::unordered_set<std::string>> open_objects;
  std::string current_entry;
  const json::parser_callback_t watch = [&](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth >= max_header_depth) fail(cat("header nests deeper than ", max_header_depth, " levels"));
        if (event == json::parse_event_t::object_start) open_objects.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case json::parse_event_t::key: {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (!open_objects.empty() && !open_objects.back().insert(key).second) {
          if (depth == 1) fail(cat("duplicate tensor name '", key, "' in the header"));
          fail_tensor(current_entry, cat("duplicate key '", key, "' in its header entry"));
        }
        if (depth == 1) current_entry = key;
        break;
      }
      default:
        break;
    }
    return true;
  };
  json root;
  try {
    root = json::parse(reinterpret_cast<const char*>(header), reinterpret_cast<const char*>(header) + header_size,
                       watch, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const json::exception& e) {
    fail(cat("header is not valid JSON: ", e.what()));
  }
  if (!root.is_object()) fail(cat("header is not a JSON object (it is ", root.type_name(), ")"));

  // A non-negative integer that fits 64 bits ("-0" included, as serde accepts it); no floats.
  const auto as_u64 = [](const json& v, std::uint64_t& out) {
    if (v.is_number_unsigned()) {
      out = v.get<std::uint64_t>();
      return true;
    }
    if (v.is_number_integer() && v.get<std::int64_t>() >= 0) {
      out = static_cast<std::uint64_t>(v.get<std::int64_t>());
      return true;
    }
    return false;
  };

  parsed_header result;
  result.data_offset = 8 + n;
  result.tensors.reserve(root.size());
  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object())
        fail(cat("__metadata__ is not a JSON object mapping strings to strings (it is ", entry.type_name(), ")"));
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) {
          fail(cat("__metadata__ is not a map of strings to strings: the value of '", key, "' is a ",
                   value.type_name()));
        }
        result.metadata.emplace(key, value.get<std::string>());
      }
      continue;
    }
    if (!entry.is_object()) fail_tensor(name, cat("header entry is not a JSON object (it is ", entry.type_name(), ")"));
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(field)) fail_tensor(name, cat("header entry is missing field '", field, "'"));
    }
    tensor_info t;
    t.name = name;
    const json& type = entry.at("dtype");
    if (!type.is_string()) fail_tensor(name, cat("field 'dtype' is not a string (it is ", type.type_name(), ")"));
    try {
      t.type = parse_dtype(type.get_ref<const std::string&>());
    } catch (const format_error&) {
      fail_tensor(name, cat("unknown dtype '", type.get_ref<const std::string&>(), "'"));
    }
    const json& shape = entry.at("shape");
    if (!shape.is_array()) fail_tensor(name, cat("field 'shape' is not an array (it is ", shape.type_name(), ")"));
    t.shape.reserve(shape.size());
    for (const json& d : shape) {
      std::uint64_t dim = 0;
      if (d.is_number_integer() && !d.is_number_unsigned() && d.get<std::int64_t>() < 0) {
        fail_tensor(name, cat("negative dimension ", d.get<std::int64_t>(), " in shape ", shape.dump()));
      }
      if (!as_u64(d, dim)) fail_tensor(name, cat("shape ", shape.dump(), " holds a non-integer (", d.dump(), ")"));
      if (dim > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
        fail_tensor(name, cat("dimension ", dim, " in shape ", shape.dump(), " is larger than 2^63 - 1"));
      }
      t.shape.push_back(static_cast<std::int64_t>(dim));
    }
    const json& offsets = entry.at("data_offsets");
    if (!offsets.is_array() || offsets.size() != 2 || !as_u64(offsets[0], t.begin) || !as_u64(offsets[1], t.end)) {
      fail_tensor(name, cat("field 'data_offsets' is not an array [begin, end] of two non-negative integers (it is ",
                            offsets.dump(), ")"));
    }
    if (t.end < t.begin) fail_tensor(name, cat("data_offsets end ", t.end, " is before begin ", t.begin));
    std::uint64_t bytes = 0;
    if (!checked_byte_size(t.type, t.shape, bytes)) {
      fail_tensor(name, cat("element count of shape ", shape.dump(), " times the ", dtype_size(t.type),
                            "-byte size of ", dtype_name(t.type), " overflows 64 bits"));
    }
    if (t.end - t.begin != bytes) {
      fail_tensor(name, cat("data_offsets [", t.begin, ", ", t.end, "] span ", t.end - t.begin, " bytes but shape ",
                            shape.dump(), " of ", dtype_name(t.type), " needs ", bytes, " bytes"));
    }
    result.tensors.push_back(std::move(t));
  }

  // The tensors must tile the data area [0, file_size - 8 - n) exactly.
  std::sort(result.tensors.begin(), result.tensors.end(), [](const tensor_info& a, const tensor_info& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  std::uint64_t expected = 0;
  for (std::size_t k = 0; k < result.tensors.size(); ++k) {
    const tensor_info& t = result.tensors[k];
    if (t.begin > expected) {
      if (k == 0) {
        fail_tensor(t.name, cat("data_offsets begin at ", t.begin, " but the first tensor must begin at 0 (a hole)"));
      }
      fail_tensor(t.name,
                  cat("data_offsets begin at ", t.begin, " but the previous tensor '", result.tensors[k - 1].name,
                      "' ends at ", expected, " (a hole of ", t.begin - expected, " bytes)"));
    }
    if (t.begin < expected) {
      fail_tensor(t.name, cat("data_offsets [", t.begin, ", ", t.end, "] overlap the previous tensor '",
                              result.tensors[k - 1].name, "', which ends at ", expected));
    }
    expected = t.end;
  }
  const std::uint64_t data_size = file_size - 8 - n;
  if (expected != data_size) {
    fail(cat("the tensors end at byte ", expected, " of the data area but the data area holds ", data_size,
             " bytes (the data must end exactly at the end of the file)"));
  }
  return result;
}

// --- atomic_file ---------------------------------------------------------------------------------------

inline atomic_file::atomic_file(std::string target) : m_target(std::move(target)) {
  const std::size_t slash = m_target.find_last_of('/');
  const std::string base = slash == std::string::npos ? m_target : m_target.substr(slash + 1);
  m_dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : m_target.substr(0, slash));
  if (base.empty() || base == "." || base == "..") {
    throw io_error(cat("cannot write '", m_target, "': not a file path"));
  }
  static std::atomic<unsigned long> counter{0};
  for (int attempt = 0; attempt < 100; ++attempt) {
    m_temp = cat(m_dir, "/.", base, ".tmp.", static_cast<long>(::getpid()), ".", counter.fetch_add(1));
    m_fd = ::open(m_temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (m_fd >= 0) return;
    if (errno != EEXIST) break;
  }
  const int err = errno;
  const std::string temp = m_temp;
  m_temp.clear();
  throw io_error(cat("cannot create temporary file '", temp, "' to write '", m_target, "': ", std::strerror(err)));
}

inline void atomic_file::fail(const std::string& what, int err) {
  discard();
  throw io_error(cat("cannot write '", m_target, "': ", what, ": ", std::strerror(err),
                     " (the temporary file was removed; the target is unchanged)"));
}

inline void atomic_file::write_at(std::uint64_t offset, const unsigned char* data, std::size_t size) {
  if (m_fd < 0) throw io_error(cat("cannot write '", m_target, "': the file was already committed or discarded"));
  std::size_t done = 0;
  while (done < size) {
    const ssize_t put = ::pwrite(m_fd, data + done, size - done, static_cast<off_t>(offset + done));
    const int err = put == 0 ? ENOSPC : errno;  // pwrite returns 0 only when nothing fits
    if (put < 0 && err == EINTR) continue;
    if (put <= 0) fail(cat("write of ", size - done, " bytes at byte ", offset + done, " failed"), err);
    done += static_cast<std::size_t>(put);
  }
}

inline void atomic_file::commit() {
  if (m_fd < 0) throw io_error(cat("cannot write '", m_target, "': the file was already committed or discarded"));
  if (::fsync(m_fd) != 0) {
    const int err = errno;
    fail("fsync failed", err);
  }
  const int fd = m_fd;
  m_fd = -1;
  if (::close(fd) != 0) {
    const int err = errno;
    fail("close failed", err);
  }
  if (::rename(m_temp.c_str(), m_target.c_str()) != 0) {
    const int err = errno;
    fail(cat("rename from '", m_temp, "' failed"), err);
  }
  m_done = true;
  // Make the rename itself durable. Best effort: some file systems refuse to fsync a directory.
  const int dir = ::open(m_dir.c_str(), O_RDONLY | O_CLOEXEC);
  if (dir >= 0) {
    (void)::fsync(dir);
    ::close(dir);
  }
}

inline void atomic_file::discard() noexcept {
  if (m_fd >= 0) {
    ::close(m_fd);
    m_fd = -1;
  }
  if (!m_done && !m_temp.empty()) {
    ::unlink(m_temp.c_str());
    m_done = true;
  }
}

}  // namespace detail

// --- safetensors_file ------------------------------------------------------------------------------------

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
  tensor_bytes out;
  out.m_size = static_cast<std::size_t>(t.byte_size());
  if (const unsigned char* data = m_storage->data()) {
    out.m_owner = m_storage;
    out.m_data = data + m_data_offset + t.begin;
    return out;
  }
  auto copy = std::make_shared<std::vector<unsigned char>>(out.m_size);
  m_storage->read(m_data_offset + t.begin, out.m_size, copy->data(), m_label);
  out.m_data = copy->data();
  out.m_owner = std::move(copy);
  return out;
}

// --- writers -------------------------------------------------------------------------------------------------

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
  m_file = std::make_unique<detail::atomic_file>(path);
  unsigned char prefix[8];
  detail::store_le<std::uint64_t>(header.size(), prefix);
  m_file->write_at(0, prefix, 8);
  m_file->write_at(8, reinterpret_cast<const unsigned char*>(header.data()), header.size());
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
  if (detail::utf8_error_offset(reinterpret_cast<const unsigned char*>(name.data()), name.size()) != name.size()) {
    throw name_error(detail::cat("safetensors writer: tensor name '", name, "' is not valid UTF-8"));
  }
  if (m_names.count(name) != 0) throw name_error(detail::cat("safetensors writer: duplicate tensor name '", name, "'"));
}

template <typename Derived>
safetensors_writer& safetensors_writer::add(const std::string& name, const Eigen::MatrixBase<Derived>& values,
                                            dtype type) {
  std::vector<std::int64_t> shape;
  if constexpr (Derived::IsVectorAtCompileTime) {
    shape = {static_cast<std::int64_t>(values.size())};
  } else {
    shape = {static_cast<std::int64_t>(values.rows()), static_cast<std::int64_t>(values.cols())};
  }
  return add(name, values, type, std::move(shape));
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
      if (detail::utf8_error_offset(reinterpret_cast<const unsigned char*>(s->data()), s->size()) != s->size()) {
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
