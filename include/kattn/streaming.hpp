#pragma once
/// \file
/// StreamingState: the decode cache of a causal layer (SPEC 3.4, 3.5), with save and restore.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <istream>
#include <limits>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "config.hpp"
#include "detail/causal_state.hpp"
#include "limits.hpp"
#include "tensor.hpp"

namespace kattn {

/// How a StreamingState advances.
enum class StreamingMode {
  /// The reference's cache: every call is one chunk, whatever C is; the window is ignored;
  /// state <- gamma state + call (gamma = causal_window_decay, or 1 when none is configured).
  Recurrent,
  /// Reproduces the whole-sequence causal windowed pass for any C, W and decay: calls hold
  /// whole chunks, and a ring of the last W chunk terms drops chunks that leave the window.
  Exact,
};

/**
 * \brief Per (batch row, head) state of causal attention across calls.
 *
 * Made by `KernelAttention::makeState`, then passed to `forward` once per call. Holds, per
 * (b, n), the window sum KV [F, d_v], z [F] with its rounding compensation [F] (so that float32
 * streams keep the whole pass's accuracy at any length), with a finite window in exact mode
 * the chunks still in the window (as rows k', v when those are fewer numbers than the term,
 * as terms otherwise) and up to W suffix sums, and for the exp maps the running maximum of key
 * logits per batch row (the state is kept relative to it).
 * `save`/`load` round-trip it byte for byte, in the form it is held.
 */
template <typename Scalar>
class StreamingState {
 public:
  StreamingState() = default;

  /// A fresh state for `batch` rows of a layer with `heads` heads, `features` features and
  /// `value_dim` values per head; chunk, window and gamma are the layer's, recorded so that a
  /// state is never fed to a layer that would read it differently.
  StreamingState(Index batch, Index heads, Index features, Index value_dim, StreamingMode mode,
                 Index chunk, Index window, double gamma)
      : m_batch(batch), m_heads(heads), m_features(features), m_value_dim(value_dim),
        m_mode(mode), m_chunk(chunk), m_window(window), m_gamma(gamma) {
    if (batch < 0 || heads < 1 || features < 1 || value_dim < 1) {
      throw std::invalid_argument("StreamingState: invalid sizes (batch " + std::to_string(batch) +
                                  ", heads " + std::to_string(heads) + ", features " +
                                  std::to_string(features) + ", value_dim " +
                                  std::to_string(value_dim) + ")");
    }
    checkAllocation("a StreamingState of batch " + std::to_string(batch) + ", " +
                        std::to_string(heads) + " heads, " + std::to_string(features) +
                        " features and value_dim " + std::to_string(value_dim),
                    double(batch) * double(heads) *
                        (double(features) * double(value_dim) + 2 * double(features)),
                    sizeof(Scalar));
    reset();
  }

  /// Back to the state before any token, keeping the sizes and mode, and the memory that held
  /// the exact window's rows: a state reused for the next sequence writes them into memory it
  /// already touched (a new state starts without it).
  void reset() {
    m_state.resize(std::size_t(m_batch * m_heads));
    for (auto& h : m_state) h.reset(m_features, m_value_dim);
    m_key_shift.assign(std::size_t(m_batch), -std::numeric_limits<Scalar>::infinity());
    m_query_shift.assign(std::size_t(m_batch), std::numeric_limits<Scalar>::quiet_NaN());
    m_tokens = 0;
    m_finished = false;
  }

  /// B, the number of streams.
  Index batch() const { return m_batch; }
  /// N.
  Index heads() const { return m_heads; }
  /// F.
  Index features() const { return m_features; }
  /// d_v.
  Index valueDim() const { return m_value_dim; }
  /// Recurrent or Exact.
  StreamingMode mode() const { return m_mode; }
  /// Tokens fed so far (per batch row).
  Index tokens() const { return m_tokens; }
  /// The layer's chunk length C, window W (chunks) and decay per chunk (1 for none).
  Index chunk() const { return m_chunk; }
  /// W, in chunks.
  Index window() const { return m_window; }
  /// gamma per chunk, 1 for none.
  double decay() const { return m_gamma; }

