// kattn-run --mpi: the whole-sequence forward split across the ranks of MPI_COMM_WORLD
// (kattn/mpi.hpp). Every rank reads the same files and takes its slice of the sequence; rank 0
// writes the whole output. Included by kattn-run.cpp where MPI was found (KATTN_RUN_MPI).

#include <mpi.h>

#include <climits>

#include <kattn/mpi.hpp>

namespace {

/// Slice lengths of T rows over P ranks: `--slices a,b,...` (P lengths summing to T), or
/// equal (the first T mod P ranks one row more).
std::vector<std::int64_t> sliceLengths(const std::optional<std::string>& slices, kattn::Index T,
                                       int P) {
  std::vector<std::int64_t> out;
  if (!slices) {
    for (int r = 0; r < P; ++r) out.push_back(T / P + (r < T % P ? 1 : 0));
    return out;
  }
  std::int64_t total = 0;
  std::size_t at = 0;
  while (at <= slices->size()) {
    const std::size_t comma = std::min(slices->find(',', at), slices->size());
    std::int64_t n = -1;
    const char* first = slices->data() + at;
    const char* last = slices->data() + comma;
    const auto [ptr, ec] = std::from_chars(first, last, n);
    if (ec != std::errc() || ptr != last || n < 0) {
      throw std::invalid_argument("--slices: expected lengths >= 0 separated by commas, got " +
                                  singleQuoted(*slices));
    }
    out.push_back(n);
    total += n;
    at = comma + 1;
  }
  if (int(out.size()) != P || total != std::int64_t(T)) {
    throw std::invalid_argument("--slices: " + std::to_string(out.size()) + " lengths summing to " +
                                std::to_string(total) + ", but the run has " + std::to_string(P) +
                                " ranks and the query " + std::to_string(T) + " positions");
  }
  return out;
}

/// Rows [t0, t0 + n) of the middle dimension of a [B, L, ...] tensor.
template <typename Scalar, int R>
kattn::Tensor<Scalar, R> middleRows(const kattn::Tensor<Scalar, R>& t, kattn::Index t0,
                                    kattn::Index n) {
  auto dims = t.dimensions();
  const kattn::Index B = dims[0], L = dims[1], w = L ? t.size() / (B * L) : 0;
  dims[1] = n;
  kattn::Tensor<Scalar, R> out(dims);
  for (kattn::Index b = 0; b < B; ++b) {
    std::copy(t.data() + (b * L + t0) * w, t.data() + (b * L + t0 + n) * w,
              out.data() + b * n * w);
  }
  return out;
}

/// Rank 0 gathers every rank's rows of the output and writes the file, and with --state-out
/// also the state after the whole sequences, which the last rank holds.
template <typename Scalar>
void gatherAndWrite(const Options& opt, const kattn::Tensor<Scalar, 3>& y,
                    const std::vector<std::int64_t>& len, const kattn::StreamingState<Scalar>& state,
                    int rank, int P) {
  using kattn::Index;
  const Index B = y.dimension(0), O = y.dimension(2);
  std::vector<int> counts(static_cast<std::size_t>(P)), displs(counts);
  Index T = 0, at = 0;
  for (int r = 0; r < P; ++r) {
    const Index n = B * Index(len[std::size_t(r)]) * O;
    if (n > INT_MAX || at > INT_MAX) throw std::runtime_error("--mpi: the output exceeds MPI's int counts");
    counts[std::size_t(r)] = int(n);
    displs[std::size_t(r)] = int(at);
    at += n;
    T += Index(len[std::size_t(r)]);
  }
  std::vector<Scalar> all(rank == 0 ? std::size_t(at) : 0);
  const MPI_Datatype type = kattn::mpi::detail::datatype<Scalar>();
  MPI_Gatherv(y.data(), int(y.size()), type, all.data(), counts.data(), displs.data(), type, 0,
              MPI_COMM_WORLD);
  std::string state_bytes;
  if (opt.state_out) {
    state_bytes = rank == P - 1 ? state.toBytes() : std::string();
    if (P > 1 && (rank == P - 1 || rank == 0)) {
      std::uint64_t size = state_bytes.size();
      if (rank == P - 1) {
        MPI_Send(&size, 1, MPI_UINT64_T, 0, 0, MPI_COMM_WORLD);
        MPI_Send(state_bytes.data(), int(size), MPI_BYTE, 0, 1, MPI_COMM_WORLD);
      } else {
        MPI_Recv(&size, 1, MPI_UINT64_T, P - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        state_bytes.resize(std::size_t(size));
        MPI_Recv(state_bytes.data(), int(size), MPI_BYTE, P - 1, 1, MPI_COMM_WORLD,
                 MPI_STATUS_IGNORE);
      }
    }
  }
  if (rank != 0) return;
  kattn::Tensor<Scalar, 3> out(B, T, O);
  Index t0 = 0;
  for (int r = 0; r < P; ++r) {
    const Index n = Index(len[std::size_t(r)]);
    for (Index b = 0; b < B; ++b) {
      const Scalar* src = all.data() + displs[std::size_t(r)] + b * n * O;
      std::copy(src, src + n * O, out.data() + (b * T + t0) * O);
    }
    t0 += n;
  }
  kattn::io::SafeTensorsWriter file;
  file.add("output", out);
  if (opt.state_out) {
    const auto whole = kattn::StreamingState<Scalar>::fromBytes(state_bytes);
    file.add("cache/kv", whole.kv());
    file.add("cache/k_sum", whole.kSum());
  }
  file.write(opt.output);
  if (opt.state_out) writeFile(*opt.state_out, state_bytes, "state");
}

template <typename Scalar>
void runMpi(const Options& opt, const kattn::LayerConfig& config) {
  using kattn::Index;
  using kattn::Tensor;
  int rank = 0, P = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &P);
  kattn::mpi::detail::Comm comm(MPI_COMM_WORLD);
  // Each rank reads the files itself; a failure on one is a failure on all.
  std::optional<kattn::AnyKernelAttention<Scalar>> any;
  std::optional<Inputs<Scalar>> in;
  std::vector<std::int64_t> q_len, k_len;
  comm.step([&] {
    any.emplace(loadLayer<Scalar>(opt, config));
    in.emplace(loadInputs<Scalar>(opt, config, any->outputDim()));
    const Index T = in->query.dimension(1), S = in->value.dimension(1);
    q_len = sliceLengths(opt.slices, T, P);
    k_len = S == T ? q_len : sliceLengths(std::nullopt, S, P);
  });
  auto offset = [&](const std::vector<std::int64_t>& len) {
    Index o = 0;
    for (int r = 0; r < rank; ++r) o += Index(len[std::size_t(r)]);
    return o;
  };
  const Index t0 = offset(q_len), tn = Index(q_len[std::size_t(rank)]);
  const Index s0 = offset(k_len), sn = Index(k_len[std::size_t(rank)]);
  kattn::detail::visitFeatureMap(config.feature_transform, [&](auto map) {
    auto withMasking = [&](auto masking) {
      using Layer = kattn::KernelAttention<Scalar, decltype(map), decltype(masking)>;
      Layer layer(config);
      layer.setWeights(any->weights());
      if (config.hasProjection()) layer.setProjection(any->projection());
      if (opt.threads) layer.setThreads(*opt.threads);
      std::optional<Tensor<Scalar, 3>> key;
      std::optional<Tensor<Scalar, 2>> mask;
      if (in->key) key = middleRows(*in->key, s0, sn);
      if (in->mask) mask = middleRows(*in->mask, s0, sn);
      kattn::mpi::SequenceParallel sp(layer, MPI_COMM_WORLD);
      kattn::StreamingState<Scalar> state;
      const Tensor<Scalar, 3> y =
          sp.forward(middleRows(in->query, t0, tn), middleRows(in->value, s0, sn), key, mask,
                     opt.state_out ? &state : nullptr);
      gatherAndWrite(opt, y, q_len, state, rank, P);
    };
    if (config.use_causal_windowed) {
      withMasking(kattn::CausalWindowed{});
    } else {
      withMasking(kattn::Bidirectional{});
    }
  });
}

}  // namespace
