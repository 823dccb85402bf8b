// lora/io/checkpoint.hpp: training checkpoints: parameter values by name, optimizer state, the step,
// named RNG states and user strings, in one self-checking binary file. Needs only the standard library,
// Eigen and POSIX (no JSON).
//
// File layout, version 1 (every integer little-endian, every scalar IEEE-754 little-endian):
//
//   offset  size  field
//   0       8     magic "LORACKPT"
//   8       4     u32 format version (1)
//   12      4     u32 bytes per scalar: 4 (float) or 8 (double), for every tensor in the file
//   16      8     u64 size of the whole file in bytes, this header and the trailer included
//   24      ...   payload:
//                   i64 step
//                   u32 P, then P x { str name, u64 rows, u64 cols, rows*cols scalars (storage order) }
//                   u8  1 if optimizer state follows, else 0
//                       { str kind, i64 optimizer step, f64 lr, u32 T, T x { str name, u64 n, n scalars } }
//                   u32 R, then R x { str name, 4 x u64 (lora::rng::state_type) }
//                   u32 M, then M x { str key, str value }
//   end-4   4     u32 CRC-32 (IEEE 802.3, zlib's crc32) of every byte before it
//
// where str is a u32 byte count followed by the bytes. Saving goes through write_file_atomically
// (io/atomic_file.hpp): a temporary file in the target's directory, fsynced, then renamed over the
// target, so a crash or an error leaves either the old file or the new one. Loading reads the whole
// file and checks size, magic, version, checksum and every length against the bytes that remain
// before it allocates or writes anything; then it checks names and shapes against the given
// parameters and optimizer, and only then writes.
#pragma once

#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <string>
#include <system_error>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../error.hpp"
#include "../optim/optimizer.hpp"
#include "../parameter.hpp"
#include "../random.hpp"
#include "atomic_file.hpp"

namespace lora::io {

/// What a checkpoint holds besides the parameter values and the optimizer state.
struct checkpoint_info {
  std::int64_t step = 0;                        ///< The training loop's own step counter.
  std::map<std::string, rng::state_type> rngs;  ///< Named RNG states: {"data", sampler.state()}.
  std::map<std::string, std::string> metadata;  ///< Free-form strings (run name, config, ...).
};

/// Saves parameter values (by name) and `info` to `path`, atomically. Throws name_error, shape_error
/// or config_error for an invalid parameter list (or a count or string beyond 32 bits), io_error when
/// the file cannot be written (the old file, if any, is then untouched and no temporary file is left).
template <typename Scalar>
void save_checkpoint(const std::string& path, const parameter_list<Scalar>& params, const checkpoint_info& info);

/// Saves the optimizer's parameters (opt.parameters()), its state and `info`, as above.
template <typename Scalar>
void save_checkpoint(const std::string& path, const optim::optimizer<Scalar>& opt, const checkpoint_info& info);

/// Loads parameter values from `path` into `params` (matched by name; any optimizer state in the
/// file is ignored) and returns the rest. Throws io_error when the file cannot be read, format_error
/// when it is truncated or corrupted, dtype_error when it holds another scalar type, name_error when
/// the names differ (either way), shape_error when a shape differs. Nothing is written unless
/// everything checks out.
template <typename Scalar>
checkpoint_info load_checkpoint(const std::string& path, const parameter_list<Scalar>& params);

/// Loads the parameters of `opt` and its state, all or nothing, as above; name_error also when the
/// file has no optimizer state or state of another kind.
template <typename Scalar>
checkpoint_info load_checkpoint(const std::string& path, optim::optimizer<Scalar>& opt);

}  // namespace lora::io

namespace lora::io::detail {

using lora::detail::cat;
using lora::detail::check_parameters;
using lora::detail::shape_str;

/// CRC-32 as zlib's crc32(crc, data, n): reflected polynomial 0xEDB88320, pre- and post-inverted,
/// chainable: crc32(b, crc32(a)) == crc32(a followed by b). crc32("123456789") == 0xCBF43926.
inline std::uint32_t crc32(const void* data, std::size_t n, std::uint32_t crc = 0);

}  // namespace lora::io::detail

