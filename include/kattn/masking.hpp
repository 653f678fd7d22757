#pragma once
/// \file
/// Masking policies: which keys a query attends to, and the core that computes attention under
/// that masking. They know nothing of feature maps: a policy's core is a template on one.
///
/// A policy has `static constexpr bool causal`, `static Policy fromConfig(const LayerConfig&)`
/// and `template <class Scalar, class FeatureMap> using Core`, the type whose static members
/// run its path (detail/bidirectional_core.hpp, detail/causal_core.hpp).

#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>

#include "config.hpp"
#include "tensor.hpp"

namespace kattn {

namespace detail {
template <typename Scalar, typename FeatureMap>
struct BidirectionalCore;
template <typename Scalar, typename FeatureMap>
struct CausalCore;
}  // namespace detail

/// How the bidirectional kernel path (SPEC 3.2) is computed: through the explicit T x S
/// matrix, the low-rank state, or whichever a cost model says is cheaper (Auto).
enum class CoreForm { Auto, Explicit, LowRank };

/**
 * \brief Every query attends to every (unpadded) key: SPEC 3.1 and 3.2.
 *
 * Its core (detail/bidirectional_core.hpp) computes attention per batch row in the low-rank
 * form a_t = q'_t KV / (q'_t z + eps), streamed over blocks of keys, then of queries; or, for
 * short sequences where the cost model finds it cheaper (CoreForm), through the explicit
 * T x S matrix; or, with is_short_seq, by the softmax over kernel scores. The key-side
 * summary (KV, z) is public: summarizeKeys, combine and readout (core.hpp).
 */
struct Bidirectional {
  /// Whether queries see only earlier keys.
  static constexpr bool causal = false;
  /// The masking's name in messages.
  static constexpr const char* name = "bidirectional";
  /// The core that computes this masking's attention.
  template <typename Scalar, typename FeatureMap>
  using Core = detail::BidirectionalCore<Scalar, FeatureMap>;

  /// Throws unless the config asks for a bidirectional layer.
  static Bidirectional fromConfig(const LayerConfig& config) {
    if (config.use_causal_windowed) {
      throw std::invalid_argument(
          "use_causal_windowed: the config asks for causal attention but the layer type uses "
          "kattn::Bidirectional masking; use kattn::CausalWindowed");
    }
    return {};
  }
};

/**
 * \brief Causal windowed chunked attention (SPEC 3.3): chunks of `chunk` tokens attend
 * bidirectionally inside the chunk and to the `window - 1` previous chunks, chunk c - j
 * weighted by decay^j (1 with no decay).
 *
 * chunk = 1 and window >= number of chunks give token-level causal attention.
 *
 * Its core (detail/causal_core.hpp) feeds each head's rows, block by block, to a state of
 * chunk sums (detail/causal_state.hpp): S_c = sum_{j<W} gamma^j KV_{c-j}, in a fixed window
 * when W covers the sequence, else a sliding one. The same state, carried across calls, is a
 * StreamingState (streaming.hpp): a causal call takes a state in and leaves the state out.
 */
struct CausalWindowed {
  /// Whether queries see only earlier keys.
  static constexpr bool causal = true;
  /// The masking's name in messages.
  static constexpr const char* name = "causal_windowed";
  /// The core that computes this masking's attention.
  template <typename Scalar, typename FeatureMap>
  using Core = detail::CausalCore<Scalar, FeatureMap>;

  Index chunk = 1;               ///< C >= 1
  Index window = 3;              ///< W >= 1, in chunks
  std::optional<double> decay;   ///< gamma in [0, 1], or none
  Padding padding = Padding::None;  ///< where a length not a multiple of `chunk` is padded

  /// Throws unless the config asks for causal windowed attention with valid parameters.
  static CausalWindowed fromConfig(const LayerConfig& config) {
    if (!config.use_causal_windowed) {
      throw std::invalid_argument(
          "use_causal_windowed: the layer type uses kattn::CausalWindowed masking but the config "
          "has use_causal_windowed = false");
    }
    CausalWindowed p;
    p.chunk = config.causal_chunk_length;
    p.window = config.causal_window_length;
    p.decay = config.causal_window_decay;
    p.padding = parsePadding(config.causal_padding);
    return p;
  }

  /// Decay per chunk of distance: gamma, or 1 without decay.
  double gamma() const { return decay ? *decay : 1.0; }

  /// Padding rows put before the first real position so that the length is a multiple of C.
  /// Throws for padding none and a length that is not a multiple of C.
  Index leadingPad(Index length) const {
    const Index rem = length % chunk;
    if (rem == 0) return 0;
    switch (padding) {
      case Padding::Left: return chunk - rem;
      case Padding::Right: return 0;
      case Padding::None: break;
    }
    throw std::invalid_argument("query: sequence length " + std::to_string(length) +
                                " is not a multiple of causal_chunk_length " +
                                std::to_string(chunk) + " and causal_padding is none");
  }
};

}  // namespace kattn
