#pragma once
/// \file
/// \private Reusable buffers of a layer's passes: a free list of per-task buffer sets, so that
/// forwards of the same shapes reuse their memory instead of paying for fresh pages every call.

#include <memory>
#include <mutex>
#include <vector>

#include "../tensor.hpp"

namespace kattn {
namespace detail {

/// Buffers of one batch row's pipeline, or of one head task.
template <typename Scalar>
struct RowWork {
  Matrix<Scalar> qs, ks, vs;   ///< scaled projections of a block [L, N d] (values [L, N d_v])
  Matrix<Scalar> qf, kf;       ///< their features [L, N F]
  Matrix<Scalar> heads;        ///< attention heads [L, N d_v]
  Matrix<Scalar> x, v, f;      ///< per-head blocks of the streamed passes
  Vector<Scalar> d;            ///< normalisers
};

/// The free list; shared by copies of a layer (it holds only scratch space).
template <typename Scalar>
struct WorkspacePool {
  std::mutex mutex;
  std::vector<std::unique_ptr<RowWork<Scalar>>> free;
};

/// A RowWork borrowed from a WorkspacePool and returned on destruction.
template <typename Scalar>
class Workspace {
 public:
  explicit Workspace(WorkspacePool<Scalar>& pool) : m_pool(pool) {
    std::lock_guard<std::mutex> lock(pool.mutex);
    if (!pool.free.empty()) {
      m_work = std::move(pool.free.back());
      pool.free.pop_back();
    } else {
      m_work = std::make_unique<RowWork<Scalar>>();
    }
  }
  ~Workspace() {
    std::lock_guard<std::mutex> lock(m_pool.mutex);
    m_pool.free.push_back(std::move(m_work));
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  RowWork<Scalar>& operator*() const { return *m_work; }
  RowWork<Scalar>* operator->() const { return m_work.get(); }

 private:
  WorkspacePool<Scalar>& m_pool;
  std::unique_ptr<RowWork<Scalar>> m_work;
};

}  // namespace detail
}  // namespace kattn