// ---------------------------------------------------------------------------------------------------

namespace lora::io::detail {

inline constexpr char checkpoint_magic[8] = {'L', 'O', 'R', 'A', 'C', 'K', 'P', 'T'};
inline constexpr std::uint32_t checkpoint_version = 1;
inline constexpr std::size_t checkpoint_header_bytes = 24;  // magic, version, scalar size, file size
inline constexpr std::size_t checkpoint_trailer_bytes = 4;  // CRC-32

inline constexpr std::array<std::uint32_t, 256> make_crc32_table() {
  std::array<std::uint32_t, 256> table{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
  return table;
}

inline constexpr std::array<std::uint32_t, 256> crc32_table = make_crc32_table();

inline std::uint32_t crc32(const void* data, std::size_t n, std::uint32_t crc) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (std::size_t i = 0; i < n; ++i) crc = crc32_table[(crc ^ bytes[i]) & 0xffu] ^ (crc >> 8);
  return ~crc;
}

inline bool host_is_little_endian() {
  const std::uint16_t one = 1;
  unsigned char first = 0;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

/// The unsigned integer with the bits of a float or double.
template <typename Scalar>
using scalar_bits = std::conditional_t<sizeof(Scalar) == 4, std::uint32_t, std::uint64_t>;

template <typename Scalar>
void check_checkpoint_scalar() {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>,
                "checkpoints store float or double tensors");
  static_assert(std::numeric_limits<Scalar>::is_iec559, "checkpoints need IEEE-754 scalars");
}

/// Where serialised bytes go: subclasses count them or write them. The helpers encode little-endian.
class byte_sink {
 public:
  virtual ~byte_sink() = default;
  virtual void put(const void* data, std::size_t n) = 0;

  void u8(std::uint8_t v) { put(&v, 1); }
  void u32(std::uint32_t v) { uint_le(v, 4); }
  void u64(std::uint64_t v) { uint_le(v, 8); }
  void i64(std::int64_t v) { u64(static_cast<std::uint64_t>(v)); }
  void f64(double v) {
    std::uint64_t bits;
    std::memcpy(&bits, &v, 8);
    u64(bits);
  }
  /// A record count or string length: u32, so config_error beyond 2^32 - 1.
  void count(std::size_t n, const char* what) {
    if (n > std::numeric_limits<std::uint32_t>::max()) {
      throw config_error(cat("checkpoint: ", what, " (", n, ") exceeds the format's 32-bit limit"));
    }
    u32(static_cast<std::uint32_t>(n));
  }
  /// u32 byte count, then the bytes.
  void str(const std::string& s) {
    count(s.size(), "the length of a name or metadata string");
    put(s.data(), s.size());
  }
  /// n scalars, little-endian: one put on little-endian hosts.
  template <typename Scalar>
  void scalars(const Scalar* p, std::size_t n) {
    if (host_is_little_endian()) {
      put(p, n * sizeof(Scalar));
      return;
    }
    for (std::size_t i = 0; i < n; ++i) {
      scalar_bits<Scalar> bits;
      std::memcpy(&bits, p + i, sizeof(Scalar));
      uint_le(bits, sizeof(Scalar));
    }
  }

 private:
  void uint_le(std::uint64_t v, std::size_t bytes) {
    unsigned char b[8];
    for (std::size_t i = 0; i < bytes; ++i) b[i] = static_cast<unsigned char>(v >> (8 * i));
    put(b, bytes);
  }
};

/// Counts bytes: the first pass of a save, which learns the file size that the header records.
class byte_counter : public byte_sink {
 public:
  void put(const void*, std::size_t n) override { m_count += n; }
  std::uint64_t count() const noexcept { return m_count; }

