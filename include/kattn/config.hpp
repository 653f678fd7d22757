#pragma once
/// \file
/// LayerConfig: every option of the reference layer under its Keras name.

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

namespace kattn {

namespace detail {

/// A number for an error message: the shortest of up to 10 significant digits ("1", "0.25",
/// "1e-07"), not std::to_string's fixed six decimals ("1.000000").
inline std::string numberString(double x) {
  std::ostringstream os;
  os.precision(10);
  os << x;
  return os.str();
}

/// Throws std::invalid_argument, naming `what`, for the one seed the reference cannot use: it
/// draws from `tf.constant([seed, seed + 1])` (int32 when both fit, otherwise int64, the same
/// stream as TF sign-extends int32 seeds), so every seed but INT64_MAX works.
inline void checkReferenceSeed(const char* what, std::int64_t seed) {
  if (seed == std::numeric_limits<std::int64_t>::max()) {
    throw std::invalid_argument(std::string(what) +
                                ": the reference draws from the pair [seed, seed + 1], so seed "
                                "must be below 9223372036854775807, got " +
                                std::to_string(seed));
  }
}

}  // namespace detail

/// Where the causal windowed pass pads a sequence whose length is not a multiple of the chunk.
enum class Padding { None, Left, Right };

/// Parses the reference's `causal_padding` value: absent (None), "none", "left" or "right".
inline Padding parsePadding(const std::optional<std::string>& value) {
  if (!value || *value == "none" || value->empty()) return Padding::None;
  if (*value == "left") return Padding::Left;
  if (*value == "right") return Padding::Right;
  throw std::invalid_argument("causal_padding: expected none, \"left\" or \"right\", got \"" +
                              *value + "\"");
}

/// The names `feature_transform` accepts, in the reference's order.
inline constexpr const char* kFeatureTransforms[] = {"elu",     "relu",   "square",  "exp",
                                                     "expplus", "expmod", "identity"};

/// Comma-separated list of kFeatureTransforms, for error messages.
inline std::string featureTransformList() {
  std::string out;
  for (const char* name : kFeatureTransforms) out += (out.empty() ? "" : ", ") + std::string(name);
  return out;
}

/// The Keras initializer names `kernel_initializer` and `bias_initializer` accept.
inline constexpr const char* kInitializers[] = {
    "glorot_uniform", "glorot_normal", "he_uniform",    "he_normal",
    "lecun_uniform",  "lecun_normal",  "zeros",         "ones",
    "constant",       "random_normal", "truncated_normal", "random_uniform"};

/**
 * \brief A Keras weight initializer: its snake_case name and the parameters the named ones
 * read (Keras's defaults). Used only for weights the user does not set.
 */
struct Initializer {
  std::string name;            ///< one of kInitializers
  double mean = 0.0;           ///< random_normal, truncated_normal
  double stddev = 0.05;        ///< random_normal, truncated_normal
  double minval = -0.05;       ///< random_uniform
  double maxval = 0.05;        ///< random_uniform
  double value = 0.0;          ///< constant

  /// Same name and parameters.
  bool operator==(const Initializer& o) const {
    return name == o.name && mean == o.mean && stddev == o.stddev && minval == o.minval &&
           maxval == o.maxval && value == o.value;
  }
  /// Not operator==.
  bool operator!=(const Initializer& o) const { return !(*this == o); }

  /// Throws std::invalid_argument naming `option` for an unknown name or a bad parameter.
  void validate(const std::string& option) const {
    bool known = false;
    std::string list;
    for (const char* n : kInitializers) {
      known = known || name == n;
      list += (list.empty() ? "" : ", ") + std::string(n);
    }
    if (!known) {
      throw std::invalid_argument(option + ": unknown initializer \"" + name + "\"; valid: " +
                                  list);
    }
    if (!std::isfinite(mean) || !std::isfinite(value) || !(stddev >= 0.0) ||
        !std::isfinite(stddev) || !(minval <= maxval) || !std::isfinite(minval) ||
        !std::isfinite(maxval)) {
      std::ostringstream os;
      os << option << ": invalid parameters for " << name << " (mean " << mean << ", stddev "
         << stddev << ", minval " << minval << ", maxval " << maxval << ", value " << value
         << "): stddev must be >= 0, minval <= maxval, all finite";
      throw std::invalid_argument(os.str());
    }
  }
};

/// `causal_window_length` for "no window": every earlier chunk is seen (plain causal
/// attention). A number of chunks larger than any sequence, so a Keras config round-trips it
/// as an int; from it up, an exact streaming state keeps only its running sums (nothing ever
/// leaves the window), the size of a recurrent one.
inline constexpr int kUnboundedWindow = 1 << 30;

/**
 * \brief Configuration of a kernel attention layer, named as the reference's Keras config.
 *
 * Users map a TF/Keras `get_config()` one to one onto these fields. Defaults are the
 * reference's. A layer validates its config at construction and keeps it immutable.
 */
struct LayerConfig {
  int num_heads = 1;                         ///< N
  int key_dim = 64;                          ///< d, per-head size of queries and keys
  std::optional<int> value_dim;              ///< d_v; defaults to key_dim
  std::optional<int> output_shape;           ///< O; defaults to the query's last dim
  bool use_bias = true;                      ///< biases in the four dense projections
  double dropout = 0.0;                      ///< rate on the attention heads, training only
  std::string feature_transform = "exp";     ///< one of kFeatureTransforms
  int num_random_features = 256;             ///< m; m <= 0 means no projection
  std::int64_t seed = 0;                     ///< fixes the projection (pair [seed, seed+1])
  bool redraw = false;                       ///< new projection per training-mode forward
  bool is_short_seq = false;                 ///< softmax over kernel scores (SPEC 3.1)
  int begin_kernel = 0;                      ///< queries t < K use the softmax part
  std::optional<double> scale;               ///< defaults to 1/sqrt(key_dim)
  bool scale_by_length = false;              ///< s_b = s ln(sum mask_b) / ln 512
  bool use_causal_windowed = false;          ///< causal windowed chunked attention
  int causal_chunk_length = 1;               ///< C
  int causal_window_length = 3;              ///< W, in chunks; kUnboundedWindow: none
  std::optional<double> causal_window_decay; ///< gamma; absent: no decay
  std::optional<std::string> causal_padding; ///< absent/"none", "left", "right"
  /// Kernels the user does not set are drawn from it, seeded by `seed` (Keras default).
  Initializer kernel_initializer{"glorot_uniform"};
  /// Biases the user does not set are drawn from it, seeded by `seed` (Keras default).
  Initializer bias_initializer{"zeros"};

