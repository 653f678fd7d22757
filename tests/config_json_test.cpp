// kattn/io/config_json.hpp: LayerConfig <-> Keras get_config() JSON.
#include <kattn/io/config_json.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <string>

#include "golden_cases.hpp"

namespace {

using kattn::LayerConfig;
using kattn::io::configFromJson;
using kattn::io::configFromJsonText;
using kattn::io::configToJson;
using nlohmann::json;

void expectSameConfig(const LayerConfig& a, const LayerConfig& b) {
  EXPECT_EQ(a.num_heads, b.num_heads);
  EXPECT_EQ(a.key_dim, b.key_dim);
  EXPECT_EQ(a.value_dim, b.value_dim);
  EXPECT_EQ(a.output_shape, b.output_shape);
  EXPECT_EQ(a.use_bias, b.use_bias);
  EXPECT_EQ(a.dropout, b.dropout);
  EXPECT_EQ(a.feature_transform, b.feature_transform);
  EXPECT_EQ(a.num_random_features, b.num_random_features);
  EXPECT_EQ(a.seed, b.seed);
  EXPECT_EQ(a.redraw, b.redraw);
  EXPECT_EQ(a.is_short_seq, b.is_short_seq);
  EXPECT_EQ(a.begin_kernel, b.begin_kernel);
  EXPECT_EQ(a.scale, b.scale);
  EXPECT_EQ(a.scale_by_length, b.scale_by_length);
  EXPECT_EQ(a.use_causal_windowed, b.use_causal_windowed);
  EXPECT_EQ(a.causal_chunk_length, b.causal_chunk_length);
  EXPECT_EQ(a.causal_window_length, b.causal_window_length);
  EXPECT_EQ(a.causal_window_decay, b.causal_window_decay);
  EXPECT_EQ(a.causal_padding, b.causal_padding);
  EXPECT_EQ(a.kernel_initializer, b.kernel_initializer);
  EXPECT_EQ(a.bias_initializer, b.bias_initializer);
}

/// Expects configFromJson(j) to throw std::invalid_argument whose one-line message contains
/// every string of `parts`.
void expectConfigError(const json& j, std::initializer_list<std::string> parts) {
  try {
    (void)configFromJson(j);
    ADD_FAILURE() << "no exception for " << j.dump() << "; expected one mentioning "
                  << *parts.begin();
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    for (const auto& part : parts) EXPECT_NE(msg.find(part), std::string::npos) << msg;
  }
}

void expectTextError(const std::string& text, std::initializer_list<std::string> parts) {
  try {
    (void)configFromJsonText(text);
    ADD_FAILURE() << "no exception; expected one mentioning " << *parts.begin();
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    for (const auto& part : parts) EXPECT_NE(msg.find(part), std::string::npos) << msg;
  }
}

json minimal() { return json{{"num_heads", 2}, {"key_dim", 8}}; }

/// A configuration with every option away from its default.
LayerConfig everythingSet() {
  LayerConfig c;
  c.num_heads = 3;
  c.key_dim = 5;
  c.value_dim = 7;
  c.output_shape = 11;
  c.use_bias = false;
  c.dropout = 0.125;
  c.feature_transform = "relu";
  c.num_random_features = 17;
  c.seed = std::numeric_limits<std::int64_t>::max() - 1;
  c.redraw = true;
  c.is_short_seq = false;
  c.begin_kernel = 0;
  c.scale = 0.1;  // not exactly representable: the round trip must keep every bit
  c.scale_by_length = true;
  c.use_causal_windowed = true;
  c.causal_chunk_length = 4;
  c.causal_window_length = 9;
  c.causal_window_decay = 1.0 / 3.0;
  c.causal_padding = "left";
  c.kernel_initializer.name = "truncated_normal";
  c.kernel_initializer.mean = 0.25;
  c.kernel_initializer.stddev = 0.02;
  c.bias_initializer.name = "constant";
  c.bias_initializer.value = -0.5;
  return c;
}

TEST(ConfigJson, RoundTripDefaults) {
  const LayerConfig c;
  expectSameConfig(configFromJson(configToJson(c)), c);
  expectSameConfig(configFromJsonText(configToJson(c).dump()), c);
}

TEST(ConfigJson, RoundTripEveryOptionSet) {
  const LayerConfig c = everythingSet();
  ASSERT_NO_THROW(c.validate());
  expectSameConfig(configFromJson(configToJson(c)), c);
  expectSameConfig(configFromJsonText(configToJson(c).dump()), c);
  expectSameConfig(configFromJsonText(configToJson(c).dump(2)), c);
}

TEST(ConfigJson, RoundTripExtremes) {
  LayerConfig c;
  c.seed = std::numeric_limits<std::int64_t>::min();
  c.num_random_features = -5;
  c.scale = -std::numeric_limits<double>::denorm_min();
  c.dropout = std::numeric_limits<double>::max();
  c.causal_padding = "";
  c.value_dim = std::numeric_limits<int>::max();
  c.begin_kernel = std::numeric_limits<int>::min();
  expectSameConfig(configFromJsonText(configToJson(c).dump()), c);
}

TEST(ConfigJson, ToJsonWritesEveryReferenceKeyAndNullForAbsentOptionals) {
  const json j = configToJson(LayerConfig{});
  for (const char* key : kattn::io::kConfigKeys) EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j.size(), std::size(kattn::io::kConfigKeys));
  for (const char* key : {"value_dim", "output_shape", "scale", "causal_window_decay",
                          "causal_padding"}) {
    EXPECT_TRUE(j.at(key).is_null()) << key;
  }
  EXPECT_EQ(configToJson(everythingSet()).at("output_shape"), json(11));
}