 private:
  std::uint64_t m_count = 0;
};

/// Writes to the file being saved and keeps the CRC-32 of everything written; io_error on failure.
class crc_file_sink : public byte_sink {
 public:
  explicit crc_file_sink(file_sink& file) : m_file(file) {}
  void put(const void* data, std::size_t n) override {
    if (n == 0) return;
    m_file.write(data, n);
    m_crc = crc32(data, n, m_crc);
  }
  std::uint32_t crc() const noexcept { return m_crc; }

 private:
  file_sink& m_file;
  std::uint32_t m_crc = 0;
};

/// Reads little-endian fields from a byte range, checking each length against what remains first,
/// so a corrupted count can neither read past the end nor make anything allocate more than the file.
class byte_reader {
 public:
  byte_reader(const unsigned char* data, std::size_t size, const std::string& who)
      : m_pos(data), m_end(data + size), m_who(who) {}

  std::size_t remaining() const noexcept { return static_cast<std::size_t>(m_end - m_pos); }

  /// The next n bytes; format_error naming `what` if fewer remain.
  const unsigned char* take(std::size_t n, const char* what) {
    if (n > remaining()) {
      throw format_error(cat(m_who, " is corrupted: ", what, " needs ", n, " bytes but only ", remaining(), " remain"));
    }
    const unsigned char* p = m_pos;
    m_pos += n;
    return p;
  }
  std::uint8_t u8(const char* what) { return *take(1, what); }
  std::uint32_t u32(const char* what) { return static_cast<std::uint32_t>(uint_le(take(4, what), 4)); }
  std::uint64_t u64(const char* what) { return uint_le(take(8, what), 8); }
  std::int64_t i64(const char* what) { return static_cast<std::int64_t>(u64(what)); }
  double f64(const char* what) {
    const std::uint64_t bits = u64(what);
    double v;
    std::memcpy(&v, &bits, 8);
    return v;
  }
  std::string str(const char* what) {
    const std::uint32_t n = u32(what);
    const unsigned char* p = take(n, what);
    return std::string(reinterpret_cast<const char*>(p), n);
  }
  /// A count of records that each take at least min_record bytes, checked against what remains.
  std::uint32_t count(std::size_t min_record, const char* what) {
    const std::uint32_t n = u32(what);
    if (static_cast<std::uint64_t>(n) * min_record > remaining()) {
      throw format_error(
          cat(m_who, " is corrupted: ", n, " ", what, " cannot fit in the ", remaining(), " bytes that remain"));
    }
    return n;
  }
  /// The bytes of n scalars of `scalar_size` bytes, with the product checked for overflow.
  const unsigned char* tensor_bytes(std::uint64_t n, std::size_t scalar_size, const char* what) {
    if (n > remaining() / scalar_size) {
      throw format_error(
          cat(m_who, " is corrupted: ", what, " claims ", n, " elements but only ", remaining(), " bytes remain"));
    }
    return take(static_cast<std::size_t>(n) * scalar_size, what);
  }

  static std::uint64_t uint_le(const unsigned char* p, std::size_t bytes) {
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < bytes; ++i) v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
    return v;
  }

 private:
  const unsigned char* m_pos;
  const unsigned char* m_end;
  const std::string& m_who;
};

/// Decodes n little-endian scalars into out.
template <typename Scalar>
void decode_scalars(const unsigned char* bytes, std::size_t n, Scalar* out) {
  if (host_is_little_endian()) {
    if (n > 0) std::memcpy(out, bytes, n * sizeof(Scalar));
    return;
  }
  for (std::size_t i = 0; i < n; ++i) {
    const auto bits =
        static_cast<scalar_bits<Scalar>>(byte_reader::uint_le(bytes + i * sizeof(Scalar), sizeof(Scalar)));
    std::memcpy(out + i, &bits, sizeof(Scalar));
  }
}

