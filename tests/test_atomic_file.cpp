// tests/test_atomic_file.cpp: the one atomic-write helper (io/atomic_file.hpp). Success, overwrite and
// the three ways in; a throwing writer; permissions under the umask; and, through the file_ops seam,
// the failure of every system call in turn, EINTR on every call, short writes and a full disk, each for
// a target that did not exist and one that did: afterwards the directory holds the old file or the new
// one byte for byte, never a mixture, and no temporary.
#include <sys/stat.h>
#include <sys/types.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <lora/io/atomic_file.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "file_support.hpp"
#include "support.hpp"

namespace {

namespace io = lora::io;
using bytes = std::vector<unsigned char>;
using lora_test::expect_error;
using lora_test::read_file;
using lora_test::temp_dir;
using lora_test::write_file;

// --- a scripted file system -------------------------------------------------------------------------

/// What the scripted calls do; reset by each test (through script_guard).
struct fault_script {
  int fail_call = -1;                  ///< Index (over all calls, from 0) of the call that fails; -1 for none.
  int err = EIO;                       ///< The errno it fails with.
  std::size_t max_chunk = SIZE_MAX;    ///< Short writes: pwrite writes at most this many bytes at a time.
  long long disk_space = -1;           ///< Bytes the disk accepts in all (-1: unlimited); then ENOSPC.
  bool full_disk_writes_zero = false;  ///< On a full disk pwrite returns 0 instead of -1 / ENOSPC.
  std::string fail_every;              ///< A call that always fails (with err), e.g. "unlink".
  long long written = 0;
  std::vector<std::string> calls;  ///< The calls made, in order.
};
fault_script script;

/// Records a call; true (errno set) when the script makes it fail.
bool fails(const char* name) {
  const int index = static_cast<int>(script.calls.size());
  script.calls.push_back(name);
  if (index != script.fail_call && script.fail_every != name) return false;
  errno = script.err;
  return true;
}

long long scripted_pwrite(int fd, const void* data, std::size_t size, long long offset) {
  if (fails("pwrite")) return -1;
  std::size_t n = std::min(size, script.max_chunk);
  if (script.disk_space >= 0) {
    const long long room = script.disk_space - script.written;
    if (room <= 0) {
      if (script.full_disk_writes_zero) return 0;
      errno = ENOSPC;
      return -1;
    }
    n = std::min<std::size_t>(n, static_cast<std::size_t>(room));
  }
  const long long put = io::detail::system_file_ops().pwrite(fd, data, n, offset);
  if (put > 0) script.written += put;
  return put;
}

/// The real calls, each of which the script can make fail (close closes, then reports the failure, as
/// Linux does).
constexpr io::detail::file_ops scripted_ops{
    [](const char* path, int flags, unsigned mode) {
      return fails("open") ? -1 : io::detail::system_file_ops().open(path, flags, mode);
    },
    scripted_pwrite,
    [](int fd) { return fails("fsync") ? -1 : io::detail::system_file_ops().fsync(fd); },
    [](int fd) {
      const int closed = io::detail::system_file_ops().close(fd);
      return fails("close") ? -1 : closed;
    },
    [](const char* from, const char* to) {
      return fails("rename") ? -1 : io::detail::system_file_ops().rename(from, to);
    },
    [](const char* path) { return fails("unlink") ? -1 : io::detail::system_file_ops().unlink(path); },
    [](const char* path) { return fails("open_directory") ? -1 : io::detail::system_file_ops().open_directory(path); },
};

/// Installs scripted_ops with a fresh script for its lifetime.
class script_guard {
 public:
  explicit script_guard(fault_script s = {}) : m_ops(scripted_ops) { script = std::move(s); }

