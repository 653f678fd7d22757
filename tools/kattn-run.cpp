// kattn-run: one kernel attention layer over safetensors files. The file contract is in
// docs/kattn-run.md. Every failure is one line on stderr, "kattn-run: <what>", with exit
// code 1, or 2 for a command-line mistake; nothing in a file is trusted before it is checked.

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <new>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <kattn/any_layer.hpp>
#include <kattn/gradients.hpp>
#include <kattn/io/config_json.hpp>
#include <kattn/io/safetensors.hpp>
#include <kattn/io/weights.hpp>
#include <kattn/streaming.hpp>

namespace {

constexpr const char* kUsage =
    R"(usage: kattn-run --config FILE --weights FILE --inputs FILE --output FILE
                 [--stream] [--state-in FILE] [--state-out FILE] [--pool-capacity N]
                 [--backward]
                 [--weights-naming keras|torch|FILE] [--dtype float32|float64] [--threads N]
                 [--mpi [--slices A,B,...]]

Runs one kernel attention layer (the TF Model Garden KernelAttention) over safetensors files.

  --config FILE     layer configuration, as json.dump(layer.get_config()) writes it
  --weights FILE    the Keras variables (query/kernel, query/bias, ..., attention_output/bias)
                    and optionally projection_matrix [m, key_dim]; without it the projection
                    is drawn from the config's seed, as the reference does
  --weights-naming NAMING
                    the names and layout of the weights: keras (the default, as above),
                    torch (nn.Linear tensors to_q.weight [N*d, Dq], to_q.bias, to_k.*,
                    to_v.*, to_out.*; to_out_softmax.* with begin_kernel), or a JSON
                    name map FILE (docs/weights.md)
  --inputs FILE     query [B,T,Dq], value [B,S,Dv], optional key [B,S,Dk] and
                    attention_mask [B,S]; with --stream optionally the reference's cache
                    cache/kv [B,N,dv,m] and cache/k_sum [B,N,m] (absent: a fresh state);
                    or, with --stream, a ragged call of many sequences: query [total,D]
                    (self-attention), offsets [S+1] and slots [S] (integers)
  --output FILE     receives output [B,T,O]; with --stream also cache/kv and cache/k_sum;
                    for a ragged call output [total,O] only
  --stream          one streaming call over the next T tokens (use_causal_windowed layers)
  --backward        also the gradients: reads grad/output [B,T,O]
                    from --inputs (d loss / d output) and writes grad/query, grad/value,
                    grad/key (when a key is given) and grad/<weight name> for every weight,
                    under the names of the weights file
  --state-in FILE   with --stream: start from a state written by --state-out
  --state-out FILE  with --stream: save the state after this call in kattn's own format;
                    the only way to continue an exact-mode stream (no causal_window_decay);
                    for a ragged call both are the pool of slots (StatePool::saveAll)
  --pool-capacity N with --stream, a ragged call without --state-in: the fresh pool's
                    slots (default: the largest slot named + 1)
  --dtype TYPE      compute and write in float32 (default) or float64
  --threads N       threads to use, 1 to 1024 (default: one per core); results do not
                    depend on it
  --mpi             started under mpirun: split the sequence across the ranks (each reads
                    the files and takes its slice), rank 0 writes the whole output; with
                    --state-out (causal layers) the state after the sequence and its cache
  --slices A,B,...  with --mpi: each rank's number of query positions (default: equal)
  -h, --help        print this help and exit

Exit status: 0 on success; 1 for an invalid or unreadable input, or an unwritable output;
2 for a command-line mistake. Files: docs/kattn-run.md.
)";

/// More threads than this is a typo, not a machine; the pool would try to start them all.
constexpr int kMaxThreads = 1024;

/// A command-line mistake (exit code 2); every other failure exits with 1.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class DType { Float32, Float64 };