/// A tensor of a parsed checkpoint: its data still points into the file's bytes.
struct checkpoint_tensor {
  std::string name;
  std::uint64_t rows = 0, cols = 0;
  const unsigned char* data = nullptr;
  std::uint64_t size() const noexcept { return rows * cols; }
};

/// Everything in a checkpoint file, validated against the format (not yet against any model).
struct parsed_checkpoint {
  std::size_t scalar_size = 0;
  checkpoint_info info;
  std::vector<checkpoint_tensor> params;
  bool has_optimizer = false;
  std::string optimizer_kind;
  std::int64_t optimizer_step = 0;
  double optimizer_lr = 0.0;
  std::vector<checkpoint_tensor> optimizer_tensors;  // cols == 1
};

inline std::string checkpoint_who(const std::string& path) { return cat("checkpoint '", path, "'"); }

/// Header and payload, in the layout above (the caller appends the CRC).
template <typename Scalar>
void write_checkpoint_body(byte_sink& out, const parameter_list<Scalar>& params, const optim::optimizer<Scalar>* opt,
                           const checkpoint_info& info, std::uint64_t file_size) {
  out.put(checkpoint_magic, sizeof checkpoint_magic);
  out.u32(checkpoint_version);
  out.u32(static_cast<std::uint32_t>(sizeof(Scalar)));
  out.u64(file_size);
  out.i64(info.step);
  out.count(params.size(), "the number of parameters");
  for (const auto& p : params) {
    out.str(p.name);
    out.u64(static_cast<std::uint64_t>(p.rows));
    out.u64(static_cast<std::uint64_t>(p.cols));
    out.scalars(p.value_data, static_cast<std::size_t>(p.size()));
  }
  out.u8(opt != nullptr ? 1 : 0);
  if (opt != nullptr) {
    out.str(opt->kind());
    out.i64(opt->step_count());
    out.f64(opt->lr());
    out.count(opt->state_tensor_count(), "the number of optimizer state tensors");
    for (std::size_t i = 0; i < opt->state_tensor_count(); ++i) {
      const auto& t = opt->state_tensor_data(i);
      out.str(opt->state_tensor_name(i));
      out.u64(static_cast<std::uint64_t>(t.size()));
      out.scalars(t.data(), static_cast<std::size_t>(t.size()));
    }
  }
  out.count(info.rngs.size(), "the number of RNG states");
  for (const auto& [name, state] : info.rngs) {
    out.str(name);
    for (const std::uint64_t word : state) out.u64(word);
  }
  out.count(info.metadata.size(), "the number of metadata entries");
  for (const auto& [key, value] : info.metadata) {
    out.str(key);
    out.str(value);
  }
}

template <typename Scalar>
void save_checkpoint_impl(const std::string& path, const parameter_list<Scalar>& params,
                          const optim::optimizer<Scalar>* opt, const checkpoint_info& info) {
  check_checkpoint_scalar<Scalar>();
  const std::string who = checkpoint_who(path);
  check_parameters(params, who);
  byte_counter counter;  // also refuses, before any file exists, what the format cannot record
  write_checkpoint_body(counter, params, opt, info, 0);
  const std::uint64_t file_size = counter.count() + checkpoint_trailer_bytes;
  write_file_atomically(path, [&](file_sink& file) {
    crc_file_sink sink(file);
    write_checkpoint_body(sink, params, opt, info, file_size);
    sink.u32(sink.crc());
  });
}

/// The whole file; io_error when it cannot be read.
inline std::vector<unsigned char> read_whole_file(const std::string& path) {
  const std::string who = checkpoint_who(path);
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) throw io_error(cat("cannot read ", who, ": it is a directory"));
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) throw io_error(cat("cannot open ", who, ": ", std::strerror(errno)));
  std::vector<unsigned char> bytes;
  unsigned char chunk[1 << 16];
  std::size_t got;
  while ((got = std::fread(chunk, 1, sizeof chunk, file)) > 0) bytes.insert(bytes.end(), chunk, chunk + got);
  const bool failed = std::ferror(file) != 0;
  std::fclose(file);
  if (failed) throw io_error(cat("cannot read ", who, ": ", std::strerror(errno)));
  return bytes;
}

