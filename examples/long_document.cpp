// long_document: causal attention over one very long sequence in one forward, in memory that
// does not grow with its length beyond the input and the output.
//
// The layer: relu features (m = 64 random features), 4 heads, d = 32, model dim 128, float32,
// token-level causal attention (chunks of one token, a window covering the whole sequence:
// every token attends to all tokens before it). Usage: long_document [T], default 100000;
// T = 1000000 works (the input and the output are then 512 MB each).
//
// It prints the time of the forward and its memory: peak RSS during the forward minus RSS
// before it (which holds the input) minus the output, i.e. what the layer itself needed. The
// peak is reset just before the forward by writing "5" to /proc/self/clear_refs (Linux >= 4.0)
// and read as VmHWM from /proc/self/status; without clear_refs, ru_maxrss is used, which may
// include the input set-up. Exits non-zero on a non-finite output.

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <optional>
#include <random>
#include <string>

#include <kattn/kattn.hpp>

namespace {

using kattn::Index;

constexpr Index kModelDim = 128, kHeads = 4, kKeyDim = 32;
constexpr int kFeatures = 64;

/// A field of /proc/self/status in bytes ("VmRSS", "VmHWM"), or -1.
double statusBytes(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string key = std::string(field) + ":";
  while (std::getline(in, line)) {
    if (line.compare(0, key.size(), key) == 0) return std::atof(line.c_str() + key.size()) * 1024;
  }
  return -1;
}

bool resetPeakRss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  out.flush();
  return bool(out);
}

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

}  // namespace

int main(int argc, char** argv) {
  Index T = 100000;
  if (argc > 1) {
    char* end = nullptr;
    const long long v = std::strtoll(argv[1], &end, 10);
    if (!end || *end != '\0' || v < 1) {
      std::fprintf(stderr, "usage: %s [T >= 1]\n", argv[0]);
      return 2;
    }
    T = Index(v);
  }
  try {
    kattn::LayerConfig config;
    config.num_heads = int(kHeads);
    config.key_dim = int(kKeyDim);
    config.feature_transform = "relu";
    config.num_random_features = kFeatures;
    config.seed = 17;
    config.use_causal_windowed = true;
    config.causal_chunk_length = 1;
    config.causal_window_length = kattn::kUnboundedWindow;  // no window: plain causal
    kattn::KernelAttention<float, kattn::Relu, kattn::CausalWindowed> layer(config);
    // Drawn by the layer as an untrained Keras layer would (glorot_uniform kernels, zero
    // biases), before the clock starts rather than inside the timed forward.
    layer.initializeWeights(/*query_dim=*/kModelDim, /*value_dim=*/kModelDim);

    kattn::Tensor<float, 3> x(1, T, kModelDim);  // [B, T, D]
    {
      std::mt19937 gen(1);
      std::normal_distribution<float> normal(0.f, 1.f);
      for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);
    }
    kattn::Tensor<float, 3> y(1, T, kModelDim);  // [B, T, O], first touched by the forward
    const double io_bytes = double(sizeof(float)) * double(x.size());

    const bool have_clear_refs = resetPeakRss();
    const double before = statusBytes("VmRSS");
    const auto t0 = std::chrono::steady_clock::now();
    layer.forward(x, x, std::nullopt, std::nullopt, false, kattn::TensorMap<float, 3>(y));
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double peak = statusBytes("VmHWM");
    if (!have_clear_refs) {
      struct rusage usage;
      getrusage(RUSAGE_SELF, &usage);
      peak = double(usage.ru_maxrss) * 1024;
    }

    bool finite = true;
    for (Index i = 0; i < y.size() && finite; ++i) finite = std::isfinite(y.data()[i]);

    std::printf("causal relu attention, %ld heads, d = %ld, m = %d, model dim %ld, float32, "
                "T = %ld tokens\n", long(kHeads), long(kKeyDim), kFeatures, long(kModelDim),
                long(T));
    std::printf("forward: %.2f s (%.0f tokens/s)\n", seconds, double(T) / seconds);
    std::printf("memory: peak RSS %.1f MiB = RSS before the forward %.1f MiB (input %.1f MiB) "
                "+ output %.1f MiB + layer %.1f MiB\n", mib(peak), mib(before), mib(io_bytes),
                mib(io_bytes), mib(peak - before - io_bytes));
    if (!have_clear_refs) {
      std::printf("note: /proc/self/clear_refs not writable; peak from ru_maxrss\n");
    }
    if (!finite) {
      std::fprintf(stderr, "long_document: non-finite output\n");
      return 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "long_document: %s\n", e.what());
    return 1;
  }
  return 0;
}