  /// \name The causal core's interface (detail/streaming_pass.hpp)
  /// A call checks the state, advances the head states of each batch row, and ends; nothing
  /// else writes the state.
  ///@{

  /// Throws std::invalid_argument unless a layer of these sizes and causal parameters may
  /// feed this state its next call.
  void requireCompatible(Index batch, Index heads, Index features, Index value_dim, Index chunk,
                         Index window, double gamma) const {
    if (m_batch != batch && m_heads == heads && m_features == features &&
        m_value_dim == value_dim) {
      throw std::invalid_argument("state: made for a batch of " + std::to_string(m_batch) +
                                  " rows, but the call has " + std::to_string(batch) +
                                  " (a state holds one stream per batch row)");
    }
    if (m_batch != batch || m_heads != heads || m_features != features ||
        m_value_dim != value_dim) {
      throw std::invalid_argument(
          "state: expected a state for [B, N, F, d_v] = [" + std::to_string(batch) + ", " +
          std::to_string(heads) + ", " + std::to_string(features) + ", " +
          std::to_string(value_dim) + "], got [" + std::to_string(m_batch) + ", " +
          std::to_string(m_heads) + ", " + std::to_string(m_features) + ", " +
          std::to_string(m_value_dim) + "]");
    }
    if (m_chunk != chunk || m_window != window || m_gamma != gamma) {
      throw std::invalid_argument("state: made for another layer (chunk, window or decay differ)");
    }
    if (m_finished) {
      throw std::invalid_argument("state: the previous call ended inside a chunk (right "
                                  "padding), so the stream is finished; reset() the state");
    }
  }

  /// The head states of batch row b, [heads()] of them.
  detail::CausalHeadState<Scalar>* headStates(Index b) { return &head(b, 0); }
  /// The head states of batch row b, read only.
  const detail::CausalHeadState<Scalar>* headStates(Index b) const { return &head(b, 0); }

  /// Raises batch row b's running key shift (exp maps) to at least `logit`, rescaling its
  /// head states by exp(old - new) so that they stay relative to it; returns the shift.
  Scalar raiseKeyShift(Index b, Scalar logit) {
    Scalar& running = m_key_shift[std::size_t(b)];
    if (logit > running) {
      if (std::isfinite(running)) {
        const Scalar factor = std::exp(running - logit);
        for (Index n = 0; n < m_heads; ++n) head(b, n).rescale(factor);
      }
      running = logit;
    }
    return running;
  }

  /// The running key shift of batch row b (exp maps; -inf before any key, and for the others).
  Scalar keyShift(Index b) const { return m_key_shift[std::size_t(b)]; }
  /// Fixes the exp maps' query shift of batch row b for the calls that follow, instead of
  /// each call's own largest query logit: a piece of a sequence split across workers then
  /// computes the whole pass's features (core.hpp). A call-time setting, not saved; reset()
  /// clears it.
  void fixQueryShift(Index b, Scalar shift) { m_query_shift[std::size_t(b)] = shift; }
  /// The fixed query shift of batch row b, if any.
  std::optional<Scalar> queryShift(Index b) const {
    const Scalar s = m_query_shift[std::size_t(b)];
    return std::isnan(s) ? std::nullopt : std::optional<Scalar>(s);
  }
  /// Whether a call ended inside a chunk (right padding): the stream takes no more calls.
  bool finished() const { return m_finished; }
  /// Counts `T` more tokens as seen before this state's own (combine).
  void addTokens(Index T) { m_tokens += T; }

  /// Ends a call of T tokens; in exact mode a call that ends inside a chunk (right padding)
  /// finishes the stream.
  void endCall(Index T) {
    m_tokens += T;
    if (m_mode == StreamingMode::Exact && T % m_chunk != 0) m_finished = true;
  }
  ///@}