TEST(ConfigJson, AbsentKeysKeepTheReferenceDefaults) {
  const LayerConfig c = configFromJson(minimal());
  LayerConfig want;
  want.num_heads = 2;
  want.key_dim = 8;
  expectSameConfig(c, want);
}

TEST(ConfigJson, EveryGoldenCaseConfigParsesAndValidates) {
  const auto names = kattn_test::caseNames([](const auto&) { return true; });
  ASSERT_EQ(names.size(), 70u);
  for (const auto& name : names) {
    SCOPED_TRACE(name);
    const kattn_test::GoldenCase gc(name);
    const LayerConfig c = configFromJson(gc.meta.at("config"));
    expectSameConfig(c, gc.config);
    EXPECT_NO_THROW(c.validate());
    expectSameConfig(configFromJson(configToJson(c)), c);
  }
}

/// What tf-keras's MultiHeadAttention.get_config() plus KernelAttention.get_config() write
/// for a built layer (json.dump with the TensorShapes as lists).
TEST(ConfigJson, KerasConfigWithBookkeepingKeysParses) {
  const std::string text = R"({
    "name": "kernel_attention", "trainable": true, "dtype": "float32",
    "num_heads": 4, "key_dim": 16, "value_dim": 16, "dropout": 0.0, "use_bias": true,
    "output_shape": null, "attention_axes": [1],
    "kernel_initializer": {"module": "keras.initializers", "class_name": "GlorotUniform",
                           "config": {"seed": null}, "registered_name": null},
    "bias_initializer": {"module": "keras.initializers", "class_name": "Zeros",
                         "config": {}, "registered_name": null},
    "kernel_regularizer": null, "bias_regularizer": null, "activity_regularizer": null,
    "kernel_constraint": null, "bias_constraint": null,
    "query_shape": [2, 32, 64], "key_shape": [2, 32, 64], "value_shape": [2, 32, 64],
    "feature_transform": "elu", "num_random_features": 0, "seed": 7, "redraw": false,
    "is_short_seq": false, "begin_kernel": 0, "scale": 0.25
  })";
  const LayerConfig c = configFromJsonText(text);
  EXPECT_EQ(c.num_heads, 4);
  EXPECT_EQ(c.key_dim, 16);
  EXPECT_EQ(c.value_dim, 16);
  EXPECT_FALSE(c.output_shape);
  EXPECT_EQ(c.feature_transform, "elu");
  EXPECT_EQ(c.num_random_features, 0);
  EXPECT_EQ(c.seed, 7);
  EXPECT_EQ(c.scale, 0.25);
  EXPECT_FALSE(c.use_causal_windowed);
  EXPECT_NO_THROW(c.validate());
}

