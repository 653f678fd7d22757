/// \file
/// FLOOR: what one core can do for W5's decode step without kattn around it, the measure of
/// target 4's bound (benchmarks/README.md). The state is W5's: 8 heads of 64 x 64 floats,
/// 128 KiB, row-major. Names are `FLOOR/<what>/8` (8 heads), on the calling thread only:
/// - `read`: one pass summing the state (four sums, 32-byte loads);
/// - `rmw`: one pass adding a constant to it (a load and a store per 32 bytes);
/// - `step`: the one-token kernel, readout q'S and update S + k'^T v in one pass, a panel of
///   four registers with rows in pairs, as detail::causalTokenPanel, in AVX2 intrinsics;
/// - `stepL1`: the same over one head's 16 KiB eight times, so that the state stays in L1.
/// Only with AVX2 and FMA (kattn_bench is built with -march=native by default).

#include "bench_common.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <vector>

namespace kattn_bench {
namespace {

constexpr int kStateRows = 64, kStateCols = 64;
constexpr int kHeadFloats = kStateRows * kStateCols;

/// One head: out = q'S (before the update), S <- S + k'^T v.
void stepHead(float* s, const float* q, const float* k, const float* v, float* out) {
  for (int c0 = 0; c0 < kStateCols; c0 += 32) {
    __m256 vp[4], even[4], odd[4];
    for (int j = 0; j < 4; ++j) {
      vp[j] = _mm256_loadu_ps(v + c0 + 8 * j);
      even[j] = _mm256_setzero_ps();
      odd[j] = _mm256_setzero_ps();
    }
    for (int f = 0; f < kStateRows; f += 2) {
      float* r0 = s + f * kStateCols + c0;
      float* r1 = r0 + kStateCols;
      const __m256 q0 = _mm256_broadcast_ss(q + f), q1 = _mm256_broadcast_ss(q + f + 1);
      const __m256 k0 = _mm256_broadcast_ss(k + f), k1 = _mm256_broadcast_ss(k + f + 1);
      for (int j = 0; j < 4; ++j) {
        const __m256 a = _mm256_loadu_ps(r0 + 8 * j), b = _mm256_loadu_ps(r1 + 8 * j);
        even[j] = _mm256_fmadd_ps(q0, a, even[j]);
        odd[j] = _mm256_fmadd_ps(q1, b, odd[j]);
        _mm256_storeu_ps(r0 + 8 * j, _mm256_fmadd_ps(k0, vp[j], a));
        _mm256_storeu_ps(r1 + 8 * j, _mm256_fmadd_ps(k1, vp[j], b));
      }
    }
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + c0 + 8 * j, _mm256_add_ps(even[j], odd[j]));
  }
}

enum class Floor { Read, ReadModifyWrite, Step, StepInL1 };

void BM_Floor(benchmark::State& state, Floor what) {
  const int heads = int(kHeads);
  // Aligned as Eigen aligns kattn's states (std::vector's 16 bytes would split every other
  // 32-byte access across two cache lines).
  Eigen::VectorXf s = Eigen::VectorXf::Zero(heads * kHeadFloats);
  // Features and values of 10^-3: a million steps add 1 to each entry, far from overflow.
  std::vector<float> q(std::size_t(heads * kStateRows), 1e-3f),
      out(std::size_t(heads * kStateCols));
  std::vector<float> k(q), v(std::size_t(heads * kStateCols), 1e-3f);
  __m256 sink = _mm256_setzero_ps();
  for (auto _ : state) {
    switch (what) {
      case Floor::Read: {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (Index i = 0; i < s.size(); i += 32) {
          a0 = _mm256_add_ps(a0, _mm256_loadu_ps(&s[i]));
          a1 = _mm256_add_ps(a1, _mm256_loadu_ps(&s[i + 8]));
          a2 = _mm256_add_ps(a2, _mm256_loadu_ps(&s[i + 16]));
          a3 = _mm256_add_ps(a3, _mm256_loadu_ps(&s[i + 24]));
        }
        sink = _mm256_add_ps(sink, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        break;
      }
      case Floor::ReadModifyWrite: {
        const __m256 c = _mm256_set1_ps(1e-9f);
        for (Index i = 0; i < s.size(); i += 32) {
          for (int j = 0; j < 32; j += 8) {
            _mm256_storeu_ps(&s[i + j], _mm256_add_ps(_mm256_loadu_ps(&s[i + j]), c));
          }
        }
        break;
      }
      case Floor::Step:
      case Floor::StepInL1:
        for (int h = 0; h < heads; ++h) {
          float* head = s.data() + (what == Floor::Step ? h * kHeadFloats : 0);
          stepHead(head, &q[std::size_t(h * kStateRows)], &k[std::size_t(h * kStateRows)],
                   &v[std::size_t(h * kStateCols)], &out[std::size_t(h * kStateCols)]);
        }
        break;
    }
    benchmark::DoNotOptimize(sink);
    benchmark::DoNotOptimize(s.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  // The step's essential FLOPs: per state entry a multiply-add (two FLOPs) for the readout
  // and one for the update.
  const double step_flops = 4.0 * double(heads) * kHeadFloats;
  setCounters(state, 1.0, what == Floor::Step || what == Floor::StepInL1 ? step_flops : 0.0);
}

}  // namespace

void registerFloor() {
  const std::pair<const char*, Floor> floors[] = {{"read", Floor::Read},
                                                  {"rmw", Floor::ReadModifyWrite},
                                                  {"step", Floor::Step},
                                                  {"stepL1", Floor::StepInL1}};
  for (const auto& [name, what] : floors) {
    const std::string full = benchName("FLOOR", name, kHeads);
    benchmark::RegisterBenchmark(full.c_str(), [what = what](benchmark::State& state) {
      BM_Floor(state, what);
    })->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace kattn_bench

#else

namespace kattn_bench {
void registerFloor() {}  // no AVX2 and FMA: nothing to measure the bound of
}  // namespace kattn_bench

#endif
