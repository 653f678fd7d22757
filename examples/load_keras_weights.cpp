// load_keras_weights: run a layer trained in TensorFlow/Keras, from its config and weights.
//
//   load_keras_weights CONFIG.json WEIGHTS.safetensors   # your export, on a random input
//   load_keras_weights                                    # a self-contained round trip
//
// The export, in Python, from a built tfm.nlp.layers.KernelAttention `layer`:
//
//   import json, numpy as np
//   from safetensors.numpy import save_file
//   json.dump(layer.get_config(), open("config.json", "w"), default=list)
//   tensors = {}
//   for v in layer.weights:                # e.g. "kernel_attention/query/kernel:0"
//       name = "/".join(v.name.split(":")[0].split("/")[-2:])   # -> "query/kernel"
//       tensors[name] = v.numpy()
//   if layer._projection_matrix is not None:  # the projection drawn from the seed
//       tensors["projection_matrix"] = layer._projection_matrix.numpy()
//   save_file(tensors, "weights.safetensors")
//
// kattn names the tensors as Keras does (query/kernel [D_q, N, d], key/kernel, value/kernel,
// attention_output/kernel [N, d_v, O], their biases, attention_output_softmax/* with
// begin_kernel); the projection is optional, since kattn draws the same one from the seed.
//
// Without arguments the program writes such an export itself (a layer built from its
// initializers stands in for the trained one), loads it back by name into a fresh layer and
// checks that both give the same output bit for bit.

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <kattn/io/config_json.hpp>
#include <kattn/io/weights.hpp>
#include <kattn/kattn.hpp>

namespace {

/// The layer of an export: config from JSON, weights and projection by their Keras names.
kattn::AnyKernelAttention<float> loadLayer(const std::string& config_path,
                                           const std::string& weights_path) {
  std::ifstream in(config_path);
  if (!in) throw std::runtime_error("cannot read " + config_path);
  std::stringstream text;
  text << in.rdbuf();
  const kattn::LayerConfig config = kattn::io::configFromJsonText(text.str());
  const auto file = kattn::io::SafeTensors::load(weights_path);
  kattn::AnyKernelAttention<float> layer(config);
  layer.setWeights(kattn::io::loadWeights<float>(file, config));
  if (auto P = kattn::io::loadProjection<float>(file, config)) layer.setProjection(*P);
  return layer;
}

kattn::Tensor<float, 3> randomInput(kattn::Index B, kattn::Index T, kattn::Index D) {
  kattn::Tensor<float, 3> x(B, T, D);
  x.setRandom();
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 3) {
      const auto layer = loadLayer(argv[1], argv[2]);
      const kattn::Index D = layer.weights().query_kernel.dimension(0);
      const auto y = layer.forward(randomInput(1, 128, D), randomInput(1, 128, D));
      std::printf("loaded %s: output [%ld, %ld, %ld]\n", argv[2], long(y.dimension(0)),
                  long(y.dimension(1)), long(y.dimension(2)));
      return 0;
    }
    if (argc != 1) {
      std::fprintf(stderr, "usage: %s [CONFIG.json WEIGHTS.safetensors]\n", argv[0]);
      return 2;
    }
    // The stand-in for a trained Keras layer, and its export.
    kattn::LayerConfig config;
    config.num_heads = 4;
    config.key_dim = 16;
    config.feature_transform = "relu";
    config.num_random_features = 32;
    config.seed = 11;
    config.bias_initializer.name = "random_normal";
    kattn::AnyKernelAttention<float> trained(config);
    trained.initializeWeights(/*query_dim=*/48, /*value_dim=*/48);
    const auto dir = std::filesystem::temp_directory_path() / "kattn_load_keras_weights";
    std::filesystem::create_directories(dir);
    const std::string config_path = (dir / "config.json").string();
    const std::string weights_path = (dir / "weights.safetensors").string();
    std::ofstream(config_path) << kattn::io::configToJson(config).dump(2);
    kattn::io::SafeTensorsWriter writer;
    kattn::io::addWeights(writer, trained.weights());
    writer.write(weights_path);

    const auto loaded = loadLayer(config_path, weights_path);
    const auto q = randomInput(2, 100, 48), v = randomInput(2, 100, 48);
    const kattn::Tensor<float, 3> a = trained.forward(q, v), b = loaded.forward(q, v);
    const float diff = kattn::Tensor<float, 0>((a - b).abs().maximum())();
    std::printf("exported and reloaded %s: max |difference| %g over output [%ld, %ld, %ld]\n",
                weights_path.c_str(), double(diff), long(b.dimension(0)), long(b.dimension(1)),
                long(b.dimension(2)));
    return diff == 0.0f ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "load_keras_weights: %s\n", e.what());
    return 1;
  }
}