TEST(ConfigJson, BookkeepingKeysAreIgnoredWhateverTheirValue) {
  for (const char* key : kattn::io::kKerasBookkeepingKeys) {
    for (const json& value : {json(nullptr), json("x"), json(3), json::array({1, 2}),
                              json{{"class_name", "L2"}, {"config", {{"l2", 0.01}}}}}) {
      json j = minimal();
      j[key] = value;
      SCOPED_TRACE(j.dump());
      expectSameConfig(configFromJson(j), configFromJson(minimal()));
    }
  }
}

TEST(ConfigJson, AttentionAxesOnlyTheSequenceAxis) {
  for (const json& ok : {json(nullptr), json(1), json::array({1})}) {
    json j = minimal();
    j["attention_axes"] = ok;
    EXPECT_NO_THROW((void)configFromJson(j)) << ok.dump();
  }
  for (const json& bad : {json(2), json::array({2}), json::array({1, 2}), json::array(),
                          json("1"), json(1.0), json(-2)}) {
    json j = minimal();
    j["attention_axes"] = bad;
    SCOPED_TRACE(bad.dump());
    expectConfigError(j, {"attention_axes", "kernel attention path", "not supported",
                          bad.dump()});
  }
}

TEST(ConfigJson, OutputShapeIntListOrNull) {
  json j = minimal();
  j["output_shape"] = 7;
  EXPECT_EQ(configFromJson(j).output_shape, 7);
  j["output_shape"] = json::array({9});
  EXPECT_EQ(configFromJson(j).output_shape, 9);
  j["output_shape"] = nullptr;
  EXPECT_FALSE(configFromJson(j).output_shape);

  j["output_shape"] = json::array({4, 5});
  expectConfigError(j, {"output_shape", "one int", "2 entries", "[4,5]"});
  j["output_shape"] = json::array();
  expectConfigError(j, {"output_shape", "0 entries"});
  j["output_shape"] = json::array({"4"});
  expectConfigError(j, {"output_shape", "integer", "string"});
  j["output_shape"] = "4";
  expectConfigError(j, {"output_shape", "null, an int or a list of one int", "string \"4\""});
}

TEST(ConfigJson, UnknownKeysAreNamed) {
  json j = minimal();
  j["num_head"] = 2;
  expectConfigError(j, {"unknown key", "\"num_head\"", "num_heads"});
  j["causal_window"] = 3;
  expectConfigError(j, {"unknown keys", "\"num_head\"", "\"causal_window\""});
}

TEST(ConfigJson, SerializedLayerWrapperGetsAHint) {
  const json wrapped = {{"class_name", "KernelAttention"}, {"config", minimal()}};
  expectConfigError(wrapped, {"\"class_name\"", "\"config\"", "serialized layer"});
}

TEST(ConfigJson, MissingRequiredKey) {
  expectConfigError(json{{"key_dim", 8}}, {"missing", "num_heads"});
  expectConfigError(json{{"num_heads", 8}}, {"missing", "key_dim"});
}

TEST(ConfigJson, NotAnObject) {
  expectConfigError(json::array({1, 2}), {"config", "object", "array"});
  expectConfigError(json(nullptr), {"config", "object", "null"});
}

