// The decoder-only transformer (Llama family) over a ragged batch with a paged KV cache.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/backend.h"
#include "engine/kv_cache/kv_cache.h"
#include "engine/model/config.h"
#include "engine/model/safetensors.h"

namespace pds::engine {

struct LayerWeights {
  Weight input_norm;
  Weight qkv;       // [q + 2 kv, hidden]: q_proj, k_proj, v_proj rows stacked
  Weight qkv_bias;  // [q + 2 kv] when config.qkv_bias
  Weight q_norm;    // [head_dim] when config.qk_norm
  Weight k_norm;
  Weight o;       // [hidden, q]
  Weight o_bias;  // [hidden] when config.o_bias
  Weight post_norm;
  Weight gate_up;  // [2 inter, hidden]: gate_proj rows then up_proj rows
  Weight down;     // [hidden, inter]
};

// One sequence of a forward batch: `tokens` are new tokens at positions start_pos.. whose
// K/V go into `table`'s blocks (which must already cover start_pos + tokens.size()).
// Positions before start_pos must already be in the cache.
struct SequenceInput {
  std::span<const int32_t> tokens;
  int32_t start_pos = 0;
  const BlockTable* table = nullptr;
};

class Transformer {
 public:
  // Loads config and weights from an HF directory onto `backend`.
  static absl::StatusOr<std::unique_ptr<Transformer>> Load(const std::string& dir,
                                                           Backend& backend);
  static absl::StatusOr<std::unique_ptr<Transformer>> Load(const ModelConfig& config,
                                                           const WeightFiles& files,
                                                           Backend& backend);

  // The model of `config` with seeded random weights initialized directly in backend memory
  // (no files; for benchmarks of real model shapes): linear weights uniform with variance
  // 1/fan-in, norm weights near 1, biases small; never zeros.
  static absl::StatusOr<std::unique_ptr<Transformer>> CreateRandom(const ModelConfig& config,
                                                                   Backend& backend, uint64_t seed);

  const ModelConfig& config() const { return config_; }
  Backend& backend() const { return backend_; }

  // Runs the batch, writing new K/V into `cache`, and returns fp32 logits of the last new
  // token of each sequence: [seqs, vocab] row-major in `logits`.
  absl::Status Forward(std::span<const SequenceInput> seqs, KvCache& cache,
                       std::vector<float>& logits);
  // Called after each layer's K/V writes are issued (in layer order), e.g. to mark the point
  // for a layer-by-layer KV hand-off; an error fails the forward.
  using KvLayerHook = std::function<absl::Status(int32_t layer)>;
  // The same with each sequence's next token chosen by the backend (sampling[s]; see
  // Backend::SampleTokens): tokens[s] is set for every sequence, logits rows only where
  // host_rows[s] is set (a device backend then copies no other logits). With `on_kv_layer`
  // the forward is never replayed from a graph (every layer's hook runs). With `extra_rows`
  // (any of the batch's token rows, e.g. the draft positions of speculative decoding), tokens
  // also gets a token for each of them after the sequences', drawn by extra_sampling[i], from
  // the same pass over the lm_head as the last rows' (SampleRows after the forward would read
  // it again). `logits` only grows: its rows past this step's (the sequences', and with extra
  // rows one per extra row, set where the host draws) are stale.
  absl::Status Forward(std::span<const SequenceInput> seqs, KvCache& cache,
                       std::vector<float>& logits,
                       const std::vector<kernels::RowSampling>& sampling,
                       const std::vector<uint8_t>& host_rows, std::vector<int32_t>& tokens,
                       const KvLayerHook& on_kv_layer = nullptr,
                       std::span<const int64_t> extra_rows = {},
                       const std::vector<kernels::RowSampling>& extra_sampling = {});

  // After a Forward: a token from each of the batch's token `rows` (any rows, e.g. draft
  // positions of speculative decoding), drawn by sampling[i] where the logits are, as Forward
  // draws each sequence's last row: tokens[i]. A device backend copies no logits to the host;
  // `scratch` is the host buffer a host backend draws from. At most a few hundred rows a call.
  absl::Status SampleRows(std::span<const int64_t> rows,
                          const std::vector<kernels::RowSampling>& sampling,
                          std::vector<float>& scratch, std::vector<int32_t>& tokens);
  // After a Forward: the fp32 logits of any of the batch's token `rows` (every new token's row,
  // not only each sequence's last: prompt logprobs, draft rows; runs of consecutive rows
  // gathered in one copy), [rows, vocab] row-major at the start of `logits`, which only grows.
  // Ask for a few hundred rows at a time at most (the host buffer).
  absl::Status RowLogits(std::span<const int64_t> rows, std::vector<float>& logits);

  // The KV cache shape this model needs for `num_blocks` blocks of `block_size`.
  KvCacheShape CacheShape(int32_t num_blocks, int32_t block_size) const;
  // Bytes of weights resident on the backend.
  size_t weight_bytes() const { return weight_bytes_; }

 private:
  Transformer(const ModelConfig& config, Backend& backend) : config_(config), backend_(backend) {}
  // Makes the weight stacking `parts` (name, rows) row-wise; cols == 0 for vectors.
  using WeightMaker = std::function<absl::StatusOr<Weight>(
      const std::vector<std::pair<std::string, int64_t>>& parts, int64_t cols)>;
  absl::Status LoadWeights(const WeightMaker& make);
  absl::Status BuildMetadata(std::span<const SequenceInput> seqs, const KvCache& cache);
  absl::Status EnsureScratch(int64_t tokens, int64_t seqs);
  // Everything up to the final norm: last_ holds each sequence's normed last hidden row.
  // After a Forward: `rows` of the final hidden states copied into h_ and normalized.
  absl::Status GatherRows(std::span<const int64_t> rows);
  absl::Status Body(std::span<const SequenceInput> seqs, KvCache& cache,
                    const KvLayerHook& on_kv_layer = nullptr);
  // The backend ops of a forward over the metadata of BeginBatch (recorded in a graph or not).
  absl::Status Ops(KvCache& cache, const KvLayerHook& on_kv_layer = nullptr);

  ModelConfig config_;
  Backend& backend_;
  std::vector<float> inv_freq_;
  Weight embed_;
  Weight lm_head_own_;
  const Weight* lm_head_ = nullptr;
  Weight final_norm_;
  std::vector<LayerWeights> layers_;
  size_t weight_bytes_ = 0;

  BatchMetadata meta_;
  int64_t scratch_tokens_ = 0, scratch_seqs_ = 0;
  DeviceBuffer x_, h_, qkv_, attn_, proj_, gate_up_, act_, last_;
};

}  // namespace pds::engine
