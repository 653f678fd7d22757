// One long sequence split across MPI ranks (kattn/mpi.hpp): a causal relu layer, 8 heads of
// 64, no projection, chunk 1, the layer's default window of 3 chunks (--window W; --window 0:
// none), 2^22 tokens by default, split evenly over the ranks of MPI_COMM_WORLD, one thread per
// rank.
//
//   mpirun -np 2 build/examples/mpi_long_sequence [tokens] [--dim D] [--window W] [--repeat R]
//                                                 [--baseline]
//
// Rank 0 prints, per rank, the time of the parallel forward (the fastest of R), the share of
// it spent inside MPI calls, and the bytes the rank handed to MPI, beside the volume that
// docs/distributed.md's formula gives. Run it with -np 1 and -np 2 to compare: the bytes per
// rank do not depend on the number of tokens. --baseline (one rank) also times the
// single-process forward on the whole sequence. The checksum (sum of the outputs) is the same
// for every number of ranks, up to rounding: the inputs are a function of the token's
// position, not of the split.

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <kattn/kattn.hpp>
#include <kattn/mpi.hpp>

namespace {

using kattn::Index;

/// A number in [-1, 1) from an element's global position (splitmix64): the same sequence
/// whatever the split.
float inputAt(std::uint64_t i) {
  std::uint64_t z = i + 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return float(double(z >> 11) * 0x1.0p-53 * 2.0 - 1.0);
}

int run(int argc, char** argv) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  Index T = Index(1) << 22, D = 256;
  int repeat = 2, window = 3;
  bool baseline = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--dim" && i + 1 < argc) {
      D = std::atol(argv[++i]);
    } else if (a == "--window" && i + 1 < argc) {
      window = std::atoi(argv[++i]);
    } else if (a == "--repeat" && i + 1 < argc) {
      repeat = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--baseline") {
      baseline = true;
    } else if (!a.empty() && a[0] != '-') {
      T = std::atol(a.c_str());
    } else {
      if (rank == 0) std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }

  kattn::LayerConfig c;
  c.num_heads = 8;
  c.key_dim = 64;
  c.feature_transform = "relu";
  c.num_random_features = 0;
  c.use_causal_windowed = true;
  c.causal_chunk_length = 1;
  c.causal_window_length = window > 0 ? window : kattn::kUnboundedWindow;
  kattn::CausalKernelAttention<float, kattn::Relu> layer(c);
  layer.initializeWeights(D, D);
  layer.setThreads(1);

  const Index t0 = T * rank / size, n = T * (rank + 1) / size - t0;
  kattn::Tensor<float, 3> x(1, n, D);
  for (Index i = 0; i < n * D; ++i) x.data()[i] = inputAt(std::uint64_t(t0 * D + i));

  kattn::mpi::SequenceParallel sp(layer, MPI_COMM_WORLD);
  double best = 1e300;
  kattn::mpi::CallStats stats;
  kattn::Tensor<float, 3> y;
  for (int r = 0; r < repeat; ++r) {
    MPI_Barrier(MPI_COMM_WORLD);
    y = sp.forward(x, x);
    // The call's time is the slowest rank's.
    double t = sp.lastCall().seconds;
    MPI_Allreduce(MPI_IN_PLACE, &t, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (t < best) {
      best = t;
      stats = sp.lastCall();
    }
  }
  double sum = 0;
  for (Index i = 0; i < y.size(); ++i) sum += double(y.data()[i]);
  MPI_Allreduce(MPI_IN_PLACE, &sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);

  // docs/distributed.md ("What a state weighs"): besides a few words of agreement, a causal
  // pass sends one state per scan round, ceil(log2 P) rounds and one shift to the next rank;
  // a state holds per (b, n) the running sums and, for a finite window of W chunks, at most
  // 2W more terms of F (d_v + 1) numbers.
  const double F = 64, dv = 64, N = 8, B = 1;
  const double terms = window > 0 ? 2.0 * window + 1 : 1.0;
  const double state = 96 + B * sizeof(float) + B * N * (24 + sizeof(float) * terms * F * (dv + 1));
  int rounds = 0;
  for (int d = 1; d < size; d *= 2) ++rounds;
  const double formula = size > 1 ? state * (rounds + 1) : 0;
  std::vector<double> mine = {stats.seconds, stats.mpi_seconds, double(stats.bytes_sent)};
  std::vector<double> all(std::size_t(3 * size));
  MPI_Gather(mine.data(), 3, MPI_DOUBLE, all.data(), 3, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  if (rank == 0) {
    std::printf("causal relu, 8 heads of 64, D = %ld, window %s, %ld tokens over %d rank(s), "
                "1 thread each\n",
                long(D), window > 0 ? std::to_string(window).c_str() : "none", long(T), size);
    std::printf("parallel forward: %.3f s (slowest rank, best of %d)\n", best, repeat);
    std::printf("%6s %10s %10s %14s %16s\n", "rank", "seconds", "in MPI", "bytes sent",
                "formula (most)");
    for (int r = 0; r < size; ++r) {
      const double* s = all.data() + 3 * r;
      std::printf("%6d %10.3f %9.1f%% %14.0f %16.0f\n", r, s[0], 100.0 * s[1] / s[0], s[2],
                  formula);
    }
    std::printf("checksum %.9e\n", sum);
  }
  if (baseline && size == 1) {
    double base = 1e300;
    for (int r = 0; r < repeat; ++r) {
      const double b0 = MPI_Wtime();
      const kattn::Tensor<float, 3> whole = layer.forward(x, x);
      base = std::min(base, MPI_Wtime() - b0);
    }
    std::printf("single-process forward: %.3f s (parallel path on one rank: %.2fx of it)\n",
                base, best / base);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int status = 1;
  try {
    status = run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mpi_long_sequence: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return status;
}
