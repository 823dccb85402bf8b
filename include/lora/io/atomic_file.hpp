// lora/io/atomic_file.hpp: writing a file so that readers, and a crash at any moment, see either the
// old file or the complete new one, never a mixture (docs/CONVENTIONS.md §files). Every file this
// library writes (safetensors, PEFT adapter directories, checkpoints) goes through here.
//
// The protocol, for a target <dir>/<name>:
//   1. open <dir>/.<name>.tmp.<pid>.<n> with O_CREAT | O_EXCL (a fresh name, never an existing file),
//      mode 0666 reduced by the umask like any new file (0644 under the usual umask 022);
//   2. write every byte (pwrite, resumed after short writes and EINTR; a write of 0 bytes is a full
//      disk, ENOSPC);
//   3. fsync the temporary, then close it;
//   4. rename it over the target (atomic on POSIX file systems: a reader opens one or the other);
//   5. fsync <dir>, so that the rename itself survives a crash.
// When any of steps 1 to 4 fails, the temporary is closed and removed and lora::io_error names the target,
// the step and strerror(errno): the old file, if any, is untouched. After step 4 the target holds the
// new contents; a failure of step 5 is best effort where the directory cannot be opened or the file
// system cannot sync directories (EINVAL, ENOTSUP), and an io_error saying so otherwise.
//
//   lora::io::write_file_atomically("run/notes.txt", "hello\n");
//   lora::io::write_file_atomically("run/log.bin", [&](lora::io::file_sink& out) {
//     out.write(header.data(), header.size());
//     out.write(body);                                   // std::string_view
//   });
//
// The system calls go through detail::file_ops, which tests replace (detail::scoped_file_ops) to make
// each one fail in turn; by default they are the plain POSIX calls.
//
// POSIX only (Linux, macOS).
#pragma once

#include <fcntl.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../error.hpp"

namespace lora::io {

/// A temporary file next to `target` that commit() makes durable and renames over it (steps 1 to 5
/// above). Destroying it uncommitted, or any failure, closes and removes the temporary. Writes may
/// come in any order (write_at), so a writer that knows its layout can fill a file piece by piece.
class atomic_file {
 public:
  /// Creates the temporary (step 1). io_error when `target` names no file ("dir/", ".", "..") or the
  /// temporary cannot be created (a missing or read-only directory ...).
  explicit atomic_file(std::filesystem::path target);
  atomic_file(const atomic_file&) = delete;
  atomic_file& operator=(const atomic_file&) = delete;
  ~atomic_file() { discard(); }

  const std::filesystem::path& target() const noexcept { return m_target; }
  const std::filesystem::path& temp_path() const noexcept { return m_temp; }
  /// Whether writes are still possible (neither committed nor discarded nor failed).
  bool is_open() const noexcept { return m_fd >= 0; }

  /// Writes all of [data, data + size) at byte `offset` of the temporary (step 2). io_error, with the
  /// temporary removed, on failure; state_error when the file is no longer open.
  void write_at(std::uint64_t offset, const void* data, std::size_t size);
  /// Steps 3 to 5. io_error on failure (see above); state_error when the file is no longer open.
  void commit();
  /// Closes and removes the temporary unless committed. Idempotent, never throws.
  void discard() noexcept;

 private:
  [[noreturn]] void fail(const std::string& step, int err);
  /// Closes the temporary and unlinks it if it still exists; the errno of a failed unlink, else 0.
  int remove_temporary() noexcept;
  void sync_directory();

  std::filesystem::path m_target;
  std::filesystem::path m_dir;
  std::filesystem::path m_temp;
  int m_fd = -1;
  bool m_temp_exists = false;  ///< The temporary is on disk and ours to remove.
};

/// Appends bytes to an atomic_file, buffered (64 KiB) so that many small writes cost few system calls;
/// write_file_atomically hands one to its writer callback. io_error on failure, as atomic_file.
class file_sink {
 public:
  explicit file_sink(atomic_file& file) noexcept : m_file(&file) {}
  void write(const void* data, std::size_t size);
  void write(std::string_view bytes) { write(bytes.data(), bytes.size()); }
  /// Bytes written so far (buffered ones included).
  std::uint64_t size() const noexcept { return m_offset + m_buffer.size(); }
  /// Writes out the buffer.
  void flush();

