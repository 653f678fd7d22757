// libFuzzer target: a forward pass of AnyKernelAttention<float> driven by fuzzed bytes.
//
// The bytes choose the sizes (B 0-3, T and S 0-40, N 1-3, d and d_v 1-8, m 0-8, input dims
// 0-8, output dim), the feature map, the options (short path, begin_kernel, scale,
// scale_by_length, causal chunk / window / decay / padding, mask, a key input or none,
// training with dropout and redraw, the bidirectional core form, a thread pool or none) and
// the values of every tensor: smooth pseudo-random values at a fuzzed magnitude, with NaN,
// +-Inf, huge, denormal, zero or raw bit patterns placed by the bytes, or every value read
// from the bytes. Causal layers that can stream also run a few streaming calls, and their
// state must survive a save/load round trip byte for byte.
//
// std::invalid_argument and std::logic_error (configuration and shape errors) are expected
// outcomes; anything else - a crash, a sanitizer report, another exception, an output of
// the wrong shape, a state that does not round-trip - is a bug.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <kattn/kattn.hpp>
#include <limits>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using kattn::Index;
using Tensor1 = kattn::Tensor<float, 1>;
using Tensor2 = kattn::Tensor<float, 2>;
using Tensor3 = kattn::Tensor<float, 3>;
using CMap2 = kattn::ConstTensorMap<float, 2>;
using CMap3 = kattn::ConstTensorMap<float, 3>;

/// Reads the fuzzed bytes front to back; past the end every read gives 0.
class Bytes {
 public:
  Bytes(const std::uint8_t* data, std::size_t size) : m_data(data), m_size(size) {}
  std::uint8_t byte() { return m_pos < m_size ? m_data[m_pos++] : 0; }
  bool bit() { return byte() & 1; }
  /// An integer in [lo, hi].
  int intIn(int lo, int hi) { return lo + int(byte() % unsigned(hi - lo + 1)); }
  std::uint32_t word() {
    std::uint32_t w = 0;
    for (int i = 0; i < 4; ++i) w = (w << 8) | byte();
    return w;
  }
  /// A value that may be special: NaN, +-Inf, huge, denormal, +-0, raw bits, or small.
  float value() {
    const std::uint8_t tag = byte();
    const float sign = (tag & 0x80) ? -1.0f : 1.0f;
    switch (tag & 0x0f) {
      case 0:
        return std::numeric_limits<float>::quiet_NaN();
      case 1:
        return sign * std::numeric_limits<float>::infinity();
      case 2:
        return sign * std::numeric_limits<float>::max();
      case 3:
        return sign * 1e30f;
      case 4:
        return sign * 1e4f;
      case 5:
        return sign * std::numeric_limits<float>::denorm_min();
      case 6:
        return sign * 1e-40f;
      case 7:
        return sign * 0.0f;
      case 8: {
        const std::uint32_t w = word();
        float f;
        std::memcpy(&f, &w, sizeof f);
        return f;
      }
      default:
        return float(std::int8_t(byte())) / 16.0f;
    }
  }

 private:
  const std::uint8_t* m_data;
  std::size_t m_size;
  std::size_t m_pos = 0;
};

/// SplitMix64: smooth filler values without spending fuzzed bytes on every element.
class Filler {
 public:
  explicit Filler(std::uint64_t seed) : m_state(seed) {}
  float next() {  // roughly uniform in [-1, 1)
    std::uint64_t x = (m_state += 0x9E3779B97F4A7C15ull);
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    x ^= x >> 31;
    return float(double(x >> 40) / double(1ull << 23) - 1.0);
  }

 private:
  std::uint64_t m_state;
};

/// Fills `n` values: mode 0 smooth values at a fuzzed magnitude; mode 1 the same plus up to 7
/// fuzzed values at fuzzed positions; mode 2 every value from the bytes.
void fill(Bytes& in, float* out, Index n) {
  const int mode = in.intIn(0, 2);
  if (mode == 2) {
    for (Index i = 0; i < n; ++i) out[i] = in.value();
    return;
  }
  static const float kMagnitudes[] = {1.0f, 0.1f, 3.0f, 1e-3f, 30.0f, 1e3f, 1e-20f, 1e20f};
  const float magnitude = kMagnitudes[in.intIn(0, 7)];
  Filler f(in.byte() + 1);
  for (Index i = 0; i < n; ++i) out[i] = magnitude * f.next();
  if (mode == 1 && n > 0) {
    const int specials = in.intIn(0, 7);
    for (int k = 0; k < specials; ++k) {
      const Index pos = Index(in.word() % std::uint32_t(n));
      out[pos] = in.value();
    }
  }
}

