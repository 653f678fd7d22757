#pragma once
/// \file
/// Masking policies: which keys a query attends to. They know nothing of feature maps.
///
/// A policy has `static constexpr bool causal` and `static Policy fromConfig(const LayerConfig&)`.

#include <cmath>
#include <optional>
#include <stdexcept>
#include <string>

#include "config.hpp"
#include "tensor.hpp"

namespace kattn {

/// Every query attends to every (unpadded) key: SPEC 3.1 and 3.2.
struct Bidirectional {
  static constexpr bool causal = false;
  static constexpr const char* name = "bidirectional";

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
 */
struct CausalWindowed {
  static constexpr bool causal = true;
  static constexpr const char* name = "causal_windowed";

  Index chunk = 1;               ///< C >= 1
  Index window = 3;              ///< W >= 1, in chunks
  std::optional<double> decay;   ///< gamma in [0, 1], or none
  Padding padding = Padding::None;

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