/// Checks size, magic, version, recorded size and checksum; the scalar size.
inline std::size_t check_checkpoint_envelope(const std::vector<unsigned char>& bytes, const std::string& who) {
  constexpr std::size_t min_size = checkpoint_header_bytes + checkpoint_trailer_bytes;
  if (bytes.size() < min_size) {
    throw format_error(
        cat(who, " is truncated: ", bytes.size(), " bytes, fewer than the ", min_size, " of an empty checkpoint"));
  }
  if (std::memcmp(bytes.data(), checkpoint_magic, sizeof checkpoint_magic) != 0) {
    throw format_error(cat(who, " is not a lora checkpoint (its first 8 bytes are not \"LORACKPT\")"));
  }
  const std::uint32_t version = static_cast<std::uint32_t>(byte_reader::uint_le(bytes.data() + 8, 4));
  if (version != checkpoint_version) {
    throw format_error(cat(who, " has format version ", version, "; this library reads version ", checkpoint_version));
  }
  const std::uint64_t recorded = byte_reader::uint_le(bytes.data() + 16, 8);
  if (recorded != bytes.size()) {
    throw format_error(cat(who, recorded > bytes.size() ? " is truncated" : " is corrupted", ": its header records ",
                           recorded, " bytes, the file has ", bytes.size()));
  }
  const std::size_t body = bytes.size() - checkpoint_trailer_bytes;
  const auto stored_crc = static_cast<std::uint32_t>(byte_reader::uint_le(bytes.data() + body, 4));
  const std::uint32_t actual_crc = crc32(bytes.data(), body);
  if (stored_crc != actual_crc) {
    throw format_error(
        cat(who, " is corrupted: CRC-32 mismatch (stored 0x", std::hex, stored_crc, ", computed 0x", actual_crc, ")"));
  }
  const auto scalar_size = static_cast<std::size_t>(byte_reader::uint_le(bytes.data() + 12, 4));
  if (scalar_size != 4 && scalar_size != 8) {
    throw format_error(cat(who, " is corrupted: scalar size ", scalar_size, " is neither 4 nor 8"));
  }
  return scalar_size;
}

/// format_error unless every tensor of `list` has its own name.
inline void check_unique_names(const std::vector<checkpoint_tensor>& list, const char* what, const std::string& who) {
  std::unordered_map<std::string, std::size_t> seen;
  for (const auto& t : list) {
    if (!seen.emplace(t.name, 0).second) throw format_error(cat(who, " is corrupted: ", what, " '", t.name, "' twice"));
  }
}

/// u32 P, then P x { str name, u64 rows, u64 cols, rows*cols scalars }.
inline void read_checkpoint_params(byte_reader& in, parsed_checkpoint& out, const std::string& who) {
  const std::uint32_t n_params = in.count(4 + 16, "parameters");
  for (std::uint32_t i = 0; i < n_params; ++i) {
    checkpoint_tensor t;
    t.name = in.str("a parameter name");
    t.rows = in.u64("a parameter's rows");
    t.cols = in.u64("a parameter's columns");
    if (t.rows != 0 && t.cols > std::numeric_limits<std::uint64_t>::max() / t.rows) {
      throw format_error(cat(who, " is corrupted: parameter '", t.name, "' has an impossible shape"));
    }
    t.data = in.tensor_bytes(t.size(), out.scalar_size, "a parameter's values");
    out.params.push_back(std::move(t));
  }
  check_unique_names(out.params, "parameter", who);
}

