// lora/dist/context.hpp: the MPI communicator that data-parallel training runs over, and how it
// fails. Part of <lora/dist/mpi.hpp>; docs/CONVENTIONS.md §dist describes the conventions.
//
// mpi_context owns a duplicate of the communicator it is given (MPI_COMM_WORLD by default), so the
// library's collectives never match a user's, and sets MPI_ERRORS_RETURN on it: every MPI call is checked
// and a failure becomes lora::dist::comm_error naming the rank, the operation and MPI's error string.
//
// Waiting never blocks inside MPI: wait() polls MPI_Test until the request completes or the deadline
// (timeout(), 60 s by default) passes. A rank that times out prints one line on stderr naming itself,
// the operation and the timeout, then calls MPI_Abort on the communicator, which ends every rank of the
// job: a peer that died, threw or stopped calling the collectives makes the others stop within the
// timeout instead of hanging. run_or_abort() does the same for an exception thrown by one rank alone.
#pragma once

#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>
#include <type_traits>

#include "../error.hpp"

namespace lora::dist {

/// An MPI call failed (MPI_ERRORS_RETURN handed back an error code), or ranks disagree about something
/// that must be the same on all of them (parameter names and shapes, a checkpoint's outcome).
class comm_error : public lora::error {
 public:
  explicit comm_error(const std::string& message) : error("comm_error", message) {}
};

/// Options of mpi_context.
struct context_options {
  /// Seconds a rank waits for one collective before it aborts the job (> 0).
  double timeout_s = 60.0;
  /// The exit code passed to MPI_Abort on a timeout or an escaping exception.
  int abort_code = 3;
};

/// The communicator of a data-parallel job: rank, size, checked calls, bounded waits, abort.
class mpi_context {
 public:
  /// Initialises MPI (MPI_Init_thread, MPI_THREAD_FUNNELED: only the thread that made the context calls
  /// MPI) unless it is already initialised, and works over a duplicate of MPI_COMM_WORLD. MPI is
  /// finalised by the destructor only when this constructor initialised it.
  explicit mpi_context(int* argc = nullptr, char*** argv = nullptr, const context_options& options = {});
  /// Attaches to an existing communicator of an initialised MPI (it is duplicated, never finalised).
  explicit mpi_context(MPI_Comm comm, const context_options& options = {});
  /// Frees the duplicate and finalises MPI when it initialised it. If an exception is propagating
  /// through the destructor (one rank failed while the others may sit in a collective), it aborts the
  /// job instead (MPI_Finalize would wait for them).
  ~mpi_context();
  mpi_context(const mpi_context&) = delete;
  mpi_context& operator=(const mpi_context&) = delete;

  int rank() const noexcept { return m_rank; }
  int size() const noexcept { return m_size; }
  bool is_root() const noexcept { return m_rank == 0; }
  /// The duplicated communicator (MPI_ERRORS_RETURN set).
  MPI_Comm comm() const noexcept { return m_comm; }
  double timeout() const noexcept { return m_options.timeout_s; }
  void set_timeout(double seconds);

  /// Throws comm_error "rank R: <what> failed: <MPI error string>" unless rc == MPI_SUCCESS.
  void check(int rc, const char* what) const;
  /// Waits for `request` by polling MPI_Test; past the deadline, aborts the job (abort()) with a message
  /// naming `what`. Returns the seconds waited.
  double wait(MPI_Request& request, const char* what) const;
  /// MPI_Ibarrier, then wait().
  void barrier(const char* what) const;
  /// Prints "[lora.dist] rank R of S: <message>; aborting the job" on stderr and calls MPI_Abort.
  [[noreturn]] void abort(const std::string& message) const noexcept;

 private:
  void attach(MPI_Comm comm);

  MPI_Comm m_comm = MPI_COMM_NULL;
  context_options m_options;
  int m_rank = 0;
  int m_size = 1;
  int m_uncaught = 0;  // std::uncaught_exceptions() at construction
  bool m_owns_mpi = false;
};

/// Runs fn() (returning void or int); an exception escaping it makes this rank abort the job with the
/// exception's message, so that the other ranks stop at once instead of waiting in a collective.
/// Returns fn's int (0 for void).
template <typename Fn>
int run_or_abort(const mpi_context& ctx, Fn&& fn) noexcept;

}  // namespace lora::dist

