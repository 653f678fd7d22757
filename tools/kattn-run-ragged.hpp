// kattn-run --stream with `offsets` and `slots` in the inputs: one ragged call of
// self-attention (KernelAttention::forward(tokens, pool, slots, offsets)) over a StatePool that
// --state-in and --state-out carry between runs. The contract is in docs/kattn-run.md ("Many
// sequences in one call"). Included by kattn-run.cpp, whose helpers it uses.

#include <limits>

#include <kattn/feature_maps.hpp>
#include <kattn/layer.hpp>
#include <kattn/state_pool.hpp>

namespace {

/// Whether the inputs ask for a ragged call.
bool isRagged(const kattn::io::SafeTensors& file) {
  return file.contains("offsets") || file.contains("slots");
}

/// The tensors a ragged call reads, and a message for each one it refuses by name.
void checkRaggedInputNames(const kattn::io::SafeTensors& file) {
  for (const std::string& name : file.names()) {
    if (name == "query" || name == "value" || name == "key" || name == "offsets" ||
        name == "slots") {
      continue;
    }
    const std::string where = file.sourceName() + ": tensor '" + printable(name) + "': ";
    if (name == "attention_mask") {
      throw std::runtime_error(where + "a ragged call takes no mask (every row of a sequence "
                                       "is one of its tokens)");
    }
    if (name == "cache/kv" || name == "cache/k_sum") {
      throw std::runtime_error(where + "a ragged call's states are in the pool file "
                                       "(--state-in, --state-out), not in cache tensors");
    }
    throw std::runtime_error(file.sourceName() + ": unexpected tensor '" + printable(name) +
                             "' (a ragged call reads query, offsets, slots, and value or key "
                             "only when equal to query)");
  }
}

/// The raw bytes of tensor `info` of the safetensors file at `path`, whose header `info` came
/// from (SafeTensors checked its offsets against the file): SafeTensors converts only the
/// float dtypes, and offsets and slots are integers.
std::string rawTensorBytes(const std::string& path, const kattn::io::TensorInfo& info) {
  std::ifstream in(path, std::ios::binary);
  std::uint64_t header = 0;
  in.read(reinterpret_cast<char*>(&header), sizeof(header));
  std::string bytes(info.end - info.begin, '\0');
  in.seekg(std::streamoff(8 + header + info.begin));
  in.read(bytes.data(), std::streamsize(bytes.size()));
  if (!in) throw std::runtime_error("cannot read tensor '" + info.name + "' of " + singleQuoted(path));
  return bytes;
}

/// Tensor `name` [n] of the inputs as integers: I64 or I32, or a float dtype holding whole
/// numbers (what numpy gives for a list of ints, and what a float-only writer can give).
std::vector<kattn::Index> integerTensor(const Options& opt, const kattn::io::SafeTensors& file,
                                        const std::string& name) {
  const kattn::io::TensorInfo& info = file.info(name);
  const std::string where = file.sourceName() + ": tensor '" + name + "': ";
  if (info.shape.size() != 1) {
    std::string shape;
    for (const kattn::Index d : info.shape) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
    throw std::runtime_error(where + "expected rank 1, got shape [" + shape + "]");
  }
  std::vector<kattn::Index> out(std::size_t(info.shape[0]));
  if (info.dtype_name == "I64" || info.dtype_name == "I32") {
    const std::string bytes = rawTensorBytes(opt.inputs, info);
    for (std::size_t i = 0; i < out.size(); ++i) {
      if (info.dtype_name == "I64") {
        std::int64_t v = 0;
        std::memcpy(&v, bytes.data() + 8 * i, 8);
        out[i] = kattn::Index(v);
      } else {
        std::int32_t v = 0;
        std::memcpy(&v, bytes.data() + 4 * i, 4);
        out[i] = kattn::Index(v);
      }
    }
    return out;
  }
  if (!info.convertible) {
    throw std::runtime_error(where + "expected integers (I64 or I32, or whole numbers in a float "
                                     "dtype), got dtype " + info.dtype_name);
  }
  const kattn::Tensor<double, 1> values = file.tensor<double, 1>(name);
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double v = values(kattn::Index(i));
    // 2^53: beyond it a double does not tell neighbouring integers apart.
    if (!(std::floor(v) == v && std::abs(v) <= 9007199254740992.0)) {
      std::ostringstream os;
      os << where << "expected whole numbers, got " << v << " at index " << i;
      throw std::runtime_error(os.str());
    }
    out[i] = kattn::Index(v);
  }
  return out;
}

/// The query rows [total, D]; value and key, when given, must be the same rows.
template <typename Scalar>
kattn::Tensor<Scalar, 2> raggedTokens(const kattn::io::SafeTensors& file) {
  const kattn::io::TensorInfo& info = file.info("query");
  if (info.shape.size() != 2) {
    std::string shape;
    for (const kattn::Index d : info.shape) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
    throw std::runtime_error(file.sourceName() + ": tensor 'query': with offsets and slots the "
                             "query is the packed rows [total, D], got shape [" + shape + "]");
  }
  kattn::Tensor<Scalar, 2> query = file.tensor<Scalar, 2>("query");
  for (const char* other : {"value", "key"}) {
    if (!file.contains(other)) continue;
    const std::string why = file.sourceName() + ": tensor '" + other + "': a ragged call is "
                            "self-attention (the query rows are also its keys and values); "
                            "leave " + other + " out, or give the query's rows";
    if (file.info(other).shape != info.shape) throw std::runtime_error(why + " (other shape)");
    const kattn::Tensor<Scalar, 2> rows = file.tensor<Scalar, 2>(other);
    if (!std::equal(rows.data(), rows.data() + rows.size(), query.data())) {
      throw std::runtime_error(why + " (other values)");
    }
  }
  return query;
}

