#pragma once
/// \file
/// WeightNaming: under which name, and in which layout, a file holds each of a layer's Keras
/// variables, so that checkpoints written by PyTorch (nn.Linear weights) load as well as
/// Keras exports.

#include <array>
#include <cstddef>
#include <iterator>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config_json.hpp"

namespace kattn {
namespace io {

/// How a file lays out one weight.
enum class WeightLayout {
  /// As the Keras variable: kernels [D, N, d] and [N, d_v, O], biases [N, d] and [O].
  Keras,
  /// As a PyTorch `nn.Linear`: weight [out, in], bias [out]. A Keras kernel [D, N, d] is
  /// the transpose of a weight [N d, D], reshaped; [N, d_v, O] that of a weight [O, N d_v];
  /// a bias [N, d] is a bias [N d], reshaped. Heads are the outer factor of N d, as in
  /// `q.view(B, T, N, d)`.
  TorchLinear
};

/// `"keras"` or `"torch_linear"`, as the JSON name map spells a layout.
inline const char* layoutName(WeightLayout layout) {
  return layout == WeightLayout::Keras ? "keras" : "torch_linear";
}

/// The Keras variables of a layer, in Weights' order: the keys of a WeightNaming.
inline constexpr const char* kWeightVariables[] = {
    "query/kernel",        "query/bias",
    "key/kernel",          "key/bias",
    "value/kernel",        "value/bias",
    "attention_output/kernel", "attention_output/bias",
    "attention_output_softmax/kernel", "attention_output_softmax/bias"};

/**
 * \brief For each Keras variable of a layer, the name a file holds it under and its layout.
 *
 * The file's name of a variable is `prefix()` followed by its entry's name, so that one map
 * serves any layer of a checkpoint that holds many. Built-in maps: keras() (the Keras names,
 * the default of loadWeights) and torch() (`to_q`, `to_k`, `to_v`, `to_out` nn.Linear
 * layers); fromJson() reads a map from JSON, e.g. for a Hugging Face layer:
 * \code{.json}
 * {"prefix": "encoder.layer.0.attn.",
 *  "query/kernel": {"name": "q_proj.weight", "layout": "torch_linear"},
 *  "query/bias": {"name": "q_proj.bias", "layout": "torch_linear"}}
 * \endcode
 * The projection matrix is not part of the map: loadProjection reads `projection_matrix`.
 */
class WeightNaming {
 public:
  /// Where one Keras variable is in a file.
  struct Entry {
    std::string name;                           ///< without the prefix
    WeightLayout layout = WeightLayout::Keras;  ///< how the file lays it out
  };

  /// The Keras names and layout, no prefix.
  WeightNaming() {
    for (std::size_t i = 0; i < std::size(kWeightVariables); ++i) {
      m_entries[i] = Entry{kWeightVariables[i], WeightLayout::Keras};
    }
  }

  /// The reference's Keras names (`query/kernel`, ..., `attention_output/bias`).
  static WeightNaming keras() { return WeightNaming(); }

  /**
   * \brief Separate q/k/v/out `nn.Linear` layers named as in most PyTorch attention blocks:
   * `to_q.weight` [N d, D_q], `to_q.bias` [N d], `to_k.*`, `to_v.*` [N d_v, D_v],
   * `to_out.weight` [O, N d_v], `to_out.bias` [O].
   *
   * PyTorch has no counterpart of `attention_output_softmax` (the output projection of the
   * softmax part with begin_kernel > 0); kattn names it `to_out_softmax.weight` and
   * `to_out_softmax.bias`.
   */
  static WeightNaming torch() {
    WeightNaming n;
    const char* const modules[] = {"to_q", "to_k", "to_v", "to_out", "to_out_softmax"};
    for (std::size_t i = 0; i < std::size(kWeightVariables); ++i) {
      n.m_entries[i] = Entry{std::string(modules[i / 2]) + (i % 2 ? ".bias" : ".weight"),
                             WeightLayout::TorchLinear};
    }
    return n;
  }

