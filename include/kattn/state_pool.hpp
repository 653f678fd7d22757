#pragma once
/// \file
/// StatePool: the streaming states of many sequences of one causal layer, in slots that a
/// server acquires when a conversation starts, advances in ragged calls
/// (KernelAttention::forward(tokens, pool, slots, offsets)), snapshots and rolls back for
/// speculative decoding, and releases when it ends.

#include <atomic>
#include <istream>
#include <memory>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "streaming.hpp"
#include "tensor.hpp"

namespace kattn {

/**
 * \brief Streaming states for up to `capacity()` sequences of one causal layer, each in a slot.
 *
 * Made by KernelAttention::makePool. A slot holds exactly what a StreamingState of one batch
 * row holds, in the pool's mode (exact or recurrent), and is advanced by the layer's ragged
 * forward as that state would be. All slots are made with the pool; acquiring, releasing,
 * resetting and copying a slot allocate nothing in recurrent mode (in exact mode, a copy may
 * allocate the terms of the source's window).
 *
 * A pool may be used by one call at a time per slot: a call that names a slot twice, or a slot
 * that a call on another thread is advancing, is refused (std::logic_error) by a flag per slot
 * before anything advances; concurrent calls on different slots of one pool are fine, as long as no thread acquires or releases slots meanwhile (the slot
 * table is not locked: keep acquire/release on the server's scheduling thread).
 */
template <typename Scalar>
class StatePool {
 public:
  /// A slot's index, in [0, capacity()).
  using Slot = Index;

  StatePool() = default;

  /// `capacity` slots, each a copy of `prototype` (a fresh one-row state of the layer).
  StatePool(Index capacity, const StreamingState<Scalar>& prototype)
      : m_slots(std::size_t(capacity), prototype),
        m_used(std::size_t(capacity), 0),
        m_busy(std::make_unique<std::atomic<bool>[]>(std::size_t(capacity))) {
    if (capacity < 1) throw std::invalid_argument("StatePool: capacity must be at least 1");
    if (prototype.batch() != 1) throw std::invalid_argument("StatePool: the prototype has one row");
    m_free.reserve(std::size_t(capacity));
    for (Index s = capacity; s-- > 0;) m_free.push_back(s);
  }

  /// Slots in the pool.
  Index capacity() const { return Index(m_slots.size()); }
  /// Slots acquired and not released.
  Index inUse() const { return capacity() - Index(m_free.size()); }
  /// The pool's streaming mode (every slot's).
  StreamingMode mode() const { return m_slots.empty() ? StreamingMode::Exact : m_slots[0].mode(); }

  /// A free slot, reset to the empty state. \throws std::runtime_error when all are in use.
  Slot acquire() {
    if (m_free.empty()) {
      throw std::runtime_error("StatePool: all " + std::to_string(capacity()) +
                               " slots are in use (release one, or make a larger pool)");
    }
    const Slot s = m_free.back();
    m_free.pop_back();
    m_used[std::size_t(s)] = 1;
    m_slots[std::size_t(s)].reset();
    return s;
  }

  /// Returns `slot` to the pool. \throws std::invalid_argument for a slot not in use.
  void release(Slot slot) {
    requireInUse(slot, "release");
    m_used[std::size_t(slot)] = 0;
    m_free.push_back(slot);
  }

  /// Empties `slot`'s state: the sequence starts over.
  void reset(Slot slot) { stateOf(slot, "reset").reset(); }

  /// Whether `slot` is acquired.
  bool inUse(Slot slot) const { return valid(slot) && m_used[std::size_t(slot)]; }

  /// Tokens `slot` has seen since it was acquired or reset.
  Index tokens(Slot slot) const { return stateOf(slot, "tokens").tokens(); }

  /// Copies `from`'s state into `to` (both in use): a snapshot before a speculative step, or
  /// the rollback to it. Byte-exact: `to` continues exactly as `from` would.
  void copy(Slot from, Slot to) {
    const StreamingState<Scalar>& source = stateOf(from, "copy");
    StreamingState<Scalar>& target = stateOf(to, "copy");
    if (from != to) target = source;
  }

