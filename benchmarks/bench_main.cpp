/// \file
/// kattn_bench's entry point: registers every benchmark (in the order of issue 8's workloads:
/// the GEMM ceiling first, then W1 to W6, the gradients G1, G3 and G6 of issue 26, the memory
/// case and the decode step's floor) and records in the JSON context what the numbers depend
/// on (thread count, Eigen's SIMD, -march=native).

#include <Eigen/Core>

#include "bench_common.hpp"

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("kattn_threads", std::to_string(kattn_bench::kThreads));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("eigen_version", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                                   std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                                   std::to_string(EIGEN_MINOR_VERSION));
#ifdef KATTN_BENCH_NATIVE
  benchmark::AddCustomContext("march_native", "on");
#else
  benchmark::AddCustomContext("march_native", "off");
#endif
  kattn_bench::registerGemm();
  kattn_bench::registerBidirectional();
  kattn_bench::registerCausal();
  kattn_bench::registerServing();
  kattn_bench::registerLayer();
  kattn_bench::registerGradients();
  kattn_bench::registerMemory();
  kattn_bench::registerFloor();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