struct Options {
  std::string config, weights, inputs, output;
  std::string weights_naming = "keras";  // keras, torch, or a JSON name map's path
  std::optional<std::string> state_in, state_out;
  bool stream = false;
  bool backward = false;
  bool mpi = false;
  std::optional<std::string> slices;
  std::optional<kattn::Index> pool_capacity;  // absent: the largest slot of the call + 1
  DType dtype = DType::Float32;
  std::optional<int> threads;  // absent: the layer's default pool, one thread per core
  bool help = false;
};

/// `text` fit for a one-line message: control characters become '?', long text is cut.
std::string printable(const std::string& text, std::size_t max_chars = 200) {
  std::string out = text.size() > max_chars ? text.substr(0, max_chars - 3) + "..." : text;
  for (char& c : out) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f) c = '?';
  }
  return out;
}

std::string singleQuoted(const std::string& path) { return "'" + printable(path) + "'"; }

Options parseArgs(int argc, char** argv) {
  Options o;
  const std::vector<std::string> args(argv + 1, argv + argc);
  // --help wins over anything else on the line, so that it works after a typo too.
  if (std::any_of(args.begin(), args.end(),
                  [](const std::string& a) { return a == "-h" || a == "--help"; })) {
    o.help = true;
    return o;
  }
  const std::set<std::string> valued = {"--config",   "--weights",   "--inputs",
                                        "--output",   "--state-in",  "--state-out",
                                        "--dtype",    "--threads",   "--weights-naming",
                                        "--slices",   "--pool-capacity"};
  std::set<std::string> seen;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg.rfind("--", 0) != 0) {
      throw UsageError("unexpected argument " + singleQuoted(arg) + " (options start with --)");
    }
    const std::size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq);
    const bool flag = name == "--stream" || name == "--mpi" || name == "--backward";
    if (!flag && !valued.count(name)) {
      throw UsageError("unknown option " + singleQuoted(name) + " (see kattn-run --help)");
    }
    if (!seen.insert(name).second) throw UsageError(name + " given twice");
    if (flag) {
      if (eq != std::string::npos) throw UsageError(name + " takes no value");
      (name == "--mpi" ? o.mpi : name == "--stream" ? o.stream : o.backward) = true;
      continue;
    }
    std::string value;
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      throw UsageError(name + " needs a value");
    }
    if (value.empty()) throw UsageError(name + " needs a non-empty value");

    if (name == "--config") o.config = value;
    if (name == "--weights") o.weights = value;
    if (name == "--weights-naming") o.weights_naming = value;
    if (name == "--inputs") o.inputs = value;
    if (name == "--output") o.output = value;
    if (name == "--state-in") o.state_in = value;
    if (name == "--state-out") o.state_out = value;
    if (name == "--slices") o.slices = value;
    if (name == "--dtype") {
      if (value == "float32") {
        o.dtype = DType::Float32;
      } else if (value == "float64") {
        o.dtype = DType::Float64;
      } else {
        throw UsageError("--dtype: expected float32 or float64, got " + singleQuoted(value));
      }
    }
    if (name == "--threads") {
      int n = 0;
      const char* end = value.data() + value.size();
      const auto [ptr, ec] = std::from_chars(value.data(), end, n);
      if (ec != std::errc() || ptr != end || n < 1 || n > kMaxThreads) {
        throw UsageError("--threads: expected an integer from 1 to " +
                         std::to_string(kMaxThreads) + ", got " + singleQuoted(value));
      }
      o.threads = n;
    }
    if (name == "--pool-capacity") {
      kattn::Index n = 0;
      const char* end = value.data() + value.size();
      const auto [ptr, ec] = std::from_chars(value.data(), end, n);
      if (ec != std::errc() || ptr != end || n < 1) {
        throw UsageError("--pool-capacity: expected an integer of at least 1, got " +
                         singleQuoted(value));
      }
      o.pool_capacity = n;
    }
  }
  std::string missing;
  for (const auto& [name, field] : {std::pair<const char*, const std::string*>{"--config", &o.config},
                                    {"--weights", &o.weights},
                                    {"--inputs", &o.inputs},
                                    {"--output", &o.output}}) {
    if (field->empty()) missing += (missing.empty() ? "" : ", ") + std::string(name);
  }
  if (!missing.empty()) throw UsageError("missing " + missing + " (see kattn-run --help)");
  if (o.slices && !o.mpi) throw UsageError("--slices needs --mpi");
  // Before the MPI build check, so that the message says what --backward cannot do.
  if (o.backward && (o.stream || o.mpi)) {
    throw UsageError(std::string("--backward: not with ") + (o.stream ? "--stream" : "--mpi") +
                     " (gradients exist for the whole-sequence pass on one process only)");
  }
  if (o.mpi && (o.stream || o.state_in)) {
    throw UsageError(std::string(o.stream ? "--stream" : "--state-in") +
                     ": not with --mpi (it runs the whole-sequence pass; --state-out gives the "
                     "state after it)");
  }
