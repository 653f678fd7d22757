#pragma once
/// \file
/// ThreadPool: where a forward runs its parallel work (Eigen's non-blocking pool underneath).
/// kattn touches no global threading state: a layer uses the pool it is given, or the
/// process-wide default pool that kattn creates on first use and uses for nothing else.

#include <algorithm>
#include <atomic>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include <unsupported/Eigen/CXX11/ThreadPool>

#include "tensor.hpp"

namespace kattn {

namespace detail {

/// An atomic that copies its value: copies of a layer start from the same state (its weights'
/// flag, its training-call count).
template <typename T>
struct CopyableAtomic {
  std::atomic<T> value{};
  CopyableAtomic() = default;
  CopyableAtomic(const CopyableAtomic& o) : value(o.value.load()) {}
  CopyableAtomic& operator=(const CopyableAtomic& o) {
    value = o.value.load();
    return *this;
  }
};

}  // namespace detail

/**
 * \brief A fixed set of threads for kattn's parallel loops.
 *
 * `threads` counts every thread that works on a forward, the calling thread included, so
 * ThreadPool(1) runs everything on the caller and ThreadPool(2) adds one worker. Safe to
 * share between layers and between concurrent forwards (each forward waits only for its own
 * tasks, and the caller works on them too, so concurrent callers cannot deadlock).
 */
class ThreadPool {
 public:
  /// \throws std::invalid_argument when threads < 1.
  explicit ThreadPool(int threads) : m_threads(threads) {
    if (threads < 1) {
      throw std::invalid_argument("ThreadPool: threads must be >= 1, got " +
                                  std::to_string(threads));
    }
    if (threads > 1) m_pool = std::make_unique<Eigen::ThreadPool>(threads - 1);
  }

  /// Threads that work on a forward, the caller included.
  int threads() const { return m_threads; }

  /**
   * Runs f(i) for i in [0, n), spread over the pool; returns when all are done. The first
   * exception thrown by any f(i) is rethrown here (the remaining items still run).
   */
  template <typename F>
  void parallelFor(Index n, const F& f) const {
    if (n <= 0) return;
    if (!m_pool || n == 1) {
      for (Index i = 0; i < n; ++i) f(i);
      return;
    }
    const Index helpers = std::min<Index>(n - 1, m_threads - 1);
    std::atomic<Index> next{0};
    std::exception_ptr error;
    std::mutex error_mutex;
    auto work = [&] {
      for (Index i; (i = next.fetch_add(1)) < n;) {
        try {
          f(i);
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mutex);
          if (!error) error = std::current_exception();
        }
      }
    };
    Eigen::Barrier done(static_cast<unsigned>(helpers));
    for (Index h = 0; h < helpers; ++h) {
      m_pool->Schedule([&] {
        work();
        done.Notify();
      });
    }
    work();
    done.Wait();
    if (error) std::rethrow_exception(error);
  }

 private:
  int m_threads;
  std::unique_ptr<Eigen::ThreadPool> m_pool;
};

/// The pool layers use unless given another: one thread per hardware thread, created on first
/// use (thread-safe) and shared by every layer of the process.
inline std::shared_ptr<const ThreadPool> defaultThreadPool() {
  static const std::shared_ptr<const ThreadPool> pool = std::make_shared<ThreadPool>(
      std::max(1, static_cast<int>(std::thread::hardware_concurrency())));
  return pool;
}

}  // namespace kattn
