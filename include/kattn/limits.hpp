#pragma once
/// \file
/// The memory limit: kattn refuses an allocation that a configuration, an input or a file
/// asks for beyond it, before allocating, with the size in the message.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace kattn {

/// Thrown when one object kattn is about to allocate (weights, a projection, an output, a
/// working buffer, a streaming state, a file image, a decoded tensor) would exceed the limit.
/// A `std::length_error`, so callers that treat it as a bad request can catch logic errors.
class MemoryLimitError : public std::length_error {
 public:
  using std::length_error::length_error;
};

/// The default limit: 4 GiB per allocation.
inline constexpr std::size_t kDefaultMemoryLimit = std::size_t(4) << 30;

namespace detail {
inline std::atomic<std::size_t>& memoryLimitStorage() {
  static std::atomic<std::size_t> limit{kDefaultMemoryLimit};
  return limit;
}

/// "1.50 GiB", "12.0 MiB", "512 bytes".
inline std::string byteString(double bytes) {
  char buf[64];
  if (bytes >= double(1 << 30)) {
    std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / double(1 << 30));
  } else if (bytes >= double(1 << 20)) {
    std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / double(1 << 20));
  } else {
    std::snprintf(buf, sizeof buf, "%.0f bytes", bytes);
  }
  return buf;
}
}  // namespace detail

/// The largest single allocation kattn makes, in bytes (process-wide; default 4 GiB). Set it
/// once at start-up; calls in flight keep the limit they read.
inline void setMemoryLimit(std::size_t bytes) { detail::memoryLimitStorage().store(bytes); }

/// The current limit in bytes.
inline std::size_t memoryLimit() { return detail::memoryLimitStorage().load(); }

/// Throws MemoryLimitError naming `what` when `count` elements of `element_size` bytes exceed
/// the limit. Takes the count as a double so that an overflowing product is still refused.
inline void checkAllocation(const std::string& what, double count, std::size_t element_size) {
  const double bytes = count * double(element_size);
  if (!(bytes <= double(memoryLimit()))) {
    throw MemoryLimitError("kattn: " + what + " needs " + detail::byteString(bytes) +
                           ", more than the memory limit of " +
                           detail::byteString(double(memoryLimit())) +
                           " (kattn::setMemoryLimit)");
  }
}

/// As above, with the description made only when the request is refused: for per-call checks,
/// which then cost a comparison instead of building a message.
template <typename Describe, typename = decltype(std::string(std::declval<Describe&>()()))>
void checkAllocation(double count, std::size_t element_size, Describe&& what) {
  if (count * double(element_size) <= double(memoryLimit())) return;
  checkAllocation(std::string(what()), count, element_size);
}

}  // namespace kattn