#ifndef KATTN_RUN_MPI
  if (o.mpi) throw UsageError("--mpi: this kattn-run was built without MPI");
#endif
  if (!o.stream && !o.mpi && (o.state_in || o.state_out)) {
    throw UsageError(std::string(o.state_in ? "--state-in" : "--state-out") +
                     " needs --stream (a state belongs to a streaming call)");
  }
  if (o.pool_capacity && !o.stream) throw UsageError("--pool-capacity needs --stream");
  if (o.pool_capacity && o.state_in) {
    throw UsageError("--pool-capacity: not with --state-in (the pool file holds its capacity)");
  }
  return o;
}

/// The whole file at `path`; `what` names its role in messages.
std::string readFile(const std::string& path, const char* what) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    throw std::runtime_error(std::string("cannot read ") + what + " " + singleQuoted(path) +
                             ": it is a directory");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw std::runtime_error(std::string("cannot open ") + what + " " + singleQuoted(path) + ": " +
                             std::strerror(errno));
  }
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw std::runtime_error(std::string("cannot read ") + what + " " + singleQuoted(path));
  return bytes;
}

void writeFile(const std::string& path, const std::string& bytes, const char* what) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) {
    throw std::runtime_error(std::string("cannot open ") + what + " " + singleQuoted(path) +
                             " for writing: " + std::strerror(errno));
  }
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) throw std::runtime_error(std::string("cannot write ") + what + " " + singleQuoted(path));
}

kattn::LayerConfig loadConfig(const std::string& path) {
  const std::string text = readFile(path, "config");
  try {
    kattn::LayerConfig config = kattn::io::configFromJsonText(text);
    config.validate();
    return config;
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(singleQuoted(path) + ": " + e.what());
  }
}

kattn::io::WeightNaming loadNaming(const std::string& value) {
  if (value == "keras") return kattn::io::WeightNaming::keras();
  if (value == "torch") return kattn::io::WeightNaming::torch();
  const std::string text = readFile(value, "weight naming");
  try {
    return kattn::io::WeightNaming::fromJsonText(text);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(singleQuoted(value) + ": " + e.what());
  }
}