template <int R>
kattn::Tensor<float, R> tensor(Bytes& in, const std::array<Index, R>& dims) {
  kattn::Tensor<float, R> t(dims);
  fill(in, t.data(), t.size());
  return t;
}

Tensor2 maskTensor(Bytes& in, Index B, Index S) {
  Tensor2 m(B, S);
  const int mode = in.intIn(0, 3);
  for (Index i = 0; i < m.size(); ++i) {
    switch (mode) {
      case 0:
        m.data()[i] = 1.0f;
        break;
      case 1:
        m.data()[i] = float(in.byte() & 1);
        break;
      case 2:
        m.data()[i] = float(in.intIn(0, 4)) * 0.5f;
        break;
      default:
        m.data()[i] = in.value();
        break;
    }
  }
  return m;
}

/// No pool (the calling thread only), or one pool of 3 threads shared by every input (made
/// once: starting threads per input would cost more than the forward).
std::shared_ptr<const kattn::ThreadPool> poolFor(int choice) {
  static const std::shared_ptr<const kattn::ThreadPool> pool =
      std::make_shared<const kattn::ThreadPool>(3);
  return choice == 0 ? nullptr : pool;
}

void checkShape(const Tensor3& y, Index B, Index T, Index O) {
  if (y.dimension(0) != B || y.dimension(1) != T || y.dimension(2) != O) std::abort();
}

CMap3 view(const Tensor3& t) { return CMap3(t.data(), t.dimensions()); }

Tensor3 rows(const Tensor3& t, Index r0, Index L) {
  Tensor3 out(t.dimension(0), L, t.dimension(2));
  for (Index b = 0; b < t.dimension(0); ++b)
    for (Index i = 0; i < L; ++i)
      for (Index j = 0; j < t.dimension(2); ++j) out(b, i, j) = t(b, r0 + i, j);
  return out;
}