namespace lora::dist::detail {

/// The MPI datatype of float and double.
template <typename Scalar>
MPI_Datatype mpi_type() noexcept {
  static_assert(std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>, "MPI reductions of float or double");
  return std::is_same_v<Scalar, float> ? MPI_FLOAT : MPI_DOUBLE;
}

}  // namespace lora::dist::detail

// ---------------------------------------------------------------------------------------------------

namespace lora::dist {

inline mpi_context::mpi_context(int* argc, char*** argv, const context_options& options) : m_options(options) {
  set_timeout(options.timeout_s);
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    int provided = 0;
    if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
      throw comm_error("MPI_Init_thread failed");
    }
    m_owns_mpi = true;
  }
  attach(MPI_COMM_WORLD);
}

inline mpi_context::mpi_context(MPI_Comm comm, const context_options& options) : m_options(options) {
  set_timeout(options.timeout_s);
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw comm_error("mpi_context(comm): MPI is not initialised");
  if (comm == MPI_COMM_NULL) throw comm_error("mpi_context(comm): the communicator is MPI_COMM_NULL");
  attach(comm);
}

inline void mpi_context::attach(MPI_Comm comm) {
  m_uncaught = std::uncaught_exceptions();
  // The duplicate inherits comm's error handler; set ours on it before anything can fail.
  if (MPI_Comm_dup(comm, &m_comm) != MPI_SUCCESS) throw comm_error("MPI_Comm_dup failed");
  MPI_Comm_set_errhandler(m_comm, MPI_ERRORS_RETURN);
  check(MPI_Comm_rank(m_comm, &m_rank), "MPI_Comm_rank");
  check(MPI_Comm_size(m_comm, &m_size), "MPI_Comm_size");
}

inline mpi_context::~mpi_context() {
  if (std::uncaught_exceptions() > m_uncaught) abort("an exception is leaving the scope of the MPI context");
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  MPI_Comm_free(&m_comm);
  if (m_owns_mpi) MPI_Finalize();
}

inline void mpi_context::set_timeout(double seconds) {
  if (!(seconds > 0.0 && seconds < 1e9)) {
    throw config_error(lora::detail::cat("mpi_context: timeout_s must be in (0, 1e9), got ", seconds));
  }
  m_options.timeout_s = seconds;
}

inline void mpi_context::check(int rc, const char* what) const {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(rc, text, &length);
  throw comm_error(lora::detail::cat("rank ", m_rank, " of ", m_size, ": ", what, " failed: ", text));
}

inline double mpi_context::wait(MPI_Request& request, const char* what) const {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  const auto deadline = start + std::chrono::duration<double>(m_options.timeout_s);
  for (long polls = 0;; ++polls) {
    int done = 0;
    check(MPI_Test(&request, &done, MPI_STATUS_IGNORE), what);
    const auto now = clock::now();
    if (done) return std::chrono::duration<double>(now - start).count();
    if (now > deadline) {
      abort(lora::detail::cat("timed out after ", m_options.timeout_s, " s waiting for ", what,
                              " (a peer rank died, threw or stopped calling the collectives)"));
    }
    // Spin briefly (a collective of small buffers completes in microseconds), then give the core away:
    // ranks are often oversubscribed.
    if (polls < 1000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

inline void mpi_context::barrier(const char* what) const {
  MPI_Request request = MPI_REQUEST_NULL;
  check(MPI_Ibarrier(m_comm, &request), what);
  wait(request, what);
}

inline void mpi_context::abort(const std::string& message) const noexcept {
  std::fprintf(stderr, "[lora.dist] rank %d of %d: %s; aborting the job\n", m_rank, m_size, message.c_str());
  std::fflush(stderr);
  MPI_Abort(m_comm == MPI_COMM_NULL ? MPI_COMM_WORLD : m_comm, m_options.abort_code);
  std::abort();  // MPI_Abort does not return; this keeps [[noreturn]] honest if it ever did
}

template <typename Fn>
int run_or_abort(const mpi_context& ctx, Fn&& fn) noexcept {
  try {
    if constexpr (std::is_void_v<decltype(fn())>) {
      fn();
      return 0;
    } else {
      return static_cast<int>(fn());
    }
  } catch (const std::exception& e) {
    ctx.abort(lora::detail::cat("uncaught exception: ", e.what()));
  } catch (...) {
    ctx.abort("uncaught exception of a type not derived from std::exception");
  }
}

}  // namespace lora::dist