/// Rejects tensors the run would not read, so that a misspelt name ("mask") or a weight the
/// config ignores (a bias with use_bias false) is an error rather than silently unused. With
/// a prefix, only the names under it are the layer's: a checkpoint holds other layers too.
void checkWeightNames(const kattn::io::SafeTensors& file, const kattn::LayerConfig& c,
                      const kattn::io::WeightNaming& naming) {
  std::map<std::string, std::string> variable_of;  // file name -> Keras variable
  for (const char* v : kattn::io::kWeightVariables) variable_of[naming.fileName(v)] = v;
  const auto isBias = [](const std::string& v) {
    return v.size() > 5 && v.compare(v.size() - 5, 5, "/bias") == 0;
  };
  std::set<std::string> read;
  for (const char* v : kattn::io::kWeightVariables) {
    const bool softmax_part = std::string(v).rfind("attention_output_softmax/", 0) == 0;
    if ((!isBias(v) || c.use_bias) && (!softmax_part || c.begin_kernel > 0)) {
      read.insert(naming.fileName(v));
    }
  }
  if (c.hasProjection()) read.insert("projection_matrix");
  for (const std::string& name : file.names()) {
    if (read.count(name)) continue;
    const auto it = variable_of.find(name);
    const std::string variable = it == variable_of.end() ? name : it->second;
    if (it == variable_of.end() && name != "projection_matrix" && !naming.prefix().empty() &&
        name.rfind(naming.prefix(), 0) != 0) {
      continue;
    }
    std::string why;
    if (it != variable_of.end() && !c.use_bias && isBias(variable)) {
      why = "the config has use_bias = false";
    }
    if (it != variable_of.end() && variable.rfind("attention_output_softmax/", 0) == 0 &&
        c.begin_kernel == 0) {
      why = "the config has begin_kernel = 0 (no softmax part)";
    }
    if (!why.empty() && variable != name) why = "it is " + variable + ", and " + why;
    if (name == "projection_matrix") {
      why = "the config has num_random_features = " + std::to_string(c.num_random_features) +
            " (no projection)";
    }
    if (why.empty()) why = "not a weight of this layer";
    throw std::runtime_error(file.sourceName() + ": tensor '" + printable(name) +
                             "' is not read: " + why);
  }
}

void checkInputNames(const kattn::io::SafeTensors& file, bool stream, bool backward) {
  const std::set<std::string> inputs = {"query", "value", "key", "attention_mask"};
  const std::set<std::string> cache = {"cache/kv", "cache/k_sum"};
  for (const std::string& name : file.names()) {
    if (inputs.count(name) || (stream && cache.count(name))) continue;
    if (backward && name == "grad/output") continue;
    if (cache.count(name)) {
      throw std::runtime_error(file.sourceName() + ": tensor '" + name +
                               "' is a streaming cache, read only with --stream");
    }
    if (name == "grad/output") {
      throw std::runtime_error(file.sourceName() +
                               ": tensor 'grad/output' is read only with --backward");
    }
    if (name == "offsets" || name == "slots") {
      throw std::runtime_error(file.sourceName() + ": tensor '" + name +
                               "' belongs to a ragged call, read only with --stream");
    }
    const char* more = stream ? ", cache/kv, cache/k_sum" : backward ? ", grad/output" : "";
    throw std::runtime_error(file.sourceName() + ": unexpected tensor '" + printable(name) +
                             "' (inputs are query, value, key, attention_mask" + more + ")");
  }
}

/// Refuses inputs whose working set would exceed 1 TiB. Only zero-sized dims let a small
/// file declare such sizes (a [B, T, 0] query holds no data), and the forward would then
/// size its buffers from B and T: refuse before allocating rather than abort.
void checkWorkingSize(kattn::Index B, kattn::Index T, kattn::Index S, kattn::Index width,
                      std::size_t scalar_size) {
  const double elements = double(B) * double(T + S) * double(width) + double(B) * double(T) * double(S);
  const double limit = 1024.0 * 1024 * 1024 * 1024;
  if (elements * double(scalar_size) > limit) {
    std::ostringstream os;
    os << "inputs: B = " << B << ", T = " << T << ", S = " << S << " would need about "
       << elements * double(scalar_size) / (1024.0 * 1024 * 1024)
       << " GiB of working memory; kattn-run refuses more than 1024 GiB";
    throw std::runtime_error(os.str());
  }
}

