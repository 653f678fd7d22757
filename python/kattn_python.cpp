// The Python module `kattn`: the run-time layer (AnyKernelAttention) and its streaming state
// over numpy arrays. Configs go through the library's JSON parser and every check is the
// library's, so Python sees the same option names, defaults and messages as C++ callers.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include <kattn/any_layer.hpp>
#include <kattn/io/config_json.hpp>
#include <kattn/limits.hpp>

namespace py = pybind11;

namespace {

using kattn::Index;

// c_style | forcecast: an array already C-contiguous of the layer's dtype passes through
// as the same object (no copy); anything else is copied once into such an array. ALIGNED
// because the kernels read the memory as Scalar*, which must be aligned for its type.
constexpr int kInputFlags =
    py::array::c_style | py::array::forcecast | py::detail::npy_api::NPY_ARRAY_ALIGNED_;

template <typename Scalar>
using InputArray = py::array_t<Scalar, kInputFlags>;

std::string shapeOf(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += (i ? ", " : "") + std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

/// `obj` as a C-contiguous array of Scalar (the caller's own memory where it already is one)
/// with `rank` dimensions; `name` and `layout` ("[B, T, D_q]") name it in messages.
template <typename Scalar>
InputArray<Scalar> inputArray(const py::handle& obj, const char* name, int rank,
                              const char* layout) {
  if (obj.is_none()) {
    throw py::type_error(std::string(name) + ": expected an array " + layout + ", got None");
  }
  InputArray<Scalar> a(py::reinterpret_borrow<py::object>(obj));
  if (a.ndim() != rank) {
    throw py::value_error(std::string(name) + ": expected an array " + layout + " (" +
                          std::to_string(rank) + " dimensions), got shape " + shapeOf(a));
  }
  return a;
}

/// A read-only view of `a` as a kattn tensor (no copy).
template <typename Scalar, int Rank>
kattn::ConstTensorMap<Scalar, Rank> view(const InputArray<Scalar>& a) {
  std::array<Index, Rank> dims{};
  for (int i = 0; i < Rank; ++i) dims[i] = Index(a.shape(i));
  return kattn::ConstTensorMap<Scalar, Rank>(a.data(), dims);
}

/// Hands `t` to numpy without a copy: the array owns the tensor through a capsule. `shape`
/// may regroup the dimensions (same element count).
template <typename Scalar, int Rank>
py::array_t<Scalar> toNumpy(kattn::Tensor<Scalar, Rank>&& t, std::vector<py::ssize_t> shape) {
  auto owned = std::make_unique<kattn::Tensor<Scalar, Rank>>(std::move(t));
  Scalar* data = owned->data();
  py::capsule owner(owned.get(), [](void* p) {
    delete static_cast<kattn::Tensor<Scalar, Rank>*>(p);
  });
  owned.release();
  return py::array_t<Scalar>(std::move(shape), data, owner);
}

template <typename Scalar, int Rank>
py::array_t<Scalar> toNumpy(kattn::Tensor<Scalar, Rank>&& t) {
  std::vector<py::ssize_t> shape;
  for (int i = 0; i < Rank; ++i) shape.push_back(py::ssize_t(t.dimension(i)));
  return toNumpy(std::move(t), std::move(shape));
}

/// A copy of `t` as a numpy array (for values the layer keeps).
template <typename Scalar, int Rank>
py::array_t<Scalar> copyToNumpy(const kattn::Tensor<Scalar, Rank>& t) {
  return toNumpy(kattn::Tensor<Scalar, Rank>(t));
}

enum class DType { Float32, Float64 };

/// The scalar of a kattn layer or state.
template <typename T>
struct ScalarOf;
template <typename S>
struct ScalarOf<kattn::AnyKernelAttention<S>> {
  using type = S;
};
template <typename S>
struct ScalarOf<kattn::StreamingState<S>> {
  using type = S;
};
template <typename T>
using ScalarOfT = typename ScalarOf<std::decay_t<T>>::type;

/// numpy's reading of `dtype` (numpy.float32, "float32", numpy.dtype("f8"), ...). None is
/// refused rather than read as numpy's default float64: the layer's default is float32.
DType parseDType(const py::object& dtype) {
  if (!dtype.is_none()) {
    const py::dtype dt = py::dtype::from_args(dtype);
    if (dt.kind() == 'f' && dt.itemsize() == 4) return DType::Float32;
    if (dt.kind() == 'f' && dt.itemsize() == 8) return DType::Float64;
  }
  throw py::value_error("dtype: kattn computes in float32 or float64, got " +
                        std::string(py::repr(dtype)));
}

py::dtype numpyDType(DType d) {
  return d == DType::Float32 ? py::dtype::of<float>() : py::dtype::of<double>();
}

/// The library's parser reads JSON text: a dict goes through json.dumps (numpy scalars as
/// their Python values), a str is taken as JSON text already.
kattn::LayerConfig parseConfig(const py::object& config) {
  if (py::isinstance<py::str>(config)) {
    return kattn::io::configFromJsonText(config.cast<std::string>());
  }
  const py::object numpy_generic = py::module_::import("numpy").attr("generic");
  const py::cpp_function plain([numpy_generic](const py::object& o) -> py::object {
    if (py::isinstance(o, numpy_generic)) return o.attr("item")();
    throw py::type_error("config: a value of type " +
                         std::string(py::str(o.get_type().attr("__name__"))) +
                         " is not JSON serializable");
  });
  const py::object text = py::module_::import("json").attr("dumps")(config, py::arg("default") = plain);
  return kattn::io::configFromJsonText(text.cast<std::string>());
}

/// f(name, tensor) for every weight under its Keras name, in the library's order.
template <typename Weights, typename F>
void forEachWeight(Weights& w, F&& f) {
  f("query/kernel", w.query_kernel);
  f("query/bias", w.query_bias);
  f("key/kernel", w.key_kernel);
  f("key/bias", w.key_bias);
  f("value/kernel", w.value_kernel);
  f("value/bias", w.value_bias);
  f("attention_output/kernel", w.output_kernel);
  f("attention_output/bias", w.output_bias);
  f("attention_output_softmax/kernel", w.output_softmax_kernel);
  f("attention_output_softmax/bias", w.output_softmax_bias);
}

std::string weightNames() {
  std::string names;
  kattn::Weights<float> w;
  forEachWeight(w, [&](const char* name, const auto&) {
    names += (names.empty() ? "" : ", ") + std::string(name);
  });
  return names;
}

template <typename Scalar>
kattn::Weights<Scalar> weightsFromDict(const py::dict& d) {
  kattn::Weights<Scalar> w;
  for (const auto& item : d) {
    const std::string key = py::str(item.first);
    bool known = false;
    forEachWeight(w, [&](const char* name, auto& tensor) {
      if (key != name) return;
      using T = std::decay_t<decltype(tensor)>;
      constexpr int rank = T::NumDimensions;
      const char* layouts[] = {"", "[O]", "[N, d]", "[D, N, d]"};
      const InputArray<Scalar> a = inputArray<Scalar>(item.second, name, rank, layouts[rank]);
      tensor = T(view<Scalar, rank>(a));
      known = true;
    });
    if (!known) {
      throw py::value_error("weights: unknown name \"" + key + "\"; valid: " + weightNames() +
                            " (a projection_matrix goes to .projection)");
    }
  }
  return w;
}

template <typename Scalar>
py::dict weightsToDict(const kattn::Weights<Scalar>& w) {
  py::dict d;
  forEachWeight(w, [&](const char* name, const auto& tensor) {
    if (tensor.size()) d[name] = copyToNumpy(tensor);
  });
  return d;
}

std::optional<kattn::StreamingMode> parseMode(const py::object& mode) {
  if (mode.is_none()) return std::nullopt;
  const std::string m = py::str(mode);
  if (m == "recurrent") return kattn::StreamingMode::Recurrent;
  if (m == "exact") return kattn::StreamingMode::Exact;
  throw py::value_error("mode: expected None, \"recurrent\" or \"exact\", got \"" + m + "\"");
}

const char* modeName(kattn::StreamingMode m) {
  return m == kattn::StreamingMode::Recurrent ? "recurrent" : "exact";
}

/// A streaming state of either dtype. Its mutex serialises calls that feed or read it, which
/// run without the GIL.
class State {
 public:
  /// f(state) under the state's lock.
  template <typename F>
  decltype(auto) locked(F&& f) {
    std::lock_guard<std::mutex> lock(m_mutex);
    return std::visit(f, m_state);
  }
  template <typename F>
  decltype(auto) locked(F&& f) const {
    std::lock_guard<std::mutex> lock(m_mutex);
    return std::visit(f, m_state);
  }

  template <typename Scalar>
  explicit State(kattn::StreamingState<Scalar> s) : m_state(std::move(s)) {}
  State(const State& o) : m_state(o.locked([](const auto& s) { return Variant(s); })) {}

  DType dtype() const {
    return std::holds_alternative<kattn::StreamingState<float>>(m_state) ? DType::Float32
                                                                          : DType::Float64;
  }

  template <typename Scalar>
  kattn::StreamingState<Scalar>& get() {
    return std::get<kattn::StreamingState<Scalar>>(m_state);
  }
  std::mutex& mutex() const { return m_mutex; }

 private:
  using Variant = std::variant<kattn::StreamingState<float>, kattn::StreamingState<double>>;
  Variant m_state;
  mutable std::mutex m_mutex;
};

/// The run-time layer of either dtype. Forward passes run without the GIL under a shared
/// lock; whatever changes the layer takes it exclusively, so a weight update never meets a
/// forward running on another Python thread.
class Layer {
 public:
  /// f(layer) under the shared lock (reads) or the exclusive one (changes).
  template <typename F>
  decltype(auto) shared(F&& f) const {
    std::shared_lock<std::shared_mutex> lock(m_mutex);
    return std::visit(f, m_layer);
  }
  template <typename F>
  decltype(auto) exclusive(F&& f) {
    std::unique_lock<std::shared_mutex> lock(m_mutex);
    return std::visit(f, m_layer);
  }

  Layer(const py::object& config, const py::object& dtype)
      : m_layer(makeLayer(parseConfig(config), parseDType(dtype))) {}

  DType dtype() const {
    return std::holds_alternative<kattn::AnyKernelAttention<float>>(m_layer) ? DType::Float32
                                                                             : DType::Float64;
  }

  py::object config() const {
    const auto& c = std::visit([](const auto& l) -> const kattn::LayerConfig& { return l.config(); },
                               m_layer);
    // In the library's order of the options (nlohmann's object sorts its keys).
    const nlohmann::json j = kattn::io::configToJson(c);
    const py::object loads = py::module_::import("json").attr("loads");
    py::dict d;
    for (const char* key : kattn::io::kConfigKeys) d[key] = loads(j.at(key).dump());
    return std::move(d);
  }

  Index outputDim() const {
    return shared([](const auto& l) { return l.outputDim(); });
  }
  Index numFeatures() const {
    return shared([](const auto& l) { return l.numFeatures(); });
  }
  bool hasWeights() const {
    return shared([](const auto& l) { return l.hasWeights(); });
  }

  void setWeights(const py::dict& d) {
    exclusive([&](auto& l) {
      using Scalar = ScalarOfT<decltype(l)>;
      l.setWeights(weightsFromDict<Scalar>(d));
    });
  }

  py::dict weights() const {
    return shared([](const auto& l) { return weightsToDict(l.weights()); });
  }

  void initializeWeights(Index query_dim, Index value_dim, std::optional<Index> key_dim) {
    exclusive([&](auto& l) { l.initializeWeights(query_dim, value_dim, key_dim); });
  }

  py::object projection() const {
    return shared([](const auto& l) -> py::object {
      const auto& P = l.projection();
      if (P.size() == 0) return py::none();
      using Scalar = typename std::decay_t<decltype(P)>::Scalar;
      kattn::Tensor<Scalar, 2> t(P.rows(), P.cols());
      std::copy(P.data(), P.data() + P.size(), t.data());
      return toNumpy(std::move(t));
    });
  }

  void setProjection(const py::object& P) {
    exclusive([&](auto& l) {
      using Scalar = ScalarOfT<decltype(l)>;
      const auto a = inputArray<Scalar>(P, "projection_matrix", 2, "[M, key_dim]");
      l.setProjection(Eigen::Map<const kattn::Matrix<Scalar>>(a.data(), a.shape(0), a.shape(1)));
    });
  }

  void setThreads(int threads) {
    exclusive([&](auto& l) { l.setThreads(threads); });
  }

  State makeState(Index batch, const py::object& mode) const {
    const auto m = parseMode(mode);
    return shared([&](const auto& l) { return State(l.makeState(batch, m)); });
  }

  py::array forward(const py::object& query, const py::object& value, const py::object& key,
                    const py::object& mask, bool training, State* state) {
    if (state && training) {
      throw py::value_error("training: a streaming call (with a state) is inference only");
    }
    return std::visit(
        [&](auto& l) -> py::array {
          using Scalar = ScalarOfT<decltype(l)>;
          const auto q = inputArray<Scalar>(query, "query", 3, "[B, T, D_q]");
          const auto v = inputArray<Scalar>(value, "value", 3, "[B, S, D_v]");
          std::optional<InputArray<Scalar>> k, m;
          if (!key.is_none()) k = inputArray<Scalar>(key, "key", 3, "[B, S, D_k]");
          if (!mask.is_none()) m = inputArray<Scalar>(mask, "mask", 2, "[B, S]");
          return toNumpy(run(l, view<Scalar, 3>(q), view<Scalar, 3>(v), k, m, training, state));
        },
        m_layer);
  }

  py::array step(const py::object& x, State& state) {
    return std::visit(
        [&](auto& l) -> py::array {
          using Scalar = ScalarOfT<decltype(l)>;
          const auto a = InputArray<Scalar>(py::reinterpret_borrow<py::object>(x));
          if (a.ndim() != 2 && a.ndim() != 3) {
            throw py::value_error("x: expected an array [B, D] (one token per row) or [B, T, D], "
                                  "got shape " + shapeOf(a));
          }
          // [B, D] is the same memory as [B, 1, D].
          const Index B = a.shape(0), T = a.ndim() == 3 ? a.shape(1) : 1;
          const kattn::ConstTensorMap<Scalar, 3> xs(a.data(), B, T, a.shape(a.ndim() - 1));
          auto y = run<Scalar>(l, xs, xs, {}, {}, false, &state);
          if (a.ndim() == 3) return toNumpy(std::move(y));
          const py::ssize_t O = y.dimension(2);
          return toNumpy(std::move(y), {py::ssize_t(B), O});
        },
        m_layer);
  }

 private:
  using Variant = std::variant<kattn::AnyKernelAttention<float>, kattn::AnyKernelAttention<double>>;

  static Variant makeLayer(const kattn::LayerConfig& c, DType d) {
    if (d == DType::Float32) return Variant(std::in_place_index<0>, c);
    return Variant(std::in_place_index<1>, c);
  }

  template <typename Scalar>
  kattn::Tensor<Scalar, 3> run(const kattn::AnyKernelAttention<Scalar>& l,
                               const kattn::ConstTensorMap<Scalar, 3>& q,
                               const kattn::ConstTensorMap<Scalar, 3>& v,
                               const std::optional<InputArray<Scalar>>& k,
                               const std::optional<InputArray<Scalar>>& m, bool training,
                               State* state) const {
    if (state && state->dtype() != dtype()) {
      throw py::value_error(std::string("state: a ") +
                            (state->dtype() == DType::Float32 ? "float32" : "float64") +
                            " state cannot feed a " +
                            (dtype() == DType::Float32 ? "float32" : "float64") + " layer");
    }
    std::optional<kattn::ConstTensorMap<Scalar, 3>> kv;
    std::optional<kattn::ConstTensorMap<Scalar, 2>> mv;
    if (k) kv.emplace(view<Scalar, 3>(*k));
    if (m) mv.emplace(view<Scalar, 2>(*m));
    // The input arrays are read without the GIL (the call's arguments keep them alive); no
    // Python object is touched until it is back. The locks go before the GIL is taken back, so
    // a thread that waits for the GIL never holds them.
    py::gil_scoped_release no_gil;
    std::shared_lock<std::shared_mutex> lock(m_mutex);
    if (!state) return l.forward(q, v, kv, mv, training);
    std::lock_guard<std::mutex> state_lock(state->mutex());
    return l.forward(q, v, kv, mv, state->get<Scalar>());
  }

  Variant m_layer;
  mutable std::shared_mutex m_mutex;
};

}  // namespace

PYBIND11_MODULE(kattn, m) {
  m.doc() =
      "Kernel attention (Performer / TF Model Garden KernelAttention) over numpy arrays.\n\n"
      "KernelAttention(config, dtype) builds a layer from a Keras get_config() dict; State is\n"
      "the decode cache of a causal layer. Errors are the C++ library's: ValueError for a bad\n"
      "config, input or state (std::invalid_argument), RuntimeError for a failed load or a\n"
      "layer without weights, MemoryLimitError (a ValueError) past kattn's memory limit.";
#ifdef KATTN_VERSION
  m.attr("__version__") = KATTN_VERSION;
#endif

  py::register_exception<kattn::MemoryLimitError>(m, "MemoryLimitError", PyExc_ValueError);

  m.def("set_memory_limit", &kattn::setMemoryLimit, py::arg("bytes"),
        "Sets the largest single allocation kattn makes, in bytes (process-wide; default 4 "
        "GiB). Larger requests raise MemoryLimitError before allocating.");
  m.def("memory_limit", &kattn::memoryLimit, "The current memory limit in bytes.");

  py::class_<State>(m, "State",
                    "The streaming state (decode cache) of a causal layer, made by "
                    "KernelAttention.make_state. Feed it to step() or forward(..., state=).")
      .def_property_readonly("dtype", [](const State& s) { return numpyDType(s.dtype()); },
                             "numpy dtype of the state (its layer's).")
      .def_property_readonly("batch", [](const State& s) {
        return s.locked([](const auto& st) { return st.batch(); });
      }, "Batch rows B: one stream per row.")
      .def_property_readonly("heads", [](const State& s) {
        return s.locked([](const auto& st) { return st.heads(); });
      }, "Heads N.")
      .def_property_readonly("features", [](const State& s) {
        return s.locked([](const auto& st) { return st.features(); });
      }, "Features per head F.")
      .def_property_readonly("value_dim", [](const State& s) {
        return s.locked([](const auto& st) { return st.valueDim(); });
      }, "value_dim d_v.")
      .def_property_readonly("mode", [](const State& s) {
        return s.locked([](const auto& st) { return modeName(st.mode()); });
      }, "\"recurrent\" (the reference's decayed cache) or \"exact\" (the whole causal pass).")
      .def_property_readonly("tokens", [](const State& s) {
        return s.locked([](const auto& st) { return st.tokens(); });
      }, "Tokens fed so far per row.")
      .def_property_readonly("finished", [](const State& s) {
        return s.locked([](const auto& st) { return st.finished(); });
      }, "Whether a call ended inside a chunk (the stream takes no more calls until reset).")
      .def("reset", [](State& s) { s.locked([](auto& st) { st.reset(); }); },
           "Back to the state before any token.")
      .def("kv", [](const State& s) {
        return s.locked([](const auto& st) -> py::array { return toNumpy(st.kv()); });
      }, "The reference's cache tensor cache/kv [B, N, d_v, F] (a copy).")
      .def("k_sum", [](const State& s) {
        return s.locked([](const auto& st) -> py::array { return toNumpy(st.kSum()); });
      }, "The reference's cache tensor cache/k_sum [B, N, F] (a copy).")
      .def("set_cache", [](State& s, const py::object& kv, const py::object& k_sum) {
        s.locked([&](auto& st) {
          using Scalar = ScalarOfT<decltype(st)>;
          const auto a = inputArray<Scalar>(kv, "cache/kv", 4, "[B, N, d_v, F]");
          const auto b = inputArray<Scalar>(k_sum, "cache/k_sum", 3, "[B, N, F]");
          st.setCache(view<Scalar, 4>(a), view<Scalar, 3>(b));
        });
      }, py::arg("kv"), py::arg("k_sum"),
         "Loads the reference's cache tensors (recurrent mode only).")
      .def("save", [](const State& s) {
        return py::bytes(s.locked([](const auto& st) { return st.toBytes(); }));
      }, "The whole state as bytes (kattn's own format); State.load reads it back.")
      .def_static("load", [](const py::bytes& data, const py::object& dtype) {
        const std::string bytes = data;
        if (parseDType(dtype) == DType::Float32) {
          return State(kattn::StreamingState<float>::fromBytes(bytes));
        }
        return State(kattn::StreamingState<double>::fromBytes(bytes));
      }, py::arg("data"), py::arg("dtype") = "float32",
         "A state from State.save() bytes; dtype must be the one it was saved with.")
      .def("copy", [](const State& s) { return State(s); }, "An independent copy.")
      .def("__copy__", [](const State& s) { return State(s); })
      .def("__deepcopy__", [](const State& s, const py::object&) { return State(s); });

  py::class_<Layer>(m, "KernelAttention",
                    "A kernel attention layer configured at run time.\n\n"
                    "config: a dict (or JSON text) under the Keras get_config() names; dtype: "
                    "numpy.float32 (default) or numpy.float64, or their names.")
      .def(py::init<const py::object&, const py::object&>(), py::arg("config"),
           py::arg("dtype") = "float32")
      .def_property_readonly("dtype", [](const Layer& l) { return numpyDType(l.dtype()); },
                             "numpy dtype the layer computes in.")
      .def_property_readonly("config", &Layer::config,
                             "The layer's config as a dict (every option, defaults filled in).")
      .def_property_readonly("output_dim", &Layer::outputDim,
                             "O, the last dim of the output (0 before weights are set).")
      .def_property_readonly("num_features", &Layer::numFeatures,
                             "Features per head F: num_random_features, or key_dim without.")
      .def_property_readonly("has_weights", &Layer::hasWeights, "Whether weights are set.")
      .def("set_weights", &Layer::setWeights, py::arg("weights"),
           "Sets every weight from a dict of arrays under the Keras names (query/kernel, "
           "query/bias, key/..., value/..., attention_output/..., attention_output_softmax/...). "
           "The layer keeps copies.")
      .def("weights", &Layer::weights,
           "The weights as a dict of arrays under the Keras names (copies; absent biases "
           "left out).")
      .def("initialize_weights", &Layer::initializeWeights, py::arg("query_dim"),
           py::arg("value_dim"), py::arg("key_dim") = py::none(),
           "Draws the weights from the config's initializers and seed, as Keras does when it "
           "builds the layer for these input dims.")
      .def_property("projection", &Layer::projection, &Layer::setProjection,
                    "The random-feature projection [num_random_features, key_dim] (a copy), "
                    "or None without one. Assigning an array replaces it.")
      .def("set_threads", &Layer::setThreads, py::arg("threads"),
           "Runs later forwards on a pool of this many threads (1: the calling thread). "
           "Results do not depend on it.")
      .def("make_state", &Layer::makeState, py::arg("batch"), py::arg("mode") = py::none(),
           "A fresh streaming state for `batch` rows (causal layers). mode: None (the "
           "layer's default: recurrent with a decay, exact without), \"recurrent\" or "
           "\"exact\".")
      .def("forward", &Layer::forward, py::arg("query"), py::arg("value"),
           py::arg("key") = py::none(), py::arg("mask") = py::none(),
           py::arg("training") = false, py::arg("state") = static_cast<State*>(nullptr),
           "query [B, T, D_q], value [B, S, D_v], key [B, S, D_k] (None: the value), mask "
           "[B, S] (1 attend, 0 padding) -> [B, T, O]. With a state, one streaming call: the "
           "next T tokens of every row (S = T). Runs without the GIL; C-contiguous inputs of "
           "the layer's dtype are read in place, others are copied first.")
      .def("step", &Layer::step, py::arg("x"), py::arg("state"),
           "Self-attention streaming call (query = value = x): x [B, D] is one token per row "
           "-> [B, O]; x [B, T, D] -> [B, T, O].");
}