  /// The reference's cache tensor `kv` [B, N, d_v, F] (in exact mode: the window sum of the
  /// last chunk).
  Tensor<Scalar, 4> kv() const {
    Tensor<Scalar, 4> out(m_batch, m_heads, m_value_dim, m_features);
    Matrix<Scalar> s_kv;
    Vector<Scalar> s_z;
    for (Index b = 0; b < m_batch; ++b)
      for (Index n = 0; n < m_heads; ++n) {
        head(b, n).windowSum(Scalar(m_gamma), s_kv, s_z);
        for (Index j = 0; j < m_value_dim; ++j)
          for (Index f = 0; f < m_features; ++f) out(b, n, j, f) = s_kv(f, j);
      }
    return out;
  }

  /// The reference's cache tensor `k_sum` [B, N, F].
  Tensor<Scalar, 3> kSum() const {
    Tensor<Scalar, 3> out(m_batch, m_heads, m_features);
    Matrix<Scalar> s_kv;
    Vector<Scalar> s_z;
    for (Index b = 0; b < m_batch; ++b)
      for (Index n = 0; n < m_heads; ++n) {
        head(b, n).windowSum(Scalar(m_gamma), s_kv, s_z);
        for (Index f = 0; f < m_features; ++f) out(b, n, f) = s_z(f);
      }
    return out;
  }

  /**
   * Loads the reference's cache tensors (recurrent mode only): kv [B, N, d_v, F] and
   * k_sum [B, N, F]. For the exp maps the values are taken as unshifted (shift 0).
   * \throws std::invalid_argument on a shape mismatch or in exact mode.
   */
  void setCache(const ConstTensorMap<Scalar, 4>& kv, const ConstTensorMap<Scalar, 3>& k_sum) {
    if (m_mode != StreamingMode::Recurrent) {
      throw std::invalid_argument(
          "StreamingState::setCache: the reference's cache tensors describe a recurrent state; "
          "this state is in exact mode");
    }
    checkShape<4>("cache/kv", kv.dimensions(), {m_batch, m_heads, m_value_dim, m_features});
    checkShape<3>("cache/k_sum", k_sum.dimensions(), {m_batch, m_heads, m_features});
    for (Index b = 0; b < m_batch; ++b) {
      m_key_shift[std::size_t(b)] = Scalar(0);
      for (Index n = 0; n < m_heads; ++n) {
        auto& h = head(b, n);
        for (Index j = 0; j < m_value_dim; ++j)
          for (Index f = 0; f < m_features; ++f) h.kv(f, j) = kv(b, n, j, f);
        for (Index f = 0; f < m_features; ++f) h.z(f) = k_sum(b, n, f);
        h.zc.setZero();
      }
    }
  }

  /// Writes the whole state (sizes, mode, layer parameters, sums, ring, shifts) as bytes.
  void save(std::ostream& os) const {
    os.write(kMagic, sizeof(kMagic));
    putInt(os, sizeof(Scalar));
    for (std::int64_t v : {std::int64_t(m_batch), std::int64_t(m_heads),
                           std::int64_t(m_features), std::int64_t(m_value_dim),
                           std::int64_t(m_mode), std::int64_t(m_chunk), std::int64_t(m_window),
                           std::int64_t(m_tokens), std::int64_t(m_finished)})
      putInt(os, v);
    putRaw(os, &m_gamma, 1);
    putRaw(os, m_key_shift.data(), m_key_shift.size());
    for (const auto& h : m_state) {
      putRaw(os, h.kv.data(), std::size_t(h.kv.size()));
      putRaw(os, h.z.data(), std::size_t(h.z.size()));
      putRaw(os, h.zc.data(), std::size_t(h.zc.size()));
      // The ring as it is held: a chunk kept as rows is written as its rows (a token's are
      // F + d_v numbers, its term F (d_v + 1)), a chunk kept as a term as the term.
      putInt(os, std::int64_t(h.ring_kv.size()));
      for (std::size_t i = 0; i < h.ring_kv.size(); ++i) {
        putInt(os, std::int64_t(h.ring_n[i]));
        if (h.ring_n[i] == 0) {
          putRaw(os, h.ring_kv[i].data(), std::size_t(h.ring_kv[i].size()));
          putRaw(os, h.ring_z[i].data(), std::size_t(h.ring_z[i].size()));
        } else {
          putRaw(os, h.ringRows(i), std::size_t(h.ring_n[i] * (m_features + m_value_dim)));
        }
      }
      // Only the suffix sums still inside the window: the used ones are kept in memory for
      // the next rebuild, not as state.
      const std::size_t used = h.front_pos;
      putTerms(
          os, h.front_kv.size() - used,
          [&](std::size_t i) -> const Matrix<Scalar>& { return h.front_kv[used + i]; },
          [&](std::size_t i) -> const Vector<Scalar>& { return h.front_z[used + i]; });
      putInt(os, 0);
    }
    if (!os) throw std::runtime_error("StreamingState::save: write failed");
  }