/// u8 flag, then { str kind, i64 step, f64 lr, u32 T, T x { str name, u64 n, n scalars } } when 1.
inline void read_checkpoint_optimizer(byte_reader& in, parsed_checkpoint& out, const std::string& who) {
  const std::uint8_t has_optimizer = in.u8("the optimizer flag");
  if (has_optimizer > 1) throw format_error(cat(who, " is corrupted: optimizer flag ", int{has_optimizer}));
  out.has_optimizer = has_optimizer == 1;
  if (!out.has_optimizer) return;
  out.optimizer_kind = in.str("the optimizer kind");
  out.optimizer_step = in.i64("the optimizer step");
  out.optimizer_lr = in.f64("the optimizer lr");
  const std::uint32_t n_state = in.count(4 + 8, "optimizer state tensors");
  for (std::uint32_t i = 0; i < n_state; ++i) {
    checkpoint_tensor t;
    t.name = in.str("an optimizer state name");
    t.rows = in.u64("an optimizer state size");
    t.cols = 1;
    t.data = in.tensor_bytes(t.rows, out.scalar_size, "an optimizer state tensor");
    out.optimizer_tensors.push_back(std::move(t));
  }
  check_unique_names(out.optimizer_tensors, "optimizer state tensor", who);
}

/// u32 R, then R x { str name, 4 x u64 }; u32 M, then M x { str key, str value }.
inline void read_checkpoint_info(byte_reader& in, checkpoint_info& info, const std::string& who) {
  const std::uint32_t n_rngs = in.count(4 + 32, "RNG states");
  for (std::uint32_t i = 0; i < n_rngs; ++i) {
    std::string name = in.str("an RNG name");
    rng::state_type state;
    for (auto& word : state) word = in.u64("an RNG state");
    if (!info.rngs.emplace(std::move(name), state).second) {
      throw format_error(cat(who, " is corrupted: an RNG name appears twice"));
    }
  }
  const std::uint32_t n_meta = in.count(4 + 4, "metadata entries");
  for (std::uint32_t i = 0; i < n_meta; ++i) {
    std::string key = in.str("a metadata key");
    std::string value = in.str("a metadata value");
    if (!info.metadata.emplace(std::move(key), std::move(value)).second) {
      throw format_error(cat(who, " is corrupted: a metadata key appears twice"));
    }
  }
}

/// Checks the envelope (check_checkpoint_envelope), then parses every field with bounds checks;
/// format_error on any violation.
inline parsed_checkpoint parse_checkpoint(const std::vector<unsigned char>& bytes, const std::string& who) {
  parsed_checkpoint out;
  out.scalar_size = check_checkpoint_envelope(bytes, who);
  const std::size_t body = bytes.size() - checkpoint_trailer_bytes;
  byte_reader in(bytes.data() + checkpoint_header_bytes, body - checkpoint_header_bytes, who);
  out.info.step = in.i64("the step");
  read_checkpoint_params(in, out, who);
  read_checkpoint_optimizer(in, out, who);
  read_checkpoint_info(in, out.info, who);
  if (in.remaining() != 0) {
    throw format_error(cat(who, " is corrupted: ", in.remaining(), " unexpected bytes after the metadata"));
  }
  return out;
}

/// The file's tensor for each given parameter, in the order given: name_error when a name is missing
/// on either side, shape_error when a shape differs.
template <typename Scalar>
std::vector<const checkpoint_tensor*> match_checkpoint_params(const parsed_checkpoint& file,
                                                              const parameter_list<Scalar>& params,
                                                              const std::string& who) {
  std::unordered_map<std::string, const checkpoint_tensor*> by_name;
  for (const auto& t : file.params) by_name.emplace(t.name, &t);
  std::vector<const checkpoint_tensor*> source;
  source.reserve(params.size());
  for (const auto& p : params) {
    const auto it = by_name.find(p.name);
    if (it == by_name.end()) throw name_error(cat(who, " has no parameter '", p.name, "'"));
    const checkpoint_tensor& t = *it->second;
    if (t.rows != static_cast<std::uint64_t>(p.rows) || t.cols != static_cast<std::uint64_t>(p.cols)) {
      throw shape_error(cat(who, ": parameter '", p.name, "' is ", t.rows, "x", t.cols, " in the file but ",
                            shape_str(p.rows, p.cols), " in the model"));
    }
    source.push_back(&t);
  }
  if (file.params.size() == params.size()) return source;
  std::unordered_map<std::string, int> given;
  for (const auto& p : params) given.emplace(p.name, 0);
  for (const auto& t : file.params) {
    if (given.count(t.name) == 0) {
      throw name_error(
          cat(who, " holds parameter '", t.name, "', which is not among the ", params.size(), " parameters given"));
    }
  }
  return source;
}