  /**
   * \brief A map from a JSON object: an optional `"prefix"` string and, for any Keras
   * variable, `{"name": "q_proj.weight", "layout": "torch_linear"}` (`layout` `"keras"` or
   * `"torch_linear"`, default `"keras"`). Variables not listed keep their Keras name and
   * layout.
   * \throws std::invalid_argument naming the key and what was wrong: not an object, an
   *         unknown key (the valid ones listed), a wrong type, an unknown layout.
   */
  static WeightNaming fromJson(const nlohmann::json& j) {
    if (!j.is_object()) {
      throw std::invalid_argument("weight naming: expected a JSON object, got " +
                                  detail::jsonTypeName(j) + " " + detail::excerpt(j));
    }
    WeightNaming n;
    for (const auto& item : j.items()) {
      const std::string& key = item.key();
      const nlohmann::json& v = item.value();
      if (key == "prefix") {
        n.m_prefix = detail::readString("weight naming: prefix", v);
        continue;
      }
      const int i = index(key);
      if (i < 0) {
        throw std::invalid_argument("weight naming: unknown key " + detail::quoteKey(key) +
                                    "; valid keys: prefix, " + detail::joinList(kWeightVariables));
      }
      const std::string where = "weight naming: " + key;
      if (!v.is_object()) detail::failKey(where, "{\"name\": ..., \"layout\": ...}", v);
      Entry e;
      for (const auto& field : v.items()) {
        if (field.key() == "name") {
          e.name = detail::readString(where + ".name", field.value());
        } else if (field.key() == "layout") {
          e.layout = parseLayout(where + ".layout", field.value());
        } else {
          throw std::invalid_argument(where + ": unknown key " + detail::quoteKey(field.key()) +
                                      " (valid: name, layout)");
        }
      }
      if (!v.contains("name")) throw std::invalid_argument(where + ": missing \"name\"");
      if (e.name.empty()) throw std::invalid_argument(where + ".name: empty");
      n.m_entries[static_cast<std::size_t>(i)] = std::move(e);
    }
    return n;
  }

  /**
   * \brief fromJson of JSON text, such as a name map file.
   * \throws std::invalid_argument for text that is not JSON (with the parser's position and
   *         reason), a duplicate key, or anything fromJson rejects.
   */
  static WeightNaming fromJsonText(const std::string& text) {
    return fromJson(detail::parseStrictJson(text, "weight naming"));
  }

  /// Puts the Keras variable `variable` under `name` (after the prefix) in `layout`.
  /// \throws std::invalid_argument when `variable` is not one of kWeightVariables.
  WeightNaming& set(const std::string& variable, std::string name, WeightLayout layout) {
    m_entries[checkedIndex(variable)] = Entry{std::move(name), layout};
    return *this;
  }

  /// Sets the text put before every name.
  WeightNaming& setPrefix(std::string prefix) {
    m_prefix = std::move(prefix);
    return *this;
  }

  /// The text put before every name (empty by default).
  const std::string& prefix() const { return m_prefix; }

  /// The entry of Keras variable `variable`.
  /// \throws std::invalid_argument when `variable` is not one of kWeightVariables.
  const Entry& entry(const std::string& variable) const {
    return m_entries[checkedIndex(variable)];
  }

  /// The name `variable` has in a file: prefix() and its entry's name.
  std::string fileName(const std::string& variable) const {
    return m_prefix + entry(variable).name;
  }

 private:
  static int index(const std::string& variable) {
    for (std::size_t i = 0; i < std::size(kWeightVariables); ++i) {
      if (variable == kWeightVariables[i]) return static_cast<int>(i);
    }
    return -1;
  }

  static std::size_t checkedIndex(const std::string& variable) {
    const int i = index(variable);
    if (i < 0) {
      throw std::invalid_argument("WeightNaming: " + detail::quoteKey(variable) +
                                  " is not a Keras variable of the layer (" +
                                  detail::joinList(kWeightVariables) + ")");
    }
    return static_cast<std::size_t>(i);
  }

  static WeightLayout parseLayout(const std::string& where, const nlohmann::json& v) {
    const std::string s = detail::readString(where, v);
    if (s == "keras") return WeightLayout::Keras;
    if (s == "torch_linear") return WeightLayout::TorchLinear;
    throw std::invalid_argument(where + ": expected \"keras\" or \"torch_linear\", got " +
                                detail::excerpt(v));
  }

  std::string m_prefix;
  std::array<Entry, std::size(kWeightVariables)> m_entries;
};

}  // namespace io
}  // namespace kattn
