#include "server/profiler.h"

#include <algorithm>
#include <chrono>
#include <random>
#include <thread>

#include "engine/common/status_macros.h"

namespace pds::server {
namespace {

using engine::BlockTable;
using engine::KvCache;
using engine::SequenceInput;

struct Grid {
  std::vector<std::vector<int32_t>> prefill_batches;  // prompt lengths per batch
  std::vector<std::pair<int32_t, int32_t>> decode;    // (batch, context per sequence)
};

Grid MakeGrid(bool quick, int64_t max_context) {
  Grid g;
  const std::vector<int32_t> lens =
      quick ? std::vector<int32_t>{16, 48, 96, 160, 256}
            : std::vector<int32_t>{16, 32, 64, 128, 256, 384, 512, 768, 1024};
  const int32_t budget = quick ? 512 : 2048;
  for (int32_t batch : {1, 2, 4}) {
    for (int32_t len : lens) {
      if (batch * len <= budget && len < max_context) {
        g.prefill_batches.push_back(std::vector<int32_t>(batch, len));
      }
    }
  }
  // Ragged batches, as the token-budget policy forms them.
  g.prefill_batches.push_back({16, 240});
  g.prefill_batches.push_back({100, 30, 60});
  if (!quick) {
    g.prefill_batches.push_back({512, 64, 64, 128});
    g.prefill_batches.push_back({900, 100});
  }
  const std::vector<int32_t> batches =
      quick ? std::vector<int32_t>{1, 4, 8, 16} : std::vector<int32_t>{1, 2, 4, 8, 16, 32};
  const std::vector<int32_t> contexts =
      quick ? std::vector<int32_t>{32, 128, 512} : std::vector<int32_t>{64, 256, 512, 1024, 2048};
  const int64_t max_tokens = quick ? 8192 : 32768;
  for (int32_t b : batches) {
    for (int32_t c : contexts) {
      if (static_cast<int64_t>(b) * (c + 1) <= max_tokens && c + 1 < max_context) {
        g.decode.emplace_back(b, c);
      }
    }
  }
  return g;
}

// Runs `forward` reps + 1 times and returns the median of the timed runs in seconds.
template <typename F>
absl::StatusOr<double> MedianSeconds(int reps, F forward) {
  std::vector<double> times;
  for (int r = 0; r <= reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    PDS_RETURN_IF_ERROR(forward());
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (r > 0) times.push_back(secs);  // the first run warms caches and scratch buffers
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

absl::StatusOr<Profile> ProfileEngine(engine::Transformer& model, const ProfileOptions& options) {
  const engine::ModelConfig& config = model.config();
  const Grid grid = MakeGrid(options.quick, config.max_context());
  const int32_t bs = options.block_size;
  int64_t max_tokens = 0;
  for (const auto& batch : grid.prefill_batches) {
    int64_t blocks = 0;
    for (int32_t l : batch) blocks += BlockTable::BlocksFor(l, bs);
    max_tokens = std::max(max_tokens, blocks * bs);
  }
  for (const auto& [b, c] : grid.decode) {
    max_tokens = std::max<int64_t>(max_tokens,
                                   static_cast<int64_t>(b) * BlockTable::BlocksFor(c + 1, bs) * bs);
  }
  PDS_ASSIGN_OR_RETURN(
      KvCache cache, KvCache::Create(model.backend(),
                                     model.CacheShape(static_cast<int32_t>(max_tokens / bs), bs)));
  std::mt19937_64 rng(1);
  auto random_tokens = [&](int32_t n) {
    std::vector<int32_t> t(n);
    for (auto& id : t) id = static_cast<int32_t>(rng() % config.vocab_size);
    return t;
  };
  std::vector<float> logits;
  Profile profile;
  // Every point is timed once per round and the rounds interleave the whole grid, so a slow
  // phase of the machine (a shared VM's neighbours) hits one round of many points rather
  // than every repetition of a few; the median over rounds is kept.
  const int rounds = std::max(1, options.rounds);
  std::vector<std::vector<double>> prefill_times(grid.prefill_batches.size());
  std::vector<std::vector<double>> decode_times(grid.decode.size());
  auto set_phase = [&](ProfilePhase p) {
    if (options.phase != nullptr) options.phase->store(p);
  };
  for (int round = 0; round < rounds; ++round) {
    set_phase(kProfilePrefill);
    for (size_t point = 0; point < grid.prefill_batches.size(); ++point) {
      const auto& lens = grid.prefill_batches[point];
      std::vector<BlockTable> tables(lens.size());
      std::vector<std::vector<int32_t>> prompts;
      std::vector<SequenceInput> inputs;
      for (size_t s = 0; s < lens.size(); ++s) {
        PDS_RETURN_IF_ERROR(tables[s].Reserve(lens[s], bs, cache.allocator()));
        prompts.push_back(random_tokens(lens[s]));
      }
      for (size_t s = 0; s < lens.size(); ++s) inputs.push_back({prompts[s], 0, &tables[s]});
      PDS_ASSIGN_OR_RETURN(double secs, MedianSeconds(options.reps, [&] {
                             return model.Forward(inputs, cache, logits);
                           }));
      prefill_times[point].push_back(secs);
      for (auto& t : tables) PDS_RETURN_IF_ERROR(t.Release(cache.allocator()));
    }

    // Decode steps: the cached context's values do not change the cost, so the blocks are
    // reserved (zeroed memory) without prefilling them.
    set_phase(kProfileDecode);
    for (size_t point = 0; point < grid.decode.size(); ++point) {
      const auto [batch, context] = grid.decode[point];
      std::vector<BlockTable> tables(batch);
      std::vector<std::vector<int32_t>> next(batch);
      std::vector<SequenceInput> inputs;
      for (int32_t s = 0; s < batch; ++s) {
        PDS_RETURN_IF_ERROR(tables[s].Reserve(context + 1, bs, cache.allocator()));
        next[s] = random_tokens(1);
      }
      for (int32_t s = 0; s < batch; ++s) inputs.push_back({next[s], context, &tables[s]});
      PDS_ASSIGN_OR_RETURN(double secs, MedianSeconds(options.reps, [&] {
                             return model.Forward(inputs, cache, logits);
                           }));
      decode_times[point].push_back(secs);
      for (auto& t : tables) PDS_RETURN_IF_ERROR(t.Release(cache.allocator()));
    }
  }
  set_phase(kProfileIdle);
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  for (size_t point = 0; point < grid.prefill_batches.size(); ++point) {
    profile.prefill.push_back({grid.prefill_batches[point], median(prefill_times[point])});
  }
  for (size_t point = 0; point < grid.decode.size(); ++point) {
    const auto [batch, context] = grid.decode[point];
    profile.decode.push_back(
        {batch, static_cast<int64_t>(batch) * (context + 1), median(decode_times[point])});
  }
  return profile;
}

absl::Status RunNeighbor(engine::Transformer& model, const NeighborLoad& load,
                         const std::atomic<int>& phase, const std::atomic<bool>& stop) {
  const int32_t bs = load.block_size;
  const int64_t blocks =
      int64_t{load.decode_batch} * BlockTable::BlocksFor(load.decode_context + 1, bs) +
      BlockTable::BlocksFor(load.prompt_len, bs);
  PDS_ASSIGN_OR_RETURN(
      KvCache cache,
      KvCache::Create(model.backend(), model.CacheShape(static_cast<int32_t>(blocks), bs)));
  const int32_t vocab = model.config().vocab_size;
  std::vector<BlockTable> tables(load.decode_batch);
  std::vector<std::vector<int32_t>> next(load.decode_batch);
  std::vector<SequenceInput> decode;
  for (int32_t s = 0; s < load.decode_batch; ++s) {
    PDS_RETURN_IF_ERROR(tables[s].Reserve(load.decode_context + 1, bs, cache.allocator()));
    next[s] = {static_cast<int32_t>((s * 7919) % vocab)};
  }
  for (int32_t s = 0; s < load.decode_batch; ++s) {
    decode.push_back({next[s], load.decode_context, &tables[s]});
  }
  BlockTable prompt_table;
  PDS_RETURN_IF_ERROR(prompt_table.Reserve(load.prompt_len, bs, cache.allocator()));
  std::vector<int32_t> prompt(load.prompt_len);
  for (int32_t i = 0; i < load.prompt_len; ++i) prompt[i] = (i * 104729) % vocab;
  const std::vector<SequenceInput> prefill = {{prompt, 0, &prompt_table}};
  std::vector<float> logits;
  while (!stop.load()) {
    switch (phase.load()) {
      case kProfilePrefill:  // the decode instance keeps decoding
        PDS_RETURN_IF_ERROR(model.Forward(decode, cache, logits));
        break;
      case kProfileDecode:  // the prefill instance keeps prefilling
        PDS_RETURN_IF_ERROR(model.Forward(prefill, cache, logits));
        break;
      default:
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  return absl::OkStatus();
}

}  // namespace pds::server
