#pragma once
// Test support: the golden cases of ../shared/cases (inputs, weights, projection, expected
// outputs from an independent float64 reference), read through kattn's own safetensors reader.

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <kattn/io/safetensors.hpp>
#include <kattn/io/weights.hpp>
#include <kattn/kattn.hpp>

namespace kattn_test {

inline std::string casesDir() { return KATTN_CASES_DIR; }

inline nlohmann::json readJson(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot open " + path);
  return nlohmann::json::parse(f);
}

/// Every case name listed in index.json, optionally only those of one mode/path predicate.
template <typename Pred>
std::vector<std::string> caseNames(Pred keep) {
  std::vector<std::string> names;
  for (const auto& c : readJson(casesDir() + "/index.json")) {
    if (keep(c)) names.push_back(c.at("name").get<std::string>());
  }
  return names;
}

struct GoldenCase {
  std::string name;
  nlohmann::json meta;
  kattn::io::SafeTensors data;
  kattn::LayerConfig config;

  explicit GoldenCase(const std::string& n)
      : name(n),
        meta(readJson(casesDir() + "/" + n + ".json")),
        data(kattn::io::SafeTensors::load(casesDir() + "/" + n + ".safetensors")) {
    const auto& c = meta.at("config");
    config.num_heads = c.at("num_heads");
    config.key_dim = c.at("key_dim");
    if (!c.at("value_dim").is_null()) config.value_dim = c.at("value_dim").get<int>();
    if (!c.at("output_shape").is_null()) config.output_shape = c.at("output_shape").get<int>();
    config.use_bias = c.at("use_bias");
    config.feature_transform = c.at("feature_transform");
    config.num_random_features = c.at("num_random_features");
    config.is_short_seq = c.at("is_short_seq");
    config.begin_kernel = c.at("begin_kernel");
    if (!c.at("scale").is_null()) config.scale = c.at("scale").get<double>();
    config.scale_by_length = c.at("scale_by_length");
    config.use_causal_windowed = c.at("use_causal_windowed");
    config.causal_chunk_length = c.at("causal_chunk_length");
    config.causal_window_length = c.at("causal_window_length");
    if (!c.at("causal_window_decay").is_null())
      config.causal_window_decay = c.at("causal_window_decay").get<double>();
    if (!c.at("causal_padding").is_null())
      config.causal_padding = c.at("causal_padding").get<std::string>();
  }

  bool streaming() const { return meta.at("mode") == "stream"; }
  bool has(const std::string& t) const { return data.contains(t); }
  template <typename Scalar, int Rank>
  kattn::Tensor<Scalar, Rank> tensor(const std::string& t) const {
    return data.tensor<Scalar, Rank>(t);
  }
};

/// max |got - want| / max |want| (absolute when want is all zero).
template <typename A, typename B>
double relativeError(const A& got, const B& want) {
  double err = 0, ref = 0;
  for (kattn::Index i = 0; i < want.size(); ++i) {
    err = std::max(err, std::abs(double(got.data()[i]) - double(want.data()[i])));
    ref = std::max(ref, std::abs(double(want.data()[i])));
  }
  if (std::isnan(err)) return INFINITY;
  return ref > 0 ? err / ref : err;
}

template <typename Scalar>
constexpr double tolerance() {
  return std::is_same_v<Scalar, double> ? 1e-10 : 1e-5;
}

}  // namespace kattn_test
