#pragma once
/// \file
/// \private The MPI calls of kattn/mpi.hpp: a communicator of kattn's own whose errors return
/// instead of aborting, every call timed and its bytes counted, the agreement that turns one
/// rank's exception into the same exception on every rank, and the exclusive scan of byte
/// strings under a non-commutative operator.

#include <mpi.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "../mpi_error.hpp"

namespace kattn {
namespace mpi {

namespace detail {

/// The MPI datatype of a C++ arithmetic type.
template <typename T>
MPI_Datatype datatype() {
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  else if constexpr (std::is_same_v<T, std::int64_t>) return MPI_INT64_T;
  else if constexpr (std::is_same_v<T, std::uint64_t>) return MPI_UINT64_T;
  else if constexpr (std::is_same_v<T, int>) return MPI_INT;
  else static_assert(sizeof(T) == 0, "kattn::mpi: no MPI datatype for this type");
}

/// The kind of exception an agreement rethrows on every rank.
enum class Failure : int { None = 0, InvalidArgument = 1, Other = 2 };

/**
 * kattn's duplicate of the caller's communicator. Its messages cannot meet the caller's
 * (a communicator of its own is a library's only safe tag space), and its error handler
 * returns codes, which become Error exceptions.
 */
class Comm {
 public:
  explicit Comm(MPI_Comm comm) {
    if (comm == MPI_COMM_NULL) {
      throw std::invalid_argument("kattn::mpi: the communicator is MPI_COMM_NULL");
    }
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized) {
      throw std::logic_error("kattn::mpi: MPI is not initialized (call MPI_Init first)");
    }
    check(MPI_Comm_dup(comm, &m_comm), "MPI_Comm_dup");
    check(MPI_Comm_set_errhandler(m_comm, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    MPI_Comm_rank(m_comm, &m_rank);
    MPI_Comm_size(m_comm, &m_size);
  }
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;
  ~Comm() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&m_comm);
  }

  int rank() const { return m_rank; }
  int size() const { return m_size; }
  CallStats& stats() { return m_stats; }

  /// Throws Error for an MPI return code other than MPI_SUCCESS.
  void check(int code, const char* call) const {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(code, text, &len);
    throw Error(std::string("kattn::mpi: ") + call + " failed on rank " +
                    std::to_string(m_rank) + ": " + std::string(text, std::size_t(len)),
                m_rank);
  }

  /**
   * The agreement before every collective step: each rank says whether its local work threw;
   * if any did, every rank throws the exception of the lowest such rank, with its message, so
   * that no rank waits in a collective its peers never reach.
   */
  void agree(const std::exception_ptr& local) {
    int first = local ? m_rank : m_size;
    allreduce(&first, 1, MPI_MIN);
    if (first == m_size) return;
    Failure kind = Failure::Other;
    std::string what;
    if (m_rank == first) {
      try {
        std::rethrow_exception(local);
      } catch (const std::invalid_argument& e) {
        kind = Failure::InvalidArgument;
        what = e.what();
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
        what = "an exception that is not a std::exception";
      }
    }
    std::int64_t header[2] = {std::int64_t(kind), std::int64_t(what.size())};
    timed("MPI_Bcast", 0, [&] { return MPI_Bcast(header, 2, MPI_INT64_T, first, m_comm); });
    what.resize(std::size_t(header[1]));
    timed("MPI_Bcast", 0, [&] { return MPI_Bcast(what.data(), int(header[1]), MPI_CHAR, first, m_comm); });
    const std::string message = m_size > 1 ? "rank " + std::to_string(first) + " of " +
                                                 std::to_string(m_size) + ": " + what
                                           : what;
    if (Failure(header[0]) == Failure::InvalidArgument) throw std::invalid_argument(message);
    throw Error(message, first);
  }

  /// Runs `local` (this rank's work between collective steps), then agrees (above).
  template <typename F>
  void step(F&& local) {
    std::exception_ptr error;
    try {
      local();
    } catch (...) {
      error = std::current_exception();
    }
    agree(error);
  }

  template <typename T>
  void allreduce(T* data, std::size_t n, MPI_Op op) {
    timed("MPI_Allreduce", n * sizeof(T), [&] { return MPI_Allreduce(MPI_IN_PLACE, data, count(n), datatype<T>(), op, m_comm); });
  }

  template <typename T>
  std::vector<T> allgather(T value) {
    std::vector<T> all(static_cast<std::size_t>(m_size));
    timed("MPI_Allgather", sizeof(T), [&] { return MPI_Allgather(&value, 1, datatype<T>(), all.data(), 1, datatype<T>(), m_comm); });
    return all;
  }