template <typename Scalar>
kattn::StreamingState<Scalar> startState(const Options& opt, const kattn::io::SafeTensors& inputs,
                                         const kattn::AnyKernelAttention<Scalar>& layer,
                                         kattn::Index batch) {
  using kattn::StreamingState;
  std::optional<StreamingState<Scalar>> state;
  try {
    state = layer.makeState(batch);  // recurrent with a decay, exact without
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(std::string("--stream: ") + e.what());
  }
  const bool has_kv = inputs.contains("cache/kv"), has_k_sum = inputs.contains("cache/k_sum");
  if (has_kv != has_k_sum) {
    throw std::runtime_error(inputs.sourceName() + ": cache/kv and cache/k_sum come together; got " +
                             (has_kv ? "cache/kv" : "cache/k_sum") + " alone");
  }
  if (has_kv && opt.state_in) {
    throw std::runtime_error("cache/kv in " + inputs.sourceName() + " and --state-in " +
                             singleQuoted(*opt.state_in) + " both give the starting state; pass one");
  }
  if (opt.state_in) {
    const std::string bytes = readFile(*opt.state_in, "state");
    if (bytes.compare(0, 8, "KATTNPL1") == 0) {
      throw std::runtime_error(singleQuoted(*opt.state_in) + ": a pool of slots (a ragged call "
                               "wrote it), but the inputs hold no offsets and slots");
    }
    try {
      return StreamingState<Scalar>::fromBytes(bytes);
    } catch (const std::runtime_error& e) {
      throw std::runtime_error(singleQuoted(*opt.state_in) + ": " + e.what());
    }
  }
  if (has_kv) {
    if (state->mode() != kattn::StreamingMode::Recurrent) {
      throw std::runtime_error(
          inputs.sourceName() + ": cache/kv is the reference's recurrent cache, but without "
          "causal_window_decay kattn streams in exact mode; carry its state with "
          "--state-out and --state-in");
    }
    const auto kv = inputs.tensor<Scalar, 4>("cache/kv");
    const auto k_sum = inputs.tensor<Scalar, 3>("cache/k_sum");
    state->setCache(kv, k_sum);
  }
  return std::move(*state);
}

/// The layer of --config with the weights (and projection) of --weights.
template <typename Scalar>
kattn::AnyKernelAttention<Scalar> loadLayer(const Options& opt, const kattn::LayerConfig& config) {
  kattn::AnyKernelAttention<Scalar> layer(config);  // draws the projection from the seed
  if (opt.threads) layer.setThreads(*opt.threads);
  const kattn::io::WeightNaming naming = loadNaming(opt.weights_naming);
  const auto weights = kattn::io::SafeTensors::load(opt.weights);
  // Reading first: under the wrong naming, "missing tensor 'to_q.weight'" says more than
  // the first of the file's names that are not read.
  auto w = kattn::io::loadWeights<Scalar>(weights, config, naming);
  checkWeightNames(weights, config, naming);
  try {
    layer.setWeights(std::move(w));
    if (auto P = kattn::io::loadProjection<Scalar>(weights, config)) layer.setProjection(*P);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(weights.sourceName() + ": " + e.what());
  }
  return layer;
}

/// The tensors of --inputs.
template <typename Scalar>
struct Inputs {
  kattn::io::SafeTensors file;
  kattn::Tensor<Scalar, 3> query, value;
  std::optional<kattn::Tensor<Scalar, 3>> key;
  std::optional<kattn::Tensor<Scalar, 2>> mask;
};

template <typename Scalar>
Inputs<Scalar> loadInputs(const Options& opt, const kattn::LayerConfig& config, kattn::Index O,
                          kattn::io::SafeTensors file) {
  using kattn::Index;
  Inputs<Scalar> in{std::move(file), {}, {}, {}, {}};
  checkInputNames(in.file, opt.stream, opt.backward);
  in.query = in.file.template tensor<Scalar, 3>("query");
  in.value = in.file.template tensor<Scalar, 3>("value");
  if (in.file.contains("key")) in.key = in.file.template tensor<Scalar, 3>("key");
  if (in.file.contains("attention_mask")) {
    in.mask = in.file.template tensor<Scalar, 2>("attention_mask");
  }
  const Index per_head = config.key_dim + config.featureDim() + config.resolvedValueDim();
  // The backward holds a gradient beside each of these.
  checkWorkingSize(in.query.dimension(0), in.query.dimension(1), in.value.dimension(1),
                   (opt.backward ? 2 : 1) * (in.query.dimension(2) + in.value.dimension(2) + O +
                                             Index(config.num_heads) * per_head),
                   sizeof(Scalar));
  return in;
}

