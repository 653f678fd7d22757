#pragma once
/// \file
/// The training argument of forward() and attend(), and the number of a training call
/// (docs/training.md, "Training mode: dropout and redraw").

#include <cstdint>
#include <optional>

namespace kattn {

/**
 * \brief The number of a training-mode forward call. It fixes the call's dropout mask and its
 * redrawn projection: a forward given it draws that call's, and a backward given it sees
 * them. KernelAttention::takeTrainingCall() hands out the layer's next number.
 *
 * A struct rather than a bare integer so that a `bool training` passed where a call number is
 * expected does not compile (std::optional<std::uint64_t> would take `true` as call 1).
 */
struct TrainingCall {
  std::uint64_t number = 0;  ///< the call's number
};

/**
 * \brief What forward() and attend() take as `training`: `false` (inference), `true`
 * (training mode, numbered by the layer's counter), or a TrainingCall (training mode with
 * that number, the counter left alone).
 */
class Training {
 public:
  // Both implicit, so that forward(..., true) and forward(..., TrainingCall{k}) read as the
  // flag they replace.
  /// Inference (false) or training mode numbered by the layer's counter (true).
  Training(bool on) : m_on(on) {}
  /// Training mode with the given number.
  Training(TrainingCall call) : m_on(true), m_call(call.number) {}

  /// Whether the call runs in training mode.
  bool on() const { return m_on; }
  /// The number given, if one was.
  const std::optional<std::uint64_t>& call() const { return m_call; }

 private:
  bool m_on = false;
  std::optional<std::uint64_t> m_call;
};

}  // namespace kattn
