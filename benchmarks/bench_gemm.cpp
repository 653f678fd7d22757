/// \file
/// GEMM/kattn/4096: the SGEMM ceiling of the same run, [4096, 512] x [512, 512] through
/// Eigen, with the rows split over a kattn::ThreadPool in 256-row slices as the layer's dense
/// projections do (Eigen's own threading is not used, as in the layer).

#include <algorithm>

#include "bench_common.hpp"
#include "flops.hpp"

namespace kattn_bench {
namespace {

using Mat = kattn::Matrix<float>;
using ConstMap = Eigen::Map<const Mat>;

constexpr Index kRows = 4096, kInner = 512, kCols = 512;
/// The layer's slice (KernelAttention::forRowSlices).
constexpr Index kSliceRows = 256;

void BM_Gemm(benchmark::State& state, int threads) {
  const kattn::ThreadPool pool(threads);
  const ConstMap a(inputData(0, std::size_t(kRows * kInner)), kRows, kInner);
  const ConstMap w(inputData(1, std::size_t(kInner * kCols)), kInner, kCols);
  Mat c(kRows, kCols);
  const Index slices = (kRows + kSliceRows - 1) / kSliceRows;
  auto gemm = [&] {
    pool.parallelFor(slices, [&](Index i) {
      const Index r0 = i * kSliceRows, len = std::min(kSliceRows, kRows - r0);
      c.middleRows(r0, len).noalias() = a.middleRows(r0, len) * w;
    });
  };
  gemm();  // warm-up: pool threads awake, c touched
  for (auto _ : state) {
    gemm();
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  checkOutput(state, c.data(), std::size_t(c.size()));
  setCounters(state, double(kRows), flops::gemm(kRows, kInner, kCols));
}

}  // namespace

void registerGemm() {
  registerBenchmark(benchName("GEMM", "kattn", kRows), Timing{}, BM_Gemm);
}

}  // namespace kattn_bench