 private:
  io::detail::scoped_file_ops m_ops;
};

/// 150,000 bytes, written as three pieces: 100 bytes (buffered by the sink), then 70,000 and 79,900
/// (each past the sink's buffer, so written directly): three pwrite calls.
bytes new_contents() {
  bytes out(150'000);
  for (std::size_t k = 0; k < out.size(); ++k) out[k] = static_cast<unsigned char>((k * 2654435761u) >> 13);
  return out;
}

void write_new(const std::string& path, const bytes& contents) {
  io::write_file_atomically(path, [&](io::file_sink& out) {
    out.write(contents.data(), 100);
    out.write(contents.data() + 100, 70'000);
    out.write(contents.data() + 70'100, contents.size() - 70'100);
  });
}

/// The directory holds `name` with `expected` contents and nothing else, or nothing when `expected` is
/// empty.
void expect_only(const temp_dir& dir, const std::string& name, const std::optional<bytes>& expected) {
  if (!expected) {
    EXPECT_TRUE(dir.list().empty()) << "left: " << dir.list().front();
    return;
  }
  EXPECT_EQ(dir.list(), std::vector<std::string>{name});
  EXPECT_TRUE(read_file(dir.file(name)) == *expected) << "the file is neither the old nor the new one";
}

/// The phrase naming the step that a failure of `call` (before the rename) reports.
std::string step_of(const std::string& call) {
  if (call == "open") return "creating a temporary file";
  if (call == "pwrite") return "write of";
  if (call == "fsync") return "fsync of the temporary file";
  if (call == "close") return "close of the temporary file";
  return "rename of the temporary file";
}

/// The calls of a clean write of new_contents().
std::vector<std::string> clean_calls() {
  temp_dir dir;
  script_guard guard;
  write_new(dir.file("probe"), new_contents());
  return script.calls;
}

// --- success -------------------------------------------------------------------------------------------

TEST(AtomicFile, WritesAndReplacesWithEachWayIn) {
  temp_dir dir;
  const std::string path = dir.file("out.bin");
  io::write_file_atomically(path, "hello\n");
  EXPECT_EQ(read_file(path), (bytes{'h', 'e', 'l', 'l', 'o', '\n'}));
  const bytes binary = {0, 1, 2, 255, 0};
  io::write_file_atomically(path, binary.data(), binary.size());
  EXPECT_EQ(read_file(path), binary);
  const bytes large = new_contents();
  write_new(path, large);
  EXPECT_EQ(read_file(path), large);
  io::write_file_atomically(path, std::string_view());
  EXPECT_TRUE(read_file(path).empty());
  EXPECT_EQ(dir.list(), std::vector<std::string>{"out.bin"});
  // A relative path writes next to the working directory's entries (the temporary too).
  const auto cwd = std::filesystem::current_path();
  std::filesystem::current_path(dir.path());
  io::write_file_atomically("relative.txt", "r");
  std::filesystem::current_path(cwd);
  EXPECT_EQ(read_file(dir.file("relative.txt")), bytes{'r'});
}

TEST(AtomicFile, SinkCountsAndBuffersBytes) {
  temp_dir dir;
  const std::string path = dir.file("s");
  script_guard guard;
  io::write_file_atomically(path, [](io::file_sink& out) {
    for (int k = 0; k < 1000; ++k) out.write("ab");
    EXPECT_EQ(out.size(), 2000u);
  });
  EXPECT_EQ(std::count(script.calls.begin(), script.calls.end(), "pwrite"), 1);  // 1000 writes, one call
  EXPECT_EQ(read_file(path).size(), 2000u);
}

TEST(AtomicFile, WritesAtAnyOffsetInAnyOrder) {
  temp_dir dir;
  const std::string path = dir.file("holes");
  io::atomic_file file(path);
  file.write_at(10, "b", 1);
  file.write_at(0, "a", 1);
  EXPECT_EQ(file.temp_path().parent_path(), std::filesystem::path(dir.path()));
  const std::string temp_name = file.temp_path().filename().string();
  EXPECT_EQ(temp_name.rfind(".holes.tmp.", 0), 0u) << temp_name;  // hidden, next to the target
  EXPECT_EQ(dir.list(), std::vector<std::string>{temp_name});
  file.commit();
  bytes expected(11, 0);
  expected[0] = 'a';
  expected[10] = 'b';
  EXPECT_EQ(read_file(path), expected);
  EXPECT_FALSE(file.is_open());
  expect_error<lora::state_error>([&] { file.write_at(0, "x", 1); }, {"holes", "already committed"});
  expect_error<lora::state_error>([&] { file.commit(); }, {"already committed"});
}

TEST(AtomicFile, UncommittedOrDiscardedLeavesTheOldFile) {
  temp_dir dir;
  const std::string path = dir.file("keep");
  write_file(path, std::string("old"));
  {
    io::atomic_file file(path);
    file.write_at(0, "new!", 4);
    EXPECT_EQ(dir.list().size(), 2u);
  }
  expect_only(dir, "keep", bytes{'o', 'l', 'd'});
  io::atomic_file file(path);
  file.discard();
  file.discard();  // idempotent
  expect_error<lora::state_error>([&] { file.commit(); }, {"discarded"});
  expect_only(dir, "keep", bytes{'o', 'l', 'd'});
}

TEST(AtomicFile, ThrowingWriterLeavesTheOldFileOrNothing) {
  temp_dir dir;
  const auto half_then_throw = [](io::file_sink& out) {
    out.write(std::string(100'000, 'x'));  // past the buffer: on disk in the temporary
    throw std::runtime_error("writer failed");
  };
  EXPECT_THROW(io::write_file_atomically(dir.file("absent"), half_then_throw), std::runtime_error);
  expect_only(dir, "absent", std::nullopt);
  write_file(dir.file("present"), std::string("old"));
  EXPECT_THROW(io::write_file_atomically(dir.file("present"), half_then_throw), std::runtime_error);
  expect_only(dir, "present", bytes{'o', 'l', 'd'});
}

TEST(AtomicFile, RefusesPathsThatNameNoFileOrNoDirectory) {
  temp_dir dir;
  for (const std::string& bad : {dir.path() + "/", dir.path() + "/.", dir.path() + "/.."}) {
    expect_error<lora::io_error>([&] { io::write_file_atomically(bad, "x"); }, {"not a file path"});
  }
  expect_error<lora::io_error>([&] { io::write_file_atomically(dir.file("no/such/dir/f"), "x"); },
                               {"no/such/dir/f", "temporary file", "No such file or directory"});
  EXPECT_TRUE(dir.list().empty());
}

TEST(AtomicFile, NewFilesGetTheUmasksPermissions) {
  temp_dir dir;
  const auto mode_of = [](const std::string& path) {
    struct stat st {};
    EXPECT_EQ(::stat(path.c_str(), &st), 0);
    return st.st_mode & 0777;
  };
  const mode_t saved = ::umask(022);
  io::write_file_atomically(dir.file("a"), "a");
  ::umask(027);
  io::write_file_atomically(dir.file("b"), "b");
  ::umask(077);
  io::write_file_atomically(dir.file("a"), "a2");  // a replacement is a new file: the umask applies again
  ::umask(saved);
  EXPECT_EQ(mode_of(dir.file("b")), 0640u);
  EXPECT_EQ(mode_of(dir.file("a")), 0600u);
  io::write_file_atomically(dir.file("c"), "c");
  EXPECT_EQ(mode_of(dir.file("c")), 0666u & ~static_cast<unsigned>(saved));
}

TEST(AtomicFile, SeamDefaultsToTheSystemCalls) {
  const auto before = io::detail::current_file_ops.pwrite;
  EXPECT_EQ(before, io::detail::system_file_ops().pwrite);
  {
    script_guard guard;
    EXPECT_NE(io::detail::current_file_ops.pwrite, before);
  }
  EXPECT_EQ(io::detail::current_file_ops.pwrite, before);
  EXPECT_EQ(io::detail::current_file_ops.rename, io::detail::system_file_ops().rename);
}

// --- every system call failing in turn -------------------------------------------------------------------

TEST(AtomicFile, EveryFailingCallLeavesTheOldFileOrTheNewOne) {
  const std::vector<std::string> calls = clean_calls();
  const std::vector<std::string> expected_calls = {"open",  "pwrite", "pwrite",         "pwrite", "fsync",
                                                   "close", "rename", "open_directory", "fsync",  "close"};
  ASSERT_EQ(calls, expected_calls);
  const std::size_t rename_at = 6;
  const bytes fresh = new_contents();
  for (const bool existed : {false, true}) {
    for (std::size_t k = 0; k < calls.size(); ++k) {
      SCOPED_TRACE(std::string(existed ? "existing target, " : "new target, ") + "call " + std::to_string(k) + " (" +
                   calls[k] + ") fails");
      temp_dir dir;
      const std::string path = dir.file("model.bin");
      const std::optional<bytes> old = existed ? std::optional<bytes>(bytes{'o', 'l', 'd'}) : std::nullopt;
      if (old) write_file(path, *old);
      fault_script s;
      s.fail_call = static_cast<int>(k);
      script_guard guard(s);
      if (k <= rename_at) {
        expect_error<lora::io_error>([&] { write_new(path, fresh); },
                                     {"model.bin", step_of(calls[k]), std::strerror(EIO), "is unchanged"});
        expect_only(dir, "model.bin", old);
      } else if (calls[k] == "fsync") {  // the directory's: the new file is in place but may not be durable
        expect_error<lora::io_error>([&] { write_new(path, fresh); },
                                     {"model.bin", "durable", std::strerror(EIO), "new contents"});
        expect_only(dir, "model.bin", fresh);
      } else {  // opening or closing the directory: best effort
        write_new(path, fresh);
        expect_only(dir, "model.bin", fresh);
      }
    }
  }
}

TEST(AtomicFile, DirectoriesThatCannotBeSyncedAreAccepted) {
  for (const int err : {EINVAL, ENOTSUP}) {
    temp_dir dir;
    fault_script s;
    s.fail_call = 8;  // fsync of the directory (see EveryFailingCallLeavesTheOldFileOrTheNewOne)
    s.err = err;
    script_guard guard(s);
    write_new(dir.file("f"), new_contents());
    EXPECT_EQ(script.calls[8], "fsync");
    expect_only(dir, "f", new_contents());
  }
}

TEST(AtomicFile, InterruptedCallsAreResumed) {
  const std::vector<std::string> calls = clean_calls();
  const bytes fresh = new_contents();
  for (std::size_t k = 0; k < calls.size(); ++k) {
    SCOPED_TRACE("call " + std::to_string(k) + " (" + calls[k] + ") is interrupted");
    temp_dir dir;
    const std::string path = dir.file("f");
    write_file(path, std::string("old"));
    fault_script s;
    s.fail_call = static_cast<int>(k);
    s.err = EINTR;
    script_guard guard(s);
    if (calls[k] == "rename") {  // rename is not interrupted on local file systems; it is not retried
      expect_error<lora::io_error>([&] { write_new(path, fresh); }, {"rename", std::strerror(EINTR)});
      expect_only(dir, "f", bytes{'o', 'l', 'd'});
      continue;
    }
    write_new(path, fresh);  // retried (close: the descriptor is released whatever close returns)
    expect_only(dir, "f", fresh);
  }
}

TEST(AtomicFile, ShortWritesAreResumed) {
  temp_dir dir;
  fault_script s;
  s.max_chunk = 4093;
  script_guard guard(s);
  const bytes fresh = new_contents();
  write_new(dir.file("f"), fresh);
  expect_only(dir, "f", fresh);
  EXPECT_GT(std::count(script.calls.begin(), script.calls.end(), "pwrite"), 36);  // 150,000 / 4093
}

TEST(AtomicFile, FullDiskLeavesTheOldFileOrNothing) {
  const bytes fresh = new_contents();
  for (const bool zero : {false, true}) {
    for (const long long space : {0LL, 1LL, 100LL, 70'099LL, 70'100LL, 149'999LL}) {
      for (const bool existed : {false, true}) {
        SCOPED_TRACE("disk full after " + std::to_string(space) + " bytes" + (zero ? ", pwrite returns 0" : "") +
                     (existed ? ", existing target" : ", new target"));
        temp_dir dir;
        const std::string path = dir.file("f");
        const std::optional<bytes> old = existed ? std::optional<bytes>(bytes{'o', 'l', 'd'}) : std::nullopt;
        if (old) write_file(path, *old);
        fault_script s;
        s.disk_space = space;
        s.full_disk_writes_zero = zero;
        script_guard guard(s);
        expect_error<lora::io_error>([&] { write_new(path, fresh); },
                                     {"write of", std::strerror(ENOSPC), "temporary file was removed"});
        expect_only(dir, "f", old);
      }
    }
  }
}

TEST(AtomicFile, ATemporaryThatCannotBeRemovedIsNamedAndTheTargetKept) {
  temp_dir dir;
  const std::string path = dir.file("f");
  write_file(path, std::string("old"));
  fault_script s;
  s.fail_call = 1;          // the first pwrite fails ...
  s.fail_every = "unlink";  // ... and so does removing the temporary afterwards
  script_guard guard(s);
  std::string temp;
  std::string message;
  try {
    io::atomic_file file(path);
    temp = file.temp_path().filename().string();
    file.write_at(0, "new", 3);
  } catch (const lora::io_error& e) {
    message = e.what();
  }
  for (const std::string& fragment : {std::string("could not be removed"), temp, std::string("is unchanged")}) {
    EXPECT_NE(message.find(fragment), std::string::npos) << message;
  }
  EXPECT_EQ(read_file(path), (bytes{'o', 'l', 'd'}));
  EXPECT_EQ(dir.list(), (std::vector<std::string>{temp, "f"}));  // the temporary is left, and named
}

}  // namespace
