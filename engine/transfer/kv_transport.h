// KV-cache transfer between a prefill worker (sender) and a decode worker (receiver).
//
// One transfer moves one sequence's K/V for every layer, layer by layer, in order. The sender
// first offers the sequence (a header); the receiver's sink reserves room for it or answers
// RESOURCE_EXHAUSTED (no room yet: the sender keeps its copy and offers again later, which is
// the back-pressure between the two pools) or another error (the sender gives up). Then each
// layer is sent as soon as the source has it (the source may block until that layer is
// computed, so sending overlaps prefill), and the receiver confirms the whole sequence.
//
// Held blocks: the reservation names how many leading blocks of the sequence (block-table
// order) the receiver already holds, e.g. a shared system prompt in its prefix cache, at most
// num_blocks - 1. The sender then moves only the blocks after them ("the moved blocks":
// header.Moved(held)), so a cached prefix costs neither bytes nor copies.
//
// The token sampled after the sequence's positions (the decode side's first input) is in the
// header, or, for a sequence sent while its prefill step still runs (layer-by-layer hand-off,
// header.next_token == kNextTokenAtEnd), comes from the source after the last layer and is
// sent with the end of the transfer; the source's error then breaks the transfer off instead.
//
// Layer payload layout ("packed"): K of the moved blocks in block-table order, then V of the
// same blocks; each block is [kv_heads, block_size, head_dim] in `dtype`, i.e.
// 2 * moved blocks * BlockBytes bytes per layer.
//
// Implementations: the host TCP transport (tcp_transport.h) for CPU workers; the device
// transports for GPU workers (cuda_ipc_transport.h: one node, copies straight into the
// receiver's blocks; nccl_transport.h: any GPUs, packed layers over NCCL) implement the same
// interfaces, with the device hooks below (ReservedBlocks, Blocks, WaitLayer) in place of the
// host-buffer calls (WriteLayer, ReadLayer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/common/dtype.h"

namespace pds::engine {

// KvTransferHeader::next_token of a transfer whose token the source gives after the last layer
// (-1: no token at all).
inline constexpr int32_t kNextTokenAtEnd = -2;

struct KvTransferHeader {
  std::string request_id;
  int32_t num_tokens = 0;  // positions whose K/V are in the blocks
  int32_t num_layers = 0;
  int32_t num_blocks = 0;
  int32_t kv_heads = 0;
  int32_t block_size = 0;
  int32_t head_dim = 0;
  DType dtype = DType::kF32;
  // The token sampled after these positions (the decode side's input), -1 for none, or
  // kNextTokenAtEnd.
  int32_t next_token = -1;

  size_t BlockBytes() const {
    return static_cast<size_t>(kv_heads) * block_size * head_dim * DTypeSize(dtype);
  }
  size_t LayerBytes() const { return 2 * static_cast<size_t>(num_blocks) * BlockBytes(); }
  // INVALID_ARGUMENT unless every field is in range and the sizes do not overflow.
  absl::Status Validate() const;
  // INVALID_ARGUMENT unless a receiver may hold `held_blocks` leading blocks of this sequence
  // (0 <= held_blocks < num_blocks).
  absl::Status CheckHeld(int32_t held_blocks) const;
  // The part a transfer moves when the receiver holds `held_blocks` leading blocks (CheckHeld):
  // num_blocks and num_tokens less those blocks and their positions.
  KvTransferHeader Moved(int32_t held_blocks) const;
};

// Where a worker's KV cache lives, for the device transports that address its blocks directly:
// one allocation (KvCache::data()) holding, per layer l, the K pool at 2 l * pool_bytes and the
// V pool at (2 l + 1) * pool_bytes, block b of a pool at b * block_bytes.
struct KvPoolLayout {
  void* data = nullptr;
  size_t bytes = 0;
  size_t pool_bytes = 0;
  size_t block_bytes = 0;
  int32_t num_layers = 0;
  int32_t num_blocks = 0;  // per pool
  int device = -1;         // CUDA device ordinal; -1: host memory (the fake communicator's tests)

