#pragma once
/// \file
/// \private The pieces of kattn/mpi.hpp's passes that are not MPI calls: the fingerprint of a
/// layer, the dense projections of a slice, and the plan that moves a causal pass's slices to
/// whole chunks and back.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../layer.hpp"
#include "schedule.hpp"

namespace kattn {
namespace mpi {
namespace detail {

using kattn::detail::forRowSlices;

/// FNV-1a over bytes, folded into `h`.
inline std::uint64_t fnv1a(std::uint64_t h, const void* data, std::size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
  return h;
}

/**
 * A fingerprint of everything that decides what a layer computes: its configuration, weights
 * and projection. Ranks compare fingerprints instead of the tensors (one number each); a
 * collision of 64-bit FNV-1a between layers that differ is not a practical concern here, where
 * the failure it guards against is a rank that loaded another file.
 */
template <typename Scalar, typename FeatureMap, typename Masking>
std::uint64_t fingerprint(const KernelAttention<Scalar, FeatureMap, Masking>& layer) {
  const LayerConfig& c = layer.config();
  std::string text = c.feature_transform + "|" + std::to_string(c.num_heads) + "|" +
                     std::to_string(c.key_dim) + "|" + std::to_string(c.resolvedValueDim()) +
                     "|" + std::to_string(c.num_random_features) + "|" +
                     std::to_string(c.use_bias) + "|" + std::to_string(c.scale_by_length) +
                     "|" + std::to_string(c.use_causal_windowed) + "|" +
                     std::to_string(c.causal_chunk_length) + "|" +
                     std::to_string(c.causal_window_length) + "|" +
                     c.causal_padding.value_or("none") + "|" + std::to_string(sizeof(Scalar));
  std::uint64_t h = fnv1a(0xcbf29ce484222325ULL, text.data(), text.size());
  const double numbers[] = {c.resolvedScale(), c.causal_window_decay.value_or(-1.0)};
  h = fnv1a(h, numbers, sizeof numbers);
  auto add = [&](const Scalar* data, Index n) {
    h = fnv1a(h, &n, sizeof n);
    h = fnv1a(h, data, std::size_t(n) * sizeof(Scalar));
  };
  const Weights<Scalar>& w = layer.weights();
  add(w.query_kernel.data(), w.query_kernel.size());
  add(w.query_bias.data(), w.query_bias.size());
  add(w.key_kernel.data(), w.key_kernel.size());
  add(w.key_bias.data(), w.key_bias.size());
  add(w.value_kernel.data(), w.value_kernel.size());
  add(w.value_bias.data(), w.value_bias.size());
  add(w.output_kernel.data(), w.output_kernel.size());
  add(w.output_bias.data(), w.output_bias.size());
  add(layer.projection().data(), layer.projection().size());
  return h;
}

/// Rows of a block [B, n, N, h] (heads or features) in memory kept from block to block: a
/// fresh allocation per block would be a fresh mapping of pages (large blocks come from mmap)
/// and a page fault for each.
template <typename Scalar>
struct BlockBuffer {
  std::vector<Scalar> data;
  std::array<Index, 4> dims{0, 0, 0, 0};

  Scalar* reshape(const std::array<Index, 4>& d) {
    dims = d;
    data.resize(std::size_t(d[0] * d[1] * d[2] * d[3]));
    return data.data();
  }
  TensorMap<Scalar, 4> map() { return TensorMap<Scalar, 4>(data.data(), dims); }
  ConstTensorMap<Scalar, 4> view() const { return ConstTensorMap<Scalar, 4>(data.data(), dims); }
};

/// Heads [B, n, N, h] = factor_b (x[b, r0:r0+n] W + bias) of the rows x [B, L, D] (SPEC 1.1),
/// one GEMM for all heads per slice of rows, as the whole pass projects.
template <typename Scalar>
void projectHeads(const Scalar* x, Index B, Index L, Index r0, Index n,
                  const Tensor<Scalar, 3>& kernel, const Tensor<Scalar, 2>& bias,
                  const std::vector<Scalar>& factor, const ThreadPool* pool,
                  BlockBuffer<Scalar>& out) {
  using ConstMapMat = Eigen::Map<const Matrix<Scalar>>;
  using RowVec = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  const Index D = kernel.dimension(0), N = kernel.dimension(1), h = kernel.dimension(2);
  const Index cols = N * h;
  Scalar* dst = out.reshape({B, n, N, h});
  const ConstMapMat W(kernel.data(), D, cols);
  for (Index b = 0; b < B; ++b) {
    forRowSlices(n, pool, [&](Index s0, Index len) {
      Eigen::Map<Matrix<Scalar>> o(dst + (b * n + s0) * cols, len, cols);
      o.noalias() = ConstMapMat(x + (b * L + r0 + s0) * D, len, D) * W;
      if (bias.size()) o.rowwise() += Eigen::Map<const RowVec>(bias.data(), cols);
      if (factor[std::size_t(b)] != Scalar(1)) o *= factor[std::size_t(b)];
    });
  }
}

/// Rows r0.. of the output y [B, L, O] = heads [B, n, N, d_v] Wo + bo (SPEC 1.5).
template <typename Scalar>
void projectOutput(const ConstTensorMap<Scalar, 4>& heads, const Weights<Scalar>& w,
                   const ThreadPool* pool, Scalar* y, Index L, Index r0) {
  using ConstMapMat = Eigen::Map<const Matrix<Scalar>>;
  using RowVec = Eigen::Matrix<Scalar, 1, Eigen::Dynamic>;
  const Index B = heads.dimension(0), n = heads.dimension(1);
  const Index cols = heads.dimension(2) * heads.dimension(3), O = w.output_kernel.dimension(2);
  const ConstMapMat Wo(w.output_kernel.data(), cols, O);
  for (Index b = 0; b < B; ++b) {
    forRowSlices(n, pool, [&](Index s0, Index len) {
      Eigen::Map<Matrix<Scalar>> o(y + (b * L + r0 + s0) * O, len, O);
      o.noalias() = ConstMapMat(heads.data() + (b * n + s0) * cols, len, cols) * Wo;
      if (w.output_bias.size()) o.rowwise() += Eigen::Map<const RowVec>(w.output_bias.data(), O);
    });
  }
}

/// The rows of `t` [B, n, N, h] as [B, pad + n, N, h], after `pad` copies of the first.
template <typename Scalar>
void padRows(const ConstTensorMap<Scalar, 4>& t, Index pad, BlockBuffer<Scalar>& out) {
  const Index B = t.dimension(0), n = t.dimension(1), w = t.dimension(2) * t.dimension(3);
  Scalar* dst0 = out.reshape({B, pad + n, t.dimension(2), t.dimension(3)});
  for (Index b = 0; b < B; ++b) {
    const Scalar* src = t.data() + b * n * w;
    Scalar* dst = dst0 + b * (pad + n) * w;
    for (Index p = 0; p < pad && n > 0; ++p) std::copy(src, src + w, dst + p * w);
    std::copy(src, src + n * w, dst + pad * w);
  }
}

/**
 * Where the rows of a causal pass are computed. Rank r holds rows [held[r], held[r+1]) of the
 * sequence and computes the chunks that start in them: rows [computed[r], computed[r+1]),
 * where computed[r] is the first chunk boundary at or after held[r] (row 0 counts as one: left
 * padding's first chunk starts there). A chunk cut by a slice boundary is thereby computed
 * whole on one rank; only the rows of cut chunks move.
 */
struct ChunkPlan {
  std::vector<Index> held, computed;  ///< P + 1 offsets each
  Index lead = 0;                     ///< left padding rows before row 0

