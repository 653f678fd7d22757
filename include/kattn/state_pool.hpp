#pragma once
/// \file
/// StatePool: the streaming states of many sequences of one causal layer, in slots that a
/// server acquires when a conversation starts, advances in ragged calls
/// (KernelAttention::forward(tokens, pool, slots, offsets)), snapshots and rolls back for
/// speculative decoding, and releases when it ends; the whole pool saves to bytes and loads
/// back.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <istream>
#include <memory>
#include <ostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "limits.hpp"
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
  /// \throws std::invalid_argument for a capacity below 1 or a prototype of another batch;
  /// MemoryLimitError when the slots' sums would exceed kattn's memory limit.
  StatePool(Index capacity, const StreamingState<Scalar>& prototype)
      : m_slots(checkedCapacity(capacity, prototype), prototype),
        m_used(std::size_t(capacity), 0),
        m_busy(std::make_unique<std::atomic<bool>[]>(std::size_t(capacity))) {
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

  /// Acquires `slot` itself, reset to the empty state: for a server that restores its own
  /// table of which sequence holds which slot. \throws std::invalid_argument for a slot that
  /// does not exist or is in use already.
  void acquire(Slot slot) {
    if (!valid(slot)) throw std::invalid_argument(missingSlot("acquire", slot));
    if (m_used[std::size_t(slot)]) {
      throw std::invalid_argument("StatePool::acquire: slot " + std::to_string(slot) +
                                  " is in use already");
    }
    m_free.erase(std::find(m_free.begin(), m_free.end(), slot));
    m_used[std::size_t(slot)] = 1;
    m_slots[std::size_t(slot)].reset();
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
    requireFits(loaded, "StatePool::load: the saved state");
    target = std::move(loaded);
  }

  /**
   * \brief Writes the whole pool: which slots are in use, their states and the free list.
   *
   * The format, every integer an int64 in the host's byte order (as StreamingState's): the 8
   * bytes `KATTNPL1`, sizeof(Scalar), capacity(), mode() (0 recurrent, 1 exact); then per slot
   * in order its in-use flag (0 or 1) followed, for a slot in use, by exactly the bytes
   * `save(slot, os)` writes (StreamingState's one-row format); then the free list: its length
   * and the free slots in the order the pool keeps them (acquire() takes the last), so that a
   * loaded pool hands out the same slots.
   * \throws std::runtime_error when the stream fails.
   * \note O(capacity() + the states in use); a free slot costs 16 bytes.
   */
  void saveAll(std::ostream& os) const {
    os.write(kPoolMagic, sizeof(kPoolMagic));
    putInt(os, std::int64_t(sizeof(Scalar)));
    putInt(os, std::int64_t(capacity()));
    putInt(os, std::int64_t(mode()));
    for (std::size_t s = 0; s < m_slots.size(); ++s) {
      putInt(os, m_used[s] ? 1 : 0);
      if (m_used[s]) m_slots[s].save(os);
    }
    putInt(os, std::int64_t(m_free.size()));
    for (const Slot s : m_free) putInt(os, std::int64_t(s));
    if (!os) throw std::runtime_error("StatePool::saveAll: write failed");
  }

  /**
   * \brief Replaces the whole pool by one `saveAll` wrote: the slots in use, their states and
   * the free list. Everything is read and checked before anything is replaced: on any error
   * the pool is unchanged. Reads no further than the saved pool (the stream may hold more).
   *
   * Like acquire and release, not while a call is advancing any slot of the pool.
   * \throws std::runtime_error for a stream that is truncated, not a saved pool, of another
   * scalar type, or inconsistent (a flag other than 0 or 1, a free list that does not name
   * exactly the free slots); std::invalid_argument for a saved pool of another capacity or
   * mode, or whose states belong to another layer (sizes, chunk, window or decay).
   */
  void loadAll(std::istream& is) {
    char magic[sizeof(kPoolMagic)];
    is.read(magic, sizeof(magic));
    if (!is || std::memcmp(magic, kPoolMagic, sizeof(kPoolMagic)) != 0) {
      throw std::runtime_error("StatePool::loadAll: not a saved kattn state pool");
    }
    const std::int64_t scalar = getInt(is);
    if (scalar != std::int64_t(sizeof(Scalar))) {
      throw std::runtime_error("StatePool::loadAll: saved with " + std::to_string(scalar) +
                               "-byte scalars, this pool has " + std::to_string(sizeof(Scalar)) +
                               "-byte ones (another scalar type)");
    }
    const std::int64_t saved_capacity = getInt(is);
    if (saved_capacity != std::int64_t(capacity())) {
      throw std::invalid_argument("StatePool::loadAll: saved from a pool of capacity " +
                                  std::to_string(saved_capacity) + ", this pool has " +
                                  std::to_string(capacity()));
    }
    const std::int64_t saved_mode = getInt(is);
    if (saved_mode != std::int64_t(mode())) {
      throw std::invalid_argument(std::string("StatePool::loadAll: saved in ") +
                                  (saved_mode == std::int64_t(StreamingMode::Exact) ? "exact"
                                   : saved_mode == std::int64_t(StreamingMode::Recurrent)
                                       ? "recurrent"
                                       : "an unknown") +
                                  " mode, this pool is in " +
                                  (mode() == StreamingMode::Exact ? "exact" : "recurrent") +
                                  " mode");
    }
    std::vector<char> used(m_slots.size(), 0);
    std::vector<std::pair<std::size_t, StreamingState<Scalar>>> loaded;
    for (std::size_t s = 0; s < m_slots.size(); ++s) {
      const std::string where = "StatePool::loadAll: slot " + std::to_string(s);
      const std::int64_t flag = getInt(is);
      if (flag != 0 && flag != 1) {
        throw std::runtime_error(where + ": corrupt in-use flag " + std::to_string(flag));
      }
      if (!flag) continue;
      used[s] = 1;
      try {
        loaded.emplace_back(s, StreamingState<Scalar>::load(is));
      } catch (const std::runtime_error& e) {
        throw std::runtime_error(where + ": " + e.what());
      }
      requireFits(loaded.back().second, where);
    }
    const std::int64_t free_count = getInt(is);
    const std::int64_t unused = std::int64_t(std::count(used.begin(), used.end(), 0));
    if (free_count != unused) {
      throw std::runtime_error("StatePool::loadAll: corrupt free list (" +
                               std::to_string(free_count) + " entries for " +
                               std::to_string(unused) + " free slots)");
    }
    std::vector<Slot> free_list;
    free_list.reserve(std::size_t(unused));
    std::vector<char> listed(m_slots.size(), 0);
    for (std::int64_t i = 0; i < free_count; ++i) {
      const std::int64_t s = getInt(is);
      if (s < 0 || s >= std::int64_t(capacity()) || used[std::size_t(s)] ||
          listed[std::size_t(s)]) {
        throw std::runtime_error("StatePool::loadAll: corrupt free list (entry " +
                                 std::to_string(s) + " is not a free slot, or twice)");
      }
      listed[std::size_t(s)] = 1;
      free_list.push_back(Slot(s));
    }
    // Everything is checked: nothing below throws.
    for (auto& [s, state] : loaded) m_slots[s] = std::move(state);
    m_used = std::move(used);
    m_free = std::move(free_list);
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
  static constexpr char kPoolMagic[8] = {'K', 'A', 'T', 'T', 'N', 'P', 'L', '1'};

  /// The capacity, checked before the members are sized from it.
  static std::size_t checkedCapacity(Index capacity, const StreamingState<Scalar>& prototype) {
    if (capacity < 1) throw std::invalid_argument("StatePool: capacity must be at least 1");
    if (prototype.batch() != 1) throw std::invalid_argument("StatePool: the prototype has one row");
    const double per_slot = double(prototype.heads()) *
                            (double(prototype.features()) * double(prototype.valueDim()) +
                             2 * double(prototype.features()));
    checkAllocation("a StatePool of " + std::to_string(capacity) + " slots",
                    double(capacity) * per_slot, sizeof(Scalar));
    return std::size_t(capacity);
  }

  /// Refuses a state that this pool's layer would not read as its own: another batch, sizes,
  /// chunk, window, decay or mode. A finished stream (one that ended inside a chunk) is fine:
  /// it is what the slot would hold.
  void requireFits(const StreamingState<Scalar>& s, const std::string& what) const {
    const StreamingState<Scalar>& own = m_slots.front();
    if (s.batch() != 1 || s.heads() != own.heads() || s.features() != own.features() ||
        s.valueDim() != own.valueDim()) {
      throw std::invalid_argument(
          what + " is a state of [B, N, F, d_v] = [" + std::to_string(s.batch()) + ", " +
          std::to_string(s.heads()) + ", " + std::to_string(s.features()) + ", " +
          std::to_string(s.valueDim()) + "], this pool's slots are [1, " +
          std::to_string(own.heads()) + ", " + std::to_string(own.features()) + ", " +
          std::to_string(own.valueDim()) + "]");
    }
    if (s.chunk() != own.chunk() || s.window() != own.window() || s.decay() != own.decay()) {
      throw std::invalid_argument(what + " belongs to another layer (chunk, window or decay "
                                         "differ)");
    }
    if (s.mode() != own.mode()) throw std::invalid_argument(what + " is in the other mode");
  }

  static void putInt(std::ostream& os, std::int64_t v) {
    os.write(reinterpret_cast<const char*>(&v), sizeof(v));
  }
  static std::int64_t getInt(std::istream& is) {
    std::int64_t v = 0;
    is.read(reinterpret_cast<char*>(&v), sizeof(v));
    if (!is) throw std::runtime_error("StatePool::loadAll: truncated stream");
    return v;
  }

  bool valid(Slot slot) const { return slot >= 0 && slot < capacity(); }

  std::string missingSlot(const char* what, Slot slot) const {
    return std::string("StatePool::") + what + ": slot " + std::to_string(slot) +
           " does not exist (capacity " + std::to_string(capacity()) + ")";
  }

  void requireInUse(Slot slot, const char* what) const {
    if (!valid(slot)) throw std::invalid_argument(missingSlot(what, slot));
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