  /// A new slot holding a copy of `slot`'s state (for speculative decoding).
  Slot snapshot(Slot slot) {
    stateOf(slot, "snapshot");
    const Slot s = acquire();
    copy(slot, s);
    return s;
  }

  /// `slot` back to the state `snapshot` holds; the snapshot stays (release it when done).
  void rollback(Slot slot, Slot snapshot) { copy(snapshot, slot); }

  /// Writes `slot`'s state in StreamingState's format (a one-row state): StreamingState::load
  /// reads it, and so does `load` here.
  void save(Slot slot, std::ostream& os) const { stateOf(slot, "save").save(os); }

  /// Replaces `slot`'s state by one `save` (here, or StreamingState::save of a one-row state of
  /// the same layer) wrote. \throws std::invalid_argument for a state of another shape or layer.
  void load(Slot slot, std::istream& is) {
    StreamingState<Scalar>& target = stateOf(slot, "load");
    StreamingState<Scalar> loaded = StreamingState<Scalar>::load(is);
    loaded.requireCompatible(1, target.heads(), target.features(), target.valueDim(),
                             target.chunk(), target.window(), target.decay());
    if (loaded.mode() != target.mode()) {
      throw std::invalid_argument("StatePool::load: the saved state is in the other mode");
    }
    target = std::move(loaded);
  }

  /// The state in `slot`, read-only (its kv(), kSum(), tokens()).
  const StreamingState<Scalar>& state(Slot slot) const { return stateOf(slot, "state"); }

  /// \private Marks every slot of a call busy until endCall; refuses a slot that is busy
  /// already (twice in the call, or in a call running on another thread), leaving none marked.
  void beginCall(const std::vector<Slot>& slots) {
    for (std::size_t i = 0; i < slots.size(); ++i) {
      if (m_busy[std::size_t(slots[i])].exchange(true, std::memory_order_acquire)) {
        for (std::size_t j = 0; j < i; ++j) {
          m_busy[std::size_t(slots[j])].store(false, std::memory_order_release);
        }
        throw std::logic_error("StatePool: slot " + std::to_string(slots[i]) +
                               " appears twice in one call, or in two calls at once");
      }
    }
  }
  /// \private Ends what beginCall started.
  void endCall(const std::vector<Slot>& slots) {
    for (const Slot s : slots) m_busy[std::size_t(s)].store(false, std::memory_order_release);
  }
  /// \private The state in `slot` (in use, checked) for the call that marked it busy.
  StreamingState<Scalar>& callState(Slot slot) { return stateOf(slot, "forward"); }

 private:
  bool valid(Slot slot) const { return slot >= 0 && slot < capacity(); }

  void requireInUse(Slot slot, const char* what) const {
    if (!valid(slot)) {
      throw std::invalid_argument(std::string("StatePool::") + what + ": slot " +
                                  std::to_string(slot) + " does not exist (capacity " +
                                  std::to_string(capacity()) + ")");
    }
    if (!m_used[std::size_t(slot)]) {
      throw std::invalid_argument(std::string("StatePool::") + what + ": slot " +
                                  std::to_string(slot) + " is not in use (released, or never "
                                  "acquired)");
    }
  }

  const StreamingState<Scalar>& stateOf(Slot slot, const char* what) const {
    requireInUse(slot, what);
    return m_slots[std::size_t(slot)];
  }
  StreamingState<Scalar>& stateOf(Slot slot, const char* what) {
    requireInUse(slot, what);
    return m_slots[std::size_t(slot)];
  }

  std::vector<StreamingState<Scalar>> m_slots;
  std::vector<char> m_used;
  std::vector<Slot> m_free;
  std::unique_ptr<std::atomic<bool>[]> m_busy;
};

}  // namespace kattn