TEST(ConfigJson, WrongTypesNameTheKeyExpectedAndActual) {
  struct Bad {
    const char* key;
    json value;
    std::vector<std::string> parts;
  };
  const std::uint64_t big = std::uint64_t(1) << 63;
  const Bad cases[] = {
      {"num_heads", "4", {"num_heads", "integer", "string \"4\""}},
      {"num_heads", 4.0, {"num_heads", "integer", "non-integer number"}},
      {"num_heads", true, {"num_heads", "integer", "boolean"}},
      {"num_heads", nullptr, {"num_heads", "integer", "null"}},
      {"key_dim", std::int64_t(1) << 31, {"key_dim", "2147483648", "32-bit int"}},
      {"key_dim", -(std::int64_t(1) << 40), {"key_dim", "32-bit int"}},
      {"value_dim", "16", {"value_dim", "integer", "string"}},
      {"dropout", "0.1", {"dropout", "a number", "string"}},
      {"dropout", nullptr, {"dropout", "a number", "null"}},
      {"use_bias", 1, {"use_bias", "true or false", "integer 1"}},
      {"use_bias", "true", {"use_bias", "true or false", "string"}},
      {"feature_transform", 3, {"feature_transform", "a string", "integer"}},
      {"feature_transform", nullptr, {"feature_transform", "a string", "null"}},
      {"num_random_features", 256.5, {"num_random_features", "integer"}},
      {"seed", 1.5, {"seed", "integer"}},
      {"seed", big, {"seed", "9223372036854775808", "64-bit int"}},
      {"redraw", 0, {"redraw", "true or false"}},
      {"is_short_seq", "no", {"is_short_seq", "true or false"}},
      {"begin_kernel", json::array({1}), {"begin_kernel", "integer", "array"}},
      {"scale", "0.5", {"scale", "a number", "string"}},
      {"scale_by_length", nullptr, {"scale_by_length", "true or false", "null"}},
      {"use_causal_windowed", json::object(), {"use_causal_windowed", "object"}},
      {"causal_chunk_length", 2.5, {"causal_chunk_length", "integer"}},
      {"causal_window_length", "3", {"causal_window_length", "integer"}},
      {"causal_window_decay", "0.9", {"causal_window_decay", "a number", "string"}},
      {"causal_window_decay", true, {"causal_window_decay", "a number", "boolean"}},
      {"causal_padding", 1, {"causal_padding", "a string", "integer"}},
  };
  for (const Bad& bad : cases) {
    json j = minimal();
    j[bad.key] = bad.value;
    SCOPED_TRACE(j.dump());
    try {
      (void)configFromJson(j);
      ADD_FAILURE() << "no exception";
    } catch (const std::invalid_argument& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.rfind(bad.key, 0), 0u) << "message should start with the key: " << msg;
      for (const auto& part : bad.parts) EXPECT_NE(msg.find(part), std::string::npos) << msg;
    }
  }
}

TEST(ConfigJson, NullMeansAbsentForOptionalOptions) {
  json j = minimal();
  for (const char* key : {"value_dim", "output_shape", "scale", "causal_window_decay",
                          "causal_padding"}) {
    j[key] = nullptr;
  }
  expectSameConfig(configFromJson(j), configFromJson(minimal()));
}

TEST(ConfigJson, IntegersForFloatOptions) {
  json j = minimal();
  j["dropout"] = 0;
  j["scale"] = 1;
  j["causal_window_decay"] = 1;
  const LayerConfig c = configFromJson(j);
  EXPECT_EQ(c.dropout, 0.0);
  EXPECT_EQ(c.scale, 1.0);
  EXPECT_EQ(c.causal_window_decay, 1.0);
}

TEST(ConfigJson, ParsingDoesNotValidate) {
  // Parsing keeps what the file says; the layer (or validate()) judges it, with its message.
  json j = minimal();
  j["feature_transform"] = "softmax";
  const LayerConfig c = configFromJson(j);
  EXPECT_EQ(c.feature_transform, "softmax");
  EXPECT_THROW(c.validate(), std::invalid_argument);
}

TEST(ConfigJsonText, InvalidJson) {
  expectTextError("{\"num_heads\": 2,", {"config", "not valid JSON"});
  expectTextError("", {"not valid JSON"});
  expectTextError("{num_heads: 2}", {"not valid JSON"});
  expectTextError("{\"num_heads\": NaN, \"key_dim\": 8}", {"not valid JSON"});
  expectTextError(std::string("{\"num_heads\"\n:\x01}"), {"not valid JSON"});
}

TEST(ConfigJsonText, DuplicateKeys) {
  expectTextError(R"({"num_heads": 2, "key_dim": 8, "num_heads": 3})",
                  {"duplicate key", "\"num_heads\""});
  expectTextError(R"({"num_heads": 2, "key_dim": 8, "dtype": {"a": 1, "a": 2}})",
                  {"duplicate key", "\"a\"", "nested"});
}

TEST(ConfigJson, NonFiniteNumbers) {
  // JSON text cannot hold them (nlohmann refuses 1e999 as an overflow); a json value built
  // in code can, and would not survive configToJson, so they are refused.
  expectTextError(R"({"num_heads": 2, "key_dim": 8, "scale": 1e999})", {"overflow", "1e999"});
  for (const char* key : {"scale", "dropout", "causal_window_decay"}) {
    json j = minimal();
    j[key] = std::numeric_limits<double>::infinity();
    expectConfigError(j, {key, "finite"});
    j[key] = std::numeric_limits<double>::quiet_NaN();
    expectConfigError(j, {key, "finite"});
  }
}