  /// Reads a state written by `save`. Sizes are checked before anything is allocated from them.
  /// \throws std::runtime_error on a truncated, foreign or inconsistent stream.
  static StreamingState load(std::istream& is) {
    char magic[sizeof(kMagic)];
    is.read(magic, sizeof(magic));
    // Version 1 held no compensation and wrote every ring entry as a term.
    const bool v1 = is && std::memcmp(magic, kMagicV1, sizeof(kMagicV1)) == 0;
    if (!is || (!v1 && std::memcmp(magic, kMagic, sizeof(kMagic)) != 0)) {
      throw std::runtime_error("StreamingState::load: not a kattn streaming state");
    }
    if (getInt(is) != std::int64_t(sizeof(Scalar))) {
      throw std::runtime_error("StreamingState::load: saved with another scalar type");
    }
    StreamingState s;
    const std::int64_t B = getInt(is), N = getInt(is), F = getInt(is), V = getInt(is);
    const std::int64_t mode = getInt(is), chunk = getInt(is), window = getInt(is);
    const std::int64_t tokens = getInt(is), finished = getInt(is);
    constexpr std::int64_t kMaxDim = std::int64_t(1) << 24;
    if (B < 0 || N < 1 || F < 1 || V < 1 || B > kMaxDim || N > kMaxDim || F > kMaxDim ||
        V > kMaxDim || (mode != 0 && mode != 1) || chunk < 1 || window < 1 || tokens < 0) {
      throw std::runtime_error("StreamingState::load: corrupt header");
    }
    // Never allocate more than the stream can hold: check the remaining length first.
    const std::int64_t per_head = F * V + F;
    const auto here = is.tellg();
    if (here != std::istream::pos_type(-1)) {
      is.seekg(0, std::ios::end);
      const std::int64_t remaining = std::int64_t(is.tellg() - here);
      is.seekg(here);
      if (double(B) * double(N) * double(per_head) * sizeof(Scalar) > double(remaining)) {
        throw std::runtime_error("StreamingState::load: truncated stream");
      }
    }
    double gamma = 0;
    getRaw(is, &gamma, 1);
    s = StreamingState(B, N, F, V, StreamingMode(mode), chunk, window, gamma);
    s.m_tokens = tokens;
    s.m_finished = finished != 0;
    getRaw(is, s.m_key_shift.data(), s.m_key_shift.size());
    for (auto& h : s.m_state) {
      getRaw(is, h.kv.data(), std::size_t(h.kv.size()));
      getRaw(is, h.z.data(), std::size_t(h.z.size()));
      if (v1) {
        getTerms(is, h.ring_kv, h.ring_z, F, V, window);
        h.ring_block.assign(h.ring_kv.size(), 0);
        h.ring_at.assign(h.ring_kv.size(), 0);
        h.ring_n.assign(h.ring_kv.size(), 0);
        h.ring_numbers = h.ring_kv.size() * std::size_t(F * (V + 1));
      } else {
        getRaw(is, h.zc.data(), std::size_t(h.zc.size()));
        getRing(is, h, F, V, chunk, window);
      }
      getTerms(is, h.front_kv, h.front_z, F, V, window);
      const std::int64_t pos = getInt(is);
      if (pos < 0 || pos > std::int64_t(h.front_kv.size())) {
        throw std::runtime_error("StreamingState::load: corrupt window");
      }
      h.front_pos = std::size_t(pos);
      if (std::int64_t(h.windowChunks()) > window) {
        throw std::runtime_error("StreamingState::load: corrupt window");
      }
    }
    return s;
  }