  ChunkPlan(const std::vector<std::int64_t>& lengths, Index chunk, Index lead_rows) {
    lead = lead_rows;
    held.assign(1, 0);
    for (std::int64_t n : lengths) held.push_back(held.back() + Index(n));
    const Index T = held.back();
    computed.resize(held.size());
    for (std::size_t r = 0; r < held.size(); ++r) {
      const Index t = held[r];
      computed[r] = t == 0 ? 0 : std::min(T, (t + lead + chunk - 1) / chunk * chunk - lead);
    }
  }
  /// Whether every rank computes the rows it holds (no row moves).
  bool aligned() const { return held == computed; }
  Index rows(int r) const { return computed[std::size_t(r) + 1] - computed[std::size_t(r)]; }
};

/// Rows [from.first, from.second) of `src` [B, len, width] (its rows start at sequence row
/// `src_row0`) that fall in [to.first, to.second), appended to `out` batch row by batch row.
template <typename Scalar>
void packRows(const Scalar* src, Index B, Index src_rows, Index src_row0, Index width,
              Index lo, Index hi, std::vector<Scalar>& out) {
  if (hi <= lo) return;
  for (Index b = 0; b < B; ++b) {
    const Scalar* p = src + (b * src_rows + (lo - src_row0)) * width;
    out.insert(out.end(), p, p + (hi - lo) * width);
  }
}

/**
 * Moves rows [B, ., width] between ranks under a plan: from the rows each rank holds to the
 * rows it computes (`to_computed`), or back. `exchange(send, send_counts, recv, recv_counts)`
 * is the all-to-all. Returns this rank's rows in the new partition.
 */
template <typename Scalar, typename Exchange>
std::vector<Scalar> moveRows(const ChunkPlan& plan, int rank, Index B, Index width,
                             const Scalar* rows, bool to_computed, Exchange&& exchange) {
  const std::vector<Index>& src = to_computed ? plan.held : plan.computed;
  const std::vector<Index>& dst = to_computed ? plan.computed : plan.held;
  const int P = int(src.size()) - 1;
  const std::size_t me = std::size_t(rank);
  const Index my0 = src[me], my1 = src[me + 1];
  std::vector<Scalar> send;
  std::vector<std::size_t> send_counts(static_cast<std::size_t>(P)), recv_counts(send_counts);
  for (std::size_t r = 0; r < std::size_t(P); ++r) {
    const Index lo = std::max(my0, dst[r]), hi = std::min(my1, dst[r + 1]);
    const std::size_t before = send.size();
    packRows(rows, B, my1 - my0, my0, width, lo, hi, send);
    send_counts[r] = send.size() - before;
    const Index rlo = std::max(src[r], dst[me]), rhi = std::min(src[r + 1], dst[me + 1]);
    recv_counts[r] = rhi > rlo ? std::size_t(B * (rhi - rlo) * width) : 0;
  }
  std::vector<Scalar> recv;
  exchange(send, send_counts, recv, recv_counts);
  // Received per source rank, each batch row by batch row: interleave into [B, rows, width].
  const Index n = dst[me + 1] - dst[me];
  std::vector<Scalar> out(std::size_t(B * n * width));
  std::size_t at = 0;
  for (std::size_t r = 0; r < std::size_t(P); ++r) {
    const Index rlo = std::max(src[r], dst[me]), rhi = std::min(src[r + 1], dst[me + 1]);
    if (rhi <= rlo) continue;
    for (Index b = 0; b < B; ++b) {
      const std::size_t len = std::size_t((rhi - rlo) * width);
      std::memcpy(out.data() + std::size_t((b * n + rlo - dst[me]) * width), recv.data() + at,
                  len * sizeof(Scalar));
      at += len;
    }
  }
  return out;
}

}  // namespace detail
}  // namespace mpi
}  // namespace kattn
