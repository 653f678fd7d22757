// libFuzzer target for kattn::io::configFromJsonText (include/kattn/io/config_json.hpp).
//
// Arbitrary bytes are parsed as a layer config and validated. Rejection must be
// std::invalid_argument or std::runtime_error (nlohmann::json::exception is tolerated, though
// the parser converts it); any other exception, a crash or a sanitizer report is a bug. A
// config that parses must also survive configToJson -> configFromJson, in memory and
// through JSON text, field by field.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include <kattn/io/config_json.hpp>

namespace {

bool sameConfig(const kattn::LayerConfig& a, const kattn::LayerConfig& b) {
  return a.num_heads == b.num_heads && a.key_dim == b.key_dim && a.value_dim == b.value_dim &&
         a.output_shape == b.output_shape && a.use_bias == b.use_bias &&
         a.dropout == b.dropout && a.feature_transform == b.feature_transform &&
         a.num_random_features == b.num_random_features && a.seed == b.seed &&
         a.redraw == b.redraw && a.is_short_seq == b.is_short_seq &&
         a.begin_kernel == b.begin_kernel && a.scale == b.scale &&
         a.scale_by_length == b.scale_by_length &&
         a.use_causal_windowed == b.use_causal_windowed &&
         a.causal_chunk_length == b.causal_chunk_length &&
         a.causal_window_length == b.causal_window_length &&
         a.causal_window_decay == b.causal_window_decay && a.causal_padding == b.causal_padding;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const kattn::LayerConfig config = kattn::io::configFromJsonText(text);
    const nlohmann::json j = kattn::io::configToJson(config);
    if (!sameConfig(kattn::io::configFromJson(j), config)) std::abort();
    if (!sameConfig(kattn::io::configFromJsonText(j.dump()), config)) std::abort();
    config.validate();
  } catch (const std::invalid_argument&) {
  } catch (const std::runtime_error&) {
  } catch (const nlohmann::json::exception&) {
  }
  return 0;
}