  /// `save` into a byte string.
  std::string toBytes() const {
    std::ostringstream os(std::ios::binary);
    save(os);
    return os.str();
  }

  /// `load` from a byte string.
  static StreamingState fromBytes(const std::string& bytes) {
    std::istringstream is(bytes, std::ios::binary);
    return load(is);
  }

 private:
  static constexpr char kMagic[8] = {'K', 'A', 'T', 'T', 'N', 'S', 'T', '2'};
  static constexpr char kMagicV1[8] = {'K', 'A', 'T', 'T', 'N', 'S', 'T', '1'};

  /// Reads a ring written as held: per entry its rows (at most a chunk of them) or its term.
  static void getRing(std::istream& is, detail::CausalHeadState<Scalar>& h, std::int64_t F,
                      std::int64_t V, std::int64_t chunk, std::int64_t window) {
    const std::int64_t n = getInt(is);
    if (n < 0 || n > window) throw std::runtime_error("StreamingState::load: corrupt window");
    Matrix<Scalar> kf, v;
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t rows = getInt(is);
      if (rows < 0 || rows > chunk) throw std::runtime_error("StreamingState::load: corrupt ring");
      if (rows == 0) {
        Matrix<Scalar> kv_c(F, V);
        Vector<Scalar> z_c(F);
        getRaw(is, kv_c.data(), std::size_t(kv_c.size()));
        getRaw(is, z_c.data(), std::size_t(z_c.size()));
        h.pushTerm(std::move(kv_c), std::move(z_c));
      } else {
        kf.resize(rows, F);
        v.resize(rows, V);
        getRaw(is, kf.data(), std::size_t(kf.size()));
        getRaw(is, v.data(), std::size_t(v.size()));
        h.pushRows(kf, v);
      }
    }
  }

  static void putInt(std::ostream& os, std::int64_t v) { putRaw(os, &v, 1); }
  /// n terms: kv(i) and z(i) give term i's matrix and vector.
  template <typename KvAt, typename ZAt>
  static void putTerms(std::ostream& os, std::size_t n, const KvAt& kv, const ZAt& z) {
    putInt(os, std::int64_t(n));
    for (std::size_t i = 0; i < n; ++i) {
      const Matrix<Scalar>& m = kv(i);
      const Vector<Scalar>& w = z(i);
      putRaw(os, m.data(), std::size_t(m.size()));
      putRaw(os, w.data(), std::size_t(w.size()));
    }
  }
  template <typename KvList, typename ZList>
  static void getTerms(std::istream& is, KvList& kv, ZList& z, std::int64_t F, std::int64_t V,
                       std::int64_t window) {
    const std::int64_t n = getInt(is);
    if (n < 0 || n > window) throw std::runtime_error("StreamingState::load: corrupt window");
    // The count comes from the stream (the window bounds it, and a corrupt window can be
    // huge): grow term by term, so that memory follows the bytes actually read and a
    // truncated stream fails before it could allocate what it does not hold.
    kv.clear();
    z.clear();
    for (std::int64_t i = 0; i < n; ++i) {
      kv.emplace_back(F, V);
      z.emplace_back(F);
      getRaw(is, kv.back().data(), std::size_t(kv.back().size()));
      getRaw(is, z.back().data(), std::size_t(z.back().size()));
    }
  }
  static std::int64_t getInt(std::istream& is) {
    std::int64_t v = 0;
    getRaw(is, &v, 1);
    return v;
  }
  template <typename T>
  static void putRaw(std::ostream& os, const T* p, std::size_t n) {
    os.write(reinterpret_cast<const char*>(p), std::streamsize(n * sizeof(T)));
  }
  template <typename T>
  static void getRaw(std::istream& is, T* p, std::size_t n) {
    is.read(reinterpret_cast<char*>(p), std::streamsize(n * sizeof(T)));
    if (!is) throw std::runtime_error("StreamingState::load: truncated stream");
  }