  /// d_v as resolved by the reference (value_dim or key_dim).
  int resolvedValueDim() const { return value_dim ? *value_dim : key_dim; }
  /// s as resolved by the reference (scale or 1/sqrt(key_dim)).
  double resolvedScale() const { return scale ? *scale : 1.0 / std::sqrt(double(key_dim)); }
  /// Whether a random projection is used (num_random_features > 0).
  bool hasProjection() const { return num_random_features > 0; }
  /// Feature size: m with a projection, key_dim without.
  int featureDim() const { return hasProjection() ? num_random_features : key_dim; }

  /// Throws std::invalid_argument naming the first invalid option (SPEC section 5).
  void validate() const {
    auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
    auto positive = [&](const char* name, long long v) {
      if (v < 1) fail(std::string(name) + ": expected >= 1, got " + std::to_string(v));
    };
    positive("num_heads", num_heads);
    positive("key_dim", key_dim);
    if (value_dim) positive("value_dim", *value_dim);
    if (output_shape) positive("output_shape", *output_shape);
    bool known = false;
    for (const char* name : kFeatureTransforms) known = known || feature_transform == name;
    if (!known) {
      fail("feature_transform: unknown \"" + feature_transform + "\"; valid: " +
           featureTransformList());
    }
    if (!(dropout >= 0.0 && dropout < 1.0)) {
      fail("dropout: expected a rate in [0, 1), got " + detail::numberString(dropout));
    }
    if (redraw && !hasProjection()) {
      fail("redraw: num_random_features is " + std::to_string(num_random_features) +
           " (no projection), so there is nothing to redraw");
    }
    detail::checkReferenceSeed("seed", seed);
    if (begin_kernel < 0) fail("begin_kernel: expected >= 0, got " + std::to_string(begin_kernel));
    if (scale && !std::isfinite(*scale)) fail("scale: expected a finite number");
    if (use_causal_windowed && is_short_seq) {
      fail("use_causal_windowed and is_short_seq are mutually exclusive");
    }
    if (use_causal_windowed && begin_kernel > 0) {
      fail("begin_kernel: not supported together with use_causal_windowed (the reference fails "
           "there too); got begin_kernel = " + std::to_string(begin_kernel));
    }
    if (use_causal_windowed) {
      positive("causal_chunk_length", causal_chunk_length);
      positive("causal_window_length", causal_window_length);
    }
    if (causal_window_decay &&
        !(*causal_window_decay >= 0.0 && *causal_window_decay <= 1.0)) {
      std::ostringstream os;
      os << "causal_window_decay: expected a value in [0, 1], got " << *causal_window_decay;
      fail(os.str());
    }
    parsePadding(causal_padding);
    kernel_initializer.validate("kernel_initializer");
    bias_initializer.validate("bias_initializer");
  }
};

namespace detail {

/// `config` for a layer whose map is named `map`: a config that leaves feature_transform at its
/// default takes the map's name when the map is a built-in one; another built-in name is a
/// contradiction and throws. A user map's name is not checked (it is none of these).
inline LayerConfig configForMap(LayerConfig config, const std::string& map) {
  auto builtin = [](const std::string& name) {
    for (const char* n : kFeatureTransforms)
      if (name == n) return true;
    return false;
  };
  if (!builtin(map)) return config;
  if (config.feature_transform == LayerConfig{}.feature_transform) {
    config.feature_transform = map;
  } else if (config.feature_transform != map && builtin(config.feature_transform)) {
    throw std::invalid_argument("feature_transform: the config says \"" +
                                config.feature_transform + "\" but the layer type uses \"" +
                                map + "\"");
  }
  return config;
}

}  // namespace detail

}  // namespace kattn