 private:
  static constexpr std::size_t buffer_bytes = std::size_t{1} << 16;
  atomic_file* m_file;
  std::uint64_t m_offset = 0;  ///< Bytes already in the file.
  std::vector<unsigned char> m_buffer;
};

/// Writes `path` atomically: write(sink) produces the contents, which then replace `path` (steps 1
/// to 5). On failure `path` is left as it was, the temporary is removed, and io_error is thrown; an
/// exception thrown by `write` passes through after the same cleanup.
void write_file_atomically(const std::filesystem::path& path, const std::function<void(file_sink&)>& write);
/// Writes `path` atomically with the given contents.
void write_file_atomically(const std::filesystem::path& path, std::string_view contents);
void write_file_atomically(const std::filesystem::path& path, const void* data, std::size_t size);

namespace detail {

/// The system calls of atomic_file. Tests swap them (scoped_file_ops) to simulate failures; a call
/// reports failure as the POSIX call does: -1 with errno set.
struct file_ops {
  int (*open)(const char* path, int flags, unsigned mode);  ///< ::open
  long long (*pwrite)(int fd, const void* data, std::size_t size, long long offset);
  int (*fsync)(int fd);
  int (*close)(int fd);
  int (*rename)(const char* from, const char* to);
  int (*unlink)(const char* path);
  int (*open_directory)(const char* path);  ///< ::open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
};

/// The plain POSIX calls (defined here, before its use below, so that current_file_ops is
/// constant-initialised: no static-initialisation-order hazard, no cost beyond an indirect call).
constexpr file_ops system_file_ops() noexcept {
  return file_ops{
      [](const char* path, int flags, unsigned mode) { return ::open(path, flags, static_cast<mode_t>(mode)); },
      [](int fd, const void* data, std::size_t size, long long offset) {
        return static_cast<long long>(::pwrite(fd, data, size, static_cast<off_t>(offset)));
      },
      [](int fd) { return ::fsync(fd); },
      [](int fd) { return ::close(fd); },
      [](const char* from, const char* to) { return ::rename(from, to); },
      [](const char* path) { return ::unlink(path); },
      [](const char* path) { return ::open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC); },
  };
}

/// The calls atomic_file makes; constant-initialised to system_file_ops().
inline file_ops current_file_ops = system_file_ops();

/// Replaces current_file_ops for its lifetime (tests only: no other thread may write files meanwhile).
class scoped_file_ops {
 public:
  explicit scoped_file_ops(const file_ops& ops) noexcept : m_saved(current_file_ops) { current_file_ops = ops; }
  ~scoped_file_ops() { current_file_ops = m_saved; }
  scoped_file_ops(const scoped_file_ops&) = delete;
  scoped_file_ops& operator=(const scoped_file_ops&) = delete;

 private:
  file_ops m_saved;
};

/// Calls call() again while it fails with EINTR.
template <typename Call>
auto retry_on_eintr(Call&& call);

}  // namespace detail

// ================================================================================================
// Implementation
// ================================================================================================

namespace detail {

template <typename Call>
auto retry_on_eintr(Call&& call) {
  for (;;) {
    const auto result = call();
    if (result >= 0 || errno != EINTR) return result;
  }
}

}  // namespace detail

inline atomic_file::atomic_file(std::filesystem::path target) : m_target(std::move(target)) {
  using lora::detail::cat;
  const std::string name = m_target.filename().string();
  if (name.empty() || name == "." || name == "..") {
    throw io_error(cat("cannot write '", m_target.string(), "': not a file path"));
  }
  m_dir = m_target.parent_path().empty() ? std::filesystem::path(".") : m_target.parent_path();
  static std::atomic<unsigned long> counter{0};
  const detail::file_ops& ops = detail::current_file_ops;
  int err = 0;
  for (int attempt = 0; attempt < 100; ++attempt) {
    m_temp = m_dir / cat(".", name, ".tmp.", static_cast<long>(::getpid()), ".", counter.fetch_add(1));
    m_fd = detail::retry_on_eintr(
        [&] { return ops.open(m_temp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666u); });
    if (m_fd >= 0) {
      m_temp_exists = true;
      return;
    }
    err = errno;
    if (err != EEXIST) break;
  }
  throw io_error(cat("cannot write '", m_target.string(), "': creating a temporary file in its directory ('",
                     m_temp.string(), "') failed: ", std::strerror(err), " ('", m_target.string(), "' is unchanged)"));
}

inline int atomic_file::remove_temporary() noexcept {
  const detail::file_ops& ops = detail::current_file_ops;
  if (m_fd >= 0) (void)ops.close(std::exchange(m_fd, -1));
  if (!m_temp_exists) return 0;
  m_temp_exists = false;
  return ops.unlink(m_temp.c_str()) == 0 ? 0 : errno;
}

inline void atomic_file::discard() noexcept { (void)remove_temporary(); }