template <typename Scalar>
Inputs<Scalar> loadInputs(const Options& opt, const kattn::LayerConfig& config, kattn::Index O) {
  return loadInputs<Scalar>(opt, config, O, kattn::io::SafeTensors::load(opt.inputs));
}

/// grad/output [B, T, O] of --inputs: its shape is that of the output, its entries finite.
template <typename Scalar>
kattn::Tensor<Scalar, 3> loadGradOutput(const Inputs<Scalar>& in, kattn::Index O) {
  const kattn::Tensor<Scalar, 3> g = in.file.template tensor<Scalar, 3>(
      "grad/output", {in.query.dimension(0), in.query.dimension(1), O});
  for (kattn::Index i = 0; i < g.size(); ++i) {
    if (!std::isfinite(g.data()[i])) {
      std::ostringstream os;
      os << in.file.sourceName() << ": tensor 'grad/output': expected finite values, got "
         << g.data()[i] << " at flat index " << i;
      throw std::runtime_error(os.str());
    }
  }
  return g;
}

/// The output and the gradients of runBackward, with the typed layer.
template <typename Layer, typename Scalar>
void gradientsOf(const Options& opt, const kattn::LayerConfig& config,
                 const kattn::AnyKernelAttention<Scalar>& loaded, const Inputs<Scalar>& in,
                 const kattn::Tensor<Scalar, 3>& grad_output,
                 const std::optional<kattn::ConstTensorMap<Scalar, 3>>& key_view,
                 const std::optional<kattn::ConstTensorMap<Scalar, 2>>& mask_view,
                 kattn::io::SafeTensorsWriter& out) {
  Layer layer(config);
  if (opt.threads) layer.setThreads(*opt.threads);
  layer.setWeights(loaded.weights());
  if (config.hasProjection()) layer.setProjection(loaded.projection());
  out.add("output", layer.forward(in.query, in.value, key_view, mask_view, /*training=*/false));
  const kattn::Gradients<Scalar> g =
      kattn::backward(layer, in.query, in.value, key_view, mask_view, grad_output);
  out.add("grad/query", g.query);
  out.add("grad/value", g.value);
  if (in.key) out.add("grad/key", g.key);
  kattn::io::WeightNaming naming = loadNaming(opt.weights_naming);
  naming.setPrefix("grad/" + naming.prefix());
  kattn::io::addWeights(out, g.weights, naming);
}

/**
 * output and the gradients into `out`: grad/query, grad/value, grad/key (with a key input),
 * and every weight's gradient under "grad/" and the name and layout it has in the weights
 * file, so that a weight and its gradient pair up by name under any --weights-naming (a
 * TorchLinear gradient is the transpose of the Keras one, as the weight is).
 */
template <typename Scalar>
void runBackward(const Options& opt, const kattn::LayerConfig& config,
                 const kattn::AnyKernelAttention<Scalar>& loaded, const Inputs<Scalar>& in,
                 kattn::io::SafeTensorsWriter& out) {
  using kattn::ConstTensorMap;
  const kattn::Tensor<Scalar, 3> grad_output = loadGradOutput(in, loaded.outputDim());
  std::optional<ConstTensorMap<Scalar, 3>> key_view;
  std::optional<ConstTensorMap<Scalar, 2>> mask_view;
  if (in.key) key_view.emplace(*in.key);
  if (in.mask) mask_view.emplace(*in.mask);
  // kattn::backward takes the typed layer; visitFeatureMap is the library's one map from
  // feature_transform names to types, so kattn-run does not keep a second one.
  kattn::detail::visitFeatureMap(config.feature_transform, [&](auto map) {
    if (config.use_causal_windowed) {
      gradientsOf<kattn::KernelAttention<Scalar, decltype(map), kattn::CausalWindowed>>(
          opt, config, loaded, in, grad_output, key_view, mask_view, out);
    } else {
      gradientsOf<kattn::KernelAttention<Scalar, decltype(map), kattn::Bidirectional>>(
          opt, config, loaded, in, grad_output, key_view, mask_view, out);
    }
  });
}


}  // namespace

