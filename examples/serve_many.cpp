// A server loop over a StatePool (docs/serving.md): 32 simulated conversations arrive over
// time, each reads its prompt in pieces and then decodes, one ragged forward per tick for all
// of them, and ends; its slot goes back to the pool for the next. A progress line per tick.
// At the end, one conversation is replayed through a StreamingState of its own: its rows must
// be the same bits.

#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include <kattn/kattn.hpp>

namespace {

using kattn::Index;

constexpr Index kModelDim = 64;
constexpr int kConversations = 32;
constexpr Index kPromptPiece = 48;  // prompt tokens read per tick

struct Conversation {
  Index slot = -1;
  std::vector<float> prompt;  // its prompt tokens [P, D], row-major
  Index read = 0;             // prompt tokens read so far
  Index to_generate = 0;      // decode steps left
  std::vector<float> last;    // the last output row, the next decode input
  std::vector<float> fed;     // every token it was fed, in order (for the replay check)
  std::vector<Index> calls;   // tokens per call
  std::vector<float> rows;    // every output row it got
};

}  // namespace

int main() {
  kattn::LayerConfig config;
  config.num_heads = 4;
  config.key_dim = 16;
  config.feature_transform = "relu";
  config.num_random_features = 32;
  config.use_causal_windowed = true;
  config.causal_chunk_length = 1;
  config.causal_window_length = 256;
  config.seed = 11;
  kattn::CausalKernelAttention<float, kattn::Relu> layer(config);
  layer.initializeWeights(kModelDim, kModelDim);  // stand-ins for trained weights

  kattn::StatePool<float> pool = layer.makePool(12);  // fewer slots than conversations
  std::mt19937 gen(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<Index> prompt_len(20, 200), gen_len(10, 60);

  std::vector<Conversation> all(kConversations);
  for (auto& c : all) {
    c.prompt.resize(std::size_t(prompt_len(gen) * kModelDim));
    for (float& x : c.prompt) x = normal(gen);
    c.to_generate = gen_len(gen);
  }
  int next = 0, finished = 0;
  std::vector<int> live;
  Index total_tokens = 0;
  for (int tick = 0; finished < kConversations; ++tick) {
    // Arrivals: a conversation joins when a slot is free (two at most per tick).
    for (int joins = 0; joins < 2 && next < kConversations && pool.inUse() < pool.capacity();
         ++joins) {
      all[std::size_t(next)].slot = pool.acquire();
      live.push_back(next++);
    }
    // One call for every live conversation: its next prompt piece, or its last output row.
    std::vector<Index> slots, offsets{0};
    std::vector<float> packed;
    int reading = 0;
    for (const int i : live) {
      Conversation& c = all[std::size_t(i)];
      const Index prompt_rows = Index(c.prompt.size()) / kModelDim;
      const float* from;
      Index n;
      if (c.read < prompt_rows) {
        n = std::min(kPromptPiece, prompt_rows - c.read);
        from = c.prompt.data() + c.read * kModelDim;
        c.read += n;
        ++reading;
      } else {
        n = 1;
        from = c.last.data();
      }
      packed.insert(packed.end(), from, from + n * kModelDim);
      c.fed.insert(c.fed.end(), from, from + n * kModelDim);
      c.calls.push_back(n);
      slots.push_back(c.slot);
      offsets.push_back(offsets.back() + n);
    }
    const kattn::ConstTensorMap<float, 2> x(packed.data(), offsets.back(), kModelDim);
    const kattn::Tensor<float, 2> y = layer.forward(x, pool, slots, offsets);
    total_tokens += offsets.back();
    // Hand each conversation its rows; the decoding ones end after their steps.
    std::vector<int> still;
    for (std::size_t j = 0; j < live.size(); ++j) {
      Conversation& c = all[std::size_t(live[j])];
      const float* rows = y.data() + offsets[j] * kModelDim;
      const Index n = offsets[j + 1] - offsets[j];
      c.rows.insert(c.rows.end(), rows, rows + n * kModelDim);
      c.last.assign(rows + (n - 1) * kModelDim, rows + n * kModelDim);
      const bool decoding = c.read * kModelDim == Index(c.prompt.size()) && n == 1;
      if (decoding && --c.to_generate == 0) {
        pool.release(c.slot);
        ++finished;
      } else {
        still.push_back(live[j]);
      }
    }
    live.swap(still);
    std::printf("tick %3d: %2zu live (%2d reading a prompt), %3d finished, %6ld tokens\n", tick,
                live.size(), reading, finished, long(total_tokens));
  }

  // Conversation 0 again, through a StreamingState of its own, in the same calls.
  const Conversation& c = all[0];
  kattn::StreamingState<float> own = layer.makeState(1);
  Index at = 0, differing = 0;
  for (const Index n : c.calls) {
    const kattn::ConstTensorMap<float, 3> in(c.fed.data() + at * kModelDim, 1, n, kModelDim);
    const kattn::Tensor<float, 3> out = layer.forward(in, in, std::nullopt, std::nullopt, own);
    differing += std::memcmp(out.data(), c.rows.data() + at * kModelDim,
                             sizeof(float) * std::size_t(n * kModelDim)) != 0;
    at += n;
  }
  std::printf("conversation 0 (%ld tokens in %zu calls) against a StreamingState of its own: %s\n",
              long(at), c.calls.size(), differing == 0 ? "the same bits" : "DIFFERENT");
  return differing == 0 ? 0 : 1;
}