/// The optimizer state of the file, decoded and checked by `opt`.
template <typename Scalar>
optim::optimizer_state<Scalar> read_optimizer_state(const parsed_checkpoint& file, const optim::optimizer<Scalar>& opt,
                                                    const std::string& who) {
  if (!file.has_optimizer) {
    throw name_error(cat(who, " holds no optimizer state, but a '", opt.kind(), "' optimizer was given"));
  }
  optim::optimizer_state<Scalar> state;
  state.kind = file.optimizer_kind;
  state.step = file.optimizer_step;
  state.lr = file.optimizer_lr;
  state.tensors.reserve(file.optimizer_tensors.size());
  for (const auto& t : file.optimizer_tensors) {
    vector<Scalar> data(static_cast<index>(t.rows));
    decode_scalars(t.data, static_cast<std::size_t>(t.rows), data.data());
    state.tensors.push_back({t.name, std::move(data)});
  }
  opt.check_state(state);
  return state;
}

template <typename Scalar>
checkpoint_info load_checkpoint_impl(const std::string& path, const parameter_list<Scalar>& params,
                                     optim::optimizer<Scalar>* opt) {
  check_checkpoint_scalar<Scalar>();
  const std::string who = checkpoint_who(path);
  check_parameters(params, who);
  const std::vector<unsigned char> bytes = read_whole_file(path);
  parsed_checkpoint file = parse_checkpoint(bytes, who);
  if (file.scalar_size != sizeof(Scalar)) {
    throw dtype_error(cat(who, " holds ", 8 * file.scalar_size, "-bit floating-point tensors, the parameters are ",
                          8 * sizeof(Scalar), "-bit"));
  }
  const std::vector<const checkpoint_tensor*> source = match_checkpoint_params(file, params, who);
  optim::optimizer_state<Scalar> state;
  if (opt != nullptr) state = read_optimizer_state(file, *opt, who);

  // Everything matches: write.
  for (std::size_t k = 0; k < params.size(); ++k) {
    decode_scalars(source[k]->data, static_cast<std::size_t>(params[k].size()), params[k].value_data);
  }
  if (opt != nullptr) opt->load_state(state);
  return std::move(file.info);
}

}  // namespace lora::io::detail

namespace lora::io {

template <typename Scalar>
void save_checkpoint(const std::string& path, const parameter_list<Scalar>& params, const checkpoint_info& info) {
  detail::save_checkpoint_impl<Scalar>(path, params, nullptr, info);
}

template <typename Scalar>
void save_checkpoint(const std::string& path, const optim::optimizer<Scalar>& opt, const checkpoint_info& info) {
  detail::save_checkpoint_impl<Scalar>(path, opt.parameters(), &opt, info);
}

template <typename Scalar>
checkpoint_info load_checkpoint(const std::string& path, const parameter_list<Scalar>& params) {
  return detail::load_checkpoint_impl<Scalar>(path, params, nullptr);
}

template <typename Scalar>
checkpoint_info load_checkpoint(const std::string& path, optim::optimizer<Scalar>& opt) {
  return detail::load_checkpoint_impl<Scalar>(path, opt.parameters(), &opt);
}

}  // namespace lora::io