#include "kattn-run-ragged.hpp"

namespace {

template <typename Scalar>
void run(const Options& opt, const kattn::LayerConfig& config) {
  using kattn::ConstTensorMap;
  const kattn::AnyKernelAttention<Scalar> layer = loadLayer<Scalar>(opt, config);
  kattn::io::SafeTensors file = kattn::io::SafeTensors::load(opt.inputs);
  if (opt.stream && isRagged(file)) {
    kattn::io::SafeTensorsWriter out;
    std::string pool_bytes;
    runRagged(opt, config, layer, file, out, pool_bytes);
    out.write(opt.output);
    if (opt.state_out) writeFile(*opt.state_out, pool_bytes, "pool");
    return;
  }
  if (opt.pool_capacity) {
    throw std::runtime_error("--pool-capacity: " + file.sourceName() +
                             " holds no offsets and slots (a pool belongs to a ragged call)");
  }
  const Inputs<Scalar> in = loadInputs<Scalar>(opt, config, layer.outputDim(), std::move(file));
  std::optional<ConstTensorMap<Scalar, 3>> key_view;
  std::optional<ConstTensorMap<Scalar, 2>> mask_view;
  if (in.key) key_view.emplace(*in.key);
  if (in.mask) mask_view.emplace(*in.mask);

  kattn::io::SafeTensorsWriter out;
  std::string state_bytes;
  if (opt.backward) {
    runBackward(opt, config, layer, in, out);
  } else if (!opt.stream) {
    out.add("output", layer.forward(in.query, in.value, key_view, mask_view, /*training=*/false));
  } else {
    auto state = startState(opt, in.file, layer, in.query.dimension(0));
    out.add("output", layer.forward(in.query, in.value, key_view, mask_view, state));
    out.add("cache/kv", state.kv());
    out.add("cache/k_sum", state.kSum());
    if (opt.state_out) state_bytes = state.toBytes();
  }
  out.write(opt.output);
  if (opt.state_out) writeFile(*opt.state_out, state_bytes, "state");
}

}  // namespace

#ifdef KATTN_RUN_MPI
#include "kattn-run-mpi.hpp"
#endif

namespace {

int fail(const std::string& what, int code) {
  std::cerr << "kattn-run: " << printable(what, 2000) << std::endl;
  return code;
}

/// The run, under MPI when asked: MPI_Init first, MPI_Finalize however it ends. Only rank 0
/// prints an error: the ranks agree on every failure and would print the same line each.
template <typename Body>
int withMpi(bool mpi, int argc, char** argv, Body&& body) {
#ifdef KATTN_RUN_MPI
  if (mpi) {
    MPI_Init(&argc, &argv);
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    const int code = body(rank == 0);
    MPI_Finalize();
    return code;
  }
#else
  (void)mpi;
  (void)argc;
  (void)argv;
#endif
  return body(true);
}

}  // namespace

int main(int argc, char** argv) {
  std::optional<Options> parsed;
  try {
    parsed = parseArgs(argc, argv);
  } catch (const UsageError& e) {
    return fail(e.what(), 2);
  }
  const Options& opt = *parsed;
  if (opt.help) {
    std::cout << kUsage;
    return 0;
  }
  return withMpi(opt.mpi, argc, argv, [&](bool speaks) {
    auto report = [&](const std::string& what, int code) { return speaks ? fail(what, code) : code; };
    try {
      const kattn::LayerConfig config = loadConfig(opt.config);
      const bool f64 = opt.dtype == DType::Float64;
#ifdef KATTN_RUN_MPI
      if (opt.mpi) {
        f64 ? runMpi<double>(opt, config) : runMpi<float>(opt, config);
        return 0;
      }
#endif
      f64 ? run<double>(opt, config) : run<float>(opt, config);
      return 0;
    } catch (const std::bad_alloc&) {
      return report("out of memory", 1);
    } catch (const std::exception& e) {
      return report(e.what(), 1);
    } catch (...) {
      return report("unexpected error", 1);
    }
  });
}