inline void atomic_file::fail(const std::string& step, int err) {
  using lora::detail::cat;
  const std::string target = m_target.string();
  const int unlink_err = remove_temporary();
  const std::string cleanup = unlink_err == 0 ? std::string("the temporary file was removed")
                                              : cat("the temporary file '", m_temp.string(),
                                                    "' could not be removed: ", std::strerror(unlink_err));
  throw io_error(cat("cannot write '", target, "': ", step, " failed: ", std::strerror(err), " (", cleanup, "; '",
                     target, "' is unchanged)"));
}

inline void atomic_file::write_at(std::uint64_t offset, const void* data, std::size_t size) {
  if (m_fd < 0) {
    throw state_error(
        lora::detail::cat("cannot write '", m_target.string(), "': the file was already committed or discarded"));
  }
  const detail::file_ops& ops = detail::current_file_ops;
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (std::size_t done = 0; done < size;) {
    const long long put = ops.pwrite(m_fd, bytes + done, size - done, static_cast<long long>(offset + done));
    if (put < 0 && errno == EINTR) continue;
    if (put <= 0) {
      const int err = put == 0 ? ENOSPC : errno;  // pwrite writes 0 bytes only when nothing fits
      fail(lora::detail::cat("write of ", size - done, " bytes at byte ", offset + done, " of the temporary file"),
           err);
    }
    done += static_cast<std::size_t>(put);
  }
}

inline void atomic_file::commit() {
  using lora::detail::cat;
  if (m_fd < 0) {
    throw state_error(cat("cannot write '", m_target.string(), "': the file was already committed or discarded"));
  }
  const detail::file_ops& ops = detail::current_file_ops;
  if (detail::retry_on_eintr([&] { return ops.fsync(m_fd); }) != 0) {
    const int err = errno;
    fail("fsync of the temporary file", err);
  }
  // No retry after EINTR: Linux releases the descriptor whatever close returns.
  if (ops.close(std::exchange(m_fd, -1)) != 0 && errno != EINTR) {
    const int err = errno;
    fail("close of the temporary file", err);
  }
  if (ops.rename(m_temp.c_str(), m_target.c_str()) != 0) {
    const int err = errno;
    fail(cat("rename of the temporary file '", m_temp.string(), "' over it"), err);
  }
  m_temp_exists = false;
  sync_directory();
}

inline void atomic_file::sync_directory() {
  const detail::file_ops& ops = detail::current_file_ops;
  const int dir = detail::retry_on_eintr([&] { return ops.open_directory(m_dir.c_str()); });
  if (dir < 0) return;  // best effort: a directory we may not read
  const int synced = detail::retry_on_eintr([&] { return ops.fsync(dir); });
  const int err = errno;
  (void)ops.close(dir);
  if (synced == 0 || err == EINVAL || err == ENOTSUP) return;  // ENOTSUP: some file systems cannot sync directories
  throw io_error(lora::detail::cat("cannot make the new '", m_target.string(), "' durable: fsync of its directory '",
                                   m_dir.string(), "' failed: ", std::strerror(err), " (the file already holds the ",
                                   "new contents, but the rename may not survive a crash)"));
}

inline void file_sink::write(const void* data, std::size_t size) {
  if (size == 0) return;
  const auto* bytes = static_cast<const unsigned char*>(data);
  if (m_buffer.size() + size > buffer_bytes) flush();
  if (size < buffer_bytes) {
    if (m_buffer.capacity() < buffer_bytes) m_buffer.reserve(buffer_bytes);
    m_buffer.insert(m_buffer.end(), bytes, bytes + size);
    return;
  }
  m_file->write_at(m_offset, bytes, size);
  m_offset += size;
}

inline void file_sink::flush() {
  if (m_buffer.empty()) return;
  m_file->write_at(m_offset, m_buffer.data(), m_buffer.size());
  m_offset += m_buffer.size();
  m_buffer.clear();
}

inline void write_file_atomically(const std::filesystem::path& path, const std::function<void(file_sink&)>& write) {
  atomic_file file(path);
  file_sink sink(file);
  write(sink);  // an exception leaves through ~atomic_file, which removes the temporary
  sink.flush();
  file.commit();
}

inline void write_file_atomically(const std::filesystem::path& path, std::string_view contents) {
  write_file_atomically(path, contents.data(), contents.size());
}

inline void write_file_atomically(const std::filesystem::path& path, const void* data, std::size_t size) {
  atomic_file file(path);
  file.write_at(0, data, size);
  file.commit();
}

}  // namespace lora::io