/// The capacity a saved pool's header records (StatePool::saveAll: the int64 after the magic
/// and the scalar size), to make a pool that loadAll can fill. 1 when the bytes are too short
/// or not a pool: loadAll then says what is wrong.
std::int64_t savedPoolCapacity(const std::string& bytes) {
  std::int64_t capacity = 1;
  if (bytes.size() >= 24 && bytes.compare(0, 8, "KATTNPL1") == 0) {
    std::memcpy(&capacity, bytes.data() + 16, 8);
  }
  return capacity;
}

/// The pool of --state-in, or a fresh one of --pool-capacity (default: the largest slot + 1)
/// slots; every slot of the call that is free is acquired (a new sequence).
template <typename Scalar>
kattn::StatePool<Scalar> startPool(const Options& opt,
                                   const kattn::AnyKernelAttention<Scalar>& layer,
                                   const std::vector<kattn::Index>& slots) {
  std::optional<kattn::StreamingState<Scalar>> prototype;
  try {
    prototype = layer.makeState(1);  // recurrent with a decay, exact without
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(std::string("--stream: ") + e.what());
  }
  std::optional<kattn::StatePool<Scalar>> pool;
  if (opt.state_in) {
    const std::string bytes = readFile(*opt.state_in, "pool");
    const std::string where = singleQuoted(*opt.state_in) + ": ";
    if (bytes.compare(0, 7, "KATTNST") == 0) {  // any version of the one-stream format
      throw std::runtime_error(where + "a one-stream state (kattn-run --stream without offsets "
                               "and slots wrote it), not a pool of slots");
    }
    // Every slot takes at least 8 bytes of the file: a larger capacity is a corrupt header,
    // and must not size the pool.
    const std::int64_t capacity = savedPoolCapacity(bytes);
    if (capacity < 1 || std::uint64_t(capacity) > bytes.size() / 8) {
      throw std::runtime_error(where + "corrupt pool header (capacity " +
                               std::to_string(capacity) + " in " +
                               std::to_string(bytes.size()) + " bytes)");
    }
    pool.emplace(kattn::Index(capacity), *prototype);
    std::istringstream is(bytes, std::ios::binary);
    try {
      pool->loadAll(is);
    } catch (const std::exception& e) {
      throw std::runtime_error(where + e.what());
    }
    if (is.peek() != std::char_traits<char>::eof()) {
      throw std::runtime_error(where + std::to_string(bytes.size() - std::size_t(is.tellg())) +
                               " bytes after the saved pool");
    }
  } else {
    kattn::Index capacity = 1;
    for (const kattn::Index s : slots) {
      if (s >= capacity) capacity = s < std::numeric_limits<kattn::Index>::max() ? s + 1 : s;
    }
    pool.emplace(opt.pool_capacity ? *opt.pool_capacity : capacity, *prototype);
  }
  // A slot named twice is acquired once; the call itself refuses it, with its message.
  try {
    for (const kattn::Index s : slots) {
      if (!pool->inUse(s)) pool->acquire(s);
    }
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(std::string("tensor 'slots': ") + e.what());
  }
  return std::move(*pool);
}

/// The ragged call: `output` [total, O] into `out`; the pool after it, in saveAll's format,
/// into `pool_bytes` when --state-out asks for it.
template <typename Scalar>
void runRagged(const Options& opt, const kattn::LayerConfig& config,
               const kattn::AnyKernelAttention<Scalar>& loaded, const kattn::io::SafeTensors& file,
               kattn::io::SafeTensorsWriter& out, std::string& pool_bytes) {
  checkRaggedInputNames(file);
  for (const auto& [name, other] : {std::pair<const char*, const char*>{"offsets", "slots"},
                                    {"slots", "offsets"}}) {
    if (!file.contains(name)) {
      throw std::runtime_error(file.sourceName() + ": tensor '" + other + "' without '" + name +
                               "': a ragged call needs both (offsets [S+1], slots [S])");
    }
  }
  const std::vector<kattn::Index> offsets = integerTensor(opt, file, "offsets");
  const std::vector<kattn::Index> slots = integerTensor(opt, file, "slots");
  const kattn::Tensor<Scalar, 2> tokens = raggedTokens<Scalar>(file);
  const kattn::Index per_head = config.key_dim + config.featureDim() + config.resolvedValueDim();
  checkWorkingSize(1, tokens.dimension(0), 0,
                   tokens.dimension(1) + loaded.outputDim() + kattn::Index(config.num_heads) * per_head,
                   sizeof(Scalar));
  kattn::StatePool<Scalar> pool = startPool(opt, loaded, slots);
  // The ragged call is the typed layer's (AnyKernelAttention has none): the same weights.
  kattn::detail::visitFeatureMap(config.feature_transform, [&](auto map) {
    using Map = decltype(map);
    if constexpr (kattn::feature_map_traits<Map>::bidirectional_only) {
      throw std::logic_error("internal error: a map that cannot stream made a pool");
    } else {
      kattn::KernelAttention<Scalar, Map, kattn::CausalWindowed> layer(config);
      if (opt.threads) layer.setThreads(*opt.threads);
      layer.setWeights(loaded.weights());
      if (config.hasProjection()) layer.setProjection(loaded.projection());
      try {
        out.add("output", layer.forward(tokens, pool, slots, offsets));
      } catch (const std::logic_error& e) {  // invalid_argument too: offsets, slots, chunks
        throw std::runtime_error(file.sourceName() + ": " + e.what());
      }
    }
  });
  if (opt.state_out) {
    std::ostringstream os(std::ios::binary);
    pool.saveAll(os);
    pool_bytes = os.str();
  }
}

}  // namespace
