// Layer-by-layer KV hand-off on a prefill worker: the KV of a sequence leaves while the step
// that completes its prompt is still computing it. LlmEngine (set_handoff_hook) hands out a
// KvHandoff per such sequence before the step's forward; the forward reports each layer as its
// K/V writes are issued (LayerProgress), and the step's end resolves the token sampled after
// the prompt. A transfer thread waits for each layer in turn, sends it, and sends the token
// last (kv_transport.h: a header whose next_token comes at the end).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/backend/backend.h"
#include "engine/kv_cache/kv_cache.h"
#include "engine/transfer/kv_transport.h"

namespace pds::engine {

// How far one forward step has written its K/V, layer by layer. The step's thread reports
// each layer once its writes are issued, with a backend mark that is reached when they are
// complete, and then the step's end; other threads wait for layers.
class LayerProgress {
 public:
  explicit LayerProgress(int32_t num_layers) : marks_(static_cast<size_t>(num_layers)) {}
  int32_t num_layers() const { return static_cast<int32_t>(marks_.size()); }

  // Step thread, in layer order.
  void Issued(int32_t layer, std::shared_ptr<Backend::Mark> mark);
  // Step thread, once: the forward ended. OK: every layer is complete (the step synchronized
  // to read its tokens); an error fails every wait from now on.
  void End(absl::Status status);

  // Whether layer `layer` is complete (never blocks); the step's error if it failed.
  absl::StatusOr<bool> Ready(int32_t layer);
  // Returns once layer `layer` is complete; the step's error, DEADLINE_EXCEEDED or CANCELLED
  // (`cancelled`, when given, is polled) otherwise.
  absl::Status Wait(int32_t layer, absl::Time deadline, const std::function<bool()>& cancelled);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int32_t issued_ = 0;  // layers [0, issued_) have marks
  std::vector<std::shared_ptr<Backend::Mark>> marks_;
  std::optional<absl::Status> ended_;
};

// One sequence whose KV leaves during the step that completes its prompt.
class KvHandoff {
 public:
  KvHandoff(std::string request_id, std::vector<int32_t> blocks, int32_t num_tokens,
            std::shared_ptr<LayerProgress> layers)
      : request_id_(std::move(request_id)),
        blocks_(std::move(blocks)),
        num_tokens_(num_tokens),
        layers_(std::move(layers)) {}

  const std::string& request_id() const { return request_id_; }
  // The sequence's blocks in block-table order, holding positions [0, num_tokens()).
  const std::vector<int32_t>& blocks() const { return blocks_; }
  int32_t num_tokens() const { return num_tokens_; }
  LayerProgress& layers() { return *layers_; }

  // Engine, once, after the step: the token sampled after the prompt, or why the sequence
  // does not go on (it finished with its first token, the step failed).
  void Resolve(absl::StatusOr<int32_t> next_token);
  // Returns the resolved token or error once the step has ended; DEADLINE_EXCEEDED or
  // CANCELLED (`cancelled`, when given, is polled) otherwise.
  absl::StatusOr<int32_t> WaitNextToken(absl::Time deadline,
                                        const std::function<bool()>& cancelled);

 private:
  const std::string request_id_;
  const std::vector<int32_t> blocks_;
  const int32_t num_tokens_;
  const std::shared_ptr<LayerProgress> layers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::optional<absl::StatusOr<int32_t>> next_token_;
};

// The transfer header of a sequence of `cache`'s shape: `num_tokens` positions in `num_blocks`
// blocks of `dtype`, followed by `next_token` (or kNextTokenAtEnd).
KvTransferHeader KvHeaderFor(const KvCache& cache, DType dtype, const std::string& request_id,
                             int32_t num_tokens, int32_t num_blocks, int32_t next_token);

// A sequence's KV in a KvCache as the source of a transfer (kv_transport.h). A held sequence
// (its prefill step has ended and synchronized) has every layer complete; with a KvHandoff
// (layer-by-layer: the step completing the prompt still runs) each layer is waited for before
// it is read or moved, and the token comes from the step's end (a header with
// kNextTokenAtEnd). Host transports read packed layers through the backend; device transports
// move the blocks in place.
class CacheKvSource : public KvSource {
 public:
  CacheKvSource(Backend& backend, const KvCache& cache, std::vector<int32_t> blocks)
      : backend_(backend), cache_(cache), blocks_(std::move(blocks)) {}
  // Waits end at `deadline` or when `cancelled` (polled; may be null) returns true.
  CacheKvSource(Backend& backend, const KvCache& cache, std::shared_ptr<KvHandoff> handoff,
                absl::Time deadline, std::function<bool()> cancelled)
      : backend_(backend),
        cache_(cache),
        blocks_(handoff->blocks()),
        handoff_(std::move(handoff)),
        deadline_(deadline),
        cancelled_(std::move(cancelled)) {}

  absl::StatusOr<std::vector<int32_t>> Blocks() override { return blocks_; }
  absl::Status WaitLayer(int32_t layer) override;
  bool LayerReady(int32_t layer) override;
  absl::StatusOr<int32_t> NextToken() override;
  absl::Status ReadLayer(int32_t layer, int32_t first_block, uint8_t* dst, size_t bytes) override;

 private:
  Backend& backend_;
  const KvCache& cache_;
  const std::vector<int32_t> blocks_;
  const std::shared_ptr<KvHandoff> handoff_;
  const absl::Time deadline_ = absl::InfiniteFuture();
  const std::function<bool()> cancelled_;
};

}  // namespace pds::engine