  /// Every rank's n values, rank after rank.
  template <typename T>
  std::vector<T> allgatherArray(const T* values, std::size_t n) {
    std::vector<T> all(std::size_t(m_size) * n);
    timed("MPI_Allgather", n * sizeof(T), [&] {
      return MPI_Allgather(values, count(n), datatype<T>(), all.data(), count(n), datatype<T>(),
                           m_comm);
    });
    return all;
  }

  /**
   * Exclusive scan of byte strings under `op(earlier, later)`, associative but not
   * commutative: rank r gets op over ranks 0..r-1 in order, rank 0 gets `identity`. Hillis and
   * Steele's inclusive scan, ceil(log2 P) rounds in which rank r combines what rank r - 2^j
   * held, then one shift to the next rank. `want_inclusive` also returns this rank's
   * inclusive value (the last rank's is the whole sequence's).
   */
  std::string exclusiveScan(const std::string& own, const std::string& identity,
                            const std::function<std::string(const std::string&,
                                                            const std::string&)>& op,
                            std::string* inclusive = nullptr) {
    std::string partial = own;
    for (int dist = 1; dist < m_size; dist *= 2) {
      const int to = m_rank + dist < m_size ? m_rank + dist : MPI_PROC_NULL;
      const int from = m_rank - dist >= 0 ? m_rank - dist : MPI_PROC_NULL;
      std::string got = exchange(partial, to, from);
      if (from != MPI_PROC_NULL) partial = op(got, partial);
    }
    std::string before = exchange(partial, m_rank + 1 < m_size ? m_rank + 1 : MPI_PROC_NULL,
                                  m_rank > 0 ? m_rank - 1 : MPI_PROC_NULL);
    if (inclusive) *inclusive = partial;
    return m_rank == 0 ? identity : before;
  }

  /// MPI_Alltoallv of T with per-rank counts in elements (displacements packed in rank order).
  template <typename T>
  void alltoallv(const std::vector<T>& send, const std::vector<std::size_t>& send_counts,
                 std::vector<T>& recv, const std::vector<std::size_t>& recv_counts) {
    const std::size_t P = static_cast<std::size_t>(m_size);
    std::vector<int> sc(P), sd(P), rc(P), rd(P);
    std::size_t s_at = 0, r_at = 0;
    for (std::size_t i = 0; i < std::size_t(m_size); ++i) {
      sc[i] = count(send_counts[i]);
      sd[i] = count(s_at);
      rc[i] = count(recv_counts[i]);
      rd[i] = count(r_at);
      s_at += send_counts[i];
      r_at += recv_counts[i];
    }
    recv.resize(r_at);
    std::size_t moved = 0;
    for (std::size_t i = 0; i < std::size_t(m_size); ++i) {
      if (int(i) != m_rank) moved += send_counts[i];
    }
    timed("MPI_Alltoallv", moved * sizeof(T), [&] { return MPI_Alltoallv(send.data(), sc.data(), sd.data(), datatype<T>(), recv.data(), rc.data(),
                        rd.data(), datatype<T>(), m_comm); });
  }

 private:
  /// An MPI count: refuses what does not fit an int rather than wrapping.
  int count(std::size_t n) const {
    if (n > std::size_t(INT_MAX)) {
      throw Error("kattn::mpi: a message of " + std::to_string(n) +
                      " elements exceeds MPI's int counts",
                  m_rank);
    }
    return int(n);
  }

  /// Sends `data` to `to` and receives from `from` (either MPI_PROC_NULL), sizes first.
  std::string exchange(const std::string& data, int to, int from) {
    std::uint64_t out_size = data.size(), in_size = 0;
    timed("MPI_Sendrecv", to == MPI_PROC_NULL ? 0 : sizeof out_size, [&] { return MPI_Sendrecv(&out_size, 1, MPI_UINT64_T, to, 0, &in_size, 1, MPI_UINT64_T, from, 0,
                       m_comm, MPI_STATUS_IGNORE); });
    std::string got(std::size_t(in_size), '\0');
    timed("MPI_Sendrecv", to == MPI_PROC_NULL ? 0 : data.size(), [&] { return MPI_Sendrecv(data.data(), count(data.size()), MPI_BYTE, to, 1, got.data(),
                       count(got.size()), MPI_BYTE, from, 1, m_comm, MPI_STATUS_IGNORE); });
    return got;
  }

  /// Runs one MPI call, adding its time and payload to the stats.
  template <typename Call>
  void timed(const char* name, std::size_t bytes, Call&& call) {
    const double t0 = MPI_Wtime();
    const int code = call();
    m_stats.mpi_seconds += MPI_Wtime() - t0;
    check(code, name);
    m_stats.bytes_sent += bytes;
    m_stats.messages += 1;
  }

  MPI_Comm m_comm = MPI_COMM_NULL;
  int m_rank = 0, m_size = 1;
  CallStats m_stats;
};

}  // namespace detail
}  // namespace mpi
}  // namespace kattn