  detail::CausalHeadState<Scalar>& head(Index b, Index n) {
    return m_state[std::size_t(b * m_heads + n)];
  }
  const detail::CausalHeadState<Scalar>& head(Index b, Index n) const {
    return m_state[std::size_t(b * m_heads + n)];
  }

  Index m_batch = 0, m_heads = 1, m_features = 1, m_value_dim = 1;
  StreamingMode m_mode = StreamingMode::Exact;
  Index m_chunk = 1, m_window = 1;
  double m_gamma = 1.0;
  std::vector<detail::CausalHeadState<Scalar>> m_state;
  std::vector<Scalar> m_key_shift;   // running max of key logits per batch row (exp maps)
  std::vector<Scalar> m_query_shift; // fixed query shift per batch row, NaN for none
  Index m_tokens = 0;
  bool m_finished = false;           // a call ended inside a chunk (right padding)
};

/**
 * \brief The state after the tokens of `later` follow those of `earlier`, where `later` was
 * fed from a fresh state: the scan operator of a causal pass split into pieces. Feeding a
 * piece from combine(state of the pieces before it, ...) gives the whole pass's outputs, and
 * combine is associative (up to rounding). In exact mode the window keeps the last W chunks of
 * both (the earlier's chunks weighted by gamma^(later's chunks)); in recurrent mode without
 * decay the sums add. For the exp maps both are first brought to the larger running key shift.
 * \throws std::invalid_argument for states of different layers or modes, a finished
 * `earlier` (its stream ended inside a chunk), or a recurrent state with decay (it records no
 * count of its calls, which the decay between them needs).
 */
template <typename Scalar>
StreamingState<Scalar> combine(const StreamingState<Scalar>& earlier,
                               const StreamingState<Scalar>& later) {
  if (earlier.finished()) {
    throw std::invalid_argument("combine: the earlier state's stream ended inside a chunk");
  }
  // A finished `later` is fine: the stream of both ends where it ended.
  earlier.requireCompatible(later.batch(), later.heads(), later.features(), later.valueDim(),
                            later.chunk(), later.window(), later.decay());
  if (earlier.mode() != later.mode()) {
    throw std::invalid_argument("combine: the states are in different modes");
  }
  const bool exact = earlier.mode() == StreamingMode::Exact;
  if (!exact && earlier.decay() != 1.0) {
    throw std::invalid_argument(
        "combine: a recurrent state with decay records no count of its calls; use exact mode");
  }
  StreamingState<Scalar> a = earlier, b = later;
  StreamingState<Scalar> out = later;
  const Scalar gamma = Scalar(earlier.decay());
  for (Index r = 0; r < earlier.batch(); ++r) {
    // Both relative to the larger running key shift (exp maps; -inf for the others).
    const Scalar shift = std::max(a.keyShift(r), b.keyShift(r));
    a.raiseKeyShift(r, shift);
    b.raiseKeyShift(r, shift);
    out.raiseKeyShift(r, shift);
    for (Index n = 0; n < earlier.heads(); ++n) {
      const auto& ha = a.headStates(r)[n];
      const auto& hb = b.headStates(r)[n];
      auto& h = out.headStates(r)[n];
      if (exact && earlier.window() >= kUnboundedWindow) {
        // Nothing leaves an unbounded window: the earlier sums, decayed once per chunk of the
        // later piece (a stream that ended inside a chunk counts that chunk), and the later's.
        const Index chunks = (later.tokens() + later.chunk() - 1) / later.chunk();
        const Scalar g = std::pow(gamma, Scalar(chunks));
        h.kv = g * ha.kv + hb.kv;
        h.z = g * ha.zSum() + hb.zSum();
        h.zc.setZero();
      } else if (exact) {
        h = ha.followedBy(hb, gamma, earlier.window());
      } else {
        h.kv = ha.kv + hb.kv;
        h.z = ha.zSum() + hb.zSum();
        h.zc.setZero();
      }
    }
  }
  out.addTokens(earlier.tokens());
  return out;
}

}  // namespace kattn
