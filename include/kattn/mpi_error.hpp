#pragma once
/// \file
/// What kattn/mpi.hpp reports: the exception of a call over ranks that failed, and the cost of
/// a call on one rank.

#include <cstdint>
#include <stdexcept>
#include <string>

namespace kattn {
namespace mpi {

/**
 * \brief A call over ranks that failed: an MPI error, or an exception on one of the ranks
 * (thrown then on every rank, with that rank's message).
 */
class Error : public std::runtime_error {
 public:
  /// `rank` is the rank where it happened (-1: unknown).
  Error(const std::string& what, int rank) : std::runtime_error(what), m_rank(rank) {}
  /// The rank where the failure happened, -1 when unknown.
  int failedRank() const { return m_rank; }

 private:
  int m_rank;
};

/// What one call over ranks cost on this rank.
struct CallStats {
  double seconds = 0;             ///< the whole call
  double mpi_seconds = 0;         ///< inside MPI calls (waiting for peers included)
  std::uint64_t bytes_sent = 0;   ///< payload this rank handed to MPI
  std::uint64_t messages = 0;     ///< MPI calls that moved data
};

}  // namespace mpi
}  // namespace kattn
