// lora/io/file_storage.hpp: the bytes of a tensor file, memory-mapped (POSIX mmap: read-only, or
// private copy-on-write) or, where mapping fails or is not wanted, reached through bounded pread()
// calls. Taking one tensor from a multi-GB mapped file touches only that tensor's pages. A file
// truncated or rewritten in place by another process while it is mapped can raise SIGBUS, and a
// private mapping shows such a rewrite in the pages it has not copied yet: that is the one hazard of
// mmap no reader can rule out; this library's writers never rewrite in place (io/atomic_file.hpp).
//
// POSIX only (Linux, macOS).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"

namespace lora::io {

/// How safetensors_file::open reaches the data.
enum class read_mode {
  map,    ///< Memory-map the file; fall back to pread when mmap fails. The default.
  pread,  ///< Never map; read each tensor with bounded pread() calls when asked for it.
  /// Memory-map the file privately with write permission (MAP_PRIVATE, PROT_READ | PROT_WRITE); fall
  /// back to pread when mmap fails. The bytes read as with `map`, but a caller that owns the mapping
  /// (it keeps the safetensors_file, or a tensor_bytes, alive) may write through the pointers of
  /// safetensors_file::raw: the kernel copies each page on its first write, so the file never
  /// changes and untouched pages cost no memory. Weights borrowed this way can be trained or merged
  /// in place (models/gpt2_io.hpp).
  map_copy_on_write,
};

/// The bytes of one tensor exactly as stored (little-endian). Holds a reference to the mapping (or to
/// its own copy when the file is not memory-resident), so it stays valid after the file object it came
/// from is destroyed.
class tensor_bytes {
 public:
  tensor_bytes() = default;
  /// `size` bytes at `data`, kept alive by `owner`.
  tensor_bytes(std::shared_ptr<const void> owner, const unsigned char* data, std::size_t size) noexcept
      : m_owner(std::move(owner)), m_data(data), m_size(size) {}
  const unsigned char* data() const noexcept { return m_data; }
  std::size_t size() const noexcept { return m_size; }
  const unsigned char* begin() const noexcept { return m_data; }
  const unsigned char* end() const noexcept { return m_data + m_size; }

 private:
  std::shared_ptr<const void> m_owner;
  const unsigned char* m_data = nullptr;
  std::size_t m_size = 0;
};

namespace detail {

using lora::detail::cat;

/// Read-only bytes of a file: memory-resident (mapped, or owned bytes) or reached through pread.
/// Every const member may be called from several threads at once.
class file_storage {
 public:
  /// Opens `path` (O_NONBLOCK, so that a FIFO cannot block); io_error when it cannot be opened or is
  /// not a regular file, naming the file as a `kind` file ("safetensors", "GGUF").
  static std::shared_ptr<const file_storage> open(const std::string& path, read_mode mode,
                                                  const char* kind = "safetensors");
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
  /// Maps the whole file (PROT_READ, or PROT_READ | PROT_WRITE when `writable`; always MAP_PRIVATE)
  /// and closes the descriptor; leaves it unmapped (pread) when mmap fails.
  void try_map(bool writable) noexcept;

  std::vector<unsigned char> m_bytes;
  const unsigned char* m_data = nullptr;
  void* m_map = nullptr;
  std::size_t m_map_size = 0;
  int m_fd = -1;
  std::uint64_t m_size = 0;
};

/// The `size` bytes at `offset` of `storage` (checked by the caller to lie inside the file): a view
/// into the mapping when the file is memory-resident, else a copy read with pread.
tensor_bytes storage_slice(const std::shared_ptr<const file_storage>& storage, std::uint64_t offset, std::size_t size,
                           const std::string& label);

// ================================================================================================
// Implementation
// ================================================================================================

inline std::shared_ptr<const file_storage> file_storage::open(const std::string& path, read_mode mode,
                                                              const char* kind) {
  // O_NONBLOCK so that opening a FIFO cannot block; it has no effect on regular files.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    throw io_error(cat("cannot open ", kind, " file '", path, "': ", std::strerror(err)));
  }
  std::shared_ptr<file_storage> storage(new file_storage());
  storage->m_fd = fd;  // closed by the destructor from here on
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    throw io_error(cat("cannot stat ", kind, " file '", path, "': ", std::strerror(err)));
  }
  if (!S_ISREG(st.st_mode)) throw io_error(cat(kind, " file '", path, "' is not a regular file"));
  storage->m_size = static_cast<std::uint64_t>(st.st_size);
  if (mode != read_mode::pread) storage->try_map(mode == read_mode::map_copy_on_write);
  return storage;
}

inline void file_storage::try_map(bool writable) noexcept {
  if (m_size < 8 || m_size > static_cast<std::uint64_t>(std::numeric_limits<std::size_t>::max())) return;
  const std::size_t length = static_cast<std::size_t>(m_size);
  const int protection = writable ? PROT_READ | PROT_WRITE : PROT_READ;
  void* map = ::mmap(nullptr, length, protection, MAP_PRIVATE, m_fd, 0);
  if (map == MAP_FAILED) return;
  m_map = map;
  m_map_size = length;
  m_data = static_cast<const unsigned char*>(map);
  ::close(m_fd);  // the mapping keeps the file alive
  m_fd = -1;
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
      throw io_error(cat("cannot read '", label, "' at byte ", offset + done, ": ",
                         got == 0 ? "unexpected end of file (was it truncated while open?)" : std::strerror(err)));
    }
    done += static_cast<std::size_t>(got);
  }
}

inline tensor_bytes storage_slice(const std::shared_ptr<const file_storage>& storage, std::uint64_t offset,
                                  std::size_t size, const std::string& label) {
  if (const unsigned char* data = storage->data()) return tensor_bytes(storage, data + offset, size);
  auto copy = std::make_shared<std::vector<unsigned char>>(size);
  storage->read(offset, size, copy->data(), label);
  const unsigned char* p = copy->data();
  return tensor_bytes(std::move(copy), p, size);
}

}  // namespace detail
}  // namespace lora::io
