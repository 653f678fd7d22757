#pragma once
/// \file
/// LayerConfig <-> JSON under the names Keras `get_config()` writes, so that
/// `json.dump(layer.get_config())` of the reference layer configures a kattn layer.

#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "../config.hpp"

namespace kattn {
namespace io {

/// The LayerConfig keys, in the order the reference documents them. configToJson writes
/// exactly these; configFromJson reads them (each optional except num_heads and key_dim).
inline constexpr const char* kConfigKeys[] = {
    "num_heads",           "key_dim",
    "value_dim",           "dropout",
    "use_bias",            "output_shape",
    "feature_transform",   "num_random_features",
    "seed",                "redraw",
    "is_short_seq",        "begin_kernel",
    "scale",               "scale_by_length",
    "use_causal_windowed", "causal_chunk_length",
    "causal_window_length", "causal_window_decay",
    "causal_padding",      "kernel_initializer",
    "bias_initializer"};

/// Keys that Keras writes into every layer config but that do not change what the layer
/// computes (names, training flags, regularisers,
/// constraints, and tf-keras's recorded build shapes). They are accepted with any value and
/// ignored. `attention_axes` is checked separately: it changes the function.
inline constexpr const char* kKerasBookkeepingKeys[] = {
    "name",                "trainable",         "dtype",
    "kernel_regularizer",
    "bias_regularizer",    "activity_regularizer", "kernel_constraint",
    "bias_constraint",     "query_shape",       "key_shape",
    "value_shape"};

namespace detail {

/// Deepest JSON nesting configFromJsonText accepts. Keras configs nest three levels
/// (an initialiser's own config); the limit only stops pathological inputs.
inline constexpr int kMaxConfigJsonDepth = 32;

/// `text` on one line: control characters become '?', so a message stays one line.
inline std::string oneLine(std::string text) {
  for (char& c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) c = '?';
  }
  return text;
}

/// A short, ASCII-only rendering of a JSON value for error messages.
inline std::string excerpt(const nlohmann::json& j, std::size_t max_chars = 48) {
  std::string s = j.dump(-1, ' ', /*ensure_ascii=*/true, nlohmann::json::error_handler_t::replace);
  if (s.size() > max_chars) s = s.substr(0, max_chars - 3) + "...";
  return s;
}

/// A key quoted for a message (ASCII-escaped, truncated).
inline std::string quoteKey(const std::string& key) { return excerpt(nlohmann::json(key), 64); }

/// nlohmann calls both kinds of number "number"; the messages need to tell them apart.
inline std::string jsonTypeName(const nlohmann::json& j) {
  if (j.is_number_integer()) return "integer";
  if (j.is_number_float()) return "non-integer number";
  return j.type_name();
}

[[noreturn]] inline void failKey(const std::string& key, const std::string& expected,
                                 const nlohmann::json& got) {
  throw std::invalid_argument(key + ": expected " + expected + ", got " + jsonTypeName(got) +
                              " " + excerpt(got));
}

/// A JSON integer in [lo, hi]; `what` names it in messages.
inline std::int64_t readInteger(const std::string& key, const nlohmann::json& j,
                                std::int64_t lo, std::int64_t hi, const char* what) {
  if (!j.is_number_integer()) failKey(key, "an integer", j);
  bool in_range;
  std::int64_t v = 0;
  if (j.is_number_unsigned()) {
    const auto u = j.get<std::uint64_t>();
    in_range = u <= static_cast<std::uint64_t>(hi);
    if (in_range) v = static_cast<std::int64_t>(u);
  } else {
    v = j.get<std::int64_t>();
    in_range = v >= lo && v <= hi;
  }
  if (!in_range) {
    throw std::invalid_argument(key + ": " + excerpt(j) + " does not fit " + what + " [" +
                                std::to_string(lo) + ", " + std::to_string(hi) + "]");
  }
  return v;
}

inline int readInt(const std::string& key, const nlohmann::json& j) {
  return static_cast<int>(readInteger(key, j, std::numeric_limits<int>::min(),
                                      std::numeric_limits<int>::max(), "a 32-bit int"));
}

inline bool readBool(const std::string& key, const nlohmann::json& j) {
  if (!j.is_boolean()) failKey(key, "true or false", j);
  return j.get<bool>();
}

/// Any JSON number, as double. Non-finite values (a literal such as 1e999 overflows to
/// infinity) are refused here because JSON cannot write them back.
inline double readDouble(const std::string& key, const nlohmann::json& j) {
  if (!j.is_number()) failKey(key, "a number", j);
  const double v = j.get<double>();
  if (!std::isfinite(v)) {
    throw std::invalid_argument(key + ": expected a finite number, got " + excerpt(j));
  }
  return v;
}

inline std::string readString(const std::string& key, const nlohmann::json& j) {
  if (!j.is_string()) failKey(key, "a string", j);
  return j.get<std::string>();
}

/// Keras writes `output_shape` as given: None, an int, or a tuple (a JSON list). kattn's
/// output is [B, T, O], so a list must hold exactly one int.
inline std::optional<int> readOutputShape(const nlohmann::json& j) {
  if (j.is_null()) return std::nullopt;
  if (j.is_array()) {
    if (j.size() != 1) {
      throw std::invalid_argument(
          "output_shape: kattn's output is [B, T, O], so a list must hold one int; got " +
          std::to_string(j.size()) + " entries " + excerpt(j));
    }
    return readInt("output_shape", j[0]);
  }
  if (!j.is_number_integer()) failKey("output_shape", "null, an int or a list of one int", j);
  return readInt("output_shape", j);
}

/// Keras's class name of each initializer of kInitializers (same order).
inline constexpr const char* kInitializerClasses[] = {
    "GlorotUniform", "GlorotNormal", "HeUniform",    "HeNormal",
    "LecunUniform",  "LecunNormal",  "Zeros",        "Ones",
    "Constant",      "RandomNormal", "TruncatedNormal", "RandomUniform"};

/// Keras writes an initializer as {"class_name": "GlorotUniform", "config": {...}} (with
/// "module" and "registered_name" in Keras 3); a hand-written config may give the name
/// alone ("glorot_uniform" or "GlorotUniform"). The config's "seed" is ignored: kattn seeds
/// every initializer from the layer's seed.
inline Initializer readInitializer(const std::string& key, const nlohmann::json& j) {
  const auto byName = [&](const std::string& name) {
    for (std::size_t i = 0; i < std::size(kInitializers); ++i) {
      if (name == kInitializers[i] || name == kInitializerClasses[i]) {
        return Initializer{kInitializers[i]};
      }
    }
    Initializer unknown{name};
    unknown.validate(key);  // throws, listing the valid names
    return unknown;
  };
  if (j.is_string()) return byName(j.get<std::string>());
  if (!j.is_object() || !j.contains("class_name")) {
    failKey(key, "an initializer name or {\"class_name\": ..., \"config\": {...}}", j);
  }
  Initializer init = byName(readString(key + ".class_name", j.at("class_name")));
  for (const auto& item : j.items()) {
    if (item.key() != "class_name" && item.key() != "config" && item.key() != "module" &&
        item.key() != "registered_name") {
      throw std::invalid_argument(key + ": unexpected key \"" + oneLine(item.key()) + "\"");
    }
  }
  if (!j.contains("config") || j.at("config").is_null()) return init;
  const nlohmann::json& config = j.at("config");
  if (!config.is_object()) failKey(key + ".config", "an object", config);
  for (const auto& item : config.items()) {
    const std::string& p = item.key();
    const std::string where = key + ".config." + p;
    if (p == "seed") continue;
    if (p == "mean") {
      init.mean = readDouble(where, item.value());
    } else if (p == "stddev") {
      init.stddev = readDouble(where, item.value());
    } else if (p == "minval") {
      init.minval = readDouble(where, item.value());
    } else if (p == "maxval") {
      init.maxval = readDouble(where, item.value());
    } else if (p == "value") {
      init.value = readDouble(where, item.value());
    } else {
      throw std::invalid_argument(key + ": " + init.name + " has no parameter \"" + oneLine(p) +
                                  "\"");
    }
  }
  return init;
}

/// The Keras form of `init`: class name and the parameters its class has.
inline nlohmann::json initializerToJson(const Initializer& init) {
  std::string class_name = init.name;
  for (std::size_t i = 0; i < std::size(kInitializers); ++i) {
    if (init.name == kInitializers[i]) class_name = kInitializerClasses[i];
  }
  nlohmann::json config = nlohmann::json::object();
  if (init.name == "random_normal" || init.name == "truncated_normal") {
    config["mean"] = init.mean;
    config["stddev"] = init.stddev;
  } else if (init.name == "random_uniform") {
    config["minval"] = init.minval;
    config["maxval"] = init.maxval;
  } else if (init.name == "constant") {
    config["value"] = init.value;
  }
  if (init.name != "zeros" && init.name != "ones" && init.name != "constant") {
    config["seed"] = nullptr;
  }
  return {{"class_name", class_name}, {"config", config}};
}

/// Keras's default (null) and a built layer's value ([1] for [B, T, D] inputs) both mean
/// attention over the sequence axis, the only axis the kernel paths implement.
inline void checkAttentionAxes(const nlohmann::json& j) {
  const auto isOne = [](const nlohmann::json& v) {
    return v.is_number_integer() && (v.is_number_unsigned() ? v.get<std::uint64_t>() == 1
                                                             : v.get<std::int64_t>() == 1);
  };
  if (j.is_null() || isOne(j) || (j.is_array() && j.size() == 1 && isOne(j[0]))) return;
  throw std::invalid_argument(
      "attention_axes: the kernel attention path attends over the sequence axis only "
      "(null, 1 or [1]); other attention axes are not supported, got " +
      excerpt(j));
}

template <std::size_t N>
bool listed(const char* const (&list)[N], const std::string& key) {
  for (const char* name : list) {
    if (key == name) return true;
  }
  return false;
}

template <std::size_t N>
std::string joinList(const char* const (&list)[N]) {
  std::string out;
  for (const char* name : list) out += (out.empty() ? "" : ", ") + std::string(name);
  return out;
}

/// One message naming every unknown key (the first few, when there are many).
[[noreturn]] inline void failUnknownKeys(const std::vector<std::string>& unknown,
                                         const nlohmann::json& j) {
  constexpr std::size_t kShown = 6;
  std::string names;
  for (std::size_t i = 0; i < unknown.size() && i < kShown; ++i) {
    names += (i ? ", " : "") + quoteKey(unknown[i]);
  }
  if (unknown.size() > kShown) names += " and " + std::to_string(unknown.size() - kShown) + " more";
  std::string msg = std::string("config: unknown key") + (unknown.size() > 1 ? "s " : " ") + names;
  if (j.contains("class_name") && j.contains("config")) {
    msg += "; this looks like a serialized layer ({\"class_name\": ..., \"config\": {...}}): "
           "pass its \"config\" object";
  } else {
    msg += "; valid keys: " + joinList(kConfigKeys) +
           ", and Keras's bookkeeping keys (name, trainable, dtype, *_initializer, "
           "*_regularizer, *_constraint, query_shape, key_shape, value_shape, attention_axes)";
  }
  throw std::invalid_argument(msg);
}

}  // namespace detail

/**
 * \brief The LayerConfig described by a Keras `get_config()` object.
 *
 * Reads the keys of kConfigKeys under the reference's names and types; absent keys keep
 * LayerConfig's defaults (which are the reference's), except `num_heads` and `key_dim`, which
 * Keras always writes and which are required. Keras bookkeeping keys (kKerasBookkeepingKeys)
 * are ignored whatever their value; `attention_axes` must be null, 1 or [1].
 * Types are strict, as JSON written by Python is: integers for int options (4.0 is not 4),
 * booleans for flags, any finite number for float options, null for an absent optional.
 *
 * The config is not validated here (a layer validates at construction; call
 * LayerConfig::validate() to check earlier), so every LayerConfig with finite numbers
 * survives configFromJson(configToJson(c)) field by field.
 * \throws std::invalid_argument naming the key, the expected type and the value found, for a
 *         non-object, an unknown key (all of them named), a missing required key or a wrong type.
 */
inline LayerConfig configFromJson(const nlohmann::json& j) {
  if (!j.is_object()) {
    throw std::invalid_argument("config: expected a JSON object, got " + detail::jsonTypeName(j) +
                                " " + detail::excerpt(j));
  }
  std::vector<std::string> unknown;
  for (const auto& item : j.items()) {
    const std::string& key = item.key();
    if (!detail::listed(kConfigKeys, key) && !detail::listed(kKerasBookkeepingKeys, key) &&
        key != "attention_axes") {
      unknown.push_back(key);
    }
  }
  if (!unknown.empty()) detail::failUnknownKeys(unknown, j);
  for (const char* required : {"num_heads", "key_dim"}) {
    if (!j.contains(required)) {
      throw std::invalid_argument(std::string("config: missing required key \"") + required +
                                  "\" (Keras always writes it)");
    }
  }

  LayerConfig c;
  using detail::readBool;
  using detail::readDouble;
  using detail::readInt;
  using detail::readString;
  const auto field = [&](const char* key) -> const nlohmann::json* {
    const auto it = j.find(key);
    return it == j.end() ? nullptr : &*it;
  };
  // null is "absent" for the reference's optional options (value_dim=None, scale=None, ...).
  const auto nullOr = [](const nlohmann::json& value, auto read) {
    return value.is_null() ? std::optional<decltype(read())>() : std::optional(read());
  };
  const nlohmann::json* v = nullptr;
  if ((v = field("num_heads"))) c.num_heads = readInt("num_heads", *v);
  if ((v = field("key_dim"))) c.key_dim = readInt("key_dim", *v);
  if ((v = field("value_dim"))) c.value_dim = nullOr(*v, [&] { return readInt("value_dim", *v); });
  if ((v = field("dropout"))) c.dropout = readDouble("dropout", *v);
  if ((v = field("use_bias"))) c.use_bias = readBool("use_bias", *v);
  if ((v = field("output_shape"))) c.output_shape = detail::readOutputShape(*v);
  if ((v = field("feature_transform"))) c.feature_transform = readString("feature_transform", *v);
  if ((v = field("num_random_features"))) {
    c.num_random_features = readInt("num_random_features", *v);
  }
  if ((v = field("seed"))) {
    c.seed = detail::readInteger("seed", *v, std::numeric_limits<std::int64_t>::min(),
                                 std::numeric_limits<std::int64_t>::max(), "a 64-bit int");
  }
  if ((v = field("redraw"))) c.redraw = readBool("redraw", *v);
  if ((v = field("is_short_seq"))) c.is_short_seq = readBool("is_short_seq", *v);
  if ((v = field("begin_kernel"))) c.begin_kernel = readInt("begin_kernel", *v);
  if ((v = field("scale"))) c.scale = nullOr(*v, [&] { return readDouble("scale", *v); });
  if ((v = field("scale_by_length"))) c.scale_by_length = readBool("scale_by_length", *v);
  if ((v = field("use_causal_windowed"))) {
    c.use_causal_windowed = readBool("use_causal_windowed", *v);
  }
  if ((v = field("causal_chunk_length"))) {
    c.causal_chunk_length = readInt("causal_chunk_length", *v);
  }
  if ((v = field("causal_window_length"))) {
    c.causal_window_length = readInt("causal_window_length", *v);
  }
  if ((v = field("causal_window_decay"))) {
    c.causal_window_decay = nullOr(*v, [&] { return readDouble("causal_window_decay", *v); });
  }
  if ((v = field("causal_padding"))) {
    c.causal_padding = nullOr(*v, [&] { return readString("causal_padding", *v); });
  }
  if ((v = field("kernel_initializer"))) {
    c.kernel_initializer = detail::readInitializer("kernel_initializer", *v);
  }
  if ((v = field("bias_initializer"))) {
    c.bias_initializer = detail::readInitializer("bias_initializer", *v);
  }
  if ((v = field("attention_axes"))) detail::checkAttentionAxes(*v);
  return c;
}

namespace detail {

/// `text` parsed as JSON, refusing what the parser would let through silently in a file a
/// person wrote: a duplicate key (the parser keeps the last), and nesting deeper than
/// kMaxConfigJsonDepth levels. Errors start with `what` ("config", "weight naming").
inline nlohmann::json parseStrictJson(const std::string& text, const std::string& what) {
  std::vector<std::set<std::string>> keys;  // one set per open object
  const auto callback = [&](int depth, nlohmann::json::parse_event_t event,
                            nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    if ((event == Event::object_start || event == Event::array_start) &&
        depth >= kMaxConfigJsonDepth) {
      throw std::invalid_argument(what + ": JSON nests deeper than " +
                                  std::to_string(kMaxConfigJsonDepth) + " levels");
    }
    if (event == Event::object_start) {
      keys.emplace_back();
    } else if (event == Event::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (event == Event::key && !keys.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!keys.back().insert(key).second) {
        throw std::invalid_argument(what + ": duplicate key " + quoteKey(key) +
                                    (depth == 1 ? "" : " in a nested object"));
      }
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text, callback);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(what + ": not valid JSON: " + oneLine(e.what()));
  }
}

}  // namespace detail

/**
 * \brief configFromJson of JSON text, such as a file written by `json.dump(layer.get_config())`.
 *
 * Duplicate keys (which nlohmann/json would silently resolve to the last) and nesting deeper
 * than 32 levels are errors.
 * \throws std::invalid_argument for text that is not JSON (with nlohmann's position and
 *         reason), a duplicate key, or anything configFromJson rejects.
 */
inline LayerConfig configFromJsonText(const std::string& text) {
  return configFromJson(detail::parseStrictJson(text, "config"));
}

/**
 * \brief `c` as a Keras-style config object: every key of kConfigKeys, absent optionals as
 * null, `output_shape` as an int. configFromJson reads it back field for field.
 */
inline nlohmann::json configToJson(const LayerConfig& c) {
  const auto orNull = [](const auto& opt) {
    return opt ? nlohmann::json(*opt) : nlohmann::json(nullptr);
  };
  nlohmann::json j = nlohmann::json::object();
  j["num_heads"] = c.num_heads;
  j["key_dim"] = c.key_dim;
  j["value_dim"] = orNull(c.value_dim);
  j["dropout"] = c.dropout;
  j["use_bias"] = c.use_bias;
  j["output_shape"] = orNull(c.output_shape);
  j["feature_transform"] = c.feature_transform;
  j["num_random_features"] = c.num_random_features;
  j["seed"] = c.seed;
  j["redraw"] = c.redraw;
  j["is_short_seq"] = c.is_short_seq;
  j["begin_kernel"] = c.begin_kernel;
  j["scale"] = orNull(c.scale);
  j["scale_by_length"] = c.scale_by_length;
  j["use_causal_windowed"] = c.use_causal_windowed;
  j["causal_chunk_length"] = c.causal_chunk_length;
  j["causal_window_length"] = c.causal_window_length;
  j["causal_window_decay"] = orNull(c.causal_window_decay);
  j["causal_padding"] = orNull(c.causal_padding);
  j["kernel_initializer"] = detail::initializerToJson(c.kernel_initializer);
  j["bias_initializer"] = detail::initializerToJson(c.bias_initializer);
  return j;
}

}  // namespace io
}  // namespace kattn