TEST(ConfigJsonText, DeepNestingIsRefused) {
  const std::string deep = "{\"num_heads\": 2, \"key_dim\": 8, \"name\": " +
                           std::string(100000, '[') + std::string(100000, ']') + "}";
  expectTextError(deep, {"nests deeper"});
  // Keras's own nesting (an initialiser's config) is well within the limit.
  EXPECT_NO_THROW((void)configFromJsonText(
      R"({"num_heads": 2, "key_dim": 8, "kernel_regularizer": {"config": {"l2": {"a": [[1]]}}}})"));
}

TEST(ConfigJsonText, MessagesStayOneLineForControlCharacters) {
  expectTextError("{\"num_heads\": 2, \"key_dim\": 8, \"bad\\nkey\": 1}",
                  {"unknown key", "\"bad\\nkey\""});
  expectTextError("{\"num_heads\": \"a\\u0001b\", \"key_dim\": 8}",
                  {"num_heads", "string \"a\\u0001b\""});
}

/// Keras's forms of an initializer: a name (snake or class), or class_name with its config.
TEST(ConfigJson, InitializersInEveryKerasForm) {
  for (std::size_t i = 0; i < std::size(kattn::kInitializers); ++i) {
    for (const json& form :
         {json(kattn::kInitializers[i]), json(kattn::io::detail::kInitializerClasses[i]),
          json{{"class_name", kattn::io::detail::kInitializerClasses[i]}, {"config", {{"seed", 3}}}},
          json{{"module", "keras.initializers"},
               {"class_name", kattn::io::detail::kInitializerClasses[i]},
               {"config", json::object()},
               {"registered_name", nullptr}}}) {
      json j = minimal();
      j["kernel_initializer"] = form;
      j["bias_initializer"] = form;
      SCOPED_TRACE(form.dump());
      const LayerConfig c = configFromJson(j);
      EXPECT_EQ(c.kernel_initializer.name, kattn::kInitializers[i]);
      EXPECT_EQ(c.bias_initializer.name, kattn::kInitializers[i]);
      EXPECT_EQ(configFromJson(configToJson(c)).kernel_initializer, c.kernel_initializer);
    }
  }
  json j = minimal();
  j["kernel_initializer"] = {{"class_name", "RandomNormal"},
                             {"config", {{"mean", 1.5}, {"stddev", 0.125}, {"seed", nullptr}}}};
  j["bias_initializer"] = {{"class_name", "RandomUniform"},
                           {"config", {{"minval", -2.0}, {"maxval", 3.0}}}};
  const LayerConfig c = configFromJson(j);
  EXPECT_EQ(c.kernel_initializer.mean, 1.5);
  EXPECT_EQ(c.kernel_initializer.stddev, 0.125);
  EXPECT_EQ(c.bias_initializer.minval, -2.0);
  EXPECT_EQ(c.bias_initializer.maxval, 3.0);
  EXPECT_EQ(configToJson(c)["bias_initializer"],
            (json{{"class_name", "RandomUniform"},
                  {"config", {{"minval", -2.0}, {"maxval", 3.0}, {"seed", nullptr}}}}));
}

TEST(ConfigJson, UnsupportedInitializersAreRejectedByName) {
  json j = minimal();
  j["kernel_initializer"] = "orthogonal";
  expectConfigError(j, {"kernel_initializer", "unknown initializer \"orthogonal\"", "glorot_uniform"});
  j["kernel_initializer"] = {{"class_name", "VarianceScaling"}, {"config", {{"scale", 2.0}}}};
  expectConfigError(j, {"kernel_initializer", "VarianceScaling"});
  j["kernel_initializer"] = {{"class_name", "GlorotUniform"}, {"config", {{"gain", 2.0}}}};
  expectConfigError(j, {"kernel_initializer", "glorot_uniform has no parameter \"gain\""});
  j["kernel_initializer"] = {{"config", json::object()}};
  expectConfigError(j, {"kernel_initializer", "class_name"});
  j["kernel_initializer"] = 3;
  expectConfigError(j, {"kernel_initializer"});
  j = minimal();
  j["bias_initializer"] = {{"class_name", "RandomNormal"}, {"config", {{"stddev", -1.0}}}};
  EXPECT_THROW(configFromJson(j).validate(), std::invalid_argument);
}

}  // namespace