  // Byte offset of `block` of layer `layer`'s K (kv = 0) or V (kv = 1) pool.
  size_t Offset(int32_t layer, int kv, int32_t block) const {
    return (2 * static_cast<size_t>(layer) + kv) * pool_bytes +
           static_cast<size_t>(block) * block_bytes;
  }
  // INVALID_ARGUMENT unless the pools fit in `bytes` and blocks fit in a pool.
  absl::Status Validate() const;
  // INVALID_ARGUMENT unless `header`'s layers and block size match and every block id is in range.
  absl::Status Check(const KvTransferHeader& header, const std::vector<int32_t>& blocks) const;
};

// The receiving side's storage (a decode worker's KV cache). Called from transport threads;
// implementations synchronize with their engine.
class KvSink {
 public:
  virtual ~KvSink() = default;
  // Reserves room for the offered sequence. OK: the number of leading blocks the sink already
  // holds (0 <= held < header.num_blocks; the rest are moved); RESOURCE_EXHAUSTED: no room now
  // (the sender retries); anything else: refused for good (unknown or cancelled request, shape
  // mismatch).
  virtual absl::StatusOr<int32_t> Reserve(const KvTransferHeader& header) = 0;
  // Stores one layer's packed K/V of the moved blocks of a reserved sequence.
  virtual absl::Status WriteLayer(const std::string& request_id, int32_t layer, const uint8_t* data,
                                  size_t bytes) = 0;
  // Called exactly once per successful Reserve: OK when every layer was written (the sink
  // may start decoding with `next_token`: the header's, or the one sent at the end), an error
  // when the transfer broke off (the sink frees the room; `next_token` is -1).
  virtual void Complete(const std::string& request_id, absl::Status status, int32_t next_token) = 0;
  // Device transports: the blocks the successful Reserve of `request_id` took for the moved
  // blocks, in block-table order (header.num_blocks less the held ones); the transport writes
  // them in place (no WriteLayer) and then calls Complete. Host-only sinks need not implement
  // it.
  virtual absl::StatusOr<std::vector<int32_t>> ReservedBlocks(const std::string& request_id) {
    return absl::UnimplementedError("this KV sink has no device blocks");
  }
};

// The sending side's data (a prefill worker's KV cache for one sequence).
class KvSource {
 public:
  virtual ~KvSource() = default;
  // Packs layer `layer` of the blocks from `first_block` on (block-table order; the receiver
  // holds those before) into `dst` (header.Moved(first_block).LayerBytes() bytes); may wait
  // until the layer is computed.
  virtual absl::Status ReadLayer(int32_t layer, int32_t first_block, uint8_t* dst,
                                 size_t bytes) = 0;
  // Device transports: the sequence's blocks in the sender's pool, in block-table order
  // (header.num_blocks of them). Host-only sources need not implement it.
  virtual absl::StatusOr<std::vector<int32_t>> Blocks() {
    return absl::UnimplementedError("this KV source has no device blocks");
  }
  // Device transports: returns once layer `layer`'s K/V are computed and visible to other
  // streams and processes (the device transports read the blocks directly). Default: at once.
  virtual absl::Status WaitLayer(int32_t layer) { return absl::OkStatus(); }
  // Device transports: whether WaitLayer(layer) would return at once now (never blocks). After
  // WaitLayer(l) the IPC transport extends its copy over the following layers that are ready
  // and moves them in one launch; it still calls WaitLayer for each of them (at once, then), so
  // a layer that turns out not to be ready only delays the batch. A source whose WaitLayer
  // blocks (layers still being computed) should answer false for those layers, or every layer
  // is waited for before the first copy starts (no overlap with prefill). Default: true, like
  // the default WaitLayer.
  virtual bool LayerReady(int32_t layer) { return true; }
  // header.next_token == kNextTokenAtEnd: the token, once known (called after every layer was
  // read or waited for, so it may block until the prefill step ends), or why the sequence is
  // not to be decoded (the transfer then breaks off with that error).
  virtual absl::StatusOr<int32_t> NextToken() {
    return absl::UnimplementedError("this KV source has no token to send at the end");
  }
};

struct KvSendStats {
  absl::Time offered;       // first offer
  absl::Time reserved;      // the receiver accepted (after any back-pressure retries)
  absl::Time moved;         // device transports: the data was complete in the receiver's memory
  absl::Time finished;      // the receiver confirmed every layer
  int32_t offers = 0;       // how many offers it took
  size_t bytes = 0;         // payload bytes sent
  int32_t held_blocks = 0;  // leading blocks the receiver already held (not sent)
  size_t held_bytes = 0;    // the payload bytes they would have taken
};

class KvSender {
 public:
  virtual ~KvSender() = default;
  // Sends the sequence to the receiver at `address`, offering again while it answers
  // RESOURCE_EXHAUSTED, until `deadline` (then DEADLINE_EXCEEDED). Blocking; callers run it
  // off their engine thread. `cancelled`, when given, is polled between steps: when it
  // returns true the transfer stops with CANCELLED.
  virtual absl::StatusOr<KvSendStats> Send(const std::string& address,
                                           const KvTransferHeader& header, KvSource& source,
                                           absl::Time deadline,
                                           std::function<bool()> cancelled = nullptr) = 0;
};

class KvReceiver {
 public:
  virtual ~KvReceiver() = default;
  // What senders pass as `address`.
  virtual std::string address() const = 0;
  // Stops accepting, breaks off transfers in progress (their sinks get Complete(error)),
  // joins every thread. Idempotent; the destructor calls it.
  virtual void Shutdown() = 0;
  virtual size_t bytes_received() const = 0;
};

}  // namespace pds::engine