void run(Bytes& in) {
  kattn::LayerConfig c;
  const Index B = in.intIn(0, 3), T = in.intIn(0, 40);
  c.num_heads = in.intIn(1, 3);
  c.key_dim = in.intIn(1, 8);
  if (in.bit()) c.value_dim = in.intIn(1, 8);
  if (in.bit()) c.output_shape = in.intIn(1, 8);
  c.num_random_features = in.intIn(0, 8);
  c.feature_transform = kattn::kFeatureTransforms[in.intIn(0, 6)];
  c.seed = std::int64_t(in.word()) - (std::int64_t(1) << 31);
  c.use_bias = in.bit();
  const std::uint8_t options = in.byte();
  c.is_short_seq = options & 1;
  if (options & 2) c.begin_kernel = in.intIn(0, int(T) + 2);
  if (options & 4) c.scale = in.bit() ? double(in.value()) : double(in.intIn(1, 40)) / 16.0;
  c.scale_by_length = options & 8;
  c.use_causal_windowed = options & 16;
  const bool with_mask = options & 32;
  const bool with_key = options & 64;
  const bool training = options & 128;
  if (c.use_causal_windowed) {
    c.causal_chunk_length = in.intIn(0, 8);
    c.causal_window_length = in.intIn(0, 8);
    static const double kDecays[] = {0.0, 0.5, 0.9, 1.0, 1.5, -0.1};
    const int decay = in.intIn(0, 7);
    if (decay < 6) c.causal_window_decay = kDecays[decay];
    if (decay == 7) c.causal_window_decay = std::numeric_limits<double>::quiet_NaN();
    static const char* kPaddings[] = {"none", "left", "right", "", "middle"};
    const int padding = in.intIn(0, 5);
    if (padding < 5) c.causal_padding = kPaddings[padding];
  }
  if (training) {
    static const double kRates[] = {0.0, 0.1, 0.5, 0.99};
    c.dropout = kRates[in.intIn(0, 3)];
    c.redraw = in.bit();
  }
  // Causal attention needs S = T; one input in 16 tries a mismatch (an input error).
  const Index S = c.use_causal_windowed && (in.byte() & 15) ? T : in.intIn(0, 40);
  const Index Dq = in.intIn(0, 8), Dv = in.intIn(0, 8);  // 0: empty input rows
  const Index Dk = with_key ? in.intIn(0, 8) : Dv;
  const Index N = c.num_heads, d = c.key_dim, dv = c.resolvedValueDim();
  const Index O = c.output_shape ? Index(*c.output_shape) : Dq;
  const int core_form = in.intIn(0, 2);
  const int pool = in.intIn(0, 1);

  kattn::AnyKernelAttention<float> layer(c);  // may throw std::invalid_argument
  kattn::Weights<float> w;
  w.query_kernel = tensor<3>(in, {Dq, N, d});
  w.key_kernel = tensor<3>(in, {Dk, N, d});
  w.value_kernel = tensor<3>(in, {Dv, N, dv});
  w.output_kernel = tensor<3>(in, {N, dv, O});
  if (c.use_bias) {
    w.query_bias = tensor<2>(in, {N, d});
    w.key_bias = tensor<2>(in, {N, d});
    w.value_bias = tensor<2>(in, {N, dv});
    w.output_bias = tensor<1>(in, {O});
  }
  if (c.begin_kernel > 0) {
    w.output_softmax_kernel = tensor<3>(in, {N, dv, O});
    if (c.use_bias) w.output_softmax_bias = tensor<1>(in, {O});
  }
  layer.setWeights(std::move(w));
  if (c.hasProjection() && in.bit()) {
    kattn::Matrix<float> P(c.num_random_features, d);
    fill(in, P.data(), P.size());
    layer.setProjection(P);
  }
  layer.setCoreForm(core_form == 0   ? kattn::CoreForm::Auto
                    : core_form == 1 ? kattn::CoreForm::Explicit
                                     : kattn::CoreForm::LowRank);
  layer.setThreadPool(poolFor(pool));

  const Tensor3 query = tensor<3>(in, {B, T, Dq});
  const Tensor3 value = tensor<3>(in, {B, S, Dv});
  const Tensor3 key = tensor<3>(in, {B, S, Dk});
  const Tensor2 mask = maskTensor(in, B, S);
  std::optional<CMap3> key_view;
  if (with_key) key_view = view(key);
  std::optional<CMap2> mask_view;
  if (with_mask) mask_view = CMap2(mask.data(), mask.dimensions());

  try {
    checkShape(layer.forward(view(query), view(value), key_view, mask_view, training), B, T, O);
  } catch (const std::logic_error&) {
  }

  if (!c.use_causal_windowed || S != T) return;
  // Streaming: a state (default, exact or recurrent mode), then calls covering T.
  const int mode = in.intIn(0, 2);
  std::optional<kattn::StreamingState<float>> state;
  try {
    state = layer.makeState(B, mode == 0   ? std::nullopt
                               : mode == 1 ? std::optional(kattn::StreamingMode::Exact)
                                           : std::optional(kattn::StreamingMode::Recurrent));
  } catch (const std::logic_error&) {
    return;  // expplus, or a layer that cannot stream
  }
  Index r0 = 0;
  for (int call = 0; call < 4; ++call) {
    const Index L = call == 3 ? T - r0 : std::min<Index>(T - r0, in.intIn(0, 12));
    const Tensor3 q = rows(query, r0, L), v = rows(value, r0, L), k = rows(key, r0, L);
    Tensor2 m(B, L);
    for (Index b = 0; b < B; ++b)
      for (Index i = 0; i < L; ++i) m(b, i) = mask(b, r0 + i);
    std::optional<CMap3> kv;
    if (with_key) kv = view(k);
    std::optional<CMap2> mv;
    if (with_mask) mv = CMap2(m.data(), m.dimensions());
    try {
      checkShape(layer.forward(view(q), view(v), kv, mv, *state), B, L, O);
      r0 += L;
    } catch (const std::logic_error&) {
    }
    const std::string bytes = state->toBytes();
    if (kattn::StreamingState<float>::fromBytes(bytes).toBytes() != bytes) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes in(data, size);
  try {
    run(in);
  } catch (const std::logic_error&) {
    // configuration and shape errors (std::invalid_argument is a std::logic_error)
  }
  return 0;
}
